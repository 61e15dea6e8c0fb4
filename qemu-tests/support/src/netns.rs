//! Network namespaces for tests, so test traffic never leaves them.
//!
//! A namespace belongs to a *thread* (`setns`/`unshare(CLONE_NEWNET)` affect only the caller),
//! and processes or threads started from that thread inherit it. Two ways in:
//! - [`NetNs`]: a named namespace (`ip netns add`), deleted on drop; processes go in with
//!   [`NetNs::command`] (`ip netns exec`), code with [`NetNs::within`].
//! - [`with_new_netns`]: a fresh unnamed namespace for one thread, gone when the thread ends.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// Runs `cmd` to completion and returns its stdout; a failure to start or a non-zero exit is
/// an error naming the command, with what it printed.
fn run(cmd: &mut Command) -> io::Result<String> {
    let desc = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("starting `{desc}`: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    Err(io::Error::other(format!(
        "`{desc}` failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    )))
}

/// Runs `ip ARGS` (iproute2) in the calling thread's namespace and returns its stdout.
pub fn ip(args: &[&str]) -> io::Result<String> {
    run(Command::new("ip").args(args))
}

/// Creates veth pair `a`/`b` in the calling thread's namespace and brings both ends up.
pub fn veth_pair(a: &str, b: &str) -> io::Result<()> {
    ip(&["link", "add", a, "type", "veth", "peer", "name", b])?;
    ip(&["link", "set", a, "up"])?;
    ip(&["link", "set", b, "up"])?;
    Ok(())
}

/// Turns IPv6 off in the calling thread's namespace, for interfaces made from now on too
/// (per-netns sysctls resolve against the opening thread's namespace), so that no DAD or MLD
/// chatter appears on test links. A kernel without IPv6 sends none anyway.
pub fn disable_ipv6() -> io::Result<()> {
    for knob in ["all", "default"] {
        let path = format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6");
        match std::fs::write(&path, "1") {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            r => r.map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?,
        }
    }
    Ok(())
}

/// Thread id of the caller (names its network namespace for `ip link set ... netns TID`).
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Moves the calling thread into a new, empty network namespace, with `lo` up and IPv6 off.
pub fn enter_new_netns() -> io::Result<()> {
    // SAFETY: unshare has no memory-safety preconditions; it affects only this thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("unshare(CLONE_NEWNET) (tests need root): {e}"),
        ));
    }
    disable_ipv6()?;
    ip(&["link", "set", "lo", "up"])?;
    Ok(())
}

/// Runs `f` on a new thread inside a new network namespace (see [`enter_new_netns`]) and
/// returns its result; a panic in `f` is raised again here, so assertions inside fail the test.
pub fn with_new_netns<R: Send>(f: impl FnOnce() -> R + Send) -> io::Result<R> {
    on_thread(|| {
        enter_new_netns()?;
        Ok(f())
    })
}

/// Runs `f` on a scoped thread and returns what it returns, raising its panic again here.
fn on_thread<R: Send>(f: impl FnOnce() -> io::Result<R> + Send) -> io::Result<R> {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// Moves the calling thread into the named namespace `name`.
pub fn enter(name: &str) -> io::Result<()> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    // SAFETY: setns with a namespace fd we hold open; affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("entering netns {name}: {e}"),
        ));
    }
    Ok(())
}

/// Runs `f` on a new thread that has entered namespace `name` (sockets it opens live there;
/// the caller's thread stays where it is). A panic in `f` is raised again here.
pub fn within<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    on_thread(|| {
        enter(name)?;
        Ok(f())
    })
}

/// Creates the named namespace `name` (replacing a stale one of that name) with `lo` up.
pub fn add(name: &str) -> io::Result<()> {
    // A namespace left by a killed run under the same name; usually there is none.
    let _ = delete(name);
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes the named namespace `name` and everything in it (its veth pairs with it).
pub fn delete(name: &str) -> io::Result<()> {
    ip(&["netns", "del", name]).map(drop)
}

/// A named namespace, deleted with everything in it on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates namespace `name` (see [`add`]).
    pub fn create(name: &str) -> io::Result<NetNs> {
        add(name)?;
        Ok(NetNs {
            name: name.to_string(),
        })
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it, so the
    /// child's PID is the program's own and it can be signalled directly).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a new thread inside the namespace (see [`within`]).
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        within(&self.name, f)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = delete(&self.name) {
            eprintln!("warning: cannot delete netns {}: {e}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_command_is_named_with_its_output() {
        let e = ip(&["no-such-object"]).unwrap_err().to_string();
        assert!(e.contains("`ip no-such-object` failed"), "{e}");
        assert!(e.contains("no-such-object"), "{e}");
    }

    // The tests below need root, as every namespace test of the workspace does.

    #[test]
    fn a_new_namespace_holds_only_lo_and_goes_with_its_thread() {
        let links = with_new_netns(|| {
            veth_pair("tsa", "tsb").expect("veth pair");
            ip(&["-o", "link", "show"]).expect("ip link")
        })
        .expect("a new namespace");
        assert_eq!(links.lines().count(), 3, "{links}");
        assert!(
            links.contains(": lo:") && links.contains("tsa@tsb"),
            "{links}"
        );
        let here = ip(&["-o", "link", "show", "tsa"]);
        assert!(here.is_err(), "the veth stayed in the thread's namespace");
    }

    #[test]
    fn a_named_namespace_is_entered_and_deleted_on_drop() {
        let name = format!("ts-unit-{}", std::process::id());
        let ns = NetNs::create(&name).expect("create");
        ns.ip(&[
            "link", "add", "tsv0", "type", "veth", "peer", "name", "tsv1",
        ])
        .expect("a link in it");
        let seen = ns
            .within(|| ip(&["-o", "link", "show", "tsv0"]))
            .expect("enter");
        assert!(seen.is_ok(), "{seen:?}");
        drop(ns);
        let listed = ip(&["netns", "list"]).expect("ip netns list");
        assert!(!listed.contains(&name), "{listed}");
    }
}
