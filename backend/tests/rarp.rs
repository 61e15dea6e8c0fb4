//! `VHOST_USER_SEND_RARP`: what QEMU sends after a migration for a guest without
//! GUEST_ANNOUNCE. vhost-relay must offer the RARP protocol feature, answer the request
//! (acking it when asked) without dropping the connection, and broadcast a RARP frame from
//! the guest's MAC out of the VF, where the wire (a veth peer in a namespace) sees it.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use support::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

const T: Duration = Duration::from_secs(10);
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x42];

#[test]
fn send_rarp_broadcasts_a_rarp_frame_on_the_vf() {
    let ns = NetNs::new("rarp");
    let dir = temp_dir("rarp");
    let sock = dir.join("vr.sock");
    let mut be = ns.spawn_backend(
        &[
            "--socket-path",
            sock.to_str().expect("utf-8"),
            "--vf",
            "vf0",
        ],
        &dir.join("vr.log"),
    );
    let stream = connect_when_listening(&sock);
    let mut raw = stream.try_clone().expect("clone");
    let mut f = TestFrontend::over_stream(stream, 1, VIRTIO_NET_F_MRG_RXBUF);
    // ack_protocol_features asserts the backend offers RARP.
    f.ack_protocol_features(VhostUserProtocolFeatures::RARP);

    let capture = {
        let name = ns.name.clone();
        std::thread::spawn(move || {
            let ns = NetNs { name };
            let got = ns.enter(|| {
                let raw = RawSocket::open("wire0", false);
                let mut got = Vec::new();
                let start = Instant::now();
                while got.len() < 2 && start.elapsed() < T {
                    if let Some(fr) = raw.recv() {
                        if fr.len() >= 14 && fr[12..14] == [0x80, 0x35] {
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

    // As QEMU sends it: no reply wanted, MAC in the first 6 bytes of a u64.
    let mut payload = MAC.to_vec();
    payload.extend_from_slice(&[0, 0]);
    raw.write_all(&raw_message(REQ_SEND_RARP, 0, &payload))
        .expect("send SEND_RARP");
    // With NEED_REPLY (REPLY_ACK is negotiated): an ack of success.
    raw.write_all(&raw_message(REQ_SEND_RARP, FLAG_NEED_REPLY, &payload))
        .expect("send SEND_RARP");
    raw.set_read_timeout(Some(T)).expect("timeout");
    let mut reply = [0u8; 20];
    raw.read_exact(&mut reply).expect("ack");
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 19);
    assert_eq!(u32::from_le_bytes(reply[4..8].try_into().unwrap()), 0x5);
    assert_eq!(u64::from_le_bytes(reply[12..20].try_into().unwrap()), 0);

    let frames = capture.join().expect("capture");
    assert_eq!(frames.len(), 2, "one RARP broadcast per SEND_RARP");
    for fr in &frames {
        assert_eq!(fr.len(), 60);
        assert_eq!(&fr[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&fr[6..12], &MAC, "from the guest's MAC");
        assert_eq!(
            &fr[14..22],
            &[0, 1, 8, 0, 6, 4, 0, 3],
            "RARP request reverse"
        );
        assert_eq!(&fr[22..28], &MAC, "sender hardware address");
        assert_eq!(&fr[32..38], &MAC, "target hardware address");
    }

    // The connection survived: the backend still answers requests.
    assert!(f.get_vring_base(1) == 0);
    assert!(
        be.try_wait().expect("wait").is_none(),
        "backend still running"
    );
    let log = std::fs::read_to_string(dir.join("vr.log")).unwrap_or_default();
    assert!(
        log.contains("broadcast RARP for 52:54:00:ab:cd:42"),
        "{log}"
    );
    let _ = be.kill();
    let _ = be.wait();
}
