//! Starting the vhost-user backend under test (vhost-relay), or DPDK testpmd as a reference
//! backend, and reading vhost-relay's per-queue counters.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::netns::NetNs;
use crate::util;
use test_support::stats::StatsRequest;

pub use test_support::stats::{parse_stats_line, Dir, QueueStat};

/// Finds the vhost-relay binary: `$VHOST_RELAY_BIN`, else `release` then `debug` builds under
/// `$CARGO_TARGET_DIR` (if set) and `<workspace>/target`.
pub fn vhost_relay_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VHOST_RELAY_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::BinaryNotFound { tried: vec![p] })
        };
    }
    let mut dirs = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR").filter(|p| !p.is_empty()) {
        dirs.push(PathBuf::from(t));
    }
    dirs.push(util::workspace_root().join("target"));
    let mut tried = Vec::new();
    for profile in ["release", "debug"] {
        for d in &dirs {
            let p = d.join(profile).join("vhost-relay");
            if p.is_file() {
                return Ok(p);
            }
            tried.push(p);
        }
    }
    Err(Error::BinaryNotFound { tried })
}

/// A running backend process, stopped (SIGTERM, then SIGKILL) by PID on drop.
#[derive(Debug)]
pub struct Backend {
    what: String,
    child: Child,
    stderr_log: PathBuf,
    stdout_log: PathBuf,
    /// How many stats lines one SIGUSR1 produces (2 per queue pair and port).
    stat_lines: usize,
    /// Removed after the process stops (DPDK's runtime directory).
    leftover: Option<PathBuf>,
}

impl Backend {
    /// Starts `cmd` with its output captured to `<workdir>/<tag>.{stdout,stderr}`.
    pub fn spawn(what: &str, mut cmd: Command, workdir: &Path, stat_lines: usize) -> Result<Self> {
        let tag = util::unique_name(what);
        let stderr_log = workdir.join(format!("{tag}.stderr"));
        let stdout_log = workdir.join(format!("{tag}.stdout"));
        let err = std::fs::File::create(&stderr_log)
            .map_err(|e| Error::io(format!("creating {}", stderr_log.display()), e))?;
        let out = std::fs::File::create(&stdout_log)
            .map_err(|e| Error::io(format!("creating {}", stdout_log.display()), e))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting `{}`", util::describe(&cmd)), e))?;
        Ok(Backend {
            what: what.to_string(),
            child,
            stderr_log,
            stdout_log,
            stat_lines,
            leftover: None,
        })
    }

    /// `vhost-relay ARGS` with `RUST_LOG=info`, inside `ns` when given (to see its VF).
    /// `queue_pairs` is the total over all ports, for [`Backend::stats`].
    pub fn vhost_relay(
        ns: Option<&NetNs>,
        args: &[&str],
        workdir: &Path,
        queue_pairs: usize,
    ) -> Result<Self> {
        Self::vhost_relay_from(&vhost_relay_bin()?, ns, args, workdir, queue_pairs)
    }

    /// vhost-relay socket-activated the way the `vhost-relay@.socket` unit does it, by
    /// systemd's own tool: `systemd-socket-activate` binds `socket`, passes it named
    /// `fdname` (FileDescriptorName=) and execs `vhost-relay ARGS` in its own process at the
    /// first connection, with NOTIFY_SOCKET=`notify` (inside `ns` when given). Returns once
    /// the socket is there.
    pub fn vhost_relay_activated(
        ns: Option<&NetNs>,
        socket: &Path,
        fdname: &str,
        notify: &str,
        args: &[&str],
        workdir: &Path,
        queue_pairs: usize,
    ) -> Result<Self> {
        let tool = "systemd-socket-activate";
        let mut cmd = match ns {
            Some(ns) => ns.command(tool),
            None => Command::new(tool),
        };
        cmd.arg("-l")
            .arg(socket)
            .arg(format!("--fdname={fdname}"))
            .arg(format!("--setenv=NOTIFY_SOCKET={notify}"))
            .arg("--setenv=RUST_LOG=info")
            .arg("--")
            .arg(vhost_relay_bin()?)
            .args(args);
        let mut b = Self::spawn("vhost-relay", cmd, workdir, 2 * queue_pairs)?;
        b.wait_for_socket(socket, Duration::from_secs(10))?;
        // QEMU fails at once on a socket not yet listening; the test must not connect first.
        let pid = b.pid();
        util::wait_until(
            &format!("systemd-socket-activate to listen on {}", socket.display()),
            Duration::from_secs(10),
            || Ok(util::unix_socket_listening(pid, socket).then_some(())),
        )?;
        Ok(b)
    }

    /// [`Backend::vhost_relay`] from the binary `bin` (the bench's `--baseline`).
    pub fn vhost_relay_from(
        bin: &Path,
        ns: Option<&NetNs>,
        args: &[&str],
        workdir: &Path,
        queue_pairs: usize,
    ) -> Result<Self> {
        let mut cmd = match ns {
            Some(ns) => ns.command(bin),
            None => Command::new(bin),
        };
        cmd.args(args).env("RUST_LOG", "info");
        Self::spawn("vhost-relay", cmd, workdir, 2 * queue_pairs)
    }
}

/// Runs `vhost-relay ctl --control CONTROL ARGS` and returns its output (an error if it
/// fails, with its stderr line).
pub fn ctl(control: &Path, args: &[&str]) -> Result<String> {
    crate::util::run(
        std::process::Command::new(vhost_relay_bin()?)
            .args(["ctl", "--control"])
            .arg(control)
            .args(args),
    )
}

/// `ctl ARGS --json`'s `result` (a port object for `show`, an array for `list`/`stats`).
pub fn ctl_json(control: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = ctl(control, &[args, &["--json"]].concat())?;
    let reply: serde_json::Value = serde_json::from_str(&out).map_err(|e| Error::Parse {
        what: format!("ctl {args:?}"),
        detail: format!("{e}: {out}"),
    })?;
    Ok(reply["result"].clone())
}

impl Backend {
    /// One vhost-relay port listening on `socket`, relaying to the namespace's VF end.
    pub fn vhost_relay_port(
        ns: &NetNs,
        socket: &Path,
        queues: u16,
        workdir: &Path,
    ) -> Result<Self> {
        Self::vhost_relay_port_with(ns, socket, queues, workdir, &[])
    }

    /// [`Backend::vhost_relay_port`] with more arguments (e.g. `--vf-mode af-xdp`).
    pub fn vhost_relay_port_with(
        ns: &NetNs,
        socket: &Path,
        queues: u16,
        workdir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let sock = socket.display().to_string();
        let q = queues.to_string();
        let mut args = vec!["--socket-path", &sock, "--vf", ns.vf(), "--queues", &q];
        args.extend_from_slice(extra);
        let mut b = Self::vhost_relay(Some(ns), &args, workdir, usize::from(queues))?;
        b.wait_for_socket(socket, Duration::from_secs(10))?;
        Ok(b)
    }

    /// [`Backend::vhost_relay_port`] with `--vf-mode MODE`, checking that the relay's log names
    /// the socket kind it opened (`AF_XDP (` or `AF_PACKET (`). For `af-xdp` the peer's
    /// transmit offloads are turned off first: its stack must finish its own TCP checksums,
    /// since AF_XDP frames carry no "checksum still to do" mark (see docs/usage.md).
    pub fn vhost_relay_port_in_mode(
        ns: &NetNs,
        socket: &Path,
        queues: u16,
        workdir: &Path,
        mode: &str,
    ) -> Result<Self> {
        if mode == "af-xdp" {
            ns.sh(&format!("ethtool -K {} tx off >/dev/null", ns.peer()))?;
        }
        let b = Self::vhost_relay_port_with(ns, socket, queues, workdir, &["--vf-mode", mode])?;
        let kind = if mode == "af-xdp" {
            "AF_XDP ("
        } else {
            "AF_PACKET ("
        };
        crate::error::ensure(b.output().contains(kind), || {
            format!("the relay log does not name {kind}: {}", b.output())
        })?;
        Ok(b)
    }

    /// Like [`Backend::vhost_relay_port`] with a given binary (e.g. a test-only build) and VF
    /// (a namespace may hold several, e.g. one per simulated host).
    pub fn vhost_relay_port_on(
        bin: &Path,
        ns: &NetNs,
        vf: &str,
        socket: &Path,
        queues: u16,
        workdir: &Path,
    ) -> Result<Self> {
        let sock = socket.display().to_string();
        let q = queues.to_string();
        let mut cmd = ns.command(bin);
        cmd.args(["--socket-path", &sock, "--vf", vf, "--queues", &q])
            .env("RUST_LOG", "info");
        let mut b = Self::spawn("vhost-relay", cmd, workdir, 2 * usize::from(queues))?;
        b.wait_for_socket(socket, Duration::from_secs(10))?;
        Ok(b)
    }

    /// `vhost-relay --loopback` listening on `socket`.
    pub fn vhost_relay_loopback(socket: &Path, queues: u16, workdir: &Path) -> Result<Self> {
        Self::vhost_relay_loopback_with(socket, queues, workdir, &[])
    }

    /// [`Backend::vhost_relay_loopback`] with more arguments (e.g. `--metrics-listen`).
    pub fn vhost_relay_loopback_with(
        socket: &Path,
        queues: u16,
        workdir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let sock = socket.display().to_string();
        let q = queues.to_string();
        let mut args = vec!["--loopback", "--socket-path", &sock, "--queues", &q];
        args.extend_from_slice(extra);
        let mut b = Self::vhost_relay(None, &args, workdir, usize::from(queues))?;
        b.wait_for_socket(socket, Duration::from_secs(10))?;
        Ok(b)
    }

    /// DPDK testpmd as the vhost-user backend: `net_vhost` on `socket` forwarded (io mode) to
    /// `net_af_packet` on the namespace's VF end. A reference to validate the harness without
    /// vhost-relay.
    pub fn testpmd_vhost(ns: &NetNs, socket: &Path, workdir: &Path) -> Result<Self> {
        Self::testpmd_vhost_on(ns, ns.vf(), socket, 1, workdir)
    }

    /// Like [`Backend::testpmd_vhost`] on a given VF with `queues` queue pairs (`net_vhost`
    /// `queues=N`, `net_af_packet` `qpairs=N`, one forwarding stream per queue and direction).
    pub fn testpmd_vhost_on(
        ns: &NetNs,
        vf: &str,
        socket: &Path,
        queues: u16,
        workdir: &Path,
    ) -> Result<Self> {
        let queues = queues.max(1);
        let prefix = util::unique_name("vrt-pmd");
        let mut cmd = ns.command("dpdk-testpmd");
        cmd.args(dpdk_eal_args(&prefix))
            .args(["--log-level", "user1,info"])
            .arg("--vdev")
            .arg(format!(
                "net_vhost0,iface={},queues={queues}",
                socket.display()
            ))
            .arg("--vdev")
            .arg(format!("net_af_packet0,iface={vf},qpairs={queues}"))
            .args([
                "--",
                "--forward-mode=io",
                "--stats-period",
                "1",
                "--total-num-mbufs=16384",
                "--nb-cores=1",
            ])
            .arg(format!("--rxq={queues}"))
            .arg(format!("--txq={queues}"));
        let mut b = Self::spawn("testpmd-vhost", cmd, workdir, 0)?;
        b.leftover = Some(dpdk_runtime_dir(&prefix));
        b.wait_for_socket(socket, Duration::from_secs(30))?;
        Ok(b)
    }

    /// DPDK testpmd as the benchmark's peer backend: `net_vhost` on `socket` with io
    /// forwarding on `core` (of 0 and 1), 1024-descriptor rings, either looped back onto
    /// itself (`vf` = `None`) or relayed to the namespace's VF end through `vf`'s driver.
    pub fn testpmd_bench(
        vf: Option<(&NetNs, TestpmdVf)>,
        socket: &Path,
        core: u8,
        workdir: &Path,
    ) -> Result<Self> {
        let prefix = util::unique_name("vrt-pmdb");
        let mut cmd = match vf {
            Some((ns, _)) => ns.command("dpdk-testpmd"),
            None => Command::new("dpdk-testpmd"),
        };
        cmd.args(dpdk_eal_args(&prefix))
            .args(["--main-lcore", if core == 0 { "1" } else { "0" }])
            .arg("--vdev")
            .arg(format!("net_vhost0,iface={},queues=1", socket.display()));
        if let Some((ns, driver)) = vf {
            cmd.arg("--vdev").arg(driver.vdev(ns.vf()));
        }
        cmd.args([
            "--",
            "--forward-mode=io",
            // Its busy cycles per packet, printed when it stops: the bench's CPU figure.
            "--record-core-cycles",
            "--stats-period",
            "100",
            "--total-num-mbufs=16384",
            "--nb-cores=1",
            "--rxd=1024",
            "--txd=1024",
        ]);
        let mut b = Self::spawn("testpmd-bench", cmd, workdir, 0)?;
        b.leftover = Some(dpdk_runtime_dir(&prefix));
        b.wait_for_socket(socket, Duration::from_secs(30))?;
        Ok(b)
    }

    /// The backend's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Path of the captured stderr (vhost-relay's log).
    pub fn stderr_log(&self) -> &Path {
        &self.stderr_log
    }

    /// Captured stdout and stderr so far.
    pub fn output(&self) -> String {
        let read = |p: &Path| {
            std::fs::read(p)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        format!("{}{}", read(&self.stdout_log), read(&self.stderr_log))
    }

    /// Fails with the log tail if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(self.exited(st.to_string())),
            Err(e) => Err(Error::io(format!("checking on {}", self.what), e)),
        }
    }

    fn exited(&self, status: String) -> Error {
        Error::ProcessExited {
            what: self.what.clone(),
            status,
            log: self.stderr_log.clone(),
            tail: format!(
                "{}\n{}",
                util::tail_file(&self.stdout_log, 15),
                util::tail_file(&self.stderr_log, 25)
            ),
        }
    }

    /// Waits for the backend to create its listening socket (QEMU as a client fails at once if
    /// the socket is not there yet).
    pub fn wait_for_socket(&mut self, socket: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            if socket.exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{} to create {}", self.what, socket.display()),
                    secs: timeout.as_secs(),
                    detail: format!("; its log:\n{}", util::tail_file(&self.stderr_log, 20)),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGUSR1 and returns the counters it logs, one entry per virtqueue (sorted by port
    /// and queue).
    pub fn stats(&mut self) -> Result<Vec<QueueStat>> {
        self.ensure_running()?;
        if self.stat_lines == 0 {
            return Err(Error::Check(format!(
                "{} does not report vhost-relay counters",
                self.what
            )));
        }
        let request = StatsRequest::send(self.pid(), &self.stderr_log)
            .map_err(|e| Error::io(format!("asking {} for its counters", self.what), e))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let complete = request
                .answer()
                .map_err(|e| Error::io(format!("reading {}'s counters", self.what), e))?;
            let mut stats: Vec<QueueStat> = complete.lines().filter_map(parse_stats_line).collect();
            if stats.len() >= self.stat_lines {
                stats.sort_by(|a, b| (&a.port, a.queue).cmp(&(&b.port, b.queue)));
                stats.dedup_by(|a, b| a.port == b.port && a.queue == b.queue);
                return Ok(stats);
            }
            self.ensure_running()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "{} stats lines from {} after SIGUSR1",
                        self.stat_lines, self.what
                    ),
                    secs: 10,
                    detail: format!("; got:\n{complete}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The URL vhost-relay serves its metrics at (started with `--metrics-listen`), from the
    /// line it logs once it listens.
    pub fn metrics_url(&mut self) -> Result<String> {
        util::wait_until(
            "vhost-relay to log its metrics URL",
            Duration::from_secs(10),
            || {
                self.ensure_running()?;
                Ok(test_support::metrics::served_url(&self.output()))
            },
        )
    }

    /// Stops the backend (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let st = util::stop_child(&mut self.child, Duration::from_secs(5));
        if let Some(dir) = self.leftover.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        st
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The DPDK driver a bench peer reaches the VF with: the counterpart of each of
/// vhost-relay's VF modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestpmdVf {
    /// `net_af_packet` with [`TESTPMD_AF_PACKET_RING`].
    AfPacket,
    /// `net_af_xdp` on queue 0 (one queue pair, as our port), DPDK's own XDP program.
    AfXdp,
}

impl TestpmdVf {
    fn vdev(self, iface: &str) -> String {
        match self {
            TestpmdVf::AfPacket => {
                format!("net_af_packet0,iface={iface},qpairs=1,{TESTPMD_AF_PACKET_RING}")
            }
            TestpmdVf::AfXdp => format!("net_af_xdp0,iface={iface},start_queue=0,queue_count=1"),
        }
    }

    /// The driver's name, for the bench's tables.
    pub fn name(self) -> &'static str {
        match self {
            TestpmdVf::AfPacket => "net_af_packet",
            TestpmdVf::AfXdp => "net_af_xdp",
        }
    }
}

/// The bench peer's `net_af_packet` rings, configured as vhost-relay's own AF_PACKET rings
/// are by default (`vf::af_packet::RingConfig`): 1024 frames per ring in 64 KiB blocks,
/// rather than DPDK's default of 512 frames in 4 KiB blocks, so neither side gets more
/// room to absorb bursts. Frames are 2048 bytes (DPDK's mbuf data room; a block must hold a
/// whole number of them) where ours are sized for the MTU (1600 bytes at 1500).
pub const TESTPMD_AF_PACKET_RING: &str = "blocksz=65536,framesz=2048,framecnt=1024";

/// Where DPDK keeps a process's runtime files (`--file-prefix`); it outlives the process.
pub fn dpdk_runtime_dir(prefix: &str) -> PathBuf {
    Path::new("/var/run/dpdk").join(prefix)
}

/// The DPDK EAL options every testpmd here runs with: no hugepages (1 GiB of ordinary memory),
/// no PCI devices, its own runtime directory `prefix` (see [`dpdk_runtime_dir`]), cores 0-1.
pub fn dpdk_eal_args(prefix: &str) -> [&str; 8] {
    [
        "--no-huge",
        "-m",
        "1024",
        "--no-pci",
        "--file-prefix",
        prefix,
        "-l",
        "0-1",
    ]
}

/// The counter of virtqueue `queue` of `port` in `stats`.
pub fn find_stat<'a>(stats: &'a [QueueStat], port: &str, queue: u16) -> Result<&'a QueueStat> {
    stats
        .iter()
        .find(|s| s.port == port && s.queue == queue)
        .ok_or_else(|| {
            Error::Check(format!(
                "no counters for port {port} queue {queue} in {stats:?}"
            ))
        })
}

/// `pings` pings each way (echo requests and replies, 98-byte frames) crossed both
/// virtqueues of `port` between the counters `before` and `after`: each queue moved at least
/// 2 × `pings` packets and as many 98-byte frames more, and counted no errors.
pub fn ensure_pings_counted(
    before: &[QueueStat],
    after: &[QueueStat],
    port: &str,
    pings: u64,
) -> Result<()> {
    for q in [0u16, 1] {
        let (b, a) = (find_stat(before, port, q)?, find_stat(after, port, q)?);
        crate::ensure(a.packets >= b.packets + 2 * pings, || {
            format!("queue {q}: {b} -> {a}, expected +{} packets", 2 * pings)
        })?;
        crate::ensure(a.bytes >= b.bytes + 2 * pings * 98, || {
            format!("queue {q}: {b} -> {a}, expected +{} bytes", 2 * pings * 98)
        })?;
        crate::ensure(a.errors == 0, || format!("queue {q} counted errors: {a}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_stat_names_what_is_missing() {
        let s = vec![parse_stats_line(
            "stats port=a queue=0 dir=rx packets=1 bytes=2 drops=0 errors=0",
        )
        .unwrap()];
        assert_eq!(find_stat(&s, "a", 0).unwrap().bytes, 2);
        assert!(matches!(find_stat(&s, "a", 1), Err(Error::Check(m)) if m.contains("queue 1")));
    }
}
