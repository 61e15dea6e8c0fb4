//! The guest side of split virtqueues, for test programs that play the virtio-net driver
//! without a guest: "guest memory" in a memfd (mapped shared, so a vhost-user backend or a
//! VDUSE device can map the same pages), rings laid out in it, descriptors posted, kicks sent
//! and used entries read back. Transport independent: `vu-frontend` hands the rings to
//! vhost-relay over vhost-user, `vdpa-probe` straight to `/dev/vhost-vdpa-N`.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Length of `struct virtio_net_hdr_v1` (VERSION_1).
pub const NET_HDR_LEN: usize = 12;

/// Errors of the test driver, with the address or queue involved.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("queue {queue}: {what}")]
    Queue { queue: usize, what: String },
    /// What a [`loopback_with`] hook failed at.
    #[error("{0}")]
    Hook(String),
}

fn os(what: impl Into<String>, source: std::io::Error) -> DriverError {
    DriverError::Os {
        what: what.into(),
        source,
    }
}

/// The driver's view of guest memory.
pub type Mem = GuestMemoryMmap<()>;

pub fn write(mem: &Mem, addr: u64, bytes: &[u8]) -> Result<(), DriverError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| DriverError::Memory(format!("write of {} at {addr:#x}: {e}", bytes.len())))
}

pub fn read(mem: &Mem, addr: u64, len: usize) -> Result<Vec<u8>, DriverError> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr))
        .map_err(|e| DriverError::Memory(format!("read of {len} at {addr:#x}: {e}")))?;
    Ok(v)
}

pub fn r16(mem: &Mem, addr: u64) -> Result<u16, DriverError> {
    let b = read(mem, addr, 2)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

pub fn w16(mem: &Mem, addr: u64, v: u16) -> Result<(), DriverError> {
    write(mem, addr, &v.to_le_bytes())
}

pub fn r32(mem: &Mem, addr: u64) -> Result<u32, DriverError> {
    let b = read(mem, addr, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// "Guest RAM": a memfd mapped shared at guest address 0.
#[derive(Debug)]
pub struct DriverMemory {
    pub memfd: File,
    pub mem: GuestMemoryMmap<()>,
    pub size: u64,
}

impl DriverMemory {
    pub fn new(size: usize) -> Result<Self, DriverError> {
        // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"test-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os("memfd_create", std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd
            .set_len(size as u64)
            .map_err(|e| os(format!("sizing the memfd to {size}"), e))?;
        let dup = memfd.try_clone().map_err(|e| os("dup memfd", e))?;
        let region = MmapRegion::from_file(FileOffset::new(dup, 0), size)
            .map_err(|e| DriverError::Memory(format!("mapping {size} bytes: {e}")))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| DriverError::Memory("region at 0 wraps".into()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        Ok(DriverMemory {
            memfd,
            mem,
            size: size as u64,
        })
    }

    /// Where guest address 0 is mapped in this process.
    pub fn host_base(&self) -> Result<u64, DriverError> {
        self.mem
            .get_host_address(GuestAddress(0))
            .map(|p| p as u64)
            .map_err(|e| DriverError::Memory(e.to_string()))
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), DriverError> {
        write(&self.mem, addr, bytes)
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, DriverError> {
        read(&self.mem, addr, len)
    }

    pub fn r16(&self, addr: u64) -> Result<u16, DriverError> {
        r16(&self.mem, addr)
    }

    pub fn w16(&self, addr: u64, v: u16) -> Result<(), DriverError> {
        w16(&self.mem, addr, v)
    }
}

/// Where a split ring's three parts sit (virtio 1.x alignment rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl RingLayout {
    /// A ring of `size` entries starting at `base` (16-byte aligned).
    pub fn at(base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let avail = base + 16 * n;
        // flags, idx, ring[n], used_event; the used ring is 4-byte aligned.
        let used = (avail + 6 + 2 * n + 3) & !3;
        RingLayout {
            desc: base,
            avail,
            used,
        }
    }

    /// Bytes from `desc` to the end of the used ring (with avail_event).
    pub fn span(&self, size: u16) -> u64 {
        self.used + 6 + 8 * u64::from(size) - self.desc
    }
}

/// One virtqueue as the guest driver sees it.
#[derive(Debug)]
pub struct DriverQueue {
    pub index: usize,
    pub size: u16,
    pub layout: RingLayout,
    pub kick: EventFd,
    pub call: EventFd,
    next_desc: u16,
    /// Used entries already consumed.
    pub used_seen: u16,
    /// Descriptors posted and not yet returned.
    pub in_flight: u16,
    /// Length of the chain posted at each head, to free the right number when it returns.
    chain_len: Vec<u16>,
}

impl DriverQueue {
    /// A zeroed ring of `size` entries at `base` in `mem`.
    pub fn new(mem: &Mem, index: usize, base: u64, size: u16) -> Result<Self, DriverError> {
        if size == 0 || !size.is_power_of_two() {
            return Err(DriverError::Queue {
                queue: index,
                what: format!("size {size} is not a power of two"),
            });
        }
        let layout = RingLayout::at(base, size);
        write(mem, base, &vec![0u8; layout.span(size) as usize])?;
        let ev = || EventFd::new(EFD_NONBLOCK).map_err(|e| os("eventfd", e));
        Ok(DriverQueue {
            index,
            size,
            layout,
            kick: ev()?,
            call: ev()?,
            next_desc: 0,
            used_seen: 0,
            in_flight: 0,
            chain_len: vec![0; usize::from(size)],
        })
    }

    /// Free descriptor slots (each posted chain here uses one descriptor per buffer).
    pub fn room(&self) -> u16 {
        self.size - self.in_flight
    }

    /// Posts a chain of (addr, len, device-writable) buffers; returns its head.
    pub fn post(&mut self, mem: &Mem, bufs: &[(u64, u32, bool)]) -> Result<u16, DriverError> {
        let n = u16::try_from(bufs.len()).unwrap_or(u16::MAX);
        if n == 0 || n > self.room() {
            return Err(DriverError::Queue {
                queue: self.index,
                what: format!("no room for {n} descriptors ({} in flight)", self.in_flight),
            });
        }
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let slot = (head + i as u16) % self.size;
            let next = if last { 0 } else { (slot + 1) % self.size };
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            mem.write_obj(d, GuestAddress(self.layout.desc + 16 * u64::from(slot)))
                .map_err(|e| DriverError::Memory(format!("descriptor {slot}: {e}")))?;
        }
        let l = self.layout;
        let idx = r16(mem, l.avail + 2)?;
        w16(mem, l.avail + 4 + 2 * u64::from(idx % self.size), head)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        w16(mem, l.avail + 2, idx.wrapping_add(1))?;
        self.next_desc = (head + n) % self.size;
        self.in_flight += n;
        self.chain_len[usize::from(head)] = n;
        Ok(head)
    }

    pub fn kick(&self) -> Result<(), DriverError> {
        self.kick
            .write(1)
            .map_err(|e| os(format!("kick of queue {}", self.index), e))
    }

    /// New used entries as (head, len), without waiting.
    pub fn take_used(&mut self, mem: &Mem) -> Result<Vec<(u32, u32)>, DriverError> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let idx = r16(mem, self.layout.used + 2)?;
        let have = idx.wrapping_sub(self.used_seen);
        if have > self.size {
            return Err(DriverError::Queue {
                queue: self.index,
                what: format!("used idx {idx} is {have} ahead of {}", self.used_seen),
            });
        }
        let mut out = Vec::with_capacity(usize::from(have));
        for _ in 0..have {
            let slot = self.used_seen % self.size;
            let at = self.layout.used + 4 + 8 * u64::from(slot);
            let (id, len) = (r32(mem, at)?, r32(mem, at + 4)?);
            let n = usize::try_from(id)
                .ok()
                .and_then(|i| self.chain_len.get_mut(i))
                .map(std::mem::take)
                .ok_or_else(|| DriverError::Queue {
                    queue: self.index,
                    what: format!("used entry {slot} names head {id}, beyond the ring"),
                })?;
            self.in_flight = self.in_flight.saturating_sub(n);
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        Ok(out)
    }

    /// Like [`DriverQueue::take_used`], waiting up to `timeout` until at least `n` arrived.
    pub fn wait_used(
        &mut self,
        mem: &Mem,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<(u32, u32)>, DriverError> {
        let start = Instant::now();
        let mut out = Vec::new();
        loop {
            out.extend(self.take_used(mem)?);
            if out.len() >= n || start.elapsed() > timeout {
                return Ok(out);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A test frame: broadcast destination, `src` MAC, an experimental EtherType (0x88b5) and
/// a payload carrying `seq` so each frame can be recognised when it comes back.
pub fn test_frame(src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len.max(64));
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(&seq.to_be_bytes());
    let mut x = seq;
    while f.len() < len.max(64) {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        f.push((x >> 16) as u8);
    }
    f
}

/// `seq` of a frame made by [`test_frame`].
pub fn frame_seq(f: &[u8]) -> Option<u32> {
    let b = f.get(14..18)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Buffer slot size for RX and TX buffers of [`loopback`].
pub const SLOT: u64 = 2048;

/// What [`loopback`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopbackReport {
    pub sent: u32,
    pub received: u32,
    /// Frames that came back with other bytes than were sent, or out of order.
    pub corrupt: u32,
}

/// Sends `count` test frames of `len` bytes on `tx` and expects each back, in order and intact,
/// on `rx` (a device that loops TX to RX, like the `vduse-net` fixture). RX buffers are one
/// `SLOT` each at `rx_bufs + head * SLOT`, TX buffers likewise at `tx_bufs`. Gives up after
/// `timeout` without progress; the report says how far it got.
#[allow(clippy::too_many_arguments)]
pub fn loopback(
    mem: &DriverMemory,
    rx: &mut DriverQueue,
    tx: &mut DriverQueue,
    rx_bufs: u64,
    tx_bufs: u64,
    mac: [u8; 6],
    count: u32,
    len: usize,
    timeout: Duration,
) -> Result<LoopbackReport, DriverError> {
    loopback_with(
        mem,
        rx,
        tx,
        (rx_bufs, tx_bufs),
        mac,
        count,
        len,
        timeout,
        &mut |_| Ok(false),
    )
}

/// [`loopback`] with a `hook` called on every round with the progress so far, for a test
/// that changes the backend under traffic (e.g. starts dirty logging). While it returns
/// true no new frame is sent, so the frames in flight drain.
#[allow(clippy::too_many_arguments)]
pub fn loopback_with(
    mem: &DriverMemory,
    rx: &mut DriverQueue,
    tx: &mut DriverQueue,
    (rx_bufs, tx_bufs): (u64, u64),
    mac: [u8; 6],
    count: u32,
    len: usize,
    timeout: Duration,
    hook: &mut dyn FnMut(&LoopbackReport) -> Result<bool, DriverError>,
) -> Result<LoopbackReport, DriverError> {
    let mut r = LoopbackReport::default();
    let mut last_progress = Instant::now();
    let mut prev = (0, 0);
    let hdr = [0u8; NET_HDR_LEN];
    while r.received < count {
        // Keep RX full.
        let mut rx_posted = false;
        while rx.room() > 0 {
            let slot = u64::from(rx.next_desc);
            rx.post(&mem.mem, &[(rx_bufs + slot * SLOT, SLOT as u32, true)])?;
            rx_posted = true;
        }
        if rx_posted {
            rx.kick()?;
        }
        // Send what fits, but never more than RX can take back.
        let hold = hook(&r)?;
        let mut tx_posted = false;
        while !hold && r.sent < count && tx.room() > 0 && r.sent - r.received < u32::from(rx.size) {
            let slot = u64::from(tx.next_desc);
            let addr = tx_bufs + slot * SLOT;
            let mut bytes = hdr.to_vec();
            bytes.extend_from_slice(&test_frame(mac, r.sent, len));
            mem.write(addr, &bytes)?;
            tx.post(&mem.mem, &[(addr, bytes.len() as u32, false)])?;
            r.sent += 1;
            tx_posted = true;
        }
        if tx_posted {
            tx.kick()?;
        }
        tx.take_used(&mem.mem)?;
        for (head, used_len) in rx.take_used(&mem.mem)? {
            let addr = rx_bufs + u64::from(head) * SLOT;
            let got = mem.read(addr, (used_len as usize).min(SLOT as usize))?;
            let want = test_frame(mac, r.received, len);
            if got.get(NET_HDR_LEN..) != Some(&want[..]) {
                r.corrupt += 1;
            }
            r.received += 1;
        }
        if (r.sent, r.received) != prev {
            prev = (r.sent, r.received);
            last_progress = Instant::now();
        } else if last_progress.elapsed() > timeout {
            break;
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_layout_follows_alignment_rules() {
        let l = RingLayout::at(0x1000, 256);
        assert_eq!(l.desc, 0x1000);
        assert_eq!(l.avail, 0x2000);
        assert_eq!(l.used, 0x2208);
        assert_eq!(l.span(256), 0x2208 + 6 + 2048 - 0x1000);
    }

    #[test]
    fn frames_carry_their_sequence_number() {
        let f = test_frame([2, 0, 0, 0, 0, 1], 77, 100);
        assert_eq!(f.len(), 100);
        assert_eq!(frame_seq(&f), Some(77));
        assert_ne!(test_frame([2; 6], 1, 64), test_frame([2; 6], 2, 64));
        assert_eq!(frame_seq(&[0u8; 10]), None);
    }

    #[test]
    fn posting_and_reading_used_entries() {
        let mem = DriverMemory::new(1 << 20).unwrap();
        let mut q = DriverQueue::new(&mem.mem, 0, 0, 8).unwrap();
        let h = q
            .post(&mem.mem, &[(0x8000, 100, true), (0x9000, 100, true)])
            .unwrap();
        assert_eq!(h, 0);
        assert_eq!(q.room(), 6);
        assert_eq!(mem.r16(q.layout.avail + 2).unwrap(), 1);
        // Play the device: one used entry for head 0, 42 bytes.
        mem.write(q.layout.used + 4, &[0, 0, 0, 0, 42, 0, 0, 0])
            .unwrap();
        mem.w16(q.layout.used + 2, 1).unwrap();
        assert_eq!(q.take_used(&mem.mem).unwrap(), vec![(0, 42)]);
        assert_eq!(q.room(), 8);
        assert!(q.post(&mem.mem, &[(0, 1, false); 9]).is_err());
        // A device naming a head outside the ring is an error, not a panic.
        q.post(&mem.mem, &[(0x8000, 1, false)]).unwrap();
        mem.write(q.layout.used + 12, &[99, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        mem.w16(q.layout.used + 2, 2).unwrap();
        assert!(q.take_used(&mem.mem).is_err());
        // So is one claiming more used entries than the ring holds.
        mem.w16(q.layout.used + 2, 100).unwrap();
        assert!(q.take_used(&mem.mem).is_err());
    }
}
