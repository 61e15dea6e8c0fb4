//! Inputs that hit defects known and being fixed on other branches. Only used to name the
//! defect in a failure report and, with `VHOST_RELAY_FUZZ_SKIP_KNOWN=1`, to leave such
//! inputs out while those fixes are not merged. The lead drops the switch after the merge.
//!
//! The verdict is about what the backend sees ([`backend_view`]), not what the generator
//! meant.

use vhost::vhost_user::message::FrontendReq as R;

use super::gen::PROTOCOL_FEATURES;
use super::wire::{backend_view, Fd, Input, Region};

fn region_defect(r: &Region, fd: Option<&Fd>) -> Option<&'static str> {
    let file = fd.and_then(|f| f.file_size());
    if file.is_some_and(|f| r.offset.checked_add(r.size).is_none_or(|end| end > f)) {
        return Some("memory region larger than its memfd (SIGBUS on ring access)");
    }
    if r.uaddr.checked_add(r.size).is_none() {
        return Some(
            "NEW, no fix yet: region userspace_addr + size overflows \
             (vhost-user-backend's vmm_va_to_gpa panics, the port's thread dies)",
        );
    }
    if (r.gpa | r.uaddr) & 0xf != 0 {
        return Some("unaligned memory region start (misaligned ring pointers)");
    }
    None
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    p.get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .unwrap_or(0)
}

/// The known defect `input` may trigger, if any.
pub fn known_defect(input: &Input) -> Option<&'static str> {
    let Input::Session { msgs, .. } = input else {
        return None;
    };
    let (mut acked, mut early_enables, mut added) = (false, 0, 0);
    for (req, p, fds) in backend_view(msgs).0 {
        let hit = match R::try_from(req) {
            Ok(R::SET_MEM_TABLE) => p
                .get(8..)
                .unwrap_or(&[])
                .chunks(32)
                .enumerate()
                .find_map(|(i, c)| region_defect(&Region::parse(c)?, fds.get(i))),
            Ok(R::ADD_MEM_REG) => {
                added += 1;
                Region::parse(p.get(8..).unwrap_or(&[]))
                    .and_then(|r| region_defect(&r, fds.first()))
            }
            Ok(R::SET_LOG_BASE) => {
                // Page-rounded: a 512-byte memfd as a 512-byte log still ends in SIGBUS
                // (dirty-logs:117:23 of seed 0x5eed0009).
                let file = fds.first().and_then(|f| f.file_size());
                let end = u64_at(&p, 0)
                    .checked_add(u64_at(&p, 8))
                    .and_then(|e| e.checked_next_multiple_of(4096));
                file.filter(|&f| end.is_none_or(|e| e > f))
                    .map(|_| "dirty log larger than its memfd (SIGBUS on logging)")
            }
            Ok(R::SET_FEATURES) => {
                acked = u64_at(&p, 0) & PROTOCOL_FEATURES != 0;
                None
            }
            Ok(R::SET_VRING_ENABLE) if !acked => {
                early_enables += 1;
                None
            }
            _ => None,
        };
        if hit.is_some() {
            return hit;
        }
    }
    if added > 16 {
        return Some("ADD_MEM_REG without a slot limit (fd exhaustion)");
    }
    if early_enables > 64 {
        return Some("SET_VRING_ENABLE flood before SET_FEATURES (quadratic)");
    }
    None
}
