//! The virtio-net device as vhost-user-backend sees it: features, queues, and the dispatch of
//! worker-thread events to the queue pairs.
//!
//! vhost-user-backend's blanket `RwLock<T>` wrapper would take a write lock on every event and
//! so serialise all queue pairs; this device implements [`VhostUserBackend`] itself, with one
//! mutex per queue pair that only that pair's worker thread (and `stop_vring`) ever takes.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::{debug, info};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_config::{
    VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtq::RingKind;
use vm_memory::{Address, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::offload::RxOffloads;
use crate::port::Relay;
use crate::queue_pair::Negotiated;
use crate::vhost_user_backend_workarounds::ExitFds;
use crate::{GuestMemoryAtomicB, GuestMemoryMmapB};

/// Ring size QEMU may ask for (its `rx_queue_size`/`tx_queue_size` go up to 1024).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Queue pairs one port may have: worker masks are 64-bit, two queues per pair.
pub const MAX_QUEUE_PAIRS: usize = 32;

/// Virtio feature bits this device offers. QEMU intersects them with what the user allowed on
/// `-device virtio-net-pci` and what the guest acks; MAC, STATUS-reporting and the control
/// queue stay with QEMU.
pub fn device_features() -> u64 {
    let bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_NOTIFY_ON_EMPTY,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_F_RING_PACKED,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MQ,
        // QEMU keeps the control queue and the config space, so offering this is all it
        // takes for QEMU to ask the guest to announce itself (gratuitous ARP/NA) after a
        // migration, and the switches behind the destination's VF learn its new place.
        VIRTIO_NET_F_GUEST_ANNOUNCE,
    ];
    bits.iter().fold(0u64, |acc, b| acc | (1u64 << b))
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        // Live migration: QEMU blocks migrating a vhost-user NIC whose backend lacks it.
        // Acked only while a migration runs; the dirty log follows it (see `acked_features`).
        | VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// vhost-user protocol features this backend implements.
///
/// Not RESET_DEVICE: QEMU sends it when it connects, and vhost-user-backend's handler then
/// forgets the acked PROTOCOL_FEATURES bit and refuses the SET_VRING_ENABLE that follows.
/// A device reset reaches us anyway as GET_VRING_BASE on every ring and a fresh setup.
///
/// LOG_SHMFD: the dirty log comes as a shared-memory fd with SET_LOG_BASE (live migration).
///
/// RARP: after a migration QEMU sends SEND_RARP for a guest without GUEST_ANNOUNCE; the
/// protocol shim answers it and the port broadcasts a RARP frame on its VF
/// ([`crate::announce`]).
///
/// Not PAGEFAULT (postcopy): see docs/usage.md, "Live migration".
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::RARP
}

/// A worker's epoll handler (one per queue pair and session).
pub type Handler = vhost_user_backend::VringEpollHandler<Arc<NetDevice>>;

/// The device for one frontend connection.
pub struct NetDevice {
    relay: Arc<Relay>,
    mem: GuestMemoryAtomicB,
    acked: AtomicU64,
    /// Dirty-page logging for live migration: told about LOG_ALL and memory changes here;
    /// SET_LOG_BASE reaches it through the guest memory bitmaps.
    dirty: migration::DirtyLog,
    /// Exit eventfds handed to the library's workers (it never closes them).
    exit_fds: ExitFds,
}

impl NetDevice {
    pub fn new(relay: Arc<Relay>, mem: GuestMemoryAtomicB) -> Self {
        for i in 0..relay.pairs.len() {
            if let Some(mut p) = relay.pair(i) {
                p.reset();
            }
        }
        NetDevice {
            dirty: migration::DirtyLog::new(format!("port {}", relay.name)),
            relay,
            mem,
            acked: AtomicU64::new(0),
            exit_fds: ExitFds::default(),
        }
    }

    fn negotiated(&self) -> Negotiated {
        let acked = self.acked.load(Ordering::Acquire);
        Negotiated {
            mergeable: acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            hdr_len: crate::net_hdr::guest_header_len(acked),
            offloads: RxOffloads::from_features(acked),
            ring: if acked & (1 << VIRTIO_F_RING_PACKED) != 0 {
                RingKind::Packed
            } else {
                RingKind::Split
            },
        }
    }

    /// Event id of a pair's VF socket in its worker's epoll (ids up to `num_queues` are the
    /// library's).
    pub fn vf_event_id(&self) -> u64 {
        self.relay.vf_event_id()
    }

    /// Event id of a pair's reschedule eventfd.
    pub fn resched_event_id(&self) -> u64 {
        self.num_queues() as u64 + 2
    }

    /// Event id of a pair's VF counters timer.
    pub fn counters_event_id(&self) -> u64 {
        self.num_queues() as u64 + 3
    }
}

/// Defence in depth behind the protocol shim's check ([`crate::region_check`]): every region
/// must lie inside its file, or the first touch past the file's end raises SIGBUS and kills
/// the process. The library has mapped the regions already, but nothing has touched them
/// yet when it tells us; refusing here drops the connection first.
fn check_region_files(mem: &GuestMemoryMmapB) -> io::Result<()> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        migration::check_file_area(fo.file().as_fd(), fo.start(), region.len()).map_err(|e| {
            io::Error::other(format!(
                "memory region {:#x}+{:#x} at file offset {:#x}: {e}",
                region.start_addr().raw_value(),
                region.len(),
                fo.start()
            ))
        })?;
    }
    Ok(())
}

impl VhostUserBackend for NetDevice {
    type Bitmap = migration::DirtyBitmap;
    type Vring = VringRwLock<GuestMemoryAtomicB>;

    fn num_queues(&self) -> usize {
        2 * self.relay.pairs.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        device_features()
    }

    fn acked_features(&self, features: u64) {
        info!("port {}: guest features {features:#x}", self.relay.name);
        self.acked.store(features, Ordering::Release);
        // Logging stops when a SET_FEATURES clears LOG_ALL (a cancelled migration), which
        // vhost-user-backend's own bitmap ignores. Errors are logged by the dirty log; this
        // message cannot fail.
        let _ = self
            .dirty
            .set_log_all(features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn reset_device(&self) {
        info!("port {}: device reset", self.relay.name);
        self.acked.store(0, Ordering::Release);
        for i in 0..self.relay.pairs.len() {
            if let Some(mut p) = self.relay.pair(i) {
                p.reset();
            }
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        debug!("port {}: event idx {enabled}", self.relay.name);
    }

    fn update_memory(&self, mem: GuestMemoryAtomicB) -> io::Result<()> {
        // The library replaced the memory inside the atomic we share with it. Every region
        // of it must log into the current dirty log (if migrating): the library gives new
        // regions a bitmap with no log at all. A log that does not cover a new region fails
        // the message (and the connection) rather than corrupt the migrated guest.
        debug!("port {}: memory table updated", self.relay.name);
        check_region_files(&mem.memory())?;
        self.dirty
            .update_memory(&mem.memory())
            .map_err(io::Error::other)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.relay.pairs.len())
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_fds.new_event()
    }

    /// GET_VRING_BASE: the library has already unregistered the queue; taking the pair's lock
    /// waits for a batch in progress to finish, and every batch completes the chains it took,
    /// so no buffer is in flight when the base is read.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(mut pair) = self.relay.pair(queue_index as usize / 2) {
            pair.forget_queue(queue_index as usize);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if u64::from(device_event) == self.vf_event_id() && evset.contains(EventSet::ERROR) {
            if let Some(pair) = self.relay.pair(thread_id) {
                pair.report_vf_error();
            }
        }
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        let Some(stats) = self.relay.stats.pairs.get(thread_id) else {
            return Ok(());
        };
        if u64::from(device_event) == self.counters_event_id() {
            if let Some(mut pair) = self.relay.pair(thread_id) {
                pair.count_vf_drops(stats);
            }
            return Ok(());
        }
        let neg = self.negotiated();
        let mem = self.mem.memory();
        if let Some(mut pair) = self.relay.pair(thread_id) {
            pair.run(rx, tx, &mem, neg, stats);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a valid C string; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"device-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn mem_over(file: File, len: usize) -> GuestMemoryMmapB {
        // vm-memory maps a region larger than its file without complaint (nothing touches
        // it here).
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap()
    }

    #[test]
    fn region_larger_than_file_is_refused() {
        let err = check_region_files(&mem_over(memfd(4096), 16 << 20)).unwrap_err();
        assert!(
            err.to_string().contains("beyond the end of the file"),
            "{err}"
        );
        check_region_files(&mem_over(memfd(16 << 20), 16 << 20)).unwrap();
    }
}
