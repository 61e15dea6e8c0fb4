//! `vhost-relay --config FILE` serving two ports at once from one process: a QEMU guest on a
//! VF-backed port and DPDK testpmd on a loopback port. Each port's counters must show its own
//! traffic only.

use std::time::Duration;

use qemu_tests::{
    e2e_test, ensure, find_stat, guest_ping, guest_ping_until_reply, peer_ping, Backend, Error,
    NetNs, Qemu, QemuConfig, TestpmdFrontend, BOOT_TIMEOUT, GUEST_IP, PEER_IP,
};

#[test]
fn two_ports_from_a_config_file() {
    e2e_test(
        "two_ports_from_a_config_file",
        &["dpdk-testpmd", "stdbuf"],
        |env| {
            let ns = NetNs::new("vrt")?;
            let vm_sock = env.dir.join("vm.sock");
            let lb_sock = env.dir.join("lb.sock");
            let config = env.dir.join("ports.toml");
            let toml = format!(
                "[[port]]\nname = \"guest\"\nsocket = \"{}\"\nvf = \"{}\"\nqueues = 1\n\n\
             [[port]]\nname = \"loop\"\nsocket = \"{}\"\nloopback = true\n",
                vm_sock.display(),
                ns.vf(),
                lb_sock.display()
            );
            std::fs::write(&config, toml).map_err(|e| Error::io("writing the config", e))?;
            let cfg_arg = config.display().to_string();
            let mut relay =
                Backend::vhost_relay(Some(&ns), &["--config", &cfg_arg], env.dir.path(), 2)?;
            relay.wait_for_socket(&vm_sock, Duration::from_secs(10))?;
            relay.wait_for_socket(&lb_sock, Duration::from_secs(10))?;

            let mut qemu = Qemu::boot(
                &QemuConfig::new(&env.image, &vm_sock, env.dir.path()),
                BOOT_TIMEOUT,
            )?;
            env.step("guest ready on port `guest`");
            guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
            let before = relay.stats()?;
            guest_ping(&mut qemu, PEER_IP, 5)?;
            peer_ping(&ns, GUEST_IP, 5)?;
            let mid = relay.stats()?;
            let loop_tx = |s: &[qemu_tests::QueueStat]| find_stat(s, "loop", 1).map(|q| q.packets);
            ensure(loop_tx(&mid)? == loop_tx(&before)?, || {
                "guest traffic showed up on port `loop`".into()
            })?;
            let g = |s: &[qemu_tests::QueueStat], q| find_stat(s, "guest", q).map(|q| q.packets);
            ensure(g(&mid, 1)? >= g(&before, 1)? + 10, || {
                format!("port `guest` tx: {:?}", mid)
            })?;

            env.step("testpmd on port `loop`");
            let mut pmd = TestpmdFrontend::spawn(&lb_sock, 1, env.dir.path())?;
            pmd.command("start tx_first", Duration::from_secs(30))?;
            std::thread::sleep(Duration::from_secs(2));
            pmd.command("stop", Duration::from_secs(30))?;
            std::thread::sleep(Duration::from_secs(1));
            let p = pmd.port_stats()?;
            let after = relay.stats()?;
            env.step(&format!(
                "testpmd sent {} received {}",
                p.tx_packets, p.rx_packets
            ));
            ensure(p.rx_packets > 1000, || {
                format!("testpmd received only {p:?}")
            })?;
            ensure(loop_tx(&after)? - loop_tx(&mid)? == p.tx_packets, || {
                format!(
                    "port `loop` took {} packets, testpmd sent {}",
                    loop_tx(&after).unwrap_or(0) - loop_tx(&mid).unwrap_or(0),
                    p.tx_packets
                )
            })?;
            // The guest port saw none of testpmd's flood (a few stray packets, e.g. IPv6 noise from
            // the peer, are possible; hundreds of thousands are not).
            ensure(g(&after, 0)? - g(&mid, 0)? < 100, || {
                format!("port `guest` rx jumped: {after:?}")
            })?;
            pmd.quit()?;
            guest_ping(&mut qemu, PEER_IP, 3)?;
            relay.ensure_running()?;
            Ok(())
        },
    );
}
