//! Whether the guest wants an interrupt: the event-idx test of the virtio spec, or the
//! `VRING_AVAIL_F_NO_INTERRUPT` flag without event idx. One decision for the relay's queues
//! ([`needs_notification`]) and the shadow relay (its [`crate::GuestRings`] reads the field).
//! And whether the guest should kick us ([`enable_kicks`], [`disable_kicks`]). Packed
//! queues keep both in their event suppression areas ([`crate::PackedEvents`]).

use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use crate::{GuestMap, PackedEvents, Pos, RingError, RingKind};

/// `vring_need_event` of the virtio spec: whether moving an index from `old` to `new` passes
/// the other side's `event` index.
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Whether the guest wants an interrupt for the used entries `old_used..new_used`, given its
/// avail ring's suppression field: `used_event` with event idx, the avail flags without.
#[inline]
pub fn wants_interrupt(event_idx: bool, suppression: u16, old_used: u16, new_used: u16) -> bool {
    if new_used == old_used {
        return false;
    }
    if event_idx {
        need_event(suppression, new_used, old_used)
    } else {
        suppression & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
    }
}

/// Guest address of the avail ring's suppression field: `used_event` (after the ring's
/// `size` entries) with event idx, the flags (at the start) without. None past 2^64.
pub fn suppression_addr(avail: u64, size: u16, event_idx: bool) -> Option<u64> {
    if event_idx {
        avail.checked_add(4 + 2 * u64::from(size))
    } else {
        Some(avail)
    }
}

/// Whether the guest wants an interrupt for the used entries added since the used index was
/// `old_used` (event idx), or at all (`VRING_AVAIL_F_NO_INTERRUPT` without event idx). Unlike
/// virtio-queue's, it needs no per-entry bookkeeping, and honours the flag: DPDK's polling
/// virtio driver sets it, and each eventfd write would otherwise cost a syscall per batch.
/// An unreadable field means an interrupt (the guest then finds nothing new, at worst).
pub fn needs_notification<M: GuestMemoryBackend>(
    queue: &Queue,
    mem: &M,
    old_used: u16,
    kind: RingKind,
) -> bool {
    let new = queue.next_used();
    if new == old_used {
        return false;
    }
    if kind == RingKind::Packed {
        let map = GuestMap::new(mem);
        return match PackedEvents::resolve(&map, queue) {
            Ok(ev) => ev.wants_interrupt(
                queue.event_idx_enabled(),
                Pos(old_used),
                Pos(new),
                queue.size(),
            ),
            Err(_) => true,
        };
    }
    // Our used index store before the guest's suppression fields read.
    fence(Ordering::SeqCst);
    let event_idx = queue.event_idx_enabled();
    let field = suppression_addr(queue.avail_ring(), queue.size(), event_idx)
        .and_then(|at| read_u16(mem, at));
    match field {
        Some(field) => wants_interrupt(event_idx, field, old_used, new),
        None => true,
    }
}

/// Asks the guest to kick us when it adds chains (with event idx: from the queue's
/// `next_avail` on). True if one is already there: it came before the request was seen, so
/// no kick will tell of it.
pub fn enable_kicks<M: GuestMemoryBackend>(
    queue: &mut Queue,
    mem: &M,
    kind: RingKind,
) -> Result<bool, RingError> {
    match kind {
        RingKind::Split => queue
            .enable_notification(mem)
            .map_err(|e| RingError::Notification(format!("{e:?}"))),
        RingKind::Packed => {
            let map = GuestMap::new(mem);
            let next = Pos(queue.next_avail());
            PackedEvents::resolve(&map, queue)?.set_kicks(
                &map,
                queue.event_idx_enabled(),
                Some(next),
            );
            // Our request's store before the descriptor's flags are read.
            fence(Ordering::SeqCst);
            crate::packed::is_avail_at(&map, queue, next)
        }
    }
}

/// Asks the guest not to kick us (we poll): without event idx a flag; with it, the split
/// ring's avail event simply stays behind.
pub fn disable_kicks<M: GuestMemoryBackend>(
    queue: &mut Queue,
    mem: &M,
    kind: RingKind,
) -> Result<(), RingError> {
    match kind {
        RingKind::Split => queue
            .disable_notification(mem)
            .map_err(|e| RingError::Notification(format!("{e:?}"))),
        RingKind::Packed => {
            let map = GuestMap::new(mem);
            PackedEvents::resolve(&map, queue)?.set_kicks(&map, queue.event_idx_enabled(), None);
            Ok(())
        }
    }
}

/// A little-endian u16 of guest memory (a ring field), through the cached translation.
fn read_u16<M: GuestMemoryBackend>(mem: &M, addr: u64) -> Option<u16> {
    let mut b = [0u8; 2];
    GuestMap::new(mem).read(addr, &mut b).ok()?;
    Some(u16::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::*;
    use vm_memory::{Bytes, GuestAddress};

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
        assert!(!needs_notification(&q, &mem, 0, RingKind::Split));
        q.set_next_used(4);
        // Without event idx: unless the guest set VRING_AVAIL_F_NO_INTERRUPT (polling).
        guest_suppression(&mem, &q, 0, 0);
        assert!(needs_notification(&q, &mem, 0, RingKind::Split));
        guest_suppression(&mem, &q, VRING_AVAIL_F_NO_INTERRUPT as u16, 0);
        assert!(!needs_notification(&q, &mem, 0, RingKind::Split));
        // With event idx: only when the batch (old, new] crosses used_event.
        q.set_event_idx(true);
        guest_suppression(&mem, &q, 0, 2);
        assert!(needs_notification(&q, &mem, 0, RingKind::Split));
        assert!(!needs_notification(&q, &mem, 3, RingKind::Split));
        guest_suppression(&mem, &q, 0, 9);
        assert!(!needs_notification(&q, &mem, 0, RingKind::Split));
        // Across the index wrap.
        q.set_next_used(2);
        guest_suppression(&mem, &q, 0, 0xffff);
        assert!(needs_notification(&q, &mem, 0xfffe, RingKind::Split));
    }

    #[test]
    fn need_event_follows_the_virtio_rule() {
        // (old, new] = (4, 6] contains 5.
        assert!(need_event(5, 6, 4));
        assert!(!need_event(5, 7, 6));
        assert!(need_event(5, 6, 5));
        // Across the wrap.
        assert!(need_event(0xffff, 1, 0xfffe));
        assert!(!need_event(3, 1, 0xfffe));
    }
}
