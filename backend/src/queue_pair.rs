//! One queue pair: the unit of work of one worker thread.
//!
//! A pair is the guest's RX queue (virtqueue 2i), its TX queue (2i+1) and, in relay mode, the
//! VF socket they are bridged to. Its worker is woken by a TX kick, an RX kick (the guest added
//! buffers we were waiting for), the VF socket turning readable, or its own reschedule event,
//! and then moves packets both ways until there is nothing left or its budget is spent. The
//! budget keeps one round short so the frontend thread (which needs the vring locks for
//! GET_VRING_BASE and friends) is never starved; when it runs out the worker pokes its
//! reschedule eventfd, so the epoll loop comes straight back.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{error, warn};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::offload::RxOffloads;
use crate::rx::{vf_to_guest, RxRing, RxStop};
use crate::stats::{DropReason, PairStats, QueueStats};
use crate::tx::{guest_to_guest, guest_to_vf, PacketBufs, TxBatch, TxError};
use crate::vf::{VfSocket, VfStats};
use crate::vhost_user_backend_workarounds::UsedIndexKeeper;
use crate::GuestMemoryMmapB;
use virtq::{disable_kicks, enable_kicks, needs_notification, RingKind};

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
    /// Split or packed (VIRTIO_F_RING_PACKED) virtqueues.
    pub ring: RingKind,
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
    /// The guest's RX queue (virtqueue 2 * index), as this pair's runs see it.
    rx: QueueState,
    /// The guest's TX queue (virtqueue 2 * index + 1).
    tx: QueueState,
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
}

/// The vring state behind a queue's lock, as a run holds it.
type RingState = VringState<crate::GuestMemoryAtomicB>;

/// What a run's TX and RX rounds work with besides the queues.
#[derive(Clone, Copy)]
struct RunInputs<'a> {
    mem: &'a GuestMemoryMmapB,
    neg: Negotiated,
    stats: &'a PairStats,
}

/// One direction of a pair: what its runs know of the queue besides the ring itself.
struct QueueState {
    /// "port P queue Q (rx|tx)", for logs.
    label: String,
    /// A ring or guest error stopped the queue until the device is reset or the frontend
    /// sets the queue up again (see [`QueueState::mark_broken`]).
    broken: bool,
    /// Served by the current run: set up, enabled and not broken when the run began.
    on: bool,
    /// The worker waits on the guest for this queue, so it sleeps with the guest's
    /// notifications on: always for TX (its packets come from the guest), for RX only while
    /// the guest is out of buffers with VF frames still waiting.
    waiting: bool,
    /// The used index this worker last published, put back if vhost-user-backend's
    /// SET_VRING_ADDR rolls it back under traffic (see [`UsedIndexKeeper`]).
    published_used: UsedIndexKeeper,
    /// Set up afresh and not served yet: its first run (vhost-user-backend runs a queue's
    /// handler once when it registers the queue, kick or not) signals the guest whatever
    /// the suppression fields say. A backend that died between publishing used
    /// entries and signalling left the guest waiting for an interrupt the new one would
    /// otherwise never send (its used_event is already behind the restored base, so no
    /// batch crosses it): the guest's TX queue stays stopped for good. Linux vhost does the
    /// same with `signalled_used_valid`; a spurious interrupt costs the guest one look.
    fresh: bool,
}

impl QueueState {
    fn new(port: &str, queue: usize, waiting: bool) -> Self {
        let dir = if queue.is_multiple_of(2) { "rx" } else { "tx" };
        QueueState {
            label: format!("port {port} queue {queue} ({dir})"),
            broken: false,
            on: false,
            waiting,
            published_used: UsedIndexKeeper::default(),
            fresh: true,
        }
    }

    /// Polled now: on when the run began and not broken since.
    fn active(&self) -> bool {
        self.on && !self.broken
    }

    /// The one place a queue is marked broken: logged, and left alone until the device is
    /// reset or the queue set up again ([`QueuePair::forget_queue`]).
    fn mark_broken(&mut self, why: impl std::fmt::Display) {
        error!(
            "{}: {why}; queue stopped until the device is reset",
            self.label
        );
        self.broken = true;
    }

    /// Forgets what a previous connection or set-up of the queue left (but `waiting`).
    fn forget(&mut self) {
        self.broken = false;
        self.published_used.forget();
        self.fresh = true;
    }

    /// Starts a run: decides whether the queue is served, and keeps its used index.
    fn begin(&mut self, state: &mut RingState, kind: RingKind) {
        self.on = !self.broken && state.get_queue().ready() && state.is_enabled();
        if !self.on {
            return;
        }
        let queue = state.get_queue_mut();
        if self.fresh && kind == RingKind::Packed {
            // A packed queue starts with its used position where SET_VRING_BASE put the avail
            // one (nothing is in flight at a start; DPDK reads the base the same way), not
            // where vhost-user-backend's SET_VRING_ADDR put it: that read the split used
            // ring's index, which here is our event area's flags.
            queue.set_next_used(queue.next_avail());
        }
        self.published_used.restore(queue, &self.label);
    }

    /// Ends a run: remembers the used index it published (see `published_used`).
    fn end(&mut self, state: &RingState) {
        self.published_used
            .published(self.on.then(|| state.get_queue().next_used()));
    }

    /// We poll from here on: asks the guest not to kick us (without event idx this sets
    /// VRING_USED_F_NO_NOTIFY; with it, the avail event simply stays behind). A frontend
    /// that polls its own side then never makes a syscall for us.
    fn quiet(&self, state: &mut RingState, mem: &GuestMemoryMmapB, kind: RingKind) {
        if self.active() && self.waiting {
            let _ = disable_kicks(state.get_queue_mut(), mem, kind);
        }
    }

    /// Signals the guest if the round published used entries it wants to hear of, or the
    /// queue is `fresh` (at most one interrupt per queue and round); `used_before` is the
    /// used index before the round.
    fn notify(&mut self, state: &RingState, run: RunInputs, used_before: u16) {
        if !self.on {
            return;
        }
        let fresh = std::mem::take(&mut self.fresh);
        if fresh || needs_notification(state.get_queue(), run.mem, used_before, run.neg.ring) {
            if let Err(e) = state.signal_used_queue() {
                warn!("{}: cannot signal the guest: {e}", self.label);
            }
        }
    }

    /// Before sleeping: turns the guest's notifications on if we wait on it; true if work
    /// arrived meanwhile. Also catches a guest that published an impossible available index
    /// (more than a ring's worth ahead of us): that queue is broken until the device is reset.
    fn arm(&mut self, state: &mut RingState, mem: &GuestMemoryMmapB, kind: RingKind) -> bool {
        if !self.active() || !self.waiting {
            return false;
        }
        let queue = state.get_queue_mut();
        match enable_kicks(queue, mem, kind) {
            Ok(false) => false,
            Ok(true) if kind == RingKind::Packed => true,
            Ok(true) => match impossible_avail(queue, mem) {
                Some(why) => {
                    self.mark_broken(why);
                    false
                }
                None => true,
            },
            Err(e) => {
                self.mark_broken(e);
                false
            }
        }
    }
}

/// Adds the time since `start` to `stats`'s busy time if the work in it `moved` packets;
/// returns when that was (`start` if not counted), where the next part of the round starts.
/// Only rounds that moved something count: the spin of an idle worker is not the cost of a
/// packet (testpmd's `--record-core-cycles` counts the same way, for the bench's peer).
fn busy_since(start: Instant, moved: bool, stats: &QueueStats) -> Instant {
    if !moved {
        return start;
    }
    let now = Instant::now();
    stats.add_busy(now - start);
    now
}

/// Why `queue`'s available index cannot be right, if it cannot: more than a ring's worth of
/// entries pending.
fn impossible_avail(queue: &Queue, mem: &GuestMemoryMmapB) -> Option<String> {
    let avail = queue.avail_idx(mem, Ordering::Acquire).ok()?.0;
    let pending = avail.wrapping_sub(queue.next_avail());
    (pending > queue.size()).then(|| {
        format!(
            "guest published avail index {avail} with {pending} pending on a {}-entry ring",
            queue.size()
        )
    })
}

/// How long an idle worker spins before it sleeps, adapted to the traffic. What decides is
/// how long the worker then slept: woken again within the longest spin, it would have done
/// better to keep polling (a kick and a wake-up cost more than the spin), so the next spin
/// is the longest again; asleep for longer, the spin was wasted and halves (down to
/// `MIN_SPIN`). Work found while spinning also restores it. Steady traffic with short gaps
/// so keeps the worker polling and the frontend free of kicks; a ping answered through the
/// guest is caught by the spin after the request; sparse traffic costs at most one longest
/// spin per packet.
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

    /// Work arrived while spinning, or soon after the spin gave up: back to the longest
    /// spin. Not a doubling: a request/response flow (a ping through the guest) alternates
    /// a short gap (the guest's answer, microseconds away) with a long one (the next
    /// request); doubling on the one and halving on the other kept the spin at a few
    /// microseconds, too short to catch the answer, so every packet paid a wake-up.
    /// Halving on the long gap alone leaves half the bound, which still catches it.
    pub fn hit(&mut self) {
        self.current = self.max;
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

    /// Idle since `idle_since` (set to `now` if `None`): whether to poll on rather than
    /// sleep. Under load the next packets are microseconds away, and sleeping costs a kick,
    /// an epoll wake-up and a context switch each time (and makes the frontend kick at all).
    /// `now` is the caller's clock reading (the start of the round that found nothing).
    pub fn keep_polling(&self, idle_since: &mut Option<Instant>, now: Instant) -> bool {
        let budget = self.budget();
        if budget == Duration::ZERO {
            return false;
        }
        let since = *idle_since.get_or_insert(now);
        now.duration_since(since) < budget
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
            rx: QueueState::new(port, 2 * index, false),
            tx: QueueState::new(port, 2 * index + 1, true),
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
        })
    }

    /// Sets the longest busy-poll (zero: sleep as soon as idle).
    pub fn set_busy_poll(&mut self, max: Duration) {
        self.spin = Spin::new(max);
    }

    /// Forgets what a previous connection marked broken.
    pub fn reset(&mut self) {
        self.forget_queue(0);
        self.forget_queue(1);
        self.pinned = false;
        self.slept_at = None;
        let _ = self.resched.read();
    }

    /// Forgets what virtqueue `queue` of this pair was marked (broken, waiting, its used
    /// index, a half-sent batch): the frontend stopped it (GET_VRING_BASE) or the device is
    /// reset, and it starts afresh when the frontend sets it up again (a guest reboot).
    pub fn forget_queue(&mut self, queue: usize) {
        if queue.is_multiple_of(2) {
            self.rx.forget();
            self.rx.waiting = false;
        } else {
            self.tx.forget();
            self.batch.forget();
        }
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

    /// Adds what the VF socket lost since the last call to the pair's drops (see
    /// `add_vf_drops`). Called on the worker thread (the counters' only writer).
    pub fn count_vf_drops(&mut self, stats: &PairStats) {
        let _ = self.counters_timer.wait();
        let Link::Vf(vf) = &self.link else { return };
        let now = vf.stats();
        let was = std::mem::replace(&mut self.vf_counted, now);
        add_vf_drops(stats, &was, &now);
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

    /// Moves packets both ways until idle or out of budget: rounds of a TX batch, an RX
    /// batch and the guest's interrupts; when idle, a spin, then notifications armed and
    /// sleep. Out of budget with work left, the reschedule event brings the worker back.
    pub fn run(
        &mut self,
        rx_vring: &VringRwLock<crate::GuestMemoryAtomicB>,
        tx_vring: &VringRwLock<crate::GuestMemoryAtomicB>,
        mem: &GuestMemoryMmapB,
        neg: Negotiated,
        stats: &PairStats,
    ) {
        self.wake();
        let mut rx_state = rx_vring.get_mut();
        let mut tx_state = tx_vring.get_mut();
        let run = RunInputs { mem, neg, stats };
        self.begin(&mut rx_state, &mut tx_state, run);

        let mut rounds = 0usize;
        let mut idle_since: Option<Instant> = None;
        let work_left = loop {
            let tx_before = tx_state.get_queue().next_used();
            let rx_before = rx_state.get_queue().next_used();
            let start = Instant::now();
            let (tx_queue, rx_queue) = (tx_state.get_queue_mut(), rx_state.get_queue_mut());
            let mut progress = self.tx_round(tx_queue, rx_queue, run);
            self.tx.notify(&tx_state, run, tx_before);
            let tx_done = busy_since(start, progress > 0, &stats.tx);
            progress += self.rx_round(rx_state.get_queue_mut(), run);
            self.rx.notify(&rx_state, run, rx_before);
            // Loopback fills the RX queue in its TX round: what it delivered shows as the
            // used index moving, and the signal for it is this half's time.
            let rx_moved = rx_state.get_queue().next_used() != rx_before;
            busy_since(tx_done, rx_moved, &stats.rx);

            if progress > 0 {
                if idle_since.take().is_some() {
                    self.spin.hit();
                }
            } else {
                // The round's start serves as the clock reading: an idle round reads the
                // clock once, not twice.
                if self.spin.keep_polling(&mut idle_since, start) {
                    std::hint::spin_loop();
                    continue;
                }
                // Ask to be woken, then look once more to close the race with a guest that
                // added work just before notifications were turned on.
                let more_tx = self.tx.arm(&mut tx_state, mem, neg.ring);
                let more_rx = self.rx.arm(&mut rx_state, mem, neg.ring);
                if !more_tx && !more_rx {
                    break false;
                }
                idle_since = None;
            }
            rounds += 1;
            if rounds >= ROUNDS_PER_RUN {
                break true;
            }
        };
        self.rx.end(&rx_state);
        self.tx.end(&tx_state);
        if work_left {
            // Budget spent with work left: come back through the epoll loop.
            let _ = self.resched.write(1);
        } else {
            self.slept_at = Some(Instant::now());
        }
    }

    /// A run starts: pins the thread (once per connection), takes the reschedule event and
    /// tells the spin how long the worker slept.
    fn wake(&mut self) {
        if !self.pinned {
            self.pin();
        }
        let _ = self.resched.read();
        if let Some(t) = self.slept_at.take() {
            self.spin.woke_after(t.elapsed());
        }
    }

    /// Decides which queues the run serves, drops what waits for an RX queue that is not
    /// served, and turns the guest's kicks off while we poll.
    fn begin(&mut self, rx_state: &mut RingState, tx_state: &mut RingState, run: RunInputs) {
        let RunInputs { mem, neg, stats } = run;
        self.rx.begin(rx_state, neg.ring);
        self.tx.begin(tx_state, neg.ring);
        log::trace!(
            "port {} pair {}: run (rx {}, tx {})",
            self.port,
            self.index,
            if self.rx.on { "on" } else { "off" },
            if self.tx.on { "on" } else { "off" }
        );
        if !self.rx.on {
            // Nobody to deliver to: don't let stale frames pile up for a later guest.
            if let Link::Vf(vf) = &mut self.link {
                let dropped = vf.rx_batch(usize::MAX, |_, _| true);
                stats.rx.add_drops(DropReason::QueueOff, dropped as u64);
            }
        }
        self.tx.quiet(tx_state, mem, neg.ring);
        self.rx.quiet(rx_state, mem, neg.ring);
    }

    /// One TX batch from the guest to where the link takes it; returns the chains consumed.
    fn tx_round(&mut self, tx_queue: &mut Queue, rx_queue: &mut Queue, run: RunInputs) -> usize {
        if !self.tx.active() {
            return 0;
        }
        let RunInputs { mem, neg, stats } = run;
        self.batch.set_ring_kind(neg.ring);
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
            Link::Loopback => self.loopback(tx_queue, rx_queue, run),
        };
        result.unwrap_or_else(|e| {
            self.tx.mark_broken(e);
            0
        })
    }

    /// Loopback's TX round: the guest's packets back into its RX queue, or lost (counted on
    /// the RX side) while that is not served.
    fn loopback(
        &mut self,
        tx_queue: &mut Queue,
        rx_queue: &mut Queue,
        run: RunInputs,
    ) -> Result<usize, TxError> {
        let RunInputs { mem, neg, stats } = run;
        if self.rx.active() {
            match RxRing::new(rx_queue, mem, neg.ring, neg.mergeable, neg.hdr_len) {
                Ok(mut ring) => {
                    return guest_to_guest(
                        tx_queue,
                        &mut ring,
                        mem,
                        neg.offloads,
                        &mut self.batch,
                        &mut self.bufs,
                        (&stats.tx, &stats.rx),
                    )
                }
                Err(e) => {
                    self.rx.mark_broken(e);
                    return Ok(0);
                }
            }
        }
        self.batch.discard(
            tx_queue,
            mem,
            neg.hdr_len,
            (&stats.tx, &stats.rx),
            DropReason::QueueOff,
        )
    }

    /// One RX batch from the VF into the guest (loopback's RX is filled by its TX round);
    /// returns the frames consumed.
    fn rx_round(&mut self, rx_queue: &mut Queue, run: RunInputs) -> usize {
        if !self.rx.active() {
            return 0;
        }
        let RunInputs { mem, neg, stats } = run;
        let Link::Vf(vf) = &mut self.link else {
            return 0;
        };
        match RxRing::new(rx_queue, mem, neg.ring, neg.mergeable, neg.hdr_len) {
            Ok(mut ring) => {
                let (n, stop) = vf_to_guest(
                    vf,
                    &mut ring,
                    neg.offloads,
                    &mut self.bufs.scratch,
                    &stats.rx,
                    RX_BATCH,
                );
                self.rx.waiting = stop == RxStop::GuestFull;
                n
            }
            Err(e) => {
                self.rx.mark_broken(e);
                0
            }
        }
    }
}

/// Adds what a VF socket lost between two readings of its counters to the pair's drops:
/// receive ring overflows ([`DropReason::Kernel`]), truncated or impossible frames
/// ([`DropReason::KernelTruncated`]), frames flushed before the socket joined its fanout
/// group ([`DropReason::BeforeFanout`]) and transmit descriptors the kernel rejected
/// ([`DropReason::VfRefused`]). The socket's other drop counters (`tx_dropped`, the rest of
/// `tx_invalid`) count what a send already reported, and [`guest_to_vf`] counted then.
fn add_vf_drops(stats: &PairStats, was: &VfStats, now: &VfStats) {
    let truncated = |s: &VfStats| s.rx_truncated + s.rx_invalid + s.rx_copy_failed;
    let delta = |a: u64, b: u64| a.saturating_sub(b);
    stats.rx.add_drops(
        DropReason::Kernel,
        delta(now.kernel_rx_drops, was.kernel_rx_drops),
    );
    stats.rx.add_drops(
        DropReason::KernelTruncated,
        delta(truncated(now), truncated(was)),
    );
    stats.rx.add_drops(
        DropReason::BeforeFanout,
        delta(now.rx_flushed, was.rx_flushed),
    );
    stats.tx.add_drops(
        DropReason::VfRefused,
        delta(now.kernel_tx_invalid, was.kernel_tx_invalid),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vf_drop_counter_reaches_the_pair() {
        let stats = PairStats::default();
        let was = VfStats {
            kernel_rx_drops: 1,
            rx_truncated: 1,
            rx_flushed: 1,
            kernel_tx_invalid: 1,
            ..VfStats::default()
        };
        let now = VfStats {
            kernel_rx_drops: 4,
            rx_truncated: 2,
            rx_invalid: 1,
            rx_copy_failed: 1,
            rx_flushed: 3,
            kernel_tx_invalid: 2,
            ..VfStats::default()
        };
        add_vf_drops(&stats, &was, &now);
        let (rx, tx) = (stats.rx.snapshot(), stats.tx.snapshot());
        assert_eq!(rx.dropped(DropReason::Kernel), 3);
        assert_eq!(rx.dropped(DropReason::KernelTruncated), 3);
        assert_eq!(rx.dropped(DropReason::BeforeFanout), 2);
        assert_eq!(rx.drops, 8);
        assert_eq!(tx.dropped(DropReason::VfRefused), 1);
        assert_eq!(tx.drops, 1);
    }

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
        assert_eq!(s.budget(), us(50), "a hit restores the longest spin");
        // Request and response: a long gap then a short one, over and over. The spin
        // stays long enough for the short one.
        for _ in 0..20 {
            s.woke_after(us(10_000));
            assert_eq!(s.budget(), us(25));
            s.woke_after(us(20));
            assert_eq!(s.budget(), us(50));
        }
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
