//! The campaign loop, the seeded generator and the crash reporters (see the parent module).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

/// The seed when none is given: fixed, so CI runs the same inputs every time.
pub const DEFAULT_SEED: u64 = 0x7668_6f73_7452_6c79;
/// A single input taking longer than this fails its campaign (inputs take milliseconds, in a
/// debug build on a loaded machine); one still running after [`HANG`] aborts the process.
const SLOW: Duration = Duration::from_secs(10);
const HANG: Duration = Duration::from_secs(60);

/// xorshift64* with a splitmix64 seeding: a few lines, good enough to drive mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut z = seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub fn bytes(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.u64() as u8;
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// What each running campaign is doing, for the crash reporters (a SIGSEGV or an abort cannot
/// unwind to the loop that knows the iteration).
const SLOTS: usize = 8;
static NAMES: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static ITERS: [AtomicU64; SLOTS] = [const { AtomicU64::new(u64::MAX) }; SLOTS];
static STARTED_MS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
static SEED: AtomicU64 = AtomicU64::new(DEFAULT_SEED);
static SLOT_NEXT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The campaign slot this thread runs (SLOTS: none): crash reports name only it.
    static MY_SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(SLOTS) };
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Runs `body` for each iteration of campaign `name` (`ci_iters` by default). `body` returns
/// `Err(why)` on a failed check; a failure or panic stops the test with seed and iteration.
/// Returns the number of inputs run.
pub fn campaign(
    name: &'static str,
    ci_iters: u64,
    mut body: impl FnMut(&mut Rng) -> Result<(), String>,
) -> u64 {
    install_reporters();
    let seed = env_u64("VHOST_RELAY_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    SEED.store(seed, Ordering::Relaxed);
    let iters = env_u64("VHOST_RELAY_FUZZ_ITERS").unwrap_or(ci_iters);
    let secs = Duration::from_secs(env_u64("VHOST_RELAY_FUZZ_SECS").unwrap_or(60));
    let only = env_u64("VHOST_RELAY_FUZZ_ONLY");
    let slot = SLOT_NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS;
    // Leaked once per campaign: the crash reporters read names through raw pointers.
    let cname: &'static std::ffi::CStr = Box::leak(
        std::ffi::CString::new(name)
            .unwrap_or_default()
            .into_boxed_c_str(),
    );
    NAMES[slot].store(cname.as_ptr() as usize, Ordering::Relaxed);
    MY_SLOT.with(|s| s.set(slot));
    let start = Instant::now();
    let mut done = 0u64;
    let mut slowest = (Duration::ZERO, 0);
    for i in only.map_or(0..iters, |i| i..i + 1) {
        if start.elapsed() > secs {
            break;
        }
        ITERS[slot].store(i, Ordering::Relaxed);
        STARTED_MS[slot].store(now_ms(), Ordering::Relaxed);
        let mut rng = Rng::new(seed, i);
        let t0 = Instant::now();
        let res = std::panic::catch_unwind(AssertUnwindSafe(|| body(&mut rng)));
        let took = t0.elapsed();
        slowest = slowest.max((took, i));
        let fail = match res {
            Ok(Ok(())) if took > SLOW => Some(format!("one input took {took:?}: a near-hang")),
            Ok(Ok(())) => None,
            Ok(Err(why)) => Some(why),
            Err(p) => Some(panic_text(&p)),
        };
        if let Some(why) = fail {
            ITERS[slot].store(u64::MAX, Ordering::Relaxed);
            panic!(
                "fuzz {name}: FAILED at VHOST_RELAY_FUZZ_SEED={seed:#x} VHOST_RELAY_FUZZ_ONLY={i}: {why}"
            );
        }
        done += 1;
    }
    ITERS[slot].store(u64::MAX, Ordering::Relaxed);
    let t = start.elapsed().as_secs_f64();
    eprintln!(
        "fuzz {name}: seed {seed:#x}: {done} inputs in {t:.1} s ({:.0}/s, slowest {:?} at {})",
        done as f64 / t.max(1e-9),
        slowest.0,
        slowest.1,
    );
    done
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Writes what the campaign of this thread (or, from the watchdog, every campaign) was doing
/// to stderr, with async-signal-safe calls only.
fn report_running(what: &[u8], all: bool) {
    let seed = SEED.load(Ordering::Relaxed);
    let mine = MY_SLOT.with(|s| s.get());
    for slot in 0..SLOTS {
        if !all && slot != mine {
            continue;
        }
        let iter = ITERS[slot].load(Ordering::Relaxed);
        let name = NAMES[slot].load(Ordering::Relaxed);
        if iter == u64::MAX || name == 0 {
            continue;
        }
        // SAFETY: `name` is a leaked, NUL-terminated CString (see `campaign`).
        let name = unsafe { std::ffi::CStr::from_ptr(name as *const libc::c_char) };
        let mut line = [0u8; 256];
        let mut n = 0;
        for part in [
            b"fuzz ".as_slice(),
            name.to_bytes(),
            b": ",
            what,
            b" at VHOST_RELAY_FUZZ_SEED=",
        ] {
            for &b in part {
                if n < line.len() {
                    line[n] = b;
                    n += 1;
                }
            }
        }
        n = put_num(&mut line, n, seed);
        for &b in b" VHOST_RELAY_FUZZ_ONLY=" {
            if n < line.len() {
                line[n] = b;
                n += 1;
            }
        }
        n = put_num(&mut line, n, iter);
        if n < line.len() {
            line[n] = b'\n';
            n += 1;
        }
        // SAFETY: write(2) of our own stack buffer; async-signal-safe.
        unsafe { libc::write(2, line.as_ptr().cast(), n) };
    }
}

/// Decimal `v` into `line` at `n`; returns the new end.
fn put_num(line: &mut [u8], mut n: usize, v: u64) -> usize {
    let mut digits = [0u8; 20];
    let (mut k, mut v) = (0, v);
    loop {
        digits[k] = b'0' + (v % 10) as u8;
        k += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while k > 0 && n < line.len() {
        k -= 1;
        line[n] = digits[k];
        n += 1;
    }
    n
}

extern "C" fn on_fault(sig: libc::c_int) {
    report_running(b"SIGSEGV/SIGBUS (out-of-bounds guest memory access)", false);
    // SAFETY: back to the default action; returning re-runs the faulting access, which then
    // kills the process with the signal, as it would have without us.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}

/// Crash reporters: a fault handler and a panic hook (a debug-build "unsafe precondition"
/// abort runs the hook, then aborts without unwinding), plus a watchdog for hangs.
fn install_reporters() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = epoch();
        for sig in [libc::SIGSEGV, libc::SIGBUS] {
            // SAFETY: installs a handler that only makes async-signal-safe calls.
            unsafe {
                libc::signal(
                    sig,
                    on_fault as extern "C" fn(libc::c_int) as libc::sighandler_t,
                )
            };
        }
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report_running(b"panic (if it aborts, this is where)", false);
            default(info);
        }));
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            for slot in 0..SLOTS {
                let iter = ITERS[slot].load(Ordering::Relaxed);
                let since = STARTED_MS[slot].load(Ordering::Relaxed);
                if iter != u64::MAX && now_ms().saturating_sub(since) > HANG.as_millis() as u64 {
                    report_running(b"HANG (one input took over a minute)", true);
                    std::process::abort();
                }
            }
        });
    });
}
