//! vDPA mode of vhost-relay: a port's vhost-user session mirrored onto a kernel vhost-vdpa
//! device (`/dev/vhost-vdpa-N`), so the guest's rings are served by the device (a vDPA NIC,
//! or any vDPA net device) and packets never pass through this process.
//!
//! - [`device`]: the vhost-vdpa device behind a trait (kernel device on the vhost crate's
//!   `VhostKernVdpa`; a mock in tests), with errors a person can act on at open time;
//! - [`session`]: the vhost-user request handler for one frontend connection: features,
//!   memory table as DMA mappings (IOVA = guest physical address), rings, status, config;
//! - [`shadow`]: shadow virtqueues used while the frontend logs dirty pages for migration;
//!   every access to the guest's rings goes through the relay's ring crate `virtq`
//!   (`backend/virtq`), whose docs say where a descriptor is validated and a dirty page marked.

pub mod device;
pub mod session;
pub mod shadow;

#[cfg(test)]
mod mock;
#[cfg(test)]
mod tests;

pub use device::{KernelDevice, OpenError, VdpaDevice};
pub use session::{Counters, Mode, NoCounters, Session, SessionError};
