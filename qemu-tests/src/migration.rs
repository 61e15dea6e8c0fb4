//! Live-migration harness: two simulated hosts on one machine, a guest moved between them
//! while traffic runs.
//!
//! Topology (all inside one namespace the harness creates, nothing routed out):
//!
//! ```text
//!   QEMU (host a) --vhost-user-- backend a --af_packet-- vfa ==veth== vfa-w --+
//!   QEMU (host b) --vhost-user-- backend b --af_packet-- vfb ==veth== vfb-w --+-- br0 (the wire)
//!   peer0 10.0.0.1 (the far end) =========================veth======== vf0 --+
//! ```
//!
//! `NetNs::new` gives the `vf0`/`peer0` pair; here `vf0` is only the peer's port on the bridge.
//! Each host has its own backend process (vhost-relay or DPDK testpmd `net_vhost`) on its own
//! "VF" veth, like two servers whose VFs hang off one switch. The guest boots on one host;
//! moving it means starting a QEMU with the same devices and `-incoming unix:PATH` on the other
//! host, QMP `migrate` on the source, polling `query-migrate`, then quitting the source QEMU
//! (as libvirt does). The learning bridge finds the guest behind the new port once the guest
//! announces itself (`VIRTIO_NET_F_GUEST_ANNOUNCE`).

pub mod scenarios;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::backend::{vhost_relay_bin, Backend, Dir};
use crate::chunk;
use crate::cpio::CpioWriter;
use crate::error::{ensure, Error, Result};
use crate::guest_image::GuestImage;
use crate::netns::{NetNs, GUEST_IP, PEER_IP};
use crate::qemu::{Qemu, QemuConfig};
use crate::qmp::{MigrationInfo, Qmp};
use crate::util;
use crate::BOOT_TIMEOUT;

/// Where the guest's data-stream verifier lives in the guest.
pub const VERIFIER: &str = "/bin/vr-verify";

/// Which vhost-user backend both hosts run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// vhost-relay, the binary under test.
    VhostRelay,
    /// vhost-relay built with the test-only `test-no-rx-log` feature (RX data not logged):
    /// the negative control, which must corrupt the stream.
    VhostRelayNoRxLog,
    /// DPDK testpmd, `net_vhost` forwarded to `net_af_packet`: the reference.
    Testpmd,
}

impl BackendKind {
    /// The name used on the command line and in reports.
    pub fn label(self) -> &'static str {
        match self {
            BackendKind::VhostRelay => "vhost-relay",
            BackendKind::VhostRelayNoRxLog => "vhost-relay (test-no-rx-log)",
            BackendKind::Testpmd => "testpmd",
        }
    }
}

/// Per-queue-pair packet counts of one backend, as far as it reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets written into the guest, per queue pair.
    pub to_guest: Vec<u64>,
    /// Packets taken from the guest, per queue pair.
    pub from_guest: Vec<u64>,
}

impl Counters {
    pub fn total_to_guest(&self) -> u64 {
        self.to_guest.iter().sum()
    }
    pub fn total_from_guest(&self) -> u64 {
        self.from_guest.iter().sum()
    }
    /// `self - before`, per queue pair (saturating; missing pairs count as 0).
    pub fn since(&self, before: &Counters) -> Counters {
        let sub = |a: &[u64], b: &[u64]| {
            a.iter()
                .enumerate()
                .map(|(i, x)| x.saturating_sub(b.get(i).copied().unwrap_or(0)))
                .collect()
        };
        Counters {
            to_guest: sub(&self.to_guest, &before.to_guest),
            from_guest: sub(&self.from_guest, &before.from_guest),
        }
    }
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "to guest {:?}, from guest {:?}",
            self.to_guest, self.from_guest
        )
    }
}

/// Reads vhost-relay's per-virtqueue stats into per-pair counters.
fn relay_counters(stats: &[crate::backend::QueueStat], queues: u16) -> Counters {
    let mut c = Counters {
        to_guest: vec![0; usize::from(queues)],
        from_guest: vec![0; usize::from(queues)],
    };
    for s in stats {
        let pair = usize::from(s.queue / 2);
        let slot = match s.dir {
            Dir::Rx => c.to_guest.get_mut(pair),
            Dir::Tx => c.from_guest.get_mut(pair),
        };
        if let Some(v) = slot {
            *v += s.packets;
        }
    }
    c
}

/// The totals of the last `NIC statistics for port 0` block testpmd printed (`--stats-period`):
/// port 0 is `net_vhost0`, the guest's side. Up to a second old.
pub fn testpmd_vhost_totals(output: &str) -> Result<Counters> {
    let at = output
        .rfind("NIC statistics for port 0")
        .ok_or_else(|| Error::Parse {
            what: "testpmd periodic stats".into(),
            detail: "no `NIC statistics for port 0` yet".into(),
        })?;
    let s = crate::testpmd::parse_port_stats(&output[at..])?;
    Ok(Counters {
        to_guest: vec![s.tx_packets],
        from_guest: vec![s.rx_packets],
    })
}

/// Per-queue counters from the forward statistics testpmd prints when it stops:
/// `Forward Stats for RX Port= 0/Queue= q -> TX Port= 1/Queue= q` then `RX-packets: N
/// TX-packets: M ...`. Port 0 is the guest's: packets it received on queue q came from the
/// guest; packets sent to port 0 on queue q went to the guest. Streams that moved nothing
/// are not printed, so they stay 0.
pub fn testpmd_stream_counters(output: &str, queues: u16) -> Counters {
    let mut c = Counters {
        to_guest: vec![0; usize::from(queues)],
        from_guest: vec![0; usize::from(queues)],
    };
    let num_after = |s: &str, key: &str| -> Option<u64> {
        let rest = &s[s.find(key)? + key.len()..];
        rest.split(|ch: char| !ch.is_ascii_digit())
            .find(|t| !t.is_empty())?
            .parse()
            .ok()
    };
    let mut lines = output.lines();
    while let Some(line) = lines.next() {
        if !line.contains("Forward Stats for RX Port=") {
            continue;
        }
        let Some(counts) = lines.next() else { break };
        let (Some(rx_port), Some(rx_q), Some(tx_q)) = (
            num_after(line, "RX Port="),
            num_after(line, "/Queue="),
            line.rfind("/Queue=")
                .and_then(|i| num_after(&line[i..], "/Queue=")),
        ) else {
            continue;
        };
        let rx = num_after(counts, "RX-packets:").unwrap_or(0);
        let tx = num_after(counts, "TX-packets:").unwrap_or(0);
        if rx_port == 0 {
            if let Some(v) = c.from_guest.get_mut(rx_q as usize) {
                *v += rx;
            }
        } else if let Some(v) = c.to_guest.get_mut(tx_q as usize) {
            *v += tx;
        }
    }
    c
}

/// One simulated host: its VF veth and the backend serving the guest's socket there.
#[derive(Debug)]
pub struct Host {
    pub name: &'static str,
    pub vf: &'static str,
    pub socket: PathBuf,
    pub backend: Backend,
    kind: BackendKind,
    queues: u16,
}

impl Host {
    /// The backend's counters. vhost-relay's are exact (SIGUSR1); testpmd's are the totals of
    /// its first periodic report (every second) printed after the call.
    pub fn counters(&mut self) -> Result<Counters> {
        match self.kind {
            BackendKind::Testpmd => {
                // Wait for a port-0 block printed (completely: port 1's follows it) after
                // this call, so everything sent before the call is in it.
                const HEAD: &str = "NIC statistics for port 0";
                let seen = self.backend.output().matches(HEAD).count();
                let backend = &mut self.backend;
                let text = util::wait_until(
                    "a fresh testpmd statistics report",
                    Duration::from_secs(15),
                    || {
                        backend.ensure_running()?;
                        let out = backend.output();
                        let fresh = out.matches(HEAD).count() > seen
                            && out
                                .rfind(HEAD)
                                .is_some_and(|i| out[i..].contains("NIC statistics for port 1"));
                        Ok(fresh.then_some(out))
                    },
                )?;
                testpmd_vhost_totals(&text)
            }
            _ => Ok(relay_counters(&self.backend.stats()?, self.queues)),
        }
    }

    /// Stops the backend and returns its per-queue totals (testpmd prints them only when it
    /// stops; vhost-relay's are read just before).
    pub fn stop_with_counters(&mut self) -> Result<Counters> {
        match self.kind {
            BackendKind::Testpmd => {
                self.backend.stop();
                Ok(testpmd_stream_counters(&self.backend.output(), self.queues))
            }
            _ => {
                let c = self.counters()?;
                self.backend.stop();
                Ok(c)
            }
        }
    }
}

/// The guest: the QEMU it currently runs in and that QEMU's monitor.
#[derive(Debug)]
pub struct Guest {
    pub qemu: Qemu,
    pub qmp: Qmp,
    /// Index of the host it runs on.
    pub host: usize,
}

/// Figures of one finished migration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Migration {
    pub info: MigrationInfo,
    /// Wall-clock time from `migrate` to `completed` as seen by the harness.
    pub wall: Duration,
}

/// Two hosts, a wire and a guest on one of them.
#[derive(Debug)]
pub struct Lab {
    pub hosts: [Host; 2],
    pub guest: Guest,
    pub ns: NetNs,
    pub kind: BackendKind,
    pub queues: u16,
    cfg: QemuConfig,
    dir: PathBuf,
    generation: u32,
    started: Instant,
    tag: String,
}

impl Lab {
    /// Builds the wire, starts a backend per host and boots the guest on host a (`queues`
    /// queue pairs, 2 CPUs when more than one; packed rings if `packed`). `image` must
    /// contain the verifier (see [`image_with_verifier`]). Everything lives under `dir`.
    pub fn new(
        image: &GuestImage,
        dir: &Path,
        kind: BackendKind,
        (queues, packed): (u16, bool),
        tag: &str,
    ) -> Result<Self> {
        let started = Instant::now();
        let ns = NetNs::new("vrm")?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        // Forward at once (no STP listening delay); ageing stays at the default: the guest's
        // announcement after the move, not a flush, must redirect the bridge.
        ns.ip(&["link", "set", "br0", "type", "bridge", "stp_state", "0"])?;
        ns.ip(&["link", "set", "br0", "type", "bridge", "forward_delay", "0"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        ns.ip(&["link", "set", ns.vf(), "master", "br0"])?;
        for (vf, wire) in [("vfa", "vfa-w"), ("vfb", "vfb-w")] {
            ns.ip(&["link", "add", vf, "type", "veth", "peer", "name", wire])?;
            ns.ip(&["link", "set", wire, "master", "br0"])?;
            ns.ip(&["link", "set", wire, "up"])?;
            ns.ip(&["link", "set", vf, "up"])?;
        }
        if kind == BackendKind::Testpmd {
            // testpmd's net_af_packet reads plain frames (no vnet header): a TSO super-frame or
            // a checksum left for offload by the peer would reach the guest as it is and be
            // dropped there. The peer computes checksums and segments in software instead.
            util::run(ns.command("ethtool").args(["-K", ns.peer(), "tx", "off"]))?;
        }
        let relay_bin = match kind {
            BackendKind::VhostRelay => Some(vhost_relay_bin()?),
            BackendKind::VhostRelayNoRxLog => Some(no_rx_log_bin()?),
            BackendKind::Testpmd => None,
        };
        let start_host = |name: &'static str, vf: &'static str| -> Result<Host> {
            let hdir = dir.join(name);
            std::fs::create_dir_all(&hdir)
                .map_err(|e| Error::io(format!("creating {}", hdir.display()), e))?;
            let socket = dir.join(format!("{name}.sock"));
            let backend = match &relay_bin {
                Some(bin) => Backend::vhost_relay_port_on(bin, &ns, vf, &socket, queues, &hdir)?,
                None => Backend::testpmd_vhost_on(&ns, vf, &socket, queues, &hdir)?,
            };
            Ok(Host {
                name,
                vf,
                socket,
                backend,
                kind,
                queues,
            })
        };
        let a = start_host("a", "vfa")?;
        let b = start_host("b", "vfb")?;
        let mut cfg = QemuConfig::new(image, &a.socket, dir).queues(queues);
        // Debian's kernel zeroes every page it allocates (init_on_alloc), a guest CPU write
        // that re-dirties RX buffer pages right before the backend fills them and so hides
        // many writes the backend forgot to log. Without it, every unlogged write to a page
        // that holds unread data at the switch-over shows.
        cfg.kernel_args = "init_on_alloc=0".into();
        if packed {
            cfg.device_opts.push("packed=on".into());
        }
        if kind == BackendKind::Testpmd {
            // testpmd's io forwarding passes the guest's frames to net_af_packet as they are,
            // so a checksum the guest left to the device (VIRTIO_NET_F_CSUM) would never be
            // filled in and the peer would drop every TCP segment: the guest computes them.
            cfg.extra_args = vec!["-global".into(), "virtio-net-pci.csum=off".into()];
        }
        let gdir = dir.join("qemu-0");
        std::fs::create_dir_all(&gdir)
            .map_err(|e| Error::io(format!("creating {}", gdir.display()), e))?;
        let mut c0 = cfg.clone();
        c0.workdir = gdir;
        let mut qemu = Qemu::boot(&c0, BOOT_TIMEOUT)?;
        if packed {
            qemu.ensure_packed_rings()?;
        }
        let qmp = Qmp::connect(qemu.qmp_path(), Duration::from_secs(20))?;
        let mut lab = Lab {
            hosts: [a, b],
            guest: Guest { qemu, qmp, host: 0 },
            ns,
            kind,
            queues,
            cfg,
            dir: dir.to_path_buf(),
            generation: 0,
            started,
            tag: tag.to_string(),
        };
        lab.step(&format!(
            "guest booted on host a ({}, {queues} queue pair(s))",
            kind.label()
        ));
        crate::guest_ping_until_reply(&mut lab.guest.qemu, PEER_IP, Duration::from_secs(60))?;
        Ok(lab)
    }

    /// Prints a progress line.
    pub fn step(&self, what: &str) {
        eprintln!(
            "[{} +{:.1}s] {what}",
            self.tag,
            self.started.elapsed().as_secs_f64()
        );
    }

    /// The host the guest is not on.
    pub fn other(&self) -> usize {
        1 - self.guest.host
    }

    /// Starts an incoming QEMU on the other host: same devices, its own workdir (and so its
    /// own QMP socket and console log), `-incoming unix:PATH`. Returns it with the URI.
    pub fn spawn_destination(&mut self) -> Result<(Qemu, Qmp, String)> {
        self.generation += 1;
        let gen = self.generation;
        let to = self.other();
        let mut cfg = self.cfg.clone();
        cfg.socket = self.hosts[to].socket.clone();
        cfg.workdir = self.dir.join(format!("qemu-{gen}"));
        std::fs::create_dir_all(&cfg.workdir)
            .map_err(|e| Error::io(format!("creating {}", cfg.workdir.display()), e))?;
        let uri = format!(
            "unix:{}",
            self.dir.join(format!("mig-{gen}.sock")).display()
        );
        cfg.extra_args
            .extend(["-incoming".to_string(), uri.clone()]);
        let mut qemu = Qemu::spawn(&cfg)?;
        let mut qmp = match Qmp::connect(qemu.qmp_path(), Duration::from_secs(30)) {
            Ok(q) => q,
            Err(e) => return Err(qemu.explain(e)),
        };
        let st = qmp.status()?;
        ensure(st == "inmigrate", || {
            format!("destination QEMU is `{st}`, expected `inmigrate`")
        })?;
        Ok((qemu, qmp, uri))
    }

    /// Sends `migrate` to the source.
    pub fn start_migration(&mut self, uri: &str) -> Result<()> {
        self.guest.qmp.execute("migrate", json!({ "uri": uri }))?;
        Ok(())
    }

    /// `query-migrate` on the source.
    pub fn query_migration(&mut self) -> Result<MigrationInfo> {
        let v = self.guest.qmp.execute("query-migrate", json!({}))?;
        Ok(MigrationInfo::from_json(&v))
    }

    /// Polls `query-migrate` every 20 ms until the migration ends or `timeout`.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<MigrationInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.query_migration()?;
            if m.finished() {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "the migration to finish".into(),
                    secs: timeout.as_secs(),
                    detail: format!("; last query-migrate: {m:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Moves the guest to the other host and returns the figures. On success the source
    /// QEMU has been told to quit and the guest's console and monitor are the destination's.
    pub fn migrate(&mut self) -> Result<Migration> {
        let to = self.other();
        let (dst, dst_qmp, uri) = self.spawn_destination()?;
        let t = Instant::now();
        self.start_migration(&uri)?;
        let info = self.wait_migration(Duration::from_secs(300))?;
        let wall = t.elapsed();
        ensure(info.status == "completed", || {
            format!(
                "migration to host {} ended `{}`: {}",
                self.hosts[to].name,
                info.status,
                info.error.as_deref().unwrap_or("")
            )
        })?;
        self.adopt(dst, dst_qmp, to)?;
        self.step(&format!(
            "migrated to host {}: total {} ms, downtime {} ms",
            self.hosts[to].name,
            info.total_time_ms.unwrap_or(0),
            info.downtime_ms.unwrap_or(0)
        ));
        Ok(Migration { info, wall })
    }

    /// Makes the (completed) destination the guest's QEMU and quits the source.
    pub fn adopt(&mut self, dst: Qemu, mut dst_qmp: Qmp, to: usize) -> Result<()> {
        util::wait_until(
            "the destination to run the guest",
            Duration::from_secs(30),
            || Ok((dst_qmp.status()? == "running").then_some(())),
        )?;
        let old = std::mem::replace(
            &mut self.guest,
            Guest {
                qemu: dst,
                qmp: dst_qmp,
                host: to,
            },
        );
        let Guest {
            qemu: mut old_qemu,
            qmp: mut old_qmp,
            ..
        } = old;
        let _ = old_qmp.execute("quit", json!({}));
        if old_qemu.wait_exit(Duration::from_secs(10)).is_err() {
            old_qemu.kill()?;
        }
        Ok(())
    }

    /// Runs a command in the guest (wherever it is now).
    pub fn guest_run(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        self.guest.qemu.run_ok(cmd, timeout)
    }
}

/// A `ping` from the peer to the guest every 10 ms, running until [`PeerPing::stop`].
#[derive(Debug)]
pub struct PeerPing {
    child: Child,
    out: PathBuf,
}

/// What a [`PeerPing`] saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PingResult {
    pub transmitted: u64,
    /// Distinct echo numbers answered.
    pub received: u64,
    /// Echo numbers up to the last answered one that got no answer: packets lost across the
    /// migration (the ones still in flight when ping was stopped do not count).
    pub lost: u64,
    /// The highest echo number answered.
    pub last_answered: u64,
}

impl PeerPing {
    /// Starts `ping -i 0.01 GUEST_IP` inside the namespace (root may use 10 ms).
    pub fn start(ns: &NetNs, dir: &Path) -> Result<Self> {
        let out = dir.join(format!("{}.ping", util::unique_name("peer")));
        let f = std::fs::File::create(&out)
            .map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
        let mut cmd = ns.command("ping");
        cmd.args(["-n", "-i", "0.01", "-W", "1", GUEST_IP])
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting `{}`", util::describe(&cmd)), e))?;
        Ok(PeerPing { child, out })
    }

    /// SIGINT (ping prints its summary), then parses what it printed.
    pub fn stop(mut self) -> Result<PingResult> {
        // Let the last echoes come back before ping is interrupted.
        std::thread::sleep(Duration::from_millis(300));
        util::signal(self.child.id(), libc::SIGINT)?;
        let child = &mut self.child;
        let exited = util::wait_until("ping to print its summary", Duration::from_secs(5), || {
            child
                .try_wait()
                .map_err(|e| Error::io("waiting for ping", e))
        });
        if exited.is_err() {
            let _ = util::stop_child(&mut self.child, Duration::from_secs(2));
        }
        let text = std::fs::read_to_string(&self.out)
            .map_err(|e| Error::io(format!("reading {}", self.out.display()), e))?;
        Ok(parse_ping(&text))
    }
}

impl Drop for PeerPing {
    fn drop(&mut self) {
        let _ = util::stop_child(&mut self.child, Duration::from_secs(2));
    }
}

/// Parses ping's reply lines (`icmp_seq=N`) and its `N packets transmitted` summary.
pub fn parse_ping(text: &str) -> PingResult {
    let mut seen = std::collections::BTreeSet::new();
    let mut transmitted = 0;
    for line in text.lines() {
        if let Some(p) = line.find("icmp_seq=") {
            let digits: String = line[p + 9..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            if line.contains(" bytes from ") {
                if let Ok(n) = digits.parse::<u64>() {
                    seen.insert(n);
                }
            }
        }
        if let Some(p) = line.find(" packets transmitted") {
            transmitted = line[..p]
                .split_whitespace()
                .last()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    let last = seen.iter().next_back().copied().unwrap_or(0);
    let first = seen.iter().next().copied().unwrap_or(1).min(1);
    let lost = (first..=last).filter(|n| !seen.contains(n)).count() as u64;
    PingResult {
        transmitted,
        received: seen.len() as u64,
        lost: if last == 0 { transmitted } else { lost },
        last_answered: last,
    }
}

/// The peer end of a chunk stream into the guest (see [`crate::chunk`]): accepts the guest's
/// verifier and sends numbered chunks until at least `min_chunks` are out and
/// [`StreamSender::finish`] was called, then closes.
#[derive(Debug)]
pub struct StreamSender {
    sent: Arc<AtomicU64>,
    finish: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64>>>,
}

impl StreamSender {
    /// Listens on `PEER_IP:port` inside `ns`.
    pub fn start(ns: &NetNs, port: u16, min_chunks: u64) -> Result<Self> {
        let addr: SocketAddr = format!("{PEER_IP}:{port}")
            .parse()
            .map_err(|_| Error::Check(format!("bad address {PEER_IP}:{port}")))?;
        let listener = ns.tcp_listen(addr)?;
        let sent = Arc::new(AtomicU64::new(0));
        let finish = Arc::new(AtomicBool::new(false));
        let (s, f) = (Arc::clone(&sent), Arc::clone(&finish));
        let thread = std::thread::spawn(move || send_chunks(listener, min_chunks, &s, &f));
        Ok(StreamSender {
            sent,
            finish,
            thread: Some(thread),
        })
    }

    /// Chunks handed to TCP so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` chunks were sent.
    pub fn wait_sent(&self, n: u64, timeout: Duration) -> Result<()> {
        util::wait_until(
            &format!("{n} chunks to be sent into the guest"),
            timeout,
            || Ok((self.sent() >= n).then_some(())),
        )
        .map_err(|e| match e {
            Error::Timeout { what, secs, .. } => Error::Timeout {
                what,
                secs,
                detail: format!(" (sent {})", self.sent()),
            },
            e => e,
        })
    }

    /// Lets the sender close once its minimum is out; returns the number of chunks sent.
    pub fn finish(mut self) -> Result<u64> {
        self.finish.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(Error::Check("stream sender panicked".into()))),
            None => Ok(self.sent()),
        }
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        self.finish.store(true, Ordering::Relaxed);
    }
}

fn send_chunks(
    listener: TcpListener,
    min_chunks: u64,
    sent: &AtomicU64,
    finish: &AtomicBool,
) -> Result<u64> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("listener nonblocking", e))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline || finish.load(Ordering::Relaxed) {
                    return Err(Error::Timeout {
                        what: "the guest's verifier to connect".into(),
                        secs: 120,
                        detail: String::new(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::io("accepting the verifier", e)),
        }
    };
    s.set_nonblocking(false)
        .map_err(|e| Error::io("stream blocking", e))?;
    s.set_write_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| Error::io("write timeout", e))?;
    // 16 chunks per write keeps syscalls few without holding back the sequence.
    const BATCH: usize = 16;
    let mut buf = vec![0u8; BATCH * chunk::CHUNK_LEN];
    let mut seq = 0u64;
    loop {
        if seq >= min_chunks && finish.load(Ordering::Relaxed) {
            break;
        }
        for (i, c) in buf.chunks_exact_mut(chunk::CHUNK_LEN).enumerate() {
            let mut one = [0u8; chunk::CHUNK_LEN];
            chunk::fill(seq + i as u64, &mut one);
            c.copy_from_slice(&one);
        }
        s.write_all(&buf)
            .map_err(|e| Error::io(format!("sending chunks {seq}.. into the guest"), e))?;
        seq += BATCH as u64;
        sent.store(seq, Ordering::Relaxed);
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| Error::io("closing the stream", e))?;
    Ok(seq)
}

/// What the guest's verifier reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub chunks: u64,
    pub bad: u64,
    pub partial: u64,
    pub bytes: u64,
    /// Lines describing the first bad chunks.
    pub detail: String,
}

/// Parses the verifier's output (`vr-verify result chunks=N bad=B partial=P ... bytes=T`).
pub fn parse_verdict(text: &str) -> Option<Verdict> {
    let line = text.lines().find(|l| l.starts_with(chunk::RESULT_PREFIX))?;
    let field = |k: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(Verdict {
        chunks: field("chunks")?,
        bad: field("bad")?,
        partial: field("partial")?,
        bytes: field("bytes")?,
        detail: text
            .lines()
            .filter(|l| l.starts_with("vr-verify bad"))
            .collect::<Vec<_>>()
            .join("\n"),
    })
}

/// Starts `vr-verify` in the guest's background, connecting to `port`, optionally pinned to a
/// CPU mask (`taskset`) and reading at most `max_mib_s`; its output goes to
/// `/tmp/verify-<port>`.
///
/// Started from a subshell, so it is not a child of the console shell: busybox 1.35's ash,
/// idle at its line-editing prompt, exits when a background job of its own ends (`/init`
/// starts a new one), and the SIGHUP of that exit would kill the other background jobs. `setsid` as well, in case anything else ends the shell.
pub fn start_verifier(
    lab: &mut Lab,
    port: u16,
    cpu_mask: Option<u32>,
    max_mib_s: Option<u32>,
) -> Result<()> {
    let pin = cpu_mask
        .map(|m| format!("taskset {m} "))
        .unwrap_or_default();
    let rate = max_mib_s.map(|r| format!(" {r}")).unwrap_or_default();
    lab.guest_run(
        &format!("(setsid {pin}{VERIFIER} {PEER_IP}:{port}{rate} > /tmp/verify-{port} 2>&1 &)"),
        Duration::from_secs(30),
    )?;
    Ok(())
}

/// Waits for the verifier on `port` to finish and returns its verdict.
pub fn verifier_verdict(lab: &mut Lab, port: u16, timeout: Duration) -> Result<Verdict> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = lab.guest_run(&format!("cat /tmp/verify-{port}"), Duration::from_secs(30))?;
        if let Some(v) = parse_verdict(&out) {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("the guest's verifier on port {port}"),
                secs: timeout.as_secs(),
                detail: format!("; its output so far:\n{out}"),
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The test-only vhost-relay build whose RX data copies bypass the dirty log:
/// `$VHOST_RELAY_NO_RX_LOG_BIN`, else built with `cargo build -p vhost-relay --features
/// test-no-rx-log` into its own target directory (`<target>/test-no-rx-log`), so the normal
/// binary the other tests use is never replaced by it.
pub fn no_rx_log_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VHOST_RELAY_NO_RX_LOG_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::BinaryNotFound { tried: vec![p] })
        };
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| util::workspace_root().join("target"))
        .join("test-no-rx-log");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let _lock = util::FileLock::acquire(&util::cache_dir().join("no-rx-log-build.lock"))?;
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-q",
        "-p",
        "vhost-relay",
        "--features",
        "test-no-rx-log",
    ])
    .arg("--target-dir")
    .arg(&target)
    .current_dir(util::workspace_root());
    util::run(&mut cmd)?;
    let bin = target.join("debug").join("vhost-relay");
    ensure(bin.is_file(), || {
        format!("cargo built no {}", bin.display())
    })?;
    Ok(bin)
}

/// The guest image plus `/bin/vr-verify`: the verifier is compiled from `guest/vr_verify.rs`
/// with `rustc` and a static C library (the initramfs has none), packed into a second cpio and
/// appended to the image's initramfs (the kernel unpacks concatenated archives in order). Both
/// are cached, keyed by a hash of their inputs, so the shared image builder stays untouched.
pub fn image_with_verifier(image: &GuestImage) -> Result<GuestImage> {
    let cache = util::cache_dir();
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let main = src_dir.join("guest").join("vr_verify.rs");
    let lib = src_dir.join("src").join("chunk.rs");
    let mut key = Fnv::new();
    for p in [&main, &lib] {
        let b = std::fs::read(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
        key.update(&b);
    }
    let rustc_version = util::run(Command::new(rustc()).arg("--version"))?;
    key.update(rustc_version.as_bytes());
    let base = std::fs::read(&image.initrd)
        .map_err(|e| Error::io(format!("reading {}", image.initrd.display()), e))?;
    key.update(&base);
    let out = cache.join(format!("initramfs-verify-{:016x}.cpio.gz", key.finish()));
    if !out.exists() {
        let _lock = util::FileLock::acquire(&cache.join("guest-image.lock"))?;
        let bin = cache.join(format!("{}.vr-verify", util::unique_name("build")));
        util::run(
            Command::new(rustc())
                .args([
                    "--edition",
                    "2021",
                    "-O",
                    "-C",
                    "target-feature=+crt-static",
                    "-C",
                    "strip=symbols",
                ])
                .arg(&main)
                .arg("-o")
                .arg(&bin),
        )?;
        let exe =
            std::fs::read(&bin).map_err(|e| Error::io(format!("reading {}", bin.display()), e))?;
        let _ = std::fs::remove_file(&bin);
        let mut w = CpioWriter::new();
        w.file(VERIFIER, 0o755, &exe);
        let overlay = gzip(&w.finish())?;
        let tmp = cache.join(format!("{}.tmp", util::unique_name("initramfs-verify")));
        let mut f = std::fs::File::create(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        f.write_all(&base)
            .and_then(|_| f.write_all(&overlay))
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &out)
            .map_err(|e| Error::io(format!("renaming to {}", out.display()), e))?;
    }
    let mut img = image.clone();
    img.initrd = out;
    Ok(img)
}

fn rustc() -> std::ffi::OsString {
    std::env::var_os("RUSTC")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "rustc".into())
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-n", "-6"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("starting gzip", e))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::Check("gzip without stdin".into()))?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io("running gzip", e))?;
    writer
        .join()
        .map_err(|_| Error::Check("gzip writer panicked".into()))?
        .map_err(|e| Error::io("writing to gzip", e))?;
    ensure(out.status.success(), || {
        format!("gzip failed: {}", out.status)
    })?;
    Ok(out.stdout)
}

/// FNV-1a 64: a cache key stable across Rust releases.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = (self.0 ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_losses_are_gaps_before_the_last_reply() {
        let text = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\
            64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.5 ms\n\
            64 bytes from 10.0.0.2: icmp_seq=2 ttl=64 time=0.5 ms\n\
            64 bytes from 10.0.0.2: icmp_seq=5 ttl=64 time=0.5 ms\n\
            64 bytes from 10.0.0.2: icmp_seq=5 ttl=64 time=0.5 ms (DUP!)\n\
            64 bytes from 10.0.0.2: icmp_seq=6 ttl=64 time=0.5 ms\n\
            \n--- 10.0.0.2 ping statistics ---\n\
            7 packets transmitted, 4 received, 42% packet loss, time 60ms\n";
        let r = parse_ping(text);
        assert_eq!(r.transmitted, 7);
        assert_eq!(r.received, 4);
        assert_eq!(r.lost, 2);
        assert_eq!(r.last_answered, 6);
        let none = parse_ping("5 packets transmitted, 0 received, 100% packet loss\n");
        assert_eq!(none.lost, 5);
    }

    #[test]
    fn verdicts_parse() {
        let out = "vr-verify bad chunk 12: Checksum\n\
                   vr-verify result chunks=25600 bad=1 partial=0 first_bad=12 bytes=104857600\n";
        let v = parse_verdict(out).unwrap();
        assert_eq!(
            (v.chunks, v.bad, v.partial, v.bytes),
            (25600, 1, 0, 104857600)
        );
        assert!(v.detail.contains("chunk 12"));
        assert_eq!(parse_verdict("vr-verify: connecting: refused"), None);
    }

    #[test]
    fn testpmd_counters_parse() {
        let periodic = "
  ######################## NIC statistics for port 0  ########################
  RX-packets: 1          RX-missed: 0          RX-bytes:  10
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 2          TX-errors: 0          TX-bytes:  20
  ######################## NIC statistics for port 0  ########################
  RX-packets: 30         RX-missed: 0          RX-bytes:  300
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 40         TX-errors: 0          TX-bytes:  400
  ######################## NIC statistics for port 1  ########################
  RX-packets: 99         RX-missed: 0          RX-bytes:  300
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 98         TX-errors: 0          TX-bytes:  400
";
        let c = testpmd_vhost_totals(periodic).unwrap();
        assert_eq!((c.to_guest, c.from_guest), (vec![40], vec![30]));
        let fwd = "
  ------- Forward Stats for RX Port= 1/Queue= 0 -> TX Port= 0/Queue= 0 -------
  RX-packets: 4              TX-packets: 3              TX-dropped: 1
  ------- Forward Stats for RX Port= 1/Queue= 1 -> TX Port= 0/Queue= 1 -------
  RX-packets: 8              TX-packets: 8              TX-dropped: 0
  ------- Forward Stats for RX Port= 0/Queue= 1 -> TX Port= 1/Queue= 1 -------
  RX-packets: 5              TX-packets: 5              TX-dropped: 0
";
        let c = testpmd_stream_counters(fwd, 2);
        assert_eq!(c.to_guest, vec![3, 8]);
        assert_eq!(c.from_guest, vec![0, 5]);
    }

    #[test]
    fn counters_subtract_per_pair() {
        let a = Counters {
            to_guest: vec![10, 20],
            from_guest: vec![1, 2],
        };
        let b = Counters {
            to_guest: vec![4],
            from_guest: vec![1, 5],
        };
        let d = a.since(&b);
        assert_eq!(d.to_guest, vec![6, 20]);
        assert_eq!(d.from_guest, vec![0, 0]);
        assert_eq!(a.total_to_guest(), 30);
    }
}
