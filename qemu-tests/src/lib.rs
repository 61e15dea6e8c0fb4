//! End-to-end harness for vhost-relay: real QEMU guests (TCG), a busybox initramfs, network
//! namespaces with veth pairs standing for VFs, DPDK testpmd as a reference backend and as a
//! second frontend.
//!
//! Tests in `tests/` use [`e2e_test`], which checks prerequisites, serialises guests (TCG on two
//! cores cannot run several at once in reasonable time), prepares the guest image and turns any
//! error into a panic message that carries the console/log tail.

pub mod backend;
pub mod chunk;
pub mod console;
pub mod cpio;
pub mod error;
pub mod guest_image;
pub mod migration;
pub mod netns;
pub mod qemu;
pub mod qmp;
pub mod testpmd;
pub mod traffic;
pub mod util;

use std::time::{Duration, Instant};

pub use backend::{ensure_pings_counted, find_stat, Backend, Dir, QueueStat};
pub use console::{Console, GuestOutput};
pub use error::{ensure, Error, Result};
pub use guest_image::{GuestBinary, GuestImage};
pub use netns::{NetNs, GUEST_IP, PEER_IP};
pub use qemu::{Qemu, QemuConfig, SocketMode};
pub use testpmd::{FrontendOptions, TestpmdFrontend};
pub use util::ScratchDir;

/// How long a TCG guest may take to boot to its shell (normally ~5-10 s; generous for a loaded
/// CI machine).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// What an end-to-end test gets: a scratch directory and the guest image.
#[derive(Debug)]
pub struct TestEnv {
    pub dir: ScratchDir,
    pub image: GuestImage,
    pub name: String,
    started: Instant,
}

impl TestEnv {
    /// Prints a progress line with the time since the test started (cargo test shows it with
    /// `--nocapture`, and in the output of failed tests).
    pub fn step(&self, what: &str) {
        eprintln!(
            "[{} +{:.1}s] {what}",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Whether we run under CI (`CI=true`), where missing prerequisites must fail, not skip.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Checks root and the tools a test needs. `Ok(false)` means "skip": only outside CI and only
/// for a non-root user. Anything else missing is an error.
pub fn check_prerequisites(tools: &[&str]) -> Result<bool> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if in_ci() {
            return Err(Error::Prerequisite(
                "root (network namespaces, QEMU): CI must run these tests as root".into(),
            ));
        }
        eprintln!("SKIPPED: end-to-end tests need root (network namespaces); not root");
        return Ok(false);
    }
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !util::on_path(t))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Prerequisite(format!(
            "{} not installed: run scripts/install-deps.sh",
            missing.join(", ")
        )));
    }
    Ok(true)
}

/// Tools every guest test needs.
pub const BASE_TOOLS: &[&str] = &[
    "qemu-system-x86_64",
    "ip",
    "ping",
    "apt-get",
    "dpkg",
    "gzip",
    "sha256sum",
];

/// Runs one end-to-end test: prerequisites (`BASE_TOOLS` plus `extra_tools`), a global lock
/// so guests run one at a time, the guest image, a scratch dir. Panics with the error's full
/// text (console tails included) if `body` fails.
pub fn e2e_test(name: &str, extra_tools: &[&str], body: impl FnOnce(&mut TestEnv) -> Result<()>) {
    e2e_test_with(name, extra_tools, GuestImage::ensure, body)
}

/// [`e2e_test`] with the guest image made by `image` (e.g. [`GuestImage::ensure_vdpa`]).
pub fn e2e_test_with(
    name: &str,
    extra_tools: &[&str],
    image: impl FnOnce() -> Result<GuestImage>,
    body: impl FnOnce(&mut TestEnv) -> Result<()>,
) {
    let tools: Vec<&str> = BASE_TOOLS.iter().chain(extra_tools).copied().collect();
    match check_prerequisites(&tools) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => panic!("{name}: {e}"),
    }
    let started = Instant::now();
    let result = (|| -> Result<()> {
        let _serial = util::FileLock::acquire(&util::cache_dir().join("e2e.lock"))?;
        let image = image()?;
        let mut env = TestEnv {
            dir: ScratchDir::new("vrt")?,
            image,
            name: name.to_string(),
            started: Instant::now(),
        };
        env.step(&format!("guest kernel {}", env.image.kernel_package));
        body(&mut env)
    })();
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => eprintln!("[{name}] passed in {secs:.1}s"),
        Err(e) => panic!("{name} failed after {secs:.1}s: {e}"),
    }
}

/// Pings `dst` from the guest `count` times; fails unless every echo was answered.
pub fn guest_ping(qemu: &mut Qemu, dst: &str, count: u32) -> Result<String> {
    console_ping(&mut qemu.console, dst, count).map_err(|e| qemu.explain(e))
}

/// [`guest_ping`] through a guest's console (e.g. a libvirt domain's serial socket).
pub fn console_ping(console: &mut Console, dst: &str, count: u32) -> Result<String> {
    let out = console.run_ok(
        &format!("ping -c {count} -i 0.2 -W 3 {dst}"),
        Duration::from_secs(30 + u64::from(count)),
    )?;
    let expect = format!("{count} packets received");
    ensure(out.contains(&expect), || {
        format!("guest ping of {dst}: expected `{expect}`:\n{out}")
    })?;
    Ok(out)
}

/// Pings the guest from the host peer inside `ns`; fails unless every echo was answered.
pub fn peer_ping(ns: &NetNs, dst: &str, count: u32) -> Result<String> {
    let out = ns.ping(dst, count)?;
    let expect = format!("{count} received");
    ensure(out.contains(&expect), || {
        format!("peer ping of {dst}: expected `{expect}`:\n{out}")
    })?;
    Ok(out)
}

/// Pings until one reply comes (or `timeout`): after a (re)connection the link and ARP take a
/// moment, and under TCG the first packets can be slow.
pub fn guest_ping_until_reply(qemu: &mut Qemu, dst: &str, timeout: Duration) -> Result<()> {
    console_ping_until_reply(&mut qemu.console, dst, timeout).map_err(|e| qemu.explain(e))
}

/// [`guest_ping_until_reply`] through a guest's console.
pub fn console_ping_until_reply(console: &mut Console, dst: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = console.run(&format!("ping -c 1 -W 2 {dst}"), Duration::from_secs(30))?;
        if out.status == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("a ping reply from {dst} to the guest"),
                secs: timeout.as_secs(),
                detail: format!("; last attempt:\n{}", out.output),
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
