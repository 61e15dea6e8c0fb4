//! The fuzz harness of the ring fuzzers (the relay's in vhost-relay's `fuzz` module, the
//! shadow relay's in vdpa/tests/fuzz_shadow.rs): seeded campaigns ([`harness`]) over guest
//! memory with guard pages around every region ([`guarded`]). Test support only.
//!
//! Every campaign is reproducible: iteration `i` of a campaign draws from its own generator
//! seeded by `(VHOST_RELAY_FUZZ_SEED, i)`, and every failure (a panic, a debug-build abort, a
//! SIGSEGV on a guard page, a hang) prints the seed and the iteration. The knobs:
//! - `VHOST_RELAY_FUZZ_SEED`: the campaign seed (default [`DEFAULT_SEED`], printed);
//! - `VHOST_RELAY_FUZZ_ITERS`: iterations per target (default: each target's CI budget);
//! - `VHOST_RELAY_FUZZ_SECS`: stop a target after this many seconds (default 60);
//! - `VHOST_RELAY_FUZZ_ONLY`: run just this iteration (to replay a failure);
//!
//! `scripts/fuzz-rings.sh` runs a longer campaign.

pub mod guarded;
pub mod harness;

pub use guarded::{changed, Guarded, Snap};
pub use harness::{campaign, Rng, DEFAULT_SEED};

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard pages are there: a read one byte before or after a region kills a child
    /// process with SIGSEGV (so the fuzzers' out-of-bounds accesses cannot go unnoticed).
    #[test]
    fn guard_pages_fault() {
        let g = Guarded::<()>::new(&[(0, 4096)]);
        let (host, len) = g.host_ranges()[0];
        for at in [host - 1, host + len] {
            // SAFETY: the child only reads one byte and exits, both async-signal-safe.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork");
            if pid == 0 {
                // SAFETY: deliberately outside the mapping: the point of the test.
                unsafe { std::ptr::read_volatile(at as *const u8) };
                // SAFETY: leaves the child without running the parent's destructors.
                unsafe { libc::_exit(0) };
            }
            let mut status = 0;
            // SAFETY: waits for our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV,
                "a read at {at:#x} (region {host:#x}+{len:#x}) did not fault: status {status:#x}"
            );
        }
    }
}
