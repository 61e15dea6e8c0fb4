//! Per-connection limits and their isolation: a frontend over its limits, or a session that
//! cannot be set up because the process is short of fds, costs that connection only; the
//! port and the process's other ports go on serving.

mod support;

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use support::*;
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

const T: Duration = Duration::from_secs(10);

/// One vhost-relay serving two loopback ports from a config file; killed by PID on drop.
struct TwoPorts {
    child: Child,
    a: PathBuf,
    b: PathBuf,
    log: PathBuf,
}

impl TwoPorts {
    fn start(tag: &str) -> TwoPorts {
        let dir = temp_dir(tag);
        let cfg = dir.join("ports.toml");
        let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
        std::fs::write(
            &cfg,
            format!(
                "[[port]]\nsocket = \"{}\"\nloopback = true\n\n\
                 [[port]]\nsocket = \"{}\"\nloopback = true\n",
                a.display(),
                b.display()
            ),
        )
        .unwrap();
        let log = dir.join("vr.log");
        let child = spawn_backend(&["--config", cfg.to_str().unwrap()], &log, None);
        let ports = TwoPorts { child, a, b, log };
        // Both threads past their set-up (which opens and closes fds), so the process's fd
        // table stays as it is until a frontend comes.
        assert!(
            wait_for(T, || ports.log_text().matches("listening on").count() == 2),
            "both ports listen: {}",
            ports.log_text()
        );
        ports
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// The process's RLIMIT_NOFILE soft limit, set to `soft` (the hard one kept); returns
    /// the soft limit it had.
    fn set_fd_limit(&self, soft: u64) -> u64 {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit only reads/writes the local rlimit structs.
        let rc =
            unsafe { libc::prlimit(self.pid(), libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        // SAFETY: as above.
        let rc =
            unsafe { libc::prlimit(self.pid(), libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        old.rlim_cur
    }
}

impl Drop for TwoPorts {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-page region of the frontend's memfd, placed above its RAM at slot `i`.
fn extra_region(f: &TestFrontend, i: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: MEM_SIZE as u64 + i * 0x1000,
        memory_size: 0x1000,
        userspace_addr: 0x7f00_0000_0000 + i * 0x1000,
        mmap_offset: 0,
        mmap_handle: f.memfd.as_raw_fd(),
    }
}

#[test]
fn a_frontend_over_the_memory_slot_limit_is_dropped_and_costs_no_other_port() {
    let ports = TwoPorts::start("limits-slots");
    let mut fa = TestFrontend::connect_with(
        &ports.a,
        1,
        VIRTIO_NET_F_MRG_RXBUF,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    );
    let max = fa.fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS");
    // Each region waits for the backend's ack, so the backend holds it before the next.
    fa.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    // The memory table already holds one region: fill every other slot advertised.
    for i in 1..max {
        let r = extra_region(&fa, i);
        fa.fe
            .add_mem_region(&r)
            .unwrap_or_else(|e| panic!("region {i} of {max}: {e}"));
    }
    round_trip(&mut fa, 1);
    let r = extra_region(&fa, max);
    assert!(
        fa.fe.add_mem_region(&r).is_err(),
        "a region beyond the {max} advertised is refused"
    );
    assert!(
        fa.fe.get_features().is_err(),
        "and the connection is closed"
    );
    drop(fa);
    assert!(
        wait_for(T, || ports.log_text().contains("memory regions, over the")),
        "one line says why: {}",
        ports.log_text()
    );
    // Port B serves as ever, and so does port A for its next frontend.
    let mut fb = TestFrontend::connect(&ports.b, 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut fb, 2);
    let mut fa = TestFrontend::connect(&ports.a, 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut fa, 3);
}

/// Takes every fd from the process: nothing more can be opened, not even the socket of an
/// accepted connection. Returns the soft limit it had.
fn starve_of_fds(ports: &TwoPorts) -> u64 {
    ports.set_fd_limit(3)
}

/// Leaves the process one fd: the lowest free one, which the next `accept` takes, so the
/// session for that connection (epoll, eventfds, the shim's sockets) cannot be set up.
/// Returns the soft limit it had.
fn starve_but_one(ports: &TwoPorts) -> u64 {
    let open: std::collections::BTreeSet<u64> =
        std::fs::read_dir(format!("/proc/{}/fd", ports.pid()))
            .expect("the process's fds")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
    let lowest_free = (0..).find(|fd| !open.contains(fd)).expect("a free fd");
    ports.set_fd_limit(lowest_free + 1)
}

#[test]
fn a_session_that_cannot_be_set_up_costs_only_its_connection() {
    let ports = TwoPorts::start("limits-setup");
    let normal = starve_but_one(&ports);
    // The accept takes the last fd for this connection; setting up its session needs more
    // (epoll, eventfds, the shim's sockets) and fails.
    let mut victim = UnixStream::connect(&ports.b).expect("connect to port b");
    victim.set_read_timeout(Some(T)).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        victim
            .read(&mut byte)
            .expect("the failed session closes it"),
        0
    );
    ports.set_fd_limit(normal);
    // Resources are back: the same port serves its next frontend, the other port too.
    let mut fb = TestFrontend::connect(&ports.b, 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut fb, 1);
    let mut fa = TestFrontend::connect(&ports.a, 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut fa, 2);
    let text = ports.log_text();
    assert!(
        text.contains("Too many open files") && text.contains("connection closed"),
        "the failure is logged: {text}"
    );
}

#[test]
fn a_frontend_waiting_while_accept_runs_out_of_fds_is_served_later() {
    let ports = TwoPorts::start("limits-accept");
    let normal = starve_of_fds(&ports);
    let started = std::time::Instant::now();
    // No fd for either connection: accept fails, again and again, while both wait in the
    // backlog.
    let victim = UnixStream::connect(&ports.b).expect("connect to port b");
    let waiting = UnixStream::connect(&ports.b).expect("connect to port b (backlog)");
    assert!(
        wait_for(T, || ports.log_text().contains("accept failed")),
        "accept fails: {}",
        ports.log_text()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let starved = started.elapsed();
    ports.set_fd_limit(normal);
    drop(victim);
    let mut fb = TestFrontend::over_stream(waiting, 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut fb, 1);
    // Retried every 100 ms, but logged once a second at most (each second it spans).
    let lines = ports.log_text().matches("accept failed").count() as u64;
    assert!(
        lines <= starved.as_secs() + 2,
        "{lines} lines in {starved:?}: {}",
        ports.log_text()
    );
}

#[test]
fn an_early_enable_of_a_ring_the_port_lacks_drops_the_frontend() {
    let ports = TwoPorts::start("limits-rings");
    let mut s = UnixStream::connect(&ports.a).expect("connect to port a");
    s.set_read_timeout(Some(T)).unwrap();
    // SET_VRING_ENABLE of ring 2, with NEED_REPLY, before any SET_FEATURES: the port has
    // one queue pair, rings 0 and 1.
    let request = FrontendReq::SET_VRING_ENABLE as u32;
    let flags = 0x1 | VhostUserHeaderFlag::NEED_REPLY.bits();
    let mut m = Vec::new();
    for word in [request, flags, 8, 2, 1] {
        m.extend_from_slice(&word.to_le_bytes());
    }
    s.write_all(&m).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("closed, not left hanging");
    assert!(reply.is_empty(), "no ack for a ring it lacks: {reply:?}");
    assert!(
        wait_for(T, || ports.log_text().contains("for ring 2 of 2")),
        "one line says why: {}",
        ports.log_text()
    );
    let mut fa = TestFrontend::connect(&ports.a, 1, VIRTIO_NET_F_MRG_RXBUF);
    round_trip(&mut fa, 1);
}
