//! Packed virtqueues (VIRTIO_F_RING_PACKED): a Linux guest with `packed=on` on its
//! virtio-net NIC, relayed to the VF end of a veth pair. The guest's own view of the
//! negotiated features is checked first, so a silent fall-back to split rings fails the test.
//! Bulk transfers, two queue pairs and the DPDK frontend over packed rings are in bulk.rs,
//! multiqueue.rs and dpdk_frontend.rs, beside their split-ring runs.

use std::time::Duration;

use qemu_tests::{
    e2e_test, ensure_pings_counted, guest_ping, guest_ping_until_reply, peer_ping, Backend, NetNs,
    Qemu, QemuConfig, BOOT_TIMEOUT, GUEST_IP, PEER_IP,
};

#[test]
fn packed_ring_ping_both_ways() {
    e2e_test("packed_ring_ping_both_ways", &[], |env| {
        let ns = NetNs::new("vrt")?;
        let sock = env.dir.join("packed.sock");
        let mut relay = Backend::vhost_relay_port(&ns, &sock, 1, env.dir.path())?;
        let mut cfg = QemuConfig::new(&env.image, &sock, env.dir.path());
        cfg.device_opts.push("packed=on".into());
        env.step("booting guest (packed=on)");
        let mut qemu = Qemu::boot(&cfg, BOOT_TIMEOUT)?;
        qemu.ensure_packed_rings()?;
        env.step("guest ready, packed rings negotiated");
        guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
        let before = relay.stats()?;
        guest_ping(&mut qemu, PEER_IP, 10)?;
        peer_ping(&ns, GUEST_IP, 10)?;
        let after = relay.stats()?;
        ensure_pings_counted(&before, &after, "packed", 10)?;
        relay.ensure_running()?;
        Ok(())
    });
}
