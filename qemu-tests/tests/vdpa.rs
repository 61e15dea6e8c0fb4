//! vDPA end-to-end tests: a 6.12 guest (vdpa, vhost_vdpa, VDUSE) in which the `vduse-net`
//! fixture provides a virtio-net device, `vdpa dev add` puts it on the vDPA bus, and vhost_vdpa
//! turns it into `/dev/vhost-vdpa-0`.

use std::time::Duration;

use qemu_tests::backend::{parse_stats_line, vhost_relay_bin};
use qemu_tests::{
    e2e_test_with, ensure, Error, GuestBinary, GuestImage, Qemu, QemuConfig, QueueStat, Result,
    BOOT_TIMEOUT,
};

const T: Duration = Duration::from_secs(60);

/// vhost-relay and the guest-tools programs, for the guest's `/bin` (one set
/// for every test here, so they share one initramfs).
fn test_binaries() -> Result<Vec<GuestBinary>> {
    let mut v = vec![GuestBinary::new(&vhost_relay_bin()?)?];
    for name in ["vduse-net", "vdpa-probe", "vu-frontend"] {
        v.push(GuestBinary::guest_tool(name)?);
    }
    Ok(v)
}

/// Boots the 6.12 guest with the fixture's device `vnet0` on `/dev/vhost-vdpa-0`.
fn boot_with_fixture(env: &qemu_tests::TestEnv, fixture_args: &str) -> Result<Qemu> {
    env.step("booting 6.12 guest");
    let mut qemu = Qemu::boot(
        &QemuConfig::without_nic(&env.image, env.dir.path()),
        BOOT_TIMEOUT,
    )?;
    env.step("guest ready");
    start_fixture(&mut qemu, "vnet0", 0, fixture_args)?;
    env.step("fixture on the vDPA bus, /dev/vhost-vdpa-0 there");
    Ok(qemu)
}

/// The fixture's counters from its --stats file: (packets_tx, packets_rx, drops, errors).
fn fixture_counters(qemu: &mut Qemu, name: &str) -> Result<(u64, u64, u64, u64)> {
    // The file is rewritten every 200 ms when the counters change.
    let out = qemu.run_ok(&format!("sleep 0.5; cat /tmp/{name}.stats"), T)?;
    let field = |k: &str| -> Result<u64> {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Check(format!("no {k}= in the fixture's stats: {out}")))
    };
    Ok((
        field("packets_tx")?,
        field("packets_rx")?,
        field("drops")?,
        field("errors")?,
    ))
}

/// Starts `vhost-relay ARGS` in the guest's background (log in /tmp/vr.log) and waits for
/// its socket.
fn start_relay(qemu: &mut Qemu, sock: &str, args: &str) -> Result<()> {
    qemu.run_ok(
        &format!(
            "RUST_LOG=info vhost-relay --socket-path {sock} {args} >/tmp/vr.log 2>&1 & \
             echo $! >/tmp/vr.pid; \
             n=0; while [ ! -S {sock} ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; \
             cat /tmp/vr.log; test -S {sock}"
        ),
        T,
    )?;
    Ok(())
}

/// vhost-relay's counters (SIGUSR1) as the guest's copy of its log shows them.
fn relay_stats(qemu: &mut Qemu) -> Result<Vec<QueueStat>> {
    let before = qemu.run_ok("grep -c 'stats port=' /tmp/vr.log || true", T)?;
    let before: usize = before.trim().parse().unwrap_or(0);
    let out = qemu.run_ok(
        "kill -USR1 $(cat /tmp/vr.pid) && sleep 0.5 && cat /tmp/vr.log",
        T,
    )?;
    let stats: Vec<QueueStat> = out
        .lines()
        .filter_map(parse_stats_line)
        .skip(before)
        .collect();
    ensure(!stats.is_empty(), || {
        format!("vhost-relay printed no stats lines on SIGUSR1:\n{out}")
    })?;
    Ok(stats)
}

/// Starts the fixture as device `name` in the background and attaches it to the vDPA bus;
/// returns once `/dev/vhost-vdpa-{vhost_index}` exists.
fn start_fixture(qemu: &mut Qemu, name: &str, vhost_index: u32, extra: &str) -> Result<()> {
    let vdev = format!("/dev/vhost-vdpa-{vhost_index}");
    qemu.run_ok(
        &format!(
            "vduse-net --name {name} --stats /tmp/{name}.stats {extra} >/tmp/{name}.out 2>/tmp/{name}.err & \
             echo $! >/tmp/{name}.pid; \
             n=0; while [ ! -e /dev/vduse/{name} ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; \
             cat /tmp/{name}.out /tmp/{name}.err; test -e /dev/vduse/{name}"
        ),
        T,
    )?;
    qemu.run_ok(
        &format!(
            "vdpa dev add name {name} mgmtdev vduse && \
             n=0; while [ ! -e {vdev} ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; \
             vdpa dev show {name}; ls -l {vdev}"
        ),
        T,
    )?;
    Ok(())
}

/// The environment itself: the fixture's device reaches vhost-vdpa, the vhost crate reads its
/// identity and config, and frames sent straight through /dev/vhost-vdpa-0 come back.
#[test]
fn vdpa_environment() {
    e2e_test_with(
        "vdpa_environment",
        &[],
        || GuestImage::ensure_vdpa(&test_binaries()?),
        |env| {
            let mut qemu = boot_with_fixture(
                env,
                "--mac 52:54:00:00:00:0a --mtu 1400 --write-log /tmp/vnet0.writes",
            )?;
            let out = qemu.run_ok("vdpa-probe --dev /dev/vhost-vdpa-0", T)?;
            env.step(out.trim());
            ensure(out.contains("device_id=1 "), || {
                format!("not a net device:\n{out}")
            })?;
            ensure(out.contains("mac=52:54:00:00:00:0a"), || {
                format!("wrong MAC:\n{out}")
            })?;
            ensure(out.contains("mtu=1400") && out.contains("vqs=2 "), || {
                format!("wrong config:\n{out}")
            })?;
            let out = qemu.run_ok("vdpa-probe --traffic 300", T)?;
            env.step(out.trim());
            ensure(out.contains("received=300 corrupt=0 PASS"), || {
                format!("traffic through the fixture:\n{out}")
            })?;
            let c = fixture_counters(&mut qemu, "vnet0")?;
            ensure(c == (300, 300, 0, 0), || {
                format!("fixture counters (tx, rx, drops, errors) {c:?}, wanted 300/300/0/0")
            })?;
            // A second driver session after the reset: the fixture serves it again.
            let out = qemu.run_ok("vdpa-probe --traffic 100", T)?;
            ensure(out.contains("PASS"), || format!("second session:\n{out}"))?;
            let c = fixture_counters(&mut qemu, "vnet0")?;
            ensure(c == (400, 400, 0, 0), || {
                format!("fixture counters after the second session {c:?}, wanted 400/400/0/0")
            })?;
            // The write log lists exactly what the device wrote for the 400 frames of both
            // sessions: each RX buffer once (12-byte header + 200-byte frame, in vdpa-probe's
            // RX area 0x100000..0x180000), and per frame one used entry and the used index of
            // the RX ring (at 0x1208: rings of 256 at 0 and 64 KiB) and of the TX ring.
            let count = |qemu: &mut Qemu, re: &str| -> Result<u64> {
                let out = qemu.run_ok(&format!("grep -cE '{re}' /tmp/vnet0.writes || true"), T)?;
                out.trim()
                    .parse()
                    .map_err(|_| Error::Check(format!("grep -c gave {out:?}")))
            };
            let rx_bufs = count(&mut qemu, "^0x1[0-7][0-9a-f]{4} 212$")?;
            let rx_idx = count(&mut qemu, "^0x120a 2$")?;
            let tx_idx = count(&mut qemu, "^0x1120a 2$")?;
            let rx_used = count(&mut qemu, "^0x1[2-9a-f][0-9a-f][02468ace] 8$")?;
            let all = count(&mut qemu, ".")?;
            ensure(
                rx_bufs == 400 && rx_idx == 400 && tx_idx == 400 && rx_used == 400,
                || {
                    format!(
                        "write log: {rx_bufs} RX buffers, {rx_idx}+{tx_idx} used index and \
                         {rx_used} RX used entry writes, wanted 400 each"
                    )
                },
            )?;
            // Nothing else: RX buffer + RX used entry + RX idx + TX used entry + TX idx.
            ensure(all == 5 * 400, || {
                format!("write log has {all} lines, wanted {}", 5 * 400)
            })?;
            env.step("write log matches the frames");

            // A multiqueue device (2 pairs, no control queue) next to it.
            start_fixture(&mut qemu, "vnet1", 1, "--mq --mac 52:54:00:00:00:0c")?;
            let out = qemu.run_ok("vdpa-probe --dev /dev/vhost-vdpa-1 --traffic 50", T)?;
            env.step(out.lines().next().unwrap_or(""));
            ensure(
                out.contains("max_pairs=2") && out.contains("vqs=4 ") && out.contains("PASS"),
                || format!("multiqueue device:\n{out}"),
            )?;
            Ok(())
        },
    );
}

/// `vhost-relay --vdpa`: the frontend's rings are handed to the kernel vDPA device, so frames
/// loop through the fixture while vhost-relay's own counters stay at zero; then the same port
/// survives a ring reset and a reconnection.
#[test]
fn vdpa_direct_mode() {
    e2e_test_with(
        "vdpa_direct_mode",
        &[],
        || GuestImage::ensure_vdpa(&test_binaries()?),
        |env| {
            let mut qemu = boot_with_fixture(env, "--mac 52:54:00:00:00:0b")?;
            start_relay(&mut qemu, "/tmp/vr.sock", "--vdpa /dev/vhost-vdpa-0")?;
            env.step("vhost-relay --vdpa listening");
            const N: u64 = 2000;
            let out = qemu.run_ok(
                &format!("vu-frontend --socket /tmp/vr.sock --scenario direct --packets {N}"),
                Duration::from_secs(120),
            )?;
            env.step(out.lines().last().unwrap_or(""));
            ensure(out.contains("PASS"), || format!("direct scenario:\n{out}"))?;
            // vhost-relay answers GET_CONFIG from the device's config space.
            ensure(out.contains("config mac=52:54:00:00:00:0b "), || {
                format!("the frontend should see the fixture's MAC:\n{out}")
            })?;
            let (tx, rx, drops, errors) = fixture_counters(&mut qemu, "vnet0")?;
            ensure(tx == N && rx == N && drops == 0 && errors == 0, || {
                format!("the device should have looped exactly {N} frames: tx={tx} rx={rx} drops={drops} errors={errors}")
            })?;
            for s in relay_stats(&mut qemu)? {
                ensure(s.packets == 0 && s.bytes == 0, || {
                    format!("vhost-relay moved packets itself in direct mode: {s}")
                })?;
            }
            env.step("data path bypassed vhost-relay: its counters are zero, the device's are not");

            let out = qemu.run_ok(
                &format!("vu-frontend --socket /tmp/vr.sock --scenario reattach --packets {N}"),
                Duration::from_secs(180),
            )?;
            env.step(out.lines().last().unwrap_or(""));
            ensure(out.contains("PASS"), || {
                format!("reattach scenario:\n{out}")
            })?;
            let (tx, rx, _, errors) = fixture_counters(&mut qemu, "vnet0")?;
            ensure(tx == 4 * N && rx == 4 * N && errors == 0, || {
                format!("after reattach the device should have looped {} frames: tx={tx} rx={rx} errors={errors}", 4 * N)
            })?;
            for s in relay_stats(&mut qemu)? {
                ensure(s.packets == 0, || {
                    format!("vhost-relay moved packets itself: {s}")
                })?;
            }
            qemu.run_ok("kill -0 $(cat /tmp/vr.pid)", T)?;

            // Errors a person can act on: the device is held by the first vhost-relay, and a
            // device that does not exist. Both must stop the second process with the path.
            for (dev, want) in [
                ("/dev/vhost-vdpa-0", "is busy"),
                ("/dev/vhost-vdpa-7", "/dev/vhost-vdpa-7"),
            ] {
                let out = qemu.console.run(
                    &format!(
                        "timeout 20 vhost-relay --socket-path /tmp/vr2.sock --vdpa {dev} 2>&1"
                    ),
                    T,
                )?;
                ensure(out.status != 0 && out.output.contains(want), || {
                    format!(
                        "vhost-relay --vdpa {dev} should fail saying `{want}`; status {}:\n{}",
                        out.status, out.output
                    )
                })?;
            }
            env.step("busy and missing devices refused with their path");
            Ok(())
        },
    );
}

/// Migration support in vDPA mode: LOG_ALL switches the port to shadow rings under traffic
/// and back. Every frame comes back once and in order across both switches, vhost-relay
/// relays (and counts) only the frames of the logging phase, and every guest page the
/// fixture wrote while logging (its own record, `--write-log`) is marked in the dirty log.
#[test]
fn vdpa_shadow_mode() {
    e2e_test_with(
        "vdpa_shadow_mode",
        &[],
        || GuestImage::ensure_vdpa(&test_binaries()?),
        |env| {
            let mut qemu = boot_with_fixture(env, "--mac 52:54:00:00:00:0c --write-log /tmp/wlog")?;
            start_relay(&mut qemu, "/tmp/vr.sock", "--vdpa /dev/vhost-vdpa-0")?;
            env.step("vhost-relay --vdpa listening");
            // vhost-vdpa has one owner: a second process gets a message saying so.
            let out = qemu.run_ok(
                "vhost-relay --socket-path /tmp/vr2.sock --vdpa /dev/vhost-vdpa-0; echo rc=$?",
                T,
            )?;
            ensure(
                out.contains("/dev/vhost-vdpa-0 is busy") && out.contains("rc=1"),
                || format!("a second vhost-relay on the same device:\n{out}"),
            )?;
            const N: u64 = 3000;
            let out = qemu.run_ok(
                &format!(
                    "vu-frontend --socket /tmp/vr.sock --scenario shadow --packets {N} --write-log /tmp/wlog"
                ),
                Duration::from_secs(180),
            )?;
            for l in out.lines().filter(|l| l.starts_with("vu-frontend")) {
                env.step(l);
            }
            ensure(out.contains("PASS"), || format!("shadow scenario:\n{out}"))?;
            let (tx, rx, drops, errors) = fixture_counters(&mut qemu, "vnet0")?;
            ensure(tx == N && rx == N && drops == 0 && errors == 0, || {
                format!("the device should have looped exactly {N} frames: tx={tx} rx={rx} drops={drops} errors={errors}")
            })?;
            let stats = relay_stats(&mut qemu)?;
            for s in &stats {
                // A third of the frames (and those in flight at the switch) went through
                // the shadow rings, the rest straight from the guest's rings.
                ensure(s.packets > N / 6 && s.packets < N / 2, || {
                    format!(
                        "queue {} should count the logging phase's frames only: {s}",
                        s.queue
                    )
                })?;
            }
            // Every frame relayed through the shadow rings was checked against the dirty log.
            let checked: Option<u64> = out
                .split_whitespace()
                .find_map(|w| w.strip_prefix("logged_device_writes="))
                .and_then(|v| v.parse().ok());
            ensure(stats.iter().all(|s| Some(s.packets) == checked), || {
                format!(
                    "vu-frontend checked {checked:?} device writes, vhost-relay relayed {stats:?}"
                )
            })?;
            let log = qemu.run_ok("cat /tmp/vr.log", T)?;
            let states: Vec<&str> = log
                .lines()
                .filter_map(|l| l.split("vdpa: ").nth(1))
                .filter(|s| *s == "direct" || *s == "shadow")
                .collect();
            ensure(states.ends_with(&["direct", "shadow", "direct"]), || {
                format!("state changes direct, shadow, direct expected in the log:\n{log}")
            })?;
            env.step(&format!(
                "vhost-relay states {states:?}, relayed {:?}",
                stats.iter().map(|s| s.packets).collect::<Vec<_>>()
            ));
            Ok(())
        },
    );
}
