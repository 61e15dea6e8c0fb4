//! Basic connectivity through vhost-relay: the guest's virtio-net NIC is relayed to the VF end of
//! a veth pair, and the host peer on the other end answers.

use std::time::Duration;

use qemu_tests::{
    e2e_test, ensure_pings_counted, guest_ping, guest_ping_until_reply, peer_ping, Backend, NetNs,
    Qemu, QemuConfig, SocketMode, BOOT_TIMEOUT, GUEST_IP, PEER_IP,
};

#[test]
fn ping_both_ways() {
    ping_both_ways_on("ping_both_ways", "vm1", false);
}

/// Packed virtqueues (`packed=on`): checked in the guest's own feature bits first, as QEMU
/// falls back to split rings silently. More packed-ring runs: bulk.rs, multiqueue.rs,
/// migration.rs, dpdk_frontend.rs.
#[test]
fn ping_both_ways_packed_ring() {
    ping_both_ways_on("ping_both_ways_packed_ring", "packed", true);
}

/// Boots a guest on port `port` (packed rings if `packed`) and pings 10 times each way.
fn ping_both_ways_on(name: &str, port: &str, packed: bool) {
    e2e_test(name, &[], |env| {
        let ns = NetNs::new("vrt")?;
        let sock = env.dir.join(&format!("{port}.sock"));
        let mut relay = Backend::vhost_relay_port(&ns, &sock, 1, env.dir.path())?;
        let mut cfg = QemuConfig::new(&env.image, &sock, env.dir.path());
        if packed {
            cfg.device_opts.push("packed=on".into());
        }
        env.step("booting guest");
        let mut qemu = Qemu::boot(&cfg, BOOT_TIMEOUT)?;
        if packed {
            qemu.ensure_packed_rings()?;
        }
        env.step("guest ready");
        guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
        let before = relay.stats()?;
        guest_ping(&mut qemu, PEER_IP, 10)?;
        env.step("guest -> peer: 10/10");
        peer_ping(&ns, GUEST_IP, 10)?;
        env.step("peer -> guest: 10/10");
        let after = relay.stats()?;
        // 20 echo requests and 20 replies crossed each way (plus ARP): the counters must show it.
        ensure_pings_counted(&before, &after, port, 10)?;
        relay.ensure_running()?;
        Ok(())
    });
}

/// `vhost-relay --client`: QEMU listens, vhost-relay connects to it.
#[test]
fn ping_with_relay_as_client() {
    e2e_test("ping_with_relay_as_client", &[], |env| {
        let ns = NetNs::new("vrt")?;
        let sock = env.dir.join("vm2.sock");
        let mut cfg = QemuConfig::new(&env.image, &sock, env.dir.path());
        cfg.socket_mode = SocketMode::Server;
        env.step("booting guest (QEMU listens)");
        let mut qemu = Qemu::spawn(&cfg)?;
        let s = sock.display().to_string();
        let mut relay = Backend::vhost_relay(
            Some(&ns),
            &["--client", "--socket-path", &s, "--vf", ns.vf()],
            env.dir.path(),
            1,
        )?;
        qemu.wait_ready(BOOT_TIMEOUT)?;
        env.step("guest ready");
        guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
        guest_ping(&mut qemu, PEER_IP, 5)?;
        peer_ping(&ns, GUEST_IP, 5)?;
        relay.ensure_running()?;
        Ok(())
    });
}
