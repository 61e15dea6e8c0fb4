//! Hand-off of a port's rings to a kernel vhost-vdpa device (`/dev/vhost-vdpa-N`).
//!
//! Not implemented yet: this crate is where the vDPA mode of vhost-relay goes (memory table
//! as IOTLB updates, ring addresses and kick/call eventfds handed straight to the device,
//! shadow virtqueues while migration logs dirty pages). Until then `vhost-relay` has no
//! `--vdpa` option, and nothing depends on this crate.
