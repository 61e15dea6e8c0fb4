//! vhost-relay restarted under a running guest, and the RARP announcement QEMU asks of it.
//!
//! Restart, both ways round: QEMU listens (`-chardev socket,server=on,wait=off`) and
//! `vhost-relay --client` reconnects; or vhost-relay listens and QEMU reconnects
//! (`-chardev socket,reconnect-ms=1000`, what libvirt's `<reconnect>` asks for). With the guest
//! streaming TCP to the host peer and pinging it, the backend is SIGKILLed by PID and started
//! again, three times. QEMU cannot ask the dead backend for its ring positions, so it restores
//! each ring's base from the used index in guest memory; the new backend must pick up every
//! TX buffer the guest queued (and those the dead process had taken but not returned), so the
//! guest's TX queue does not stall, and the network must answer both ways again within
//! seconds, without a guest reboot (see `qemu_tests::traffic::RestartRig`).
//!
//! RARP: a guest booted with `guest_announce=off` cannot announce itself, so QEMU's
//! `announce-self` (what it also runs after an incoming migration) sends the backend
//! `VHOST_USER_SEND_RARP`; the RARP broadcast from the guest's MAC must appear on the wire.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use test_support::raw_socket::{RawOptions, RawSocket};

use qemu_tests::traffic::{start_guest_stream, RestartRig};
use qemu_tests::{
    e2e_test, ensure, guest_ping_until_reply, Backend, Error, NetNs, Qemu, QemuConfig, Result,
    SocketMode, TestEnv, BOOT_TIMEOUT, PEER_IP,
};

fn relay_client(ns: &NetNs, sock: &Path, dir: &Path) -> Result<Backend> {
    let s = sock.display().to_string();
    Backend::vhost_relay(
        Some(ns),
        &["--client", "--socket-path", &s, "--vf", ns.vf()],
        dir,
        1,
    )
}

/// Boots `cfg` with `relay` started by `spawn`, starts the guest's stream and runs three
/// kill-and-restart rounds of `relay`.
fn restart_under_traffic(
    env: &TestEnv,
    ns: &NetNs,
    cfg: &QemuConfig,
    spawn: impl Fn() -> Result<Backend>,
    qemu_first: bool,
) -> Result<()> {
    let (mut qemu, mut relay) = if qemu_first {
        let qemu = Qemu::spawn(cfg)?;
        (qemu, spawn()?)
    } else {
        let relay = spawn()?;
        (Qemu::spawn(cfg)?, relay)
    };
    qemu.wait_ready(BOOT_TIMEOUT)?;
    env.step("guest ready");
    guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
    let sink = start_guest_stream(&mut qemu.console, ns)?;
    env.step("guest streaming to the peer");
    let mut rig = RestartRig {
        ns,
        console: &mut qemu.console,
        sink: &sink,
    };
    rig.kill_and_restart(env, &mut relay, 3, spawn)
        .map_err(|e| qemu.explain(e))?;
    ensure(qemu.is_running(), || "QEMU exited".into())?;
    let log = relay.output();
    ensure(!log.contains("ERROR"), || {
        format!("the last backend logged errors:\n{log}")
    })
}

#[test]
fn backend_killed_under_guest_traffic_recovers() {
    e2e_test("backend_killed_under_guest_traffic_recovers", &[], |env| {
        let ns = NetNs::new("vrt")?;
        let sock = env.dir.join("rs.sock");
        let mut cfg = QemuConfig::new(&env.image, &sock, env.dir.path());
        cfg.socket_mode = SocketMode::Server;
        restart_under_traffic(
            env,
            &ns,
            &cfg,
            || relay_client(&ns, &sock, env.dir.path()),
            true,
        )
    });
}

/// vhost-relay listens and QEMU is the one reconnecting: the new process binds the socket
/// again (replacing the dead one's file) and QEMU, retrying every second, finds it.
#[test]
fn listening_backend_killed_under_guest_traffic_qemu_reconnects() {
    e2e_test(
        "listening_backend_killed_under_guest_traffic_qemu_reconnects",
        &[],
        |env| {
            let ns = NetNs::new("vrt")?;
            let sock = env.dir.join("rc.sock");
            let mut cfg = QemuConfig::new(&env.image, &sock, env.dir.path());
            cfg.reconnect_ms = Some(1000);
            restart_under_traffic(
                env,
                &ns,
                &cfg,
                || Backend::vhost_relay_port(&ns, &sock, 1, env.dir.path()),
                false,
            )
        },
    );
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
