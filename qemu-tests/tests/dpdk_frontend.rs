//! DPDK testpmd's `virtio_user` as a second, independent vhost-user frontend driving
//! `vhost-relay --loopback`: testpmd injects a burst (`start tx_first`) and io-forwards whatever
//! comes back, so the same packets circle through the relay as fast as both sides go. Counts
//! on both sides must agree.

use std::time::Duration;

use qemu_tests::backend::ctl_json;
use qemu_tests::{
    e2e_test, ensure, find_stat, util, Backend, Error, FrontendOptions, TestpmdFrontend,
};
use test_support::metrics;

#[test]
fn testpmd_virtio_user_against_loopback() {
    against_loopback("testpmd_virtio_user_against_loopback", false);
}

/// The same with DPDK's packed-ring virtio driver (`packed_vq=1`): an independent packed
/// frontend, with the counts on both sides agreeing exactly.
#[test]
fn testpmd_virtio_user_packed_ring_against_loopback() {
    against_loopback("testpmd_virtio_user_packed_ring_against_loopback", true);
}

fn against_loopback(name: &str, packed: bool) {
    e2e_test(name, &["dpdk-testpmd", "stdbuf"], |env| {
        let sock = env.dir.join("lb.sock");
        let control = env.dir.join("control.sock");
        let control_s = control.display().to_string();
        let mut relay = Backend::vhost_relay_loopback_with(
            &sock,
            1,
            env.dir.path(),
            &["--control", &control_s],
        )?;
        env.step("starting testpmd virtio_user");
        let opts = FrontendOptions {
            queues: 1,
            vdev_extra: if packed {
                ",packed_vq=1".into()
            } else {
                String::new()
            },
            ..FrontendOptions::default()
        };
        let mut pmd = TestpmdFrontend::spawn_with(&sock, &opts, env.dir.path())?;
        let t = Duration::from_secs(30);
        let show = ctl_json(&control, &["show", "lb"])?;
        let names = show["connection"]["feature_names"].to_string();
        ensure(names.contains("RING_PACKED") == packed, || {
            format!("packed rings negotiated should be {packed}: {names}")
        })?;
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
    });
}

/// Packets testpmd sends in [`metrics_count_exactly_what_testpmd_sent_and_received`]: 4
/// bursts of 32, half of virtio_user's default 256-entry ring: none waits for room.
const SENT: u64 = 4 * 32;

/// `curl` the relay's metrics and validate them with `promtool check metrics`.
fn scrape(url: &str) -> qemu_tests::Result<String> {
    let reply = metrics::curl(url, &[]).map_err(|e| Error::io("scraping the relay", e))?;
    ensure(reply.status == 200, || {
        format!("{url}: HTTP {}: {}", reply.status, reply.body)
    })?;
    metrics::promtool_check(&reply.body)
        .map_err(|e| Error::Check(format!("{e}\n{}", reply.body)))?;
    Ok(reply.body)
}

/// A counter of port `lb`'s virtqueue `queue` ("packets", "bytes", "errors"); drops summed
/// over their reasons.
fn lb_counter(body: &str, what: &str, queue: u32, dir: &str) -> u64 {
    let series =
        format!(r#"vhost_relay_queue_{what}_total{{port="lb",queue="{queue}",direction="{dir}""#);
    metrics::sum(body, &series)
}

/// testpmd sends a fixed count (`start tx_first 4`: four bursts from the txonly engine, then
/// it only receives), the loopback relay returns them; the relay's `/metrics`, scraped with
/// curl and checked by promtool, must count exactly what testpmd's own port counters say.
#[test]
fn metrics_count_exactly_what_testpmd_sent_and_received() {
    e2e_test(
        "metrics_count_exactly_what_testpmd_sent_and_received",
        &["dpdk-testpmd", "stdbuf", "curl", "promtool"],
        |env| {
            let sock = env.dir.join("lb.sock");
            let listen = ["--metrics-listen", "127.0.0.1:0"];
            let mut relay = Backend::vhost_relay_loopback_with(&sock, 1, env.dir.path(), &listen)?;
            let url = relay.metrics_url()?;
            let before = scrape(&url)?;
            ensure(lb_counter(&before, "packets", 1, "tx") == 0, || {
                before.clone()
            })?;
            let mut pmd = TestpmdFrontend::spawn(&sock, 1, env.dir.path())?;
            let t = Duration::from_secs(30);
            for cmd in ["set fwd rxonly", "set burst 32", "start tx_first 4"] {
                pmd.command(cmd, t)?;
            }
            env.step("testpmd sent its bursts; waiting for the relay to return them");
            util::wait_until("the relay to take and return every packet", t, || {
                let body = scrape(&url)?;
                let back =
                    lb_counter(&body, "packets", 0, "rx") + lb_counter(&body, "drops", 0, "rx");
                Ok((lb_counter(&body, "packets", 1, "tx") == SENT && back == SENT).then_some(()))
            })?;
            // testpmd polls its RX ring continuously: a moment lets it take the last burst.
            std::thread::sleep(Duration::from_secs(1));
            pmd.command("stop", t)?;
            let pstats = pmd.port_stats()?;
            let body = scrape(&url)?;
            let c = |what, queue, dir| lb_counter(&body, what, queue, dir);
            env.step(&format!("testpmd: {pstats:?}"));
            ensure(pstats.tx_packets == SENT && pstats.tx_errors == 0, || {
                format!("testpmd was to send exactly {SENT} packets: {pstats:?}")
            })?;
            let checks = [
                ("tx packets", c("packets", 1, "tx"), pstats.tx_packets),
                ("tx bytes", c("bytes", 1, "tx"), pstats.tx_bytes),
                ("rx packets", c("packets", 0, "rx"), pstats.rx_packets),
                ("rx bytes", c("bytes", 0, "rx"), pstats.rx_bytes),
                ("rx drops", c("drops", 0, "rx"), 0),
                ("tx drops", c("drops", 1, "tx"), 0),
                ("errors", c("errors", 0, "rx") + c("errors", 1, "tx"), 0),
            ];
            for (what, relay_count, want) in checks {
                ensure(relay_count == want, || {
                    format!("metrics say {what} = {relay_count}, testpmd {want}:\n{body}")
                })?;
            }
            let port_gauge = |body: &str, what| {
                metrics::sum(body, &format!(r#"vhost_relay_port_{what}{{port="lb"}}"#))
            };
            ensure(
                port_gauge(&body, "connected") == 1 && port_gauge(&body, "connects_total") == 1,
                || format!("testpmd is connected, once:\n{body}"),
            )?;
            pmd.quit()?;
            util::wait_until("the relay to see testpmd go", t, || {
                let body = scrape(&url)?;
                let gone = port_gauge(&body, "connected") == 0
                    && port_gauge(&body, "disconnects_total") == 1;
                Ok(gone.then_some(()))
            })?;
            relay.ensure_running()?;
            Ok(())
        },
    );
}
