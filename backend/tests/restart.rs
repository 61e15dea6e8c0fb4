//! Backend restart under a running guest, at the protocol level: vhost-relay in client mode
//! is SIGKILLed, the "guest" keeps posting TX packets meanwhile, and a new vhost-relay
//! connects. The frontend then does what QEMU does when it could not ask the dead backend for
//! the ring state: it restores each ring's base from the used index in guest memory, so the
//! new backend finds avail ahead of used, with TX buffers pending (some possibly held by the
//! dead process when it died). All of them must go out and come back, exactly once, without
//! the guest having to kick again.

mod support;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use vhost::vhost_user::Frontend;

const T: Duration = Duration::from_secs(10);

/// A test frame with a sequence tag and an ethertype nothing else in the namespace uses.
fn frame(src: u8, tag: u16, len: usize) -> Vec<u8> {
    let mut f = vec![0x52, 0x54, 0, 0, 0, 0x99, 0x02, 0, 0, 0, 0, src, 0x88, 0xb5];
    f.extend_from_slice(&tag.to_be_bytes());
    while f.len() < len {
        f.push((f.len() as u8).wrapping_mul(5) ^ src);
    }
    f
}

fn tag_of(f: &[u8]) -> Option<u16> {
    (f.len() >= 16 && f[12..14] == [0x88, 0xb5]).then(|| u16::from_be_bytes([f[14], f[15]]))
}

/// Collects test frames seen on `wire0` until `n` arrived, the timeout passed, or the wire
/// was quiet for a second after the first one. Returns once its socket is bound (frames sent
/// before that would be missed, however long the test waited on a loaded machine).
fn capture(ns_name: String, n: usize) -> std::thread::JoinHandle<Vec<u16>> {
    let (bound, is_bound) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let ns = NetNs { name: ns_name };
        let tags = ns.enter(move || {
            let raw = RawSocket::open("wire0", false);
            let _ = bound.send(());
            let mut tags = Vec::new();
            let start = Instant::now();
            let mut last = Instant::now();
            while tags.len() < n && start.elapsed() < T {
                if let Some(t) = raw.recv().as_deref().and_then(tag_of) {
                    tags.push(t);
                    last = Instant::now();
                } else if !tags.is_empty() && last.elapsed() > Duration::from_secs(1) {
                    break;
                }
            }
            tags
        });
        std::mem::forget(ns); // the test body owns (and deletes) the namespace
        tags
    });
    is_bound.recv().expect("the capture socket opens");
    h
}

/// A frontend listening where `vhost-relay --client --vf vf0` connects from its namespace, as
/// QEMU's `-chardev socket,server=on` does: the backend can die and a new one come back.
struct ClientRig {
    ns: NetNs,
    dir: PathBuf,
    listener: UnixListener,
    sock: String,
}

impl ClientRig {
    fn new(tag: &str) -> ClientRig {
        let dir = temp_dir(tag);
        let path = dir.join("qemu.sock");
        let listener = UnixListener::bind(&path).expect("frontend listens");
        ClientRig {
            ns: NetNs::new(tag),
            sock: path.to_str().expect("utf-8").to_string(),
            dir,
            listener,
        }
    }

    /// Starts a vhost-relay logging to `log` in the rig's folder and takes its connection.
    fn start(&self, log: &str) -> (KillOnDrop, UnixStream) {
        let args = ["--client", "--socket-path", &self.sock, "--vf", "vf0"];
        let be = KillOnDrop(self.ns.spawn_backend(&args, &self.dir.join(log)));
        let (stream, _) = self.listener.accept().expect("the backend connects");
        (be, stream)
    }
}

#[test]
fn restarted_backend_resumes_rings_with_avail_ahead_of_used() {
    let rig = ClientRig::new("restart");
    let ns = &rig.ns;
    let (mut be, stream) = rig.start("vr1.log");
    let mut f = TestFrontend::over_stream(stream, 1, VIRTIO_NET_F_MRG_RXBUF);

    // Before the crash: RX buffers posted, 8 TX packets sent and returned.
    let rx: Vec<u64> = (0..32).map(|i| TestFrontend::buf_addr(0, i)).collect();
    for &a in &rx {
        f.post(0, &[(a, 2048, true)]);
    }
    f.kick(0);
    let cap = capture(ns.name.clone(), 8);
    for i in 0..8u16 {
        f.post_tx(1, TestFrontend::buf_addr(1, i), &frame(1, i, 100));
    }
    f.kick(1);
    assert_eq!(f.wait_used(1, 8, T).len(), 8);
    assert_eq!(cap.join().expect("capture"), (0..8).collect::<Vec<_>>());

    // The backend dies. The guest keeps transmitting: 40 more packets pile up in the ring,
    // and it kicks (a kick nobody reads now; QEMU's eventfd keeps it).
    let _ = be.0.kill();
    let _ = be.0.wait();
    for i in 8..48u16 {
        f.post_tx(
            1,
            TestFrontend::buf_addr(1, i),
            &frame(1, i, 60 + i as usize),
        );
    }
    f.kick(1);
    let (tx_used, tx_avail) = (f.used_idx(1), f.avail_idx(1));
    assert_eq!((tx_used, tx_avail), (8, 48), "avail ahead of used");
    // What a kick-less guest looks like (event-idx guests suppress kicks while the device
    // is busy): the new backend must start on its own.
    let _ = f.queues[1].kick.read();

    // A new backend; QEMU restores each ring's base from the used index.
    let cap = capture(ns.name.clone(), 40);
    let (_be2, stream) = rig.start("vr2.log");
    let bases = [f.used_idx(0), f.used_idx(1)];
    f.reattach(Frontend::from_stream(stream, 2), &bases);

    let used = f.wait_used(1, 40, T);
    assert_eq!(used.len(), 40, "every pending TX buffer comes back");
    let heads: Vec<u32> = used.iter().map(|(h, _)| *h).collect();
    assert_eq!(
        heads,
        (8..48).collect::<Vec<u32>>(),
        "in ring order, each once"
    );
    let tags = cap.join().expect("capture");
    assert_eq!(
        tags,
        (8..48).collect::<Vec<u16>>(),
        "the wire sees every pending packet once, in order"
    );

    // The other direction works again too: frames from the wire land in the buffers the
    // guest posted before the crash.
    let inject: Vec<Vec<u8>> = (0..5u16).map(|i| frame(2, 100 + i, 80)).collect();
    let to_send = inject.clone();
    ns.enter(move || {
        let raw = RawSocket::open("wire0", false);
        for fr in &to_send {
            raw.send(fr);
        }
    });
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < inject.len() && start.elapsed() < T {
        for (head, len) in f.wait_used(0, 1, Duration::from_millis(200)) {
            let bytes = f.read(rx[head as usize], len as usize);
            if tag_of(&bytes[12..]).is_some() {
                got.push(bytes[12..].to_vec());
            }
        }
    }
    assert_eq!(got, inject, "wire to guest after the restart");

    // And a clean stop now returns a base that covers exactly what was used.
    assert_eq!(f.get_vring_base(1), 48);
    assert_eq!(f.used_idx(1), 48);
}

/// A backend killed between publishing used entries and signalling the guest (the window is
/// a few instructions, but a SIGKILL under a stream finds it): the guest, with event idx,
/// asked to hear when the used index passes its `used_event`, and it has passed. QEMU
/// restores the base from the used index, so the new backend has nothing to use and no batch
/// of its own would cross that `used_event`. The guest's TX queue would wait for that
/// interrupt for good; the new backend must send one on its own, with no kick and no frame
/// from the wire to wake it.
#[test]
fn restarted_backend_signals_a_guest_left_waiting_for_an_interrupt() {
    let rig = ClientRig::new("rsig");
    let (mut be, stream) = rig.start("vr1.log");
    let want = VIRTIO_NET_F_MRG_RXBUF | VIRTIO_RING_F_EVENT_IDX;
    let mut f = TestFrontend::over_stream(stream, 1, want);
    assert_ne!(
        f.features & VIRTIO_RING_F_EVENT_IDX,
        0,
        "event idx negotiated"
    );

    // The guest wants an interrupt once the 4th packet is used (used_event 3); 8 go out.
    let used_event = f.queues[1].layout.avail + 4 + 2 * u64::from(f.queues[1].size);
    f.write(used_event, &3u16.to_le_bytes());
    for i in 0..8u16 {
        f.post_tx(1, TestFrontend::buf_addr(1, i), &frame(1, i, 100));
    }
    f.kick(1);
    assert_eq!(f.wait_used(1, 8, T).len(), 8);
    // The backend dies before its interrupt reached the guest: as if it never came.
    let _ = be.0.kill();
    let _ = be.0.wait();
    let _ = f.queues[1].call.read();

    let (_be2, stream) = rig.start("vr2.log");
    let bases = [f.used_idx(0), f.used_idx(1)];
    assert_eq!(bases[1], 8, "the dead backend used all 8");
    f.reattach(Frontend::from_stream(stream, 2), &bases);
    let signalled = wait_for(T, || f.queues[1].call.read().is_ok());
    assert!(
        signalled,
        "the restarted backend signals the TX queue (the guest's used_event 3 is behind base 8)"
    );
}

/// GET_VRING_BASE on a TX ring while the guest keeps transmitting (what QEMU does when it
/// stops the device for migration): the base it returns must cover exactly the packets that
/// went out, all returned in the used ring, and nothing may be taken after it. Started again
/// from that base, the ring sends the rest. The wire sees every packet exactly once, in order.
#[test]
fn tx_stopped_mid_stream_loses_and_repeats_nothing() {
    let ns = NetNs::new("txstop");
    let dir = temp_dir("txstop");
    let sock = dir.join("vr.sock");
    let _be = KillOnDrop(ns.spawn_backend(
        &[
            "--socket-path",
            sock.to_str().expect("utf-8"),
            "--vf",
            "vf0",
        ],
        &dir.join("vr.log"),
    ));
    let stream = connect_when_listening(&sock);
    let mut raw = stream.try_clone().expect("clone");
    let mut f = TestFrontend::over_stream(stream, 1, VIRTIO_NET_F_MRG_RXBUF);
    const N: u16 = 20_000;
    let cap = capture(ns.name.clone(), N as usize);

    // The stop comes from another thread while this one keeps posting and kicking.
    let stopper = std::thread::spawn(move || {
        use std::io::{Read, Write};
        std::thread::sleep(Duration::from_millis(10));
        let payload = [1u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
        raw.write_all(&raw_message(11, 0, &payload))
            .expect("GET_VRING_BASE");
        let mut reply = [0u8; 20];
        raw.read_exact(&mut reply).expect("reply");
        u32::from_le_bytes(reply[16..20].try_into().expect("4 bytes")) as u16
    });
    let mut posted = 0u16;
    // Used entries read back (through the driver, so their ring slots are free again).
    let mut done = 0usize;
    // Goes on for 50 packets past the stop: a stopped ring must not take them.
    let mut after_stop = 0;
    while posted < N && after_stop < 50 {
        if stopper.is_finished() {
            after_stop += 1;
        }
        done += f.wait_used(1, 0, Duration::ZERO).len();
        // Never more than 200 outstanding on the 256-entry ring.
        if usize::from(posted) - done < 200 {
            f.post_tx(
                1,
                TestFrontend::buf_addr(1, posted % 256),
                &frame(3, posted, 200),
            );
            posted += 1;
            if posted.is_multiple_of(16) {
                f.kick(1);
            }
        } else if stopper.is_finished() {
            break;
        } else {
            f.kick(1);
            std::thread::yield_now();
        }
    }
    let base = stopper.join().expect("stopper");
    eprintln!("stopped at {base}, {posted} posted");
    assert!(
        base < posted,
        "packets pending at the stop ({base} of {posted})"
    );
    f.kick(1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        f.used_idx(1),
        base,
        "every chain taken before the stop is in the used ring, none after"
    );
    f.restart_ring(1, base);
    f.kick(1);
    let rest = usize::from(posted) - done;
    assert_eq!(f.wait_used(1, rest, T).len(), rest);
    let tags = cap.join().expect("capture");
    assert_eq!(tags.len(), posted as usize, "no packet lost or repeated");
    assert_eq!(
        tags,
        (0..posted).collect::<Vec<u16>>(),
        "each packet once, in order"
    );
}

/// The RX counterpart: frames keep arriving from the wire while the frontend stops the RX
/// ring. The returned base covers exactly the buffers filled (all in the used ring), no frame
/// lands in a guest buffer twice, and after a restart from that base delivery goes on.
#[test]
fn rx_stopped_mid_stream_delivers_nothing_twice() {
    let ns = NetNs::new("rxstop");
    let dir = temp_dir("rxstop");
    let sock = dir.join("vr.sock");
    let _be = KillOnDrop(ns.spawn_backend(
        &[
            "--socket-path",
            sock.to_str().expect("utf-8"),
            "--vf",
            "vf0",
        ],
        &dir.join("vr.log"),
    ));
    let stream = connect_when_listening(&sock);
    let mut raw = stream.try_clone().expect("clone");
    let mut f = TestFrontend::over_stream(stream, 1, VIRTIO_NET_F_MRG_RXBUF);
    let slots: Vec<u64> = (0..256).map(|i| TestFrontend::buf_addr(0, i)).collect();
    // 200 buffers: more than the frames sent before the stop can fill.
    for &a in &slots[..200] {
        f.post(0, &[(a, 2048, true)]);
    }
    f.kick(0);
    let name = ns.name.clone();
    let answered = Arc::new(AtomicBool::new(false));
    let stop_answered = answered.clone();
    let sender = std::thread::spawn(move || {
        let ns = NetNs { name };
        ns.enter(move || {
            let raw = RawSocket::open("wire0", false);
            for i in 0..3000u16 {
                // Fewer frames than buffers until the stop is answered: a loaded machine may
                // be slow to send it, and it must still find buffers left.
                if i == 150 {
                    wait_for(T, || stop_answered.load(Ordering::Acquire));
                }
                raw.send(&frame(4, i, 120));
                if i % 5 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        std::mem::forget(ns);
    });
    // Stop the RX ring while frames are flowing in: once the first ones have landed.
    assert!(wait_for(T, || f.used_idx(0) >= 10), "frames arrive");
    let stopper = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let payload = [0u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
        raw.write_all(&raw_message(11, 0, &payload))
            .expect("GET_VRING_BASE");
        let mut reply = [0u8; 20];
        raw.read_exact(&mut reply).expect("reply");
        u32::from_le_bytes(reply[16..20].try_into().expect("4 bytes")) as u16
    });
    let base = stopper.join().expect("stopper");
    answered.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        f.used_idx(0),
        base,
        "the base covers exactly the filled buffers"
    );
    // What each used buffer holds after its virtio-net header.
    let frames_of = |f: &mut TestFrontend, n: usize| -> Vec<Vec<u8>> {
        f.wait_used(0, n, Duration::from_millis(300))
            .into_iter()
            .map(|(head, len)| match slots.get(head as usize) {
                Some(&a) => f
                    .read(a, len as usize)
                    .get(12..)
                    .unwrap_or_default()
                    .to_vec(),
                None => Vec::new(),
            })
            .collect()
    };
    let before = frames_of(&mut f, base as usize);
    eprintln!("stopped after {base} frames delivered");
    assert!(
        (10..200).contains(&base),
        "stopped mid-stream, buffers left ({base} of 200 used)"
    );
    assert_eq!(
        before.len(),
        base as usize,
        "the base covers the used entries"
    );
    let others: Vec<_> = before.iter().filter(|b| tag_of(b).is_none()).collect();
    assert!(
        others.is_empty(),
        "every used buffer holds a test frame; these do not: {others:02x?}"
    );
    let before: Vec<u16> = before.iter().filter_map(|b| tag_of(b)).collect();
    f.restart_ring(0, base);
    f.kick(0);
    sender.join().expect("sender");
    let after: Vec<u16> = frames_of(&mut f, 200 - base as usize)
        .iter()
        .filter_map(|b| tag_of(b))
        .collect();
    let all: Vec<u16> = before.iter().chain(&after).copied().collect();
    assert!(!after.is_empty(), "delivery goes on after the restart");
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "no frame twice, in order: {all:?}"
    );
}
