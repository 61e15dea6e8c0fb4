//! vhost-relay: a vhost-user virtio-net backend that relays guest NICs to VF netdevs.

pub mod net_hdr;
pub mod offload;
pub mod vf;
