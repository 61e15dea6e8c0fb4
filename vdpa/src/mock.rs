//! A vhost-vdpa device in userspace for unit tests: it keeps what the session told it, and
//! on request works its rings like a virtio-net device would (reading through the IOTLB the
//! session gave it), so tests see what reaches the "hardware".

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use crate::device::VdpaDevice;

const DRIVER_OK: u8 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8;
const FAILED: u8 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED as u8;

#[derive(Default)]
pub struct MockRing {
    pub num: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub base: u16,
    pub kick_fd: i32,
    pub call: Option<EventFd>,
    pub enabled: bool,
    /// Device-side indices, valid while DRIVER_OK.
    pub last_avail: u16,
    pub last_used: u16,
}

#[derive(Default)]
pub struct MockState {
    pub features: u64,
    pub backend_features: u64,
    pub acked: u64,
    pub status: u8,
    pub iotlb: Vec<(u64, u64, u64)>,
    pub rings: [MockRing; 2],
    pub resets: usize,
    pub suspends: usize,
    /// Each DRIVER_OK, with which rings were enabled then (DPDK's VDUSE device waits for
    /// every ring and aborts a start with one not enabled).
    pub starts: Vec<[bool; 2]>,
    pub config: Vec<u8>,
    /// Every IOVA range the device wrote: (iova, len).
    pub written: Vec<(u64, u64)>,
    /// Heads the device completed, per queue, in order.
    pub completed: [Vec<u16>; 2],
    /// Refuse DRIVER_OK (a broken device).
    pub fail_driver_ok: bool,
}

#[derive(Clone, Default)]
pub struct MockDevice(pub Arc<Mutex<MockState>>);

impl MockDevice {
    pub fn new(features: u64, backend_features: u64) -> MockDevice {
        let d = MockDevice::default();
        {
            let mut s = d.state();
            s.features = features;
            s.backend_features = backend_features;
            // MAC 52:54:00:12:34:56, status up, one pair, MTU 1500.
            s.config = vec![0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0xdc, 0x05];
        }
        d
    }

    pub fn state(&self) -> MutexGuard<'_, MockState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Works up to `max` available buffers of queue `q`: rx (even) fills each writable chain
    /// with `rx_len` bytes, tx (odd) just completes. Returns how many it completed.
    pub fn process(&self, q: usize, max: usize, rx_len: u32) -> usize {
        let mut s = self.state();
        if s.status & DRIVER_OK == 0 || !s.rings[q].enabled {
            return 0;
        }
        let mut done = 0;
        while done < max {
            let r = &s.rings[q];
            let (num, desc, avail, used) = (r.num, r.desc, r.avail, r.used);
            let idx = s.read16(avail + 2);
            if idx == s.rings[q].last_avail {
                break;
            }
            let slot = u64::from(s.rings[q].last_avail % num);
            let head = s.read16(avail + 4 + 2 * slot);
            let mut i = head;
            let mut left = if q.is_multiple_of(2) { rx_len } else { 0 };
            let mut wrote = 0u32;
            loop {
                let d = desc + 16 * u64::from(i);
                let addr = s.read64(d);
                let len = s.read32(d + 8);
                let flags = s.read16(d + 12);
                let next = s.read16(d + 14);
                if flags & 2 != 0 && left > 0 {
                    let n = left.min(len);
                    s.fill(addr, n, 0xab);
                    s.written.push((addr, u64::from(n)));
                    left -= n;
                    wrote += n;
                }
                if flags & 1 == 0 {
                    break;
                }
                i = next;
            }
            let uslot = u64::from(s.rings[q].last_used % num);
            s.write32(used + 4 + 8 * uslot, u32::from(head));
            s.write32(used + 8 + 8 * uslot, wrote);
            s.written.push((used + 4 + 8 * uslot, 8));
            s.rings[q].last_avail = s.rings[q].last_avail.wrapping_add(1);
            s.rings[q].last_used = s.rings[q].last_used.wrapping_add(1);
            let lu = s.rings[q].last_used;
            s.write16(used + 2, lu);
            s.written.push((used + 2, 2));
            s.completed[q].push(head);
            done += 1;
        }
        if done > 0 {
            if let Some(c) = &s.rings[q].call {
                let _ = c.write(1);
            }
        }
        done
    }
}

impl MockState {
    fn host(&self, iova: u64, len: u64) -> *mut u8 {
        for &(start, size, va) in &self.iotlb {
            if iova >= start && iova + len <= start + size {
                return (va + (iova - start)) as *mut u8;
            }
        }
        panic!("mock device: IOVA {iova:#x}+{len} not mapped");
    }
    fn read16(&self, iova: u64) -> u16 {
        // SAFETY: test memory mapped by the session; host() checked the range.
        unsafe { std::ptr::read_volatile(self.host(iova, 2) as *const u16) }
    }
    fn read32(&self, iova: u64) -> u32 {
        // SAFETY: as above.
        unsafe { std::ptr::read_volatile(self.host(iova, 4) as *const u32) }
    }
    fn read64(&self, iova: u64) -> u64 {
        // SAFETY: as above.
        unsafe { std::ptr::read_volatile(self.host(iova, 8) as *const u64) }
    }
    fn write16(&self, iova: u64, v: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(self.host(iova, 2) as *mut u16, v) }
    }
    fn write32(&self, iova: u64, v: u32) {
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(self.host(iova, 4) as *mut u32, v) }
    }
    fn fill(&self, iova: u64, len: u32, b: u8) {
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(self.host(iova, u64::from(len)), b, len as usize) }
    }
}

impl VdpaDevice for MockDevice {
    fn features(&self) -> io::Result<u64> {
        Ok(self.state().features)
    }
    fn set_features(&mut self, features: u64) -> io::Result<()> {
        let mut s = self.state();
        if s.status & 8 != 0 {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        s.acked = features;
        Ok(())
    }
    fn backend_features(&self) -> u64 {
        self.state().backend_features
    }
    fn status(&self) -> io::Result<u8> {
        Ok(self.state().status)
    }
    fn set_status(&mut self, status: u8) -> io::Result<()> {
        let mut s = self.state();
        if status == 0 {
            s.resets += 1;
            s.status = 0;
            for r in s.rings.iter_mut() {
                r.enabled = false;
                r.last_avail = 0;
                r.last_used = 0;
            }
            return Ok(());
        }
        if status & DRIVER_OK != 0 && s.status & DRIVER_OK == 0 {
            if s.fail_driver_ok {
                s.status = status & !DRIVER_OK | FAILED;
                return Ok(());
            }
            let enabled = [s.rings[0].enabled, s.rings[1].enabled];
            s.starts.push(enabled);
            for r in s.rings.iter_mut() {
                r.last_avail = r.base;
                r.last_used = r.base;
            }
        }
        s.status = status;
        Ok(())
    }
    fn config(&self, offset: u32, buf: &mut [u8]) -> io::Result<()> {
        let s = self.state();
        let src = s
            .config
            .get(offset as usize..offset as usize + buf.len())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn config_size(&self) -> io::Result<u32> {
        Ok(self.state().config.len() as u32)
    }
    fn max_vring_num(&self) -> io::Result<u16> {
        Ok(256)
    }
    fn iova_range(&self) -> io::Result<(u64, u64)> {
        Ok((0, u64::MAX))
    }
    fn dma_map(&mut self, iova: u64, size: u64, va: u64) -> io::Result<()> {
        let mut s = self.state();
        if s.iotlb
            .iter()
            .any(|&(i, sz, _)| iova < i + sz && i < iova + size)
        {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        s.iotlb.push((iova, size, va));
        Ok(())
    }
    fn dma_unmap(&mut self, iova: u64, size: u64) -> io::Result<()> {
        self.state()
            .iotlb
            .retain(|&(i, sz, _)| !(i >= iova && i + sz <= iova + size));
        Ok(())
    }
    fn iotlb_batch(&mut self, _begin: bool) -> io::Result<()> {
        Ok(())
    }
    fn set_vring_num(&mut self, q: usize, num: u16) -> io::Result<()> {
        self.state().rings[q].num = num;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        q: usize,
        _num: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> io::Result<()> {
        let mut s = self.state();
        let r = &mut s.rings[q];
        (r.desc, r.avail, r.used) = (desc, avail, used);
        Ok(())
    }
    fn set_vring_base(&mut self, q: usize, base: u16) -> io::Result<()> {
        self.state().rings[q].base = base;
        Ok(())
    }
    fn set_vring_kick(&mut self, q: usize, fd: &EventFd) -> io::Result<()> {
        self.state().rings[q].kick_fd = fd.as_raw_fd();
        Ok(())
    }
    fn set_vring_call(&mut self, q: usize, fd: &EventFd) -> io::Result<()> {
        self.state().rings[q].call = Some(fd.try_clone()?);
        Ok(())
    }
    fn set_vring_enable(&mut self, q: usize, on: bool) -> io::Result<()> {
        self.state().rings[q].enabled = on;
        Ok(())
    }
    fn suspend(&mut self) -> io::Result<()> {
        self.state().suspends += 1;
        Ok(())
    }
}
