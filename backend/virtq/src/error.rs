//! [`RingError`]: why the guest's ring or a chain in it could not be used.

/// Why a ring could not be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("ring of 0 entries")]
    ZeroSize,
    /// Split rings are a power of two long (virtio 1.2, 2.7): the index arithmetic masks.
    #[error("split ring of {0} entries: not a power of two")]
    SizeNotPowerOfTwo(u16),
    /// A packed ring's positions keep their wrap counter in bit 15.
    #[error("packed ring of {0} entries: more than 32768")]
    PackedTooBig(u16),
    #[error("packed ring position {pos:#x} is past its {size}-entry ring")]
    PackedPosition { pos: u16, size: u16 },
    #[error("packed chain at slot {slot} never ends (NEXT on every descriptor of the ring)")]
    PackedChainEndless { slot: u16 },
    /// virtio-queue could not reach a split ring's notification fields.
    #[error("ring notification fields: {0}")]
    Notification(String),
    #[error("{what} at {addr:#x}+{len} is not inside one guest memory region")]
    Unmapped {
        what: &'static str,
        addr: u64,
        len: usize,
    },
    #[error("{what} at {addr:#x} is misaligned")]
    Misaligned { what: &'static str, addr: u64 },
    #[error("{what} at {addr:#x} is mapped at misaligned host address {host:#x}")]
    HostMisaligned {
        what: &'static str,
        addr: u64,
        host: usize,
    },
    #[error("guest published avail index {avail} with {pending} pending on a {size}-entry ring")]
    AvailIndex { avail: u16, pending: u16, size: u16 },
    #[error("chain at head {head}: descriptor index {index} is outside its {size}-entry table")]
    DescIndex { head: u16, index: u16, size: u16 },
    #[error("chain at head {head}: bad indirect table {addr:#x}+{len}: {why}")]
    Indirect {
        head: u16,
        addr: u64,
        len: u32,
        why: &'static str,
    },
}
