//! The VF's own queues: a full send queue holds the guest's packets back instead of losing
//! them, and what the kernel drops on receive shows in the counters. The VF is a tap or a
//! veth in a network namespace the test creates.

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use support::*;

const T: Duration = Duration::from_secs(20);

/// An Ethernet frame with an unusual ethertype and a sequence number.
fn frame(seq: u16, len: usize) -> Vec<u8> {
    let mut f = vec![0x52, 0x54, 0, 0, 0, 0x99, 0x02, 0, 0, 0, 0, 1, 0x88, 0xb5];
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < len {
        f.push((f.len() as u8).wrapping_mul(7) ^ seq as u8);
    }
    f
}

fn is_test_frame(f: &[u8]) -> bool {
    f.len() >= 16 && f[12..14] == [0x88, 0xb5]
}

/// Starts the backend on `vf` (AF_PACKET) with `extra` arguments; waits for its socket.
fn start(ns: &NetNs, dir: &std::path::Path, vf: &str, extra: &[&str]) -> KillOnDrop {
    let sock = dir.join("vr.sock");
    let mut args = vec!["--socket-path", sock.to_str().unwrap(), "--vf", vf];
    args.extend_from_slice(extra);
    let be = KillOnDrop(ns.spawn_backend(&args, &dir.join("vr.log")));
    assert!(wait_for(T, || sock.exists()), "backend listens");
    be
}

/// The guest sends faster than the VF drains (a tap whose 8-packet queue nobody reads
/// yet): the packets wait in the guest's ring, retried, and every one reaches the wire
/// exactly once and in order. Before back-pressure, all but the first few were dropped.
#[test]
fn full_vf_send_queue_holds_packets_back_without_loss() {
    const N: u16 = 200;
    let ns = NetNs::new("vfbp");
    let dir = temp_dir("vfbp");
    let mut tap = ns.tap("tap0", 8);
    // A wait bound far beyond the test's own pauses: only back-pressure is under test here.
    let be = start(&ns, &dir, "tap0", &["--vf-tx-wait-us", "10000000"]);
    let log = dir.join("vr.log");
    let mut f = TestFrontend::connect(&dir.join("vr.sock"), 1, VIRTIO_NET_F_MRG_RXBUF);

    let sent: Vec<Vec<u8>> = (0..N).map(|i| frame(i, 60 + 7 * i as usize)).collect();
    for (i, p) in sent.iter().enumerate() {
        f.post_tx(1, TestFrontend::buf_addr(1, i as u16), p);
    }
    f.kick(1);
    // Nothing reads the tap yet: its queue fills and the relay has to hold back.
    assert!(
        wait_for(T, || stats_field(&stats_line(&be.0, &log, 1), "retries")
            > 0),
        "the relay retries a full VF queue"
    );
    let used_early = f.wait_used(1, N as usize, Duration::from_millis(100)).len();
    assert!(
        used_early < N as usize,
        "chains still queued for the VF are not returned to the guest ({used_early})"
    );

    let got = read_test_frames(&mut tap, sent.len());
    assert_eq!(got.len(), sent.len(), "every packet reaches the wire");
    assert!(got == sent, "exactly once and in order");
    let used = used_early + f.wait_used(1, N as usize - used_early, T).len();
    assert_eq!(used, N as usize, "every chain goes back to the guest once");
    let line = stats_line(&be.0, &log, 1);
    assert_eq!(stats_field(&line, "drops"), 0, "{line}");
    assert_eq!(stats_field(&line, "packets"), u64::from(N), "{line}");
}

/// Reads the tap until `n` test frames came (or `T` passed).
fn read_test_frames(tap: &mut std::fs::File, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 2048];
    let start = Instant::now();
    while got.len() < n && start.elapsed() < T {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a bounded wait, so a missing frame fails the test
        // instead of hanging it.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        let len = tap.read(&mut buf).expect("read the tap");
        if is_test_frame(&buf[..len]) {
            got.push(buf[..len].to_vec());
        }
    }
    got
}

/// The frontend stops the TX ring (GET_VRING_BASE) while packets are held back for a full
/// VF: the base counts only what was sent, and the ring restarted from it sends the rest,
/// so every packet reaches the wire exactly once, in order.
#[test]
fn stop_while_held_back_hands_a_base_that_loses_and_repeats_nothing() {
    const N: u16 = 100;
    let ns = NetNs::new("vfstop");
    let dir = temp_dir("vfstop");
    let mut tap = ns.tap("tap0", 8);
    let be = start(&ns, &dir, "tap0", &["--vf-tx-wait-us", "10000000"]);
    let log = dir.join("vr.log");
    let mut f = TestFrontend::connect(&dir.join("vr.sock"), 1, VIRTIO_NET_F_MRG_RXBUF);
    let sent: Vec<Vec<u8>> = (0..N).map(|i| frame(i, 90)).collect();
    for (i, p) in sent.iter().enumerate() {
        f.post_tx(1, TestFrontend::buf_addr(1, i as u16), p);
    }
    f.kick(1);
    assert!(wait_for(T, || stats_field(
        &stats_line(&be.0, &log, 1),
        "retries"
    ) > 0));
    let base = f.get_vring_base(1);
    assert!(
        base > 0 && base < N,
        "base {base}: part sent, part held back"
    );
    assert_eq!(f.used_idx(1), base, "exactly the sent chains are used");
    let mut got = read_test_frames(&mut tap, usize::from(base));
    assert_eq!(got.len(), usize::from(base));
    f.restart_ring(1, base);
    f.kick(1);
    got.extend(read_test_frames(&mut tap, usize::from(N - base)));
    assert!(
        got == sent,
        "{} frames, exactly once and in order",
        got.len()
    );
    assert!(wait_for(T, || f.used_idx(1) == N));
}

/// A VF queue that takes nothing for the whole wait bound is stuck: its packets are
/// dropped and counted as such, and the guest gets its buffers back.
#[test]
fn stuck_vf_send_queue_drops_after_the_wait_bound() {
    const N: u16 = 40;
    let ns = NetNs::new("vfstuck");
    let dir = temp_dir("vfstuck");
    let _tap = ns.tap("tap0", 8);
    let be = start(&ns, &dir, "tap0", &["--vf-tx-wait-us", "2000"]);
    let log = dir.join("vr.log");
    let mut f = TestFrontend::connect(&dir.join("vr.sock"), 1, VIRTIO_NET_F_MRG_RXBUF);
    for i in 0..N {
        f.post_tx(1, TestFrontend::buf_addr(1, i), &frame(i, 100));
    }
    f.kick(1);
    assert_eq!(f.wait_used(1, N as usize, T).len(), N as usize);
    let line = stats_line(&be.0, &log, 1);
    let dropped = stats_field(&line, "drop_vf_full");
    assert!(dropped > 0, "{line}");
    assert_eq!(
        stats_field(&line, "packets") + dropped,
        u64::from(N),
        "every packet is either sent or counted as dropped: {line}"
    );
    assert!(stats_field(&line, "retries") > 0, "{line}");
}

/// `vf0`'s receive counter in the namespace: every frame the veth handed up, which the
/// relay's socket either got in its ring or saw the kernel drop.
fn vf0_rx_packets(ns: &NetNs) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "cat"])
        .arg("/sys/class/net/vf0/statistics/rx_packets")
        .output()
        .expect("read vf0's counter");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn kernel_ring_overflow_is_counted_af_packet() {
    kernel_drops_are_counted("af-packet");
}

#[test]
fn kernel_ring_overflow_is_counted_af_xdp() {
    kernel_drops_are_counted("af-xdp");
}

/// The wire floods the VF while the guest posts no RX buffers: the socket's ring fills and
/// the kernel drops the rest. Those drops show in the stats lines as `drop_kernel`, and with
/// what the guest then receives they add up to what reached the VF.
fn kernel_drops_are_counted(mode: &str) {
    const N: u64 = 3000;
    let ns = NetNs::new(&format!("kdrop-{mode}"));
    // Nothing but the test's frames on the link: no IPv6 autoconfiguration chatter.
    for dev in ["all", "default", "vf0", "wire0"] {
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "sysctl", "-qw"])
            .arg(format!("net.ipv6.conf.{dev}.disable_ipv6=1"))
            .status()
            .expect("sysctl");
        assert!(st.success());
    }
    let dir = temp_dir(&format!("kdrop-{mode}"));
    let be = start(&ns, &dir, "vf0", &["--vf-mode", mode]);
    let log = dir.join("vr.log");
    let mut f = TestFrontend::connect(&dir.join("vr.sock"), 1, VIRTIO_NET_F_MRG_RXBUF);
    let want = if mode == "af-xdp" {
        "AF_XDP ("
    } else {
        "AF_PACKET ("
    };
    assert!(wait_for(T, || std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(want)));

    let before = vf0_rx_packets(&ns);
    ns.enter(|| {
        let raw = RawSocket::open("wire0", false);
        for i in 0..N {
            raw.send(&frame(i as u16, 200));
        }
    });
    let arrived = vf0_rx_packets(&ns) - before;
    assert!(arrived > 0);

    // Now the guest takes what the ring held.
    let (mut delivered, mut slot) = (0u64, 0u16);
    let mut line = String::new();
    let start = Instant::now();
    while start.elapsed() < T {
        while f.queues[0].room() > 0 {
            f.post(0, &[(TestFrontend::buf_addr(0, slot), 2048, true)]);
            slot = (slot + 1) % QUEUE_SIZE;
        }
        f.kick(0);
        for (_, len) in f.wait_used(0, 1, Duration::from_millis(50)) {
            assert!(len > 12);
            delivered += 1;
        }
        line = stats_line(&be.0, &log, 0);
        if delivered + stats_field(&line, "drop_kernel") >= arrived {
            break;
        }
    }
    let kernel = stats_field(&line, "drop_kernel");
    assert!(kernel > 0, "the ring overflowed: {line}");
    assert_eq!(
        delivered + kernel,
        arrived,
        "every frame that reached the VF was delivered or counted as a kernel drop: {line}"
    );
    assert_eq!(stats_field(&line, "drops"), kernel, "{line}");
}

#[test]
fn recreated_vf_is_reopened_af_packet() {
    recreated_vf_is_reopened("af-packet");
}

#[test]
fn recreated_vf_is_reopened_af_xdp() {
    recreated_vf_is_reopened("af-xdp");
}

/// Sends guest frame `seq` and waits up to `within` for it on the wire; the chain always
/// comes back to the guest.
fn guest_frame_reaches_wire(
    f: &mut TestFrontend,
    wire: &std::sync::mpsc::Receiver<Vec<u8>>,
    seq: u16,
    within: Duration,
) -> bool {
    let p = frame(seq, 100);
    f.post_tx(1, TestFrontend::buf_addr(1, seq % QUEUE_SIZE), &p);
    f.kick(1);
    assert_eq!(f.wait_used(1, 1, T).len(), 1, "the chain comes back");
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(got) = wire.recv_timeout(Duration::from_millis(20)) {
            if got == p {
                return true;
            }
        }
    }
    false
}

/// Captures test frames on `wire0` into a channel, re-opening its socket whenever the
/// interface is gone (it goes with its veth peer), until `stop` is set.
fn capture(
    ns: &NetNs,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let nsf = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        assert_eq!(
            unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let open = || {
            let c = std::ffi::CString::new("wire0").unwrap();
            // SAFETY: a valid C string.
            (unsafe { libc::if_nametoindex(c.as_ptr()) } > 0)
                .then(|| RawSocket::open("wire0", false))
        };
        let mut sock = None;
        let mut index = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let c = std::ffi::CString::new("wire0").unwrap();
            // SAFETY: a valid C string.
            let now = unsafe { libc::if_nametoindex(c.as_ptr()) };
            if now != index {
                sock = open();
                index = now;
            }
            match sock.as_ref().map(|s| s.recv()) {
                Some(Some(fr)) if is_test_frame(&fr) => {
                    let _ = tx.send(fr);
                }
                Some(_) => {}
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    rx
}

/// The VF is deleted and created again under the same name (a new index) while the guest
/// sends: the guest's packets are dropped as `vf_down` meanwhile, and once the VF is back,
/// the port re-opens its sockets and traffic flows again, on the same connection.
fn recreated_vf_is_reopened(mode: &str) {
    let ns = NetNs::new(&format!("recr-{mode}"));
    let dir = temp_dir(&format!("recr-{mode}"));
    let be = start(&ns, &dir, "vf0", &["--vf-mode", mode]);
    let log = dir.join("vr.log");
    let mut f = TestFrontend::connect(&dir.join("vr.sock"), 1, VIRTIO_NET_F_MRG_RXBUF);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let wire = capture(&ns, stop.clone());
    let mut seq = 0u16;
    let mut next = || {
        seq += 1;
        seq
    };
    assert!(
        (0..50).any(|_| guest_frame_reaches_wire(
            &mut f,
            &wire,
            next(),
            Duration::from_millis(200)
        )),
        "traffic flows before"
    );

    let ip = |args: &[&str]| {
        let st = std::process::Command::new("ip")
            .args(["-n", &ns.name])
            .args(args)
            .status()
            .expect("ip");
        assert!(st.success(), "ip {args:?}");
    };
    ip(&["link", "del", "vf0"]);
    // The relay learns of it from rtnetlink (AF_XDP) or the next send (AF_PACKET).
    assert!(
        wait_for(T, || {
            // Sent and returned; whether it may still leave is what the counter says.
            let _ = guest_frame_reaches_wire(&mut f, &wire, next(), Duration::ZERO);
            stats_field(&stats_line(&be.0, &log, 1), "drop_vf_down") > 0
        }),
        "what the guest sends while the VF is gone is dropped as vf_down"
    );

    ip(&[
        "link", "add", "vf0", "type", "veth", "peer", "name", "wire0",
    ]);
    ip(&["link", "set", "vf0", "up"]);
    ip(&["link", "set", "wire0", "up"]);
    assert!(
        wait_for(T, || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("re-created")),
        "the re-creation is logged"
    );
    let back = (0..100)
        .any(|_| guest_frame_reaches_wire(&mut f, &wire, next(), Duration::from_millis(200)));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        back,
        "traffic flows again: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
