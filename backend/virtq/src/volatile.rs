//! Ring fields in memory another side writes concurrently (the guest's rings, or our shadow
//! rings a device reads and writes): volatile accesses with fences, as Linux's
//! `virt_load_acquire`/`virt_store_release` do, never a Rust reference such as `&AtomicU16`
//! over memory whose other writer is not Rust code of ours.

use std::sync::atomic::{fence, Ordering};

/// Loads a little-endian ring index the other side publishes, with acquire ordering: the
/// entries read after it are at least as new.
///
/// # Safety
/// `p` must point at 2 mapped bytes, 2-aligned.
#[inline]
pub unsafe fn load_acquire_u16(p: *const u8) -> u16 {
    // SAFETY: as the caller guarantees.
    let v = unsafe { std::ptr::read_volatile(p.cast::<u16>()) };
    fence(Ordering::Acquire);
    u16::from_le(v)
}

/// Stores a little-endian ring index for the other side, with release ordering: the entries
/// and packet bytes written before it are visible first (see [`load_acquire_u16`]).
///
/// # Safety
/// `p` must point at 2 mapped, writable bytes, 2-aligned.
#[inline]
pub unsafe fn store_release_u16(p: *mut u8, v: u16) {
    fence(Ordering::Release);
    // SAFETY: as the caller guarantees.
    unsafe { std::ptr::write_volatile(p.cast::<u16>(), v.to_le()) };
}

/// Loads a little-endian ring field (an entry, a flags word) with no ordering of its own: the
/// index load before it ordered it.
///
/// # Safety
/// `p` must point at 2 mapped bytes, 2-aligned.
#[inline]
pub unsafe fn load_u16(p: *const u8) -> u16 {
    // SAFETY: as the caller guarantees.
    u16::from_le(unsafe { std::ptr::read_volatile(p.cast::<u16>()) })
}

/// Stores a little-endian ring field with no ordering of its own: the index store after it
/// publishes it.
///
/// # Safety
/// `p` must point at 2 mapped, writable bytes, 2-aligned.
#[inline]
pub unsafe fn store_u16(p: *mut u8, v: u16) {
    // SAFETY: as the caller guarantees.
    unsafe { std::ptr::write_volatile(p.cast::<u16>(), v.to_le()) };
}

/// A hint to bring the cache line at `p` in; never faults, whatever `p` is.
#[inline(always)]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint; it does not fault on any address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p.cast::<i8>(), std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
