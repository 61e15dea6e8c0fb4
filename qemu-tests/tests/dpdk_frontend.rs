//! DPDK testpmd's `virtio_user` as a second, independent vhost-user frontend driving
//! `vhost-relay --loopback`: testpmd injects a burst (`start tx_first`) and io-forwards whatever
//! comes back, so the same packets circle through the relay as fast as both sides go. Counts
//! on both sides must agree.

use std::time::Duration;

use qemu_tests::{e2e_test, ensure, find_stat, Backend, TestpmdFrontend};

#[test]
fn testpmd_virtio_user_against_loopback() {
    e2e_test(
        "testpmd_virtio_user_against_loopback",
        &["dpdk-testpmd", "stdbuf"],
        |env| {
            let sock = env.dir.join("lb.sock");
            let mut relay = Backend::vhost_relay_loopback(&sock, 1, env.dir.path())?;
            env.step("starting testpmd virtio_user");
            let mut pmd = TestpmdFrontend::spawn(&sock, 1, env.dir.path())?;
            let t = Duration::from_secs(30);
            let before = relay.stats()?;
            pmd.command("start tx_first", t)?;
            std::thread::sleep(Duration::from_secs(3));
            pmd.command("stop", t)?;
            // Let the relay drain whatever testpmd queued last.
            std::thread::sleep(Duration::from_secs(1));
            let pstats = pmd.port_stats()?;
            let after = relay.stats()?;
            let (rx0, tx1) = (find_stat(&after, "lb", 0)?, find_stat(&after, "lb", 1)?);
            let (rx0b, tx1b) = (find_stat(&before, "lb", 0)?, find_stat(&before, "lb", 1)?);
            let relay_from_pmd = tx1.packets - tx1b.packets;
            let relay_to_pmd = rx0.packets - rx0b.packets;
            let relay_drops = rx0.drops - rx0b.drops;
            env.step(&format!("testpmd: {pstats:?}"));
            env.step(&format!("relay: from testpmd {relay_from_pmd}, to testpmd {relay_to_pmd}, dropped {relay_drops}"));

            ensure(pstats.rx_packets > 1000, || {
                format!("testpmd received only {} packets", pstats.rx_packets)
            })?;
            ensure(pstats.tx_packets >= pstats.rx_packets, || {
                format!("testpmd received more than it sent: {pstats:?}")
            })?;
            ensure(pstats.rx_errors == 0 && pstats.tx_errors == 0, || {
                format!("testpmd errors: {pstats:?}")
            })?;
            // Everything testpmd put on its TX ring reached the relay's tx queue ...
            ensure(relay_from_pmd == pstats.tx_packets, || {
                format!(
                    "relay took {relay_from_pmd} packets from testpmd, which sent {}",
                    pstats.tx_packets
                )
            })?;
            // ... and came back or was counted as dropped (loopback conservation) ...
            ensure(relay_to_pmd + relay_drops == relay_from_pmd, || {
                format!("relay: {relay_from_pmd} in, {relay_to_pmd} out + {relay_drops} dropped")
            })?;
            // ... and testpmd received all of them except what sat in its RX ring when it stopped
            // polling (at most a ring's worth).
            ensure(
                pstats.rx_packets <= relay_to_pmd && relay_to_pmd - pstats.rx_packets <= 1024,
                || {
                    format!(
                        "relay delivered {relay_to_pmd}, testpmd received {}",
                        pstats.rx_packets
                    )
                },
            )?;
            ensure(tx1.bytes - tx1b.bytes == pstats.tx_bytes, || {
                format!(
                    "relay counted {} bytes from testpmd, testpmd sent {}",
                    tx1.bytes - tx1b.bytes,
                    pstats.tx_bytes
                )
            })?;
            pmd.quit()?;
            relay.ensure_running()?;
            Ok(())
        },
    );
}
