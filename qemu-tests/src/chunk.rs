//! The checksummed, numbered chunks of the migration harness's data stream.
//!
//! The host peer streams chunks into the guest while the guest migrates; a verifier in the guest
//! (`guest/vr_verify.rs`, which compiles this same file with `#[path]`) checks each one. A page
//! the backend wrote into guest memory but did not mark in the dirty log reaches the destination
//! with its old contents; TCP cannot notice (its checksum was checked, or skipped on
//! `DATA_VALID`, before the page was copied), so the stale bytes land in a chunk, whose checksum
//! or sequence number then no longer matches. A chunk is one page, so a count of bad chunks is
//! roughly a count of stale pages.
//!
//! This file must stay free of dependencies (std only): it is also built on its own, statically,
//! for the guest.

/// Bytes per chunk (one guest page).
pub const CHUNK_LEN: usize = 4096;
/// First bytes of every chunk.
pub const MAGIC: [u8; 8] = *b"VRCHUNK1";
/// Offset of the payload: magic, sequence number, checksum.
pub const HEADER_LEN: usize = 24;

/// Fills `out` (one chunk) with chunk number `seq`: magic, `seq`, checksum, then a payload
/// that differs for every `seq`, so a stale copy of another chunk does not pass.
pub fn fill(seq: u64, out: &mut [u8; CHUNK_LEN]) {
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for word in out[HEADER_LEN..].chunks_exact_mut(8) {
        // xorshift64*: cheap, and every seq gives a different stream.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        word.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out[..8].copy_from_slice(&MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    let sum = checksum(&out[HEADER_LEN..]);
    out[16..24].copy_from_slice(&sum.to_le_bytes());
}

/// A 64-bit checksum of the payload, word by word (fast enough under TCG).
pub fn checksum(payload: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for word in payload.chunks(8) {
        let mut w = [0u8; 8];
        w[..word.len()].copy_from_slice(word);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// What is wrong with a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    /// The first 8 bytes are not [`MAGIC`].
    Magic,
    /// A well-formed chunk, but not the one expected here (carries the number found).
    Sequence(u64),
    /// The payload does not match the checksum in the header.
    Checksum,
}

/// Checks that `chunk` is chunk number `expect`, intact.
pub fn check(expect: u64, chunk: &[u8; CHUNK_LEN]) -> Result<(), Bad> {
    if chunk[..8] != MAGIC {
        return Err(Bad::Magic);
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&chunk[8..16]);
    let seq = u64::from_le_bytes(n);
    n.copy_from_slice(&chunk[16..24]);
    let sum = u64::from_le_bytes(n);
    if checksum(&chunk[HEADER_LEN..]) != sum {
        return Err(Bad::Checksum);
    }
    if seq != expect {
        return Err(Bad::Sequence(seq));
    }
    Ok(())
}

/// The verifier's final line: `vr-verify chunks=N bad=B partial=P first_bad=S`.
pub const RESULT_PREFIX: &str = "vr-verify result";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_chunks_pass_and_differ() {
        let mut a = [0u8; CHUNK_LEN];
        let mut b = [0u8; CHUNK_LEN];
        fill(7, &mut a);
        fill(8, &mut b);
        assert_eq!(check(7, &a), Ok(()));
        assert_eq!(check(8, &b), Ok(()));
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
        assert_eq!(check(8, &a), Err(Bad::Sequence(7)));
    }

    #[test]
    fn any_changed_byte_is_caught() {
        let mut a = [0u8; CHUNK_LEN];
        fill(3, &mut a);
        for pos in [0, 9, 17, HEADER_LEN, 1000, CHUNK_LEN - 1] {
            let mut c = a;
            c[pos] ^= 0x40;
            assert!(check(3, &c).is_err(), "flip at {pos} not caught");
        }
    }

    #[test]
    fn stale_page_contents_are_caught() {
        // What an unlogged write looks like on the destination: the page still holds an older
        // chunk, or part of one (a packet boundary inside the page).
        let mut old = [0u8; CHUNK_LEN];
        let mut new = [0u8; CHUNK_LEN];
        fill(100, &mut old);
        fill(200, &mut new);
        assert_eq!(check(200, &old), Err(Bad::Sequence(100)));
        let mut mixed = new;
        mixed[2000..].copy_from_slice(&old[2000..]);
        assert_eq!(check(200, &mixed), Err(Bad::Checksum));
        assert_eq!(check(0, &[0u8; CHUNK_LEN]), Err(Bad::Magic));
    }
}
