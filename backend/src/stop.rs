//! Stopping a port's threads from another thread (`ctl remove`, reload, SIGTERM).
//!
//! A port's threads block in `accept`, `recv` on netlink, or a sleep between reconnects;
//! [`Stop`] is an eventfd they wait on beside their own fd, so a stop takes effect at once
//! instead of at the next connection or link event.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What a wait ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Woken {
    /// The fd waited on is readable.
    Ready,
    /// The time ran out.
    TimedOut,
    /// [`Stop::stop`] was called.
    Stopped,
}

/// A stop request, seen by every thread that waits on it.
pub struct Stop {
    requested: AtomicBool,
    event: EventFd,
}

impl Stop {
    pub fn new() -> io::Result<Self> {
        Ok(Stop {
            requested: AtomicBool::new(false),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Asks every waiter to stop; waits already under way end now, later ones at once.
    pub fn stop(&self) {
        self.requested.store(true, Ordering::SeqCst);
        // The eventfd is never read, so it stays readable for every waiter; a failed write
        // (counter full) means it is readable already.
        let _ = self.event.write(1);
    }

    pub fn is_stopped(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Sleeps for `time` unless stopped first; true if stopped.
    pub fn sleep(&self, time: Duration) -> bool {
        self.wait(None, Some(time)) == Woken::Stopped
    }

    /// Waits until `fd` (if any) is readable, `timeout` (if any) passes, or a stop.
    pub fn wait(&self, fd: Option<RawFd>, timeout: Option<Duration>) -> Woken {
        let mut fds = [
            libc::pollfd {
                fd: self.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: fd.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        loop {
            if self.is_stopped() {
                return Woken::Stopped;
            }
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call; a
            // negative fd is ignored by poll.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if self.is_stopped() {
                return Woken::Stopped;
            }
            // An error or hang-up on `fd` counts as ready: the caller's own call reports it.
            return if n > 0 && fds[1].revents != 0 {
                Woken::Ready
            } else if n == 0 {
                Woken::TimedOut
            } else {
                // poll failed (EINVAL/ENOMEM): let the caller try its call rather than spin.
                Woken::Ready
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_stop_ends_a_wait_under_way_and_every_later_one() {
        let stop = Arc::new(Stop::new().unwrap());
        let (a, _b) = UnixStream::pair().unwrap();
        let waiter = {
            let stop = stop.clone();
            std::thread::spawn(move || stop.wait(Some(a.as_raw_fd()), None))
        };
        std::thread::sleep(Duration::from_millis(50));
        stop.stop();
        assert_eq!(waiter.join().unwrap(), Woken::Stopped);
        let t = Instant::now();
        assert!(stop.sleep(Duration::from_secs(10)));
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_readable_fd_and_a_timeout_are_told_apart() {
        let stop = Stop::new().unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let short = Some(Duration::from_millis(10));
        assert_eq!(stop.wait(Some(a.as_raw_fd()), short), Woken::TimedOut);
        std::io::Write::write_all(&mut b, b"x").unwrap();
        assert_eq!(stop.wait(Some(a.as_raw_fd()), short), Woken::Ready);
        assert!(!stop.sleep(Duration::from_millis(1)));
    }
}
