//! A vhost-user frontend for tests: what QEMU does to a backend, minus the guest.
//!
//! It maps shared "guest" memory from a memfd, negotiates features, lays out split
//! virtqueues in that memory and hands them to the backend, then plays the guest driver:
//! posts RX buffers and TX packets, kicks, waits for the backend's call, and reads the used
//! rings. Built on the vhost crate's `Frontend`, the same code path a Rust VMM uses. The
//! memory, ring and negotiation code is test-support's `driver` and `frontend` modules, shared
//! with the `vu-frontend` program the vDPA tests run inside their guest; this file wraps it
//! for tests that panic on any failure.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use test_support::driver::DriverQueue;
use test_support::driver::{self, DriverMemory, RingLayout};
pub use test_support::frontend::LOG_PAGE;
use test_support::frontend::{vring_config, MigrationLog, VuSession};
use test_support::netns;
use test_support::raw_socket::{self, RawOptions};
use test_support::stats::{self, StatsRequest};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const MEM_SIZE: usize = 16 << 20;
pub const QUEUE_SIZE: u16 = 256;
/// Guest-physical layout: rings at the bottom, each queue 64 KiB apart, buffers from 4 MiB.
pub const RING_BASE: u64 = 0;
pub const RING_STRIDE: u64 = 0x1_0000;
pub const BUF_BASE: u64 = 0x40_0000;
pub const BUF_SIZE: u64 = 0x1_0000;

// Each test binary compiles this module and uses a subset of it.
#[allow(unused_imports)]
pub use test_support::features::{
    VHOST_F_LOG_ALL, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX,
};

/// A running `vhost-relay` process, killed by PID when dropped.
pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Backend {
    pub fn start(dir: &Path, args: &[&str]) -> Backend {
        let socket = dir.join("vr.sock");
        let log = dir.join("vr.log");
        let mut all = vec!["--socket-path", socket.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        let child = spawn_backend(&all, &log, None);
        let b = Backend { child, socket, log };
        wait_for(Duration::from_secs(10), || b.socket.exists());
        b
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asks for the counters (SIGUSR1) and returns (packets, drops, errors) of virtqueue `q`.
    pub fn counters(&self, q: usize) -> (u64, u64, u64) {
        let line = stats_line(&self.child, &self.log, q);
        let field = |name| stats_field(&line, name);
        (field("packets"), field("drops"), field("errors"))
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asks `backend` (logging to `log`) for its counters (SIGUSR1) and returns the fresh stats
/// line of virtqueue `q`.
pub fn stats_line(backend: &Child, log: &Path, q: usize) -> String {
    let request = StatsRequest::send(backend.id(), log).expect("SIGUSR1 to the backend");
    let mut line = None;
    let answered = wait_for(Duration::from_secs(5), || {
        let text = request.answer().unwrap_or_default();
        line = text
            .lines()
            .rev()
            .find(|l| stats::stats_field(l, "queue") == Some(q as u64))
            .map(str::to_string);
        line.is_some()
    });
    assert!(answered, "the backend dumps its counters on SIGUSR1");
    line.expect("a stats line for the queue")
}

/// The numeric field `name` (`name=N`) of a stats line.
pub fn stats_field(line: &str, name: &str) -> u64 {
    stats::stats_field(line, name).unwrap_or_else(|| panic!("no numeric field {name} in {line:?}"))
}

/// Sends `sig` to a child this test started (by PID), which must not be reaped yet.
pub fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill() only sends a signal, to the PID of a child we started and still own.
    assert_eq!(
        unsafe { libc::kill(child.id() as i32, sig) },
        0,
        "signal {sig}"
    );
}

pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vhost-relay-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// The frontend with its guest memory and queues.
pub struct TestFrontend {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    pub memfd: File,
    pub queues: Vec<DriverQueue>,
    pub features: u64,
}

impl TestFrontend {
    /// Connects and negotiates; `want` is masked with what the backend offers.
    pub fn connect(socket: &Path, pairs: usize, want: u64) -> TestFrontend {
        Self::connect_with(socket, pairs, want, VhostUserProtocolFeatures::empty())
    }

    /// Like [`TestFrontend::connect`], also asking for the protocol features `extra`.
    pub fn connect_with(
        socket: &Path,
        pairs: usize,
        want: u64,
        extra: VhostUserProtocolFeatures,
    ) -> TestFrontend {
        let fe = Frontend::connect(socket, (2 * pairs) as u64).expect("connect to backend");
        Self::negotiate(fe, pairs, want, extra)
    }

    fn negotiate(
        fe: Frontend,
        pairs: usize,
        want: u64,
        extra: VhostUserProtocolFeatures,
    ) -> TestFrontend {
        let DriverMemory { memfd, mem, .. } = DriverMemory::new(MEM_SIZE).expect("guest memory");
        let session = VuSession::negotiate_with(
            fe,
            pairs,
            want,
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK | extra,
        )
        .expect("feature negotiation");
        let mut t = TestFrontend {
            fe: session.fe,
            mem,
            memfd,
            queues: Vec::new(),
            features: session.features,
        };
        assert!(t.fe.get_queue_num().expect("GET_QUEUE_NUM") >= (2 * pairs) as u64);
        t.send_mem_table();
        for i in 0..2 * pairs {
            t.setup_queue(i);
        }
        t
    }

    fn setup_queue(&mut self, index: usize) {
        let base = RING_BASE + index as u64 * RING_STRIDE;
        let q = DriverQueue::new(&self.mem, index, base, QUEUE_SIZE).expect("ring");
        let cfg = self.ring_config(q.layout, false);
        self.fe
            .set_vring_num(index, QUEUE_SIZE)
            .expect("SET_VRING_NUM");
        self.fe.set_vring_addr(index, &cfg).expect("SET_VRING_ADDR");
        self.fe.set_vring_base(index, 0).expect("SET_VRING_BASE");
        self.fe
            .set_vring_call(index, &q.call)
            .expect("SET_VRING_CALL");
        self.fe
            .set_vring_kick(index, &q.kick)
            .expect("SET_VRING_KICK");
        self.fe
            .set_vring_enable(index, true)
            .expect("SET_VRING_ENABLE");
        self.queues.push(q);
    }

    /// SET_VRING_ADDR's payload for a ring at `l` (see `vring_config`).
    fn ring_config(&self, l: RingLayout, log: bool) -> VringConfigData {
        let hva = self
            .mem
            .get_host_address(GuestAddress(0))
            .expect("host addr") as u64;
        vring_config(hva, l, QUEUE_SIZE, log)
    }

    fn layout(&self, q: usize) -> RingLayout {
        self.queues[q].layout
    }

    fn r16(&self, addr: u64) -> u16 {
        driver::r16(&self.mem, addr).expect("read u16")
    }

    fn w16(&self, addr: u64, v: u16) {
        driver::w16(&self.mem, addr, v).expect("write u16");
    }

    /// Buffer area of queue `q`, slot `slot` (64 KiB each).
    pub fn buf_addr(q: usize, slot: u16) -> u64 {
        BUF_BASE + (q as u64 * QUEUE_SIZE as u64 + slot as u64) * BUF_SIZE / 16
    }

    /// Posts a chain of (addr, len, writable) descriptors; returns its head.
    pub fn post(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        self.queues[q].post(&self.mem, bufs).expect("post a chain")
    }

    /// Posts a TX packet (12-byte zero header + `data`) in one buffer at `addr`.
    pub fn post_tx(&mut self, q: usize, addr: u64, data: &[u8]) -> u16 {
        let mut bytes = vec![0u8; 12];
        bytes.extend_from_slice(data);
        self.mem
            .write_slice(&bytes, GuestAddress(addr))
            .expect("write packet");
        self.post(q, &[(addr, bytes.len() as u32, false)])
    }

    pub fn kick(&self, q: usize) {
        self.queues[q].kick().expect("kick");
    }

    /// New used entries of queue `q` as (head, len), waiting up to `timeout` for `n` of them.
    pub fn wait_used(&mut self, q: usize, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        self.queues[q]
            .wait_used(&self.mem, n, timeout)
            .expect("read the used ring")
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("write guest memory");
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read");
        v
    }
}

/// One loopback round trip through an established frontend.
pub fn round_trip(f: &mut TestFrontend, tag: u8) {
    let rx = TestFrontend::buf_addr(0, tag as u16 % 64);
    f.post(0, &[(rx, 2048, true)]);
    f.kick(0);
    let data: Vec<u8> = (0..100u8).map(|i| i ^ tag).collect();
    f.post_tx(1, TestFrontend::buf_addr(1, tag as u16 % 64), &data);
    f.kick(1);
    let used = f.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(used.len(), 1, "packet {tag} came back");
    assert_eq!(f.read(rx + 12, 100), data);
}

/// Connects to a backend's socket once it listens. Its file appears at bind(), a moment
/// before listen() lets connections in: until then connect() says ECONNREFUSED (vhost's
/// `Frontend::connect` retries that too; this is for tests that need the raw stream).
pub fn connect_when_listening(socket: &Path) -> std::os::unix::net::UnixStream {
    use std::io::ErrorKind::{ConnectionRefused, NotFound};
    let start = Instant::now();
    loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(s) => return s,
            Err(e)
                if matches!(e.kind(), ConnectionRefused | NotFound)
                    && start.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("connect to {}: {e}", socket.display()),
        }
    }
}

/// Writes raw bytes to the backend's socket, as a broken frontend would.
pub fn send_raw(socket: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.write_all(bytes)?;
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

/// Runs `cmd ARGS` (vhost-relay, possibly behind `ip netns exec`) with RUST_LOG from `VR_LOG`
/// (default info) and stderr to `log`.
fn start_logged(mut cmd: Command, args: &[&str], log: &Path) -> Child {
    let err = File::create(log).expect("log file");
    cmd.args(args)
        .env(
            "RUST_LOG",
            std::env::var("VR_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stderr(Stdio::from(err))
        .spawn()
        .expect("start vhost-relay")
}

/// Starts vhost-relay with arbitrary arguments (no --socket-path added), stderr to `log`.
pub fn spawn_backend(args: &[&str], log: &Path, pre_exec_fd: Option<i32>) -> Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-relay"));
    if let Some(fd) = pre_exec_fd {
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::fcntl(3, libc::F_SETFD, 0);
                Ok(())
            });
        }
    }
    start_logged(cmd, args, log)
}

impl TestFrontend {
    /// Like [`TestFrontend::connect`], over an already connected stream (client-mode backends).
    pub fn over_stream(
        stream: std::os::unix::net::UnixStream,
        pairs: usize,
        want: u64,
    ) -> TestFrontend {
        let fe = Frontend::from_stream(stream, (2 * pairs) as u64);
        Self::negotiate(fe, pairs, want, VhostUserProtocolFeatures::empty())
    }
}

/// A network namespace with a veth pair: `vf0` for the backend, `wire0` standing for the wire.
/// Deleted on drop. Nothing in it routes anywhere else.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("vrt-{tag}-{}", std::process::id());
        netns::add(&name).expect("create the test namespace");
        // From here on the guard deletes the namespace, even if a step below fails.
        let ns = NetNs { name };
        // Before the veth exists: with IPv6 on, the kernel sends DAD neighbour solicitations
        // and MLD reports from wire0 as the link comes up, frames the tests never sent that
        // the backend rightly delivers to the guest.
        ns.enter(netns::disable_ipv6)
            .expect("IPv6 off in the namespace");
        ns.ip(&[
            "link", "add", "vf0", "type", "veth", "peer", "name", "wire0",
        ]);
        ns.ip(&["link", "set", "vf0", "up"]);
        ns.ip(&["link", "set", "wire0", "up"]);
        ns
    }

    /// Runs `ip -n NAME ARGS`; panics with its output on failure.
    fn ip(&self, args: &[&str]) {
        let all = [&["-n", self.name.as_str()][..], args].concat();
        netns::ip(&all).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it opens live there).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        netns::within(&self.name, f).expect("enter the test namespace")
    }

    /// Creates a tap device `name` in the namespace with a transmit queue of `txqueuelen`
    /// packets, up, and returns its file: what the kernel transmits on the device is read
    /// from it, and a reader that does not read leaves the device's queue full (the kernel
    /// then refuses transmissions with `ENOBUFS`, as a NIC with a full ring does).
    pub fn tap(&self, name: &str, txqueuelen: u32) -> File {
        let ifname = name.to_string();
        let file = self.enter(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("open /dev/net/tun");
            // SAFETY: ifreq is plain data; TUNSETIFF reads the name and flags from it.
            unsafe {
                let mut ifr: libc::ifreq = std::mem::zeroed();
                for (d, s) in ifr.ifr_name.iter_mut().zip(ifname.as_bytes()) {
                    *d = *s as libc::c_char;
                }
                ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
                let rc = libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr);
                assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            }
            file
        });
        let qlen = txqueuelen.to_string();
        self.ip(&["link", "set", name, "txqueuelen", &qlen]);
        self.ip(&["link", "set", name, "up"]);
        file
    }

    /// Starts vhost-relay inside the namespace.
    pub fn spawn_backend(&self, args: &[&str], log: &Path) -> Child {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.name,
            env!("CARGO_BIN_EXE_vhost-relay"),
        ]);
        start_logged(cmd, args, log)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = netns::delete(&self.name);
    }
}

/// A raw packet socket on an interface, for the "wire" side of tests ([`test_support`]'s,
/// panicking on failure, receiving with a 200 ms timeout).
pub struct RawSocket(raw_socket::RawSocket);

impl RawSocket {
    /// Opens on `ifname` in the calling thread's namespace, with the virtio-net header on if
    /// `vnet_hdr` (so GSO packets are seen whole with their offload metadata), and room for
    /// bursts of thousands of frames.
    pub fn open(ifname: &str, vnet_hdr: bool) -> RawSocket {
        let options = RawOptions {
            vnet_hdr,
            large_rcvbuf: true,
            ..RawOptions::default()
        };
        RawSocket(raw_socket::RawSocket::open(ifname, options).expect("raw socket"))
    }

    pub fn send(&self, frame: &[u8]) {
        self.0.send(frame).expect("send a frame");
    }

    /// Next frame within 200 ms, if any.
    pub fn recv(&self) -> Option<Vec<u8>> {
        self.0.recv(Instant::now() + Duration::from_millis(200))
    }
}

// ---------------------------------------------------------------------------------------
// Live migration: dirty-page log helpers (used by dirty_log.rs).
// ---------------------------------------------------------------------------------------

/// A dirty log as QEMU makes one: test-support's [`MigrationLog`] (a memfd with one bit per
/// 4 KiB guest page), panicking on failure. Its `file` and `size` are reachable through it.
pub struct DirtyLogFd(pub MigrationLog);

impl DirtyLogFd {
    /// A zeroed log of `size` bytes.
    pub fn new(size: u64) -> DirtyLogFd {
        DirtyLogFd(MigrationLog::with_size(size).expect("log memfd"))
    }

    /// Guest page numbers whose bit is set.
    pub fn pages(&self) -> std::collections::BTreeSet<u64> {
        self.0.pages().expect("read log")
    }

    /// Clears the log, as QEMU does when it collects the bits.
    pub fn clear(&self) {
        self.0.clear().expect("clear log");
    }
}

impl std::ops::Deref for DirtyLogFd {
    type Target = MigrationLog;
    fn deref(&self) -> &MigrationLog {
        &self.0
    }
}

impl std::ops::DerefMut for DirtyLogFd {
    fn deref_mut(&mut self) -> &mut MigrationLog {
        &mut self.0
    }
}

/// Guest pages covering `[addr, addr + len)`.
pub fn pages_of(addr: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    addr / LOG_PAGE..=(addr + len.max(1) - 1) / LOG_PAGE
}

impl TestFrontend {
    /// Acks `extra` protocol features on top of what `connect` acked (MQ, REPLY_ACK).
    pub fn ack_protocol_features(&mut self, extra: VhostUserProtocolFeatures) {
        let pf = self
            .fe
            .get_protocol_features()
            .expect("GET_PROTOCOL_FEATURES");
        assert!(pf.contains(extra), "backend offers {extra:?}");
        self.fe
            .set_protocol_features(
                pf & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK | extra),
            )
            .expect("SET_PROTOCOL_FEATURES");
    }

    /// SET_LOG_BASE with `log` (needs LOG_SHMFD acked); waits for the backend's reply.
    pub fn set_log_base(&self, log: &DirtyLogFd) -> vhost::Result<()> {
        self.fe.set_log_base(0, Some(log.region()))
    }

    /// SET_FEATURES with the negotiated features, plus LOG_ALL if `log_all`.
    pub fn set_log_all(&mut self, log_all: bool) {
        let f = if log_all {
            self.features | VHOST_F_LOG_ALL
        } else {
            self.features & !VHOST_F_LOG_ALL
        };
        self.fe.set_features(f).expect("SET_FEATURES");
        // SET_FEATURES has no reply; the backend handles messages in order, so the reply
        // to GET_FEATURES means it is done (QEMU syncs the same way when it turns on logging).
        self.fe.get_features().expect("GET_FEATURES");
    }

    /// SET_VRING_ADDR again on a running ring, with the LOG flag and the used ring's guest
    /// address as log address when `log`: what QEMU does to every ring when it turns
    /// logging on or off.
    pub fn resend_vring_addr(&self, q: usize, log: bool) {
        let cfg = self.ring_config(self.layout(q), log);
        self.fe
            .set_vring_addr(self.queues[q].index, &cfg)
            .expect("SET_VRING_ADDR");
    }

    /// What QEMU sends to start (`on`) or stop dirty logging of a running device:
    /// SET_FEATURES with or without LOG_ALL, then SET_VRING_ADDR on every ring.
    pub fn migration_log(&mut self, on: bool) {
        self.set_log_all(on);
        for q in 0..self.queues.len() {
            self.resend_vring_addr(q, on);
        }
    }

    /// Guest pages of queue `q`'s used ring (flags, idx, ring, avail_event).
    pub fn used_ring_pages(&self, q: usize) -> std::ops::RangeInclusive<u64> {
        let used = self.layout(q).used;
        pages_of(used, 4 + 8 * QUEUE_SIZE as u64 + 2)
    }

    /// Resends the memory table (as QEMU does on any layout change): the backend maps new
    /// regions for the same guest memory.
    pub fn resend_mem_table(&self) {
        self.send_mem_table();
    }

    /// SET_MEM_TABLE with the one region holding all of the guest memory.
    fn send_mem_table(&self) {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: self
                .mem
                .get_host_address(GuestAddress(0))
                .expect("host addr") as u64,
            mmap_offset: 0,
            mmap_handle: self.memfd.as_raw_fd(),
        };
        self.fe.set_mem_table(&[region]).expect("SET_MEM_TABLE");
    }
}

// ---------------------------------------------------------------------------------------
// Backend restart and raw requests (used by restart.rs and rarp.rs).
// ---------------------------------------------------------------------------------------

/// A vhost-user message as raw bytes: header (request, flags with version 1, size) + payload.
pub fn raw_message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + payload.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&(0x1 | flags).to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// A child process (e.g. a backend started in a namespace) killed when dropped, so a failing
/// test leaves nothing running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `VHOST_USER_SEND_RARP` and the NEED_REPLY flag.
pub const REQ_SEND_RARP: u32 = 19;
pub const FLAG_NEED_REPLY: u32 = 0x8;

impl TestFrontend {
    /// What QEMU does when the backend comes back after dying under a running guest: a new
    /// connection, the same guest memory and ring addresses, and for each ring the base QEMU
    /// restored from the used index in guest memory (it could not ask the dead backend with
    /// GET_VRING_BASE). The guest's view (posted descriptors, used entries it consumed) is
    /// kept. `fe` is the new connection.
    pub fn reattach(&mut self, fe: Frontend, bases: &[u16]) {
        self.fe = fe;
        self.fe.set_owner().expect("SET_OWNER");
        let offered = self.fe.get_features().expect("GET_FEATURES");
        assert_eq!(
            offered & self.features,
            self.features,
            "the restarted backend offers what was negotiated before"
        );
        self.fe.set_features(self.features).expect("SET_FEATURES");
        let pf = self
            .fe
            .get_protocol_features()
            .expect("GET_PROTOCOL_FEATURES");
        self.fe
            .set_protocol_features(
                pf & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK),
            )
            .expect("SET_PROTOCOL_FEATURES");
        self.send_mem_table();
        assert_eq!(bases.len(), self.queues.len(), "one base per ring");
        for (q, &base) in bases.iter().enumerate() {
            self.restart_ring(q, base);
        }
    }

    /// The used index of queue `q` as it is in guest memory.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.r16(self.layout(q).used + 2)
    }

    /// The avail index of queue `q` as it is in guest memory.
    pub fn avail_idx(&self, q: usize) -> u16 {
        self.r16(self.layout(q).avail + 2)
    }

    /// Starts queue `q` again after a GET_VRING_BASE, from `base`, as QEMU does when it
    /// restarts a stopped device (or on the migration destination).
    pub fn restart_ring(&mut self, q: usize, base: u16) {
        let index = self.queues[q].index;
        let cfg = self.ring_config(self.layout(q), false);
        self.fe
            .set_vring_num(index, QUEUE_SIZE)
            .expect("SET_VRING_NUM");
        self.fe.set_vring_base(index, base).expect("SET_VRING_BASE");
        self.fe.set_vring_addr(index, &cfg).expect("SET_VRING_ADDR");
        self.fe
            .set_vring_kick(index, &self.queues[q].kick)
            .expect("SET_VRING_KICK");
        self.fe
            .set_vring_call(index, &self.queues[q].call)
            .expect("SET_VRING_CALL");
        self.fe
            .set_vring_enable(index, true)
            .expect("SET_VRING_ENABLE");
    }

    /// GET_VRING_BASE on queue `q` (stops the ring).
    pub fn get_vring_base(&mut self, q: usize) -> u16 {
        let index = self.queues[q].index;
        self.fe.get_vring_base(index).expect("GET_VRING_BASE") as u16
    }
}
