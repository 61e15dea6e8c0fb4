//! [`GuestMap`]: guest-to-host address translation for one batch, with dirty marking.

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::GuestSlice;

/// Regions kept in the translation table; QEMU guests have one to three. Buffers in further
/// regions still work, through vm-memory.
const MAP_REGIONS: usize = 4;

/// One region of guest memory as the data path needs it.
struct Region<'a, R> {
    start: u64,
    len: u64,
    host: *mut u8,
    region: &'a R,
}

impl<R> Clone for Region<'_, R> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<R> Copy for Region<'_, R> {}

/// Guest-to-host address translation for one batch, with dirty marking on writes.
pub struct GuestMap<'a, M: GuestMemoryBackend> {
    mem: &'a M,
    regions: [Option<Region<'a, M::R>>; MAP_REGIONS],
}

impl<'a, M: GuestMemoryBackend> GuestMap<'a, M> {
    pub fn new(mem: &'a M) -> Self {
        let mut regions = [None; MAP_REGIONS];
        for (slot, region) in regions.iter_mut().zip(mem.iter()) {
            if let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) {
                *slot = Some(Region {
                    start: region.start_addr().0,
                    len: region.len(),
                    host,
                    region,
                });
            }
        }
        GuestMap { mem, regions }
    }

    /// The memory this map translates.
    pub fn mem(&self) -> &'a M {
        self.mem
    }

    /// Host address of `addr..addr+len` if it lies inside one mapped region, with the region
    /// and the offset into it.
    #[inline]
    fn lookup(&self, addr: u64, len: usize) -> Option<(*mut u8, &'a M::R, usize)> {
        for r in self.regions.iter().flatten() {
            let Some(off) = addr.checked_sub(r.start) else {
                continue;
            };
            if off < r.len && (len as u64) <= r.len - off {
                // In bounds of a live mapping of `r.len` bytes.
                return Some((r.host.wrapping_add(off as usize), r.region, off as usize));
            }
        }
        None
    }

    /// Host pointer to `len` bytes at guest `addr` (for reading), if in one region.
    #[inline]
    pub fn host(&self, addr: u64, len: usize) -> Option<*mut u8> {
        self.lookup(addr, len).map(|(p, _, _)| p)
    }

    /// Reads `buf.len()` bytes at guest `addr`.
    #[inline]
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        match self.lookup(addr, buf.len()) {
            Some((p, _, _)) => {
                // SAFETY: `lookup` checked that the range is inside a live mapping; guest
                // memory is plain bytes, and the guest racing us only changes their values.
                unsafe { GuestSlice::from_raw(p, buf.len()).copy_to(buf.as_mut_ptr()) };
                Ok(())
            }
            None => self.mem.read_slice(buf, GuestAddress(addr)),
        }
    }

    /// Writes `src` (our own bytes) at guest `addr` and marks it dirty for migration.
    #[inline]
    pub fn write(&self, addr: u64, src: &[u8]) -> Result<(), GuestMemoryError> {
        if self.write_unmarked(addr, GuestSlice::new(src))? {
            self.mark_dirty(addr, src.len());
        }
        Ok(())
    }

    /// Like [`GuestMap::write`], from bytes that may be guest memory overlapping the
    /// destination (loopback), and leaving the dirty marking to the caller when it took the
    /// fast path (returns true then): the RX path marks a whole buffer once after writing
    /// header and data into it, half the marks (each an atomic in the log) per packet.
    #[inline]
    pub fn write_unmarked(&self, addr: u64, src: GuestSlice<'_>) -> Result<bool, GuestMemoryError> {
        match self.lookup(addr, src.len()) {
            Some((p, _, _)) => {
                // SAFETY: `lookup` checked that the destination is inside a live mapping;
                // `copy_to` is a memmove, so a source overlapping it is fine.
                unsafe { src.copy_to(p) };
                Ok(true)
            }
            None => self.write_bounced(addr, src).map(|()| false),
        }
    }

    /// vm-memory's write, for a destination outside the table (across regions, or not in
    /// memory: its precise error). Its API takes `&[u8]`, which must not be built over guest
    /// memory, so the source goes through a small private bounce buffer.
    #[cold]
    fn write_bounced(&self, addr: u64, src: GuestSlice<'_>) -> Result<(), GuestMemoryError> {
        let mut bounce = [0u8; 512];
        let mut off = 0;
        loop {
            let piece = src.sub(off, bounce.len());
            let buf = &mut bounce[..piece.len()];
            // SAFETY: `buf` is our own `piece.len()` bytes.
            unsafe { piece.copy_to(buf.as_mut_ptr()) };
            let at = GuestAddress(addr.wrapping_add(off as u64));
            self.mem.write_slice(buf, at)?;
            off += piece.len();
            if off >= src.len() {
                return Ok(());
            }
        }
    }

    /// Marks `addr..addr+len` dirty (after writing it through a host pointer): the one place
    /// the relay and the shadow relay mark a guest page for migration outside vm-memory's own
    /// writes. A range across regions is marked piece by piece, as far as memory goes.
    #[inline]
    pub fn mark_dirty(&self, addr: u64, len: usize) {
        match self.lookup(addr, len) {
            Some((_, region, off)) => region.bitmap().mark_dirty(off, len),
            None => self.mark_dirty_slow(addr, len),
        }
    }

    /// [`GuestMap::mark_dirty`] for a range outside the table: vm-memory splits it by region
    /// (and stops at the first address outside memory).
    #[cold]
    fn mark_dirty_slow(&self, addr: u64, len: usize) {
        for slice in self.mem.get_slices(GuestAddress(addr), len).flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::*;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::GuestMemoryMmap;

    /// bounce buffer a few hundred bytes at a time, since its API wants a `&[u8]`.
    #[test]
    fn writes_across_regions_are_bounced_whole() {
        let mem: Mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap();
        let map = GuestMap::new(&mem);
        let bytes = crate::mock::pattern(1500, 3);
        let at = 0x1_0000 - 700;
        assert!(!map.write_unmarked(at, GuestSlice::new(&bytes)).unwrap());
        assert_eq!(read(&mem, at, 1500), bytes);
        // A piece of a slice, as the RX path writes them.
        let piece = GuestSlice::new(&bytes).sub(1000, 600);
        assert_eq!(piece.len(), 500);
        assert!(!map.write_unmarked(at + 400, piece).unwrap());
        assert_eq!(read(&mem, at + 400, 500), bytes[1000..]);
        // Running off the end of memory: vm-memory's error.
        assert!(map
            .write_unmarked(0x2_0000 - 100, GuestSlice::new(&bytes))
            .is_err());
    }

    /// A range across two regions (a guest buffer the shadow relay marks after the device
    /// wrote it) is marked in both, as far as memory goes.
    #[test]
    fn marking_across_regions_marks_each_piece() {
        let mem: GuestMemoryMmap<AtomicBitmap> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap();
        let map = GuestMap::new(&mem);
        map.mark_dirty(0xf800, 0x1000);
        map.mark_dirty(0x1_f000, 0x8000);
        let regions: Vec<_> = mem.iter().collect();
        assert!(regions[0].bitmap().dirty_at(0xf000));
        assert!(!regions[0].bitmap().dirty_at(0xe000));
        assert!(regions[1].bitmap().dirty_at(0));
        assert!(!regions[1].bitmap().dirty_at(0x1000));
        assert!(regions[1].bitmap().dirty_at(0xf000));
    }

    #[test]
    fn writes_mark_guest_pages_dirty() {
        let mem: GuestMemoryMmap<AtomicBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = GuestMap::new(&mem);
        map.write(0x5010, &[1, 2, 3]).unwrap();
        let region = mem.iter().next().unwrap();
        assert!(region.bitmap().dirty_at(0x5000));
        assert!(!region.bitmap().dirty_at(0x4000));
        assert!(!region.bitmap().dirty_at(0x6000));
        let mut back = [0u8; 3];
        map.read(0x5010, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3]);
        // Outside memory: vm-memory's error, no write.
        assert!(map.write((1 << 20) - 1, &[1, 2]).is_err());
        assert!(map.read(u64::MAX, &mut back).is_err());
    }
}
