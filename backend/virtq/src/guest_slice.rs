//! [`GuestSlice`]: bytes that may change under us, reached only through overlap-safe copies.

use std::marker::PhantomData;

/// Bytes to copy that the guest, or another path of ours, may change meanwhile (a guest
/// buffer, or our own bytes): a pointer and a length. Deliberately no `Deref` to `&[u8]`;
/// the only ways out are overlap-safe copies.
#[derive(Clone, Copy, Debug)]
pub struct GuestSlice<'a> {
    ptr: *const u8,
    len: usize,
    _mem: PhantomData<&'a [u8]>,
}

impl<'a> GuestSlice<'a> {
    /// Our own bytes.
    #[inline]
    pub fn new(bytes: &'a [u8]) -> Self {
        GuestSlice {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
            _mem: PhantomData,
        }
    }

    /// `len` bytes at `ptr`, e.g. a guest buffer resolved through [`GuestMap::host`](crate::GuestMap::host).
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped and readable for `'a` (its bytes may change).
    #[inline]
    pub unsafe fn from_raw(ptr: *const u8, len: usize) -> Self {
        GuestSlice {
            ptr,
            len,
            _mem: PhantomData,
        }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `off..off + len`, cut to what this slice holds.
    #[inline]
    pub fn sub(&self, off: usize, len: usize) -> Self {
        let off = off.min(self.len);
        GuestSlice {
            // In bounds: off <= self.len.
            ptr: self.ptr.wrapping_add(off),
            len: len.min(self.len - off),
            _mem: PhantomData,
        }
    }

    /// Copies the bytes to `dst`, which may overlap them (memmove).
    ///
    /// # Safety
    /// `dst..dst + self.len()` must be mapped and writable.
    #[inline]
    pub unsafe fn copy_to(&self, dst: *mut u8) {
        // SAFETY: the source is readable (`new`/`from_raw`), the destination writable (the
        // caller); ptr::copy is defined for overlapping ranges.
        unsafe { std::ptr::copy(self.ptr, dst, self.len) };
    }

    /// Appends the bytes to `out` (a private copy: slices of it are fine).
    #[inline]
    pub fn append_to(&self, out: &mut Vec<u8>) {
        out.reserve(self.len);
        // SAFETY: `reserve` made room for `len` bytes after the vector's initialised part,
        // and the copy initialises exactly them.
        unsafe {
            self.copy_to(out.as_mut_ptr().add(out.len()));
            out.set_len(out.len() + self.len);
        }
    }
}
