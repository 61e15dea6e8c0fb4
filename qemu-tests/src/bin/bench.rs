//! Benchmark: vhost-relay against DPDK testpmd doing the same work on the same machine.
//!
//! Machines (this one especially: two cores shared with other jobs) are noisy, so every figure
//! that matters is a ratio against the peer measured in the same run, ours and the peer's
//! runs alternating. One forwarding core for the backend (CPU 0), one for the traffic source
//! (CPU 1): testpmd `virtio_user` as the frontend in every scenario.
//!
//! Scenarios:
//! - loopback: testpmd mac-forwarding with `start tx_first 32` against `vhost-relay
//!   --loopback` / testpmd `net_vhost` with io forwarding; 64 and 1518 bytes, mergeable RX
//!   buffers on and off, split rings and packed (`packed_vq=1`);
//! - vf-relay: the frontend sends (testpmd flowgen, which also drains what comes back) through
//!   the backend onto a veth standing for the VF; the veth's peer sends every frame straight
//!   back (a tc mirred hairpin); the backend relays them to the frontend. The peer is testpmd
//!   relaying `net_vhost` to DPDK's driver of the same kind as our VF mode on the same veth:
//!   `net_af_packet` (rings sized as ours) for AF_PACKET, `net_af_xdp` for AF_XDP; our AF_XDP
//!   mode also runs against `net_af_packet` ("af-xdp vs af-packet");
//! - latency: pings from the veth's peer to testpmd answering in icmpecho mode behind the
//!   backend, at 100 per second;
//! - memory: vhost-relay's resident memory per port and per queue pair.
//!
//! Run as root: `scripts/bench.sh [--quick] [--runs N] [--secs S] [--no-write]`.
//!
//! `--baseline BIN` makes the peer another vhost-relay binary (say, one built from the commit
//! before a change) instead of DPDK, so a change is checked for regressions against the tree
//! before it in the same run, alternating. Such a table compares two of our builds, so it is
//! only printed, never written into docs/performance.md.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use qemu_tests::backend::{vhost_relay_bin, Dir, QueueStat, TestpmdVf};
use qemu_tests::testpmd::PortStats;
use qemu_tests::{
    check_prerequisites, util, Backend, Error, FrontendOptions, NetNs, Result, ScratchDir,
    TestpmdFrontend, PEER_IP,
};

/// CPU of the backend's forwarding thread; the traffic source forwards on the other one.
const BACKEND_CPU: u8 = 0;
const SOURCE_CPU: u8 = 1;
const RING: u16 = 1024;
/// Address testpmd answers pings on in the latency scenario (any address in the peer's
/// subnet: icmpecho answers ARP and ICMP for every address).
const ECHO_IP: &str = "10.0.0.2";
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
struct Opts {
    quick: bool,
    runs: usize,
    secs: f64,
    write: bool,
    only: Option<String>,
    /// The peer is vhost-relay from this binary instead of DPDK testpmd.
    baseline: Option<PathBuf>,
}

fn parse_args() -> std::result::Result<Opts, String> {
    let mut o = Opts {
        quick: false,
        runs: 5,
        secs: 5.0,
        write: true,
        only: None,
        baseline: None,
    };
    let mut args = std::env::args().skip(1);
    let mut runs_set = false;
    let mut secs_set = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--runs" => {
                o.runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--runs needs a positive number")?;
                runs_set = true;
            }
            "--secs" => {
                o.secs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&s: &f64| s > 0.0)
                    .ok_or("--secs needs a positive number")?;
                secs_set = true;
            }
            "--no-write" => o.write = false,
            "--only" => o.only = Some(args.next().ok_or("--only needs a scenario name prefix")?),
            "--baseline" => {
                let bin = PathBuf::from(args.next().ok_or("--baseline needs a vhost-relay binary")?);
                if !bin.is_file() {
                    return Err(format!("--baseline: {} is not a file", bin.display()));
                }
                o.baseline = Some(bin);
            }
            "-h" | "--help" => {
                return Err(
                    "usage: bench [--quick] [--runs N] [--secs S] [--only PREFIX] [--no-write] \
                     [--baseline BIN]\n\
                     --quick: 2 runs of 2 s each (a smoke test of the benchmark itself)\n\
                     --baseline BIN: the peer is the vhost-relay binary BIN, not DPDK (printed only)"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if o.baseline.is_some() {
        o.write = false;
    }
    if o.quick {
        if !runs_set {
            o.runs = 2;
        }
        if !secs_set {
            o.secs = 2.0;
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match bench(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Ours,
    Peer,
}

/// One throughput measurement, as the traffic source received it back.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    pps: f64,
    /// Layer-2 bits per second (frames without CRC, as testpmd counts bytes).
    bps: f64,
    /// Packets per second the source sent (vf-relay: offered load).
    tx_pps: f64,
    /// The backend's CPU nanoseconds per packet it took in (from the guest, and in vf-relay
    /// from the VF), its busy-poll spinning left out: ours from its `busy_ns` counters,
    /// testpmd's from `--record-core-cycles`. Steadier than Mpps on a shared machine, as
    /// time the CPU is taken away (steal, the source's thread) is not in it.
    cpu_ns: Option<f64>,
}

/// A throughput scenario.
#[derive(Clone, Debug)]
struct Scenario {
    name: String,
    vf: bool,
    size: u16,
    mergeable: bool,
    /// Packed virtqueues (the frontend's `packed_vq=1`).
    packed: bool,
    /// vhost-relay's `--vf-mode` in a vf-relay scenario; `None` is the default (AF_PACKET).
    vf_mode: Option<&'static str>,
    /// The peer's VF driver in a vf-relay scenario.
    peer_vf: TestpmdVf,
}

fn scenarios() -> Vec<Scenario> {
    let mut v = Vec::new();
    for packed in [false, true] {
        for size in [64u16, 1518] {
            for mergeable in [true, false] {
                v.push(Scenario {
                    name: format!(
                        "loopback {size} B mrg {}{}",
                        if mergeable { "on" } else { "off" },
                        if packed { " packed" } else { "" }
                    ),
                    vf: false,
                    size,
                    mergeable,
                    packed,
                    vf_mode: None,
                    peer_vf: TestpmdVf::AfPacket,
                });
            }
        }
    }
    // Each of our VF modes against DPDK's driver of the same kind; our AF_XDP mode also
    // against net_af_packet, what an operator would otherwise run.
    let vf_pairs = [
        (None, TestpmdVf::AfPacket, ""),
        (Some("af-xdp"), TestpmdVf::AfXdp, " af-xdp"),
        (Some("af-xdp"), TestpmdVf::AfPacket, " af-xdp vs af-packet"),
    ];
    for (vf_mode, peer_vf, label) in vf_pairs {
        for size in [64u16, 1518] {
            v.push(Scenario {
                name: format!("vf-relay {size} B{label}"),
                vf: true,
                size,
                mergeable: true,
                packed: false,
                vf_mode,
                peer_vf,
            });
        }
    }
    v
}

fn say(what: &str) {
    eprintln!("==> {what}");
}

fn bench(opts: &Opts) -> Result<()> {
    if !check_prerequisites(&["dpdk-testpmd", "ip", "tc", "ping", "stdbuf"])? {
        return Err(Error::Prerequisite(
            "run as root with DPDK (dpdk-dev), iproute2 and iputils-ping installed".into(),
        ));
    }
    let bin = vhost_relay_bin()?;
    say(&format!("vhost-relay binary: {}", bin.display()));
    let dir = ScratchDir::new("vrt-bench")?;
    let started = now_utc();
    let load_before = loadavg();
    // Taken now: the binaries were built from this tree.
    let machine = machine();

    let wanted = |name: &str| opts.only.as_deref().is_none_or(|p| name.starts_with(p));
    let mut rows = Vec::new();
    for sc in scenarios().into_iter().filter(|s| wanted(&s.name)) {
        let mut ours = Vec::new();
        let mut peer = Vec::new();
        for run in 0..opts.runs {
            // Alternate which goes first, so a drift in machine load hits both alike.
            let order = if run % 2 == 0 {
                [Side::Ours, Side::Peer]
            } else {
                [Side::Peer, Side::Ours]
            };
            for side in order {
                let s = throughput(&sc, side, opts, dir.path())?;
                say(&format!(
                    "{} run {}/{} {:?}: {:.3} Mpps rx ({:.3} Mpps tx), {:.3} Gbit/s, {}",
                    sc.name,
                    run + 1,
                    opts.runs,
                    side,
                    s.pps / 1e6,
                    s.tx_pps / 1e6,
                    s.bps / 1e9,
                    s.cpu_ns.map_or("no CPU figure".into(), |ns| format!(
                        "{ns:.1} ns/packet CPU"
                    ))
                ));
                match side {
                    Side::Ours => ours.push(s),
                    Side::Peer => peer.push(s),
                }
            }
        }
        rows.push((sc, ours, peer));
    }

    let latency = if wanted("latency") {
        let mut ours = Vec::new();
        let mut peer = Vec::new();
        for run in 0..opts.runs.min(3) {
            for side in if run % 2 == 0 {
                [Side::Ours, Side::Peer]
            } else {
                [Side::Peer, Side::Ours]
            } {
                let count = if opts.quick { 200 } else { 1000 };
                let mut rtts = latency(side, opts.baseline.as_deref(), count, dir.path())?;
                say(&format!(
                    "latency run {} {side:?}: p50 {:.1} us, p99 {:.1} us ({} replies)",
                    run + 1,
                    percentile(&mut rtts, 50.0),
                    percentile(&mut rtts, 99.0),
                    rtts.len()
                ));
                match side {
                    Side::Ours => ours.extend(rtts),
                    Side::Peer => peer.extend(rtts),
                }
            }
        }
        Some((ours, peer))
    } else {
        None
    };

    let dirty = if wanted("dirty") {
        let mut v = Vec::new();
        for _ in 0..opts.runs.min(3) {
            let d = dirty_log_cost()?;
            say(&format!(
                "dirty log: {:.1} ns/packet off, {:.1} on: throughput ratio {:.3}",
                d.0, d.1, d.2
            ));
            v.push(d);
        }
        Some(v)
    } else {
        None
    };

    let memory = if wanted("memory") {
        Some(memory(dir.path())?)
    } else {
        None
    };

    let command = format!(
        "scripts/bench.sh{}",
        std::env::args()
            .skip(1)
            .map(|a| format!(" {a}"))
            .collect::<String>()
    );
    let report = render(
        opts,
        &machine,
        &command,
        &started,
        (&load_before, &loadavg()),
        Results {
            rows: &rows,
            latency: latency.as_ref(),
            dirty: dirty.as_deref(),
            memory: memory.as_ref(),
        },
    );
    println!("{report}");
    if opts.write {
        let path = util::workspace_root().join("docs/performance.md");
        write_results(&path, &report)?;
        say(&format!("results written to {}", path.display()));
    }
    Ok(())
}

/// Starts the backend of `side`, either looped back or relaying to `ns`'s VF. The peer is
/// DPDK testpmd, or vhost-relay from the `baseline` binary.
fn start_backend(
    side: Side,
    baseline: Option<&Path>,
    ns: Option<&NetNs>,
    vf_mode: Option<&str>,
    peer_vf: TestpmdVf,
    socket: &Path,
    dir: &Path,
) -> Result<Backend> {
    let bin = match (side, baseline) {
        (Side::Peer, None) => {
            let vf = ns.map(|ns| (ns, peer_vf));
            return Backend::testpmd_bench(vf, socket, BACKEND_CPU, dir);
        }
        (Side::Peer, Some(bin)) => bin.to_path_buf(),
        (Side::Ours, _) => vhost_relay_bin()?,
    };
    let sock = socket.display().to_string();
    let cpu = BACKEND_CPU.to_string();
    let mut args = vec!["--socket-path", &sock, "--cpu-list", &cpu];
    match ns {
        Some(ns) => args.extend(["--vf", ns.vf()]),
        None => args.push("--loopback"),
    }
    if let (Some(_), Some(mode)) = (ns, vf_mode) {
        args.extend(["--vf-mode", mode]);
    }
    let mut b = Backend::vhost_relay_from(&bin, ns, &args, dir, 1)?;
    b.wait_for_socket(socket, Duration::from_secs(10))?;
    Ok(b)
}

/// A namespace whose veth peer sends every frame straight back (the "wire" of the VF
/// scenario): an ingress u32 match-all filter redirecting to its own egress.
fn hairpin_netns() -> Result<NetNs> {
    let ns = NetNs::new("vrt-bench")?;
    let peer = ns.peer();
    ns.sh(&format!(
        "tc qdisc add dev {peer} ingress && \
         tc filter add dev {peer} parent ffff: protocol all u32 match u32 0 0 \
         action mirred egress redirect dev {peer}"
    ))?;
    Ok(ns)
}

fn throughput(sc: &Scenario, side: Side, opts: &Opts, dir: &Path) -> Result<Sample> {
    let ns = if sc.vf { Some(hairpin_netns()?) } else { None };
    let socket = dir.join(util::unique_name("b").replace('-', "") + ".sock");
    let mut backend = start_backend(
        side,
        opts.baseline.as_deref(),
        ns.as_ref(),
        sc.vf_mode,
        sc.peer_vf,
        &socket,
        dir,
    )?;
    let fe_opts = FrontendOptions {
        queues: 1,
        ring_size: Some(RING),
        vdev_extra: format!(
            ",mrg_rxbuf={},packed_vq={}",
            u8::from(sc.mergeable),
            u8::from(sc.packed)
        ),
        forwarding_core: Some(SOURCE_CPU),
    };
    let mut fe = TestpmdFrontend::spawn_with(&socket, &fe_opts, dir)?;
    let cmd = |fe: &mut TestpmdFrontend, c: &str| fe.command(c, TIMEOUT);
    if sc.size != 64 {
        cmd(&mut fe, &format!("set txpkts {}", sc.size))?;
    }
    if sc.vf {
        // flowgen sends as fast as it can and counts (then frees) what comes back: the
        // relay's losses do not starve the measurement as they would a fixed set of
        // packets going round.
        cmd(&mut fe, "set fwd flowgen")?;
        cmd(&mut fe, "start")?;
    } else {
        cmd(&mut fe, "set fwd mac")?;
        cmd(&mut fe, "start tx_first 32")?;
    }
    std::thread::sleep(Duration::from_secs_f64(if opts.quick { 1.0 } else { 2.0 }));
    let s0 = fe.port_stats()?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(opts.secs));
    let s1 = fe.port_stats()?;
    let dt = t0.elapsed().as_secs_f64();
    cmd(&mut fe, "stop")?;
    backend.ensure_running()?;
    let testpmd = side == Side::Peer && opts.baseline.is_none();
    let ours_cost = if testpmd {
        None
    } else {
        busy_ns_per_packet(&backend.stats()?, sc.vf)
    };
    let _ = fe.quit();
    backend.stop();
    let cpu_ns = if testpmd {
        testpmd_ns_per_packet(&backend.output())
    } else {
        ours_cost
    };
    drop(ns);
    Ok(Sample {
        cpu_ns,
        ..sample(&s0, &s1, dt)
    })
}

/// vhost-relay's busy time per packet it took in, over its whole run: all its queues' busy
/// time over the packets from the guest (tx), plus from the VF (rx) when relaying (looped
/// back, rx carries the same packets again). `None` from a binary without `busy_ns`.
fn busy_ns_per_packet(stats: &[QueueStat], vf: bool) -> Option<f64> {
    let mut busy = 0u64;
    let mut taken_in = 0u64;
    for q in stats {
        busy += q.busy_ns?;
        if q.dir == Dir::Tx || vf {
            taken_in += q.packets;
        }
    }
    (taken_in > 0).then(|| busy as f64 / taken_in as f64)
}

/// testpmd's own figure, printed when it stops with `--record-core-cycles`: "CPU
/// cycles/packet=C (busy cycles=... / total io packets=N) at M MHz Clock" (cycles of the
/// forwarding iterations that moved packets, over the packets received), in nanoseconds.
fn testpmd_ns_per_packet(output: &str) -> Option<f64> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.contains("CPU cycles/packet="))?;
    let cycles: f64 = line
        .split("CPU cycles/packet=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let mhz: f64 = line
        .split(" at ")
        .last()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| cycles * 1e3 / mhz)
}

fn sample(s0: &PortStats, s1: &PortStats, dt: f64) -> Sample {
    let d = |a: u64, b: u64| b.saturating_sub(a) as f64 / dt;
    Sample {
        pps: d(s0.rx_packets, s1.rx_packets),
        bps: 8.0 * d(s0.rx_bytes, s1.rx_bytes),
        tx_pps: d(s0.tx_packets, s1.tx_packets),
        cpu_ns: None,
    }
}

/// Round-trip times in microseconds of `count` pings at 100 per second from the veth peer
/// through the backend to testpmd answering them.
fn latency(side: Side, baseline: Option<&Path>, count: u32, dir: &Path) -> Result<Vec<f64>> {
    let ns = NetNs::new("vrt-lat")?;
    let socket = dir.join(util::unique_name("l").replace('-', "") + ".sock");
    let mut backend = start_backend(
        side,
        baseline,
        Some(&ns),
        None,
        TestpmdVf::AfPacket,
        &socket,
        dir,
    )?;
    let fe_opts = FrontendOptions {
        queues: 1,
        ring_size: Some(RING),
        vdev_extra: String::new(),
        forwarding_core: Some(SOURCE_CPU),
    };
    let mut fe = TestpmdFrontend::spawn_with(&socket, &fe_opts, dir)?;
    fe.command("set fwd icmpecho", TIMEOUT)?;
    fe.command("start", TIMEOUT)?;
    // Warm up: ARP, caches.
    let _ = util::run(
        ns.command("ping")
            .args(["-c", "20", "-i", "0.01", "-W", "1", ECHO_IP]),
    );
    let out = util::run(ns.command("ping").args([
        "-c",
        &count.to_string(),
        "-i",
        "0.01",
        "-W",
        "1",
        "-I",
        PEER_IP,
        ECHO_IP,
    ]));
    let _ = fe.command("stop", TIMEOUT);
    backend.ensure_running()?;
    let _ = fe.quit();
    backend.stop();
    // ping exits non-zero if any reply was lost; the replies that came still count.
    let text = match out {
        Ok(t) => t,
        Err(Error::Command { output, .. }) => output,
        Err(e) => return Err(e),
    };
    let rtts = parse_ping_times(&text);
    if rtts.len() < count as usize / 2 {
        return Err(Error::Check(format!(
            "latency {side:?}: only {} of {count} pings answered:\n{}",
            rtts.len(),
            util::tail_lines(&text, 10)
        )));
    }
    Ok(rtts)
}

/// `time=0.123 ms` values of ping's output, in microseconds.
fn parse_ping_times(text: &str) -> Vec<f64> {
    text.split_whitespace()
        .filter_map(|w| w.strip_prefix("time="))
        .filter_map(|v| v.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect()
}

/// Resident memory figures of vhost-relay, in KiB.
#[derive(Debug, Default)]
struct Memory {
    /// (what, VmRSS, RssAnon, RssShmem)
    rows: Vec<(String, u64, u64, u64)>,
}

fn rss(pid: u32) -> Result<(u64, u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((get("VmRSS:"), get("RssAnon:"), get("RssShmem:")))
}

fn memory(dir: &Path) -> Result<Memory> {
    let bin = vhost_relay_bin()?;
    let mut m = Memory::default();
    // Per port: idle processes serving 1 and 8 loopback ports of one queue pair.
    for ports in [1usize, 8] {
        let conf = dir.join(format!("mem{ports}.toml"));
        let mut text = String::new();
        for p in 0..ports {
            let _ = writeln!(
                text,
                "[[port]]\nsocket = \"{}\"\nloopback = true\n",
                dir.join(format!("m{ports}p{p}.sock")).display()
            );
        }
        std::fs::write(&conf, text).map_err(|e| Error::io("writing the memory config", e))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--config").arg(&conf).env("RUST_LOG", "warn");
        let mut b = Backend::spawn("vhost-relay", cmd, dir, 0)?;
        b.wait_for_socket(&dir.join(format!("m{ports}p{}.sock", ports - 1)), TIMEOUT)?;
        std::thread::sleep(Duration::from_millis(500));
        let (rss, anon, shmem) = rss(b.pid())?;
        m.rows
            .push((format!("{ports} port(s), idle"), rss, anon, shmem));
        b.stop();
    }
    // A port relaying to a VF: its packet socket rings (mapped from the kernel) count too.
    {
        let ns = NetNs::new("vrt-mem")?;
        let socket = dir.join("mvf.sock");
        let sock = socket.display().to_string();
        let mut b = Backend::vhost_relay(
            Some(&ns),
            &["--socket-path", &sock, "--vf", ns.vf()],
            dir,
            1,
        )?;
        b.wait_for_socket(&socket, TIMEOUT)?;
        std::thread::sleep(Duration::from_millis(500));
        let (rss, anon, shmem) = rss(b.pid())?;
        m.rows
            .push(("1 port relaying to a VF, idle".into(), rss, anon, shmem));
        b.stop();
    }
    // Per queue pair: one port with 1 and 4 pairs, connected and after traffic.
    for queues in [1u16, 4] {
        let socket = dir.join(format!("mq{queues}.sock"));
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--loopback",
            "--queues",
            &queues.to_string(),
            "--socket-path",
        ])
        .arg(&socket)
        .env("RUST_LOG", "warn");
        let mut b = Backend::spawn("vhost-relay", cmd, dir, 0)?;
        b.wait_for_socket(&socket, TIMEOUT)?;
        let fe_opts = FrontendOptions {
            queues,
            ring_size: Some(RING),
            vdev_extra: String::new(),
            forwarding_core: Some(SOURCE_CPU),
        };
        let mut fe = TestpmdFrontend::spawn_with(&socket, &fe_opts, dir)?;
        fe.command("set fwd mac", TIMEOUT)?;
        fe.command("start tx_first 32", TIMEOUT)?;
        std::thread::sleep(Duration::from_secs(1));
        fe.command("stop", TIMEOUT)?;
        let (rss, anon, shmem) = rss(b.pid())?;
        m.rows.push((
            format!("1 port, {queues} queue pair(s), after traffic"),
            rss,
            anon,
            shmem,
        ));
        let _ = fe.quit();
        b.stop();
    }
    Ok(m)
}

/// Runs the backend's dirty-logging micro-benchmark (release build) and returns
/// (ns/packet off, ns/packet on, throughput ratio on/off).
fn dirty_log_cost() -> Result<(f64, f64, f64)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = util::run(
        Command::new(cargo)
            .current_dir(util::workspace_root())
            .args([
                "test",
                "--release",
                "-q",
                "-p",
                "vhost-relay",
                "--lib",
                "tx::tests::dirty_logging_cost",
                "--",
                "--ignored",
                "--exact",
                "--nocapture",
            ]),
    )?;
    parse_dirty_line(&out).ok_or_else(|| Error::Parse {
        what: "dirty-log-bench line".into(),
        detail: out,
    })
}

fn parse_dirty_line(text: &str) -> Option<(f64, f64, f64)> {
    let line = text.lines().find(|l| l.starts_with("dirty-log-bench:"))?;
    let get = |key: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    Some((
        get("off_ns_per_packet=")?,
        get("on_ns_per_packet=")?,
        get("throughput_ratio=")?,
    ))
}

fn median(v: &mut [f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile (sorts `v`).
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn spread(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn now_utc() -> String {
    util::run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = util::run(Command::new("uname").arg("-r"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let dpdk = util::run(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "dpdk-dev"]))
        .unwrap_or_default();
    let rev = util::run(
        Command::new("git")
            .arg("-C")
            .arg(util::workspace_root())
            .args(["describe", "--always", "--dirty"]),
    )
    .map(|s| s.trim().to_string())
    .unwrap_or_default();
    format!("{cpus} x {cpu}, kernel {kernel}, DPDK {dpdk} (testpmd), vhost-relay at {rev}")
}

type Row = (Scenario, Vec<Sample>, Vec<Sample>);

/// Everything measured, for [`render`].
struct Results<'a> {
    rows: &'a [Row],
    latency: Option<&'a (Vec<f64>, Vec<f64>)>,
    dirty: Option<&'a [(f64, f64, f64)]>,
    memory: Option<&'a Memory>,
}

/// The CPU-per-packet table: each side's busy time per packet it took in, and the ratio
/// peer/ours per run pair (above 1: ours costs less per packet).
fn render_cpu(o: &mut String, rows: &[Row]) {
    let cost = |v: &[Sample]| -> Vec<f64> { v.iter().filter_map(|s| s.cpu_ns).collect() };
    let with_figures: Vec<&Row> = rows
        .iter()
        .filter(|(_, ours, peer)| !cost(ours).is_empty() && !cost(peer).is_empty())
        .collect();
    if with_figures.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\nCPU per packet: the backend's busy time (its forwarding iterations that moved \
         packets; busy-poll spinning left out) over the packets it took in. Ours: the \
         `busy_ns` counters of `ctl stats`; testpmd: `--record-core-cycles`.\n\n\
         | scenario | ours ns/packet median (min-max) | peer ns/packet median (min-max) | \
         ratio peer/ours (median of run pairs) |\n|---|---|---|---|"
    );
    for (sc, ours, peer) in with_figures {
        let (mut a, mut b) = (cost(ours), cost(peer));
        let mut ratios: Vec<f64> = ours
            .iter()
            .zip(peer.iter())
            .filter_map(|(x, y)| Some(y.cpu_ns? / x.cpu_ns.filter(|&n| n > 0.0)?))
            .collect();
        let ((amin, amax), (bmin, bmax), (rmin, rmax)) = (spread(&a), spread(&b), spread(&ratios));
        let _ = writeln!(
            o,
            "| {} | {:.1} ({:.1}-{:.1}) | {:.1} ({:.1}-{:.1}) | **{:.2}** ({:.2}-{:.2}) |",
            sc.name,
            median(&mut a),
            amin,
            amax,
            median(&mut b),
            bmin,
            bmax,
            median(&mut ratios),
            rmin,
            rmax
        );
    }
}

fn render(
    opts: &Opts,
    machine: &str,
    command: &str,
    started: &str,
    load: (&str, &str),
    r: Results,
) -> String {
    let Results {
        rows,
        latency,
        dirty,
        memory,
    } = r;
    let mut o = String::new();
    let _ = writeln!(o, "Command: `{command}` (started {started})  ");
    let _ = writeln!(o, "Machine: {machine}  ");
    if let Some(bin) = &opts.baseline {
        let _ = writeln!(
            o,
            "Peer: vhost-relay from `{}` (the baseline), not DPDK  ",
            bin.display()
        );
    }
    let _ = writeln!(o, "Load average before / after: {} / {}  ", load.0, load.1);
    let _ = writeln!(
        o,
        "{} alternating runs per side and scenario, {} s each after warm-up; backend forwarding \
         on CPU {BACKEND_CPU}, traffic source on CPU {SOURCE_CPU}; {RING}-descriptor rings.\n",
        opts.runs, opts.secs
    );
    if !rows.is_empty() {
        let _ = writeln!(
            o,
            "| scenario | ours Mpps median (min-max) | ours Gbit/s | peer Mpps median (min-max) | peer Gbit/s | ratio ours/peer (median of run pairs) |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|");
        for (sc, ours, peer) in rows {
            let mut op: Vec<f64> = ours.iter().map(|s| s.pps / 1e6).collect();
            let mut pp: Vec<f64> = peer.iter().map(|s| s.pps / 1e6).collect();
            let mut ob: Vec<f64> = ours.iter().map(|s| s.bps / 1e9).collect();
            let mut pb: Vec<f64> = peer.iter().map(|s| s.bps / 1e9).collect();
            let mut ratios: Vec<f64> = ours
                .iter()
                .zip(peer)
                .filter(|(_, p)| p.pps > 0.0)
                .map(|(o, p)| o.pps / p.pps)
                .collect();
            let (omin, omax) = spread(&op);
            let (pmin, pmax) = spread(&pp);
            let (rmin, rmax) = spread(&ratios);
            let _ = writeln!(
                o,
                "| {} | {:.2} ({:.2}-{:.2}) | {:.2} | {:.2} ({:.2}-{:.2}) | {:.2} | **{:.2}** ({:.2}-{:.2}) |",
                sc.name,
                median(&mut op),
                omin,
                omax,
                median(&mut ob),
                median(&mut pp),
                pmin,
                pmax,
                median(&mut pb),
                median(&mut ratios),
                rmin,
                rmax
            );
        }
        let peer = if opts.baseline.is_some() {
            "the baseline vhost-relay, run as ours is"
        } else {
            "testpmd `net_vhost` io forwarding (loopback: onto itself; vf-relay: to \
             `net_af_packet` on the same veth, its rings as ours: 1024 frames in 64 KiB \
             blocks; af-xdp rows: to `net_af_xdp` on queue 0, af-xdp vs af-packet rows: to \
             `net_af_packet`)"
        };
        let _ = writeln!(
            o,
            "\nPeer: {peer}. Mpps = packets the traffic source received back; Gbit/s = their \
             layer-2 bytes (no CRC)."
        );
        let vf: Vec<&Row> = rows.iter().filter(|r| r.0.vf).collect();
        if !vf.is_empty() {
            let _ = writeln!(
                o,
                "vf-relay offered load (source TX, Mpps median): {}",
                vf.iter()
                    .map(|(sc, ours, peer)| {
                        let mut a: Vec<f64> = ours.iter().map(|s| s.tx_pps / 1e6).collect();
                        let mut b: Vec<f64> = peer.iter().map(|s| s.tx_pps / 1e6).collect();
                        format!(
                            "{}: ours {:.2}, peer {:.2}",
                            sc.name,
                            median(&mut a),
                            median(&mut b)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        render_cpu(&mut o, rows);
    }
    if let Some((ours, peer)) = latency {
        let (mut a, mut b) = (ours.clone(), peer.clone());
        let _ = writeln!(
            o,
            "\nLatency (ping round trip from the veth peer through the backend to testpmd \
             icmpecho and back, 100 pings/s):\n\n| | p50 us | p99 us | replies |\n|---|---|---|---|"
        );
        let _ = writeln!(
            o,
            "| ours | {:.1} | {:.1} | {} |",
            percentile(&mut a, 50.0),
            percentile(&mut a, 99.0),
            a.len()
        );
        let _ = writeln!(
            o,
            "| peer | {:.1} | {:.1} | {} |",
            percentile(&mut b, 50.0),
            percentile(&mut b, 99.0),
            b.len()
        );
    }
    if let Some(d) = dirty.filter(|d| !d.is_empty()) {
        let mut off: Vec<f64> = d.iter().map(|x| x.0).collect();
        let mut on: Vec<f64> = d.iter().map(|x| x.1).collect();
        let mut ratio: Vec<f64> = d.iter().map(|x| x.2).collect();
        let (rmin, rmax) = spread(&ratio);
        let _ = writeln!(
            o,
            "\nDirty-page logging (backend loopback data path alone, 64 B packets in batches \
             of 64, LOG_ALL off and on with a memfd log attached, alternating; \
             `tx::tests::dirty_logging_cost`): {:.1} ns/packet off, {:.1} ns/packet on, \
             throughput with logging on / off = **{:.2}** ({:.2}-{:.2}, {} runs; the bar is 0.80).",
            median(&mut off),
            median(&mut on),
            median(&mut ratio),
            rmin,
            rmax,
            d.len()
        );
    }
    if let Some(m) = memory {
        let _ = writeln!(
            o,
            "\nMemory of vhost-relay (KiB; RssShmem is guest memory the frontend shared and we \
             touched):\n\n| | VmRSS | RssAnon | RssShmem |\n|---|---|---|---|"
        );
        for (what, rss, anon, shmem) in &m.rows {
            let _ = writeln!(o, "| {what} | {rss} | {anon} | {shmem} |");
        }
        let anon = |i: usize| m.rows.get(i).map_or(0.0, |r| r.2 as f64);
        let _ = writeln!(
            o,
            "\nPer loopback port (anonymous, from 1 to 8 idle ports): {:.0} KiB; per queue pair \
             (anonymous, from 1 to 4 connected pairs): {:.0} KiB.",
            (anon(1) - anon(0)) / 7.0,
            (anon(4) - anon(3)) / 3.0
        );
    }
    o
}

const BEGIN: &str = "<!-- bench:begin (written by scripts/bench.sh) -->";
const END: &str = "<!-- bench:end -->";

/// Replaces the results between the markers of `path`, keeping the hand-written rest.
fn write_results(path: &PathBuf, report: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{report}\n{END}");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(a), Some(b)) if a < b => format!("{}{block}{}", &old[..a], &old[b + END.len()..]),
        _ => format!("{old}\n## Results\n\n{block}\n"),
    };
    std::fs::write(path, new).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), 50.0);
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert!(percentile(&mut [], 50.0).is_nan());
    }

    #[test]
    fn dirty_bench_line() {
        let t = "running 1 test\ndirty-log-bench: batches=8000 off_ns_per_packet=55.9 \
                 on_ns_per_packet=63.1 throughput_ratio=0.886\ntest ... ok\n";
        assert_eq!(parse_dirty_line(t), Some((55.9, 63.1, 0.886)));
        assert_eq!(parse_dirty_line("nothing"), None);
    }

    #[test]
    fn ping_times_in_microseconds() {
        let t = "64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.123 ms\n\
                 64 bytes from 10.0.0.2: icmp_seq=2 ttl=64 time=1.5 ms\n";
        assert_eq!(parse_ping_times(t), vec![123.0, 1500.0]);
    }
}
