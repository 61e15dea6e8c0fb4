//! `vhost-relay`: command line and wiring only; the work is in the library.
//!
//! Follows the "Backend program conventions" of QEMU's vhost-user specification:
//! `--socket-path`, `--fd`, `--print-capabilities`, plus `--vf`/`--loopback` for the link,
//! `--vf-mode`, `--queues`, `--client`, `--cpu-list` and `--config` for many ports in one
//! process; `--control` for the runtime port API and `vhost-relay ctl` to use it.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::warn;

use cli::{Cli, Command, CtlRequest, PortArgs};
use vhost_relay::config::{self, PortConfig, PortSpec};
use vhost_relay::control::{self, Request};
use vhost_relay::metrics::MetricsServer;
use vhost_relay::service::{Origin, Service};
use vhost_relay::systemd::{self, ListenFds};
use vhost_relay::{ctl, signals};

/// How long READY=1 waits for the ports to listen or connect: longer than a port takes to
/// open, shorter than systemd's start timeout (90 s by default).
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Raises the soft fd limit to the hard one. Every connection holds up to
/// `protocol_shim::MAX_MEM_SLOTS` region fds plus its kicks, calls and VF sockets, and the usual
/// soft limit (1024) would let a few busy ports starve the rest; the hard limit is what the
/// operator (systemd's LimitNOFILE, ulimit -Hn) allowed.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                warn!(
                    "cannot raise the open-file limit to {}: {}",
                    lim.rlim_max,
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

fn main() -> ExitCode {
    // --print-capabilities must work whatever else is on the command line (spec).
    if std::env::args().any(|a| a == "--print-capabilities") {
        println!("{}", capabilities());
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    if let Some(Command::Ctl(args)) = cli.command {
        return ctl::run(&args.control, ctl_request(args.request), args.json);
    }
    // First, while this is the only thread: it unsets the LISTEN_* variables.
    let activated = match ListenFds::take() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vhost-relay: socket activation: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let Startup {
        ports,
        origin,
        control: control_path,
        metrics_listen,
    } = match startup(&cli, &activated) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vhost-relay: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = signals::block() {
        eprintln!("vhost-relay: cannot set up signal handling: {e}");
        return ExitCode::FAILURE;
    }
    raise_fd_limit();

    // Bound before any port starts: a second instance on the same control socket changes
    // nothing.
    let control = match control_path
        .as_deref()
        .map(control::ControlSocket::bind)
        .transpose()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhost-relay: {e}");
            return ExitCode::FAILURE;
        }
    };
    warn_unused(&activated, &ports);
    let service = Arc::new(Service::new(cli.config.clone(), activated));
    // Before any port: an address that cannot be had leaves nothing behind.
    let _metrics = match metrics_listen.map(|addr| start_metrics(addr, &service)) {
        Some(Err(e)) => {
            eprintln!("vhost-relay: {e}");
            return ExitCode::FAILURE;
        }
        started => started.and_then(Result::ok),
    };
    for cfg in ports {
        if let Err(e) = service.add(cfg, origin) {
            eprintln!("vhost-relay: {e}");
            return ExitCode::FAILURE;
        }
    }
    if service.snapshots().is_empty() && control.is_none() {
        warn!("no ports, and no --control to add any: send SIGHUP after adding ports to the file");
    }
    if let Some(c) = &control {
        if let Err(e) = c.serve(service.clone()) {
            eprintln!("vhost-relay: {e}");
            return ExitCode::FAILURE;
        }
    }
    // Only a service manager waits for READY=1; without one, signals are taken at once.
    if systemd::has_manager() {
        if !service.wait_settled(READY_WAIT) {
            warn!("a port is still opening after {READY_WAIT:?}; telling systemd we are ready");
        }
        systemd::notify_ready(&service.status_line());
    }
    signals::handle(&service, control)
}

/// A passed socket no port serves is a mistake in the units or the config worth one line
/// (its connections would wait forever).
fn warn_unused(activated: &ListenFds, ports: &[PortConfig]) {
    for (name, fd) in activated.iter() {
        let used = ports
            .iter()
            .any(|p| p.socket == config::SocketMode::Inherited(fd));
        if !used {
            warn!(
                "passed socket '{name}' (fd {fd}) is served by no port: no port is named '{name}'"
            );
        }
    }
}

/// Serves Prometheus metrics on `addr` (see `metrics`); the error says where it could not.
fn start_metrics(addr: SocketAddr, service: &Arc<Service>) -> Result<MetricsServer, String> {
    let service = service.clone();
    MetricsServer::spawn(addr, Arc::new(move || service.snapshots()))
        .map_err(|e| format!("--metrics-listen {addr}: cannot listen there: {e}"))
}

/// What the process starts with: the ports, where they came from, the control socket and
/// the metrics address (the command line's first, else the file's).
struct Startup {
    ports: Vec<PortConfig>,
    origin: Origin,
    control: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
}

fn startup(cli: &Cli, activated: &ListenFds) -> Result<Startup, config::ConfigError> {
    let metrics_listen = cli
        .metrics_listen
        .as_deref()
        .map(config::parse_metrics_listen)
        .transpose()
        .map_err(|message| config::ConfigError::Invalid {
            origin: "--metrics-listen".into(),
            message,
        })?;
    let control = cli.control.clone();
    if let Some(path) = &cli.config {
        let file = config::load_file(path, activated)?;
        return Ok(Startup {
            ports: file.ports,
            origin: Origin::File,
            control: control.or(file.control),
            metrics_listen: metrics_listen.or(file.metrics_listen),
        });
    }
    let given_socket = cli.port.socket_path.is_some() || cli.fd.is_some();
    if !given_socket && activated.is_empty() && control.is_some() {
        // Only a control socket: ports come by `ctl add`.
        return Ok(Startup {
            ports: Vec::new(),
            origin: Origin::CommandLine,
            control,
            metrics_listen,
        });
    }
    let origin = if cli.fd.is_some() {
        "--fd"
    } else if given_socket || activated.is_empty() {
        "--socket-path"
    } else {
        "LISTEN_FDS"
    };
    let mut spec = port_spec(cli.port.clone());
    spec.fd = cli.fd;
    spec.take_activated(activated, origin)?;
    let port = spec.validate(origin)?;
    port.check_socket_dir(origin)?;
    Ok(Startup {
        ports: vec![port],
        origin: Origin::CommandLine,
        control,
        metrics_listen,
    })
}

/// A port's command-line options as a config table, the form every port is checked in.
fn port_spec(a: PortArgs) -> PortSpec {
    PortSpec {
        name: a.name,
        socket: a.socket_path,
        fd: None,
        vf: a.vf,
        loopback: a.loopback,
        vdpa: a.vdpa,
        queues: a.queues,
        client: a.client,
        cpus: a.cpu_list,
        busy_poll_us: a.busy_poll_us,
        vf_mode: a.vf_mode,
        vf_tx_wait_us: a.vf_tx_wait_us,
        socket_group: a.socket_group,
        socket_mode: a.socket_mode,
    }
}

fn ctl_request(r: CtlRequest) -> Request {
    match r {
        CtlRequest::List => Request::List,
        CtlRequest::Show { name } => Request::Show { name },
        CtlRequest::Stats { name } => Request::Stats { name },
        CtlRequest::Add(port) => Request::Add {
            port: Box::new(port_spec(*port)),
        },
        CtlRequest::Remove { name } => Request::Remove { name },
        CtlRequest::Reload => Request::Reload,
    }
}

/// The JSON the vhost-user spec asks `--print-capabilities` to print.
fn capabilities() -> String {
    serde_json::json!({ "type": "net", "features": [] }).to_string()
}
