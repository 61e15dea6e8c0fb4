//! `vhost-relay`: command line and wiring only; the work is in the library.
//!
//! Follows the "Backend program conventions" of QEMU's vhost-user specification:
//! `--socket-path`, `--fd`, `--print-capabilities`, plus `--vf`/`--loopback` for the link,
//! `--vf-mode`, `--queues`, `--client`, `--cpu-list` and `--config` for many ports in one process.

mod cli;

use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Parser;
use log::{error, info, warn};

use cli::Cli;
use vhost_relay::config::{self, PortConfig, PortSpec, SocketMode};
use vhost_relay::port::Port;
use vhost_relay::server::{open_port, run_port};
use vhost_relay::signals;

/// How often a config-file port whose VF is missing is retried.
const REOPEN_DELAY: Duration = Duration::from_secs(5);

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

    let (ports, from_file) = match port_configs(cli) {
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

/// The ports to serve, and whether they came from a config file (then one port's trouble is
/// not the program's).
fn port_configs(cli: Cli) -> Result<(Vec<PortConfig>, bool), config::ConfigError> {
    if let Some(path) = &cli.config {
        return Ok((config::load_file(path)?, true));
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
    Ok((vec![port], false))
}

/// The JSON the vhost-user spec asks `--print-capabilities` to print.
fn capabilities() -> String {
    serde_json::json!({ "type": "net", "features": [] }).to_string()
}
