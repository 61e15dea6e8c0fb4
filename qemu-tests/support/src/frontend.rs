//! A vhost-user frontend session for test programs: what QEMU does to a backend, minus the
//! guest. Built on the vhost crate's `Frontend`; the rings and buffers are the
//! [`driver`](crate::driver) module's, so the same guest-side code serves vhost-user
//! (`vu-frontend`) and vhost-vdpa (`vdpa-probe`).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};

use crate::driver::{DriverError, DriverMemory, DriverQueue, RingLayout};

pub use crate::features::{
    VHOST_F_LOG_ALL, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
};
/// Dirty log granularity (vhost-user: one bit per 4 KiB page of guest physical memory).
pub const LOG_PAGE: u64 = 4096;

/// A dirty-page log as QEMU shares it during migration: a memfd, one bit per guest page.
pub struct MigrationLog {
    pub file: File,
    /// The size the frontend announces in SET_LOG_BASE (normally the memfd's length).
    pub size: u64,
}

impl MigrationLog {
    /// A zeroed log covering `mem_size` bytes of guest memory (whole pages of log, as QEMU
    /// allocates it).
    pub fn new(mem_size: u64) -> Result<Self, FrontendError> {
        Self::with_size((mem_size / LOG_PAGE).div_ceil(8).div_ceil(LOG_PAGE) * LOG_PAGE)
    }

    /// A zeroed log of exactly `size` bytes.
    pub fn with_size(size: u64) -> Result<Self, FrontendError> {
        // SAFETY: a static name and flags; the fd is checked and owned below.
        let fd = unsafe { libc::memfd_create(c"vu-frontend-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(FrontendError::Backend(format!(
                "memfd_create: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: fd is fresh and ours.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|e| FrontendError::Backend(format!("log memfd: {e}")))?;
        Ok(MigrationLog { file, size })
    }

    /// The guest pages marked dirty so far.
    pub fn pages(&self) -> Result<BTreeSet<u64>, FrontendError> {
        let mut bytes = vec![0u8; self.size as usize];
        self.file
            .read_exact_at(&mut bytes, 0)
            .map_err(|e| FrontendError::Backend(format!("reading the log: {e}")))?;
        let mut pages = BTreeSet::new();
        for (i, b) in bytes.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pages.insert(i as u64 * 8 + bit);
                }
            }
        }
        Ok(pages)
    }

    /// Clears the log, as QEMU does when it collects the bits.
    pub fn clear(&self) -> Result<(), FrontendError> {
        self.file
            .write_all_at(&vec![0u8; self.size as usize], 0)
            .map_err(|e| FrontendError::Backend(format!("clearing the log: {e}")))
    }

    /// SET_LOG_BASE's payload for this log.
    pub fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.size,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

/// Errors of a frontend session: the vhost-user request that failed, or the driver side.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("vhost-user {what}: {source}")]
    Request {
        what: String,
        #[source]
        source: vhost::Error,
    },
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: vhost::Error,
    },
    #[error("backend: {0}")]
    Backend(String),
    #[error(transparent)]
    Driver(#[from] DriverError),
}

fn req(what: impl Into<String>) -> impl FnOnce(vhost::Error) -> FrontendError {
    let what = what.into();
    move |source| FrontendError::Request { what, source }
}

/// SET_VRING_ADDR's payload for a ring at `l` in memory mapped at `hva`: addresses as the
/// frontend's own virtual addresses, as QEMU sends them; with `log`, the LOG flag and the
/// used ring's guest address as log address (what QEMU sends when it turns logging on).
pub fn vring_config(hva: u64, l: RingLayout, size: u16, log: bool) -> VringConfigData {
    VringConfigData {
        queue_max_size: size,
        queue_size: size,
        flags: u32::from(log), // VHOST_VRING_F_LOG
        desc_table_addr: hva + l.desc,
        used_ring_addr: hva + l.used,
        avail_ring_addr: hva + l.avail,
        log_addr: log.then_some(l.used),
    }
}

/// A negotiated vhost-user session with its queues.
pub struct VuSession {
    pub fe: Frontend,
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub queues: Vec<DriverQueue>,
    pairs: usize,
}

impl VuSession {
    /// Connects to `socket` and negotiates `want` (masked with what the backend offers;
    /// VERSION_1 is required) for `pairs` queue pairs.
    pub fn connect(socket: &Path, pairs: usize, want: u64) -> Result<Self, FrontendError> {
        let fe = Frontend::connect(socket, (2 * pairs) as u64).map_err(|source| {
            FrontendError::Connect {
                path: socket.display().to_string(),
                source,
            }
        })?;
        Self::negotiate(fe, pairs, want)
    }

    /// Negotiation on an already connected frontend, with the protocol features this
    /// module uses (MQ, REPLY_ACK, CONFIG, RESET_DEVICE, LOG_SHMFD for
    /// [`start_logging`](Self::start_logging)) as far as the backend has them.
    pub fn negotiate(fe: Frontend, pairs: usize, want: u64) -> Result<Self, FrontendError> {
        Self::negotiate_with(
            fe,
            pairs,
            want,
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::RESET_DEVICE
                | VhostUserProtocolFeatures::LOG_SHMFD,
        )
    }

    /// Negotiation acking `protocol_want` of the protocol features the backend offers.
    pub fn negotiate_with(
        mut fe: Frontend,
        pairs: usize,
        want: u64,
        protocol_want: VhostUserProtocolFeatures,
    ) -> Result<Self, FrontendError> {
        fe.set_owner().map_err(req("SET_OWNER"))?;
        let offered = fe.get_features().map_err(req("GET_FEATURES"))?;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(FrontendError::Backend(format!(
                "offers no VERSION_1 (features {offered:#x})"
            )));
        }
        let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = offered & (want | proto | VIRTIO_F_VERSION_1);
        fe.set_features(features).map_err(req("SET_FEATURES"))?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & proto != 0 {
            let pf = fe
                .get_protocol_features()
                .map_err(req("GET_PROTOCOL_FEATURES"))?;
            protocol = pf & protocol_want;
            fe.set_protocol_features(protocol)
                .map_err(req("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                let n = fe.get_queue_num().map_err(req("GET_QUEUE_NUM"))?;
                if n < (2 * pairs) as u64 {
                    return Err(FrontendError::Backend(format!(
                        "has {n} queues, {pairs} pairs wanted"
                    )));
                }
            }
        }
        Ok(VuSession {
            fe,
            features,
            protocol,
            queues: Vec::new(),
            pairs,
        })
    }

    /// SET_MEM_TABLE with `mem` as the only region (guest address 0).
    pub fn set_mem_table(&self, mem: &DriverMemory) -> Result<(), FrontendError> {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.size,
            userspace_addr: mem.host_base()?,
            mmap_offset: 0,
            mmap_handle: mem.memfd.as_raw_fd(),
        };
        self.fe
            .set_mem_table(&[region])
            .map_err(req("SET_MEM_TABLE"))?;
        Ok(())
    }

    /// Sets up and enables every queue with fresh zeroed rings of `size` entries, queue `i`
    /// at `ring_base + i * 64 KiB`, starting at index 0. Ring addresses are sent as this
    /// process's virtual addresses, as QEMU sends them.
    pub fn start_queues(
        &mut self,
        mem: &DriverMemory,
        ring_base: u64,
        size: u16,
    ) -> Result<(), FrontendError> {
        self.queues.clear();
        let hva = mem.host_base()?;
        for i in 0..2 * self.pairs {
            let q = DriverQueue::new(&mem.mem, i, ring_base + i as u64 * 0x1_0000, size)?;
            let cfg = vring_config(hva, q.layout, size, false);
            let fe = &mut self.fe;
            fe.set_vring_num(i, size)
                .map_err(req(format!("SET_VRING_NUM {i}")))?;
            fe.set_vring_addr(i, &cfg)
                .map_err(req(format!("SET_VRING_ADDR {i}")))?;
            fe.set_vring_base(i, 0)
                .map_err(req(format!("SET_VRING_BASE {i}")))?;
            fe.set_vring_call(i, &q.call)
                .map_err(req(format!("SET_VRING_CALL {i}")))?;
            fe.set_vring_kick(i, &q.kick)
                .map_err(req(format!("SET_VRING_KICK {i}")))?;
            fe.set_vring_enable(i, true)
                .map_err(req(format!("SET_VRING_ENABLE {i}")))?;
            self.queues.push(q);
        }
        Ok(())
    }

    /// Stops every queue as QEMU does when the guest resets the NIC (GET_VRING_BASE), then
    /// RESET_DEVICE if the backend has it; returns the bases the backend reported.
    pub fn stop_queues(&mut self) -> Result<Vec<u32>, FrontendError> {
        let mut bases = Vec::new();
        for i in 0..self.queues.len() {
            bases.push(
                self.fe
                    .get_vring_base(i)
                    .map_err(req(format!("GET_VRING_BASE {i}")))?,
            );
        }
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            self.fe.reset_device().map_err(req("RESET_DEVICE"))?;
        }
        Ok(bases)
    }

    /// What QEMU does when a migration starts: SET_LOG_BASE with the log, then SET_FEATURES
    /// with LOG_ALL.
    pub fn start_logging(&mut self, log: &MigrationLog) -> Result<(), FrontendError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD) {
            return Err(FrontendError::Backend("offers no LOG_SHMFD".into()));
        }
        self.fe
            .set_log_base(0, Some(log.region()))
            .map_err(req("SET_LOG_BASE"))?;
        self.set_features_acked(self.features | VHOST_F_LOG_ALL, "SET_FEATURES with LOG_ALL")
    }

    /// SET_FEATURES waiting for the backend's ack, as QEMU does when it switches logging:
    /// when this returns the backend logs (or has stopped logging).
    fn set_features_acked(&mut self, features: u64, what: &str) -> Result<(), FrontendError> {
        let need_reply = self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        if need_reply {
            self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let r = self.fe.set_features(features).map_err(req(what));
        self.fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        r
    }

    /// A migration cancelled (or done without the guest moving): LOG_ALL off again.
    pub fn stop_logging(&mut self) -> Result<(), FrontendError> {
        self.set_features_acked(self.features, "SET_FEATURES without LOG_ALL")
    }

    /// The first `len` bytes of the device config space, if the backend offers CONFIG.
    pub fn config(&mut self, len: u32) -> Result<Option<Vec<u8>>, FrontendError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(None);
        }
        let buf = vec![0u8; len as usize];
        let (_, data) = self
            .fe
            .get_config(0, len, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(req("GET_CONFIG"))?;
        Ok(Some(data))
    }
}
