//! The software offloads (`crate::offload`) on mutated Ethernet/VLAN/IPv4/IPv6/TCP/UDP frames
//! with random or mutated virtio-net headers, every result checked by an independent parser
//! and an RFC 1071 checksum written here: checksums the code claims to have completed or
//! computed verify (pseudo-headers included), segment payloads concatenate to the original
//! payload (fragments reassemble to the original datagram), and outputs stay bounded.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{campaign, Rng};
use crate::net_hdr::{
    VnetHdr, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4,
};
use crate::offload::{adapt_for_guest, complete_checksum, segment, RxOffloads};

/// How many results were verified in full, per kind: completed checksums of intact frames,
/// TCP/USO segments, UFO datagrams reassembled. A campaign that verified none of a kind
/// tested nothing of it, and fails.
static VERIFIED: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
const COMPLETED: usize = 0;
const SEGMENTS: usize = 1;
const DATAGRAMS: usize = 2;

fn verified(kind: usize) {
    VERIFIED[kind].fetch_add(1, Ordering::Relaxed);
}

/// RFC 1071: the 32-bit running sum of big-endian 16-bit words (odd byte padded with zero).
fn sum16(bytes: &[u8], mut acc: u64) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = words.remainder() {
        acc += u64::from(*b) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Where the layers of a frame are, read from the length fields only.
#[derive(Clone, Copy, Debug)]
struct Layers {
    l3: usize,
    v6: bool,
    proto: u8,
    l4: usize,
    ip_end: usize,
}

fn be16(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]))
}

fn parse(p: &[u8]) -> Option<Layers> {
    let mut at = 12;
    let mut ethertype = be16(p, at)?;
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        at += 4;
        ethertype = be16(p, at)?;
    }
    let l3 = at + 2;
    match ethertype {
        0x0800 => {
            let ihl = usize::from(p.get(l3)? & 0xf) * 4;
            let total = usize::from(be16(p, l3 + 2)?);
            (p.get(l3)? >> 4 == 4 && ihl >= 20 && total >= ihl && l3 + total <= p.len()).then_some(
                Layers {
                    l3,
                    v6: false,
                    proto: *p.get(l3 + 9)?,
                    l4: l3 + ihl,
                    ip_end: l3 + total,
                },
            )
        }
        0x86dd => {
            if p.get(l3)? >> 4 != 6 {
                return None;
            }
            let plen = usize::from(be16(p, l3 + 4)?);
            let ip_end = if plen == 0 { p.len() } else { l3 + 40 + plen };
            let (mut next, mut l4) = (*p.get(l3 + 6)?, l3 + 40);
            while next == 0 || next == 60 {
                let n = *p.get(l4)?;
                l4 += 8 * (usize::from(*p.get(l4 + 1)?) + 1);
                next = n;
            }
            (ip_end <= p.len() && l4 <= ip_end).then_some(Layers {
                l3,
                v6: true,
                proto: next,
                l4,
                ip_end,
            })
        }
        _ => None,
    }
}

/// The TCP/UDP pseudo-header sum for an L4 segment of `l4_len` bytes.
fn pseudo(p: &[u8], f: &Layers, l4_len: usize) -> Option<u64> {
    let addrs = if f.v6 {
        p.get(f.l3 + 8..f.l3 + 40)?
    } else {
        p.get(f.l3 + 12..f.l3 + 20)?
    };
    Some(sum16(addrs, u64::from(f.proto) + l4_len as u64))
}

/// Whether the IPv4 header checksum (if IPv4) and the TCP/UDP checksum verify.
fn verify(p: &[u8], f: &Layers) -> Result<(), String> {
    if !f.v6 && fold(sum16(p.get(f.l3..f.l4).ok_or("ip")?, 0)) != 0xffff {
        return Err("IPv4 header checksum is wrong".into());
    }
    let l4 = p.get(f.l4..f.ip_end).ok_or("l4")?;
    let ph = pseudo(p, f, l4.len()).ok_or("pseudo")?;
    if fold(sum16(l4, ph)) != 0xffff {
        return Err(format!(
            "proto {} checksum over {} bytes is wrong",
            f.proto,
            l4.len()
        ));
    }
    Ok(())
}

fn l4_hlen(p: &[u8], f: &Layers) -> Option<usize> {
    match f.proto {
        6 => Some(usize::from(p.get(f.l4 + 12)? >> 4) * 4),
        17 => Some(8),
        _ => None,
    }
}

/// A well-formed frame and the header a sender would give it, before any mutation.
fn frame(rng: &mut Rng) -> (VnetHdr, Vec<u8>) {
    let mut p = vec![0u8; 12];
    rng.bytes(&mut p);
    for _ in 0..rng.pick(&[0, 0, 0, 1, 2]) {
        p.extend(rng.pick(&[0x8100u16, 0x88a8]).to_be_bytes());
        p.extend((rng.u64() as u16).to_be_bytes());
    }
    let v6 = rng.chance(50);
    let tcp = rng.chance(65);
    p.extend(if v6 { 0x86ddu16 } else { 0x0800 }.to_be_bytes());
    let l3 = p.len();
    let proto = if tcp { 6 } else { 17 };
    let ip_hlen = if v6 {
        ip6_header(rng, &mut p, proto)
    } else {
        ip4_header(rng, &mut p, proto)
    };
    let l4 = l3 + ip_hlen;
    let hlen = if tcp {
        20 + 4 * rng.below(4) as usize
    } else {
        8
    };
    let mut l4h = vec![0u8; hlen];
    rng.bytes(&mut l4h);
    if tcp {
        l4h[12] = ((hlen / 4) as u8) << 4;
        l4h[13] = rng.u64() as u8 & 0x3f;
        l4h[16..18].fill(0);
        l4h[20..].fill(1);
    }
    p.extend(l4h);
    let mss = if rng.chance(95) {
        rng.range(1, 2000)
    } else {
        rng.u64() & 0xffff
    };
    let payload = match rng.below(10) {
        0 => 0,
        1..=5 => rng.below(1600),
        _ => rng.below(8 * mss.max(1)).min(30_000),
    } as usize;
    let at = p.len();
    p.resize(at + payload, 0);
    rng.bytes(&mut p[at..]);
    fix_lengths(&mut p, l3, l4, v6, tcp);
    let f = Layers {
        l3,
        v6,
        proto,
        l4,
        ip_end: p.len(),
    };
    let csum_offset = if tcp { 16 } else { 6 };
    let ph = fold(pseudo(&p, &f, p.len() - l4).unwrap_or(0));
    p[l4 + csum_offset..l4 + csum_offset + 2].copy_from_slice(&ph.to_be_bytes());
    let gso_type = match rng.below(10) {
        0..=3 => VIRTIO_NET_HDR_GSO_NONE,
        4..=6 if tcp => {
            if v6 {
                VIRTIO_NET_HDR_GSO_TCPV6
            } else {
                VIRTIO_NET_HDR_GSO_TCPV4
            }
        }
        4..=7 => VIRTIO_NET_HDR_GSO_UDP_L4,
        8 => VIRTIO_NET_HDR_GSO_UDP,
        _ => rng.u64() as u8,
    } | if rng.chance(10) {
        VIRTIO_NET_HDR_GSO_ECN
    } else {
        0
    };
    let hdr = VnetHdr {
        flags: if rng.chance(85) {
            VIRTIO_NET_HDR_F_NEEDS_CSUM
        } else {
            rng.below(4) as u8
        },
        gso_type,
        hdr_len: (l4 + hlen) as u16,
        gso_size: mss as u16,
        csum_start: l4 as u16,
        csum_offset: csum_offset as u16,
    };
    (hdr, p)
}

fn ip4_header(rng: &mut Rng, p: &mut Vec<u8>, proto: u8) -> usize {
    let ihl = 5 + rng.pick(&[0, 0, 0, 1, 2]) as usize;
    let mut h = vec![0u8; 4 * ihl];
    rng.bytes(&mut h);
    h[0] = 0x40 | ihl as u8;
    h[6] = if rng.chance(50) { 0x40 } else { 0 };
    h[7] = 0;
    h[9] = proto;
    h[20..].fill(1);
    p.extend(h);
    4 * ihl
}

fn ip6_header(rng: &mut Rng, p: &mut Vec<u8>, proto: u8) -> usize {
    let mut h = vec![0u8; 40];
    rng.bytes(&mut h);
    h[0] = 0x60 | (h[0] & 0xf);
    let exts = rng.pick(&[0usize, 0, 0, 1, 2]);
    h[6] = if exts == 0 { proto } else { rng.pick(&[0, 60]) };
    p.extend(h);
    for i in 0..exts {
        let next = if i + 1 == exts { proto } else { 60 };
        p.extend([next, 0, 1, 4, 0, 0, 0, 0]);
    }
    40 + 8 * exts
}

/// IP total/payload length, UDP length and the IPv4 header checksum of a built frame.
fn fix_lengths(p: &mut [u8], l3: usize, l4: usize, v6: bool, tcp: bool) {
    let len = p.len();
    if v6 {
        p[l3 + 4..l3 + 6].copy_from_slice(&((len - l3 - 40) as u16).to_be_bytes());
    } else {
        p[l3 + 2..l3 + 4].copy_from_slice(&((len - l3) as u16).to_be_bytes());
        p[l3 + 10..l3 + 12].fill(0);
        let c = !fold(sum16(&p[l3..l4], 0));
        p[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    if !tcp {
        p[l4 + 4..l4 + 6].copy_from_slice(&((len - l4) as u16).to_be_bytes());
    }
}

/// Random damage to the frame and/or header; false if none was done.
fn mutate(rng: &mut Rng, hdr: &mut VnetHdr, p: &mut Vec<u8>) -> bool {
    if rng.chance(45) {
        return false;
    }
    for _ in 0..rng.range(1, 4) {
        match rng.below(6) {
            0 if !p.is_empty() => {
                let at = rng.below(p.len().min(120) as u64) as usize;
                p[at] = rng.u64() as u8;
            }
            1 => p.truncate(rng.below(p.len() as u64 + 1) as usize),
            2 => p.extend((0..rng.range(1, 40)).map(|_| rng.u64() as u8)),
            3 => hdr.csum_start = mutate_u16(rng, hdr.csum_start),
            4 => hdr.csum_offset = mutate_u16(rng, hdr.csum_offset),
            _ => {
                hdr.hdr_len = mutate_u16(rng, hdr.hdr_len);
                hdr.gso_size = mutate_u16(rng, hdr.gso_size);
                hdr.flags ^= rng.u64() as u8 & 0x7;
            }
        }
    }
    true
}

fn mutate_u16(rng: &mut Rng, v: u16) -> u16 {
    match rng.below(3) {
        0 => rng.u64() as u16,
        1 => v.wrapping_add(rng.range(1, 8) as u16),
        _ => v.wrapping_sub(rng.range(1, 8) as u16),
    }
}

/// `complete_checksum`: on success exactly the two checksum bytes changed, the sum over
/// `csum_start..` verifies, and an intact frame's TCP/UDP checksum verifies in full.
fn check_complete(hdr: &VnetHdr, pkt: &[u8], intact: bool) -> Result<(), String> {
    let (mut h, mut p) = (*hdr, pkt.to_vec());
    if complete_checksum(&mut h, &mut p).is_err() || !hdr.needs_csum() {
        return Ok(());
    }
    let field = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset);
    let diff: Vec<usize> = (0..p.len()).filter(|&i| p[i] != pkt[i]).collect();
    if diff.iter().any(|&i| i != field && i != field + 1)
        || h.needs_csum()
        || h.flags & VIRTIO_NET_HDR_F_DATA_VALID == 0
    {
        return Err(format!(
            "complete_checksum changed bytes {diff:?} / flags {:#x}",
            h.flags
        ));
    }
    // The field held the sender's partial (pseudo-header) sum: with it added back, the sum
    // over csum_start.. of the completed frame is all ones.
    let partial = u64::from(be16(pkt, field).unwrap_or(0));
    if fold(sum16(&p[usize::from(hdr.csum_start)..], partial)) != 0xffff {
        return Err("completed checksum does not verify over csum_start..".into());
    }
    match parse(&p) {
        Some(f) if intact => {
            verify(&p, &f).map_err(|e| format!("completed frame: {e}"))?;
            verified(COMPLETED);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `segment`: bounded output; for GSO, every segment parses, its checksums verify, and the
/// payloads put back together are the original payload.
fn check_segment(hdr: &VnetHdr, pkt: &[u8]) -> Result<(), String> {
    let mut out: Vec<(VnetHdr, Vec<u8>)> = Vec::new();
    let mut scratch = Vec::new();
    let Ok(n) = segment(hdr, pkt, &mut scratch, |h, s| out.push((*h, s.to_vec()))) else {
        return if out.is_empty() {
            Ok(())
        } else {
            Err("emitted frames, then failed".into())
        };
    };
    if n != out.len() || n > pkt.len() + 1 {
        return Err(format!("returned {n}, emitted {}", out.len()));
    }
    for (h, s) in &out {
        if s.len() > pkt.len() || h.gso_type != VIRTIO_NET_HDR_GSO_NONE || h.flags & !3 != 0 {
            return Err(format!(
                "emitted {} bytes (input {}) with {h:?}",
                s.len(),
                pkt.len()
            ));
        }
    }
    if !hdr.is_gso() {
        return Ok(());
    }
    let f = parse(pkt).ok_or("segmented a frame that does not parse")?;
    if hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN == VIRTIO_NET_HDR_GSO_UDP {
        return check_fragments(pkt, &f, &out);
    }
    let hl = l4_hlen(pkt, &f).ok_or("no L4 header")?;
    let mut joined = Vec::new();
    for (h, s) in &out {
        let sf = parse(s).ok_or("a segment does not parse")?;
        if h.flags & VIRTIO_NET_HDR_F_DATA_VALID != 0 {
            verify(s, &sf).map_err(|e| format!("segment: {e}"))?;
            verified(SEGMENTS);
        }
        let body = s
            .get(sf.l4 + hl..sf.ip_end)
            .ok_or("segment shorter than its headers")?;
        if body.len() > usize::from(hdr.gso_size) {
            return Err(format!(
                "segment payload {} > gso_size {}",
                body.len(),
                hdr.gso_size
            ));
        }
        joined.extend_from_slice(body);
    }
    if joined != pkt[f.l4 + hl..f.ip_end] {
        return Err("segment payloads do not concatenate to the original payload".into());
    }
    Ok(())
}

/// UFO over IPv4: fragments reassemble to the original datagram, whose UDP checksum verifies.
fn check_fragments(pkt: &[u8], f: &Layers, out: &[(VnetHdr, Vec<u8>)]) -> Result<(), String> {
    let mut datagram = Vec::new();
    for (_, s) in out {
        let sf = parse(s).ok_or("a fragment does not parse")?;
        let frag = be16(s, sf.l3 + 6).ok_or("frag")?;
        if fold(sum16(&s[sf.l3..sf.l4], 0)) != 0xffff {
            return Err("fragment IPv4 header checksum is wrong".into());
        }
        if usize::from(frag & 0x1fff) * 8 != datagram.len() {
            return Err(format!(
                "fragment offset {} after {} bytes",
                frag & 0x1fff,
                datagram.len()
            ));
        }
        datagram.extend_from_slice(&s[sf.l4..sf.ip_end]);
    }
    // Ports and data as sent; the length and checksum fields are the code's to (re)write.
    let orig = &pkt[f.l4..f.ip_end];
    if datagram.len() != orig.len() || datagram[8..] != orig[8..] || datagram[..4] != orig[..4] {
        return Err("fragments do not reassemble to the original datagram".into());
    }
    if usize::from(be16(&datagram, 4).unwrap_or(0)) != datagram.len() {
        return Err("reassembled UDP length field is wrong".into());
    }
    let ph = pseudo(pkt, f, datagram.len()).ok_or("pseudo")?;
    if fold(sum16(&datagram, ph)) != 0xffff {
        return Err("reassembled UDP checksum is wrong".into());
    }
    verified(DATAGRAMS);
    Ok(())
}

/// `adapt_for_guest`: whatever it emits, the guest's offloads accept.
fn check_adapt(rng: &mut Rng, hdr: &VnetHdr, pkt: &[u8]) -> Result<(), String> {
    let offloads = RxOffloads::from_features(rng.u64());
    let mut bad = None;
    let mut scratch = Vec::new();
    let _ = adapt_for_guest(offloads, hdr, pkt, &mut scratch, |h, s| {
        if !offloads.accepts(h) || s.len() > pkt.len() {
            bad = Some(format!(
                "emitted {h:?} ({} bytes) to a guest with {offloads:?}",
                s.len()
            ));
        }
    });
    bad.map_or(Ok(()), Err)
}

fn offload_input(rng: &mut Rng) -> Result<(), String> {
    let (mut hdr, mut pkt) = frame(rng);
    let intact = !mutate(rng, &mut hdr, &mut pkt);
    check_complete(&hdr, &pkt, intact)?;
    check_segment(&hdr, &pkt)?;
    check_adapt(rng, &hdr, &pkt)
}

#[test]
fn fuzz_offloads() {
    let inputs = campaign("offload", 15000, offload_input);
    let [c, s, d] = VERIFIED.each_ref().map(|v| v.load(Ordering::Relaxed));
    eprintln!("fuzz offload: verified {c} completed checksums, {s} segments, {d} UFO datagrams");
    // (A replay of one input may verify nothing; a campaign must.)
    assert!(
        inputs < 1000 || (c > 0 && s > 0 && d > 0),
        "the campaign verified nothing of some kind"
    );
}
