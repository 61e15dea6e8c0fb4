//! One port's life: open its VF, then serve frontend connections one after another.
//!
//! Each connection gets a fresh [`NetDevice`] and vhost-user-backend daemon (with its worker
//! threads), while the port's queue pairs (VF sockets, counters) persist, so a QEMU that
//! restarts, a guest that reboots, or a frontend that reconnects finds the port as it left it.

use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{error, info, warn};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::announce::format_mac;
use crate::config::{LinkConfig, PortConfig, SocketAccess, SocketMode};
use crate::device::NetDevice;
use crate::port::{Port, PortKind, Relay, VdpaSlot};
use crate::protocol_shim;
use crate::queue_pair::{Link, QueuePair};
use crate::stats::PortStats;
use crate::status::{Negotiated, PortState, PortStatus};
use crate::stop::{Stop, Woken};
use crate::vf::watch::LinkWatch;
use crate::vf::{if_index, interface_info, open_queues, RingConfig};
use crate::vhost_user_backend_workarounds;

/// How long a client-mode port waits between attempts to reach its frontend.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// How long a port waits after failing to accept or to set up a session (out of fds,
/// memory or threads, in practice) before it tries again: long enough not to spin while
/// resources are short, short enough that the next frontend barely notices once they are
/// back.
const RETRY_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("port {port}: VF {vf}: {source}")]
    Vf {
        port: String,
        vf: String,
        source: crate::vf::VfError,
    },
    #[error("port {port}: cannot listen on {path}: {source}")]
    Listen {
        port: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("port {port}: fd {fd} is not a listening unix socket: {message}")]
    BadFd {
        port: String,
        fd: RawFd,
        message: String,
    },
    #[error("port {port}: {cause}")]
    Daemon {
        port: String,
        cause: vhost_user_backend::Error,
    },
    #[error("port {port}: {source}")]
    Vdpa {
        port: String,
        source: vdpa::OpenError,
    },
    #[error("port {port}: cannot accept connections: {source}")]
    Accept {
        port: String,
        source: std::io::Error,
    },
    #[error("port {port}: {message}: {source}")]
    Io {
        port: String,
        message: String,
        source: std::io::Error,
    },
}

/// What ties a running port to whoever started it: the live record the port keeps up to
/// date, and the stop request it obeys (`ctl remove`, reload, SIGTERM).
pub struct PortControl {
    pub status: PortStatus,
    pub stop: Stop,
}

impl PortControl {
    pub fn new() -> std::io::Result<Self> {
        Ok(PortControl {
            status: PortStatus::new(),
            stop: Stop::new()?,
        })
    }

    /// Stops the port: its frontend is hung up on and its threads end.
    pub fn stop(&self) {
        self.stop.stop();
        self.status.hang_up();
    }
}

/// Names the vDPA device and its MAC, with the QEMU and libvirt settings that give the guest
/// the same one: the NIC receives for the device's MAC only, so a guest with another one
/// sends fine and never hears back.
fn log_vdpa_mac(port: &str, path: &Path, dev: &vdpa::KernelDevice) {
    use vdpa::VdpaDevice;
    let path = path.display();
    match dev.mac() {
        Ok(Some(mac)) => {
            let mac = format_mac(&mac);
            info!(
                "port {port}: vDPA device {path}, MAC {mac}: give the guest the same \
                 (QEMU -device virtio-net-pci,mac={mac},...; libvirt <mac address='{mac}'/>) \
                 or replies to it are dropped by the NIC"
            );
        }
        Ok(None) => info!("port {port}: vDPA device {path} (it has no MAC of its own)"),
        Err(e) => warn!("port {port}: vDPA device {path}: cannot read its MAC: {e}"),
    }
}

/// Opens everything the port needs before any frontend comes: a missing VF or vDPA device
/// is found now, not when the guest boots. The port's VF watch obeys `control`'s stop.
pub fn open_port(cfg: &PortConfig, control: &Arc<PortControl>) -> Result<Arc<Port>, ServerError> {
    let stats = Arc::new(PortStats::new(&cfg.name, cfg.queues));
    let kind = match &cfg.link {
        LinkConfig::Vdpa(path) => {
            let dev = vdpa::KernelDevice::open(path).map_err(|source| ServerError::Vdpa {
                port: cfg.name.clone(),
                source,
            })?;
            log_vdpa_mac(&cfg.name, path, &dev);
            PortKind::Vdpa(VdpaSlot::new(dev))
        }
        LinkConfig::Vf(vf) => {
            let (relay, watch) = open_vf_relay(cfg, vf, &stats, control)?;
            let port = Port::new(&cfg.name, stats, PortKind::Vf(relay));
            *port.watch.lock().unwrap_or_else(|e| e.into_inner()) = watch;
            return Ok(Arc::new(port));
        }
        LinkConfig::Loopback => {
            let links = (0..cfg.queues).map(|_| Link::Loopback).collect();
            let pairs = new_pairs(cfg, links)?;
            PortKind::Loopback(Arc::new(Relay::new(&cfg.name, pairs, stats.clone())))
        }
    };
    Ok(Arc::new(Port::new(&cfg.name, stats, kind)))
}

/// The queue pairs of a VF port, one VF socket each, and the watch that re-opens them when
/// the VF is re-created.
fn open_vf_relay(
    cfg: &PortConfig,
    vf: &str,
    stats: &Arc<PortStats>,
    control: &Arc<PortControl>,
) -> Result<(Arc<Relay>, Option<thread::JoinHandle<()>>), ServerError> {
    let vf_err = |source| ServerError::Vf {
        port: cfg.name.clone(),
        vf: vf.to_string(),
        source,
    };
    let info = interface_info(vf).map_err(vf_err)?;
    info!(
        "port {}: VF {vf} (index {}, mtu {}, mac {}) with {} queue pair(s), promiscuous",
        cfg.name,
        info.index,
        info.mtu,
        format_mac(&info.mac),
        cfg.queues
    );
    // A fanout group id that no other port of this process (or, likely, another process) uses.
    let fanout = (cfg.queues > 1).then_some(fanout_group_id(&cfg.name));
    let ring = RingConfig::default();
    let links = open_queues(&cfg.name, vf, cfg.queues, cfg.vf_mode, fanout, &ring)
        .map_err(vf_err)?
        .into_iter()
        .map(|s| Link::Vf(Box::new(s)))
        .collect();
    let relay = Arc::new(Relay::new(&cfg.name, new_pairs(cfg, links)?, stats.clone()));
    let watch = spawn_vf_watch(
        cfg.clone(),
        relay.clone(),
        vf.to_string(),
        info.index,
        control,
    );
    Ok((relay, watch))
}

/// One queue pair per link, set up as the port's configuration says.
fn new_pairs(cfg: &PortConfig, links: Vec<Link>) -> Result<Vec<QueuePair>, ServerError> {
    let mut pairs = Vec::with_capacity(links.len());
    for (i, link) in links.into_iter().enumerate() {
        let mut pair = QueuePair::new(&cfg.name, i, link).map_err(|source| ServerError::Io {
            port: cfg.name.clone(),
            message: "cannot create an eventfd".into(),
            source,
        })?;
        pair.cpu = cfg.cpus.get(i).copied();
        pair.set_busy_poll(cfg.busy_poll);
        pair.tx_wait = cfg.vf_tx_wait;
        pairs.push(pair);
    }
    Ok(pairs)
}

/// Watches the port's VF by name (rtnetlink) and re-opens its sockets, in the same mode and
/// with a fresh fanout group, when it reappears with another index (deleted and created
/// again, e.g. by a driver reset). Until then its sockets, bound to the old index, drop what
/// the guest sends (`vf_down`). The watch ends when the port is stopped.
fn spawn_vf_watch(
    cfg: PortConfig,
    relay: Arc<Relay>,
    vf: String,
    index: u32,
    control: &Arc<PortControl>,
) -> Option<thread::JoinHandle<()>> {
    let port_name = cfg.name.clone();
    let state = VfWatch {
        cfg,
        relay,
        vf,
        index,
        generation: 0,
        gone: false,
    };
    let control = control.clone();
    let spawned = thread::Builder::new()
        .name(format!("vf-watch-{port_name}"))
        .spawn(move || state.run(&control.stop));
    match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            warn!("port {port_name}: cannot start the VF watch thread: {e}");
            None
        }
    }
}

/// What the VF watch of one port knows.
struct VfWatch {
    cfg: PortConfig,
    relay: Arc<Relay>,
    vf: String,
    /// The index the port's sockets are bound to.
    index: u32,
    /// Re-opens so far, for a fanout group id of its own each time: the old sockets' group
    /// stays tied to the old device until they close.
    generation: u16,
    gone: bool,
}

impl VfWatch {
    /// Follows the link messages until the port stops or the netlink socket fails.
    fn run(mut self, stop: &Stop) {
        let name = self.cfg.name.clone();
        let mut watch = match LinkWatch::open() {
            Ok(w) => w,
            Err(e) => {
                warn!("port {name}: cannot watch its VF for re-creation (rtnetlink): {e}");
                return;
            }
        };
        loop {
            if stop.wait(Some(watch.as_raw_fd()), None) == Woken::Stopped {
                return;
            }
            match watch.wait() {
                // An empty batch may be a lost one: look the name up then too.
                Ok(links) if links.is_empty() || links.iter().any(|l| l.name == self.vf) => {
                    self.check()
                }
                Ok(_) => {}
                Err(e) => {
                    warn!("port {name}: rtnetlink watch of its VF ended: {e}");
                    return;
                }
            }
        }
    }

    /// Looks the VF up by name: gone, the same, or re-created (then re-opened).
    fn check(&mut self) {
        let name = &self.cfg.name;
        let vf = &self.vf;
        let Ok(now) = if_index(vf) else {
            if !self.gone {
                info!("port {name}: VF {vf} is gone; dropping its traffic until it is back");
                self.relay.mark_vf_gone();
                self.gone = true;
            }
            return;
        };
        if now == self.index {
            return;
        }
        info!(
            "port {name}: VF {vf} re-created (index {} -> {now}); re-opening its sockets",
            self.index
        );
        self.generation = self.generation.wrapping_add(1);
        let fanout =
            (self.cfg.queues > 1).then(|| fanout_group_id(name).wrapping_add(self.generation));
        let ring = RingConfig::default();
        match open_queues(name, vf, self.cfg.queues, self.cfg.vf_mode, fanout, &ring) {
            Ok(socks) => {
                self.relay.replace_vf(socks);
                self.index = now;
                self.gone = false;
            }
            Err(e) => {
                warn!("port {name}: VF {vf}: cannot re-open ({e}); trying again on its next change")
            }
        }
    }
}

fn fanout_group_id(name: &str) -> u16 {
    let mut h: u32 = std::process::id();
    for b in name.bytes() {
        h = h.wrapping_mul(31).wrapping_add(u32::from(b));
    }
    (h ^ (h >> 16)) as u16
}

/// Serves the port until it is stopped (then `Ok`) or a fatal error (its listening socket
/// failing). Frontends coming and going are not errors. A socket file the port created is
/// removed when it stops.
pub fn run_port(
    cfg: &PortConfig,
    port: Arc<Port>,
    control: &PortControl,
) -> Result<(), ServerError> {
    let served = serve_socket(cfg, &port, control);
    // The port's own threads end with it, whatever ended it: a port that cannot serve must
    // not keep its VF sockets open behind it.
    control.stop.stop();
    port.join_threads();
    served
}

/// Serves the port's socket, as its mode says, until stopped or broken.
fn serve_socket(
    cfg: &PortConfig,
    port: &Arc<Port>,
    control: &PortControl,
) -> Result<(), ServerError> {
    match &cfg.socket {
        SocketMode::Listen(path) => {
            let (listener, _file) =
                listen(path, &cfg.socket_access).map_err(|source| ServerError::Listen {
                    port: cfg.name.clone(),
                    path: path.clone(),
                    source,
                })?;
            info!("port {}: listening on {}", cfg.name, path.display());
            serve_listener(cfg, port, &listener, control)
        }
        SocketMode::Inherited(fd) => {
            check_listening_socket(&cfg.name, *fd)?;
            // The port serves a duplicate and the passed fd stays open for the life of the
            // process: a port restarted by a reload finds its socket again (and no other
            // file can have taken its number), and frontends that connect in between wait
            // in its backlog, as under systemd while the service restarts.
            // SAFETY: F_DUPFD_CLOEXEC on a checked open fd returns a new fd nobody owns.
            let dup = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3) };
            if dup < 0 {
                return Err(ServerError::Io {
                    port: cfg.name.clone(),
                    message: format!("cannot duplicate inherited socket fd {fd}"),
                    source: std::io::Error::last_os_error(),
                });
            }
            // SAFETY: `dup` is a new fd of an open listening unix socket, owned by nothing
            // else: the listener closes it.
            let listener = unsafe { UnixListener::from_raw_fd(dup) };
            info!("port {}: serving inherited socket fd {fd}", cfg.name);
            serve_listener(cfg, port, &listener, control)
        }
        SocketMode::Connect(path) => {
            serve_as_client(cfg, port, path, control);
            Ok(())
        }
    }
}

/// Client mode: connects to the frontend, serves it, and reconnects after it goes away.
fn serve_as_client(cfg: &PortConfig, port: &Arc<Port>, path: &Path, control: &PortControl) {
    let mut warned = false;
    while !control.stop.is_stopped() {
        match UnixStream::connect(path) {
            Ok(stream) => {
                warned = false;
                info!("port {}: connected to {}", cfg.name, path.display());
                serve_connection(cfg, port, stream, control);
            }
            Err(e) => {
                if !warned {
                    warn!(
                        "port {}: cannot connect to {} ({e}); retrying every {:?}",
                        cfg.name,
                        path.display(),
                        RECONNECT_DELAY
                    );
                    warned = true;
                }
                let why = format!("cannot connect to {}: {e}", path.display());
                control.status.set_state(PortState::Reconnecting(why));
                control.stop.sleep(RECONNECT_DELAY);
            }
        }
    }
}

/// A socket file the port created: removed when the port stops, unless another file has
/// taken its place since (a second instance started on the same path, say).
struct SocketFile {
    path: PathBuf,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the port's socket, replacing a stale socket file left by an earlier run (but never
/// a file that is not a socket), and gives it the group and mode asked for.
fn listen(path: &Path, access: &SocketAccess) -> std::io::Result<(UnixListener, SocketFile)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
    }
    let listener = UnixListener::bind(path)?;
    // Set before the first accept: until then the file has the mode the umask gave it
    // (0755 under the usual 022, which lets only its owner connect).
    let file = SocketFile {
        path: path.to_path_buf(),
        ino: std::fs::symlink_metadata(path)?.ino(),
    };
    set_access(path, access)?;
    // Non-blocking: the port waits for a connection or a stop in one poll, and a connection
    // reset between the two must not leave it blocked in accept.
    listener.set_nonblocking(true)?;
    Ok((listener, file))
}

/// Gives the socket file `path` the group and permission bits of `access`.
fn set_access(path: &Path, access: &SocketAccess) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let with =
        |what: &str, e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"));
    if let Some(gid) = access.group {
        std::os::unix::fs::lchown(path, None, Some(gid))
            .map_err(|e| with(&format!("cannot give the socket group {gid}"), e))?;
    }
    if let Some(mode) = access.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| with(&format!("cannot set the socket's mode {mode:o}"), e))?;
    }
    Ok(())
}

fn serve_listener(
    cfg: &PortConfig,
    port: &Arc<Port>,
    listener: &UnixListener,
    control: &PortControl,
) -> Result<(), ServerError> {
    // An inherited socket may come blocking; ours is non-blocking already.
    if let Err(e) = listener.set_nonblocking(true) {
        warn!(
            "port {}: cannot make the socket non-blocking: {e}",
            cfg.name
        );
    }
    loop {
        control.status.set_state(PortState::Listening);
        if control.stop.wait(Some(listener.as_raw_fd()), None) == Woken::Stopped {
            return Ok(());
        }
        match listener.accept() {
            Ok((stream, _)) => {
                info!("port {}: frontend connected", cfg.name);
                // The session's sockets block; only the listener polls.
                if let Err(e) = stream.set_nonblocking(false) {
                    warn!("port {}: {e}; connection closed", cfg.name);
                    continue;
                }
                serve_connection(cfg, port, stream, control);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(e) if listener_broken(&e) => {
                control
                    .status
                    .set_state(PortState::Broken(format!("accept failed: {e}")));
                return Err(ServerError::Accept {
                    port: cfg.name.clone(),
                    source: e,
                });
            }
            Err(e) => {
                // Out of fds or memory, or a connection reset before we took it: the
                // pending connections wait in the backlog until resources are back. Logged
                // once a second at most, as a flood of frontends can keep this going.
                crate::error_limited!("port {}: accept failed: {e}", cfg.name);
                control.stop.sleep(RETRY_DELAY);
            }
        }
    }
}

/// Whether an `accept` error says the listening socket itself is unusable, for good.
fn listener_broken(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::ENOTSOCK | libc::EINVAL | libc::EOPNOTSUPP)
    )
}

/// Serves one connection. A session that cannot be set up (the process out of fds, memory
/// or threads, maybe because of another port's frontend) costs this connection only: the
/// port waits a little and goes on serving.
fn serve_connection(
    cfg: &PortConfig,
    port: &Arc<Port>,
    frontend: UnixStream,
    control: &PortControl,
) {
    let negotiated = match control.status.connected(&frontend) {
        Ok(n) => n,
        Err(e) => {
            crate::error_limited!("port {}: {e}; connection closed", cfg.name);
            control.stop.sleep(RETRY_DELAY);
            return;
        }
    };
    // A stop that came before the connection was recorded did not hang it up: do it here.
    if control.stop.is_stopped() {
        control.status.hang_up();
    }
    let served = run_session(cfg, port, frontend, negotiated);
    control.status.disconnected();
    if let Err(e) = served {
        crate::error_limited!("{e}; connection closed");
        control.stop.sleep(RETRY_DELAY);
    }
}

/// Serves one frontend connection to its end, whatever the port's kind: the protocol shim
/// checks and relays the frontend's messages to the kind's request handler, over a socket
/// of ours.
fn run_session(
    cfg: &PortConfig,
    port: &Arc<Port>,
    frontend: UnixStream,
    negotiated: Arc<Negotiated>,
) -> Result<(), ServerError> {
    let (handler, shim_end) = SessionHandler::start(cfg, port)?;
    let shim = protocol_shim::spawn(
        &cfg.name,
        handler.rings(),
        frontend,
        shim_end,
        handler.on_rarp(cfg),
        negotiated,
    )
    .map_err(|source| ServerError::Io {
        port: cfg.name.clone(),
        message: "cannot start the protocol shim".into(),
        source,
    });
    match shim {
        Ok(shim) => {
            handler.serve(cfg);
            // The handler's end is closed by now, so the shim closes the frontend's and ends.
            let _ = shim.join();
            Ok(())
        }
        Err(e) => {
            handler.abandon();
            Err(e)
        }
    }
}

type Daemon = VhostUserDaemon<Arc<NetDevice>>;

/// The request handler of one session, per port kind.
enum SessionHandler<'a> {
    /// vhost-user-backend's daemon over a fresh device on the port's queue pairs.
    Relay {
        relay: &'a Arc<Relay>,
        daemon: Box<Daemon>,
    },
    /// The `vdpa` crate's session on the port's device, once it has it.
    Vdpa {
        slot: &'a VdpaSlot,
        stats: Arc<PortStats>,
        ours: UnixStream,
    },
}

impl<'a> SessionHandler<'a> {
    /// The handler for a new connection, and the socket end the shim is to talk to it on.
    fn start(cfg: &PortConfig, port: &'a Port) -> Result<(Self, UnixStream), ServerError> {
        let io_err = |source| ServerError::Io {
            port: cfg.name.clone(),
            message: "cannot set up the backend-side socket".into(),
            source,
        };
        match &port.kind {
            PortKind::Vf(relay) | PortKind::Loopback(relay) => {
                let mut daemon = new_daemon(cfg, relay)?;
                let (mut listener, shim_end) =
                    vhost_user_backend_workarounds::private_connection(&cfg.name)
                        .map_err(io_err)?;
                // Takes the connection pending on the listener and starts serving it.
                if let Err(cause) = daemon.start(&mut listener) {
                    end_relay_session(relay, &daemon);
                    return Err(ServerError::Daemon {
                        port: cfg.name.clone(),
                        cause,
                    });
                }
                let daemon = Box::new(daemon);
                Ok((SessionHandler::Relay { relay, daemon }, shim_end))
            }
            PortKind::Vdpa(slot) => {
                let (ours, shim_end) = UnixStream::pair().map_err(io_err)?;
                let stats = port.stats.clone();
                Ok((SessionHandler::Vdpa { slot, stats, ours }, shim_end))
            }
        }
    }

    /// Rings the frontend may address (the shim's bound on per-ring state).
    fn rings(&self) -> usize {
        match self {
            SessionHandler::Relay { relay, .. } => 2 * relay.pairs.len(),
            SessionHandler::Vdpa { .. } => vdpa::session::NUM_QUEUES,
        }
    }

    /// What a SEND_RARP does: a relay broadcasts the guest's announcement on its VF. The vDPA
    /// session does not offer the RARP protocol feature (the frames would have to come from
    /// the device, which has no way to inject them), so there a SEND_RARP is a frontend
    /// going beyond what was negotiated: answered, logged, not acted on.
    fn on_rarp(&self, cfg: &PortConfig) -> protocol_shim::RarpHandler {
        match self {
            SessionHandler::Relay { relay, .. } => {
                let relay = Arc::clone(relay);
                Box::new(move |mac| crate::announce::announce_logged(&relay, mac))
            }
            SessionHandler::Vdpa { .. } => {
                let port = cfg.name.clone();
                Box::new(move |_mac| {
                    warn!("port {port}: SEND_RARP ignored: a vDPA port does not offer RARP");
                })
            }
        }
    }

    /// Serves the connection until the frontend goes away, then leaves the port ready for
    /// the next one.
    fn serve(self, cfg: &PortConfig) {
        match self {
            SessionHandler::Relay { relay, mut daemon } => {
                match daemon.wait() {
                    Ok(()) => info!("port {}: frontend disconnected", cfg.name),
                    Err(e) => warn!("port {}: frontend connection ended: {e}", cfg.name),
                }
                end_relay_session(relay, &daemon);
            }
            SessionHandler::Vdpa { slot, stats, ours } => match slot.take() {
                Some(dev) => serve_vdpa_device(cfg, slot, dev, stats, ours),
                None => warn!(
                    "port {}: the vDPA device is still held by the last session",
                    cfg.name
                ),
            },
        }
    }

    /// Gives up a session whose shim could not start.
    fn abandon(self) {
        if let SessionHandler::Relay { relay, daemon } = self {
            end_relay_session(relay, &daemon);
        }
    }
}

/// Stops the session's workers and forgets their epoll handlers.
fn end_relay_session(relay: &Relay, daemon: &Daemon) {
    stop_workers(daemon);
    relay
        .handlers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    if let Some(h) = daemon.shutdown_handle() {
        h.shutdown();
    }
}

/// Runs the vDPA session on `dev` over `ours` until the frontend goes away, then puts the
/// (reset) device back in `slot`.
fn serve_vdpa_device(
    cfg: &PortConfig,
    slot: &VdpaSlot,
    dev: vdpa::KernelDevice,
    counters: Arc<dyn vdpa::Counters>,
    ours: UnixStream,
) {
    use std::sync::Mutex;
    use vhost::vhost_user::{BackendReqHandler, Error as VuError};
    let session = match vdpa::Session::new(&cfg.name, dev, counters) {
        Ok(s) => Arc::new(Mutex::new(s)),
        Err((e, dev)) => {
            error!("{e}");
            slot.put_back(dev);
            return;
        }
    };
    let mut handler = BackendReqHandler::from_stream(ours, session.clone());
    loop {
        match handler.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected) | Err(VuError::PartialMessage) => {
                info!("port {}: frontend disconnected", cfg.name);
                break;
            }
            Err(e) => {
                warn!("port {}: frontend connection ended: {e}", cfg.name);
                break;
            }
        }
    }
    if let Ok(conn) = handler.try_clone_connection() {
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }
    drop(handler);
    match Arc::try_unwrap(session) {
        Ok(m) => {
            let dev = m
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .into_device();
            info!("port {}: vdpa: reset", cfg.name);
            slot.put_back(dev);
        }
        Err(_) => error!("port {}: the vDPA session is still referenced", cfg.name),
    }
}

/// A fresh device and daemon on the relay's queue pairs, with each pair's VF socket,
/// reschedule event and counters timer registered in its worker's epoll.
fn new_daemon(cfg: &PortConfig, relay: &Arc<Relay>) -> Result<Daemon, ServerError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let dev = Arc::new(NetDevice::new(relay.clone(), mem.clone()));
    let daemon = VhostUserDaemon::new(cfg.name.clone(), dev.clone(), mem).map_err(|cause| {
        ServerError::Daemon {
            port: cfg.name.clone(),
            cause,
        }
    })?;
    let handlers = daemon.get_epoll_handlers();
    // Held while registering, so a VF re-opened meanwhile is registered here or there.
    let mut current = relay.handlers.lock().unwrap_or_else(|e| e.into_inner());
    for (i, handler) in handlers.iter().enumerate() {
        let Some(pair) = relay.pair(i) else { continue };
        let io_err = |source, what: &str| ServerError::Io {
            port: cfg.name.clone(),
            message: format!("queue pair {i}: cannot watch {what}"),
            source,
        };
        let watch = |fd, events, id, what| {
            handler
                .register_listener(fd, events, id)
                .map_err(|e| io_err(e, what))
        };
        watch(
            pair.resched.as_raw_fd(),
            EventSet::IN,
            dev.resched_event_id(),
            "its reschedule event",
        )?;
        if let Link::Vf(vf) = &pair.link {
            let edge = EventSet::IN | EventSet::EDGE_TRIGGERED;
            watch(vf.as_raw_fd(), edge, dev.vf_event_id(), "the VF socket")?;
            let timer = pair.counters_timer.as_raw_fd();
            watch(
                timer,
                EventSet::IN,
                dev.counters_event_id(),
                "its counters timer",
            )?;
        }
    }
    *current = handlers;
    drop(current);
    Ok(daemon)
}

fn stop_workers(daemon: &Daemon) {
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
}

fn check_listening_socket(port: &str, fd: RawFd) -> Result<(), ServerError> {
    let bad = |message: &str| ServerError::BadFd {
        port: port.to_string(),
        fd,
        message: message.to_string(),
    };
    // SAFETY: fstat only writes into the local stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(bad(&std::io::Error::last_os_error().to_string()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad("not a socket"));
    }
    let socket_option = |name| {
        crate::vf::sockopt::getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, name)
            .ok()
            .map(|(v, _)| v)
    };
    if socket_option(libc::SO_ACCEPTCONN) != Some(1) {
        return Err(bad("not listening"));
    }
    if socket_option(libc::SO_DOMAIN) != Some(libc::AF_UNIX) {
        return Err(bad("not a unix socket"));
    }
    Ok(())
}
