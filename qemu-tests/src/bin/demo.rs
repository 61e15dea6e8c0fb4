//! Demo: a QEMU guest whose virtio-net NIC is served by vhost-relay, relayed to the "VF" end of a
//! veth pair in a private network namespace, pinging the host peer on the other end.
//!
//! Run as root after `scripts/install-deps.sh` and a build of vhost-relay (or use
//! `scripts/demo.sh`, which does both). Everything it creates is removed when it ends.

use std::process::ExitCode;
use std::time::Duration;

use qemu_tests::{
    backend::ctl, check_prerequisites, guest_ping_until_reply, Backend, Error, GuestImage, NetNs,
    Qemu, QemuConfig, Result, ScratchDir, BASE_TOOLS, BOOT_TIMEOUT, GUEST_IP, PEER_IP,
};

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn say(what: &str) {
    println!("==> {what}");
}

fn demo() -> Result<()> {
    if !check_prerequisites(BASE_TOOLS)? {
        return Err(Error::Prerequisite("run the demo as root".into()));
    }
    let bin = qemu_tests::backend::vhost_relay_bin()?;
    say("preparing the guest image (Debian kernel + busybox initramfs, cached)");
    let image = GuestImage::ensure()?;
    println!(
        "    kernel {} ({})",
        image.kernel.display(),
        image.kernel_package
    );
    println!("    initrd {}", image.initrd.display());

    let dir = ScratchDir::new("vrdemo")?;
    let ns = NetNs::new("vrdemo")?;
    say(&format!(
        "network namespace {}: veth {} (the VF, no address) <-> {} ({PEER_IP}/24, the host peer)",
        ns.name(),
        ns.vf(),
        ns.peer()
    ));
    let sock = dir.join("vm1.sock");
    let control = dir.join("control.sock");
    say(&format!(
        "starting {} --socket-path {} --vf {} --control {} (inside the namespace)",
        bin.display(),
        sock.display(),
        ns.vf(),
        control.display()
    ));
    let control_arg = control.display().to_string();
    let mut relay =
        Backend::vhost_relay_port_with(&ns, &sock, 1, dir.path(), &["--control", &control_arg])?;

    let cfg = QemuConfig::new(&image, &sock, dir.path());
    say(&format!(
        "booting the guest: qemu-system-x86_64 {}",
        cfg.args().join(" ")
    ));
    let mut qemu = Qemu::boot(&cfg, BOOT_TIMEOUT)?;
    say("guest is up; its NIC:");
    print!(
        "{}",
        indent(&qemu.run_ok("ip addr show eth0", Duration::from_secs(20))?)
    );

    guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
    say(&format!(
        "guest ({GUEST_IP}) pings the host peer ({PEER_IP}):"
    ));
    print!(
        "{}",
        indent(&qemu.run_ok(&format!("ping -c 5 {PEER_IP}"), Duration::from_secs(60))?)
    );

    say(&format!(
        "host peer pings the guest (inside {}):",
        ns.name()
    ));
    print!("{}", indent(&ns.ping(GUEST_IP, 5)?));

    for what in ["show", "stats"] {
        say(&format!(
            "vhost-relay ctl --control {} {what} vm1",
            control.display()
        ));
        print!("{}", indent(&ctl(&control, &[what, "vm1"])?));
    }
    say("cleaning up (QEMU, vhost-relay, namespace)");
    drop(qemu);
    relay.stop();
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
