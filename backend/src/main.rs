//! `vhost-relay`: command line and wiring only; the work is in the library.
//!
//! Follows the "Backend program conventions" of QEMU's vhost-user specification:
//! `--socket-path`, `--fd`, `--print-capabilities`, plus `--vf`/`--loopback` for the link,
//! `--vf-mode`, `--queues`, `--client`, `--cpu-list` and `--config` for many ports in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Parser;
use log::{error, info, warn};

use vhost_relay::config::{self, PortConfig, PortSpec, SocketMode};
use vhost_relay::metrics::{self, MetricsServer};
use vhost_relay::port::Port;
use vhost_relay::server::{open_port, run_port};
use vhost_relay::signals;

/// How often a config-file port whose VF is missing is retried.
const REOPEN_DELAY: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(
    name = "vhost-relay",
    version,
    about = "vhost-user virtio-net backend relaying a guest NIC to a VF netdev",
    after_help = "Examples:\n  vhost-relay --socket-path /run/vr/vm1.sock --vf enp3s0f0v1 --queues 2\n  vhost-relay --loopback --socket-path /tmp/lb.sock\n  vhost-relay --socket-path /run/vr/vm2.sock --vdpa /dev/vhost-vdpa-0\n  vhost-relay --config /etc/vhost-relay.toml\n\nSend SIGUSR1 to print per-queue counters to stderr."
)]
struct Cli {
    /// vhost-user unix socket: listen on it (QEMU connects), or connect to it with --client.
    #[arg(long, value_name = "PATH")]
    socket_path: Option<PathBuf>,
    /// Serve an already listening socket inherited from libvirt or systemd.
    #[arg(long, value_name = "N", conflicts_with = "socket_path")]
    fd: Option<i32>,
    /// The VF netdev the guest's NIC is bridged to.
    #[arg(long, value_name = "IFNAME")]
    vf: Option<String>,
    /// Send every packet the guest transmits back to it on the same queue pair.
    #[arg(long, conflicts_with = "vf")]
    loopback: bool,
    /// Hand the guest's rings to this kernel vhost-vdpa device (e.g. /dev/vhost-vdpa-0):
    /// packets go between guest and device without passing through this process.
    #[arg(long, value_name = "DEV", conflicts_with_all = ["vf", "loopback"])]
    vdpa: Option<PathBuf>,
    /// Queue pairs (QEMU: -netdev vhost-user,queues=N and virtio-net-pci,mq=on).
    #[arg(long, value_name = "N")]
    queues: Option<usize>,
    /// Connect to a listening frontend (QEMU -chardev socket,server=on) and reconnect when
    /// it goes away.
    #[arg(long)]
    client: bool,
    /// CPUs for the queue-pair workers, one per pair in order, e.g. "2-3".
    #[arg(long, value_name = "LIST")]
    cpu_list: Option<String>,
    /// Longest time an idle queue pair keeps polling before it sleeps (microseconds, default
    /// 50; 0 turns busy-polling off). The actual spin adapts below it to how often polling
    /// finds work.
    #[arg(long, value_name = "US")]
    busy_poll_us: Option<u64>,
    /// Socket kind on the VF: af-packet (default), af-xdp, or auto (AF_XDP if the interface
    /// allows it, else AF_PACKET; the choice and the reason are logged).
    #[arg(long, value_name = "MODE", conflicts_with = "loopback")]
    vf_mode: Option<String>,
    /// How long (microseconds, default 2000) a full VF send queue may take nothing before
    /// the guest's packets waiting for it are dropped; until then they stay in the guest's
    /// ring and are sent again (counted as retries). 0 drops at once.
    #[arg(long, value_name = "US")]
    vf_tx_wait_us: Option<u64>,
    /// Group to give the socket file we create (name or gid), e.g. libvirt-qemu, so QEMU
    /// running as that group can connect.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Permission bits (octal) to give the socket file we create, e.g. 0660.
    #[arg(long, value_name = "MODE")]
    socket_mode: Option<String>,
    /// Serve every [[port]] of a TOML file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["socket_path", "fd", "vf", "loopback", "vdpa", "queues", "client", "cpu_list", "vf_mode", "busy_poll_us", "vf_tx_wait_us", "socket_group", "socket_mode"])]
    config: Option<PathBuf>,
    /// Print the backend's capabilities as JSON (vhost-user spec) and exit.
    #[arg(long)]
    print_capabilities: bool,
    /// Name of the port in logs and counters (default: the socket file's stem).
    #[arg(long)]
    name: Option<String>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. 127.0.0.1:9100); only
    /// there. Also `metrics_listen` in the config file; this wins.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<String>,
}

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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let (ports, from_file, metrics_listen) = match port_configs(cli) {
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

    let mut opened: Vec<(PortConfig, Option<Arc<Port>>)> = Vec::new();
    for cfg in ports {
        match open_port(&cfg) {
            Ok(port) => opened.push((cfg, Some(port))),
            // One port given on the command line: its problem is the program's problem.
            Err(e) if !from_file => {
                eprintln!("vhost-relay: {e}");
                return ExitCode::FAILURE;
            }
            // Many ports: the others must keep running; this one is retried.
            Err(e) => {
                error!("{e}; retrying every {REOPEN_DELAY:?}");
                opened.push((cfg, None));
            }
        }
    }

    let registry = signals::Registry::new(Vec::new());
    // Before any port thread creates its socket: a bind failure then leaves nothing behind.
    let _metrics = match metrics_listen {
        Some(addr) => match start_metrics(addr, &registry) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("vhost-relay: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let mut threads = Vec::new();
    for (cfg, port) in opened {
        let registry = registry.clone();
        let name = cfg.name.clone();
        let spawned = thread::Builder::new()
            .name(format!("port-{name}"))
            .spawn(move || serve(cfg, port, registry));
        match spawned {
            Ok(t) => threads.push((name, t)),
            Err(e) => error!("port {name}: cannot start its thread: {e}"),
        }
    }
    signals::spawn_handler(registry);

    let mut failed = 0;
    let total = threads.len();
    for (name, t) in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!("{e}");
                failed += 1;
            }
            Err(_) => {
                error!("port {name}: its thread panicked");
                failed += 1;
            }
        }
        if failed == total {
            break;
        }
    }
    if !from_file && failed > 0 {
        return ExitCode::FAILURE;
    }
    if failed == total {
        error!("no port left to serve");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Runs one port for good; a port that could not be opened is retried until it can be.
fn serve(
    cfg: PortConfig,
    port: Option<Arc<Port>>,
    registry: signals::Registry,
) -> Result<(), vhost_relay::server::ServerError> {
    let port = match port {
        Some(p) => p,
        None => loop {
            thread::sleep(REOPEN_DELAY);
            match open_port(&cfg) {
                Ok(p) => {
                    info!("port {}: opened after retrying", cfg.name);
                    break p;
                }
                Err(e) => warn!("{e}"),
            }
        },
    };
    registry.add(port.stats.clone());
    run_port(&cfg, port)
}

/// Serves Prometheus metrics on `addr` (see `metrics`); the error says where it could not.
fn start_metrics(addr: SocketAddr, registry: &signals::Registry) -> Result<MetricsServer, String> {
    let registry = registry.clone();
    // Only counters are known here; the state and connection come with the service's
    // snapshots.
    let snapshots = move || {
        let ports = registry.ports();
        ports
            .iter()
            .map(|s| metrics::counters_snapshot(s))
            .collect()
    };
    MetricsServer::spawn(addr, Arc::new(snapshots))
        .map_err(|e| format!("--metrics-listen {addr}: cannot listen there: {e}"))
}

/// The ports to serve, whether they came from a config file (then one port's trouble is
/// not the program's), and where to serve metrics.
fn port_configs(
    mut cli: Cli,
) -> Result<(Vec<PortConfig>, bool, Option<SocketAddr>), config::ConfigError> {
    let metrics_listen = cli
        .metrics_listen
        .take()
        .map(|a| config::parse_metrics_listen(&a))
        .transpose()
        .map_err(|message| config::ConfigError::Invalid {
            origin: "--metrics-listen".into(),
            message,
        })?;
    if let Some(path) = &cli.config {
        let file = config::load(path)?;
        return Ok((file.ports, true, metrics_listen.or(file.metrics_listen)));
    }
    let origin = if cli.fd.is_some() {
        "--fd"
    } else {
        "--socket-path"
    };
    let spec = PortSpec {
        name: cli.name,
        socket: cli.socket_path,
        fd: cli.fd,
        vf: cli.vf,
        loopback: cli.loopback,
        vdpa: cli.vdpa,
        queues: cli.queues,
        client: cli.client,
        cpus: cli.cpu_list,
        busy_poll_us: cli.busy_poll_us,
        vf_mode: cli.vf_mode,
        vf_tx_wait_us: cli.vf_tx_wait_us,
        socket_group: cli.socket_group,
        socket_mode: cli.socket_mode,
    };
    let port = spec.validate(origin)?;
    if let SocketMode::Listen(path) = &port.socket {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(config::ConfigError::Invalid {
                    origin: origin.into(),
                    message: format!("directory {} does not exist", dir.display()),
                });
            }
        }
    }
    Ok((vec![port], false, metrics_listen))
}

/// The JSON the vhost-user spec asks `--print-capabilities` to print.
fn capabilities() -> String {
    serde_json::json!({ "type": "net", "features": [] }).to_string()
}
