//! Transmit path: packets the guest puts on its TX virtqueue, out to the VF (or back to the
//! guest in loopback mode).
//!
//! Top to bottom, a batch goes:
//! 1. [`TxBatch::gather`] pops up to [`TX_BATCH`] descriptor chains and turns each into an
//!    iovec list: a copy of the 10-byte offload header, then the packet bytes *in place* in
//!    guest memory (no copy in this process);
//! 2. [`guest_to_vf`] hands the whole batch to the kernel with one `sendmmsg` (the kernel
//!    copies out of guest memory and honours the checksum/GSO header, so a guest with TSO on
//!    sends 64 KiB super-frames straight through);
//! 3. every chain goes back to the guest in the used ring (length 0: TX buffers carry nothing
//!    back), in ring order, and the guest is signalled at most once per batch.
//!
//! Malformed chains (writable descriptors, addresses outside guest memory, short headers,
//! oversized packets) are returned unused and counted; they never stop the queue.
//!
//! A full VF send queue loses nothing (a guest's TCP would take such loss for congestion):
//! the chains the VF did not take are put back in the guest's ring (`next_avail` rewound,
//! nothing marked used) and sent by a later round, counted as retries. Only when the VF
//! takes nothing for the port's wait bound are they dropped (`DropReason::VfFull`). A stop
//! (GET_VRING_BASE) between rounds so hands back a base that excludes them: the next
//! backend sends them, exactly once.

use std::ops::Range;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::net_hdr::{VnetHdr, VIRTIO_NET_HDR_LEN, VNET_HDR_LEN};
use crate::offload::RxOffloads;
use crate::rx::{deliver_adapted, deliver_counted, Delivery, RxRing};
use crate::stats::{DropReason, QueueStats};
use crate::vf::{TxProgress, VfSocket};
use virtq::{prefetch, GuestSlice, Head, Ring, RingKind};

/// Chains handled per batch: one `sendmmsg`, one notification.
pub const TX_BATCH: usize = 64;
/// The largest packet the guest may send: a 64 KiB GSO super-frame plus link headers.
pub const MAX_TX_PACKET: usize = 65535 + 18;
/// Guest buffers one packet may be scattered over (Linux uses at most MAX_SKB_FRAGS + 2).
pub const MAX_TX_SEGMENTS: usize = 64;

/// Why a TX chain was refused.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error("tx queue: chain at head {head} has a device-writable descriptor")]
    WritableDescriptor { head: u16 },
    #[error("tx queue: chain at head {head} is shorter ({len} bytes) than the virtio-net header")]
    ShortHeader { head: u16, len: usize },
    #[error("tx queue: chain at head {head} holds more than {max} bytes")]
    TooBig { head: u16, max: usize },
    #[error("tx queue: chain at head {head} is scattered over more than {max} buffers")]
    TooManySegments { head: u16, max: usize },
    #[error("tx queue: buffer {addr:#x}+{len} of chain {head} is outside guest memory: {source}")]
    BadAddress {
        head: u16,
        addr: u64,
        len: usize,
        source: vm_memory::GuestMemoryError,
    },
    #[error("tx queue: chain at head {head}: {source}")]
    Chain { head: u16, source: virtq::RingError },
    #[error("tx queue: {0}")]
    Ring(#[from] virtq::RingError),
}

/// Reusable storage for one batch: no allocation per packet once it has grown.
pub struct TxBatch {
    /// All iovecs of the batch; packet i is `iovs[pkts[i]]`.
    iovs: Vec<libc::iovec>,
    pkts: Vec<Range<usize>>,
    /// The offload header of each packet; iovecs point into this, so it never reallocates.
    hdrs: Box<[VnetHdr; TX_BATCH]>,
    /// Chain heads to return, with whether each was sent or refused.
    heads: Vec<Head>,
    /// The ring position each popped chain was popped at, in ring order: where a cut-short
    /// batch rewinds to (a packed chain takes as many slots as it has descriptors).
    popped_at: Vec<u16>,
    /// Payload bytes per packet (without header), for the counters.
    lens: Vec<usize>,
    /// Refused chains, in ring order: how many good packets were gathered before each, and
    /// its head (`None` for a head past the descriptor table, which cannot be returned).
    /// They go back with the packets around them, so that a batch cut short by a full VF
    /// returns exactly the chains before the first unsent packet.
    refused: Vec<(usize, Option<Head>)>,
    /// Chains popped by the last gather.
    popped: usize,
    /// Refused chains a cut-short batch put back: already counted, so the next gather does
    /// not count them again.
    recounted: usize,
    /// Since when the VF has taken nothing (its send queue full), if it is so now.
    stalled_since: Option<Instant>,
    /// The layout of the queue batches are gathered from (what the connection negotiated;
    /// see [`TxBatch::set_ring_kind`]).
    kind: RingKind,
}

// SAFETY: the raw pointers in `iovs` point into guest memory mappings or into `hdrs`; they are
// only dereferenced (by the kernel, or by the loopback copy) while the batch's guest memory
// guard is held on the worker thread that filled them. The batch is moved between threads only
// between batches, when they are stale and unused.
unsafe impl Send for TxBatch {}

impl Default for TxBatch {
    fn default() -> Self {
        TxBatch {
            iovs: Vec::with_capacity(TX_BATCH * 4),
            pkts: Vec::with_capacity(TX_BATCH),
            hdrs: Box::new([VnetHdr::default(); TX_BATCH]),
            heads: Vec::with_capacity(TX_BATCH),
            popped_at: Vec::with_capacity(TX_BATCH + 1),
            lens: Vec::with_capacity(TX_BATCH),
            refused: Vec::with_capacity(TX_BATCH),
            popped: 0,
            recounted: 0,
            stalled_since: None,
            kind: RingKind::Split,
        }
    }
}

impl TxBatch {
    fn clear(&mut self) {
        self.iovs.clear();
        self.pkts.clear();
        self.heads.clear();
        self.popped_at.clear();
        self.lens.clear();
        self.refused.clear();
    }

    /// The layout of the queue the next batches come from. Set before every round: a batch
    /// is gathered and completed within one.
    pub fn set_ring_kind(&mut self, kind: RingKind) {
        self.kind = kind;
    }

    /// Forgets a stall and put-back chains: the queue stopped or restarts afresh.
    pub fn forget(&mut self) {
        self.stalled_since = None;
        self.recounted = 0;
    }

    /// Pops up to [`TX_BATCH`] chains. Good ones become packets; bad ones are counted and
    /// returned to the guest with them ([`TxBatch::complete`]). Returns the number of chains
    /// popped.
    /// `hdr_len` is the guest's header length (12, or 10 for a legacy guest).
    pub fn gather<M: GuestMemoryBackend>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        hdr_len: usize,
        stats: &QueueStats,
    ) -> Result<usize, TxError> {
        let hdr_len = hdr_len.clamp(VNET_HDR_LEN, VIRTIO_NET_HDR_LEN);
        self.clear();
        let mut ring = Ring::new(queue, mem, self.kind)?;
        let mut popped = 0;
        while popped < TX_BATCH {
            self.popped_at.push(ring.next_avail());
            let Some(head) = ring.pop()? else {
                break;
            };
            popped += 1;
            let slot = self.pkts.len();
            let first_iov = self.iovs.len();
            match gather_chain(&ring, head, hdr_len, &mut self.hdrs[slot], &mut self.iovs) {
                Ok(len) => {
                    self.pkts.push(first_iov..self.iovs.len());
                    self.heads.push(head);
                    self.lens.push(len);
                }
                Err(e) => {
                    self.iovs.truncate(first_iov);
                    if self.recounted > 0 {
                        self.recounted -= 1;
                    } else {
                        stats.add_errors(1);
                    }
                    let back = ring.returnable(head).then_some(head);
                    self.refused.push((self.pkts.len(), back));
                    if back.is_some() {
                        crate::warn_limited!("{e}");
                    } else {
                        // Not a chain the guest can get back: returning it would only corrupt
                        // its bookkeeping.
                        crate::warn_limited!(
                            "tx queue: avail ring names head {}, past the {}-entry descriptor table; skipped",
                            head.index,
                            ring.size()
                        );
                    }
                }
            }
        }
        self.popped = popped;
        self.recounted = 0;
        Ok(popped)
    }

    /// Returns every gathered chain to the guest: one used-index update for the batch.
    pub fn complete<M: GuestMemoryBackend>(
        &self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<(), TxError> {
        self.complete_first(queue, mem, self.len()).map(|_| ())
    }

    /// Returns, in ring order, the chains of the first `sent` packets and the refused chains
    /// before the next packet. Returns how many chains that is.
    fn complete_first<M: GuestMemoryBackend>(
        &self,
        queue: &mut Queue,
        mem: &M,
        sent: usize,
    ) -> Result<usize, TxError> {
        let mut ring = Ring::new(queue, mem, self.kind)?;
        let mut refused = self.refused.iter().peekable();
        let mut chains = 0;
        for i in 0..=sent {
            while let Some((_, head)) = refused.next_if(|&&(before, _)| before == i) {
                if let Some(head) = *head {
                    ring.add_used(head, 0);
                }
                chains += 1;
            }
            if let Some(&head) = self.heads.get(i).filter(|_| i < sent) {
                ring.add_used(head, 0);
                chains += 1;
            }
        }
        Ok(chains)
    }

    /// Completes the chains before packet `sent` and puts every later one back in the ring
    /// (`next_avail` rewound): the next gather pops them again, and a stop in between hands
    /// a base that excludes them.
    fn complete_and_put_back<M: GuestMemoryBackend>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        sent: usize,
    ) -> Result<usize, TxError> {
        let done = self.complete_first(queue, mem, sent)?;
        queue.set_next_avail(self.popped_at[done]);
        self.recounted = self.refused.iter().filter(|&&(b, _)| b > sent).count();
        Ok(done)
    }

    /// Number of good packets gathered.
    pub fn len(&self) -> usize {
        self.pkts.len()
    }

    /// Takes a batch from `queue` and gives it straight back, its packets counted as drops
    /// for `reason` in `drops`: for a link that cannot take them (VF gone, RX side off) the
    /// guest still gets its TX buffers back, like a NIC with its link down.
    pub fn discard<M: GuestMemoryBackend>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        hdr_len: usize,
        (stats, drops): (&QueueStats, &QueueStats),
        reason: DropReason,
    ) -> Result<usize, TxError> {
        let n = self.gather(queue, mem, hdr_len, stats)?;
        drops.add_drops(reason, self.len() as u64);
        self.complete(queue, mem)?;
        Ok(n)
    }

    pub fn is_empty(&self) -> bool {
        self.pkts.is_empty()
    }

    /// Each gathered packet's iovecs into guest memory (its header iovec left out), for the
    /// fuzzers to check they lie inside guest memory.
    #[cfg(test)]
    pub(crate) fn packet_iovecs(&self) -> impl Iterator<Item = &[libc::iovec]> {
        self.pkts.iter().map(|r| &self.iovs[r.start + 1..r.end])
    }
}

/// Turns one chain into iovecs: first the 10-byte offload header (copied into `hdr`, since the
/// guest's is 12 bytes and may be split across buffers), then the packet in guest memory.
/// Returns the packet length without header.
fn gather_chain<M: GuestMemoryBackend>(
    ring: &Ring<'_, M>,
    chain_head: Head,
    guest_hdr_len: usize,
    hdr: &mut VnetHdr,
    iovs: &mut Vec<libc::iovec>,
) -> Result<usize, TxError> {
    let head = chain_head.index;
    let first_iov = iovs.len();
    let mut raw_hdr = [0u8; VIRTIO_NET_HDR_LEN];
    let mut hdr_len = 0usize;
    let mut total = 0usize;
    iovs.push(libc::iovec {
        iov_base: (hdr as *mut VnetHdr).cast(),
        iov_len: VNET_HDR_LEN,
    });
    let bad = |addr: u64, len: usize, source| TxError::BadAddress {
        head,
        addr,
        len,
        source,
    };
    let mut chain = ring.chain(chain_head);
    while let Some(desc) = ring
        .next_desc(&mut chain)
        .map_err(|source| TxError::Chain { head, source })?
    {
        if desc.is_write_only() {
            return Err(TxError::WritableDescriptor { head });
        }
        let mut addr = desc.addr;
        let mut len = desc.len as usize;
        if hdr_len < guest_hdr_len {
            let n = len.min(guest_hdr_len - hdr_len);
            ring.map()
                .read(addr, &mut raw_hdr[hdr_len..hdr_len + n])
                .map_err(|e| bad(addr, n, e))?;
            hdr_len += n;
            addr = addr.wrapping_add(n as u64);
            len -= n;
        }
        if len == 0 {
            continue;
        }
        total += len;
        if total > MAX_TX_PACKET {
            return Err(TxError::TooBig {
                head,
                max: MAX_TX_PACKET,
            });
        }
        if iovs.len() - first_iov > MAX_TX_SEGMENTS {
            return Err(TxError::TooManySegments {
                head,
                max: MAX_TX_SEGMENTS,
            });
        }
        // Almost every buffer lies inside one memory region: one cached lookup, one iovec.
        // Only a buffer straddling two regions (or outside memory) takes vm-memory's path.
        if let Some(p) = ring.map().host(addr, len) {
            // The copy (loopback) or the kernel (VF) reads it after the whole batch is
            // gathered: start fetching the guest's bytes now.
            prefetch(p);
            iovs.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: len,
            });
            continue;
        }
        let mem = ring.map().mem();
        for slice in mem.get_slices(GuestAddress(addr), len) {
            let slice = slice.map_err(|e| bad(addr, len, e))?;
            if iovs.len() - first_iov > MAX_TX_SEGMENTS {
                return Err(TxError::TooManySegments {
                    head,
                    max: MAX_TX_SEGMENTS,
                });
            }
            iovs.push(libc::iovec {
                iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: slice.len(),
            });
        }
    }
    if hdr_len < guest_hdr_len {
        return Err(TxError::ShortHeader { head, len: hdr_len });
    }
    // The guest's first 10 bytes are exactly the socket's header; num_buffers means nothing on TX.
    *hdr = VnetHdr::from_bytes(&raw_hdr).unwrap_or_default();
    Ok(total)
}

/// Sends one batch from the guest's TX queue to the VF. Returns the chains consumed (0 when
/// the queue is empty or the VF's send queue is full).
///
/// What a full send queue did not take goes back in the guest's ring for the next round
/// (counted in `retries`); once the VF has taken nothing for `wait`, it is dropped
/// ([`DropReason::VfFull`]). `wait` zero drops at once.
pub fn guest_to_vf<M: GuestMemoryBackend>(
    queue: &mut Queue,
    mem: &M,
    hdr_len: usize,
    vf: &mut VfSocket,
    batch: &mut TxBatch,
    stats: &QueueStats,
    wait: Duration,
) -> Result<usize, TxError> {
    let popped = batch.gather(queue, mem, hdr_len, stats)?;
    if popped == 0 {
        return Ok(0);
    }
    let p = if batch.is_empty() {
        TxProgress::default()
    } else {
        vf.try_tx_batch(&batch.iovs, &batch.pkts)
            .unwrap_or_else(|e| {
                crate::warn_limited!("tx to {}: {e}", vf.ifname());
                TxProgress {
                    settled: batch.len(),
                    down: batch.len(),
                    ..TxProgress::default()
                }
            })
    };
    let bytes: usize = batch.lens[..p.accepted].iter().sum();
    stats.add_packets(p.accepted as u64, bytes as u64);
    stats.add_drops(DropReason::VfRefused, p.refused as u64);
    stats.add_drops(DropReason::VfDown, p.down as u64);
    if p.full {
        let now = Instant::now();
        if p.settled > 0 || batch.stalled_since.is_none() {
            batch.stalled_since = Some(now);
        }
        let stalled = batch.stalled_since.map_or(Duration::ZERO, |t| now - t);
        if stalled < wait {
            stats.add_retries(1);
            return batch.complete_and_put_back(queue, mem, p.settled);
        }
        // Nothing left the VF for the whole bound: its queue is stuck, not just busy. Until
        // it takes a packet again, what it refuses is dropped at once.
        stats.add_drops(DropReason::VfFull, (batch.len() - p.settled) as u64);
    } else {
        batch.stalled_since = None;
    }
    batch.complete(queue, mem)?;
    Ok(popped)
}

/// Loopback packets in at most this many guest buffers are copied straight into the RX
/// buffers; more scattered ones are first gathered into one buffer.
const DIRECT_SEGMENTS: usize = 8;

/// Per-pair packet buffers, reused so no packet allocates once they have grown.
pub struct PacketBufs {
    /// A whole packet copied out of guest TX buffers (loopback).
    pub copy: Vec<u8>,
    /// Segments built by the offload fallback.
    pub scratch: Vec<u8>,
}

impl Default for PacketBufs {
    fn default() -> Self {
        PacketBufs {
            copy: Vec::with_capacity(MAX_TX_PACKET),
            scratch: Vec::with_capacity(MAX_TX_PACKET),
        }
    }
}

/// Loopback: sends one batch from the guest's TX queue back into its RX queue of the same
/// pair. Packets that find no RX buffer are dropped (like a NIC with a full ring).
pub fn guest_to_guest<M: GuestMemoryBackend>(
    tx_queue: &mut Queue,
    rx: &mut RxRing<'_, M>,
    mem: &M,
    offloads: RxOffloads,
    batch: &mut TxBatch,
    bufs: &mut PacketBufs,
    stats: (&QueueStats, &QueueStats),
) -> Result<usize, TxError> {
    let PacketBufs { copy, scratch } = bufs;
    let (tx_stats, rx_stats) = stats;
    let popped = batch.gather(tx_queue, mem, rx.header_len(), tx_stats)?;
    for (i, range) in batch.pkts.iter().enumerate() {
        let hdr = &batch.hdrs[i];
        // Skip the header iovec; it is `batch.hdrs[i]`.
        let iovs = &batch.iovs[range.start + 1..range.end];
        // SAFETY: gather_chain built these from guest memory it checked to be mapped, and
        // the mapping stays while `mem` (the caller's guard) lives. No `&[u8]`: the guest may
        // have posted the same memory as RX buffer, which the delivery writes.
        let seg = |iov: &libc::iovec| unsafe {
            GuestSlice::from_raw(iov.iov_base as *const u8, iov.iov_len)
        };
        let delivery = if offloads.accepts(hdr) && iovs.len() <= DIRECT_SEGMENTS {
            // The usual case: straight from the TX buffers into the RX buffers, one copy.
            let mut segs = [GuestSlice::new(&[]); DIRECT_SEGMENTS];
            for (s, iov) in segs.iter_mut().zip(iovs) {
                *s = seg(iov);
            }
            tx_stats.add_packets(1, batch.lens[i] as u64);
            deliver_counted(rx, hdr, &segs[..iovs.len()], rx_stats)
        } else {
            // Offloads to do in software need the packet in one piece, and parse it: from a
            // private copy, which the guest cannot change under the parser.
            copy.clear();
            for iov in iovs {
                seg(iov).append_to(copy);
            }
            tx_stats.add_packets(1, copy.len() as u64);
            deliver_adapted(rx, offloads, hdr, copy, scratch, rx_stats)
        };
        if delivery == Delivery::NoBuffers {
            rx_stats.add_drops(DropReason::NoBuffers, 1);
        }
    }
    batch.complete(tx_queue, mem)?;
    Ok(popped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net_hdr::{VirtioNetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6};
    use virtio_queue::QueueT;
    use virtq::mock::*;
    use vm_memory::{ByteValued, Bytes, GuestAddress};

    /// One loopback round with every offload accepted: a TX batch into the RX queue, whose
    /// used entries are published when it returns. Returns the TX chains consumed.
    fn loop_back<M: GuestMemoryBackend>(
        (tx, rx): (&mut Queue, &mut Queue),
        mem: &M,
        (batch, bufs): (&mut TxBatch, &mut PacketBufs),
        stats: (&QueueStats, &QueueStats),
    ) -> usize {
        let mut ring = RxRing::new(rx, mem, RingKind::Split, true, VIRTIO_NET_HDR_LEN).unwrap();
        let offloads = RxOffloads::from_features(u64::MAX);
        guest_to_guest(tx, &mut ring, mem, offloads, batch, bufs, stats).unwrap()
    }

    /// Writes a guest TX header at `addr`.
    fn put_hdr(mem: &Mem, addr: u64, hdr: VnetHdr) {
        let h = VirtioNetHdr {
            hdr,
            num_buffers: 0,
        };
        mem.write_slice(h.as_slice(), GuestAddress(addr)).unwrap();
    }

    fn put(mem: &Mem, addr: u64, bytes: &[u8]) {
        mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    /// The bytes of packet `i` of a gathered batch, header iovec excluded.
    fn packet_bytes(batch: &TxBatch, i: usize) -> Vec<u8> {
        let r = batch.pkts[i].clone();
        let mut out = Vec::new();
        for iov in &batch.iovs[r.start + 1..r.end] {
            // SAFETY: test memory outlives the batch; iovecs were bounds-checked by gather.
            unsafe { GuestSlice::from_raw(iov.iov_base as *const u8, iov.iov_len) }
                .append_to(&mut out);
        }
        out
    }

    fn tso_hdr() -> VnetHdr {
        VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV6,
            hdr_len: 74,
            gso_size: 1428,
            csum_start: 54,
            csum_offset: 16,
        }
    }

    #[test]
    fn gathers_header_and_scattered_payload_in_place() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        let a = pattern(1000, 1);
        let b = pattern(3000, 2);
        put_hdr(&mem, BUFFERS, tso_hdr());
        put(&mem, BUFFERS + 0x1000, &a);
        put(&mem, BUFFERS + 0x2000, &b);
        gq.add(&[
            rbuf(BUFFERS, 12),
            rbuf(BUFFERS + 0x1000, 1000),
            rbuf(BUFFERS + 0x2000, 3000),
        ]);
        // Header and data in one buffer, as Linux sends small packets.
        put_hdr(&mem, BUFFERS + 0x8000, VnetHdr::default());
        put(&mem, BUFFERS + 0x8000 + 12, &a[..60]);
        gq.add(&[rbuf(BUFFERS + 0x8000, 72)]);
        let mut q = gq.queue();
        let stats = QueueStats::default();
        let mut batch = TxBatch::default();
        assert_eq!(
            batch
                .gather(&mut q, &mem, VIRTIO_NET_HDR_LEN, &stats)
                .unwrap(),
            2
        );
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.hdrs[0], tso_hdr());
        assert_eq!(batch.iovs[batch.pkts[0].start].iov_len, VNET_HDR_LEN);
        assert_eq!(packet_bytes(&batch, 0), [a.clone(), b].concat());
        assert_eq!(batch.lens, vec![4000, 60]);
        assert_eq!(packet_bytes(&batch, 1), a[..60].to_vec());
        // The payload iovec points into guest memory itself: no copy.
        let host = mem
            .get_host_address(GuestAddress(BUFFERS + 0x1000))
            .unwrap();
        assert_eq!(
            batch.iovs[batch.pkts[0].start + 1].iov_base as *mut u8,
            host
        );
        // Nothing returned yet; complete() returns both with length 0.
        assert_eq!(gq.used_idx(), 0);
        batch.complete(&mut q, &mem).unwrap();
        assert_eq!(gq.used_idx(), 2);
        assert_eq!(gq.used(1), (3, 0));
    }

    #[test]
    fn header_split_over_buffers() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        put_hdr(&mem, BUFFERS, tso_hdr());
        let h = read(&mem, BUFFERS, 12);
        put(&mem, BUFFERS + 0x100, &h[..7]);
        put(&mem, BUFFERS + 0x200, &h[7..]);
        put(&mem, BUFFERS + 0x200 + 5, &pattern(40, 3));
        gq.add(&[rbuf(BUFFERS + 0x100, 7), rbuf(BUFFERS + 0x200, 45)]);
        let mut q = gq.queue();
        let mut batch = TxBatch::default();
        batch
            .gather(&mut q, &mem, VIRTIO_NET_HDR_LEN, &QueueStats::default())
            .unwrap();
        assert_eq!(batch.hdrs[0], tso_hdr());
        assert_eq!(packet_bytes(&batch, 0), pattern(40, 3));
    }

    #[test]
    fn bad_chains_are_returned_and_counted() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 128);
        gq.add(&[rbuf(BUFFERS, 12), wbuf(BUFFERS + 0x100, 100)]); // writable in TX
        gq.add(&[rbuf(BUFFERS, 8)]); // short header
        gq.add(&[rbuf(BUFFERS, 12), rbuf((16 << 20) - 10, 100)]); // past the end of memory
        gq.add(&[rbuf(u64::MAX - 4, 100)]); // wraps the address space
        gq.add(&[rbuf(BUFFERS, 12), rbuf(BUFFERS, 65535), rbuf(BUFFERS, 100)]); // too big
        let many: Vec<Buf> = (0..(MAX_TX_SEGMENTS as u64 + 2))
            .map(|i| rbuf(BUFFERS + 16 * i, 16))
            .collect();
        gq.add(&many); // too many segments
        gq.add(&[rbuf(BUFFERS, 0)]); // zero-length buffer
        gq.add(&[rbuf(BUFFERS, 72)]); // good
        let mut q = gq.queue();
        let stats = QueueStats::default();
        let mut batch = TxBatch::default();
        assert_eq!(
            batch
                .gather(&mut q, &mem, VIRTIO_NET_HDR_LEN, &stats)
                .unwrap(),
            8
        );
        assert_eq!(batch.len(), 1);
        assert_eq!(batch.lens, vec![60]);
        assert_eq!(stats.snapshot().errors, 7);
        // The bad ones go back with the batch, all in ring order.
        assert_eq!(gq.used_idx(), 0);
        let heads: Vec<u32> = {
            batch.complete(&mut q, &mem).unwrap();
            (0..8).map(|i| gq.used(i).0).collect()
        };
        assert_eq!(gq.used_idx(), 8);
        let mut ring_order = heads.clone();
        ring_order.sort();
        assert_eq!(heads, ring_order);
    }

    /// A batch the VF took only part of: the chains before the first unsent packet go back
    /// (refused ones with them, in ring order), the rest are popped again by the next
    /// gather, and no chain is returned or counted twice.
    #[test]
    fn cut_short_batch_puts_the_rest_back_exactly_once() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        put_hdr(&mem, BUFFERS, VnetHdr::default());
        let good = || [rbuf(BUFFERS, 72)];
        let bad = [rbuf(BUFFERS, 8)]; // short header
        gq.add(&good());
        gq.add(&bad);
        gq.add(&good());
        gq.add(&bad);
        gq.add(&good());
        let mut q = gq.queue();
        let stats = QueueStats::default();
        let mut batch = TxBatch::default();
        assert_eq!(batch.gather(&mut q, &mem, 12, &stats).unwrap(), 5);
        assert_eq!((batch.len(), stats.snapshot().errors), (3, 2));
        // The VF took one packet, then was full.
        assert_eq!(batch.complete_and_put_back(&mut q, &mem, 1).unwrap(), 2);
        assert_eq!((gq.used_idx(), q.next_avail()), (2, 2));
        assert_eq!((gq.used(0).0, gq.used(1).0), (0, 1));
        // Next round: the rest, once; its refused chain is not counted again.
        assert_eq!(batch.gather(&mut q, &mem, 12, &stats).unwrap(), 3);
        assert_eq!((batch.len(), stats.snapshot().errors), (2, 2));
        batch.complete(&mut q, &mem).unwrap();
        assert_eq!(gq.used_idx(), 5);
        let heads: Vec<u32> = (0..5).map(|i| gq.used(i).0).collect();
        assert_eq!(heads, vec![0, 1, 2, 3, 4]);
    }

    /// A head index past the descriptor table names no chain at all: there is nothing to
    /// return, and it must cost only itself. The good chains of the same batch are still sent
    /// and returned, so when the frontend stops the ring (GET_VRING_BASE) every chain taken
    /// from avail is in the used ring, and the queue keeps working.
    #[test]
    fn out_of_range_head_costs_only_itself() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 16);
        put_hdr(&mem, BUFFERS, VnetHdr::default());
        gq.add(&[rbuf(BUFFERS, 72)]);
        gq.add_raw_head(999);
        gq.add(&[rbuf(BUFFERS, 72)]);
        let mut q = gq.queue();
        let stats = QueueStats::default();
        let mut batch = TxBatch::default();
        let popped = batch
            .gather(&mut q, &mem, VIRTIO_NET_HDR_LEN, &stats)
            .expect("a bad head does not fail the batch");
        assert_eq!(popped, 3);
        assert_eq!(batch.len(), 2, "both good chains are in the batch");
        assert_eq!(stats.snapshot().errors, 1);
        batch.complete(&mut q, &mem).unwrap();
        assert_eq!(gq.used_idx(), 2);
        assert_eq!((gq.used(0).0, gq.used(1).0), (0, 1));
        assert_eq!(q.next_avail(), 3);
        // The queue goes on.
        gq.add(&[rbuf(BUFFERS, 72)]);
        batch
            .gather(&mut q, &mem, VIRTIO_NET_HDR_LEN, &stats)
            .unwrap();
        assert_eq!(batch.len(), 1);
    }

    #[test]
    fn descriptor_loop_is_bounded() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 256);
        gq.add_loop(rbuf(BUFFERS, 4096));
        let mut q = gq.queue();
        let stats = QueueStats::default();
        let mut batch = TxBatch::default();
        assert_eq!(
            batch
                .gather(&mut q, &mem, VIRTIO_NET_HDR_LEN, &stats)
                .unwrap(),
            1
        );
        assert_eq!(batch.len(), 0);
        assert_eq!(stats.snapshot().errors, 1);
    }

    #[test]
    fn segment_cap_is_per_packet() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 256);
        for i in 0..20u64 {
            let bufs: Vec<Buf> = (0..10)
                .map(|j| rbuf(BUFFERS + i * 0x1000 + j * 32, 32))
                .collect();
            gq.add(&bufs);
        }
        let mut q = gq.queue();
        let stats = QueueStats::default();
        let mut batch = TxBatch::default();
        assert_eq!(
            batch
                .gather(&mut q, &mem, VIRTIO_NET_HDR_LEN, &stats)
                .unwrap(),
            20
        );
        assert_eq!(batch.len(), 20);
        assert_eq!(stats.snapshot().errors, 0);
    }

    #[test]
    fn batch_is_capped() {
        let mem = memory();
        let mut gq = GuestQueue::new(&mem, 0, 256);
        for i in 0..(TX_BATCH as u64 + 10) {
            gq.add(&[rbuf(BUFFERS + i * 0x100, 80)]);
        }
        let mut q = gq.queue();
        let mut batch = TxBatch::default();
        let stats = QueueStats::default();
        assert_eq!(
            batch
                .gather(&mut q, &mem, VIRTIO_NET_HDR_LEN, &stats)
                .unwrap(),
            TX_BATCH
        );
        batch.complete(&mut q, &mem).unwrap();
        assert_eq!(
            batch
                .gather(&mut q, &mem, VIRTIO_NET_HDR_LEN, &stats)
                .unwrap(),
            10
        );
    }

    #[test]
    fn loopback_returns_each_packet_on_the_rx_queue() {
        let mem = memory();
        let mut txq = GuestQueue::new(&mem, 0, 16);
        let mut rxq = GuestQueue::new(&mem, 0x10_0000, 16);
        let p1 = pattern(60, 4);
        let p2 = pattern(1400, 5);
        put_hdr(&mem, BUFFERS, VnetHdr::default());
        put(&mem, BUFFERS + 12, &p1);
        put_hdr(&mem, BUFFERS + 0x1000, tso_hdr());
        put(&mem, BUFFERS + 0x2000, &p2);
        txq.add(&[rbuf(BUFFERS, 72)]);
        txq.add(&[rbuf(BUFFERS + 0x1000, 12), rbuf(BUFFERS + 0x2000, 1400)]);
        rxq.add(&[wbuf(0x80_0000, 2048)]);
        rxq.add(&[wbuf(0x80_1000, 2048)]);
        let mut tx = txq.queue();
        let mut rx = rxq.queue();
        let (tx_stats, rx_stats) = (QueueStats::default(), QueueStats::default());
        let (mut batch, mut bufs) = (TxBatch::default(), PacketBufs::default());
        let n = loop_back(
            (&mut tx, &mut rx),
            &mem,
            (&mut batch, &mut bufs),
            (&tx_stats, &rx_stats),
        );
        assert_eq!(n, 2);
        assert_eq!(txq.used_idx(), 2);
        assert_eq!(rxq.used_idx(), 2);
        assert_eq!(read(&mem, 0x80_0000 + 12, 60), p1);
        assert_eq!(read(&mem, 0x80_1000 + 12, 1400), p2);
        // The offload header travels with the packet.
        let h = VnetHdr::from_bytes(&read(&mem, 0x80_1000, 10)).unwrap();
        assert_eq!(h, tso_hdr());
        assert_eq!(tx_stats.snapshot().packets, 2);
        assert_eq!(rx_stats.snapshot().packets, 2);
        assert_eq!(rx_stats.snapshot().bytes, 1460);
    }

    /// The data path's buffers are the pair's, grown once: a batch of loopback, mergeable
    /// RX (what QEMU negotiates) and a packet spread over three RX buffers included, makes
    /// no allocation at all.
    #[test]
    fn a_loopback_batch_allocates_nothing() {
        let mem = memory();
        let mut txq = GuestQueue::new(&mem, 0, 64);
        let mut rxq = GuestQueue::new(&mem, 0x10_0000, 64);
        let (mut batch, mut bufs) = (TxBatch::default(), PacketBufs::default());
        let (tx_stats, rx_stats) = (QueueStats::default(), QueueStats::default());
        put_hdr(&mem, BUFFERS, VnetHdr::default());
        put(&mem, BUFFERS + 12, &pattern(1500, 6));
        let (mut tx, mut rx) = (txq.queue(), rxq.queue());
        for round in 0..3u64 {
            for i in 0..16 {
                txq.add(&[rbuf(BUFFERS, 76)]);
                rxq.add(&[wbuf(0x80_0000 + i * 0x800, 2048)]);
            }
            txq.add(&[rbuf(BUFFERS, 1512)]);
            for i in 0..3 {
                rxq.add(&[wbuf(0x90_0000 + i * 0x800, 600)]);
            }
            let (n, allocations) = crate::alloc_count::allocations_in(|| {
                loop_back(
                    (&mut tx, &mut rx),
                    &mem,
                    (&mut batch, &mut bufs),
                    (&tx_stats, &rx_stats),
                )
            });
            assert_eq!(n, 17);
            assert_eq!(allocations, 0, "round {round}");
        }
        assert_eq!(rxq.used_idx(), 3 * 19);
        assert_eq!(rx_stats.snapshot().packets, 3 * 17);
        assert_eq!(rx_stats.snapshot().drops, 0);
    }

    /// Packed rings both ways, over several laps of 8-entry rings: every packet comes back
    /// whole (one spread over three RX buffers, with num_buffers 3), the used descriptors
    /// carry the guest's buffer ids, and once the thread's pending list has grown a batch
    /// allocates nothing.
    #[test]
    fn loopback_over_packed_rings_wraps_and_allocates_nothing() {
        let mem = memory();
        let mut txq = PackedGuestQueue::new(&mem, 0, 8);
        let mut rxq = PackedGuestQueue::new(&mem, 0x10_0000, 8);
        let mut batch = TxBatch::default();
        batch.set_ring_kind(RingKind::Packed);
        let mut bufs = PacketBufs::default();
        let (tx_stats, rx_stats) = (QueueStats::default(), QueueStats::default());
        let (mut tx, mut rx) = (txq.queue(), rxq.queue());
        let small = pattern(60, 1);
        let big = pattern(1400, 2);
        put_hdr(&mem, BUFFERS, VnetHdr::default());
        put(&mem, BUFFERS + 12, &small);
        put_hdr(&mem, BUFFERS + 0x1000, VnetHdr::default());
        put(&mem, BUFFERS + 0x2000, &big);
        for round in 0..5u64 {
            // A one-descriptor packet and a two-descriptor one (header apart).
            let t1 = txq.add(&[rbuf(BUFFERS, 72)]);
            let t2 = txq.add(&[rbuf(BUFFERS + 0x1000, 12), rbuf(BUFFERS + 0x2000, 1400)]);
            let r1 = rxq.add(&[wbuf(0x80_0000, 2048)]);
            let big_rx: Vec<u16> = (0..3)
                .map(|i| rxq.add(&[wbuf(0x90_0000 + i * 0x1000, 500)]))
                .collect();
            let (n, allocations) = crate::alloc_count::allocations_in(|| {
                let mut ring = RxRing::new(&mut rx, &mem, RingKind::Packed, true, 12).unwrap();
                let offloads = RxOffloads::from_features(u64::MAX);
                let stats = (&tx_stats, &rx_stats);
                guest_to_guest(
                    &mut tx, &mut ring, &mem, offloads, &mut batch, &mut bufs, stats,
                )
                .unwrap()
            });
            assert_eq!(n, 2, "round {round}");
            if round > 0 {
                assert_eq!(allocations, 0, "round {round}");
            }
            assert_eq!(txq.take_used(), Some((t1, 0)));
            assert_eq!(txq.take_used(), Some((t2, 0)));
            assert_eq!(txq.take_used(), None);
            assert_eq!(rxq.take_used(), Some((r1, 72)));
            for (i, id) in big_rx.iter().enumerate() {
                let len = if i < 2 { 500 } else { 1412 - 1000 };
                assert_eq!(rxq.take_used(), Some((*id, len)), "round {round}");
            }
            assert_eq!(rxq.take_used(), None);
            assert_eq!(read(&mem, 0x80_0000 + 12, 60), small);
            let num_buffers: u16 = mem.read_obj(GuestAddress(0x90_0000 + 10)).unwrap();
            assert_eq!(num_buffers, 3);
            let mut got = read(&mem, 0x90_0000 + 12, 488);
            got.extend(read(&mem, 0x90_1000, 500));
            got.extend(read(&mem, 0x90_2000, 412));
            assert_eq!(got, big, "round {round}");
        }
        assert_eq!(rx_stats.snapshot().packets, 10);
        assert_eq!(rx_stats.snapshot().drops, 0);
    }

    #[test]
    fn loopback_without_rx_buffers_drops_and_returns_tx() {
        let mem = memory();
        let mut txq = GuestQueue::new(&mem, 0, 16);
        let rxq = GuestQueue::new(&mem, 0x10_0000, 16);
        txq.add(&[rbuf(BUFFERS, 72)]);
        let mut tx = txq.queue();
        let mut rx = rxq.queue();
        let (tx_stats, rx_stats) = (QueueStats::default(), QueueStats::default());
        let (mut batch, mut bufs) = (TxBatch::default(), PacketBufs::default());
        loop_back(
            (&mut tx, &mut rx),
            &mem,
            (&mut batch, &mut bufs),
            (&tx_stats, &rx_stats),
        );
        assert_eq!(txq.used_idx(), 1);
        assert_eq!(rx_stats.snapshot().drops, 1);
    }

    /// Loops one packet back from TX chain `tx` to RX chain `rx` (mergeable, every offload)
    /// and checks it arrived whole: the RX queue's used entry, and `data` right after the
    /// header at `data_at`.
    fn loop_back_one(mem: &Mem, tx: &[Buf], rx: &[Buf], data: &[u8], data_at: u64) {
        let mut txq = GuestQueue::new(mem, 0, 16);
        let mut rxq = GuestQueue::new(mem, 0x10_0000, 16);
        txq.add(tx);
        rxq.add(rx);
        let (mut tx, mut rx) = (txq.queue(), rxq.queue());
        let (tx_stats, rx_stats) = (QueueStats::default(), QueueStats::default());
        let (mut batch, mut bufs) = (TxBatch::default(), PacketBufs::default());
        loop_back(
            (&mut tx, &mut rx),
            mem,
            (&mut batch, &mut bufs),
            (&tx_stats, &rx_stats),
        );
        assert_eq!(rx_stats.snapshot().packets, 1);
        assert_eq!(rxq.used(0), (0, (VIRTIO_NET_HDR_LEN + data.len()) as u32));
        assert_eq!(read(mem, data_at, data.len()), data);
    }

    /// A guest may post the same memory as TX and RX buffer. Each copy then has overlapping
    /// source and destination: it must be a memmove (a debug build aborts on
    /// `copy_nonoverlapping`'s precondition, a release build has UB), and the packet arrives
    /// as sent as long as each piece is copied before anything overwrites it.
    #[test]
    fn loopback_into_the_same_guest_memory_moves_the_bytes() {
        let mem = memory();
        let x = BUFFERS + 0x1_0000;
        let data = pattern(300, 7);
        let one_buffer = [rbuf(x, 312)];
        // (RX chain, where its data starts)
        let cases: [(Vec<Buf>, u64); 5] = [
            // The very same buffer, header and data in place.
            (vec![wbuf(x, 2048)], x + 12),
            // Partly overlapping: the RX buffer starts inside the TX one, and before it.
            (vec![wbuf(x + 4, 2048)], x + 16),
            (vec![wbuf(x - 20, 2048)], x - 8),
            // Header and data in separate RX descriptors over the TX buffer.
            (vec![wbuf(x, 12), wbuf(x + 12, 2000)], x + 12),
            (vec![wbuf(x - 40, 12), wbuf(x - 28, 2000)], x - 28),
        ];
        for (rx, data_at) in cases {
            put_hdr(&mem, x, VnetHdr::default());
            put(&mem, x + 12, &data);
            loop_back_one(&mem, &one_buffer, &rx, &data, data_at);
        }
        // Header and data in separate TX buffers, the RX buffer exactly over the data.
        put_hdr(&mem, BUFFERS, VnetHdr::default());
        put(&mem, x, &data);
        let split = [rbuf(BUFFERS, 12), rbuf(x, 300)];
        loop_back_one(&mem, &split, &[wbuf(x - 12, 2048)], &data, x);
    }

    /// The cost of dirty-page logging on the loopback data path: the same batches of 64
    /// packets of 64 bytes with LOG_ALL off and on (a memfd log attached as SET_LOG_BASE does),
    /// alternating, timing only the backend's work. The bar: logging on keeps at
    /// least 80% of the throughput. `scripts/bench.sh` runs it in release and reports it.
    #[test]
    #[ignore = "a benchmark; scripts/bench.sh runs it in release"]
    fn dirty_logging_cost() {
        use migration::{DirtyBitmap, DirtyLog, LogMemory};
        use std::os::fd::{AsFd, FromRawFd};
        use std::time::{Duration, Instant};
        use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;

        const SIZE: u64 = 16 << 20;
        const BATCH: u16 = 64;
        let mem: vm_memory::GuestMemoryMmap<DirtyBitmap> =
            vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), SIZE as usize)]).unwrap();
        let log = DirtyLog::new("bench");
        log.update_memory(&mem).unwrap();
        // SAFETY: memfd_create with a valid C string; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"bench-log".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd nobody else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let log_len = SIZE / 4096 / 8;
        file.set_len(log_len).unwrap();
        log.set_log_base(&mem, LogMemory::map(file.as_fd(), 0, log_len).unwrap())
            .unwrap();

        let pkt = pattern(64, 1);
        for i in 0..u64::from(BATCH) {
            let mut b = vec![0u8; VIRTIO_NET_HDR_LEN];
            b.extend_from_slice(&pkt);
            mem.write_slice(&b, GuestAddress(BUFFERS + i * 0x800))
                .unwrap();
        }
        let tx_descs: Vec<RawDescriptor> = (0..u64::from(BATCH))
            .map(|i| RawDescriptor::from(Descriptor::new(BUFFERS + i * 0x800, 76, 0, 0)))
            .collect();
        let rx_descs: Vec<RawDescriptor> = (0..u64::from(BATCH))
            .map(|i| {
                RawDescriptor::from(Descriptor::new(
                    0x80_0000 + i * 0x800,
                    2048,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ))
            })
            .collect();
        let (mut batch, mut bufs) = (TxBatch::default(), PacketBufs::default());
        let (tx_stats, rx_stats) = (QueueStats::default(), QueueStats::default());
        // Per-batch times: the median is immune to the worker being preempted mid-batch.
        let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
        for round in 0..40 {
            let on = round % 2 == 1;
            log.set_log_all(on).unwrap();
            for _ in 0..200 {
                // The guest's side, untimed: fresh rings full of work.
                let txq = MockSplitQueue::create(&mem, GuestAddress(0), 256);
                let rxq = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 256);
                txq.add_desc_chains(&tx_descs, 0).unwrap();
                rxq.add_desc_chains(&rx_descs, 0).unwrap();
                let mut tx: Queue = txq.create_queue().unwrap();
                let mut rx: Queue = rxq.create_queue().unwrap();
                let t = Instant::now();
                let n = loop_back(
                    (&mut tx, &mut rx),
                    &mem,
                    (&mut batch, &mut bufs),
                    (&tx_stats, &rx_stats),
                );
                times[usize::from(on)].push(t.elapsed());
                assert_eq!(n, usize::from(BATCH));
                assert_eq!(rx.next_used(), BATCH);
            }
        }
        log.set_log_all(false).unwrap();
        let ns = |i: usize| {
            let v = &mut times[i].clone();
            v.sort();
            v[v.len() / 2].as_nanos() as f64 / f64::from(BATCH)
        };
        let (off, on) = (ns(0), ns(1));
        println!(
            "dirty-log-bench: batches={} off_ns_per_packet={off:.1} on_ns_per_packet={on:.1} throughput_ratio={:.3}",
            times[0].len() + times[1].len(),
            off / on
        );
    }
}
