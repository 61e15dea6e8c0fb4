//! The vhost-vdpa device as the session sees it: a trait over the ioctls the session needs,
//! so the session and shadow logic run against a mock in unit tests, and its implementation
//! on the vhost crate's [`VhostKernVdpa`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use vhost::vdpa::VhostVdpa;
use vhost::vhost_kern::vdpa::VhostKernVdpa;
use vhost::vhost_kern::vhost_binding::{
    VHOST_BACKEND_F_IOTLB_BATCH, VHOST_BACKEND_F_IOTLB_MSG_V2, VHOST_BACKEND_F_SUSPEND,
};
use vhost::vhost_kern::VhostKernFeatures;
use vhost::{VhostBackend, VhostIotlbBackend, VhostIotlbMsg, VhostIotlbType, VringConfigData};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// vhost backend feature masks (the bindings give bit numbers, linux/vhost_types.h).
pub const BACKEND_F_IOTLB_MSG_V2: u64 = 1 << VHOST_BACKEND_F_IOTLB_MSG_V2;
pub const BACKEND_F_IOTLB_BATCH: u64 = 1 << VHOST_BACKEND_F_IOTLB_BATCH;
pub const BACKEND_F_SUSPEND: u64 = 1 << VHOST_BACKEND_F_SUSPEND;
/// The only backend features we ack: the IOTLB message format and batching the memory
/// table's updates, and SUSPEND to stop a device cleanly before reading its rings.
pub const WANTED_BACKEND_FEATURES: u64 =
    BACKEND_F_IOTLB_MSG_V2 | BACKEND_F_IOTLB_BATCH | BACKEND_F_SUSPEND;

/// What the session needs from a vhost-vdpa device. Addresses given to the device are IOVAs
/// (here always guest physical addresses, or our shadow rings' IOVAs); `va` in `dma_map` is
/// an address in this process.
pub trait VdpaDevice: Send {
    fn features(&self) -> io::Result<u64>;
    fn set_features(&mut self, features: u64) -> io::Result<()>;
    /// Backend features acked at open time.
    fn backend_features(&self) -> u64;
    fn status(&self) -> io::Result<u8>;
    fn set_status(&mut self, status: u8) -> io::Result<()>;
    fn config(&self, offset: u32, buf: &mut [u8]) -> io::Result<()>;
    fn config_size(&self) -> io::Result<u32>;
    fn max_vring_num(&self) -> io::Result<u16>;
    /// First and last IOVA the device can map.
    fn iova_range(&self) -> io::Result<(u64, u64)>;
    fn dma_map(&mut self, iova: u64, size: u64, va: u64) -> io::Result<()>;
    fn dma_unmap(&mut self, iova: u64, size: u64) -> io::Result<()>;
    /// Start (true) or end an IOTLB batch; a no-op when batching was not acked.
    fn iotlb_batch(&mut self, begin: bool) -> io::Result<()>;
    fn set_vring_num(&mut self, q: usize, num: u16) -> io::Result<()>;
    fn set_vring_addr(
        &mut self,
        q: usize,
        num: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> io::Result<()>;
    fn set_vring_base(&mut self, q: usize, base: u16) -> io::Result<()>;
    fn set_vring_kick(&mut self, q: usize, fd: &EventFd) -> io::Result<()>;
    fn set_vring_call(&mut self, q: usize, fd: &EventFd) -> io::Result<()>;
    fn set_vring_enable(&mut self, q: usize, on: bool) -> io::Result<()>;
    /// VHOST_VDPA_SUSPEND; only called when the SUSPEND backend feature was acked.
    fn suspend(&mut self) -> io::Result<()>;

    /// The device's own MAC address (the first 6 bytes of its config space), if it offers
    /// VIRTIO_NET_F_MAC. The NIC behind it receives for this address, so the guest must be
    /// given the same one.
    fn mac(&self) -> io::Result<Option<[u8; 6]>> {
        if self.features()? & (1 << VIRTIO_NET_F_MAC) == 0 {
            return Ok(None);
        }
        let mut mac = [0u8; 6];
        self.config(0, &mut mac)?;
        Ok(Some(mac))
    }
}

/// Why a vhost-vdpa device cannot be used; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("vDPA device {path} does not exist: create it with `vdpa dev add` and make sure the vhost_vdpa module is loaded and bound (see docs/vdpa.md)")]
    Missing { path: PathBuf },
    #[error("vDPA device {path} is busy: another process (a QEMU with a vhost-vdpa netdev, another vhost-relay) has it open")]
    Busy { path: PathBuf },
    #[error("vDPA device {path}: permission denied (run as root or give this user access to the device node)")]
    Permission { path: PathBuf },
    #[error("vDPA device {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("{path} is not a vhost-vdpa device (bind the vDPA device to the vhost_vdpa driver; see docs/vdpa.md)")]
    NotVdpa { path: PathBuf },
    #[error("vDPA device {path} is not a virtio-net device (virtio device id {id})")]
    NotNet { path: PathBuf, id: u32 },
}

/// A kernel vhost-vdpa device (`/dev/vhost-vdpa-N`), opened and owned by this process.
pub struct KernelDevice {
    inner: VhostKernVdpa<GuestMemoryAtomic<GuestMemoryMmap<()>>>,
}

fn vhost_io(e: vhost::Error) -> io::Error {
    match e {
        vhost::Error::IoctlError(e) | vhost::Error::IOError(e) | vhost::Error::VhostOpen(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// The two steps of taking a device whose errno says something a person can act on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OpenStep {
    Open,
    SetOwner,
}

/// The error for a failed open or VHOST_SET_OWNER: errno says whether the node is missing,
/// taken, forbidden or not a vhost-vdpa device.
fn open_error(path: &Path, step: OpenStep, e: io::Error) -> OpenError {
    let path = path.to_path_buf();
    let opening = step == OpenStep::Open;
    match e.raw_os_error() {
        Some(libc::EBUSY) => OpenError::Busy { path },
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) if opening => OpenError::Missing { path },
        Some(libc::EACCES | libc::EPERM) if opening => OpenError::Permission { path },
        // A character device that takes no vhost ioctls.
        Some(libc::ENOTTY | libc::EINVAL) if !opening => OpenError::NotVdpa { path },
        _ => OpenError::Io {
            path,
            what: if opening { "open" } else { "VHOST_SET_OWNER" },
            source: e,
        },
    }
}

impl KernelDevice {
    /// Opens the device, takes ownership of it (VHOST_SET_OWNER), checks it is a virtio-net
    /// device and acks the backend features we use that it offers.
    pub fn open(path: &Path) -> Result<KernelDevice, OpenError> {
        let p = || path.to_path_buf();
        let s = path.to_str().ok_or_else(|| OpenError::Io {
            path: p(),
            what: "path",
            source: io::Error::new(io::ErrorKind::InvalidInput, "not UTF-8"),
        })?;
        // The vhost crate ignores the memory for vhost-vdpa (ring addresses are IOVAs).
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut inner = VhostKernVdpa::new(s, mem)
            .map_err(|e| open_error(path, OpenStep::Open, vhost_io(e)))?;
        let io = |what: &'static str| {
            move |e: vhost::Error| OpenError::Io {
                path: path.to_path_buf(),
                what,
                source: vhost_io(e),
            }
        };
        inner
            .set_owner()
            .map_err(|e| open_error(path, OpenStep::SetOwner, vhost_io(e)))?;
        let id = inner
            .get_device_id()
            .map_err(io("VHOST_VDPA_GET_DEVICE_ID"))?;
        if id != VIRTIO_ID_NET {
            return Err(OpenError::NotNet { path: p(), id });
        }
        let offered = inner
            .get_backend_features()
            .map_err(io("VHOST_GET_BACKEND_FEATURES"))?;
        inner
            .set_backend_features(offered & WANTED_BACKEND_FEATURES)
            .map_err(io("VHOST_SET_BACKEND_FEATURES"))?;
        // Start from a reset device whatever an earlier user left behind.
        inner.set_status(0).map_err(io("VHOST_VDPA_SET_STATUS 0"))?;
        Ok(KernelDevice { inner })
    }

    fn iotlb(&self, msg_type: VhostIotlbType) -> io::Result<()> {
        let msg = VhostIotlbMsg {
            msg_type,
            ..Default::default()
        };
        self.inner.send_iotlb_msg(&msg).map_err(vhost_io)
    }
}

impl AsRawFd for KernelDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl VdpaDevice for KernelDevice {
    fn features(&self) -> io::Result<u64> {
        self.inner.get_features().map_err(vhost_io)
    }
    fn set_features(&mut self, features: u64) -> io::Result<()> {
        self.inner.set_features(features).map_err(vhost_io)
    }
    fn backend_features(&self) -> u64 {
        self.inner.get_backend_features_acked()
    }
    fn status(&self) -> io::Result<u8> {
        self.inner.get_status().map_err(vhost_io)
    }
    fn set_status(&mut self, status: u8) -> io::Result<()> {
        self.inner.set_status(status).map_err(vhost_io)
    }
    fn config(&self, offset: u32, buf: &mut [u8]) -> io::Result<()> {
        self.inner.get_config(offset, buf).map_err(vhost_io)
    }
    fn config_size(&self) -> io::Result<u32> {
        self.inner.get_config_size().map_err(vhost_io)
    }
    fn max_vring_num(&self) -> io::Result<u16> {
        self.inner.get_vring_num().map_err(vhost_io)
    }
    fn iova_range(&self) -> io::Result<(u64, u64)> {
        let r = self.inner.get_iova_range().map_err(vhost_io)?;
        Ok((r.first, r.last))
    }
    fn dma_map(&mut self, iova: u64, size: u64, va: u64) -> io::Result<()> {
        self.inner
            .dma_map(iova, size, va as *const u8, false)
            .map_err(vhost_io)
    }
    fn dma_unmap(&mut self, iova: u64, size: u64) -> io::Result<()> {
        self.inner.dma_unmap(iova, size).map_err(vhost_io)
    }
    fn iotlb_batch(&mut self, begin: bool) -> io::Result<()> {
        if self.backend_features() & BACKEND_F_IOTLB_BATCH == 0 {
            return Ok(());
        }
        self.iotlb(if begin {
            VhostIotlbType::BatchBegin
        } else {
            VhostIotlbType::BatchEnd
        })
    }
    fn set_vring_num(&mut self, q: usize, num: u16) -> io::Result<()> {
        self.inner.set_vring_num(q, num).map_err(vhost_io)
    }
    fn set_vring_addr(
        &mut self,
        q: usize,
        num: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> io::Result<()> {
        let cfg = VringConfigData {
            queue_max_size: num,
            queue_size: num,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: used,
            avail_ring_addr: avail,
            log_addr: None,
        };
        // The inherent method: it passes IOVAs through, where the VhostBackend one would
        // translate them as guest addresses of the (empty) memory we gave the crate.
        self.inner.set_vring_addr(q, &cfg).map_err(vhost_io)
    }
    fn set_vring_base(&mut self, q: usize, base: u16) -> io::Result<()> {
        self.inner.set_vring_base(q, base).map_err(vhost_io)
    }
    fn set_vring_kick(&mut self, q: usize, fd: &EventFd) -> io::Result<()> {
        self.inner.set_vring_kick(q, fd).map_err(vhost_io)
    }
    fn set_vring_call(&mut self, q: usize, fd: &EventFd) -> io::Result<()> {
        self.inner.set_vring_call(q, fd).map_err(vhost_io)
    }
    fn set_vring_enable(&mut self, q: usize, on: bool) -> io::Result<()> {
        self.inner.set_vring_enable(q, on).map_err(vhost_io)
    }
    fn suspend(&mut self) -> io::Result<()> {
        self.inner.suspend().map_err(vhost_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which error a person gets, by its variant (and the step for `Io`).
    fn kind(step: OpenStep, errno: i32) -> &'static str {
        let e = open_error(
            Path::new("/dev/vhost-vdpa-0"),
            step,
            io::Error::from_raw_os_error(errno),
        );
        match e {
            OpenError::Missing { .. } => "missing",
            OpenError::Busy { .. } => "busy",
            OpenError::Permission { .. } => "permission",
            OpenError::NotVdpa { .. } => "not vdpa",
            OpenError::Io { what, .. } => what,
            OpenError::NotNet { .. } => "not net",
        }
    }

    #[test]
    fn open_and_set_owner_errnos_say_what_to_do() {
        use OpenStep::{Open, SetOwner};
        let table = [
            (Open, libc::ENOENT, "missing"),
            (Open, libc::ENXIO, "missing"),
            (Open, libc::EBUSY, "busy"),
            (Open, libc::EACCES, "permission"),
            (Open, libc::ENOTTY, "open"),
            (SetOwner, libc::EBUSY, "busy"),
            (SetOwner, libc::ENOTTY, "not vdpa"),
            (SetOwner, libc::EINVAL, "not vdpa"),
            (SetOwner, libc::ENOENT, "VHOST_SET_OWNER"),
        ];
        for (step, errno, want) in table {
            assert_eq!(kind(step, errno), want, "errno {errno}");
        }
    }
}
