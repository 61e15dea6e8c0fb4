//! Live migration, backend half: dirty-page logging through the vhost-user protocol.
//!
//! A Rust frontend negotiates LOG_ALL and LOG_SHMFD, hands the backend a memfd log with
//! SET_LOG_BASE and pushes packets through the loopback. The log must then hold exactly the
//! pages the backend wrote: the RX buffers' bytes it filled and the used rings; not the TX
//! buffers it only read, nor RX buffers it did not use. Logging must stop when LOG_ALL is
//! cleared, resume when it is set again, follow a new log base, and cover guest memory
//! mapped anew while logging.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::VhostBackend;

const T: Duration = Duration::from_secs(10);
/// Log for the 16 MiB test guest: 4096 pages, 512 bytes.
const LOG_SIZE: u64 = (MEM_SIZE as u64 / LOG_PAGE).div_ceil(8);

fn packet(i: u8, len: usize) -> Vec<u8> {
    (0..len).map(|j| i.wrapping_add(j as u8)).collect()
}

/// Backend in loopback mode with a frontend that acked LOG_SHMFD (LOG_ALL still off).
fn start(tag: &str) -> (Backend, TestFrontend) {
    let dir = temp_dir(tag);
    let be = Backend::start(&dir, &["--loopback"]);
    let mut f = TestFrontend::connect(&be.socket, 1, VIRTIO_RING_F_EVENT_IDX);
    let offered = f.fe.get_features().expect("GET_FEATURES");
    assert!(offered & VHOST_F_LOG_ALL != 0, "backend offers LOG_ALL");
    assert!(f.features & VHOST_F_LOG_ALL == 0);
    f.ack_protocol_features(VhostUserProtocolFeatures::LOG_SHMFD);
    (be, f)
}

/// Posts one RX buffer per `rx` entry, sends `sizes.len()` packets from TX buffers at
/// `tx_base`, and waits for all of them to come back. Buffers beyond `sizes.len()` stay
/// posted, so only the last round of a test may have them. Returns the guest pages the backend
/// must have written: the filled part of each used RX buffer, and both used rings.
fn traffic(
    f: &mut TestFrontend,
    rx: &[(u64, u32)],
    tx_base: u64,
    sizes: &[usize],
) -> BTreeSet<u64> {
    assert!(sizes.len() <= rx.len());
    let mut heads = Vec::new();
    for &(addr, len) in rx {
        heads.push((f.post(0, &[(addr, len, true)]), addr));
    }
    f.kick(0);
    for (i, &n) in sizes.iter().enumerate() {
        f.post_tx(1, tx_base + i as u64 * 0x1000, &packet(i as u8, n));
    }
    f.kick(1);
    assert_eq!(
        f.wait_used(1, sizes.len(), T).len(),
        sizes.len(),
        "TX buffers back"
    );
    let used = f.wait_used(0, sizes.len(), T);
    assert_eq!(used.len(), sizes.len(), "packets looped back");
    let mut want: BTreeSet<u64> = f.used_ring_pages(0).chain(f.used_ring_pages(1)).collect();
    for (head, len) in used {
        let addr = heads
            .iter()
            .find(|(h, _)| u32::from(*h) == head)
            .map(|(_, a)| *a)
            .expect("used head was posted");
        want.extend(pages_of(addr, u64::from(len)));
    }
    want
}

/// Waits until `log` holds at least `want` (the backend marks right after it writes, so
/// the last mark may trail the used index the test saw), then a little more, and returns
/// what it holds.
fn settled(log: &DirtyLogFd, want: &BTreeSet<u64>) -> BTreeSet<u64> {
    wait_for(T, || log.pages().is_superset(want));
    std::thread::sleep(Duration::from_millis(50));
    log.pages()
}

/// RX buffers for [`SIZES`], deliberately unaligned: one straddling a page boundary with a
/// packet long enough to cross it, one straddling with a packet too short to cross it, and
/// an aligned one.
fn rx_buffers(base: u64) -> Vec<(u64, u32)> {
    vec![
        (base + 0x0f00, 2048),
        (base + 0x2c00, 2048),
        (base + 0x4000, 2048),
    ]
}
const SIZES: [usize; 3] = [1500, 60, 200];

#[test]
fn exactly_the_written_pages_are_logged_while_log_all_is_on() {
    let (be, mut f) = start("dirty-on-off");
    let log = DirtyLogFd::new(LOG_SIZE);
    f.set_log_base(&log).expect("SET_LOG_BASE");

    // Before LOG_ALL (QEMU sends SET_LOG_BASE first): nothing is logged.
    traffic(&mut f, &rx_buffers(0x60_0000), 0x70_0000, &SIZES);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(log.pages(), BTreeSet::new(), "logged before LOG_ALL");

    f.migration_log(true);
    let want = traffic(&mut f, &rx_buffers(0x61_0000), 0x71_0000, &SIZES);
    // Spell out what that is, so the test does not just agree with itself.
    let expect: BTreeSet<u64> = [0x1, 0x11, 0x610, 0x611, 0x612, 0x614]
        .into_iter()
        .collect();
    assert_eq!(want, expect);
    assert_eq!(
        settled(&log, &want),
        want,
        "logged pages while LOG_ALL is on"
    );

    // A cancelled migration: LOG_ALL cleared. Nothing more is marked.
    f.migration_log(false);
    log.clear();
    traffic(&mut f, &rx_buffers(0x62_0000), 0x72_0000, &SIZES);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        log.pages(),
        BTreeSet::new(),
        "logged after LOG_ALL was cleared"
    );

    // On again with the same log. Two more RX buffers are posted that no packet uses:
    // the backend does not write them, so they are not marked.
    f.set_log_all(true);
    let mut rx = rx_buffers(0x63_0000);
    rx.extend([(0x63_8000, 2048), (0x63_a7f0, 2048)]);
    let want = traffic(&mut f, &rx, 0x73_0000, &SIZES);
    let expect: BTreeSet<u64> = [0x1, 0x11, 0x630, 0x631, 0x632, 0x634]
        .into_iter()
        .collect();
    assert_eq!(want, expect);
    assert_eq!(
        settled(&log, &want),
        want,
        "logged pages after LOG_ALL is set again"
    );
    assert!(be.log_text().contains("dirty page logging on"));
    assert!(be.log_text().contains("dirty page logging off"));
}

#[test]
fn a_new_log_base_and_a_new_memory_table_while_logging() {
    let (_be, mut f) = start("dirty-rebase");
    let first = DirtyLogFd::new(LOG_SIZE);
    f.set_log_base(&first).expect("SET_LOG_BASE");
    f.set_log_all(true);
    let want = traffic(&mut f, &rx_buffers(0x60_0000), 0x70_0000, &SIZES);
    assert_eq!(settled(&first, &want), want);

    // A second log (QEMU resizes the log this way): from its reply on, only it is marked.
    let second = DirtyLogFd::new(2 * LOG_SIZE);
    f.set_log_base(&second).expect("second SET_LOG_BASE");
    first.clear();
    let want = traffic(&mut f, &rx_buffers(0x61_0000), 0x71_0000, &SIZES);
    assert_eq!(settled(&second, &want), want, "the new log gets the marks");
    assert_eq!(
        first.pages(),
        BTreeSet::new(),
        "the replaced log is left alone"
    );

    // The memory table again, while logging: the backend maps new regions, which
    // vhost-user-backend would leave without a log. They must log too.
    f.resend_mem_table();
    second.clear();
    let want = traffic(&mut f, &rx_buffers(0x62_0000), 0x72_0000, &SIZES);
    let got = settled(&second, &want);
    assert!(
        got.is_superset(&want),
        "regions mapped while logging are logged: {got:x?}"
    );
    // Writes the workers made between the library publishing the new memory and telling
    // the device are marked by whole region; otherwise the log is exact.
    let whole: BTreeSet<u64> = (0..MEM_SIZE as u64 / LOG_PAGE).collect();
    assert!(got == want || got == whole, "{got:x?}");
}

#[test]
fn a_log_too_small_for_guest_memory_is_refused() {
    let (mut be, f) = start("dirty-small");
    // 8 bytes cover 64 pages (256 KiB) of the 16 MiB guest.
    let small = DirtyLogFd::new(8);
    assert!(
        f.set_log_base(&small).is_err(),
        "SET_LOG_BASE with a short log is refused"
    );
    assert!(
        wait_for(T, || be.log_text().contains(
            "dirty log too small for guest region 0x0+0x1000000: it needs at least 512 bytes"
        )),
        "{}",
        be.log_text()
    );
    assert!(be.is_running(), "the backend survives");
    drop(f);
    // The port serves the next frontend as usual.
    let mut f = TestFrontend::connect(&be.socket, 1, 0);
    let got = traffic(&mut f, &rx_buffers(0x60_0000), 0x70_0000, &SIZES);
    assert!(!got.is_empty());
    assert_eq!(
        small.pages(),
        BTreeSet::new(),
        "nothing written to the refused log"
    );
}
