//! Receive path: packets from the VF (or from the loopback) into the guest's RX virtqueue.
//!
//! Top to bottom, a packet goes:
//! 1. [`vf_to_guest`] takes frames from the VF socket's mmap'd ring, in batches;
//! 2. offloads the guest did not negotiate are done in software ([`crate::offload`]);
//! 3. [`RxRing::deliver`] writes the 12-byte virtio-net header and the frame into one guest
//!    buffer, or several with mergeable RX buffers, then returns them in the used ring;
//! 4. the caller signals the guest once per batch, if event-idx says it wants to be told.
//!
//! A packet that finds no guest buffer stays in the VF ring (backpressure; the kernel drops
//! when that fills) and the RX queue's notifications are turned on so the guest's next
//! buffer wakes us. Guest memory is written through `virtq::GuestMap`, and
//! each filled buffer is marked in the dirty bitmap before the used index publishes it, so
//! migration sees every byte we write once logging is on.

use virtio_queue::Queue;
use vm_memory::{ByteValued, GuestMemoryBackend};

use crate::net_hdr::{VirtioNetHdr, VnetHdr, VIRTIO_NET_HDR_LEN};
use crate::offload::{adapt_for_guest, RxOffloads};
use crate::stats::{DropReason, QueueStats};
use crate::vf::VfSocket;
use virtq::{GuestSlice, Head, Ring, RingKind};

/// Why a packet could not be placed in guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RxError {
    #[error("rx queue: descriptor chain at head {head} is not device-writable")]
    ReadOnlyDescriptor { head: u16 },
    #[error("rx queue: descriptor chain at head {head} has no room at all")]
    EmptyChain { head: u16 },
    #[error(
        "rx queue: avail ring names head {head}, past the {size}-entry descriptor table; skipped"
    )]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("rx queue: buffer {addr:#x}+{len} of chain {head} is outside guest memory: {source}")]
    BadAddress {
        head: u16,
        addr: u64,
        len: usize,
        source: vm_memory::GuestMemoryError,
    },
    #[error("rx queue: packet of {len} bytes is larger than the {room}-byte buffer and mergeable buffers are off")]
    TooBig { len: usize, room: usize },
    #[error("rx queue: chain at head {head}: {source}")]
    Chain { head: u16, source: virtq::RingError },
    #[error("rx queue: {0}")]
    Ring(#[from] virtq::RingError),
    #[error("rx queue: {0}")]
    Queue(#[from] virtio_queue::Error),
}

/// What became of a packet offered to the guest's RX queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// In guest memory, using this many buffers (at least one).
    Delivered(u16),
    /// Split (or checksummed) in software first; each resulting segment was delivered or
    /// dropped, and counted, on its own.
    Adapted,
    /// Consumed and lost (counted): a malformed chain, or too big for the guest's buffers.
    Dropped,
    /// The guest has no (or not enough) buffers right now; nothing was consumed.
    NoBuffers,
}

impl Delivery {
    /// True if the packet is done with (delivered, adapted or dropped): the caller moves on.
    pub fn consumed(&self) -> bool {
        *self != Delivery::NoBuffers
    }
}

/// The guest's RX queue, borrowed for one batch. Used entries are written to the used ring
/// as each chain is filled and published when it is dropped (or [`RxRing::flush`]ed): one
/// used-index update per batch, and nothing allocated (a packet that cannot be placed takes
/// its entries back before they are published).
pub struct RxRing<'a, M: GuestMemoryBackend> {
    ring: Ring<'a, M>,
    /// VIRTIO_NET_F_MRG_RXBUF: a packet may span several buffers (chains).
    mergeable: bool,
    /// Guest header length: 12 with VERSION_1 or MRG_RXBUF, 10 for a legacy guest without.
    hdr_len: usize,
    /// Packets left before the next descriptor prefetch.
    prefetched: u16,
}

/// RX descriptors prefetched at a time.
const PREFETCH_AHEAD: u16 = 8;

impl<'a, M: GuestMemoryBackend> RxRing<'a, M> {
    /// `hdr_len` is the guest's header length (see [`crate::net_hdr::guest_header_len`]).
    /// Fails if the queue's rings are not usable (outside guest memory, misaligned).
    pub fn new(
        queue: &'a mut Queue,
        mem: &'a M,
        kind: RingKind,
        mergeable: bool,
        hdr_len: usize,
    ) -> Result<Self, RxError> {
        Ok(RxRing {
            ring: Ring::new(queue, mem, kind)?,
            mergeable,
            hdr_len: hdr_len.clamp(crate::net_hdr::VNET_HDR_LEN, VIRTIO_NET_HDR_LEN),
            prefetched: 0,
        })
    }

    /// The guest's header length this ring writes.
    pub fn header_len(&self) -> usize {
        self.hdr_len
    }

    /// Makes what was delivered so far visible to the guest.
    pub fn flush(&mut self) {
        self.ring.sync();
    }

    /// Places one packet (`hdr` then `data`) into guest buffers: [`Delivery::Delivered`] or
    /// [`Delivery::NoBuffers`].
    ///
    /// On `Err` the packet is dropped, and any chain it had taken is returned to the guest
    /// with length 0 (the guest counts a length error and reuses it): a bad chain costs one
    /// packet, never the ring. An avail head past the descriptor table names no chain and is
    /// never returned.
    pub fn deliver(&mut self, hdr: &VnetHdr, data: &[u8]) -> Result<Delivery, RxError> {
        self.deliver_segments(hdr, &[GuestSlice::new(data)])
    }

    /// [`RxRing::deliver`] for a packet scattered over `segs` (loopback delivers straight
    /// from the guest's TX buffers: one copy, which may overlap the RX buffers).
    pub fn deliver_segments(
        &mut self,
        hdr: &VnetHdr,
        segs: &[GuestSlice<'_>],
    ) -> Result<Delivery, RxError> {
        let head = VirtioNetHdr {
            hdr: *hdr,
            num_buffers: 1,
        };
        let data_len: usize = segs.iter().map(|s| s.len()).sum();
        let total = self.hdr_len + data_len;
        let start = self.ring.next_avail();
        if self.prefetched == 0 {
            // Descriptors of the next few buffers, fetched while this packet is copied.
            self.ring.prefetch_ahead(PREFETCH_AHEAD);
            self.prefetched = PREFETCH_AHEAD;
        }
        self.prefetched -= 1;
        let first_used = self.ring.next_used();
        let mut buffers = 0u16;
        let mut first_head = Head::split(0);
        let mut written = 0usize;
        // Guest addresses of the two bytes of `num_buffers`, known once the header is placed.
        let mut num_buffers_at: [Option<u64>; 2] = [None, None];

        while written < total {
            let chain_head = match self.ring.pop() {
                Ok(Some(head)) => head,
                Ok(None) => {
                    // Not enough buffers for the whole packet: put back what we took.
                    self.ring.set_next_avail(start);
                    self.ring.unadd_used(first_used);
                    return Ok(Delivery::NoBuffers);
                }
                Err(e) => {
                    self.ring.empty_used_since(first_used);
                    return Err(e.into());
                }
            };
            if !self.ring.returnable(chain_head) {
                // Names no chain: publishing it would make the guest (Linux) mark the queue
                // broken. As on TX, its avail entry stays consumed and it is never returned.
                self.ring.empty_used_since(first_used);
                return Err(RxError::HeadOutOfRange {
                    head: chain_head.index,
                    size: self.ring.size(),
                });
            }
            match self.fill_chain(chain_head, &head, segs, written, total, &mut num_buffers_at) {
                Ok(n) => {
                    if buffers == 0 {
                        first_head = chain_head;
                    }
                    written += n;
                    buffers += 1;
                    self.ring.add_used(chain_head, n as u32);
                }
                Err(e) => {
                    self.ring.add_used(chain_head, 0);
                    self.ring.empty_used_since(first_used);
                    return Err(e);
                }
            }
            if !self.mergeable && written < total {
                // A single buffer is all we may use: leave it for a smaller packet.
                self.ring.set_next_avail(start);
                self.ring.unadd_used(first_used);
                return Err(RxError::TooBig {
                    len: total,
                    room: written,
                });
            }
        }

        if buffers > 1 {
            let bytes = buffers.to_le_bytes();
            for (addr, byte) in num_buffers_at.iter().zip(bytes) {
                let Some(addr) = *addr else { continue };
                if let Err(source) = self.ring.map().write(addr, &[byte]) {
                    // Cannot happen (the byte is in a buffer written a moment ago), but
                    // if it did the chains would go back with a wrong count: empty instead.
                    self.ring.empty_used_since(first_used);
                    return Err(RxError::BadAddress {
                        head: first_head.index,
                        addr,
                        len: 1,
                        source,
                    });
                }
            }
        }
        Ok(Delivery::Delivered(buffers))
    }

    /// Copies bytes `written..` of the packet (the header, then `segs`) into one chain;
    /// returns how many bytes went in.
    fn fill_chain(
        &self,
        chain_head: Head,
        head: &VirtioNetHdr,
        segs: &[GuestSlice<'_>],
        mut written: usize,
        total: usize,
        num_buffers_at: &mut [Option<u64>; 2],
    ) -> Result<usize, RxError> {
        let hdr_len = self.hdr_len;
        let hdr_bytes = &head.as_slice()[..hdr_len];
        let first = written;
        let mut room = 0usize;
        let mut chain = self.ring.chain(chain_head);
        // Where the data copy stands: segment index and offset into it, for `written`.
        let (mut seg, mut seg_off) = (0usize, 0usize);
        let mut skip = written.saturating_sub(hdr_len);
        while skip > 0 {
            let Some(s) = segs.get(seg) else { break };
            if skip < s.len() {
                seg_off = skip;
                break;
            }
            skip -= s.len();
            seg += 1;
        }
        while let Some(desc) = self
            .ring
            .next_desc(&mut chain)
            .map_err(|source| RxError::Chain {
                head: chain_head.index,
                source,
            })?
        {
            if !desc.is_write_only() {
                return Err(RxError::ReadOnlyDescriptor {
                    head: chain_head.index,
                });
            }
            let len = desc.len as usize;
            room += len;
            let n = len.min(total - written);
            if written == 0 && n == total {
                // The usual case: the whole packet fits the first buffer, which lies in one
                // memory region. Header and data go straight in, marked dirty once.
                if let Some(p) = self.ring.map().host(desc.addr, total) {
                    // SAFETY: `host` checked that `total` bytes from `p` are inside a live
                    // mapping; sources are our header and the caller's slices, whose lengths
                    // add up to `total`. The slices may be guest memory overlapping the
                    // buffer (loopback): memmoves, the data before the header, so the header
                    // never overwrites packet bytes still to be copied. (A guest aliasing one
                    // TX segment with the RX room of an earlier one gets its own overwritten
                    // bytes, as a NIC would give it: garbage, not UB.)
                    unsafe {
                        let mut at = p.add(hdr_len);
                        for s in segs {
                            s.copy_to(at);
                            at = at.add(s.len());
                        }
                        std::ptr::copy(hdr_bytes.as_ptr(), p, hdr_len);
                    }
                    // TEST ONLY (`test-no-rx-log`): the packet data goes unlogged, so the
                    // migration harness can prove it notices; the header still logs.
                    #[cfg(not(feature = "test-no-rx-log"))]
                    self.ring.map().mark_dirty(desc.addr, total);
                    #[cfg(feature = "test-no-rx-log")]
                    self.ring.map().mark_dirty(desc.addr, hdr_len);
                    if hdr_len == VIRTIO_NET_HDR_LEN {
                        let at = desc.addr.wrapping_add(VIRTIO_NET_HDR_LEN as u64 - 2);
                        *num_buffers_at = [Some(at), Some(at.wrapping_add(1))];
                    }
                    return Ok(total);
                }
            }
            let mut off = 0usize;
            let mut unmarked = false;
            while off < n {
                let pos = written + off;
                let dst = desc.addr.wrapping_add(off as u64);
                let src = if pos < hdr_len {
                    // Remember where num_buffers (header bytes 10 and 11) landed.
                    for (i, slot) in num_buffers_at.iter_mut().enumerate() {
                        let at = VIRTIO_NET_HDR_LEN - 2 + i;
                        if at < hdr_len && slot.is_none() && (pos..pos + (n - off)).contains(&at) {
                            *slot = Some(dst.wrapping_add((at - pos) as u64));
                        }
                    }
                    GuestSlice::new(&hdr_bytes[pos..hdr_len.min(pos + n - off)])
                } else {
                    let Some(s) = segs.get(seg) else { break };
                    let take = (s.len() - seg_off).min(n - off);
                    let src = s.sub(seg_off, take);
                    seg_off += take;
                    if seg_off == s.len() {
                        seg += 1;
                        seg_off = 0;
                    }
                    src
                };
                // Buffers outside memory get vm-memory's error.
                let fast = self.ring.map().write_unmarked(dst, src).map_err(|source| {
                    RxError::BadAddress {
                        head: chain_head.index,
                        addr: desc.addr,
                        len,
                        source,
                    }
                })?;
                if cfg!(feature = "test-no-rx-log") {
                    // TEST ONLY: packet data is left unmarked, the header is marked.
                    if fast && pos < hdr_len {
                        self.ring.map().mark_dirty(dst, src.len());
                    }
                } else {
                    unmarked |= fast;
                }
                off += src.len();
            }
            if unmarked {
                // What we wrote to this buffer, marked dirty for migration at once (vm-memory
                // marks its own writes).
                self.ring.map().mark_dirty(desc.addr, n);
            }
            written += n;
            if written == total {
                break;
            }
        }
        if room == 0 {
            return Err(RxError::EmptyChain {
                head: chain_head.index,
            });
        }
        Ok(written - first)
    }
}

/// Why an RX batch stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum RxStop {
    /// The VF socket had no more frames to hand over.
    VfEmpty,
    /// The batch's budget was used up; frames may be waiting (the caller sees progress and
    /// comes back for more in its next round).
    BudgetSpent,
    /// The guest ran out of buffers with frames still waiting.
    GuestFull,
}

/// Moves up to `budget` frames from the VF into the guest. Returns the frames consumed
/// and why it stopped.
pub fn vf_to_guest<M: GuestMemoryBackend>(
    vf: &mut VfSocket,
    ring: &mut RxRing<'_, M>,
    offloads: RxOffloads,
    scratch: &mut Vec<u8>,
    stats: &QueueStats,
    budget: usize,
) -> (usize, RxStop) {
    let mut guest_full = false;
    let consumed = vf.rx_batch(budget, |hdr, frame| {
        let consumed = deliver_adapted(ring, offloads, hdr, frame, scratch, stats).consumed();
        guest_full = !consumed;
        consumed
    });
    let stop = if guest_full {
        RxStop::GuestFull
    } else if consumed >= budget {
        RxStop::BudgetSpent
    } else {
        RxStop::VfEmpty
    };
    (consumed, stop)
}

/// Delivers one frame, doing in software the offloads the guest did not negotiate.
/// Returns `NoBuffers` only if nothing was consumed; errors are counted and the frame
/// [`Delivery::Dropped`].
pub fn deliver_adapted<M: GuestMemoryBackend>(
    ring: &mut RxRing<'_, M>,
    offloads: RxOffloads,
    hdr: &VnetHdr,
    frame: &[u8],
    scratch: &mut Vec<u8>,
    stats: &QueueStats,
) -> Delivery {
    if offloads.accepts(hdr) {
        return deliver_counted(ring, hdr, &[GuestSlice::new(frame)], stats);
    }
    // The guest cannot take this frame as it is: split it / finish its checksum. A guest that
    // runs out of buffers half way through loses the rest of the super-frame (counted), since
    // a frame cannot be half consumed from the VF ring.
    let mut out_of_buffers = false;
    let result = adapt_for_guest(offloads, hdr, frame, scratch, |h, seg| {
        if out_of_buffers {
            stats.add_drops(DropReason::NoBuffers, 1);
            return;
        }
        // Without GUEST_CSUM the virtio spec wants flags zero, DATA_VALID included.
        let mut h = *h;
        if !offloads.csum {
            h.flags = 0;
        }
        match ring.deliver(&h, seg) {
            Ok(Delivery::NoBuffers) => {
                out_of_buffers = true;
                stats.add_drops(DropReason::NoBuffers, 1);
            }
            // `RxRing::deliver` answers `Delivered` or `NoBuffers`.
            Ok(_) => stats.add_packets(1, seg.len() as u64),
            Err(e) => count_error(stats, &e),
        }
    });
    if let Err(e) = result {
        stats.add_errors(1);
        crate::warn_limited!("rx: dropping a frame the guest cannot take: {e}");
        return Delivery::Dropped;
    }
    Delivery::Adapted
}

/// Delivers a packet the guest accepts as it is (scattered over `segs`), counting it; errors
/// are counted and the packet [`Delivery::Dropped`].
pub fn deliver_counted<M: GuestMemoryBackend>(
    ring: &mut RxRing<'_, M>,
    hdr: &VnetHdr,
    segs: &[GuestSlice<'_>],
    stats: &QueueStats,
) -> Delivery {
    match ring.deliver_segments(hdr, segs) {
        Ok(Delivery::Delivered(n)) => {
            let len: usize = segs.iter().map(|s| s.len()).sum();
            stats.add_packets(1, len as u64);
            Delivery::Delivered(n)
        }
        Ok(other) => other,
        Err(e) => {
            count_error(stats, &e);
            Delivery::Dropped
        }
    }
}

fn count_error(stats: &QueueStats, e: &RxError) {
    match e {
        RxError::TooBig { .. } => stats.add_drops(DropReason::TooBig, 1),
        _ => stats.add_errors(1),
    }
    crate::warn_limited!("{e}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net_hdr::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4};
    use virtio_queue::QueueT;
    use virtq::mock::*;

    fn gso_hdr() -> VnetHdr {
        VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        }
    }

    fn header_bytes(hdr: &VnetHdr, num_buffers: u16) -> Vec<u8> {
        VirtioNetHdr {
            hdr: *hdr,
            num_buffers,
        }
        .as_slice()
        .to_vec()
    }

    #[test]
    fn one_buffer_holds_header_and_packet() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        gq.add(&[wbuf(BUFFERS, 2048)]);
        let mut q = gq.queue();
        let pkt = pattern(100, 1);
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, false, VIRTIO_NET_HDR_LEN).unwrap();
        assert_eq!(
            ring.deliver(&gso_hdr(), &pkt).unwrap(),
            Delivery::Delivered(1)
        );
        // Nothing is visible before the batch is published (on flush, or drop).
        assert_eq!(gq.used_idx(), 0);
        ring.flush();
        assert_eq!(gq.used_idx(), 1);
        assert_eq!(gq.used(0), (0, 112));
        assert_eq!(read(&mem, BUFFERS, 12), header_bytes(&gso_hdr(), 1));
        assert_eq!(read(&mem, BUFFERS + 12, 100), pkt);
    }

    #[test]
    fn legacy_guest_gets_a_ten_byte_header() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        gq.add(&[wbuf(BUFFERS, 2048)]);
        let mut q = gq.queue();
        let pkt = pattern(64, 4);
        let mut ring = RxRing::new(&mut q, &mem, RingKind::Split, false, 10).unwrap();
        assert_eq!(
            ring.deliver(&gso_hdr(), &pkt).unwrap(),
            Delivery::Delivered(1)
        );
        assert_eq!(gq.used(0), (0, 74));
        assert_eq!(
            read(&mem, BUFFERS, 10),
            header_bytes(&gso_hdr(), 0)[..10].to_vec()
        );
        assert_eq!(read(&mem, BUFFERS + 10, 64), pkt);
    }

    #[test]
    fn header_split_over_descriptors() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        gq.add(&[
            wbuf(BUFFERS, 5),
            wbuf(BUFFERS + 0x100, 6),
            wbuf(BUFFERS + 0x200, 1000),
        ]);
        let mut q = gq.queue();
        let pkt = pattern(300, 2);
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, true, VIRTIO_NET_HDR_LEN).unwrap();
        assert_eq!(
            ring.deliver(&gso_hdr(), &pkt).unwrap(),
            Delivery::Delivered(1)
        );
        let want = [header_bytes(&gso_hdr(), 1), pkt].concat();
        let got = [
            read(&mem, BUFFERS, 5),
            read(&mem, BUFFERS + 0x100, 6),
            read(&mem, BUFFERS + 0x200, 301),
        ]
        .concat();
        assert_eq!(got, want);
        assert_eq!(gq.used(0), (0, 312));
    }

    #[test]
    fn mergeable_spreads_a_packet_and_counts_buffers() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        for i in 0..4 {
            gq.add(&[wbuf(BUFFERS + i * 0x1000, 1000)]);
        }
        let mut q = gq.queue();
        let pkt = pattern(2500, 3);
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, true, VIRTIO_NET_HDR_LEN).unwrap();
        assert_eq!(
            ring.deliver(&VnetHdr::default(), &pkt).unwrap(),
            Delivery::Delivered(3)
        );
        ring.flush();
        assert_eq!(gq.used_idx(), 3);
        assert_eq!(gq.used(0), (0, 1000));
        assert_eq!(gq.used(1), (1, 1000));
        assert_eq!(gq.used(2), (2, 512));
        assert_eq!(
            read(&mem, BUFFERS, 12),
            header_bytes(&VnetHdr::default(), 3)
        );
        let got = [
            read(&mem, BUFFERS + 12, 988),
            read(&mem, BUFFERS + 0x1000, 1000),
            read(&mem, BUFFERS + 0x2000, 512),
        ]
        .concat();
        assert_eq!(got, pkt);
        // The fourth buffer is still there for the next packet.
        drop(ring);
        assert_eq!(q.next_avail(), 3);
    }

    #[test]
    fn num_buffers_split_over_two_descriptors_is_written_in_both() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        gq.add(&[wbuf(BUFFERS, 11), wbuf(BUFFERS + 0x100, 50)]);
        gq.add(&[wbuf(BUFFERS + 0x1000, 100)]);
        let mut q = gq.queue();
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, true, VIRTIO_NET_HDR_LEN).unwrap();
        assert_eq!(
            ring.deliver(&VnetHdr::default(), &pattern(100, 0)).unwrap(),
            Delivery::Delivered(2)
        );
        assert_eq!(read(&mem, BUFFERS + 10, 1), vec![2]);
        assert_eq!(read(&mem, BUFFERS + 0x100, 1), vec![0]);
    }

    #[test]
    fn not_enough_buffers_takes_nothing() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        gq.add(&[wbuf(BUFFERS, 100)]);
        gq.add(&[wbuf(BUFFERS + 0x1000, 100)]);
        let mut q = gq.queue();
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, true, VIRTIO_NET_HDR_LEN).unwrap();
        assert_eq!(
            ring.deliver(&VnetHdr::default(), &pattern(500, 0)).unwrap(),
            Delivery::NoBuffers
        );
        drop(ring);
        assert_eq!(q.next_avail(), 0);
        assert_eq!(gq.used_idx(), 0);
        // A packet that fits still goes through afterwards.
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, true, VIRTIO_NET_HDR_LEN).unwrap();
        assert_eq!(
            ring.deliver(&VnetHdr::default(), &pattern(50, 0)).unwrap(),
            Delivery::Delivered(1)
        );
    }

    #[test]
    fn empty_queue_reports_no_buffers() {
        let mem = memory();
        let gq = GuestQueue::new(&mem, 0, 16);
        let mut q = gq.queue();
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, true, VIRTIO_NET_HDR_LEN).unwrap();
        assert_eq!(
            ring.deliver(&VnetHdr::default(), &[1, 2, 3]).unwrap(),
            Delivery::NoBuffers
        );
    }

    #[test]
    fn too_big_without_mergeable_leaves_the_buffer() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        gq.add(&[wbuf(BUFFERS, 1526)]);
        let mut q = gq.queue();
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, false, VIRTIO_NET_HDR_LEN).unwrap();
        let err = ring
            .deliver(&VnetHdr::default(), &pattern(4000, 0))
            .unwrap_err();
        assert!(
            matches!(
                err,
                RxError::TooBig {
                    len: 4012,
                    room: 1526
                }
            ),
            "{err}"
        );
        drop(ring);
        assert_eq!(q.next_avail(), 0);
        assert_eq!(gq.used_idx(), 0);
    }

    #[test]
    fn read_only_descriptor_costs_one_packet() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        gq.add(&[rbuf(BUFFERS, 2048)]);
        gq.add(&[wbuf(BUFFERS + 0x1000, 2048)]);
        let mut q = gq.queue();
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, true, VIRTIO_NET_HDR_LEN).unwrap();
        let err = ring
            .deliver(&VnetHdr::default(), &pattern(60, 0))
            .unwrap_err();
        assert!(
            matches!(err, RxError::ReadOnlyDescriptor { head: 0 }),
            "{err}"
        );
        assert_eq!(gq.used(0), (0, 0));
        assert_eq!(
            ring.deliver(&VnetHdr::default(), &pattern(60, 0)).unwrap(),
            Delivery::Delivered(1)
        );
        assert_eq!(gq.used(1), (1, 72));
    }

    #[test]
    fn buffer_outside_guest_memory_is_refused() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        gq.add(&[wbuf((16 << 20) - 8, 2048)]);
        gq.add(&[wbuf(u64::MAX - 16, 2048)]);
        let mut q = gq.queue();
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, true, VIRTIO_NET_HDR_LEN).unwrap();
        for head in 0..2u16 {
            let err = ring
                .deliver(&VnetHdr::default(), &pattern(60, 0))
                .unwrap_err();
            assert!(
                matches!(err, RxError::BadAddress { head: h, .. } if h == head),
                "{err}"
            );
        }
        ring.flush();
        assert_eq!(gq.used_idx(), 2);
        assert_eq!(gq.used(1), (1, 0));
    }

    /// An avail head past the descriptor table names no chain: writing it into the used
    /// ring makes a Linux guest mark its RX queue broken. Like TX, the entry is consumed and
    /// counted, the head never published, and the next buffer works; in a mergeable packet
    /// the chains taken before it go back empty.
    #[test]
    fn out_of_range_head_is_never_returned() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        gq.add_raw_head(16);
        let first = gq.add(&[wbuf(BUFFERS, 100)]);
        gq.add_raw_head(999);
        let good = gq.add(&[wbuf(BUFFERS + 0x1000, 2048)]);
        let mut q = gq.queue();
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, true, VIRTIO_NET_HDR_LEN).unwrap();
        let hdr = VnetHdr::default();
        // Head 16 alone: the packet is dropped, nothing is used.
        let err = ring.deliver(&hdr, &[1, 2, 3]).unwrap_err();
        assert!(
            matches!(err, RxError::HeadOutOfRange { head: 16, size: 16 }),
            "{err}"
        );
        // `first` taken for a packet too big for it, then 999: `first` goes back empty.
        let err = ring.deliver(&hdr, &pattern(500, 0)).unwrap_err();
        assert!(
            matches!(err, RxError::HeadOutOfRange { head: 999, .. }),
            "{err}"
        );
        // The next good buffer takes the next packet.
        assert_eq!(
            ring.deliver(&hdr, &[1, 2, 3]).unwrap(),
            Delivery::Delivered(1)
        );
        drop(ring);
        assert_eq!(gq.used_idx(), 2);
        assert_eq!(gq.used(0), (u32::from(first), 0));
        assert_eq!(gq.used(1), (u32::from(good), 15));
        assert_eq!(q.next_avail(), 4);
    }

    #[test]
    fn zero_length_buffer_is_refused() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        gq.add(&[wbuf(BUFFERS, 0)]);
        let mut q = gq.queue();
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, true, VIRTIO_NET_HDR_LEN).unwrap();
        let err = ring
            .deliver(&VnetHdr::default(), &pattern(60, 0))
            .unwrap_err();
        assert!(matches!(err, RxError::EmptyChain { head: 0 }), "{err}");
        assert_eq!(gq.used(0), (0, 0));
    }

    #[test]
    fn descriptor_loop_ends() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        gq.add_loop(wbuf(BUFFERS, 64));
        let mut q = gq.queue();
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, false, VIRTIO_NET_HDR_LEN).unwrap();
        // The chain is cut after a ring's worth of descriptors: 16 * 64 bytes of room.
        let err = ring
            .deliver(&VnetHdr::default(), &pattern(9000, 0))
            .unwrap_err();
        assert!(matches!(err, RxError::TooBig { room: 1024, .. }), "{err}");
    }

    #[test]
    fn indirect_chains_are_followed() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        gq.add_indirect(&[wbuf(BUFFERS, 12), wbuf(BUFFERS + 0x100, 100)], 0x30_0000);
        let mut q = gq.queue();
        let mut ring =
            RxRing::new(&mut q, &mem, RingKind::Split, true, VIRTIO_NET_HDR_LEN).unwrap();
        let pkt = pattern(80, 9);
        assert_eq!(
            ring.deliver(&VnetHdr::default(), &pkt).unwrap(),
            Delivery::Delivered(1)
        );
        assert_eq!(read(&mem, BUFFERS + 0x100, 80), pkt);
        assert_eq!(gq.used(0), (0, 92));
    }
}
