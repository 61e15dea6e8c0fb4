//! The runtime port API against the real binary: `vhost-relay --control` served, and used
//! through `vhost-relay ctl` (the client an operator runs) and raw JSON lines (what an agent
//! sends). Ports are loopback ones, so a test frontend's packets come back through them.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const T: Duration = Duration::from_secs(10);

/// A vhost-relay with a control socket (and maybe a config file); killed by PID on drop.
struct Daemon {
    child: Child,
    dir: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(tag: &str, extra: &[&str]) -> Daemon {
        Self::start_in(None, tag, extra)
    }

    /// Started inside `ns` (for VF ports on its veth), if given.
    fn start_in(ns: Option<&NetNs>, tag: &str, extra: &[&str]) -> Daemon {
        let dir = temp_dir(tag);
        let control = dir.join("control.sock");
        let log = dir.join("vr.log");
        let mut args = vec!["--control", control.to_str().unwrap()];
        args.extend_from_slice(extra);
        let child = match ns {
            Some(ns) => ns.spawn_backend(&args, &log),
            None => spawn_backend(&args, &log, None),
        };
        let d = Daemon {
            child,
            dir,
            control,
            log,
        };
        assert!(
            wait_for(T, || UnixStream::connect(&d.control).is_ok()),
            "the control socket answers: {}",
            d.log_text()
        );
        d
    }

    fn sock(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `vhost-relay ctl --control C ARGS`.
    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vhost-relay"))
            .arg("ctl")
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .output()
            .expect("run vhost-relay ctl")
    }

    /// `ctl ARGS --json`, which must succeed; its `result`.
    fn ctl_ok(&self, args: &[&str]) -> Value {
        let out = self.ctl(&[args, &["--json"]].concat());
        let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ctl {args:?}: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert!(
            out.status.success() && reply["ok"] == true,
            "ctl {args:?}: {reply}"
        );
        reply["result"].clone()
    }

    /// `ctl ARGS`, which must fail with one line on stderr; that line.
    fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "ctl {args:?} should fail");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        err
    }

    fn add_loopback(&self, name: &str) {
        let sock = self.sock(name);
        let args = [
            "add",
            "--name",
            name,
            "--socket-path",
            sock.to_str().unwrap(),
            "--loopback",
        ];
        assert_eq!(self.ctl_ok(&args), Value::Null);
    }

    fn port(&self, name: &str) -> Value {
        self.ctl_ok(&["show", name])
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request line on a fresh connection, and its reply.
fn raw_request(control: &Path, line: &[u8]) -> Value {
    let mut s = UnixStream::connect(control).expect("connect to the control socket");
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(line).unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).expect("a reply");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

fn frontend_closed(f: &mut TestFrontend) -> bool {
    use vhost::VhostBackend;
    f.fe.get_features().is_err()
}

#[test]
fn a_port_added_at_runtime_serves_reports_and_goes_away_on_remove() {
    let d = Daemon::start("ctl-add", &[]);
    assert_eq!(d.ctl_ok(&["list"]), json!([]));
    d.add_loopback("p1");
    let list = d.ctl_ok(&["list"]);
    assert_eq!(list[0]["name"], "p1");
    assert_eq!(list[0]["kind"], "loopback");
    assert_eq!(list[0]["role"], "server");
    assert!(
        wait_for(T, || d.port("p1")["state"] == "listening"),
        "{}",
        d.port("p1")
    );

    let connected_at = std::time::Instant::now();
    let mut f = TestFrontend::connect(&d.sock("p1"), 1, VIRTIO_NET_F_MRG_RXBUF);
    for tag in 1..=3 {
        round_trip(&mut f, tag);
    }
    let busy_bound = connected_at.elapsed().as_nanos() as u64;
    let p = d.port("p1");
    assert_eq!(p["state"], "connected");
    assert_eq!(p["queues_enabled"], 1, "{p}");
    assert_eq!(p["connects"], 1);
    let names = p["connection"]["feature_names"].as_array().unwrap();
    assert!(names.contains(&json!("MRG_RXBUF")), "{p}");
    assert!(names.contains(&json!("VERSION_1")), "{p}");
    assert_eq!(p["dirty_logging"], false);
    let stats = d.ctl_ok(&["stats", "p1"]);
    let q = &stats[0]["queues_stats"];
    assert_eq!(
        (q[1]["direction"].as_str(), q[1]["packets"].as_u64()),
        (Some("tx"), Some(3))
    );
    assert_eq!(
        (q[0]["direction"].as_str(), q[0]["packets"].as_u64()),
        (Some("rx"), Some(3))
    );
    assert_eq!(
        q[0]["bytes"],
        3 * 100,
        "frame bytes, without the virtio-net header"
    );
    // The worker's time in the batches that moved the packets: some, and never more than
    // the time the traffic took (its spinning in between is not counted).
    let busy = |q: &Value| q["busy_ns"].as_u64().expect("busy_ns");
    assert!(busy(&q[1]) > 0, "{stats}");
    assert!(busy(&q[0]) + busy(&q[1]) < busy_bound, "{stats}");
    let text = String::from_utf8(d.ctl(&["list"]).stdout).unwrap();
    assert!(
        text.contains("p1") && text.contains("connected") && text.contains("1/1"),
        "{text}"
    );

    assert_eq!(d.ctl_ok(&["remove", "p1"]), Value::Null);
    assert!(frontend_closed(&mut f), "the frontend is disconnected");
    assert!(!d.sock("p1").exists(), "the socket file is removed");
    assert_eq!(d.ctl_ok(&["list"]), json!([]));
    // The name and the socket are free again.
    d.add_loopback("p1");
    let mut f = TestFrontend::connect(&d.sock("p1"), 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut f, 9);
}

#[test]
fn bad_requests_get_one_clear_error_and_change_nothing() {
    let d = Daemon::start("ctl-bad", &[]);
    d.add_loopback("keep");
    let mut f = TestFrontend::connect(&d.sock("keep"), 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut f, 1);

    assert!(d
        .ctl_err(&["show", "nope"])
        .contains("no port named 'nope'"));
    assert!(d
        .ctl_err(&["remove", "nope"])
        .contains("no port named 'nope'"));
    let keep_sock = d.sock("keep");
    let keep = keep_sock.to_str().unwrap();
    let other = d.sock("other");
    let other = other.to_str().unwrap();
    let dup_name = d.ctl_err(&[
        "add",
        "--name",
        "keep",
        "--socket-path",
        other,
        "--loopback",
    ]);
    assert!(
        dup_name.contains("a port named 'keep' exists already"),
        "{dup_name}"
    );
    let dup_sock = d.ctl_err(&["add", "--name", "x", "--socket-path", keep, "--loopback"]);
    assert!(dup_sock.contains("port keep uses socket"), "{dup_sock}");
    let bad_vf = d.ctl_err(&[
        "add",
        "--name",
        "x",
        "--socket-path",
        other,
        "--vf",
        "novf0",
    ]);
    assert!(bad_vf.contains("novf0"), "{bad_vf}");
    let bad_q = d.ctl_err(&[
        "add",
        "--socket-path",
        other,
        "--loopback",
        "--queues",
        "99",
    ]);
    assert!(bad_q.contains("queues must be 1 to 32, not 99"), "{bad_q}");
    let no_dir = d.ctl_err(&[
        "add",
        "--socket-path",
        "/nonexistent/dir/x.sock",
        "--loopback",
    ]);
    assert!(
        no_dir.contains("directory /nonexistent/dir does not exist"),
        "{no_dir}"
    );

    let in_the_way = d.dir.join("file");
    std::fs::write(&in_the_way, "not a socket").unwrap();
    let path = in_the_way.to_str().unwrap();
    let unbindable = d.ctl_err(&["add", "--name", "y", "--socket-path", path, "--loopback"]);
    assert!(
        unbindable.contains("a file that is not a socket is in the way"),
        "{unbindable}"
    );

    let reply = raw_request(&d.control, b"{\"command\": \"list\"\n");
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed request"),
        "{reply}"
    );
    let reply = raw_request(&d.control, b"{\"command\": \"explode\"}\n");
    assert!(
        reply["error"].as_str().unwrap().contains("unknown variant"),
        "{reply}"
    );
    let reply = raw_request(
        &d.control,
        b"{\"command\":\"add\",\"port\":{\"socket\":\"/tmp/q\",\"loopback\":true,\"colour\":1}}\n",
    );
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `colour`"),
        "{reply}"
    );
    let reply = raw_request(
        &d.control,
        b"{\"command\":\"add\",\"port\":{\"fd\":0,\"loopback\":true}}\n",
    );
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("an fd cannot be passed"),
        "{reply}"
    );

    // A client that says nothing does not hold up the others; one that sends 10 MB is cut
    // off after the first 64 KiB with a reply that says so.
    let _silent = UnixStream::connect(&d.control).unwrap();
    let mut flood = UnixStream::connect(&d.control).unwrap();
    flood.set_read_timeout(Some(T)).unwrap();
    let big = vec![b'x'; 10 << 20];
    let _ = flood.write_all(&big); // may fail once the daemon has closed it
    let mut reply = String::new();
    let _ = flood.read_to_string(&mut reply);
    assert!(
        reply.contains("request longer than 65536 bytes"),
        "{reply:?}"
    );

    // Nothing changed: the one port, still serving its frontend.
    let list = d.ctl_ok(&["list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["state"], "connected");
    round_trip(&mut f, 2);
}

#[test]
fn a_live_control_socket_is_not_taken_over_and_a_stale_one_is_replaced() {
    let d = Daemon::start("ctl-live", &[]);
    let log = d.dir.join("second.log");
    let mut second = spawn_backend(&["--control", d.control.to_str().unwrap()], &log, None);
    let status = second.wait().unwrap();
    assert!(!status.success());
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(err.contains("another process is serving it"), "{err}");
    assert!(
        UnixStream::connect(&d.control).is_ok(),
        "the first still serves"
    );
    drop(d);

    // Killed: its socket file stays behind, and the next start replaces it.
    let dir = temp_dir("ctl-stale");
    let control = dir.join("control.sock");
    drop(std::os::unix::net::UnixListener::bind(&control).unwrap());
    assert!(control.exists());
    let d2 = Daemon {
        child: spawn_backend(
            &["--control", control.to_str().unwrap()],
            &dir.join("vr.log"),
            None,
        ),
        dir: dir.clone(),
        control: control.clone(),
        log: dir.join("vr.log"),
    };
    assert!(
        wait_for(T, || UnixStream::connect(&control).is_ok()),
        "{}",
        d2.log_text()
    );
}

/// Runs `ip netns exec NS ARGS` and returns its stdout.
fn in_ns(ns: &NetNs, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args)
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn remove_closes_the_vf_sockets_and_detaches_the_xdp_program() {
    let ns = NetNs::new("ctl-vf");
    let d = Daemon::start_in(Some(&ns), "ctl-vf", &[]);
    // /proc/net/packet: a header line, then one line per packet socket of the namespace.
    let packet_sockets = || in_ns(&ns, &["cat", "/proc/net/packet"]).lines().count() - 1;
    let xdp_attached = || in_ns(&ns, &["ip", "link", "show", "vf0"]).contains("xdp");
    let sock = d.sock("p");
    let sock = sock.to_str().unwrap();
    for (mode, kind) in [("af-packet", "AF_PACKET"), ("af-xdp", "AF_XDP")] {
        let add = [
            "add",
            "--name",
            "p",
            "--socket-path",
            sock,
            "--vf",
            "vf0",
            "--vf-mode",
            mode,
        ];
        assert_eq!(d.ctl_ok(&add), Value::Null, "{mode}");
        let p = d.port("p");
        assert!(
            p["vf_sockets"][0].as_str().unwrap().starts_with(kind),
            "{p}"
        );
        assert_eq!(p["vf"], "vf0");
        if mode == "af-xdp" {
            assert!(xdp_attached(), "an XDP program while the port runs");
        } else {
            assert!(
                packet_sockets() >= 1,
                "an AF_PACKET socket while the port runs"
            );
        }
        assert_eq!(d.ctl_ok(&["remove", "p"]), Value::Null);
        assert_eq!(
            packet_sockets(),
            0,
            "{mode}: the port's packet sockets are closed"
        );
        assert!(!xdp_attached(), "{mode}: no XDP program is left on the VF");
    }
}

/// A config file of loopback ports `name = queues`.
fn write_config(path: &Path, dir: &Path, ports: &[(&str, usize)]) {
    let mut text = String::new();
    for (name, queues) in ports {
        let sock = dir.join(format!("{name}.sock"));
        text.push_str(&format!(
            "[[port]]\nname = \"{name}\"\nsocket = \"{}\"\nloopback = true\nqueues = {queues}\n\n",
            sock.display()
        ));
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn reload_touches_only_the_ports_whose_table_changed() {
    let dir = temp_dir("ctl-reload-cfg");
    let cfg = dir.join("ports.toml");
    write_config(&cfg, &dir, &[("a", 1), ("b", 1), ("c", 1)]);
    let d = Daemon::start("ctl-reload", &["--config", cfg.to_str().unwrap()]);
    let sock = |n: &str| dir.join(format!("{n}.sock"));
    assert!(wait_for(T, || sock("a").exists() && sock("b").exists()));
    let mut fa = TestFrontend::connect(&sock("a"), 1, VIRTIO_NET_F_MRG_RXBUF);
    let mut fb = TestFrontend::connect(&sock("b"), 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut fa, 1);
    round_trip(&mut fb, 1);
    d.add_loopback("api");

    // b changes, c goes, d comes, a stays; the ctl-added port is not the file's.
    write_config(&cfg, &dir, &[("a", 1), ("b", 2), ("d", 1)]);
    let summary = d.ctl_ok(&["reload"]);
    assert_eq!(summary["unchanged"], json!(["a"]));
    assert_eq!(summary["restarted"], json!(["b"]));
    assert_eq!(summary["stopped"], json!(["c"]));
    assert_eq!(summary["started"], json!(["d"]));
    round_trip(&mut fa, 2);
    assert_eq!(d.port("a")["connects"], 1, "a's guest saw nothing");
    assert!(frontend_closed(&mut fb), "b was restarted");
    assert_eq!(d.port("b")["queues"], 2);
    assert!(!sock("c").exists(), "c's socket file is removed");
    let names: Vec<Value> = d
        .ctl_ok(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    assert_eq!(names, [json!("a"), json!("api"), json!("b"), json!("d")]);

    // A file with an error changes nothing, and the error comes back to ctl.
    std::fs::write(&cfg, "[[port]]\nname = \"a\"\nloopback = true\n").unwrap();
    let err = d.ctl_err(&["reload"]);
    assert!(err.contains("no socket"), "{err}");
    assert_eq!(d.ctl_ok(&["list"]).as_array().unwrap().len(), 4);
    round_trip(&mut fa, 3);

    // SIGHUP does the same as ctl reload.
    write_config(&cfg, &dir, &[("a", 1)]);
    signal(&d.child, libc::SIGHUP);
    assert!(
        wait_for(T, || d.ctl_ok(&["list"]).as_array().unwrap().len() == 2),
        "{}",
        d.log_text()
    );
    round_trip(&mut fa, 4);
}

#[test]
fn sigterm_disconnects_frontends_and_removes_every_socket_file() {
    let d = Daemon::start("ctl-term", &[]);
    d.add_loopback("t1");
    let mut f = TestFrontend::connect(&d.sock("t1"), 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut f, 1);
    let mut d = d;
    signal(&d.child, libc::SIGTERM);
    let status = d.child.wait().unwrap();
    assert!(status.success(), "exit 0: {status:?} {}", d.log_text());
    assert!(frontend_closed(&mut f));
    assert!(!d.sock("t1").exists(), "port socket removed");
    assert!(!d.control.exists(), "control socket removed");
}
