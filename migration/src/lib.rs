//! Live-migration support for vhost-relay: dirty-page logging.
//!
//! QEMU migrates a guest with a vhost-user NIC only if the backend offers `VHOST_F_LOG_ALL`
//! and `VHOST_USER_PROTOCOL_F_LOG_SHMFD`, and then relies on it to mark every guest page it
//! writes in a shared log. [`DirtyBitmap`] is the per-region bitmap type to give
//! vhost-user-backend (`VhostUserBackend::Bitmap`), and [`DirtyLog`] the per-device state the
//! device drives from `acked_features` and `update_memory`.
//!
//! It replaces vhost-user-backend's `BitmapMmapRegion`, which keeps logging after LOG_ALL
//! is turned off, does not log regions added after `SET_LOG_BASE`, and takes a lock shared
//! by all queue threads on every write.

mod dirty;
mod grace;

pub use dirty::{
    DirtyBitmap, DirtyBitmapSlice, DirtyLog, DirtyLogError, LogAttachment, LogMemory, LOG_PAGE_SIZE,
};
