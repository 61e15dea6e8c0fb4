//! The guest's virtqueues, read and written the fast way: one implementation for the relay's
//! queue pairs (vhost-relay's `rx`/`tx`, through [`Ring`]: a [`SplitRing`] or a
//! [`PackedRing`]) and for vDPA's shadow relay (vdpa's `shadow`, split only, through
//! [`GuestRings`], [`Chain`] and [`GuestMap`] directly, as it has ring addresses and a size
//! but no virtio-queue `Queue`).
//!
//! virtio-queue's `Queue` is the reference implementation and stays the owner of a relay
//! queue's state (addresses, size, `next_avail`/`next_used`, notification setup), but its
//! data-path calls go through vm-memory for every field: each descriptor read, avail-ring
//! read and used-ring write looks the guest address up in the memory regions, bounds-checks
//! it and copies through a volatile slice, and each `add_used` publishes the used index on
//! its own. Profiling showed those lookups and per-entry publications as a third of the
//! per-packet cost. Here the rings are resolved to host pointers once per batch, buffers are
//! translated through a small cached region table, used entries are published with one index
//! store per batch, and the guest's interrupt suppression (event idx, or
//! `VRING_AVAIL_F_NO_INTERRUPT`) is honoured so a polling frontend gets no eventfd writes.
//!
//! Where the guest's input is checked:
//! - ring addresses: [`GuestRings::resolve`] (inside one memory region, aligned in guest and
//!   host address space); the avail index: [`SplitRing::pop`] (at most a ring ahead);
//! - every descriptor: [`Chain::next_desc`] in [`desc`] (index inside its table, indirect
//!   tables whole, mapped, at most 65535 descriptors and not nested, loops cut);
//! - guest buffers that are not in one region (or not in memory at all) fall back to
//!   vm-memory in [`GuestMap`], which produces the precise error.
//!
//! Where a dirty page is marked (live migration): [`GuestMap::write`] marks what it writes;
//! the RX path, which writes header and data with [`GuestMap::write_unmarked`], marks the
//! buffer once with [`GuestMap::mark_dirty`]; [`GuestRings::publish_used`] and
//! [`GuestRings::set_avail_event`] mark the used ring; the shadow relay marks what the device
//! wrote with [`GuestMap::mark_dirty`] over the chain's writable descriptors. vm-memory's own
//! writes (the fallback) mark themselves.
//!
//! Guest memory is never borrowed as a Rust reference (`&[u8]`, `&AtomicU16`): the guest
//! changes it under us, and one guest buffer may be both a TX source and an RX destination
//! (loopback), so a shared reference's promise that the bytes stay unchanged would be a lie.
//! It is reached through raw pointers ([`GuestSlice`], ring pointers, the [`volatile`]
//! helpers) and copied with `ptr::copy` (memmove), which is as fast as memcpy for disjoint
//! ranges and defined for overlapping ones.

pub mod desc;
mod error;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzz;
mod guest_map;
mod guest_slice;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
mod notify;
mod packed;
mod ring;
mod split;
pub mod volatile;

pub use desc::{Chain, Desc, DescTable, Layout};
pub use error::RingError;
pub use guest_map::GuestMap;
pub use guest_slice::GuestSlice;
pub use notify::{
    disable_kicks, enable_kicks, need_event, needs_notification, suppression_addr, wants_interrupt,
};
pub use packed::{PackedEvents, PackedRing, Pos};
pub use ring::{Head, Ring, RingKind};
pub use split::{GuestRings, RingAddr, SplitRing};
pub use volatile::prefetch;
