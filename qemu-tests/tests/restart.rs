//! vhost-relay restarted under a running guest, and the RARP announcement QEMU asks of it.
//!
//! Restart: QEMU listens (`-chardev socket,server=on,wait=off`), `vhost-relay --client`
//! connects. With the guest streaming TCP to the host peer and pinging it, the backend is
//! SIGKILLed by PID and started again, three times. QEMU cannot ask the dead backend for its
//! ring positions, so it restores each ring's base from the used index in guest memory; the
//! new backend must pick up every TX buffer the guest queued (and those the dead process had
//! taken but not returned), so the guest's TX queue does not stall, and the network must
//! answer both ways again within seconds, without a guest reboot.
//!
//! RARP: a guest booted with `guest_announce=off` cannot announce itself, so QEMU's
//! `announce-self` (what it also runs after an incoming migration) sends the backend
//! `VHOST_USER_SEND_RARP`; the RARP broadcast from the guest's MAC must appear on the wire.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use test_support::raw_socket::{RawOptions, RawSocket};

use qemu_tests::util::signal;
use qemu_tests::{
    e2e_test, ensure, guest_ping, guest_ping_until_reply, peer_ping, Backend, Error, NetNs, Qemu,
    QemuConfig, Result, SocketMode, BOOT_TIMEOUT, GUEST_IP, PEER_IP,
};

/// How long the network may take to answer again after the backend restarted. Measured
/// here: 0.1 to 0.5 s (TCG guest, 2 shared cores, 0.2 s probes); the bound leaves room for
/// a loaded CI.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);
const SINK_PORT: u16 = 5101;

fn relay_client(ns: &NetNs, sock: &Path, dir: &Path) -> Result<Backend> {
    let s = sock.display().to_string();
    Backend::vhost_relay(
        Some(ns),
        &["--client", "--socket-path", &s, "--vf", ns.vf()],
        dir,
        1,
    )
}

/// Accepts one TCP connection in the namespace and counts the bytes read from it.
fn tcp_sink(ns: &NetNs) -> Result<Arc<AtomicU64>> {
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
fn grows(count: &AtomicU64, by: u64, timeout: Duration) -> bool {
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

#[test]
fn backend_killed_under_guest_traffic_recovers() {
    e2e_test("backend_killed_under_guest_traffic_recovers", &[], |env| {
        let ns = NetNs::new("vrt")?;
        let sock = env.dir.join("rs.sock");
        let mut cfg = QemuConfig::new(&env.image, &sock, env.dir.path());
        cfg.socket_mode = SocketMode::Server;
        let mut qemu = Qemu::spawn(&cfg)?;
        let mut relay = relay_client(&ns, &sock, env.dir.path())?;
        qemu.wait_ready(BOOT_TIMEOUT)?;
        env.step("guest ready");
        guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;

        // Guest TX load for the whole test: a TCP stream of zeroes to the host peer, and
        // pings every 20 ms.
        let sink = tcp_sink(&ns)?;
        qemu.console.send(&format!(
            "nc {PEER_IP} {SINK_PORT} </dev/zero >/dev/null 2>&1 &\nping -i 0.02 {PEER_IP} >/dev/null 2>&1 &\n"
        ))?;
        ensure(grows(&sink, 1 << 20, Duration::from_secs(30)), || {
            "the guest's TCP stream did not start".into()
        })?;
        env.step("guest streaming to the peer");

        for round in 1..=3 {
            let pid = relay.pid();
            env.step(&format!(
                "round {round}: SIGKILL vhost-relay (pid {pid}) mid-stream"
            ));
            signal(pid, libc::SIGKILL)?;
            relay.stop();
            // Let QEMU notice and the guest queue up TX packets with nobody serving them.
            std::thread::sleep(Duration::from_millis(500));
            let start = Instant::now();
            relay = relay_client(&ns, &sock, env.dir.path())?;
            // Recovered when the host peer's ping is answered by the guest.
            loop {
                if ns.sh(&format!("ping -c 1 -W 0.2 {GUEST_IP}")).is_ok() {
                    break;
                }
                relay.ensure_running()?;
                if start.elapsed() > RECOVERY_LIMIT {
                    return Err(Error::Check(format!(
                        "round {round}: no answer from the guest {:?} after the restart",
                        RECOVERY_LIMIT
                    )));
                }
            }
            let recovered = start.elapsed();
            env.step(&format!(
                "round {round}: guest answers {:.2} s after the restart",
                recovered.as_secs_f64()
            ));
            // The guest's TX queue is not stuck: its TCP stream moves on.
            ensure(grows(&sink, 1 << 20, Duration::from_secs(20)), || {
                format!("round {round}: the guest's TCP stream is stuck after the restart")
            })?;
            guest_ping(&mut qemu, PEER_IP, 5)?;
            peer_ping(&ns, GUEST_IP, 5)?;
            env.step(&format!("round {round}: both ways 5/5, stream flowing"));
        }
        relay.ensure_running()?;
        ensure(qemu.is_running(), || "QEMU exited".into())?;
        let log = relay.output();
        ensure(!log.contains("ERROR"), || {
            format!("the last backend logged errors:\n{log}")
        })?;
        Ok(())
    });
}

/// The smallest QMP client: greeting, capabilities, one command; returns its reply line.
fn qmp(path: &Path, command: &str) -> Result<String> {
    let io = |e| Error::io(format!("QMP on {}", path.display()), e);
    let mut s = UnixStream::connect(path).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let mut r = BufReader::new(s.try_clone().map_err(io)?);
    let mut line = String::new();
    r.read_line(&mut line).map_err(io)?; // greeting
    for cmd in [r#"{"execute":"qmp_capabilities"}"#, command] {
        s.write_all(cmd.as_bytes()).map_err(io)?;
        s.write_all(b"\n").map_err(io)?;
        loop {
            line.clear();
            if r.read_line(&mut line).map_err(io)? == 0 {
                return Err(Error::Check(format!("QMP closed during {cmd}")));
            }
            // Skip asynchronous events.
            if line.contains("\"return\"") || line.contains("\"error\"") {
                break;
            }
        }
        if line.contains("\"error\"") {
            return Err(Error::Check(format!("QMP {cmd}: {line}")));
        }
    }
    Ok(line)
}

/// A packet socket on `ifname` (in the calling thread's namespace) receiving RARP only.
fn rarp_socket(ifname: &str) -> Result<RawSocket> {
    let options = RawOptions {
        protocol: libc::ETH_P_RARP as u16,
        ..RawOptions::default()
    };
    RawSocket::open(ifname, options).map_err(|e| Error::io("RARP capture socket", e))
}

#[test]
fn announce_self_makes_the_backend_broadcast_rarp() {
    e2e_test(
        "announce_self_makes_the_backend_broadcast_rarp",
        &[],
        |env| {
            let ns = NetNs::new("vrt")?;
            let sock = env.dir.join("an.sock");
            let _relay = Backend::vhost_relay_port(&ns, &sock, 1, env.dir.path())?;
            let mut cfg = QemuConfig::new(&env.image, &sock, env.dir.path());
            // A driver without GUEST_ANNOUNCE: QEMU must ask the backend to announce it.
            cfg.device_opts.push("guest_announce=off".into());
            cfg.mac = "52:54:00:77:88:99".into();
            let mut qemu = Qemu::boot(&cfg, BOOT_TIMEOUT)?;
            env.step("guest ready (guest_announce=off)");
            guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;

            let frames = std::thread::scope(|s| -> Result<Vec<Vec<u8>>> {
                let ns = &ns;
                let capture = s.spawn(move || {
                    ns.within(|| {
                        let sock = rarp_socket(ns.peer())?;
                        let mut got = Vec::new();
                        let deadline = Instant::now() + Duration::from_secs(10);
                        while got.len() < 2 {
                            match sock.recv(deadline) {
                                Some(frame) => got.push(frame),
                                None => break,
                            }
                        }
                        Ok(got)
                    })
                });
                std::thread::sleep(Duration::from_millis(300));
                qmp(
                    qemu.qmp_path(),
                    r#"{"execute":"announce-self","arguments":{"initial":50,"max":100,"rounds":2,"step":50}}"#,
                )?;
                capture
                    .join()
                    .unwrap_or_else(|_| Err(Error::Check("capture thread panicked".into())))
            })?;
            env.step(&format!("{} RARP frame(s) on the wire", frames.len()));
            ensure(frames.len() == 2, || {
                format!(
                    "expected one RARP per announce round (2), got {}",
                    frames.len()
                )
            })?;
            let mac = [0x52, 0x54, 0x00, 0x77, 0x88, 0x99];
            for f in &frames {
                ensure(
                    f.len() >= 42 && f[0..6] == [0xff; 6] && f[6..12] == mac,
                    || format!("not a broadcast from the guest's MAC: {f:02x?}"),
                )?;
                ensure(
                    f[20..22] == [0, 3] && f[22..28] == mac && f[32..38] == mac,
                    || format!("not a RARP request-reverse for the guest's MAC: {f:02x?}"),
                )?;
            }
            Ok(())
        },
    );
}
