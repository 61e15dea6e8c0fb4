//! The service manager's end of `sd_notify`: a datagram socket a test points NOTIFY_SOCKET
//! at, reading the `KEY=VALUE` messages vhost-relay sends as systemd would receive them.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct NotifySocket {
    socket: UnixDatagram,
    /// What to put in NOTIFY_SOCKET: a path, or `@name` for an abstract socket.
    pub address: String,
}

impl NotifySocket {
    /// A socket at `path` (removed first if a stale one is there).
    pub fn bind(path: &Path) -> std::io::Result<NotifySocket> {
        let _ = std::fs::remove_file(path);
        let socket = UnixDatagram::bind(path)?;
        Ok(NotifySocket {
            socket,
            address: path.display().to_string(),
        })
    }

    /// An abstract socket (`@name`, as systemd itself uses), unique to this process and `tag`.
    pub fn bind_abstract(tag: &str) -> std::io::Result<NotifySocket> {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("vhost-relay-test-{tag}-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let socket = UnixDatagram::bind_addr(&addr)?;
        Ok(NotifySocket {
            socket,
            address: format!("@{name}"),
        })
    }

    /// The path a path socket is at (for tools that take one).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.address)
    }

    /// The next message within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .ok()?;
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Waits up to `timeout` for a message that has the line `line` (e.g. `READY=1`): Ok with
    /// it and the messages before it, or Err with every message that came.
    pub fn wait_for(
        &self,
        line: &str,
        timeout: Duration,
    ) -> Result<(String, Vec<String>), Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(m) if m.lines().any(|l| l == line) => return Ok((m, before)),
                Some(m) => before.push(m),
                None => break,
            }
        }
        Err(before)
    }
}

/// The value of `KEY=` in a notification message.
pub fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}
