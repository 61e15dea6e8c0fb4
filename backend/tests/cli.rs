//! The command line a person or libvirt meets: capabilities, and one clear line per mistake.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhost-relay"))
        .args(args)
        .output()
        .expect("run vhost-relay")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn print_capabilities_is_the_spec_json() {
    for args in [
        &["--print-capabilities"][..],
        &[
            "--print-capabilities",
            "--socket-path",
            "/nonexistent/x.sock",
        ][..],
    ] {
        let o = run(args);
        assert!(o.status.success());
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
        assert_eq!(v["type"], "net");
        assert!(v["features"].is_array());
    }
}

#[test]
fn description_file_for_discovery_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/50-vhost-relay.json");
    let text = std::fs::read_to_string(path).expect("docs/50-vhost-relay.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["type"], "net");
    assert!(v["binary"]
        .as_str()
        .is_some_and(|b| b.ends_with("vhost-relay")));
}

/// Each mistake: non-zero exit, and a single line that names the culprit.
fn assert_one_line_error(args: &[&str], culprit: &str) {
    let o = run(args);
    assert!(!o.status.success(), "{args:?} must fail");
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line, got:\n{err}");
    assert!(
        lines[0].contains(culprit),
        "{args:?}: '{}' should name '{culprit}'",
        lines[0]
    );
}

#[test]
fn a_missing_vf_is_named() {
    let dir = std::env::temp_dir();
    let sock = dir.join(format!("vr-cli-{}.sock", std::process::id()));
    assert_one_line_error(
        &["--socket-path", sock.to_str().unwrap(), "--vf", "novf-x42"],
        "novf-x42",
    );
}

#[test]
fn a_bad_vf_mode_is_named() {
    assert_one_line_error(
        &[
            "--socket-path",
            "/tmp/x.sock",
            "--vf",
            "a",
            "--vf-mode",
            "fast",
        ],
        "fast",
    );
}

#[test]
fn an_unusable_socket_path_is_named() {
    assert_one_line_error(
        &["--socket-path", "/nonexistent-dir/vm.sock", "--loopback"],
        "/nonexistent-dir",
    );
}

#[test]
fn a_bad_config_line_is_named() {
    let dir = std::env::temp_dir().join(format!("vr-cli-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(
        &cfg,
        "[[port]]\nsocket = \"/tmp/a.sock\"\nloopback = true\nqueus = 2\n",
    )
    .unwrap();
    assert_one_line_error(&["--config", cfg.to_str().unwrap()], "queus");
    std::fs::write(&cfg, "[[port]]\nsocket = \"/tmp/a.sock\"\n").unwrap();
    assert_one_line_error(&["--config", cfg.to_str().unwrap()], "port 1");
    assert_one_line_error(&["--config", "/nonexistent.toml"], "/nonexistent.toml");
}

#[test]
fn bad_socket_group_or_mode_is_named() {
    let sock = "/tmp/vr-cli-access-never.sock";
    assert_one_line_error(
        &[
            "--socket-path",
            sock,
            "--loopback",
            "--socket-group",
            "no-such-group-here",
        ],
        "no-such-group-here",
    );
    assert_one_line_error(
        &[
            "--socket-path",
            sock,
            "--loopback",
            "--socket-mode",
            "rw-rw----",
        ],
        "rw-rw----",
    );
    assert!(!std::path::Path::new(sock).exists());
}

/// The socket we create gets the group and mode asked for before we accept on it (libvirt's
/// QEMU runs as `libvirt-qemu` and must be let in).
#[test]
fn the_socket_gets_the_group_and_mode_asked_for() {
    use std::os::unix::fs::MetadataExt;
    let dir = std::env::temp_dir().join(format!("vr-cli-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vm.sock");
    let _ = std::fs::remove_file(&sock);
    // Group 1 (`daemon` on Debian) is not root's, so the chown is seen.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vhost-relay"))
        .args(["--loopback", "--socket-group", "1", "--socket-mode", "0660"])
        .arg("--socket-path")
        .arg(&sock)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start vhost-relay");
    // "listening on" is logged once the group and mode are set, before the first accept.
    let stderr = child.stderr.take().expect("stderr");
    let listening = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map_while(Result::ok)
        .any(|l| l.contains("listening on"));
    let meta = std::fs::metadata(&sock);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(listening, "vhost-relay ended without listening");
    let meta = meta.expect("socket metadata");
    assert_eq!(meta.mode() & 0o777, 0o660, "mode {:o}", meta.mode());
    assert_eq!(meta.gid(), 1);
}

#[test]
fn an_fd_that_is_not_a_listening_socket_is_refused() {
    // fd 0 is whatever stdin is: not a listening unix socket.
    assert_one_line_error(&["--fd", "0", "--loopback"], "fd 0");
}

#[test]
fn conflicting_options_are_refused() {
    let o = run(&["--socket-path", "/tmp/x.sock", "--vf", "a", "--loopback"]);
    assert!(!o.status.success());
    let o = run(&["--socket-path", "/tmp/x.sock"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no VF"));
}

#[test]
fn a_missing_or_wrong_vdpa_device_is_named() {
    assert_one_line_error(
        &[
            "--socket-path",
            "/tmp/vr-cli-vdpa.sock",
            "--vdpa",
            "/dev/vhost-vdpa-99",
        ],
        "/dev/vhost-vdpa-99 does not exist",
    );
    assert_one_line_error(
        &[
            "--socket-path",
            "/tmp/vr-cli-vdpa.sock",
            "--vdpa",
            "/dev/null",
        ],
        "/dev/null is not a vhost-vdpa device",
    );
    let o = run(&[
        "--socket-path",
        "/tmp/vr-cli-vdpa.sock",
        "--vdpa",
        "/dev/vhost-vdpa-0",
        "--vf",
        "x",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("'--vdpa <DEV>' cannot be used with '--vf"));
}

#[test]
fn a_bad_metrics_address_is_named_and_is_a_usage_error() {
    let sock = std::env::temp_dir().join(format!("vr-cli-metrics-{}.sock", std::process::id()));
    let sock = sock.to_str().unwrap();
    for bad in ["localhost:9100", "127.0.0.1", "1.2.3.4:70000"] {
        let args = ["--loopback", "--socket-path", sock, "--metrics-listen", bad];
        assert_one_line_error(&args, bad);
        assert_eq!(run(&args).status.code(), Some(2), "{bad}");
    }
    let dir = std::env::temp_dir().join(format!("vr-cli-mcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("m.toml");
    let port = format!("[[port]]\nsocket = \"{sock}\"\nloopback = true\n");
    std::fs::write(&cfg, format!("metrics_listen = \"[::1]\"\n{port}")).unwrap();
    assert_one_line_error(&["--config", cfg.to_str().unwrap()], "metrics_listen");
    assert!(
        !std::path::Path::new(sock).exists(),
        "a port started anyway"
    );
}

#[test]
fn a_metrics_address_in_use_is_named_and_nothing_is_left_behind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let sock = std::env::temp_dir().join(format!("vr-cli-inuse-{}.sock", std::process::id()));
    let sock = sock.to_str().unwrap();
    assert_one_line_error(
        &[
            "--loopback",
            "--socket-path",
            sock,
            "--metrics-listen",
            &addr,
        ],
        &addr,
    );
    assert!(
        !std::path::Path::new(sock).exists(),
        "the port's socket was created"
    );
}
