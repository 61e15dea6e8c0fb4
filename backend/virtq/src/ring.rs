//! A guest virtqueue borrowed for one batch, split or packed ([`Ring`]): the one interface the
//! relay's RX and TX paths use, whichever layout the guest negotiated.

use virtio_queue::Queue;
use vm_memory::GuestMemoryBackend;

use crate::{Chain, Desc, GuestMap, PackedRing, RingError, SplitRing};

/// Which layout a connection's queues use (VIRTIO_F_RING_PACKED acked or not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RingKind {
    #[default]
    Split,
    Packed,
}

/// A popped chain, as the ring needs it back: where it starts, and for packed rings the
/// buffer id and descriptor count the used descriptor takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Split: the head's descriptor index (unchecked: see [`Ring::returnable`]). Packed:
    /// the ring slot of its first descriptor.
    pub index: u16,
    /// The buffer id the guest gets back (split: the head index).
    pub id: u16,
    /// Descriptors the chain takes in the ring (split: 1, the ring holds heads).
    pub count: u16,
}

impl Head {
    /// The chain at head index `index` of a split ring.
    #[inline]
    pub fn split(index: u16) -> Head {
        Head {
            index,
            id: index,
            count: 1,
        }
    }
}

/// One queue borrowed for one batch. Dropping it publishes what was used and hands the
/// positions back to the `Queue`. Positions (`next_avail`, `next_used`) are opaque u16: the
/// split ring's free-running indexes, the packed ring's [`crate::Pos`].
pub enum Ring<'a, M: GuestMemoryBackend> {
    Split(SplitRing<'a, M>),
    Packed(PackedRing<'a, M>),
}

/// Calls `$f` on whichever ring `$r` is.
macro_rules! each {
    ($r:expr, $ring:ident => $f:expr) => {
        match $r {
            Ring::Split($ring) => $f,
            Ring::Packed($ring) => $f,
        }
    };
}

impl<'a, M: GuestMemoryBackend> Ring<'a, M> {
    /// Resolves the rings of a ready queue of layout `kind`.
    pub fn new(queue: &'a mut Queue, mem: &'a M, kind: RingKind) -> Result<Self, RingError> {
        Ok(match kind {
            RingKind::Split => Ring::Split(SplitRing::new(queue, mem)?),
            RingKind::Packed => Ring::Packed(PackedRing::new(queue, mem)?),
        })
    }

    #[inline]
    pub fn map(&self) -> &GuestMap<'a, M> {
        each!(self, r => &r.map)
    }

    #[inline]
    pub fn size(&self) -> u16 {
        each!(self, r => r.size())
    }

    #[inline]
    pub fn next_avail(&self) -> u16 {
        each!(self, r => r.next_avail())
    }

    /// Un-pops chains: the next pop reads at position `next_avail` again.
    #[inline]
    pub fn set_next_avail(&mut self, next_avail: u16) {
        each!(self, r => r.set_next_avail(next_avail))
    }

    /// Takes the next available chain, or `None` if the guest has none.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<Head>, RingError> {
        match self {
            Ring::Split(r) => Ok(r.pop()?.map(Head::split)),
            Ring::Packed(r) => r.pop(),
        }
    }

    /// Whether `head` names a chain the guest can get back: a split ring's avail entry may
    /// name an index past its table, which returning would only corrupt the guest's
    /// bookkeeping with.
    #[inline]
    pub fn returnable(&self, head: Head) -> bool {
        head.index < self.size()
    }

    /// Asks the CPU to fetch the descriptors of the next `n` chains.
    #[inline]
    pub fn prefetch_ahead(&self, n: u16) {
        each!(self, r => r.prefetch_ahead(n))
    }

    /// Starts walking the chain `head`.
    #[inline]
    pub fn chain(&self, head: Head) -> Chain<'a> {
        match self {
            Ring::Split(r) => r.chain(head.index),
            Ring::Packed(r) => r.chain(head),
        }
    }

    /// The chain's next descriptor, following an indirect table once.
    #[inline]
    pub fn next_desc(&self, c: &mut Chain<'a>) -> Result<Option<Desc>, RingError> {
        c.next_desc(self.map())
    }

    /// Returns a chain to the guest (published with the batch).
    #[inline]
    pub fn add_used(&mut self, head: Head, len: u32) {
        match self {
            Ring::Split(r) => r.add_used(head.index, len),
            Ring::Packed(r) => r.add_used(head, len),
        }
    }

    /// The position the next [`Ring::add_used`] writes.
    #[inline]
    pub fn next_used(&self) -> u16 {
        each!(self, r => r.next_used())
    }

    /// Takes back the used entries added since position `from` (none published yet).
    #[inline]
    pub fn unadd_used(&mut self, from: u16) {
        each!(self, r => r.unadd_used(from))
    }

    /// Sets the length of every used entry added since position `from` to 0.
    #[inline]
    pub fn empty_used_since(&mut self, from: u16) {
        each!(self, r => r.empty_used_since(from))
    }

    /// Makes the used entries added so far visible to the guest.
    #[inline]
    pub fn publish(&mut self) {
        each!(self, r => r.publish())
    }

    /// Publishes and hands the positions back to the `Queue` (also done on drop).
    #[inline]
    pub fn sync(&mut self) {
        each!(self, r => r.sync())
    }
}
