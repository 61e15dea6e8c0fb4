//! Reload with guests running: two QEMU guests on two VF ports of one `vhost-relay
//! --config FILE --control PATH`; the file changes one port's table and SIGHUP reloads it.
//! The changed port restarts (its guest is disconnected); the other guest answers every ping
//! sent across the reload, and its port never sees a second connection.

use std::path::Path;
use std::time::Duration;

use qemu_tests::backend::ctl_json;
use qemu_tests::{
    e2e_test, ensure, guest_ping_until_reply, Backend, Error, NetNs, Qemu, QemuConfig,
    BOOT_TIMEOUT, PEER_IP,
};

/// The second guest's link: its own veth pair and subnet in the same namespace.
const PEER_B_IP: &str = "10.0.1.1";
const GUEST_B_IP: &str = "10.0.1.2";

fn config(vf_a: &str, vf_b: &str, dir: &Path, b_busy_poll_us: u32) -> String {
    format!(
        "[[port]]\nname = \"a\"\nsocket = \"{}\"\nvf = \"{vf_a}\"\n\n\
         [[port]]\nname = \"b\"\nsocket = \"{}\"\nvf = \"{vf_b}\"\nbusy_poll_us = {b_busy_poll_us}\n",
        dir.join("a.sock").display(),
        dir.join("b.sock").display(),
    )
}

#[test]
fn reload_restarts_only_the_changed_port_while_the_other_guest_pings_on() {
    e2e_test("reload_restarts_only_the_changed_port", &[], |env| {
        let ns = NetNs::new("vrl")?;
        ns.ip(&[
            "link", "add", "vf1", "type", "veth", "peer", "name", "peer1",
        ])?;
        ns.ip(&["addr", "add", &format!("{PEER_B_IP}/24"), "dev", "peer1"])?;
        ns.ip(&["link", "set", "vf1", "up"])?;
        ns.ip(&["link", "set", "peer1", "up"])?;
        let dir = env.dir.path();
        let cfg = dir.join("ports.toml");
        let control = dir.join("control.sock");
        let write = |busy: u32| {
            std::fs::write(&cfg, config(ns.vf(), "vf1", dir, busy))
                .map_err(|e| Error::io("writing the config", e))
        };
        write(50)?;
        let args = [
            "--config",
            cfg.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
        ];
        let mut relay = Backend::vhost_relay(Some(&ns), &args, dir, 2)?;
        relay.wait_for_socket(&dir.join("a.sock"), Duration::from_secs(10))?;
        relay.wait_for_socket(&dir.join("b.sock"), Duration::from_secs(10))?;

        for d in ["qa", "qb"] {
            std::fs::create_dir_all(dir.join(d)).map_err(|e| Error::io("guest workdir", e))?;
        }
        let a_cfg = QemuConfig::new(&env.image, &dir.join("a.sock"), &dir.join("qa"));
        let mut a = Qemu::boot(&a_cfg, BOOT_TIMEOUT)?;
        let mut b_cfg = QemuConfig::new(&env.image, &dir.join("b.sock"), &dir.join("qb"));
        b_cfg.mac = "52:54:00:12:34:57".into();
        b_cfg.guest_cidr = format!("{GUEST_B_IP}/24");
        let mut b = Qemu::boot(&b_cfg, BOOT_TIMEOUT)?;
        env.step("both guests up");
        guest_ping_until_reply(&mut a, PEER_IP, Duration::from_secs(60))?;
        guest_ping_until_reply(&mut b, PEER_B_IP, Duration::from_secs(60))?;

        // Pings to guest A every 20 ms across the reload, from the peer's side.
        let pinger = ns
            .command("ping")
            .args(["-i", "0.02", "-c", "250", "-W", "1", qemu_tests::GUEST_IP])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("starting ping", e))?;
        std::thread::sleep(Duration::from_secs(1));
        write(0)?;
        // SAFETY: kill only sends SIGHUP to the vhost-relay we started.
        unsafe { libc::kill(relay.pid() as i32, libc::SIGHUP) };
        let restarted = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            relay.output().contains("reloaded")
        });
        ensure(restarted, || {
            format!("no reload logged: {}", relay.output())
        })?;
        let out = pinger
            .wait_with_output()
            .map_err(|e| Error::io("waiting for ping", e))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        env.step(text.lines().last().unwrap_or(""));
        ensure(
            text.contains("250 packets transmitted, 250 received"),
            || format!("guest A missed pings across the reload:\n{text}"),
        )?;
        let pa = ctl_json(&control, &["show", "a"])?;
        ensure(pa["connects"] == 1 && pa["state"] == "connected", || {
            format!("port a: {pa}")
        })?;
        let pb = ctl_json(&control, &["show", "b"])?;
        ensure(pb["connects"] == 0, || {
            format!("port b was not restarted: {pb}")
        })?;
        ensure(
            relay.output().contains("1 restarted") && relay.output().contains("1 unchanged"),
            || format!("reload summary: {}", relay.output()),
        )?;
        relay.ensure_running()?;
        a.kill()?;
        b.kill()?;
        Ok(())
    });
}
