//! The guest's three split rings resolved to host memory ([`GuestRings`]), and a
//! virtio-queue `Queue` borrowed for one batch on top of them ([`SplitRing`]).

use std::marker::PhantomData;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use crate::volatile::{load_acquire_u16, load_u16, prefetch, store_release_u16, store_u16};
use crate::{Chain, Desc, DescTable, GuestMap, RingError};

/// Guest physical addresses of one queue's rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddr {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// A guest's descriptor table, avail ring and used ring of `size` entries, checked and
/// resolved to host pointers once: every ring field access after that is in bounds.
#[derive(Clone, Copy)]
pub struct GuestRings<'a> {
    desc: DescTable<'a>,
    avail: *const u8,
    used: *mut u8,
    used_addr: u64,
    size: u16,
    /// `size - 1`: ring slot of an index (the size is a power of two; a mask, not a
    /// division, since every pop and used entry takes one).
    mask: u16,
    _mem: PhantomData<&'a [u8]>,
}

impl<'a> GuestRings<'a> {
    /// Resolves the rings at `addr`: each inside one region and aligned as the virtio spec
    /// requires, in guest and host addresses alike.
    pub fn resolve<M: GuestMemoryBackend>(
        map: &GuestMap<'a, M>,
        addr: RingAddr,
        size: u16,
    ) -> Result<Self, RingError> {
        if size == 0 {
            return Err(RingError::ZeroSize);
        }
        if !size.is_power_of_two() {
            return Err(RingError::SizeNotPowerOfTwo(size));
        }
        let n = usize::from(size);
        let desc = DescTable::resolve(map, addr.desc, size)?;
        let avail = resolve(map, "avail ring", addr.avail, 6 + 2 * n, 2)?;
        let used = resolve(map, "used ring", addr.used, 6 + 8 * n, 4)?;
        Ok(GuestRings {
            desc,
            avail,
            used,
            used_addr: addr.used,
            size,
            mask: size - 1,
            _mem: PhantomData,
        })
    }

    #[inline]
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The ring slot of ring index `idx` (always `< size`).
    #[inline]
    pub fn slot(&self, idx: u16) -> u16 {
        idx & self.mask
    }

    #[inline]
    pub fn desc_table(&self) -> DescTable<'a> {
        self.desc
    }

    /// The guest's avail index (acquire: the entries up to it are readable after).
    #[inline]
    pub fn avail_idx(&self) -> u16 {
        // SAFETY: the index is at offset 2 of the mapped, 2-aligned avail ring.
        unsafe { load_acquire_u16(self.avail.add(2)) }
    }

    /// The guest's avail index, and how many entries it holds past `next_avail`: never more
    /// than a ring's worth, or the guest's index is impossible (an error).
    #[inline]
    pub fn pending_avail(&self, next_avail: u16) -> Result<(u16, u16), RingError> {
        let avail = self.avail_idx();
        let pending = avail.wrapping_sub(next_avail);
        if pending > self.size {
            return Err(RingError::AvailIndex {
                avail,
                pending,
                size: self.size,
            });
        }
        Ok((avail, pending))
    }

    /// The avail entry for avail index `idx` (a head the guest offers; unchecked).
    #[inline]
    pub fn avail_entry(&self, idx: u16) -> u16 {
        let slot = usize::from(self.slot(idx));
        // SAFETY: slot < size, inside the mapped, 2-aligned avail ring.
        unsafe { load_u16(self.avail.add(4 + 2 * slot)) }
    }

    /// The avail ring's interrupt suppression field: `used_event` with event idx, the flags
    /// without (see [`crate::wants_interrupt`]).
    #[inline]
    pub fn suppression(&self, event_idx: bool) -> u16 {
        let off = if event_idx {
            4 + 2 * usize::from(self.size)
        } else {
            0
        };
        // SAFETY: both fields are inside the mapped, 2-aligned avail ring (6 + 2 * size).
        unsafe { load_u16(self.avail.add(off)) }
    }

    /// Writes the used entry for used index `idx` (visible with [`GuestRings::publish_used`]).
    #[inline]
    pub fn write_used(&self, idx: u16, head: u32, len: u32) {
        let e = self.used_elem(idx);
        // SAFETY: `used_elem` points at a mapped, 4-aligned 8-byte element: id, then len.
        unsafe {
            std::ptr::write_volatile(e, head.to_le());
            std::ptr::write_volatile(e.add(1), len.to_le());
        }
    }

    /// Sets the length of the (not yet published) used entry for used index `idx`.
    #[inline]
    pub fn write_used_len(&self, idx: u16, len: u32) {
        // SAFETY: as in `write_used`; the length is the element's second u32.
        unsafe { std::ptr::write_volatile(self.used_elem(idx).add(1), len.to_le()) };
    }

    /// The used ring element for used index `idx`: its first u32 (the id), 4-aligned.
    #[inline]
    fn used_elem(&self, idx: u16) -> *mut u32 {
        let slot = usize::from(self.slot(idx));
        // In bounds: slot < size, and elements are 8 bytes at offset 4 of the mapped used
        // ring of 6 + 8 * size bytes, which `resolve` found 4-aligned.
        self.used.wrapping_add(4 + 8 * slot).cast::<u32>()
    }

    /// Publishes the used entries before `idx` (release) and marks the used ring dirty.
    #[inline]
    pub fn publish_used<M: GuestMemoryBackend>(&self, map: &GuestMap<'a, M>, idx: u16) {
        // SAFETY: the used index is at offset 2 of the mapped, 4-aligned used ring.
        unsafe { store_release_u16(self.used.add(2), idx) };
        self.mark_used_dirty(map);
    }

    /// Sets the used ring's `avail_event` (event idx: where the guest should kick next) and
    /// marks it dirty.
    pub fn set_avail_event<M: GuestMemoryBackend>(&self, map: &GuestMap<'a, M>, idx: u16) {
        let off = 4 + 8 * usize::from(self.size);
        // SAFETY: avail_event is at offset 4 + 8 * size, inside the mapped, 4-aligned used
        // ring (6 + 8 * size bytes).
        unsafe { store_u16(self.used.add(off), idx) };
        // No wrap: the field is inside the ring `resolve` found inside a region.
        map.mark_dirty(self.used_addr.wrapping_add(off as u64), 2);
    }

    fn mark_used_dirty<M: GuestMemoryBackend>(&self, map: &GuestMap<'a, M>) {
        map.mark_dirty(self.used_addr, 6 + 8 * usize::from(self.size));
    }
}

/// The host address of `len` bytes of ring `what` at guest `addr`, aligned to `align` in the
/// guest's and the host's address space.
pub(crate) fn resolve<M: GuestMemoryBackend>(
    map: &GuestMap<'_, M>,
    what: &'static str,
    addr: u64,
    len: usize,
    align: u64,
) -> Result<*mut u8, RingError> {
    if !addr.is_multiple_of(align) {
        return Err(RingError::Misaligned { what, addr });
    }
    let host = map
        .host(addr, len)
        .ok_or(RingError::Unmapped { what, addr, len })?;
    // A region whose guest start is not aligned like its mapping shifts an aligned guest
    // address to a misaligned host one; ring fields are accessed as u16/u32, which must be
    // aligned.
    if !(host as usize as u64).is_multiple_of(align) {
        return Err(RingError::HostMisaligned {
            what,
            addr,
            host: host as usize,
        });
    }
    Ok(host)
}

/// A queue borrowed for one batch. Dropping it publishes the used entries and hands
/// `next_avail`/`next_used` back to the `Queue`.
pub struct SplitRing<'a, M: GuestMemoryBackend> {
    queue: &'a mut Queue,
    pub map: GuestMap<'a, M>,
    rings: GuestRings<'a>,
    next_avail: u16,
    /// The guest's avail index as last read.
    avail_idx: u16,
    next_used: u16,
    published: u16,
}

impl<'a, M: GuestMemoryBackend> SplitRing<'a, M> {
    /// Resolves the rings of a ready queue.
    pub fn new(queue: &'a mut Queue, mem: &'a M) -> Result<Self, RingError> {
        let map = GuestMap::new(mem);
        let addr = RingAddr {
            desc: queue.desc_table(),
            avail: queue.avail_ring(),
            used: queue.used_ring(),
        };
        let rings = GuestRings::resolve(&map, addr, queue.size())?;
        let next_avail = queue.next_avail();
        let next_used = queue.next_used();
        Ok(SplitRing {
            queue,
            map,
            rings,
            next_avail,
            avail_idx: next_avail,
            next_used,
            published: next_used,
        })
    }

    /// The queue's size (entries).
    pub fn size(&self) -> u16 {
        self.rings.size()
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
            let (avail, pending) = self.rings.pending_avail(self.next_avail)?;
            self.avail_idx = avail;
            if pending == 0 {
                return Ok(None);
            }
        }
        let head = self.rings.avail_entry(self.next_avail);
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Asks the CPU to fetch the descriptors of the next `n` available chains (and the avail
    /// entries naming them): the guest wrote them on another core, so each is a cache miss
    /// that would otherwise stall the copy loop one packet at a time.
    #[inline]
    pub fn prefetch_ahead(&self, n: u16) {
        let ready = self.avail_idx.wrapping_sub(self.next_avail).min(n);
        let table = self.rings.desc_table().host();
        for k in 0..ready {
            let head = self.rings.avail_entry(self.next_avail.wrapping_add(k));
            if head < self.size() {
                // In bounds: head < size, inside the mapped descriptor table (and prefetch
                // never faults anyway).
                prefetch(table.wrapping_add(16 * usize::from(head)));
            }
        }
    }

    /// Starts walking the chain at `head`.
    pub fn chain(&self, head: u16) -> Chain<'a> {
        Chain::new(self.rings.desc_table(), head)
    }

    /// The chain's next descriptor, following an indirect table once.
    #[inline]
    pub fn next_desc(&self, c: &mut Chain<'a>) -> Result<Option<Desc>, RingError> {
        c.next_desc(&self.map)
    }

    /// Returns a chain to the guest (published with the batch).
    #[inline]
    pub fn add_used(&mut self, head: u16, len: u32) {
        self.rings.write_used(self.next_used, u32::from(head), len);
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// The used index the next [`SplitRing::add_used`] writes.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Takes back the used entries added since used index `from` (none of which may be
    /// published yet): the next `add_used` overwrites them.
    pub fn unadd_used(&mut self, from: u16) {
        debug_assert!(
            self.next_used.wrapping_sub(from) <= self.next_used.wrapping_sub(self.published)
        );
        self.next_used = from;
    }

    /// Sets the length of every used entry added since used index `from` to 0 (the chains
    /// go back unused, as after a bad packet).
    pub fn empty_used_since(&mut self, from: u16) {
        let mut idx = from;
        while idx != self.next_used {
            self.rings.write_used_len(idx, 0);
            idx = idx.wrapping_add(1);
        }
    }

    /// Makes the used entries added so far visible to the guest: one index store.
    pub fn publish(&mut self) {
        if self.published == self.next_used {
            return;
        }
        self.rings.publish_used(&self.map, self.next_used);
        self.published = self.next_used;
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

impl<M: GuestMemoryBackend> Drop for SplitRing<'_, M> {
    fn drop(&mut self) {
        self.sync();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn used_entries_are_published_once_per_batch() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        for i in 0..3 {
            gq.add(&[wbuf(BUFFERS + i * 0x1000, 100)]);
        }
        let mut q = gq.queue();
        let mut ring = SplitRing::new(&mut q, &mem).unwrap();
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
        let mut ring = SplitRing::new(&mut q, &mem).unwrap();
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
        let err = SplitRing::new(&mut q, &mem).err().unwrap();
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

    /// Ring addresses are the frontend's numbers: near 2^64 the ring's end does not fit, and
    /// that is a refusal, not an overflow (the shadow relay's rings are resolved here too).
    #[test]
    fn rings_at_the_top_of_the_address_space_are_refused() {
        let top = u64::MAX - 4096;
        let mem: Mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(top), 4096)])
                .unwrap();
        let map = GuestMap::new(&mem);
        let at = |desc, avail, used| {
            GuestRings::resolve(&map, RingAddr { desc, avail, used }, 16)
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(at(0x1000, 0x2000, 0x3000), None);
        // 6 + 2 * 16 avail bytes do not fit below 2^64; used: 6 + 8 * 16.
        let err = at(0x1000, u64::MAX - 1, 0x3000).unwrap();
        assert!(err.starts_with("avail ring"), "{err}");
        let err = at(0x1000, 0x2000, u64::MAX - 7).unwrap();
        assert!(err.starts_with("used ring"), "{err}");
        let err = at(u64::MAX - 255, 0x2000, 0x3000).unwrap();
        assert!(err.starts_with("descriptor table"), "{err}");
        assert_eq!(
            GuestRings::resolve(
                &map,
                RingAddr {
                    desc: 0,
                    avail: 0,
                    used: 0
                },
                0
            )
            .err(),
            Some(RingError::ZeroSize)
        );
        // A split ring's indexes wrap at 2^16, which only a power-of-two size divides.
        let zero = RingAddr {
            desc: 0,
            avail: 0,
            used: 0,
        };
        assert_eq!(
            GuestRings::resolve(&map, zero, 24).err(),
            Some(RingError::SizeNotPowerOfTwo(24))
        );
        let rings = GuestRings::resolve(&map, zero, 8).unwrap();
        assert_eq!(
            (rings.slot(7), rings.slot(8), rings.slot(u16::MAX)),
            (7, 0, 7)
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
        let err = SplitRing::new(&mut queue_at(0x4000, 0x2000, 0x1000), &mem).err();
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
        let err = SplitRing::new(&mut queue_at(0x4000, 0x2000, 0x1000), &mem).err();
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
        assert!(SplitRing::new(&mut queue_at(0x4000, 0x2000, 0x1000), &mem).is_ok());
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
        let ring = SplitRing::new(&mut q, &mem).unwrap();
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
}
