//! End-to-end tests of the backend through the vhost-user protocol, driven by a Rust
//! frontend (no QEMU): negotiation, ring setup, the loopback data path, multiqueue, ring
//! stop, and frontends that misbehave.

mod support;

use std::time::{Duration, Instant};

use support::*;
use vhost::VhostBackend;

const T: Duration = Duration::from_secs(10);

/// Posts `n` 2 KiB RX buffers on queue `q`.
fn post_rx(f: &mut TestFrontend, q: usize, n: u16) -> Vec<u64> {
    let addrs: Vec<u64> = (0..n).map(|i| TestFrontend::buf_addr(q, i)).collect();
    for &a in &addrs {
        f.post(q, &[(a, 2048, true)]);
    }
    f.kick(q);
    addrs
}

fn packet(i: u8, len: usize) -> Vec<u8> {
    (0..len).map(|j| i.wrapping_add(j as u8)).collect()
}

#[test]
fn loopback_returns_every_packet_intact() {
    let dir = temp_dir("fe-loop");
    let be = Backend::start(&dir, &["--loopback"]);
    let mut f = TestFrontend::connect(
        &be.socket,
        1,
        VIRTIO_NET_F_MRG_RXBUF | VIRTIO_RING_F_EVENT_IDX,
    );
    assert!(f.features & VIRTIO_NET_F_MRG_RXBUF != 0);
    let rx_bufs = post_rx(&mut f, 0, 32);
    let mut sent = Vec::new();
    for i in 0..20u8 {
        let p = packet(i, 60 + i as usize * 50);
        f.post_tx(1, TestFrontend::buf_addr(1, i as u16), &p);
        sent.push(p);
    }
    f.kick(1);
    let tx_used = f.wait_used(1, 20, T);
    assert_eq!(tx_used.len(), 20, "all TX buffers returned");
    let rx_used = f.wait_used(0, 20, T);
    assert_eq!(rx_used.len(), 20, "all packets looped back");
    for (k, (head, len)) in rx_used.iter().enumerate() {
        let addr = rx_bufs[*head as usize];
        assert_eq!(*len as usize, 12 + sent[k].len(), "packet {k} length");
        let bytes = f.read(addr, *len as usize);
        assert_eq!(&bytes[12..], &sent[k][..], "packet {k} payload");
        assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), 1, "num_buffers");
    }
    // The guest was told: the call eventfd fired.
    assert!(f.queues[0].call.read().is_ok(), "rx call signalled");
    let (packets, drops, errors) = be.counters(0);
    assert_eq!((packets, drops, errors), (20, 0, 0));
}

#[test]
fn queue_pairs_stay_apart() {
    let dir = temp_dir("fe-mq");
    let be = Backend::start(&dir, &["--loopback", "--queues", "2"]);
    let mut f = TestFrontend::connect(&be.socket, 2, VIRTIO_NET_F_MRG_RXBUF);
    post_rx(&mut f, 0, 8);
    post_rx(&mut f, 2, 8);
    for i in 0..5u8 {
        f.post_tx(3, TestFrontend::buf_addr(3, i as u16), &packet(i, 100));
    }
    f.kick(3);
    assert_eq!(
        f.wait_used(2, 5, T).len(),
        5,
        "pair 1's packets come back on pair 1"
    );
    assert_eq!(
        f.wait_used(0, 1, Duration::from_millis(300)).len(),
        0,
        "and not on pair 0"
    );
    f.post_tx(1, TestFrontend::buf_addr(1, 0), &packet(9, 100));
    f.kick(1);
    assert_eq!(f.wait_used(0, 1, T).len(), 1);
    assert_eq!(be.counters(3).0, 5);
    assert_eq!(be.counters(1).0, 1);
}

#[test]
fn bad_descriptors_cost_one_packet_not_the_queue() {
    let dir = temp_dir("fe-bad");
    let be = Backend::start(&dir, &["--loopback"]);
    let mut f = TestFrontend::connect(&be.socket, 1, VIRTIO_NET_F_MRG_RXBUF);
    post_rx(&mut f, 0, 8);
    // Outside guest memory, then a writable descriptor on TX, then a good packet.
    f.post(1, &[(MEM_SIZE as u64 - 4, 200, false)]);
    f.post(1, &[(TestFrontend::buf_addr(1, 1), 200, true)]);
    let good = packet(7, 300);
    f.post_tx(1, TestFrontend::buf_addr(1, 2), &good);
    f.kick(1);
    let used = f.wait_used(1, 3, T);
    assert_eq!(used.len(), 3, "bad chains are returned too");
    let rx = f.wait_used(0, 1, T);
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].1 as usize, 12 + good.len());
    let (packets, _, errors) = be.counters(1);
    assert_eq!((packets, errors), (1, 2));
}

#[test]
fn get_vring_base_stops_the_ring_where_it_is() {
    let dir = temp_dir("fe-base");
    let be = Backend::start(&dir, &["--loopback"]);
    let mut f = TestFrontend::connect(&be.socket, 1, VIRTIO_NET_F_MRG_RXBUF);
    post_rx(&mut f, 0, 8);
    for i in 0..3u8 {
        f.post_tx(1, TestFrontend::buf_addr(1, i as u16), &packet(i, 64));
    }
    f.kick(1);
    assert_eq!(f.wait_used(1, 3, T).len(), 3);
    assert_eq!(f.fe.get_vring_base(1).expect("GET_VRING_BASE"), 3);
    assert_eq!(f.fe.get_vring_base(0).expect("GET_VRING_BASE"), 3);
    // Stopped: a new TX packet is not processed.
    f.post_tx(1, TestFrontend::buf_addr(1, 5), &packet(5, 64));
    f.kick(1);
    assert_eq!(f.wait_used(1, 1, Duration::from_millis(300)).len(), 0);
}

#[test]
fn malformed_messages_drop_the_connection_and_the_backend_serves_on() {
    let dir = temp_dir("fe-garbage");
    let mut be = Backend::start(&dir, &["--loopback"]);
    // A header claiming a huge payload, then random bytes, then a truncated header.
    let mut junk = vec![0xffu8; 12];
    junk[8..12].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
    send_raw(&be.socket, &junk).expect("send junk");
    send_raw(&be.socket, &[0x13u8; 100]).expect("send junk");
    send_raw(&be.socket, &[1, 0, 0]).expect("send junk");
    // A frontend that leaves half way through setup.
    {
        let f = vhost::vhost_user::Frontend::connect(&be.socket, 2).expect("connect");
        f.set_owner().expect("SET_OWNER");
        let _ = f.get_features();
    }
    assert!(be.is_running(), "backend survives bad frontends");
    let mut f = TestFrontend::connect(&be.socket, 1, VIRTIO_NET_F_MRG_RXBUF);
    post_rx(&mut f, 0, 4);
    f.post_tx(1, TestFrontend::buf_addr(1, 0), &packet(1, 80));
    f.kick(1);
    assert_eq!(
        f.wait_used(0, 1, T).len(),
        1,
        "a good frontend is served afterwards"
    );
}

#[test]
fn reconnecting_frontend_gets_a_fresh_device() {
    let dir = temp_dir("fe-reconnect");
    let be = Backend::start(&dir, &["--loopback"]);
    for round in 0..3u8 {
        let mut f = TestFrontend::connect(&be.socket, 1, VIRTIO_NET_F_MRG_RXBUF);
        post_rx(&mut f, 0, 4);
        f.post_tx(1, TestFrontend::buf_addr(1, 0), &packet(round, 80));
        f.kick(1);
        let rx = f.wait_used(0, 1, T);
        assert_eq!(rx.len(), 1, "round {round}");
        let got = f.read(TestFrontend::buf_addr(0, rx[0].0 as u16) + 12, 80);
        assert_eq!(got, packet(round, 80));
    }
    assert_eq!(be.counters(0).0, 3, "counters survive reconnects");
}

/// Threads and fds of a process, from /proc.
fn resources(pid: u32) -> (usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (threads, fds)
}

/// Threads and fds of `pid` once they have stopped changing for 300 ms.
fn settled_resources(pid: u32) -> (usize, usize) {
    let mut last = resources(pid);
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stable_since.elapsed() < Duration::from_millis(300) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = resources(pid);
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    last
}

#[test]
fn reconnects_leak_neither_threads_nor_fds() {
    let dir = temp_dir("fe-leak");
    let be = Backend::start(&dir, &["--loopback", "--queues", "2"]);
    let pid = be.child.id();
    let mut baseline = None;
    for round in 0..25u8 {
        let mut f = TestFrontend::connect(&be.socket, 2, VIRTIO_NET_F_MRG_RXBUF);
        post_rx(&mut f, 2, 2);
        f.post_tx(3, TestFrontend::buf_addr(3, 0), &packet(round, 64));
        f.kick(3);
        assert_eq!(f.wait_used(2, 1, T).len(), 1, "round {round}");
        drop(f);
        // A session winds down on its own threads after the disconnect: measure once it has
        // (a loaded machine may take far longer than usual), never after a fixed sleep.
        if round == 4 {
            baseline = Some(settled_resources(pid));
        }
        if let Some((threads, fds)) = baseline {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut now = resources(pid);
            while !(now.0 <= threads && now.1 <= fds) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                now = resources(pid);
            }
            assert!(
                now.0 <= threads && now.1 <= fds,
                "round {round}: {now:?} grew from {:?}",
                (threads, fds)
            );
        }
    }
}
