//! Tests of the `AF_XDP` sockets against real veth pairs in private network namespaces (root).

#![allow(clippy::single_range_in_vec_init)]

use std::time::{Duration, Instant};

use super::super::testnet::{
    ip, set_tx_checksum, veth_pair, wait_for, wait_readable, with_netns, RawSock,
};
use super::super::{open_af_xdp, open_queues, RingConfig, VfError, VfMode, VfSocket};
use crate::net_hdr::{VnetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4};

const WAIT: Duration = Duration::from_secs(5);
const MAC_X: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_Y: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const ETYPE_TEST: u16 = 0x88b5;

fn eth(etype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&MAC_X);
    f.extend_from_slice(&MAC_Y);
    f.extend_from_slice(&etype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn test_frame(tag: u8, len: usize) -> Vec<u8> {
    let body: Vec<u8> = (0..len - 14)
        .map(|i| (i as u8).wrapping_mul(7) ^ tag)
        .collect();
    eth(ETYPE_TEST, &body)
}

fn is_test(d: &[u8]) -> bool {
    d.len() >= 14 && d[12..14] == ETYPE_TEST.to_be_bytes()
}

fn iov(b: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_ptr() as *mut libc::c_void,
        iov_len: b.len(),
    }
}

/// A header as the socket reads it (in-memory layout, little-endian hosts like `VnetHdr`).
fn hdr_bytes(h: &VnetHdr) -> Vec<u8> {
    vm_memory::ByteValued::as_slice(h).to_vec()
}

/// Drains `sock` until `want` test frames arrived or `WAIT` passed.
fn collect(sock: &mut VfSocket, want: usize) -> Vec<(VnetHdr, Vec<u8>)> {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    loop {
        sock.rx_batch(64, |h, d| {
            if is_test(d) {
                got.push((*h, d.to_vec()));
            }
            true
        });
        if got.len() >= want || !wait_readable(sock.as_raw_fd(), deadline) {
            return got;
        }
    }
}

fn xdp_attached(ifname: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-d", "link", "show", ifname])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

/// The interface's promiscuity count is non-zero (socket memberships do not show as the
/// PROMISC flag, only in this count).
fn promiscuous(ifname: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-d", "link", "show", ifname])
        .output()
        .expect("ip");
    !String::from_utf8_lossy(&out.stdout).contains("promiscuity 0 ")
}

fn sum16(bytes: &[u8], mut sum: u32) -> u32 {
    for c in bytes.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An Ethernet/IPv4/TCP packet of `payload` with the TCP checksum field holding the
/// pseudo-header sum, as a guest using checksum offload sends it.
fn tcp4(payload: &[u8]) -> Vec<u8> {
    let (src, dst) = ([10, 9, 0, 1], [10, 9, 0, 2]);
    let tcp_len = 20 + payload.len();
    let mut ip4 = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip4[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip4.extend_from_slice(&src);
    ip4.extend_from_slice(&dst);
    let c = !fold(sum16(&ip4, 0));
    ip4[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    tcp[16..18].copy_from_slice(&fold(sum16(&pseudo, 0)).to_be_bytes());
    let mut p = ip4;
    p.extend_from_slice(&tcp);
    p.extend_from_slice(payload);
    eth(0x0800, &p)
}

/// True if the TCP checksum of an Ethernet/IPv4/TCP frame (no options) verifies.
fn tcp4_checksum_ok(f: &[u8]) -> bool {
    let ip4 = &f[14..34];
    let total = usize::from(u16::from_be_bytes([ip4[2], ip4[3]]));
    let tcp = &f[34..14 + total];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip4[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    fold(sum16(tcp, sum16(&pseudo, 0))) == 0xffff && fold(sum16(ip4, 0)) == 0xffff
}

#[test]
fn frames_cross_both_ways_and_the_program_goes_with_the_sockets() {
    with_netns(|| {
        veth_pair("vfa", "vfb");
        let mut socks = open_af_xdp("vfa", 1).expect("AF_XDP on a veth");
        assert!(xdp_attached("vfa"), "XDP program attached while open");
        assert!(promiscuous("vfa"), "the guest's MAC need not be the VF's");
        let sock = &mut socks[0];
        assert!(sock.is_af_xdp(), "{}", sock.describe());
        eprintln!("vfa: {}", sock.describe());
        let peer = RawSock::open("vfb");

        // Wire -> relay: sizes from minimum to MTU, in order, with an all-zero header.
        let sent: Vec<Vec<u8>> = (0..20u8)
            .map(|i| test_frame(i, 60 + 72 * i as usize))
            .collect();
        for f in &sent {
            peer.send(f);
        }
        let got = collect(sock, sent.len());
        assert_eq!(
            got.iter().map(|g| &g.1).collect::<Vec<_>>(),
            sent.iter().collect::<Vec<_>>()
        );
        assert!(got.iter().all(|g| g.0 == VnetHdr::default()));
        let st = sock.stats();
        assert_eq!(st.rx_packets, 20);

        // Relay -> wire: multi-iovec packets arrive intact, in order.
        let frames: Vec<Vec<u8>> = (0..10u8)
            .map(|i| test_frame(0x80 | i, 100 + 140 * i as usize))
            .collect();
        let zero = hdr_bytes(&VnetHdr::default());
        let mut iovs = Vec::new();
        let mut pkts = Vec::new();
        for f in &frames {
            let s = iovs.len();
            iovs.push(iov(&zero));
            iovs.push(iov(&f[..14]));
            iovs.push(iov(&f[14..]));
            pkts.push(s..iovs.len());
        }
        assert_eq!(sock.tx_batch(&iovs, &pkts).expect("tx"), 10);
        let got = peer.recv_matching(10, WAIT, is_test);
        assert_eq!(got, frames);
        assert_eq!(sock.stats().tx_packets, 10);

        // The link goes when its last fd does: a child that another test thread is forking
        // holds a copy of every fd until its exec closes them, so the program may stay
        // attached a moment after our close.
        drop(socks);
        assert!(
            wait_for(WAIT, || !xdp_attached("vfa")),
            "XDP program detached with the last socket"
        );
    });
}

#[test]
fn refused_frame_is_offered_again() {
    with_netns(|| {
        veth_pair("vfa", "vfb");
        let mut socks = open_af_xdp("vfa", 1).expect("AF_XDP");
        let sock = &mut socks[0];
        let peer = RawSock::open("vfb");
        peer.send(&test_frame(1, 100));
        peer.send(&test_frame(2, 100));
        let deadline = Instant::now() + WAIT;
        use std::os::fd::AsRawFd;
        assert!(wait_readable(sock.as_raw_fd(), deadline));
        let mut seen = Vec::new();
        assert_eq!(
            sock.rx_batch(8, |_, d| {
                seen.push(d.to_vec());
                false
            }),
            0
        );
        let got = collect(sock, 2);
        assert_eq!(got.len(), 2);
        assert_eq!(seen[0], got[0].1, "the refused frame comes first next time");
    });
}

#[test]
fn large_frames_cross_up_to_the_mtu() {
    with_netns(|| {
        veth_pair("vfa", "vfb");
        for d in ["vfa", "vfb"] {
            ip(&["link", "set", d, "mtu", "3500"]);
        }
        let mut socks = open_af_xdp("vfa", 1).expect("AF_XDP with MTU 3500");
        let sock = &mut socks[0];
        let peer = RawSock::open("vfb");
        let big = test_frame(9, 3514);
        peer.send(&big);
        let got = collect(sock, 1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, big);

        let zero = hdr_bytes(&VnetHdr::default());
        let out = test_frame(10, 3514);
        assert_eq!(
            sock.tx_batch(&[iov(&zero), iov(&out)], &[0..2])
                .expect("tx"),
            1
        );
        assert_eq!(peer.recv_matching(1, WAIT, is_test), vec![out]);
    });
}

#[test]
fn guest_tso_is_segmented_with_checksums_before_transmit() {
    with_netns(|| {
        veth_pair("vfa", "vfb");
        let mut socks = open_af_xdp("vfa", 1).expect("AF_XDP");
        let sock = &mut socks[0];
        let peer = RawSock::open("vfb");
        let payload: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
        let pkt = tcp4(&payload);
        let h = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let hb = hdr_bytes(&h);
        let iovs = [iov(&hb), iov(&pkt[..100]), iov(&pkt[100..])];
        assert_eq!(sock.tx_batch(&iovs, &[0..3]).expect("tx"), 1);
        let want = payload.len().div_ceil(1448);
        let segs = peer.recv_matching(want, WAIT, |d| d.len() > 54 && d[12..14] == [8, 0]);
        assert_eq!(segs.len(), want, "one frame per MSS");
        let mut joined = Vec::new();
        for s in &segs {
            assert!(s.len() <= 14 + 1500, "segment of {} bytes", s.len());
            assert!(tcp4_checksum_ok(s), "checksums are complete");
            joined.extend_from_slice(&s[54..]);
        }
        assert_eq!(joined, payload, "payload intact and in order");

        // A single frame with a partial checksum leaves with it completed.
        let small = tcp4(&payload[..500]);
        let h1 = VnetHdr {
            gso_type: 0,
            gso_size: 0,
            ..h
        };
        let hb1 = hdr_bytes(&h1);
        assert_eq!(
            sock.tx_batch(&[iov(&hb1), iov(&small)], &[0..2])
                .expect("tx"),
            1
        );
        let got = peer.recv_matching(1, WAIT, |d| d.len() == small.len() && d[12..14] == [8, 0]);
        assert_eq!(got.len(), 1);
        assert!(tcp4_checksum_ok(&got[0]));
        assert_eq!(got[0][54..], small[54..]);
    });
}

#[test]
fn unsuitable_interfaces_fall_back_to_af_packet_in_auto_mode() {
    with_netns(|| {
        veth_pair("vfa", "vfb");
        // More queue pairs than the interface has queues.
        match open_af_xdp("vfa", 2) {
            Err(VfError::AfXdp { reason, .. }) => assert!(reason.contains("queue"), "{reason}"),
            other => panic!("expected AfXdp error, got {other:?}"),
        }
        let socks = open_queues(
            "p",
            "vfa",
            2,
            VfMode::Auto,
            Some(4242),
            &RingConfig::default(),
        )
        .expect("auto falls back");
        assert_eq!(socks.len(), 2);
        assert!(socks.iter().all(|s| !s.is_af_xdp()));
        drop(socks);

        // An MTU that does not fit a 4 KiB frame.
        for d in ["vfa", "vfb"] {
            ip(&["link", "set", d, "mtu", "9000"]);
        }
        assert!(matches!(open_af_xdp("vfa", 1), Err(VfError::AfXdp { .. })));
        let auto = open_queues("p", "vfa", 1, VfMode::Auto, None, &RingConfig::default())
            .expect("auto falls back");
        assert!(!auto[0].is_af_xdp());
        assert!(
            open_queues("p", "vfa", 1, VfMode::AfXdp, None, &RingConfig::default()).is_err(),
            "af-xdp mode does not fall back"
        );
        drop(auto);
        for d in ["vfa", "vfb"] {
            ip(&["link", "set", d, "mtu", "1500"]);
        }
        let auto =
            open_queues("p", "vfa", 1, VfMode::Auto, None, &RingConfig::default()).expect("auto");
        assert!(auto[0].is_af_xdp(), "auto picks AF_XDP where it can");
    });
}

#[test]
fn one_socket_per_queue_on_a_multi_queue_interface() {
    with_netns(|| {
        ip(&[
            "link",
            "add",
            "vfa",
            "numtxqueues",
            "2",
            "numrxqueues",
            "2",
            "type",
            "veth",
            "peer",
            "name",
            "vfb",
            "numtxqueues",
            "2",
            "numrxqueues",
            "2",
        ]);
        ip(&["link", "set", "vfa", "up"]);
        ip(&["link", "set", "vfb", "up"]);
        let mut socks = open_af_xdp("vfa", 2).expect("two queues, two sockets");
        assert_eq!(socks.len(), 2);
        let peer = RawSock::open("vfb");
        // Both sockets transmit.
        let zero = hdr_bytes(&VnetHdr::default());
        for (i, s) in socks.iter_mut().enumerate() {
            let f = test_frame(i as u8, 200);
            assert_eq!(s.tx_batch(&[iov(&zero), iov(&f)], &[0..2]).expect("tx"), 1);
            assert_eq!(peer.recv_matching(1, WAIT, is_test), vec![f]);
        }
        // Every frame from the wire reaches exactly one of them.
        let sent: Vec<Vec<u8>> = (0..32u8).map(|i| test_frame(i, 64 + i as usize)).collect();
        for f in &sent {
            peer.send(f);
        }
        let deadline = Instant::now() + WAIT;
        let mut got = Vec::new();
        while got.len() < sent.len() && Instant::now() < deadline {
            for s in socks.iter_mut() {
                s.rx_batch(64, |_, d| {
                    if is_test(d) {
                        got.push(d.to_vec());
                    }
                    true
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        got.sort();
        let mut want = sent.clone();
        want.sort();
        assert_eq!(got, want);
    });
}

/// Frames the peer's own stack sends: a TCP SYN reaches XDP with its checksum unfinished while
/// the veth peer has tx checksum offload on (nothing in the frame says so: the documented
/// caveat), and complete once the peer computes it in software (the documented remedy).
#[test]
fn peer_stack_tcp_checksums_with_and_without_peer_tx_offload() {
    with_netns(|| {
        veth_pair("vfa", "vfb");
        ip(&["addr", "add", "10.9.0.2/24", "dev", "vfb"]);
        ip(&[
            "neigh",
            "add",
            "10.9.0.1",
            "lladdr",
            "02:00:00:00:00:0a",
            "dev",
            "vfb",
        ]);
        let mut socks = open_af_xdp("vfa", 1).expect("AF_XDP");
        let sock = &mut socks[0];
        let syn = |sock: &mut VfSocket| -> Option<Vec<u8>> {
            let _ = std::net::TcpStream::connect_timeout(
                &"10.9.0.1:5201".parse().expect("addr"),
                Duration::from_millis(300),
            );
            let mut got = None;
            sock.rx_batch(64, |_, d| {
                if d.len() >= 54 && d[12..14] == [8, 0] && d[23] == 6 {
                    got.get_or_insert_with(|| d.to_vec());
                }
                true
            });
            got
        };
        let with_offload = syn(sock).expect("a SYN");
        // What the documentation warns about: the checksum is still to be filled in.
        assert!(
            !tcp4_checksum_ok(&with_offload),
            "partial checksum with peer tx offload on"
        );
        set_tx_checksum("vfb", false);
        let without = syn(sock).expect("a SYN");
        assert!(
            tcp4_checksum_ok(&without),
            "complete checksum with peer tx offload off"
        );
    });
}

#[test]
fn transmit_refuses_what_af_xdp_cannot_carry_and_bad_descriptions() {
    with_netns(|| {
        veth_pair("vfa", "vfb");
        let mut socks = open_af_xdp("vfa", 1).expect("AF_XDP");
        let sock = &mut socks[0];
        let peer = RawSock::open("vfb");
        let zero = hdr_bytes(&VnetHdr::default());
        // Larger than a UMEM frame without GSO: counted invalid, the next packet still goes.
        let huge = test_frame(1, 5000);
        let ok = test_frame(2, 300);
        let iovs = [iov(&zero), iov(&huge), iov(&zero), iov(&ok)];
        assert_eq!(sock.tx_batch(&iovs, &[0..2, 2..4]).expect("tx"), 1);
        assert_eq!(peer.recv_matching(1, WAIT, is_test), vec![ok.clone()]);
        let st = sock.stats();
        assert_eq!((st.tx_packets, st.tx_invalid), (1, 1));
        // A GSO header whose segments would need more frames than exist: invalid too.
        let tiny_mss = VnetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            gso_size: 1,
            hdr_len: 54,
            ..VnetHdr::default()
        };
        let hb = hdr_bytes(&tiny_mss);
        let pkt = tcp4(&[7u8; 3000]);
        assert_eq!(
            sock.tx_batch(&[iov(&hb), iov(&pkt)], &[0..2]).expect("tx"),
            0
        );
        assert_eq!(sock.stats().tx_invalid, 2);
        // Descriptions that cannot be right are errors, not drops.
        assert!(matches!(
            sock.tx_batch(&[iov(&ok)], &[0..1]),
            Err(VfError::BadTxBatch { .. })
        ));
        assert!(matches!(
            sock.tx_batch(&[iov(&zero)], &[0..2]),
            Err(VfError::BadTxBatch { .. })
        ));
    });
}

#[test]
fn a_full_burst_larger_than_the_frame_pool_is_sent_or_counted() {
    with_netns(|| {
        veth_pair("vfa", "vfb");
        let mut socks = open_af_xdp("vfa", 1).expect("AF_XDP");
        let sock = &mut socks[0];
        let zero = hdr_bytes(&VnetHdr::default());
        let f = test_frame(3, 1000);
        // 3000 packets in one call: three times the transmit frames.
        let mut iovs = Vec::new();
        let mut pkts = Vec::new();
        for _ in 0..3000 {
            let s = iovs.len();
            iovs.push(iov(&zero));
            iovs.push(iov(&f));
            pkts.push(s..iovs.len());
        }
        let sent = sock.tx_batch(&iovs, &pkts).expect("tx");
        let st = sock.stats();
        assert_eq!(sent as u64, st.tx_packets);
        assert_eq!(st.tx_packets + st.tx_dropped, 3000, "{st:?}");
        assert!(sent >= 1024, "frames are recycled within the call: {sent}");
    });
}

/// Generic (skb) mode, which drivers without native XDP get: frames still cross both ways,
/// and a UDP GSO burst from the peer's stack arrives as wire-sized datagrams.
#[test]
fn generic_mode_carries_frames_both_ways() {
    with_netns(|| {
        veth_pair("vfa", "vfb");
        set_tx_checksum("vfb", false);
        ip(&["addr", "add", "10.9.0.2/24", "dev", "vfb"]);
        ip(&[
            "neigh",
            "add",
            "10.9.0.1",
            "lladdr",
            "02:00:00:00:00:0a",
            "dev",
            "vfb",
        ]);
        let mut socks = super::super::socket::open_af_xdp_in("vfa", 1, false).expect("generic");
        let sock = &mut socks[0];
        assert!(
            sock.describe().contains("generic XDP, copy mode"),
            "{}",
            sock.describe()
        );

        let u = std::net::UdpSocket::bind("10.9.0.2:0").expect("udp");
        let seg: libc::c_int = 1400;
        use std::os::fd::AsRawFd;
        // SAFETY: UDP_SEGMENT (SOL_UDP 17, option 103) with a valid int.
        let rc = unsafe {
            libc::setsockopt(
                u.as_raw_fd(),
                17,
                103,
                (&seg as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(rc, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
        u.send_to(&[1u8; 14000], "10.9.0.1:9").expect("send");
        let deadline = Instant::now() + WAIT;
        let mut sizes = Vec::new();
        while sizes.len() < 10 && wait_readable(sock.as_raw_fd(), deadline) {
            sock.rx_batch(64, |_, d| {
                if d.len() > 34 && d[12..14] == [8, 0] && d[23] == 17 {
                    sizes.push(d.len());
                }
                true
            });
        }
        assert_eq!(sizes, vec![14 + 20 + 8 + 1400; 10]);

        let peer = RawSock::open("vfb");
        let zero = hdr_bytes(&VnetHdr::default());
        let f = test_frame(5, 1000);
        assert_eq!(
            sock.tx_batch(&[iov(&zero), iov(&f)], &[0..2]).expect("tx"),
            1
        );
        assert_eq!(peer.recv_matching(1, WAIT, is_test), vec![f]);
    });
}

/// A link flap (the VF going down and up again) does not break the sockets: what is sent while
/// the link is down is counted or sent later, and traffic flows both ways afterwards.
#[test]
fn traffic_resumes_after_a_link_flap() {
    with_netns(|| {
        veth_pair("vfa", "vfb");
        let mut socks = open_af_xdp("vfa", 1).expect("AF_XDP");
        let sock = &mut socks[0];
        let zero = hdr_bytes(&VnetHdr::default());
        ip(&["link", "set", "vfa", "down"]);
        let lost = test_frame(0x40, 200);
        let r = sock.tx_batch(&[iov(&zero), iov(&lost)], &[0..2]);
        assert!(
            r.is_ok(),
            "a down link is not an error of the socket: {r:?}"
        );
        let _ = sock.take_error();
        ip(&["link", "set", "vfa", "up"]);
        let peer = RawSock::open("vfb");
        let deadline = Instant::now() + WAIT;
        // The carrier takes a moment to come back on both ends.
        let f = test_frame(0x41, 300);
        let mut got = Vec::new();
        while got.is_empty() && Instant::now() < deadline {
            peer.send(&f);
            got = collect_for(sock, Duration::from_millis(200));
        }
        assert_eq!(got.first(), Some(&f), "wire -> relay after the flap");
        let out = test_frame(0x42, 400);
        assert_eq!(
            sock.tx_batch(&[iov(&zero), iov(&out)], &[0..2])
                .expect("tx"),
            1
        );
        let seen = peer.recv_matching(2, WAIT, |d| is_test(d) && d[14] & 0xf0 == 0x40);
        assert!(
            seen.contains(&out),
            "relay -> wire after the flap: {}",
            seen.len()
        );
    });
}

/// Test frames received within `timeout`.
fn collect_for(sock: &mut VfSocket, timeout: Duration) -> Vec<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while wait_readable(sock.as_raw_fd(), deadline) {
        sock.rx_batch(64, |_, d| {
            if is_test(d) {
                got.push(d.to_vec());
            }
            true
        });
        if !got.is_empty() {
            break;
        }
    }
    got
}
