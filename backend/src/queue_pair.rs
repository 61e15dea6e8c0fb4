//! One queue pair: the unit of work of one worker thread.
//!
//! A pair is the guest's RX queue (virtqueue 2i), its TX queue (2i+1) and, in relay mode, the
//! VF socket they are bridged to. Its worker is woken by a TX kick, an RX kick (the guest added
//! buffers we were waiting for), the VF socket turning readable, or its own reschedule event,
//! and then moves packets both ways until there is nothing left or its budget is spent. The
//! budget keeps one round short so the frontend thread (which needs the vring locks for
//! GET_VRING_BASE and friends) is never starved; when it runs out the worker pokes its
//! reschedule eventfd, so the epoll loop comes straight back.

use std::time::{Duration, Instant};

use log::{error, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::offload::RxOffloads;
use crate::rx::{vf_to_guest, RxRing, RxStop};
use crate::stats::{DropReason, PairStats};
use crate::tx::{guest_to_guest, guest_to_vf, PacketBufs, TxBatch};
use crate::vf::{VfSocket, VfStats};
use crate::GuestMemoryMmapB;
use virtq::needs_notification;

/// Rounds (each at most one TX batch and one RX batch) before yielding to the epoll loop.
const ROUNDS_PER_RUN: usize = 16;
/// How long an idle worker keeps polling before it sleeps on the eventfds by default.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);
/// Frames taken from the VF per RX batch.
const RX_BATCH: usize = 64;
/// How long a full VF send queue may take nothing before what it refuses is dropped by
/// default: a NIC drains a 1024-entry ring of full-size frames in about 1.2 ms at 10 Gb/s,
/// so a queue that stays full longer is stuck, not busy.
pub const DEFAULT_TX_WAIT: Duration = Duration::from_millis(2);
/// How often a worker adds the VF socket's kernel counters to the pair's drops.
pub const VF_COUNTERS_INTERVAL: Duration = Duration::from_millis(100);

/// Where a pair's packets go.
pub enum Link {
    /// Bridged to a VF netdev through a packet socket (boxed: its rings' bookkeeping is big).
    Vf(Box<VfSocket>),
    /// Each TX packet comes back on the pair's RX queue.
    Loopback,
}

/// What the guest negotiated, as the data path needs it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Negotiated {
    pub mergeable: bool,
    /// Guest header length: 12, or 10 for a legacy guest without mergeable buffers.
    pub hdr_len: usize,
    pub offloads: RxOffloads,
}

/// State of one queue pair that outlives frontend connections (the VF socket, counters,
/// buffers) plus what one connection may have marked broken.
pub struct QueuePair {
    pub index: usize,
    pub port: String,
    pub link: Link,
    batch: TxBatch,
    /// Loopback's copy of each packet, and the offload fallback's segment buffer.
    bufs: PacketBufs,
    /// The guest ran out of RX buffers with VF frames still waiting.
    rx_waiting: bool,
    rx_broken: bool,
    tx_broken: bool,
    /// Written when a run ends with work left; registered in the worker's epoll.
    pub resched: EventFd,
    /// Fires every [`VF_COUNTERS_INTERVAL`]; registered in the worker's epoll, which then
    /// calls [`QueuePair::count_vf_drops`].
    pub counters_timer: TimerFd,
    /// The VF socket's counters as last added to the pair's drops.
    vf_counted: VfStats,
    /// The VF is gone (deleted; its sockets are bound to an index that no longer exists):
    /// the guest's packets are dropped as [`DropReason::VfDown`] until it is re-opened.
    /// An `AF_XDP` socket would otherwise take them onto its TX ring and lose them unseen.
    pub vf_gone: bool,
    /// How long a full VF send queue may take nothing before its packets are dropped
    /// (`--vf-tx-wait-us`).
    pub tx_wait: Duration,
    /// CPU to pin this pair's worker thread to (`--cpu-list`).
    pub cpu: Option<usize>,
    /// Whether the current worker thread is pinned already (workers are per connection).
    pinned: bool,
    /// Adaptive busy-polling of an idle pair (`--busy-poll-us`).
    spin: Spin,
    /// When the worker last went to sleep, for the spin's adaptation.
    slept_at: Option<Instant>,
    /// The used index this worker last published on the RX and TX queue, while the ring runs
    /// (`None` until its first run, and again after a stop or reset). vhost-user-backend's
    /// SET_VRING_ADDR re-derives `next_used` from the used index in guest memory in two steps
    /// (read it, then store it, each under its own lock), so a worker run that publishes in
    /// between is rolled back, and the next batch would overwrite used entries the guest has
    /// already seen. QEMU re-sends SET_VRING_ADDR to every running ring when a migration
    /// turns logging on or off, so this happens under traffic. Only a stop (GET_VRING_BASE)
    /// or reset may move a running ring's used index; otherwise ours stands.
    published_used: [Option<u16>; 2],
}

/// How long an idle worker spins before it sleeps, adapted to the traffic. What decides is
/// how long the worker then slept: woken again within the longest spin, it would have done
/// better to keep polling (a kick and a wake-up cost more than the spin), so the next spin
/// doubles; asleep for longer, the spin was wasted and halves (down to [`MIN_SPIN`]). Work
/// found while spinning also doubles it. Steady traffic with short gaps so keeps the worker
/// polling and the frontend free of kicks; sparse traffic (pings) costs a few microseconds
/// of spinning per packet.
#[derive(Clone, Copy, Debug)]
pub struct Spin {
    max: Duration,
    current: Duration,
}

/// The shortest adaptive spin (when any).
const MIN_SPIN: Duration = Duration::from_micros(2);

impl Spin {
    pub fn new(max: Duration) -> Self {
        Spin { max, current: max }
    }

    /// The spin to do now.
    pub fn budget(&self) -> Duration {
        self.current
    }

    /// Work arrived while spinning.
    pub fn hit(&mut self) {
        self.current = (self.current * 2).max(MIN_SPIN).min(self.max);
    }

    /// The worker slept `slept` after its spin ran out.
    pub fn woke_after(&mut self, slept: Duration) {
        if slept < self.max {
            self.hit();
        } else {
            self.miss();
        }
    }

    /// The spin was wasted.
    pub fn miss(&mut self) {
        self.current = (self.current / 2).max(MIN_SPIN).min(self.max);
    }
}

impl QueuePair {
    pub fn new(port: &str, index: usize, link: Link) -> std::io::Result<Self> {
        Ok(QueuePair {
            index,
            port: port.to_string(),
            link,
            batch: TxBatch::default(),
            bufs: PacketBufs::default(),
            rx_waiting: false,
            rx_broken: false,
            tx_broken: false,
            resched: EventFd::new(EFD_NONBLOCK)?,
            counters_timer: {
                let mut t = TimerFd::new()?;
                t.reset(VF_COUNTERS_INTERVAL, Some(VF_COUNTERS_INTERVAL))?;
                t
            },
            vf_counted: VfStats::default(),
            vf_gone: false,
            tx_wait: DEFAULT_TX_WAIT,
            cpu: None,
            pinned: false,
            spin: Spin::new(DEFAULT_BUSY_POLL),
            slept_at: None,
            published_used: [None; 2],
        })
    }

    /// Sets the longest busy-poll (zero: sleep as soon as idle).
    pub fn set_busy_poll(&mut self, max: Duration) {
        self.spin = Spin::new(max);
    }

    /// Forgets what a previous connection marked broken.
    pub fn reset(&mut self) {
        self.rx_waiting = false;
        self.rx_broken = false;
        self.tx_broken = false;
        self.pinned = false;
        self.slept_at = None;
        self.published_used = [None; 2];
        self.batch.forget();
        let _ = self.resched.read();
    }

    /// The frontend stopped virtqueue `queue` of this pair (GET_VRING_BASE): whatever it was
    /// marked, it starts afresh when the frontend sets it up again (a guest reboot).
    pub fn stopped(&mut self, queue: usize) {
        if queue.is_multiple_of(2) {
            self.rx_broken = false;
            self.rx_waiting = false;
        } else {
            self.tx_broken = false;
            self.batch.forget();
        }
        self.published_used[queue % 2] = None;
    }

    /// Logs (rate-limited) an error the kernel reported on the VF socket, e.g. the VF
    /// going down or away.
    pub fn report_vf_error(&self) {
        if let Link::Vf(vf) = &self.link {
            if let Some(e) = vf.take_error() {
                crate::warn_limited!(
                    "port {} pair {}: VF {}: {e}",
                    self.port,
                    self.index,
                    vf.ifname()
                );
            }
        }
    }

    /// Serves the pair from `vf` from now on (the VF was re-created); the old socket closes.
    pub fn replace_vf(&mut self, vf: VfSocket) {
        self.link = Link::Vf(Box::new(vf));
        self.vf_counted = VfStats::default();
        self.vf_gone = false;
        // Frames may be waiting on the new socket already, with no edge to come for them.
        let _ = self.resched.write(1);
    }

    /// Adds what the VF socket's kernel side lost since the last call to the pair's drops:
    /// receive ring overflows ([`DropReason::Kernel`]), truncated or impossible frames
    /// ([`DropReason::KernelTruncated`]) and transmit descriptors the kernel rejected
    /// ([`DropReason::VfRefused`]). Called on the worker thread (the counters' only writer).
    pub fn count_vf_drops(&mut self, stats: &PairStats) {
        let _ = self.counters_timer.wait();
        let Link::Vf(vf) = &self.link else { return };
        let now = vf.stats();
        let was = std::mem::replace(&mut self.vf_counted, now);
        let truncated = |s: &VfStats| s.rx_truncated + s.rx_invalid + s.rx_copy_failed;
        let delta = |a: u64, b: u64| a.saturating_sub(b);
        stats.rx.add_drops(
            DropReason::Kernel,
            delta(now.kernel_rx_drops, was.kernel_rx_drops),
        );
        stats.rx.add_drops(
            DropReason::KernelTruncated,
            delta(truncated(&now), truncated(&was)),
        );
        stats.tx.add_drops(
            DropReason::VfRefused,
            delta(now.kernel_tx_invalid, was.kernel_tx_invalid),
        );
    }

    /// Pins the calling worker thread to this pair's CPU, once per connection.
    fn pin(&mut self) {
        self.pinned = true;
        let Some(cpu) = self.cpu else { return };
        // SAFETY: cpu_set_t is plain data; sched_setaffinity(0, ..) affects the calling thread.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if rc != 0 {
            warn!(
                "port {} pair {}: cannot pin to cpu {cpu}: {}",
                self.port,
                self.index,
                std::io::Error::last_os_error()
            );
        } else {
            log::info!(
                "port {} pair {}: worker pinned to cpu {cpu}",
                self.port,
                self.index
            );
        }
    }

    fn rx_label(&self) -> String {
        format!("port {} queue {} (rx)", self.port, 2 * self.index)
    }

    fn tx_label(&self) -> String {
        format!("port {} queue {} (tx)", self.port, 2 * self.index + 1)
    }

    /// Moves packets both ways until idle or out of budget.
    pub fn run(
        &mut self,
        rx_vring: &VringRwLock<crate::GuestMemoryAtomicB>,
        tx_vring: &VringRwLock<crate::GuestMemoryAtomicB>,
        mem: &GuestMemoryMmapB,
        neg: Negotiated,
        stats: &PairStats,
    ) {
        if !self.pinned {
            self.pin();
        }
        let _ = self.resched.read();
        if let Some(t) = self.slept_at.take() {
            self.spin.woke_after(t.elapsed());
        }
        let mut rx_state = rx_vring.get_mut();
        let mut tx_state = tx_vring.get_mut();
        let rx_on = !self.rx_broken && rx_state.get_queue().ready() && rx_state.is_enabled();
        let tx_on = !self.tx_broken && tx_state.get_queue().ready() && tx_state.is_enabled();
        if rx_on {
            self.keep_used_index(0, rx_state.get_queue_mut());
        }
        if tx_on {
            self.keep_used_index(1, tx_state.get_queue_mut());
        }
        log::trace!(
            "port {} pair {}: run (rx {}, tx {})",
            self.port,
            self.index,
            if rx_on { "on" } else { "off" },
            if tx_on { "on" } else { "off" }
        );

        if !rx_on {
            // Nobody to deliver to: don't let stale frames pile up for a later guest.
            if let Link::Vf(vf) = &mut self.link {
                let dropped = vf.rx_batch(usize::MAX, |_, _| true);
                stats.rx.add_drops(DropReason::QueueOff, dropped as u64);
            }
        }

        // We poll from here on: ask the guest not to kick us (without event idx this sets
        // VRING_USED_F_NO_NOTIFY; with it, the avail event simply stays behind). A frontend
        // that polls its own side then never makes a syscall for us.
        if tx_on && !self.tx_broken {
            let _ = tx_state.get_queue_mut().disable_notification(mem);
        }
        if rx_on && !self.rx_broken && self.rx_waiting {
            let _ = rx_state.get_queue_mut().disable_notification(mem);
        }

        let mut rounds = 0usize;
        let mut idle_since: Option<Instant> = None;
        loop {
            let mut progress = 0usize;
            let tx_before = tx_state.get_queue().next_used();
            let rx_before = rx_state.get_queue().next_used();

            if tx_on && !self.tx_broken {
                let (tx_queue, rx_queue) = (tx_state.get_queue_mut(), rx_state.get_queue_mut());
                let result = match &mut self.link {
                    Link::Vf(_) if self.vf_gone => self.batch.discard(
                        tx_queue,
                        mem,
                        neg.hdr_len,
                        (&stats.tx, &stats.tx),
                        DropReason::VfDown,
                    ),
                    Link::Vf(vf) => guest_to_vf(
                        tx_queue,
                        mem,
                        neg.hdr_len,
                        vf,
                        &mut self.batch,
                        &stats.tx,
                        self.tx_wait,
                    ),
                    Link::Loopback if rx_on && !self.rx_broken => {
                        match RxRing::new(rx_queue, mem, neg.mergeable, neg.hdr_len) {
                            Ok(mut ring) => guest_to_guest(
                                tx_queue,
                                &mut ring,
                                mem,
                                neg.offloads,
                                &mut self.batch,
                                &mut self.bufs,
                                (&stats.tx, &stats.rx),
                            ),
                            Err(e) => {
                                error!(
                                    "{}: {e}; queue stopped until the device is reset",
                                    self.rx_label()
                                );
                                self.rx_broken = true;
                                Ok(0)
                            }
                        }
                    }
                    Link::Loopback => {
                        // RX side unusable: the packets are lost, counted on the RX side.
                        self.batch.discard(
                            tx_queue,
                            mem,
                            neg.hdr_len,
                            (&stats.tx, &stats.rx),
                            DropReason::QueueOff,
                        )
                    }
                };
                match result {
                    Ok(n) => progress += n,
                    Err(e) => {
                        error!(
                            "{}: {e}; queue stopped until the device is reset",
                            self.tx_label()
                        );
                        self.tx_broken = true;
                    }
                }
            }

            if rx_on && !self.rx_broken {
                if let Link::Vf(vf) = &mut self.link {
                    match RxRing::new(rx_state.get_queue_mut(), mem, neg.mergeable, neg.hdr_len) {
                        Ok(mut ring) => {
                            let (n, stop) = vf_to_guest(
                                vf,
                                &mut ring,
                                neg.offloads,
                                &mut self.bufs.scratch,
                                &stats.rx,
                                RX_BATCH,
                            );
                            progress += n;
                            self.rx_waiting = stop == RxStop::GuestFull;
                        }
                        Err(e) => {
                            error!(
                                "{}: {e}; queue stopped until the device is reset",
                                self.rx_label()
                            );
                            self.rx_broken = true;
                        }
                    }
                }
            }

            // At most one interrupt per queue and round, and only if the guest wants it.
            if tx_on && needs_notification(tx_state.get_queue(), mem, tx_before) {
                if let Err(e) = tx_state.signal_used_queue() {
                    warn!("{}: cannot signal the guest: {e}", self.tx_label());
                }
            }
            if rx_on && needs_notification(rx_state.get_queue(), mem, rx_before) {
                if let Err(e) = rx_state.signal_used_queue() {
                    warn!("{}: cannot signal the guest: {e}", self.rx_label());
                }
            }

            if progress > 0 {
                if idle_since.take().is_some() {
                    self.spin.hit();
                }
                rounds += 1;
                if rounds >= ROUNDS_PER_RUN {
                    break;
                }
                continue;
            }
            // Idle. Busy-poll a bounded while first: under load the next packets are
            // microseconds away, and sleeping costs a kick, an epoll wake-up and a context
            // switch each time (and makes the frontend kick at all).
            let budget = self.spin.budget();
            if budget > Duration::ZERO {
                let now = Instant::now();
                let since = *idle_since.get_or_insert(now);
                if now.duration_since(since) < budget {
                    std::hint::spin_loop();
                    continue;
                }
            }
            // Ask to be woken, then look once more to close the race with a guest that added
            // work just before notifications were turned on.
            let more_tx = tx_on
                && !self.tx_broken
                && arm(&mut tx_state, mem, &self.tx_label(), &mut self.tx_broken);
            let more_rx = rx_on
                && !self.rx_broken
                && self.rx_waiting
                && arm(&mut rx_state, mem, &self.rx_label(), &mut self.rx_broken);
            if !more_tx && !more_rx {
                self.slept_at = Some(Instant::now());
                self.published_used = [
                    rx_on.then(|| rx_state.get_queue().next_used()),
                    tx_on.then(|| tx_state.get_queue().next_used()),
                ];
                return;
            }
            idle_since = None;
            rounds += 1;
            if rounds >= ROUNDS_PER_RUN {
                break;
            }
        }
        // Budget spent with work left: come back through the epoll loop.
        self.published_used = [
            rx_on.then(|| rx_state.get_queue().next_used()),
            tx_on.then(|| tx_state.get_queue().next_used()),
        ];
        let _ = self.resched.write(1);
    }

    /// Restores the used index of a running ring (`which`: 0 RX, 1 TX) if something other
    /// than a stop or reset moved it since our last run (see `published_used`).
    fn keep_used_index(&self, which: usize, queue: &mut virtio_queue::Queue) {
        if let Some(ours) = self.published_used[which] {
            let theirs = queue.next_used();
            if theirs != ours {
                log::debug!(
                    "{}: used index {theirs} set behind our back (SET_VRING_ADDR racing a batch); keeping {ours}",
                    if which == 0 { self.rx_label() } else { self.tx_label() }
                );
                queue.set_next_used(ours);
            }
        }
    }
}

/// Turns on guest notifications; true if work arrived meanwhile. Also catches a guest that
/// published an impossible available index (more than a ring's worth ahead of us): that queue
/// is broken until the device is reset.
fn arm(
    state: &mut vhost_user_backend::VringState<crate::GuestMemoryAtomicB>,
    mem: &GuestMemoryMmapB,
    label: &str,
    broken: &mut bool,
) -> bool {
    let queue = state.get_queue_mut();
    match queue.enable_notification(mem) {
        Ok(more) => {
            if more {
                if let Ok(avail) = queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
                    let pending = avail.0.wrapping_sub(queue.next_avail());
                    if pending > queue.size() {
                        error!(
                            "{label}: guest published avail index {} with {} pending on a {}-entry ring; queue stopped until reset",
                            avail.0, pending, queue.size()
                        );
                        *broken = true;
                        return false;
                    }
                }
            }
            more
        }
        Err(e) => {
            error!("{label}: {e}; queue stopped until the device is reset");
            *broken = true;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spin_adapts_between_its_bounds() {
        let us = Duration::from_micros;
        let mut s = Spin::new(us(50));
        assert_eq!(s.budget(), us(50));
        for _ in 0..20 {
            s.miss();
        }
        assert_eq!(s.budget(), MIN_SPIN);
        s.hit();
        assert_eq!(s.budget(), us(4));
        for _ in 0..20 {
            s.hit();
        }
        assert_eq!(s.budget(), us(50));
        // Woken soon after sleeping: the spin should have covered it.
        s.miss();
        s.woke_after(us(30));
        assert_eq!(s.budget(), us(50));
        s.woke_after(us(500));
        assert_eq!(s.budget(), us(25));
        // Off stays off.
        let mut off = Spin::new(Duration::ZERO);
        off.hit();
        off.woke_after(Duration::ZERO);
        off.miss();
        assert_eq!(off.budget(), Duration::ZERO);
    }
}
