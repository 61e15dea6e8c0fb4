//! Announcing a migrated guest on the wire for it: `VHOST_USER_SEND_RARP`.
//!
//! After a live migration the switches behind the destination's VF still send the guest's
//! traffic to the source host until they see a frame from its MAC on the new port. A guest
//! that negotiated `VIRTIO_NET_F_GUEST_ANNOUNCE` sends gratuitous ARP/NA itself when QEMU asks;
//! for one that did not (a DPDK virtio PMD, an old driver, `guest_announce=off`), QEMU sends
//! the backend `VHOST_USER_SEND_RARP` with the guest's MAC, and the backend broadcasts a
//! reverse-ARP frame from that MAC out of the physical side. QEMU does this for every
//! self-announcement round (after an incoming migration, and on the QMP `announce-self`
//! command), only when the backend offers `VHOST_USER_PROTOCOL_F_RARP`.
//!
//! The frame is the one QEMU itself sends for emulated NICs and DPDK's vhost library builds:
//! broadcast destination, ethertype 0x8035, a RARP "request reverse" with the MAC as source
//! and target hardware address, padded to the 60-byte Ethernet minimum.

use log::{info, warn};

use crate::net_hdr::{VnetHdr, VNET_HDR_LEN};
use crate::port::Relay;
use crate::queue_pair::Link;

/// Ethertype of reverse ARP.
pub const ETH_P_RARP: u16 = 0x8035;
/// Ethernet minimum frame length without the FCS.
pub const RARP_FRAME_LEN: usize = 60;

/// Why a RARP announcement did not go out.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("port {port}: no VF to announce on (loopback port)")]
    NoVf { port: String },
    #[error("port {port}: RARP for {mac} not sent on VF {vf}: {reason}")]
    Send {
        port: String,
        mac: String,
        vf: String,
        reason: String,
    },
}

/// The RARP frame announcing `mac`.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; RARP_FRAME_LEN] {
    let mut f = [0u8; RARP_FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]); // broadcast
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // opcode: request reverse
    f[22..28].copy_from_slice(&mac); // sender hardware address
    f[32..38].copy_from_slice(&mac); // target hardware address
    f // protocol addresses and padding stay zero
}

/// The MAC in a `SEND_RARP` payload: the first 6 bytes of its u64 (QEMU `memcpy`s it there).
pub fn mac_from_payload(payload: &[u8]) -> Option<[u8; 6]> {
    payload.get(..6)?.try_into().ok()
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Broadcasts the RARP frame for `mac` out of the port's VF. One frame is enough: all queue
/// pairs of a port share one VF, so it goes out on pair 0's socket.
pub fn announce(port: &Relay, mac: [u8; 6]) -> Result<(), AnnounceError> {
    let frame = rarp_frame(mac);
    let mac_text = format_mac(&mac);
    let Some(mut pair) = port.pair(0) else {
        return Err(AnnounceError::NoVf {
            port: port.name.clone(),
        });
    };
    let Link::Vf(vf) = &mut pair.link else {
        return Err(AnnounceError::NoVf {
            port: port.name.clone(),
        });
    };
    let mut hdr = VnetHdr::default();
    let iovs = [
        libc::iovec {
            iov_base: (&mut hdr as *mut VnetHdr).cast(),
            iov_len: VNET_HDR_LEN,
        },
        libc::iovec {
            iov_base: frame.as_ptr().cast_mut().cast(),
            iov_len: frame.len(),
        },
    ];
    // One packet: the header iovec and the frame.
    let packet = 0..iovs.len();
    let ifname = vf.ifname().to_string();
    let send_err = |reason: String| AnnounceError::Send {
        port: port.name.clone(),
        mac: mac_text.clone(),
        vf: ifname.clone(),
        reason,
    };
    match vf.tx_batch(&iovs, std::slice::from_ref(&packet)) {
        Ok(1) => {
            info!(
                "port {}: broadcast RARP for {mac_text} on VF {ifname} (SEND_RARP)",
                port.name
            );
            Ok(())
        }
        Ok(_) => Err(send_err(
            "the VF socket dropped it (queue full or link down)".into(),
        )),
        Err(e) => Err(send_err(e.to_string())),
    }
}

/// [`announce`], with a failure logged rather than returned: the frontend's request is
/// answered either way (a lost announcement costs the guest some seconds of reachability,
/// not its connection).
pub fn announce_logged(port: &Relay, mac: [u8; 6]) {
    if let Err(e) = announce(port, mac) {
        warn!("{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_matches_qemus_announcement() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        // Byte for byte what QEMU's announce_self_create() builds for this MAC.
        let mut want = vec![0xff; 6];
        want.extend_from_slice(&mac);
        want.extend_from_slice(&[0x80, 0x35, 0, 1, 8, 0, 6, 4, 0, 3]);
        want.extend_from_slice(&mac);
        want.extend_from_slice(&[0; 4]);
        want.extend_from_slice(&mac);
        want.extend_from_slice(&[0; 4]);
        want.resize(60, 0);
        assert_eq!(f.to_vec(), want);
    }

    #[test]
    fn mac_is_the_first_six_payload_bytes() {
        let payload = [1, 2, 3, 4, 5, 6, 0, 0];
        assert_eq!(mac_from_payload(&payload), Some([1, 2, 3, 4, 5, 6]));
        assert_eq!(mac_from_payload(&payload[..5]), None);
        assert_eq!(format_mac(&[1, 2, 3, 0xa, 0xb, 0xff]), "01:02:03:0a:0b:ff");
    }
}
