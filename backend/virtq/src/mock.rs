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
