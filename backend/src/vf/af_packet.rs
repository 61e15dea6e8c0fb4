//! A fast, batched `AF_PACKET` socket on a Linux netdev: one per virtio queue pair.
//!
//! # Offloads
//! The socket has `PACKET_VNET_HDR`, so every packet in either direction carries a 10-byte
//! [`VnetHdr`]: the guest's TSO/USO super-frames go to the netdev as GSO packets (the kernel or the
//! NIC segments them), and GRO/locally generated GSO packets from the host side arrive whole, with
//! their gso type/size and `NEEDS_CSUM` partial-checksum information.
//!
//! # Receive: `TPACKET_V2` ring, with the socket queue for the rare oversized packet
//! Both `TPACKET_V2` and `TPACKET_V3` place the virtio header in front of the packet when
//! `PACKET_VNET_HDR` is set: in `tpacket_rcv()` (Linux >= 4.x, unchanged in 6.1 and 6.18) the header
//! is written at `macoff - sizeof(virtio_net_hdr)` for every ring version, and
//! `PACKET_VNET_HDR` must be set before the ring exists (`-EBUSY` afterwards). We use V2 because:
//! - V3 hands a *block* to user space only when it is full or its retire timer fires (>= 1 ms,
//!   8 ms by default on links without a known speed, which covers VFs inside a VM and veth).
//!   A relay would add that much latency to every sparse flow (ping, request/response).
//!   V2 publishes each frame as soon as it is written and wakes the reader per packet.
//! - V2 frames are fixed-size, so holding 64 KiB GSO super-frames *in the ring* would cost
//!   64 KiB+ per slot: 1024 slots would pin 66 MiB per queue. Instead each slot is sized for the
//!   MTU (see [`RingConfig`]) and the socket has `PACKET_COPY_THRESH`: when a packet does not fit
//!   its frame, `tpacket_rcv()` still fills a (truncated) frame, marks it `TP_STATUS_COPY` and queues
//!   the whole skb on the socket's ordinary receive queue, in the same order, under the same lock.
//!   [`PacketSocket::rx_batch`] then fetches that packet with one `recvmsg` into a preallocated
//!   buffer. Big packets cost one system call per up to 64 KiB; MTU-sized ones none.
//! - A frame that is truncated *without* `TP_STATUS_COPY` (the receive buffer for oversized
//!   packets is full, see [`RingConfig::rcvbuf`]) is dropped and counted in
//!   [`VfStats::rx_truncated`], never delivered.
//!
//! Packets of up to [`MAX_RX_PACKET`] bytes are delivered: every IPv4/IPv6 GSO packet a netdev
//! produces without BIG TCP (`gro_max_size`/`gso_max_size` <= 65536, the default; virtio-net cannot
//! carry more anyway). Larger ones are dropped and counted as truncated.
//!
//! VLAN tags: the kernel strips 802.1Q/802.1ad tags into skb metadata before packet taps see the
//! frame (`skb_vlan_untag` in `__netif_receive_skb_core`), so a relay that handed over the bytes
//! would silently remove the guest's VLANs. The tag is reinserted in front of the EtherType, in the
//! ring frame itself when there is room (there always is for Ethernet) and the virtio header's
//! `csum_start`/`hdr_len` are shifted by the 4 bytes.
//!
//! # Transmit
//! [`PacketSocket::try_tx_batch`] sends up to [`MAX_TX_BATCH`] packets per `sendmmsg` from iovecs that
//! point straight into guest memory (no user-space copy). `PACKET_QDISC_BYPASS` hands packets to
//! the driver directly: the queueing discipline is the guest's business, and bypassing it also
//! keeps our transmissions out of other packet taps. The socket is non-blocking: a full socket
//! send buffer (`EAGAIN`) or a full device queue (`ENOBUFS`) stops the batch without a drop:
//! [`PacketSocket::try_tx_batch`] says where, and the caller keeps the rest and tries again
//! (the device leaves it in the guest's ring); a down link drops the rest and counts it.
//!
//! # Several queue pairs: fanout
//! With more than one queue pair per port, each queue's socket joins the same `PACKET_FANOUT`
//! group in `PACKET_FANOUT_HASH` mode, so the kernel spreads flows over the sockets by flow hash and
//! a flow always lands on one queue (no reordering). `PACKET_IGNORE_OUTGOING` (per socket) and
//! `PACKET_FANOUT_FLAG_IGNORE_OUTGOING` (per group, Linux >= 6.2; 6.1 ignores the flag) keep
//! packets that the host transmits on the netdev away from the guest; for fanout members, whose
//! own flag the kernel does not consult, a 4-instruction BPF filter dropping `PACKET_OUTGOING`
//! does the same on every kernel. Packets a member itself sends are never looped back to its
//! group anyway (`skb_loop_sk()` matches the group), and with `PACKET_QDISC_BYPASS` they are not
//! even offered to taps. Fragments of one IP datagram after the first have no ports
//! and may hash to another queue; that is accepted (no `PACKET_FANOUT_FLAG_DEFRAG`, which would
//! reassemble, i.e. alter, the guest's traffic).
//!
//! Before Linux 6.13 the kernel only lets a socket join a group while it is bound to an interface
//! that is *up* (`fanout_add()` requires `PACKET_SOCK_RUNNING`, else `EINVAL`); 6.13 lifted that.
//! An interface that is down at [`PacketSocket::open`] is not an error: the join is retried by
//! [`PacketSocket::rx_batch`] (traffic means the link is back) and, at most every 100 ms, by
//! [`PacketSocket::try_tx_batch`]; frames that reached the ring before the join are discarded, because
//! every sibling socket received them too ([`VfStats::rx_flushed`]).
//!
//! # Promiscuous mode
//! The guest's MAC address need not equal the netdev's (a VF is often left with its own MAC, or
//! the guest changes its address), so the socket enables promiscuous mode on the interface with
//! `PACKET_ADD_MEMBERSHIP`/`PACKET_MR_PROMISC`. This is reference counted by the kernel and undone
//! automatically when the socket closes. On a real VF the PF driver may additionally require the
//! VF to be trusted (`ip link set PF vf N trust on`) for promiscuous reception to take effect.

use std::cell::Cell;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vm_memory::ByteValued;

use super::sockopt::{self, last_err, setsockopt};
use super::sys::{self, Tpacket2Hdr, TPACKET2_HDRLEN};
use super::{check_tx_batch, interface_info, VfError};
use crate::net_hdr::{VnetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR_LEN};

/// Most packets one `sendmmsg` carries; [`PacketSocket::try_tx_batch`] splits longer lists.
pub const MAX_TX_BATCH: usize = 64;

/// Largest packet (Ethernet header included, VLAN tag reinserted) [`PacketSocket::rx_batch`] delivers:
/// a 64 KiB GSO super-frame plus link-layer headers.
pub const MAX_RX_PACKET: usize = 65536 + 256;

const ETH_HLEN: usize = 14;
const ETH_ALEN2: usize = 12;
const VLAN_HLEN: usize = 4;
const ETH_P_8021Q: u16 = 0x8100;
/// `UIO_MAXIOV`: the kernel rejects messages with more iovecs.
const MAX_IOV_PER_PACKET: usize = 1024;
/// Auto-sized frames never exceed this: anything bigger takes the copy path.
const AUTO_FRAME_MAX: usize = 16 * 1024;
const MIN_FRAME_SIZE: usize = 256;
const AUTO_BLOCK_MIN: usize = 64 * 1024;
const MAX_RING_BYTES: usize = 1 << 30;
const FANOUT_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Geometry and buffer sizes of one socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Bytes per ring frame, including the 52-byte `tpacket2_hdr`+`sockaddr_ll`, alignment padding
    /// and the virtio header; a multiple of 16. `0` (the default) sizes frames for the interface's
    /// MTU at open time (capped at 16 KiB): MTU-sized packets then never need a system call, and
    /// anything bigger (GSO super-frames, or a later MTU increase) takes the copy path.
    pub frame_size: usize,
    /// Number of frames, i.e. packets the ring holds before the kernel drops; rounded up to fill
    /// whole blocks.
    pub frame_count: usize,
    /// Bytes per kernel allocation block; a multiple of the page size and at least one frame. `0`
    /// (the default) picks the smallest power of two >= 64 KiB that holds a frame (the kernel
    /// allocates blocks in powers of two, so other sizes waste memory).
    pub block_size: usize,
    /// Receive buffer (`SO_RCVBUFFORCE`, falling back to `SO_RCVBUF` capped by
    /// `net.core.rmem_max`) that holds oversized packets until `rx_batch` fetches them. When it is
    /// full, oversized packets are truncated by the kernel and dropped by us. `0` means the kernel
    /// minimum (about one oversized packet).
    pub rcvbuf: usize,
    /// Send buffer (`SO_SNDBUFFORCE`, falling back to `SO_SNDBUF`): bytes in flight between
    /// `sendmmsg` and the driver's transmit completion before `EAGAIN`.
    pub sndbuf: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            frame_size: 0,
            frame_count: 1024,
            block_size: 0,
            rcvbuf: 8 << 20,
            sndbuf: 4 << 20,
        }
    }
}

/// Counters of one socket. `rx_*`/`tx_*` are kept by this module; `kernel_*` come from
/// `PACKET_STATISTICS` (which the kernel clears on read, so we accumulate them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfStats {
    /// Packets handed to and consumed by the `rx_batch` callback.
    pub rx_packets: u64,
    /// Their bytes (Ethernet frame, virtio header not counted).
    pub rx_bytes: u64,
    /// Of `rx_packets`, those larger than a ring frame, fetched through the socket queue.
    pub rx_oversized: u64,
    /// Frames dropped because the kernel truncated them (`tp_snaplen < tp_len` without a queued
    /// copy), or because they exceed [`MAX_RX_PACKET`].
    pub rx_truncated: u64,
    /// Oversized frames whose queued copy could not be read (should stay 0).
    pub rx_copy_failed: u64,
    /// Frames with an impossible layout (should stay 0).
    pub rx_invalid: u64,
    /// Frames discarded because they arrived before the socket joined its fanout group.
    pub rx_flushed: u64,
    /// Packets the kernel accepted from `tx_batch`.
    pub tx_packets: u64,
    /// Their bytes (virtio header not counted).
    pub tx_bytes: u64,
    /// Packets dropped for lack of resources or link: `EAGAIN`, `ENOBUFS`, `ENETDOWN`, `ENXIO`.
    pub tx_dropped: u64,
    /// Packets the kernel rejected as malformed (`EINVAL`, `EMSGSIZE`, `EFAULT`, ...).
    pub tx_invalid: u64,
    /// Packets the kernel offered to this socket (`tp_packets`, drops included).
    pub kernel_rx_packets: u64,
    /// Packets the kernel dropped because the ring was full (`tp_drops`; for `AF_XDP`
    /// `rx_dropped + rx_ring_full`).
    pub kernel_rx_drops: u64,
    /// `AF_XDP` transmit descriptors the kernel rejected (`tx_invalid_descs`, also in
    /// `tx_invalid`); always 0 for `AF_PACKET`, whose refusals are `sendmmsg` errors.
    pub kernel_tx_invalid: u64,
}

/// What one transmit attempt did with a list of packets, which it takes in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxProgress {
    /// Packets settled from the front of the list: `accepted + refused + down`.
    pub settled: usize,
    /// Handed to the kernel (or queued on the `AF_XDP` TX ring).
    pub accepted: usize,
    /// Refused as malformed for the device (counted as [`VfStats::tx_invalid`]).
    pub refused: usize,
    /// Lost because the link is down or gone (counted as [`VfStats::tx_dropped`]).
    pub down: usize,
    /// The send queue was full at packet `settled`: it and those after it were not sent.
    pub full: bool,
}

/// The frame layout derived from a [`RingConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    frame_size: usize,
    frames_per_block: usize,
    block_size: usize,
    block_count: usize,
}

impl Geometry {
    fn frame_count(&self) -> usize {
        self.frames_per_block * self.block_count
    }

    fn bytes(&self) -> usize {
        self.block_size * self.block_count
    }

    fn new(cfg: &RingConfig, mtu: u32, page_size: usize) -> Result<Self, String> {
        let frame_size = if cfg.frame_size == 0 {
            // macoff = TPACKET_ALIGN(52 + 16) + 10 - 14 for Ethernet; room for the Ethernet header
            // and up to two inline VLAN tags after it.
            let need =
                TPACKET2_HDRLEN + 16 + VNET_HDR_LEN + ETH_HLEN + 2 * VLAN_HLEN + mtu as usize;
            need.clamp(MIN_FRAME_SIZE, AUTO_FRAME_MAX)
                .next_multiple_of(64)
        } else {
            cfg.frame_size
        };
        if frame_size % sys::TPACKET_ALIGNMENT != 0 {
            return Err(format!("frame_size {frame_size} is not a multiple of 16"));
        }
        if frame_size < MIN_FRAME_SIZE {
            return Err(format!("frame_size {frame_size} is below {MIN_FRAME_SIZE}"));
        }
        let block_size = if cfg.block_size == 0 {
            frame_size
                .next_power_of_two()
                .max(AUTO_BLOCK_MIN)
                .next_multiple_of(page_size)
        } else {
            cfg.block_size
        };
        if block_size % page_size != 0 {
            return Err(format!(
                "block_size {block_size} is not a multiple of the page size {page_size}"
            ));
        }
        if block_size < frame_size {
            return Err(format!(
                "block_size {block_size} is smaller than frame_size {frame_size}"
            ));
        }
        if cfg.frame_count == 0 {
            return Err("frame_count is 0".into());
        }
        let frames_per_block = block_size / frame_size;
        let block_count = cfg.frame_count.div_ceil(frames_per_block);
        let geo = Geometry {
            frame_size,
            frames_per_block,
            block_size,
            block_count,
        };
        if geo.bytes() > MAX_RING_BYTES || u32::try_from(block_size).is_err() {
            return Err(format!(
                "ring of {} blocks of {block_size} bytes exceeds {MAX_RING_BYTES} bytes",
                block_count
            ));
        }
        Ok(geo)
    }
}

/// The mmap'd receive ring.
struct Ring {
    base: NonNull<u8>,
    geo: Geometry,
}

impl Ring {
    /// Start of frame `slot` (< frame count).
    fn frame(&self, slot: usize) -> *mut u8 {
        let block = slot / self.geo.frames_per_block;
        let within = slot % self.geo.frames_per_block;
        let offset = block * self.geo.block_size + within * self.geo.frame_size;
        debug_assert!(offset + self.geo.frame_size <= self.geo.bytes());
        // SAFETY: offset + frame_size lies inside the mapping of `geo.bytes()` bytes.
        unsafe { self.base.as_ptr().add(offset) }
    }

    /// The status word of a frame, which the kernel writes concurrently.
    fn status(&self, slot: usize) -> &AtomicU32 {
        // SAFETY: frames start at multiples of 16 bytes inside a page-aligned mapping, so the
        // u32 at offset 0 is aligned; it lives as long as the mapping, i.e. as long as `self`.
        // All accesses to it from user space go through this atomic.
        unsafe { &*(self.frame(slot) as *const AtomicU32) }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `base`/`bytes` describe exactly the mapping created in `PacketSocket::open`, and no
        // reference into it outlives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.geo.bytes());
        }
    }
}

/// A packet of the current ring slot that has been copied into the bounce buffer (an oversized
/// packet, or a VLAN frame without room for the tag), kept until the callback consumes it.
#[derive(Clone, Copy, Debug)]
struct Held {
    slot: usize,
    hdr: VnetHdr,
    start: usize,
    len: usize,
}

/// Where the packet of the current slot is.
enum Ready {
    /// In the ring frame: header and data offsets within the frame.
    Ring {
        hdr: VnetHdr,
        mac: usize,
        len: usize,
    },
    /// In the bounce buffer (see `PacketSocket::held`).
    Bounce,
}

/// One packet socket bound to a netdev; see the module documentation.
pub struct PacketSocket {
    ring: Ring,
    fd: OwnedFd,
    ifname: String,
    ifindex: u32,
    /// Next ring slot to read.
    head: usize,
    /// Buffer for oversized packets: `VLAN_HLEN` bytes of room for a tag, then
    /// `MAX_RX_PACKET` bytes.
    bounce: Vec<u8>,
    held: Option<Held>,
    fanout_group: Option<u16>,
    fanout_pending: bool,
    last_fanout_attempt: Instant,
    /// Preallocated `sendmmsg` headers; their pointers are only valid during `try_tx_batch`.
    msgs: Vec<libc::mmsghdr>,
    pub(super) stats: VfStats,
    kernel_packets: Cell<u64>,
    kernel_drops: Cell<u64>,
}

// SAFETY: the raw pointers inside (`Ring::base`, and the iovec pointers in `msgs`) refer to the
// socket's own mapping, or are scratch values rewritten before each use; nothing is tied to the
// creating thread. `PacketSocket` is not `Sync` (the `Cell`s), so no two threads use it at once.
unsafe impl Send for PacketSocket {}

fn fanout_arg(group: u16) -> u32 {
    u32::from(group) | ((sys::PACKET_FANOUT_HASH | sys::PACKET_FANOUT_FLAG_IGNORE_OUTGOING) << 16)
}

/// Adjusts a header for a VLAN tag inserted after the MAC addresses.
fn shift_for_vlan(h: &mut VnetHdr) {
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        h.csum_start = h.csum_start.saturating_add(VLAN_HLEN as u16);
    }
    if h.hdr_len != 0 {
        h.hdr_len = h.hdr_len.saturating_add(VLAN_HLEN as u16);
    }
}

fn vlan_tag(status: u32, frame: &Tpacket2Hdr) -> [u8; VLAN_HLEN] {
    let tpid = if status & sys::TP_STATUS_VLAN_TPID_VALID != 0 && frame.tp_vlan_tpid != 0 {
        frame.tp_vlan_tpid
    } else {
        ETH_P_8021Q
    };
    let mut tag = [0u8; VLAN_HLEN];
    tag[..2].copy_from_slice(&tpid.to_be_bytes());
    tag[2..].copy_from_slice(&frame.tp_vlan_tci.to_be_bytes());
    tag
}

impl PacketSocket {
    /// Opens a socket on `ifname` for one queue pair.
    ///
    /// `fanout_group`: `Some(id)` when the port has several queue pairs; all sockets of the port
    /// pass the same id (unique per port within the network namespace). The interface may be down
    /// (see the module documentation); it must exist and be Ethernet.
    pub fn open(
        ifname: &str,
        fanout_group: Option<u16>,
        ring: &RingConfig,
    ) -> Result<Self, VfError> {
        let info = interface_info(ifname)?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).unwrap_or(4096).max(4096);
        let geo = Geometry::new(ring, info.mtu, page).map_err(|reason| VfError::BadRing {
            ifname: ifname.to_owned(),
            reason,
        })?;
        let fail = |op: &'static str| VfError::from_os(ifname, op, last_err());

        // Protocol 0: nothing is received until `bind` names the interface.
        let fd = sockopt::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
        .map_err(|e| VfError::from_os(ifname, "socket(AF_PACKET, SOCK_RAW)", e))?;
        let s = fd.as_raw_fd();
        let opt = |name: libc::c_int, op: &'static str, val: libc::c_int| {
            setsockopt(s, libc::SOL_PACKET, name, &val).map_err(|e| VfError::from_os(ifname, op, e))
        };

        opt(
            sys::PACKET_VERSION,
            "setsockopt(PACKET_VERSION, TPACKET_V2)",
            sys::TPACKET_V2,
        )?;
        // Must precede PACKET_RX_RING (EBUSY afterwards).
        opt(sys::PACKET_VNET_HDR, "setsockopt(PACKET_VNET_HDR)", 1)?;
        // Any non-zero value enables the copy of oversized packets to the socket queue.
        opt(sys::PACKET_COPY_THRESH, "setsockopt(PACKET_COPY_THRESH)", 1)?;
        opt(
            sys::PACKET_IGNORE_OUTGOING,
            "setsockopt(PACKET_IGNORE_OUTGOING)",
            1,
        )?;
        opt(
            sys::PACKET_QDISC_BYPASS,
            "setsockopt(PACKET_QDISC_BYPASS)",
            1,
        )?;
        set_buffer(s, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, ring.rcvbuf)
            .map_err(|e| VfError::from_os(ifname, "setsockopt(SO_RCVBUF)", e))?;
        set_buffer(s, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, ring.sndbuf)
            .map_err(|e| VfError::from_os(ifname, "setsockopt(SO_SNDBUF)", e))?;

        if fanout_group.is_some() {
            // Between bind and joining the group this socket would receive a copy of every packet
            // its siblings also get. A drop-everything filter keeps the ring empty meanwhile.
            attach_drop_all(s).map_err(|e| VfError::from_os(ifname, "SO_ATTACH_FILTER", e))?;
        }

        let req = sys::TpacketReq {
            tp_block_size: geo.block_size as u32,
            tp_block_nr: geo.block_count as u32,
            tp_frame_size: geo.frame_size as u32,
            tp_frame_nr: geo.frame_count() as u32,
        };
        setsockopt(s, libc::SOL_PACKET, sys::PACKET_RX_RING, &req)
            .map_err(|e| VfError::from_os(ifname, "setsockopt(PACKET_RX_RING)", e))?;
        // SAFETY: mapping the ring the kernel just allocated for this socket; the size is exactly
        // the ring size, as packet_mmap() requires. The result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                geo.bytes(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                s,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(fail("mmap(PACKET_RX_RING)"));
        }
        let ring_map = Ring {
            base: NonNull::new(base.cast()).ok_or_else(|| VfError::Io {
                ifname: ifname.to_owned(),
                op: "mmap(PACKET_RX_RING)",
                source: io::Error::other("mmap returned NULL"),
            })?,
            geo,
        };

        // SAFETY: sockaddr_ll is plain old data; all zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = info.index as i32;
        sockopt::bind(s, &sll).map_err(|e| VfError::from_os(ifname, "bind(AF_PACKET)", e))?;

        let mreq = sys::PacketMreq {
            mr_ifindex: info.index as i32,
            mr_type: sys::PACKET_MR_PROMISC,
            ..Default::default()
        };
        setsockopt(s, libc::SOL_PACKET, sys::PACKET_ADD_MEMBERSHIP, &mreq).map_err(|e| {
            VfError::from_os(
                ifname,
                "setsockopt(PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC)",
                e,
            )
        })?;

        let mut sock = PacketSocket {
            ring: ring_map,
            fd,
            ifname: ifname.to_owned(),
            ifindex: info.index,
            head: 0,
            bounce: vec![0u8; VLAN_HLEN + MAX_RX_PACKET],
            held: None,
            fanout_group,
            fanout_pending: false,
            last_fanout_attempt: Instant::now(),
            msgs: Vec::with_capacity(MAX_TX_BATCH),
            stats: VfStats::default(),
            kernel_packets: Cell::new(0),
            kernel_drops: Cell::new(0),
        };
        // SAFETY: mmsghdr is plain old data (pointers and integers); zero is a valid value.
        sock.msgs
            .resize_with(MAX_TX_BATCH, || unsafe { std::mem::zeroed() });

        if let Some(group) = fanout_group {
            let joined = sock.join_fanout(group)?;
            // Replaces the drop-all filter (atomically) once we receive only our share.
            attach_drop_outgoing(s).map_err(|e| VfError::from_os(ifname, "SO_ATTACH_FILTER", e))?;
            if !joined {
                log::info!(
                    "{ifname}: interface is down; joining fanout group {group} once it is up"
                );
                sock.fanout_pending = true;
                // A packet that slipped in after the interface came up, before the filter went.
                sock.flush();
            }
        }
        Ok(sock)
    }

    /// Tries to join the fanout group. `Ok(false)`: the interface is down, try again later.
    fn join_fanout(&mut self, group: u16) -> Result<bool, VfError> {
        self.last_fanout_attempt = Instant::now();
        match setsockopt(
            self.fd.as_raw_fd(),
            libc::SOL_PACKET,
            sys::PACKET_FANOUT,
            &fanout_arg(group),
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EALREADY) => Ok(true),
            // fanout_add() requires a running (bound and up) socket; EINVAL otherwise. EINVAL also
            // means "group exists with other settings", so look at the link to tell them apart.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                match interface_info(&self.ifname) {
                    Ok(info) if !info.up => Ok(false),
                    _ => Err(VfError::Fanout {
                        ifname: self.ifname.clone(),
                        group,
                        source: e,
                    }),
                }
            }
            Err(e) => Err(VfError::Fanout {
                ifname: self.ifname.clone(),
                group,
                source: e,
            }),
        }
    }

    /// Retries a pending fanout join; on success discards what arrived before it.
    fn retry_fanout(&mut self) {
        let Some(group) = self.fanout_group else {
            self.fanout_pending = false;
            return;
        };
        match self.join_fanout(group) {
            Ok(true) => {
                self.fanout_pending = false;
                self.flush();
                log::info!("{}: joined fanout group {group}", self.ifname);
            }
            Ok(false) => {}
            Err(e) => log::warn!("{e}"),
        }
    }

    /// True while the socket still waits to join its fanout group (interface down so far).
    pub fn fanout_pending(&self) -> bool {
        self.fanout_pending
    }

    /// Discards every frame in the ring and every queued oversized packet.
    fn flush(&mut self) {
        for _ in 0..self.ring.geo.frame_count() {
            let slot = self.head;
            if self.ring.status(slot).load(Ordering::Acquire) & sys::TP_STATUS_USER == 0 {
                break;
            }
            self.stats.rx_flushed += 1;
            self.release(slot);
        }
        self.held = None;
        self.drain_queue();
    }

    /// Empties the socket queue of oversized packets (after losing track of which frame they
    /// belong to). Bounded: at most as many packets as ring frames plus some.
    fn drain_queue(&mut self) {
        let mut buf = [0u8; 64];
        for _ in 0..self.ring.geo.frame_count() + 64 {
            // SAFETY: `buf` is writable for its length during the call.
            let rc = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if rc < 0 {
                let e = last_err();
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::ENETDOWN) => continue,
                    _ => break,
                }
            }
        }
    }

    /// Name of the interface.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Index of the interface at open time.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Bytes per ring frame actually used (see [`RingConfig::frame_size`]).
    pub fn frame_size(&self) -> usize {
        self.ring.geo.frame_size
    }

    /// Number of ring frames actually used.
    pub fn frame_count(&self) -> usize {
        self.ring.geo.frame_count()
    }

    /// Returns the frame at `slot` to the kernel and advances past it.
    fn release(&mut self, slot: usize) {
        if self.held.is_some_and(|h| h.slot == slot) {
            self.held = None;
        }
        self.ring
            .status(slot)
            .store(sys::TP_STATUS_KERNEL, Ordering::Release);
        self.head = (slot + 1) % self.ring.geo.frame_count();
    }

    /// Visits up to `max` received packets in order.
    ///
    /// The callback gets the virtio header and the Ethernet frame (ring memory, or the bounce
    /// buffer for oversized packets) and returns `true` if it consumed the packet (its slot goes
    /// back to the kernel) or `false` to stop without consuming it (e.g. the guest has no
    /// buffers): the same packet is offered again by the next call. Returns the number consumed.
    /// Reading MTU-sized packets needs no system call.
    pub fn rx_batch<F: FnMut(&VnetHdr, &[u8]) -> bool>(&mut self, max: usize, mut f: F) -> usize {
        if self.fanout_pending {
            // Traffic means the interface is up again; join before delivering anything.
            self.retry_fanout();
        }
        let mut done = 0;
        while done < max {
            let slot = self.head;
            let status = self.ring.status(slot).load(Ordering::Acquire);
            if status & sys::TP_STATUS_USER == 0 {
                break;
            }
            let Some(ready) = self.prepare(slot, status) else {
                self.release(slot);
                continue;
            };
            let (consumed, len) = match ready {
                Ready::Ring { hdr, mac, len } => {
                    // SAFETY: `prepare` checked mac + len <= frame_size; the frame is owned by
                    // user space (TP_STATUS_USER) until `release`, so the kernel does not write
                    // it while the slice lives.
                    let data = unsafe {
                        std::slice::from_raw_parts(self.ring.frame(slot).add(mac).cast_const(), len)
                    };
                    (f(&hdr, data), len)
                }
                Ready::Bounce => match self.held {
                    Some(h) => (f(&h.hdr, &self.bounce[h.start..h.start + h.len]), h.len),
                    None => {
                        self.stats.rx_invalid += 1;
                        self.release(slot);
                        continue;
                    }
                },
            };
            if !consumed {
                break;
            }
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += len as u64;
            self.release(slot);
            done += 1;
        }
        done
    }

    /// Locates the packet of a user-owned frame, fixing it up (VLAN tag, copy path) as needed.
    /// `None`: the frame is to be dropped (already counted).
    fn prepare(&mut self, slot: usize, status: u32) -> Option<Ready> {
        if let Some(h) = self.held {
            if h.slot == slot {
                return Some(Ready::Bounce);
            }
            self.held = None;
        }
        let frame = self.ring.frame(slot);
        // SAFETY: the frame header lies at the start of the frame (>= 52 bytes); the kernel wrote
        // it before publishing TP_STATUS_USER, which we loaded with Acquire ordering.
        let th: Tpacket2Hdr = unsafe { std::ptr::read_unaligned(frame.cast()) };
        if status & sys::TP_STATUS_COPY != 0 {
            return self.fetch_oversized(slot, status, &th);
        }
        let mut mac = usize::from(th.tp_mac);
        let mut len = th.tp_snaplen as usize;
        if len < th.tp_len as usize {
            self.stats.rx_truncated += 1;
            return None;
        }
        let frame_size = self.ring.geo.frame_size;
        if mac < TPACKET2_HDRLEN + VNET_HDR_LEN || mac + len > frame_size || len < ETH_HLEN {
            self.stats.rx_invalid += 1;
            return None;
        }
        // SAFETY: mac - VNET_HDR_LEN >= TPACKET2_HDRLEN and mac <= frame_size: inside the frame.
        let vnet_bytes =
            unsafe { std::slice::from_raw_parts(frame.add(mac - VNET_HDR_LEN), VNET_HDR_LEN) };
        let mut hdr = VnetHdr::from_bytes(vnet_bytes)?;

        if status & sys::TP_STATUS_VLAN_VALID != 0 {
            let tag = vlan_tag(status, &th);
            shift_for_vlan(&mut hdr);
            if len + VLAN_HLEN > MAX_RX_PACKET {
                self.stats.rx_truncated += 1;
                return None;
            }
            if mac >= TPACKET2_HDRLEN + VNET_HDR_LEN + VLAN_HLEN {
                // Move header and MAC addresses 4 bytes down, put the tag after them. The frame is
                // ours; record the result in it so that a re-offer sees a plain tagged frame.
                // SAFETY: source [mac-10, mac+12) and destination [mac-14, mac+8) lie inside the
                // frame (mac-14 >= 52, mac+12 <= mac+len <= frame_size); ptr::copy allows overlap.
                unsafe {
                    std::ptr::copy(
                        frame.add(mac - VNET_HDR_LEN),
                        frame.add(mac - VNET_HDR_LEN - VLAN_HLEN),
                        VNET_HDR_LEN + ETH_ALEN2,
                    );
                    mac -= VLAN_HLEN;
                    len += VLAN_HLEN;
                    std::ptr::copy_nonoverlapping(
                        hdr.as_slice().as_ptr(),
                        frame.add(mac - VNET_HDR_LEN),
                        VNET_HDR_LEN,
                    );
                    std::ptr::copy_nonoverlapping(
                        tag.as_ptr(),
                        frame.add(mac + ETH_ALEN2),
                        VLAN_HLEN,
                    );
                    let th_ptr = frame.cast::<Tpacket2Hdr>();
                    std::ptr::addr_of_mut!((*th_ptr).tp_mac).write_unaligned(mac as u16);
                    std::ptr::addr_of_mut!((*th_ptr).tp_snaplen).write_unaligned(len as u32);
                    std::ptr::addr_of_mut!((*th_ptr).tp_len).write_unaligned(len as u32);
                }
                self.ring.status(slot).store(
                    status & !(sys::TP_STATUS_VLAN_VALID | sys::TP_STATUS_VLAN_TPID_VALID),
                    Ordering::Relaxed,
                );
            } else {
                // No room in front (unusual link-layer header length): assemble in the bounce
                // buffer instead.
                // SAFETY: [mac, mac+len) is inside the frame (checked above).
                let src = unsafe { std::slice::from_raw_parts(frame.add(mac).cast_const(), len) };
                self.bounce[..ETH_ALEN2].copy_from_slice(&src[..ETH_ALEN2]);
                self.bounce[ETH_ALEN2..ETH_ALEN2 + VLAN_HLEN].copy_from_slice(&tag);
                self.bounce[ETH_ALEN2 + VLAN_HLEN..len + VLAN_HLEN]
                    .copy_from_slice(&src[ETH_ALEN2..]);
                self.held = Some(Held {
                    slot,
                    hdr,
                    start: 0,
                    len: len + VLAN_HLEN,
                });
                return Some(Ready::Bounce);
            }
        }
        Some(Ready::Ring { hdr, mac, len })
    }

    /// Fetches the whole packet of a `TP_STATUS_COPY` frame from the socket queue.
    fn fetch_oversized(&mut self, slot: usize, status: u32, th: &Tpacket2Hdr) -> Option<Ready> {
        let mut vnet = [0u8; VNET_HDR_LEN];
        let mut iov = [
            libc::iovec {
                iov_base: vnet.as_mut_ptr().cast(),
                iov_len: VNET_HDR_LEN,
            },
            libc::iovec {
                iov_base: self.bounce[VLAN_HLEN..].as_mut_ptr().cast(),
                iov_len: MAX_RX_PACKET,
            },
        ];
        let mut total = None;
        // A pending socket error (ENETDOWN after a link flap) fails one receive and is cleared by
        // it, hence one retry.
        for _ in 0..3 {
            // SAFETY: msghdr is plain old data; zero is valid.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len();
            // SAFETY: `msg` points at two iovecs over `vnet` and `bounce[4..]`, both writable
            // for the stated lengths during the call.
            let rc = unsafe {
                libc::recvmsg(
                    self.fd.as_raw_fd(),
                    &mut msg,
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if rc >= 0 {
                total = Some(rc as usize);
                break;
            }
            match last_err().raw_os_error() {
                Some(libc::EINTR) | Some(libc::ENETDOWN) => continue,
                _ => break,
            }
        }
        let Some(total) = total.filter(|t| *t >= VNET_HDR_LEN) else {
            self.stats.rx_copy_failed += 1;
            return None;
        };
        let len = total - VNET_HDR_LEN;
        if len != th.tp_len as usize {
            // Not this frame's packet: frames and queue are out of step. Resynchronise by
            // dropping the queue; frames whose copies are gone fail the receive above.
            self.stats.rx_copy_failed += 1;
            self.drain_queue();
            return None;
        }
        let vlan = status & sys::TP_STATUS_VLAN_VALID != 0;
        if len > MAX_RX_PACKET || (vlan && len + VLAN_HLEN > MAX_RX_PACKET) {
            self.stats.rx_truncated += 1;
            return None;
        }
        let mut hdr = VnetHdr::from_bytes(&vnet)?;
        let (start, len) = if vlan {
            if len < ETH_ALEN2 {
                self.stats.rx_invalid += 1;
                return None;
            }
            let tag = vlan_tag(status, th);
            self.bounce.copy_within(VLAN_HLEN..VLAN_HLEN + ETH_ALEN2, 0);
            self.bounce[ETH_ALEN2..ETH_ALEN2 + VLAN_HLEN].copy_from_slice(&tag);
            shift_for_vlan(&mut hdr);
            (0, len + VLAN_HLEN)
        } else {
            (VLAN_HLEN, len)
        };
        self.stats.rx_oversized += 1;
        self.held = Some(Held {
            slot,
            hdr,
            start,
            len,
        });
        Some(Ready::Bounce)
    }

    /// Sends packets with one `sendmmsg` per [`MAX_TX_BATCH`], in order, until the send queue
    /// is full.
    ///
    /// `iovs` holds all iovecs; `pkts[i]` is the range of `iovs` forming packet `i`, whose first
    /// iovec must be exactly its 10-byte [`VnetHdr`] and the rest the Ethernet frame (typically
    /// pointing straight into guest memory; the kernel copies from there, so the memory must stay
    /// mapped for the duration of the call only). A full socket send buffer (`EAGAIN`) or device
    /// queue (`ENOBUFS`, which is what a full driver ring gives with `PACKET_QDISC_BYPASS`)
    /// stops the batch with [`TxProgress::full`]: the packets from [`TxProgress::settled`] on
    /// were not sent and may be tried again. Refused packets ([`VfStats::tx_invalid`]) and
    /// packets lost to a down link ([`VfStats::tx_dropped`]) are settled.
    /// Errors only for a malformed description or an unusable socket.
    pub fn try_tx_batch(
        &mut self,
        iovs: &[libc::iovec],
        pkts: &[Range<usize>],
    ) -> Result<TxProgress, VfError> {
        if self.fanout_pending && self.last_fanout_attempt.elapsed() >= FANOUT_RETRY_INTERVAL {
            self.retry_fanout();
        }
        check_tx_batch(&self.ifname, iovs, pkts, Some(MAX_IOV_PER_PACKET))?;
        let mut p = TxProgress::default();
        for chunk in pkts.chunks(MAX_TX_BATCH) {
            self.send_chunk(iovs, chunk, &mut p)?;
            if p.full {
                break;
            }
        }
        self.stats.tx_packets += p.accepted as u64;
        Ok(p)
    }

    /// One `sendmmsg` round of [`PacketSocket::try_tx_batch`] (at most [`MAX_TX_BATCH`]
    /// packets), adding to `p`.
    fn send_chunk(
        &mut self,
        iovs: &[libc::iovec],
        chunk: &[Range<usize>],
        p: &mut TxProgress,
    ) -> Result<(), VfError> {
        let n = chunk.len();
        if p.down > 0 {
            self.stats.tx_dropped += n as u64;
            p.down += n;
            p.settled += n;
            return Ok(());
        }
        for (m, r) in self.msgs.iter_mut().zip(chunk) {
            // SAFETY: mmsghdr is plain old data; zero is valid.
            *m = unsafe { std::mem::zeroed() };
            // The kernel only reads iovecs through msg_iov; the cast to *mut is an ABI detail.
            m.msg_hdr.msg_iov = iovs[r.clone()].as_ptr().cast_mut();
            m.msg_hdr.msg_iovlen = r.len();
        }
        let fd = self.fd.as_raw_fd();
        let mut idx = 0;
        let mut retries = 0;
        while idx < n {
            // SAFETY: msgs[idx..n] are initialised mmsghdrs whose iovec arrays (slices of
            // `iovs`) and the memory they describe are valid for the duration of the call, as
            // the caller guarantees for `iovs`.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    self.msgs[idx..].as_mut_ptr(),
                    (n - idx) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                let sent = rc as usize;
                for r in &chunk[idx..idx + sent] {
                    let bytes: usize = iovs[r.clone()].iter().map(|v| v.iov_len).sum();
                    self.stats.tx_bytes += (bytes - VNET_HDR_LEN) as u64;
                }
                idx += sent;
                p.accepted += sent;
                p.settled += sent;
                continue;
            }
            let errno = if rc == 0 {
                libc::EAGAIN
            } else {
                last_err().raw_os_error().unwrap_or(libc::EIO)
            };
            match errno {
                libc::EINTR if retries < 8 => retries += 1,
                // A stale socket error left by a link flap fails one send and is cleared.
                libc::ENETDOWN if retries == 0 => retries += 1,
                libc::EBADF | libc::ENOTSOCK => {
                    return Err(VfError::from_os(
                        &self.ifname,
                        "sendmmsg",
                        io::Error::from_raw_os_error(errno),
                    ));
                }
                libc::EAGAIN | libc::ENOBUFS | libc::EINTR => {
                    // Out of socket buffer or device queue: the rest would fail the same way.
                    p.full = true;
                    return Ok(());
                }
                libc::ENETDOWN | libc::ENXIO | libc::ENODEV => {
                    self.stats.tx_dropped += (n - idx) as u64;
                    p.down += n - idx;
                    p.settled += n - idx;
                    return Ok(());
                }
                _ => {
                    // This packet was refused (bad header, too long, unreadable memory).
                    self.stats.tx_invalid += 1;
                    p.refused += 1;
                    p.settled += 1;
                    idx += 1;
                }
            }
        }
        Ok(())
    }

    /// Counters; reads (and accumulates) the kernel's clear-on-read `PACKET_STATISTICS`, one
    /// system call.
    pub fn stats(&self) -> VfStats {
        let read = sockopt::getsockopt::<sys::TpacketStats>(
            self.fd.as_raw_fd(),
            libc::SOL_PACKET,
            sys::PACKET_STATISTICS,
        );
        if let Ok((st, _)) = read {
            self.kernel_packets
                .set(self.kernel_packets.get() + u64::from(st.tp_packets));
            self.kernel_drops
                .set(self.kernel_drops.get() + u64::from(st.tp_drops));
        }
        VfStats {
            kernel_rx_packets: self.kernel_packets.get(),
            kernel_rx_drops: self.kernel_drops.get(),
            ..self.stats
        }
    }

    /// Reads and clears the socket's pending error (see `sockopt::take_error`).
    pub fn take_error(&self) -> Option<io::Error> {
        sockopt::take_error(self.fd.as_raw_fd())
    }
}

impl AsRawFd for PacketSocket {
    /// The socket becomes readable (`EPOLLIN`) when a ring frame or an oversized packet is
    /// waiting; the kernel signals every packet. Register it edge-triggered and call
    /// [`PacketSocket::rx_batch`] until it returns less than asked. If the callback refused a packet
    /// (guest out of buffers), no new edge comes for packets already waiting: call `rx_batch`
    /// again when the guest adds buffers. `EPOLLERR` means a pending socket error (e.g. the link
    /// went down); clear it with [`PacketSocket::take_error`].
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl std::fmt::Debug for PacketSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketSocket")
            .field("ifname", &self.ifname)
            .field("ifindex", &self.ifindex)
            .field("fd", &self.fd.as_raw_fd())
            .field("geometry", &self.ring.geo)
            .field("fanout_group", &self.fanout_group)
            .field("fanout_pending", &self.fanout_pending)
            .finish()
    }
}

/// Sets a socket buffer size, privileged variant first (ignores `net.core.*mem_max`).
fn set_buffer(fd: RawFd, force: libc::c_int, plain: libc::c_int, bytes: usize) -> io::Result<()> {
    let val = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX / 2);
    // The kernel doubles the value (bookkeeping overhead), hence bytes / 2.
    match setsockopt(fd, libc::SOL_SOCKET, force, &val) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            setsockopt(fd, libc::SOL_SOCKET, plain, &val)
        }
        Err(e) => Err(e),
    }
}

/// Attaches a classic BPF program that drops every packet.
fn attach_drop_all(fd: RawFd) -> io::Result<()> {
    let mut code = [libc::sock_filter {
        code: 0x06, // BPF_RET | BPF_K
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: code.as_mut_ptr(),
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)
}

/// Attaches a classic BPF program that drops packets the host transmits (`PACKET_OUTGOING`) and
/// accepts everything else whole.
///
/// Fanout members receive through the group's hook, so their own `PACKET_IGNORE_OUTGOING` is not
/// consulted; the group flag that replaces it exists only since Linux 6.2. The filter runs per
/// socket in every kernel, so a guest never sees copies of what the host itself sends on the VF
/// (IPv6 autoconfiguration, LLDP agents, ...).
fn attach_drop_outgoing(fd: RawFd) -> io::Result<()> {
    const SKF_AD_PKTTYPE: u32 = (-0x1000i32) as u32 + 4; // SKF_AD_OFF + SKF_AD_PKTTYPE
    const PACKET_OUTGOING: u32 = 4;
    let mut code = [
        // ld [pkttype]
        libc::sock_filter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: SKF_AD_PKTTYPE,
        },
        // jeq #PACKET_OUTGOING, drop, accept
        libc::sock_filter {
            code: 0x15,
            jt: 0,
            jf: 1,
            k: PACKET_OUTGOING,
        },
        // drop: ret #0
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0,
        },
        // accept: ret #-1 (whole packet)
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: u32::MAX,
        },
    ];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)
}

#[cfg(test)]
#[path = "af_packet_tests.rs"]
mod tests;
