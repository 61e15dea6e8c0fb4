//! Descriptor tables and the chain walk: where every descriptor the guest wrote is validated,
//! for the relay's rings ([`crate::SplitRing::next_desc`]) and the shadow relay's dirty
//! marking alike (a [`DescTable`] needs only the table's guest address and size).
//!
//! The checks: the table is inside one mapped region; every index is inside its table; an
//! indirect table is a whole number of descriptors, at most 65535 (a `next` is a u16), inside
//! one region, and not below the end of the address space; indirect tables do not nest; and a
//! chain is cut after as many descriptors as its table holds (more must revisit one: a loop).

use std::marker::PhantomData;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::GuestMemoryBackend;

use crate::{GuestMap, RingError};

/// Bytes of one split-ring descriptor.
const DESC_SIZE: u32 = 16;

/// One split-ring descriptor.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    next: u16,
}

impl Desc {
    pub fn is_write_only(&self) -> bool {
        self.flags & VRING_DESC_F_WRITE as u16 != 0
    }

    fn has_next(&self) -> bool {
        self.flags & VRING_DESC_F_NEXT as u16 != 0
    }

    fn is_indirect(&self) -> bool {
        self.flags & VRING_DESC_F_INDIRECT as u16 != 0
    }

    /// Decodes the 16 little-endian bytes of a descriptor.
    fn from_le_bytes(raw: [u8; 16]) -> Desc {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
        Desc {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }
}

/// A descriptor table resolved to host memory: the ring's own, or an indirect one.
#[derive(Clone, Copy, Debug)]
pub struct DescTable<'a> {
    ptr: *const u8,
    /// Descriptors in it.
    len: u16,
    _mem: PhantomData<&'a [u8]>,
}

impl<'a> DescTable<'a> {
    /// The table of `len` descriptors at guest `addr`, which must lie inside one region.
    pub fn resolve<M: GuestMemoryBackend>(
        map: &GuestMap<'a, M>,
        addr: u64,
        len: u16,
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
            _mem: PhantomData,
        })
    }

    /// Host address of the table's first descriptor (for prefetching).
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
        Some(Desc::from_le_bytes(raw))
    }

    /// The indirect table descriptor `d` points at, if it is a valid one.
    fn indirect<M: GuestMemoryBackend>(
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
        Self::resolve(map, d.addr, len).map_err(|_| "not inside one guest memory region")
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

    pub fn head(&self) -> u16 {
        self.head
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
            self.cut = d.has_next() && self.ttl == 0;
            self.next = if d.has_next() && self.ttl > 0 {
                Some(d.next)
            } else {
                None
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
        self.table = DescTable::indirect(map, d).map_err(bad)?;
        self.ttl = self.table.len;
        self.next = Some(0);
        self.indirect = true;
        self.cut = false;
        Ok(())
    }
}
