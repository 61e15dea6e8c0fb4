//! `vu-frontend`: a vhost-user frontend test driver (what QEMU does, minus the guest) for the
//! vDPA tests, run inside the guest against `vhost-relay --vdpa /dev/vhost-vdpa-N`.
//!
//! ```text
//! vu-frontend --socket PATH --scenario direct|reattach [--packets N] [--size BYTES]
//! ```
//!
//! * `direct`: negotiate, hand over memfd "guest memory" and one queue pair, send N frames on
//!   TX and expect each back intact and in order on RX (the `vduse-net` fixture behind the
//!   vDPA device loops them).
//! * `reattach`: `direct`, then stop the rings as a guest reset does (GET_VRING_BASE,
//!   RESET_DEVICE if offered) and start fresh ones on the same connection, then drop the
//!   connection and connect again; N frames each time.
//!
//! Prints one `vu-frontend scenario=S ... PASS` line and exits 0, or a `FAIL` line and exits 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use qemu_tests::driver::{loopback, DriverMemory, LoopbackReport};
use qemu_tests::frontend::{
    FrontendError, VuSession, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};

const MEM: usize = 16 << 20;
const QSIZE: u16 = 256;
const RINGS: u64 = 0;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
/// A frame that has not come back after this long without progress is lost.
const STALL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("usage: vu-frontend --socket PATH --scenario direct|reattach [--packets N] [--size BYTES] ({0})")]
    Usage(String),
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Driver(#[from] qemu_tests::driver::DriverError),
    #[error(
        "{phase}: sent {sent}, received {received}, corrupt {corrupt} (wanted {want} back intact)"
    )]
    Lost {
        phase: String,
        sent: u32,
        received: u32,
        corrupt: u32,
        want: u32,
    },
}

struct Args {
    socket: PathBuf,
    scenario: String,
    packets: u32,
    size: usize,
}

fn parse() -> Result<Args, Error> {
    let mut a = Args {
        socket: PathBuf::new(),
        scenario: String::new(),
        packets: 1000,
        size: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| Error::Usage(format!("{k} needs a value")))
        };
        match k.as_str() {
            "--socket" => a.socket = v()?.into(),
            "--scenario" => a.scenario = v()?,
            "--packets" => {
                a.packets = v()?
                    .parse()
                    .map_err(|_| Error::Usage("--packets needs a number".into()))?
            }
            "--size" => {
                a.size = v()?
                    .parse()
                    .ok()
                    .filter(|s| (64..=1514).contains(s))
                    .ok_or_else(|| Error::Usage("--size must be 64..=1514".into()))?
            }
            other => return Err(Error::Usage(format!("unknown argument {other}"))),
        }
    }
    if a.socket.as_os_str().is_empty() || a.scenario.is_empty() {
        return Err(Error::Usage("--socket and --scenario are required".into()));
    }
    Ok(a)
}

/// Connects, hands over memory and one queue pair, and prints what the backend offered.
fn attach(socket: &Path, mem: &DriverMemory) -> Result<(VuSession, [u8; 6]), Error> {
    let mut s = VuSession::connect(
        socket,
        1,
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU | VIRTIO_NET_F_STATUS,
    )?;
    let mut mac = [0x52, 0x54, 0x00, 0x00, 0x00, 0x99];
    if let Some(cfg) = s.config(12)? {
        if let Some(m) = cfg.get(..6) {
            mac.copy_from_slice(m);
        }
        let le = |o: usize| cfg.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let m: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
        println!(
            "vu-frontend config mac={} status={:?} max_pairs={:?} mtu={:?}",
            m.join(":"),
            le(6),
            le(8),
            le(10)
        );
    }
    println!(
        "vu-frontend features={:#x} protocol={:#x}",
        s.features,
        s.protocol.bits()
    );
    s.set_mem_table(mem)?;
    s.start_queues(mem, RINGS, QSIZE)?;
    Ok((s, mac))
}

/// Sends `a.packets` frames through the session's first pair and checks they all came back.
fn exchange(
    s: &mut VuSession,
    mem: &DriverMemory,
    mac: [u8; 6],
    a: &Args,
    phase: &str,
) -> Result<LoopbackReport, Error> {
    let (rx, tx) = s.queues.split_at_mut(1);
    let (Some(rx), Some(tx)) = (rx.first_mut(), tx.first_mut()) else {
        return Err(Error::Usage("no queues set up".into()));
    };
    let r = loopback(mem, rx, tx, RX_BUFS, TX_BUFS, mac, a.packets, a.size, STALL)?;
    if r.received != a.packets || r.corrupt != 0 {
        return Err(Error::Lost {
            phase: phase.into(),
            sent: r.sent,
            received: r.received,
            corrupt: r.corrupt,
            want: a.packets,
        });
    }
    println!(
        "vu-frontend {phase}: sent={} received={} corrupt=0",
        r.sent, r.received
    );
    Ok(r)
}

fn run(a: &Args) -> Result<String, Error> {
    let mem = DriverMemory::new(MEM)?;
    match a.scenario.as_str() {
        "direct" => {
            let (mut s, mac) = attach(&a.socket, &mem)?;
            let r = exchange(&mut s, &mem, mac, a, "direct")?;
            Ok(format!("sent={} received={} corrupt=0", r.sent, r.received))
        }
        "reattach" => {
            let (mut s, mac) = attach(&a.socket, &mem)?;
            exchange(&mut s, &mem, mac, a, "first attach")?;
            let bases = s.stop_queues()?;
            println!("vu-frontend stopped, ring bases {bases:?}");
            s.set_mem_table(&mem)?;
            s.start_queues(&mem, RINGS, QSIZE)?;
            exchange(&mut s, &mem, mac, a, "after reset")?;
            drop(s);
            let (mut s, mac) = attach(&a.socket, &mem)?;
            exchange(&mut s, &mem, mac, a, "after reconnect")?;
            Ok(format!("phases=3 packets_each={}", a.packets))
        }
        other => Err(Error::Usage(format!("unknown scenario {other}"))),
    }
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            println!("vu-frontend FAIL: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&a) {
        Ok(summary) => {
            println!("vu-frontend scenario={} {summary} PASS", a.scenario);
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("vu-frontend scenario={} FAIL: {e}", a.scenario);
            ExitCode::FAILURE
        }
    }
}
