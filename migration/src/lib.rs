//! Live-migration support for vhost-relay: dirty-page logging.
//!
//! QEMU migrates a guest with a vhost-user NIC only if the backend offers `VHOST_F_LOG_ALL`
//! and `VHOST_USER_PROTOCOL_F_LOG_SHMFD`, and then relies on it to mark every guest page it
//! writes in a shared log. [`DirtyBitmap`] is the per-region bitmap type to give
//! vhost-user-backend (`VhostUserBackend::Bitmap`), and [`DirtyLog`] the per-device state the
//! device drives from `acked_features` and `update_memory`.
//!
//! # Why not vhost-user-backend's `BitmapMmapRegion`
//! (0.24) It keeps marking after a `SET_FEATURES` that clears LOG_ALL; regions mapped after
//! `SET_LOG_BASE` (`ADD_MEM_REG`, a new `SET_MEM_TABLE` during migration) get a bitmap with
//! no log, so writes there are silently lost; it takes an `RwLock` read (a write to a cache
//! line shared by all queue threads) and clones an `Arc` on every write, logging or not; and
//! it computes pages from the region start, so a region whose guest address or length is
//! not page-aligned has some pages marked wrong or not at all. This crate fixes all four.
//!
//! # What writes guest memory (checked for vhost-relay with vm-memory 0.18, virtio-queue 0.18)
//! Every write goes through vm-memory and so reaches [`Bitmap::mark_dirty`]:
//! - RX data: `VolatileSlice::copy_from` (marks in `copy_to_volatile_slice`), its fallback
//!   `GuestMemory::write_slice`, and `write_obj` for `num_buffers` (`rx.rs`);
//! - used rings: virtio-queue's `add_used` writes the element with `write_obj` and the used
//!   index with `store`; `set_avail_event` (event idx) and `set_used_flags` (notifications
//!   without event idx) use `store`; all mark;
//! - TX only reads guest memory (its buffers go to `sendmmsg` as iovecs), and
//!   vhost-user-backend's handler writes none (SET_VRING_ADDR only reads the used index).
//!
//! Writes that would bypass the log: through raw pointers (`ptr_guard_mut`, `as_ptr`,
//! `get_host_address`), through `VolatileSlice::get_atomic_ref`, or by the kernel into guest
//! memory (e.g. a future zero-copy `recvmmsg` into RX buffers). Such code must call
//! `mark_dirty` on the slice itself.
//!
//! [`Bitmap::mark_dirty`]: vm_memory::bitmap::Bitmap::mark_dirty

mod dirty;
mod file_area;
mod grace;

pub use dirty::{
    DirtyBitmap, DirtyBitmapSlice, DirtyLog, DirtyLogError, LogAttachment, LogMemory, LOG_PAGE_SIZE,
};
pub use file_area::{check_file_area, check_guest_region, page_size, FileAreaError, RegionDesc};
