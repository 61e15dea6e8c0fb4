//! The running ports of the process, changed at runtime: `ctl add` / `ctl remove`, a reload
//! of the config file (SIGHUP or `ctl reload`), and the stop of everything on SIGTERM.
//!
//! Each port runs on a thread of its own ([`crate::server::run_port`]), tied to the service by
//! its [`PortControl`]: the live record the control socket and metrics read, and the stop
//! request that ends the port (its frontend hung up on, its workers, VF sockets and XDP
//! program gone, its socket file removed) before `remove` returns.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::config::{self, ConfigError, LinkConfig, PortConfig, SocketMode};
use crate::port::Port;
use crate::server::{open_port, run_port, PortControl, ServerError};
use crate::status::{queue_snapshots, PortSnapshot, PortState};
use crate::systemd::{self, ListenFds};

/// How often a config-file port whose VF or vDPA device is missing is retried.
const REOPEN_DELAY: Duration = Duration::from_secs(5);
/// How long `add` waits for a port to listen before it answers anyway.
const START_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Port(#[from] ServerError),
    #[error("a port named '{0}' exists already")]
    DuplicateName(String),
    #[error("port {existing} uses socket {socket} already")]
    DuplicateSocket { existing: String, socket: String },
    #[error("no port named '{0}'")]
    Unknown(String),
    /// The port's thread failed to start serving (`why` names the port).
    #[error("{why}")]
    Start { port: String, why: String },
    #[error("no config file to reload (the process was started without --config)")]
    NoConfigFile,
    #[error("port {port}: {message}: {source}")]
    Io {
        port: String,
        message: &'static str,
        source: std::io::Error,
    },
}

/// Where a port came from, which decides what a reload may do to it and what its failure
/// costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The one port of the command line: its failure is the process's.
    CommandLine,
    /// A `[[port]]` of the config file: reloads start, restart and stop it.
    File,
    /// `ctl add`: stays until `ctl remove`; reloads leave it alone.
    Api,
}

/// One running port.
struct Running {
    cfg: PortConfig,
    origin: Origin,
    control: Arc<PortControl>,
    /// The opened port, once it is (a config-file port may wait for its device).
    opened: Arc<Mutex<Option<Arc<Port>>>>,
    thread: JoinHandle<()>,
}

/// The ports of the process.
pub struct Service {
    ports: Mutex<BTreeMap<String, Running>>,
    config_file: Option<PathBuf>,
    /// The sockets systemd passed at start: a reload's ports without a socket take them by
    /// name again (the fds stay open for the life of the process).
    activated: ListenFds,
    /// Serialises add, remove and reload, so a reload's plan holds until it is carried out;
    /// snapshots only take `ports`, briefly.
    changes: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a socket is named in errors and reports.
pub fn socket_label(socket: &SocketMode) -> String {
    match socket {
        SocketMode::Listen(p) | SocketMode::Connect(p) => p.display().to_string(),
        SocketMode::Inherited(fd) => format!("fd {fd}"),
    }
}

impl Service {
    /// A service with no ports yet; `config_file` is what a reload reads, `activated` the
    /// sockets systemd passed.
    pub fn new(config_file: Option<PathBuf>, activated: ListenFds) -> Self {
        Service {
            ports: Mutex::new(BTreeMap::new()),
            config_file,
            activated,
            changes: Mutex::new(()),
        }
    }

    /// Starts a port. A command-line or `ctl add` port is opened here, so a missing VF is
    /// this call's error and nothing changes; a config-file port is opened on its thread
    /// and retried there until its device appears.
    pub fn add(&self, cfg: PortConfig, origin: Origin) -> Result<(), ServiceError> {
        let _changing = lock(&self.changes);
        self.check_free(&cfg, None)?;
        self.start(cfg, origin)
    }

    /// Stops and forgets the port `name`; it is gone (frontend hung up on, socket file
    /// removed) when this returns.
    pub fn remove(&self, name: &str) -> Result<(), ServiceError> {
        let _changing = lock(&self.changes);
        self.stop_port(name)
            .ok_or_else(|| ServiceError::Unknown(name.into()))
    }

    /// Re-reads the config file: its new ports start, the ports it no longer has stop, the
    /// ports whose table changed restart, and the others are not touched. A file with any
    /// error changes nothing. Ports added through `ctl add` are not the file's: left alone.
    /// systemd hears RELOADING=1 before and READY=1 after, whatever the outcome.
    pub fn reload(&self) -> Result<ReloadSummary, ServiceError> {
        let path = self
            .config_file
            .as_ref()
            .ok_or(ServiceError::NoConfigFile)?;
        systemd::notify_reloading();
        let reloaded = self.reload_file(path);
        systemd::notify_ready(&self.status_line());
        reloaded
    }

    fn reload_file(&self, path: &std::path::Path) -> Result<ReloadSummary, ServiceError> {
        let _changing = lock(&self.changes);
        let file = config::load_file(path, &self.activated)?;
        let wanted = file.ports;
        let plan = self.plan_reload(wanted)?;
        for name in plan.stop.iter().chain(plan.restart.iter().map(|c| &c.name)) {
            self.stop_port(name);
        }
        let summary = ReloadSummary {
            started: plan.start.iter().map(|c| c.name.clone()).collect(),
            restarted: plan.restart.iter().map(|c| c.name.clone()).collect(),
            stopped: plan.stop.clone(),
            unchanged: plan.unchanged,
        };
        for cfg in plan.start.into_iter().chain(plan.restart) {
            self.start(cfg, Origin::File)?;
        }
        info!(
            "reloaded {}: {} started, {} restarted, {} stopped, {} unchanged",
            path.display(),
            summary.started.len(),
            summary.restarted.len(),
            summary.stopped.len(),
            summary.unchanged.len()
        );
        Ok(summary)
    }

    /// What a reload to `wanted` does, checked whole before anything changes.
    fn plan_reload(&self, wanted: Vec<PortConfig>) -> Result<ReloadPlan, ServiceError> {
        let ports = lock(&self.ports);
        let mut plan = ReloadPlan::default();
        for (name, _) in ports.iter().filter(|(_, r)| r.origin == Origin::File) {
            if !wanted.iter().any(|w| &w.name == name) {
                plan.stop.push(name.clone());
            }
        }
        for cfg in wanted {
            match ports.get(&cfg.name) {
                Some(r) if r.origin != Origin::File => {
                    return Err(ServiceError::DuplicateName(cfg.name));
                }
                Some(r) if r.cfg == cfg => plan.unchanged.push(cfg.name),
                Some(_) => plan.restart.push(cfg),
                None => plan.start.push(cfg),
            }
        }
        // The new ports must not take a socket that a port staying (not the file's, or
        // unchanged) holds.
        for cfg in plan.start.iter().chain(&plan.restart) {
            let leaving = |name: &String| {
                plan.stop.contains(name) || plan.restart.iter().any(|c| &c.name == name)
            };
            let staying = ports
                .values()
                .filter(|r| r.cfg.name != cfg.name && !leaving(&r.cfg.name));
            for r in staying {
                if same_socket(&r.cfg.socket, &cfg.socket) {
                    return Err(ServiceError::DuplicateSocket {
                        existing: r.cfg.name.clone(),
                        socket: socket_label(&cfg.socket),
                    });
                }
            }
        }
        Ok(plan)
    }

    /// Stops every port (SIGTERM): all are told at once, then each is waited for.
    pub fn shutdown(&self) {
        let _changing = lock(&self.changes);
        let all: Vec<Running> = std::mem::take(&mut *lock(&self.ports))
            .into_values()
            .collect();
        for r in &all {
            r.control.stop();
        }
        for r in all {
            let _ = r.thread.join();
        }
    }

    /// Waits until every port has left the `opening` state (listening, connecting, waiting
    /// for its device, or broken), at most `timeout`; true if they all did.
    pub fn wait_settled(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            let opening = lock(&self.ports)
                .values()
                .any(|r| r.control.status.state() == PortState::Opening);
            if !opening {
                return true;
            }
            if start.elapsed() > timeout {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The one line systemd shows as the service's status: "2 ports: 1 connected".
    pub fn status_line(&self) -> String {
        let ports = lock(&self.ports);
        let connected = ports
            .values()
            .filter(|r| r.control.status.state() == PortState::Connected)
            .count();
        format!("{} ports: {connected} connected", ports.len())
    }

    /// Every opened port's counters in the fixed stats-line form (SIGUSR1).
    pub fn counters_report(&self) -> String {
        let ports = lock(&self.ports);
        let opened = ports.values().filter_map(|r| lock(&r.opened).clone());
        opened.map(|p| p.stats.to_string()).collect()
    }

    /// Every port, by name.
    pub fn snapshots(&self) -> Vec<PortSnapshot> {
        lock(&self.ports).values().map(snapshot).collect()
    }

    /// One port.
    pub fn snapshot(&self, name: &str) -> Result<PortSnapshot, ServiceError> {
        lock(&self.ports)
            .get(name)
            .map(snapshot)
            .ok_or_else(|| ServiceError::Unknown(name.into()))
    }

    /// Refuses a port whose name or socket another port has (`except`: a port about to be
    /// replaced).
    fn check_free(&self, cfg: &PortConfig, except: Option<&str>) -> Result<(), ServiceError> {
        let ports = lock(&self.ports);
        if ports.contains_key(&cfg.name) && except != Some(cfg.name.as_str()) {
            return Err(ServiceError::DuplicateName(cfg.name.clone()));
        }
        let taken = ports
            .values()
            .filter(|r| except != Some(r.cfg.name.as_str()))
            .find(|r| same_socket(&r.cfg.socket, &cfg.socket));
        match taken {
            Some(r) => Err(ServiceError::DuplicateSocket {
                existing: r.cfg.name.clone(),
                socket: socket_label(&cfg.socket),
            }),
            None => Ok(()),
        }
    }

    fn start(&self, cfg: PortConfig, origin: Origin) -> Result<(), ServiceError> {
        let io = |message, source| ServiceError::Io {
            port: cfg.name.clone(),
            message,
            source,
        };
        let control =
            Arc::new(PortControl::new().map_err(|e| io("cannot create its stop event", e))?);
        let opened = Arc::new(Mutex::new(None));
        if origin != Origin::File {
            *lock(&opened) = Some(open_port(&cfg, &control)?);
        }
        let thread = {
            let (cfg, control, opened) = (cfg.clone(), control.clone(), opened.clone());
            thread::Builder::new()
                .name(format!("port-{}", cfg.name))
                .spawn(move || port_thread(cfg, origin, &control, &opened))
                .map_err(|e| io("cannot start its thread", e))?
        };
        let name = cfg.name.clone();
        let running = Running {
            cfg,
            origin,
            control: control.clone(),
            opened,
            thread,
        };
        lock(&self.ports).insert(name.clone(), running);
        if origin == Origin::File {
            return Ok(());
        }
        // `ctl add` answers once the port listens (or connects), so that whoever added it
        // can start the guest right away; a socket that cannot be bound is its error.
        let started = Instant::now();
        while control.status.state() == PortState::Opening && started.elapsed() < START_TIMEOUT {
            thread::sleep(Duration::from_millis(5));
        }
        if let PortState::Broken(why) = control.status.state() {
            self.stop_port(&name);
            return Err(ServiceError::Start { port: name, why });
        }
        Ok(())
    }

    /// Stops the port `name` and waits for it; `None` if there is no such port.
    fn stop_port(&self, name: &str) -> Option<()> {
        let r = lock(&self.ports).remove(name)?;
        r.control.stop();
        let _ = r.thread.join();
        info!("port {name}: stopped");
        Some(())
    }
}

/// What a reload did, by port name.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadSummary {
    pub started: Vec<String>,
    pub restarted: Vec<String>,
    pub stopped: Vec<String>,
    pub unchanged: Vec<String>,
}

#[derive(Default)]
struct ReloadPlan {
    start: Vec<PortConfig>,
    restart: Vec<PortConfig>,
    stop: Vec<String>,
    unchanged: Vec<String>,
}

fn same_socket(a: &SocketMode, b: &SocketMode) -> bool {
    match (a, b) {
        (SocketMode::Inherited(x), SocketMode::Inherited(y)) => x == y,
        (
            SocketMode::Listen(x) | SocketMode::Connect(x),
            SocketMode::Listen(y) | SocketMode::Connect(y),
        ) => x == y,
        _ => false,
    }
}

/// A port's life on its thread: opened (retried while a config-file port's device is
/// missing), served until stopped. A command-line port that fails takes the process down
/// with it, as it did before there was a service around it.
fn port_thread(
    cfg: PortConfig,
    origin: Origin,
    control: &Arc<PortControl>,
    opened: &Mutex<Option<Arc<Port>>>,
) {
    let existing = lock(opened).clone();
    let port = match existing {
        Some(p) => p,
        None => match open_with_retry(&cfg, control) {
            Some(p) => {
                *lock(opened) = Some(p.clone());
                p
            }
            None => return,
        },
    };
    let served = run_port(&cfg, port, control);
    match served {
        Ok(()) => control.status.set_state(PortState::Stopped),
        Err(e) if origin == Origin::CommandLine => {
            eprintln!("vhost-relay: {e}");
            std::process::exit(1);
        }
        Err(e) => {
            error!("{e}");
            control.status.set_state(PortState::Broken(e.to_string()));
        }
    }
}

/// Opens a config-file port, retrying until its device is there or the port is stopped.
fn open_with_retry(cfg: &PortConfig, control: &Arc<PortControl>) -> Option<Arc<Port>> {
    let mut warned = false;
    loop {
        match open_port(cfg, control) {
            Ok(p) => {
                if warned {
                    info!("port {}: opened after retrying", cfg.name);
                }
                return Some(p);
            }
            Err(e) => {
                if !warned {
                    error!("{e}; retrying every {REOPEN_DELAY:?}");
                    warned = true;
                } else {
                    warn!("{e}");
                }
                control
                    .status
                    .set_state(PortState::WaitingForDevice(e.to_string()));
                if control.stop.sleep(REOPEN_DELAY) {
                    control.status.set_state(PortState::Stopped);
                    return None;
                }
            }
        }
    }
}

/// A report of one running port.
fn snapshot(r: &Running) -> PortSnapshot {
    let cfg = &r.cfg;
    let port = lock(&r.opened).clone();
    let (vf, vdpa_device) = match &cfg.link {
        LinkConfig::Vf(vf) => (Some(vf.clone()), None),
        LinkConfig::Vdpa(p) => (None, Some(p.display().to_string())),
        LinkConfig::Loopback => (None, None),
    };
    let mut snap = PortSnapshot {
        name: cfg.name.clone(),
        kind: match cfg.link {
            LinkConfig::Vf(_) => "vf",
            LinkConfig::Loopback => "loopback",
            LinkConfig::Vdpa(_) => "vdpa",
        },
        socket: socket_label(&cfg.socket),
        role: match cfg.socket {
            SocketMode::Listen(_) => "server",
            SocketMode::Connect(_) => "client",
            SocketMode::Inherited(_) => "fd",
        },
        state: "",
        reason: None,
        queues: cfg.queues,
        queues_enabled: 0,
        vf,
        vf_sockets: port.as_ref().map(|p| p.vf_sockets()).unwrap_or_default(),
        vdpa_device,
        vdpa_mode: None,
        dirty_logging: false,
        cpus: (0..cfg.queues).map(|i| cfg.cpus.get(i).copied()).collect(),
        connection: None,
        connects: 0,
        disconnects: 0,
        queues_stats: port.map(|p| queue_snapshots(&p.stats)).unwrap_or_default(),
    };
    r.control.status.fill(&mut snap);
    snap
}
