//! [`VfSocket`]: one queue pair's socket, `AF_PACKET` or `AF_XDP`, and the per-port choice
//! between them ([`open_queues`]).
//!
//! The data path (`tx.rs`, `rx.rs`, `queue_pair.rs`) only sees [`VfSocket`]; the kind is
//! decided once per port when it opens and never changes while it runs.

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;
use std::sync::Arc;

use super::af_xdp::{XdpSocket, MAX_XDP_FRAME};
use super::xdp_prog::XdpProgram;
use super::{interface_info, PacketSocket, RingConfig, TxProgress, VfError, VfStats};
use super::{sockopt, sys};
use crate::net_hdr::VnetHdr;

/// Which socket kind a port uses for its VF.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VfMode {
    /// `AF_XDP` if the interface allows it (see [`open_queues`]), else `AF_PACKET`.
    Auto,
    /// `AF_XDP` or nothing: the port fails to open if `AF_XDP` cannot be set up.
    AfXdp,
    /// `AF_PACKET` rings (the default: works everywhere and keeps the offloads end to end).
    #[default]
    AfPacket,
}

impl FromStr for VfMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(VfMode::Auto),
            "af-xdp" | "af_xdp" | "xdp" => Ok(VfMode::AfXdp),
            "af-packet" | "af_packet" | "packet" => Ok(VfMode::AfPacket),
            other => Err(format!(
                "unknown VF mode '{other}' (expected auto, af-xdp or af-packet)"
            )),
        }
    }
}

impl std::fmt::Display for VfMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VfMode::Auto => "auto",
            VfMode::AfXdp => "af-xdp",
            VfMode::AfPacket => "af-packet",
        })
    }
}

enum Kind {
    Packet(PacketSocket),
    Xdp(XdpSocket),
}

/// One queue pair's socket on the VF.
pub struct VfSocket {
    kind: Kind,
}

impl From<PacketSocket> for VfSocket {
    fn from(s: PacketSocket) -> Self {
        VfSocket {
            kind: Kind::Packet(s),
        }
    }
}

impl From<XdpSocket> for VfSocket {
    fn from(s: XdpSocket) -> Self {
        VfSocket { kind: Kind::Xdp(s) }
    }
}

impl VfSocket {
    /// Opens an `AF_PACKET` socket (see [`PacketSocket::open`]).
    pub fn open(
        ifname: &str,
        fanout_group: Option<u16>,
        ring: &RingConfig,
    ) -> Result<Self, VfError> {
        PacketSocket::open(ifname, fanout_group, ring).map(Self::from)
    }

    /// True for an `AF_XDP` socket.
    pub fn is_af_xdp(&self) -> bool {
        matches!(self.kind, Kind::Xdp(_))
    }

    /// "AF_PACKET" or "AF_XDP (native XDP, zero copy)" and the like, for logs.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Packet(_) => "AF_PACKET (TPACKET_V2 ring, vnet headers)".into(),
            Kind::Xdp(x) => format!("AF_XDP ({})", x.describe()),
        }
    }

    /// Name of the interface.
    pub fn ifname(&self) -> &str {
        match &self.kind {
            Kind::Packet(s) => s.ifname(),
            Kind::Xdp(s) => s.ifname(),
        }
    }

    /// Visits up to `max` received packets in order: the callback gets the virtio header and
    /// the Ethernet frame and returns `true` if it consumed the packet, `false` to stop (the
    /// same packet is offered again next time). Returns the number consumed.
    #[inline]
    pub fn rx_batch<F: FnMut(&VnetHdr, &[u8]) -> bool>(&mut self, max: usize, f: F) -> usize {
        match &mut self.kind {
            Kind::Packet(s) => s.rx_batch(max, f),
            Kind::Xdp(s) => s.rx_batch(max, f),
        }
    }

    /// Sends packets once: [`VfSocket::try_tx_batch`], dropping (and counting in
    /// [`VfStats::tx_dropped`]) what a full send queue refused. Returns how many were accepted.
    pub fn tx_batch(
        &mut self,
        iovs: &[libc::iovec],
        pkts: &[Range<usize>],
    ) -> Result<usize, VfError> {
        let p = self.try_tx_batch(iovs, pkts)?;
        let stats = match &mut self.kind {
            Kind::Packet(s) => &mut s.stats,
            Kind::Xdp(s) => &mut s.stats,
        };
        stats.tx_dropped += (pkts.len() - p.settled) as u64;
        Ok(p.accepted)
    }

    /// Sends packets in order until the send queue is full; the rest may be tried again.
    /// See [`PacketSocket::try_tx_batch`].
    #[inline]
    pub fn try_tx_batch(
        &mut self,
        iovs: &[libc::iovec],
        pkts: &[Range<usize>],
    ) -> Result<TxProgress, VfError> {
        match &mut self.kind {
            Kind::Packet(s) => s.try_tx_batch(iovs, pkts),
            Kind::Xdp(s) => s.try_tx_batch(iovs, pkts),
        }
    }

    /// Counters (one system call).
    pub fn stats(&self) -> VfStats {
        match &self.kind {
            Kind::Packet(s) => s.stats(),
            Kind::Xdp(s) => s.stats(),
        }
    }

    /// Reads and clears the socket's pending error (`SO_ERROR`).
    pub fn take_error(&self) -> Option<io::Error> {
        match &self.kind {
            Kind::Packet(s) => s.take_error(),
            Kind::Xdp(s) => s.take_error(),
        }
    }
}

impl AsRawFd for VfSocket {
    /// Register it edge-triggered for `EPOLLIN` and drain with [`VfSocket::rx_batch`].
    fn as_raw_fd(&self) -> RawFd {
        match &self.kind {
            Kind::Packet(s) => s.as_raw_fd(),
            Kind::Xdp(s) => s.as_raw_fd(),
        }
    }
}

impl std::fmt::Debug for VfSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Packet(s) => s.fmt(f),
            Kind::Xdp(s) => s.fmt(f),
        }
    }
}

/// `struct ethtool_channels`.
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

const ETHTOOL_GCHANNELS: u32 = 0x3c;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

/// RX and TX queue counts of the netdev (`ETHTOOL_GCHANNELS`); a driver without channel
/// information has one of each.
fn queue_counts(ifname: &str) -> Result<(u32, u32), VfError> {
    let name = super::c_ifname(ifname)?;
    let fd = super::ioctl_socket(ifname)?;
    let mut ch = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..Default::default()
    };
    let mut ifr = super::ifreq_for(&name);
    ifr.ifr_ifru.ifru_data = (&mut ch as *mut EthtoolChannels).cast();
    // SAFETY: `ifr` names the interface and points at `ch`, which the kernel fills; both live
    // across the call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            SIOCETHTOOL as _,
            &mut ifr as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok((1, 1)),
            _ => Err(VfError::from_os(ifname, "ETHTOOL_GCHANNELS", e)),
        };
    }
    Ok((
        ch.rx_count + ch.combined_count,
        ch.tx_count + ch.combined_count,
    ))
}

/// Puts `ifname` in promiscuous mode for as long as the returned socket lives.
///
/// The guest's MAC address need not be the VF's, and a NIC filters unicast by MAC before XDP
/// ever sees a frame. An `AF_PACKET` socket that is bound with protocol 0 receives nothing, but
/// its `PACKET_MR_PROMISC` membership is reference counted by the kernel and undone when it
/// closes, exactly as with the `AF_PACKET` data path (see [`super::af_packet`]).
fn promiscuous(ifname: &str, ifindex: u32) -> Result<std::os::fd::OwnedFd, VfError> {
    let fail = |op| move |e| VfError::from_os(ifname, op, e);
    let fd = sockopt::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0)
        .map_err(fail("socket(AF_PACKET) for promiscuous mode"))?;
    // SAFETY: sockaddr_ll is plain old data; zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = 0;
    sll.sll_ifindex = ifindex as i32;
    sockopt::bind(fd.as_raw_fd(), &sll).map_err(fail("bind(AF_PACKET) for promiscuous mode"))?;
    let mreq = sys::PacketMreq {
        mr_ifindex: ifindex as i32,
        mr_type: sys::PACKET_MR_PROMISC,
        ..Default::default()
    };
    sockopt::setsockopt(
        fd.as_raw_fd(),
        libc::SOL_PACKET,
        sys::PACKET_ADD_MEMBERSHIP,
        &mreq,
    )
    .map_err(fail("setsockopt(PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC)"))?;
    Ok(fd)
}

/// Opens `queues` `AF_XDP` sockets, one per netdev queue, behind one XDP program.
///
/// Refused (with the reason) when the MTU needs frames larger than a 4 KiB UMEM frame, or when
/// the netdev's RX queue count differs from the port's queue pairs: every RX queue needs its own
/// socket, or the packets hashed to a queue without one would bypass the guest (they would go
/// to the host stack), and a pair without a queue could not bind.
pub fn open_af_xdp(ifname: &str, queues: usize) -> Result<Vec<VfSocket>, VfError> {
    open_af_xdp_in(ifname, queues, true)
}

/// [`open_af_xdp`], trying native XDP first only if `native` (tests force generic mode).
pub(crate) fn open_af_xdp_in(
    ifname: &str,
    queues: usize,
    native: bool,
) -> Result<Vec<VfSocket>, VfError> {
    let refuse = |reason: String| VfError::AfXdp {
        ifname: ifname.to_owned(),
        reason,
    };
    let info = interface_info(ifname)?;
    // Ethernet header and two VLAN tags around an MTU-sized payload.
    if info.mtu as usize + 14 + 8 > MAX_XDP_FRAME {
        return Err(refuse(format!(
            "MTU {} needs frames larger than the {MAX_XDP_FRAME} bytes one 4 KiB UMEM frame holds",
            info.mtu
        )));
    }
    let (rxq, txq) = queue_counts(ifname)?;
    let want = u32::try_from(queues).unwrap_or(u32::MAX);
    if rxq != want || txq < want {
        return Err(refuse(format!(
            "the interface has {rxq} RX / {txq} TX queue(s) and the port {queues} queue pair(s); \
             AF_XDP needs one RX queue per pair (ethtool -L, or queues = {rxq})"
        )));
    }
    let promisc = Arc::new(promiscuous(ifname, info.index)?);
    let attempt = |native: bool| -> Result<Vec<VfSocket>, VfError> {
        let prog = Arc::new(
            XdpProgram::attach(info.index, want, native).map_err(|e| refuse(e.to_string()))?,
        );
        let mut socks = Vec::with_capacity(queues);
        for q in 0..want {
            let sock = if prog.native() {
                XdpSocket::open(ifname, info.index, q, prog.clone(), true).or_else(|e| {
                    log::debug!("{ifname} queue {q}: zero copy unavailable ({e}); copy mode");
                    XdpSocket::open(ifname, info.index, q, prog.clone(), false)
                })?
            } else {
                XdpSocket::open(ifname, info.index, q, prog.clone(), false)?
            }
            .keep_promiscuous(promisc.clone());
            socks.push(VfSocket::from(sock));
        }
        Ok(socks)
    };
    if !native {
        return attempt(false);
    }
    attempt(true).or_else(|e| {
        log::debug!("{ifname}: AF_XDP with a native program failed ({e}); trying generic XDP");
        attempt(false)
    })
}

/// Opens the sockets of a port's `queues` queue pairs in `mode` and logs the choice.
///
/// `fanout_group` is used by `AF_PACKET` with several pairs (see [`PacketSocket::open`]).
/// `Auto` falls back from `AF_XDP` to `AF_PACKET` on any `AF_XDP` failure, saying why.
pub fn open_queues(
    port: &str,
    ifname: &str,
    queues: usize,
    mode: VfMode,
    fanout_group: Option<u16>,
    ring: &RingConfig,
) -> Result<Vec<VfSocket>, VfError> {
    let packet = || -> Result<Vec<VfSocket>, VfError> {
        (0..queues)
            .map(|_| VfSocket::open(ifname, fanout_group, ring))
            .collect()
    };
    let socks = match mode {
        VfMode::AfPacket => packet()?,
        VfMode::AfXdp => open_af_xdp(ifname, queues)?,
        VfMode::Auto => {
            match open_af_xdp(ifname, queues) {
                Ok(s) => s,
                Err(e) => {
                    log::info!("port {port}: VF {ifname}: AF_XDP not used ({e}); falling back to AF_PACKET");
                    packet()?
                }
            }
        }
    };
    if let Some(first) = socks.first() {
        log::info!(
            "port {port}: VF {ifname}: {} for {} queue pair(s) (vf-mode {mode})",
            first.describe(),
            socks.len()
        );
    }
    Ok(socks)
}
