//! Session and shadow-ring tests against the mock device, with a small split-ring guest
//! driver on memfd guest memory.
#![allow(clippy::needless_range_loop)]

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserLog, VhostUserMemoryRegion};
use vhost::vhost_user::message::{VhostUserVirtioFeatures, VhostUserVringAddrFlags};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use virtio_bindings::virtio_config::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::mock::MockDevice;
use crate::session::{offered_features, Counters, Mode, Session};
use crate::shadow::{GuestMem, RelayError, UsedBatch};

const MEM: u64 = 1 << 20;
const USER: u64 = 0x7f00_0000_0000;
const NUM: u16 = 16;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const ACCESS_PLATFORM: u64 = 1 << VIRTIO_F_ACCESS_PLATFORM;
const MAC: u64 = 1 << VIRTIO_NET_F_MAC;
const MQ: u64 = 1 << VIRTIO_NET_F_MQ;
const CTRL_VQ: u64 = 1 << VIRTIO_NET_F_CTRL_VQ;
const RING_PACKED: u64 = 1 << VIRTIO_F_RING_PACKED;
const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
const PAGE: u64 = 4096;

/// Counters nobody reads.
struct NoCounters;
impl Counters for NoCounters {
    fn relayed(&self, _: usize, _: u64, _: u64) {}
}

#[derive(Default)]
struct TestCounters(Mutex<[(u64, u64); 2]>);
impl Counters for TestCounters {
    fn relayed(&self, q: usize, packets: u64, bytes: u64) {
        let mut c = self.0.lock().unwrap();
        c[q].0 += packets;
        c[q].1 += bytes;
    }
}
impl TestCounters {
    fn get(&self) -> [(u64, u64); 2] {
        *self.0.lock().unwrap()
    }
}

fn memfd(len: u64) -> File {
    // SAFETY: plain syscalls on a fresh fd.
    let fd = unsafe { libc::memfd_create(c"t".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: we own fd.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// The guest: its memory, and a driver for two split rings.
struct Guest {
    file: File,
    mem: GuestMemoryMmap<()>,
    kick: [EventFd; 2],
    call: [EventFd; 2],
    avail_idx: [u16; 2],
    next_head: [u16; 2],
    /// Heads in the order they were made available.
    posted: [Vec<u16>; 2],
}

fn ring(q: usize) -> (u64, u64, u64) {
    let base = 0x1000 + q as u64 * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

fn buf_addr(q: usize, head: u16) -> u64 {
    0x20000 + q as u64 * 0x20000 + u64::from(head) * 0x1000 + 0x100
}

impl Guest {
    fn new() -> Guest {
        let file = memfd(MEM);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM as usize,
            Some(vm_memory::FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        Guest {
            file,
            mem,
            kick: [
                EventFd::new(EFD_NONBLOCK).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            ],
            call: [
                EventFd::new(EFD_NONBLOCK).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            ],
            avail_idx: [0; 2],
            next_head: [0; 2],
            posted: [Vec::new(), Vec::new()],
        }
    }

    /// Makes one buffer available on `q` (rx: device-writable 1500 bytes; tx: 60 readable).
    fn post(&mut self, q: usize) -> u16 {
        let (desc, avail, _) = ring(q);
        let head = self.next_head[q];
        self.next_head[q] = (head + 1) % NUM;
        let d = desc + 16 * u64::from(head);
        let (len, flags) = if q == 0 { (1500u32, 2u16) } else { (60, 0) };
        self.mem
            .write_obj(buf_addr(q, head), GuestAddress(d))
            .unwrap();
        self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        let slot = u64::from(self.avail_idx[q] % NUM);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
        self.posted[q].push(head);
        let _ = self.kick[q].write(1);
        head
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(ring(q).2 + 2)).unwrap()
    }

    /// Heads in the guest's used ring, entries `0..used_idx` (no wrap in these tests).
    fn used_heads(&self, q: usize) -> Vec<u16> {
        let used = ring(q).2;
        (0..self.used_idx(q))
            .map(|i| {
                let id: u32 = self
                    .mem
                    .read_obj(GuestAddress(used + 4 + 8 * u64::from(i % NUM)))
                    .unwrap();
                id as u16
            })
            .collect()
    }
}

fn wait(mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn dup(e: &EventFd) -> File {
    use std::os::fd::IntoRawFd;
    // SAFETY: a fresh dup we own.
    unsafe { File::from_raw_fd(e.try_clone().unwrap().into_raw_fd()) }
}

struct Fixture {
    dev: MockDevice,
    guest: Guest,
    session: Session<MockDevice>,
    counters: Arc<TestCounters>,
    kick_fds: [i32; 2],
}

fn device_features() -> u64 {
    VERSION_1 | ACCESS_PLATFORM | MAC | MQ | CTRL_VQ | RING_PACKED
}

/// A session set up the way QEMU 10 does it: vring enable before SET_FEATURES (the shim
/// would replay it; the session takes it directly), memory, then each ring.
fn setup(backend_features: u64) -> Fixture {
    let dev = MockDevice::new(device_features(), backend_features);
    let counters = Arc::new(TestCounters::default());
    let mut session = Session::new("t", dev.clone(), counters.clone())
        .map_err(|e| e.0)
        .unwrap();
    let guest = Guest::new();
    let kick_fds = attach(&mut session, &guest, VERSION_1 | MAC | PROTOCOL_FEATURES);
    Fixture {
        dev,
        guest,
        session,
        counters,
        kick_fds,
    }
}

fn attach(session: &mut Session<MockDevice>, guest: &Guest, features: u64) -> [i32; 2] {
    attach_at(session, guest, features, 0)
}

/// `attach` with guest memory at guest physical address `gpa`.
fn attach_at(
    session: &mut Session<MockDevice>,
    guest: &Guest,
    features: u64,
    gpa: u64,
) -> [i32; 2] {
    session.set_vring_enable(0, true).unwrap();
    session.set_vring_enable(1, true).unwrap();
    session.set_features(features).unwrap();
    let region = VhostUserMemoryRegion::new(gpa, MEM, USER, 0);
    session
        .set_mem_table(&[region], vec![guest.file.try_clone().unwrap()], None)
        .unwrap();
    let mut kick_fds = [0; 2];
    for q in 0..2 {
        let (d, a, u) = ring(q);
        session.set_vring_num(q as u32, u32::from(NUM)).unwrap();
        session.set_vring_base(q as u32, 0).unwrap();
        session
            .set_vring_addr(
                q as u32,
                VhostUserVringAddrFlags::empty(),
                USER + d,
                USER + u,
                USER + a,
                0,
            )
            .unwrap();
        let k = dup(&guest.kick[q]);
        kick_fds[q] = k.as_raw_fd();
        session.set_vring_kick(q as u8, Some(k)).unwrap();
        session
            .set_vring_call(q as u8, Some(dup(&guest.call[q])))
            .unwrap();
    }
    kick_fds
}

fn log_pages(log: &File) -> BTreeSet<u64> {
    let mut bytes = vec![0u8; (MEM / PAGE / 8) as usize];
    log.read_exact_at(&mut bytes, 0).unwrap();
    let mut pages = BTreeSet::new();
    for (i, b) in bytes.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                pages.insert((i * 8 + bit) as u64);
            }
        }
    }
    pages
}

fn pages_of(addr: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    addr / PAGE..=(addr + len - 1) / PAGE
}

#[test]
fn features_hide_what_cannot_be_carried_and_refuse_what_the_device_lacks() {
    let offered = offered_features(device_features());
    assert_eq!(
        offered & ACCESS_PLATFORM,
        0,
        "no vIOMMU towards the frontend"
    );
    assert_eq!(offered & RING_PACKED, 0, "no packed ring");
    assert_eq!(offered & (MQ | CTRL_VQ), 0, "no MQ / control queue");
    assert_ne!(offered & LOG_ALL, 0, "migration possible");
    assert_ne!(offered & VERSION_1, 0);
    let dev = MockDevice::new(device_features(), 0);
    let mut s = Session::new("t", dev, Arc::new(NoCounters))
        .map_err(|e| e.0)
        .unwrap();
    let err = s
        .set_features(VERSION_1 | (1 << VIRTIO_NET_F_CSUM))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not offer") && err.contains("0x1"),
        "{err}"
    );
    assert_eq!(s.get_queue_num().unwrap(), 2, "virtqueues of the one pair");
}

/// The MAC the operator must give the guest: the device's, when it has one.
#[test]
fn the_device_mac_is_read_from_its_config_when_it_offers_one() {
    use crate::VdpaDevice;
    let dev = MockDevice::new(device_features(), 0);
    assert_eq!(dev.mac().unwrap(), Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
    let without = MockDevice::new(device_features() & !MAC, 0);
    assert_eq!(without.mac().unwrap(), None);
}

#[test]
fn direct_mode_hands_rings_and_fds_to_the_device() {
    let mut f = setup(0);
    assert_eq!(f.session.mode(), Some(Mode::Direct));
    {
        let s = f.dev.state();
        assert_eq!(s.status & 0xf, 0xf, "ACK|DRIVER|FEATURES_OK|DRIVER_OK");
        assert_eq!(
            s.acked,
            VERSION_1 | MAC | ACCESS_PLATFORM,
            "guest features plus ACCESS_PLATFORM (IOVA), minus vhost-user bits"
        );
        assert_eq!(s.iotlb.len(), 1);
        assert_eq!(
            (s.iotlb[0].0, s.iotlb[0].1),
            (0, MEM),
            "IOVA = guest physical"
        );
        for q in 0..2 {
            let (d, a, u) = ring(q);
            let r = &s.rings[q];
            assert_eq!(
                (r.desc, r.avail, r.used),
                (d, a, u),
                "ring addresses are GPAs"
            );
            assert_eq!(r.kick_fd, f.kick_fds[q], "the frontend's kick fd itself");
            assert!(r.enabled);
        }
    }
    for _ in 0..3 {
        f.guest.post(0);
        f.guest.post(1);
    }
    assert_eq!(f.dev.process(0, 10, 100), 3);
    assert_eq!(f.dev.process(1, 10, 0), 3);
    assert_eq!(f.guest.used_idx(0), 3);
    assert_eq!(f.guest.used_idx(1), 3);
    assert_eq!(
        f.guest.call[0].read().unwrap(),
        1,
        "device called the guest directly"
    );
    assert_eq!(f.counters.get(), [(0, 0); 2], "nothing passed through us");
    // QEMU swaps the call fd when the guest masks the vector: no reset for that.
    let resets = f.dev.state().resets;
    let masked = EventFd::new(EFD_NONBLOCK).unwrap();
    f.session.set_vring_call(0, Some(dup(&masked))).unwrap();
    assert_eq!(f.dev.state().resets, resets, "call fd changed in place");
    f.guest.post(0);
    assert_eq!(f.dev.process(0, 10, 100), 1);
    assert_eq!(masked.read().unwrap(), 1, "the device calls the new fd");
    let cfg = f
        .session
        .get_config(0, 6, VhostUserConfigFlags::empty())
        .unwrap();
    assert_eq!(cfg, vec![0x52, 0x54, 0, 0x12, 0x34, 0x56]);
}

#[test]
fn driver_ok_failure_is_reported() {
    let dev = MockDevice::new(device_features(), 0);
    dev.state().fail_driver_ok = true;
    let mut s = Session::new("t", dev.clone(), Arc::new(NoCounters))
        .map_err(|e| e.0)
        .unwrap();
    let guest = Guest::new();
    s.set_vring_enable(0, true).unwrap();
    s.set_vring_enable(1, true).unwrap();
    s.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();
    let region = VhostUserMemoryRegion::new(0, MEM, USER, 0);
    s.set_mem_table(&[region], vec![guest.file.try_clone().unwrap()], None)
        .unwrap();
    let mut last = Ok(());
    for q in 0..2 {
        let (d, a, u) = ring(q);
        s.set_vring_num(q as u32, 16).unwrap();
        s.set_vring_addr(
            q as u32,
            VhostUserVringAddrFlags::empty(),
            USER + d,
            USER + u,
            USER + a,
            0,
        )
        .unwrap();
        s.set_vring_kick(q as u8, Some(dup(&guest.kick[q])))
            .unwrap();
        last = s.set_vring_call(q as u8, Some(dup(&guest.call[q])));
    }
    let err = last.unwrap_err().to_string();
    assert!(err.contains("DRIVER_OK"), "{err}");
    assert_eq!(s.mode(), None);
}

/// The whole migration cycle with buffers in flight at both switches: every buffer the
/// guest made available is completed exactly once and in order, the relay counts what went
/// through it, and every page the device wrote while logging is in the log.
fn switch_cycle(backend_features: u64) {
    let mut f = setup(backend_features);
    // Direct: 4 rx + 4 tx available, the device does 3 of each before the switch.
    for _ in 0..4 {
        f.guest.post(0);
        f.guest.post(1);
    }
    assert_eq!(f.dev.process(0, 3, 200), 3);
    assert_eq!(f.dev.process(1, 3, 0), 3);

    // Migration starts: log base, then LOG_ALL.
    let log = memfd(PAGE);
    f.session
        .set_log_base(&VhostUserLog::new(PAGE, 0), log.try_clone().unwrap())
        .unwrap();
    f.session
        .set_features(VERSION_1 | MAC | PROTOCOL_FEATURES | LOG_ALL)
        .unwrap();
    assert_eq!(f.session.mode(), Some(Mode::Shadow));
    let written_before = f.dev.state().written.len();
    {
        let s = f.dev.state();
        for q in 0..2 {
            let r = &s.rings[q];
            assert_eq!(
                r.desc,
                ring(q).0,
                "the device reads the guest's descriptors"
            );
            assert!(
                r.avail >= MEM && r.used >= MEM,
                "shadow rings outside guest RAM"
            );
            assert_eq!(r.base, 3, "started at the guest's used index");
            assert_ne!(r.kick_fd, f.kick_fds[q], "kicks now come from us");
        }
    }
    // The buffer in flight at the switch, and 3 more, go through the shadow rings.
    for _ in 0..3 {
        f.guest.post(0);
        f.guest.post(1);
    }
    for q in 0..2 {
        assert!(
            wait(|| {
                f.dev.process(q, 1, 300);
                f.guest.used_idx(q) == 7
            }),
            "queue {q}: used {}",
            f.guest.used_idx(q)
        );
    }
    let c = f.counters.get();
    assert_eq!(c[0], (4, 4 * 300), "rx relayed by us");
    assert_eq!(c[1].0, 4, "tx relayed by us");
    assert_ne!(f.guest.call[0].read().unwrap(), 0, "we called the guest");

    // Every page the device wrote in guest memory while logging is marked, and so is
    // each used ring.
    let dirty = log_pages(&log);
    let written: Vec<(u64, u64)> = f.dev.state().written[written_before..].to_vec();
    let mut guest_writes = 0;
    for (iova, len) in written {
        if iova < MEM {
            guest_writes += 1;
            for p in pages_of(iova, len) {
                assert!(
                    dirty.contains(&p),
                    "page {p} written at {iova:#x} not logged"
                );
            }
        }
    }
    assert_eq!(
        guest_writes, 4,
        "the device wrote 4 rx buffers in guest memory"
    );
    for q in 0..2 {
        assert!(dirty.contains(&(ring(q).2 / PAGE)), "used ring {q} logged");
    }
    assert!(
        !dirty.contains(&(buf_addr(1, 0) / PAGE)),
        "tx buffers are not written"
    );

    // In flight at the switch back: one more rx, not processed yet.
    f.guest.post(0);
    std::thread::sleep(Duration::from_millis(20));
    f.session
        .set_features(VERSION_1 | MAC | PROTOCOL_FEATURES)
        .unwrap();
    assert_eq!(f.session.mode(), Some(Mode::Direct));
    {
        let s = f.dev.state();
        let (d, a, u) = ring(0);
        assert_eq!(
            (s.rings[0].desc, s.rings[0].avail, s.rings[0].used),
            (d, a, u)
        );
        assert_eq!(s.rings[0].base, 7, "restarted at the guest's used index");
        assert_eq!(
            s.rings[0].kick_fd, f.kick_fds[0],
            "the frontend's kick fd again"
        );
    }
    let before = f.counters.get();
    assert_eq!(f.dev.process(0, 10, 100), 1, "the in-flight buffer, once");
    assert_eq!(f.guest.used_idx(0), 8);
    assert_eq!(f.counters.get(), before, "direct again: nothing through us");
    for q in 0..2 {
        assert_eq!(
            f.guest.used_heads(q),
            f.guest.posted[q][..f.guest.used_idx(q) as usize].to_vec()
        );
    }
    assert_eq!(f.guest.used_heads(0).len(), 8);
}

#[test]
fn switch_to_shadow_and_back_by_reset() {
    switch_cycle(0);
}

#[test]
fn switch_to_shadow_and_back_with_suspend() {
    switch_cycle(crate::device::BACKEND_F_SUSPEND);
}

/// DPDK virtio_user's order (every ring described, then enabled one by one) and its
/// teardown (disabled one by one, then GET_VRING_BASE): the device starts once, with both
/// rings enabled, and stops once. A start with a ring disabled is what DPDK's VDUSE device
/// aborts after 100 ms.
#[test]
fn the_device_starts_once_per_attach_and_stops_once() {
    let dev = MockDevice::new(device_features(), 0);
    let mut s = Session::new("t", dev.clone(), Arc::new(NoCounters))
        .map_err(|e| e.0)
        .unwrap();
    let guest = Guest::new();
    s.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();
    let region = VhostUserMemoryRegion::new(0, MEM, USER, 0);
    s.set_mem_table(&[region], vec![guest.file.try_clone().unwrap()], None)
        .unwrap();
    for q in 0..2 {
        let (d, a, u) = ring(q);
        s.set_vring_num(q as u32, u32::from(NUM)).unwrap();
        s.set_vring_base(q as u32, 0).unwrap();
        let flags = VhostUserVringAddrFlags::empty();
        s.set_vring_addr(q as u32, flags, USER + d, USER + u, USER + a, 0)
            .unwrap();
        s.set_vring_kick(q as u8, Some(dup(&guest.kick[q])))
            .unwrap();
        s.set_vring_call(q as u8, Some(dup(&guest.call[q])))
            .unwrap();
    }
    assert!(dev.state().starts.is_empty(), "no ring enabled yet");
    s.set_vring_enable(0, true).unwrap();
    assert!(dev.state().starts.is_empty(), "ring 1 still disabled");
    s.set_vring_enable(1, true).unwrap();
    assert_eq!(dev.state().starts, vec![[true, true]]);
    assert_eq!(s.mode(), Some(Mode::Direct));

    let resets = dev.state().resets;
    s.set_vring_enable(0, false).unwrap();
    assert_eq!(s.mode(), None, "stopped at the first disable");
    assert_eq!(dev.state().resets, resets + 1);
    s.set_vring_enable(1, false).unwrap();
    for q in 0..2 {
        s.get_vring_base(q).unwrap();
    }
    assert_eq!(dev.state().starts.len(), 1, "no start on the way down");
    assert_eq!(dev.state().status, 0);
}

#[test]
fn get_vring_base_stops_and_reattach_starts_again() {
    let mut f = setup(0);
    for _ in 0..2 {
        f.guest.post(0);
    }
    f.dev.process(0, 1, 64);
    let base = f.session.get_vring_base(0).unwrap();
    let num = base.num;
    assert_eq!(num, 1, "the guest's used index");
    assert_eq!(f.session.mode(), None);
    assert_eq!(f.dev.state().status, 0, "device reset");
    let num = f.session.get_vring_base(1).unwrap().num;
    assert_eq!(num, 0);

    // The frontend goes away: the next one finds a clean device and starts it.
    let dev = f.session.into_device();
    assert!(dev.state().iotlb.is_empty(), "guest memory unmapped");
    let counters = Arc::new(TestCounters::default());
    let mut s = Session::new("t", dev.clone(), counters)
        .map_err(|e| e.0)
        .unwrap();
    let mut guest = Guest::new();
    attach(&mut s, &guest, VERSION_1 | PROTOCOL_FEATURES);
    assert_eq!(s.mode(), Some(Mode::Direct));
    guest.post(0);
    assert_eq!(dev.process(0, 4, 64), 1);
    assert_eq!(guest.used_idx(0), 1);
}

#[test]
fn bad_guest_avail_index_stops_only_the_relay_of_that_queue() {
    let mut f = setup(0);
    let log = memfd(PAGE);
    f.session
        .set_log_base(&VhostUserLog::new(PAGE, 0), log.try_clone().unwrap())
        .unwrap();
    f.session
        .set_features(VERSION_1 | MAC | PROTOCOL_FEATURES | LOG_ALL)
        .unwrap();
    // A guest writes a nonsense avail index on rx.
    f.guest
        .mem
        .write_obj(1000u16, GuestAddress(ring(0).1 + 2))
        .unwrap();
    let _ = f.guest.kick[0].write(1);
    f.guest.post(1);
    assert!(wait(|| {
        f.dev.process(1, 1, 0);
        f.guest.used_idx(1) == 1
    }));
    assert_eq!(
        f.dev.process(0, 10, 64),
        0,
        "nothing forwarded from the bad ring"
    );
}

/// EVENT_IDX through the shadow rings: the guest learns where to kick (avail_event in its
/// used ring), and is interrupted only when its used_event is passed.
#[test]
fn shadow_queue_honours_event_idx() {
    use crate::shadow::{RingAddr, ShadowQueue};
    let guest = Guest::new();
    let (desc, avail, used) = ring(0);
    let mem = guest_mem_with_dirty_bitmap(&guest);
    let mut sq = ShadowQueue::new(0, NUM, RingAddr { desc, avail, used }, 0, 0, true).unwrap();
    let mut g = guest;
    for _ in 0..3 {
        g.post(0);
    }
    assert_eq!(sq.forward_avail(&mem).unwrap(), 3);
    let avail_event: u16 = g
        .mem
        .read_obj(GuestAddress(used + 4 + 8 * u64::from(NUM)))
        .unwrap();
    assert_eq!(avail_event, 3, "guest told to kick for its next entry");
    // The guest wants an interrupt only after the second completion (used_event = 1).
    g.mem
        .write_obj(1u16, GuestAddress(avail + 4 + 2 * u64::from(NUM)))
        .unwrap();
    device_complete(&sq, 0, 0, 0);
    let b = sq.forward_used(&mem).unwrap();
    assert_eq!(
        (b.entries, b.notify),
        (1, false),
        "used 0 -> 1 does not pass event 1"
    );
    device_complete(&sq, 1, 1, 0);
    let b = sq.forward_used(&mem).unwrap();
    assert_eq!(
        (b.entries, b.notify),
        (1, true),
        "used 1 -> 2 passes event 1"
    );
}

/// Writes used entry `slot` = (head, len) into a shadow queue's used ring as a device would.
fn device_complete(sq: &crate::shadow::ShadowQueue, slot: u16, head: u32, len: u32) {
    let used = (sq.used_iova() - sq.iova) as usize;
    let base = sq.mem.va() as *mut u8;
    // SAFETY: inside the shadow ring mapping (used ring of NUM entries).
    unsafe {
        let e = base.add(used + 4 + 8 * usize::from(slot));
        std::ptr::write_volatile(e as *mut u32, head);
        std::ptr::write_volatile(e.add(4) as *mut u32, len);
        std::ptr::write_volatile(base.add(used + 2) as *mut u16, slot + 1);
    }
}

/// Guest memory for hostile chains: two megabytes (room for the largest indirect table, 1 MiB,
/// above the rings: a table must be wholly in memory), and the last page below 2^64 (a
/// region's end must fit in a u64, so it ends one byte short of the top).
fn mem_with_top_page() -> GuestMem {
    GuestMem::from_ranges(&[
        (GuestAddress(0), 2 * MEM as usize),
        (GuestAddress(TOP_PAGE), PAGE as usize),
    ])
    .unwrap()
}

const TOP_PAGE: u64 = u64::MAX - PAGE;
const DESC_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const DESC_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const DESC_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// Writes descriptor (addr, len, flags, next) at guest address `at`.
fn put_desc(mem: &GuestMem, at: u64, d: (u64, u32, u16, u16)) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&d.0.to_le_bytes());
    raw[8..12].copy_from_slice(&d.1.to_le_bytes());
    raw[12..14].copy_from_slice(&d.2.to_le_bytes());
    raw[14..].copy_from_slice(&d.3.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

/// Runs `f` (a relay step on hostile guest data) on its own thread, as the relay does, and
/// returns its result; fails the test if it panicked or took more than 10 s.
fn promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::sync::mpsc::{channel, RecvTimeoutError};
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) => panic!("still walking guest descriptors after 10 s"),
        Err(RecvTimeoutError::Disconnected) => panic!("the relay step panicked"),
    }
}

/// The device returned head 0 of rx with 1500 bytes written; the guest's descriptor 0 is
/// `head` and the writes of `setup` shape the rest. What does the relay make of it?
fn forward_hostile_chain(
    head: (u64, u32, u16, u16),
    setup: impl FnOnce(&GuestMem) + Send + 'static,
) -> Result<UsedBatch, RelayError> {
    use crate::shadow::{RingAddr, ShadowQueue};
    promptly(move || {
        let mem = mem_with_top_page();
        let (desc, avail, used) = ring(0);
        put_desc(&mem, desc, head);
        setup(&mem);
        let mut sq = ShadowQueue::new(0, NUM, RingAddr { desc, avail, used }, 0, 0, false)
            .expect("shadow queue");
        device_complete(&sq, 0, 0, 1500);
        sq.forward_used(&mem)
    })
}

fn assert_bad_chain(r: Result<UsedBatch, RelayError>, want: &str) {
    match r {
        Err(RelayError::BadChain { why, .. }) => {
            assert!(why.contains(want), "{why:?}, wanted {want:?}")
        }
        other => panic!("wanted a bad chain ({want}), got {other:?}"),
    }
}

/// A zero-length writable descriptor that names itself as next never fills the used length:
/// the walk must end at the table's size. In an indirect table claiming 2^28 descriptors
/// that size alone is the defect (minutes per used entry); a legal 65535 is walked once.
#[test]
fn shadow_relay_cuts_a_self_looping_chain() {
    const TABLE: u64 = 0x80000;
    let self_loop = |mem: &GuestMem| {
        put_desc(mem, TABLE, (0x90000, 0, DESC_WRITE | DESC_NEXT, 0));
    };
    let huge = (TABLE, 0xffff_fff0, DESC_INDIRECT, 0);
    assert_bad_chain(forward_hostile_chain(huge, self_loop), "longer than 65535");
    let largest = (TABLE, 16 * 65535, DESC_INDIRECT, 0);
    assert_bad_chain(forward_hostile_chain(largest, self_loop), "loops");
    let direct = (0x90000, 0, DESC_WRITE | DESC_NEXT, 0);
    assert_bad_chain(forward_hostile_chain(direct, |_| {}), "loops");
}

/// An indirect table is whole descriptors: 24 bytes is not a table of one.
#[test]
fn shadow_relay_refuses_a_partial_indirect_table() {
    const TABLE: u64 = 0x80000;
    let one_buffer = |mem: &GuestMem| {
        put_desc(mem, TABLE, (0x90000, 1500, DESC_WRITE, 0));
    };
    for len in [24, 8, 0] {
        let head = (TABLE, len, DESC_INDIRECT, 0);
        assert_bad_chain(
            forward_hostile_chain(head, one_buffer),
            "not a whole number of descriptors",
        );
    }
}

/// An indirect table longer than a u16 `next` can index (65536 descriptors) is refused, even
/// when the chain in it is short.
#[test]
fn shadow_relay_refuses_an_oversized_indirect_table() {
    const TABLE: u64 = 0x80000;
    let one_buffer = |mem: &GuestMem| {
        put_desc(mem, TABLE, (0x90000, 1500, DESC_WRITE, 0));
    };
    let head = (TABLE, 16 * 65536, DESC_INDIRECT, 0);
    assert_bad_chain(forward_hostile_chain(head, one_buffer), "longer than 65535");
}

/// Tables and rings at the very top of the address space: walking on past 2^64 is an error,
/// never an arithmetic overflow (a panic of the relay thread in debug builds).
#[test]
fn shadow_relay_survives_addresses_at_the_top_of_memory() {
    use crate::shadow::{RingAddr, ShadowQueue};
    // Two readable descriptors in the last 32 bytes; the chain goes on to the fourth.
    let top_table = u64::MAX - 32;
    let chain_to_3 = move |mem: &GuestMem| {
        put_desc(mem, top_table, (0x90000, 0, DESC_WRITE | DESC_NEXT, 1));
        put_desc(mem, top_table + 16, (0x90000, 0, DESC_WRITE | DESC_NEXT, 3));
    };
    let head = (top_table, 64, DESC_INDIRECT, 0);
    assert_bad_chain(
        forward_hostile_chain(head, chain_to_3),
        "end of the address space",
    );
    // A buffer running past the top: marked as far as memory goes.
    let head = (u64::MAX - 10, 1500, DESC_WRITE, 0);
    let r = forward_hostile_chain(head, |_| {});
    assert!(matches!(r, Ok(b) if b.entries == 1), "{r:?}");
    // The ring's own table there (a frontend's ring address checked against a larger size).
    let r = promptly(move || {
        let mem = mem_with_top_page();
        let (_, avail, used) = ring(0);
        chain_to_3(&mem);
        let desc = top_table;
        let mut sq = ShadowQueue::new(0, NUM, RingAddr { desc, avail, used }, 0, 0, false)
            .expect("shadow queue");
        device_complete(&sq, 0, 0, 1500);
        sq.forward_used(&mem)
    });
    assert!(
        matches!(
            r,
            Err(RelayError::Ring {
                source: virtq::RingError::Unmapped {
                    what: "descriptor table",
                    ..
                },
                ..
            })
        ),
        "{r:?}"
    );
    // Avail and used rings in the last bytes.
    let (desc, _, _) = ring(0);
    let rings = [(u64::MAX - 1, TOP_PAGE), (TOP_PAGE, u64::MAX - 3)];
    for (avail, used) in rings {
        let (a, u) = promptly(move || {
            let mem = mem_with_top_page();
            let mut sq = ShadowQueue::new(0, NUM, RingAddr { desc, avail, used }, 0, 0, true)
                .expect("shadow queue");
            let a = sq.forward_avail(&mem).map(|_| ());
            device_complete(&sq, 0, 0, 0);
            (a, sq.forward_used(&mem).map(|_| ()))
        });
        assert!(
            a.is_err() && u.is_err(),
            "avail {avail:#x} used {used:#x}: {a:?} {u:?}"
        );
    }
}

fn guest_mem_with_dirty_bitmap(guest: &Guest) -> GuestMem {
    vm_memory::GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM as usize,
        Some(vm_memory::FileOffset::new(
            guest.file.try_clone().unwrap(),
            0,
        )),
    )])
    .unwrap()
}

/// A new memory table under a running device (memory hot-plug): the device is stopped,
/// remapped from the new mapping and restarted where the guest was.
#[test]
fn memory_table_change_while_running_remaps_and_resumes() {
    let mut f = setup(0);
    f.guest.post(0);
    assert_eq!(f.dev.process(0, 4, 64), 1);
    let old_va = f.dev.state().iotlb[0].2;
    let region = VhostUserMemoryRegion::new(0, MEM, USER, 0);
    f.session
        .set_mem_table(&[region], vec![f.guest.file.try_clone().unwrap()], None)
        .unwrap();
    assert_eq!(f.session.mode(), Some(Mode::Direct));
    {
        let s = f.dev.state();
        assert_eq!(s.iotlb.len(), 1, "old mapping gone, new one in");
        assert_ne!(s.iotlb[0].2, old_va, "the new mapping of guest memory");
        assert_eq!(s.rings[0].base, 1, "restarted at the guest's used index");
    }
    f.guest.post(0);
    assert_eq!(f.dev.process(0, 4, 64), 1);
    assert_eq!(f.guest.used_heads(0), f.guest.posted[0]);
}

/// A memory table whose region is larger than its file (touching past the file's end would
/// raise SIGBUS) or starts unaligned is refused before anything is mapped: the running
/// device keeps its memory and goes on serving the guest.
#[test]
fn region_larger_than_file_is_refused() {
    let mut f = setup(0);
    f.guest.post(0);
    assert_eq!(f.dev.process(0, 4, 64), 1);
    let before = f.dev.state().iotlb.clone();
    let small = memfd(PAGE);
    let oversized = VhostUserMemoryRegion::new(0, MEM, USER, 0);
    let err = f
        .session
        .set_mem_table(&[oversized], vec![small], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("beyond the end of the file"), "{err}");
    let unaligned = VhostUserMemoryRegion::new(2, MEM - PAGE, USER + 2, 0);
    let err = f
        .session
        .set_mem_table(&[unaligned], vec![f.guest.file.try_clone().unwrap()], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("guest address not page-aligned"), "{err}");
    assert_eq!(
        f.dev.state().iotlb,
        before,
        "guest memory mapping untouched"
    );
    assert_eq!(f.session.mode(), Some(Mode::Direct));
    f.guest.post(0);
    assert_eq!(f.dev.process(0, 4, 64), 1);
    assert_eq!(f.guest.used_heads(0), f.guest.posted[0]);
}

/// A device that fails to start on the shadow rings: the error says so, the shadow rings'
/// IOVAs are unmapped again, and the port recovers in direct mode when logging stops.
#[test]
fn failed_switch_to_shadow_leaves_no_stale_mapping() {
    let mut f = setup(0);
    let log = memfd(PAGE);
    f.session
        .set_log_base(&VhostUserLog::new(PAGE, 0), log.try_clone().unwrap())
        .unwrap();
    f.dev.state().fail_driver_ok = true;
    let err = f
        .session
        .set_features(VERSION_1 | MAC | PROTOCOL_FEATURES | LOG_ALL)
        .unwrap_err()
        .to_string();
    assert!(err.contains("DRIVER_OK"), "{err}");
    assert_eq!(f.session.mode(), None);
    assert_eq!(
        f.dev.state().iotlb.len(),
        1,
        "only guest memory stays mapped"
    );
    f.dev.state().fail_driver_ok = false;
    f.session
        .set_features(VERSION_1 | MAC | PROTOCOL_FEATURES)
        .unwrap();
    assert_eq!(f.session.mode(), Some(Mode::Direct));
    f.guest.post(0);
    assert_eq!(f.dev.process(0, 4, 64), 1);
}

/// Guest memory ending just below 2^64, not on a 2 MiB boundary: the shadow rings' base
/// (the next 2 MiB boundary) does not exist. The switch is refused; it used to overflow.
#[test]
fn no_room_for_shadow_rings_above_the_top_of_memory_is_an_error() {
    let dev = MockDevice::new(device_features(), 0);
    let mut s = Session::new("t", dev.clone(), Arc::new(NoCounters))
        .map_err(|e| e.0)
        .unwrap();
    let guest = Guest::new();
    let gpa = 0u64.wrapping_sub(2 * MEM);
    attach_at(&mut s, &guest, VERSION_1 | MAC | PROTOCOL_FEATURES, gpa);
    assert_eq!(s.mode(), Some(Mode::Direct));
    let err = s
        .set_features(VERSION_1 | MAC | PROTOCOL_FEATURES | LOG_ALL)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no room for shadow rings"), "{err}");
    assert_eq!(s.mode(), None);
    assert_eq!(dev.state().iotlb.len(), 1, "only guest memory stays mapped");
}

/// The frontend goes away in the middle of a migration: the relay stops, the device is
/// reset, and neither guest memory nor the shadow rings stay mapped.
#[test]
fn disconnect_while_shadowed_leaves_a_clean_device() {
    let mut f = setup(0);
    let log = memfd(PAGE);
    f.session
        .set_log_base(&VhostUserLog::new(PAGE, 0), log.try_clone().unwrap())
        .unwrap();
    f.session
        .set_features(VERSION_1 | MAC | PROTOCOL_FEATURES | LOG_ALL)
        .unwrap();
    assert_eq!(f.session.mode(), Some(Mode::Shadow));
    assert_eq!(
        f.dev.state().iotlb.len(),
        3,
        "guest memory and two shadow rings"
    );
    f.guest.post(0);
    assert!(wait(
        || f.dev.process(0, 1, 64) == 1 || f.guest.used_idx(0) == 1
    ));
    let dev = f.session.into_device();
    let s = dev.state();
    assert_eq!(s.status, 0);
    assert!(s.iotlb.is_empty(), "nothing left mapped: {:?}", s.iotlb);
    assert_eq!(
        f.guest.used_idx(0),
        1,
        "the completed buffer reached the guest"
    );
}

/// Ring addresses are the frontend's numbers, translated through its memory table: in a region
/// at the top of the guest-physical space they translate exactly, and rings running past the
/// region's end, or user addresses whose sums would wrap, are refused (`to_gpa` checks each
/// sum) rather than overflowing.
#[test]
fn ring_addresses_at_the_top_of_guest_memory_translate_without_overflow() {
    let dev = MockDevice::new(device_features(), 0);
    let counters = Arc::new(TestCounters::default());
    let mut s = Session::new("t", dev.clone(), counters)
        .map_err(|e| e.0)
        .unwrap();
    s.set_features(VERSION_1 | MAC | PROTOCOL_FEATURES).unwrap();
    // The last whole page but one below 2^64 (a region's end must fit in a u64).
    const TOP: u64 = u64::MAX - 2 * PAGE + 1;
    let region = VhostUserMemoryRegion::new(TOP, PAGE, USER, 0);
    s.set_mem_table(&[region], vec![memfd(PAGE)], None).unwrap();
    s.set_vring_num(0, u32::from(NUM)).unwrap();
    let flags = VhostUserVringAddrFlags::empty;
    s.set_vring_addr(0, flags(), USER, USER + 0x800, USER + 0x400, 0)
        .unwrap();
    for used in [USER + PAGE - 8, u64::MAX - 8, u64::MAX] {
        let err = s
            .set_vring_addr(0, flags(), USER, used, USER + 0x400, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside the memory table"), "{used:#x}: {err}");
    }
}
