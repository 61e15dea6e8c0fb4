//! vDPA end-to-end tests: a 6.12 guest (vdpa, vhost_vdpa, VDUSE) in which the `vduse-net`
//! fixture provides a virtio-net device, `vdpa dev add` puts it on the vDPA bus, and vhost_vdpa
//! turns it into `/dev/vhost-vdpa-0`.

use std::path::Path;
use std::time::Duration;

use qemu_tests::{
    e2e_test_with, ensure, GuestBinary, GuestImage, Qemu, QemuConfig, Result, BOOT_TIMEOUT,
};

const T: Duration = Duration::from_secs(60);

/// The test programs built with this crate, for the guest's `/bin`.
fn test_binaries() -> Result<Vec<GuestBinary>> {
    [
        env!("CARGO_BIN_EXE_vduse-net"),
        env!("CARGO_BIN_EXE_vdpa-probe"),
    ]
    .iter()
    .map(|p| GuestBinary::new(Path::new(p)))
    .collect()
}

/// Starts the fixture as device `name` in the background and attaches it to the vDPA bus;
/// returns once `/dev/vhost-vdpa-0` exists.
fn start_fixture(qemu: &mut Qemu, name: &str, extra: &str) -> Result<()> {
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
             n=0; while [ ! -e /dev/vhost-vdpa-0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; \
             vdpa dev show {name}; ls -l /dev/vhost-vdpa-0"
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
            env.step("booting 6.12 guest");
            let mut qemu = Qemu::boot(
                &QemuConfig::without_nic(&env.image, env.dir.path()),
                BOOT_TIMEOUT,
            )?;
            env.step("guest ready");
            start_fixture(&mut qemu, "vnet0", "--mac 52:54:00:00:00:0a --mtu 1400")?;
            env.step("fixture on the vDPA bus, /dev/vhost-vdpa-0 there");
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
            let out = qemu.run_ok(
                "vdpa-probe --traffic 300; sleep 0.5; cat /tmp/vnet0.stats",
                T,
            )?;
            env.step(out.trim());
            ensure(out.contains("received=300 corrupt=0 PASS"), || {
                format!("traffic through the fixture:\n{out}")
            })?;
            ensure(
                out.contains("fixture packets_tx=300 packets_rx=300 drops=0 errors=0"),
                || format!("fixture counters:\n{out}"),
            )?;
            // A second driver session after the reset: the fixture serves it again.
            let out = qemu.run_ok(
                "vdpa-probe --traffic 100; sleep 0.5; cat /tmp/vnet0.stats",
                T,
            )?;
            ensure(
                out.contains("PASS") && out.contains("packets_tx=400 packets_rx=400"),
                || format!("second session:\n{out}"),
            )?;
            Ok(())
        },
    );
}
