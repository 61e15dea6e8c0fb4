//! Guest-memory bookkeeping shared by both modes of vhost-relay (the relay and vDPA): the
//! dirty-page log live migration needs, and the checks on the files a frontend asks us to map.
//!
//! What it holds:
//! - [`DirtyBitmap`] / [`DirtyLog`] (`dirty.rs`): the per-region bitmap type guest memory is
//!   built with, and the per-device state driven by `acked_features` (LOG_ALL on/off) and
//!   `SET_LOG_BASE` / memory-table updates. Marking a page is [`Bitmap::mark_dirty`] on a
//!   region's bitmap; the data path reaches it through `virtq::GuestMap` (the relay's RX
//!   writes and used rings, vDPA's shadow rings);
//! - [`LogMemory`]: the frontend's shared log file, mapped after [`check_file_area`];
//! - `grace.rs`: the read-side sections and grace periods that let the control thread swap a
//!   log attachment without a lock on the workers' hot path;
//! - [`check_file_area`] / [`check_guest_region`] (`file_area.rs`): the one fstat check every
//!   frontend fd passes before anything maps it (regular file, whole area inside it, page
//!   alignment, no wrap-around), so a lying frontend cannot make a mapping that SIGBUSes.
//!
//! The crate keeps the name `migration` (fixed by the workspace layout) although the file
//! checks serve every session, migrating or not.
//!
//! QEMU migrates a guest with a vhost-user NIC only if the backend offers `VHOST_F_LOG_ALL`
//! and `VHOST_USER_PROTOCOL_F_LOG_SHMFD`, and then relies on it to mark every guest page it
//! writes in the shared log.
//!
//! # Why not vhost-user-backend's `BitmapMmapRegion`
//! (0.24) It keeps marking after a `SET_FEATURES` that clears LOG_ALL; regions mapped after
//! `SET_LOG_BASE` (`ADD_MEM_REG`, a new `SET_MEM_TABLE` during migration) get a bitmap with
//! no log, so writes there are silently lost; it takes an `RwLock` read (a write to a cache
//! line shared by all queue threads) and clones an `Arc` on every write, logging or not; and
//! it computes pages from the region start, so a region whose guest address or length is
//! not page-aligned has some pages marked wrong or not at all. This crate fixes all four.
//!
//! # What writes guest memory
//! - The relay's RX path and used rings write through host pointers (`virtq::GuestMap`), and
//!   mark each written range with [`Bitmap::mark_dirty`] right after the copy, before the used
//!   index that shows it to the guest is published; writes that miss the fast path go
//!   through vm-memory, which marks them itself;
//! - TX only reads guest memory; vhost-user-backend's handler writes none (SET_VRING_ADDR
//!   only reads the used index);
//! - in vDPA mode the device writes guest buffers itself; while the frontend logs, the shadow
//!   rings mark each returned chain's written part before forwarding its used entry.
//!
//! New code that writes guest memory through a raw pointer (or lets the kernel write it, e.g.
//! a zero-copy `recvmmsg` into RX buffers) must mark the range itself.
//!
//! [`Bitmap::mark_dirty`]: vm_memory::bitmap::Bitmap::mark_dirty

mod dirty;
mod file_area;
mod grace;

pub use dirty::{
    DirtyBitmap, DirtyBitmapSlice, DirtyLog, DirtyLogError, LogAttachment, LogMemory, LOG_PAGE_SIZE,
};
pub use file_area::{check_file_area, check_guest_region, page_size, FileAreaError, RegionDesc};
