//! systemd's conventions against the real binary and systemd's own tools: socket activation
//! through `systemd-socket-activate` (the socket made and passed by systemd's code, named
//! with `--fdname` as `FileDescriptorName=` does), and the `sd_notify` messages received on a
//! NOTIFY_SOCKET the test listens on, as systemd's manager would.

mod support;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use test_support::sd_notify::{field, NotifySocket};

const T: Duration = Duration::from_secs(10);

/// The service manager's end, failing the test with vhost-relay's log when a message does
/// not come.
struct Manager(NotifySocket);

impl Manager {
    fn bind(dir: &Path) -> Manager {
        Manager(NotifySocket::bind(&dir.join("notify")).expect("bind the notify socket"))
    }

    /// Waits for a message with the line `line`; returns it, and every message before it.
    fn wait_for(&self, line: &str, log: &Path) -> (String, Vec<String>) {
        self.0.wait_for(line, T).unwrap_or_else(|got| {
            panic!("no {line} notification (got {got:?}); log: {}", read(log))
        })
    }

    /// A message within a short while, if any.
    fn quiet(&self) -> Option<String> {
        self.0.next(Duration::from_millis(300))
    }
}

/// `systemd-socket-activate -l SOCKET --fdname NAME -- vhost-relay ARGS`: systemd's tool
/// binds the socket, waits for the first connection and execs vhost-relay in its own process
/// with LISTEN_FDS=1, LISTEN_PID and LISTEN_FDNAMES=NAME.
fn activate(socket: &Path, fdname: &str, manager: &Manager, args: &[&str], log: &Path) -> Child {
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l").arg(socket);
    if !fdname.is_empty() {
        cmd.arg(format!("--fdname={fdname}"));
    }
    let child = cmd
        .arg(format!("--setenv=NOTIFY_SOCKET={}", manager.0.address))
        .arg("--setenv=RUST_LOG=info")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_vhost-relay"))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .expect("run systemd-socket-activate (Debian package systemd)");
    assert!(
        wait_for(T, || socket.exists()),
        "systemd-socket-activate made {}",
        socket.display()
    );
    child
}

/// Waits for the child to exit; its exit code.
fn exit_code(child: &mut Child) -> Option<i32> {
    let start = Instant::now();
    while start.elapsed() < T {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctl_list(control: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-relay"))
        .args(["ctl", "--control"])
        .arg(control)
        .args(["list", "--json"])
        .output()
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    reply["result"].clone()
}

/// The unit pair vhost-relay@.socket / vhost-relay@.service, by hand: the passed socket is
/// served by the config file's port named like it, READY=1 follows, a reload is framed by
/// RELOADING=1 and READY=1, a port restarted by a reload serves the same passed socket
/// again, and SIGTERM says STOPPING=1 and exits 0.
#[test]
fn socket_activated_port_serves_the_passed_socket_through_reload_and_stop() {
    let dir = temp_dir("sd-activate");
    let manager = Manager::bind(&dir);
    let (socket, config, control, log) = (
        dir.join("vm1.sock"),
        dir.join("vm1.toml"),
        dir.join("control.sock"),
        dir.join("vr.log"),
    );
    std::fs::write(&config, "[[port]]\nname = \"vm1\"\nloopback = true\n").unwrap();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ];
    let mut child = Killed(activate(&socket, "vm1", &manager, &args, &log));

    // The first connection starts it (as QEMU's does under systemd) and is served.
    let mut f = TestFrontend::connect(&socket, 1, VIRTIO_NET_F_MRG_RXBUF);
    let (ready, _) = manager.wait_for("READY=1", &log);
    // READY=1 is computed once the port listens, which may be just before it accepts the
    // connection that started it: either count is right, nothing else is.
    let status = field(&ready, "STATUS");
    assert!(
        matches!(
            status,
            Some("1 ports: 0 connected" | "1 ports: 1 connected")
        ),
        "{ready:?}"
    );
    round_trip(&mut f, 1);
    let list = ctl_list(&control);
    assert_eq!(list[0]["name"], "vm1");
    assert_eq!(list[0]["role"], "fd");
    assert_eq!(list[0]["socket"], "fd 3");

    // A reload with the file unchanged: framed for systemd, the guest sees nothing.
    signal(&child.0, libc::SIGHUP);
    let (reloading, _) = manager.wait_for("RELOADING=1", &log);
    assert!(
        reloading.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "{reloading:?}"
    );
    manager.wait_for("READY=1", &log);
    round_trip(&mut f, 2);

    // The port's table changes: it restarts on the same passed socket (the fd was kept).
    std::fs::write(
        &config,
        "[[port]]\nname = \"vm1\"\nloopback = true\nqueues = 2\n",
    )
    .unwrap();
    signal(&child.0, libc::SIGHUP);
    manager.wait_for("RELOADING=1", &log);
    manager.wait_for("READY=1", &log);
    assert!(
        wait_for(T, || {
            use vhost::VhostBackend;
            f.fe.get_features().is_err()
        }),
        "the restarted port hung up on its frontend"
    );
    assert!(
        wait_for(T, || ctl_list(&control)[0]["state"] == "listening"),
        "the restarted port listens on the passed socket again: {}",
        ctl_list(&control)
    );
    let mut f2 = TestFrontend::connect(&socket, 2, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut f2, 3);

    signal(&child.0, libc::SIGTERM);
    manager.wait_for("STOPPING=1", &log);
    assert_eq!(exit_code(&mut child.0), Some(0), "{}", read(&log));
    assert!(
        socket.exists(),
        "the passed socket is systemd's: not removed by vhost-relay"
    );
    assert!(!control.exists(), "the control socket is removed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A port given on the command line with no socket serves the one passed socket, and takes
/// its name.
#[test]
fn command_line_port_serves_the_only_passed_socket() {
    let dir = temp_dir("sd-cli");
    let manager = Manager::bind(&dir);
    let (socket, log) = (dir.join("p.sock"), dir.join("vr.log"));
    let control = dir.join("control.sock");
    let args = ["--loopback", "--control", control.to_str().unwrap()];
    let _child = Killed(activate(&socket, "guest7", &manager, &args, &log));
    let mut f = TestFrontend::connect(&socket, 1, VIRTIO_NET_F_MRG_RXBUF);
    manager.wait_for("READY=1", &log);
    round_trip(&mut f, 1);
    assert_eq!(ctl_list(&control)[0]["name"], "guest7");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A config whose port names no passed socket: one line naming the port and the passed
/// names, exit 2, and no READY=1.
#[test]
fn a_port_named_unlike_every_passed_socket_is_refused_in_one_line() {
    let dir = temp_dir("sd-misnamed");
    let manager = Manager::bind(&dir);
    let (socket, config, log) = (dir.join("s.sock"), dir.join("c.toml"), dir.join("vr.log"));
    std::fs::write(&config, "[[port]]\nname = \"vm9\"\nloopback = true\n").unwrap();
    let mut child = Killed(activate(
        &socket,
        "vm1",
        &manager,
        &["--config", config.to_str().unwrap()],
        &log,
    ));
    let _first = connect_when_listening(&socket);
    assert_eq!(exit_code(&mut child.0), Some(2));
    // systemd-socket-activate's own lines come first in the log; ours is the one line after.
    let err = read(&log);
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("vhost-relay"))
        .collect();
    assert_eq!(
        ours,
        [format!(
            "vhost-relay: {}: port 1: no socket, and no passed socket is named 'vm9' \
             (LISTEN_FDNAMES: vm1)",
            config.display()
        )],
        "{err}"
    );
    assert_eq!(manager.quiet(), None, "no notification from a failed start");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without socket activation: READY=1 comes once every port of the file listens (each can
/// be connected to when it arrives), sent to an abstract NOTIFY_SOCKET as systemd uses.
#[test]
fn ready_comes_once_every_port_listens() {
    let dir = temp_dir("sd-ready");
    let manager = Manager(NotifySocket::bind_abstract("sd-ready").unwrap());
    let (config, log) = (dir.join("c.toml"), dir.join("vr.log"));
    let ports: Vec<PathBuf> = (1..=3).map(|i| dir.join(format!("p{i}.sock"))).collect();
    let mut text = String::new();
    for p in &ports {
        text += &format!("[[port]]\nsocket = \"{}\"\nloopback = true\n", p.display());
    }
    std::fs::write(&config, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-relay"));
    cmd.env("NOTIFY_SOCKET", &manager.0.address)
        .args(["--config", config.to_str().unwrap()])
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    let mut child = Killed(cmd.spawn().unwrap());
    let (ready, before) = manager.wait_for("READY=1", &log);
    assert!(
        before.is_empty(),
        "READY=1 is the first message: {before:?}"
    );
    assert_eq!(
        field(&ready, "STATUS"),
        Some("3 ports: 0 connected"),
        "{ready:?}"
    );
    for p in &ports {
        assert!(UnixStream::connect(p).is_ok(), "{} listens", p.display());
    }
    signal(&child.0, libc::SIGTERM);
    manager.wait_for("STOPPING=1", &log);
    assert_eq!(exit_code(&mut child.0), Some(0));
    for p in &ports {
        assert!(!p.exists(), "{} removed on stop", p.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}
