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
//! the guest can see the entry, and publishes the guest's used ring, marking it too.
//!
//! Every guest-side access is the relay's own ring code (the `virtq` crate): the guest's rings
//! are resolved and checked by `virtq::GuestRings`, chains walked by `virtq::Chain` (where each
//! descriptor is validated), pages marked by `virtq::GuestMap::mark_dirty`, the interrupt
//! decided by `virtq::wants_interrupt`. What is this module's own: the shadow rings in our
//! memory, which the device reads and writes (volatile accesses, `virtq::volatile`).
//!
//! Index bookkeeping: the shadow rings start at the index the device is started at (the
//! guest's used index at the switch), so `next_avail` is both the next guest avail entry to
//! forward and our avail index, and `next_used` both our next used entry to read and the
//! guest's used index. Split rings only (packed is not offered in vDPA mode).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};

use migration::DirtyBitmap;
use virtq::volatile::{load_acquire_u16, store_release_u16, store_u16};
use virtq::{wants_interrupt, Chain, GuestMap, GuestRings, RingError};
use vm_memory::GuestMemoryMmap;

pub use virtq::RingAddr;

pub type GuestMem = GuestMemoryMmap<DirtyBitmap>;

const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("queue {q}: guest ring: {source}")]
    Ring { q: usize, source: RingError },
    #[error("queue {q}: descriptor head {head} out of range (ring of {num})")]
    BadHead { q: usize, head: u32, num: u16 },
    #[error("queue {q}: descriptor chain from head {head} is malformed: {why}")]
    BadChain {
        q: usize,
        head: u32,
        why: &'static str,
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

// SAFETY: the mapping is plain shared memory; all access goes through volatile operations
// on in-bounds offsets.
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

    /// Host address of the `size`-byte ring field at `off`, which must be in bounds and
    /// aligned: offsets are ours (from [`ShadowQueue::layout`]), so a bad one is our bug.
    fn field(&self, off: usize, size: usize) -> *mut u8 {
        assert!(
            off.checked_add(size).is_some_and(|end| end <= self.len) && off.is_multiple_of(size),
            "shadow ring offset"
        );
        // In bounds (checked above) of the mapping, which lives as long as self.
        self.ptr.wrapping_add(off)
    }

    /// An index the device publishes (acquire).
    fn load_acquire_u16(&self, off: usize) -> u16 {
        // SAFETY: `field` checked bounds and alignment; the device writes these bytes
        // concurrently, hence a volatile load rather than a reference.
        unsafe { load_acquire_u16(self.field(off, 2)) }
    }

    /// An index the device reads (release: the entries before it first).
    fn store_release_u16(&self, off: usize, v: u16) {
        // SAFETY: as in `load_acquire_u16`.
        unsafe { store_release_u16(self.field(off, 2), v) }
    }

    /// An entry the next index store publishes.
    fn store_u16(&self, off: usize, v: u16) {
        // SAFETY: as in `load_acquire_u16`.
        unsafe { store_u16(self.field(off, 2), v) }
    }

    /// A little-endian used-entry field the device wrote.
    fn read_u32(&self, off: usize) -> u32 {
        // SAFETY: as in `load_acquire_u16`.
        u32::from_le(unsafe { std::ptr::read_volatile(self.field(off, 4) as *const u32) })
    }
}

impl Drop for ShadowMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
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
        sq.mem.store_release_u16(2, start);
        sq.mem.store_release_u16(used_off + 2, start);
        Ok(sq)
    }

    pub fn avail_iova(&self) -> u64 {
        self.iova
    }

    pub fn used_iova(&self) -> u64 {
        self.iova + self.used_off as u64
    }

    /// The guest's rings, resolved and checked by the relay's own ring code (virtq).
    fn guest_rings<'m>(&self, map: &GuestMap<'m, GuestMem>) -> Result<GuestRings<'m>, RelayError> {
        GuestRings::resolve(map, self.guest, self.num)
            .map_err(|source| RelayError::Ring { q: self.q, source })
    }

    /// Guest avail → shadow avail. Returns how many entries were passed on (kick the device
    /// if any).
    pub fn forward_avail(&mut self, mem: &GuestMem) -> Result<u16, RelayError> {
        let n = self.num;
        let map = GuestMap::new(mem);
        let guest = self.guest_rings(&map)?;
        let mut moved = 0u16;
        loop {
            let (idx, _) = guest
                .pending_avail(self.next_avail)
                .map_err(|source| RelayError::Ring { q: self.q, source })?;
            while self.next_avail != idx {
                let head = guest.avail_entry(self.next_avail);
                if head >= n {
                    return Err(RelayError::BadHead {
                        q: self.q,
                        head: head.into(),
                        num: n,
                    });
                }
                let slot = usize::from(self.next_avail & (n - 1));
                self.mem.store_u16(4 + 2 * slot, head);
                self.next_avail = self.next_avail.wrapping_add(1);
                moved = moved.wrapping_add(1);
            }
            self.mem.store_release_u16(2, self.next_avail);
            // Ask the device to call us for every used entry, and (event idx) the guest to
            // kick us for its next avail entry; then look again, in case the guest added one
            // before it could see that.
            self.mem
                .store_release_u16(4 + 2 * usize::from(n), self.next_used);
            if self.event_idx {
                guest.set_avail_event(&map, self.next_avail);
            }
            fence(Ordering::SeqCst);
            if guest.avail_idx() == self.next_avail {
                return Ok(moved);
            }
        }
    }

    /// Shadow used → guest used, marking in the dirty log what the device wrote.
    pub fn forward_used(&mut self, mem: &GuestMem) -> Result<UsedBatch, RelayError> {
        let n = self.num;
        let idx = self.mem.load_acquire_u16(self.used_off + 2);
        let pending = idx.wrapping_sub(self.next_used);
        if pending > n {
            return Err(RelayError::BadUsedIdx {
                q: self.q,
                from: self.next_used,
                to: idx,
                num: n,
            });
        }
        let mut batch = UsedBatch::default();
        if pending == 0 {
            return Ok(batch);
        }
        let map = GuestMap::new(mem);
        let guest = self.guest_rings(&map)?;
        let old = self.next_used;
        while self.next_used != idx {
            let slot = usize::from(self.next_used & (n - 1));
            let off = self.used_off + 4 + 8 * slot;
            let id = self.mem.read_u32(off);
            let len = self.mem.read_u32(off + 4);
            let head = u16::try_from(id).ok().filter(|&h| h < n);
            let Some(head) = head else {
                return Err(RelayError::BadHead {
                    q: self.q,
                    head: id,
                    num: n,
                });
            };
            self.mark_written(&map, &guest, head, len)?;
            guest.write_used(self.next_used, id, len);
            self.next_used = self.next_used.wrapping_add(1);
            batch.entries += 1;
            batch.bytes += u64::from(len);
        }
        guest.publish_used(&map, self.next_used);
        fence(Ordering::SeqCst);
        let suppression = guest.suppression(self.event_idx);
        batch.notify = wants_interrupt(self.event_idx, suppression, old, self.next_used);
        // Keep the device calling us for the next entry.
        self.mem
            .store_release_u16(4 + 2 * usize::from(n), self.next_used);
        Ok(batch)
    }

    /// Marks dirty the first `len` bytes of the writable part of the chain at `head`.
    ///
    /// The guest wrote the chain and may rewrite it at any time, so it is walked by the
    /// relay's chain walk (virtq's `Chain`, with all its checks); a chain that loops is an
    /// error here, as the device's used length cannot be trusted to end the walk. A bad chain
    /// is an error, which stops this queue's relay.
    fn mark_written(
        &self,
        map: &GuestMap<'_, GuestMem>,
        guest: &GuestRings<'_>,
        head: u16,
        len: u32,
    ) -> Result<(), RelayError> {
        let mut left = u64::from(len);
        if left == 0 {
            return Ok(());
        }
        let mut chain = Chain::new(guest.desc_table(), head);
        while let Some(d) = chain
            .next_desc(map)
            .map_err(|e| self.chain_error(head, e))?
        {
            if d.is_write_only() {
                let n = left.min(u64::from(d.len));
                // n <= d.len, a u32: fits a usize.
                map.mark_dirty(d.addr, n as usize);
                left -= n;
                if left == 0 {
                    return Ok(());
                }
            }
        }
        if chain.was_cut() {
            return Err(self.bad_chain(head, "loops"));
        }
        // The device claims more than the chain holds: what it could write is marked.
        Ok(())
    }

    fn bad_chain(&self, head: u16, why: &'static str) -> RelayError {
        RelayError::BadChain {
            q: self.q,
            head: head.into(),
            why,
        }
    }

    /// A chain walk's error as this queue's relay error.
    fn chain_error(&self, head: u16, e: RingError) -> RelayError {
        match e {
            RingError::DescIndex { .. } => self.bad_chain(head, "next index out of range"),
            RingError::Indirect { why, .. } => self.bad_chain(head, why),
            source => RelayError::Ring { q: self.q, source },
        }
    }
}
