//! The relay path without QEMU: a Rust vhost-user frontend on one side, a veth in a network
//! namespace (standing for the VF) on the other, and raw sockets on its peer as the wire.

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

#[test]
fn guest_tx_reaches_the_wire_and_wire_frames_reach_the_guest() {
    let ns = NetNs::new("relay");
    let dir = temp_dir("relay");
    let sock = dir.join("vr.sock");
    let mut be = ns.spawn_backend(
        &["--socket-path", sock.to_str().unwrap(), "--vf", "vf0"],
        &dir.join("vr.log"),
    );
    assert!(wait_for(T, || sock.exists()), "backend listens");
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
fn guest_tso_super_frame_crosses_as_one_gso_packet() {
    let ns = NetNs::new("tso");
    let dir = temp_dir("tso");
    let sock = dir.join("vr.sock");
    let mut be = ns.spawn_backend(
        &["--socket-path", sock.to_str().unwrap(), "--vf", "vf0"],
        &dir.join("vr.log"),
    );
    assert!(wait_for(T, || sock.exists()));
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
    let capture = {
        let name = ns.name.clone();
        std::thread::spawn(move || {
            let ns = NetNs { name };
            let r = ns.enter(|| {
                let raw = RawSocket::open("wire0", true);
                let start = Instant::now();
                while start.elapsed() < T {
                    if let Some(fr) = raw.recv() {
                        if fr.len() > 10 + 14 && fr[10 + 12..10 + 14] == [0x08, 0x00] {
                            return Some(fr);
                        }
                    }
                }
                None
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
    let got = capture
        .join()
        .unwrap()
        .expect("the super-frame reached the wire");
    // The peer's packet socket sees one GSO frame: header says TCPV4 with the guest's MSS,
    // and the bytes are the guest's.
    assert_eq!(got[1] & 0x7f, 1, "gso_type TCPV4");
    assert_eq!(u16::from_le_bytes([got[4], got[5]]), 1448, "gso_size");
    assert_eq!(got.len() - 10, pkt.len());
    assert_eq!(&got[10 + 54..], &pkt[54..], "payload intact");
    let _ = be.kill();
    let _ = be.wait();
}
