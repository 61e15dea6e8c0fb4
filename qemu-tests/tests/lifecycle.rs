//! The frontend going away and coming back while vhost-relay keeps running: a guest reboot
//! (the device is reset and re-initialised over the same vhost-user connection) and a QEMU
//! killed with SIGKILL and started again (a new connection to the same listening socket).

use std::time::Duration;

use qemu_tests::{
    e2e_test, ensure, guest_ping, guest_ping_until_reply, peer_ping, Backend, NetNs, Qemu,
    QemuConfig, BOOT_TIMEOUT, GUEST_IP, PEER_IP,
};

#[test]
fn guest_reboot_reattaches() {
    e2e_test("guest_reboot_reattaches", &[], |env| {
        let ns = NetNs::new("vrt")?;
        let sock = env.dir.join("rb.sock");
        let mut relay = Backend::vhost_relay_port(&ns, &sock, 1, env.dir.path())?;
        let mut cfg = QemuConfig::new(&env.image, &sock, env.dir.path());
        cfg.no_reboot = false;
        let mut qemu = Qemu::boot(&cfg, BOOT_TIMEOUT)?;
        let pid = qemu.pid();
        env.step("guest ready");
        guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
        guest_ping(&mut qemu, PEER_IP, 3)?;

        for round in 1..=2 {
            env.step(&format!("reboot -f ({round})"));
            qemu.console.send("reboot -f\n")?;
            qemu.wait_ready(BOOT_TIMEOUT)?;
            ensure(qemu.is_running() && qemu.pid() == pid, || {
                "QEMU itself restarted".into()
            })?;
            let up = qemu.run_ok("cat /proc/uptime", Duration::from_secs(20))?;
            env.step(&format!("guest up again (uptime {})", up.trim()));
            guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
            guest_ping(&mut qemu, PEER_IP, 5)?;
            peer_ping(&ns, GUEST_IP, 5)?;
            relay.ensure_running()?;
        }
        Ok(())
    });
}

#[test]
fn qemu_killed_and_restarted() {
    e2e_test("qemu_killed_and_restarted", &[], |env| {
        let ns = NetNs::new("vrt")?;
        let sock = env.dir.join("kr.sock");
        let mut relay = Backend::vhost_relay_port(&ns, &sock, 1, env.dir.path())?;
        let cfg = QemuConfig::new(&env.image, &sock, env.dir.path());
        for round in 1..=2 {
            let mut qemu = Qemu::boot(&cfg, BOOT_TIMEOUT)?;
            env.step(&format!("QEMU #{round} (pid {}) ready", qemu.pid()));
            guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
            guest_ping(&mut qemu, PEER_IP, 5)?;
            peer_ping(&ns, GUEST_IP, 5)?;
            // Traffic in flight when the frontend dies: the relay must not care.
            qemu.console.send("ping -i 0.05 10.0.0.1 >/dev/null &\n")?;
            std::thread::sleep(Duration::from_millis(500));
            env.step(&format!("SIGKILL QEMU #{round}"));
            qemu.kill()?;
            drop(qemu);
            std::thread::sleep(Duration::from_secs(1));
            relay.ensure_running()?;
            // The guest is gone: its address must no longer answer (proves the next round's
            // replies come from the new QEMU).
            ensure(ns.ping(GUEST_IP, 1).is_err(), || {
                "the killed guest still answers".into()
            })?;
        }
        let mut qemu = Qemu::boot(&cfg, BOOT_TIMEOUT)?;
        env.step("QEMU #3 ready");
        guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
        guest_ping(&mut qemu, PEER_IP, 5)?;
        peer_ping(&ns, GUEST_IP, 5)?;
        relay.ensure_running()?;
        Ok(())
    });
}
