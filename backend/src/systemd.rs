//! systemd's two conventions for services, without libsystemd: sockets passed by socket
//! activation (`sd_listen_fds_with_names` semantics) and state notification (`sd_notify`).
//!
//! Both are small, fixed wire formats (environment variables and one datagram); a crate for
//! them would bring more than it saves.

use std::os::unix::io::RawFd;

use log::warn;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// More than any unit passes; a larger `LISTEN_FDS` is a mistake, not a request.
const MAX_LISTEN_FDS: usize = 4096;

/// Sockets passed by socket activation, each with its name (`FileDescriptorName=`, or the
/// socket unit's name by default). A port named like a passed socket serves it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenFds {
    fds: Vec<(String, RawFd)>,
}

impl ListenFds {
    /// Takes the sockets systemd passed to this process, as `sd_listen_fds_with_names(1)`
    /// does: nothing unless `LISTEN_PID` is this process (the variables were meant for a
    /// parent otherwise); the variables are unset so that nothing started later sees them,
    /// and the fds are made close-on-exec. Call it before any thread starts (it changes the
    /// environment).
    pub fn take() -> Result<Self, String> {
        let var = |k| std::env::var(k).ok();
        let taken = Self::parse(
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        );
        for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(k);
        }
        let taken = taken?;
        for &(_, fd) in &taken.fds {
            // SAFETY: F_SETFD on an fd number: no memory is touched; an fd that is not open
            // fails with EBADF, reported below.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
                return Err(format!(
                    "LISTEN_FDS: fd {fd} is not open: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(taken)
    }

    /// The fds the variables describe, for the process `my_pid`.
    pub(crate) fn parse(
        pid: Option<&str>,
        count: Option<&str>,
        names: Option<&str>,
        my_pid: u32,
    ) -> Result<Self, String> {
        let (Some(pid), Some(count)) = (pid, count) else {
            return Ok(Self::default());
        };
        match pid.parse::<u32>() {
            Ok(p) if p == my_pid => {}
            Ok(_) => return Ok(Self::default()),
            Err(_) => return Err(format!("LISTEN_PID '{pid}' is not a process id")),
        }
        let n: usize = match count.parse() {
            Ok(n) if n <= MAX_LISTEN_FDS => n,
            _ => return Err(format!("LISTEN_FDS '{count}' is not a number of fds")),
        };
        let names: Vec<String> = match names {
            Some(list) => list.split(':').map(str::to_string).collect(),
            // sd_listen_fds_with_names() calls every fd "unknown" when no names are given.
            None => vec!["unknown".to_string(); n],
        };
        if names.len() != n {
            return Err(format!(
                "LISTEN_FDNAMES names {} fds but LISTEN_FDS is {n}",
                names.len()
            ));
        }
        let fds = names.into_iter().zip(LISTEN_FDS_START..).collect();
        Ok(ListenFds { fds })
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The fd passed under `name` (the first, if systemd passed several under it).
    pub fn by_name(&self, name: &str) -> Option<RawFd> {
        self.fds.iter().find(|(n, _)| n == name).map(|&(_, fd)| fd)
    }

    /// Every passed fd with its name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, RawFd)> {
        self.fds.iter().map(|(n, fd)| (n.as_str(), *fd))
    }

    /// The names, for error messages: "a, b".
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.fds.iter().map(|(n, _)| n.as_str()).collect();
        names.join(", ")
    }
}

/// Whether a service manager listens for notifications (`NOTIFY_SOCKET` is set).
pub fn has_manager() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager when there is
/// one (`NOTIFY_SOCKET` set); false if it could not be sent. The variable is kept, so that
/// reloads and the stop can notify too.
pub fn notify(state: &str) -> bool {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    match send(&addr.to_string_lossy(), state) {
        Ok(()) => true,
        Err(e) => {
            warn!(
                "cannot notify the service manager at {}: {e}",
                addr.to_string_lossy()
            );
            false
        }
    }
}

/// One datagram to the notification socket: a path, or `@name` for an abstract socket.
fn send(addr: &str, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let socket = UnixDatagram::unbound()?;
    let sent = match addr.strip_prefix('@') {
        Some(abstract_name) => {
            let to = SocketAddr::from_abstract_name(abstract_name.as_bytes())?;
            socket.send_to_addr(state.as_bytes(), &to)?
        }
        None if addr.starts_with('/') => socket.send_to(state.as_bytes(), addr)?,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "only unix socket addresses (a path or @name) are supported",
            ))
        }
    };
    if sent != state.len() {
        return Err(std::io::Error::other("the message was cut short"));
    }
    Ok(())
}

/// READY=1: every port listens, connects or waits for its device; `status` says how many.
pub fn notify_ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// RELOADING=1 with the time it began, as `Type=notify-reload` requires (and `Type=notify`
/// accepts); `notify_ready` ends it.
pub fn notify_reloading() {
    notify(&format!(
        "RELOADING=1\nSTATUS=reloading\nMONOTONIC_USEC={}",
        monotonic_usec()
    ));
}

/// STOPPING=1: the stop has begun.
pub fn notify_stopping() {
    notify("STOPPING=1\nSTATUS=stopping");
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC with.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pid: &str, n: &str, names: Option<&str>) -> Result<ListenFds, String> {
        ListenFds::parse(Some(pid), Some(n), names, 42)
    }

    #[test]
    fn names_map_to_fds_from_3() {
        let fds = parse("42", "2", Some("vm1:vm2")).unwrap();
        assert_eq!(fds.by_name("vm1"), Some(3));
        assert_eq!(fds.by_name("vm2"), Some(4));
        assert_eq!(fds.by_name("vm3"), None);
        assert_eq!(fds.names(), "vm1, vm2");
    }

    #[test]
    fn variables_for_another_process_or_absent_pass_nothing() {
        assert!(parse("41", "2", Some("a:b")).unwrap().is_empty());
        assert!(ListenFds::parse(None, Some("1"), None, 42)
            .unwrap()
            .is_empty());
        assert!(ListenFds::parse(Some("42"), None, None, 42)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn unnamed_fds_are_unknown() {
        let fds = parse("42", "1", None).unwrap();
        assert_eq!(fds.by_name("unknown"), Some(3));
    }

    #[test]
    fn malformed_variables_are_errors() {
        assert!(parse("x", "1", None).unwrap_err().contains("LISTEN_PID"));
        assert!(parse("42", "-1", None).unwrap_err().contains("LISTEN_FDS"));
        assert!(parse("42", "99999", None)
            .unwrap_err()
            .contains("LISTEN_FDS"));
        let e = parse("42", "2", Some("only-one")).unwrap_err();
        assert!(e.contains("names 1 fds but LISTEN_FDS is 2"), "{e}");
    }

    #[test]
    fn notification_reaches_a_path_socket() {
        let path = std::env::temp_dir().join(format!("vhost-relay-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let sent = send(path.to_str().unwrap(), "READY=1\nSTATUS=x");
        let _ = std::fs::remove_file(&path);
        sent.unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");
    }

    #[test]
    fn notification_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let name = format!("vhost-relay-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send(&format!("@{name}"), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn a_relative_or_vsock_address_is_refused() {
        assert!(send("vsock:2:1234", "READY=1").is_err());
        assert!(send("relative/path", "READY=1").is_err());
    }
}
