//! Small host-side helpers shared by the harness: running commands, unique names, scratch
//! directories, file locks, process signalling.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The workspace root (parent of this crate), where `target/` and `.cache/` live.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Where downloaded kernels and built initramfs images are kept between runs:
/// `$VHOST_RELAY_CACHE`, else `<workspace>/.cache` (gitignored).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("VHOST_RELAY_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join(".cache"),
    }
}

/// Renders a command line for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion and returns its stdout; a non-zero exit is an error carrying
/// stdout and stderr, so failures of `ip`, `apt-get` etc. explain themselves.
pub fn run(cmd: &mut Command) -> Result<String> {
    let desc = describe(cmd);
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("starting `{desc}`"), e))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(Error::Command {
            cmd: desc,
            status: out.status.to_string(),
            output: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        })
    }
}

/// A name unique to this process and call: `<prefix>-<pid>-<n>`. Kept short because it ends up
/// in unix socket paths (108 bytes max) and namespace names.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A scratch directory removed on drop, unless `VHOST_RELAY_KEEP` is set (to inspect logs of a
/// failed run).
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `/tmp/<prefix>-<pid>-<n>`. `/tmp` rather than the target dir keeps socket paths
    /// short.
    pub fn new(prefix: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::env::var_os("VHOST_RELAY_KEEP").is_some() {
            eprintln!("keeping {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// An exclusive `flock` held until drop. Used to build the cache once when several tests start
/// at the same time, and to run TCG guests one at a time on a small machine.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn acquire(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("opening lock {}", path.display()), e))?;
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io(format!("locking {}", path.display()), err));
            }
        }
        Ok(FileLock { _file: file })
    }
}

/// Sends `sig` to one process by PID.
pub fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    let pid_t = libc::pid_t::try_from(pid).map_err(|_| {
        Error::io(
            format!("pid {pid}"),
            std::io::ErrorKind::InvalidInput.into(),
        )
    })?;
    // SAFETY: kill(2) has no memory effects; the pid is one of our own children.
    let rc = unsafe { libc::kill(pid_t, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::io(
            format!("sending signal {sig} to pid {pid}"),
            std::io::Error::last_os_error(),
        ))
    }
}

/// Stops a child: SIGTERM, then SIGKILL if it has not exited within `grace`. Always reaps it.
pub fn stop_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    let _ = signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// The last `max_lines` lines of a text file (lossy), for error messages.
pub fn tail_file(path: &Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail_lines(&String::from_utf8_lossy(&bytes), max_lines),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// The last `max_lines` lines of `text`.
pub fn tail_lines(text: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(max_lines);
    lines[start..].join("\n")
}

/// Polls `cond` every 100 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                secs: timeout.as_secs(),
                detail: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a unix socket bound at `path` listens, in the network namespace of process `pid`
/// (its `/proc/PID/net/unix`). Its file appears at bind(), a moment before listen() lets
/// connections in; this tells them apart without connecting (a connection may start
/// something, as under socket activation).
pub fn unix_socket_listening(pid: u32, path: &Path) -> bool {
    /// `__SO_ACCEPTCON` in the table's Flags column: the socket listens.
    const ACCEPTING: u32 = 0x1_0000;
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let flags = cols.get(3).and_then(|f| u32::from_str_radix(f, 16).ok());
        cols.get(7) == Some(&path.as_ref()) && flags.is_some_and(|f| f & ACCEPTING != 0)
    })
}

/// Whether an executable named `name` is on `PATH`.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| is_executable(&d.join(name))))
        .unwrap_or(false)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// SHA-256 of a host file, via coreutils' `sha256sum` (keeps the crate free of hashing deps).
pub fn sha256_file(path: &Path) -> Result<String> {
    let out = run(Command::new("sha256sum").arg(path))?;
    parse_sum_line(&out).ok_or_else(|| Error::Parse {
        what: format!("sha256sum of {}", path.display()),
        detail: out.clone(),
    })
}

/// Extracts the hex digest from a `sha256sum`/`md5sum` line (`<hex>  <name>`); the digest is the
/// first whitespace-separated word made only of hex digits (at least 32 of them).
pub fn parse_sum_line(text: &str) -> Option<String> {
    text.split_whitespace()
        .find(|w| w.len() >= 32 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .map(|w| w.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ() {
        let a = unique_name("x");
        let b = unique_name("x");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("x-{}-", std::process::id())));
    }

    #[test]
    fn tail_lines_keeps_the_end() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(tail_lines("", 5), "");
    }

    #[test]
    fn run_reports_failures_with_output() {
        let err = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]));
        match err {
            Err(Error::Command { output, status, .. }) => {
                assert!(output.contains("oops"));
                assert!(status.contains('3'));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            run(Command::new("sh").args(["-c", "echo hi"])).ok(),
            Some("hi\n".into())
        );
    }

    #[test]
    fn sum_lines_parse() {
        let d = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(parse_sum_line(&format!("{d}  /tmp/x\n")), Some(d.into()));
        assert_eq!(
            parse_sum_line("d41d8cd98f00b204e9800998ecf8427e  -"),
            Some("d41d8cd98f00b204e9800998ecf8427e".into())
        );
        assert_eq!(parse_sum_line("sha256sum: no such file"), None);
    }

    #[test]
    fn scratch_dirs_are_removed() {
        let p = {
            let d = ScratchDir::new("vrt-unit").unwrap();
            std::fs::write(d.join("f"), b"x").unwrap();
            d.path().to_path_buf()
        };
        if std::env::var_os("VHOST_RELAY_KEEP").is_none() {
            assert!(!p.exists());
        }
    }

    #[test]
    fn file_lock_is_exclusive_between_threads() {
        let dir = ScratchDir::new("vrt-lock").unwrap();
        let path = dir.join("l");
        let first = FileLock::acquire(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = path.clone();
        let h = std::thread::spawn(move || {
            let _second = FileLock::acquire(&p2).unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        drop(first);
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok());
        h.join().unwrap();
    }
}
