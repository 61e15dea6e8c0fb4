//! VDUSE (vDPA Device in Userspace) as of Linux 6.12, for the `vduse-net` test fixture.
//!
//! The kernel's `include/uapi/linux/vduse.h` (API version 0) has no Rust binding in the
//! rust-vmm crates, so its few structures are declared here with their C layout (checked by
//! unit tests) and wrapped in methods that return errors naming the operation. A VDUSE device
//! is made through `/dev/vduse/control`; its own char device `/dev/vduse/NAME` then carries
//! the per-device ioctls and, with read()/write(), the control messages the kernel sends
//! when the vDPA driver (here vhost-vdpa) changes the status, asks for a ring's state or
//! changes the IOTLB.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

const VDUSE_BASE: u32 = 0x81;
/// Longest device name, NUL included.
pub const VDUSE_NAME_MAX: usize = 256;

/// `struct vduse_dev_config` without its flexible `config[]` tail (API version 0: the 6.12
/// layout, where the later `ngroups`/`nas` fields are still part of `reserved`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DevConfig {
    pub name: [u8; VDUSE_NAME_MAX],
    pub vendor_id: u32,
    pub device_id: u32,
    pub features: u64,
    pub vq_num: u32,
    pub vq_align: u32,
    pub reserved: [u32; 13],
    pub config_size: u32,
}

/// `DevConfig` followed by the device's config space, as VDUSE_CREATE_DEV reads it.
#[repr(C)]
struct DevConfigWithSpace<const N: usize> {
    head: DevConfig,
    config: [u8; N],
}

/// `struct vduse_vq_config`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct VqConfig {
    pub index: u32,
    pub max_size: u16,
    pub reserved: [u16; 13],
}

/// `struct vduse_vq_info` (split-ring view of its union).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct VqInfo {
    pub index: u32,
    pub num: u32,
    pub desc_addr: u64,
    pub driver_addr: u64,
    pub device_addr: u64,
    /// `split.avail_index`, or the first field of the packed state.
    pub avail_index: u16,
    pub packed_rest: [u16; 3],
    pub ready: u8,
}

/// `struct vduse_vq_eventfd`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct VqEventfd {
    pub index: u32,
    pub fd: i32,
}

/// `struct vduse_iotlb_entry`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IotlbEntry {
    pub offset: u64,
    pub start: u64,
    pub last: u64,
    pub perm: u8,
}

pub const VDUSE_ACCESS_RO: u8 = 1;
pub const VDUSE_ACCESS_WO: u8 = 2;

ioctl_ior_nr!(VDUSE_GET_API_VERSION, VDUSE_BASE, 0x00, u64);
ioctl_iow_nr!(VDUSE_SET_API_VERSION, VDUSE_BASE, 0x01, u64);
ioctl_iow_nr!(VDUSE_CREATE_DEV, VDUSE_BASE, 0x02, DevConfig);
ioctl_iow_nr!(VDUSE_DESTROY_DEV, VDUSE_BASE, 0x03, [u8; VDUSE_NAME_MAX]);
ioctl_iowr_nr!(VDUSE_IOTLB_GET_FD, VDUSE_BASE, 0x10, IotlbEntry);
ioctl_ior_nr!(VDUSE_DEV_GET_FEATURES, VDUSE_BASE, 0x11, u64);
ioctl_iow_nr!(VDUSE_VQ_SETUP, VDUSE_BASE, 0x14, VqConfig);
ioctl_iowr_nr!(VDUSE_VQ_GET_INFO, VDUSE_BASE, 0x15, VqInfo);
ioctl_iow_nr!(VDUSE_VQ_SETUP_KICKFD, VDUSE_BASE, 0x16, VqEventfd);
ioctl_iow_nr!(VDUSE_VQ_INJECT_IRQ, VDUSE_BASE, 0x17, u32);

/// `enum vduse_req_type`.
pub const VDUSE_GET_VQ_STATE: u32 = 0;
pub const VDUSE_SET_STATUS: u32 = 1;
pub const VDUSE_UPDATE_IOTLB: u32 = 2;

pub const VDUSE_REQ_RESULT_OK: u32 = 0;
pub const VDUSE_REQ_RESULT_FAILED: u32 = 1;

/// Size of `struct vduse_dev_request` and of `struct vduse_dev_response`.
pub const MSG_SIZE: usize = 4 + 4 + 16 + 128;

/// A control message read from `/dev/vduse/NAME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// The driver wants ring `index`'s state (VHOST_GET_VRING_BASE): reply with its next
    /// available index.
    GetVqState { id: u32, index: u32 },
    /// The driver wrote the device status (0 is a reset).
    SetStatus { id: u32, status: u8 },
    /// Mappings of IOVAs `[start, last]` changed: forget ours and fetch them again.
    UpdateIotlb { id: u32, start: u64, last: u64 },
    /// A request type this fixture does not know; answered FAILED.
    Unknown { id: u32, kind: u32 },
}

impl Request {
    /// Decodes a `struct vduse_dev_request`.
    pub fn parse(b: &[u8; MSG_SIZE]) -> Request {
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        let (kind, id) = (u32_at(0), u32_at(4));
        // The union starts after type, request_id and reserved[4].
        const U: usize = 24;
        match kind {
            VDUSE_GET_VQ_STATE => Request::GetVqState {
                id,
                index: u32_at(U),
            },
            VDUSE_SET_STATUS => Request::SetStatus { id, status: b[U] },
            VDUSE_UPDATE_IOTLB => Request::UpdateIotlb {
                id,
                start: u64_at(U),
                last: u64_at(U + 8),
            },
            kind => Request::Unknown { id, kind },
        }
    }

    pub fn id(&self) -> u32 {
        match *self {
            Request::GetVqState { id, .. }
            | Request::SetStatus { id, .. }
            | Request::UpdateIotlb { id, .. }
            | Request::Unknown { id, .. } => id,
        }
    }
}

/// Encodes a `struct vduse_dev_response`; `vq_state` is `(index, avail_index)` for
/// VDUSE_GET_VQ_STATE.
pub fn response(id: u32, ok: bool, vq_state: Option<(u32, u16)>) -> [u8; MSG_SIZE] {
    let mut b = [0u8; MSG_SIZE];
    b[0..4].copy_from_slice(&id.to_ne_bytes());
    let result = if ok {
        VDUSE_REQ_RESULT_OK
    } else {
        VDUSE_REQ_RESULT_FAILED
    };
    b[4..8].copy_from_slice(&result.to_ne_bytes());
    if let Some((index, avail)) = vq_state {
        b[24..28].copy_from_slice(&index.to_ne_bytes());
        b[28..30].copy_from_slice(&avail.to_ne_bytes());
    }
    b
}

/// Errors of the VDUSE layer; each names the operation and the device.
#[derive(Debug, thiserror::Error)]
pub enum VduseError {
    #[error("{op} on {path}: {source}")]
    Os {
        op: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device name {0:?} is empty, too long or contains '/'")]
    BadName(String),
    #[error("kernel VDUSE API version {0} is older than 0")]
    Api(u64),
}

fn os(op: impl Into<String>, path: &Path, source: std::io::Error) -> VduseError {
    VduseError::Os {
        op: op.into(),
        path: path.to_path_buf(),
        source,
    }
}

const CONTROL: &str = "/dev/vduse/control";

/// A VDUSE device: created on [`VduseDevice::create`], destroyed on drop.
#[derive(Debug)]
pub struct VduseDevice {
    name: String,
    control: File,
    dev: std::mem::ManuallyDrop<File>,
    path: PathBuf,
}

impl VduseDevice {
    /// Creates device `name` (virtio `device_id`, offering `features`, `vq_num` queues of at
    /// most `max_size` entries each, config space `config`) and sets up its queues, so that it
    /// is ready for `vdpa dev add`.
    pub fn create<const N: usize>(
        name: &str,
        device_id: u32,
        features: u64,
        vq_num: u32,
        max_size: u16,
        config: [u8; N],
    ) -> Result<VduseDevice, VduseError> {
        if name.is_empty() || name.len() >= VDUSE_NAME_MAX || name.contains('/') {
            return Err(VduseError::BadName(name.into()));
        }
        let cpath = Path::new(CONTROL);
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open(cpath)
            .map_err(|e| os("open (is the vduse module loaded?)", cpath, e))?;
        let mut version = 0u64;
        // SAFETY: the kernel writes one u64 into `version`, which outlives the call.
        let r = unsafe { ioctl_with_mut_ref(&control, VDUSE_GET_API_VERSION(), &mut version) };
        if r < 0 {
            return Err(os("VDUSE_GET_API_VERSION", cpath, last_os()));
        }
        let v0 = 0u64;
        // SAFETY: the kernel reads one u64.
        let r = unsafe { ioctl_with_ref(&control, VDUSE_SET_API_VERSION(), &v0) };
        if r < 0 {
            return Err(os("VDUSE_SET_API_VERSION 0", cpath, last_os()));
        }
        let mut head = DevConfig {
            name: [0; VDUSE_NAME_MAX],
            vendor_id: 0,
            device_id,
            features,
            vq_num,
            vq_align: 4096,
            reserved: [0; 13],
            config_size: N as u32,
        };
        head.name[..name.len()].copy_from_slice(name.as_bytes());
        let cfg = DevConfigWithSpace { head, config };
        // SAFETY: the kernel reads `DevConfig` and then `config_size` bytes after it, all of
        // which `cfg` holds.
        let r = unsafe { ioctl_with_ref(&control, VDUSE_CREATE_DEV(), &cfg) };
        if r < 0 {
            return Err(os(
                format!("VDUSE_CREATE_DEV {name} (features {features:#x})"),
                cpath,
                last_os(),
            ));
        }
        let path = PathBuf::from(format!("/dev/vduse/{name}"));
        let dev = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) => {
                destroy(&control, name);
                return Err(os("open", &path, e));
            }
        };
        let d = VduseDevice {
            name: name.into(),
            control,
            dev: std::mem::ManuallyDrop::new(dev),
            path,
        };
        for index in 0..vq_num {
            let c = VqConfig {
                index,
                max_size,
                ..Default::default()
            };
            // SAFETY: the kernel reads one `VqConfig`.
            let r = unsafe { ioctl_with_ref(&*d.dev, VDUSE_VQ_SETUP(), &c) };
            if r < 0 {
                return Err(os(format!("VDUSE_VQ_SETUP {index}"), &d.path, last_os()));
            }
        }
        Ok(d)
    }

    /// The device's char device, for poll().
    pub fn fd(&self) -> i32 {
        self.dev.as_raw_fd()
    }

    /// Reads one control message, `None` if none is pending (the fd is non-blocking after
    /// [`VduseDevice::set_nonblocking`]).
    pub fn read_request(&mut self) -> Result<Option<Request>, VduseError> {
        let mut b = [0u8; MSG_SIZE];
        match self.dev.read(&mut b) {
            Ok(n) if n == MSG_SIZE => Ok(Some(Request::parse(&b))),
            Ok(n) => Err(os(
                format!("short read of a control message ({n} bytes)"),
                &self.path,
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(os("read", &self.path, e)),
        }
    }

    /// Answers a control message.
    pub fn reply(
        &mut self,
        id: u32,
        ok: bool,
        vq_state: Option<(u32, u16)>,
    ) -> Result<(), VduseError> {
        self.dev
            .write_all(&response(id, ok, vq_state))
            .map_err(|e| os(format!("write reply to request {id}"), &self.path, e))
    }

    pub fn set_nonblocking(&self) -> Result<(), VduseError> {
        // SAFETY: fcntl on an fd we own.
        let r = unsafe {
            let fl = libc::fcntl(self.dev.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(self.dev.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
        };
        if r < 0 {
            return Err(os("fcntl O_NONBLOCK", &self.path, last_os()));
        }
        Ok(())
    }

    /// The features the driver accepted (valid once FEATURES_OK is set).
    pub fn driver_features(&self) -> Result<u64, VduseError> {
        let mut f = 0u64;
        // SAFETY: the kernel writes one u64.
        let r = unsafe { ioctl_with_mut_ref(&*self.dev, VDUSE_DEV_GET_FEATURES(), &mut f) };
        if r < 0 {
            return Err(os("VDUSE_DEV_GET_FEATURES", &self.path, last_os()));
        }
        Ok(f)
    }

    pub fn vq_info(&self, index: u32) -> Result<VqInfo, VduseError> {
        let mut info = VqInfo {
            index,
            ..Default::default()
        };
        // SAFETY: the kernel reads the index and writes one `VqInfo`.
        let r = unsafe { ioctl_with_mut_ref(&*self.dev, VDUSE_VQ_GET_INFO(), &mut info) };
        if r < 0 {
            return Err(os(
                format!("VDUSE_VQ_GET_INFO {index}"),
                &self.path,
                last_os(),
            ));
        }
        Ok(info)
    }

    /// Has the kernel signal `fd` when the driver kicks queue `index` (`fd` -1 removes it).
    pub fn set_kickfd(&self, index: u32, fd: i32) -> Result<(), VduseError> {
        let e = VqEventfd { index, fd };
        // SAFETY: the kernel reads one `VqEventfd`.
        let r = unsafe { ioctl_with_ref(&*self.dev, VDUSE_VQ_SETUP_KICKFD(), &e) };
        if r < 0 {
            return Err(os(
                format!("VDUSE_VQ_SETUP_KICKFD {index}"),
                &self.path,
                last_os(),
            ));
        }
        Ok(())
    }

    /// Interrupts the driver for queue `index` (vhost-vdpa signals the ring's call eventfd).
    pub fn inject_irq(&self, index: u32) -> Result<(), VduseError> {
        // SAFETY: the kernel reads one u32.
        let r = unsafe { ioctl_with_ref(&*self.dev, VDUSE_VQ_INJECT_IRQ(), &index) };
        if r < 0 {
            return Err(os(
                format!("VDUSE_VQ_INJECT_IRQ {index}"),
                &self.path,
                last_os(),
            ));
        }
        Ok(())
    }

    /// The first IOTLB region overlapping `[start, last]`: its entry and the file that
    /// backs it (the file the vhost-vdpa user mapped; mmap it at `entry.offset`), `None` if
    /// no region overlaps.
    pub fn iotlb_fd(
        &self,
        start: u64,
        last: u64,
    ) -> Result<Option<(IotlbEntry, File)>, VduseError> {
        let mut e = IotlbEntry {
            start,
            last,
            ..Default::default()
        };
        // SAFETY: the kernel reads start/last and writes one `IotlbEntry`.
        let r = unsafe { ioctl_with_mut_ref(&*self.dev, VDUSE_IOTLB_GET_FD(), &mut e) };
        if r < 0 {
            let err = last_os();
            if err.raw_os_error() == Some(libc::EINVAL) {
                return Ok(None);
            }
            return Err(os(
                format!("VDUSE_IOTLB_GET_FD [{start:#x}, {last:#x}]"),
                &self.path,
                err,
            ));
        }
        // SAFETY: on success the ioctl returns a new fd that nobody else owns.
        Ok(Some((e, unsafe { File::from_raw_fd(r) })))
    }
}

fn destroy(control: &File, name: &str) {
    let mut n = [0u8; VDUSE_NAME_MAX];
    let len = name.len().min(VDUSE_NAME_MAX - 1);
    n[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: the kernel reads VDUSE_NAME_MAX bytes.
    unsafe { ioctl_with_ref(control, VDUSE_DESTROY_DEV(), &n) };
}

impl Drop for VduseDevice {
    fn drop(&mut self) {
        // The kernel refuses while /dev/vduse/NAME is open, so close it first. (While the
        // device is still on the vDPA bus the destroy fails too: `vdpa dev del` is the
        // caller's job, and the device then stays until the guest goes away.)
        // SAFETY: `dev` is not touched again after this.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.dev) };
        destroy(&self.control, &self.name);
    }
}

fn last_os() -> std::io::Error {
    std::io::Error::last_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<DevConfig>(), 336);
        assert_eq!(std::mem::size_of::<VqConfig>(), 32);
        assert_eq!(std::mem::size_of::<VqInfo>(), 48);
        assert_eq!(std::mem::size_of::<VqEventfd>(), 8);
        assert_eq!(std::mem::size_of::<IotlbEntry>(), 32);
        // _IOW(0x81, 0x02, 336 bytes) and _IOWR(0x81, 0x10, 32 bytes) as the C macros compute.
        assert_eq!(VDUSE_CREATE_DEV(), 0x4150_8102);
        assert_eq!(VDUSE_IOTLB_GET_FD(), 0xc020_8110);
        assert_eq!(VDUSE_VQ_INJECT_IRQ(), 0x4004_8117);
    }

    #[test]
    fn requests_are_decoded() {
        let mut b = [0u8; MSG_SIZE];
        b[0..4].copy_from_slice(&VDUSE_UPDATE_IOTLB.to_ne_bytes());
        b[4..8].copy_from_slice(&7u32.to_ne_bytes());
        b[24..32].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[32..40].copy_from_slice(&u64::MAX.to_ne_bytes());
        assert_eq!(
            Request::parse(&b),
            Request::UpdateIotlb {
                id: 7,
                start: 0x1000,
                last: u64::MAX
            }
        );
        b[0..4].copy_from_slice(&VDUSE_SET_STATUS.to_ne_bytes());
        b[24] = 0x0f;
        assert_eq!(Request::parse(&b), Request::SetStatus { id: 7, status: 15 });
        b[0..4].copy_from_slice(&9u32.to_ne_bytes());
        assert_eq!(Request::parse(&b), Request::Unknown { id: 7, kind: 9 });
        let r = response(7, true, Some((1, 300)));
        assert_eq!(&r[0..8], &[7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&r[24..30], &[1, 0, 0, 0, 0x2c, 0x01]);
        assert_eq!(response(3, false, None)[4], 1);
    }
}
