//! An `AF_XDP` socket on one queue of a VF: the faster alternative to [`super::af_packet`].
//!
//! # Why and how
//! An `AF_PACKET` socket sees every packet as an skb that went through the core receive path.
//! `AF_XDP` takes packets at the XDP hook, before any skb exists on drivers with native XDP, and
//! with zero copy where the driver supports it the NIC writes straight into our memory. Each
//! queue pair gets one socket bound to the netdev queue of the same index; a tiny XDP program
//! ([`super::xdp_prog`]) redirects each queue's packets to its socket.
//!
//! Memory: one UMEM per socket of `RX_FRAMES + TX_FRAMES` 4 KiB frames. The first `RX_FRAMES`
//! circulate between the fill ring, the kernel, the RX ring and [`XdpSocket::rx_batch`]'s
//! callback; the rest are transmit buffers, taken from a free list and returned through the
//! completion ring. Each ring is as large as the frames that can be in it, so a ring is never
//! full when we have a frame to put in it.
//!
//! # Modes
//! The program is attached in native (driver) mode if the driver takes it, else in generic (skb)
//! mode, which works on any netdev (veth included, without any program on the peer). The socket
//! binds with `XDP_ZEROCOPY` when the program runs natively and falls back to `XDP_COPY`.
//! [`XdpSocket::describe`] says what was obtained; the port logs it.
//!
//! # Offloads
//! `AF_XDP` frames carry no virtio-net header and no GSO or checksum metadata, so:
//! - transmit: a guest TSO/USO/UFO super-frame is cut into wire-sized frames in software
//!   ([`crate::offload::segment`]) and a partial checksum is completed
//!   ([`crate::offload::complete_checksum`]) before the frames are queued. The device therefore
//!   keeps offering `CSUM`/`HOST_TSO*`/`HOST_UFO` in this mode: the relay honours them itself, and
//!   the guest saves its own segmentation work, which under a VM costs more than ours.
//! - receive: frames are handed over with an all-zero header (no GSO, no `DATA_VALID`), so the
//!   guest checks checksums itself. The `GUEST_*` offers are trivially honoured (a guest that
//!   accepts GSO frames is simply never sent one).
//! - Caveat: frames that the *host* generated with a partial checksum (`CHECKSUM_PARTIAL`, e.g.
//!   the local stack of a veth peer with tx checksumming on) reach XDP before the checksum is
//!   filled in, and nothing in the frame says so. Real VFs receive from the wire, where every
//!   checksum is complete; for veth test setups turn checksum offload off on the peer
//!   (`ethtool -K PEER tx off`) or use `AF_PACKET`.
//! - VLAN tags that a NIC strips into metadata (rx VLAN offload) are not restored in this mode;
//!   turn `rxvlan` off on such VFs. Tags in the frame (veth, generic mode) pass untouched.
//! - Frames larger than a UMEM frame minus the XDP headroom ([`MAX_XDP_FRAME`]) cannot be
//!   received (no multi-buffer `XDP_USE_SG` support here), so the port refuses `AF_XDP` on
//!   interfaces whose MTU needs more.

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::sockopt::{self, last_err, setsockopt};
use super::xdp_prog::{self, XdpProgram};
use super::{check_tx_batch, TxProgress, VfError, VfStats};
use crate::net_hdr::{VnetHdr, VNET_HDR_LEN};
use crate::offload;
use virtq::GuestSlice;

/// Bytes per UMEM frame (chunk); the page size, the largest chunk the kernel allows in aligned
/// mode.
pub const FRAME_SIZE: usize = 4096;
/// `XDP_PACKET_HEADROOM`: the kernel keeps this much in front of every received frame.
const XDP_PACKET_HEADROOM: usize = 256;
/// Largest frame (Ethernet header included) that fits one UMEM frame on receive.
pub const MAX_XDP_FRAME: usize = FRAME_SIZE - XDP_PACKET_HEADROOM;
/// Frames for receiving; also the size of the fill and RX rings.
const RX_FRAMES: u32 = 1024;
/// Frames for transmitting; also the size of the TX and completion rings.
const TX_FRAMES: u32 = 1024;
/// Largest guest packet gathered for segmentation (a 64 KiB GSO frame plus headers).
const MAX_GATHER: usize = 65536 + 256;
/// Bound on `sendto` kicks per batch: copy mode sends at most 32 frames per call.
const MAX_KICKS: usize = 256;

/// An anonymous mapping, unmapped on drop.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize, fd: RawFd, offset: libc::off_t) -> io::Result<Mapping> {
        let (flags, fd) = if fd < 0 {
            (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
            )
        } else {
            (libc::MAP_SHARED | libc::MAP_POPULATE, fd)
        };
        // SAFETY: a fresh mapping at an address of the kernel's choice; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_err());
        }
        let base = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { base, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping created in `new`; no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// One of the four mmap'd rings: producer and consumer indices shared with the kernel, and a
/// power-of-two array of descriptors (`u64` addresses for fill/completion, `xdp_desc` for
/// RX/TX).
struct Ring {
    map: Mapping,
    producer: usize,
    consumer: usize,
    flags: usize,
    desc: usize,
    mask: u32,
}

impl Ring {
    fn map(
        fd: RawFd,
        off: &libc::xdp_ring_offset,
        size: u32,
        entry: usize,
        pgoff: u64,
    ) -> io::Result<Ring> {
        let len = off.desc as usize + size as usize * entry;
        let map = Mapping::new(len, fd, pgoff as libc::off_t)?;
        let ring = Ring {
            map,
            producer: off.producer as usize,
            consumer: off.consumer as usize,
            flags: off.flags as usize,
            desc: off.desc as usize,
            mask: size - 1,
        };
        for o in [ring.producer, ring.consumer, ring.flags] {
            if o % 4 != 0 || o + 4 > ring.desc {
                return Err(io::Error::other("kernel ring offsets out of range"));
            }
        }
        Ok(ring)
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: `off` was checked in `map` to be an aligned u32 inside the mapping, which lives
        // as long as `self`; the kernel accesses these words concurrently, hence atomics.
        unsafe { &*(self.map.base.as_ptr().add(off) as *const AtomicU32) }
    }

    fn producer(&self) -> &AtomicU32 {
        self.word(self.producer)
    }

    fn consumer(&self) -> &AtomicU32 {
        self.word(self.consumer)
    }

    fn needs_wakeup(&self) -> bool {
        self.word(self.flags).load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    /// Pointer to entry `idx` (masked) of an array of `T`.
    fn entry<T>(&self, idx: u32) -> *mut T {
        let i = (idx & self.mask) as usize;
        // SAFETY: `desc + (mask + 1) * size_of::<T>()` is the mapping's length (see `map`).
        unsafe { self.map.base.as_ptr().add(self.desc).cast::<T>().add(i) }
    }
}

/// One `AF_XDP` socket with its UMEM; see the module documentation.
pub struct XdpSocket {
    // Rings first: they are unmapped before the socket closes.
    fill: Ring,
    comp: Ring,
    rx: Ring,
    tx: Ring,
    fd: OwnedFd,
    umem: Mapping,
    /// Keeps the program attached while any socket of the port is open.
    prog: Arc<XdpProgram>,
    /// Keeps the interface promiscuous while any socket of the port is open.
    promisc: Option<Arc<OwnedFd>>,
    ifname: String,
    queue: u32,
    zero_copy: bool,
    /// Transmit frames (UMEM addresses) not in the kernel's hands.
    tx_free: Vec<u64>,
    /// A guest super-frame gathered for segmentation.
    gather: Vec<u8>,
    /// Segment buffer of [`offload::segment`].
    scratch: Vec<u8>,
    /// Frames (address, length) holding the segments of the super-frame being queued.
    segs: Vec<(u64, u32)>,
    pub(super) stats: VfStats,
}

// SAFETY: the raw pointers (inside `Mapping`s) refer to this socket's own mappings; nothing is
// tied to the creating thread. Not `Sync`: one worker uses a socket at a time.
unsafe impl Send for XdpSocket {}

impl XdpSocket {
    /// Opens the socket for netdev queue `queue` of `ifname` and adds it to `prog`'s map. With
    /// `zero_copy` it binds with `XDP_ZEROCOPY` (which only a native program allows) and fails if
    /// the driver cannot; otherwise it binds in copy mode.
    pub fn open(
        ifname: &str,
        ifindex: u32,
        queue: u32,
        prog: Arc<XdpProgram>,
        zero_copy: bool,
    ) -> Result<XdpSocket, VfError> {
        let fail = |op: &'static str, e: io::Error| VfError::from_os(ifname, op, e);
        let fd = sockopt::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0)
            .map_err(|e| fail("socket(AF_XDP)", e))?;
        let s = fd.as_raw_fd();

        let frames = (RX_FRAMES + TX_FRAMES) as usize;
        let umem = Mapping::new(frames * FRAME_SIZE, -1, 0).map_err(|e| fail("mmap(UMEM)", e))?;
        // SAFETY: xdp_umem_reg is plain old data; zero is valid.
        let mut reg: libc::xdp_umem_reg = unsafe { std::mem::zeroed() };
        reg.addr = umem.base.as_ptr() as u64;
        reg.len = umem.len as u64;
        reg.chunk_size = FRAME_SIZE as u32;
        reg.headroom = 0;
        setsockopt(s, libc::SOL_XDP, libc::XDP_UMEM_REG, &reg)
            .map_err(|e| fail("setsockopt(XDP_UMEM_REG)", e))?;
        let size = |n: u32| n as libc::c_int;
        setsockopt(s, libc::SOL_XDP, libc::XDP_UMEM_FILL_RING, &size(RX_FRAMES))
            .map_err(|e| fail("setsockopt(XDP_UMEM_FILL_RING)", e))?;
        setsockopt(
            s,
            libc::SOL_XDP,
            libc::XDP_UMEM_COMPLETION_RING,
            &size(TX_FRAMES),
        )
        .map_err(|e| fail("setsockopt(XDP_UMEM_COMPLETION_RING)", e))?;
        setsockopt(s, libc::SOL_XDP, libc::XDP_RX_RING, &size(RX_FRAMES))
            .map_err(|e| fail("setsockopt(XDP_RX_RING)", e))?;
        setsockopt(s, libc::SOL_XDP, libc::XDP_TX_RING, &size(TX_FRAMES))
            .map_err(|e| fail("setsockopt(XDP_TX_RING)", e))?;

        let (off, len) =
            sockopt::getsockopt::<libc::xdp_mmap_offsets>(s, libc::SOL_XDP, libc::XDP_MMAP_OFFSETS)
                .map_err(|e| fail("getsockopt(XDP_MMAP_OFFSETS)", e))?;
        if len != std::mem::size_of::<libc::xdp_mmap_offsets>() {
            // Kernels before 5.4 lack the flags words (need_wakeup); not supported.
            return Err(fail(
                "getsockopt(XDP_MMAP_OFFSETS)",
                io::Error::other("kernel too old (no ring flags)"),
            ));
        }
        let desc = std::mem::size_of::<libc::xdp_desc>();
        let fill = Ring::map(s, &off.fr, RX_FRAMES, 8, libc::XDP_UMEM_PGOFF_FILL_RING)
            .map_err(|e| fail("mmap(fill ring)", e))?;
        let comp = Ring::map(
            s,
            &off.cr,
            TX_FRAMES,
            8,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
        )
        .map_err(|e| fail("mmap(completion ring)", e))?;
        let rx = Ring::map(s, &off.rx, RX_FRAMES, desc, libc::XDP_PGOFF_RX_RING as u64)
            .map_err(|e| fail("mmap(RX ring)", e))?;
        let tx = Ring::map(s, &off.tx, TX_FRAMES, desc, libc::XDP_PGOFF_TX_RING as u64)
            .map_err(|e| fail("mmap(TX ring)", e))?;

        // Every receive frame starts in the fill ring.
        let prod = fill.producer().load(Ordering::Relaxed);
        for i in 0..RX_FRAMES {
            // SAFETY: entry() points inside the fill ring's descriptor array.
            unsafe {
                fill.entry::<u64>(prod.wrapping_add(i))
                    .write(u64::from(i) * FRAME_SIZE as u64)
            };
        }
        fill.producer()
            .store(prod.wrapping_add(RX_FRAMES), Ordering::Release);

        // SAFETY: sockaddr_xdp is plain old data; zero is valid.
        let mut sxdp: libc::sockaddr_xdp = unsafe { std::mem::zeroed() };
        sxdp.sxdp_family = libc::AF_XDP as u16;
        sxdp.sxdp_flags = libc::XDP_USE_NEED_WAKEUP
            | if zero_copy {
                libc::XDP_ZEROCOPY
            } else {
                libc::XDP_COPY
            };
        sxdp.sxdp_ifindex = ifindex;
        sxdp.sxdp_queue_id = queue;
        sockopt::bind(s, &sxdp).map_err(|e| {
            fail(
                if zero_copy {
                    "bind(AF_XDP, zero copy)"
                } else {
                    "bind(AF_XDP, copy)"
                },
                e,
            )
        })?;
        prog.insert(queue, s).map_err(|e| VfError::AfXdp {
            ifname: ifname.to_owned(),
            reason: e.to_string(),
        })?;

        let tx_free = (RX_FRAMES..RX_FRAMES + TX_FRAMES)
            .rev()
            .map(|i| u64::from(i) * FRAME_SIZE as u64)
            .collect();
        Ok(XdpSocket {
            fill,
            comp,
            rx,
            tx,
            fd,
            umem,
            prog,
            promisc: None,
            ifname: ifname.to_owned(),
            queue,
            zero_copy,
            tx_free,
            gather: Vec::with_capacity(MAX_GATHER),
            scratch: Vec::with_capacity(MAX_GATHER),
            segs: Vec::with_capacity(64),
            stats: VfStats::default(),
        })
    }

    /// Holds `guard` (the port's promiscuous-mode socket) as long as this socket lives.
    pub fn keep_promiscuous(mut self, guard: Arc<OwnedFd>) -> Self {
        self.promisc = Some(guard);
        self
    }

    /// Name of the interface.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// "native XDP, zero copy" and the like, for logs.
    pub fn describe(&self) -> String {
        format!(
            "{} XDP, {}",
            xdp_prog::mode_name(self.prog.flags),
            if self.zero_copy {
                "zero copy"
            } else {
                "copy mode"
            }
        )
    }

    /// True when bound with `XDP_ZEROCOPY`.
    pub fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// The netdev queue this socket is bound to.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// The UMEM bytes of a descriptor, if the kernel's descriptor is sane.
    fn frame(&self, addr: u64, len: u32) -> Option<&[u8]> {
        let start = usize::try_from(addr).ok()?;
        let end = start.checked_add(len as usize)?;
        if end > self.umem.len || len as usize > FRAME_SIZE {
            return None;
        }
        // SAFETY: [start, end) lies inside the UMEM mapping, which the kernel has handed to us
        // for this descriptor (it does not write to it until the frame returns to the fill ring).
        Some(unsafe {
            std::slice::from_raw_parts(self.umem.base.as_ptr().add(start), len as usize)
        })
    }

    /// Visits up to `max` received frames in order, with an all-zero virtio header (see the
    /// module documentation). Same contract as [`super::VfSocket::rx_batch`]: a frame the
    /// callback refuses is offered again next time. No system call unless the kernel asks for a
    /// fill-ring wakeup.
    pub fn rx_batch<F: FnMut(&VnetHdr, &[u8]) -> bool>(&mut self, max: usize, mut f: F) -> usize {
        let hdr = VnetHdr::default();
        let prod = self.rx.producer().load(Ordering::Acquire);
        let mut cons = self.rx.consumer().load(Ordering::Relaxed);
        let mut fill_prod = self.fill.producer().load(Ordering::Relaxed);
        let mut done = 0;
        while done < max && cons != prod {
            // SAFETY: entry() points inside the RX ring; the kernel published it (Acquire above).
            let d = unsafe { self.rx.entry::<libc::xdp_desc>(cons).read() };
            match self.frame(d.addr, d.len) {
                Some(frame) => {
                    if !f(&hdr, frame) {
                        break;
                    }
                    self.stats.rx_packets += 1;
                    self.stats.rx_bytes += u64::from(d.len);
                }
                // Impossible from a sane kernel; the frame is recycled all the same.
                None => self.stats.rx_invalid += 1,
            }
            cons = cons.wrapping_add(1);
            done += 1;
            // Back to the fill ring: it has room, as it is as large as the receive frames.
            let base = d.addr & !(FRAME_SIZE as u64 - 1);
            // SAFETY: entry() points inside the fill ring's descriptor array.
            unsafe { self.fill.entry::<u64>(fill_prod).write(base) };
            fill_prod = fill_prod.wrapping_add(1);
        }
        if done > 0 {
            self.rx.consumer().store(cons, Ordering::Release);
            self.fill.producer().store(fill_prod, Ordering::Release);
            if self.fill.needs_wakeup() {
                self.wake_rx();
            }
        }
        done
    }

    /// Tells the driver there are fill-ring frames again (zero-copy drivers sleep without).
    fn wake_rx(&self) {
        // SAFETY: a zero-length receive with no buffer; the kernel only uses it as a wakeup.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
        }
    }

    /// Moves finished transmit frames from the completion ring to the free list.
    fn reap(&mut self) {
        let prod = self.comp.producer().load(Ordering::Acquire);
        let mut cons = self.comp.consumer().load(Ordering::Relaxed);
        while cons != prod {
            // SAFETY: entry() points inside the completion ring; the kernel published it.
            let addr = unsafe { self.comp.entry::<u64>(cons).read() };
            let base = addr & !(FRAME_SIZE as u64 - 1);
            // A frame we never lent would be a kernel bug; never let it onto the free list twice.
            if (u64::from(RX_FRAMES) * FRAME_SIZE as u64..self.umem.len as u64).contains(&base)
                && self.tx_free.len() < TX_FRAMES as usize
            {
                self.tx_free.push(base);
            }
            cons = cons.wrapping_add(1);
        }
        self.comp.consumer().store(cons, Ordering::Release);
    }

    /// Hands queued TX descriptors to the kernel. In copy mode `sendto` transmits synchronously,
    /// at most 32 frames per call (`EAGAIN` means "call again"); in zero-copy mode it only wakes
    /// the driver, and only when the kernel asked for it.
    fn kick(&mut self) -> Result<(), VfError> {
        for _ in 0..MAX_KICKS {
            let pending = self.tx.producer().load(Ordering::Relaxed)
                != self.tx.consumer().load(Ordering::Acquire);
            if !pending || (self.zero_copy && !self.tx.needs_wakeup()) {
                break;
            }
            // SAFETY: a zero-length send with no buffer; the kernel only uses it as a trigger.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if rc >= 0 {
                if self.zero_copy {
                    break;
                }
                continue;
            }
            let e = last_err();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::EBUSY) => {
                    // More to send, or the completion ring needs reaping first.
                    self.reap();
                }
                // Driver queue full, or link down: the frames stay queued and leave with the
                // next kick.
                Some(libc::ENOBUFS) | Some(libc::ENETDOWN) | Some(libc::ENXIO) => break,
                Some(libc::EBADF) | Some(libc::ENOTSOCK) => {
                    return Err(VfError::from_os(&self.ifname, "sendto(AF_XDP)", e))
                }
                _ => {
                    crate::warn_limited!("{}: AF_XDP transmit: {e}", self.ifname);
                    break;
                }
            }
        }
        self.reap();
        Ok(())
    }

    /// Sends packets described like [`super::VfSocket::tx_batch`]'s: `pkts[i]` is the range of
    /// `iovs` forming packet `i`, the first iovec being its 10-byte [`VnetHdr`]. Each packet is
    /// copied into UMEM frames, segmented / checksummed in software as its header asks, in
    /// order, until no transmit frame is free even after reaping completions (the TX ring is
    /// full): then [`TxProgress::full`] is set and the packets from [`TxProgress::settled`] on
    /// were not queued.
    pub fn try_tx_batch(
        &mut self,
        iovs: &[libc::iovec],
        pkts: &[Range<usize>],
    ) -> Result<TxProgress, VfError> {
        check_tx_batch(&self.ifname, iovs, pkts, None)?;
        self.reap();
        let mut p = TxProgress::default();
        for r in pkts {
            let mut raw = [0u8; VNET_HDR_LEN];
            // SAFETY: the caller guarantees every iovec describes readable memory for the call;
            // this one is exactly VNET_HDR_LEN bytes (checked above).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    iovs[r.start].iov_base as *const u8,
                    raw.as_mut_ptr(),
                    VNET_HDR_LEN,
                )
            };
            let hdr = VnetHdr::from_bytes(&raw).unwrap_or_default();
            let body = &iovs[r.start + 1..r.end];
            let len: usize = body.iter().map(|v| v.iov_len).sum();
            if self.tx_free.is_empty() {
                self.kick()?;
            }
            let result = if hdr.is_gso() {
                self.queue_segmented(&hdr, body, len)
            } else {
                self.queue_single(hdr, body, len)
            };
            match result {
                Ok(()) => {
                    p.accepted += 1;
                    self.stats.tx_packets += 1;
                    self.stats.tx_bytes += len as u64;
                }
                Err(TxDrop::NoFrame) => {
                    p.full = true;
                    break;
                }
                Err(TxDrop::Invalid) => {
                    p.refused += 1;
                    self.stats.tx_invalid += 1;
                }
            }
            p.settled += 1;
        }
        if p.accepted > 0 {
            self.kick()?;
        }
        Ok(p)
    }

    /// Queues a frame that is already on the wire's scale (completing its checksum if asked).
    fn queue_single(
        &mut self,
        mut hdr: VnetHdr,
        body: &[libc::iovec],
        len: usize,
    ) -> Result<(), TxDrop> {
        if !(14..=FRAME_SIZE).contains(&len) {
            return Err(TxDrop::Invalid);
        }
        let addr = self.tx_free.pop().ok_or(TxDrop::NoFrame)?;
        // SAFETY: `addr` is a free transmit frame of FRAME_SIZE bytes inside the UMEM that only
        // we touch until it is queued.
        let frame = unsafe {
            std::slice::from_raw_parts_mut(self.umem.base.as_ptr().add(addr as usize), len)
        };
        let mut at = 0;
        for v in body {
            // SAFETY: the caller guarantees the iovecs are readable; the lengths sum to `len`,
            // which fits `frame`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base as *const u8,
                    frame[at..].as_mut_ptr(),
                    v.iov_len,
                )
            };
            at += v.iov_len;
        }
        if offload::complete_checksum(&mut hdr, frame).is_err() {
            self.tx_free.push(addr);
            return Err(TxDrop::Invalid);
        }
        self.push_tx(addr, len as u32);
        Ok(())
    }

    /// Gathers a GSO super-frame, cuts it into segments and queues them all, or none.
    fn queue_segmented(
        &mut self,
        hdr: &VnetHdr,
        body: &[libc::iovec],
        len: usize,
    ) -> Result<(), TxDrop> {
        if len > MAX_GATHER {
            return Err(TxDrop::Invalid);
        }
        self.gather.clear();
        for v in body {
            // SAFETY: the caller guarantees the iovecs are readable for the call. They are
            // guest memory the guest may change: copied, never borrowed as `&[u8]`, and the
            // segmenter parses the private copy.
            unsafe { GuestSlice::from_raw(v.iov_base as *const u8, v.iov_len) }
                .append_to(&mut self.gather);
        }
        // Enough frames for every segment (the whole length over the MSS bounds the count, headers
        // included), so a super-frame is never cut short half way; more than the pool holds can
        // never be sent.
        let mss = usize::from(hdr.gso_size.max(1));
        let need = len.div_ceil(mss) + 1;
        if need > TX_FRAMES as usize {
            return Err(TxDrop::Invalid);
        }
        if self.tx_free.len() < need {
            self.kick().map_err(|_| TxDrop::NoFrame)?;
            if self.tx_free.len() < need {
                return Err(TxDrop::NoFrame);
            }
        }
        let base = self.umem.base;
        let umem_len = self.umem.len;
        let mut queued = std::mem::take(&mut self.segs);
        queued.clear();
        let mut failed = None;
        let tx_free = &mut self.tx_free;
        let result = offload::segment(hdr, &self.gather, &mut self.scratch, |_h, seg| {
            if failed.is_some() {
                return;
            }
            if seg.len() > FRAME_SIZE {
                failed = Some(TxDrop::Invalid);
                return;
            }
            let Some(addr) = tx_free.pop() else {
                failed = Some(TxDrop::NoFrame);
                return;
            };
            debug_assert!(addr as usize + FRAME_SIZE <= umem_len);
            // SAFETY: `addr` is a free transmit frame of FRAME_SIZE bytes inside the UMEM; `seg`
            // is at most FRAME_SIZE bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    seg.as_ptr(),
                    base.as_ptr().add(addr as usize),
                    seg.len(),
                )
            };
            queued.push((addr, seg.len() as u32));
        });
        let outcome = match (result, failed) {
            (Ok(_), None) => Ok(()),
            (_, Some(why)) => Err(why),
            (Err(_), None) => Err(TxDrop::Invalid),
        };
        if outcome.is_ok() {
            for &(addr, l) in &queued {
                self.push_tx(addr, l);
            }
        } else {
            // All or nothing: a partial super-frame would only make the peer ask again.
            self.tx_free.extend(queued.iter().map(|(a, _)| *a));
        }
        self.segs = queued;
        outcome
    }

    /// Puts one frame on the TX ring (which always has room: it is as large as the transmit
    /// frames) and publishes it.
    fn push_tx(&mut self, addr: u64, len: u32) {
        let prod = self.tx.producer().load(Ordering::Relaxed);
        let d = libc::xdp_desc {
            addr,
            len,
            options: 0,
        };
        // SAFETY: entry() points inside the TX ring's descriptor array; the slot is ours
        // because at most TX_FRAMES frames are ever queued.
        unsafe { self.tx.entry::<libc::xdp_desc>(prod).write(d) };
        self.tx
            .producer()
            .store(prod.wrapping_add(1), Ordering::Release);
    }

    /// Counters; the kernel's `XDP_STATISTICS` (cumulative) fill the `kernel_*` fields.
    pub fn stats(&self) -> VfStats {
        let read = sockopt::getsockopt::<libc::xdp_statistics>(
            self.fd.as_raw_fd(),
            libc::SOL_XDP,
            libc::XDP_STATISTICS,
        );
        let mut out = self.stats;
        if let Ok((st, _)) = read {
            // A packet the kernel could not place is counted once, in `rx_dropped` (no free
            // UMEM frame) or `rx_ring_full`; `rx_fill_ring_empty_descs` counts the same
            // failed allocations again and is left out.
            let drops = st.rx_dropped + st.rx_ring_full;
            out.kernel_rx_drops = drops;
            out.kernel_rx_packets = out.rx_packets + drops;
            out.rx_invalid += st.rx_invalid_descs;
            out.tx_invalid += st.tx_invalid_descs;
            out.kernel_tx_invalid = st.tx_invalid_descs;
        }
        out
    }

    /// Reads and clears the socket's pending error (see `sockopt::take_error`).
    pub fn take_error(&self) -> Option<io::Error> {
        sockopt::take_error(self.fd.as_raw_fd())
    }
}

/// Why a transmit packet was not queued.
enum TxDrop {
    /// No free transmit frame: the TX ring is full (tried again later, like a full device
    /// queue).
    NoFrame,
    /// Malformed or oversized for `AF_XDP` (counted as invalid).
    Invalid,
}

impl AsRawFd for XdpSocket {
    /// Readable (`EPOLLIN`) when the RX ring holds frames; the kernel signals each flush.
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl std::fmt::Debug for XdpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpSocket")
            .field("ifname", &self.ifname)
            .field("queue", &self.queue)
            .field("fd", &self.fd.as_raw_fd())
            .field("mode", &self.describe())
            .finish()
    }
}

#[cfg(test)]
#[path = "af_xdp_tests.rs"]
mod tests;
