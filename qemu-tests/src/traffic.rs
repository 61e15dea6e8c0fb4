//! Guest traffic that runs through a whole test (a TCP stream and fast pings from the guest
//! to the host peer), and the check that it survives the backend being killed and started
//! again under it. Shared by the restart tests with plain QEMU and with libvirt.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::console::Console;
use crate::error::{ensure, Error, Result};
use crate::netns::{NetNs, GUEST_IP, PEER_IP};
use crate::{console_ping, peer_ping, TestEnv};

/// How long the network may take to answer again after the backend restarted. Measured
/// here: 0.1 to 0.5 s with QEMU listening, up to about 1.5 s with QEMU reconnecting every
/// second (TCG guest, 2 shared cores, 0.2 s probes); the bound leaves room for a loaded CI.
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(10);

/// The host peer's TCP port the guest streams to.
pub const SINK_PORT: u16 = 5101;

/// Accepts one TCP connection on the peer's [`SINK_PORT`] in the namespace and counts the
/// bytes read from it.
pub fn tcp_sink(ns: &NetNs) -> Result<Arc<AtomicU64>> {
    let listener = ns.tcp_listen(SocketAddr::from(([10, 0, 0, 1], SINK_PORT)))?;
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    Ok(count)
}

/// Waits until `count` grows by `by` bytes (or `timeout`); returns whether it did.
pub fn grows(count: &AtomicU64, by: u64, timeout: Duration) -> bool {
    let start = count.load(Ordering::Relaxed);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if count.load(Ordering::Relaxed) >= start + by {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Starts the guest's load in the background: a TCP stream of zeroes to the peer's sink and
/// a ping every 20 ms; returns the sink's byte count once the first MiB has arrived.
pub fn start_guest_stream(console: &mut Console, ns: &NetNs) -> Result<Arc<AtomicU64>> {
    let sink = tcp_sink(ns)?;
    console.send(&format!(
        "nc {PEER_IP} {SINK_PORT} </dev/zero >/dev/null 2>&1 &\nping -i 0.02 {PEER_IP} >/dev/null 2>&1 &\n"
    ))?;
    ensure(grows(&sink, 1 << 20, Duration::from_secs(30)), || {
        "the guest's TCP stream did not start".into()
    })?;
    Ok(sink)
}

/// The guest kernel's boot id: it changes when the guest reboots, whatever reboots it.
pub fn boot_id(console: &mut Console) -> Result<String> {
    let id = console.run_ok(
        "cat /proc/sys/kernel/random/boot_id",
        Duration::from_secs(30),
    )?;
    Ok(id.trim().to_string())
}

/// A backend restarted under a streaming guest (see [`start_guest_stream`]).
pub struct RestartRig<'a> {
    pub ns: &'a NetNs,
    pub console: &'a mut Console,
    pub sink: &'a AtomicU64,
}

impl RestartRig<'_> {
    /// `rounds` times: SIGKILL `relay` by PID mid-stream, let the guest queue TX packets with
    /// nobody serving them for 0.5 s, start a new backend with `respawn`. Each time the
    /// peer's ping must be answered by the guest again within [`RECOVERY_LIMIT`] of the
    /// restart, the guest's stream must move on (its TX queue is not stuck) and pings must go
    /// both ways; the guest must not have rebooted.
    pub fn kill_and_restart(
        &mut self,
        env: &TestEnv,
        relay: &mut Backend,
        rounds: u32,
        mut respawn: impl FnMut() -> Result<Backend>,
    ) -> Result<()> {
        let booted = boot_id(self.console)?;
        for round in 1..=rounds {
            let pid = relay.pid();
            env.step(&format!(
                "round {round}: SIGKILL vhost-relay (pid {pid}) mid-stream"
            ));
            crate::util::signal(pid, libc::SIGKILL)?;
            relay.stop();
            std::thread::sleep(Duration::from_millis(500));
            let start = Instant::now();
            *relay = respawn()?;
            self.wait_for_guest(relay, start, round)?;
            env.step(&format!(
                "round {round}: guest answers {:.2} s after the restart",
                start.elapsed().as_secs_f64()
            ));
            ensure(grows(self.sink, 1 << 20, Duration::from_secs(20)), || {
                format!("round {round}: the guest's TCP stream is stuck after the restart")
            })?;
            console_ping(self.console, PEER_IP, 5)?;
            peer_ping(self.ns, GUEST_IP, 5)?;
            env.step(&format!("round {round}: both ways 5/5, stream flowing"));
        }
        let now = boot_id(self.console)?;
        ensure(now == booted, || {
            format!("the guest rebooted: boot id {booted} before, {now} after")
        })?;
        relay.ensure_running()
    }

    /// Probes the guest from the peer until it answers, or fails after [`RECOVERY_LIMIT`].
    fn wait_for_guest(&self, relay: &mut Backend, start: Instant, round: u32) -> Result<()> {
        while self.ns.sh(&format!("ping -c 1 -W 0.2 {GUEST_IP}")).is_err() {
            relay.ensure_running()?;
            if start.elapsed() > RECOVERY_LIMIT {
                return Err(Error::Check(format!(
                    "round {round}: no answer from the guest {RECOVERY_LIMIT:?} after the restart; \
                     the new vhost-relay's log ends:\n{}",
                    crate::util::tail_file(relay.stderr_log(), 30)
                )));
            }
        }
        Ok(())
    }
}
