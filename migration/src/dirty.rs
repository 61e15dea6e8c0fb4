//! Dirty-page logging for vhost-user live migration.
//!
//! During migration the frontend hands the backend a shared-memory log (`SET_LOG_BASE`,
//! one bit per 4 KiB guest page, bit `gpa / 4096` of a byte array) and acks `VHOST_F_LOG_ALL`;
//! from then on every guest page the backend writes must be marked, or the destination gets
//! a stale copy of it. Guest memory is written only through vm-memory, which calls
//! [`Bitmap::mark_dirty`] on the written region's bitmap after every write; [`DirtyBitmap`]
//! is that bitmap.
//!
//! Layout:
//! - every guest memory region owns a [`DirtyBitmap`], i.e. an `Arc<RegionSlot>`. The slot's
//!   `current` pointer is the hot path: null while not logging (one load, no write, nothing
//!   shared is written), else an [`Attach`] saying which log and where this region starts;
//! - [`DirtyLog`] (one per device) is the control plane. It hears about `SET_LOG_BASE`
//!   (through [`BitmapReplace::replace`], called by vhost-user-backend, or
//!   [`DirtyLog::set_log_base`]), `SET_FEATURES` ([`DirtyLog::set_log_all`]) and memory table
//!   changes ([`DirtyLog::update_memory`]), and points every region's slot at the right log;
//! - an `Attach` that is replaced is freed only after a grace period ([`crate::grace`]): the
//!   writers that may still use it have left their read-side sections. That also means no
//!   mark lands in an old log after we have answered the `SET_LOG_BASE` that replaced it
//!   (QEMU syncs the old log right after our reply, then frees it).
//!
//! Every position written into the log is bounds-checked against what was validated for
//! the region: a log too small for the guest memory is refused, never written past.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use log::{debug, error, info, warn};
use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapReplace, MemRegionBitmap, MmapLogReg};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::file_area::{check_file_area, FileAreaError};
use crate::grace;

/// Guest bytes one log bit stands for (`VHOST_LOG_PAGE`).
pub const LOG_PAGE_SIZE: u64 = 0x1000;
/// Pages per log byte.
const PAGES_PER_BYTE: u64 = 8;

/// Why dirty logging cannot be set up as the frontend asked.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("{label}: dirty log too small for guest region {gpa:#x}+{len:#x}: it needs at least {needed} bytes{have}")]
    LogTooSmall {
        label: String,
        gpa: u64,
        len: u64,
        needed: u64,
        /// ", the log has N" when the size is known.
        have: String,
    },
    #[error(
        "{label}: guest region {gpa:#x}+{len:#x} is empty or ends beyond the 64-bit address space"
    )]
    BadRegion { label: String, gpa: u64, len: u64 },
    #[error("{label}: {count} guest region(s) have no dirty log (first {gpa:#x}+{len:#x}): writes there cannot be logged")]
    Unlogged {
        label: String,
        count: usize,
        gpa: u64,
        len: u64,
    },
    #[error("{label}: VHOST_F_LOG_ALL acked without a SET_LOG_BASE: nothing to log into")]
    NoLog { label: String },
    #[error("dirty log fd {fd}: size {size:#x} at offset {offset:#x} is unusable: {why}")]
    BadLogArea {
        fd: i32,
        offset: u64,
        size: u64,
        why: &'static str,
    },
    #[error("dirty log fd {fd}: cannot map {size:#x} bytes at offset {offset:#x}: {source}")]
    Map {
        fd: i32,
        offset: u64,
        size: u64,
        source: io::Error,
    },
}

/// Bytes of log that cover `[gpa, gpa + len)`, or None if the range is empty or overflows.
fn log_bytes_needed(gpa: u64, len: u64) -> Option<u64> {
    let last = gpa.checked_add(len.checked_sub(1)?)?;
    Some(last / LOG_PAGE_SIZE / PAGES_PER_BYTE + 1)
}

/// A log area this crate mapped itself (for frontends whose `SET_LOG_BASE` does not go
/// through vhost-user-backend's handler, and for tests). Its size is known, unlike the
/// handler's mapping.
pub struct LogMemory {
    addr: NonNull<AtomicU8>,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics; the pointer is owned
// by this value and unmapped once, in Drop.
unsafe impl Send for LogMemory {}
// SAFETY: as above, all access through `&AtomicU8`.
unsafe impl Sync for LogMemory {}

impl LogMemory {
    /// Maps `size` bytes of the log file at `offset`, as `SET_LOG_BASE` describes it.
    /// Refuses what [`check_file_area`] refuses: an empty area, an offset that is not
    /// page-aligned (mmap needs it), and an area beyond the end of the file or in something
    /// that is not a file (touching it could raise SIGBUS).
    pub fn map(fd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<LogMemory, DirtyLogError> {
        let raw = fd.as_raw_fd();
        let bad = |why| DirtyLogError::BadLogArea {
            fd: raw,
            offset,
            size,
            why,
        };
        let map_err = |source| DirtyLogError::Map {
            fd: raw,
            offset,
            size,
            source,
        };
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l <= isize::MAX as usize)
            .ok_or(bad("too large"))?;
        check_file_area(fd, offset, size).map_err(|e| match e {
            FileAreaError::Unusable(why) => bad(why),
            FileAreaError::Stat(e) => map_err(e),
        })?;
        let off = libc::off_t::try_from(offset).map_err(|_| bad("offset too large"))?;
        // SAFETY: a fresh shared mapping at an address the kernel picks (no MAP_FIXED), so no
        // existing memory is affected; the result is checked below.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(map_err(io::Error::last_os_error()));
        }
        let addr = NonNull::new(addr.cast::<AtomicU8>())
            .ok_or_else(|| map_err(io::Error::other("mmap returned null")))?;
        Ok(LogMemory { addr, len })
    }

    /// Size of the mapped log in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the log is empty (never: `map` refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for LogMemory {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`; no `Attach` refers to it any more
        // (they hold an `Arc<LogMemory>`).
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

impl fmt::Debug for LogMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogMemory({:p}, {} bytes)", self.addr, self.len)
    }
}

/// A log mapping, whoever made it.
#[derive(Clone)]
enum LogSource {
    /// Mapped by vhost-user-backend's `SET_LOG_BASE` handler. Its length is private to that
    /// crate; coverage is checked with that crate's own validator (`AtomicBitmapMmap::new`).
    Frontend(Arc<MmapLogReg>),
    /// Mapped by [`LogMemory::map`].
    Own(Arc<LogMemory>),
}

impl LogSource {
    fn same(&self, other: &LogSource) -> bool {
        match (self, other) {
            (LogSource::Frontend(a), LogSource::Frontend(b)) => Arc::ptr_eq(a, b),
            (LogSource::Own(a), LogSource::Own(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Checks that the log covers `region`; returns the bytes of log that are then known
    /// to exist from the log's start.
    fn check<R: GuestMemoryRegion>(&self, label: &str, region: &R) -> Result<u64, DirtyLogError> {
        let gpa = region.start_addr().raw_value();
        let len = region.len();
        let needed = log_bytes_needed(gpa, len).ok_or_else(|| DirtyLogError::BadRegion {
            label: label.to_string(),
            gpa,
            len,
        })?;
        let too_small = |have: String| DirtyLogError::LogTooSmall {
            label: label.to_string(),
            gpa,
            len,
            needed,
            have,
        };
        match self {
            LogSource::Own(m) => {
                if (m.len as u64) < needed {
                    return Err(too_small(format!(", the log has {}", m.len)));
                }
                Ok(m.len as u64)
            }
            LogSource::Frontend(m) => {
                <AtomicBitmapMmap as MemRegionBitmap>::new(region, Arc::clone(m))
                    .map_err(|_| too_small(String::new()))?;
                Ok(needed)
            }
        }
    }

    /// The log's first byte. Only called after `check` succeeded (so the log is not empty).
    fn base(&self) -> *const AtomicU8 {
        match self {
            // Index 0 exists: `check` saw the log cover at least one page's byte.
            LogSource::Frontend(m) => &m[0] as *const AtomicU8,
            LogSource::Own(m) => m.addr.as_ptr(),
        }
    }
}

/// One region's view of one log: what a writer needs to mark, in one allocation.
struct Attach {
    base: *const AtomicU8,
    /// Bytes of log known to exist from `base`: every write is checked against it.
    bytes: u64,
    /// Guest-physical start and length of the region.
    gpa: u64,
    len: u64,
    /// Keeps the mapping alive as long as this attachment exists.
    _log: LogSource,
}

impl Attach {
    /// `bytes` must come from `log.check(region)` for a region at `gpa` of `len`.
    fn new(log: LogSource, bytes: u64, gpa: u64, len: u64) -> Attach {
        Attach {
            base: log.base(),
            bytes,
            gpa,
            len,
            _log: log,
        }
    }

    /// Marks the pages holding region bytes `[offset, offset + len)`; bytes outside the
    /// region are ignored.
    fn mark(&self, offset: usize, len: usize) {
        let offset = offset as u64;
        if len == 0 || offset >= self.len {
            return;
        }
        let last = offset.saturating_add(len as u64 - 1).min(self.len - 1);
        // No overflow: `check` verified gpa + len - 1 fits.
        self.mark_pages(
            (self.gpa + offset) / LOG_PAGE_SIZE,
            (self.gpa + last) / LOG_PAGE_SIZE,
        );
    }

    /// Marks absolute pages `first..=last`, one `fetch_or` per log byte touched.
    fn mark_pages(&self, first: u64, last: u64) {
        let mut page = first;
        while page <= last {
            let byte = page / PAGES_PER_BYTE;
            let lo = page % PAGES_PER_BYTE;
            let hi = if last / PAGES_PER_BYTE == byte {
                last % PAGES_PER_BYTE
            } else {
                PAGES_PER_BYTE - 1
            };
            let mask = ((0xffu32 << lo) & (0xffu32 >> (7 - hi))) as u8;
            if let Some(cell) = self.byte(byte) {
                // Release: the guest data written before this mark is visible to a frontend
                // that sees the bit (it clears the log with an atomic exchange).
                cell.fetch_or(mask, Ordering::Release);
            }
            page = (byte + 1) * PAGES_PER_BYTE;
        }
    }

    fn byte(&self, index: u64) -> Option<&AtomicU8> {
        if index >= self.bytes {
            return None;
        }
        // SAFETY: `index < bytes`, and `bytes` bytes exist from `base` in a mapping kept
        // alive by `_log`; the bytes are only accessed atomically.
        Some(unsafe { &*self.base.add(index as usize) })
    }

    fn is_dirty(&self, offset: usize) -> bool {
        let offset = offset as u64;
        if offset >= self.len {
            return false;
        }
        let page = (self.gpa + offset) / LOG_PAGE_SIZE;
        self.byte(page / PAGES_PER_BYTE)
            .is_some_and(|b| b.load(Ordering::Relaxed) & (1 << (page % PAGES_PER_BYTE)) != 0)
    }

    fn mark_all(&self) {
        self.mark(0, usize::try_from(self.len).unwrap_or(usize::MAX));
    }
}

/// `current` of a region nobody has bound yet (its guest address is not known).
fn unbound() -> *mut Attach {
    NonNull::<Attach>::dangling().as_ptr()
}

/// The attachment behind `p`, if `p` is one.
///
/// # Safety
/// `p` must have been loaded from a slot's `current` inside a [`grace::read`] section that
/// is still open, or by the control plane holding the slot's `ctl` lock.
unsafe fn attached<'a>(p: *mut Attach) -> Option<&'a Attach> {
    if p.is_null() || p == unbound() {
        None
    } else {
        // SAFETY: per the contract, not freed before the section ends / while locked.
        Some(unsafe { &*p })
    }
}

/// Control-plane state of one region, behind the slot's mutex.
#[derive(Default)]
struct SlotCtl {
    owner: Option<Weak<Shared>>,
    gpa: u64,
    /// The log this region was checked against, and the bytes known to exist in it.
    validated: Option<(LogSource, u64)>,
}

/// One guest memory region's logging state; shared by its [`DirtyBitmap`] and the
/// [`DirtyLog`] that bound it.
struct RegionSlot {
    /// null: not logging; `unbound()`: not bound yet; else what to log into.
    current: AtomicPtr<Attach>,
    /// A write happened while unbound (see [`DirtyLog::update_memory`]).
    written_unbound: AtomicBool,
    len: usize,
    ctl: Mutex<SlotCtl>,
}

impl RegionSlot {
    fn new(len: usize) -> Self {
        RegionSlot {
            current: AtomicPtr::new(unbound()),
            written_unbound: AtomicBool::new(false),
            len,
            ctl: Mutex::new(SlotCtl::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotCtl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hot path: one relaxed load when not logging.
    #[inline]
    fn mark(&self, offset: usize, len: usize) {
        let p = self.current.load(Ordering::Relaxed);
        if p.is_null() {
            return;
        }
        self.mark_logging(p == unbound(), offset, len);
    }

    #[inline(never)]
    fn mark_logging(&self, unbound: bool, offset: usize, len: usize) {
        if unbound {
            // Dekker with `retarget`: either the load below sees the attachment it installs,
            // or it sees this flag and marks the whole region.
            self.written_unbound.store(true, Ordering::SeqCst);
        }
        grace::read(|| {
            let p = self.current.load(Ordering::SeqCst);
            // SAFETY: loaded inside the open section.
            if let Some(a) = unsafe { attached(p) } {
                a.mark(offset, len);
            }
        });
    }

    fn is_dirty(&self, offset: usize) -> bool {
        grace::read(|| {
            let p = self.current.load(Ordering::SeqCst);
            // SAFETY: loaded inside the open section.
            unsafe { attached(p) }.is_some_and(|a| a.is_dirty(offset))
        })
    }

    /// Points the writers at `log` (or at nothing) and returns what they used before, to
    /// be freed after a grace period. The caller holds `ctl` (passed as `sc`).
    fn retarget(&self, sc: &SlotCtl, on: bool, retired: &mut Retired) {
        let want = if on { sc.validated.as_ref() } else { None };
        let cur = self.current.load(Ordering::Relaxed);
        // SAFETY: only the control plane, holding `ctl`, replaces or frees `current`.
        let now = unsafe { attached(cur) };
        // An unbound slot always moves on (to null or an attachment): that is its binding.
        if cur != unbound() {
            let unchanged = match (now, want) {
                (Some(a), Some((log, _))) => a._log.same(log),
                (None, None) => true,
                _ => false,
            };
            if unchanged {
                return;
            }
        }
        let new = match want {
            Some((log, bytes)) => Box::into_raw(Box::new(Attach::new(
                log.clone(),
                *bytes,
                sc.gpa,
                self.len as u64,
            ))),
            None => ptr::null_mut(),
        };
        let old = self.current.swap(new, Ordering::SeqCst);
        if old == unbound() && self.written_unbound.load(Ordering::SeqCst) {
            // Written between its creation and now: we do not know where, so every page.
            // SAFETY: `new` was just made by us and is not freed while we hold `ctl`.
            if let Some(a) = unsafe { attached(new) } {
                debug!(
                    "region {:#x}+{:#x} written before it was bound: marking all of it",
                    a.gpa, a.len
                );
                a.mark_all();
            }
        }
        if !new.is_null() && (old.is_null() || old == unbound()) {
            retired.enabled = true;
        }
        if let Some(old) = NonNull::new(old).filter(|p| p.as_ptr() != unbound()) {
            retired.old.push(old);
        }
    }
}

impl Drop for RegionSlot {
    fn drop(&mut self) {
        let p = *self.current.get_mut();
        // SAFETY: nothing else refers to the slot any more, so no section can hold `p`.
        if unsafe { attached(p) }.is_some() {
            // SAFETY: made by Box::into_raw in `retarget` and not freed yet.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

/// Attachments taken out of service; freed after a grace period when this is dropped.
#[derive(Default)]
struct Retired {
    old: Vec<NonNull<Attach>>,
    /// Some region went from not logging to logging.
    enabled: bool,
}

impl Drop for Retired {
    fn drop(&mut self) {
        if self.enabled {
            grace::barrier_all_threads();
        }
        if self.old.is_empty() {
            return;
        }
        grace::synchronize();
        for p in self.old.drain(..) {
            // SAFETY: unpublished by a SeqCst swap before `synchronize`, which waited for
            // every section that could have loaded it; made by Box::into_raw.
            drop(unsafe { Box::from_raw(p.as_ptr()) });
        }
    }
}

/// The device-wide logging state.
struct Shared {
    label: String,
    ctl: Mutex<Control>,
}

#[derive(Default)]
struct Control {
    /// The latest log base, kept while LOG_ALL is off (a frontend may turn logging back on
    /// without sending a new one).
    log: Option<LogSource>,
    log_all: bool,
    /// Every region ever bound and still alive: removed regions may still be written by a
    /// worker holding an older memory snapshot, so they keep logging too.
    slots: Vec<Weak<RegionSlot>>,
    /// The regions of the latest memory table.
    current: Vec<Weak<RegionSlot>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Dirty-page logging for one vhost-user device: what the device tells about
/// `SET_FEATURES` and memory changes, and what vhost-user-backend tells (through
/// [`DirtyBitmap`]'s [`BitmapReplace`]) about `SET_LOG_BASE`.
///
/// Logging is on while `VHOST_F_LOG_ALL` is acked and a log base is set; every region of
/// guest memory, including regions added later, then logs into the latest log base.
#[derive(Clone)]
pub struct DirtyLog {
    shared: Arc<Shared>,
}

impl fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirtyLog({})", self.shared.label)
    }
}

impl DirtyLog {
    /// `label` names the device in messages (e.g. "port vm1").
    pub fn new(label: impl Into<String>) -> Self {
        DirtyLog {
            shared: Arc::new(Shared {
                label: label.into(),
                ctl: Mutex::new(Control::default()),
            }),
        }
    }

    /// Whether writes are being logged (LOG_ALL acked and a log base set).
    pub fn is_logging(&self) -> bool {
        let ctl = self.shared.lock();
        ctl.log_all && ctl.log.is_some()
    }

    /// `SET_FEATURES`: whether `VHOST_F_LOG_ALL` is acked. Turning it off stops all marking
    /// before this returns; turning it on starts it for every region. An error means some
    /// region of guest memory has no log to be marked in (it is also logged here, since
    /// `SET_FEATURES` cannot fail in vhost-user-backend).
    pub fn set_log_all(&self, on: bool) -> Result<(), DirtyLogError> {
        let mut retired = Retired::default();
        let mut ctl = self.shared.lock();
        let was = ctl.log_all;
        ctl.log_all = on;
        prune(&mut ctl.slots);
        for slot in ctl.slots.iter().filter_map(Weak::upgrade) {
            let sc = slot.lock();
            slot.retarget(&sc, on, &mut retired);
        }
        let label = &self.shared.label;
        if was != on {
            info!(
                "{label}: dirty page logging {}",
                if on { "on" } else { "off" }
            );
        }
        if !on {
            return Ok(());
        }
        if ctl.log.is_none() {
            let e = DirtyLogError::NoLog {
                label: label.clone(),
            };
            error!("{e}");
            return Err(e);
        }
        let unlogged: Vec<(u64, u64)> = ctl
            .current
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|s| {
                let sc = s.lock();
                sc.validated.is_none().then_some((sc.gpa, s.len as u64))
            })
            .collect();
        if let Some(&(gpa, len)) = unlogged.first() {
            let e = DirtyLogError::Unlogged {
                label: label.clone(),
                count: unlogged.len(),
                gpa,
                len,
            };
            error!("{e}");
            return Err(e);
        }
        Ok(())
    }

    /// After a memory table change (`SET_MEM_TABLE`, `ADD_MEM_REG`, `REM_MEM_REG`): binds
    /// every region of `mem` to this device, checks the current log covers it, and starts
    /// logging into it if logging is on.
    ///
    /// vhost-user-backend publishes the new memory to the workers *before* telling the
    /// device, so a new region may be written before it is bound here; such a region is
    /// marked dirty as a whole when bound (rare, and over-marking is harmless).
    ///
    /// Fails if logging is on and the log does not cover a region (the frontend must grow
    /// the log before the table, as QEMU does); that region stays unlogged.
    pub fn update_memory(&self, mem: &GuestMemoryMmap<DirtyBitmap>) -> Result<(), DirtyLogError> {
        let mut retired = Retired::default();
        let mut ctl = self.shared.lock();
        let ctl = &mut *ctl;
        let label = &self.shared.label;
        let mut first_err = None;
        ctl.current.clear();
        for region in mem.iter() {
            let slot = &region_bitmap(region).slot;
            let mut sc = slot.lock();
            if !self.bind(ctl, slot, &mut sc, region.start_addr().raw_value()) {
                continue;
            }
            if let Some(log) = &ctl.log {
                if !sc.validated.as_ref().is_some_and(|(v, _)| v.same(log)) {
                    match log.check(label, region) {
                        Ok(bytes) => sc.validated = Some((log.clone(), bytes)),
                        Err(e) => {
                            sc.validated = None;
                            if ctl.log_all {
                                error!("{e}");
                                first_err.get_or_insert(e);
                            } else {
                                info!("{e}; a new SET_LOG_BASE is needed before logging");
                            }
                        }
                    }
                }
            }
            slot.retarget(&sc, ctl.log_all, &mut retired);
            ctl.current.push(Arc::downgrade(slot));
        }
        prune(&mut ctl.slots);
        debug!(
            "{label}: memory table with {} region(s), {} tracked",
            ctl.current.len(),
            ctl.slots.len()
        );
        first_err.map_or(Ok(()), Err)
    }

    /// `SET_LOG_BASE` with a log mapped by [`LogMemory::map`]: checked against every region
    /// of `mem` first (all or nothing), then installed. Regions of `mem` not bound yet are
    /// bound.
    pub fn set_log_base(
        &self,
        mem: &GuestMemoryMmap<DirtyBitmap>,
        log: LogMemory,
    ) -> Result<(), DirtyLogError> {
        let log = LogSource::Own(Arc::new(log));
        let label = &self.shared.label;
        let checked = mem
            .iter()
            .map(|r| log.check(label, r).map(|bytes| (r, bytes)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut retired = Retired::default();
        let mut ctl = self.shared.lock();
        let ctl = &mut *ctl;
        ctl.log = Some(log.clone());
        ctl.current.clear();
        for (region, bytes) in checked {
            let slot = &region_bitmap(region).slot;
            let mut sc = slot.lock();
            if !self.bind(ctl, slot, &mut sc, region.start_addr().raw_value()) {
                continue;
            }
            sc.validated = Some((log.clone(), bytes));
            slot.retarget(&sc, ctl.log_all, &mut retired);
            ctl.current.push(Arc::downgrade(slot));
        }
        info!("{label}: dirty log base set ({} bytes)", log_len(&log));
        Ok(())
    }

    /// The handler's `SET_LOG_BASE`, one region at a time (see [`DirtyBitmap::replace`]).
    fn install(&self, slot: &RegionSlot, att: LogAttachment) {
        let mut retired = Retired::default();
        let mut ctl = self.shared.lock();
        if !ctl.log.as_ref().is_some_and(|l| l.same(&att.log)) {
            info!("{}: dirty log base set", self.shared.label);
            ctl.log = Some(att.log.clone());
        }
        let mut sc = slot.lock();
        if sc.gpa != att.gpa || slot.len as u64 != att.len {
            warn!(
                "{}: log checked for region {:#x}+{:#x} given to region {:#x}+{:#x}; ignored",
                self.shared.label, att.gpa, att.len, sc.gpa, slot.len
            );
            return;
        }
        sc.validated = Some((att.log, att.bytes));
        slot.retarget(&sc, ctl.log_all, &mut retired);
    }

    /// Makes `slot` ours if nobody's yet; false if it belongs to another device.
    fn bind(&self, ctl: &mut Control, slot: &Arc<RegionSlot>, sc: &mut SlotCtl, gpa: u64) -> bool {
        match sc.owner.as_ref().map(Weak::as_ptr) {
            Some(p) if ptr::eq(p, Arc::as_ptr(&self.shared)) => true,
            Some(_) => {
                warn!(
                    "{}: region {gpa:#x} belongs to another device; not logged here",
                    self.shared.label
                );
                false
            }
            None => {
                sc.owner = Some(Arc::downgrade(&self.shared));
                sc.gpa = gpa;
                ctl.slots.push(Arc::downgrade(slot));
                true
            }
        }
    }
}

/// The region's own bitmap (the trait's `bitmap()` gives a slice of it).
fn region_bitmap(region: &vm_memory::GuestRegionMmap<DirtyBitmap>) -> &DirtyBitmap {
    vm_memory::MmapRegion::bitmap(region)
}

fn prune(slots: &mut Vec<Weak<RegionSlot>>) {
    slots.retain(|w| w.strong_count() > 0);
}

fn log_len(log: &LogSource) -> String {
    match log {
        LogSource::Own(m) => m.len.to_string(),
        LogSource::Frontend(_) => "?".into(),
    }
}

/// The dirty bitmap of one guest memory region: use it as `VhostUserBackend::Bitmap`.
///
/// Cloning shares the region's state; slices borrow it (no reference counting on the
/// write path).
#[derive(Clone)]
pub struct DirtyBitmap {
    slot: Arc<RegionSlot>,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirtyBitmap({} bytes)", self.slot.len)
    }
}

impl Default for DirtyBitmap {
    fn default() -> Self {
        Self::with_len(0)
    }
}

impl NewBitmap for DirtyBitmap {
    fn with_len(len: usize) -> Self {
        DirtyBitmap {
            slot: Arc::new(RegionSlot::new(len)),
        }
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = DirtyBitmapSlice<'a>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.slot.mark(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.slot.is_dirty(offset)
    }

    fn slice_at(&self, offset: usize) -> DirtyBitmapSlice<'_> {
        DirtyBitmapSlice {
            slot: &self.slot,
            offset,
        }
    }
}

impl BitmapReplace for DirtyBitmap {
    type InnerBitmap = LogAttachment;

    /// vhost-user-backend's `SET_LOG_BASE`: called for each region of the current memory
    /// with a log already checked to cover it.
    fn replace(&self, att: LogAttachment) {
        let owner = self.slot.lock().owner.as_ref().and_then(Weak::upgrade);
        match owner {
            Some(shared) => DirtyLog { shared }.install(&self.slot, att),
            None => error!(
                "dirty log for region {:#x}+{:#x}, which no device has bound: it is not logged",
                att.gpa, att.len
            ),
        }
    }
}

/// A part of a region's bitmap starting at `offset` into the region.
#[derive(Clone, Copy)]
pub struct DirtyBitmapSlice<'a> {
    slot: &'a RegionSlot,
    offset: usize,
}

impl fmt::Debug for DirtyBitmapSlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirtyBitmapSlice(+{:#x})", self.offset)
    }
}

impl<'a> WithBitmapSlice<'_> for DirtyBitmapSlice<'a> {
    type S = DirtyBitmapSlice<'a>;
}

impl BitmapSlice for DirtyBitmapSlice<'_> {}

impl<'a> Bitmap for DirtyBitmapSlice<'a> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        // An offset that overflows is past any region: `Attach::mark` ignores it.
        self.slot.mark(self.offset.saturating_add(offset), len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.slot.is_dirty(self.offset.saturating_add(offset))
    }

    fn slice_at(&self, offset: usize) -> DirtyBitmapSlice<'a> {
        DirtyBitmapSlice {
            slot: self.slot,
            offset: self.offset.saturating_add(offset),
        }
    }
}

/// A log checked to cover one region: what vhost-user-backend's `SET_LOG_BASE` handler
/// builds for each region before handing it to [`DirtyBitmap::replace`].
pub struct LogAttachment {
    log: LogSource,
    bytes: u64,
    gpa: u64,
    len: u64,
}

impl MemRegionBitmap for LogAttachment {
    /// Refuses (and so fails the whole `SET_LOG_BASE`, before any region switches) a log
    /// that does not cover the region.
    fn new<R: GuestMemoryRegion>(region: &R, logmem: Arc<MmapLogReg>) -> io::Result<Self> {
        let log = LogSource::Frontend(logmem);
        let bytes = log.check("SET_LOG_BASE", region).map_err(|e| {
            error!("{e}");
            io::Error::new(io::ErrorKind::InvalidInput, e)
        })?;
        Ok(LogAttachment {
            log,
            bytes,
            gpa: region.start_addr().raw_value(),
            len: region.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::fs::File;
    use std::os::fd::{AsFd, FromRawFd};
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress, VolatileMemory};

    type Mem = GuestMemoryMmap<DirtyBitmap>;

    /// A log as a frontend makes it: a memfd of `size` bytes.
    struct TestLog {
        file: File,
        size: u64,
    }

    impl TestLog {
        fn new(size: u64) -> TestLog {
            // SAFETY: memfd_create with a valid C string; the fd is owned by the File.
            let fd = unsafe { libc::memfd_create(c"test-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: fresh fd owned by nobody else.
            let file = unsafe { File::from_raw_fd(fd) };
            file.set_len(size).unwrap();
            TestLog { file, size }
        }

        /// Just big enough for guest addresses below `top`.
        fn covering(top: u64) -> TestLog {
            Self::new(log_bytes_needed(0, top).unwrap())
        }

        fn map(&self) -> LogMemory {
            LogMemory::map(self.file.as_fd(), 0, self.size).unwrap()
        }

        /// Marked pages, read through the file (not our mapping).
        fn pages(&self) -> BTreeSet<u64> {
            let mut out = BTreeSet::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut at = 0u64;
            while at < self.size {
                let n = (self.size - at).min(buf.len() as u64) as usize;
                self.file.read_exact_at(&mut buf[..n], at).unwrap();
                for (i, b) in buf[..n].iter().enumerate().filter(|(_, b)| **b != 0) {
                    for bit in 0..8 {
                        if b & (1 << bit) != 0 {
                            out.insert((at + i as u64) * 8 + bit);
                        }
                    }
                }
                at += n as u64;
            }
            out
        }

        fn clear(&self) {
            let zero = vec![0u8; self.size as usize];
            self.file.write_all_at(&zero, 0).unwrap();
        }
    }

    fn pages(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    fn memory(ranges: &[(u64, usize)]) -> Mem {
        let r: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        GuestMemoryMmap::from_ranges(&r).unwrap()
    }

    /// A device with `mem` bound, `log` set and LOG_ALL on.
    fn logging(mem: &Mem, log: &TestLog) -> DirtyLog {
        let d = DirtyLog::new("test");
        d.update_memory(mem).unwrap();
        d.set_log_base(mem, log.map()).unwrap();
        d.set_log_all(true).unwrap();
        assert!(d.is_logging());
        d
    }

    const MIB: usize = 1 << 20;

    #[test]
    fn byte_write_marks_its_page_only() {
        let mem = memory(&[(0, MIB)]);
        let log = TestLog::covering(MIB as u64);
        let _d = logging(&mem, &log);
        mem.write_obj(0xaau8, GuestAddress(0x5123)).unwrap();
        assert_eq!(log.pages(), pages(&[5]));
    }

    #[test]
    fn unaligned_write_spanning_pages_and_log_bytes() {
        let mem = memory(&[(0, MIB)]);
        let log = TestLog::covering(MIB as u64);
        let _d = logging(&mem, &log);
        // 0x7ffe..0x8001: the last page of log byte 0 and the first of log byte 1.
        mem.write_slice(&[1; 4], GuestAddress(0x7ffe)).unwrap();
        assert_eq!(log.pages(), pages(&[7, 8]));
        log.clear();
        // 10 pages from the middle of page 3: pages 3..=13.
        mem.write_slice(&vec![2; 10 * 4096], GuestAddress(0x3800))
            .unwrap();
        assert_eq!(log.pages(), (3..=13).collect());
        log.clear();
        // Exactly one page, aligned: that page only.
        mem.write_slice(&[3; 4096], GuestAddress(0x20000)).unwrap();
        assert_eq!(log.pages(), pages(&[0x20]));
    }

    #[test]
    fn every_vm_memory_write_path_marks() {
        let mem = memory(&[(0, MIB)]);
        let log = TestLog::covering(MIB as u64);
        let _d = logging(&mem, &log);
        // Atomic store (virtio-queue's used idx, flags, avail_event).
        mem.store(7u16, GuestAddress(0x1002), Ordering::Release)
            .unwrap();
        // write_obj (used elements, num_buffers).
        mem.write_obj(0x1234_5678u64, GuestAddress(0x2ffc)).unwrap();
        // A slice and copy_from (the RX fast path).
        mem.get_slice(GuestAddress(0x5ff0), 0x20)
            .unwrap()
            .copy_from(&[9u8; 0x20]);
        // A sub-slice of a slice.
        let s = mem.get_slice(GuestAddress(0x8000), 0x3000).unwrap();
        s.subslice(0x2000, 0x10).unwrap().copy_from(&[1u8; 0x10]);
        // Volatile writes through a ref.
        s.get_ref::<u32>(0x10).unwrap().store(5);
        assert_eq!(log.pages(), pages(&[1, 2, 3, 5, 6, 8, 10]));
    }

    #[test]
    fn region_boundaries_and_unaligned_regions() {
        // Two adjacent regions, and one starting in the middle of a page.
        let mem = memory(&[(0, MIB), (MIB as u64, MIB), (0x20_1800, 0x2000)]);
        let log = TestLog::covering(0x20_3800);
        let _d = logging(&mem, &log);
        // Crossing from the first region into the second.
        mem.write_slice(&[1; 0x20], GuestAddress(MIB as u64 - 0x10))
            .unwrap();
        assert_eq!(log.pages(), pages(&[0xff, 0x100]));
        log.clear();
        // Region offset 0x900 of the region at 0x201800 is page 0x202 (gpa 0x202100),
        // not 0x201 (a page count from the region's start would say so).
        mem.write_obj(1u8, GuestAddress(0x20_2100)).unwrap();
        // Its last byte is in page 0x203 (a partial page at the end of the region).
        mem.write_obj(1u8, GuestAddress(0x20_37ff)).unwrap();
        // Its first byte is in page 0x201.
        mem.write_obj(1u8, GuestAddress(0x20_1800)).unwrap();
        assert_eq!(log.pages(), pages(&[0x201, 0x202, 0x203]));
    }

    #[test]
    fn region_at_a_high_guest_address() {
        let high = 1u64 << 40; // 1 TiB: log byte 32 MiB
        let mem = memory(&[(0, 0x10000), (high, 0x10000)]);
        let log = TestLog::covering(high + 0x10000);
        let _d = logging(&mem, &log);
        mem.write_slice(&[1; 2], GuestAddress(high + 0x2fff))
            .unwrap();
        let p = high / LOG_PAGE_SIZE;
        assert_eq!(log.pages(), pages(&[p + 2, p + 3]));
    }

    #[test]
    fn nothing_is_marked_until_log_all_and_after_it() {
        let mem = memory(&[(0, MIB)]);
        let log = TestLog::covering(MIB as u64);
        let d = DirtyLog::new("test");
        d.update_memory(&mem).unwrap();
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        d.set_log_base(&mem, log.map()).unwrap();
        assert!(!d.is_logging());
        // A log base alone does not start logging (QEMU sends it before LOG_ALL).
        mem.write_obj(1u8, GuestAddress(0x2000)).unwrap();
        assert!(log.pages().is_empty());
        d.set_log_all(true).unwrap();
        mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        assert_eq!(log.pages(), pages(&[3]));
        // Off: nothing more (vhost-user-backend's bitmap keeps marking here).
        d.set_log_all(false).unwrap();
        assert!(!d.is_logging());
        log.clear();
        mem.write_slice(&[1; 0x4000], GuestAddress(0x4000)).unwrap();
        assert!(log.pages().is_empty());
        assert!(!mem
            .find_region(GuestAddress(0))
            .unwrap()
            .bitmap()
            .dirty_at(0x3000));
        // On again without a new base: the kept log.
        d.set_log_all(true).unwrap();
        mem.write_obj(1u8, GuestAddress(0x9000)).unwrap();
        assert_eq!(log.pages(), pages(&[9]));
        assert!(mem
            .find_region(GuestAddress(0))
            .unwrap()
            .bitmap()
            .dirty_at(0x9abc));
    }

    #[test]
    fn a_new_log_base_takes_over_from_the_old_one() {
        let mem = memory(&[(0, MIB)]);
        let a = TestLog::covering(MIB as u64);
        let b = TestLog::covering(2 * MIB as u64); // a resize: larger
        let d = logging(&mem, &a);
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        d.set_log_base(&mem, b.map()).unwrap();
        mem.write_obj(1u8, GuestAddress(0x2000)).unwrap();
        assert_eq!(a.pages(), pages(&[1]));
        assert_eq!(b.pages(), pages(&[2]));
        // A second migration after a cancelled one: off, new base, on.
        let c = TestLog::covering(MIB as u64);
        d.set_log_all(false).unwrap();
        d.set_log_base(&mem, c.map()).unwrap();
        d.set_log_all(true).unwrap();
        mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        assert_eq!(a.pages(), pages(&[1]));
        assert_eq!(b.pages(), pages(&[2]));
        assert_eq!(c.pages(), pages(&[3]));
    }

    #[test]
    fn a_region_added_while_logging_is_logged() {
        let mem = memory(&[(0, MIB)]);
        let log = TestLog::covering(4 * MIB as u64);
        let d = logging(&mem, &log);
        // ADD_MEM_REG: the existing region is shared with the new memory.
        let region = vm_memory::GuestRegionMmap::new(
            vm_memory::MmapRegion::new(MIB).unwrap(),
            GuestAddress(2 * MIB as u64),
        )
        .unwrap();
        let mem2 = mem.insert_region(Arc::new(region)).unwrap();
        d.update_memory(&mem2).unwrap();
        mem2.write_obj(1u8, GuestAddress(2 * MIB as u64 + 0x5000))
            .unwrap();
        mem2.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        assert_eq!(log.pages(), pages(&[1, 0x205]));
        // SET_MEM_TABLE: all new regions.
        let mem3 = memory(&[(0, MIB), (3 * MIB as u64, MIB)]);
        d.update_memory(&mem3).unwrap();
        log.clear();
        mem3.write_obj(1u8, GuestAddress(3 * MIB as u64)).unwrap();
        mem3.write_obj(1u8, GuestAddress(0x7000)).unwrap();
        assert_eq!(log.pages(), pages(&[7, 0x300]));
        // A region removed from the table but still written through an old snapshot (a
        // worker mid-batch) keeps logging: over-marking is harmless, a lost mark is not.
        log.clear();
        mem2.write_obj(1u8, GuestAddress(2 * MIB as u64)).unwrap();
        assert_eq!(log.pages(), pages(&[0x200]));
    }

    #[test]
    fn a_region_written_before_it_is_bound_is_marked_whole() {
        let mem = memory(&[(0, MIB)]);
        let log = TestLog::covering(4 * MIB as u64);
        let d = logging(&mem, &log);
        // vhost-user-backend publishes new memory before calling update_memory.
        let mem2 = memory(&[(0, MIB), (2 * MIB as u64, 0x8000)]);
        mem2.write_obj(1u8, GuestAddress(2 * MIB as u64 + 0x10))
            .unwrap();
        assert!(log.pages().is_empty());
        d.update_memory(&mem2).unwrap();
        // Written while unbound: all 8 pages of that region; the other region was not.
        assert_eq!(log.pages(), (0x200..0x208).collect());
        // An unbound region not written is not marked.
        let mem3 = memory(&[(0, MIB), (2 * MIB as u64, 0x8000)]);
        log.clear();
        d.update_memory(&mem3).unwrap();
        assert!(log.pages().is_empty());
    }

    #[test]
    fn a_log_too_small_is_refused_and_never_written_past() {
        let mem = memory(&[(0, MIB), (8 * MIB as u64, MIB)]);
        let small = TestLog::covering(MIB as u64);
        let d = DirtyLog::new("port t");
        d.update_memory(&mem).unwrap();
        let e = d.set_log_base(&mem, small.map()).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, DirtyLogError::LogTooSmall { gpa, needed, .. } if gpa == 8 * MIB as u64 && needed == 288),
            "{text}"
        );
        assert!(
            text.contains("port t") && text.contains("0x800000"),
            "{text}"
        );
        // Nothing installed: LOG_ALL now reports it has nothing to log into.
        assert!(matches!(
            d.set_log_all(true),
            Err(DirtyLogError::NoLog { .. })
        ));
        mem.write_obj(1u8, GuestAddress(0)).unwrap();
        assert!(small.pages().is_empty());

        // Logging with a good log, then a region the log cannot cover: refused.
        let good = TestLog::covering(9 * MIB as u64);
        d.set_log_base(&mem, good.map()).unwrap();
        d.set_log_all(true).unwrap();
        let far = memory(&[(0, MIB), (8 * MIB as u64, MIB), (64 * MIB as u64, MIB)]);
        let e = d.update_memory(&far).unwrap_err();
        assert!(
            matches!(e, DirtyLogError::LogTooSmall { gpa, .. } if gpa == 64 * MIB as u64),
            "{e}"
        );
        // The uncovered region is not logged (and not written past the log); the others are.
        far.write_obj(1u8, GuestAddress(64 * MIB as u64 + 0x1000))
            .unwrap();
        far.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        assert_eq!(good.pages(), pages(&[1]));
        // Turning logging on again says which region is unlogged.
        let e = d.set_log_all(true).unwrap_err();
        assert!(
            matches!(e, DirtyLogError::Unlogged { count: 1, gpa, .. } if gpa == 64 * MIB as u64),
            "{e}"
        );
    }

    #[test]
    fn log_areas_a_frontend_should_not_send_are_refused() {
        let log = TestLog::new(4096);
        let fd = log.file.as_fd();
        for (offset, size, why) in [
            (0, 0, "empty"),
            (0, 8192, "beyond the end of the file"),
            (100, 16, "offset not page-aligned"),
            (4096, u64::MAX, "too large"),
            (u64::MAX - 4095, 4096, "offset + size overflows"),
        ] {
            match LogMemory::map(fd, offset, size) {
                Err(DirtyLogError::BadLogArea { why: w, .. }) => assert_eq!(w, why),
                other => panic!("{offset:#x}+{size:#x}: {other:?}"),
            }
        }
        let m = LogMemory::map(fd, 0, 4096).unwrap();
        assert_eq!(m.len(), 4096);
    }

    #[test]
    fn writes_outside_any_region_or_past_its_end_are_not_marked() {
        let mem = memory(&[(0, 0x3000)]);
        let log = TestLog::covering(MIB as u64);
        let _d = logging(&mem, &log);
        assert!(mem.write_obj(1u8, GuestAddress(0x3000)).is_err());
        // A bitmap asked about bytes past its region ignores them.
        let r = mem.find_region(GuestAddress(0)).unwrap();
        r.bitmap().mark_dirty(0x2fff, 0x10_0000);
        r.bitmap().mark_dirty(usize::MAX, 2);
        r.bitmap().slice_at(usize::MAX).mark_dirty(usize::MAX, 1);
        assert_eq!(log.pages(), pages(&[2]));
    }

    #[test]
    fn grace_period_waits_for_a_reader_inside_a_section() {
        let (in_tx, in_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            grace::read(|| {
                in_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            })
        });
        in_rx.recv().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let waiter = {
            let done = done.clone();
            std::thread::spawn(move || {
                grace::synchronize();
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !done.load(Ordering::SeqCst),
            "grace period ended with a reader inside"
        );
        go_tx.send(()).unwrap();
        reader.join().unwrap();
        waiter.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn writers_racing_with_log_changes_use_only_the_current_log() {
        // Four writer threads hammer guest memory while the control plane swaps logs and
        // turns logging off and on. Once a change has returned (when the backend replies to
        // the frontend), no writer may mark the log it replaced or a log while off; writers
        // must reach the new log. Nothing may crash or write past a mapping.
        let mem = Arc::new(memory(&[(0, 4 * MIB)]));
        let logs: Vec<TestLog> = (0..3).map(|_| TestLog::covering(4 * MIB as u64)).collect();
        let d = DirtyLog::new("race");
        d.update_memory(&mem).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicUsize::new(0));
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let (mem, stop, writes) = (mem.clone(), stop.clone(), writes.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let addr = (t * MIB as u64) + (i % 256) * 4096;
                        mem.write_obj(i, GuestAddress(addr)).unwrap();
                        writes.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                })
            })
            .collect();
        // Every writer has marked `log` (a page in each writer's MiB).
        let reached_by_all = |log: &TestLog| {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let p = log.pages();
                if (0..4u64).all(|t| p.range(t * 256..(t + 1) * 256).next().is_some()) {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let quiet = |log: &TestLog| {
            std::thread::sleep(Duration::from_millis(3));
            log.pages().is_empty()
        };
        d.set_log_base(&mem, logs[0].map()).unwrap();
        d.set_log_all(true).unwrap();
        assert!(reached_by_all(&logs[0]));
        let start = Instant::now();
        let mut round = 1usize;
        while start.elapsed() < Duration::from_millis(600) {
            let old = &logs[(round - 1) % logs.len()];
            let new = &logs[round % logs.len()];
            new.clear();
            d.set_log_base(&mem, new.map()).unwrap();
            old.clear();
            assert!(quiet(old), "round {round}: a mark reached the replaced log");
            assert!(
                reached_by_all(new),
                "round {round}: writers did not reach the new log"
            );
            if round.is_multiple_of(3) {
                d.set_log_all(false).unwrap();
                new.clear();
                assert!(quiet(new), "round {round}: a mark while logging was off");
                d.set_log_all(true).unwrap();
                assert!(reached_by_all(new), "round {round}: logging did not resume");
            }
            round += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        assert!(round > 5 && writes.load(Ordering::Relaxed) > 10_000);
    }

    #[test]
    fn queue_pairs_log_concurrently_without_the_control_locks() {
        // Four "queue pair" threads write interleaved pages (thread t: pages with
        // page % 4 == t), so every log byte is shared by all four and updated concurrently.
        // Meanwhile this thread holds the device's control lock and every region's lock for
        // the whole run: if the hot path took either, the writers would block and the test
        // would time out. Every page written must be marked (no lost `fetch_or`), nothing else.
        let mem = Arc::new(memory(&[(0, 2 * MIB), (4 * MIB as u64, 2 * MIB)]));
        let log = TestLog::covering(6 * MIB as u64);
        let d = logging(&mem, &log);
        let ctl = d.shared.lock();
        let region_locks: Vec<_> = mem.iter().map(|r| region_bitmap(r).slot.lock()).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        for t in 0..4u64 {
            let (mem, tx) = (mem.clone(), tx.clone());
            std::thread::spawn(move || {
                let mut mine = BTreeSet::new();
                for round in 0..20u64 {
                    for page in (t..(6 * MIB as u64 / 4096)).step_by(4) {
                        let addr = page * 4096 + (round * 8) % 4096;
                        if mem.write_obj(round, GuestAddress(addr)).is_ok() {
                            mine.insert(page);
                        }
                    }
                }
                let _ = tx.send(mine);
            });
        }
        let written: Vec<BTreeSet<u64>> = (0..4)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(20))
                    .expect("writers finish while the control locks are held")
            })
            .collect();
        drop(region_locks);
        drop(ctl);
        let all: BTreeSet<u64> = written.iter().flatten().copied().collect();
        // Pages in the hole between the regions were not written (write_obj failed there).
        assert_eq!(all.len(), 2 * (2 * MIB / 4096));
        assert_eq!(log.pages(), all);
    }
}
