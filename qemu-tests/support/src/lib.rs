//! Test support shared by vhost-relay's integration tests (`backend/tests`), the end-to-end
//! harness (`qemu-tests`) and the programs it runs inside guests (`guest-tools`).
//!
//! - [`driver`]: guest memory from a memfd and split rings in it, played from the guest
//!   driver's side (post buffers, kick, read used entries).
//! - [`features`]: feature-bit masks from virtio-bindings and the vhost crate.
//! - [`frontend`]: vhost-user negotiation and ring hand-over on top of [`driver`].
//! - [`metrics`]: vhost-relay's Prometheus endpoint through `curl` and `promtool`.
//! - [`netns`]: network namespaces (named or per thread), veth pairs, `ip`.
//! - [`raw_socket`]: an `AF_PACKET` socket for the wire side of a test.
//! - [`sd_notify`]: the service manager's end of sd_notify (what NOTIFY_SOCKET points at).
//! - [`stats`]: vhost-relay's per-queue counters (SIGUSR1 and the lines it logs).
//!
//! It depends on nothing of vhost-relay's, so the backend's own unit tests can use it too.

pub mod driver;
pub mod features;
pub mod frontend;
pub mod metrics;
pub mod netns;
pub mod raw_socket;
pub mod sd_notify;
pub mod stats;
