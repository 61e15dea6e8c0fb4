//! The virtio-net packet header, as the guest and the Linux packet socket see it.
//!
//! With VIRTIO_F_VERSION_1 the guest header is always 12 bytes (`num_buffers` included) and
//! little-endian. A Linux packet socket with `PACKET_VNET_HDR` speaks the legacy 10-byte form in
//! host byte order, which on the little-endian hosts we support is the same layout minus
//! `num_buffers`. Keeping both views here means neither data path has to know the other's.

use vm_memory::ByteValued;

/// `flags`: the checksum starting at `csum_start` must be completed by the receiver.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum has been validated (receive side only).
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;

/// `gso_type` values.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// The 10-byte header exchanged with a `PACKET_VNET_HDR` socket (`struct virtio_net_hdr`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

// SAFETY: plain old data, every bit pattern is valid, no padding (1+1+2*4 = 10 bytes, align 2).
unsafe impl ByteValued for VnetHdr {}

/// The 12-byte header the guest sees with VERSION_1 or MRG_RXBUF (`struct virtio_net_hdr_mrg_rxbuf`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub hdr: VnetHdr,
    pub num_buffers: u16,
}

// SAFETY: plain old data, every bit pattern is valid, no padding (10 + 2 bytes, align 2).
unsafe impl ByteValued for VirtioNetHdr {}

/// Size of the guest's header; VERSION_1 is required, so it is never the 10-byte legacy one.
pub const VIRTIO_NET_HDR_LEN: usize = std::mem::size_of::<VirtioNetHdr>();
/// Size of the header on a `PACKET_VNET_HDR` socket.
pub const VNET_HDR_LEN: usize = std::mem::size_of::<VnetHdr>();

/// The guest's header length for its negotiated features: `num_buffers` is there with
/// VERSION_1 or MRG_RXBUF, and only a legacy guest without mergeable buffers omits it.
pub fn guest_header_len(features: u64) -> usize {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
    if features & (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF) != 0 {
        VIRTIO_NET_HDR_LEN
    } else {
        VNET_HDR_LEN
    }
}

impl VnetHdr {
    /// Reads a header from the first [`VNET_HDR_LEN`] bytes of `buf`, or `None` if it is shorter.
    pub fn from_bytes(buf: &[u8]) -> Option<Self> {
        let b = buf.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// True if the packet carries a GSO (TSO/UFO/USO) super-frame.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !VIRTIO_NET_HDR_GSO_ECN != VIRTIO_NET_HDR_GSO_NONE
    }

    /// True if the receiver must fill in a partial checksum.
    pub fn needs_csum(&self) -> bool {
        self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_abi() {
        assert_eq!(VNET_HDR_LEN, 10);
        assert_eq!(VIRTIO_NET_HDR_LEN, 12);
    }

    #[test]
    fn header_length_follows_features() {
        assert_eq!(guest_header_len(1 << 32), 12);
        assert_eq!(guest_header_len(1 << 15), 12);
        assert_eq!(guest_header_len(0), 10);
    }

    #[test]
    fn parses_little_endian_fields() {
        let raw = [1u8, 4, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0xff];
        let h = VnetHdr::from_bytes(&raw).expect("10 bytes are enough");
        assert!(h.needs_csum());
        assert!(h.is_gso());
        assert_eq!(h.gso_type, VIRTIO_NET_HDR_GSO_TCPV6);
        assert_eq!(h.hdr_len, 54);
        assert_eq!(h.gso_size, 1448);
        assert_eq!(h.csum_start, 34);
        assert_eq!(h.csum_offset, 16);
        assert!(VnetHdr::from_bytes(&raw[..9]).is_none());
    }
}
