//! The slice of the Linux packet socket ABI (`<linux/if_packet.h>`) the VF path uses.
//!
//! These values are kernel ABI and never change; they are spelled out here rather than taken
//! from the `libc` crate because `libc` only gained most of them recently and keeping them in one
//! place documents exactly what the data path depends on.

#![allow(dead_code)]

use libc::{c_int, c_uint, c_ushort};

pub const PACKET_ADD_MEMBERSHIP: c_int = 1;
pub const PACKET_RX_RING: c_int = 5;
pub const PACKET_STATISTICS: c_int = 6;
pub const PACKET_COPY_THRESH: c_int = 7;
pub const PACKET_VERSION: c_int = 10;
pub const PACKET_VNET_HDR: c_int = 15;
pub const PACKET_FANOUT: c_int = 18;
pub const PACKET_QDISC_BYPASS: c_int = 20;
pub const PACKET_IGNORE_OUTGOING: c_int = 23;

pub const PACKET_MR_PROMISC: c_ushort = 1;

pub const TPACKET_V2: c_int = 1;

pub const PACKET_FANOUT_HASH: u32 = 0;
/// Linux >= 6.2; older kernels ignore unknown fanout flags (they are stored, never checked).
pub const PACKET_FANOUT_FLAG_IGNORE_OUTGOING: u32 = 0x4000;

pub const TP_STATUS_KERNEL: u32 = 0;
pub const TP_STATUS_USER: u32 = 1 << 0;
pub const TP_STATUS_COPY: u32 = 1 << 1;
pub const TP_STATUS_LOSING: u32 = 1 << 2;
pub const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
pub const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
pub const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;

pub const TPACKET_ALIGNMENT: usize = 16;

pub const fn tpacket_align(x: usize) -> usize {
    (x + TPACKET_ALIGNMENT - 1) & !(TPACKET_ALIGNMENT - 1)
}

/// `struct tpacket2_hdr`, at the start of every `TPACKET_V2` ring frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Tpacket2Hdr {
    pub tp_status: u32,
    pub tp_len: u32,
    pub tp_snaplen: u32,
    pub tp_mac: u16,
    pub tp_net: u16,
    pub tp_sec: u32,
    pub tp_nsec: u32,
    pub tp_vlan_tci: u16,
    pub tp_vlan_tpid: u16,
    pub tp_padding: [u8; 4],
}

/// `TPACKET2_HDRLEN`: the aligned frame header plus the `sockaddr_ll` the kernel writes after it.
/// Nothing of the packet (virtio header included) is ever placed below this offset.
pub const TPACKET2_HDRLEN: usize =
    tpacket_align(std::mem::size_of::<Tpacket2Hdr>()) + std::mem::size_of::<libc::sockaddr_ll>();

/// `struct tpacket_req` for `PACKET_RX_RING` with V1/V2.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TpacketReq {
    pub tp_block_size: c_uint,
    pub tp_block_nr: c_uint,
    pub tp_frame_size: c_uint,
    pub tp_frame_nr: c_uint,
}

/// `struct tpacket_stats` (`PACKET_STATISTICS` for V1/V2; clear on read).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TpacketStats {
    pub tp_packets: c_uint,
    pub tp_drops: c_uint,
}

/// `struct packet_mreq`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PacketMreq {
    pub mr_ifindex: c_int,
    pub mr_type: c_ushort,
    pub mr_alen: c_ushort,
    pub mr_address: [u8; 8],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<Tpacket2Hdr>(), 32);
        assert_eq!(TPACKET2_HDRLEN, 52);
        assert_eq!(std::mem::size_of::<TpacketReq>(), 16);
        assert_eq!(std::mem::size_of::<PacketMreq>(), 16);
        assert_eq!(std::mem::offset_of!(Tpacket2Hdr, tp_mac), 12);
        assert_eq!(std::mem::offset_of!(Tpacket2Hdr, tp_vlan_tci), 24);
    }
}
