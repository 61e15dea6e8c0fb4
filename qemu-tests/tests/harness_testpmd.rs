//! Validates the harness itself with DPDK testpmd as the vhost-user backend (net_vhost forwarded
//! to net_af_packet on the namespace's VF end), independently of vhost-relay: if this fails, the
//! harness (image, console, namespace, QEMU command line) is broken, not the backend.

use std::time::Duration;

use qemu_tests::{
    e2e_test, ensure, guest_ping, guest_ping_until_reply, peer_ping, Backend, NetNs, Qemu,
    QemuConfig, BOOT_TIMEOUT, GUEST_IP, PEER_IP,
};

#[test]
fn ping_through_testpmd_backend() {
    e2e_test("ping_through_testpmd_backend", &["dpdk-testpmd"], |env| {
        let ns = NetNs::new("vrt")?;
        let sock = env.dir.join("pmd.sock");
        env.step("starting testpmd (net_vhost <-> net_af_packet)");
        let mut pmd = Backend::testpmd_vhost(&ns, &sock, env.dir.path())?;
        env.step("booting guest");
        let mut qemu = Qemu::boot(
            &QemuConfig::new(&env.image, &sock, env.dir.path()),
            BOOT_TIMEOUT,
        )?;
        env.step("guest ready");
        // The console itself: output and exit status come back exactly.
        let uname = qemu.run_ok("uname -r", Duration::from_secs(20))?;
        ensure(uname.trim().ends_with("-amd64"), || {
            format!("unexpected uname: {uname:?}")
        })?;
        let st = qemu.console.run("false", Duration::from_secs(20))?;
        ensure(st.status == 1, || format!("`false` returned {st:?}"))?;

        guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
        let out = guest_ping(&mut qemu, PEER_IP, 5)?;
        env.step(&format!(
            "guest -> peer ok: {}",
            out.lines().last().unwrap_or("")
        ));
        let out = peer_ping(&ns, GUEST_IP, 5)?;
        env.step(&format!(
            "peer -> guest ok: {}",
            out.lines().last().unwrap_or("")
        ));
        pmd.ensure_running()?;
        Ok(())
    });
}
