//! The relay path without QEMU: a Rust vhost-user frontend on one side, a veth in a network
//! namespace (standing for the VF) on the other, and raw sockets on its peer as the wire.
//! Every test runs with both VF socket kinds (`--vf-mode af-packet` and `af-xdp`).

mod support;

use std::time::{Duration, Instant};

use support::*;

const T: Duration = Duration::from_secs(10);

/// An Ethernet frame from `src` with an unusual ethertype, so nothing else in the namespace
/// (IPv6 neighbour discovery and the like) is mistaken for it.
fn frame(src: u8, tag: u16, len: usize) -> Vec<u8> {
    let mut f = vec![0x52, 0x54, 0, 0, 0, 0x99, 0x02, 0, 0, 0, 0, src, 0x88, 0xb5];
    f.extend_from_slice(&tag.to_be_bytes());
    while f.len() < len {
        f.push((f.len() as u8).wrapping_mul(3) ^ src);
    }
    f
}

fn is_test_frame(f: &[u8]) -> bool {
    f.len() >= 16 && f[12..14] == [0x88, 0xb5]
}

/// Starts the backend on `vf0` in `mode` and checks from its log that the mode was taken.
fn start(ns: &NetNs, dir: &std::path::Path, mode: &str) -> std::process::Child {
    let sock = dir.join("vr.sock");
    let log = dir.join("vr.log");
    let be = ns.spawn_backend(
        &[
            "--socket-path",
            sock.to_str().unwrap(),
            "--vf",
            "vf0",
            "--vf-mode",
            mode,
        ],
        &log,
    );
    assert!(wait_for(T, || sock.exists()), "backend listens");
    let want = if mode == "af-xdp" {
        "AF_XDP ("
    } else {
        "AF_PACKET ("
    };
    assert!(
        wait_for(T, || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(want)),
        "the log names the socket kind {want}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    be
}

#[test]
fn guest_tx_reaches_the_wire_and_wire_frames_reach_the_guest_af_packet() {
    frames_cross_both_ways("af-packet");
}

#[test]
fn guest_tx_reaches_the_wire_and_wire_frames_reach_the_guest_af_xdp() {
    frames_cross_both_ways("af-xdp");
}

fn frames_cross_both_ways(mode: &str) {
    let ns = NetNs::new(&format!("relay-{mode}"));
    let dir = temp_dir(&format!("relay-{mode}"));
    let sock = dir.join("vr.sock");
    let mut be = start(&ns, &dir, mode);
    let mut f = TestFrontend::connect(&sock, 1, VIRTIO_NET_F_MRG_RXBUF);

    // Guest -> wire: 10 frames, captured on the peer.
    let sent: Vec<Vec<u8>> = (0..10u16)
        .map(|i| frame(1, i, 60 + 100 * i as usize))
        .collect();
    let capture = {
        let sent = sent.clone();
        let name = ns.name.clone();
        std::thread::spawn(move || {
            let ns = NetNs { name };
            let got = ns.enter(move || {
                let raw = RawSocket::open("wire0", false);
                let mut got = Vec::new();
                let start = Instant::now();
                while got.len() < sent.len() && start.elapsed() < T {
                    if let Some(fr) = raw.recv() {
                        if is_test_frame(&fr) {
                            got.push(fr);
                        }
                    }
                }
                got
            });
            std::mem::forget(ns); // owned by the test body
            got
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    for (i, p) in sent.iter().enumerate() {
        f.post_tx(1, TestFrontend::buf_addr(1, i as u16), p);
    }
    f.kick(1);
    assert_eq!(f.wait_used(1, 10, T).len(), 10);
    let got = capture.join().unwrap();
    assert_eq!(
        got, sent,
        "the wire sees exactly what the guest sent, in order"
    );

    // Wire -> guest: frames injected on the peer land in guest RX buffers intact.
    let rx: Vec<u64> = (0..16).map(|i| TestFrontend::buf_addr(0, i)).collect();
    for &a in &rx {
        f.post(0, &[(a, 2048, true)]);
    }
    f.kick(0);
    let inject: Vec<Vec<u8>> = (0..8u16)
        .map(|i| frame(2, i, 64 + 150 * i as usize))
        .collect();
    let to_send = inject.clone();
    ns.enter(move || {
        let raw = RawSocket::open("wire0", false);
        for fr in &to_send {
            raw.send(fr);
        }
    });
    let mut received = Vec::new();
    let start = Instant::now();
    while received.len() < inject.len() && start.elapsed() < T {
        for (head, len) in f.wait_used(0, 1, Duration::from_millis(200)) {
            let bytes = f.read(rx[head as usize], len as usize);
            if is_test_frame(&bytes[12..]) {
                received.push(bytes[12..].to_vec());
            }
        }
    }
    assert_eq!(
        received, inject,
        "the guest sees exactly what the wire sent"
    );
    let _ = be.kill();
    let _ = be.wait();
}

#[test]
fn guest_tso_super_frame_crosses_as_one_gso_packet_af_packet() {
    guest_tso("af-packet");
}

/// AF_XDP carries no GSO metadata: the relay segments the super-frame itself.
#[test]
fn guest_tso_super_frame_is_segmented_by_the_relay_af_xdp() {
    guest_tso("af-xdp");
}

fn guest_tso(mode: &str) {
    let ns = NetNs::new(&format!("tso-{mode}"));
    let dir = temp_dir(&format!("tso-{mode}"));
    let sock = dir.join("vr.sock");
    let mut be = start(&ns, &dir, mode);
    let mut f = TestFrontend::connect(&sock, 1, VIRTIO_NET_F_MRG_RXBUF);
    // A 60 KB TCPv4 segment with GSO TCPV4 and a partial checksum, as a TSO guest sends it.
    let payload_len = 60_000usize;
    let mut pkt = vec![0x52, 0x54, 0, 0, 0, 0x99, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    let total = 20 + 20 + payload_len;
    pkt.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        6,
        0,
        0,
    ]);
    pkt.extend_from_slice(&[10, 7, 0, 2, 10, 7, 0, 1]);
    // IPv4 header checksum.
    let mut sum = 0u32;
    for c in pkt[14..34].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    pkt[24..26].copy_from_slice(&csum.to_be_bytes());
    pkt.extend_from_slice(&[
        0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    pkt.extend((0..payload_len).map(|i| (i % 251) as u8));
    // virtio-net header: NEEDS_CSUM, GSO_TCPV4, hdr_len 54, gso_size 1448, csum at 34+16.
    let mut hdr = vec![1u8, 1, 54, 0];
    hdr.extend_from_slice(&1448u16.to_le_bytes());
    hdr.extend_from_slice(&34u16.to_le_bytes());
    hdr.extend_from_slice(&16u16.to_le_bytes());
    hdr.extend_from_slice(&[0, 0]);
    // Segments expected in AF_XDP mode: one per MSS of payload.
    let want = if mode == "af-xdp" {
        payload_len.div_ceil(1448)
    } else {
        1
    };
    let capture = {
        let name = ns.name.clone();
        std::thread::spawn(move || {
            let ns = NetNs { name };
            let r = ns.enter(move || {
                let raw = RawSocket::open("wire0", true);
                let start = Instant::now();
                let mut got = Vec::new();
                while start.elapsed() < T && got.len() < want {
                    if let Some(fr) = raw.recv() {
                        if fr.len() > 10 + 14 && fr[10 + 12..10 + 14] == [0x08, 0x00] {
                            got.push(fr);
                        }
                    }
                }
                got
            });
            std::mem::forget(ns);
            r
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let addr = TestFrontend::buf_addr(1, 0);
    f.write(addr, &hdr);
    f.write(addr + 0x1000, &pkt);
    f.post(
        1,
        &[(addr, 12, false), (addr + 0x1000, pkt.len() as u32, false)],
    );
    f.kick(1);
    assert_eq!(f.wait_used(1, 1, T).len(), 1);
    let got = capture.join().unwrap();
    assert_eq!(got.len(), want, "frames on the wire");
    if mode == "af-xdp" {
        // Wire-sized TCP segments, each with no GSO left to do, carrying the payload in order.
        let mut joined = Vec::new();
        for seg in &got {
            assert_eq!(seg[1], 0, "no GSO on the wire");
            assert!(
                seg.len() - 10 <= 14 + 1500,
                "segment of {} bytes",
                seg.len() - 10
            );
            assert_eq!(&seg[10..10 + 12], &pkt[..12], "MAC addresses kept");
            joined.extend_from_slice(&seg[10 + 54..]);
        }
        assert_eq!(&joined[..], &pkt[54..], "payload intact and in order");
    } else {
        // The peer's packet socket sees one GSO frame: header says TCPV4 with the guest's MSS,
        // and the bytes are the guest's.
        let got = &got[0];
        assert_eq!(got[1] & 0x7f, 1, "gso_type TCPV4");
        assert_eq!(u16::from_le_bytes([got[4], got[5]]), 1448, "gso_size");
        assert_eq!(got.len() - 10, pkt.len());
        assert_eq!(&got[10 + 54..], &pkt[54..], "payload intact");
    }
    let _ = be.kill();
    let _ = be.wait();
}
