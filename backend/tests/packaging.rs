//! What the Debian package ships besides the binary: the systemd units pass
//! `systemd-analyze verify`, and the example config is one an operator can use.
//! (scripts/test-deb.sh builds, installs and removes the package itself.)

use std::path::{Path, PathBuf};
use std::process::Command;

const PACKAGING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging");
const UNITS: [&str; 3] = [
    "vhost-relay.service",
    "vhost-relay@.service",
    "vhost-relay@.socket",
];

/// A fresh directory holding copies of the units whose ExecStart names the binary just
/// built: verify insists that the binary exists, and /usr/bin/vhost-relay need not.
fn units_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vr-units-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
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
    let live = uncommented(&text);
    assert!(live.contains("\n[[port]]\n"), "{live}");
    // Checks the group too: libvirt-qemu exists once libvirt-daemon-system is installed.
    let ports = vhost_relay::config::parse_file(&path, &live).expect("example port");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name, "vm1");
    assert_eq!(ports[0].queues, 2);
}
