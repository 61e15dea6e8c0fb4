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
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::config::{LinkConfig, PortConfig, SocketMode};
use crate::device::{NetDevice, Port};
use crate::protocol_shim;
use crate::queue_pair::{Link, QueuePair};
use crate::stats::PortStats;
use crate::vf::watch::LinkWatch;
use crate::vf::{if_index, interface_info, open_queues, RingConfig};

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

/// Opens everything the port needs before any frontend comes: a missing VF is found now, not
/// when the guest boots.
pub fn open_port(cfg: &PortConfig) -> Result<Arc<Port>, ServerError> {
    let stats = Arc::new(PortStats::new(&cfg.name, cfg.queues));
    let vf = match &cfg.link {
        LinkConfig::Vdpa(path) => {
            // Opened now, so a missing or busy device is reported before any frontend comes.
            let dev = vdpa::KernelDevice::open(path).map_err(|source| ServerError::Vdpa {
                port: cfg.name.clone(),
                source,
            })?;
            info!("port {}: vDPA device {}", cfg.name, path.display());
            return Ok(Arc::new(Port::new_vdpa(&cfg.name, dev, stats)));
        }
        LinkConfig::Vf(vf) => Some(vf),
        LinkConfig::Loopback => None,
    };
    let mut pairs = Vec::with_capacity(cfg.queues);
    let mut vf_index = None;
    if let Some(vf) = vf {
        let vf_err = |source| ServerError::Vf {
            port: cfg.name.clone(),
            vf: vf.clone(),
            source,
        };
        let info = interface_info(vf).map_err(vf_err)?;
        vf_index = Some(info.index);
        info!(
            "port {}: VF {vf} (index {}, mtu {}, mac {}) with {} queue pair(s), promiscuous",
            cfg.name,
            info.index,
            info.mtu,
            format_mac(&info.mac),
            cfg.queues
        );
    }
    // A fanout group id that no other port of this process (or, likely, another process) uses.
    let group = fanout_group_id(&cfg.name);
    let mut links: Vec<Link> = match vf {
        Some(vf) => {
            let fanout = (cfg.queues > 1).then_some(group);
            open_queues(
                &cfg.name,
                vf,
                cfg.queues,
                cfg.vf_mode,
                fanout,
                &RingConfig::default(),
            )
            .map_err(|source| ServerError::Vf {
                port: cfg.name.clone(),
                vf: vf.clone(),
                source,
            })?
            .into_iter()
            .map(|s| Link::Vf(Box::new(s)))
            .collect()
        }
        None => (0..cfg.queues).map(|_| Link::Loopback).collect(),
    };
    for (i, link) in links.drain(..).enumerate() {
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
    let port = Arc::new(Port::new(&cfg.name, pairs, stats));
    if let (Some(vf), Some(index)) = (vf, vf_index) {
        spawn_vf_watch(cfg.clone(), port.clone(), vf.clone(), index);
    }
    Ok(port)
}

/// Watches the port's VF by name (rtnetlink) and re-opens its sockets, in the same mode and
/// with a fresh fanout group, when it reappears with another index (deleted and created
/// again, e.g. by a driver reset). Until then its sockets, bound to the old index, drop what
/// the guest sends (`vf_down`).
fn spawn_vf_watch(cfg: PortConfig, port: Arc<Port>, vf: String, index: u32) {
    let port_name = cfg.name.clone();
    let state = VfWatch {
        cfg,
        port: port.clone(),
        vf,
        index,
        generation: 0,
        gone: false,
    };
    let spawned = thread::Builder::new()
        .name(format!("vf-watch-{port_name}"))
        .spawn(move || state.run());
    if let Err(e) = spawned {
        warn!("port {}: cannot start the VF watch thread: {e}", port.name);
    }
}

/// What the VF watch of one port knows.
struct VfWatch {
    cfg: PortConfig,
    port: Arc<Port>,
    vf: String,
    /// The index the port's sockets are bound to.
    index: u32,
    /// Re-opens so far, for a fanout group id of its own each time: the old sockets' group
    /// stays tied to the old device until they close.
    generation: u16,
    gone: bool,
}

impl VfWatch {
    /// Follows the link messages until the netlink socket fails.
    fn run(mut self) {
        let name = self.cfg.name.clone();
        let mut watch = match LinkWatch::open() {
            Ok(w) => w,
            Err(e) => {
                warn!("port {name}: cannot watch its VF for re-creation (rtnetlink): {e}");
                return;
            }
        };
        loop {
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
                self.port.mark_vf_gone();
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
                self.port.replace_vf(socks);
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

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Serves the port until a fatal error (its listening socket failing). Frontends coming and
/// going are not errors.
pub fn run_port(cfg: &PortConfig, port: Arc<Port>) -> Result<(), ServerError> {
    match &cfg.socket {
        SocketMode::Listen(path) => {
            let listener = listen(path).map_err(|source| ServerError::Listen {
                port: cfg.name.clone(),
                path: path.clone(),
                source,
            })?;
            info!("port {}: listening on {}", cfg.name, path.display());
            serve_listener(cfg, &port, &listener)
        }
        SocketMode::Inherited(fd) => {
            check_listening_socket(&cfg.name, *fd)?;
            // SAFETY: the fd was checked to be an open listening unix socket, and the user
            // handed it to us to own (libvirt/systemd socket passing).
            let listener = unsafe { UnixListener::from_raw_fd(*fd) };
            info!("port {}: serving inherited socket fd {fd}", cfg.name);
            serve_listener(cfg, &port, &listener)
        }
        SocketMode::Connect(path) => {
            let mut warned = false;
            loop {
                match UnixStream::connect(path) {
                    Ok(stream) => {
                        warned = false;
                        info!("port {}: connected to {}", cfg.name, path.display());
                        serve_connection(cfg, &port, stream);
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
                        thread::sleep(RECONNECT_DELAY);
                    }
                }
            }
        }
    }
}

/// Binds the port's socket, replacing a stale socket file left by an earlier run (but never
/// a file that is not a socket).
fn listen(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
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
    UnixListener::bind(path)
}

fn serve_listener(
    cfg: &PortConfig,
    port: &Arc<Port>,
    listener: &UnixListener,
) -> Result<(), ServerError> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                info!("port {}: frontend connected", cfg.name);
                serve_connection(cfg, port, stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if listener_broken(&e) => {
                return Err(ServerError::Accept {
                    port: cfg.name.clone(),
                    source: e,
                })
            }
            Err(e) => {
                // Out of fds or memory, or a connection reset before we took it: the
                // pending connections wait in the backlog until resources are back. Logged
                // once a second at most, as a flood of frontends can keep this going.
                crate::error_limited!("port {}: accept failed: {e}", cfg.name);
                thread::sleep(RETRY_DELAY);
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
fn serve_connection(cfg: &PortConfig, port: &Arc<Port>, frontend: UnixStream) {
    if let Err(e) = run_session(cfg, port, frontend) {
        crate::error_limited!("{e}; connection closed");
        thread::sleep(RETRY_DELAY);
    }
}

type Daemon = VhostUserDaemon<Arc<NetDevice>>;

/// Serves one frontend connection to its end: a fresh device and daemon, reached through the
/// protocol shim.
fn run_session(
    cfg: &PortConfig,
    port: &Arc<Port>,
    frontend: UnixStream,
) -> Result<(), ServerError> {
    if port.vdpa.is_some() {
        return run_vdpa_session(cfg, port, frontend);
    }
    let io_err = |message: &str, source| ServerError::Io {
        port: cfg.name.clone(),
        message: message.into(),
        source,
    };
    let (mut daemon, _dev) = new_session(cfg, port)?;
    // The library accepts on a listener only; give it a private one and connect the shim.
    let (mut lib_listener, shim_end) = private_connection(&cfg.name)
        .map_err(|e| io_err("cannot set up the backend-side socket", e))?;
    let started = daemon.start(&mut lib_listener);
    drop(lib_listener);
    if let Err(e) = started {
        stop_workers(&daemon);
        warn!("port {}: cannot start serving the frontend: {e}", cfg.name);
        return Ok(());
    }
    let announcer = port.clone();
    let on_rarp: protocol_shim::RarpHandler =
        Box::new(move |mac| crate::announce::announce_logged(&announcer, mac));
    let shim = protocol_shim::spawn(&cfg.name, 2 * cfg.queues, frontend, shim_end, on_rarp)
        .map_err(|e| io_err("cannot start the protocol shim", e))?;
    match daemon.wait() {
        Ok(()) => info!("port {}: frontend disconnected", cfg.name),
        Err(e) => warn!("port {}: frontend connection ended: {e}", cfg.name),
    }
    stop_workers(&daemon);
    port.handlers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    if let Some(h) = daemon.shutdown_handle() {
        h.shutdown();
    }
    let _ = shim.join();
    Ok(())
}

/// Serves one frontend connection in vDPA mode: our own request handler (the session),
/// reached through the same protocol shim as the relay mode, owns the device until the
/// frontend goes away, then resets it and hands it back to the port.
fn run_vdpa_session(
    cfg: &PortConfig,
    port: &Arc<Port>,
    frontend: UnixStream,
) -> Result<(), ServerError> {
    let Some(slot) = &port.vdpa else {
        return Ok(());
    };
    // The sockets and the shim first: if they cannot be had, the device stays in its slot.
    let (ours, shim_end) = UnixStream::pair().map_err(|source| ServerError::Io {
        port: cfg.name.clone(),
        message: "cannot set up the backend-side socket".into(),
        source,
    })?;
    // The vDPA session does not offer the RARP protocol feature (the frames would have to
    // come from the device, which has no way to inject them), so a SEND_RARP is a frontend
    // going beyond what was negotiated: answered, logged, not acted on.
    let port_name = cfg.name.clone();
    let on_rarp: protocol_shim::RarpHandler = Box::new(move |_mac| {
        warn!("port {port_name}: SEND_RARP ignored: a vDPA port does not offer RARP");
    });
    let rings = vdpa::session::NUM_QUEUES;
    let shim =
        protocol_shim::spawn(&cfg.name, rings, frontend, shim_end, on_rarp).map_err(|source| {
            ServerError::Io {
                port: cfg.name.clone(),
                message: "cannot start the protocol shim".into(),
                source,
            }
        })?;
    let dev = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    match dev {
        Some(dev) => serve_vdpa_device(cfg, slot, dev, port.stats.clone(), ours),
        None => {
            warn!(
                "port {}: the vDPA device is still held by the last session",
                cfg.name
            );
            drop(ours);
        }
    }
    // Our end is closed by now, so the shim closes the frontend's and ends.
    let _ = shim.join();
    Ok(())
}

/// Runs the vDPA session on `dev` over `ours` until the frontend goes away, then puts the
/// (reset) device back in `slot`.
fn serve_vdpa_device(
    cfg: &PortConfig,
    slot: &std::sync::Mutex<Option<vdpa::KernelDevice>>,
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
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(dev);
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
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(dev);
        }
        Err(_) => error!("port {}: the vDPA session is still referenced", cfg.name),
    }
}

/// A fresh device and daemon, with each pair's VF socket and reschedule event registered in
/// its worker's epoll.
fn new_session(
    cfg: &PortConfig,
    port: &Arc<Port>,
) -> Result<(Daemon, Arc<NetDevice>), ServerError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let dev = Arc::new(NetDevice::new(port.clone(), mem.clone()));
    let daemon = VhostUserDaemon::new(cfg.name.clone(), dev.clone(), mem).map_err(|cause| {
        ServerError::Daemon {
            port: cfg.name.clone(),
            cause,
        }
    })?;
    let handlers = daemon.get_epoll_handlers();
    // Held while registering, so a VF re-opened meanwhile is registered here or there.
    let mut current = port.handlers.lock().unwrap_or_else(|e| e.into_inner());
    for (i, handler) in handlers.iter().enumerate() {
        let Some(pair) = port.pair(i) else { continue };
        let io_err = |source, what: &str| ServerError::Io {
            port: cfg.name.clone(),
            message: format!("queue pair {i}: cannot watch {what}"),
            source,
        };
        if let Link::Vf(vf) = &pair.link {
            handler
                .register_listener(
                    vf.as_raw_fd(),
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    dev.vf_event_id(),
                )
                .map_err(|e| io_err(e, "the VF socket"))?;
        }
        handler
            .register_listener(
                pair.resched.as_raw_fd(),
                EventSet::IN,
                dev.resched_event_id(),
            )
            .map_err(|e| io_err(e, "its reschedule event"))?;
        if let Link::Vf(_) = &pair.link {
            handler
                .register_listener(
                    pair.counters_timer.as_raw_fd(),
                    EventSet::IN,
                    dev.counters_event_id(),
                )
                .map_err(|e| io_err(e, "its counters timer"))?;
        }
    }
    *current = handlers;
    drop(current);
    Ok((daemon, dev))
}

fn stop_workers(daemon: &Daemon) {
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
}

/// A listener with one connection already pending on it, and that connection's other end.
///
/// The socket is bound in a fresh directory only we can enter, connected to, and then the
/// socket and directory are removed at once (a pending connection survives the unlink), so
/// nothing else can reach the library's side and nothing is left on disk if we are killed.
fn private_connection(port: &str) -> std::io::Result<(Listener, UnixStream)> {
    use std::os::unix::fs::DirBuilderExt;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let safe: String = port
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("vhost-relay.{}.{safe}.{n}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let sock = dir.join("backend.sock");
    let made = UnixListener::bind(&sock).and_then(|l| Ok((l, UnixStream::connect(&sock)?)));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir(&dir);
    let (listener, stream) = made?;
    Ok((Listener::from(listener), stream))
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
    if socket_option(fd, libc::SO_ACCEPTCONN) != Some(1) {
        return Err(bad("not listening"));
    }
    if socket_option(fd, libc::SO_DOMAIN) != Some(libc::AF_UNIX) {
        return Err(bad("not a unix socket"));
    }
    Ok(())
}

/// An integer `SOL_SOCKET` option of `fd`, or `None` if it cannot be read.
fn socket_option(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the local `val`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(val)
}
