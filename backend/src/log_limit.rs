//! Rate-limited logging for the data path.
//!
//! A guest can produce a bad descriptor per packet, millions a second; one log line per bad
//! packet would turn a misbehaving guest into a disk-filling one. Each call site logs at most
//! once a second and says how many lines it held back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// One call site's state: the second it last logged in, and lines held back since.
pub struct Limiter {
    last: AtomicU64,
    held: AtomicU64,
}

impl Limiter {
    pub const fn new() -> Self {
        Limiter {
            last: AtomicU64::new(u64::MAX),
            held: AtomicU64::new(0),
        }
    }

    /// Some(lines held back) if this call may log now, None if it must stay quiet.
    pub fn check(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_secs();
        if self.last.swap(now, Ordering::Relaxed) == now {
            self.held.fetch_add(1, Ordering::Relaxed);
            None
        } else {
            Some(self.held.swap(0, Ordering::Relaxed))
        }
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `log!` at `$level`, at most once a second per call site (shared by every thread that
/// passes there), saying how many lines it held back.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)*) => {{
        static LIMITER: $crate::log_limit::Limiter = $crate::log_limit::Limiter::new();
        if let Some(held) = LIMITER.check() {
            if held > 0 {
                log::log!($level, "{} (and {} more like it)", format_args!($($arg)*), held);
            } else {
                log::log!($level, $($arg)*);
            }
        }
    }};
}

/// `warn!`, at most once a second per call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)*) => {
        $crate::log_limited!(log::Level::Warn, $($arg)*)
    };
}

/// `error!`, at most once a second per call site.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)*) => {
        $crate::log_limited!(log::Level::Error, $($arg)*)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_within_a_second() {
        let l = Limiter::new();
        assert_eq!(l.check(), Some(0));
        assert_eq!(l.check(), None);
        assert_eq!(l.check(), None);
        assert_eq!(l.held.load(Ordering::Relaxed), 2);
    }
}
