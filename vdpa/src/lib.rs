//! vDPA mode of vhost-relay: a port's vhost-user session mirrored onto a kernel vhost-vdpa
//! device (`/dev/vhost-vdpa-N`), so the guest's rings are served by the device (a vDPA NIC,
//! or any vDPA net device) and packets never pass through this process.
//!
//! Modules:
//! - [`device`]: the vhost-vdpa device behind the [`VdpaDevice`] trait (the kernel device,
//!   [`KernelDevice`], on the vhost crate's `VhostKernVdpa`; a mock in tests), with errors a
//!   person can act on at open time ([`OpenError`]);
//! - [`session`]: the vhost-user request handler for one frontend connection ([`Session`]):
//!   features offered and acked, the memory table as DMA mappings (IOVA = guest physical
//!   address), each ring as the frontend described it, device status and config; it
//!   (re)starts the device in direct mode, or in shadow mode while the frontend logs dirty
//!   pages, and runs the shadow relay thread;
//! - [`shadow`]: the shadow virtqueues of shadow mode ([`shadow::ShadowQueue`]): avail and
//!   used rings in our memory that the device works on, copied to and from the guest's.
//!
//! Where the guest's input is checked: in direct mode the guest's rings never pass through
//! this process (the device reads them); the session checks only the frontend's ring
//! addresses (inside the memory table, `Session::set_vring_addr`). In shadow mode every
//! access to the guest's rings goes through the relay's ring crate `virtq`
//! (`backend/virtq`): ring addresses are resolved and checked by `virtq::GuestRings`, and
//! each descriptor is validated by `virtq::Chain::next_desc`, which
//! [`shadow::ShadowQueue::forward_used`] walks for every chain the device returns.
//!
//! Where a dirty page is marked (migration, shadow mode only; direct mode is never used
//! while the frontend logs): [`shadow::ShadowQueue::forward_used`] marks the buffers the
//! device wrote with `virtq::GuestMap::mark_dirty` before the guest can see the entry, then
//! publishes the guest's used ring with `virtq::GuestRings::publish_used`, which marks the
//! used ring too (as does `GuestRings::set_avail_event` in `forward_avail`, which writes the
//! avail-event field at the used ring's end). The dirty log itself is the `migration`
//! crate's `DirtyLog`, kept by the session.

pub mod device;
pub mod session;
pub mod shadow;

#[cfg(test)]
mod mock;
#[cfg(test)]
mod tests;

pub use device::{KernelDevice, OpenError, VdpaDevice};
pub use session::{Counters, Mode, Session, SessionError};
