//! Read-side sections and grace periods: how the control thread learns that no worker still
//! uses a log attachment it has just unpublished.
//!
//! The dirty-log hot path must not write to any cache line that other queue-pair threads
//! write (vhost-user-backend's `RwLock` does, on every `mark_dirty`). So each thread announces
//! "I am inside a section" in its *own* slot (a per-thread sequence counter on its own cache
//! line), and the control thread, after swapping a pointer, waits until every thread that was
//! inside a section at that moment has left it. This is a minimal RCU:
//!
//! - reader: `seq += 1` (odd: inside; a `SeqCst` store, so the pointer load after it cannot
//!   be hoisted above it), load the pointer, use it, `seq += 1` (even: outside);
//! - writer: swap the pointer (`SeqCst`), then for every slot that reads odd, wait until it
//!   changes. A reader that entered after the swap sees the new pointer; one that entered
//!   before is waited for. Waiting only for a *change* (not for "even") means a thread that
//!   keeps entering sections cannot starve the writer.
//!
//! Sections are a few dozen instructions (some `fetch_or`s), so a grace period is over in
//! microseconds unless a reader is preempted inside one.
//!
//! Sections are entered only while dirty logging is on (see `dirty.rs`): with logging off
//! the hot path is one load of a pointer that is almost never written.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// One thread's announcement, alone on its cache line(s) so threads never share one.
#[repr(align(128))]
struct Reader {
    seq: AtomicU64,
}

/// Every thread that ever entered a section and is still alive (dead ones are pruned).
static READERS: Mutex<Vec<Weak<Reader>>> = Mutex::new(Vec::new());
/// Sections entered by threads whose thread-local slot is already destroyed (a write from a
/// thread-local destructor at thread exit): rare, so a shared counter is fine for them.
static ORPHAN_READERS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static ME: Arc<Reader> = register();
}

fn register() -> Arc<Reader> {
    let me = Arc::new(Reader {
        seq: AtomicU64::new(0),
    });
    let mut all = READERS.lock().unwrap_or_else(|e| e.into_inner());
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(&me));
    me
}

/// An open read-side section; leaving it (drop) also happens on unwind, so a grace period
/// never waits forever for a reader that panicked.
enum Section {
    /// This thread's slot, made odd on entry.
    Own(*const Reader),
    /// Already inside a section on this thread (the slot is odd): nothing to do.
    Nested,
    /// This thread's slot is gone (thread exit); counted in `ORPHAN_READERS`.
    Orphan,
}

impl Section {
    fn enter() -> Section {
        ME.try_with(|me| {
            let s = me.seq.load(Ordering::Relaxed);
            if s & 1 == 1 {
                return Section::Nested;
            }
            // SeqCst: ordered before the pointer loads inside the section (Dekker with the
            // `SeqCst` swap and slot loads of `synchronize`).
            me.seq.store(s.wrapping_add(1), Ordering::SeqCst);
            Section::Own(Arc::as_ptr(me))
        })
        .unwrap_or_else(|_| {
            ORPHAN_READERS.fetch_add(1, Ordering::SeqCst);
            Section::Orphan
        })
    }
}

impl Drop for Section {
    fn drop(&mut self) {
        match *self {
            Section::Own(me) => {
                // SAFETY: `me` is this thread's `Reader`, kept alive by the thread-local
                // `ME` until the thread exits; a `Section` is a local of a call running on
                // this thread (it is !Send), so the thread is alive while it exists.
                let me = unsafe { &*me };
                let s = me.seq.load(Ordering::Relaxed);
                me.seq.store(s.wrapping_add(1), Ordering::Release);
            }
            Section::Nested => {}
            Section::Orphan => {
                ORPHAN_READERS.fetch_sub(1, Ordering::Release);
            }
        }
    }
}

/// Runs `f` inside a read-side section: pointers loaded (with `SeqCst`) inside `f` stay
/// valid until `f` returns, because [`synchronize`] waits for it.
pub(crate) fn read<R>(f: impl FnOnce() -> R) -> R {
    let _section = Section::enter();
    f()
}

/// Waits until every section that was running when this was called has ended. Call it
/// after unpublishing a pointer (with a `SeqCst` store or swap) and before freeing what it
/// pointed to. Never call it from inside a section (it would wait for itself).
pub(crate) fn synchronize() {
    std::sync::atomic::fence(Ordering::SeqCst);
    let readers: Vec<Arc<Reader>> = {
        let mut all = READERS.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    };
    for r in &readers {
        let s = r.seq.load(Ordering::SeqCst);
        if s & 1 == 1 {
            wait(|| r.seq.load(Ordering::SeqCst) != s);
        }
    }
    wait(|| ORPHAN_READERS.load(Ordering::SeqCst) == 0);
}

fn wait(mut done: impl FnMut() -> bool) {
    let mut spins = 0u32;
    while !done() {
        if spins < 64 {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

/// Makes every other thread of the process execute a full memory barrier.
///
/// Used after dirty logging is turned on: a worker that wrote guest memory and then saw
/// "logging off" (no section, no barrier on the hot path) may still hold that write in its
/// CPU's store buffer. After this returns, the write is visible, so it lands before the
/// frontend's first pass over guest memory, which starts only after our reply.
/// Asymmetric barrier (membarrier(2)): free for the workers, a few microseconds here.
pub(crate) fn barrier_all_threads() {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let membarrier = |cmd: libc::c_long| {
        // SAFETY: membarrier takes integer arguments only and touches no memory of ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_long,
                0 as libc::c_long,
            )
        };
        rc == 0
    };
    let registered =
        *REGISTERED.get_or_init(|| membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED));
    if registered && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) {
        return;
    }
    if !membarrier(MEMBARRIER_CMD_GLOBAL) {
        log::debug!(
            "membarrier unavailable ({}); relying on the reply's syscall ordering",
            std::io::Error::last_os_error()
        );
    }
}
