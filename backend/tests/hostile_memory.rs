//! Frontends that describe memory the backend cannot safely map (issue 9): regions larger
//! than their files, a dirty log larger than its file, a region starting at an unaligned
//! guest address. Each used to kill the whole process (SIGBUS, or a debug-build abort on a
//! misaligned pointer); now the lying connection is dropped and the backend serves on.

mod support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::time::Duration;

use support::*;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

const T: Duration = Duration::from_secs(10);
/// A page-aligned address standing for where the hostile frontend "mapped" its memory.
const USER: u64 = 0x7f00_0000_0000;

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"hostile-mem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).expect("size memfd");
    file
}

/// A negotiated connection (one queue pair, VERSION_1) acking `protocol` on top of MQ and
/// REPLY_ACK, asking for a reply to every request: a refused one then fails where it was
/// sent (the connection closes instead of the ack).
fn hostile(be: &Backend, protocol: VhostUserProtocolFeatures) -> Frontend {
    let fe = Frontend::connect(&be.socket, 2).expect("connect");
    let fe = test_support::frontend::VuSession::negotiate_with(
        fe,
        1,
        0,
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK | protocol,
    )
    .expect("negotiate")
    .fe;
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

fn region(gpa: u64, size: u64, user: u64, file: &File) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: user,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }
}

/// SET_VRING_ADDR for rings of `QUEUE_SIZE` entries at offsets desc, avail, used from the
/// frontend address `user`.
fn rings(user: u64, desc: u64, avail: u64, used: u64) -> VringConfigData {
    VringConfigData {
        queue_max_size: QUEUE_SIZE,
        queue_size: QUEUE_SIZE,
        flags: 0,
        desc_table_addr: user + desc,
        used_ring_addr: user + used,
        avail_ring_addr: user + avail,
        log_addr: None,
    }
}

/// Ring setup with rings past the first 4 KiB: vhost-user-backend reads the used index at
/// SET_VRING_ADDR, the first touch of memory. Errors are ignored: after a refusal every
/// further request fails.
fn touch_rings(fe: &mut Frontend, cfg: &VringConfigData) {
    let _ = fe.set_vring_num(0, QUEUE_SIZE);
    let _ = fe.set_vring_addr(0, cfg);
    let _ = fe.get_features();
}

/// Asserts the backend is still alive a second after the hostile requests: a process
/// killed by a signal (SIGBUS, or the abort of a debug-build precondition on a misaligned
/// pointer) takes a moment to be reapable, and a worker may crash after the reply.
fn assert_alive(be: &mut Backend) {
    let died = wait_for(Duration::from_secs(1), || !be.is_running());
    assert!(!died, "the backend died; log:\n{}", be.log_text());
}

/// The backend logged why it refused, and serves a well-behaved frontend.
fn serves_on(be: &mut Backend, why: &str) {
    assert!(
        wait_for(T, || be.log_text().contains(why)),
        "no refusal saying {why:?} in the log:\n{}",
        be.log_text()
    );
    let mut f = TestFrontend::connect(&be.socket, 1, 0);
    let rx = TestFrontend::buf_addr(0, 0);
    f.post(0, &[(rx, 2048, true)]);
    f.kick(0);
    let packet: Vec<u8> = (0..80u8).collect();
    f.post_tx(1, TestFrontend::buf_addr(1, 0), &packet);
    f.kick(1);
    assert_eq!(f.wait_used(0, 1, T).len(), 1, "a good frontend is served");
    assert_eq!(f.read(rx + 12, packet.len()), packet);
}

#[test]
fn region_larger_than_file_is_refused() {
    let dir = temp_dir("hostile-region");
    let mut be = Backend::start(&dir, &["--loopback"]);
    let mut fe = hostile(&be, VhostUserProtocolFeatures::empty());
    let small = memfd(4096);
    let table = fe.set_mem_table(&[region(0, 16 << 20, USER, &small)]);
    touch_rings(&mut fe, &rings(USER, 0x1_0000, 0x1_1000, 0x1_2000));
    assert_alive(&mut be);
    assert!(
        table.is_err(),
        "SET_MEM_TABLE over a 4 KiB file was accepted"
    );
    serves_on(&mut be, "beyond the end of the file");
}

#[test]
fn added_region_larger_than_file_is_refused() {
    let dir = temp_dir("hostile-add-region");
    let mut be = Backend::start(&dir, &["--loopback"]);
    let mut fe = hostile(&be, VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
    let small = memfd(4096);
    let added = fe.add_mem_region(&region(0, 16 << 20, USER, &small));
    touch_rings(&mut fe, &rings(USER, 0x1_0000, 0x1_1000, 0x1_2000));
    assert_alive(&mut be);
    assert!(added.is_err(), "ADD_MEM_REG over a 4 KiB file was accepted");
    serves_on(&mut be, "beyond the end of the file");
}

#[test]
fn dirty_log_smaller_than_its_file_claims_is_refused() {
    let dir = temp_dir("hostile-log");
    let mut be = Backend::start(&dir, &["--loopback"]);
    let mut f = TestFrontend::connect(&be.socket, 1, 0);
    f.ack_protocol_features(VhostUserProtocolFeatures::LOG_SHMFD);
    // A 0-byte memfd claiming the 512 bytes a 16 MiB guest's log needs.
    let mut log = DirtyLogFd::new(0);
    log.size = 512;
    f.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let set = f.set_log_base(&log);
    // Logging on, one packet: its first dirty mark would land past the file's end.
    let _ = f.fe.set_features(f.features | VHOST_F_LOG_ALL);
    let _ = f.fe.get_features();
    let rx = TestFrontend::buf_addr(0, 0);
    f.post(0, &[(rx, 2048, true)]);
    f.kick(0);
    f.post_tx(1, TestFrontend::buf_addr(1, 0), &[0x5a; 60]);
    f.kick(1);
    assert_alive(&mut be);
    assert!(set.is_err(), "SET_LOG_BASE beyond its file was accepted");
    serves_on(&mut be, "SET_LOG_BASE log 0x200 at offset 0x0");
}

#[test]
fn unaligned_region_start_is_refused() {
    let dir = temp_dir("hostile-unaligned");
    let mut be = Backend::start(&dir, &["--loopback"]);
    let mut fe = hostile(&be, VhostUserProtocolFeatures::empty());
    // Guest address 2 (and frontend address USER + 2) at file offset 0: every aligned guest
    // address is 2 bytes off its host alignment. Rings at aligned guest (and frontend)
    // addresses D, A, U sit at file offsets D - 2, A - 2, U - 2.
    let size: u64 = 1 << 20;
    let mem = memfd(size);
    let table = fe.set_mem_table(&[region(2, size, USER + 2, &mem)]);
    let (desc, avail, used) = (0x1_0000u64, 0x1_2000u64, 0x1_3000u64);
    let at = |gpa: u64| gpa - 2;
    // TX (queue 1): one 72-byte buffer at guest 0x8_0000, made available.
    let mut d = 0x8_0000u64.to_le_bytes().to_vec();
    d.extend_from_slice(&72u32.to_le_bytes());
    d.extend_from_slice(&[0; 4]);
    mem.write_all_at(&d, at(desc)).expect("descriptor");
    mem.write_all_at(&[0, 0, 1, 0, 0, 0], at(avail))
        .expect("avail ring");
    let kicks: Vec<_> = (0..2)
        .map(|q| {
            // RX (queue 0) gets its own, empty rings further down.
            let shift = if q == 0 { 0x4_0000 } else { 0 };
            let cfg = rings(USER, desc + shift, avail + shift, used + shift);
            let _ = fe.set_vring_num(q, QUEUE_SIZE);
            let _ = fe.set_vring_addr(q, &cfg);
            let _ = fe.set_vring_base(q, 0);
            let kick = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
            let call = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
            let _ = fe.set_vring_call(q, &call);
            let _ = fe.set_vring_kick(q, &kick);
            let _ = fe.set_vring_enable(q, true);
            (kick, call)
        })
        .collect();
    // The backend completes the TX buffer through a used ring 2 bytes off its alignment.
    let _ = kicks[1].0.write(1);
    assert_alive(&mut be);
    assert!(
        table.is_err(),
        "SET_MEM_TABLE at guest address 2 was accepted"
    );
    serves_on(&mut be, "guest address not page-aligned");
}
