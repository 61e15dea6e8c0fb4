//! The TX, RX and loopback paths over hostile *packed* rings on guard-paged guest memory:
//! random descriptors with random AVAIL/USED flags (mostly those of the driver's current
//! lap), chains of random lengths that may wrap, run to the ring's end or never end,
//! indirect tables, random starting positions and event areas.
//!
//! Checked after every input, against an independent walk of the ring as the guest wrote it:
//! no access outside guest memory (guard pages), no hang (watchdog); the device's positions
//! moved over whole available chains and, after a clean batch, used == avail; every used
//! descriptor sits on the first slot of a chain taken, in order, carries that chain's buffer
//! id (from its last descriptor) and a length within the chain's writable room (0 on TX); and
//! every changed byte is in one of those used slots, the device event area, or a writable
//! buffer of an available chain.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use virtq::fuzz::Snap;
use virtq::{Pos, RingKind};

use super::rings::{
    addr, check_iovecs, check_writes, indirect_target, len, put, random_hdr, random_packet,
    ring_campaign, Zones, ALL, DATA_A, REGIONS, RETURNED, RX_RINGS, RX_TABLES, TX_RINGS, TX_TABLES,
};
use super::{Guarded, Rng};
use crate::net_hdr::VIRTIO_NET_HDR_LEN;
use crate::offload::RxOffloads;
use crate::rx::{deliver_adapted, RxRing};
use crate::stats::QueueStats;
use crate::tx::{guest_to_guest, PacketBufs, TxBatch};

const AVAIL: u16 = 1 << 7;
const USED: u16 = 1 << 15;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// One packed queue's guest-side layout.
#[derive(Clone, Copy)]
struct Layout {
    ring: u64,
    driver: u64,
    device: u64,
    size: u16,
    tables: (u64, u64),
    start: Pos,
}

fn packed_desc(a: u64, l: u32, id: u16, flags: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&a.to_le_bytes());
    d[8..12].copy_from_slice(&l.to_le_bytes());
    d[12..14].copy_from_slice(&id.to_le_bytes());
    d[14..16].copy_from_slice(&flags.to_le_bytes());
    d
}

/// Flags that make a slot available at wrap counter `wrap`, mostly; sometimes those of the
/// other lap or random ones.
fn lap_flags(rng: &mut Rng, wrap: bool) -> u16 {
    let avail = if wrap { AVAIL } else { USED };
    match rng.below(100) {
        0..=84 => avail,
        85..=94 => avail ^ (AVAIL | USED),
        _ => rng.u64() as u16 & (AVAIL | USED),
    }
}

fn descriptor(rng: &mut Rng, l: &Layout, write: bool, zones: &Zones, wrap: bool) -> [u8; 16] {
    let mut flags = lap_flags(rng, wrap);
    if rng.chance(if write { 88 } else { 8 }) {
        flags |= WRITE;
    }
    if rng.chance(35) {
        flags |= NEXT;
    }
    if rng.chance(2) {
        flags |= rng.u64() as u16 & !(AVAIL | USED);
    }
    let id = rng.below(u64::from(l.size)) as u16;
    let (a, n) = if rng.chance(6) {
        flags |= INDIRECT;
        indirect_target(rng, l.tables)
    } else if flags & WRITE != 0 {
        (addr(rng, zones.write), len(rng))
    } else {
        (addr(rng, zones.read), len(rng))
    };
    packed_desc(a, n, id, flags)
}

/// Fills a packed ring at `base` the way a hostile driver might; returns the layout.
fn hostile_queue(rng: &mut Rng, g: &Guarded, base: u64, write: bool) -> Layout {
    let size = 1u16 << rng.range(0, 8);
    let start = Pos(rng.below(u64::from(size)) as u16 | if rng.chance(70) { 1 << 15 } else { 0 });
    let l = Layout {
        ring: base,
        driver: base + 0x1000,
        device: base + 0x2000,
        size,
        tables: if base == TX_RINGS {
            TX_TABLES
        } else {
            RX_TABLES
        },
        start,
    };
    // Slots from `start` on are this lap's; those before it wrapped (the next lap's flags).
    for i in 0..size {
        let slot = (start.slot() + i) % size;
        let wrap = start.wrap() ^ (start.slot() + i >= size);
        put(
            g,
            l.ring + 16 * u64::from(slot),
            &descriptor(rng, &l, write, &ALL, wrap),
        );
    }
    let mut at = l.tables.0;
    while at < l.tables.1 {
        // Indirect descriptors: flags other than WRITE mean nothing there.
        put(g, at, &descriptor(rng, &l, write, &ALL, true));
        at += 16;
    }
    let mut ev = [0u8; 8];
    rng.bytes(&mut ev);
    put(g, l.driver, &ev[..4]);
    put(g, l.device, &ev[4..]);
    if rng.chance(25) {
        for _ in 0..rng.range(1, 8) {
            let at = l.ring + rng.below(16 * u64::from(size));
            put(g, at | 8, &[rng.u64() as u8]);
        }
    }
    l
}

fn device_queue(rng: &mut Rng, l: &Layout) -> Queue {
    let mut q = Queue::new(256).expect("queue");
    q.set_size(l.size);
    q.set_desc_table_address(Some(l.ring as u32), Some((l.ring >> 32) as u32));
    q.set_avail_ring_address(Some(l.driver as u32), Some(0));
    q.set_used_ring_address(Some(l.device as u32), Some(0));
    q.set_next_avail(l.start.0);
    q.set_next_used(l.start.0);
    q.set_event_idx(rng.chance(50));
    q.set_ready(true);
    q
}

/// A chain as the guest laid it out: first slot, descriptors, buffer id, writable buffers.
struct GuestChain {
    at: Pos,
    count: u16,
    id: u16,
    writable: Vec<(u64, u64)>,
}

/// The available chains from `l.start`, walked independently of the device code: until a
/// slot that is not available, or a chain with no end.
fn chains(s: &Snap, l: &Layout) -> Vec<GuestChain> {
    let desc = |slot: u16| {
        let d = l.ring + 16 * u64::from(slot);
        (s.u64(d), s.u32(d + 8), s.u16(d + 12), s.u16(d + 14))
    };
    let (mut out, mut at, mut used_slots) = (Vec::new(), l.start, 0u32);
    while used_slots < u32::from(l.size) {
        let (_, _, _, Some(flags)) = desc(at.slot()) else {
            break;
        };
        let (a, u) = (flags & AVAIL != 0, flags & USED != 0);
        if a != at.wrap() || u == at.wrap() {
            break;
        }
        let mut c = GuestChain {
            at,
            count: 0,
            id: 0,
            writable: Vec::new(),
        };
        let mut slot = at.slot();
        loop {
            let (Some(da), Some(dl), Some(id), Some(f)) = desc(slot) else {
                return out;
            };
            c.count += 1;
            c.id = id;
            if f & INDIRECT != 0 {
                let n = u64::from(dl / 16).min(0xffff);
                for k in 0..n {
                    let t = da.wrapping_add(16 * k);
                    if let (Some(ta), Some(tl), Some(tf)) = (
                        s.u64(t),
                        s.u32(t.wrapping_add(8)),
                        s.u16(t.wrapping_add(14)),
                    ) {
                        if tf & WRITE != 0 {
                            c.writable.push((ta, u64::from(tl)));
                        }
                    }
                }
                break;
            }
            if f & WRITE != 0 {
                c.writable.push((da, u64::from(dl)));
            }
            if f & NEXT == 0 {
                break;
            }
            if c.count == l.size {
                return out; // never ends: the device must stop here
            }
            slot = (slot + 1) % l.size;
        }
        used_slots += u32::from(c.count);
        at = at.advance(c.count, l.size);
        out.push(c);
    }
    out
}

/// What the guest saw happen to one packed queue. `clean`: the batch ended without a ring
/// error, so everything taken was returned.
fn check_queue(
    before: &Snap,
    after: &Snap,
    l: &Layout,
    q: &Queue,
    (tx, clean): (bool, bool),
    allowed: &mut Vec<(u64, u64)>,
) -> Result<(), String> {
    allowed.push((l.device, 4));
    let avail = chains(before, l);
    for c in &avail {
        // A packet that did not fit may have been copied into buffers left for the next.
        allowed.extend(c.writable.iter().copied());
    }
    // The device's avail position is on a chain boundary of what was available.
    let (mut at, mut taken) = (l.start, 0usize);
    while at.0 != q.next_avail() {
        let Some(c) = avail.get(taken) else {
            return Err(format!(
                "avail position {:#x} is not the end of an available chain (start {:#x}, {} available)",
                q.next_avail(), l.start.0, avail.len()
            ));
        };
        at = at.advance(c.count, l.size);
        taken += 1;
    }
    if clean && q.next_used() != q.next_avail() {
        return Err(format!(
            "used {:#x} != avail {:#x} after a clean batch",
            q.next_used(),
            q.next_avail()
        ));
    }
    // Used descriptors: in order, on each taken chain's first slot.
    let (mut at, mut returned) = (l.start, 0usize);
    while at.0 != q.next_used() {
        let Some(c) = avail.get(returned).filter(|_| returned < taken) else {
            return Err(format!(
                "used position {:#x} past the chains taken",
                q.next_used()
            ));
        };
        let d = l.ring + 16 * u64::from(c.at.slot());
        let (ulen, id, flags) = (after.u32(d + 8), after.u16(d + 12), after.u16(d + 14));
        let want = if c.at.wrap() { AVAIL | USED } else { 0 };
        if flags.map(|f| f & (AVAIL | USED)) != Some(want) || id != Some(c.id) {
            return Err(format!("used descriptor {returned} at slot {}: id {id:?} flags {flags:?}, want id {} flags {want:#x}", c.at.slot(), c.id));
        }
        let room: u64 = c.writable.iter().map(|w| w.1).sum();
        let ulen = u64::from(ulen.unwrap_or(0));
        if (tx && ulen != 0) || ulen > room {
            return Err(format!(
                "used descriptor {returned} has length {ulen}, chain room {room}"
            ));
        }
        allowed.push((d, 16));
        at = at.advance(c.count, l.size);
        returned += 1;
    }
    RETURNED.with(|r| r.set(r.get() + returned as u64));
    Ok(())
}

/// Checks one queue after an input: [`check_queue`], then every changed byte.
fn judge(
    g: &Guarded,
    before: &[(u64, Vec<u8>)],
    l: &Layout,
    q: &Queue,
    tx_clean: (bool, bool),
) -> Result<(), String> {
    let after = g.snapshot();
    let mut allowed = Vec::new();
    check_queue(&Snap(before), &Snap(&after), l, q, tx_clean, &mut allowed)?;
    check_writes(before, &after, &allowed)
}

fn rx_input(rng: &mut Rng, mergeable: bool) -> Result<(), String> {
    let g = Guarded::new(&REGIONS);
    let l = hostile_queue(rng, &g, RX_RINGS, true);
    let mut q = device_queue(rng, &l);
    let before = g.snapshot();
    let offloads = RxOffloads::from_features(rng.u64());
    let (stats, mut scratch) = (QueueStats::default(), Vec::new());
    let mut clean = true;
    match RxRing::new(
        &mut q,
        &g.mem,
        RingKind::Packed,
        mergeable,
        VIRTIO_NET_HDR_LEN,
    ) {
        Ok(mut ring) => {
            for _ in 0..rng.range(1, 6) {
                let (hdr, pkt) = (random_hdr(rng), random_packet(rng));
                if rng.chance(30) {
                    deliver_adapted(&mut ring, offloads, &hdr, &pkt, &mut scratch, &stats);
                } else if let Err(e) = ring.deliver(&hdr, &pkt) {
                    clean &= !matches!(e, crate::rx::RxError::Ring(_));
                }
            }
        }
        Err(_) => clean = false,
    }
    judge(&g, &before, &l, &q, (false, clean))
}

fn tx_input(rng: &mut Rng) -> Result<(), String> {
    let g = Guarded::new(&REGIONS);
    let l = hostile_queue(rng, &g, TX_RINGS, false);
    let mut q = device_queue(rng, &l);
    let before = g.snapshot();
    let (stats, mut batch) = (QueueStats::default(), TxBatch::default());
    batch.set_ring_kind(RingKind::Packed);
    let hosts = g.host_ranges();
    let mut clean = true;
    for _ in 0..3 {
        match batch.gather(&mut q, &g.mem, VIRTIO_NET_HDR_LEN, &stats) {
            Ok(0) => break,
            Err(_) => {
                clean = false;
                break;
            }
            Ok(_) => {}
        }
        check_iovecs(&batch, &hosts)?;
        batch
            .complete(&mut q, &g.mem)
            .map_err(|e| format!("complete: {e}"))?;
    }
    judge(&g, &before, &l, &q, (true, clean))
}

fn loopback_input(rng: &mut Rng) -> Result<(), String> {
    let g = Guarded::new(&REGIONS);
    let tl = hostile_queue(rng, &g, TX_RINGS, false);
    let rl = hostile_queue(rng, &g, RX_RINGS, true);
    let (mut tq, mut rq) = (device_queue(rng, &tl), device_queue(rng, &rl));
    let before = g.snapshot();
    let offloads = RxOffloads::from_features(rng.u64());
    let (ts, rs) = (QueueStats::default(), QueueStats::default());
    let (mut batch, mut bufs) = (TxBatch::default(), PacketBufs::default());
    batch.set_ring_kind(RingKind::Packed);
    let mut clean = true;
    match RxRing::new(
        &mut rq,
        &g.mem,
        RingKind::Packed,
        rng.chance(50),
        VIRTIO_NET_HDR_LEN,
    ) {
        Ok(mut ring) => {
            for _ in 0..2 {
                let r = guest_to_guest(
                    &mut tq,
                    &mut ring,
                    &g.mem,
                    offloads,
                    &mut batch,
                    &mut bufs,
                    (&ts, &rs),
                );
                clean &= r.is_ok();
                if !matches!(r, Ok(1..)) {
                    break;
                }
            }
        }
        Err(_) => clean = false,
    }
    let after = g.snapshot();
    let (b, a) = (Snap(&before), Snap(&after));
    let mut allowed = Vec::new();
    // RX data may land anywhere an available RX chain points, the TX ring included (a
    // guest's own loss): then only the memory checks hold.
    let rx_over_rings = chains(&b, &rl)
        .iter()
        .any(|c| c.writable.iter().any(|&(a, n)| a < DATA_A.0 && n > 0));
    if rx_over_rings {
        for c in chains(&b, &rl) {
            allowed.extend(c.writable);
        }
        for l in [&tl, &rl] {
            allowed.push((l.ring, 16 * u64::from(l.size)));
            allowed.push((l.device, 4));
        }
    } else {
        check_queue(&b, &a, &tl, &tq, (true, clean), &mut allowed)
            .map_err(|e| format!("tx: {e}"))?;
        check_queue(&b, &a, &rl, &rq, (false, clean), &mut allowed)
            .map_err(|e| format!("rx: {e}"))?;
    }
    check_writes(&before, &after, &allowed)
}

#[test]
fn fuzz_packed_rx_rings() {
    ring_campaign("packed-rx", 2000, |rng| rx_input(rng, false));
}

#[test]
fn fuzz_packed_rx_mergeable_rings() {
    ring_campaign("packed-rx-mergeable", 2000, |rng| rx_input(rng, true));
}

#[test]
fn fuzz_packed_tx_rings() {
    ring_campaign("packed-tx", 2000, tx_input);
}

#[test]
fn fuzz_packed_loopback_rings() {
    ring_campaign("packed-loopback", 1500, loopback_input);
}
