//! Launching a QEMU guest whose only NIC is a vhost-user virtio-net device.
//!
//! TCG only (no KVM here). vhost-user needs guest RAM the backend can map, hence the
//! memfd backend with `share=on`. The serial console is QEMU's stdio, driven by [`Console`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::console::Console;
use crate::error::{Error, Result};
use crate::guest_image::{GuestImage, READY_MARKER};
use crate::netns::{GUEST_IP, PREFIX_LEN};
use crate::util;

/// How QEMU's vhost-user chardev connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketMode {
    /// QEMU connects to a listening backend (`vhost-relay --socket-path`).
    Client,
    /// QEMU listens and the backend connects (`vhost-relay --client`). QEMU does not wait for
    /// it; the NIC's link comes up when the backend arrives.
    Server,
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub image: GuestImage,
    /// The vhost-user socket.
    pub socket: PathBuf,
    pub socket_mode: SocketMode,
    /// With [`SocketMode::Client`]: QEMU retries a lost (or not yet possible) connection this
    /// often (`reconnect-ms`), as it must to survive a backend restart.
    pub reconnect_ms: Option<u32>,
    /// Queue pairs of the NIC; more than one turns on `mq` and gives the guest 2 CPUs.
    pub queues: u16,
    /// Guest CPUs (defaults to 1, or 2 when `queues > 1`).
    pub smp: u16,
    pub mac: String,
    /// Extra `virtio-net-pci` properties, e.g. `guest_announce=off`.
    pub device_opts: Vec<String>,
    /// `IP/PREFIX` given to the guest's `eth0`.
    pub guest_cidr: String,
    /// Exit QEMU instead of rebooting when the guest reboots or panics.
    pub no_reboot: bool,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Where the console log, QMP socket etc. go.
    pub workdir: PathBuf,
    /// Whether the guest gets the vhost-user NIC on `socket`. The vDPA guest has none: its
    /// vhost-user frontend, backend and device all run inside it.
    pub vhost_user_nic: bool,
    /// Appended to the guest kernel's command line (after a space), e.g. `init_on_alloc=0`.
    pub kernel_args: String,
    /// Appended to the command line as they are (e.g. `-incoming unix:PATH` for a migration
    /// destination).
    pub extra_args: Vec<String>,
}

impl QemuConfig {
    /// A single-queue guest at [`GUEST_IP`] connecting to `socket`.
    pub fn new(image: &GuestImage, socket: &Path, workdir: &Path) -> Self {
        QemuConfig {
            image: image.clone(),
            socket: socket.to_path_buf(),
            socket_mode: SocketMode::Client,
            reconnect_ms: None,
            queues: 1,
            smp: 1,
            mac: "52:54:00:12:34:56".into(),
            device_opts: Vec::new(),
            guest_cidr: format!("{GUEST_IP}/{PREFIX_LEN}"),
            no_reboot: true,
            memory_mib: 512,
            workdir: workdir.to_path_buf(),
            vhost_user_nic: true,
            kernel_args: String::new(),
            extra_args: Vec::new(),
        }
    }

    /// A guest without NIC for the vDPA tests: 1 GiB (the frontend's guest memory, vhost-relay
    /// and the VDUSE fixture all live in it) and 2 CPUs (three busy processes).
    pub fn without_nic(image: &GuestImage, workdir: &Path) -> Self {
        let mut c = QemuConfig::new(image, Path::new(""), workdir);
        c.vhost_user_nic = false;
        c.memory_mib = 1024;
        c.smp = 2;
        c
    }

    /// Sets `queues` queue pairs (and 2 CPUs when more than one).
    pub fn queues(mut self, n: u16) -> Self {
        self.queues = n.max(1);
        if n > 1 && self.smp < 2 {
            self.smp = 2;
        }
        self
    }

    /// The QEMU arguments (without the program).
    pub fn args(&self) -> Vec<String> {
        let mem = self.memory_mib;
        let sock = self.socket.display();
        let chardev = match (self.socket_mode, self.reconnect_ms) {
            (SocketMode::Client, None) => format!("socket,id=vu0,path={sock}"),
            (SocketMode::Client, Some(ms)) => {
                format!("socket,id=vu0,path={sock},reconnect-ms={ms}")
            }
            (SocketMode::Server, _) => format!("socket,id=vu0,path={sock},server=on,wait=off"),
        };
        let mut netdev = "vhost-user,id=net0,chardev=vu0".to_string();
        let mut device = format!("virtio-net-pci,netdev=net0,mac={}", self.mac);
        if self.queues > 1 {
            netdev.push_str(&format!(",queues={}", self.queues));
            device.push_str(&format!(
                ",mq=on,vectors={}",
                2 * u32::from(self.queues) + 2
            ));
        }
        for opt in &self.device_opts {
            device.push(',');
            device.push_str(opt);
        }
        let mut a: Vec<String> = [
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend([
            "-m".into(),
            format!("{mem}M"),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-machine".into(),
            "pc,memory-backend=mem".into(),
            "-smp".into(),
            self.smp.max(1).to_string(),
            "-kernel".into(),
            self.image.kernel.display().to_string(),
            "-initrd".into(),
            self.image.initrd.display().to_string(),
            "-append".into(),
            {
                let base = if self.vhost_user_nic {
                    format!(
                        "console=ttyS0 panic=-1 loglevel=4 tsc=reliable vr.ip=eth0,{}",
                        self.guest_cidr
                    )
                } else {
                    "console=ttyS0 panic=-1 loglevel=4 tsc=reliable".to_string()
                };
                if self.kernel_args.is_empty() {
                    base
                } else {
                    format!("{base} {}", self.kernel_args)
                }
            },
        ]);
        if self.vhost_user_nic {
            a.extend([
                "-chardev".into(),
                chardev,
                "-netdev".into(),
                netdev,
                "-device".into(),
                device,
            ]);
        }
        a.extend([
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                self.workdir.join("qmp.sock").display()
            ),
        ]);
        if self.no_reboot {
            a.push("-no-reboot".into());
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// A running QEMU, killed (SIGKILL, by PID) on drop.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    /// The guest's serial console.
    pub console: Console,
    stderr_log: PathBuf,
    qmp: PathBuf,
}

impl Qemu {
    /// Starts QEMU. Does not wait for the guest; see [`Qemu::wait_ready`].
    pub fn spawn(cfg: &QemuConfig) -> Result<Self> {
        let tag = util::unique_name("qemu");
        let stderr_log = cfg.workdir.join(format!("{tag}.stderr"));
        let stderr = std::fs::File::create(&stderr_log)
            .map_err(|e| Error::io(format!("creating {}", stderr_log.display()), e))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(cfg.args()).stderr(stderr);
        let (child, console) = Console::spawn(
            "QEMU",
            &mut cmd,
            Some(&cfg.workdir.join(format!("{tag}.console"))),
        )?;
        Ok(Qemu {
            child,
            console,
            stderr_log,
            qmp: cfg.workdir.join("qmp.sock"),
        })
    }

    /// Starts QEMU and waits until the guest's shell is ready.
    pub fn boot(cfg: &QemuConfig, timeout: Duration) -> Result<Self> {
        let mut q = Self::spawn(cfg)?;
        q.wait_ready(timeout)?;
        Ok(q)
    }

    /// QEMU's QMP socket (`-qmp unix:...,server=on,wait=off`), for tests that want the monitor.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// QEMU's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next "guest ready" line of `/init` (after a boot or a reboot).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let boot_log = match self.console.wait_for(READY_MARKER, timeout) {
            Ok(t) => t,
            Err(e) => return Err(self.explain(e)),
        };
        if let Some(line) = boot_log.lines().find(|l| l.contains("@@INIT-ERROR")) {
            return Err(Error::Check(format!(
                "guest init failed: {line}\nboot log tail:\n{}",
                util::tail_lines(&boot_log, 30)
            )));
        }
        Ok(())
    }

    /// Runs a command in the guest (see [`Console::run_ok`]), adding QEMU's stderr to errors.
    pub fn run_ok(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        self.console
            .run_ok(cmd, timeout)
            .map_err(|e| self.explain(e))
    }

    /// If QEMU died, replaces a console error with its exit status and stderr.
    /// Fails unless the guest's virtio-net device negotiated packed rings
    /// (VIRTIO_F_RING_PACKED): the guest lists its features as a string of 0/1, bit 0
    /// first. A QEMU whose backend does not offer the bit falls back to split rings
    /// silently, so a packed-ring test checks this first.
    pub fn ensure_packed_rings(&mut self) -> Result<()> {
        let bits = self.run_ok(
            "cat /sys/class/net/eth0/device/features",
            Duration::from_secs(20),
        )?;
        let packed = bits.trim().as_bytes().get(34) == Some(&b'1');
        crate::ensure(packed, || {
            format!("the guest did not negotiate VIRTIO_F_RING_PACKED (bit 34): {bits:?}")
        })
    }

    pub fn explain(&mut self, e: Error) -> Error {
        match self.child.try_wait() {
            Ok(Some(st)) => Error::ProcessExited {
                what: format!("QEMU ({e})"),
                status: st.to_string(),
                log: self.stderr_log.clone(),
                tail: util::tail_file(&self.stderr_log, 20),
            },
            _ => e,
        }
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let child = &mut self.child;
        util::wait_until("QEMU to exit", timeout, || {
            child
                .try_wait()
                .map_err(|e| Error::io("waiting for QEMU", e))
        })
    }

    /// SIGKILL, as when a VM crashes: the backend sees the socket close without any goodbye.
    pub fn kill(&mut self) -> Result<()> {
        if self.is_running() {
            util::signal(self.child.id(), libc::SIGKILL)?;
        }
        let _ = self.child.wait();
        Ok(())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> GuestImage {
        GuestImage {
            kernel: "/k".into(),
            initrd: "/i".into(),
            kernel_package: "linux-image-6.1.0-1-amd64".into(),
        }
    }

    #[test]
    fn single_queue_args() {
        let c = QemuConfig::new(&image(), Path::new("/s/vm.sock"), Path::new("/w"));
        let a = c.args().join(" ");
        assert!(a.contains("-accel tcg"));
        assert!(a.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(a.contains("-chardev socket,id=vu0,path=/s/vm.sock "));
        assert!(a.contains("-netdev vhost-user,id=net0,chardev=vu0 "));
        assert!(a.contains("virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56 "));
        assert!(a.contains("vr.ip=eth0,10.0.0.2/24"));
        assert!(a.contains("-smp 1 "));
        assert!(a.ends_with("-no-reboot"));
    }

    #[test]
    fn multiqueue_args() {
        let mut c = QemuConfig::new(&image(), Path::new("/s/vm.sock"), Path::new("/w")).queues(2);
        c.socket_mode = SocketMode::Server;
        c.no_reboot = false;
        let a = c.args().join(" ");
        assert!(a.contains("vhost-user,id=net0,chardev=vu0,queues=2"));
        assert!(a.contains(",mq=on,vectors=6"));
        assert!(a.contains("-smp 2 "));
        assert!(a.contains("path=/s/vm.sock,server=on,wait=off"));
        assert!(!a.contains("-no-reboot"));
    }

    #[test]
    fn reconnecting_client_args() {
        let mut c = QemuConfig::new(&image(), Path::new("/s/vm.sock"), Path::new("/w"));
        c.reconnect_ms = Some(1000);
        let a = c.args().join(" ");
        assert!(a.contains("-chardev socket,id=vu0,path=/s/vm.sock,reconnect-ms=1000 "));
    }

    #[test]
    fn guest_without_nic() {
        let c = QemuConfig::without_nic(&image(), Path::new("/w"));
        let a = c.args().join(" ");
        assert!(!a.contains("vhost-user"));
        assert!(!a.contains("-chardev"));
        assert!(!a.contains("vr.ip="));
        assert!(a.contains("memory-backend-memfd,id=mem,size=1024M,share=on"));
        assert!(a.contains("-smp 2 "));
    }
}
