//! Test scaffolding: private network namespaces with veth pairs, and a plain packet socket.
//!
//! A network namespace belongs to a *thread* (`unshare(CLONE_NEWNET)` affects only the caller), and
//! processes or threads started from that thread inherit it. So each test body runs on a dedicated
//! thread in a fresh namespace; `ip` commands it spawns configure that namespace, and the namespace
//! with its veth pairs disappears when the thread ends. No traffic can leave it.
//!
//! The namespaces and the packet socket are test-support's (shared with the integration tests
//! and the end-to-end harness); this module adapts them to unit tests that panic on failure and
//! keeps what needs the VF module's internals (`set_tx_checksum`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use test_support::netns;
pub use test_support::netns::gettid;
pub use test_support::raw_socket::wait_readable;
use test_support::raw_socket::{RawOptions, RawSocket};

/// Moves the calling thread into a new, empty network namespace (with `lo` up and IPv6 off so
/// that no autoconfiguration chatter appears on test links).
pub fn enter_new_netns() {
    netns::enter_new_netns().unwrap_or_else(|e| panic!("{e}"));
}

/// Runs `f` on a new thread inside a new network namespace and returns its result (re-raising
/// its panic, so assertions inside fail the test).
pub fn with_netns<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    netns::with_new_netns(f).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `ip ARGS` in the calling thread's namespace; panics with its output on failure.
pub fn ip(args: &[&str]) {
    netns::ip(args).unwrap_or_else(|e| panic!("{e}"));
}

/// Creates veth pair `a`/`b` and brings both ends up.
pub fn veth_pair(a: &str, b: &str) {
    netns::veth_pair(a, b).unwrap_or_else(|e| panic!("{e}"));
}

/// A plain `AF_PACKET` socket (no virtio header, no ring, not seeing what this side sends)
/// standing for "the other side": test-support's, panicking on failure.
pub struct RawSock(RawSocket);

impl RawSock {
    pub fn open(ifname: &str) -> RawSock {
        let options = RawOptions {
            ignore_outgoing: true,
            ..RawOptions::default()
        };
        RawSock(RawSocket::open(ifname, options).expect("raw socket on the peer"))
    }

    /// Sends one Ethernet frame.
    pub fn send(&self, frame: &[u8]) {
        self.0.send(frame).expect("send a frame");
    }
}

/// Receiving (`recv`, `recv_matching`) is test-support's as it is.
impl std::ops::Deref for RawSock {
    type Target = RawSocket;
    fn deref(&self) -> &RawSocket {
        &self.0
    }
}

/// Turns transmit checksum offload of `ifname` on or off (`ETHTOOL_STXCSUM`, what
/// `ethtool -K IF tx on|off` does), without needing the ethtool program.
pub fn set_tx_checksum(ifname: &str, on: bool) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_STXCSUM: u32 = 0x17;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let name = super::c_ifname(ifname).expect("valid name");
    let mut val = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: u32::from(on),
    };
    let mut ifr = super::ifreq_for(&name);
    ifr.ifr_ifru.ifru_data = (&mut val as *mut EthtoolValue).cast();
    // SAFETY: plain socket call, checked; the ioctl reads `val` through `ifr`, both live.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let rc = libc::ioctl(
            fd.as_raw_fd(),
            SIOCETHTOOL as _,
            &mut ifr as *mut libc::ifreq,
        );
        assert_eq!(
            rc,
            0,
            "ETHTOOL_STXCSUM on {ifname}: {}",
            io::Error::last_os_error()
        );
    }
}

/// Polls `cond` every millisecond until it holds or `timeout` passes. For what the kernel
/// finishes after a call returns, or that a forked child's copy of an fd delays.
pub fn wait_for(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
