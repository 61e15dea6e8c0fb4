//! Feature bits as the 64-bit masks GET_FEATURES/SET_FEATURES carry, built from the bit numbers
//! virtio-bindings (virtio) and the vhost crate (vhost) define, so no test spells a bit number.

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::{virtio_config, virtio_net, virtio_ring};

/// The mask of feature bit `bit`.
const fn mask(bit: u32) -> u64 {
    1 << bit
}

pub const VIRTIO_NET_F_MTU: u64 = mask(virtio_net::VIRTIO_NET_F_MTU);
pub const VIRTIO_NET_F_MAC: u64 = mask(virtio_net::VIRTIO_NET_F_MAC);
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = mask(virtio_net::VIRTIO_NET_F_MRG_RXBUF);
pub const VIRTIO_NET_F_STATUS: u64 = mask(virtio_net::VIRTIO_NET_F_STATUS);
pub const VIRTIO_NET_F_MQ: u64 = mask(virtio_net::VIRTIO_NET_F_MQ);
pub const VIRTIO_RING_F_EVENT_IDX: u64 = mask(virtio_ring::VIRTIO_RING_F_EVENT_IDX);
pub const VIRTIO_F_VERSION_1: u64 = mask(virtio_config::VIRTIO_F_VERSION_1);
/// VDUSE refuses devices without it: all addresses the device sees are IOVAs.
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = mask(virtio_config::VIRTIO_F_ACCESS_PLATFORM);
/// vhost-user's "the backend speaks protocol features" bit.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// vhost's "log all writes" feature bit: what QEMU sets while it migrates a guest.
pub const VHOST_F_LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_the_spec_bits() {
        assert_eq!(VIRTIO_NET_F_MTU, 1 << 3);
        assert_eq!(VIRTIO_NET_F_MAC, 1 << 5);
        assert_eq!(VIRTIO_NET_F_MRG_RXBUF, 1 << 15);
        assert_eq!(VIRTIO_NET_F_STATUS, 1 << 16);
        assert_eq!(VIRTIO_NET_F_MQ, 1 << 22);
        assert_eq!(VHOST_F_LOG_ALL, 1 << 26);
        assert_eq!(VIRTIO_RING_F_EVENT_IDX, 1 << 29);
        assert_eq!(VHOST_USER_F_PROTOCOL_FEATURES, 1 << 30);
        assert_eq!(VIRTIO_F_VERSION_1, 1 << 32);
        assert_eq!(VIRTIO_F_ACCESS_PLATFORM, 1 << 33);
    }
}
