//! Software fallbacks for offloads the guest did not negotiate.
//!
//! Frames read from the VF side through a `PACKET_VNET_HDR` socket are often what the kernel
//! would have handed a smart NIC: GSO super-frames of up to 64 KiB with a partial checksum
//! (`NEEDS_CSUM`, the pseudo-header sum already in the checksum field). A guest that negotiated
//! `GUEST_CSUM`/`GUEST_TSO4`/`GUEST_TSO6`/`GUEST_ECN`/`GUEST_UFO` takes them as they are; one that
//! did not must be given ordinary, fully checksummed frames no larger than its MTU, or it drops
//! them (or worse, passes bad checksums up its stack). The same holds in loopback mode, where
//! the guest's own TX (sent with `HOST_*` offloads) is delivered to its RX.
//!
//! Everything here treats the virtio header and the frame as hostile: every offset and length
//! is bounds-checked and every failure is an [`OffloadError`], never a panic. The module denies
//! `clippy::indexing_slicing` so that each access that depends on input goes through `get()`.
//!
//! Scope decisions:
//! * TCPv4/TCPv6 TSO (with or without the ECN flag) and UDP_L4 (USO) are segmented.
//!   `RxOffloads` has no USO bit (the guest's `GUEST_USO4/6` are not carried), so a USO
//!   super-frame is always segmented; that is correct, only slower than passing it through.
//! * UFO over IPv4 becomes IPv4 fragments (that is what UFO means: one UDP datagram, split at
//!   the IP layer). UFO over IPv6 is refused: it needs a Fragment extension header inserted
//!   with an identification the virtio header does not carry, and Linux has not produced UFO
//!   at all since 4.14, so only a legacy guest in loopback mode could ever send one.
//! * IPv6 Hop-by-Hop and Destination Options headers are walked and copied into every
//!   segment. Routing headers are refused (the TCP/UDP pseudo-header would then use the final
//!   destination from the routing header, not the IPv6 destination), as are Fragment, AH, ESP
//!   and anything unknown: such frames are not legitimate GSO input.
//! * Up to two VLAN tags (802.1Q and 802.1ad) are accepted in front of the IP header.

#![deny(clippy::indexing_slicing)]

use thiserror::Error;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};

use crate::net_hdr::{
    VnetHdr, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4,
};

/// `flags` bits a receiver without further features understands; anything else (e.g.
/// `RSC_INFO`, which needs `GUEST_RSC`) is stripped before a header reaches the guest.
const KNOWN_FLAGS: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID;

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
/// QinQ is the deepest stacking seen on a VF; more tags is treated as garbage.
const MAX_VLAN_TAGS: usize = 2;

const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const IPV4_DF: u16 = 0x4000;
const IPV4_MF: u16 = 0x2000;
const IPV4_FRAG_OFFSET: u16 = 0x1fff;
/// Hop-by-Hop + Destination Options is all we accept; a few more just bounds the walk.
const MAX_IPV6_EXT_HDRS: usize = 4;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DSTOPTS: u8 = 60;

const TCP_MIN_HLEN: usize = 20;
const TCP_CSUM_OFFSET: usize = 16;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
const UDP_HLEN: usize = 8;
const UDP_CSUM_OFFSET: usize = 6;

/// What the receiver (the guest) accepts; derived by the caller from the negotiated virtio
/// feature bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxOffloads {
    /// `VIRTIO_NET_F_GUEST_CSUM`: partial checksums (`NEEDS_CSUM`) may be delivered.
    pub csum: bool,
    /// `VIRTIO_NET_F_GUEST_TSO4`: TCPv4 super-frames may be delivered.
    pub tso4: bool,
    /// `VIRTIO_NET_F_GUEST_TSO6`: TCPv6 super-frames may be delivered.
    pub tso6: bool,
    /// `VIRTIO_NET_F_GUEST_ECN`: TSO super-frames flagged `GSO_ECN` may be delivered.
    pub ecn: bool,
    /// `VIRTIO_NET_F_GUEST_UFO`: UFO (one UDP datagram larger than the MTU) may be delivered.
    pub ufo: bool,
}

impl RxOffloads {
    /// Reads the guest-side receive offloads out of the negotiated (acked) feature bits.
    pub fn from_features(features: u64) -> Self {
        let has = |bit: u32| features & (1u64 << bit) != 0;
        RxOffloads {
            csum: has(VIRTIO_NET_F_GUEST_CSUM),
            tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            ecn: has(VIRTIO_NET_F_GUEST_ECN),
            ufo: has(VIRTIO_NET_F_GUEST_UFO),
        }
    }

    /// True if a frame with this header may be handed to the guest unchanged.
    ///
    /// Every GSO type also requires `csum`: the virtio spec makes `GUEST_TSO*`/`GUEST_UFO`
    /// depend on `GUEST_CSUM`, and a super-frame always carries a partial checksum. A
    /// `DATA_VALID` flag is acceptable without `GUEST_CSUM` since the 2024 spec correction
    /// (drivers treat it as RX checksum offload); `NEEDS_CSUM` never is.
    pub fn accepts(&self, hdr: &VnetHdr) -> bool {
        if hdr.flags & !KNOWN_FLAGS != 0 {
            return false;
        }
        if hdr.needs_csum() && !self.csum {
            return false;
        }
        let ecn = hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
        match hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => !ecn,
            VIRTIO_NET_HDR_GSO_TCPV4 => self.csum && self.tso4 && (!ecn || self.ecn),
            VIRTIO_NET_HDR_GSO_TCPV6 => self.csum && self.tso6 && (!ecn || self.ecn),
            VIRTIO_NET_HDR_GSO_UDP => self.csum && self.ufo && !ecn,
            // UDP_L4 needs GUEST_USO4/6, which this struct does not carry; unknown types never.
            _ => false,
        }
    }
}

/// Why a frame could not be adapted for the guest. Every variant names the offending field
/// and the offsets/lengths involved so that a dropped frame can be diagnosed from the log.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OffloadError {
    #[error("csum_start {csum_start} is not inside the {len}-byte frame")]
    CsumStartBeyondFrame { csum_start: u16, len: usize },
    #[error(
        "checksum field at csum_start {csum_start} + csum_offset {csum_offset} (2 bytes) \
         does not fit in the {len}-byte frame"
    )]
    CsumFieldBeyondFrame {
        csum_start: u16,
        csum_offset: u16,
        len: usize,
    },
    #[error(
        "csum_offset {csum_offset} is odd: an Internet checksum field is 16-bit aligned \
         relative to csum_start"
    )]
    CsumOffsetOdd { csum_offset: u16 },
    #[error(
        "NEEDS_CSUM with csum_start {csum_start}/csum_offset {csum_offset} disagrees with the \
         {proto} header parsed at offset {l4_offset} (checksum field expected at +{expected_offset})"
    )]
    CsumDisagrees {
        csum_start: u16,
        csum_offset: u16,
        proto: &'static str,
        l4_offset: usize,
        expected_offset: usize,
    },
    #[error("hdr_len {hdr_len} is beyond the {len}-byte frame")]
    HdrLenBeyondFrame { hdr_len: u16, len: usize },
    #[error("gso_size is 0 for GSO type {gso_type:#04x}")]
    ZeroGsoSize { gso_type: u8 },
    #[error("unsupported GSO type {gso_type:#04x}")]
    UnsupportedGsoType { gso_type: u8 },
    #[error(
        "truncated {what} header at offset {offset}: needs {needed} bytes, {available} present"
    )]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("unknown ethertype {ethertype:#06x} at offset {offset}")]
    UnknownEthertype { ethertype: u16, offset: usize },
    #[error("more than {MAX_VLAN_TAGS} VLAN tags (next one at offset {offset})")]
    TooManyVlanTags { offset: usize },
    #[error("IP version {version} at offset {offset} does not match ethertype {ethertype:#06x}")]
    IpVersionMismatch {
        version: u8,
        ethertype: u16,
        offset: usize,
    },
    #[error("IPv4 IHL {ihl} at offset {offset} is below the minimum of 5")]
    BadIhl { ihl: u8, offset: usize },
    #[error(
        "{ip} length field {field} at offset {offset} is inconsistent with the {header_len}-byte \
         header and the {available} bytes of the frame from there"
    )]
    BadIpLength {
        ip: &'static str,
        offset: usize,
        field: usize,
        header_len: usize,
        available: usize,
    },
    #[error("IPv4 packet at offset {offset} is already a fragment (flags/offset {frag:#06x})")]
    AlreadyFragmented { offset: usize, frag: u16 },
    #[error(
        "IPv6 extension header / next header {next_header} at offset {offset} is not supported"
    )]
    UnsupportedIpv6Header { next_header: u8, offset: usize },
    #[error("IPv6 jumbogram (payload length 0) with extension headers at offset {offset} is not supported")]
    Ipv6Jumbogram { offset: usize },
    #[error("GSO type {gso_type:#04x} cannot apply to {ip} protocol {proto}")]
    GsoProtocolMismatch {
        gso_type: u8,
        ip: &'static str,
        proto: u8,
    },
    #[error("TCP data offset {doff} at offset {offset} is below the minimum of 5")]
    BadTcpDataOffset { doff: u8, offset: usize },
    #[error(
        "UFO over IPv6 is not supported: it needs an inserted Fragment header whose \
         identification the virtio header does not carry (Linux stopped producing UFO in 4.14)"
    )]
    Ipv6Ufo,
    #[error("UFO datagram cannot be fragmented: {reason}")]
    UfoNotFragmentable { reason: &'static str },
    #[error("gso_size {gso_size} is below the 8-byte IPv4 fragment granularity")]
    FragmentTooSmall { gso_size: u16 },
    #[error("{what} length {len} exceeds the 16-bit length field")]
    TooLong { what: &'static str, len: usize },
    /// Not expected: a header field we just copied could not be rewritten. Reported rather
    /// than panicking so that a logic error costs one frame, not the backend.
    #[error("internal: cannot rewrite {what} at offset {offset} of a {len}-byte segment")]
    Rewrite {
        what: &'static str,
        offset: usize,
        len: usize,
    },
}

/// Completes a partial checksum in place (csum_start/csum_offset, 16-bit one's complement over
/// `pkt[csum_start..]` with the pseudo-header sum the sender already placed in the checksum
/// field), clears `NEEDS_CSUM`, sets `DATA_VALID`.
///
/// A header without `NEEDS_CSUM` is left alone (there is nothing to complete). A result of 0 is
/// stored as 0xffff, as Linux does (`CSUM_MANGLED_0`): both are "zero" in one's complement, and
/// for UDP a transmitted 0 would mean "no checksum".
pub fn complete_checksum(hdr: &mut VnetHdr, pkt: &mut [u8]) -> Result<(), OffloadError> {
    if !hdr.needs_csum() {
        return Ok(());
    }
    let len = pkt.len();
    let start = usize::from(hdr.csum_start);
    if start >= len {
        return Err(OffloadError::CsumStartBeyondFrame {
            csum_start: hdr.csum_start,
            len,
        });
    }
    if hdr.csum_offset & 1 != 0 {
        return Err(OffloadError::CsumOffsetOdd {
            csum_offset: hdr.csum_offset,
        });
    }
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > len {
        return Err(OffloadError::CsumFieldBeyondFrame {
            csum_start: hdr.csum_start,
            csum_offset: hdr.csum_offset,
            len,
        });
    }
    let covered = pkt.get(start..).ok_or(OffloadError::CsumStartBeyondFrame {
        csum_start: hdr.csum_start,
        len,
    })?;
    let csum = finish(sum_bytes(covered, 0));
    put_u16(pkt, field, csum, "checksum field")?;
    hdr.flags = (hdr.flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM) | VIRTIO_NET_HDR_F_DATA_VALID;
    Ok(())
}

/// Splits a GSO super-frame into frames the guest can take without any offload, calling
/// `emit(hdr, frame)` for each and returning how many were emitted.
///
/// * TCPv4/TCPv6 (with or without `GSO_ECN`): MSS-sized segments with rewritten IP total
///   length / payload length, IPv4 id (+1 per segment), TCP sequence numbers, FIN/PSH only on
///   the last segment and CWR only on the first, and full IPv4 header and TCP checksums.
/// * UDP_L4 (USO): `gso_size`-byte datagrams, each with its own UDP header and checksum.
/// * UDP (UFO) over IPv4: IPv4 fragments of the single datagram, whose UDP checksum covers the
///   whole datagram; over IPv6: refused (see the module documentation).
///
/// Each frame is built in `scratch` (caller-owned and reused, so no allocation once it has
/// grown to one segment). Emitted headers are `GSO_NONE`; segments carry `DATA_VALID` because
/// their checksums were just computed, IP fragments carry no flags (a checksum cannot be
/// validated per fragment). `hdr_len` is treated as the hint it is (Linux fills it with the
/// linear length of the skb), so only its staying inside the frame is checked; the real header
/// length comes from parsing. A frame that is not GSO is its own single segment: its checksum
/// is completed if `NEEDS_CSUM` is set.
///
/// Errors are found before anything is emitted: all checks precede the loop, and the only
/// per-segment limit (the 16-bit IP length of a BIG TCP segment) fails on the first segment,
/// which is the largest. So a frame is either delivered whole or dropped whole.
pub fn segment<F: FnMut(&VnetHdr, &[u8])>(
    hdr: &VnetHdr,
    pkt: &[u8],
    scratch: &mut Vec<u8>,
    mut emit: F,
) -> Result<usize, OffloadError> {
    if !hdr.is_gso() {
        return single_frame(hdr, pkt, true, scratch, emit);
    }
    if usize::from(hdr.hdr_len) > pkt.len() {
        return Err(OffloadError::HdrLenBeyondFrame {
            hdr_len: hdr.hdr_len,
            len: pkt.len(),
        });
    }
    let gso_type = hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN;
    if !matches!(
        gso_type,
        VIRTIO_NET_HDR_GSO_TCPV4
            | VIRTIO_NET_HDR_GSO_TCPV6
            | VIRTIO_NET_HDR_GSO_UDP
            | VIRTIO_NET_HDR_GSO_UDP_L4
    ) {
        return Err(OffloadError::UnsupportedGsoType {
            gso_type: hdr.gso_type,
        });
    }
    if hdr.gso_size == 0 {
        return Err(OffloadError::ZeroGsoSize {
            gso_type: hdr.gso_type,
        });
    }
    let f = parse(pkt)?;
    let expected = match (gso_type, f.ip, f.proto) {
        (VIRTIO_NET_HDR_GSO_TCPV4, Ip::V4, IPPROTO_TCP)
        | (VIRTIO_NET_HDR_GSO_TCPV6, Ip::V6, IPPROTO_TCP) => true,
        (VIRTIO_NET_HDR_GSO_UDP, Ip::V6, IPPROTO_UDP) => return Err(OffloadError::Ipv6Ufo),
        (VIRTIO_NET_HDR_GSO_UDP, Ip::V4, IPPROTO_UDP)
        | (VIRTIO_NET_HDR_GSO_UDP_L4, _, IPPROTO_UDP) => true,
        _ => false,
    };
    if !expected {
        return Err(OffloadError::GsoProtocolMismatch {
            gso_type: hdr.gso_type,
            ip: f.ip.name(),
            proto: f.proto,
        });
    }
    let l4 = parse_l4(pkt, &f)?;
    if hdr.needs_csum()
        && (usize::from(hdr.csum_start) != f.l4 || usize::from(hdr.csum_offset) != l4.csum_offset)
    {
        return Err(OffloadError::CsumDisagrees {
            csum_start: hdr.csum_start,
            csum_offset: hdr.csum_offset,
            proto: l4.name,
            l4_offset: f.l4,
            expected_offset: l4.csum_offset,
        });
    }
    let mss = usize::from(hdr.gso_size);
    match gso_type {
        VIRTIO_NET_HDR_GSO_UDP => fragment_udp4(pkt, &f, hdr.gso_size, scratch, emit),
        _ => {
            let out = VnetHdr {
                flags: VIRTIO_NET_HDR_F_DATA_VALID,
                ..VnetHdr::default()
            };
            let payload_off = f.l4 + l4.hlen;
            let headers = pkt
                .get(..payload_off)
                .ok_or(truncated("L4", f.l4, l4.hlen, pkt))?;
            let payload =
                pkt.get(payload_off..f.ip_end)
                    .ok_or(truncated("payload", payload_off, 0, pkt))?;
            let count = payload.len().div_ceil(mss).max(1);
            for i in 0..count {
                let start = i * mss;
                let end = (start + mss).min(payload.len());
                let chunk = payload.get(start..end).ok_or(OffloadError::Rewrite {
                    what: "payload chunk",
                    offset: payload_off + start,
                    len: pkt.len(),
                })?;
                scratch.clear();
                scratch.extend_from_slice(headers);
                scratch.extend_from_slice(chunk);
                rewrite_ip(scratch, &f, i)?;
                if f.proto == IPPROTO_TCP {
                    rewrite_tcp(scratch, &f, i, count, start)?;
                } else {
                    rewrite_udp(scratch, &f)?;
                }
                emit(&out, scratch);
            }
            Ok(count)
        }
    }
}

/// The one call the RX path makes: if `offloads.accepts(hdr)` calls `emit(hdr, pkt)`
/// unchanged; otherwise segments and/or completes the checksum as needed, then emits.
/// Returns the number of frames emitted.
pub fn adapt_for_guest<F: FnMut(&VnetHdr, &[u8])>(
    offloads: RxOffloads,
    hdr: &VnetHdr,
    pkt: &[u8],
    scratch: &mut Vec<u8>,
    mut emit: F,
) -> Result<usize, OffloadError> {
    if offloads.accepts(hdr) {
        emit(hdr, pkt);
        return Ok(1);
    }
    if hdr.is_gso() {
        // Whatever the guest lacks (the GSO type, ECN, or checksum offload), segmentation
        // yields frames needing none of them; their headers only ever carry DATA_VALID.
        return segment(hdr, pkt, scratch, emit);
    }
    single_frame(hdr, pkt, !offloads.csum, scratch, emit)
}

/// A non-GSO header reduced to what any guest understands: no GSO fields, no unknown flags.
fn sanitized(hdr: &VnetHdr) -> VnetHdr {
    VnetHdr {
        flags: hdr.flags & KNOWN_FLAGS,
        gso_type: VIRTIO_NET_HDR_GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        ..*hdr
    }
}

/// A frame that is not GSO, emitted once with a sanitized header; its checksum completed
/// first if it needs one and `complete_csum` (the receiver cannot take a partial one).
fn single_frame<F: FnMut(&VnetHdr, &[u8])>(
    hdr: &VnetHdr,
    pkt: &[u8],
    complete_csum: bool,
    scratch: &mut Vec<u8>,
    mut emit: F,
) -> Result<usize, OffloadError> {
    let mut out = sanitized(hdr);
    if out.needs_csum() && complete_csum {
        scratch.clear();
        scratch.extend_from_slice(pkt);
        complete_checksum(&mut out, scratch)?;
        emit(&out, scratch);
    } else {
        emit(&out, pkt);
    }
    Ok(1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ip {
    V4,
    V6,
}

impl Ip {
    fn name(self) -> &'static str {
        match self {
            Ip::V4 => "IPv4",
            Ip::V6 => "IPv6",
        }
    }
}

/// Offsets of a parsed super-frame. All are within the frame and `l3 < l4 <= ip_end == len`.
#[derive(Debug)]
struct Frame {
    l3: usize,
    ip: Ip,
    l4: usize,
    /// The upper-layer protocol after any extension headers (pseudo-header protocol).
    proto: u8,
    ip_end: usize,
}

struct L4 {
    name: &'static str,
    hlen: usize,
    csum_offset: usize,
}

fn truncated(what: &'static str, offset: usize, needed: usize, pkt: &[u8]) -> OffloadError {
    OffloadError::Truncated {
        what,
        offset,
        needed,
        available: pkt.len().saturating_sub(offset),
    }
}

fn get_u8(pkt: &[u8], off: usize, what: &'static str) -> Result<u8, OffloadError> {
    pkt.get(off).copied().ok_or(truncated(what, off, 1, pkt))
}

fn get_u16(pkt: &[u8], off: usize, what: &'static str) -> Result<u16, OffloadError> {
    pkt.get(off..off + 2)
        .and_then(|b| <[u8; 2]>::try_from(b).ok())
        .map(u16::from_be_bytes)
        .ok_or(truncated(what, off, 2, pkt))
}

fn get_u32(pkt: &[u8], off: usize, what: &'static str) -> Result<u32, OffloadError> {
    pkt.get(off..off + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or(truncated(what, off, 4, pkt))
}

fn put_bytes(buf: &mut [u8], off: usize, v: &[u8], what: &'static str) -> Result<(), OffloadError> {
    let len = buf.len();
    buf.get_mut(off..off + v.len())
        .ok_or(OffloadError::Rewrite {
            what,
            offset: off,
            len,
        })?
        .copy_from_slice(v);
    Ok(())
}

fn put_u16(buf: &mut [u8], off: usize, v: u16, what: &'static str) -> Result<(), OffloadError> {
    put_bytes(buf, off, &v.to_be_bytes(), what)
}

/// Parses Ethernet (+VLAN tags) and the IP layer of a GSO super-frame.
///
/// The IP length must describe exactly the rest of the frame: GSO frames are never padded, and
/// accepting a mismatch would silently drop or invent payload. A zero length (IPv4 BIG TCP, or
/// IPv6 with the jumbo option already stripped) means "the rest of the frame".
fn parse(pkt: &[u8]) -> Result<Frame, OffloadError> {
    let mut off = ETH_HLEN - 2;
    let mut ethertype = get_u16(pkt, off, "Ethernet")?;
    let mut tags = 0;
    while ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if tags == MAX_VLAN_TAGS {
            return Err(OffloadError::TooManyVlanTags { offset: off });
        }
        tags += 1;
        off += VLAN_HLEN;
        ethertype = get_u16(pkt, off, "VLAN")?;
    }
    let l3 = off + 2;
    let ip = match ethertype {
        ETH_P_IPV4 => Ip::V4,
        ETH_P_IPV6 => Ip::V6,
        _ => {
            return Err(OffloadError::UnknownEthertype {
                ethertype,
                offset: off,
            })
        }
    };
    let version = get_u8(pkt, l3, ip.name())? >> 4;
    if (ip == Ip::V4 && version != 4) || (ip == Ip::V6 && version != 6) {
        return Err(OffloadError::IpVersionMismatch {
            version,
            ethertype,
            offset: l3,
        });
    }
    let available = pkt.len() - l3;
    match ip {
        Ip::V4 => {
            let ihl = get_u8(pkt, l3, "IPv4")? & 0x0f;
            if ihl < 5 {
                return Err(OffloadError::BadIhl { ihl, offset: l3 });
            }
            let hlen = usize::from(ihl) * 4;
            if hlen > available {
                return Err(truncated("IPv4", l3, hlen, pkt));
            }
            let tot_len = usize::from(get_u16(pkt, l3 + 2, "IPv4")?);
            if (tot_len != 0 && tot_len != available) || (tot_len == 0 && available <= 0xffff) {
                return Err(OffloadError::BadIpLength {
                    ip: "IPv4",
                    offset: l3,
                    field: tot_len,
                    header_len: hlen,
                    available,
                });
            }
            let frag = get_u16(pkt, l3 + 6, "IPv4")?;
            if frag & (IPV4_MF | IPV4_FRAG_OFFSET) != 0 {
                return Err(OffloadError::AlreadyFragmented { offset: l3, frag });
            }
            Ok(Frame {
                l3,
                ip,
                l4: l3 + hlen,
                proto: get_u8(pkt, l3 + 9, "IPv4")?,
                ip_end: pkt.len(),
            })
        }
        Ip::V6 => {
            if IPV6_HLEN > available {
                return Err(truncated("IPv6", l3, IPV6_HLEN, pkt));
            }
            let payload_len = usize::from(get_u16(pkt, l3 + 4, "IPv6")?);
            let rest = available - IPV6_HLEN;
            if (payload_len != 0 && payload_len != rest) || (payload_len == 0 && rest <= 0xffff) {
                return Err(OffloadError::BadIpLength {
                    ip: "IPv6",
                    offset: l3,
                    field: payload_len,
                    header_len: IPV6_HLEN,
                    available,
                });
            }
            let mut next = get_u8(pkt, l3 + 6, "IPv6")?;
            let mut off = l3 + IPV6_HLEN;
            let mut walked = 0;
            loop {
                match next {
                    IPPROTO_TCP | IPPROTO_UDP => break,
                    IPPROTO_HOPOPTS | IPPROTO_DSTOPTS if walked < MAX_IPV6_EXT_HDRS => {
                        // Hop-by-Hop is only legal directly after the fixed header.
                        if next == IPPROTO_HOPOPTS && walked != 0 {
                            return Err(OffloadError::UnsupportedIpv6Header {
                                next_header: next,
                                offset: off,
                            });
                        }
                        // A jumbo payload option would go stale in every segment.
                        if payload_len == 0 {
                            return Err(OffloadError::Ipv6Jumbogram { offset: l3 });
                        }
                        let what = "IPv6 extension";
                        let len = (usize::from(get_u8(pkt, off + 1, what)?) + 1) * 8;
                        if off + len > pkt.len() {
                            return Err(truncated(what, off, len, pkt));
                        }
                        next = get_u8(pkt, off, what)?;
                        off += len;
                        walked += 1;
                    }
                    _ => {
                        return Err(OffloadError::UnsupportedIpv6Header {
                            next_header: next,
                            offset: off,
                        })
                    }
                }
            }
            Ok(Frame {
                l3,
                ip,
                l4: off,
                proto: next,
                ip_end: pkt.len(),
            })
        }
    }
}

/// Checks the TCP or UDP header of a parsed frame and returns its length.
fn parse_l4(pkt: &[u8], f: &Frame) -> Result<L4, OffloadError> {
    if f.proto == IPPROTO_TCP {
        if f.l4 + TCP_MIN_HLEN > f.ip_end {
            return Err(truncated("TCP", f.l4, TCP_MIN_HLEN, pkt));
        }
        let doff = get_u8(pkt, f.l4 + 12, "TCP")? >> 4;
        if doff < 5 {
            return Err(OffloadError::BadTcpDataOffset { doff, offset: f.l4 });
        }
        let hlen = usize::from(doff) * 4;
        if f.l4 + hlen > f.ip_end {
            return Err(truncated("TCP", f.l4, hlen, pkt));
        }
        Ok(L4 {
            name: "TCP",
            hlen,
            csum_offset: TCP_CSUM_OFFSET,
        })
    } else {
        if f.l4 + UDP_HLEN > f.ip_end {
            return Err(truncated("UDP", f.l4, UDP_HLEN, pkt));
        }
        Ok(L4 {
            name: "UDP",
            hlen: UDP_HLEN,
            csum_offset: UDP_CSUM_OFFSET,
        })
    }
}

/// Rewrites the IP length (and for IPv4 the id and header checksum) of segment `index`, which
/// `scratch` holds in full.
fn rewrite_ip(scratch: &mut [u8], f: &Frame, index: usize) -> Result<(), OffloadError> {
    let ip_len = scratch.len() - f.l3;
    match f.ip {
        Ip::V4 => {
            let tot_len = u16::try_from(ip_len).map_err(|_| OffloadError::TooLong {
                what: "IPv4 segment",
                len: ip_len,
            })?;
            put_u16(scratch, f.l3 + 2, tot_len, "IPv4 total length")?;
            // Consecutive ids, as Linux's GSO does unless told the id is fixed (which a
            // virtio header cannot say).
            let id = get_u16(scratch, f.l3 + 4, "IPv4")?.wrapping_add(index as u16);
            put_u16(scratch, f.l3 + 4, id, "IPv4 id")?;
            fill_ipv4_checksum(scratch, f)
        }
        Ip::V6 => {
            let payload_len = ip_len - IPV6_HLEN;
            let field = u16::try_from(payload_len).map_err(|_| OffloadError::TooLong {
                what: "IPv6 segment payload",
                len: payload_len,
            })?;
            put_u16(scratch, f.l3 + 4, field, "IPv6 payload length")
        }
    }
}

fn fill_ipv4_checksum(scratch: &mut [u8], f: &Frame) -> Result<(), OffloadError> {
    put_u16(scratch, f.l3 + 10, 0, "IPv4 checksum")?;
    let header = scratch.get(f.l3..f.l4).ok_or(OffloadError::Rewrite {
        what: "IPv4 header",
        offset: f.l3,
        len: scratch.len(),
    })?;
    let csum = !fold(sum_bytes(header, 0));
    put_u16(scratch, f.l3 + 10, csum, "IPv4 checksum")
}

/// Sequence number, flags and checksum of TCP segment `index` of `count`, whose payload
/// starts `payload_start` bytes into the super-frame's payload.
fn rewrite_tcp(
    scratch: &mut [u8],
    f: &Frame,
    index: usize,
    count: usize,
    payload_start: usize,
) -> Result<(), OffloadError> {
    let seq = get_u32(scratch, f.l4 + 4, "TCP")?.wrapping_add(payload_start as u32);
    put_bytes(scratch, f.l4 + 4, &seq.to_be_bytes(), "TCP sequence number")?;
    let mut flags = get_u8(scratch, f.l4 + 13, "TCP")?;
    if index + 1 != count {
        flags &= !(TCP_FIN | TCP_PSH);
    }
    if index != 0 {
        flags &= !TCP_CWR;
    }
    put_bytes(scratch, f.l4 + 13, &[flags], "TCP flags")?;
    fill_l4_checksum(scratch, f, TCP_CSUM_OFFSET)
}

/// Length and checksum of one USO datagram held in `scratch`.
fn rewrite_udp(scratch: &mut [u8], f: &Frame) -> Result<(), OffloadError> {
    let udp_len = scratch.len() - f.l4;
    let field = u16::try_from(udp_len).map_err(|_| OffloadError::TooLong {
        what: "UDP datagram",
        len: udp_len,
    })?;
    put_u16(scratch, f.l4 + 4, field, "UDP length")?;
    fill_l4_checksum(scratch, f, UDP_CSUM_OFFSET)
}

/// One's complement sum of the TCP/UDP pseudo-header (RFC 793 / RFC 8200 section 8.1).
fn pseudo_header_sum(buf: &[u8], f: &Frame, l4_len: usize) -> Result<u64, OffloadError> {
    let addrs = match f.ip {
        Ip::V4 => buf.get(f.l3 + 12..f.l3 + 20),
        Ip::V6 => buf.get(f.l3 + 8..f.l3 + IPV6_HLEN),
    }
    .ok_or(truncated(f.ip.name(), f.l3, f.l4 - f.l3, buf))?;
    // The length is 16 bits for IPv4 and 32 bits for IPv6; both fold the same way.
    let len = l4_len as u64;
    Ok(sum_bytes(
        addrs,
        u64::from(f.proto) + (len >> 16) + (len & 0xffff),
    ))
}

/// Computes the full TCP/UDP checksum of the segment in `scratch` (the L4 header runs to the
/// end of the buffer) and stores it at `f.l4 + csum_offset`.
fn fill_l4_checksum(scratch: &mut [u8], f: &Frame, csum_offset: usize) -> Result<(), OffloadError> {
    let field = f.l4 + csum_offset;
    put_u16(scratch, field, 0, "L4 checksum")?;
    let l4_len = scratch.len() - f.l4;
    let pseudo = pseudo_header_sum(scratch, f, l4_len)?;
    let segment = scratch.get(f.l4..).ok_or(OffloadError::Rewrite {
        what: "L4 segment",
        offset: f.l4,
        len: scratch.len(),
    })?;
    let csum = finish(sum_bytes(segment, pseudo));
    put_u16(scratch, field, csum, "L4 checksum")
}

/// UFO over IPv4: emits the single UDP datagram as IPv4 fragments of at most `gso_size`
/// payload bytes (rounded down to the 8-byte fragment granularity).
fn fragment_udp4<F: FnMut(&VnetHdr, &[u8])>(
    pkt: &[u8],
    f: &Frame,
    gso_size: u16,
    scratch: &mut Vec<u8>,
    mut emit: F,
) -> Result<usize, OffloadError> {
    if f.l4 - f.l3 != IPV4_MIN_HLEN {
        // Options would have to be split by their "copied" bit between first and later
        // fragments; the stack never builds UFO datagrams with options, so refuse them.
        return Err(OffloadError::UfoNotFragmentable {
            reason: "IPv4 options present",
        });
    }
    if get_u16(pkt, f.l3 + 6, "IPv4")? & IPV4_DF != 0 {
        return Err(OffloadError::UfoNotFragmentable {
            reason: "Don't Fragment is set",
        });
    }
    let frag_size = usize::from(gso_size) & !7;
    if frag_size == 0 {
        return Err(OffloadError::FragmentTooSmall { gso_size });
    }
    let datagram = pkt
        .get(f.l4..f.ip_end)
        .ok_or(truncated("UDP", f.l4, UDP_HLEN, pkt))?;
    let udp_len = datagram.len();
    let udp_len_field = u16::try_from(udp_len).map_err(|_| OffloadError::TooLong {
        what: "UFO datagram",
        len: udp_len,
    })?;
    if IPV4_MIN_HLEN + udp_len > 0xffff {
        return Err(OffloadError::TooLong {
            what: "UFO IPv4 datagram",
            len: IPV4_MIN_HLEN + udp_len,
        });
    }
    // Checksum of the whole datagram with the length fixed and the checksum field zeroed
    // (bytes 6..8 skipped; offset 8 is even so word alignment is preserved).
    let ports = datagram
        .get(..4)
        .ok_or(truncated("UDP", f.l4, UDP_HLEN, pkt))?;
    let data = datagram
        .get(UDP_HLEN..)
        .ok_or(truncated("UDP", f.l4, UDP_HLEN, pkt))?;
    let sum = sum_bytes(
        ports,
        pseudo_header_sum(pkt, f, udp_len)? + u64::from(udp_len_field),
    );
    let udp_csum = finish(sum_bytes(data, sum));

    let out = VnetHdr::default();
    let count = udp_len.div_ceil(frag_size);
    for i in 0..count {
        let start = i * frag_size;
        let end = (start + frag_size).min(udp_len);
        let chunk = datagram.get(start..end).ok_or(OffloadError::Rewrite {
            what: "fragment payload",
            offset: f.l4 + start,
            len: pkt.len(),
        })?;
        let headers = pkt
            .get(..f.l4)
            .ok_or(truncated("IPv4", f.l3, IPV4_MIN_HLEN, pkt))?;
        scratch.clear();
        scratch.extend_from_slice(headers);
        scratch.extend_from_slice(chunk);
        if i == 0 {
            put_u16(scratch, f.l4 + 4, udp_len_field, "UDP length")?;
            put_u16(scratch, f.l4 + 6, udp_csum, "UDP checksum")?;
        }
        let ip_len = IPV4_MIN_HLEN + chunk.len();
        put_u16(scratch, f.l3 + 2, ip_len as u16, "IPv4 total length")?;
        let mut frag = (start / 8) as u16;
        if i + 1 != count {
            frag |= IPV4_MF;
        }
        put_u16(scratch, f.l3 + 6, frag, "IPv4 fragment field")?;
        fill_ipv4_checksum(scratch, f)?;
        emit(&out, scratch);
    }
    Ok(count)
}

/// Adds `data` as big-endian 16-bit words (odd tail padded with zero) to `acc`, unfolded.
///
/// Summing 32-bit words is equivalent because 2^16 == 1 modulo 0xffff; the u64 accumulator
/// cannot overflow for any frame (it would take 2^32 words).
fn sum_bytes(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        if let [a, b, c, d] = *w {
            acc += u64::from(u32::from_be_bytes([a, b, c, d]));
        }
    }
    match *words.remainder() {
        [a, b, c] => acc + u64::from(u16::from_be_bytes([a, b])) + (u64::from(c) << 8),
        [a, b] => acc + u64::from(u16::from_be_bytes([a, b])),
        [a] => acc + (u64::from(a) << 8),
        _ => acc,
    }
}

/// Folds an unfolded sum into 16 bits with end-around carry.
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The value to store in a TCP/UDP checksum field: the complement of the folded sum, with 0
/// sent as 0xffff (equal in one's complement; for UDP a 0 would mean "no checksum").
fn finish(acc: u64) -> u16 {
    match !fold(acc) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    // ---- independent reference implementation (RFC 1071, plain 16-bit loop) ----

    fn ref_sum(data: &[u8]) -> u64 {
        let mut s = 0u64;
        let mut i = 0;
        while i + 1 < data.len() {
            s += (u64::from(data[i]) << 8) | u64::from(data[i + 1]);
            i += 2;
        }
        if i < data.len() {
            s += u64::from(data[i]) << 8;
        }
        s
    }

    fn ref_fold(mut s: u64) -> u16 {
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    /// Small deterministic PRNG (xorshift64*), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    // ---- frame builders ----

    const SRC4: [u8; 4] = [10, 0, 0, 1];
    const DST4: [u8; 4] = [10, 0, 0, 2];
    const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const ACK: u8 = 0x10;
    const SEQ0: u32 = 0xffff_f000; // wraps during segmentation

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum V {
        Four,
        Six,
    }

    fn eth(vlans: &[u16], ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1];
        for &tpid in vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&0x0064u16.to_be_bytes()); // VID 100
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn ipv4(l4_len: usize, proto: u8, id: u16, frag: u16) -> Vec<u8> {
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, proto, 0, 0]);
        h.extend_from_slice(&SRC4);
        h.extend_from_slice(&DST4);
        let c = !ref_fold(ref_sum(&h));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    fn ipv6(payload_len: usize, next: u8) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(payload_len as u16).to_be_bytes());
        h.extend_from_slice(&[next, 64]);
        h.extend_from_slice(&SRC6);
        h.extend_from_slice(&DST6);
        h
    }

    /// TCP header with a 12-byte timestamp option block (data offset 8).
    fn tcp(seq: u32, flags: u8) -> Vec<u8> {
        let mut h = vec![0x30, 0x39, 0x00, 0x50];
        h.extend_from_slice(&seq.to_be_bytes());
        h.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        h.extend_from_slice(&[0x80, flags, 0x01, 0xf5, 0, 0, 0, 0]);
        h.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        h
    }

    fn udp(len: usize) -> Vec<u8> {
        let mut h = vec![0x30, 0x39, 0x00, 0x35];
        h.extend_from_slice(&(len as u16).to_be_bytes());
        h.extend_from_slice(&[0, 0]);
        h
    }

    fn pseudo(v: V, proto: u8, len: usize) -> u64 {
        let addrs = match v {
            V::Four => [&SRC4[..], &DST4[..]].concat(),
            V::Six => [&SRC6[..], &DST6[..]].concat(),
        };
        ref_sum(&addrs) + u64::from(proto) + (len as u64 >> 16) + (len as u64 & 0xffff)
    }

    /// Builds a frame `eth | ip [| ext] | l4 | payload` and the header a kernel would give it:
    /// NEEDS_CSUM at the L4 header with the folded pseudo-header sum in the checksum field.
    fn frame(
        v: V,
        vlans: &[u16],
        ext: &[u8],
        l4: &[u8],
        proto: u8,
        payload: &[u8],
    ) -> (VnetHdr, Vec<u8>) {
        let l4_len = l4.len() + payload.len();
        let (ethertype, ip) = match v {
            V::Four => (ETH_P_IPV4, ipv4(l4_len, proto, 0xfffe, IPV4_DF)),
            V::Six => {
                let next = if ext.is_empty() {
                    proto
                } else {
                    IPPROTO_DSTOPTS
                };
                (ETH_P_IPV6, ipv6(ext.len() + l4_len, next))
            }
        };
        let mut f = eth(vlans, ethertype);
        f.extend_from_slice(&ip);
        f.extend_from_slice(ext);
        let l4_off = f.len();
        f.extend_from_slice(l4);
        f.extend_from_slice(payload);
        let csum_offset = if proto == IPPROTO_TCP { 16 } else { 6 };
        let partial = ref_fold(pseudo(v, proto, l4_len));
        f[l4_off + csum_offset..l4_off + csum_offset + 2].copy_from_slice(&partial.to_be_bytes());
        let hdr = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_NONE,
            hdr_len: (l4_off + l4.len()) as u16,
            gso_size: 0,
            csum_start: l4_off as u16,
            csum_offset: csum_offset as u16,
        };
        (hdr, f)
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn tcp_gso(
        v: V,
        vlans: &[u16],
        ext: &[u8],
        n: usize,
        flags: u8,
        mss: u16,
    ) -> (VnetHdr, Vec<u8>) {
        let (mut hdr, f) = frame(v, vlans, ext, &tcp(SEQ0, flags), IPPROTO_TCP, &payload(n));
        hdr.gso_type = if v == V::Four {
            VIRTIO_NET_HDR_GSO_TCPV4
        } else {
            VIRTIO_NET_HDR_GSO_TCPV6
        };
        hdr.gso_size = mss;
        (hdr, f)
    }

    /// Destination Options header (8 bytes, PadN) announcing TCP next.
    fn dstopts(next: u8) -> Vec<u8> {
        vec![next, 0, 1, 4, 0, 0, 0, 0]
    }

    // ---- independent verifier of an emitted frame ----

    #[derive(Debug)]
    struct Parsed {
        v: V,
        l3: usize,
        l4: usize,
        proto: u8,
    }

    /// Parses an emitted frame and asserts its IP length field and all checksums.
    fn verify(f: &[u8]) -> Parsed {
        let mut off = 12;
        while u16::from_be_bytes([f[off], f[off + 1]]) == 0x8100
            || u16::from_be_bytes([f[off], f[off + 1]]) == 0x88a8
        {
            off += 4;
        }
        let l3 = off + 2;
        let (v, l4, proto) = match u16::from_be_bytes([f[off], f[off + 1]]) {
            0x0800 => {
                let ihl = usize::from(f[l3] & 15) * 4;
                assert_eq!(
                    ref_fold(ref_sum(&f[l3..l3 + ihl])),
                    0xffff,
                    "IPv4 header checksum"
                );
                let tot = usize::from(u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]));
                assert_eq!(tot, f.len() - l3, "IPv4 total length");
                (V::Four, l3 + ihl, f[l3 + 9])
            }
            0x86dd => {
                let plen = usize::from(u16::from_be_bytes([f[l3 + 4], f[l3 + 5]]));
                assert_eq!(plen, f.len() - l3 - 40, "IPv6 payload length");
                let mut next = f[l3 + 6];
                let mut o = l3 + 40;
                while next == 0 || next == 60 {
                    next = f[o];
                    o += (usize::from(f[o + 1]) + 1) * 8;
                }
                (V::Six, o, next)
            }
            e => panic!("unexpected ethertype {e:#x}"),
        };
        let frag = v == V::Four && u16::from_be_bytes([f[l3 + 6], f[l3 + 7]]) & 0x3fff != 0;
        if !frag {
            let addrs = match v {
                V::Four => &f[l3 + 12..l3 + 20],
                V::Six => &f[l3 + 8..l3 + 40],
            };
            let len = (f.len() - l4) as u64;
            let s = ref_sum(addrs)
                + u64::from(proto)
                + (len >> 16)
                + (len & 0xffff)
                + ref_sum(&f[l4..]);
            assert_eq!(ref_fold(s), 0xffff, "L4 checksum of {v:?}/{proto}");
            if proto == IPPROTO_UDP {
                assert_eq!(
                    usize::from(u16::from_be_bytes([f[l4 + 4], f[l4 + 5]])),
                    f.len() - l4
                );
            }
        }
        Parsed { v, l3, l4, proto }
    }

    /// What a call returned, and the frames it emitted.
    type Outcome = (Result<usize, OffloadError>, Vec<(VnetHdr, Vec<u8>)>);

    fn collect(
        r: impl FnOnce(&mut dyn FnMut(&VnetHdr, &[u8])) -> Result<usize, OffloadError>,
    ) -> Outcome {
        let mut out = Vec::new();
        let res = r(&mut |h: &VnetHdr, f: &[u8]| out.push((*h, f.to_vec())));
        (res, out)
    }

    fn run_segment(hdr: &VnetHdr, pkt: &[u8]) -> Outcome {
        let mut scratch = Vec::new();
        collect(|e| segment(hdr, pkt, &mut scratch, e))
    }

    // ---- checksum ----

    #[test]
    fn sum_matches_rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_bytes(&data, 0)), 0xddf2);
        assert_eq!(!fold(sum_bytes(&data, 0)), 0x220d);
    }

    #[test]
    fn ipv4_header_checksum_matches_published_example() {
        // The IPv4 header example used by Wikipedia's "Internet checksum" article: b861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(!fold(sum_bytes(&h, 0)), 0xb861);
        let f = Frame {
            l3: 0,
            ip: Ip::V4,
            l4: 20,
            proto: 17,
            ip_end: 20,
        };
        fill_ipv4_checksum(&mut h, &f).unwrap();
        assert_eq!(&h[10..12], &[0xb8, 0x61]);
    }

    #[test]
    fn sum_agrees_with_reference_for_all_lengths_and_alignments() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let data = rng.bytes(3000);
        for start in 0..9 {
            for len in (0..2000).step_by(13).chain(1990..2000) {
                let d = &data[start..start + len];
                assert_eq!(
                    fold(sum_bytes(d, 0)),
                    ref_fold(ref_sum(d)),
                    "start {start} len {len}"
                );
            }
        }
    }

    #[test]
    fn completes_tcp4_partial_checksum() {
        // Odd payload length exercises the padded tail byte.
        let (mut hdr, mut f) = frame(
            V::Four,
            &[],
            &[],
            &tcp(1000, ACK | TCP_PSH),
            IPPROTO_TCP,
            &payload(1001),
        );
        let l4 = usize::from(hdr.csum_start);
        // Reference: checksum over pseudo-header + segment with the field zeroed.
        let mut zeroed = f.clone();
        zeroed[l4 + 16..l4 + 18].fill(0);
        let expect = !ref_fold(pseudo(V::Four, 6, f.len() - l4) + ref_sum(&zeroed[l4..]));
        complete_checksum(&mut hdr, &mut f).unwrap();
        assert_eq!(u16::from_be_bytes([f[l4 + 16], f[l4 + 17]]), expect);
        assert_eq!(hdr.flags, VIRTIO_NET_HDR_F_DATA_VALID);
        verify(&f);
        // Only the checksum field changed.
        zeroed[l4 + 16..l4 + 18].copy_from_slice(&expect.to_be_bytes());
        assert_eq!(f, zeroed);
    }

    #[test]
    fn completes_udp6_partial_checksum_behind_vlan() {
        let data = payload(333);
        let (mut hdr, mut f) = frame(
            V::Six,
            &[ETH_P_8021Q],
            &[],
            &udp(8 + data.len()),
            IPPROTO_UDP,
            &data,
        );
        assert_eq!(hdr.csum_start, 14 + 4 + 40);
        complete_checksum(&mut hdr, &mut f).unwrap();
        assert!(!hdr.needs_csum());
        let p = verify(&f);
        assert_eq!((p.v, p.proto), (V::Six, IPPROTO_UDP));
    }

    #[test]
    fn zero_result_is_sent_as_ffff() {
        // Bytes summing to 0xffff complement to 0, which must go out as 0xffff.
        let mut hdr = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: 0,
            csum_offset: 2,
            ..Default::default()
        };
        let mut f = [0xff, 0xff, 0, 0];
        complete_checksum(&mut hdr, &mut f).unwrap();
        assert_eq!(f, [0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn checksum_offsets_are_bounds_checked() {
        let base = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            ..Default::default()
        };
        let mut f = vec![0u8; 60];
        let cases = [
            (
                60,
                0,
                OffloadError::CsumStartBeyondFrame {
                    csum_start: 60,
                    len: 60,
                },
            ),
            (
                0xffff,
                0,
                OffloadError::CsumStartBeyondFrame {
                    csum_start: 0xffff,
                    len: 60,
                },
            ),
            (
                50,
                10,
                OffloadError::CsumFieldBeyondFrame {
                    csum_start: 50,
                    csum_offset: 10,
                    len: 60,
                },
            ),
            (
                58,
                2,
                OffloadError::CsumFieldBeyondFrame {
                    csum_start: 58,
                    csum_offset: 2,
                    len: 60,
                },
            ),
            (
                0,
                0xfffe,
                OffloadError::CsumFieldBeyondFrame {
                    csum_start: 0,
                    csum_offset: 0xfffe,
                    len: 60,
                },
            ),
            (34, 7, OffloadError::CsumOffsetOdd { csum_offset: 7 }),
        ];
        for (start, off, err) in cases {
            let mut h = VnetHdr {
                csum_start: start,
                csum_offset: off,
                ..base
            };
            assert_eq!(complete_checksum(&mut h, &mut f), Err(err));
            assert!(h.needs_csum(), "header untouched on error");
        }
        assert!(f.iter().all(|&b| b == 0), "frame untouched on error");
        // Last valid position works.
        let mut h = VnetHdr {
            csum_start: 56,
            csum_offset: 2,
            ..base
        };
        complete_checksum(&mut h, &mut f).unwrap();
        assert_eq!(&f[58..], &[0xff, 0xff]);
        // Without NEEDS_CSUM nothing is done, whatever the offsets say.
        let mut h = VnetHdr {
            csum_start: 0xffff,
            csum_offset: 0xffff,
            ..Default::default()
        };
        complete_checksum(&mut h, &mut f).unwrap();
        assert_eq!(h.flags, 0);
    }

    // ---- segmentation ----

    /// Checks segments of a TCP super-frame against the original, returns them.
    fn check_tcp_segments(hdr: &VnetHdr, pkt: &[u8], mss: usize) -> Vec<(VnetHdr, Vec<u8>)> {
        let (res, segs) = run_segment(hdr, pkt);
        let n = res.unwrap();
        let orig = verify_structure(pkt);
        let hlen = orig.l4 + usize::from(pkt[orig.l4 + 12] >> 4) * 4;
        let orig_payload = &pkt[hlen..];
        assert_eq!(n, orig_payload.len().div_ceil(mss).max(1));
        assert_eq!(segs.len(), n);
        let orig_flags = pkt[orig.l4 + 13];
        let orig_id = u16::from_be_bytes([pkt[orig.l3 + 4], pkt[orig.l3 + 5]]);
        let mut joined = Vec::new();
        for (i, (h, s)) in segs.iter().enumerate() {
            assert_eq!(
                *h,
                VnetHdr {
                    flags: VIRTIO_NET_HDR_F_DATA_VALID,
                    ..Default::default()
                }
            );
            assert!(s.len() <= usize::from(hdr.hdr_len) + usize::from(hdr.gso_size));
            let p = verify(s);
            assert_eq!((p.l3, p.l4, p.proto), (orig.l3, orig.l4, IPPROTO_TCP));
            // Everything before the IP header (MACs, VLAN tags) is copied verbatim.
            assert_eq!(&s[..p.l3], &pkt[..p.l3]);
            let seq = u32::from_be_bytes(s[p.l4 + 4..p.l4 + 8].try_into().unwrap());
            assert_eq!(
                seq,
                SEQ0.wrapping_add((i * mss) as u32),
                "seq of segment {i}"
            );
            if p.v == V::Four {
                let id = u16::from_be_bytes([s[p.l3 + 4], s[p.l3 + 5]]);
                assert_eq!(id, orig_id.wrapping_add(i as u16), "IPv4 id of segment {i}");
            }
            let flags = s[p.l4 + 13];
            let last = i + 1 == n;
            let mut expect = orig_flags;
            if !last {
                expect &= !(TCP_FIN | TCP_PSH);
            }
            if i != 0 {
                expect &= !TCP_CWR;
            }
            assert_eq!(flags, expect, "flags of segment {i}");
            // TCP options, window, ack are carried over.
            assert_eq!(&s[p.l4 + 8..p.l4 + 13], &pkt[orig.l4 + 8..orig.l4 + 13]);
            assert_eq!(&s[p.l4 + 14..p.l4 + 16], &pkt[orig.l4 + 14..orig.l4 + 16]);
            assert_eq!(&s[p.l4 + 20..hlen], &pkt[orig.l4 + 20..hlen]);
            let seg_payload = &s[hlen..];
            assert!(seg_payload.len() <= mss);
            if !last {
                assert_eq!(seg_payload.len(), mss);
            }
            joined.extend_from_slice(seg_payload);
        }
        assert_eq!(joined, orig_payload);
        segs
    }

    /// Like `verify` but without checksum checks (a super-frame only has a partial one).
    fn verify_structure(f: &[u8]) -> Parsed {
        let mut copy = f.to_vec();
        let mut h = VnetHdr::default();
        let (v, l3) = {
            let mut off = 12;
            while matches!(u16::from_be_bytes([f[off], f[off + 1]]), 0x8100 | 0x88a8) {
                off += 4;
            }
            (if f[off] == 0x08 { V::Four } else { V::Six }, off + 2)
        };
        let (l4, proto) = if v == V::Four {
            (l3 + usize::from(f[l3] & 15) * 4, f[l3 + 9])
        } else {
            let mut next = f[l3 + 6];
            let mut o = l3 + 40;
            while next == 0 || next == 60 {
                next = f[o];
                o += (usize::from(f[o + 1]) + 1) * 8;
            }
            (o, next)
        };
        // Completing the partial checksum must give a verifiable frame too.
        h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        h.csum_start = l4 as u16;
        h.csum_offset = if proto == IPPROTO_TCP { 16 } else { 6 };
        complete_checksum(&mut h, &mut copy).unwrap();
        Parsed { v, l3, l4, proto }
    }

    #[test]
    fn segments_tcp4_super_frame() {
        let (hdr, pkt) = tcp_gso(V::Four, &[], &[], 5000, ACK | TCP_PSH | TCP_FIN, 1448);
        assert_eq!(pkt.len(), 14 + 20 + 32 + 5000);
        let segs = check_tcp_segments(&hdr, &pkt, 1448);
        assert_eq!(segs.len(), 4);
        let lens: Vec<usize> = segs.iter().map(|(_, s)| s.len()).collect();
        assert_eq!(lens, vec![66 + 1448, 66 + 1448, 66 + 1448, 66 + 656]);
        // The IPv4 id started at 0xfffe: it wraps.
        let ids: Vec<u16> = segs
            .iter()
            .map(|(_, s)| u16::from_be_bytes([s[18], s[19]]))
            .collect();
        assert_eq!(ids, vec![0xfffe, 0xffff, 0, 1]);
        // DF is preserved.
        assert!(segs.iter().all(|(_, s)| s[20] & 0x40 != 0));
    }

    #[test]
    fn segments_tcp4_exact_multiple_and_tiny_mss() {
        let (hdr, pkt) = tcp_gso(V::Four, &[], &[], 4 * 1000, ACK | TCP_PSH, 1000);
        assert_eq!(check_tcp_segments(&hdr, &pkt, 1000).len(), 4);
        let (hdr, pkt) = tcp_gso(V::Four, &[], &[], 777, ACK, 1);
        assert_eq!(check_tcp_segments(&hdr, &pkt, 1).len(), 777);
        // Payload not larger than the MSS: one segment with full checksums.
        let (hdr, pkt) = tcp_gso(V::Four, &[], &[], 100, ACK | TCP_FIN, 1448);
        assert_eq!(check_tcp_segments(&hdr, &pkt, 1448).len(), 1);
        // No payload at all still yields the (pure ACK) segment.
        let (hdr, pkt) = tcp_gso(V::Four, &[], &[], 0, ACK, 1448);
        assert_eq!(check_tcp_segments(&hdr, &pkt, 1448).len(), 1);
    }

    #[test]
    fn segments_tcp6_super_frame() {
        let (hdr, pkt) = tcp_gso(V::Six, &[], &[], 65000, ACK | TCP_PSH, 1428);
        let segs = check_tcp_segments(&hdr, &pkt, 1428);
        assert_eq!(segs.len(), 65000usize.div_ceil(1428));
        assert!(segs.iter().all(|(_, s)| s.len() <= 14 + 40 + 32 + 1428));
    }

    #[test]
    fn segments_tcp6_with_destination_options() {
        let ext = dstopts(IPPROTO_TCP);
        let (hdr, pkt) = tcp_gso(V::Six, &[], &ext, 3000, ACK | TCP_FIN, 1400);
        assert_eq!(hdr.csum_start, 14 + 40 + 8);
        let segs = check_tcp_segments(&hdr, &pkt, 1400);
        assert_eq!(segs.len(), 3);
        for (_, s) in &segs {
            assert_eq!(s[14 + 6], IPPROTO_DSTOPTS);
            assert_eq!(&s[54..62], &ext[..]);
        }
    }

    #[test]
    fn ecn_cwr_only_on_first_segment() {
        let (mut hdr, pkt) = tcp_gso(
            V::Four,
            &[],
            &[],
            4000,
            ACK | TCP_CWR | 0x40, /* ECE */
            1448,
        );
        hdr.gso_type |= VIRTIO_NET_HDR_GSO_ECN;
        let segs = check_tcp_segments(&hdr, &pkt, 1448);
        let flags: Vec<u8> = segs.iter().map(|(_, s)| s[14 + 20 + 13]).collect();
        assert_eq!(flags, vec![ACK | TCP_CWR | 0x40, ACK | 0x40, ACK | 0x40]);

        // Acceptance: ECN-flagged TSO needs GUEST_ECN on top of GUEST_TSO4.
        let no_ecn = RxOffloads {
            csum: true,
            tso4: true,
            ..Default::default()
        };
        assert!(!no_ecn.accepts(&hdr));
        assert!(RxOffloads {
            ecn: true,
            ..no_ecn
        }
        .accepts(&hdr));
        let mut scratch = Vec::new();
        let (res, out) = collect(|e| adapt_for_guest(no_ecn, &hdr, &pkt, &mut scratch, e));
        assert_eq!(res, Ok(3));
        assert_eq!(
            out.iter()
                .filter(|(_, s)| s[14 + 20 + 13] & TCP_CWR != 0)
                .count(),
            1
        );

        // Same over IPv6.
        let (mut hdr, pkt) = tcp_gso(V::Six, &[], &[], 3000, ACK | TCP_CWR, 1000);
        hdr.gso_type |= VIRTIO_NET_HDR_GSO_ECN;
        let segs = check_tcp_segments(&hdr, &pkt, 1000);
        assert_eq!(
            segs.iter()
                .filter(|(_, s)| s[14 + 40 + 13] & TCP_CWR != 0)
                .count(),
            1
        );
    }

    #[test]
    fn segments_vlan_tagged_frames() {
        let (hdr, pkt) = tcp_gso(V::Four, &[ETH_P_8021Q], &[], 3000, ACK | TCP_PSH, 1448);
        assert_eq!(hdr.csum_start, 14 + 4 + 20);
        let segs = check_tcp_segments(&hdr, &pkt, 1448);
        assert_eq!(segs.len(), 3);
        assert!(segs
            .iter()
            .all(|(_, s)| s[12..18] == [0x81, 0, 0, 0x64, 0x08, 0]));

        let (hdr, pkt) = tcp_gso(V::Six, &[ETH_P_8021AD, ETH_P_8021Q], &[], 3000, ACK, 1448);
        assert_eq!(check_tcp_segments(&hdr, &pkt, 1448).len(), 3);

        let (hdr, pkt) = tcp_gso(V::Four, &[ETH_P_8021Q; 3], &[], 3000, ACK, 1448);
        // The third tag's TPID sits at 12 + 2 * 4.
        assert_eq!(
            run_segment(&hdr, &pkt).0,
            Err(OffloadError::TooManyVlanTags { offset: 20 })
        );
    }

    #[test]
    fn segments_uso_datagrams() {
        for v in [V::Four, V::Six] {
            let data = payload(4000);
            let (mut hdr, pkt) = frame(
                v,
                &[ETH_P_8021Q],
                &[],
                &udp(8 + data.len()),
                IPPROTO_UDP,
                &data,
            );
            hdr.gso_type = VIRTIO_NET_HDR_GSO_UDP_L4;
            hdr.gso_size = 1200;
            assert!(
                !RxOffloads::from_features(u64::MAX).accepts(&hdr),
                "no USO bit: always segmented"
            );
            let (res, segs) = run_segment(&hdr, &pkt);
            assert_eq!(res, Ok(4));
            let mut joined = Vec::new();
            for (i, (h, s)) in segs.iter().enumerate() {
                assert_eq!(h.flags, VIRTIO_NET_HDR_F_DATA_VALID);
                let p = verify(s);
                assert_eq!(p.proto, IPPROTO_UDP);
                if v == V::Four {
                    assert_eq!(
                        u16::from_be_bytes([s[p.l3 + 4], s[p.l3 + 5]]),
                        0xfffeu16.wrapping_add(i as u16)
                    );
                }
                assert_eq!(&s[p.l4..p.l4 + 4], &pkt[p.l4..p.l4 + 4], "ports");
                joined.extend_from_slice(&s[p.l4 + 8..]);
            }
            assert_eq!(joined, data);
            assert_eq!(
                segs.last().map(|(_, s)| s.len()),
                Some(14 + 4 + if v == V::Four { 20 } else { 40 } + 8 + 400)
            );
        }
    }

    #[test]
    fn ufo_ipv4_becomes_fragments() {
        let data = payload(3001);
        let (mut hdr, mut pkt) = frame(V::Four, &[], &[], &udp(8 + data.len()), IPPROTO_UDP, &data);
        // UFO datagrams are sent without DF; rebuild the IPv4 header accordingly.
        pkt[14..34].copy_from_slice(&ipv4(8 + data.len(), IPPROTO_UDP, 0x4242, 0));
        hdr.gso_type = VIRTIO_NET_HDR_GSO_UDP;
        hdr.gso_size = 1475; // rounded down to 1472
        let (res, frags) = run_segment(&hdr, &pkt);
        assert_eq!(res, Ok(3));
        let mut datagram = Vec::new();
        for (i, (h, s)) in frags.iter().enumerate() {
            assert_eq!(*h, VnetHdr::default(), "no DATA_VALID on a fragment");
            verify(s); // IPv4 header checksum and total length
            assert!(s.len() <= 14 + 20 + 1472);
            assert_eq!(
                u16::from_be_bytes([s[18], s[19]]),
                0x4242,
                "same id in all fragments"
            );
            let frag = u16::from_be_bytes([s[20], s[21]]);
            assert_eq!(
                usize::from(frag & 0x1fff) * 8,
                datagram.len(),
                "fragment offset"
            );
            assert_eq!(
                frag & IPV4_MF != 0,
                i + 1 != frags.len(),
                "MF on all but the last"
            );
            datagram.extend_from_slice(&s[34..]);
        }
        // The reassembled datagram carries a valid checksum over all of it.
        assert_eq!(datagram.len(), 8 + data.len());
        assert_eq!(&datagram[8..], &data[..]);
        assert_eq!(
            u16::from_be_bytes([datagram[4], datagram[5]]) as usize,
            datagram.len()
        );
        assert_eq!(
            ref_fold(pseudo(V::Four, IPPROTO_UDP, datagram.len()) + ref_sum(&datagram)),
            0xffff
        );

        // Refusals.
        let mut df = pkt.clone();
        df[14..34].copy_from_slice(&ipv4(8 + data.len(), IPPROTO_UDP, 1, IPV4_DF));
        assert!(matches!(
            run_segment(&hdr, &df).0,
            Err(OffloadError::UfoNotFragmentable { .. })
        ));
        let small = VnetHdr { gso_size: 7, ..hdr };
        assert_eq!(
            run_segment(&small, &pkt).0,
            Err(OffloadError::FragmentTooSmall { gso_size: 7 })
        );
        let (mut h6, p6) = frame(V::Six, &[], &[], &udp(8 + data.len()), IPPROTO_UDP, &data);
        h6.gso_type = VIRTIO_NET_HDR_GSO_UDP;
        h6.gso_size = 1400;
        assert_eq!(run_segment(&h6, &p6).0, Err(OffloadError::Ipv6Ufo));
    }

    #[test]
    fn big_tcp_ipv4_with_zero_total_length() {
        let (hdr, mut pkt) = tcp_gso(V::Four, &[], &[], 70_000, ACK, 1448);
        pkt[16..18].fill(0);
        assert_eq!(
            check_tcp_segments(&hdr, &pkt, 1448).len(),
            70_000usize.div_ceil(1448)
        );
        // A segment that would not fit the 16-bit length field is refused.
        let huge = VnetHdr {
            gso_size: 0xffff,
            ..hdr
        };
        assert_eq!(
            run_segment(&huge, &pkt).0,
            Err(OffloadError::TooLong {
                what: "IPv4 segment",
                len: 20 + 32 + 0xffff
            })
        );
    }

    #[test]
    fn scratch_is_reused_without_reallocation() {
        let (hdr, pkt) = tcp_gso(V::Four, &[], &[], 20_000, ACK, 1448);
        let mut scratch = Vec::new();
        segment(&hdr, &pkt, &mut scratch, |_, _| {}).unwrap();
        let (cap, ptr) = (scratch.capacity(), scratch.as_ptr());
        for _ in 0..3 {
            let mut n = 0;
            segment(&hdr, &pkt, &mut scratch, |_, f| {
                assert_eq!(f.as_ptr(), ptr, "segments are built in scratch");
                n += 1;
            })
            .unwrap();
            assert_eq!(n, 14);
            assert_eq!((scratch.capacity(), scratch.as_ptr()), (cap, ptr));
        }
    }

    // ---- feature negotiation and the RX entry point ----

    #[test]
    fn offloads_from_feature_bits() {
        assert_eq!(RxOffloads::from_features(0), RxOffloads::default());
        let f = (1 << 1) | (1 << 7) | (1 << 9) | (1 << 11) | (1 << 0) | (1 << 32);
        assert_eq!(
            RxOffloads::from_features(f),
            RxOffloads {
                csum: true,
                tso4: true,
                tso6: false,
                ecn: true,
                ufo: false
            }
        );
        assert_eq!(
            RxOffloads::from_features((1 << 8) | (1 << 10)),
            RxOffloads {
                tso6: true,
                ufo: true,
                ..Default::default()
            }
        );
    }

    #[test]
    fn acceptance_table() {
        let all = RxOffloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
            ufo: true,
        };
        let none = RxOffloads::default();
        let h = |flags, gso_type| VnetHdr {
            flags,
            gso_type,
            gso_size: 1000,
            ..Default::default()
        };
        let n = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        let v = VIRTIO_NET_HDR_F_DATA_VALID;
        for (hdr, by_all, by_none) in [
            (h(0, 0), true, true),
            (h(v, 0), true, true),
            (h(n, 0), true, false),
            (h(4, 0), false, false), // RSC_INFO without GUEST_RSC
            (h(0, VIRTIO_NET_HDR_GSO_ECN), false, false),
            (h(n, 1), true, false),
            (h(n, 4), true, false),
            (h(n, 3), true, false),
            (h(n, 5), false, false), // USO: no bit here
            (h(n, 2), false, false),
            (h(n, 0x81), true, false),
            (h(n, 0x83), false, false),
        ] {
            assert_eq!(all.accepts(&hdr), by_all, "{hdr:?} by all");
            assert_eq!(none.accepts(&hdr), by_none, "{hdr:?} by none");
        }
        // GSO without GUEST_CSUM is never accepted, even with the TSO bit (invalid negotiation).
        let no_csum = RxOffloads { csum: false, ..all };
        assert!(!no_csum.accepts(&h(0, 1)));
        assert!(!RxOffloads { tso4: false, ..all }.accepts(&h(n, 1)));
        assert!(!RxOffloads { tso6: false, ..all }.accepts(&h(n, 4)));
        assert!(!RxOffloads { ufo: false, ..all }.accepts(&h(n, 3)));
    }

    #[test]
    fn adapt_passes_accepted_frames_through_untouched() {
        let (hdr, pkt) = tcp_gso(V::Four, &[], &[], 5000, ACK, 1448);
        let guest = RxOffloads {
            csum: true,
            tso4: true,
            ..Default::default()
        };
        let mut scratch = Vec::new();
        let mut seen = Vec::new();
        let n = adapt_for_guest(guest, &hdr, &pkt, &mut scratch, |h, f| {
            seen.push((*h, f.as_ptr(), f.len()))
        });
        assert_eq!(n, Ok(1));
        assert_eq!(seen, vec![(hdr, pkt.as_ptr(), pkt.len())]);
        assert!(scratch.is_empty());
    }

    #[test]
    fn adapt_segments_for_a_guest_without_tso() {
        let (hdr, pkt) = tcp_gso(V::Six, &[], &[], 5000, ACK, 1448);
        for guest in [
            RxOffloads::default(),
            RxOffloads {
                csum: true,
                tso4: true,
                ..Default::default()
            },
        ] {
            let mut scratch = Vec::new();
            let (res, out) = collect(|e| adapt_for_guest(guest, &hdr, &pkt, &mut scratch, e));
            assert_eq!(res, Ok(4));
            for (h, s) in &out {
                assert!(!h.is_gso() && !h.needs_csum());
                assert!(s.len() <= 14 + 40 + 32 + 1448);
                verify(s);
            }
        }
    }

    #[test]
    fn adapt_completes_checksum_for_a_guest_without_csum() {
        let data = payload(99);
        let (hdr, pkt) = frame(V::Four, &[], &[], &udp(8 + data.len()), IPPROTO_UDP, &data);
        let mut scratch = Vec::new();
        let (res, out) =
            collect(|e| adapt_for_guest(RxOffloads::default(), &hdr, &pkt, &mut scratch, e));
        assert_eq!(res, Ok(1));
        let (h, f) = &out[0];
        assert_eq!(h.flags, VIRTIO_NET_HDR_F_DATA_VALID);
        assert_eq!(f.len(), pkt.len());
        verify(f);
        // A guest with GUEST_CSUM gets it with the partial checksum still in place.
        let guest = RxOffloads {
            csum: true,
            ..Default::default()
        };
        let (_, out) = collect(|e| adapt_for_guest(guest, &hdr, &pkt, &mut scratch, e));
        assert_eq!(out, vec![(hdr, pkt.clone())]);
        // Unknown flags are stripped, the frame is passed as is.
        let odd = VnetHdr {
            flags: 4 | VIRTIO_NET_HDR_F_DATA_VALID,
            ..VnetHdr::default()
        };
        let (_, out) = collect(|e| adapt_for_guest(guest, &odd, &pkt, &mut scratch, e));
        assert_eq!(
            out,
            vec![(
                VnetHdr {
                    flags: VIRTIO_NET_HDR_F_DATA_VALID,
                    ..Default::default()
                },
                pkt.clone()
            )]
        );
        // A bad checksum offset is an error, not a frame.
        let bad = VnetHdr {
            csum_start: 4000,
            ..hdr
        };
        let (res, out) =
            collect(|e| adapt_for_guest(RxOffloads::default(), &bad, &pkt, &mut scratch, e));
        assert!(matches!(
            res,
            Err(OffloadError::CsumStartBeyondFrame {
                csum_start: 4000,
                ..
            })
        ));
        assert!(out.is_empty());
    }

    // ---- malformed input ----

    fn expect_err(hdr: &VnetHdr, pkt: &[u8], check: impl Fn(&OffloadError) -> bool) {
        let (res, out) = run_segment(hdr, pkt);
        match res {
            Err(e) => {
                assert!(check(&e), "unexpected error {e:?}");
                assert!(!e.to_string().is_empty());
            }
            Ok(n) => panic!("accepted a malformed frame ({n} segments)"),
        }
        assert!(out.is_empty(), "nothing emitted before an error is found");
        let mut scratch = Vec::new();
        let all = RxOffloads::default();
        assert!(adapt_for_guest(all, hdr, pkt, &mut scratch, |_, _| {}).is_err());
    }

    #[test]
    fn malformed_gso_frames_are_refused() {
        use OffloadError as E;
        let (hdr, pkt) = tcp_gso(V::Four, &[], &[], 3000, ACK, 1448);
        let (hdr6, pkt6) = tcp_gso(V::Six, &[], &[], 3000, ACK, 1448);
        let h0 = VnetHdr { hdr_len: 0, ..hdr };
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut p = pkt.clone();
            f(&mut p);
            p
        };
        let with6 = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut p = pkt6.clone();
            f(&mut p);
            p
        };

        expect_err(&VnetHdr { gso_size: 0, ..hdr }, &pkt, |e| {
            *e == E::ZeroGsoSize { gso_type: 1 }
        });
        expect_err(
            &VnetHdr {
                hdr_len: 4000,
                ..hdr
            },
            &pkt,
            |e| matches!(e, E::HdrLenBeyondFrame { hdr_len: 4000, .. }),
        );
        expect_err(&VnetHdr { gso_type: 2, ..hdr }, &pkt, |e| {
            *e == E::UnsupportedGsoType { gso_type: 2 }
        });
        expect_err(
            &VnetHdr {
                gso_type: 0x86,
                ..hdr
            },
            &pkt,
            |e| matches!(e, E::UnsupportedGsoType { .. }),
        );
        expect_err(
            &VnetHdr {
                csum_start: 36,
                ..hdr
            },
            &pkt,
            |e| matches!(e, E::CsumDisagrees { l4_offset: 34, .. }),
        );
        expect_err(
            &VnetHdr {
                csum_offset: 6,
                ..hdr
            },
            &pkt,
            |e| matches!(e, E::CsumDisagrees { .. }),
        );
        // Truncations at every layer.
        for cut in [0, 5, 13, 20, 33, 40, 53, 60] {
            expect_err(&VnetHdr { hdr_len: 0, ..hdr }, &pkt[..cut], |e| {
                matches!(e, E::Truncated { .. } | E::BadIpLength { .. })
            });
        }
        expect_err(&h0, &pkt[..14], |e| {
            matches!(
                e,
                E::Truncated {
                    what: "IPv4",
                    offset: 14,
                    ..
                }
            )
        });
        expect_err(&VnetHdr { hdr_len: 0, ..hdr6 }, &pkt6[..50], |e| {
            matches!(e, E::Truncated { what: "IPv6", .. })
        });
        // IHL below 5, and IHL pointing past the frame.
        expect_err(&hdr, &with(&|p| p[14] = 0x44), |e| {
            *e == E::BadIhl { ihl: 4, offset: 14 }
        });
        expect_err(&h0, &pkt[..40], |e| {
            matches!(
                e,
                E::BadIpLength {
                    field: 3052,
                    available: 26,
                    ..
                }
            )
        });
        let mut short = pkt[..14].to_vec();
        short.extend_from_slice(&[0x4f; 30]);
        expect_err(&h0, &short, |e| {
            matches!(
                e,
                E::Truncated {
                    what: "IPv4",
                    needed: 60,
                    available: 30,
                    ..
                }
            )
        });
        // Length fields that disagree with the frame.
        expect_err(
            &hdr,
            &with(&|p| p[16..18].copy_from_slice(&100u16.to_be_bytes())),
            |e| {
                matches!(
                    e,
                    E::BadIpLength {
                        ip: "IPv4",
                        field: 100,
                        ..
                    }
                )
            },
        );
        expect_err(&hdr, &with(&|p| p.push(0)), |e| {
            matches!(e, E::BadIpLength { .. })
        });
        expect_err(&hdr, &with(&|p| p[16..18].fill(0)), |e| {
            matches!(e, E::BadIpLength { field: 0, .. })
        });
        expect_err(
            &hdr6,
            &with6(&|p| p[18..20].copy_from_slice(&9u16.to_be_bytes())),
            |e| matches!(e, E::BadIpLength { ip: "IPv6", .. }),
        );
        // Version, ethertype, fragments.
        expect_err(&hdr, &with(&|p| p[14] = 0x65), |e| {
            matches!(e, E::IpVersionMismatch { version: 6, .. })
        });
        expect_err(
            &hdr,
            &with(&|p| p[12..14].copy_from_slice(&0x0806u16.to_be_bytes())),
            |e| {
                *e == E::UnknownEthertype {
                    ethertype: 0x0806,
                    offset: 12,
                }
            },
        );
        expect_err(&hdr, &with(&|p| p[20] |= 0x20), |e| {
            matches!(e, E::AlreadyFragmented { .. })
        });
        expect_err(&hdr, &with(&|p| p[21] = 1), |e| {
            matches!(e, E::AlreadyFragmented { .. })
        });
        // TCP data offset.
        expect_err(&hdr, &with(&|p| p[34 + 12] = 0x40), |e| {
            *e == E::BadTcpDataOffset {
                doff: 4,
                offset: 34,
            }
        });
        let tiny = tcp_gso(V::Four, &[], &[], 0, ACK, 1448).1;
        let mut tiny = tiny;
        tiny[34 + 12] = 0xf0;
        expect_err(&h0, &tiny, |e| {
            matches!(
                e,
                E::Truncated {
                    what: "TCP",
                    needed: 60,
                    ..
                }
            )
        });
        // GSO type that does not match the frame.
        expect_err(
            &VnetHdr {
                gso_type: VIRTIO_NET_HDR_GSO_TCPV6,
                ..hdr
            },
            &pkt,
            |e| {
                matches!(
                    e,
                    E::GsoProtocolMismatch {
                        ip: "IPv4",
                        proto: 6,
                        ..
                    }
                )
            },
        );
        expect_err(
            &VnetHdr {
                gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
                ..hdr6
            },
            &pkt6,
            |e| matches!(e, E::GsoProtocolMismatch { ip: "IPv6", .. }),
        );
        expect_err(
            &VnetHdr {
                gso_type: VIRTIO_NET_HDR_GSO_UDP_L4,
                ..hdr
            },
            &pkt,
            |e| matches!(e, E::GsoProtocolMismatch { .. }),
        );
        expect_err(&hdr, &with(&|p| p[23] = 17), |e| {
            matches!(e, E::GsoProtocolMismatch { proto: 17, .. })
        });
        // IPv6 extension headers we do not handle: Routing, Fragment, and chains that run off.
        for next in [43u8, 44, 51, 50, 59] {
            let (h, p) = tcp_gso(V::Six, &[], &dstopts(IPPROTO_TCP), 3000, ACK, 1448);
            let mut p = p;
            p[20] = next;
            expect_err(&h, &p, |e| {
                matches!(e, E::UnsupportedIpv6Header { offset: 54, .. })
            });
            let mut p2 = tcp_gso(V::Six, &[], &dstopts(IPPROTO_TCP), 3000, ACK, 1448).1;
            p2[54] = next;
            expect_err(&h, &p2, |e| {
                matches!(e, E::UnsupportedIpv6Header { offset: 62, .. })
            });
        }
        let (h, mut p) = tcp_gso(V::Six, &[], &dstopts(IPPROTO_TCP), 1000, ACK, 1448);
        p[55] = 0xff; // extension length (2048 bytes) beyond the frame
        expect_err(&h, &p, |e| {
            matches!(
                e,
                E::Truncated {
                    what: "IPv6 extension",
                    ..
                }
            )
        });
        let (h, mut p) = tcp_gso(V::Six, &[], &dstopts(IPPROTO_DSTOPTS), 3000, ACK, 1448);
        p[55] = 0; // a chain of Destination Options headers longer than we walk
        expect_err(&h, &p, |e| {
            matches!(e, E::UnsupportedIpv6Header { .. } | E::Truncated { .. })
        });
        // Hop-by-Hop anywhere but first.
        let (h, mut p) = tcp_gso(V::Six, &[], &dstopts(IPPROTO_TCP), 3000, ACK, 1448);
        p[54] = IPPROTO_HOPOPTS;
        expect_err(&h, &p, |e| {
            matches!(
                e,
                E::UnsupportedIpv6Header {
                    next_header: 0,
                    offset: 62
                }
            )
        });
    }

    /// Random mutations and truncations of valid frames, with random headers: never a panic,
    /// and whatever is emitted from a GSO frame is a well-formed frame with valid checksums
    /// no longer than the input.
    #[test]
    fn random_mutations_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let data = payload(3000);
        let mut seeds = vec![
            tcp_gso(V::Four, &[], &[], 3000, ACK | TCP_FIN | TCP_CWR, 1448),
            tcp_gso(
                V::Six,
                &[ETH_P_8021Q],
                &dstopts(IPPROTO_TCP),
                2500,
                ACK | TCP_PSH,
                1000,
            ),
            tcp_gso(V::Four, &[ETH_P_8021AD, ETH_P_8021Q], &[], 700, ACK, 200),
            frame(V::Four, &[], &[], &udp(8 + data.len()), IPPROTO_UDP, &data),
            frame(V::Six, &[], &[], &udp(8 + 300), IPPROTO_UDP, &data[..300]),
        ];
        seeds[3].0.gso_type = VIRTIO_NET_HDR_GSO_UDP_L4;
        seeds[3].0.gso_size = 1000;
        let mut ufo = seeds[3].clone();
        ufo.1[14..34].copy_from_slice(&ipv4(8 + data.len(), IPPROTO_UDP, 7, 0));
        ufo.0.gso_type = VIRTIO_NET_HDR_GSO_UDP;
        seeds.push(ufo);

        let mut scratch = Vec::new();
        let mut stats = [0usize; 3];
        for _ in 0..20_000 {
            let (mut hdr, mut pkt) = seeds[rng.below(seeds.len())].clone();
            match rng.below(4) {
                0 => {
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(pkt.len().min(120));
                        pkt[i] = rng.next() as u8;
                    }
                }
                1 => pkt.truncate(rng.below(pkt.len() + 1)),
                2 => {
                    let i = rng.below(pkt.len());
                    pkt[i] ^= 1 << rng.below(8);
                    if rng.below(2) == 0 {
                        let extra = rng.below(16);
                        pkt.extend(rng.bytes(extra));
                    }
                }
                _ => {}
            }
            if rng.below(3) == 0 {
                let field = rng.next() as u16;
                match rng.below(6) {
                    0 => hdr.csum_start = field % 200,
                    1 => hdr.csum_offset = field % 64,
                    2 => hdr.gso_size = field % 3000,
                    3 => hdr.hdr_len = field,
                    4 => hdr.gso_type = field as u8,
                    _ => hdr.flags = field as u8,
                }
            }
            let offloads = RxOffloads::from_features(rng.next());
            let (res, out) = collect(|e| adapt_for_guest(offloads, &hdr, &pkt, &mut scratch, e));
            let accepted = offloads.accepts(&hdr);
            match res {
                Ok(n) => {
                    stats[0] += 1;
                    assert_eq!(n, out.len());
                    for (h, f) in &out {
                        assert!(f.len() <= pkt.len());
                        if !accepted {
                            assert!(!h.is_gso());
                            assert!(offloads.csum || !h.needs_csum());
                        }
                        if hdr.is_gso() && !accepted {
                            verify(f);
                            stats[2] += 1;
                        }
                    }
                }
                Err(_) => {
                    stats[1] += 1;
                    assert!(out.is_empty() || !hdr.is_gso() || accepted);
                }
            }
            let mut h = hdr;
            let _ = complete_checksum(&mut h, &mut pkt);
        }
        // The mutations must exercise both outcomes, or the loop proves little.
        assert!(
            stats[0] > 1000 && stats[1] > 1000 && stats[2] > 5000,
            "ok/err/verified = {stats:?}"
        );
        eprintln!("ok/err/verified segments = {stats:?}");
    }
}
