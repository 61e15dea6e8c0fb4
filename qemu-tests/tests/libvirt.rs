//! libvirt 9 driving vhost-relay, with the `<interface type='vhostuser'>` fragments from
//! `docs/libvirt/` used verbatim, so the docs cannot drift from what works:
//!
//! - `mode='server'` (`interface.xml`): QEMU listens, `vhost-relay --client` connects;
//! - `mode='client'` (`interface-client.xml`, what libvirt now recommends): vhost-relay
//!   listens on a socket it gives `--socket-group libvirt-qemu --socket-mode 0660`, QEMU (as
//!   `libvirt-qemu`) connects, and reconnects (`<reconnect>`) after vhost-relay is killed and
//!   started again under guest traffic; and, as the counter-check, is refused a socket
//!   without QEMU's group;
//! - NIC hotplug as Nova/os-vif does it: a port appears (a new vhost-relay process, or
//!   `vhost-relay ctl add`), `virsh attach-device --live` the client fragment on it, traffic
//!   both ways, `virsh detach-device --live`, the port goes; the guest runs on throughout.
//!
//! The domains are TCG guests with direct kernel boot and a unix-socket serial console (test
//! scaffolding); every guest that boots pings both ways and vhost-relay's counters are checked.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qemu_tests::traffic::{boot_id, start_guest_stream, RestartRig};
use qemu_tests::util::{run, tail_file, workspace_root};
use qemu_tests::{
    console_ping, console_ping_until_reply, e2e_test, ensure, find_stat, peer_ping, Backend,
    Console, Error, NetNs, Result, TestEnv, BOOT_TIMEOUT, GUEST_IP, PEER_IP,
};

const URI: &str = "qemu:///system";

fn virsh(args: &[&str]) -> Result<String> {
    run(Command::new("virsh").arg("-c").arg(URI).args(args))
}

/// How long `virsh start` / `attach-device` may take. They return once QEMU has connected
/// its vhost-user socket (about a second here); a QEMU told to reconnect never gives up on a
/// socket it cannot connect to (e.g. "Permission denied": the socket lacks QEMU's group), and
/// virsh would wait with it forever.
const VIRSH_LIMIT: Duration = Duration::from_secs(60);

/// `virsh ARGS` on domain `name`, killed (by PID) after [`VIRSH_LIMIT`]; a failure carries
/// the domain's QEMU log, where QEMU says why it cannot connect.
fn virsh_on(name: &str, args: &[&str]) -> Result<()> {
    let mut child = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("starting virsh", e))?;
    // QEMU logs its first failed connection ("Unable to connect character device ...:
    // Permission denied") and then retries in silence: stop at that line.
    let refused = || domain_log(name).contains("Unable to connect character device");
    let waited = qemu_tests::util::wait_until("virsh", VIRSH_LIMIT, || match child.try_wait() {
        Ok(None) if refused() => Ok(Some(None)),
        Ok(None) => Ok(None),
        Ok(Some(st)) => Ok(Some(Some(st))),
        Err(e) => Err(Error::io("waiting for virsh", e)),
    });
    let Ok(Some(status)) = waited else {
        let _ = qemu_tests::util::stop_child(&mut child, Duration::from_secs(2));
        return Err(domain_error(
            name,
            if refused() {
                format!("`virsh {}`: QEMU cannot connect its socket", args.join(" "))
            } else {
                format!(
                    "`virsh {}` still running after {VIRSH_LIMIT:?}",
                    args.join(" ")
                )
            },
        ));
    };
    if status.success() {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    Err(domain_error(
        name,
        format!("`virsh {}` failed ({status}): {err}", args.join(" ")),
    ))
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

/// A running domain and its serial console; destroyed and undefined on drop.
struct Guest {
    domain: Domain,
    console: Console,
}

/// The domain's QEMU log (libvirt writes QEMU's command line and stderr there).
fn domain_log(name: &str) -> String {
    tail_file(
        &Path::new("/var/log/libvirt/qemu").join(format!("{name}.log")),
        15,
    )
}

/// Adds the domain's QEMU log to an error.
fn with_domain_log(name: &str, e: Error) -> Error {
    domain_error(name, e.to_string())
}

/// `what` went wrong with domain `name`, and its QEMU log.
fn domain_error(name: &str, what: String) -> Error {
    Error::Check(format!(
        "{what}\n/var/log/libvirt/qemu/{name}.log:\n{}",
        domain_log(name)
    ))
}

/// Defines a 1-CPU TCG domain with the documented memory backing, `devices` (e.g. a
/// documented interface fragment) and `kernel_args` on the guest kernel's command line, its
/// serial console on `dir/console.sock`.
fn define_domain(env: &TestEnv, dir: &Path, devices: &str, kernel_args: &str) -> Result<Domain> {
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.gz");
    std::fs::copy(&env.image.kernel, &kernel).map_err(|e| Error::io("copy kernel", e))?;
    std::fs::copy(&env.image.initrd, &initrd).map_err(|e| Error::io("copy initrd", e))?;
    let console_sock = dir.join("console.sock");
    let memory = fragment("memory-backing.xml", &[])?;
    let name = qemu_tests::util::unique_name("vrt");
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
    <cmdline>console=ttyS0 panic=-1 loglevel=4 tsc=reliable {kernel_args}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    {devices}
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
    Ok(Domain(name))
}

/// [`define_domain`], `virsh start`; returns once the guest's shell is ready.
fn boot_domain(env: &TestEnv, dir: &Path, devices: &str, kernel_args: &str) -> Result<Guest> {
    let domain = define_domain(env, dir, devices, kernel_args)?;
    let name = &domain.0;
    env.step("virsh start");
    virsh_on(name, &["start", name])?;
    let mut console =
        connect_console(&dir.join("console.sock")).map_err(|e| with_domain_log(name, e))?;
    console
        .wait_for(qemu_tests::guest_image::READY_MARKER, BOOT_TIMEOUT)
        .map_err(|e| with_domain_log(name, e))?;
    env.step("guest ready");
    Ok(Guest { domain, console })
}

/// The domain's serial console (`<serial type='unix'>`, libvirt's QEMU listens on it).
fn connect_console(path: &Path) -> Result<Console> {
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(path) {
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
    let log = path.with_file_name("console.log");
    Console::new(reader, stream, Some(&log))
}

/// Pings both ways (after the first reply: the link and ARP may need a moment), 5/5 each.
fn ping_both_ways(env: &TestEnv, console: &mut Console, ns: &NetNs) -> Result<()> {
    console_ping_until_reply(console, PEER_IP, Duration::from_secs(60))?;
    console_ping(console, PEER_IP, 5)?;
    env.step("guest -> peer: 5/5");
    peer_ping(ns, GUEST_IP, 5)?;
    env.step("peer -> guest: 5/5");
    Ok(())
}

/// Both virtqueues of `port` moved the pings (at least 10 packets each way), without errors.
fn check_counters(relay: &mut Backend, port: &str) -> Result<()> {
    let stats = relay.stats()?;
    for q in [0u16, 1] {
        let s = find_stat(&stats, port, q)?;
        ensure(s.packets >= 10 && s.errors == 0, || {
            format!("queue {q}: {s}")
        })?;
    }
    Ok(())
}

/// What `--socket-group`/`--socket-mode` are for: QEMU runs as libvirt-qemu (group
/// libvirt-qemu), and a socket vhost-relay (root) creates is otherwise root's, mode 0755,
/// which lets nobody else connect.
const SOCKET_ACCESS: [&str; 4] = ["--socket-group", "libvirt-qemu", "--socket-mode", "0660"];

/// `vhost-relay --socket-path SOCK --vf VF --socket-group libvirt-qemu --socket-mode 0660`,
/// once the socket is there.
fn listening_relay(ns: &NetNs, sock: &Path, workdir: &Path) -> Result<Backend> {
    let s = sock.display().to_string();
    let mut args = vec!["--socket-path", &s, "--vf", ns.vf()];
    args.extend(SOCKET_ACCESS);
    let mut relay = Backend::vhost_relay(Some(ns), &args, workdir, 1)?;
    relay.wait_for_socket(sock, Duration::from_secs(10))?;
    Ok(relay)
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
            let sock_s = dir.join("net0.sock").display().to_string();
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
            let mut guest = boot_domain(env, &dir, &iface, &format!("vr.ip=eth0,{GUEST_IP}/24"))?;
            ping_both_ways(env, &mut guest.console, &ns)?;
            check_counters(&mut relay, "net0")?;
            relay.ensure_running()
        },
    );
}

/// mode='client': vhost-relay listens with the socket access libvirt's QEMU needs; then it is
/// SIGKILLed under the guest's TCP stream and started again, and QEMU, told to by the
/// fragment's `<reconnect>`, connects to the new process.
#[test]
fn libvirt_client_mode_domain_with_the_documented_interface() {
    e2e_test(
        "libvirt_client_mode_domain_with_the_documented_interface",
        &["virsh", "libvirtd", "virtlogd"],
        |env| {
            let _daemons = Libvirtd::ensure(env.dir.path())?;
            let ns = NetNs::new("vrlc")?;
            let dir = qemu_dir(env.dir.path())?;
            let sock = dir.join("x.sock");
            env.step("vhost-relay listening, socket group libvirt-qemu, mode 0660");
            let mut relay = listening_relay(&ns, &sock, env.dir.path())?;
            let iface = fragment(
                "interface-client.xml",
                &[
                    ("@MAC@", "52:54:00:12:34:57"),
                    ("@SOCKET@", &sock.display().to_string()),
                    ("@QUEUES@", "1"),
                ],
            )?;
            let mut guest = boot_domain(env, &dir, &iface, &format!("vr.ip=eth0,{GUEST_IP}/24"))?;
            ping_both_ways(env, &mut guest.console, &ns)?;
            check_counters(&mut relay, "x")?;

            let sink = start_guest_stream(&mut guest.console, &ns)?;
            env.step("guest streaming to the peer");
            let mut rig = RestartRig {
                ns: &ns,
                console: &mut guest.console,
                sink: &sink,
            };
            rig.kill_and_restart(env, &mut relay, 1, || {
                listening_relay(&ns, &sock, env.dir.path())
            })
            .map_err(|e| with_domain_log(&guest.domain.0, e))
        },
    );
}

/// Why `--socket-group` matters, so the test above would fail without it: the same domain
/// with the socket only `--socket-mode 0660` (root's group) is refused, and says so.
#[test]
fn libvirt_client_mode_socket_without_qemus_group_is_refused() {
    e2e_test(
        "libvirt_client_mode_socket_without_qemus_group_is_refused",
        &["virsh", "libvirtd", "virtlogd"],
        |env| {
            let _daemons = Libvirtd::ensure(env.dir.path())?;
            let ns = NetNs::new("vrln")?;
            let dir = qemu_dir(env.dir.path())?;
            let sock = dir.join("x.sock");
            let s = sock.display().to_string();
            let args = [
                "--socket-path",
                &s,
                "--vf",
                ns.vf(),
                "--socket-mode",
                "0660",
            ];
            let mut relay = Backend::vhost_relay(Some(&ns), &args, env.dir.path(), 1)?;
            relay.wait_for_socket(&sock, Duration::from_secs(10))?;
            let iface = fragment(
                "interface-client.xml",
                &[
                    ("@MAC@", "52:54:00:12:34:57"),
                    ("@SOCKET@", &s),
                    ("@QUEUES@", "1"),
                ],
            )?;
            let domain = define_domain(env, &dir, &iface, "")?;
            let Err(e) = virsh_on(&domain.0, &["start", &domain.0]) else {
                return Err(Error::Check(
                    "QEMU (libvirt-qemu) connected to a root:root 0660 socket".into(),
                ));
            };
            let e = e.to_string();
            ensure(
                e.contains(&format!("Failed to connect to '{s}': Permission denied")),
                || format!("not refused for the socket's permissions: {e}"),
            )?;
            env.step("refused: Permission denied");
            relay.ensure_running()
        },
    );
}

/// The hotplugged NIC's MAC, by which the guest finds it.
const HOTPLUG_MAC: &str = "52:54:00:12:34:58";

/// A free hotplug slot: on q35 a PCIe device can only be hotplugged into an empty root port
/// (the root complex must then be named too, as index 0). No USB controller and no balloon,
/// which would otherwise take the port.
const SPARE_ROOT_PORT: &str = "<controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'/>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>";

/// The host side of a hotplugged NIC: a vhost-relay port made and unmade on demand, the way
/// os-vif plugs a port before Nova attaches the interface.
trait HotplugPort {
    /// Makes the port listen on its socket (with QEMU's group and mode).
    fn add(&mut self) -> Result<()>;
    /// Both virtqueues of the port carried the pings.
    fn check_counters(&mut self) -> Result<()>;
    /// Stops the port.
    fn remove(&mut self) -> Result<()>;
}

/// The guest's interface with `mac`, if there is one (busybox sh over `/sys/class/net`).
fn guest_nic(console: &mut Console, mac: &str) -> Result<Option<String>> {
    let out = console.run_ok(
        &format!(
            "for i in /sys/class/net/*; do [ \"$(cat $i/address)\" = {mac} ] && echo ${{i##*/}}; done; true"
        ),
        Duration::from_secs(30),
    )?;
    Ok(out.split_whitespace().next().map(str::to_string))
}

/// Waits until the guest's interface with `mac` is there (`present`) or gone; returns its name.
fn wait_guest_nic(console: &mut Console, mac: &str, present: bool) -> Result<Option<String>> {
    let start = Instant::now();
    loop {
        let nic = guest_nic(console, mac)?;
        if nic.is_some() == present {
            return Ok(nic);
        }
        ensure(start.elapsed() < Duration::from_secs(60), || {
            format!(
                "the guest's NIC {mac} did not {} within 60 s",
                if present { "appear" } else { "go" }
            )
        })?;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Nova's flow: a guest runs without the NIC; `port.add()`, `virsh attach-device --live` of
/// the documented client-mode fragment on `sock`, the guest brings the new NIC up (found by
/// MAC), pings both ways and the port's counters, `virsh detach-device --live` until the guest
/// has lost the NIC, `port.remove()` (socket file gone); the guest never rebooted and its
/// console still answers.
fn hotplug_flow(
    env: &TestEnv,
    ns: &NetNs,
    dir: &Path,
    sock: &Path,
    port: &mut dyn HotplugPort,
) -> Result<()> {
    let mut guest = boot_domain(env, dir, SPARE_ROOT_PORT, "")?;
    let name = guest.domain.0.clone();
    let booted = boot_id(&mut guest.console)?;
    port.add()?;
    env.step("port added");
    let iface = fragment(
        "interface-client.xml",
        &[
            ("@MAC@", HOTPLUG_MAC),
            ("@SOCKET@", &sock.display().to_string()),
            ("@QUEUES@", "1"),
        ],
    )?;
    let iface_path = dir.join("iface.xml");
    std::fs::write(&iface_path, iface).map_err(|e| Error::io("writing iface.xml", e))?;
    let iface_s = iface_path.display().to_string();
    virsh_on(&name, &["attach-device", &name, &iface_s, "--live"])?;
    let nic = wait_guest_nic(&mut guest.console, HOTPLUG_MAC, true)?.unwrap_or_default();
    env.step(&format!("attached: the guest's {nic}"));
    guest.console.run_ok(
        &format!("ip link set {nic} up && ip addr add {GUEST_IP}/24 dev {nic}"),
        Duration::from_secs(30),
    )?;
    ping_both_ways(env, &mut guest.console, ns)?;
    port.check_counters()?;

    virsh_on(&name, &["detach-device", &name, &iface_s, "--live"])?;
    wait_guest_nic(&mut guest.console, HOTPLUG_MAC, false)?;
    let ifaces = virsh(&["domiflist", &name])?;
    ensure(!ifaces.contains(HOTPLUG_MAC), || {
        format!("libvirt still lists the NIC after the detach:\n{ifaces}")
    })?;
    env.step("detached: the guest has lost the NIC");
    port.remove()?;
    env.step("port removed");

    let now = boot_id(&mut guest.console)?;
    ensure(now == booted, || {
        format!("the guest rebooted: boot id {booted} before, {now} after")
    })?;
    let state = virsh(&["domstate", &name])?;
    ensure(state.trim() == "running", || {
        format!("domain state after the flow: {state}")
    })
}

/// The port as a vhost-relay process of its own (one port per process, like the
/// `vhost-relay@.service` template): started to add it, stopped (SIGTERM) to remove it,
/// which removes its socket file.
struct OwnProcess<'a> {
    ns: &'a NetNs,
    sock: PathBuf,
    workdir: PathBuf,
    relay: Option<Backend>,
}

impl HotplugPort for OwnProcess<'_> {
    fn add(&mut self) -> Result<()> {
        self.relay = Some(listening_relay(self.ns, &self.sock, &self.workdir)?);
        Ok(())
    }

    fn check_counters(&mut self) -> Result<()> {
        let relay = self
            .relay
            .as_mut()
            .ok_or_else(|| Error::Check("no port process".into()))?;
        check_counters(relay, "hp")
    }

    fn remove(&mut self) -> Result<()> {
        let mut relay = self
            .relay
            .take()
            .ok_or_else(|| Error::Check("no port process".into()))?;
        relay.ensure_running()?;
        let status = relay.stop();
        ensure(status.is_some_and(|s| s.success()), || {
            format!("vhost-relay did not stop cleanly on SIGTERM: {status:?}")
        })?;
        ensure(!self.sock.exists(), || {
            format!("{} is still there after SIGTERM", self.sock.display())
        })
    }
}

#[test]
fn libvirt_hotplug_of_a_nic_on_a_new_vhost_relay_process() {
    e2e_test(
        "libvirt_hotplug_of_a_nic_on_a_new_vhost_relay_process",
        &["virsh", "libvirtd", "virtlogd"],
        |env| {
            let _daemons = Libvirtd::ensure(env.dir.path())?;
            let ns = NetNs::new("vrlh")?;
            let dir = qemu_dir(env.dir.path())?;
            let sock = dir.join("hp.sock");
            let mut port = OwnProcess {
                ns: &ns,
                sock: sock.clone(),
                workdir: env.dir.path().to_path_buf(),
                relay: None,
            };
            hotplug_flow(env, &ns, &dir, &sock, &mut port)
        },
    );
}

/// The port added to and removed from one running vhost-relay through its control socket,
/// as os-vif would plug it.
struct CtlPort<'a> {
    ns: &'a NetNs,
    control: PathBuf,
    sock: PathBuf,
    daemon: Backend,
}

impl CtlPort<'_> {
    /// `vhost-relay ctl --control PATH ARGS`.
    fn ctl(&self, args: &[&str]) -> Result<String> {
        qemu_tests::backend::ctl(&self.control, args)
    }
}

impl HotplugPort for CtlPort<'_> {
    fn add(&mut self) -> Result<()> {
        let sock = self.sock.display().to_string();
        let mut args = vec![
            "add",
            "--name",
            "hp",
            "--socket-path",
            &sock,
            "--vf",
            self.ns.vf(),
        ];
        args.extend(SOCKET_ACCESS);
        self.ctl(&args)?;
        self.daemon
            .wait_for_socket(&self.sock, Duration::from_secs(10))?;
        let list = self.ctl(&["list"])?;
        ensure(list.contains("hp"), || {
            format!("`ctl list` lacks hp:\n{list}")
        })
    }

    fn check_counters(&mut self) -> Result<()> {
        check_counters(&mut self.daemon, "hp")
    }

    /// `ctl remove` must also take the socket file away (issue 12).
    fn remove(&mut self) -> Result<()> {
        self.ctl(&["remove", "hp"])?;
        self.daemon.ensure_running()?;
        ensure(!self.sock.exists(), || {
            format!("{} is still there after `ctl remove`", self.sock.display())
        })?;
        let list = self.ctl(&["list"])?;
        ensure(!list.contains("hp"), || {
            format!("`ctl list` still has hp after the remove:\n{list}")
        })
    }
}

/// The Nova/os-vif flow on a running vhost-relay: `ctl add` a port, `virsh attach-device
/// --live` a NIC on it, traffic both ways, `virsh detach-device --live`, `ctl remove`; the
/// guest keeps running throughout.
#[test]
fn libvirt_hotplug_of_a_nic_on_a_port_added_with_ctl() {
    e2e_test(
        "libvirt_hotplug_of_a_nic_on_a_port_added_with_ctl",
        &["virsh", "libvirtd", "virtlogd"],
        |env| {
            let _daemons = Libvirtd::ensure(env.dir.path())?;
            let ns = NetNs::new("vrlh")?;
            let dir = qemu_dir(env.dir.path())?;
            let control = env.dir.join("ctl.sock");
            let control_s = control.display().to_string();
            // No ports at start: the one the guest gets is added at run time. Counters come
            // from SIGUSR1 (one queue pair: the added port's).
            let mut daemon =
                Backend::vhost_relay(Some(&ns), &["--control", &control_s], env.dir.path(), 1)?;
            daemon.wait_for_socket(&control, Duration::from_secs(10))?;
            let sock = dir.join("hp.sock");
            let mut port = CtlPort {
                ns: &ns,
                control,
                sock: sock.clone(),
                daemon,
            };
            hotplug_flow(env, &ns, &dir, &sock, &mut port)?;
            port.daemon.ensure_running()
        },
    );
}
