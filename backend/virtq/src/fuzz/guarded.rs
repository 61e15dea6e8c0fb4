//! Guest memory the way the backend maps it (memfd regions, `MAP_SHARED`, as vhost-user's
//! SET_MEM_TABLE hands them over) with a `PROT_NONE` guard page before and after each region,
//! so any access past a region's end is a SIGSEGV that fails the run instead of reading or
//! corrupting a neighbouring mapping.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vm_memory::bitmap::NewBitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

const PAGE: usize = 4096;

/// Regions of guest memory, each between two guard pages; unmapped on drop. `B` is the dirty
/// bitmap of the memory type under test (the relay's and the shadow relay's: the migration
/// crate's `DirtyBitmap`).
pub struct Guarded<B: NewBitmap> {
    pub mem: GuestMemoryMmap<B>,
    /// (reservation base, reservation length) per region, for munmap.
    maps: Vec<(*mut libc::c_void, usize)>,
    _fds: Vec<OwnedFd>,
}

impl<B: NewBitmap> Guarded<B> {
    /// `regions`: (guest address, page-multiple length).
    pub fn new(regions: &[(u64, usize)]) -> Self {
        let mut g = Guarded {
            mem: GuestMemoryMmap::default(),
            maps: Vec::new(),
            _fds: Vec::new(),
        };
        let mut built = Vec::new();
        for &(gpa, len) in regions {
            assert!(len > 0 && len.is_multiple_of(PAGE), "region length {len}");
            let (host, fd) = g.map_guarded(len);
            // SAFETY: `host` is a fresh MAP_SHARED read/write mapping of `len` bytes that
            // stays mapped until `self` drops, after the GuestMemoryMmap in it.
            let region = unsafe {
                MmapRegion::build_raw(
                    host,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                )
            }
            .expect("raw mmap region");
            built.push(GuestRegionMmap::new(region, GuestAddress(gpa)).expect("guest region"));
            g._fds.push(fd);
        }
        g.mem = GuestMemoryMmap::from_regions(built).expect("guest memory");
        g
    }

    /// Reserves guard + `len` + guard as PROT_NONE and maps a memfd of `len` bytes in between.
    fn map_guarded(&mut self, len: usize) -> (*mut u8, OwnedFd) {
        let total = len + 2 * PAGE;
        // SAFETY: a fresh anonymous reservation, no access.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "reserve guest memory");
        self.maps.push((base, total));
        // SAFETY: memfd_create with a static name; the fd is owned at once.
        let fd = unsafe { libc::memfd_create(c"fuzz-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: `fd` is ours, just created.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: resizing our own memfd.
        assert_eq!(
            unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) },
            0
        );
        // SAFETY: MAP_FIXED over the middle of our own reservation only.
        let host = unsafe {
            libc::mmap(
                base.cast::<u8>().add(PAGE).cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED, "map guest memory");
        (host.cast(), fd)
    }

    /// Copies of every region's bytes: (guest address, bytes).
    pub fn snapshot(&self) -> Vec<(u64, Vec<u8>)> {
        self.mem
            .iter()
            .map(|r| {
                let len = r.len() as usize;
                let host = r.as_ptr();
                let mut v = vec![0u8; len];
                // SAFETY: the region's whole mapping; racing writers would be our own thread.
                unsafe { std::ptr::copy_nonoverlapping(host, v.as_mut_ptr(), len) };
                (r.start_addr().0, v)
            })
            .collect()
    }

    /// Host ranges of the regions: (host start, length).
    pub fn host_ranges(&self) -> Vec<(usize, usize)> {
        self.mem
            .iter()
            .map(|r| (r.as_ptr() as usize, r.len() as usize))
            .collect()
    }
}

impl<B: NewBitmap> Drop for Guarded<B> {
    fn drop(&mut self) {
        self.mem = GuestMemoryMmap::default();
        for &(base, total) in &self.maps {
            // SAFETY: our own reservation; nothing refers to it any more.
            unsafe { libc::munmap(base, total) };
        }
    }
}

/// A guest-physical view of a snapshot: reads fail outside every region.
pub struct Snap<'a>(pub &'a [(u64, Vec<u8>)]);

impl Snap<'_> {
    pub fn read(&self, addr: u64, out: &mut [u8]) -> Option<()> {
        for (start, bytes) in self.0 {
            let off = addr.checked_sub(*start)? as usize;
            if let Some(src) = bytes.get(off..off.checked_add(out.len())?) {
                out.copy_from_slice(src);
                return Some(());
            }
        }
        None
    }

    pub fn u16(&self, addr: u64) -> Option<u16> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b)?;
        Some(u16::from_le_bytes(b))
    }

    pub fn u32(&self, addr: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Some(u32::from_le_bytes(b))
    }

    pub fn u64(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Some(u64::from_le_bytes(b))
    }
}

/// Guest addresses whose byte differs between two snapshots of the same memory.
pub fn changed(before: &[(u64, Vec<u8>)], after: &[(u64, Vec<u8>)]) -> Vec<u64> {
    let mut out = Vec::new();
    for ((start, a), (_, b)) in before.iter().zip(after) {
        for (k, (ca, cb)) in a.chunks(64).zip(b.chunks(64)).enumerate() {
            if ca != cb {
                for (j, (x, y)) in ca.iter().zip(cb).enumerate() {
                    if x != y {
                        out.push(start + (k * 64 + j) as u64);
                    }
                }
            }
        }
    }
    out
}
