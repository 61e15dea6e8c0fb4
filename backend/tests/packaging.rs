//! What the Debian package ships besides the binary: the systemd units pass
//! `systemd-analyze verify`, the capabilities vhost-relay.service grants are exactly enough
//! for an AF_XDP port, and the example config is one an operator can use.
//! (scripts/test-deb.sh builds, installs and removes the package itself.)

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use std::collections::BTreeSet;

use support::{temp_dir, wait_for, NetNs, RawSocket, TestFrontend, VIRTIO_NET_F_MRG_RXBUF};

const PACKAGING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging");
const UNITS: [&str; 3] = [
    "vhost-relay.service",
    "vhost-relay@.service",
    "vhost-relay@.socket",
];

/// A fresh directory holding copies of the units whose ExecStart names the binary just
/// built: verify insists that the binary exists, and /usr/bin/vhost-relay need not.
fn units_dir(tag: &str) -> PathBuf {
    let dir = temp_dir(&format!("units-{tag}"));
    for unit in UNITS {
        let text = std::fs::read_to_string(Path::new(PACKAGING).join("systemd").join(unit))
            .unwrap_or_else(|e| panic!("{unit}: {e}"));
        assert!(
            text.contains("ExecStart=/usr/bin/vhost-relay ") || unit.ends_with(".socket"),
            "{unit} must start /usr/bin/vhost-relay"
        );
        let text = text.replace("/usr/bin/vhost-relay", env!("CARGO_BIN_EXE_vhost-relay"));
        std::fs::write(dir.join(unit), text).unwrap();
    }
    dir
}

/// `systemd-analyze verify` of one unit: Err with its complaints. It exits 0 on some
/// mistakes (an unknown key is "ignored"), so any output at all counts as one.
fn verify(unit: &Path) -> Result<(), String> {
    // --man=no: the man page is installed only with the package (test-deb.sh checks it).
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit)
        .output()
        .expect("run systemd-analyze (Debian package systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {}: {said}", unit.display(), out.status))
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = units_dir("ok");
    for unit in UNITS {
        verify(&dir.join(unit)).unwrap();
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn verify_catches_a_broken_unit() {
    let dir = units_dir("bad");
    let service = dir.join("vhost-relay.service");
    let good = std::fs::read_to_string(&service).unwrap();
    let broken = [
        good.replace("ProtectSystem=strict", "ProtectSytem=strict"),
        good.replace("Type=notify", "Type=notfy"),
        good.replace(
            env!("CARGO_BIN_EXE_vhost-relay"),
            "/nonexistent/vhost-relay",
        ),
    ];
    for text in broken {
        assert_ne!(text, good, "the fault was not injected");
        std::fs::write(&service, &text).unwrap();
        assert!(verify(&service).is_err(), "accepted:\n{text}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The capabilities vhost-relay.service grants, as setpriv names them ("net_raw").
fn unit_capabilities() -> Vec<String> {
    let set = |key: &str| -> Vec<String> {
        let caps = service_setting(key);
        caps.split_whitespace()
            .map(|c| c.strip_prefix("CAP_").expect("CAP_ name").to_lowercase())
            .collect()
    };
    let bounding = set("CapabilityBoundingSet");
    assert_eq!(bounding, set("AmbientCapabilities"), "the same set twice");
    bounding
}

/// Starts an AF_XDP port on the namespace's vf0 whose socket gets another group, as root
/// holding only `caps` (what CapabilityBoundingSet leaves root) and under a 64 KiB memlock
/// limit, so that the UMEM needs CAP_IPC_LOCK. Returns the process once it listens, or Err
/// with its log once it has given up.
fn start_with(ns: &NetNs, dir: &Path, caps: &[String]) -> Result<Child, String> {
    let sock = dir.join("vr.sock");
    let log = dir.join("vr.log");
    let bounding: String = caps.iter().map(|c| format!(",+{c}")).collect();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "prlimit", "--memlock=65536"])
        .args([
            "setpriv",
            "--bounding-set",
            &format!("-all{bounding}"),
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_vhost-relay"))
        .args(["--socket-path", sock.to_str().unwrap(), "--vf", "vf0"])
        .args(["--vf-mode", "af-xdp", "--socket-group", "65534"])
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .expect("run ip netns exec / prlimit / setpriv (iproute2, util-linux)");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let up = wait_for(Duration::from_secs(10), || {
        text().contains("listening on") || !matches!(child.try_wait(), Ok(None))
    });
    if up && text().contains("listening on") {
        return Ok(child);
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(text())
}

#[test]
fn unit_capabilities_are_enough_for_af_xdp_and_each_is_needed() {
    let caps = unit_capabilities();
    let ns = NetNs::new("caps");
    let dir = temp_dir("caps");
    let mut be = start_with(&ns, &dir, &caps).unwrap_or_else(|log| panic!("{caps:?}: {log}"));
    let log = std::fs::read_to_string(dir.join("vr.log")).unwrap();
    assert!(log.contains("AF_XDP ("), "{log}");
    let meta = std::fs::metadata(dir.join("vr.sock")).unwrap();
    assert_eq!(meta.gid(), 65534, "the socket got its group");
    let f = TestFrontend::connect(&dir.join("vr.sock"), 1, VIRTIO_NET_F_MRG_RXBUF);
    assert!(
        f.features & VIRTIO_NET_F_MRG_RXBUF != 0,
        "a frontend is served"
    );
    drop(f);
    let _ = be.kill();
    let _ = be.wait();
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let _ = std::fs::remove_file(dir.join("vr.sock"));
        match start_with(&ns, &dir, &fewer) {
            Ok(mut be) => {
                let _ = be.kill();
                let _ = be.wait();
                panic!("the unit grants {missing}, but the port starts without it");
            }
            Err(log) => eprintln!("without {missing}: {}", log.lines().last().unwrap_or("")),
        }
    }
}

/// The value of `key=` in vhost-relay.service.
fn service_setting(key: &str) -> String {
    let path = Path::new(PACKAGING).join("systemd/vhost-relay.service");
    let text = std::fs::read_to_string(path).unwrap();
    let prefix = format!("{key}=");
    let line = text.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
    line.unwrap_or_else(|| panic!("no {key}= line")).to_string()
}

fn stdout_of(out: Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Every system call a SystemCallFilter= list allows, its @groups expanded by systemd itself.
fn allowed_syscalls(filter: &str) -> BTreeSet<String> {
    let mut allowed = BTreeSet::new();
    for item in filter.split_whitespace() {
        if !item.starts_with('@') {
            allowed.insert(item.to_string());
            continue;
        }
        let out = Command::new("systemd-analyze")
            .args(["syscall-filter", item])
            .output()
            .unwrap();
        // "@group", "    # description", then one call or @subgroup per line.
        for entry in stdout_of(out).lines().skip(1).map(str::trim) {
            if !entry.is_empty() && !entry.starts_with('#') {
                allowed.extend(allowed_syscalls(entry));
            }
        }
    }
    allowed
}

/// The calls an `strace -f -o` file records (not the "<... resumed>" halves).
fn traced_syscalls(trace: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(trace).unwrap();
    let call = |l: &str| {
        let rest = l.split_once(' ')?.1.trim_start();
        let name = rest.split_once('(')?.0;
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            .then(|| name.to_string())
    };
    text.lines().filter_map(call).collect()
}

/// SIGTERM to strace's tracee (vhost-relay), so that its clean shutdown is traced too.
fn terminate_tracee(strace: &mut Child) {
    let pid = strace.id();
    let children = format!("/proc/{pid}/task/{pid}/children");
    let mut tracee = String::new();
    assert!(wait_for(Duration::from_secs(5), || {
        tracee = std::fs::read_to_string(&children).unwrap_or_default();
        !tracee.trim().is_empty()
    }));
    let tracee: i32 = tracee.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: kill() with a pid we just read; no memory is involved.
    assert_eq!(unsafe { libc::kill(tracee, libc::SIGTERM) }, 0);
    let status = strace.wait().unwrap();
    assert!(
        status.success(),
        "vhost-relay stops cleanly on SIGTERM: {status}"
    );
}

/// An AF_XDP port pinned to a CPU, a frontend, one frame each way, SIGTERM: every system call
/// vhost-relay makes meanwhile must pass the unit's SystemCallFilter= (a refused one would
/// fail with EPERM under systemd, which systemd-analyze verify cannot see).
#[test]
fn unit_syscall_filter_allows_every_call_of_a_serving_af_xdp_port() {
    let allowed = allowed_syscalls(&service_setting("SystemCallFilter"));
    assert!(
        allowed.contains("sendmmsg") && allowed.contains("bpf"),
        "{allowed:?}"
    );
    let ns = NetNs::new("syscalls");
    let dir = temp_dir("syscalls");
    let (sock, log, trace) = (dir.join("vr.sock"), dir.join("vr.log"), dir.join("trace"));
    let mut strace = Command::new("ip")
        .args(["netns", "exec", &ns.name, "strace", "-f", "-qq", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_vhost-relay"))
        .args(["--socket-path", sock.to_str().unwrap(), "--vf", "vf0"])
        .args(["--vf-mode", "af-xdp", "--cpu-list", "0"])
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .expect("run strace (Debian package strace)");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(20), || text().contains("listening on")),
        "{}",
        text()
    );
    let mut f = TestFrontend::connect(&sock, 1, VIRTIO_NET_F_MRG_RXBUF);
    let frame: Vec<u8> = [[0xff; 6], [0x02, 0, 0, 0, 0, 1]]
        .concat()
        .into_iter()
        .chain([0x88, 0xb5])
        .chain([7; 50])
        .collect();
    f.post_tx(1, TestFrontend::buf_addr(1, 0), &frame);
    f.kick(1);
    assert_eq!(
        f.wait_used(1, 1, Duration::from_secs(10)).len(),
        1,
        "TX done"
    );
    f.post(0, &[(TestFrontend::buf_addr(0, 0), 2048, true)]);
    f.kick(0);
    ns.enter(|| RawSocket::open("wire0", false).send(&frame));
    assert_eq!(
        f.wait_used(0, 1, Duration::from_secs(10)).len(),
        1,
        "RX done"
    );
    drop(f);
    terminate_tracee(&mut strace);
    let used = traced_syscalls(&trace);
    assert!(
        used.contains("bpf") && used.contains("sched_setaffinity"),
        "{used:?}"
    );
    let refused: Vec<&String> = used.difference(&allowed).collect();
    assert!(refused.is_empty(), "SystemCallFilter= refuses {refused:?}");
}

/// The commented-out settings of the example config, uncommented.
fn uncommented(text: &str) -> String {
    let setting = |l: &str| l.starts_with("[[port]]") || l.split_once(" = ").is_some();
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if setting(rest) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn example_config_is_valid_toml_and_its_example_port_is_accepted() {
    let path = Path::new(PACKAGING).join("vhost-relay.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let table: toml::Table = toml::from_str(&text).expect("the shipped file is valid TOML");
    assert!(table.is_empty(), "everything is commented out: {table:?}");
    let empty = vhost_relay::config::parse_file(&path, &text, &Default::default())
        .expect("valid as shipped");
    assert!(empty.ports.is_empty(), "a service with no port yet");
    let live = uncommented(&text);
    assert!(live.contains("\n[[port]]\n"), "{live}");
    // Checks the group too: libvirt-qemu exists once libvirt-daemon-system is installed.
    let file =
        vhost_relay::config::parse_file(&path, &live, &Default::default()).expect("example port");
    let ports = file.ports;
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name, "vm1");
    assert_eq!(ports[0].queues, 2);
}
