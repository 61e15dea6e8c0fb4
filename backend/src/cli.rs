//! The command line of `vhost-relay`, apart from main.rs so that the man page generator
//! (`cargo run --example vhost-relay-man`) renders exactly this definition. Depends only on
//! clap and std.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "vhost-relay",
    version,
    about = "vhost-user virtio-net backend relaying a guest NIC to a VF netdev",
    after_help = "Examples:\n  vhost-relay --socket-path /run/vr/vm1.sock --vf enp3s0f0v1 --queues 2\n  vhost-relay --loopback --socket-path /tmp/lb.sock\n  vhost-relay --socket-path /run/vr/vm2.sock --vdpa /dev/vhost-vdpa-0\n  vhost-relay --config /etc/vhost-relay.toml\n\nSend SIGUSR1 to print per-queue counters to stderr."
)]
pub struct Cli {
    /// vhost-user unix socket: listen on it (QEMU connects), or connect to it with --client.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Serve an already listening socket inherited from libvirt or systemd.
    #[arg(long, value_name = "N", conflicts_with = "socket_path")]
    pub fd: Option<i32>,
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
    /// Serve every [[port]] of a TOML file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["socket_path", "fd", "vf", "loopback", "vdpa", "queues", "client", "cpu_list", "vf_mode", "busy_poll_us", "vf_tx_wait_us", "socket_group", "socket_mode"])]
    pub config: Option<PathBuf>,
    /// Print the backend's capabilities as JSON (vhost-user spec) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Name of the port in logs and counters (default: the socket file's stem).
    #[arg(long)]
    pub name: Option<String>,
}
