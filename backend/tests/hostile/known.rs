//! Inputs that hit defects known and being fixed on other branches. Only used to name the
//! defect in a failure report and, with `VHOST_RELAY_FUZZ_SKIP_KNOWN=1`, to leave such
//! inputs out while those fixes are not merged. The lead drops the switch after the merge.
//!
//! The byte stream is parsed as the backend parses it (a lying size shifts every later
//! message), so the verdict is about what the backend sees, not what the generator meant.

use vhost::vhost_user::message::FrontendReq as R;

use super::gen::PROTOCOL_FEATURES;
use super::wire::{Fd, Input, Msg, Region};

/// The shim's largest payload: a bigger header size ends the connection.
const MAX_PAYLOAD: usize = 64 * 1024;

/// The messages as the backend reads them: (request, payload, fds arriving with it).
fn reparse(msgs: &[Msg]) -> Vec<(u32, Vec<u8>, Vec<Fd>)> {
    let mut stream = Vec::new();
    let mut fd_at = Vec::new();
    for m in msgs {
        fd_at.push((stream.len(), m.fds.clone()));
        stream.extend(m.encode());
    }
    let mut out = Vec::new();
    let (mut pos, mut next_fds) = (0, fd_at.iter().peekable());
    while pos + 12 <= stream.len() {
        let word = |i: usize| u32::from_le_bytes(stream[pos + i..pos + i + 4].try_into().unwrap());
        let (req, size) = (word(0), word(8) as usize);
        if size > MAX_PAYLOAD {
            break;
        }
        let end = (pos + 12 + size).min(stream.len());
        let mut fds = Vec::new();
        while let Some((_, f)) = next_fds.next_if(|(at, _)| *at < end) {
            fds.extend_from_slice(f);
        }
        out.push((req, stream[pos + 12..end].to_vec(), fds));
        pos = end;
    }
    out
}

fn region_defect(r: &Region, fd: Option<&Fd>) -> Option<&'static str> {
    let file = fd.and_then(|f| f.file_size());
    if file.is_some_and(|f| r.offset.checked_add(r.size).is_none_or(|end| end > f)) {
        return Some("memory region larger than its memfd (SIGBUS on ring access)");
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
    for (req, p, fds) in reparse(msgs) {
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
                let file = fds.first().and_then(|f| f.file_size());
                let end = u64_at(&p, 0).checked_add(u64_at(&p, 8));
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
