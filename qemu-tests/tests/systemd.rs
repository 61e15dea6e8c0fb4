//! Socket activation with a real guest: the `vhost-relay@.socket` / `vhost-relay@.service`
//! pair played by systemd's own `systemd-socket-activate`. It binds the socket and passes it
//! named like the port; QEMU's connection starts vhost-relay, which serves the guest on the
//! passed socket (a VF port in a namespace), tells the manager READY=1, frames a reload with
//! RELOADING=1 / READY=1 without the guest noticing, and says STOPPING=1 on SIGTERM.

use std::time::Duration;

use qemu_tests::{
    e2e_test, ensure, ensure_pings_counted, guest_ping, guest_ping_until_reply, peer_ping, Backend,
    Error, NetNs, Qemu, QemuConfig, BOOT_TIMEOUT, GUEST_IP, PEER_IP,
};
use test_support::sd_notify::{field, NotifySocket};

/// How long a notification may take: vhost-relay starts only once QEMU connects.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);

fn wait_notify(notify: &NotifySocket, line: &str, relay: &Backend) -> Result<String, Error> {
    notify
        .wait_for(line, NOTIFY_TIMEOUT)
        .map(|(m, _)| m)
        .map_err(|got| {
            Error::Check(format!(
                "no {line} on NOTIFY_SOCKET (got {got:?}); vhost-relay's log:\n{}",
                relay.output()
            ))
        })
}

#[test]
fn socket_activated_port_serves_a_guest_and_notifies_the_manager() {
    e2e_test(
        "socket_activated_port",
        &["systemd-socket-activate"],
        |env| {
            let ns = NetNs::new("vrsd")?;
            let dir = env.dir.path().to_path_buf();
            let (sock, cfg) = (dir.join("vm1.sock"), dir.join("vm1.toml"));
            // As /etc/vhost-relay/%i.toml: one port named like the instance, no socket.
            std::fs::write(
                &cfg,
                format!("[[port]]\nname = \"vm1\"\nvf = \"{}\"\n", ns.vf()),
            )
            .map_err(|e| Error::io("writing the port's config", e))?;
            // A path socket: an abstract one would not be reachable from inside the namespace.
            let notify = NotifySocket::bind(&dir.join("notify"))
                .map_err(|e| Error::io("binding the notify socket", e))?;
            let args = ["--config", cfg.to_str().unwrap()];
            let mut relay = Backend::vhost_relay_activated(
                Some(&ns),
                &sock,
                "vm1",
                &notify.address,
                &args,
                &dir,
                1,
            )?;
            ensure(notify.next(Duration::from_millis(500)).is_none(), || {
                "a notification before anything connected: vhost-relay should not be running yet"
                    .into()
            })?;

            env.step("booting guest (its connection starts vhost-relay)");
            let qemu_dir = dir.join("qemu");
            std::fs::create_dir_all(&qemu_dir).map_err(|e| Error::io("guest workdir", e))?;
            let mut qemu =
                Qemu::boot(&QemuConfig::new(&env.image, &sock, &qemu_dir), BOOT_TIMEOUT)?;
            let ready = wait_notify(&notify, "READY=1", &relay)?;
            ensure(
                field(&ready, "STATUS").is_some_and(|s| s.starts_with("1 ports")),
                || format!("READY=1 without the port count: {ready:?}"),
            )?;
            ensure(
                relay
                    .output()
                    .contains("port vm1: serving inherited socket fd 3"),
                || format!("the port does not serve the passed fd:\n{}", relay.output()),
            )?;
            env.step("guest ready, READY=1 received");

            guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
            let before = relay.stats()?;
            guest_ping(&mut qemu, PEER_IP, 10)?;
            peer_ping(&ns, GUEST_IP, 10)?;
            let after = relay.stats()?;
            ensure_pings_counted(&before, &after, "vm1", 10)?;
            env.step("pings both ways through the passed socket");

            // SIGHUP with the file unchanged: systemd sees the reload, the guest nothing.
            qemu_tests::util::signal(relay.pid(), libc::SIGHUP)?;
            let reloading = wait_notify(&notify, "RELOADING=1", &relay)?;
            ensure(field(&reloading, "MONOTONIC_USEC").is_some(), || {
                format!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}")
            })?;
            wait_notify(&notify, "READY=1", &relay)?;
            guest_ping(&mut qemu, PEER_IP, 5)?;
            env.step("reload framed by RELOADING=1 / READY=1; guest still answers");

            let status = relay.stop();
            ensure(status.is_some_and(|s| s.success()), || {
                format!(
                    "SIGTERM should stop vhost-relay with 0: {status:?}\n{}",
                    relay.output()
                )
            })?;
            wait_notify(&notify, "STOPPING=1", &relay)?;
            Ok(())
        },
    );
}
