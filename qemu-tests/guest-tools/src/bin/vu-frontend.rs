//! `vu-frontend`: a vhost-user frontend test driver (what QEMU does, minus the guest) for the
//! vDPA tests, run inside the guest against `vhost-relay --vdpa /dev/vhost-vdpa-N`.
//!
//! ```text
//! vu-frontend --socket PATH --scenario direct|reattach|shadow [--packets N] [--size BYTES]
//!             [--write-log PATH]
//! ```
//!
//! * `direct`: negotiate, hand over memfd "guest memory" and one queue pair, send N frames on
//!   TX and expect each back intact and in order on RX (the `vduse-net` fixture behind the
//!   vDPA device loops them).
//! * `reattach`: `direct`, then stop the rings as a guest reset does (GET_VRING_BASE,
//!   RESET_DEVICE if offered) and start fresh ones on the same connection, then drop the
//!   connection and connect again; N frames each time.
//!
//! * `shadow`: what QEMU does to the backend during a migration that ends on this host
//!   (cancelled): a third of the frames direct, then SET_LOG_BASE + LOG_ALL under traffic
//!   (frames in flight), a third while logging, LOG_ALL off (after the frames in flight
//!   drained, so the fixture's write log can be cut there), the rest direct. Every frame must
//!   come back once and in order, and every guest page the fixture wrote while logging
//!   (`--write-log PATH`, the fixture's own record) must be marked in the dirty log, as must
//!   both used rings.
//!
//! Prints one `vu-frontend scenario=S ... PASS` line and exits 0, or a `FAIL` line and exits 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use test_support::driver::{loopback, loopback_with, DriverError, DriverMemory, LoopbackReport};
use test_support::frontend::{
    FrontendError, MigrationLog, VuSession, LOG_PAGE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
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
    #[error("usage: vu-frontend --socket PATH --scenario direct|reattach|shadow [--packets N] [--size BYTES] [--write-log PATH] ({0})")]
    Usage(String),
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Driver(#[from] test_support::driver::DriverError),
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
    #[error("dirty log: {0}")]
    Log(String),
}

struct Args {
    socket: PathBuf,
    scenario: String,
    packets: u32,
    size: usize,
    write_log: Option<PathBuf>,
}

fn parse() -> Result<Args, Error> {
    let mut a = Args {
        socket: PathBuf::new(),
        scenario: String::new(),
        packets: 1000,
        size: 256,
        write_log: None,
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
            "--write-log" => a.write_log = Some(v()?.into()),
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
        "shadow" => shadow(a, &mem),
        other => Err(Error::Usage(format!("unknown scenario {other}"))),
    }
}

/// The `shadow` scenario (see the module docs).
fn shadow(a: &Args, mem: &DriverMemory) -> Result<String, Error> {
    let write_log = a
        .write_log
        .clone()
        .ok_or_else(|| Error::Usage("shadow needs --write-log PATH (the fixture's)".into()))?;
    let wlog_len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (mut s, mac) = attach(&a.socket, mem)?;
    let log = MigrationLog::new(mem.size)?;
    let third = a.packets / 3;
    // The rings are driven here while `s` changes the backend's features under them.
    let mut queues = std::mem::take(&mut s.queues);
    let (rx_used, tx_used) = match (queues.first(), queues.get(1)) {
        (Some(rx), Some(tx)) => (rx.layout.used, tx.layout.used),
        _ => return Err(Error::Usage("no queues set up".into())),
    };
    let mut phase = 0;
    let mut window = (0u64, 0u64);
    let hook_err = |e: FrontendError| DriverError::Hook(e.to_string());
    let mut hook = |r: &LoopbackReport| -> Result<bool, DriverError> {
        if phase == 0 && r.sent >= third {
            // Taken before the switch: the window starts with some direct-mode writes,
            // skipped below up to the device's first write into a shadow ring.
            window.0 = wlog_len(&write_log);
            s.start_logging(&log).map_err(hook_err)?;
            println!(
                "vu-frontend logging on with {} frames in flight (sent={} received={})",
                r.sent - r.received,
                r.sent,
                r.received
            );
            phase = 1;
        } else if phase == 1 && r.sent >= 2 * third {
            if r.received < r.sent {
                return Ok(true);
            }
            s.stop_logging().map_err(hook_err)?;
            // Read after the switch back: the device was reset on the way, and the fixture
            // answers that only between batches, after writing out its record of the last
            // one. Nothing is in flight, so it has written nothing since in direct mode.
            window.1 = wlog_len(&write_log);
            println!(
                "vu-frontend logging off (sent={} received={})",
                r.sent, r.received
            );
            phase = 2;
        }
        Ok(false)
    };
    let (rx, tx) = queues.split_at_mut(1);
    let (Some(rx), Some(tx)) = (rx.first_mut(), tx.first_mut()) else {
        return Err(Error::Usage("no queues set up".into()));
    };
    let r = loopback_with(
        mem,
        rx,
        tx,
        (RX_BUFS, TX_BUFS),
        mac,
        a.packets,
        a.size,
        STALL,
        &mut hook,
    )?;
    if r.received != a.packets || r.corrupt != 0 || phase != 2 {
        return Err(Error::Lost {
            phase: format!("shadow (reached phase {phase})"),
            sent: r.sent,
            received: r.received,
            corrupt: r.corrupt,
            want: a.packets,
        });
    }
    // What the fixture wrote while logging, against the log.
    let text = std::fs::read(&write_log)
        .map_err(|e| Error::Log(format!("reading {}: {e}", write_log.display())))?;
    let (from, to) = (window.0 as usize, window.1 as usize);
    let part = text
        .get(from..to)
        .ok_or_else(|| Error::Log(format!("write log shorter than {to} bytes")))?;
    let dirty = log.pages().map_err(|e| Error::Log(e.to_string()))?;
    let (mut in_guest, mut in_shadow) = (0u64, 0u64);
    // The fixture records a frame as: TX used entry, RX buffer, RX used entry. So from its
    // first write outside guest memory (a shadow used ring) on, it is on the shadow rings,
    // and every guest write after that happened while logging.
    let part = String::from_utf8_lossy(part);
    let mut lines = part.lines().peekable();
    let mut direct_writes_before_switch = 0u64;
    while let Some(l) = lines.peek() {
        let outside = l
            .split_whitespace()
            .next()
            .and_then(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).ok())
            .is_some_and(|iova| iova >= mem.size);
        if outside {
            break;
        }
        direct_writes_before_switch += 1;
        lines.next();
    }
    // Device writes into shadow rings after the window would mean it was cut too early.
    let late_shadow = text
        .get(to..)
        .map(|rest| {
            String::from_utf8_lossy(rest)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter_map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).ok())
                .filter(|&iova| iova >= mem.size)
                .count()
        })
        .unwrap_or(0);
    if late_shadow > 0 {
        let rest = text.get(to..).unwrap_or_default();
        let sample: Vec<String> = String::from_utf8_lossy(rest)
            .lines()
            .take(12)
            .map(str::to_string)
            .collect();
        return Err(Error::Log(format!(
            "{late_shadow} device writes into shadow rings after logging was switched off (window {from}..{to} of {}; next: {sample:?})",
            text.len()
        )));
    }
    println!(
        "vu-frontend write log: {direct_writes_before_switch} direct-mode writes before the switch skipped, {late_shadow} shadow-ring writes after the window"
    );
    for line in lines {
        let mut it = line.split_whitespace();
        let parsed = it.next().and_then(|x| {
            let iova = u64::from_str_radix(x.trim_start_matches("0x"), 16).ok()?;
            let len: u64 = it.next()?.parse().ok()?;
            Some((iova, len))
        });
        let Some((iova, len)) = parsed else {
            return Err(Error::Log(format!("bad write-log line '{line}'")));
        };
        if len == 0 {
            continue;
        }
        if iova >= mem.size {
            // The device's writes into the shadow rings (our memory, not the guest's).
            in_shadow += 1;
            continue;
        }
        in_guest += 1;
        for page in iova / LOG_PAGE..=(iova + len - 1) / LOG_PAGE {
            if !dirty.contains(&page) {
                return Err(Error::Log(format!(
                    "the device wrote {len} bytes at {iova:#x} while logging, page {page} is not marked"
                )));
            }
        }
    }
    if in_guest == 0 || in_shadow == 0 {
        return Err(Error::Log(format!(
            "while logging the device wrote {in_guest} guest ranges and {in_shadow} shadow-ring ranges; both must be non-zero"
        )));
    }
    for (name, used) in [("rx", rx_used), ("tx", tx_used)] {
        if !dirty.contains(&(used / LOG_PAGE)) {
            return Err(Error::Log(format!("{name} used ring page not marked")));
        }
    }
    s.queues = queues;
    Ok(format!(
        "sent={} received={} corrupt=0 logged_device_writes={in_guest} shadow_ring_writes={in_shadow} dirty_pages={}",
        r.sent,
        r.received,
        dirty.len()
    ))
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
