//! The TX, RX (mergeable or not) and loopback paths driven over hostile rings on guard-paged
//! guest memory: random and mutated descriptor tables, avail rings and indirect tables.
//!
//! Checked after every input: no access outside guest memory (the guard pages fault), no
//! hang (the campaign's watchdog), used entries name only heads the guest made available and
//! each at most as often, every chain taken is given back, and every byte that changed lies in
//! a used ring or in a device-writable buffer of a chain that was returned (or is still
//! available: a packet that did not fit may have been copied into a buffer left for the next).

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use virtq::fuzz::{changed, Snap};
use virtq::RingKind;
use vm_memory::{Bytes, GuestAddress};

use super::{campaign, Guarded, Rng};
use crate::net_hdr::{VnetHdr, VIRTIO_NET_HDR_LEN};
use crate::offload::RxOffloads;
use crate::rx::{deliver_adapted, RxRing};
use crate::stats::QueueStats;
use crate::tx::{guest_to_guest, PacketBufs, TxBatch};

/// Region A holds the rings (below `DATA_A`) and buffers; B and C are adjacent (a buffer may
/// straddle them) after a gap.
pub(super) const REGIONS: [(u64, usize); 3] =
    [(0, 0x2_0000), (0x10_0000, 0x8000), (0x10_8000, 0x4000)];
pub(super) const DATA_A: (u64, u64) = (0x8000, 0x2_0000);
const DATA_BC: (u64, u64) = (0x10_0000, 0x10_c000);
/// Indirect tables the generator writes for the TX and the RX queue (inside the ring area:
/// never a writable buffer; apart, so loopback TX tables never name RX buffers).
pub(super) const TX_TABLES: (u64, u64) = (0x6000, 0x7000);
pub(super) const RX_TABLES: (u64, u64) = (0x7000, 0x8000);
/// Where a queue's rings go: descriptor table, avail ring, used ring (room for 256 entries).
pub(super) const TX_RINGS: u64 = 0;
pub(super) const RX_RINGS: u64 = 0x3000;
const MAX_SIZE: u16 = 256;

/// One queue's guest-side layout and what the guest made available.
#[derive(Clone, Copy)]
struct Layout {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    /// Where this queue's indirect tables are.
    tables: (u64, u64),
    /// next_avail = next_used when the device starts.
    start: u16,
}

/// Where buffer addresses may come from.
pub(super) struct Zones {
    /// Buffers the device may write.
    pub(super) write: &'static [(u64, u64)],
    /// Buffers the device reads.
    pub(super) read: &'static [(u64, u64)],
    /// Addresses must stay in their zones: mutations leave descriptor addresses alone.
    split: bool,
}

pub(super) const ALL: Zones = Zones {
    write: &[DATA_A, DATA_BC],
    read: &[DATA_A, DATA_BC, (0, 0x8000)],
    split: false,
};
/// For half the loopback inputs: TX and RX buffers that never share memory.
const LOOP_TX: Zones = Zones {
    write: &[DATA_BC],
    // (Not the ring area: a long read from there runs into region A's RX buffers.)
    read: &[DATA_BC],
    split: true,
};
const LOOP_RX: Zones = Zones {
    write: &[DATA_A],
    read: &[DATA_A],
    split: true,
};

pub(super) fn addr(rng: &mut Rng, zones: &[(u64, u64)]) -> u64 {
    let (lo, hi) = rng.pick(zones);
    match rng.below(100) {
        0..=59 => rng.range(lo, hi - 1),
        // Near the end of the zone: lengths cross into the next region or the guard page.
        60..=79 => hi - rng.range(1, 80),
        // Around the B/C boundary: buffers straddling two regions.
        80..=84 if lo <= 0x10_8000 && 0x10_8000 < hi => 0x10_8000 - rng.range(0, 64),
        // Gaps and past the end of memory.
        85..=92 => rng.pick(&[0x2_0000, 0x10_c000, 0x4000_0000]) + rng.below(0x1000),
        80..=96 => u64::MAX - rng.below(0x2000),
        _ => rng.u64(),
    }
}

pub(super) fn len(rng: &mut Rng) -> u32 {
    match rng.below(100) {
        0..=4 => 0,
        5..=14 => rng.range(1, 16) as u32,
        15..=24 => rng.pick(&[10, 12, 14, 60, 1514, 1526, 65535, 65562]),
        25..=69 => rng.range(1, 2048) as u32,
        70..=94 => rng.range(1, 70_000) as u32,
        _ => rng.u64() as u32,
    }
}

/// A random descriptor for a queue whose buffers are mostly `write`able (RX) or not (TX).
fn descriptor(rng: &mut Rng, l: &Layout, write: bool, zones: &Zones, table_len: u16) -> [u8; 16] {
    let mut flags = 0u16;
    if rng.chance(if write { 88 } else { 8 }) {
        flags |= VRING_DESC_F_WRITE as u16;
    }
    if rng.chance(35) {
        flags |= VRING_DESC_F_NEXT as u16;
    }
    let indirect = rng.chance(6);
    if rng.chance(2) {
        flags |= rng.u64() as u16;
    }
    let next = if rng.chance(90) {
        rng.below(u64::from(table_len.max(1))) as u16
    } else {
        rng.u64() as u16
    };
    let (a, l) = if indirect {
        flags |= VRING_DESC_F_INDIRECT as u16;
        indirect_target(rng, l.tables)
    } else if flags & VRING_DESC_F_WRITE as u16 != 0 {
        (addr(rng, zones.write), len(rng))
    } else {
        (addr(rng, zones.read), len(rng))
    };
    raw_desc(a, l, flags, next)
}

/// An indirect table's address and length: mostly whole descriptors in the table area,
/// sometimes odd, empty, huge, misplaced or crossing a region end.
pub(super) fn indirect_target(rng: &mut Rng, tables: (u64, u64)) -> (u64, u32) {
    let n = rng.range(1, 64);
    let at = tables.0 + 8 * rng.below((tables.1 - tables.0) / 8 - 2 * n);
    match rng.below(100) {
        0..=74 => (at, 16 * n as u32),
        75..=84 => (
            at,
            rng.pick(&[0, 1, 15, 17, 16 * n as u32 + 8, 0xffff_fff0]),
        ),
        85..=94 => (DATA_A.1 - 16 * rng.range(0, 4) - 8, 16 * n as u32),
        _ => (rng.u64(), 16 * n as u32),
    }
}

fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

pub(super) fn put(g: &Guarded, addr: u64, bytes: &[u8]) {
    // Outside memory: the generator aimed at a hole on purpose.
    let _ = g.mem.write_slice(bytes, GuestAddress(addr));
}

/// Fills the rings at `base` with a hostile guest's view; returns the layout.
fn hostile_queue(rng: &mut Rng, g: &Guarded, base: u64, write: bool, zones: &Zones) -> Layout {
    let size = 1u16 << rng.range(0, 8);
    let l = Layout {
        desc: base,
        avail: base + 0x1000,
        used: base + 0x2000,
        size,
        tables: if base == TX_RINGS {
            TX_TABLES
        } else {
            RX_TABLES
        },
        start: if rng.chance(50) { 0 } else { rng.u64() as u16 },
    };
    for i in 0..u64::from(size) {
        put(g, l.desc + 16 * i, &descriptor(rng, &l, write, zones, size));
    }
    // Indirect tables: the whole area gets descriptors (tables are found wherever they point).
    let mut at = l.tables.0;
    while at < l.tables.1 {
        put(g, at, &descriptor(rng, &l, write, zones, 64));
        at += 16;
    }
    let pending = if rng.chance(90) {
        rng.below(u64::from(size) + 1) as u16
    } else {
        rng.u64() as u16
    };
    for i in 0..u64::from(size) {
        let head = if rng.chance(92) {
            rng.below(u64::from(size)) as u16
        } else {
            rng.u64() as u16
        };
        put(g, l.avail + 4 + 2 * i, &head.to_le_bytes());
    }
    put(g, l.avail, &(rng.below(4) as u16).to_le_bytes());
    put(g, l.avail + 2, &l.start.wrapping_add(pending).to_le_bytes());
    put(
        g,
        l.avail + 4 + 2 * u64::from(size),
        &(rng.u64() as u16).to_le_bytes(),
    );
    let mut used = vec![0u8; 6 + 8 * usize::from(size)];
    rng.bytes(&mut used);
    used[2..4].copy_from_slice(&l.start.to_le_bytes());
    put(g, l.used, &used);
    mutate(rng, g, &l, zones.split);
    l
}

/// A few random byte writes over the queue's rings and the indirect tables.
fn mutate(rng: &mut Rng, g: &Guarded, l: &Layout, keep_addrs: bool) {
    if !rng.chance(25) {
        return;
    }
    // A byte of a descriptor, its address left alone if asked (descriptors are 16-aligned).
    let in_desc = |at: u64| if keep_addrs { at | 8 } else { at };
    for _ in 0..rng.range(1, 8) {
        let at = match rng.below(3) {
            0 => in_desc(l.desc + rng.below(16 * u64::from(l.size))),
            1 => l.avail + rng.below(6 + 2 * u64::from(l.size)),
            _ => in_desc(rng.range(l.tables.0, l.tables.1 - 1)),
        };
        put(g, at, &[rng.u64() as u8]);
    }
}

/// The device's view of a queue laid out as `l`.
fn device_queue(rng: &mut Rng, l: &Layout) -> Queue {
    let mut q = Queue::new(MAX_SIZE).expect("queue");
    q.set_size(l.size);
    // (Misaligned ring addresses never get here: `Queue` refuses them when they are set.)
    let (d, a, u) = (l.desc, l.avail, l.used);
    q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
    q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
    q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
    q.set_next_avail(l.start);
    q.set_next_used(l.start);
    q.set_event_idx(rng.chance(50));
    q.set_ready(true);
    q
}

/// Every device-writable (addr, len) of the chain at `head`, following next links and one
/// level of indirection as far as a loop-free walk can go; generous on purpose: anything the
/// chain could be read to contain.
fn writable(s: &Snap, l: &Layout, head: u16, out: &mut Vec<(u64, u64)>) {
    let walk = |table: u64, n: u16, first: u16, out: &mut Vec<(u64, u64)>, nested: bool| {
        let mut tables = Vec::new();
        let (mut i, mut steps) = (first, 0u32);
        while i < n && steps <= u32::from(n) {
            steps += 1;
            let d = table.wrapping_add(16 * u64::from(i));
            let (Some(a), Some(len), Some(flags), Some(next)) = (
                s.u64(d),
                s.u32(d.wrapping_add(8)),
                s.u16(d.wrapping_add(12)),
                s.u16(d.wrapping_add(14)),
            ) else {
                break;
            };
            if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
                if !nested {
                    tables.push((a, len));
                }
            } else if flags & VRING_DESC_F_WRITE as u16 != 0 {
                out.push((a, u64::from(len)));
            }
            if flags & VRING_DESC_F_NEXT as u16 == 0 {
                break;
            }
            i = next;
        }
        tables
    };
    for (a, len) in walk(l.desc, l.size, head, out, false) {
        let n = (len / 16).min(u32::from(u16::MAX)) as u16;
        walk(a, n, 0, out, true);
    }
}

/// What the guest saw happen to one queue: checked against what it had made available.
fn check_queue(
    before: &Snap,
    after: &Snap,
    l: &Layout,
    q: &Queue,
    tx: bool,
    allowed: &mut Vec<(u64, u64)>,
) -> Result<(), String> {
    allowed.push((l.used, 6 + 8 * u64::from(l.size)));
    let avail_idx = before.u16(l.avail + 2).unwrap_or(l.start);
    let pending = avail_idx.wrapping_sub(l.start);
    let taken = q.next_avail().wrapping_sub(l.start);
    let used_idx = after.u16(l.used + 2).unwrap_or(l.start);
    let returned = used_idx.wrapping_sub(l.start);
    if used_idx != q.next_used() {
        return Err(format!(
            "used idx {used_idx} in memory, {} in the queue",
            q.next_used()
        ));
    }
    if taken > pending || returned > taken {
        return Err(format!(
            "{pending} available, {taken} taken, {returned} returned"
        ));
    }
    let slot = |i: u16| u64::from(l.start.wrapping_add(i) % l.size);
    if overwrites_rings(before, after, l, pending, allowed) {
        return Ok(());
    }
    // Heads taken (those inside the table must all come back), then the returned entries.
    let mut heads: Vec<u16> = (0..taken)
        .filter_map(|i| before.u16(l.avail + 4 + 2 * slot(i)))
        .collect();
    let expected = heads.iter().filter(|&&h| h < l.size).count();
    for i in 0..returned {
        let at = l.used + 4 + 8 * slot(i);
        let (id, len) = (after.u32(at).unwrap_or(0), after.u32(at + 4).unwrap_or(0));
        let Some(k) = heads.iter().position(|&h| u32::from(h) == id && h < l.size) else {
            return Err(format!("used entry {i} names head {id}, not an available chain (table of {}; start {}, taken {heads:?})", l.size, l.start));
        };
        heads.swap_remove(k);
        let mut w = Vec::new();
        writable(before, l, id as u16, &mut w);
        writable(after, l, id as u16, &mut w);
        let room: u64 = w.iter().map(|r| r.1).sum();
        if (tx && len != 0) || u64::from(len) > room {
            return Err(format!(
                "used entry {i} (head {id}) has length {len}, chain room {room}"
            ));
        }
        allowed.extend(w);
    }
    RETURNED.with(|r| r.set(r.get() + u64::from(returned)));
    if usize::from(returned) != expected {
        return Err(format!("{expected} chains taken, {returned} returned"));
    }
    // Chains still available may hold a packet that did not fit (not returned, not lost).
    for i in taken..pending.min(l.size) {
        if let Some(h) = before.u16(l.avail + 4 + 2 * slot(i)) {
            writable(before, l, h, allowed);
        }
    }
    Ok(())
}

/// Whether an available chain has a writable buffer over the ring area. A guest that posts
/// its own rings as RX buffers gets them overwritten with packet data (its loss alone), and
/// what it then reads as used entries means nothing: only the memory checks apply, with every
/// available chain's buffers allowed.
fn overwrites_rings(
    before: &Snap,
    after: &Snap,
    l: &Layout,
    pending: u16,
    allowed: &mut Vec<(u64, u64)>,
) -> bool {
    let mut w = Vec::new();
    for i in 0..pending.min(l.size) {
        let slot = u64::from(l.start.wrapping_add(i) % l.size);
        for s in [before, after] {
            if let Some(h) = s.u16(l.avail + 4 + 2 * slot) {
                writable(s, l, h, &mut w);
            }
        }
    }
    // (Buffers are only ever generated at or above DATA_A; a mutated address can go below.)
    if !w.iter().any(|&(a, n)| a < DATA_A.0 && n > 0) {
        return false;
    }
    allowed.extend(w);
    true
}

pub(super) fn check_writes(
    before: &[(u64, Vec<u8>)],
    after: &[(u64, Vec<u8>)],
    allowed: &[(u64, u64)],
) -> Result<(), String> {
    for a in changed(before, after) {
        if !allowed.iter().any(|&(s, n)| a >= s && a - s < n) {
            return Err(format!(
                "guest byte {a:#x} changed outside every used ring and returned writable buffer"
            ));
        }
    }
    Ok(())
}

pub(super) fn random_hdr(rng: &mut Rng) -> VnetHdr {
    let mut b = [0u8; 10];
    rng.bytes(&mut b);
    if rng.chance(60) {
        b = [0; 10];
    }
    VnetHdr::from_bytes(&b).unwrap_or_default()
}

pub(super) fn random_packet(rng: &mut Rng) -> Vec<u8> {
    let n = match rng.below(10) {
        0 => 0,
        1..=6 => rng.range(1, 1600),
        7 | 8 => rng.range(1600, 9000),
        _ => rng.range(9000, 65_550),
    } as usize;
    let mut p = vec![0u8; n];
    rng.bytes(&mut p[..n.min(64)]);
    p
}

/// RX: a few packets from the VF side into a hostile RX ring.
fn rx_input(rng: &mut Rng, mergeable: bool) -> Result<(), String> {
    let g = Guarded::new(&REGIONS);
    let l = hostile_queue(rng, &g, RX_RINGS, true, &ALL);
    let mut q = device_queue(rng, &l);
    let before = g.snapshot();
    let hdr_len = if rng.chance(80) {
        VIRTIO_NET_HDR_LEN
    } else {
        10
    };
    let offloads = RxOffloads::from_features(rng.u64());
    let (stats, mut scratch) = (QueueStats::default(), Vec::new());
    if let Ok(mut ring) = RxRing::new(&mut q, &g.mem, RingKind::Split, mergeable, hdr_len) {
        for _ in 0..rng.range(1, 6) {
            let (hdr, pkt) = (random_hdr(rng), random_packet(rng));
            if rng.chance(30) {
                deliver_adapted(&mut ring, offloads, &hdr, &pkt, &mut scratch, &stats);
            } else {
                let _ = ring.deliver(&hdr, &pkt);
            }
        }
    }
    let after = g.snapshot();
    let mut allowed = Vec::new();
    check_queue(&Snap(&before), &Snap(&after), &l, &q, false, &mut allowed)?;
    check_writes(&before, &after, &allowed)
}

/// TX: gathers (and returns) batches from a hostile TX ring; every iovec must lie in guest
/// memory (the kernel would read it) and is read end to end here.
fn tx_input(rng: &mut Rng) -> Result<(), String> {
    let g = Guarded::new(&REGIONS);
    let l = hostile_queue(rng, &g, TX_RINGS, false, &ALL);
    let mut q = device_queue(rng, &l);
    let before = g.snapshot();
    let hdr_len = if rng.chance(80) {
        VIRTIO_NET_HDR_LEN
    } else {
        10
    };
    let (stats, mut batch) = (QueueStats::default(), TxBatch::default());
    let hosts = g.host_ranges();
    for _ in 0..3 {
        match batch.gather(&mut q, &g.mem, hdr_len, &stats) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        check_iovecs(&batch, &hosts)?;
        batch
            .complete(&mut q, &g.mem)
            .map_err(|e| format!("complete: {e}"))?;
    }
    let after = g.snapshot();
    let mut allowed = Vec::new();
    check_queue(&Snap(&before), &Snap(&after), &l, &q, true, &mut allowed)?;
    check_writes(&before, &after, &allowed)
}

/// Every packet iovec (the first of each packet is the batch's own header copy) inside one
/// guest region; each is also read through, so one past a region end faults on the guard.
pub(super) fn check_iovecs(batch: &TxBatch, hosts: &[(usize, usize)]) -> Result<(), String> {
    for (p, iovs) in batch.packet_iovecs().enumerate() {
        for iov in iovs {
            let (s, n) = (iov.iov_base as usize, iov.iov_len);
            if !hosts
                .iter()
                .any(|&(h, hl)| s >= h && n <= hl && s - h <= hl - n)
            {
                return Err(format!(
                    "packet {p}: iovec {s:#x}+{n} is outside guest memory"
                ));
            }
            let mut sum = 0u8;
            for k in 0..n {
                // SAFETY: checked just above to lie in a live guest mapping.
                sum ^= unsafe { std::ptr::read_volatile((s + k) as *const u8) };
            }
            std::hint::black_box(sum);
        }
    }
    Ok(())
}

/// Loopback: one hostile TX ring delivered into one hostile RX ring of the same memory.
fn loopback_input(rng: &mut Rng) -> Result<(), String> {
    let g = Guarded::new(&REGIONS);
    // Half the inputs keep TX and RX buffers apart (so the byte checks see real deliveries),
    // half let them overlap anywhere, as a hostile guest may.
    let (tz, rz) = if rng.chance(50) {
        (&LOOP_TX, &LOOP_RX)
    } else {
        (&ALL, &ALL)
    };
    let tl = hostile_queue(rng, &g, TX_RINGS, false, tz);
    let rl = hostile_queue(rng, &g, RX_RINGS, true, rz);
    let (mut tq, mut rq) = (device_queue(rng, &tl), device_queue(rng, &rl));
    let before = g.snapshot();
    let offloads = RxOffloads::from_features(rng.u64());
    let (ts, rs) = (QueueStats::default(), QueueStats::default());
    let (mut batch, mut bufs) = (TxBatch::default(), PacketBufs::default());
    if let Ok(mut ring) = RxRing::new(
        &mut rq,
        &g.mem,
        RingKind::Split,
        rng.chance(50),
        VIRTIO_NET_HDR_LEN,
    ) {
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
            if !matches!(r, Ok(1..)) {
                break;
            }
        }
    }
    let after = g.snapshot();
    let mut allowed = Vec::new();
    let (b, a) = (Snap(&before), Snap(&after));
    let rx_pending = b
        .u16(rl.avail + 2)
        .unwrap_or(rl.start)
        .wrapping_sub(rl.start);
    if overwrites_rings(&b, &a, &rl, rx_pending, &mut allowed) {
        // RX packet data may have landed on the TX rings too: only the memory checks hold.
        for l in [&tl, &rl] {
            allowed.push((l.used, 6 + 8 * u64::from(l.size)));
        }
    } else {
        check_queue(&b, &a, &tl, &tq, true, &mut allowed).map_err(|e| format!("tx: {e}"))?;
        check_queue(&b, &a, &rl, &rq, false, &mut allowed).map_err(|e| format!("rx: {e}"))?;
    }
    check_writes(&before, &after, &allowed)
}

thread_local! {
    /// Used entries checked by this thread's campaign (each test runs on its own thread).
    pub(super) static RETURNED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs a ring campaign; one that checked no used entry at all tested nothing, and fails.
pub(super) fn ring_campaign(
    name: &'static str,
    ci_iters: u64,
    body: impl FnMut(&mut Rng) -> Result<(), String>,
) {
    RETURNED.with(|r| r.set(0));
    let inputs = campaign(name, ci_iters, body);
    let returned = RETURNED.with(|r| r.get());
    eprintln!("fuzz {name}: {returned} used entries checked");
    assert!(
        inputs < 100 || returned > 0,
        "fuzz {name}: no chain ever came back"
    );
}

#[test]
fn fuzz_rx_rings() {
    ring_campaign("rx", 3000, |rng| rx_input(rng, false));
}

#[test]
fn fuzz_rx_mergeable_rings() {
    ring_campaign("rx-mergeable", 3000, |rng| rx_input(rng, true));
}

#[test]
fn fuzz_tx_rings() {
    ring_campaign("tx", 3000, tx_input);
}

#[test]
fn fuzz_loopback_rings() {
    ring_campaign("loopback", 2000, loopback_input);
}
