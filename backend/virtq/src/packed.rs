//! The guest's packed virtqueue (VIRTIO_F_RING_PACKED, virtio 1.2 section 2.8) borrowed for
//! one batch ([`PackedRing`]), and its event suppression ([`PackedEvents`]).
//!
//! One descriptor ring serves both directions: the driver makes a chain of `count`
//! consecutive descriptors available by flipping the first one's AVAIL/USED flags to its
//! wrap counter (after writing the others), and the device returns it with one used
//! descriptor written over the chain's first slot, then moves on by `count` slots. So the
//! device's used position always trails its avail position by exactly the chains it holds.
//!
//! Positions are kept as vhost-user encodes them in GET/SET_VRING_BASE: the ring slot in bits
//! 0..15 and the wrap counter in bit 15 ([`Pos`]); a `Queue`'s `next_avail` and `next_used`
//! hold such positions for a packed ring.
//!
//! Used descriptors are kept back (in a buffer reused by the thread) and written when the
//! batch is published, the first one's flags last: the guest sees the whole batch at once,
//! as with the split ring's one index store, and a packet taken back before publication
//! ([`PackedRing::unadd_used`]) never overwrote the descriptors of the chains it returns to
//! the ring.

use std::cell::RefCell;
use std::marker::PhantomData;

use virtio_bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED,
    VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE, VRING_PACKED_EVENT_FLAG_ENABLE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use crate::desc::Layout;
use crate::volatile::{load_acquire_u16, load_u16, prefetch, store_release_u16, store_u16};
use crate::{need_event, Chain, DescTable, GuestMap, Head, RingError};

const AVAIL: u16 = 1 << VRING_PACKED_DESC_F_AVAIL;
const USED: u16 = 1 << VRING_PACKED_DESC_F_USED;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
/// Bit 15 of a position or an event's `off_wrap`: the wrap counter.
const WRAP: u16 = 1 << 15;

/// A position in a packed ring: slot in bits 0..15, wrap counter in bit 15.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos(pub u16);

impl Pos {
    /// Where a ring starts: slot 0, wrap counter 1 (virtio 1.2, 2.8.1).
    pub const START: Pos = Pos(WRAP);

    #[inline]
    pub fn slot(self) -> u16 {
        self.0 & !WRAP
    }

    #[inline]
    pub fn wrap(self) -> bool {
        self.0 & WRAP != 0
    }

    /// `n` slots on in a ring of `size` (`n <= size`), the wrap counter flipped on crossing
    /// its end.
    #[inline]
    pub fn advance(self, n: u16, size: u16) -> Pos {
        let slot = u32::from(self.slot()) + u32::from(n);
        if slot >= u32::from(size) {
            Pos((slot - u32::from(size)) as u16 | (!self.0 & WRAP))
        } else {
            Pos(slot as u16 | (self.0 & WRAP))
        }
    }

    /// The AVAIL and USED flags of a used descriptor written at this position.
    #[inline]
    fn used_flags(self) -> u16 {
        if self.wrap() {
            AVAIL | USED
        } else {
            0
        }
    }
}

/// Whether descriptor flags `flags` make the slot available at driver wrap counter `wrap`.
#[inline]
fn is_avail(flags: u16, wrap: bool) -> bool {
    let (avail, used) = (flags & AVAIL != 0, flags & USED != 0);
    avail == wrap && used != wrap
}

/// Whether the descriptor at position `at` of `queue`'s packed ring is available (a fresh
/// read through guest memory: for a queue not borrowed as a [`PackedRing`]).
pub(crate) fn is_avail_at<M: GuestMemoryBackend>(
    map: &GuestMap<'_, M>,
    queue: &Queue,
    at: Pos,
) -> Result<bool, RingError> {
    if at.slot() >= queue.size() {
        return Err(RingError::PackedPosition {
            pos: at.0,
            size: queue.size(),
        });
    }
    let addr = queue.desc_table() + 16 * u64::from(at.slot()) + 14;
    let mut b = [0u8; 2];
    map.read(addr, &mut b).map_err(|_| RingError::Unmapped {
        what: "descriptor ring",
        addr,
        len: 2,
    })?;
    Ok(is_avail(u16::from_le_bytes(b), at.wrap()))
}

/// A used descriptor not written yet.
#[derive(Clone, Copy)]
struct Pending {
    at: Pos,
    id: u16,
    len: u32,
}

thread_local! {
    /// Pending lists of this thread's past batches, kept so a batch allocates nothing. A few,
    /// as a worker holds more than one packed ring at once (loopback's TX and RX).
    static SPARE: RefCell<Vec<Vec<Pending>>> = const { RefCell::new(Vec::new()) };
}

/// Spare pending lists a thread keeps (more than it holds rings at once).
const SPARES: usize = 4;

/// The event suppression areas of a packed queue: the driver's (at the `Queue`'s avail
/// address: may we interrupt it?) and ours (at its used address: should it kick us?).
#[derive(Clone, Copy)]
pub struct PackedEvents {
    driver: *const u8,
    device: *mut u8,
    device_addr: u64,
}

impl PackedEvents {
    /// Resolves the two 4-byte, 4-aligned areas of `queue`.
    pub fn resolve<M: GuestMemoryBackend>(
        map: &GuestMap<'_, M>,
        queue: &Queue,
    ) -> Result<Self, RingError> {
        let driver = crate::split::resolve(map, "driver event area", queue.avail_ring(), 4, 4)?;
        let device = crate::split::resolve(map, "device event area", queue.used_ring(), 4, 4)?;
        Ok(PackedEvents {
            driver,
            device,
            device_addr: queue.used_ring(),
        })
    }

    /// Whether the guest wants an interrupt for used descriptors written from `old` to
    /// `new` (event idx: its `off_wrap` passed; otherwise its flags say so).
    pub fn wants_interrupt(&self, event_idx: bool, old: Pos, new: Pos, size: u16) -> bool {
        if old == new {
            return false;
        }
        // Our used descriptors' stores before the guest's suppression fields are read.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: off_wrap and flags are the two u16 of the mapped, 4-aligned driver area.
        let (off_wrap, flags) = unsafe { (load_u16(self.driver), load_u16(self.driver.add(2))) };
        match u32::from(flags) {
            VRING_PACKED_EVENT_FLAG_ENABLE => true,
            VRING_PACKED_EVENT_FLAG_DISABLE => false,
            VRING_PACKED_EVENT_FLAG_DESC if event_idx => passes(Pos(off_wrap), old, new, size),
            // DESC without event idx, or a reserved value: err on the side of an interrupt.
            _ => true,
        }
    }

    /// Asks the guest to kick us for new chains (from `next_avail` with event idx, any
    /// without) or not at all; marks the area dirty.
    pub fn set_kicks<M: GuestMemoryBackend>(
        &self,
        map: &GuestMap<'_, M>,
        event_idx: bool,
        on: Option<Pos>,
    ) {
        let (off_wrap, flags) = match on {
            Some(at) if event_idx => (at.0, VRING_PACKED_EVENT_FLAG_DESC),
            Some(_) => (0, VRING_PACKED_EVENT_FLAG_ENABLE),
            None => (0, VRING_PACKED_EVENT_FLAG_DISABLE),
        };
        // SAFETY: both fields are inside the mapped, 4-aligned device area; the guest reads
        // them, so plain stores (no reference) are all we do.
        unsafe {
            store_u16(self.device, off_wrap);
            store_release_u16(self.device.add(2), flags as u16);
        }
        map.mark_dirty(self.device_addr, 4);
    }
}

/// Whether used descriptors written from `old` to `new` pass the guest's event position
/// `event` (the packed form of `vring_need_event`: slots measured on one lap).
fn passes(event: Pos, old: Pos, new: Pos, size: u16) -> bool {
    // Unwrapped to a count of slots since a common origin: a wrap counter different from
    // the newest position's means the previous lap.
    let lap = |p: Pos| {
        if p.wrap() == new.wrap() {
            p.slot()
        } else {
            p.slot().wrapping_sub(size)
        }
    };
    need_event(lap(event), new.slot(), lap(old))
}

/// A packed queue borrowed for one batch, with the same interface as [`crate::SplitRing`].
/// Dropping it publishes the used descriptors and hands the positions back to the `Queue`.
pub struct PackedRing<'a, M: GuestMemoryBackend> {
    queue: &'a mut Queue,
    pub map: GuestMap<'a, M>,
    table: DescTable<'a>,
    /// The ring, for the used descriptors we write (the table reads through `table`).
    ring: *mut u8,
    ring_addr: u64,
    size: u16,
    next_avail: Pos,
    next_used: Pos,
    pending: Vec<Pending>,
    _mem: PhantomData<&'a [u8]>,
}

impl<'a, M: GuestMemoryBackend> PackedRing<'a, M> {
    /// Resolves the descriptor ring of a ready packed queue (inside one region, 16-aligned).
    pub fn new(queue: &'a mut Queue, mem: &'a M) -> Result<Self, RingError> {
        let map = GuestMap::new(mem);
        let size = queue.size();
        if size == 0 {
            return Err(RingError::ZeroSize);
        }
        if size > WRAP {
            return Err(RingError::PackedTooBig(size));
        }
        let ring_addr = queue.desc_table();
        let bytes = 16 * usize::from(size);
        let ring = crate::split::resolve(&map, "descriptor ring", ring_addr, bytes, 16)?;
        let table = DescTable::resolve_as(&map, ring_addr, size, Layout::Packed)?;
        let (next_avail, next_used) = (Pos(queue.next_avail()), Pos(queue.next_used()));
        for p in [next_avail, next_used] {
            if p.slot() >= size {
                return Err(RingError::PackedPosition { pos: p.0, size });
            }
        }
        let pending = SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default();
        Ok(PackedRing {
            queue,
            map,
            table,
            ring,
            ring_addr,
            size,
            next_avail,
            next_used,
            pending,
            _mem: PhantomData,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// The position the next pop reads (encoded, see [`Pos`]).
    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    /// Un-pops chains: the next pop reads at `next_avail` (a position from
    /// [`PackedRing::next_avail`]) again.
    pub fn set_next_avail(&mut self, next_avail: u16) {
        self.next_avail = Pos(next_avail);
    }

    /// Flags of the descriptor in `slot` (`slot < size`), acquire: what the driver wrote
    /// before them is visible after.
    #[inline]
    fn flags(&self, slot: u16, acquire: bool) -> u16 {
        // SAFETY: slot < size: the flags are at offset 14 of a descriptor of the mapped,
        // 16-aligned ring.
        unsafe {
            let p = self.ring.add(16 * usize::from(slot) + 14);
            if acquire {
                load_acquire_u16(p)
            } else {
                load_u16(p)
            }
        }
    }

    /// Takes the next available chain, or `None` if the guest has none. A chain that never
    /// ends (NEXT on every descriptor of the ring) is an error: where the next chain starts
    /// is then unknowable, so it costs the queue.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<Head>, RingError> {
        let first = self.next_avail.slot();
        let mut flags = self.flags(first, true);
        if !is_avail(flags, self.next_avail.wrap()) {
            return Ok(None);
        }
        let (mut slot, mut count) = (first, 1u16);
        // An indirect descriptor is a chain of its own (INDIRECT with NEXT is not allowed).
        while flags & NEXT != 0 && flags & INDIRECT == 0 {
            if count == self.size {
                return Err(RingError::PackedChainEndless { slot: first });
            }
            slot = if slot + 1 == self.size { 0 } else { slot + 1 };
            flags = self.flags(slot, false);
            count += 1;
        }
        // SAFETY: slot < size: the id is at offset 12 of a descriptor of the mapped ring.
        let id = unsafe { load_u16(self.ring.add(16 * usize::from(slot) + 12)) };
        self.next_avail = self.next_avail.advance(count, self.size);
        Ok(Some(Head {
            index: first,
            id,
            count,
        }))
    }

    /// Asks the CPU to fetch the next `n` descriptors (the guest wrote them on another core).
    #[inline]
    pub fn prefetch_ahead(&self, n: u16) {
        let mut slot = usize::from(self.next_avail.slot());
        // One line holds four descriptors.
        for _ in 0..n.div_ceil(4) {
            // In bounds: slot < size, inside the mapped ring (and prefetch never faults).
            prefetch(self.ring.wrapping_add(16 * slot));
            slot = (slot + 4) % usize::from(self.size);
        }
    }

    /// Starts walking the chain `head` (its `count` descriptors, and no more).
    pub fn chain(&self, head: Head) -> Chain<'a> {
        Chain::new_packed(self.table, head.index, head.count)
    }

    /// Returns a chain to the guest (written and published with the batch).
    #[inline]
    pub fn add_used(&mut self, head: Head, len: u32) {
        self.pending.push(Pending {
            at: self.next_used,
            id: head.id,
            len,
        });
        self.next_used = self.next_used.advance(head.count, self.size);
    }

    /// The position the next [`PackedRing::add_used`] writes.
    pub fn next_used(&self) -> u16 {
        self.next_used.0
    }

    /// Index in `pending` of the entry at position `from` (or its end).
    fn pending_from(&self, from: u16) -> usize {
        self.pending
            .iter()
            .rposition(|p| p.at.0 == from)
            .unwrap_or(self.pending.len())
    }

    /// Takes back the used descriptors added since position `from` (none published yet).
    pub fn unadd_used(&mut self, from: u16) {
        let keep = self.pending_from(from);
        self.pending.truncate(keep);
        self.next_used = Pos(from);
    }

    /// Sets the length of every used descriptor added since position `from` to 0.
    pub fn empty_used_since(&mut self, from: u16) {
        let start = self.pending_from(from);
        for p in &mut self.pending[start..] {
            p.len = 0;
        }
    }

    /// Writes the pending used descriptors, the first one's flags last (release), so the
    /// guest sees them all at once; marks the ring dirty.
    pub fn publish(&mut self) {
        let Some((first, rest)) = self.pending.split_first() else {
            return;
        };
        for p in rest {
            self.write_used(p);
            // SAFETY: as in `write_used`; the driver reads the flags last.
            unsafe { store_u16(self.desc_ptr(p.at).add(14), p.at.used_flags()) };
        }
        self.write_used(first);
        // SAFETY: the flags of a descriptor of the mapped ring; release: the whole batch
        // is visible before the first used descriptor is.
        unsafe { store_release_u16(self.desc_ptr(first.at).add(14), first.at.used_flags()) };
        self.pending.clear();
        self.map
            .mark_dirty(self.ring_addr, 16 * usize::from(self.size));
    }

    /// The descriptor at position `at` (slot < size, checked in `new` and by `advance`).
    #[inline]
    fn desc_ptr(&self, at: Pos) -> *mut u8 {
        self.ring.wrapping_add(16 * usize::from(at.slot()))
    }

    /// Writes a used descriptor's length and id (not its flags).
    #[inline]
    fn write_used(&self, p: &Pending) {
        let d = self.desc_ptr(p.at);
        // SAFETY: `d` is a 16-aligned descriptor of the mapped ring: len at 8, id at 12.
        unsafe {
            std::ptr::write_volatile(d.add(8).cast::<u32>(), p.len.to_le());
            store_u16(d.add(12), p.id);
        }
    }

    /// Publishes and hands the positions back to the `Queue` (also done on drop).
    pub fn sync(&mut self) {
        self.publish();
        self.queue.set_next_avail(self.next_avail.0);
        self.queue.set_next_used(self.next_used.0);
    }
}

impl<M: GuestMemoryBackend> Drop for PackedRing<'_, M> {
    fn drop(&mut self) {
        self.sync();
        let mut pending = std::mem::take(&mut self.pending);
        pending.clear();
        SPARE.with(|s| {
            let mut spare = s.borrow_mut();
            if spare.len() < SPARES {
                spare.push(pending);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::*;
    use crate::{disable_kicks, enable_kicks, needs_notification, RingKind};

    /// Pops everything available, returning (id, count, lengths of the chain's descriptors).
    fn pop_all(ring: &mut PackedRing<'_, Mem>) -> Vec<(Head, Vec<u32>)> {
        let mut out = Vec::new();
        while let Some(h) = ring.pop().unwrap() {
            let mut c = ring.chain(h);
            let mut lens = Vec::new();
            while let Some(d) = c.next_desc(&ring.map).unwrap() {
                lens.push(d.len);
            }
            out.push((h, lens));
        }
        out
    }

    #[test]
    fn chains_wrap_around_the_ring_and_come_back_in_one_publication() {
        let mem = memory();
        let mut gq = PackedGuestQueue::new(&mem, 0, 8);
        let mut q = gq.queue();
        // Three laps of 3 two-descriptor chains and a one-descriptor one: every wrap of
        // both counters is crossed, and chains straddle the ring's end.
        for lap in 0..3u32 {
            let a = gq.add(&[wbuf(BUFFERS, 10 + lap), wbuf(BUFFERS + 0x1000, 20)]);
            let b = gq.add(&[wbuf(BUFFERS, 30), wbuf(BUFFERS + 0x1000, 40)]);
            let c = gq.add(&[wbuf(BUFFERS, 50)]);
            let mut ring = PackedRing::new(&mut q, &mem).unwrap();
            let got = pop_all(&mut ring);
            assert_eq!(got.len(), 3, "lap {lap}");
            assert_eq!(got[0].1, vec![10 + lap, 20]);
            assert_eq!(got[1].1, vec![30, 40]);
            assert_eq!(got[2].1, vec![50]);
            let ids: Vec<u16> = got.iter().map(|(h, _)| h.id).collect();
            assert_eq!(ids, vec![a, b, c]);
            for (h, _) in &got {
                ring.add_used(*h, 7);
            }
            // Written back only with the batch.
            assert_eq!(gq.take_used(), None, "lap {lap}");
            ring.publish();
            for id in [a, b, c] {
                assert_eq!(gq.take_used(), Some((id, 7)), "lap {lap}");
            }
            assert_eq!(gq.take_used(), None);
            drop(ring);
            assert_eq!(q.next_avail(), q.next_used());
        }
        // 15 descriptors on an 8-entry ring: slot 7, second lap (wrap counter 0).
        assert_eq!(Pos(q.next_avail()), Pos(7));
    }

    #[test]
    fn taken_back_and_emptied_entries() {
        let mem = memory();
        let mut gq = PackedGuestQueue::new(&mem, 0, 8);
        let mut q = gq.queue();
        let a = gq.add(&[wbuf(BUFFERS, 100)]);
        gq.add(&[wbuf(BUFFERS + 0x1000, 200), wbuf(BUFFERS + 0x2000, 300)]);
        {
            let mut ring = PackedRing::new(&mut q, &mem).unwrap();
            let h = ring.pop().unwrap().unwrap();
            ring.add_used(h, 100);
            let (from, back) = (ring.next_used(), ring.next_avail());
            let h2 = ring.pop().unwrap().unwrap();
            ring.add_used(h2, 1);
            // Not enough room after all: the second chain goes back to the ring.
            ring.unadd_used(from);
            ring.set_next_avail(back);
        }
        assert_eq!(gq.take_used(), Some((a, 100)));
        assert_eq!(gq.take_used(), None);
        // The second chain is still there, whole: nothing was written over it.
        let mut ring = PackedRing::new(&mut q, &mem).unwrap();
        let from = ring.next_used();
        let got = pop_all(&mut ring);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, vec![200, 300]);
        ring.add_used(got[0].0, 500);
        // A bad packet: its chains go back with length 0.
        ring.empty_used_since(from);
        drop(ring);
        assert_eq!(gq.take_used(), Some((got[0].0.id, 0)));
    }

    #[test]
    fn an_indirect_chain_is_read_whole_and_takes_one_slot() {
        let mem = memory();
        let mut gq = PackedGuestQueue::new(&mem, 0, 4);
        let mut q = gq.queue();
        let table = BUFFERS + 0x10_0000;
        let id = gq.add_indirect(&[rbuf(BUFFERS, 12), rbuf(BUFFERS + 64, 60)], table);
        let mut ring = PackedRing::new(&mut q, &mem).unwrap();
        let got = pop_all(&mut ring);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.id, got[0].0.count), (id, 1));
        assert_eq!(got[0].1, vec![12, 60]);
    }

    #[test]
    fn a_chain_flagged_next_all_round_the_ring_costs_the_queue() {
        let mem = memory();
        let mut gq = PackedGuestQueue::new(&mem, 0, 4);
        let mut q = gq.queue();
        gq.add(&[wbuf(BUFFERS, 1); 4]);
        let avail = gq.available_flags() | VRING_DESC_F_NEXT as u16;
        // The last descriptor flagged NEXT too: the chain never ends.
        gq.set_flags(3, avail);
        let mut ring = PackedRing::new(&mut q, &mem).unwrap();
        assert_eq!(ring.pop(), Err(RingError::PackedChainEndless { slot: 0 }));
    }

    #[test]
    fn descriptors_of_the_other_lap_are_not_available() {
        let mem = memory();
        let gq = PackedGuestQueue::new(&mem, 0, 4);
        let mut q = gq.queue();
        // Flags as the device leaves them after a lap (AVAIL == USED): not available.
        gq.set_flags(0, AVAIL | USED);
        let mut ring = PackedRing::new(&mut q, &mem).unwrap();
        assert_eq!(ring.pop(), Ok(None));
        drop(ring);
        // A position past the ring (a frontend's SET_VRING_BASE) is refused.
        q.set_next_avail(WRAP | 4);
        assert!(matches!(
            PackedRing::new(&mut q, &mem).err(),
            Some(RingError::PackedPosition { size: 4, .. })
        ));
    }

    #[test]
    fn interrupts_and_kicks_follow_the_event_areas() {
        let mem = memory();
        let mut gq = PackedGuestQueue::new(&mem, 0, 8);
        let mut q = gq.queue();
        let start = q.next_used();
        q.set_next_used(Pos::START.advance(3, 8).0);
        let wants = |q: &Queue| needs_notification(q, &mem, start, RingKind::Packed);
        gq.set_driver_event(0, VRING_PACKED_EVENT_FLAG_ENABLE as u16);
        assert!(wants(&q));
        gq.set_driver_event(0, VRING_PACKED_EVENT_FLAG_DISABLE as u16);
        assert!(!wants(&q));
        // Event idx: an interrupt when the used descriptor at off_wrap was written.
        q.set_event_idx(true);
        let desc = VRING_PACKED_EVENT_FLAG_DESC as u16;
        gq.set_driver_event(Pos::START.advance(2, 8).0, desc);
        assert!(wants(&q));
        gq.set_driver_event(Pos::START.advance(3, 8).0, desc);
        assert!(!wants(&q));
        // Across the wrap: from slot 6 of lap 1 to slot 2 of lap 2.
        let (old, new) = (Pos::START.advance(6, 8), Pos::START.advance(10, 8));
        assert!(passes(Pos::START.advance(7, 8), old, new, 8));
        assert!(passes(Pos::START.advance(9, 8), old, new, 8));
        assert!(!passes(Pos::START.advance(10, 8), old, new, 8));
        assert!(!passes(Pos::START.advance(5, 8), old, new, 8));

        // Kicks: off while we poll, on (from our next_avail) before we sleep.
        disable_kicks(&mut q, &mem, RingKind::Packed).unwrap();
        assert_eq!(gq.device_event().1, VRING_PACKED_EVENT_FLAG_DISABLE as u16);
        assert!(!enable_kicks(&mut q, &mem, RingKind::Packed).unwrap());
        assert_eq!(gq.device_event(), (q.next_avail(), desc));
        gq.add(&[wbuf(BUFFERS, 1)]);
        assert!(enable_kicks(&mut q, &mem, RingKind::Packed).unwrap());
        q.set_event_idx(false);
        enable_kicks(&mut q, &mem, RingKind::Packed).unwrap();
        assert_eq!(gq.device_event().1, VRING_PACKED_EVENT_FLAG_ENABLE as u16);
    }
}
