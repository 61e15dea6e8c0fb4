//! The split virtqueue, read and written the fast way.
//!
//! virtio-queue's `Queue` is the reference implementation and stays the owner of a queue's
//! state (addresses, size, `next_avail`/`next_used`, notification setup), but its data-path
//! calls go through vm-memory for every field: each descriptor read, avail-ring read and
//! used-ring write looks the guest address up in the memory regions, bounds-checks it and
//! copies through a volatile slice, and each `add_used` publishes the used index on its own.
//! Profiling showed those lookups and per-entry publications as a third of the per-packet
//! cost. Here the rings are resolved to host pointers once per batch, buffers are translated
//! through a small cached region table, used entries are published with one index store per
//! batch, and the guest's interrupt suppression (event idx, or `VRING_AVAIL_F_NO_INTERRUPT`)
//! is honoured so a polling frontend gets no eventfd writes.
//!
//! Everything the guest controls is still checked: ring addresses must lie inside one memory
//! region and be aligned, descriptor indexes must be inside their table, indirect tables must
//! be mapped and sized in whole descriptors, chains are cut after a table's worth of
//! descriptors (loops), and an available index more than a ring ahead is an error. Guest
//! buffers that are not in one region (or not in memory at all) fall back to vm-memory,
//! which produces the precise error. Every byte written into guest memory marks the region's
//! dirty bitmap, as vm-memory's own writes do, so live migration sees it.
//!
//! Guest memory is never borrowed as a Rust reference (`&[u8]`, `&AtomicU16`): the guest
//! changes it under us, and one guest buffer may be both a TX source and an RX destination
//! (loopback), so a shared reference's promise that the bytes stay unchanged would be a lie.
//! It is reached through raw pointers ([`GuestSlice`], ring pointers) and copied with
//! `ptr::copy` (memmove), which is as fast as memcpy for disjoint ranges and defined for
//! overlapping ones.

use std::marker::PhantomData;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    MemoryRegionAddress,
};

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
    pub fn new(bytes: &'a [u8]) -> Self {
        GuestSlice {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
            _mem: PhantomData,
        }
    }

    /// `len` bytes at `ptr`, e.g. a guest buffer resolved through [`GuestMap::host`].
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped and readable for `'a` (its bytes may change).
    pub unsafe fn from_raw(ptr: *const u8, len: usize) -> Self {
        GuestSlice {
            ptr,
            len,
            _mem: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `off..off + len`, cut to what this slice holds.
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

/// Regions kept in the translation table; QEMU guests have one to three. Buffers in further
/// regions still work, through vm-memory.
const MAP_REGIONS: usize = 4;

/// Why a ring could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("{what} at {addr:#x}+{len} is not inside one guest memory region")]
    Unmapped {
        what: &'static str,
        addr: u64,
        len: usize,
    },
    #[error("{what} at {addr:#x} is misaligned")]
    Misaligned { what: &'static str, addr: u64 },
    #[error("{what} at {addr:#x} is mapped at misaligned host address {host:#x}")]
    HostMisaligned {
        what: &'static str,
        addr: u64,
        host: usize,
    },
    #[error("guest published avail index {avail} with {pending} pending on a {size}-entry ring")]
    AvailIndex { avail: u16, pending: u16, size: u16 },
    #[error("chain at head {head}: descriptor index {index} is outside its {size}-entry table")]
    DescIndex { head: u16, index: u16, size: u16 },
    #[error("chain at head {head}: bad indirect table {addr:#x}+{len}: {why}")]
    Indirect {
        head: u16,
        addr: u64,
        len: u32,
        why: &'static str,
    },
}

/// One region of guest memory as the data path needs it.
struct Region<'a, R> {
    start: u64,
    len: u64,
    host: *mut u8,
    region: &'a R,
}

impl<R> Clone for Region<'_, R> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<R> Copy for Region<'_, R> {}

/// Guest-to-host address translation for one batch, with dirty marking on writes.
pub struct GuestMap<'a, M: GuestMemoryBackend> {
    mem: &'a M,
    regions: [Option<Region<'a, M::R>>; MAP_REGIONS],
}

impl<'a, M: GuestMemoryBackend> GuestMap<'a, M> {
    pub fn new(mem: &'a M) -> Self {
        let mut regions = [None; MAP_REGIONS];
        for (slot, region) in regions.iter_mut().zip(mem.iter()) {
            if let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) {
                *slot = Some(Region {
                    start: region.start_addr().0,
                    len: region.len(),
                    host,
                    region,
                });
            }
        }
        GuestMap { mem, regions }
    }

    /// The memory this map translates.
    pub fn mem(&self) -> &'a M {
        self.mem
    }

    /// Host address of `addr..addr+len` if it lies inside one mapped region, with the region
    /// and the offset into it.
    #[inline]
    fn lookup(&self, addr: u64, len: usize) -> Option<(*mut u8, &'a M::R, usize)> {
        for r in self.regions.iter().flatten() {
            let Some(off) = addr.checked_sub(r.start) else {
                continue;
            };
            if off < r.len && (len as u64) <= r.len - off {
                // In bounds of a live mapping of `r.len` bytes.
                return Some((r.host.wrapping_add(off as usize), r.region, off as usize));
            }
        }
        None
    }

    /// Host pointer to `len` bytes at guest `addr` (for reading), if in one region.
    #[inline]
    pub fn host(&self, addr: u64, len: usize) -> Option<*mut u8> {
        self.lookup(addr, len).map(|(p, _, _)| p)
    }

    /// Reads `buf.len()` bytes at guest `addr`.
    #[inline]
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        match self.lookup(addr, buf.len()) {
            Some((p, _, _)) => {
                // SAFETY: `lookup` checked that the range is inside a live mapping; guest
                // memory is plain bytes, and the guest racing us only changes their values.
                unsafe { GuestSlice::from_raw(p, buf.len()).copy_to(buf.as_mut_ptr()) };
                Ok(())
            }
            None => self.mem.read_slice(buf, GuestAddress(addr)),
        }
    }

    /// Writes `src` (our own bytes) at guest `addr` and marks it dirty for migration.
    #[inline]
    pub fn write(&self, addr: u64, src: &[u8]) -> Result<(), GuestMemoryError> {
        if self.write_unmarked(addr, GuestSlice::new(src))? {
            self.mark_dirty(addr, src.len());
        }
        Ok(())
    }

    /// Like [`GuestMap::write`], from bytes that may be guest memory overlapping the
    /// destination (loopback), and leaving the dirty marking to the caller when it took the
    /// fast path (returns true then): the RX path marks a whole buffer once after writing
    /// header and data into it, half the marks (each an atomic in the log) per packet.
    #[inline]
    pub fn write_unmarked(&self, addr: u64, src: GuestSlice<'_>) -> Result<bool, GuestMemoryError> {
        match self.lookup(addr, src.len()) {
            Some((p, _, _)) => {
                // SAFETY: `lookup` checked that the destination is inside a live mapping;
                // `copy_to` is a memmove, so a source overlapping it is fine.
                unsafe { src.copy_to(p) };
                Ok(true)
            }
            None => self.write_bounced(addr, src).map(|()| false),
        }
    }

    /// vm-memory's write, for a destination outside the table (across regions, or not in
    /// memory: its precise error). Its API takes `&[u8]`, which must not be built over guest
    /// memory, so the source goes through a small private bounce buffer.
    #[cold]
    fn write_bounced(&self, addr: u64, src: GuestSlice<'_>) -> Result<(), GuestMemoryError> {
        let mut bounce = [0u8; 512];
        let mut off = 0;
        loop {
            let piece = src.sub(off, bounce.len());
            let buf = &mut bounce[..piece.len()];
            // SAFETY: `buf` is our own `piece.len()` bytes.
            unsafe { piece.copy_to(buf.as_mut_ptr()) };
            let at = GuestAddress(addr.wrapping_add(off as u64));
            self.mem.write_slice(buf, at)?;
            off += piece.len();
            if off >= src.len() {
                return Ok(());
            }
        }
    }

    /// Marks `addr..addr+len` dirty (after writing it through a host pointer).
    pub fn mark_dirty(&self, addr: u64, len: usize) {
        if let Some((_, region, off)) = self.lookup(addr, len) {
            region.bitmap().mark_dirty(off, len);
        }
    }
}

/// One split-ring descriptor.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    next: u16,
}

impl Desc {
    pub fn is_write_only(&self) -> bool {
        self.flags & virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16 != 0
    }
}

/// Walks one descriptor chain (see [`Vring::next_desc`]).
pub struct Chain {
    head: u16,
    table: *const u8,
    table_len: u16,
    next: Option<u16>,
    /// Descriptors left before the chain is cut (a loop in the guest's table).
    ttl: u16,
    indirect: bool,
}

impl Chain {
    pub fn head(&self) -> u16 {
        self.head
    }
}

/// A queue borrowed for one batch. Dropping it publishes the used entries and hands
/// `next_avail`/`next_used` back to the `Queue`.
pub struct Vring<'a, M: GuestMemoryBackend> {
    queue: &'a mut Queue,
    pub map: GuestMap<'a, M>,
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    used_addr: u64,
    size: u16,
    next_avail: u16,
    /// The guest's avail index as last read.
    avail_idx: u16,
    next_used: u16,
    published: u16,
}

impl<'a, M: GuestMemoryBackend> Vring<'a, M> {
    /// Resolves the rings of a ready queue.
    pub fn new(queue: &'a mut Queue, mem: &'a M) -> Result<Self, RingError> {
        let map = GuestMap::new(mem);
        let size = queue.size();
        let n = usize::from(size);
        let resolve = |what, addr: u64, len: usize, align: u64| {
            if !addr.is_multiple_of(align) {
                return Err(RingError::Misaligned { what, addr });
            }
            let host = map
                .host(addr, len)
                .ok_or(RingError::Unmapped { what, addr, len })?;
            // A region whose guest start is not aligned like its mapping shifts an aligned
            // guest address to a misaligned host one; ring fields are accessed as u16/u32
            // and atomics, which must be aligned.
            if !(host as usize as u64).is_multiple_of(align) {
                return Err(RingError::HostMisaligned {
                    what,
                    addr,
                    host: host as usize,
                });
            }
            Ok(host)
        };
        let desc = resolve("descriptor table", queue.desc_table(), 16 * n, 1)?;
        let avail = resolve("avail ring", queue.avail_ring(), 6 + 2 * n, 2)?;
        let used_addr = queue.used_ring();
        let used = resolve("used ring", used_addr, 6 + 8 * n, 4)?;
        let next_avail = queue.next_avail();
        let next_used = queue.next_used();
        Ok(Vring {
            queue,
            map,
            desc,
            avail,
            used,
            used_addr,
            size,
            next_avail,
            avail_idx: next_avail,
            next_used,
            published: next_used,
        })
    }

    /// The queue's size (entries).
    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Un-pops chains: the next pop returns the chain at `next_avail` again.
    pub fn set_next_avail(&mut self, next_avail: u16) {
        self.next_avail = next_avail;
    }

    /// Takes the next available chain's head index, or `None` if the guest has none.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<u16>, RingError> {
        if self.next_avail == self.avail_idx {
            // SAFETY: `avail` points at a mapped, 2-aligned avail ring of this size; the
            // index is at offset 2.
            let avail = unsafe { load_acquire_u16(self.avail.add(2)) };
            let pending = avail.wrapping_sub(self.next_avail);
            if pending > self.size {
                return Err(RingError::AvailIndex {
                    avail,
                    pending,
                    size: self.size,
                });
            }
            self.avail_idx = avail;
            if pending == 0 {
                return Ok(None);
            }
        }
        let slot = usize::from(self.next_avail % self.size);
        // SAFETY: slot < size, inside the mapped ring; 2-aligned.
        let head = u16::from_le(unsafe {
            std::ptr::read_volatile(self.avail.add(4 + 2 * slot) as *const u16)
        });
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Asks the CPU to fetch the descriptors of the next `n` available chains (and the avail
    /// entries naming them): the guest wrote them on another core, so each is a cache miss
    /// that would otherwise stall the copy loop one packet at a time.
    #[inline]
    pub fn prefetch_ahead(&self, n: u16) {
        let ready = self.avail_idx.wrapping_sub(self.next_avail).min(n);
        for k in 0..ready {
            let slot = usize::from(self.next_avail.wrapping_add(k) % self.size);
            // SAFETY: slot < size, inside the mapped, 2-aligned avail ring.
            let head = u16::from_le(unsafe {
                std::ptr::read_volatile(self.avail.add(4 + 2 * slot) as *const u16)
            });
            if head < self.size {
                // SAFETY: head < size: inside the mapped descriptor table.
                prefetch(unsafe { self.desc.add(16 * usize::from(head)) });
            }
        }
    }

    /// Starts walking the chain at `head`.
    pub fn chain(&self, head: u16) -> Chain {
        Chain {
            head,
            table: self.desc,
            table_len: self.size,
            next: Some(head),
            ttl: self.size,
            indirect: false,
        }
    }

    /// The chain's next descriptor, following an indirect table once.
    pub fn next_desc(&self, c: &mut Chain) -> Result<Option<Desc>, RingError> {
        loop {
            let Some(index) = c.next else {
                return Ok(None);
            };
            if index >= c.table_len {
                return Err(RingError::DescIndex {
                    head: c.head,
                    index,
                    size: c.table_len,
                });
            }
            // SAFETY: index < table_len, and the table was resolved as table_len * 16 mapped
            // bytes. Descriptors may be unaligned in an indirect table: read bytewise.
            let raw: [u8; 16] = unsafe {
                std::ptr::read_unaligned(c.table.add(16 * usize::from(index)) as *const [u8; 16])
            };
            let d = Desc {
                addr: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
                len: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
                flags: u16::from_le_bytes([raw[12], raw[13]]),
                next: u16::from_le_bytes([raw[14], raw[15]]),
            };
            c.ttl = c.ttl.saturating_sub(1);
            c.next = if d.flags & VRING_DESC_F_NEXT as u16 != 0 && c.ttl > 0 {
                Some(d.next)
            } else {
                None
            };
            if d.flags & VRING_DESC_F_INDIRECT as u16 == 0 {
                return Ok(Some(d));
            }
            let bad = |why| RingError::Indirect {
                head: c.head,
                addr: d.addr,
                len: d.len,
                why,
            };
            if c.indirect {
                return Err(bad("nested indirect table"));
            }
            if d.len == 0 || !d.len.is_multiple_of(16) || d.len / 16 > u32::from(u16::MAX) {
                return Err(bad("length is not a whole number of descriptors"));
            }
            let table = self
                .map
                .host(d.addr, d.len as usize)
                .ok_or(bad("not inside one guest memory region"))?;
            c.table = table;
            c.table_len = (d.len / 16) as u16;
            c.ttl = c.table_len;
            c.next = Some(0);
            c.indirect = true;
        }
    }

    /// Returns a chain to the guest (published with the batch).
    #[inline]
    pub fn add_used(&mut self, head: u16, len: u32) {
        let slot = usize::from(self.next_used % self.size);
        // SAFETY: slot < size inside the mapped, 4-aligned used ring; elements are 8 bytes
        // at offset 4.
        unsafe {
            let e = self.used.add(4 + 8 * slot) as *mut u32;
            std::ptr::write_volatile(e, u32::from(head).to_le());
            std::ptr::write_volatile(e.add(1), len.to_le());
        }
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Makes the used entries added so far visible to the guest: one index store.
    pub fn publish(&mut self) {
        if self.published == self.next_used {
            return;
        }
        // SAFETY: the used index is at offset 2 of the mapped, 4-aligned used ring.
        unsafe { store_release_u16(self.used.add(2), self.next_used) };
        self.published = self.next_used;
        self.map
            .mark_dirty(self.used_addr, 6 + 8 * usize::from(self.size));
    }

    /// Publishes and hands the indexes back to the `Queue` (also done on drop).
    pub fn sync(&mut self) {
        self.publish();
        self.queue.set_next_avail(self.next_avail);
        self.queue.set_next_used(self.next_used);
    }

    /// The queue, synced (for notification setup).
    pub fn queue(&mut self) -> &mut Queue {
        self.sync();
        self.queue
    }
}

impl<M: GuestMemoryBackend> Drop for Vring<'_, M> {
    fn drop(&mut self) {
        self.sync();
    }
}

/// Loads a little-endian ring index the guest publishes, with acquire ordering: the entries
/// read after it are at least as new. A volatile load and a fence, as Linux's
/// `virt_load_acquire` does, rather than an `&AtomicU16` over guest memory.
///
/// # Safety
/// `p` must point at 2 mapped bytes, 2-aligned.
#[inline]
unsafe fn load_acquire_u16(p: *const u8) -> u16 {
    // SAFETY: as the caller guarantees.
    let v = unsafe { std::ptr::read_volatile(p.cast::<u16>()) };
    fence(Ordering::Acquire);
    u16::from_le(v)
}

/// Stores a little-endian ring index for the guest, with release ordering: the entries and
/// packet bytes written before it are visible first (see [`load_acquire_u16`]).
///
/// # Safety
/// `p` must point at 2 mapped, writable bytes, 2-aligned.
#[inline]
unsafe fn store_release_u16(p: *mut u8, v: u16) {
    fence(Ordering::Release);
    // SAFETY: as the caller guarantees.
    unsafe { std::ptr::write_volatile(p.cast::<u16>(), v.to_le()) };
}

/// A little-endian u16 of guest memory (a ring field), through the cached translation.
fn read_u16<M: GuestMemoryBackend>(mem: &M, addr: u64) -> Option<u16> {
    let mut b = [0u8; 2];
    GuestMap::new(mem).read(addr, &mut b).ok()?;
    Some(u16::from_le_bytes(b))
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

/// Whether the guest wants an interrupt for the used entries added since the used index was
/// `old_used` (event idx), or at all (`VRING_AVAIL_F_NO_INTERRUPT` without event idx). Unlike
/// virtio-queue's, it needs no per-entry bookkeeping, and honours the flag: DPDK's polling
/// virtio driver sets it, and each eventfd write would otherwise cost a syscall per batch.
pub fn needs_notification<M: GuestMemoryBackend>(queue: &Queue, mem: &M, old_used: u16) -> bool {
    let new = queue.next_used();
    if new == old_used {
        return false;
    }
    // Our used index store before the guest's suppression fields read.
    fence(Ordering::SeqCst);
    let avail = queue.avail_ring();
    if queue.event_idx_enabled() {
        let at = avail.wrapping_add(4 + 2 * u64::from(queue.size()));
        match read_u16(mem, at) {
            Some(ev) => new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old_used),
            None => true,
        }
    } else {
        match read_u16(mem, avail) {
            Some(flags) => flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_guest::*;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn used_entries_are_published_once_per_batch() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        for i in 0..3 {
            gq.add(&[wbuf(BUFFERS + i * 0x1000, 100)]);
        }
        let mut q = gq.queue();
        let mut ring = Vring::new(&mut q, &mem).unwrap();
        let mut heads = Vec::new();
        while let Some(h) = ring.pop().unwrap() {
            heads.push(h);
        }
        assert_eq!(heads, vec![0, 1, 2]);
        for &h in &heads {
            ring.add_used(h, 7);
        }
        // Written, not yet visible: the guest sees the whole batch at once.
        assert_eq!(gq.used_idx(), 0);
        ring.publish();
        assert_eq!(gq.used_idx(), 3);
        assert_eq!(gq.used(2), (2, 7));
        drop(ring);
        assert_eq!((q.next_avail(), q.next_used()), (3, 3));
    }

    #[test]
    fn an_avail_index_more_than_a_ring_ahead_is_an_error() {
        let mem = memory();
        let gq = GuestQueue::new(&mem, 0, 16);
        let mut q = gq.queue();
        mem.write_obj(40u16.to_le(), GuestAddress(q.avail_ring() + 2))
            .unwrap();
        let mut ring = Vring::new(&mut q, &mem).unwrap();
        assert!(matches!(
            ring.pop(),
            Err(RingError::AvailIndex {
                avail: 40,
                pending: 40,
                size: 16
            })
        ));
    }

    #[test]
    fn rings_outside_memory_are_refused() {
        let mem = memory();
        let gq = GuestQueue::new(&mem, 0, 16);
        let mut q = gq.queue();
        q.set_used_ring_address(Some(0xffff_f000), Some(0));
        let err = Vring::new(&mut q, &mem).err().unwrap();
        assert!(
            matches!(
                err,
                RingError::Unmapped {
                    what: "used ring",
                    ..
                }
            ),
            "{err}"
        );
    }

    /// A ready 16-entry queue with its rings at these guest addresses.
    fn queue_at(desc: u32, avail: u32, used: u32) -> Queue {
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(desc), Some(0));
        q.set_avail_ring_address(Some(avail), Some(0));
        q.set_used_ring_address(Some(used), Some(0));
        q.set_ready(true);
        q
    }

    #[test]
    fn unaligned_region_start_is_refused() {
        // Guest memory starting at guest address `start`: aligned guest addresses sit at
        // host offsets `addr - start` of the (page-aligned) mapping.
        let at = |start| -> Mem {
            GuestMemoryMmap::from_ranges(&[(GuestAddress(start), 1 << 20)]).unwrap()
        };
        let mem = at(2);
        let err = Vring::new(&mut queue_at(0x4000, 0x2000, 0x1000), &mem).err();
        assert!(
            matches!(
                err,
                Some(RingError::HostMisaligned {
                    what: "used ring",
                    addr: 0x1000,
                    ..
                })
            ),
            "{err:?}"
        );
        let mem = at(1);
        let err = Vring::new(&mut queue_at(0x4000, 0x2000, 0x1000), &mem).err();
        assert!(
            matches!(
                err,
                Some(RingError::HostMisaligned {
                    what: "avail ring",
                    addr: 0x2000,
                    ..
                })
            ),
            "{err:?}"
        );
        // Aligned like its mapping: accepted.
        let mem = at(0x1000);
        assert!(Vring::new(&mut queue_at(0x4000, 0x2000, 0x1000), &mem).is_ok());
    }

    #[test]
    fn bad_chains_end_in_errors_not_panics() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        // A descriptor whose `next` is outside the table.
        let h0 = gq.add(&[wbuf(BUFFERS, 10), wbuf(BUFFERS, 10)]);
        mem.write_obj(99u16.to_le(), GuestAddress(16 * u64::from(h0) + 14))
            .unwrap();
        // An indirect table holding another indirect descriptor.
        let table = 0x30_0000u64;
        let h1 = gq.add_indirect(&[wbuf(BUFFERS, 10)], table);
        let flags = (VRING_DESC_F_INDIRECT) as u16;
        mem.write_obj(flags.to_le(), GuestAddress(table + 12))
            .unwrap();
        // An indirect table of a length that is no whole number of descriptors.
        let h2 = gq.add_indirect(&[wbuf(BUFFERS, 10)], table + 0x100);
        mem.write_obj(17u32.to_le(), GuestAddress(16 * u64::from(h2) + 8))
            .unwrap();
        let mut q = gq.queue();
        let ring = Vring::new(&mut q, &mem).unwrap();
        let walk = |head| {
            let mut c = ring.chain(head);
            loop {
                match ring.next_desc(&mut c) {
                    Ok(Some(_)) => continue,
                    Ok(None) => return None,
                    Err(e) => return Some(e),
                }
            }
        };
        assert!(matches!(
            walk(h0),
            Some(RingError::DescIndex { index: 99, .. })
        ));
        assert!(matches!(
            walk(h1),
            Some(RingError::Indirect {
                why: "nested indirect table",
                ..
            })
        ));
        assert!(matches!(walk(h2), Some(RingError::Indirect { .. })));
        assert!(matches!(
            walk(200),
            Some(RingError::DescIndex { index: 200, .. })
        ));
    }

    /// Sets the avail ring's flags and used_event fields.
    fn guest_suppression(mem: &Mem, q: &Queue, flags: u16, used_event: u16) {
        mem.write_obj(flags.to_le(), GuestAddress(q.avail_ring()))
            .unwrap();
        let at = q.avail_ring() + 4 + 2 * u64::from(q.size());
        mem.write_obj(used_event.to_le(), GuestAddress(at)).unwrap();
    }

    #[test]
    fn notification_follows_the_guest_suppression() {
        let mem = memory();
        let gq = GuestQueue::new(&mem, 0, 16);
        let mut q = gq.queue();
        // Nothing new: never.
        assert!(!needs_notification(&q, &mem, 0));
        q.set_next_used(4);
        // Without event idx: unless the guest set VRING_AVAIL_F_NO_INTERRUPT (polling).
        guest_suppression(&mem, &q, 0, 0);
        assert!(needs_notification(&q, &mem, 0));
        guest_suppression(&mem, &q, VRING_AVAIL_F_NO_INTERRUPT as u16, 0);
        assert!(!needs_notification(&q, &mem, 0));
        // With event idx: only when the batch (old, new] crosses used_event.
        q.set_event_idx(true);
        guest_suppression(&mem, &q, 0, 2);
        assert!(needs_notification(&q, &mem, 0));
        assert!(!needs_notification(&q, &mem, 3));
        guest_suppression(&mem, &q, 0, 9);
        assert!(!needs_notification(&q, &mem, 0));
        // Across the index wrap.
        q.set_next_used(2);
        guest_suppression(&mem, &q, 0, 0xffff);
        assert!(needs_notification(&q, &mem, 0xfffe));
    }

    /// A buffer across two regions is not in the table: vm-memory writes it, from a private
    /// bounce buffer a few hundred bytes at a time, since its API wants a `&[u8]`.
    #[test]
    fn writes_across_regions_are_bounced_whole() {
        let mem: Mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap();
        let map = GuestMap::new(&mem);
        let bytes = crate::mock_guest::pattern(1500, 3);
        let at = 0x1_0000 - 700;
        assert!(!map.write_unmarked(at, GuestSlice::new(&bytes)).unwrap());
        assert_eq!(read(&mem, at, 1500), bytes);
        // A piece of a slice, as the RX path writes them.
        let piece = GuestSlice::new(&bytes).sub(1000, 600);
        assert_eq!(piece.len(), 500);
        assert!(!map.write_unmarked(at + 400, piece).unwrap());
        assert_eq!(read(&mem, at + 400, 500), bytes[1000..]);
        // Running off the end of memory: vm-memory's error.
        assert!(map
            .write_unmarked(0x2_0000 - 100, GuestSlice::new(&bytes))
            .is_err());
    }

    #[test]
    fn writes_mark_guest_pages_dirty() {
        let mem: GuestMemoryMmap<AtomicBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = GuestMap::new(&mem);
        map.write(0x5010, &[1, 2, 3]).unwrap();
        let region = mem.iter().next().unwrap();
        assert!(region.bitmap().dirty_at(0x5000));
        assert!(!region.bitmap().dirty_at(0x4000));
        assert!(!region.bitmap().dirty_at(0x6000));
        let mut back = [0u8; 3];
        map.read(0x5010, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3]);
        // Outside memory: vm-memory's error, no write.
        assert!(map.write((1 << 20) - 1, &[1, 2]).is_err());
        assert!(map.read(u64::MAX, &mut back).is_err());
    }
}
