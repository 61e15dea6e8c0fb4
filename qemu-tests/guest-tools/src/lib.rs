//! Programs the end-to-end tests put into their QEMU guests (see `qemu-tests/tests/vdpa.rs`):
//!
//! - `vduse-net`: a userspace virtio-net device on VDUSE that loops TX to RX, standing for a
//!   vDPA NIC; built on [`vduse`].
//! - `vdpa-probe`: drives `/dev/vhost-vdpa-N` straight, as a VMM would.
//! - `vu-frontend`: a vhost-user frontend that drives vhost-relay from inside the guest.
//!
//! The guest-side driver the last two share with the integration tests is `test-support`'s.
//! The tests find the binaries beside their own executable (`target/<profile>/`), so they
//! must be built first: `cargo build -p guest-tools` (`cargo build --workspace` does it).

pub mod vduse;
