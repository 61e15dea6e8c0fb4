//! Descriptor tables and the chain walk: where every descriptor the guest wrote is validated,
//! for the relay's rings ([`crate::SplitRing::next_desc`]) and the shadow relay's dirty
//! marking alike (a [`DescTable`] needs only the table's guest address and size).
//!
//! The checks: the table is inside one mapped region; every index is inside its table; an
//! indirect table is a whole number of descriptors, at most 65535 (a `next` is a u16), inside
//! one region, and not below the end of the address space; indirect tables do not nest; and a
//! chain is cut after as many descriptors as its table holds (more must revisit one: a loop).
//!
//! Packed rings ([`crate::PackedRing`]) walk the same way with the packed layout: a chain is
//! `count` consecutive ring slots (wrapping), counted once when it was popped, and an
//! indirect table is read from its first descriptor to its last (the packed format has no
//! `next`).

use std::marker::PhantomData;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::GuestMemoryBackend;

use crate::{GuestMap, RingError};

/// Bytes of one split-ring descriptor.
const DESC_SIZE: u32 = 16;

/// One descriptor, split or packed.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    /// Split: the next descriptor's index. Packed: the buffer id.
    next: u16,
}

/// How a table's 16-byte descriptors are laid out and chained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// addr, len, flags, next: chained by `next`.
    Split,
    /// addr, len, id, flags: chained by position.
    Packed,
}

impl Desc {
    #[inline]
    pub fn is_write_only(&self) -> bool {
        self.flags & VRING_DESC_F_WRITE as u16 != 0
    }

    #[inline]
    fn has_next(&self) -> bool {
        self.flags & VRING_DESC_F_NEXT as u16 != 0
    }

    #[inline]
    fn is_indirect(&self) -> bool {
        self.flags & VRING_DESC_F_INDIRECT as u16 != 0
    }

    /// Decodes the 16 little-endian bytes of a descriptor.
    #[inline]
    fn from_le_bytes(raw: [u8; 16], layout: Layout) -> Desc {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, x0, x1, y0, y1] = raw;
        let (x, y) = (u16::from_le_bytes([x0, x1]), u16::from_le_bytes([y0, y1]));
        let (flags, next) = match layout {
            Layout::Split => (x, y),
            Layout::Packed => (y, x),
        };
        Desc {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags,
            next,
        }
    }
}

/// A descriptor table resolved to host memory: the ring's own, or an indirect one.
#[derive(Clone, Copy, Debug)]
pub struct DescTable<'a> {
    ptr: *const u8,
    /// Descriptors in it.
    len: u16,
    layout: Layout,
    _mem: PhantomData<&'a [u8]>,
}

impl<'a> DescTable<'a> {
    /// The split table of `len` descriptors at guest `addr`, which must lie inside one
    /// region.
    pub fn resolve<M: GuestMemoryBackend>(
        map: &GuestMap<'a, M>,
        addr: u64,
        len: u16,
    ) -> Result<Self, RingError> {
        Self::resolve_as(map, addr, len, Layout::Split)
    }

    /// [`DescTable::resolve`] for a table of `layout`.
    pub fn resolve_as<M: GuestMemoryBackend>(
        map: &GuestMap<'a, M>,
        addr: u64,
        len: u16,
        layout: Layout,
    ) -> Result<Self, RingError> {
        let bytes = 16 * usize::from(len);
        let ptr = map.host(addr, bytes).ok_or(RingError::Unmapped {
            what: "descriptor table",
            addr,
            len: bytes,
        })?;
        Ok(DescTable {
            ptr,
            len,
            layout,
            _mem: PhantomData,
        })
    }

    /// Host address of the table's first descriptor (for prefetching).
    #[inline]
    pub fn host(&self) -> *const u8 {
        self.ptr
    }

    /// Descriptor `index`, if it is inside the table.
    #[inline]
    fn get(&self, index: u16) -> Option<Desc> {
        if index >= self.len {
            return None;
        }
        // SAFETY: index < len, and `resolve` found len * 16 bytes mapped for 'a. Descriptors
        // may be unaligned in an indirect table: read bytewise.
        let raw: [u8; 16] = unsafe {
            std::ptr::read_unaligned(self.ptr.add(16 * usize::from(index)) as *const [u8; 16])
        };
        Some(Desc::from_le_bytes(raw, self.layout))
    }

    /// The indirect table descriptor `d` points at, if it is a valid one.
    fn indirect<M: GuestMemoryBackend>(
        &self,
        map: &GuestMap<'a, M>,
        d: &Desc,
    ) -> Result<Self, &'static str> {
        if d.len == 0 || !d.len.is_multiple_of(DESC_SIZE) {
            return Err("indirect table length is not a whole number of descriptors");
        }
        let len = u16::try_from(d.len / DESC_SIZE)
            .map_err(|_| "indirect table longer than 65535 descriptors")?;
        if d.addr.checked_add(u64::from(d.len)).is_none() {
            return Err("indirect table runs past the end of the address space");
        }
        Self::resolve_as(map, d.addr, len, self.layout)
            .map_err(|_| "not inside one guest memory region")
    }
}

/// Walks one descriptor chain: [`Chain::next_desc`] until `None`.
pub struct Chain<'a> {
    head: u16,
    table: DescTable<'a>,
    next: Option<u16>,
    /// Descriptors left before the chain is cut (a loop in the guest's table).
    ttl: u16,
    indirect: bool,
    /// The walk stopped at `ttl` with a `next` still flagged.
    cut: bool,
}

impl<'a> Chain<'a> {
    /// Starts walking the chain at `head` of the ring's table.
    #[inline]
    pub fn new(table: DescTable<'a>, head: u16) -> Self {
        Chain {
            head,
            table,
            next: Some(head),
            ttl: table.len,
            indirect: false,
            cut: false,
        }
    }

    /// Starts walking the packed chain of `count` descriptors from ring slot `slot` of the
    /// packed ring's `table` (`count` as [`crate::PackedRing::pop`] found it: the walk never
    /// goes further, whatever the guest rewrites meanwhile).
    #[inline]
    pub fn new_packed(table: DescTable<'a>, slot: u16, count: u16) -> Self {
        debug_assert_eq!(table.layout, Layout::Packed);
        Chain {
            head: slot,
            table,
            next: Some(slot),
            ttl: count.min(table.len),
            indirect: false,
            cut: false,
        }
    }

    /// The walk ended because the chain had more descriptors than its table: it loops.
    pub fn was_cut(&self) -> bool {
        self.cut
    }

    /// The chain's next descriptor, following an indirect table once; `map` is the memory
    /// the ring's table was resolved in (for indirect tables).
    pub fn next_desc<M: GuestMemoryBackend>(
        &mut self,
        map: &GuestMap<'a, M>,
    ) -> Result<Option<Desc>, RingError> {
        loop {
            let Some(index) = self.next else {
                return Ok(None);
            };
            let d = self.table.get(index).ok_or(RingError::DescIndex {
                head: self.head,
                index,
                size: self.table.len,
            })?;
            self.ttl = self.ttl.saturating_sub(1);
            self.next = match self.table.layout {
                Layout::Split => {
                    self.cut = d.has_next() && self.ttl == 0;
                    (d.has_next() && self.ttl > 0).then_some(d.next)
                }
                // The ring wraps; an indirect table is read whole (its `ttl` is its length).
                Layout::Packed => (self.ttl > 0).then(|| {
                    let n = index + 1;
                    if n == self.table.len {
                        0
                    } else {
                        n
                    }
                }),
            };
            if !d.is_indirect() {
                return Ok(Some(d));
            }
            self.enter_indirect(map, &d)?;
        }
    }

    /// Continues the walk in the indirect table `d` points at.
    fn enter_indirect<M: GuestMemoryBackend>(
        &mut self,
        map: &GuestMap<'a, M>,
        d: &Desc,
    ) -> Result<(), RingError> {
        let bad = |why| RingError::Indirect {
            head: self.head,
            addr: d.addr,
            len: d.len,
            why,
        };
        if self.indirect {
            return Err(bad("nested indirect table"));
        }
        self.table = self.table.indirect(map, d).map_err(bad)?;
        self.ttl = self.table.len;
        self.next = Some(0);
        self.indirect = true;
        self.cut = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    type Mem = GuestMemoryMmap<()>;

    /// The last page below 2^64 (a region's end must fit in a u64).
    const TOP_PAGE: u64 = u64::MAX - 4096;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    /// A megabyte at 0 and the top page, as a hostile memory table may lay them out.
    fn memory() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(TOP_PAGE), 4096)])
            .unwrap()
    }

    fn put(mem: &Mem, at: u64, (addr, len, flags, next): (u64, u32, u16, u16)) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    /// Walks the chain at head 0 of the 4-entry table at 0x1000 (no virtio-queue `Queue`:
    /// how vDPA's shadow relay walks), returning the descriptors' lengths or the error.
    fn walk(mem: &Mem) -> (Result<Vec<u32>, RingError>, bool) {
        let map = GuestMap::new(mem);
        let table = DescTable::resolve(&map, 0x1000, 4).unwrap();
        let mut chain = Chain::new(table, 0);
        let mut lens = Vec::new();
        loop {
            match chain.next_desc(&map) {
                Ok(Some(d)) => lens.push(d.len),
                Ok(None) => return (Ok(lens), chain.was_cut()),
                Err(e) => return (Err(e), chain.was_cut()),
            }
        }
    }

    fn indirect_why(r: Result<Vec<u32>, RingError>) -> &'static str {
        match r {
            Err(RingError::Indirect { why, .. }) => why,
            other => panic!("wanted a bad indirect table, got {other:?}"),
        }
    }

    /// Former divergence: the shadow relay accepted an indirect table whose length is not a
    /// whole number of descriptors; the one walk refuses it, whatever its length.
    #[test]
    fn an_indirect_table_of_partial_descriptors_is_refused() {
        let mem = memory();
        put(&mem, 0x8000, (0x9000, 1500, WRITE, 0));
        for len in [24, 8, 0, 17] {
            put(&mem, 0x1000, (0x8000, len, INDIRECT, 0));
            let why = indirect_why(walk(&mem).0);
            assert!(why.contains("whole number of descriptors"), "{len}: {why}");
        }
        put(&mem, 0x1000, (0x8000, 16 * 65536, INDIRECT, 0));
        assert!(indirect_why(walk(&mem).0).contains("longer than 65535"));
        put(&mem, 0x1000, (0x8000, 16, INDIRECT, 0));
        assert_eq!(walk(&mem).0.unwrap(), vec![1500]);
    }

    /// Former divergence: the shadow relay computed `table + 16 * i` and the field addresses
    /// of a descriptor on guest values unchecked (a panic in a debug build near 2^64). Here a
    /// table must end below 2^64 and lie in one region, and descriptors are read through
    /// the host pointer of a resolved table, with indexes checked against its size.
    #[test]
    fn tables_at_the_top_of_the_address_space_are_errors_not_overflows() {
        let mem = memory();
        put(&mem, 0x1000, (u64::MAX - 32, 64, INDIRECT, 0));
        assert!(indirect_why(walk(&mem).0).contains("past the end of the address space"));
        put(&mem, 0x1000, ((1 << 20) - 64, 128, INDIRECT, 0));
        assert!(indirect_why(walk(&mem).0).contains("not inside one guest memory region"));
        // The last three descriptors of memory: read exactly; the chain's jump to index 3 is
        // outside that 3-entry table.
        let last = u64::MAX - 48;
        put(&mem, last, (0x9000, 1, WRITE | NEXT, 2));
        put(&mem, last + 32, (0x9000, 2, WRITE | NEXT, 3));
        put(&mem, 0x1000, (last, 48, INDIRECT, 0));
        let r = walk(&mem).0;
        assert!(
            matches!(
                r,
                Err(RingError::DescIndex {
                    index: 3,
                    size: 3,
                    ..
                })
            ),
            "{r:?}"
        );
        let map = GuestMap::new(&mem);
        for addr in [u64::MAX - 15, u64::MAX, TOP_PAGE + 4090] {
            assert!(matches!(
                DescTable::resolve(&map, addr, 1),
                Err(RingError::Unmapped { .. })
            ));
        }
    }

    /// A chain that revisits a descriptor is cut after a table's worth, and says so (the
    /// shadow relay reports it; the relay takes what it got).
    #[test]
    fn a_looping_chain_is_cut_after_a_table_of_descriptors() {
        let mem = memory();
        put(&mem, 0x1000, (0x9000, 10, WRITE | NEXT, 1));
        put(&mem, 0x1010, (0x9000, 20, WRITE | NEXT, 0));
        assert_eq!(walk(&mem), (Ok(vec![10, 20, 10, 20]), true));
        put(&mem, 0x1010, (0x9000, 20, WRITE, 0));
        assert_eq!(walk(&mem), (Ok(vec![10, 20]), false));
        // In an indirect table: cut after its own length.
        put(&mem, 0x1000, (0x8000, 48, INDIRECT, 0));
        put(&mem, 0x8000, (0x9000, 1, NEXT, 0));
        assert_eq!(walk(&mem), (Ok(vec![1, 1, 1]), true));
        // No nesting.
        put(&mem, 0x8000, (0x8000, 48, INDIRECT, 0));
        assert!(indirect_why(walk(&mem).0).contains("nested"));
    }
}
