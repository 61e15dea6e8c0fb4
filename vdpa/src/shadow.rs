//! Shadow virtqueues: while QEMU migrates the guest, the device works on rings in our memory
//! and we copy between them and the guest's, so every guest page the device writes can be
//! marked in the dirty log (kernel vhost-vdpa cannot log).
//!
//! Only the avail and used rings are shadowed. The device reads the guest's descriptor table
//! and buffers directly: IOVA = guest physical address, so a descriptor means the same to
//! the device whether it came through the guest's avail ring or ours, buffers need no copy,
//! and the heads we pass on are the guest's own. What the device writes into guest memory is
//! exactly the buffers of the chains it returns in our used ring; [`ShadowQueue::forward_used`]
//! marks them (the first `len` bytes of each chain's writable part, the used length) before
//! the guest can see the entry, and writes the guest's used ring through vm-memory, which
//! marks it too.
//!
//! Index bookkeeping: the shadow rings start at the index the device is started at (the
//! guest's used index at the switch), so `next_avail` is both the next guest avail entry to
//! forward and our avail index, and `next_used` both our next used entry to read and the
//! guest's used index. Split rings only (packed is not offered in vDPA mode).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU16, Ordering};

use migration::DirtyBitmap;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub type GuestMem = GuestMemoryMmap<DirtyBitmap>;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
const PAGE: u64 = 4096;
/// Most descriptors an indirect table can hold: `next` is a u16 (the same cap as the relay's
/// rings in backend/src/vring.rs).
const MAX_INDIRECT: u32 = u16::MAX as u32;

/// Guest physical addresses of one guest ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddr {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("queue {q}: guest memory at {addr:#x} is not accessible")]
    Memory { q: usize, addr: u64 },
    #[error("queue {q}: descriptor head {head} out of range (ring of {num})")]
    BadHead { q: usize, head: u32, num: u16 },
    #[error("queue {q}: descriptor chain from head {head} is malformed: {why}")]
    BadChain {
        q: usize,
        head: u32,
        why: &'static str,
    },
    #[error("queue {q}: guest avail index jumped from {from} to {to} (ring of {num})")]
    BadAvailIdx {
        q: usize,
        from: u16,
        to: u16,
        num: u16,
    },
    #[error("queue {q}: device used index jumped from {from} to {to} (ring of {num})")]
    BadUsedIdx {
        q: usize,
        from: u16,
        to: u16,
        num: u16,
    },
}

/// A shadow avail + used ring in shared memory of ours (a memfd, so kernel vhost-vdpa can
/// map it for a userspace device such as VDUSE, which needs a file behind every mapping).
pub struct ShadowMem {
    ptr: *mut u8,
    len: usize,
    _fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory; all access goes through volatile or atomic
// operations on in-bounds offsets.
unsafe impl Send for ShadowMem {}

impl ShadowMem {
    fn new(len: usize) -> io::Result<ShadowMem> {
        // SAFETY: a static C string and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vdpa-shadow-ring".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of the whole memfd; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ShadowMem {
            ptr: ptr.cast(),
            len,
            _fd: fd,
        })
    }

    pub fn va(&self) -> u64 {
        self.ptr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        assert!(
            off + 2 <= self.len && off.is_multiple_of(2),
            "shadow ring offset"
        );
        // SAFETY: in bounds and aligned (checked above); the mapping lives as long as self.
        unsafe { &*(self.ptr.add(off) as *const AtomicU16) }
    }

    fn read_u32(&self, off: usize) -> u32 {
        assert!(
            off + 4 <= self.len && off.is_multiple_of(4),
            "shadow ring offset"
        );
        // SAFETY: in bounds and aligned (checked above).
        unsafe { std::ptr::read_volatile(self.ptr.add(off) as *const u32) }
    }
}

impl Drop for ShadowMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `vring_need_event` of the virtio spec: whether moving an index from `old` to `new` passes
/// the other side's `event` index.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// What one [`ShadowQueue::forward_used`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UsedBatch {
    pub entries: u16,
    pub bytes: u64,
    /// The guest wants an interrupt for them.
    pub notify: bool,
}

/// One shadowed virtqueue.
pub struct ShadowQueue {
    pub q: usize,
    pub num: u16,
    pub guest: RingAddr,
    pub mem: ShadowMem,
    /// IOVA at which `mem` is mapped for the device.
    pub iova: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    used_off: usize,
}

impl ShadowQueue {
    /// Bytes of IOVA space one queue of `num` entries takes (a page multiple).
    pub fn iova_size(num: u16) -> u64 {
        let (_, total) = Self::layout(num);
        total as u64
    }

    fn layout(num: u16) -> (usize, usize) {
        let n = usize::from(num);
        let avail = 6 + 2 * n;
        let used_off = avail.div_ceil(PAGE as usize) * PAGE as usize;
        let used = 6 + 8 * n;
        (
            used_off,
            (used_off + used).div_ceil(PAGE as usize) * PAGE as usize,
        )
    }

    /// Shadow rings for queue `q` starting at index `start` (the base the device is given).
    pub fn new(
        q: usize,
        num: u16,
        guest: RingAddr,
        iova: u64,
        start: u16,
        event_idx: bool,
    ) -> io::Result<ShadowQueue> {
        if num == 0 || !num.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("queue {q}: ring size {num} is not a power of two"),
            ));
        }
        let (used_off, total) = Self::layout(num);
        let mem = ShadowMem::new(total)?;
        let sq = ShadowQueue {
            q,
            num,
            guest,
            mem,
            iova,
            next_avail: start,
            next_used: start,
            event_idx,
            used_off,
        };
        sq.mem.u16_at(2).store(start, Ordering::Release);
        sq.mem.u16_at(used_off + 2).store(start, Ordering::Release);
        Ok(sq)
    }

    pub fn avail_iova(&self) -> u64 {
        self.iova
    }

    pub fn used_iova(&self) -> u64 {
        self.iova + self.used_off as u64
    }

    fn mem_err(&self, addr: u64) -> RelayError {
        RelayError::Memory { q: self.q, addr }
    }

    /// `base + off` in guest memory: the frontend and guest choose `base`, so a sum past the
    /// end of the address space is an inaccessible address, not an overflow.
    fn gaddr(&self, base: u64, off: u64) -> Result<GuestAddress, RelayError> {
        base.checked_add(off)
            .map(GuestAddress)
            .ok_or_else(|| self.mem_err(base))
    }

    fn gload16(&self, mem: &GuestMem, base: u64, off: u64) -> Result<u16, RelayError> {
        let a = self.gaddr(base, off)?;
        mem.load::<u16>(a, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| self.mem_err(a.0))
    }

    fn gstore16(&self, mem: &GuestMem, base: u64, off: u64, v: u16) -> Result<(), RelayError> {
        let a = self.gaddr(base, off)?;
        mem.store(v.to_le(), a, Ordering::Release)
            .map_err(|_| self.mem_err(a.0))
    }

    /// Guest avail → shadow avail. Returns how many entries were passed on (kick the device
    /// if any).
    pub fn forward_avail(&mut self, mem: &GuestMem) -> Result<u16, RelayError> {
        let n = self.num;
        let mut moved = 0u16;
        loop {
            let idx = self.gload16(mem, self.guest.avail, 2)?;
            let pending = idx.wrapping_sub(self.next_avail);
            if pending > n {
                return Err(RelayError::BadAvailIdx {
                    q: self.q,
                    from: self.next_avail,
                    to: idx,
                    num: n,
                });
            }
            while self.next_avail != idx {
                let slot = u64::from(self.next_avail % n);
                let head = self.gload16(mem, self.guest.avail, 4 + 2 * slot)?;
                if head >= n {
                    return Err(RelayError::BadHead {
                        q: self.q,
                        head: head.into(),
                        num: n,
                    });
                }
                self.mem
                    .u16_at(4 + 2 * slot as usize)
                    .store(head, Ordering::Relaxed);
                self.next_avail = self.next_avail.wrapping_add(1);
                moved = moved.wrapping_add(1);
            }
            fence(Ordering::Release);
            self.mem.u16_at(2).store(self.next_avail, Ordering::Release);
            // Ask the device to call us for every used entry, and (event idx) the guest to
            // kick us for its next avail entry; then look again, in case the guest added one
            // before it could see that.
            self.mem
                .u16_at(4 + 2 * usize::from(n))
                .store(self.next_used, Ordering::Release);
            if self.event_idx {
                self.gstore16(mem, self.guest.used, 4 + 8 * u64::from(n), self.next_avail)?;
            }
            fence(Ordering::SeqCst);
            if self.gload16(mem, self.guest.avail, 2)? == self.next_avail {
                return Ok(moved);
            }
        }
    }

    /// Shadow used → guest used, marking in the dirty log what the device wrote.
    pub fn forward_used(&mut self, mem: &GuestMem) -> Result<UsedBatch, RelayError> {
        let n = self.num;
        let idx = self.mem.u16_at(self.used_off + 2).load(Ordering::Acquire);
        let pending = idx.wrapping_sub(self.next_used);
        if pending > n {
            return Err(RelayError::BadUsedIdx {
                q: self.q,
                from: self.next_used,
                to: idx,
                num: n,
            });
        }
        let old = self.next_used;
        let mut batch = UsedBatch::default();
        while self.next_used != idx {
            let slot = usize::from(self.next_used % n);
            let off = self.used_off + 4 + 8 * slot;
            let id = self.mem.read_u32(off);
            let len = self.mem.read_u32(off + 4);
            if id >= u32::from(n) {
                return Err(RelayError::BadHead {
                    q: self.q,
                    head: id,
                    num: n,
                });
            }
            self.mark_written(mem, id, len)?;
            let gslot = self.gaddr(self.guest.used, 4 + 8 * slot as u64)?;
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&id.to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            mem.write_slice(&elem, gslot)
                .map_err(|_| self.mem_err(gslot.0))?;
            self.next_used = self.next_used.wrapping_add(1);
            batch.entries += 1;
            batch.bytes += u64::from(len);
        }
        if batch.entries == 0 {
            return Ok(batch);
        }
        fence(Ordering::Release);
        self.gstore16(mem, self.guest.used, 2, self.next_used)?;
        fence(Ordering::SeqCst);
        batch.notify = if self.event_idx {
            let ev = self.gload16(mem, self.guest.avail, 4 + 2 * u64::from(n))?;
            need_event(ev, self.next_used, old)
        } else {
            self.gload16(mem, self.guest.avail, 0)? & VRING_AVAIL_F_NO_INTERRUPT == 0
        };
        // Keep the device calling us for the next entry.
        self.mem
            .u16_at(4 + 2 * usize::from(n))
            .store(self.next_used, Ordering::Release);
        Ok(batch)
    }

    /// Marks dirty the first `len` bytes of the writable part of the chain at `head`.
    ///
    /// The guest wrote the chain and may rewrite it at any time, so the walk is bounded like
    /// the relay's (backend/src/vring.rs): at most `num` descriptors of the ring's table, one
    /// indirect table of at most [`MAX_INDIRECT`] whole descriptors, and never more steps in
    /// a table than it has descriptors (more must revisit one: a loop). Every address sum is
    /// checked. A bad chain is an error, which stops this queue's relay.
    fn mark_written(&self, mem: &GuestMem, head: u32, len: u32) -> Result<(), RelayError> {
        let mut left = u64::from(len);
        if left == 0 {
            return Ok(());
        }
        let bad = |why| RelayError::BadChain {
            q: self.q,
            head,
            why,
        };
        let mut table = Table {
            addr: self.guest.desc,
            len: u32::from(self.num),
            indirect: false,
        };
        let mut i = head;
        let mut ttl = table.len;
        loop {
            if ttl == 0 {
                return Err(bad("loops"));
            }
            ttl -= 1;
            if i >= table.len {
                return Err(bad("next index out of range"));
            }
            let d = self.read_desc(mem, table.addr, i)?;
            if d.flags & VRING_DESC_F_INDIRECT != 0 {
                if table.indirect {
                    return Err(bad("nested indirect table"));
                }
                table = Table::indirect(&d).map_err(bad)?;
                (i, ttl) = (0, table.len);
                continue;
            }
            if d.flags & VRING_DESC_F_WRITE != 0 {
                let n = left.min(u64::from(d.len));
                mark_dirty(mem, d.addr, n);
                left -= n;
                if left == 0 {
                    return Ok(());
                }
            }
            if d.flags & VRING_DESC_F_NEXT == 0 {
                // The device claims more than the chain holds: what it could write is marked.
                return Ok(());
            }
            i = u32::from(d.next);
        }
    }

    /// Descriptor `i` of the table at `table` (bytewise: an indirect table may be unaligned).
    fn read_desc(&self, mem: &GuestMem, table: u64, i: u32) -> Result<Desc, RelayError> {
        let at = self.gaddr(table, 16 * u64::from(i))?;
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, at)
            .map_err(|_| self.mem_err(at.0))?;
        Ok(Desc {
            addr: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
            len: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
            flags: u16::from_le_bytes([raw[12], raw[13]]),
            next: u16::from_le_bytes([raw[14], raw[15]]),
        })
    }
}

/// One split-ring descriptor as read from guest memory.
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// The descriptor table a chain walk is in.
struct Table {
    addr: u64,
    /// Descriptors in it.
    len: u32,
    indirect: bool,
}

impl Table {
    /// The table an indirect descriptor points at, if it is a valid one.
    fn indirect(d: &Desc) -> Result<Table, &'static str> {
        if d.len == 0 || !d.len.is_multiple_of(16) {
            return Err("indirect table length is not a whole number of descriptors");
        }
        if d.len / 16 > MAX_INDIRECT {
            return Err("indirect table longer than 65535 descriptors");
        }
        if d.addr.checked_add(u64::from(d.len)).is_none() {
            return Err("indirect table runs past the end of the address space");
        }
        Ok(Table {
            addr: d.addr,
            len: d.len / 16,
            indirect: true,
        })
    }
}

/// Marks `[addr, addr+len)` of guest memory dirty (a no-op while logging is off).
pub fn mark_dirty(mem: &GuestMem, addr: u64, len: u64) {
    for s in mem.get_slices(GuestAddress(addr), len as usize).flatten() {
        s.bitmap().mark_dirty(0, s.len());
    }
}
