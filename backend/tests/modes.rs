//! Socket modes and multi-port operation: client with reconnect, inherited fd, config files
//! with a broken port next to working ones.

mod support;

use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(10);

#[test]
fn client_mode_connects_and_reconnects() {
    let dir = temp_dir("mode-client");
    let sock = dir.join("qemu.sock");
    let listener = UnixListener::bind(&sock).expect("listen like QEMU server=on");
    let mut child = spawn_backend(
        &[
            "--client",
            "--socket-path",
            sock.to_str().unwrap(),
            "--loopback",
        ],
        &dir.join("vr.log"),
        None,
    );
    for round in 0..3u8 {
        let (stream, _) = listener.accept().expect("backend connects");
        let mut f = TestFrontend::over_stream(stream, 1, VIRTIO_NET_F_MRG_RXBUF);
        round_trip(&mut f, round);
        // Dropping the frontend closes the connection, like QEMU going away.
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn client_mode_waits_for_a_frontend_that_is_not_there_yet() {
    let dir = temp_dir("mode-client-late");
    let sock = dir.join("qemu.sock");
    let mut child = spawn_backend(
        &[
            "--client",
            "--socket-path",
            sock.to_str().unwrap(),
            "--loopback",
        ],
        &dir.join("vr.log"),
        None,
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "still running, retrying"
    );
    let listener = UnixListener::bind(&sock).expect("listen");
    let (stream, _) = listener
        .accept()
        .expect("backend connects once QEMU is there");
    let mut f = TestFrontend::over_stream(stream, 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut f, 1);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn inherited_listening_fd_is_served() {
    let dir = temp_dir("mode-fd");
    let sock = dir.join("libvirt.sock");
    let listener = UnixListener::bind(&sock).expect("listen like libvirt");
    let mut child = spawn_backend(
        &["--fd", "3", "--loopback"],
        &dir.join("vr.log"),
        Some(listener.as_raw_fd()),
    );
    let mut f = TestFrontend::connect(&sock, 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut f, 7);
    drop(f);
    let mut f = TestFrontend::connect(&sock, 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut f, 8);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn config_file_serves_ports_while_a_broken_one_is_retried() {
    let dir = temp_dir("mode-config");
    let cfg = dir.join("ports.toml");
    let (a, b, c) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("c.sock"));
    std::fs::write(
        &cfg,
        format!(
            "[[port]]\nsocket = \"{}\"\nloopback = true\n\n\
             [[port]]\nname = \"broken\"\nsocket = \"{}\"\nvf = \"novf-x77\"\n\n\
             [[port]]\nsocket = \"{}\"\nloopback = true\nqueues = 2\n",
            a.display(),
            b.display(),
            c.display()
        ),
    )
    .unwrap();
    let log = dir.join("vr.log");
    let mut child = spawn_backend(&["--config", cfg.to_str().unwrap()], &log, None);
    assert!(
        wait_for(T, || a.exists() && c.exists()),
        "good ports listen"
    );
    let mut fa = TestFrontend::connect(&a, 1, VIRTIO_NET_F_MRG_RXBUF);
    let mut fc = TestFrontend::connect(&c, 2, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut fa, 1);
    round_trip(&mut fc, 2);
    assert!(!b.exists(), "the broken port does not pretend to serve");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("port broken") && text.contains("novf-x77"),
        "logged: {text}"
    );
    assert!(matches!(child.try_wait(), Ok(None)));
    let _ = child.kill();
    let _ = child.wait();
}
