//! The command line, as clap defines it: the one definition that `main.rs` parses and the
//! man page is generated from (so this file depends on clap and std only).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vhost-relay",
    version,
    about = "vhost-user virtio-net backend relaying a guest NIC to a VF netdev",
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  vhost-relay --socket-path /run/vr/vm1.sock --vf enp3s0f0v1 --queues 2\n  vhost-relay --loopback --socket-path /tmp/lb.sock\n  vhost-relay --socket-path /run/vr/vm2.sock --vdpa /dev/vhost-vdpa-0\n  vhost-relay --config /etc/vhost-relay/vhost-relay.toml --control /run/vhost-relay/control.sock\n  vhost-relay ctl --control /run/vhost-relay/control.sock list\n\nSIGHUP re-reads --config; SIGUSR1 prints per-queue counters to stderr; SIGTERM stops cleanly.\n\nUnder systemd socket activation (LISTEN_FDS), a port with no socket serves the passed socket named like it (FileDescriptorName=); with NOTIFY_SOCKET set, READY=1, RELOADING=1 and STOPPING=1 are sent (Type=notify)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub port: PortArgs,
    /// Serve an already listening socket inherited from libvirt or systemd (under socket
    /// activation the passed socket is found without it).
    #[arg(long, value_name = "N", conflicts_with = "socket_path")]
    pub fd: Option<i32>,
    /// Serve every [[port]] of a TOML file (re-read on SIGHUP or `ctl reload`).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["socket_path", "fd", "vf", "loopback", "vdpa", "queues", "client", "cpu_list", "vf_mode", "busy_poll_us", "vf_tx_wait_us", "socket_group", "socket_mode", "name"])]
    pub config: Option<PathBuf>,
    /// Control socket for `vhost-relay ctl` (JSON lines; docs/control.md): list, show and
    /// add ports at runtime.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. 127.0.0.1:9100); only
    /// there. Also `metrics_listen` in the config file; this wins.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
    /// Print the backend's capabilities as JSON (vhost-user spec) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
}

/// One port's options: the same on the command line and in `ctl add`.
#[derive(Args, Debug, Clone, Default)]
pub struct PortArgs {
    /// vhost-user unix socket: listen on it (QEMU connects), or connect to it with --client.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// The VF netdev the guest's NIC is bridged to.
    #[arg(long, value_name = "IFNAME")]
    pub vf: Option<String>,
    /// Send every packet the guest transmits back to it on the same queue pair.
    #[arg(long, conflicts_with = "vf")]
    pub loopback: bool,
    /// Hand the guest's rings to this kernel vhost-vdpa device (e.g. /dev/vhost-vdpa-0):
    /// packets go between guest and device without passing through this process.
    #[arg(long, value_name = "DEV", conflicts_with_all = ["vf", "loopback"])]
    pub vdpa: Option<PathBuf>,
    /// Queue pairs (QEMU: -netdev vhost-user,queues=N and virtio-net-pci,mq=on).
    #[arg(long, value_name = "N")]
    pub queues: Option<usize>,
    /// Connect to a listening frontend (QEMU -chardev socket,server=on) and reconnect when
    /// it goes away.
    #[arg(long)]
    pub client: bool,
    /// CPUs for the queue-pair workers, one per pair in order, e.g. "2-3".
    #[arg(long, value_name = "LIST")]
    pub cpu_list: Option<String>,
    /// Longest time an idle queue pair keeps polling before it sleeps (microseconds, default
    /// 50; 0 turns busy-polling off). The actual spin adapts below it to how often polling
    /// finds work.
    #[arg(long, value_name = "US")]
    pub busy_poll_us: Option<u64>,
    /// Socket kind on the VF: af-packet (default), af-xdp, or auto (AF_XDP if the interface
    /// allows it, else AF_PACKET; the choice and the reason are logged).
    #[arg(long, value_name = "MODE", conflicts_with = "loopback")]
    pub vf_mode: Option<String>,
    /// How long (microseconds, default 2000) a full VF send queue may take nothing before
    /// the guest's packets waiting for it are dropped; until then they stay in the guest's
    /// ring and are sent again (counted as retries). 0 drops at once.
    #[arg(long, value_name = "US")]
    pub vf_tx_wait_us: Option<u64>,
    /// Group to give the socket file we create (name or gid), e.g. libvirt-qemu, so QEMU
    /// running as that group can connect.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Permission bits (octal) to give the socket file we create, e.g. 0660.
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Name of the port in logs and counters (default: the socket file's stem).
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Ask a running vhost-relay (started with --control) about its ports, or change them.
    Ctl(CtlArgs),
}

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The running vhost-relay's control socket (its --control).
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// Print the reply as JSON (one object) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub request: CtlRequest,
}

#[derive(Subcommand, Debug)]
pub enum CtlRequest {
    /// Every port: name, kind, socket, role, state, queue pairs configured / enabled.
    List,
    /// One port in full: negotiated features, VF socket kind, vDPA mode, dirty logging,
    /// worker CPUs, connection uptime.
    Show { name: String },
    /// Per-queue counters (packets, bytes, drops by reason, errors) of one port or all.
    Stats { name: Option<String> },
    /// Start a port: the options of the command line, with the same checks.
    Add(Box<PortArgs>),
    /// Stop a port: its frontend is disconnected, its socket file removed.
    Remove { name: String },
    /// Re-read the config file, as SIGHUP does.
    Reload,
}
