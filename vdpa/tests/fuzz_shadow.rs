//! Fuzzes the shadow virtqueue relay (the software path of vDPA mode during migration) over
//! hostile guest rings on guard-paged guest memory, with a simulated device completing what
//! it was given. Seeded and bounded like the backend's ring fuzzers (the same harness; see
//! `virtq::fuzz` for the `VHOST_RELAY_FUZZ_*` knobs).
//!
//! Checked after every input: no access outside guest memory (guard pages), no hang, guest
//! memory changes only in the guest's used ring (entries, index, avail_event), the used index
//! the guest sees is the relay's, and the used entries name only heads the guest made
//! available (each at most as often) while the device is honest; a dishonest device's
//! impossible heads never reach the guest.

use vdpa::shadow::{RingAddr, ShadowQueue};
use virtq::fuzz::{campaign, changed, Rng, Snap};
use vm_memory::{Bytes, GuestAddress};

/// Guard-paged guest memory of the shadow relay's memory type.
type Guarded = virtq::fuzz::Guarded<migration::DirtyBitmap>;

const REGIONS: [(u64, usize); 2] = [(0, 0x2_0000), (0x10_0000, 0x8000)];
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const TABLES: (u64, u64) = (0x6000, 0x8000);
const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

fn put(g: &Guarded, addr: u64, bytes: &[u8]) {
    let _ = g.mem.write_slice(bytes, GuestAddress(addr));
}

fn buffer_addr(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0..=5 => rng.range(0x8000, 0x2_0000 - 1),
        6 => 0x2_0000 - rng.range(1, 64),
        7 => rng.range(0x10_0000, 0x10_8000 - 1),
        8 => 0x4000_0000 + rng.below(0x1000),
        _ => rng.u64(),
    }
}

/// Indirect tables start at one of these (each up to 64 descriptors).
const TABLE_STRIDE: u64 = 0x400;

/// An indirect table's (address, length): mostly short and in memory, sometimes a lie.
fn table(rng: &mut Rng) -> (u64, u32) {
    let n = rng.range(1, 64);
    let at = TABLES.0 + TABLE_STRIDE * rng.below((TABLES.1 - TABLES.0) / TABLE_STRIDE);
    match rng.below(10) {
        0..=6 => (at, 16 * n as u32),
        7 => (at, rng.u64() as u32),
        8 => (u64::MAX - rng.below(0x100), 16 * n as u32),
        _ => (rng.u64(), rng.u64() as u32),
    }
}

fn descriptor(rng: &mut Rng, table_len: u64) -> [u8; 16] {
    let mut flags = 0u16;
    for (bit, pct) in [(WRITE, 80), (NEXT, 40)] {
        if rng.chance(pct) {
            flags |= bit;
        }
    }
    let (addr, len) = if rng.chance(8) {
        flags |= INDIRECT;
        table(rng)
    } else {
        (buffer_addr(rng), rng.range(0, 70_000) as u32)
    };
    let next = if rng.chance(90) {
        rng.below(table_len) as u16
    } else {
        rng.u64() as u16
    };
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// Fills the guest's rings; returns (ring size, start index, avail index published).
fn hostile_guest(rng: &mut Rng, g: &Guarded) -> (u16, u16, u16) {
    let num = 1u16 << rng.range(0, 8);
    let start = if rng.chance(50) { 0 } else { rng.u64() as u16 };
    for i in 0..u64::from(num) {
        put(g, DESC + 16 * i, &descriptor(rng, u64::from(num)));
    }
    let mut at = TABLES.0;
    while at < TABLES.1 {
        let mut d = descriptor(rng, 64);
        if at.is_multiple_of(TABLE_STRIDE) && rng.chance(20) {
            // A table whose first descriptor chains to itself, writing nothing: a loop.
            d[12..16].copy_from_slice(&[NEXT as u8, 0, 0, 0]);
        }
        put(g, at, &d);
        at += 16;
    }
    for i in 0..u64::from(num) {
        let head = if rng.chance(92) {
            rng.below(u64::from(num)) as u16
        } else {
            rng.u64() as u16
        };
        put(g, AVAIL + 4 + 2 * i, &head.to_le_bytes());
    }
    let pending = if rng.chance(90) {
        rng.below(u64::from(num) + 1) as u16
    } else {
        rng.u64() as u16
    };
    let idx = start.wrapping_add(pending);
    put(g, AVAIL, &(rng.below(2) as u16).to_le_bytes());
    put(g, AVAIL + 2, &idx.to_le_bytes());
    put(
        g,
        AVAIL + 4 + 2 * u64::from(num),
        &(rng.u64() as u16).to_le_bytes(),
    );
    let mut used = vec![0u8; 6 + 8 * usize::from(num)];
    rng.bytes(&mut used);
    used[2..4].copy_from_slice(&start.to_le_bytes());
    put(g, USED, &used);
    (num, start, idx)
}

/// The device: completes some of the heads the shadow avail ring holds, in any order, with
/// random lengths; sometimes dishonest (a head it was never given). Returns whether honest.
fn device(rng: &mut Rng, sq: &ShadowQueue, from: u16, to: u16) -> bool {
    let base = sq.mem.va() as *mut u8;
    let used = (sq.used_iova() - sq.iova) as usize;
    let n = sq.num;
    // SAFETY: offsets inside the shadow mapping: the avail ring (4 + 2 * slot) and used ring
    // (used + 4 + 8 * slot, used + 2) of `n` entries, which `ShadowQueue::new` sized.
    let read_avail = |i: u16| unsafe {
        std::ptr::read_volatile(base.add(4 + 2 * usize::from(i % n)) as *const u16)
    };
    let mut heads: Vec<u32> = (0..to.wrapping_sub(from))
        .map(|k| u32::from(read_avail(from.wrapping_add(k))))
        .collect();
    let honest = rng.chance(85);
    let done = rng.below(heads.len() as u64 + 1) as u16;
    for k in 0..done {
        let i = rng.below(heads.len() as u64) as usize;
        let id = if honest {
            heads.swap_remove(i)
        } else {
            rng.u64() as u32
        };
        let len = if rng.chance(80) {
            rng.below(5000) as u32
        } else {
            rng.u64() as u32
        };
        let slot = usize::from(sq.next_used.wrapping_add(k) % n);
        // SAFETY: see `read_avail`.
        unsafe {
            let e = base.add(used + 4 + 8 * slot);
            std::ptr::write_volatile(e as *mut u32, id);
            std::ptr::write_volatile(e.add(4) as *mut u32, len);
        }
    }
    let idx = if honest || rng.chance(50) {
        sq.next_used.wrapping_add(done)
    } else {
        rng.u64() as u16
    };
    // SAFETY: see `read_avail`.
    unsafe { std::ptr::write_volatile(base.add(used + 2) as *mut u16, idx) };
    honest
}

fn shadow_input(rng: &mut Rng) -> Result<(), String> {
    let g = Guarded::new(&REGIONS);
    let (num, start, _) = hostile_guest(rng, &g);
    let mut ring = RingAddr {
        desc: DESC,
        avail: AVAIL,
        used: USED,
    };
    wild_rings(rng, &mut ring);
    let mut sq = ShadowQueue::new(0, num, ring, 0x4000_0000, start, rng.chance(50))
        .map_err(|e| format!("shadow queue: {e}"))?;
    let before = g.snapshot();
    let mut honest = true;
    let mut forwarded: Vec<u16> = Vec::new();
    // An error stops the queue (the session marks it broken), so the relay's indexes need
    // not match the guest's after one.
    let mut stopped = false;
    for _ in 0..rng.range(1, 3) {
        let from = sq.next_avail;
        if sq.forward_avail(&g.mem).is_err() {
            stopped = true;
            break;
        }
        // The heads as the guest published them (the relay never writes the avail ring).
        let guest = Snap(&before);
        forwarded.extend(
            (0..sq.next_avail.wrapping_sub(from))
                .filter_map(|k| guest.u16(AVAIL + 4 + 2 * u64::from(from.wrapping_add(k) % num))),
        );
        honest &= device(rng, &sq, from, sq.next_avail);
        if sq.forward_used(&g.mem).is_err() {
            stopped = true;
            break;
        }
    }
    let after = g.snapshot();
    let run = Run {
        start,
        honest,
        stopped,
    };
    check(&Snap(&after), &before, &after, &sq, run, forwarded)
}

/// Sometimes ring addresses anywhere, up to the top of the address space: the frontend
/// chooses them (each ring on its own, so the relay gets past a good one to a bad one).
fn wild_rings(rng: &mut Rng, ring: &mut RingAddr) {
    if !rng.chance(5) {
        return;
    }
    for field in [&mut ring.desc, &mut ring.avail, &mut ring.used] {
        *field = match rng.below(4) {
            0 => u64::MAX - rng.below(0x1000),
            1 => rng.u64(),
            _ => *field,
        };
    }
}

/// How an input went: the start index, whether the device stayed honest, whether an error
/// stopped the queue.
struct Run {
    start: u16,
    honest: bool,
    stopped: bool,
}

fn check(
    a: &Snap,
    before: &[(u64, Vec<u8>)],
    after: &[(u64, Vec<u8>)],
    sq: &ShadowQueue,
    run: Run,
    mut forwarded: Vec<u16>,
) -> Result<(), String> {
    let Run {
        start,
        honest,
        stopped,
    } = run;
    let n = sq.num;
    let used_len = 6 + 8 * u64::from(n);
    if let Some(b) = changed(before, after)
        .into_iter()
        .find(|&b| !(USED..USED + used_len).contains(&b))
    {
        return Err(format!("guest byte {b:#x} changed outside the used ring"));
    }
    let idx = a.u16(USED + 2).unwrap_or(start);
    if idx != sq.next_used && !stopped {
        return Err(format!(
            "guest used idx {idx}, relay's next_used {}",
            sq.next_used
        ));
    }
    for k in 0..idx.wrapping_sub(start) {
        let id = a
            .u32(USED + 4 + 8 * u64::from(start.wrapping_add(k) % n))
            .unwrap_or(u32::MAX);
        if id >= u32::from(n) {
            return Err(format!(
                "used entry {k} names head {id}, past the {n}-entry table"
            ));
        }
        match forwarded.iter().position(|&h| u32::from(h) == id) {
            Some(i) => {
                forwarded.swap_remove(i);
            }
            None if honest => {
                return Err(format!(
                    "used entry {k} names head {id}, never made available"
                ))
            }
            None => {}
        }
    }
    Ok(())
}

#[test]
fn fuzz_shadow_rings() {
    campaign("shadow", 5000, shadow_input);
}

/// Regression (found by this fuzzer, seed 9 of the generator's first version): `forward_avail`
/// wrote avail_event at `guest.used + 4 + 8 * num` unchecked, so a used ring at the top of the
/// guest-physical space (a frontend's memory table may put a region there) overflowed: a panic
/// in a debug build, a wrapped guest address in a release build. Now refused like any other
/// inaccessible ring (virtq's ring checks: not inside one memory region).
#[test]
fn used_ring_at_the_top_of_the_address_space_is_an_error_not_an_overflow() {
    let g = Guarded::new(&REGIONS);
    put(&g, AVAIL + 2, &1u16.to_le_bytes());
    put(&g, AVAIL + 4, &0u16.to_le_bytes());
    let ring = RingAddr {
        desc: DESC,
        avail: AVAIL,
        used: u64::MAX - 7,
    };
    let mut sq = ShadowQueue::new(0, 4, ring, 0x4000_0000, 0, true).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sq.forward_avail(&g.mem)));
    assert!(
        matches!(
            r,
            Ok(Err(vdpa::shadow::RelayError::Ring {
                source: virtq::RingError::Unmapped {
                    what: "used ring",
                    ..
                },
                ..
            }))
        ),
        "{:?}",
        r.map(|r| r.map(|_| ()))
    );
}
