//! `vduse-net`: a VDUSE virtio-net device for the vDPA tests, looping every TX packet to RX.
//!
//! ```text
//! vduse-net --name NAME [--mac 52:54:00:00:00:01] [--mtu 1500] [--mq] [--queue-size 256]
//!           [--stats PATH] [--write-log PATH]
//! ```
//!
//! It creates the device and sets up its queues, then serves it until killed: `vdpa dev add
//! name NAME mgmtdev vduse` (run by the test) puts it on the vDPA bus, where vhost_vdpa makes
//! it `/dev/vhost-vdpa-N`. The rings live in the memory of whoever drives vhost-vdpa (vhost-relay
//! in the tests); VDUSE hands us each IOTLB region as the file backing that memory, which we
//! map, so the rings are served with rust-vmm's `virtio-queue` over a `GuestMemoryMmap` whose
//! guest addresses are the IOVAs.
//!
//! Counters (`fixture packets_tx=N packets_rx=N drops=N errors=N`) are printed on SIGUSR1 and
//! rewritten into `--stats PATH` a few times a second. With `--write-log PATH` every IOVA range
//! the device wrote (RX buffers, used ring entries and index) is appended as `iova len` lines
//! (hex IOVA, decimal length), so a test can check them against a dirty log.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guest_tools::vduse::{Request, VduseDevice, VduseError, VDUSE_ACCESS_RO, VDUSE_ACCESS_WO};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use test_support::features::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
const STATUS_DRIVER_OK: u8 = 4;
/// `struct virtio_net_hdr_v1` (VERSION_1 makes it 12 bytes whatever else is negotiated).
const NET_HDR_LEN: usize = 12;
/// Largest frame accepted from TX (64 KiB GSO frame plus header).
const MAX_FRAME: usize = 65_562;
/// Chains handled per wake-up before control messages are looked at again (the kernel gives
/// up on a message after 30 s and marks the device broken).
const BATCH: usize = 256;

static SIGUSR1: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    SIGUSR1.store(true, Ordering::Relaxed);
}

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

#[derive(Debug, thiserror::Error)]
enum FixtureError {
    #[error("usage: {0}\nvduse-net --name NAME [--mac MAC] [--mtu N] [--mq] [--queue-size N] [--stats PATH] [--write-log PATH]")]
    Usage(String),
    #[error(transparent)]
    Vduse(#[from] VduseError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping IOTLB region [{start:#x}, {last:#x}]: {detail}")]
    Map {
        start: u64,
        last: u64,
        detail: String,
    },
}

struct Args {
    name: String,
    mac: [u8; 6],
    mtu: u16,
    mq: bool,
    queue_size: u16,
    stats: Option<PathBuf>,
    write_log: Option<PathBuf>,
}

fn parse_args() -> Result<Args, FixtureError> {
    let mut a = Args {
        name: String::new(),
        mac: [0x52, 0x54, 0x00, 0x00, 0x00, 0x01],
        mtu: 1500,
        mq: false,
        queue_size: 256,
        stats: None,
        write_log: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| FixtureError::Usage(format!("{k} needs a value")))
        };
        match k.as_str() {
            "--name" => a.name = val()?,
            "--mac" => {
                let v = val()?;
                let bytes: Vec<u8> = v
                    .split(':')
                    .filter_map(|b| u8::from_str_radix(b, 16).ok())
                    .collect();
                a.mac = bytes
                    .try_into()
                    .map_err(|_| FixtureError::Usage(format!("bad MAC {v}")))?;
            }
            "--mtu" => {
                let v = val()?;
                a.mtu = v
                    .parse()
                    .map_err(|_| FixtureError::Usage(format!("bad MTU {v}")))?;
            }
            "--queue-size" => {
                let v = val()?;
                a.queue_size = v
                    .parse()
                    .ok()
                    .filter(|n: &u16| n.is_power_of_two())
                    .ok_or_else(|| FixtureError::Usage(format!("bad queue size {v}")))?;
            }
            "--mq" => a.mq = true,
            "--stats" => a.stats = Some(val()?.into()),
            "--write-log" => a.write_log = Some(val()?.into()),
            other => return Err(FixtureError::Usage(format!("unknown argument {other}"))),
        }
    }
    if a.name.is_empty() {
        return Err(FixtureError::Usage("--name is required".into()));
    }
    Ok(a)
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
struct Counters {
    packets_tx: u64,
    packets_rx: u64,
    drops: u64,
    errors: u64,
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fixture packets_tx={} packets_rx={} drops={} errors={}",
            self.packets_tx, self.packets_rx, self.drops, self.errors
        )
    }
}

/// A started virtqueue.
struct Vq {
    index: u32,
    queue: Queue,
    kick: EventFd,
}

struct Fixture {
    dev: VduseDevice,
    vq_num: u32,
    status: u8,
    /// `None` until DRIVER_OK, and again after every IOTLB change (fetched again lazily).
    mem: Option<GuestMemoryMmap>,
    vqs: Vec<Vq>,
    /// Next available index of each queue when it was last stopped (for GET_VQ_STATE).
    saved_avail: Vec<u16>,
    counters: Counters,
    write_log: Option<BufWriter<File>>,
    /// A queue is broken (bad ring address, unmapped buffer): stop serving it until reset.
    broken: Vec<u32>,
}

impl Fixture {
    fn log_write(&mut self, iova: u64, len: usize) {
        if let Some(w) = self.write_log.as_mut() {
            let _ = writeln!(w, "{iova:#x} {len}");
        }
    }

    fn handle(&mut self, req: Request) -> Result<(), FixtureError> {
        match req {
            Request::GetVqState { id, index } => {
                let avail = match self.vqs.iter().find(|v| v.index == index) {
                    Some(v) => v.queue.next_avail(),
                    None => match self.saved_avail.get(index as usize) {
                        Some(&a) => a,
                        None => self.dev.vq_info(index)?.avail_index,
                    },
                };
                self.dev.reply(id, true, Some((index, avail)))?;
            }
            Request::SetStatus { id, status } => {
                let was = self.status;
                self.status = status;
                let mut ok = true;
                if status == 0 {
                    self.stop();
                    self.saved_avail = vec![0; self.vq_num as usize];
                } else if status & STATUS_DRIVER_OK != 0 && was & STATUS_DRIVER_OK == 0 {
                    if let Err(e) = self.start() {
                        eprintln!("vduse-net: starting the device failed: {e}");
                        ok = false;
                    }
                }
                self.dev.reply(id, ok, None)?;
                eprintln!("vduse-net: status {was:#x} -> {status:#x}");
            }
            Request::UpdateIotlb { id, .. } => {
                self.mem = None;
                self.dev.reply(id, true, None)?;
            }
            Request::Unknown { id, kind } => {
                eprintln!("vduse-net: unknown request type {kind}");
                self.dev.reply(id, false, None)?;
            }
        }
        Ok(())
    }

    /// DRIVER_OK: take each ready queue's layout and state from the kernel and serve it.
    fn start(&mut self) -> Result<(), FixtureError> {
        self.stop();
        let features = self.dev.driver_features()?;
        eprintln!("vduse-net: driver features {features:#x}");
        self.broken.clear();
        for index in 0..self.vq_num {
            let info = self.dev.vq_info(index)?;
            if info.ready == 0 {
                continue;
            }
            let mut queue = Queue::new(info.num.try_into().unwrap_or(u16::MAX)).map_err(|e| {
                FixtureError::Usage(format!("queue {index} of size {}: {e:?}", info.num))
            })?;
            queue.set_size(info.num as u16);
            queue.set_desc_table_address(
                Some(info.desc_addr as u32),
                Some((info.desc_addr >> 32) as u32),
            );
            queue.set_avail_ring_address(
                Some(info.driver_addr as u32),
                Some((info.driver_addr >> 32) as u32),
            );
            queue.set_used_ring_address(
                Some(info.device_addr as u32),
                Some((info.device_addr >> 32) as u32),
            );
            queue.set_next_avail(info.avail_index);
            queue.set_next_used(info.avail_index);
            queue.set_ready(true);
            let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| FixtureError::Io {
                what: "eventfd".into(),
                source: e,
            })?;
            use std::os::fd::AsRawFd;
            self.dev.set_kickfd(index, kick.as_raw_fd())?;
            eprintln!(
                "vduse-net: queue {index} size {} desc {:#x} avail {:#x} used {:#x} base {}",
                info.num, info.desc_addr, info.driver_addr, info.device_addr, info.avail_index
            );
            self.vqs.push(Vq { index, queue, kick });
        }
        Ok(())
    }

    fn stop(&mut self) {
        for v in self.vqs.drain(..) {
            let _ = self.dev.set_kickfd(v.index, -1);
            if let Some(s) = self.saved_avail.get_mut(v.index as usize) {
                *s = v.queue.next_avail();
            }
        }
        self.mem = None;
    }

    /// Maps every IOTLB region (IOVA order) into one `GuestMemoryMmap`.
    fn map_iotlb(&self) -> Result<GuestMemoryMmap, FixtureError> {
        let mut regions = Vec::new();
        let mut start = 0u64;
        while let Some((e, file)) = self.dev.iotlb_fd(start, u64::MAX)? {
            let map_err = |detail: String| FixtureError::Map {
                start: e.start,
                last: e.last,
                detail,
            };
            let size = e
                .last
                .checked_sub(e.start)
                .and_then(|s| s.checked_add(1))
                .and_then(|s| usize::try_from(s).ok())
                .ok_or_else(|| map_err("bad range".into()))?;
            let prot = match e.perm {
                VDUSE_ACCESS_RO => libc::PROT_READ,
                VDUSE_ACCESS_WO => libc::PROT_WRITE,
                _ => libc::PROT_READ | libc::PROT_WRITE,
            };
            let region = MmapRegion::build(
                Some(FileOffset::new(file, e.offset)),
                size,
                prot,
                libc::MAP_SHARED,
            )
            .map_err(|err| map_err(format!("mmap: {err}")))?;
            let region = GuestRegionMmap::new(region, GuestAddress(e.start))
                .ok_or_else(|| map_err("region wraps".into()))?;
            regions.push(region);
            match e.last.checked_add(1) {
                Some(n) => start = n,
                None => break,
            }
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| FixtureError::Map {
            start: 0,
            last: u64::MAX,
            detail: format!("no usable IOTLB: {e}"),
        })
    }

    /// Loops TX (odd queues) to RX (the even queue of the same pair) while both have buffers.
    fn process(&mut self) -> Result<(), FixtureError> {
        if self.status & STATUS_DRIVER_OK == 0 || self.vqs.is_empty() {
            return Ok(());
        }
        if self.mem.is_none() {
            match self.map_iotlb() {
                Ok(m) => self.mem = Some(m),
                Err(e) => {
                    // Nothing mapped yet is normal between a reset and the new memory table.
                    eprintln!("vduse-net: {e}");
                    return Ok(());
                }
            }
        }
        let Some(mem) = self.mem.clone() else {
            return Ok(());
        };
        let pairs: Vec<(usize, usize)> = (0..self.vqs.len())
            .filter_map(|tx| {
                let txi = self.vqs[tx].index;
                if txi.is_multiple_of(2)
                    || self.broken.contains(&txi)
                    || self.broken.contains(&(txi - 1))
                {
                    return None;
                }
                let rx = self.vqs.iter().position(|v| v.index == txi - 1)?;
                Some((rx, tx))
            })
            .collect();
        for (rx, tx) in pairs {
            let mut moved = 0;
            let mut frame = Vec::with_capacity(2048);
            while moved < BATCH {
                // An RX buffer first: without one the TX packet stays queued (no loss).
                let Some(rx_chain) = self.vqs[rx].queue.pop_descriptor_chain(&mem) else {
                    break;
                };
                let Some(tx_chain) = self.vqs[tx].queue.pop_descriptor_chain(&mem) else {
                    self.vqs[rx].queue.go_to_previous_position();
                    break;
                };
                moved += 1;
                let (rx_head, tx_head) = (rx_chain.head_index(), tx_chain.head_index());
                frame.clear();
                let mut bad = false;
                for d in tx_chain {
                    if d.is_write_only() {
                        continue;
                    }
                    let n = (d.len() as usize).min(MAX_FRAME.saturating_sub(frame.len()));
                    let at = frame.len();
                    frame.resize(at + n, 0);
                    if mem.read_slice(&mut frame[at..], d.addr()).is_err() {
                        bad = true;
                        break;
                    }
                }
                let txi = self.vqs[tx].index;
                self.used(&mem, tx, tx_head, 0)?;
                if bad || frame.len() < NET_HDR_LEN {
                    self.counters.errors += 1;
                    eprintln!("vduse-net: queue {txi}: unreadable or short TX chain {tx_head}");
                    self.vqs[rx].queue.go_to_previous_position();
                    continue;
                }
                self.counters.packets_tx += 1;
                // A fresh header: no offloads, one buffer (num_buffers = 1).
                frame[..NET_HDR_LEN].fill(0);
                frame[10] = 1;
                let mut off = 0;
                for d in rx_chain {
                    if !d.is_write_only() || off == frame.len() {
                        continue;
                    }
                    let n = (d.len() as usize).min(frame.len() - off);
                    if mem.write_slice(&frame[off..off + n], d.addr()).is_err() {
                        bad = true;
                        break;
                    }
                    self.log_write(d.addr().0, n);
                    off += n;
                }
                if bad || off < frame.len() {
                    // Unwritable or too small: hand the buffer back empty, count the loss.
                    self.counters.drops += 1;
                    self.used(&mem, rx, rx_head, 0)?;
                } else {
                    self.counters.packets_rx += 1;
                    self.used(&mem, rx, rx_head, off as u32)?;
                }
            }
            for q in [rx, tx] {
                if self.vqs[q].queue.needs_notification(&mem).unwrap_or(true) {
                    self.dev.inject_irq(self.vqs[q].index)?;
                }
            }
        }
        if let Some(w) = self.write_log.as_mut() {
            let _ = w.flush();
        }
        Ok(())
    }

    /// Returns a chain to the driver, logging the used entry and index the device writes.
    fn used(
        &mut self,
        mem: &GuestMemoryMmap,
        q: usize,
        head: u16,
        len: u32,
    ) -> Result<(), FixtureError> {
        let (used, slot) = {
            let qq = &self.vqs[q].queue;
            (qq.used_ring(), qq.next_used() % qq.size().max(1))
        };
        if self.vqs[q].queue.add_used(mem, head, len).is_err() {
            let index = self.vqs[q].index;
            eprintln!("vduse-net: queue {index}: used ring at {used:#x} not writable; broken");
            self.broken.push(index);
            self.counters.errors += 1;
            return Ok(());
        }
        self.log_write(used + 4 + 8 * u64::from(slot), 8);
        self.log_write(used + 2, 2);
        Ok(())
    }
}

fn write_stats(path: &PathBuf, c: &Counters) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, format!("{c}\n")).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn run(args: Args) -> Result<(), FixtureError> {
    let pairs: u16 = if args.mq { 2 } else { 1 };
    let mut features = VIRTIO_F_VERSION_1
        | VIRTIO_F_ACCESS_PLATFORM
        | VIRTIO_NET_F_MAC
        | VIRTIO_NET_F_MTU
        | VIRTIO_NET_F_STATUS;
    if args.mq {
        features |= VIRTIO_NET_F_MQ;
    }
    // struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu (little endian).
    let mut config = [0u8; 12];
    config[..6].copy_from_slice(&args.mac);
    config[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
    config[8..10].copy_from_slice(&pairs.to_le_bytes());
    config[10..12].copy_from_slice(&args.mtu.to_le_bytes());
    let vq_num = 2 * u32::from(pairs);
    let dev = VduseDevice::create(
        &args.name,
        VIRTIO_ID_NET,
        features,
        vq_num,
        args.queue_size,
        config,
    )?;
    dev.set_nonblocking()?;
    let write_log = match &args.write_log {
        Some(p) => Some(BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| FixtureError::Io {
                    what: format!("opening {}", p.display()),
                    source: e,
                })?,
        )),
        None => None,
    };
    let mut fx = Fixture {
        dev,
        vq_num,
        status: 0,
        mem: None,
        vqs: Vec::new(),
        saved_avail: vec![0; vq_num as usize],
        counters: Counters::default(),
        write_log,
        broken: Vec::new(),
    };
    // SAFETY: the handlers only store to atomics.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
    }
    println!(
        "vduse-net: device {} ready ({} queues, features {features:#x})",
        args.name, vq_num
    );
    let _ = std::io::stdout().flush();
    let mut last_stats = Instant::now();
    let mut written = None;
    while !STOP.load(Ordering::Relaxed) {
        let mut fds = vec![libc::pollfd {
            fd: fx.dev.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        use std::os::fd::AsRawFd;
        for v in &fx.vqs {
            fds.push(libc::pollfd {
                fd: v.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(FixtureError::Io {
                    what: "poll".into(),
                    source: e,
                });
            }
        }
        for v in &fx.vqs {
            let _ = v.kick.read();
        }
        while let Some(req) = fx.dev.read_request()? {
            fx.handle(req)?;
        }
        fx.process()?;
        if SIGUSR1.swap(false, Ordering::Relaxed) {
            println!("{}", fx.counters);
            let _ = std::io::stdout().flush();
        }
        if let Some(p) = &args.stats {
            if last_stats.elapsed() > Duration::from_millis(200) && written != Some(fx.counters) {
                write_stats(p, &fx.counters);
                written = Some(fx.counters);
                last_stats = Instant::now();
            }
        }
    }
    fx.stop();
    println!("{}", fx.counters);
    Ok(())
}

fn main() -> ExitCode {
    match parse_args().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vduse-net: {e}");
            ExitCode::FAILURE
        }
    }
}
