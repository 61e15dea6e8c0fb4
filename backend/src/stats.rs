//! Per-queue counters, readable from any thread while the workers update them.
//!
//! Workers own their queues, so each counter has exactly one writer; relaxed atomics are enough
//! and keep the hot path free of locks. Being the only writer, a worker adds with a plain
//! load and store rather than `fetch_add`: a locked read-modify-write costs some 20 cycles, and
//! with two counters per packet that was a sixth of the per-packet cost at 64 bytes.
//! Readers (the SIGUSR1 report, tests) see values that are at most one batch old.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a packet was lost. Each queue counts drops per reason; `drops` is their sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The guest had no RX buffer for it (like a NIC with a full RX ring).
    NoBuffers,
    /// The queue was not running (no guest to deliver to), so waiting frames were discarded.
    QueueOff,
    /// Larger than the guest's buffers or than what the VF socket can carry whole.
    TooBig,
    /// The VF's send queue stayed full past the port's wait bound (`vf_tx_wait_us`).
    VfFull,
    /// The VF was down or gone.
    VfDown,
    /// The kernel refused it on the VF (malformed for the device).
    VfRefused,
    /// Dropped by the kernel before the relay saw it: the VF socket's receive ring was full
    /// (`PACKET_STATISTICS` `tp_drops`, `XDP_STATISTICS` `rx_dropped`/`rx_ring_full`/...).
    Kernel,
    /// Truncated by the kernel (oversized frame without a queued copy) or an impossible
    /// frame layout in the VF socket's ring.
    KernelTruncated,
    /// Reached the `AF_PACKET` socket's ring before it could join its fanout group (the VF
    /// was down when it opened); every sibling socket got the frame too, so each discards it.
    BeforeFanout,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::NoBuffers,
        DropReason::QueueOff,
        DropReason::TooBig,
        DropReason::VfFull,
        DropReason::VfDown,
        DropReason::VfRefused,
        DropReason::Kernel,
        DropReason::KernelTruncated,
        DropReason::BeforeFanout,
    ];

    /// The name in the stats lines (`drop_NAME=N`).
    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoBuffers => "no_buffers",
            DropReason::QueueOff => "queue_off",
            DropReason::TooBig => "too_big",
            DropReason::VfFull => "vf_full",
            DropReason::VfDown => "vf_down",
            DropReason::VfRefused => "vf_refused",
            DropReason::Kernel => "kernel",
            DropReason::KernelTruncated => "kernel_truncated",
            DropReason::BeforeFanout => "before_fanout",
        }
    }
}

/// Counters of one virtqueue.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Packets lost, per [`DropReason`] (indexed by `reason as usize`).
    pub drops: [AtomicU64; DropReason::ALL.len()],
    /// Packets or chains refused because they were malformed.
    pub errors: AtomicU64,
    /// Sends the VF refused for a full queue and that were tried again (nothing lost).
    pub retries: AtomicU64,
    /// Nanoseconds the worker spent in this queue's batches that moved something: its cost
    /// without the busy-poll spinning, so `busy_ns / packets` is the CPU time per packet.
    pub busy_ns: AtomicU64,
}

/// A point-in-time copy of [`QueueStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub packets: u64,
    pub bytes: u64,
    /// All drops, whatever the reason.
    pub drops: u64,
    pub errors: u64,
    pub retries: u64,
    pub busy_ns: u64,
    /// Drops per reason, indexed like [`DropReason::ALL`].
    pub drops_by: [u64; DropReason::ALL.len()],
}

impl QueueCounts {
    /// Drops of one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops_by[reason as usize]
    }
}

impl QueueStats {
    pub fn add_packets(&self, packets: u64, bytes: u64) {
        add(&self.packets, packets);
        add(&self.bytes, bytes);
    }

    pub fn add_drops(&self, reason: DropReason, n: u64) {
        add(&self.drops[reason as usize], n);
    }

    pub fn add_errors(&self, n: u64) {
        add(&self.errors, n);
    }

    pub fn add_retries(&self, n: u64) {
        add(&self.retries, n);
    }

    /// Adds the time of one batch that moved something.
    pub fn add_busy(&self, time: Duration) {
        add(
            &self.busy_ns,
            u64::try_from(time.as_nanos()).unwrap_or(u64::MAX),
        );
    }

    pub fn snapshot(&self) -> QueueCounts {
        let drops_by = std::array::from_fn(|i| self.drops[i].load(Ordering::Relaxed));
        QueueCounts {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            drops: drops_by.iter().sum(),
            errors: self.errors.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            drops_by,
        }
    }
}

/// Adds to a counter that only the calling worker writes (see the module doc); readers may
/// see the value before or after, never a torn one.
#[inline]
fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// Counters of one queue pair: `rx` is towards the guest, `tx` from the guest.
#[derive(Debug, Default)]
pub struct PairStats {
    pub rx: QueueStats,
    pub tx: QueueStats,
}

/// Counters of one port, one entry per queue pair. Shared between the port's workers and
/// whoever reports them; it outlives frontend connections so counts survive reconnects.
#[derive(Debug)]
pub struct PortStats {
    pub name: String,
    pub pairs: Vec<PairStats>,
}

impl PortStats {
    pub fn new(name: &str, pairs: usize) -> Self {
        PortStats {
            name: name.to_string(),
            pairs: (0..pairs).map(|_| PairStats::default()).collect(),
        }
    }
}

/// vDPA mode counts only what its shadow rings relay (while migrating); in direct mode
/// packets never pass through this process and these stay zero.
impl vdpa::Counters for PortStats {
    fn relayed(&self, queue: usize, packets: u64, bytes: u64) {
        if let Some(pair) = self.pairs.get(queue / 2) {
            let q = if queue.is_multiple_of(2) {
                &pair.rx
            } else {
                &pair.tx
            };
            q.add_packets(packets, bytes);
        }
    }
}

/// One line per virtqueue, in the fixed form tests and operators parse:
/// `stats port=NAME queue=Q dir=rx|tx packets=N bytes=N drops=N errors=N retries=N` followed
/// by `drop_REASON=N` for every [`DropReason`], in [`DropReason::ALL`]'s order, and
/// `busy_ns=N` (virtqueue numbering: 2*pair is rx, 2*pair+1 is tx).
impl fmt::Display for PortStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (pair, stats) in self.pairs.iter().enumerate() {
            for (queue, dir, s) in [(2 * pair, "rx", &stats.rx), (2 * pair + 1, "tx", &stats.tx)] {
                let c = s.snapshot();
                write!(
                    f,
                    "stats port={} queue={} dir={} packets={} bytes={} drops={} errors={} retries={}",
                    self.name, queue, dir, c.packets, c.bytes, c.drops, c.errors, c.retries
                )?;
                for r in DropReason::ALL {
                    write!(f, " drop_{}={}", r.name(), c.dropped(r))?;
                }
                writeln!(f, " busy_ns={}", c.busy_ns)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_follow_the_fixed_format() {
        let s = PortStats::new("vm1", 2);
        s.pairs[1].tx.add_packets(3, 180);
        s.pairs[1].tx.add_drops(DropReason::VfFull, 1);
        s.pairs[1].tx.add_retries(4);
        s.pairs[1].tx.add_busy(Duration::from_micros(2));
        s.pairs[0].rx.add_errors(2);
        s.pairs[0].rx.add_drops(DropReason::Kernel, 5);
        s.pairs[0].rx.add_drops(DropReason::NoBuffers, 2);
        let text = s.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0],
            "stats port=vm1 queue=0 dir=rx packets=0 bytes=0 drops=7 errors=2 retries=0 \
             drop_no_buffers=2 drop_queue_off=0 drop_too_big=0 drop_vf_full=0 drop_vf_down=0 \
             drop_vf_refused=0 drop_kernel=5 drop_kernel_truncated=0 drop_before_fanout=0 \
             busy_ns=0"
        );
        assert_eq!(
            lines[3],
            "stats port=vm1 queue=3 dir=tx packets=3 bytes=180 drops=1 errors=0 retries=4 \
             drop_no_buffers=0 drop_queue_off=0 drop_too_big=0 drop_vf_full=1 drop_vf_down=0 \
             drop_vf_refused=0 drop_kernel=0 drop_kernel_truncated=0 drop_before_fanout=0 \
             busy_ns=2000"
        );
    }
}
