//! libvirt: a domain whose NIC is the `<interface type='vhostuser'>` fragment from
//! `docs/libvirt/`, served by `vhost-relay --client`, boots and talks to the peer behind the VF.
//! The documented configuration is what runs here, so the docs cannot drift from what works.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qemu_tests::util::{run, workspace_root};
use qemu_tests::{
    e2e_test, ensure, find_stat, Backend, Console, Error, NetNs, Result, BOOT_TIMEOUT, GUEST_IP,
    PEER_IP,
};

const URI: &str = "qemu:///system";

fn virsh(args: &[&str]) -> Result<String> {
    run(Command::new("virsh").arg("-c").arg(URI).args(args))
}

/// libvirt's daemons: the running ones if there are, otherwise ones started here and stopped
/// (by PID) at the end.
struct Libvirtd {
    started: Vec<Child>,
}

impl Libvirtd {
    fn ensure(log_dir: &Path) -> Result<Libvirtd> {
        if virsh(&["uri"]).is_ok() {
            return Ok(Libvirtd {
                started: Vec::new(),
            });
        }
        let mut started = Vec::new();
        for daemon in ["/usr/sbin/virtlogd", "/usr/sbin/libvirtd"] {
            let log = std::fs::File::create(log_dir.join(format!(
                "{}.log",
                Path::new(daemon).file_name().and_then(|n| n.to_str()).unwrap_or("daemon")
            )))
            .map_err(|e| Error::io("creating daemon log", e))?;
            let child = Command::new(daemon)
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .map_err(|e| Error::io(format!("starting {daemon}"), e))?;
            started.push(child);
        }
        let lv = Libvirtd { started };
        // The first connection probes QEMU's capabilities and takes several seconds.
        let start = Instant::now();
        while virsh(&["version"]).is_err() {
            ensure(start.elapsed() < Duration::from_secs(60), || {
                "libvirtd did not answer within 60 s".into()
            })?;
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(lv)
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for child in self.started.iter_mut().rev() {
            let _ = qemu_tests::util::stop_child(child, Duration::from_secs(5));
        }
    }
}

/// Destroys and undefines the domain however the test ends.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
        let _ = virsh(&["undefine", &self.0]);
    }
}

/// A documented fragment with its placeholders filled in.
fn fragment(name: &str, subst: &[(&str, &str)]) -> Result<String> {
    let path = workspace_root().join("docs/libvirt").join(name);
    let mut text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    for (k, v) in subst {
        text = text.replace(k, v);
    }
    ensure(!text.contains('@'), || {
        format!("{name}: unfilled placeholder left")
    })?;
    Ok(text)
}

/// A directory QEMU (running as libvirt-qemu) can create sockets in and read the guest from.
fn qemu_dir(base: &Path) -> Result<PathBuf> {
    let dir = base.join("libvirt");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating the domain dir", e))?;
    run(Command::new("chown").args(["libvirt-qemu:kvm", dir.to_str().unwrap_or_default()]))?;
    // The scratch dir above it must be traversable too.
    run(Command::new("chmod").args(["o+x", base.to_str().unwrap_or_default()]))?;
    Ok(dir)
}

#[test]
fn libvirt_domain_with_the_documented_interface() {
    e2e_test(
        "libvirt_domain_with_the_documented_interface",
        &["virsh", "libvirtd", "virtlogd"],
        |env| {
            let _daemons = Libvirtd::ensure(env.dir.path())?;
            let ns = NetNs::new("vrlv")?;
            let dir = qemu_dir(env.dir.path())?;
            let kernel = dir.join("vmlinuz");
            let initrd = dir.join("initrd.gz");
            std::fs::copy(&env.image.kernel, &kernel).map_err(|e| Error::io("copy kernel", e))?;
            std::fs::copy(&env.image.initrd, &initrd).map_err(|e| Error::io("copy initrd", e))?;
            let sock = dir.join("net0.sock");
            let console_sock = dir.join("console.sock");
            let sock_s = sock.to_str().unwrap_or_default().to_string();

            env.step("vhost-relay --client, waiting for QEMU's socket");
            let mut relay = Backend::vhost_relay(
                Some(&ns),
                &["--client", "--socket-path", &sock_s, "--vf", ns.vf()],
                env.dir.path(),
                1,
            )?;

            let iface = fragment(
                "interface.xml",
                &[
                    ("@MAC@", "52:54:00:12:34:56"),
                    ("@SOCKET@", &sock_s),
                    ("@QUEUES@", "1"),
                ],
            )?;
            let memory = fragment("memory-backing.xml", &[])?;
            let name = format!("vrt-{}", std::process::id());
            // Direct kernel boot and a unix-socket serial console are test scaffolding; the
            // NIC and the memory backing are the documented fragments, verbatim.
            let xml = format!(
                "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  {memory}
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 loglevel=4 tsc=reliable vr.ip=eth0,{GUEST_IP}/24</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    {iface}
    <serial type='unix'>
      <source mode='bind' path='{console}'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>
",
                kernel = kernel.display(),
                initrd = initrd.display(),
                console = console_sock.display(),
            );
            let xml_path = dir.join("domain.xml");
            std::fs::write(&xml_path, &xml).map_err(|e| Error::io("writing domain XML", e))?;
            if qemu_tests::util::on_path("virt-xml-validate") {
                run(Command::new("virt-xml-validate").arg(&xml_path))?;
            }
            virsh(&["define", xml_path.to_str().unwrap_or_default()])?;
            let _domain = Domain(name.clone());
            env.step("virsh start");
            virsh(&["start", &name])?;

            let start = Instant::now();
            let stream = loop {
                match UnixStream::connect(&console_sock) {
                    Ok(s) => break s,
                    Err(e) if start.elapsed() > Duration::from_secs(30) => {
                        return Err(Error::io("connecting to the domain's serial console", e))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            let reader = stream
                .try_clone()
                .map_err(|e| Error::io("console socket", e))?;
            let mut console = Console::new(reader, stream, Some(&env.dir.join("console.log")))?;
            console.wait_for(qemu_tests::guest_image::READY_MARKER, BOOT_TIMEOUT)?;
            env.step("guest ready");

            // The link may need a moment after the driver comes up; then every echo answers.
            let start = Instant::now();
            while console
                .run(
                    &format!("ping -c 1 -W 1 {PEER_IP}"),
                    Duration::from_secs(10),
                )?
                .status
                != 0
            {
                ensure(start.elapsed() < Duration::from_secs(60), || {
                    format!("no reply from {PEER_IP} within 60 s")
                })?;
            }
            console.run_ok(
                &format!("ping -c 5 -i 0.2 -W 3 {PEER_IP}"),
                Duration::from_secs(30),
            )?;
            env.step("guest -> peer: 5/5");
            ns.ping(GUEST_IP, 5)?;
            env.step("peer -> guest: 5/5");
            let stats = relay.stats()?;
            for q in [0u16, 1] {
                let s = find_stat(&stats, "net0", q)?;
                ensure(s.packets >= 10 && s.errors == 0, || {
                    format!("queue {q}: {s}")
                })?;
            }
            relay.ensure_running()?;
            Ok(())
        },
    );
}
