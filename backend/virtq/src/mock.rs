//! Test helpers: guest memory and virtqueues built the way a guest driver would lay them out.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub type Mem = GuestMemoryMmap<()>;

/// 16 MiB of guest memory at guest address 0.
pub fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("test memory")
}

/// Where test packet buffers live (above the rings).
pub const BUFFERS: u64 = 0x40_0000;

/// A guest-side view of one split virtqueue at `base`, with a descriptor allocator.
pub struct GuestQueue<'a> {
    pub mock: MockSplitQueue<'a, Mem>,
    mem: &'a Mem,
    next_desc: u16,
}

/// One descriptor of a chain: guest address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub fn rbuf(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

pub fn wbuf(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

impl<'a> GuestQueue<'a> {
    pub fn new(mem: &'a Mem, base: u64, size: u16) -> Self {
        GuestQueue {
            mock: MockSplitQueue::create(mem, GuestAddress(base), size),
            mem,
            next_desc: 0,
        }
    }

    /// The device's view of the queue.
    pub fn queue(&self) -> Queue {
        let mut q: Queue = self.mock.create_queue().expect("valid queue");
        q.set_event_idx(false);
        q
    }

    /// Makes a chain available; returns its head index.
    pub fn add(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 } as u16;
                let last = i + 1 == bufs.len();
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { head + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(b.addr, b.len, flags, next))
            })
            .collect();
        self.mock
            .add_desc_chains(&descs, head)
            .expect("chain fits the table");
        self.next_desc += bufs.len() as u16;
        head
    }

    /// Makes an indirect chain available: its descriptors are written as a table at `table`.
    pub fn add_indirect(&mut self, bufs: &[Buf], table: u64) -> u16 {
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 } as u16;
            let last = i + 1 == bufs.len();
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = SplitDescriptor::new(b.addr, b.len, flags, if last { 0 } else { i as u16 + 1 });
            self.mem()
                .write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i as u64))
                .expect("indirect table in memory");
        }
        let len = 16 * bufs.len() as u32;
        self.add_raw(SplitDescriptor::new(
            table,
            len,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ))
    }

    fn mem(&self) -> &'a Mem {
        self.mem
    }

    /// Makes a one-descriptor chain of a raw descriptor available.
    fn add_raw(&mut self, d: SplitDescriptor) -> u16 {
        let head = self.next_desc;
        self.mock
            .add_desc_chains(&[RawDescriptor::from(d)], head)
            .expect("chain fits the table");
        self.next_desc += 1;
        head
    }

    /// Makes a chain whose only descriptor points back at itself available.
    pub fn add_loop(&mut self, buf: Buf) -> u16 {
        let head = self.next_desc;
        let flags = (VRING_DESC_F_NEXT | if buf.write { VRING_DESC_F_WRITE } else { 0 }) as u16;
        let d = RawDescriptor::from(SplitDescriptor::new(buf.addr, buf.len, flags, head));
        self.mock.desc_table().store(head, d).expect("store");
        self.add_raw_head(head);
        self.next_desc += 1;
        head
    }

    /// Publishes `head` in the avail ring as is, descriptor or not: what a buggy or hostile
    /// driver can do (e.g. a head index past the end of the descriptor table).
    pub fn add_raw_head(&mut self, head: u16) {
        let avail = self.mock.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % self.mock_len()))
            .expect("ring slot")
            .store(u16::to_le(head));
        avail.idx().store(u16::to_le(idx.wrapping_add(1)));
    }

    fn mock_len(&self) -> u16 {
        // The avail ring has as many slots as descriptors.
        (self.mock.desc_table().total_size() / 16) as u16
    }

    /// (head, len) of used entry `i`.
    pub fn used(&self, i: u16) -> (u32, u32) {
        let e = self
            .mock
            .used()
            .ring()
            .ref_at(usize::from(i))
            .expect("used slot")
            .load();
        (e.id(), e.len())
    }

    pub fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }
}

/// Reads `len` bytes of guest memory.
pub fn read(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).expect("read");
    v
}

/// A recognisable packet of `len` bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// A guest-side view of one packed virtqueue: the descriptor ring at `base`, the driver
/// event area after it and the device event area after that, driven as Linux's
/// `virtqueue_add_packed` and `virtqueue_get_buf_ctx_packed` do.
pub struct PackedGuestQueue<'a> {
    mem: &'a Mem,
    pub ring: u64,
    pub driver_area: u64,
    pub device_area: u64,
    size: u16,
    /// Where the driver adds next, and its wrap counter.
    avail: crate::Pos,
    /// Where the driver looks for the next used descriptor.
    used: crate::Pos,
    /// Descriptors each buffer id took, for stepping over its used descriptor.
    counts: std::collections::HashMap<u16, u16>,
    next_id: u16,
}

const PACKED_AVAIL: u16 = 1 << 7;
const PACKED_USED: u16 = 1 << 15;

impl<'a> PackedGuestQueue<'a> {
    pub fn new(mem: &'a Mem, base: u64, size: u16) -> Self {
        let ring = base;
        let driver_area = base + 16 * u64::from(size);
        PackedGuestQueue {
            mem,
            ring,
            driver_area,
            device_area: driver_area + 4,
            size,
            avail: crate::Pos::START,
            used: crate::Pos::START,
            counts: Default::default(),
            next_id: 0,
        }
    }

    /// The device's view of the queue (positions at the start, as SET_VRING_BASE 0x8000).
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.ring as u32), Some((self.ring >> 32) as u32));
        q.set_avail_ring_address(Some(self.driver_area as u32), Some(0));
        q.set_used_ring_address(Some(self.device_area as u32), Some(0));
        q.set_next_avail(crate::Pos::START.0);
        q.set_next_used(crate::Pos::START.0);
        q.set_event_idx(false);
        q.set_ready(true);
        q
    }

    fn avail_flags(&self) -> u16 {
        if self.avail.wrap() {
            PACKED_AVAIL
        } else {
            PACKED_USED
        }
    }

    fn put(&self, at: u64, addr: u64, len: u32, id: u16, flags: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&id.to_le_bytes());
        raw[14..].copy_from_slice(&flags.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(at))
            .expect("descriptor");
    }

    /// Makes a chain available; returns its buffer id.
    pub fn add(&mut self, bufs: &[Buf]) -> u16 {
        let id = self.next_id;
        self.next_id += 1;
        let first = self.avail;
        let mut head_flags = 0;
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = self.avail_flags();
            if b.write {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let at = self.ring + 16 * u64::from(self.avail.slot());
            if i == 0 {
                // The head's flags last: that makes the chain available.
                head_flags = flags;
                self.put(at, b.addr, b.len, id, 0);
                self.put_flags(at, self.unavail_flags());
            } else {
                self.put(at, b.addr, b.len, id, flags);
            }
            self.avail = self.avail.advance(1, self.size);
        }
        self.put_flags(self.ring + 16 * u64::from(first.slot()), head_flags);
        self.counts.insert(id, bufs.len() as u16);
        id
    }

    /// Makes an indirect chain available, its descriptors in a table at `table`.
    pub fn add_indirect(&mut self, bufs: &[Buf], table: u64) -> u16 {
        for (i, b) in bufs.iter().enumerate() {
            let flags = if b.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            self.put(table + 16 * i as u64, b.addr, b.len, 0, flags);
        }
        let id = self.next_id;
        self.next_id += 1;
        let at = self.ring + 16 * u64::from(self.avail.slot());
        let len = 16 * bufs.len() as u32;
        self.put(at, table, len, id, 0);
        self.put_flags(at, self.avail_flags() | VRING_DESC_F_INDIRECT as u16);
        self.avail = self.avail.advance(1, self.size);
        self.counts.insert(id, 1);
        id
    }

    /// Writes raw flags into slot `slot`'s descriptor (a hostile driver).
    pub fn set_flags(&self, slot: u16, flags: u16) {
        self.put_flags(self.ring + 16 * u64::from(slot), flags);
    }

    /// The flags that make a descriptor available at the driver's current wrap counter.
    pub fn available_flags(&self) -> u16 {
        self.avail_flags()
    }

    fn unavail_flags(&self) -> u16 {
        self.avail_flags() ^ (PACKED_AVAIL | PACKED_USED)
    }

    fn put_flags(&self, at: u64, flags: u16) {
        self.mem
            .write_obj(flags.to_le(), GuestAddress(at + 14))
            .expect("flags");
    }

    /// The next used buffer as (id, len), if the device returned one.
    pub fn take_used(&mut self) -> Option<(u16, u32)> {
        let at = self.ring + 16 * u64::from(self.used.slot());
        let flags: u16 = self.mem.read_obj(GuestAddress(at + 14)).expect("flags");
        let wrap = self.used.wrap();
        let (a, u) = (flags & PACKED_AVAIL != 0, flags & PACKED_USED != 0);
        if a != wrap || u != wrap {
            return None;
        }
        let len: u32 = self.mem.read_obj(GuestAddress(at + 8)).expect("len");
        let id: u16 = self.mem.read_obj(GuestAddress(at + 12)).expect("id");
        let count = self.counts.remove(&id).expect("a used id the driver gave");
        self.used = self.used.advance(count, self.size);
        Some((id, len))
    }

    /// Sets the driver event area: `flags` (0 enable, 1 disable, 2 desc) and `off_wrap`.
    pub fn set_driver_event(&self, off_wrap: u16, flags: u16) {
        self.mem
            .write_obj(off_wrap.to_le(), GuestAddress(self.driver_area))
            .expect("off_wrap");
        self.mem
            .write_obj(flags.to_le(), GuestAddress(self.driver_area + 2))
            .expect("flags");
    }

    /// The device event area as (off_wrap, flags).
    pub fn device_event(&self) -> (u16, u16) {
        let a = self.mem.read_obj(GuestAddress(self.device_area)).unwrap();
        let f = self
            .mem
            .read_obj(GuestAddress(self.device_area + 2))
            .unwrap();
        (a, f)
    }
}
