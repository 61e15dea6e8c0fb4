//! vhost-relay: a vhost-user virtio-net backend that relays guest NICs to VF netdevs, loops
//! them back, or hands their rings to a vhost-vdpa device.
//!
//! Where things live:
//! - [`config`]: what the user asked for (command line or TOML), validated; `main.rs` is
//!   only the command line and the wiring of ports to threads;
//! - [`port`]: a port and its kind ([`port::PortKind`]: VF relay, loopback, vDPA) — what
//!   each kind does for a connection is behind [`server`]'s one connection loop
//!   (`SessionHandler`: vhost-user-backend's daemon on our queue pairs, or the `vdpa` crate's
//!   session on the device);
//! - [`server`]: one thread per port owning the vhost-user socket (listen, inherited fd, or
//!   client with reconnect), opening the port and serving one connection after another;
//! - [`protocol_shim`]: sits between the frontend and the request handler of every kind: the
//!   checks on what a frontend sends (memory regions against their files in
//!   [`region_check`], slot and payload limits, fds) and the workarounds for
//!   vhost-user-backend it needs ([`vhost_user_backend_workarounds`]);
//! - [`device`]: the vhost-user device of relay ports (features, queues, worker events) on
//!   vhost-user-backend;
//! - [`queue_pair`]: one worker per queue pair moving packets both ways; [`tx`] and [`rx`]:
//!   the packet paths, one file per direction; [`vf`]: the VF netdev through AF_PACKET or
//!   AF_XDP sockets; [`offload`]: software offloads; [`stats`]: the counters;
//! - [`status`]: what a port reports (state, connection, counters); [`metrics`]: the same as
//!   Prometheus metrics over HTTP (`--metrics-listen`);
//! - [`service`]: the running ports, changed at run time by [`control`] (`ctl`), reloads and
//!   [`signals`]; [`systemd`]: socket activation and readiness notification;
//! - [`announce`]: the RARP broadcast QEMU asks for after a migration (`SEND_RARP`).
//!
//! Where a guest descriptor is validated: the `virtq` crate (`backend/virtq`), shared with
//! vDPA's shadow relay — `virtq::Chain::next_desc` checks every descriptor (index in its
//! table, indirect tables whole and mapped, loops cut), `virtq::GuestRings::resolve` the
//! rings, `virtq::SplitRing::pop` the avail index. [`tx`] and [`rx`] then check what a
//! packet needs (lengths, direction flags, header sizes) and drop one packet for one bad
//! chain.
//!
//! Where a dirty page is marked for live migration: `virtq::GuestMap` (its `write`, and the
//! RX path's `mark_dirty` of each buffer it filled, before the used index shows it to the
//! guest), and the used ring when it is published (`virtq::GuestRings::publish_used`). The
//! bitmap and the shared log are the `migration` crate's.

pub mod announce;
pub mod config;
pub mod control;
pub mod ctl;
pub mod device;
pub mod log_limit;
pub mod metrics;
pub mod net_hdr;
pub mod offload;
pub mod port;
pub mod protocol_shim;
pub mod queue_pair;
pub mod region_check;
pub mod rx;
pub mod server;
pub mod service;
pub mod signals;
pub mod stats;
pub mod status;
pub mod stop;
pub mod systemd;
pub mod tx;
pub mod vf;
pub mod vhost_user_backend_workarounds;

#[cfg(test)]
mod alloc_count;
#[cfg(test)]
mod fuzz;

/// Guest memory with the dirty-page bitmap used for live migration. Not vhost-user-backend's
/// `BitmapMmapRegion`: that one keeps logging after LOG_ALL is turned off, leaves regions
/// added after SET_LOG_BASE unlogged, and takes a lock shared by all queue threads on every
/// write (see the `migration` crate).
pub type GuestMemoryMmapB = vm_memory::GuestMemoryMmap<migration::DirtyBitmap>;
/// The shared, swappable view of guest memory the frontend's memory table updates.
pub type GuestMemoryAtomicB = vm_memory::GuestMemoryAtomic<GuestMemoryMmapB>;
