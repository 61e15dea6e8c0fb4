//! The guest: a Debian kernel and a busybox initramfs that brings up virtio-net and gives a
//! shell on the serial console.
//!
//! Two flavours share this code: the bookworm 6.1 kernel with the virtio-net modules (every
//! vhost-user test), and the bookworm-backports 6.12 kernel with vDPA, vhost-vdpa and VDUSE
//! (6.1 has `CONFIG_VDPA` off), whose initramfs also carries host-built binaries and the shared
//! libraries they need, so the vDPA tests can run vhost-relay and its peers inside the guest.
//!
//! The kernel package is downloaded with `apt-get download` and unpacked with `dpkg -x` into the
//! cache, never installed: the host kernel and its modules stay untouched. Only `vmlinuz` and
//! the few modules the guest needs are kept (the unpacked package is ~400 MB). The initramfs is
//! rebuilt only when one of its inputs changes (kernel package, busybox binary, init script).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cpio::CpioWriter;
use crate::error::{Error, Result};
use crate::util::{self, FileLock};

/// The modules the guest loads, in an order that satisfies their dependencies; any dependency
/// found in a module's `depends=` is added before it anyway (6.1 ships no `modules.dep`).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
];

/// The modules of the vDPA guest: VDUSE (a vDPA device served by a userspace process) and
/// vhost-vdpa (its `/dev/vhost-vdpa-N` face). `virtio_vdpa` is deliberately absent: with it
/// loaded, the kernel's own virtio-net driver would claim the vDPA device instead of vhost-vdpa.
pub const VDPA_GUEST_MODULES: &[&str] = &["vhost_iotlb", "vdpa", "vduse", "vhost", "vhost_vdpa"];

/// Host tools copied into the vDPA guest besides the caller's binaries: iproute2's `vdpa`
/// (`vdpa dev add name NAME mgmtdev vduse` attaches a VDUSE device to the vDPA bus).
const VDPA_GUEST_TOOLS: &[&str] = &["/usr/sbin/vdpa", "/sbin/vdpa"];

/// Which kernel (and module set) a guest image is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flavour {
    /// bookworm's 6.1 kernel with virtio-net: the guest of the vhost-user tests.
    Virtio61,
    /// bookworm-backports' 6.12 kernel with vdpa, vhost_vdpa and VDUSE.
    Vdpa612,
}

impl Flavour {
    fn modules(self) -> &'static [&'static str] {
        match self {
            Flavour::Virtio61 => GUEST_MODULES,
            Flavour::Vdpa612 => VDPA_GUEST_MODULES,
        }
    }

    /// The environment variable that overrides the kernel package.
    fn package_env(self) -> &'static str {
        match self {
            Flavour::Virtio61 => "VHOST_RELAY_GUEST_KERNEL_PKG",
            Flavour::Vdpa612 => "VHOST_RELAY_VDPA_KERNEL_PKG",
        }
    }

    /// The sort key of a kernel package name of this flavour (newest is greatest), or `None`
    /// if the name is not one of this flavour's packages.
    fn package_key(self, p: &str) -> Option<u32> {
        match self {
            Flavour::Virtio61 => abi_number(p),
            Flavour::Vdpa612 => backports_612_number(p),
        }
    }
}

/// Printed by `/init` once the NICs are configured and the shell is about to start.
pub const READY_MARKER: &str = "@@VHOST-RELAY-GUEST-READY@@";

/// Bump when the layout of the image changes in a way the inputs do not capture.
const FORMAT_VERSION: &str = "vhost-relay-initramfs-v1";

/// The guest's `/init`. NICs are configured from the kernel command line, one
/// `vr.ip=IFNAME,ADDR/PREFIX` per interface, so one image serves every test. Kernel messages are
/// silenced once booted (`printk` level 1) so they cannot interleave with command output on the
/// serial console, and the shell runs without tty echo so the console carries only output.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m.ko || echo "@@INIT-ERROR insmod $m failed"
done
ip link set lo up
hostname guest
for t in $(cat /proc/cmdline); do
  case "$t" in
    vr.ip=*)
      v=${t#vr.ip=}; ifc=${v%%,*}; addr=${v#*,}
      n=0
      while [ ! -e /sys/class/net/$ifc ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
      ip link set "$ifc" up || echo "@@INIT-ERROR no interface $ifc"
      ip addr add "$addr" dev "$ifc" || echo "@@INIT-ERROR cannot address $ifc"
      ;;
  esac
done
echo 1 > /proc/sys/kernel/printk
stty -F /dev/ttyS0 -echo
# No job control: its "[1]+ Done" notices would land in the next command's output.
echo 'set +m' > /etc/shrc
export PS1='' PS2='' ENV=/etc/shrc
echo "@@VHOST-RELAY-GUEST-READY@@"
while true; do
  setsid cttyhack sh
done
"#;

/// Paths of a ready-to-boot guest.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// `vmlinuz` of the Debian kernel.
    pub kernel: PathBuf,
    /// The gzip-compressed newc initramfs.
    pub initrd: PathBuf,
    /// The Debian package the kernel came from, e.g. `linux-image-6.1.0-56-amd64`.
    pub kernel_package: String,
}

/// A host file to put into the initramfs at `/bin/NAME`.
#[derive(Clone, Debug)]
pub struct GuestBinary {
    /// Where it is on the host.
    pub host: PathBuf,
    /// Its name in the guest's `/bin`.
    pub name: String,
}

impl GuestBinary {
    /// `host` under its own file name.
    pub fn new(host: &Path) -> Result<Self> {
        let name = host
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::GuestImage(format!("{} has no file name", host.display())))?;
        Ok(GuestBinary {
            host: host.to_path_buf(),
            name,
        })
    }

    /// The `guest-tools` program `name` (`vduse-net`, `vdpa-probe`, `vu-frontend`) of the build
    /// the running executable belongs to: cargo puts a package's binaries in
    /// `target/<profile>/` and test executables in `target/<profile>/deps/`. Cargo builds only
    /// the tested package's own binaries for a test, so `cargo build -p guest-tools` (or
    /// `--workspace`) must have run; scripts/test.sh does.
    pub fn guest_tool(name: &str) -> Result<Self> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::io("locating the running test executable", e))?;
        let mut dir = exe.parent().unwrap_or(Path::new(".")).to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        let host = dir.join(name);
        if !host.is_file() {
            return Err(Error::GuestToolNotFound {
                name: name.to_string(),
                tried: vec![host],
            });
        }
        Self::new(&host)
    }
}

impl GuestImage {
    /// Prepares (or reuses from [`util::cache_dir`]) the guest kernel and initramfs.
    pub fn ensure() -> Result<GuestImage> {
        Self::ensure_in(&util::cache_dir())
    }

    /// Like [`GuestImage::ensure`] with an explicit cache directory.
    pub fn ensure_in(cache: &Path) -> Result<GuestImage> {
        Self::ensure_flavour_in(cache, Flavour::Virtio61, &[])
    }

    /// The vDPA guest: the 6.12 kernel with [`VDPA_GUEST_MODULES`] loaded by `/init`, iproute2's
    /// `vdpa`, and `binaries` in `/bin` with the shared libraries they link (found with `ldd`),
    /// so host-built programs run in the guest as they are.
    pub fn ensure_vdpa(binaries: &[GuestBinary]) -> Result<GuestImage> {
        Self::ensure_flavour_in(&util::cache_dir(), Flavour::Vdpa612, binaries)
    }

    /// Prepares (or reuses) a guest of `flavour` carrying `binaries` (see
    /// [`GuestImage::ensure_vdpa`]).
    pub fn ensure_flavour_in(
        cache: &Path,
        flavour: Flavour,
        binaries: &[GuestBinary],
    ) -> Result<GuestImage> {
        let _lock = FileLock::acquire(&cache.join("guest-image.lock"))?;
        let kernels = cache.join("kernels");
        let package = resolve_kernel_package(&kernels, flavour)?;
        let kdir = kernels.join(&package);
        if !kdir.join("complete").exists() {
            fetch_kernel(&package, flavour.modules(), &kernels, &kdir)?;
        }
        let kernel = kdir.join("vmlinuz");
        let mut extra = binaries.to_vec();
        if flavour == Flavour::Vdpa612 {
            let tool = VDPA_GUEST_TOOLS
                .iter()
                .map(Path::new)
                .find(|p| p.exists())
                .ok_or_else(|| {
                    Error::Prerequisite("iproute2's `vdpa` tool (/usr/sbin/vdpa)".into())
                })?;
            extra.push(GuestBinary::new(tool)?);
        }
        let initrd = build_initramfs(cache, &kdir, &extra)?;
        Ok(GuestImage {
            kernel,
            initrd,
            kernel_package: package,
        })
    }
}

/// Picks the kernel package: `$VHOST_RELAY_GUEST_KERNEL_PKG` (6.1) or
/// `$VHOST_RELAY_VDPA_KERNEL_PKG` (6.12), else (6.1 only) what `linux-image-amd64` depends on,
/// else the newest package of the flavour apt knows, else one already in the cache (so an
/// offline machine with a warm cache still works).
fn resolve_kernel_package(kernels: &Path, flavour: Flavour) -> Result<String> {
    if let Ok(p) = std::env::var(flavour.package_env()) {
        if !p.is_empty() {
            return Ok(p);
        }
    }
    if flavour == Flavour::Virtio61 {
        if let Ok(out) = util::run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))
        {
            if let Some(p) = parse_depends(&out) {
                return Ok(p);
            }
        }
    }
    let pattern = match flavour {
        Flavour::Virtio61 => r"^linux-image-6\.1\.0-[0-9]+-amd64$",
        Flavour::Vdpa612 => r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
    };
    if let Ok(out) = util::run(Command::new("apt-cache").args(["search", "--names-only", pattern]))
    {
        if let Some(p) = newest(
            flavour,
            out.lines().filter_map(|l| l.split_whitespace().next()),
        ) {
            return Ok(p);
        }
    }
    let cached: Vec<String> = std::fs::read_dir(kernels)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("complete").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    newest(flavour, cached.iter().map(String::as_str)).ok_or_else(|| {
        let (what, where_) = match flavour {
            Flavour::Virtio61 => ("linux-image-6.1.0-*-amd64", "bookworm"),
            Flavour::Vdpa612 => ("linux-image-6.12.*+deb12-amd64", "bookworm-backports"),
        };
        Error::GuestImage(format!(
            "cannot find a {what} package in {where_}: run `apt-get update` \
             (scripts/install-deps.sh adds bookworm-backports and does) or set {}",
            flavour.package_env()
        ))
    })
}

/// N of `linux-image-6.12.N+deb12-amd64`.
fn backports_612_number(p: &str) -> Option<u32> {
    p.strip_prefix("linux-image-6.12.")?
        .strip_suffix("+deb12-amd64")?
        .parse()
        .ok()
}

fn newest<'a>(flavour: Flavour, names: impl Iterator<Item = &'a str>) -> Option<String> {
    names
        .filter_map(|n| flavour.package_key(n).map(|a| (a, n)))
        .max_by_key(|(a, _)| *a)
        .map(|(_, n)| n.to_string())
}

/// `Depends: linux-image-6.1.0-56-amd64` from `apt-cache depends linux-image-amd64`.
fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| is_61_package(p))
        .map(str::to_string)
}

fn is_61_package(p: &str) -> bool {
    abi_number(p).is_some()
}

/// N of `linux-image-6.1.0-N-amd64`.
fn abi_number(p: &str) -> Option<u32> {
    p.strip_prefix("linux-image-6.1.0-")?
        .strip_suffix("-amd64")?
        .parse()
        .ok()
}

/// Downloads and unpacks the kernel package, keeping `vmlinuz` and the guest's modules
/// (decompressed, in load order) in `kdir`.
fn fetch_kernel(package: &str, modules: &[&str], kernels: &Path, kdir: &Path) -> Result<()> {
    let work = kernels.join(format!("{package}.work"));
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(kdir);
    std::fs::create_dir_all(&work)
        .map_err(|e| Error::io(format!("creating {}", work.display()), e))?;
    util::run(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(&work),
    )?;
    let deb = std::fs::read_dir(&work)
        .map_err(|e| Error::io(format!("listing {}", work.display()), e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| Error::GuestImage(format!("apt-get download {package} left no .deb")))?;
    let root = work.join("root");
    util::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;

    let vmlinuz = find_file(&root.join("boot"), |n| n.starts_with("vmlinuz-"))?
        .ok_or_else(|| Error::GuestImage(format!("{package} has no boot/vmlinuz-*")))?;
    let modroot = root.join("lib/modules");
    let mut index = HashMap::new();
    index_modules(&modroot, &mut index)?;
    let order = resolve_module_order(modules, |name| {
        let path = index.get(name).ok_or_else(|| {
            Error::GuestImage(format!("{package} has no module {name}.ko or {name}.ko.xz"))
        })?;
        let bytes = read_module(path)?;
        Ok((module_depends(&bytes), bytes))
    })?;

    let staging = kernels.join(format!("{package}.staging"));
    let _ = std::fs::remove_dir_all(&staging);
    let mdir = staging.join("modules");
    std::fs::create_dir_all(&mdir)
        .map_err(|e| Error::io(format!("creating {}", mdir.display()), e))?;
    std::fs::copy(&vmlinuz, staging.join("vmlinuz"))
        .map_err(|e| Error::io(format!("copying {}", vmlinuz.display()), e))?;
    let mut names = String::new();
    for (name, bytes) in &order {
        let p = mdir.join(format!("{name}.ko"));
        std::fs::write(&p, bytes).map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        names.push_str(name);
        names.push('\n');
    }
    write_file(&staging.join("modules.order"), names.as_bytes())?;
    write_file(&staging.join("complete"), package.as_bytes())?;
    std::fs::rename(&staging, kdir)
        .map_err(|e| Error::io(format!("renaming to {}", kdir.display()), e))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn write_file(p: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(p, data).map_err(|e| Error::io(format!("writing {}", p.display()), e))
}

fn find_file(dir: &Path, pred: impl Fn(&str) -> bool) -> Result<Option<PathBuf>> {
    let rd =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    Ok(rd
        .filter_map(|e| e.ok())
        .find(|e| pred(&e.file_name().to_string_lossy()))
        .map(|e| e.path()))
}

/// Maps module names (with `-` as `_`, as the kernel does) to their `.ko`/`.ko.xz` files.
fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<()> {
    let rd =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    for entry in rd.filter_map(|e| e.ok()) {
        let path = entry.path();
        let ft = entry
            .file_type()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        if ft.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = module_name(&entry.file_name().to_string_lossy()) {
            index.entry(name).or_insert(path);
        }
    }
    Ok(())
}

/// `virtio_net` for `virtio_net.ko` or `virtio_net.ko.xz`; `None` for other files.
fn module_name(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))?;
    Some(stem.replace('-', "_"))
}

/// The module's bytes, decompressed if it is a `.ko.xz` (busybox `insmod` may lack xz support).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|x| x == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                Error::io(
                    format!("running xz -dc {} (install xz-utils)", path.display()),
                    e,
                )
            })?;
        if !out.status.success() {
            return Err(Error::GuestImage(format!(
                "xz -dc {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(out.stdout)
    } else {
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
    }
}

/// The `depends=` entry of a module's `.modinfo` section (NUL-separated `key=value` strings).
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(pos) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[pos + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(|s| s.trim().replace('-', "_"))
        .filter(|s| !s.is_empty())
        .collect()
}

/// Loads one module by name: its dependencies and its contents.
type LoadModule<'a, T> = dyn FnMut(&str) -> Result<(Vec<String>, T)> + 'a;

/// Orders `wanted` and all their dependencies so each module comes after what it depends on.
/// `load` returns a module's dependencies and bytes.
pub fn resolve_module_order<T>(
    wanted: &[&str],
    mut load: impl FnMut(&str) -> Result<(Vec<String>, T)>,
) -> Result<Vec<(String, T)>> {
    #[derive(PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit<T>(
        name: &str,
        load: &mut LoadModule<'_, T>,
        marks: &mut HashMap<String, Mark>,
        out: &mut Vec<(String, T)>,
    ) -> Result<()> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                return Err(Error::GuestImage(format!(
                    "module dependency cycle at {name}"
                )))
            }
            None => {}
        }
        marks.insert(name.to_string(), Mark::Visiting);
        let (deps, data) = load(name)?;
        for d in &deps {
            visit(d, load, marks, out)?;
        }
        marks.insert(name.to_string(), Mark::Done);
        out.push((name.to_string(), data));
        Ok(())
    }
    let mut marks = HashMap::new();
    let mut out = Vec::new();
    for w in wanted {
        visit(w, &mut load, &mut marks, &mut out)?;
    }
    Ok(out)
}

/// Builds `initramfs-<key>.cpio.gz` in `cache` unless it exists; the key hashes every input.
fn build_initramfs(cache: &Path, kdir: &Path, extra: &[GuestBinary]) -> Result<PathBuf> {
    let busybox = find_static_busybox()?;
    let busybox_bytes = std::fs::read(&busybox)
        .map_err(|e| Error::io(format!("reading {}", busybox.display()), e))?;
    let order_text = std::fs::read_to_string(kdir.join("modules.order"))
        .map_err(|e| Error::io(format!("reading {}/modules.order", kdir.display()), e))?;
    let mut modules = Vec::new();
    for name in order_text.lines().filter(|l| !l.is_empty()) {
        let p = kdir.join("modules").join(format!("{name}.ko"));
        let bytes =
            std::fs::read(&p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
        modules.push((name.to_string(), bytes));
    }
    let files = guest_files(cache, extra)?;

    let mut h = Fnv64::new();
    h.update(FORMAT_VERSION.as_bytes());
    h.update(INIT_SCRIPT.as_bytes());
    h.update(&busybox_bytes);
    for (n, b) in &modules {
        h.update(n.as_bytes());
        h.update(b);
    }
    for (path, bytes) in &files {
        h.update(path.as_bytes());
        h.update(bytes);
    }
    let out = cache.join(format!("initramfs-{:016x}.cpio.gz", h.finish()));
    if out.exists() {
        return Ok(out);
    }

    let mut w = CpioWriter::new();
    for d in [
        "/bin",
        "/sbin",
        "/usr",
        "/usr/bin",
        "/usr/sbin",
        "/etc",
        "/proc",
        "/sys",
        "/tmp",
        "/run",
        "/root",
        "/lib",
        "/lib/modules",
    ] {
        w.dir(d, 0o755);
    }
    w.dir("/dev", 0o755);
    w.char_dev("/dev/console", 0o600, 5, 1);
    w.char_dev("/dev/null", 0o666, 1, 3);
    w.file("/bin/busybox", 0o755, &busybox_bytes);
    w.symlink("/bin/sh", "busybox");
    w.file("/init", 0o755, INIT_SCRIPT.as_bytes());
    for (n, b) in &modules {
        w.file(&format!("/lib/modules/{n}.ko"), 0o644, b);
    }
    w.file("/lib/modules/order", 0o644, order_text.as_bytes());
    let mut dirs: std::collections::HashSet<String> = [
        "/bin",
        "/sbin",
        "/usr",
        "/usr/bin",
        "/usr/sbin",
        "/lib",
        "/lib/modules",
    ]
    .iter()
    .map(|d| d.to_string())
    .collect();
    for (path, bytes) in &files {
        // Parents first: the kernel creates entries in archive order.
        let mut parent = String::new();
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            parent.push('/');
            parent.push_str(c);
            if dirs.insert(parent.clone()) {
                w.dir(&parent, 0o755);
            }
        }
        w.file(path, 0o755, bytes);
    }
    let archive = w.finish();

    let tmp = cache.join(format!("{}.tmp", util::unique_name("initramfs")));
    let file =
        File::create(&tmp).map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    let mut gz = Command::new("gzip")
        .args(["-n", "-6"])
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .map_err(|e| Error::io("starting gzip", e))?;
    if let Some(mut stdin) = gz.stdin.take() {
        stdin
            .write_all(&archive)
            .map_err(|e| Error::io("writing to gzip", e))?;
    }
    let st = gz.wait().map_err(|e| Error::io("waiting for gzip", e))?;
    if !st.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::GuestImage(format!("gzip failed: {st}")));
    }
    std::fs::rename(&tmp, &out)
        .map_err(|e| Error::io(format!("renaming to {}", out.display()), e))?;
    Ok(out)
}

/// The extra files of the initramfs as (guest path, bytes): each binary at `/bin/NAME`,
/// stripped of debug info when `strip` is there (a debug vhost-relay is ~50 MB, most of it
/// DWARF the guest never reads), plus every shared library `ldd` lists for it at the path the
/// dynamic loader will look for it.
fn guest_files(cache: &Path, extra: &[GuestBinary]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut libs: Vec<String> = Vec::new();
    for b in extra {
        files.push((format!("/bin/{}", b.name), stripped(cache, &b.host)?));
        let out = Command::new("ldd")
            .arg(&b.host)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io(format!("running ldd {}", b.host.display()), e))?;
        // A static binary makes ldd fail ("not a dynamic executable"): nothing to add.
        for lib in parse_ldd(&String::from_utf8_lossy(&out.stdout)) {
            if !libs.contains(&lib) {
                libs.push(lib);
            }
        }
    }
    for lib in libs {
        let bytes =
            std::fs::read(&lib).map_err(|e| Error::io(format!("reading {lib} (from ldd)"), e))?;
        files.push((lib, bytes));
    }
    Ok(files)
}

/// The library paths in `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`
/// and the loader's own line `/lib64/ld-linux-x86-64.so.2 (0x...)`; not the vDSO.
fn parse_ldd(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

/// The bytes of `bin` without debug sections (or as they are if `strip` is missing or fails).
fn stripped(cache: &Path, bin: &Path) -> Result<Vec<u8>> {
    let tmp = cache.join(format!("{}.strip", util::unique_name("bin")));
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(bin)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let path = if ok { tmp.as_path() } else { bin };
    let bytes =
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e));
    let _ = std::fs::remove_file(&tmp);
    bytes
}

/// The guest has no libc, so busybox must be the static build (Debian `busybox-static`).
fn find_static_busybox() -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("/bin/busybox"),
        PathBuf::from("/usr/bin/busybox"),
    ];
    for c in &candidates {
        if let Ok(bytes) = std::fs::read(c) {
            if is_static_elf(&bytes) {
                return Ok(c.clone());
            }
        }
    }
    Err(Error::Prerequisite(
        "a static busybox (/bin/busybox from the busybox-static package)".into(),
    ))
}

/// An ELF without a program interpreter (`PT_INTERP`) is statically linked.
fn is_static_elf(bytes: &[u8]) -> bool {
    // 64-bit little-endian ELF only (the guest is x86_64).
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return false;
    }
    let rd_u64 = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let rd_u16 = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd_u64(32), rd_u16(54), rd_u16(56)) else {
        return false;
    };
    for i in 0..phnum as usize {
        let off = phoff as usize + i * phentsize as usize;
        match bytes.get(off..off + 4) {
            Some(t) if u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == 3 => return false, // PT_INTERP
            Some(_) => {}
            None => return false,
        }
    }
    true
}

/// FNV-1a, 64 bit: a stable (across Rust releases) hash for cache keys.
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Separate fields so ("ab","c") and ("a","bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_line_is_parsed() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        // A backports kernel is not the 6.1 guest the tests are written for.
        assert_eq!(
            parse_depends("  Depends: linux-image-6.12.38+deb12-amd64\n"),
            None
        );
    }

    #[test]
    fn newest_abi_wins() {
        let names = [
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-56-amd64",
            "linux-image-6.1.0-10-amd64",
            "junk",
        ];
        assert_eq!(
            newest(Flavour::Virtio61, names.into_iter()).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(newest(Flavour::Virtio61, ["x"].into_iter()), None);
        let bpo = [
            "linux-image-6.12.9+deb12-amd64",
            "linux-image-6.12.73+deb12-amd64",
            "linux-image-6.12.57+deb12-cloud-amd64",
            "linux-image-6.1.0-56-amd64",
        ];
        assert_eq!(
            newest(Flavour::Vdpa612, bpo.into_iter()).as_deref(),
            Some("linux-image-6.12.73+deb12-amd64")
        );
    }

    #[test]
    fn ldd_output_gives_library_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibmnl.so.0 => /lib/x86_64-linux-gnu/libmnl.so.0 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out),
            [
                "/lib/x86_64-linux-gnu/libmnl.so.0",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn module_names_cover_both_suffixes() {
        assert_eq!(module_name("virtio_net.ko").as_deref(), Some("virtio_net"));
        assert_eq!(
            module_name("virtio-net.ko.xz").as_deref(),
            Some("virtio_net")
        );
        assert_eq!(module_name("modules.dep"), None);
    }

    #[test]
    fn depends_are_read_from_modinfo() {
        let ko =
            b"\x7fELF....\0license=GPL\0depends=virtio_ring,virtio,net_failover\0retpoline=Y\0";
        assert_eq!(
            module_depends(ko),
            vec!["virtio_ring", "virtio", "net_failover"]
        );
        assert!(module_depends(b"\0depends=\0name=x\0").is_empty());
        assert!(module_depends(b"nothing here").is_empty());
    }

    #[test]
    fn dependencies_load_first() {
        let deps: HashMap<&str, Vec<String>> = [
            (
                "virtio_net",
                vec!["virtio_ring".into(), "virtio".into(), "net_failover".into()],
            ),
            ("net_failover", vec!["failover".into()]),
            ("failover", vec![]),
            ("virtio", vec!["virtio_ring".into()]),
            ("virtio_ring", vec![]),
        ]
        .into_iter()
        .collect();
        let order = resolve_module_order(&["virtio_net"], |n| {
            deps.get(n)
                .cloned()
                .map(|d| (d, ()))
                .ok_or_else(|| Error::GuestImage(format!("no {n}")))
        })
        .unwrap();
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
    }

    #[test]
    fn cycles_and_missing_modules_are_errors() {
        let r = resolve_module_order(&["a"], |n| {
            Ok((vec![if n == "a" { "b".into() } else { "a".into() }], ()))
        });
        assert!(matches!(r, Err(Error::GuestImage(m)) if m.contains("cycle")));
        let r: Result<Vec<(String, ())>> =
            resolve_module_order(&["a"], |n| Err(Error::GuestImage(format!("no {n}"))));
        assert!(r.is_err());
    }

    #[test]
    fn static_elf_detection() {
        // install-deps installs busybox-static; when it is there, it must be recognised.
        if let Ok(b) = std::fs::read("/bin/busybox") {
            if crate::in_ci() {
                assert!(is_static_elf(&b), "/bin/busybox is not the static build");
            }
        }
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(
            !is_static_elf(&sh),
            "/bin/sh is dynamically linked on Debian"
        );
        assert!(!is_static_elf(b"not an elf"));
    }

    #[test]
    fn init_prints_the_ready_marker() {
        assert!(INIT_SCRIPT.contains(&format!("echo \"{READY_MARKER}\"")));
    }

    #[test]
    fn fnv_separates_fields() {
        let mut a = Fnv64::new();
        a.update(b"ab");
        a.update(b"c");
        let mut b = Fnv64::new();
        b.update(b"a");
        b.update(b"bc");
        assert_ne!(a.finish(), b.finish());
    }
}
