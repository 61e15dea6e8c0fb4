//! Per-queue counters, readable from any thread while the workers update them.
//!
//! Workers own their queues, so each counter has exactly one writer; relaxed atomics are enough
//! and keep the hot path free of locks. Being the only writer, a worker adds with a plain
//! load and store rather than `fetch_add`: a locked read-modify-write costs some 20 cycles, and
//! with two counters per packet that was a sixth of the per-packet cost at 64 bytes. Readers (SIGUSR1, the control socket, tests) see values
//! that are at most one batch old.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one virtqueue.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Packets lost for lack of room: no guest buffers, a full VF socket, a packet too big.
    pub drops: AtomicU64,
    /// Packets or chains refused because they were malformed.
    pub errors: AtomicU64,
}

/// A point-in-time copy of [`QueueStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    pub errors: u64,
}

impl QueueStats {
    pub fn add_packets(&self, packets: u64, bytes: u64) {
        add(&self.packets, packets);
        add(&self.bytes, bytes);
    }

    pub fn add_drops(&self, n: u64) {
        add(&self.drops, n);
    }

    pub fn add_errors(&self, n: u64) {
        add(&self.errors, n);
    }

    pub fn snapshot(&self) -> QueueCounts {
        QueueCounts {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            drops: self.drops.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
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
/// `stats port=NAME queue=Q dir=rx|tx packets=N bytes=N drops=N errors=N`
/// (virtqueue numbering: 2*pair is rx, 2*pair+1 is tx).
impl fmt::Display for PortStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (pair, stats) in self.pairs.iter().enumerate() {
            for (queue, dir, s) in [(2 * pair, "rx", &stats.rx), (2 * pair + 1, "tx", &stats.tx)] {
                let c = s.snapshot();
                writeln!(
                    f,
                    "stats port={} queue={} dir={} packets={} bytes={} drops={} errors={}",
                    self.name, queue, dir, c.packets, c.bytes, c.drops, c.errors
                )?;
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
        s.pairs[1].tx.add_drops(1);
        s.pairs[0].rx.add_errors(2);
        let text = s.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0],
            "stats port=vm1 queue=0 dir=rx packets=0 bytes=0 drops=0 errors=2"
        );
        assert_eq!(
            lines[3],
            "stats port=vm1 queue=3 dir=tx packets=3 bytes=180 drops=1 errors=0"
        );
    }
}
