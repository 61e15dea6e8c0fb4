//! What to serve: ports from the command line or a TOML file, checked before anything starts.
//!
//! A config file holds one `[[port]]` table per port:
//!
//! ```toml
//! [[port]]
//! name = "vm1"                          # optional; defaults to the socket file's stem
//! socket = "/run/vhost-relay/vm1.sock"  # or: fd = 3 (an inherited listening socket)
//! vf = "enp3s0f0v1"                     # or: loopback = true, or: vdpa = "/dev/vhost-vdpa-0"
//! queues = 2                            # queue pairs; QEMU's -netdev vhost-user,queues=N
//! client = false                        # true: QEMU listens, we connect and reconnect
//! cpus = "2-3"                          # optional: pin queue pair i to the i-th cpu listed
//! busy_poll_us = 50                      # optional: longest busy-poll of an idle pair (0: off)
//! vf_mode = "auto"                      # optional: af-packet (default), af-xdp or auto
//! vf_tx_wait_us = 2000                  # optional: longest stall of a full VF send queue (0: drop)
//! socket_group = "libvirt-qemu"         # optional: group of the socket we create
//! socket_mode = "0660"                  # optional: its permission bits (octal)
//! ```
//!
//! Under socket activation (systemd's `LISTEN_FDS`), a port with neither `socket` nor `fd`
//! serves the passed socket named like the port (`FileDescriptorName=` in the socket unit).
//!
//! `socket_group` and `socket_mode` may also stand at the top of the file, before the first
//! `[[port]]`: they then apply to every listening port that does not set its own.
//! `metrics_listen = "127.0.0.1:9100"` at the top serves Prometheus metrics there (as
//! `--metrics-listen`, which wins over it).
//!
//! Every mistake is reported with the file, the port and the field, so an operator can fix
//! it from the one line the program prints.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device::MAX_QUEUE_PAIRS;
use crate::systemd::ListenFds;
use crate::vf::VfMode;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("bad cpu list '{list}': {message}")]
    CpuList { list: String, message: String },
}

/// How the port meets its frontend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SocketMode {
    /// We listen on a path; QEMU connects (`-chardev socket,path=...`).
    Listen(PathBuf),
    /// QEMU listens (`server=on,reconnect-ms=...`); we connect and reconnect.
    Connect(PathBuf),
    /// An already listening socket handed over by libvirt or systemd.
    Inherited(RawFd),
}

/// Where the guest's packets go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkConfig {
    Vf(String),
    Loopback,
    /// The guest's rings are handed to a kernel vhost-vdpa device (docs/vdpa.md).
    Vdpa(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    pub name: String,
    pub socket: SocketMode,
    pub link: LinkConfig,
    /// Queue pairs.
    pub queues: usize,
    /// CPU for each queue pair's worker, if pinned.
    pub cpus: Vec<usize>,
    /// Longest busy-poll of an idle queue pair before it sleeps on its eventfds.
    pub busy_poll: std::time::Duration,
    /// Socket kind on the VF (ignored for loopback ports).
    pub vf_mode: VfMode,
    /// How long a full VF send queue may take nothing before its packets are dropped.
    pub vf_tx_wait: std::time::Duration,
    /// Owner group and permissions of the socket file we create (listening ports only).
    pub socket_access: SocketAccess,
}

/// Who may connect to a socket file we create: QEMU started by libvirt runs as
/// `libvirt-qemu`, not as the user that started us.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Group to give the socket file (its gid, resolved when the config is read).
    pub group: Option<libc::gid_t>,
    /// Permission bits to give it (at most 0o777).
    pub mode: Option<u32>,
}

/// Upper bound of `busy_poll_us`: beyond this a pair is better off pinned and polling
/// for good, which is not what this knob is for.
pub const MAX_BUSY_POLL_US: u64 = 100_000;

/// Upper bound of `vf_tx_wait_us`: a guest's TX queue held longer than this stalls its
/// TCP retransmission timers rather than sparing them a loss.
pub const MAX_VF_TX_WAIT_US: u64 = 10_000_000;

/// One `[[port]]` table as written (and the `port` of a control socket `add` request);
/// unknown keys are errors, so a typo cannot pass silently.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<RawFd>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vf: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub loopback: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vdpa: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<usize>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub busy_poll_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vf_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vf_tx_wait_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    /// The control socket, as `--control`.
    control: Option<PathBuf>,
    /// Defaults for every listening port's `socket_group` / `socket_mode`.
    socket_group: Option<String>,
    socket_mode: Option<String>,
    /// Where to serve Prometheus metrics (`--metrics-listen`).
    metrics_listen: Option<String>,
    #[serde(default)]
    port: Vec<PortSpec>,
}

/// Checks a `--metrics-listen` / `metrics_listen` value: a numeric address and port (a
/// host name could resolve to an address nobody meant to expose).
pub fn parse_metrics_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "'{text}' is not ADDR:PORT with a numeric address (e.g. 127.0.0.1:9100 or [::1]:9100)"
        )
    })
}

impl PortSpec {
    /// A port given no socket serves the passed socket named like it, or the only one passed
    /// when the port has no name (the command line's one port); a port with a socket of its
    /// own, or a client, takes none. Without passed sockets nothing changes (validate says
    /// what is missing).
    pub fn take_activated(
        &mut self,
        activated: &ListenFds,
        origin: &str,
    ) -> Result<(), ConfigError> {
        if self.socket.is_some() || self.fd.is_some() || self.client || activated.is_empty() {
            return Ok(());
        }
        let bad = |message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let (name, fd) = match &self.name {
            Some(name) => match activated.by_name(name) {
                Some(fd) => (name.clone(), fd),
                None => {
                    return Err(bad(format!(
                        "no socket, and no passed socket is named '{name}' (LISTEN_FDNAMES: {})",
                        activated.names()
                    )))
                }
            },
            None => {
                let mut all = activated.iter();
                match (all.next(), all.next()) {
                    (Some((name, fd)), None) => (name.to_string(), fd),
                    _ => {
                        return Err(bad(format!(
                            "no socket, and several were passed ({}): name the port's",
                            activated.names()
                        )))
                    }
                }
            }
        };
        self.name = Some(name);
        self.fd = Some(fd);
        Ok(())
    }

    /// Checks one port; `origin` names it in errors ("--socket-path" or "file.toml: port 2").
    pub fn validate(self, origin: &str) -> Result<PortConfig, ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let socket = match (self.socket, self.fd, self.client) {
            (Some(_), Some(_), _) => {
                return Err(bad("give either a socket path or an fd, not both".into()))
            }
            (None, Some(_), true) => {
                return Err(bad(
                    "client mode needs a socket path to connect to, not an fd".into(),
                ))
            }
            (None, Some(fd), false) if fd < 0 => {
                return Err(bad(format!("fd {fd} is not a file descriptor")))
            }
            (None, Some(fd), false) => SocketMode::Inherited(fd),
            (Some(p), None, _) if p.as_os_str().is_empty() => {
                return Err(bad("the socket path is empty".into()))
            }
            (Some(p), None, true) => SocketMode::Connect(p),
            (Some(p), None, false) => SocketMode::Listen(p),
            (None, None, _) => {
                return Err(bad(
                    "no socket: give a socket path (or an inherited fd)".into()
                ))
            }
        };
        let link = match (self.vf, self.loopback, self.vdpa) {
            (Some(_), true, _) => return Err(bad("give either a VF or loopback, not both".into())),
            (Some(_), _, Some(_)) | (_, true, Some(_)) => {
                return Err(bad(
                    "a vDPA port has no VF or loopback: give only the vDPA device".into(),
                ))
            }
            (None, false, Some(p)) if p.as_os_str().is_empty() => {
                return Err(bad("the vDPA device path is empty".into()))
            }
            (None, false, Some(p)) => LinkConfig::Vdpa(p),
            (Some(vf), false, None) => match crate::vf::validate_ifname(&vf) {
                Ok(()) => LinkConfig::Vf(vf),
                Err(why) => {
                    return Err(bad(format!("'{vf}' is not a valid interface name: {why}")))
                }
            },
            (None, true, None) => LinkConfig::Loopback,
            (None, false, None) => {
                return Err(bad(
                    "no VF: give a VF interface (or loopback, or a vDPA device)".into(),
                ))
            }
        };
        let queues = self.queues.unwrap_or(1);
        if matches!(link, LinkConfig::Vdpa(_)) && queues != 1 {
            return Err(bad(format!(
                "a vDPA port serves one queue pair (the control queue is not mirrored), not {queues}"
            )));
        }
        if queues == 0 || queues > MAX_QUEUE_PAIRS {
            return Err(bad(format!(
                "queues must be 1 to {MAX_QUEUE_PAIRS}, not {queues}"
            )));
        }
        let cpus = match self.cpus {
            Some(list) => parse_cpu_list(&list)?,
            None => Vec::new(),
        };
        let busy_poll_us = self
            .busy_poll_us
            .unwrap_or(crate::queue_pair::DEFAULT_BUSY_POLL.as_micros() as u64);
        if busy_poll_us > MAX_BUSY_POLL_US {
            return Err(bad(format!(
                "busy-poll time must be at most {MAX_BUSY_POLL_US} us, not {busy_poll_us}"
            )));
        }
        let vf_tx_wait_us = self
            .vf_tx_wait_us
            .unwrap_or(crate::queue_pair::DEFAULT_TX_WAIT.as_micros() as u64);
        if vf_tx_wait_us > MAX_VF_TX_WAIT_US {
            return Err(bad(format!(
                "VF transmit wait must be at most {MAX_VF_TX_WAIT_US} us, not {vf_tx_wait_us}"
            )));
        }
        let vf_mode = match (self.vf_mode.as_deref(), &link) {
            (None, _) => VfMode::default(),
            (Some(_), LinkConfig::Loopback) => {
                return Err(bad("vf_mode applies to a VF port, not to loopback".into()))
            }
            (Some(_), LinkConfig::Vdpa(_)) => {
                return Err(bad(
                    "vf_mode applies to a VF port, not to a vDPA device".into()
                ))
            }
            (Some(m), LinkConfig::Vf(_)) => m.parse().map_err(bad)?,
        };
        let socket_access = match &socket {
            SocketMode::Listen(_) => {
                socket_access(self.socket_group, self.socket_mode).map_err(bad)?
            }
            _ if self.socket_group.is_some() || self.socket_mode.is_some() => {
                return Err(bad(
                    "socket_group and socket_mode apply to a socket we create (listening), \
                     not to a client or inherited one"
                        .into(),
                ))
            }
            _ => SocketAccess::default(),
        };
        let name = match (self.name, &socket) {
            (Some(n), _) if !n.is_empty() && !n.contains(char::is_whitespace) => n,
            (Some(n), _) => return Err(bad(format!("'{n}' is not a valid port name"))),
            (None, SocketMode::Listen(p) | SocketMode::Connect(p)) => p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "port".into()),
            (None, SocketMode::Inherited(fd)) => format!("fd{fd}"),
        };
        Ok(PortConfig {
            name,
            socket,
            link,
            queues,
            cpus,
            busy_poll: std::time::Duration::from_micros(busy_poll_us),
            vf_mode,
            vf_tx_wait: std::time::Duration::from_micros(vf_tx_wait_us),
            socket_access,
        })
    }
}

impl PortConfig {
    /// Refuses a listening socket whose directory does not exist: binding would fail later,
    /// on the port's thread, with a less clear error.
    pub fn check_socket_dir(&self, origin: &str) -> Result<(), ConfigError> {
        let SocketMode::Listen(path) = &self.socket else {
            return Ok(());
        };
        match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) if !dir.is_dir() => Err(ConfigError::Invalid {
                origin: origin.into(),
                message: format!("directory {} does not exist", dir.display()),
            }),
            _ => Ok(()),
        }
    }
}

/// Resolves a socket's group name and parses its octal mode.
fn socket_access(group: Option<String>, mode: Option<String>) -> Result<SocketAccess, String> {
    let group = match group {
        Some(name) => Some(group_id(&name)?),
        None => None,
    };
    let mode = match mode {
        Some(m) => Some(
            u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|&v| v <= 0o777)
                .ok_or(format!(
                    "socket mode '{m}' is not octal permission bits (e.g. 0660)"
                ))?,
        ),
        None => None,
    };
    Ok(SocketAccess { group, mode })
}

/// The gid of group `name` (or a number), from the system's group database.
fn group_id(name: &str) -> Result<libc::gid_t, String> {
    if let Ok(gid) = name.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let unknown = || format!("socket group '{name}' does not exist");
    let c_name = std::ffi::CString::new(name).map_err(|_| unknown())?;
    // SAFETY: `libc::group` is plain C data, for which all zero is a valid value.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // A group with many members needs a bigger buffer (ERANGE): grow it up to 1 MiB.
    let mut len = 16 * 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; len];
        // SAFETY: `grp`, `buf` and `found` are ours and live across the call; getgrnam_r
        // writes only into them (the strings of `grp` point into `buf`, which we do not read).
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 if !found.is_null() => return Ok(grp.gr_gid),
            libc::ERANGE if len < 1 << 20 => len *= 4,
            0 => return Err(unknown()),
            e => {
                let why = std::io::Error::from_raw_os_error(e);
                return Err(format!("socket group '{name}': cannot look it up: {why}"));
            }
        }
    }
}

/// Parses "0-3,6,8-9" into cpu numbers, in order, without duplicates.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, ConfigError> {
    let bad = |message: &str| ConfigError::CpuList {
        list: list.to_string(),
        message: message.to_string(),
    };
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: usize = lo
            .parse()
            .map_err(|_| bad(&format!("'{part}' is not a cpu or range")))?;
        let hi: usize = hi
            .parse()
            .map_err(|_| bad(&format!("'{part}' is not a cpu or range")))?;
        if lo > hi {
            return Err(bad(&format!("range '{part}' goes backwards")));
        }
        if hi >= libc::CPU_SETSIZE as usize {
            return Err(bad(&format!("cpu {hi} is beyond what Linux can address")));
        }
        for c in lo..=hi {
            if !cpus.contains(&c) {
                cpus.push(c);
            }
        }
    }
    Ok(cpus)
}

/// A config file read whole: its ports and its process-wide settings (read at start; a
/// reload takes only the ports).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub ports: Vec<PortConfig>,
    /// `control = "PATH"`: the control socket, as `--control`.
    pub control: Option<PathBuf>,
    /// `metrics_listen = "ADDR:PORT"`: the Prometheus endpoint, as `--metrics-listen`.
    pub metrics_listen: Option<SocketAddr>,
}

/// Reads and checks a config file: every port valid, names and sockets unique; `activated`
/// are the sockets systemd passed, which ports without a socket take by name.
pub fn load_file(path: &Path, activated: &ListenFds) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(path, &text, activated)
}

/// Parses config text (see the module docs); `path` only names it in errors.
pub fn parse_file(
    path: &Path,
    text: &str,
    activated: &ListenFds,
) -> Result<FileConfig, ConfigError> {
    let spec: FileSpec = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().replace('\n', " ").trim().to_string(),
    })?;
    // No [[port]] is a valid file: a service whose ports come later, by `ctl add` or by
    // a reload after the file gains some.
    let mut ports = Vec::new();
    let mut names = HashSet::new();
    let mut sockets = HashSet::new();
    for (i, mut p) in spec.port.into_iter().enumerate() {
        let origin = format!("{}: port {}", path.display(), i + 1);
        // The file's defaults reach only the ports whose socket we create.
        if p.socket.is_some() && p.fd.is_none() && !p.client {
            p.socket_group = p.socket_group.or_else(|| spec.socket_group.clone());
            p.socket_mode = p.socket_mode.or_else(|| spec.socket_mode.clone());
        }
        p.take_activated(activated, &origin)?;
        let port = p.validate(&origin)?;
        let dup = |what: &str| ConfigError::Invalid {
            origin: origin.clone(),
            message: format!("{what} is used by an earlier port too"),
        };
        if !names.insert(port.name.clone()) {
            return Err(dup(&format!("name '{}'", port.name)));
        }
        if !sockets.insert(port.socket.clone()) {
            return Err(dup("its socket"));
        }
        ports.push(port);
    }
    if spec
        .control
        .as_ref()
        .is_some_and(|c| c.as_os_str().is_empty())
    {
        return Err(ConfigError::Parse {
            path: path.to_path_buf(),
            message: "the control socket path is empty".into(),
        });
    }
    let metrics_listen = spec
        .metrics_listen
        .as_deref()
        .map(parse_metrics_listen)
        .transpose()
        .map_err(|message| ConfigError::Invalid {
            origin: format!("{}: metrics_listen", path.display()),
            message,
        })?;
    Ok(FileConfig {
        ports,
        control: spec.control,
        metrics_listen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<PortConfig>, ConfigError> {
        parse_file(Path::new("test.toml"), text, &ListenFds::default()).map(|f| f.ports)
    }

    #[test]
    fn metrics_listen_is_a_numeric_address_and_port() {
        let port = "[[port]]\nsocket = \"/run/a.sock\"\nloopback = true\n";
        let file = |top: &str| {
            parse_file(
                Path::new("t.toml"),
                &format!("{top}\n{port}"),
                &ListenFds::default(),
            )
        };
        assert_eq!(file("").unwrap().metrics_listen, None);
        let f = file(r#"metrics_listen = "127.0.0.1:9100""#).unwrap();
        assert_eq!(f.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(f.ports.len(), 1);
        let f = file(r#"metrics_listen = "[::1]:0""#).unwrap();
        assert_eq!(f.metrics_listen, Some("[::1]:0".parse().unwrap()));
        for bad in ["localhost:9100", "127.0.0.1", "127.0.0.1:99999", ""] {
            let e = file(&format!("metrics_listen = \"{bad}\""))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("t.toml: metrics_listen: ") && e.contains(&format!("'{bad}'")),
                "{e}"
            );
        }
    }

    #[test]
    fn socket_group_and_mode_apply_to_the_sockets_we_create() {
        // Top-level defaults reach the listening port; its own values win; a client port
        // keeps none.
        let ports = parse(
            r#"
            socket_group = "0"
            socket_mode = "0660"
            [[port]]
            socket = "/run/vr/a.sock"
            loopback = true
            [[port]]
            socket = "/run/vr/b.sock"
            loopback = true
            socket_mode = "0o600"
            [[port]]
            socket = "/run/vr/c.sock"
            loopback = true
            client = true
            "#,
        )
        .unwrap();
        let access: Vec<_> = ports.iter().map(|p| p.socket_access.clone()).collect();
        let with = |mode| SocketAccess {
            group: Some(0),
            mode: Some(mode),
        };
        assert_eq!(access, [with(0o660), with(0o600), SocketAccess::default()]);
        // By name, through the group database (root's group is on every system).
        assert_eq!(group_id("root"), Ok(0));
    }

    #[test]
    fn bad_socket_access_is_named() {
        let port = |extra: &str| {
            parse(&format!(
                "[[port]]\nsocket = \"/run/vr/a.sock\"\nloopback = true\n{extra}\n"
            ))
            .unwrap_err()
            .to_string()
        };
        let err = port("socket_mode = \"0999\"");
        assert!(err.contains("socket mode '0999'"), "{err}");
        let err = port("socket_mode = \"01777\"");
        assert!(err.contains("socket mode '01777'"), "{err}");
        let err = port("socket_group = \"no-such-group-here\"");
        assert!(err.contains("'no-such-group-here' does not exist"), "{err}");
        let err = port("client = true\nsocket_mode = \"0660\"");
        assert!(err.contains("not to a client or inherited one"), "{err}");
    }

    #[test]
    fn parses_a_two_port_file() {
        let ports = parse(
            r#"
            [[port]]
            socket = "/run/vr/vm1.sock"
            vf = "veth1"
            queues = 2
            cpus = "0-1"
            busy_poll_us = 0
            vf_mode = "auto"
            vf_tx_wait_us = 500
            [[port]]
            name = "lb"
            socket = "/run/vr/lb.sock"
            loopback = true
            client = true
            [[port]]
            socket = "/run/vr/hw.sock"
            vdpa = "/dev/vhost-vdpa-0"
            "#,
        )
        .expect("valid file");
        assert_eq!(ports.len(), 3);
        assert_eq!(ports[2].link, LinkConfig::Vdpa("/dev/vhost-vdpa-0".into()));
        assert_eq!(ports[0].name, "vm1");
        assert_eq!(
            ports[0].socket,
            SocketMode::Listen("/run/vr/vm1.sock".into())
        );
        assert_eq!(ports[0].link, LinkConfig::Vf("veth1".into()));
        assert_eq!(ports[0].queues, 2);
        assert_eq!(ports[0].cpus, vec![0, 1]);
        assert_eq!(ports[0].busy_poll, std::time::Duration::ZERO);
        assert_eq!(ports[1].busy_poll, crate::queue_pair::DEFAULT_BUSY_POLL);
        assert_eq!(ports[0].vf_tx_wait, std::time::Duration::from_micros(500));
        assert_eq!(ports[1].vf_tx_wait, crate::queue_pair::DEFAULT_TX_WAIT);
        assert_eq!(ports[0].vf_mode, VfMode::Auto);
        assert_eq!(ports[1].vf_mode, VfMode::AfPacket, "the default");
        assert_eq!(
            ports[1].socket,
            SocketMode::Connect("/run/vr/lb.sock".into())
        );
        assert_eq!(ports[1].link, LinkConfig::Loopback);
    }

    #[test]
    fn errors_name_the_port_and_the_problem() {
        let cases = [
            ("[[port]]\nsocket='/a'\n", "port 1: no VF"),
            (
                "[[port]]\nsocket='/a'\nvdpa='/dev/vhost-vdpa-0'\nvf='x'\n",
                "give only the vDPA device",
            ),
            (
                "[[port]]\nsocket='/a'\nvdpa='/dev/vhost-vdpa-0'\nqueues=2\n",
                "one queue pair",
            ),
            ("[[port]]\nvf='x'\n", "port 1: no socket"),
            (
                "[[port]]\nsocket='/a'\nvf='x'\nloopback=true\n",
                "either a VF or loopback",
            ),
            (
                "[[port]]\nsocket='/a'\nvf='x'\nqueues=0\n",
                "queues must be 1 to 32, not 0",
            ),
            ("[[port]]\nsocket='/a'\nvf='x'\nqueues=33\n", "not 33"),
            (
                "[[port]]\nsocket='/a'\nvf='x'\nspeed=1\n",
                "unknown field `speed`",
            ),
            (
                "[[port]]\nsocket='/a'\nvf='x'\n[[port]]\nsocket='/a'\nloopback=true\nname='b'\n",
                "port 2: its socket is used",
            ),
            (
                "[[port]]\nsocket='/a'\nvf='this-name-is-far-too-long'\n",
                "not a valid interface name",
            ),
            (
                "[[port]]\nfd=3\nclient=true\nvf='x'\n",
                "client mode needs a socket path",
            ),
            (
                "[[port]]\nsocket='/a'\nvf='x'\ncpus='3-1'\n",
                "goes backwards",
            ),
            (
                "[[port]]\nsocket='/a'\nvf='x'\nbusy_poll_us=100001\n",
                "busy-poll time must be at most 100000 us",
            ),
            (
                "[[port]]\nsocket='/a'\nvf='x'\nvf_tx_wait_us=10000001\n",
                "VF transmit wait must be at most 10000000 us",
            ),
            (
                "[[port]]\nsocket='/a'\nvf='x'\nvf_mode='dpdk'\n",
                "unknown VF mode 'dpdk'",
            ),
            (
                "[[port]]\nsocket='/a'\nloopback=true\nvf_mode='auto'\n",
                "vf_mode applies to a VF port",
            ),
            (
                "[[port]]\nsocket='/a'\nvdpa='/dev/vhost-vdpa-0'\nvf_mode='af-xdp'\n",
                "not to a vDPA device",
            ),
            ("[[port]\n", "test.toml"),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: got '{err}', want '{want}'");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn a_file_without_ports_is_a_service_waiting_for_some() {
        assert_eq!(parse("").unwrap(), Vec::new());
        assert_eq!(parse("socket_mode = '0660'\n").unwrap(), Vec::new());
        let f = parse_file(
            Path::new("t.toml"),
            "control = '/run/c.sock'\n",
            &ListenFds::default(),
        )
        .unwrap();
        assert_eq!(f.control, Some(PathBuf::from("/run/c.sock")));
        let err =
            parse_file(Path::new("t.toml"), "control = ''\n", &ListenFds::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config file t.toml: the control socket path is empty"
        );
    }

    #[test]
    fn a_port_without_socket_serves_the_passed_socket_named_like_it() {
        let passed = ListenFds::parse(Some("1"), Some("2"), Some("vm1:vm2"), 1).unwrap();
        let file = |text: &str| parse_file(Path::new("t.toml"), text, &passed);
        let ports = file("[[port]]\nname='vm2'\nloopback=true\n[[port]]\nname='vm1'\nloopback=true\n[[port]]\nname='own'\nsocket='/run/own.sock'\nloopback=true\n").unwrap();
        let sockets: Vec<_> = ports
            .ports
            .iter()
            .map(|p| (p.name.as_str(), &p.socket))
            .collect();
        assert_eq!(
            sockets,
            [
                ("vm2", &SocketMode::Inherited(4)),
                ("vm1", &SocketMode::Inherited(3)),
                ("own", &SocketMode::Listen("/run/own.sock".into())),
            ]
        );
        let e = file("[[port]]\nname='vm3'\nloopback=true\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "t.toml: port 1: no socket, and no passed socket is named 'vm3' (LISTEN_FDNAMES: vm1, vm2)");
        let e = file("[[port]]\nloopback=true\n").unwrap_err().to_string();
        assert!(
            e.ends_with("several were passed (vm1, vm2): name the port's"),
            "{e}"
        );
        // One passed socket and an unnamed port: it is the port's, and names it.
        let one = ListenFds::parse(Some("1"), Some("1"), Some("only"), 1).unwrap();
        let ports = parse_file(Path::new("t.toml"), "[[port]]\nloopback=true\n", &one).unwrap();
        assert_eq!(
            (ports.ports[0].name.as_str(), &ports.ports[0].socket),
            ("only", &SocketMode::Inherited(3))
        );
        // Without passed sockets a port without one is still an error.
        assert!(parse("[[port]]\nname='vm1'\nloopback=true\n").is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0").ok(), Some(vec![0]));
        assert_eq!(parse_cpu_list("1-3,0,2").ok(), Some(vec![1, 2, 3, 0]));
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("1-").is_err());
        assert!(parse_cpu_list("99999").is_err());
    }
}
