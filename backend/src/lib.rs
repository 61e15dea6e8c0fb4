//! vhost-relay: a vhost-user virtio-net backend that relays guest NICs to VF netdevs.
//!
//! Layers, each behind a narrow interface:
//! - [`config`]: what the user asked for (command line or TOML), validated;
//! - [`server`]: one thread per port owning the vhost-user socket (listen, inherited fd, or
//!   client with reconnect), a fresh device per frontend connection;
//! - [`device`]: the vhost-user device (features, queues, events) on vhost-user-backend;
//! - [`queue_pair`]: one worker per queue pair moving packets both ways;
//! - [`tx`] and [`rx`]: the packet paths, one file per direction;
//! - the guest's split rings are the `virtq` crate (`backend/virtq`, shared with vDPA's shadow
//!   relay): its crate docs say where a descriptor is validated and where a dirty page is marked;
//! - [`vf`]: the VF netdev through packet sockets; [`offload`]: software offloads;
//! - [`announce`]: the RARP broadcast QEMU asks for after a migration (`SEND_RARP`).

pub mod announce;
pub mod config;
pub mod device;
pub mod log_limit;
pub mod net_hdr;
pub mod offload;
pub mod port;
pub mod protocol_shim;
pub mod queue_pair;
pub mod region_check;
pub mod rx;
pub mod server;
pub mod signals;
pub mod stats;
pub mod tx;
pub mod vf;

#[cfg(test)]
mod fuzz;

/// Guest memory with the dirty-page bitmap used for live migration. Not vhost-user-backend's
/// `BitmapMmapRegion`: that one keeps logging after LOG_ALL is turned off, leaves regions
/// added after SET_LOG_BASE unlogged, and takes a lock shared by all queue threads on every
/// write (see the `migration` crate).
pub type GuestMemoryMmapB = vm_memory::GuestMemoryMmap<migration::DirtyBitmap>;
/// The shared, swappable view of guest memory the frontend's memory table updates.
pub type GuestMemoryAtomicB = vm_memory::GuestMemoryAtomic<GuestMemoryMmapB>;
