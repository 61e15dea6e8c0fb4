//! Seeded, bounded fuzzers of the data path (issue 9): the rings on guard-paged guest memory
//! ([`rings`]) and the software offloads checked against an independent checksum ([`offload`]).
//! The campaign loop, its `VHOST_RELAY_FUZZ_*` knobs and the guard-paged memory are virtq's
//! test support ([`virtq::fuzz`]), shared with vDPA's shadow-ring fuzzer.
//!
//! `scripts/fuzz-rings.sh` runs a longer campaign.

mod offload;
mod packed_rings;
mod rings;

pub use virtq::fuzz::{campaign, Rng};

/// Guard-paged guest memory of the backend's memory type.
pub type Guarded = virtq::fuzz::Guarded<migration::DirtyBitmap>;
