//! vDPA end-to-end tests: a 6.12 guest (vdpa, vhost_vdpa, VDUSE) in which the `vduse-net`
//! fixture provides a virtio-net device, `vdpa dev add` puts it on the vDPA bus, and vhost_vdpa
//! turns it into `/dev/vhost-vdpa-0`.

use std::time::Duration;

use qemu_tests::{e2e_test_with, ensure, GuestImage, Qemu, QemuConfig, BOOT_TIMEOUT};

const T: Duration = Duration::from_secs(60);

#[test]
fn vdpa_environment() {
    e2e_test_with(
        "vdpa_environment",
        &[],
        || GuestImage::ensure_vdpa(&[]),
        |env| {
            env.step("booting 6.12 guest");
            let mut qemu = Qemu::boot(
                &QemuConfig::without_nic(&env.image, env.dir.path()),
                BOOT_TIMEOUT,
            )?;
            env.step("guest ready");
            let out = qemu.run_ok(
                "uname -r; cat /proc/modules; ls /dev/vduse; vdpa mgmtdev show",
                T,
            )?;
            eprintln!("{out}");
            ensure(out.contains("vduse"), || format!("no vduse:\n{out}"))?;
            Ok(())
        },
    );
}
