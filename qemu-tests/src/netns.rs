//! A network namespace holding a veth pair: one end stands for the SR-IOV VF the backend
//! relays to, the other is the "host peer" the guest talks to.
//!
//! All test traffic stays inside the namespace: it has no route out and no link to the host's
//! namespaces. Only the backend (which must see the VF end) runs inside it; QEMU reaches the
//! backend through a unix socket on the filesystem, which namespaces do not separate.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::util;

/// Address of the host peer inside every test namespace.
pub const PEER_IP: &str = "10.0.0.1";
/// Address the guest is given.
pub const GUEST_IP: &str = "10.0.0.2";
/// Prefix length of the test subnet.
pub const PREFIX_LEN: u8 = 24;

/// A namespace with `vf0` (the backend's end, no address) and `peer0` (the host peer, with
/// [`PEER_IP`]). Deleted, with everything in it, on drop.
#[derive(Debug)]
pub struct NetNs {
    ns: test_support::netns::NetNs,
}

impl NetNs {
    /// Creates `<prefix>-<pid>-<n>` with the veth pair up and the peer addressed.
    pub fn new(prefix: &str) -> Result<Self> {
        Self::with_queues(prefix, 1)
    }

    /// [`NetNs::new`] with `queues` RX and TX queues on both veth ends, like a multi-queue VF
    /// (AF_XDP needs one VF queue per queue pair).
    pub fn with_queues(prefix: &str, queues: u16) -> Result<Self> {
        let name = util::unique_name(prefix);
        let ns = test_support::netns::NetNs::create(&name)
            .map_err(|e| Error::io(format!("creating netns {name}"), e))?;
        let ns = NetNs { ns };
        let q = queues.max(1).to_string();
        ns.ip(&[
            "link",
            "add",
            "vf0",
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
        ])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{PEER_IP}/{PREFIX_LEN}"),
            "dev",
            "peer0",
        ])?;
        ns.ip(&["link", "set", "vf0", "up"])?;
        ns.ip(&["link", "set", "peer0", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// The interface the backend relays to (the "VF").
    pub fn vf(&self) -> &str {
        "vf0"
    }

    /// The host peer's interface.
    pub fn peer(&self) -> &str {
        "peer0"
    }

    /// Runs `ip -n NS ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        self.ns
            .ip(args)
            .map_err(|e| Error::io(format!("in netns {}", self.name()), e))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it, so the
    /// child's PID is the program's own and it can be signalled directly).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.ns.command(program)
    }

    /// Runs a shell command line inside the namespace and returns its stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        util::run(self.command("sh").args(["-c", script]))
    }

    /// Pings `dst` from inside the namespace; `Ok` with ping's output when all replies came.
    pub fn ping(&self, dst: &str, count: u32) -> Result<String> {
        util::run(self.command("ping").args([
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            dst,
        ]))
    }

    /// Runs `f` in a fresh thread that has entered the namespace, so sockets it creates live
    /// there. Entering only a dedicated thread keeps the test's own thread in the host namespace.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        self.ns
            .within(f)
            .map_err(|e| Error::io(format!("entering netns {}", self.name()), e))?
    }

    /// A TCP listener bound inside the namespace.
    pub fn tcp_listen(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.within(|| {
            TcpListener::bind(addr)
                .map_err(|e| Error::io(format!("binding {addr} in the test namespace"), e))
        })
    }

    /// A TCP connection made from inside the namespace.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        self.within(|| {
            TcpStream::connect_timeout(&addr, timeout)
                .map_err(|e| Error::io(format!("connecting to {addr} from the test namespace"), e))
        })
    }
}
