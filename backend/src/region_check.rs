//! The shim's check of every file a frontend asks us to map, before anything maps it.
//!
//! vhost-user-backend maps `SET_MEM_TABLE`/`ADD_MEM_REG` regions and the `SET_LOG_BASE` log
//! without looking at their files, and touches them at once (`SET_VRING_ADDR` reads the used
//! index): a region or log larger than its file raises SIGBUS there, which kills the whole
//! process. The vDPA session maps them too. Every frontend message of both modes passes
//! through the protocol shim, so the shim checks them here, with the fds in hand, and drops
//! the connection of a frontend that lies (see [`migration::check_guest_region`] for what a
//! region must be).

use std::mem::size_of;
use std::os::fd::{AsFd, OwnedFd};

use migration::{check_file_area, check_guest_region, RegionDesc};
use vhost::vhost_user::message::{FrontendReq, VhostUserMemory, VhostUserMemoryRegion};

/// Bytes of one region in a memory message: gpa, size, frontend address, mmap offset.
const REGION_LEN: usize = size_of::<VhostUserMemoryRegion>();
/// Bytes before the regions of SET_MEM_TABLE (their count) and of ADD_MEM_REG (padding).
const REGIONS_AT: usize = size_of::<VhostUserMemory>();

/// Checks the mappings a frontend message describes; `Err` says why the message (and so the
/// connection) is refused. Messages that map nothing pass. A payload too short to hold what
/// it claims is left to the library, which refuses it without mapping anything.
pub fn check(request: u32, payload: &[u8], fds: &[OwnedFd]) -> Result<(), String> {
    match FrontendReq::try_from(request) {
        Ok(FrontendReq::SET_MEM_TABLE) => {
            let Some(count) = word(payload, 0).map(|w| w as u32 as usize) else {
                return Ok(());
            };
            if count != fds.len() {
                return Err(format!(
                    "SET_MEM_TABLE with {count} region(s) and {} fd(s)",
                    fds.len()
                ));
            }
            for (i, fd) in fds.iter().enumerate() {
                if let Some(r) = region(payload, REGIONS_AT + i * REGION_LEN) {
                    check_region("SET_MEM_TABLE", i, fd, &r)?;
                }
            }
            Ok(())
        }
        Ok(FrontendReq::ADD_MEM_REG) => match (region(payload, REGIONS_AT), fds) {
            (Some(r), [fd]) => check_region("ADD_MEM_REG", 0, fd, &r),
            (Some(_), _) => Err(format!("ADD_MEM_REG with {} fd(s)", fds.len())),
            (None, _) => Ok(()),
        },
        Ok(FrontendReq::SET_LOG_BASE) => match (word(payload, 0), word(payload, 8), fds) {
            (Some(size), Some(offset), [fd]) => check_file_area(fd.as_fd(), offset, size)
                .map_err(|e| format!("SET_LOG_BASE log {size:#x} at offset {offset:#x}: {e}")),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

fn check_region(what: &str, i: usize, fd: &OwnedFd, r: &RegionDesc) -> Result<(), String> {
    check_guest_region(fd.as_fd(), r).map_err(|e| {
        format!(
            "{what} region {i} (guest {:#x}+{:#x}, frontend address {:#x}, file offset {:#x}): {e}",
            r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset
        )
    })
}

/// The little-endian u64 at `at` of `payload`.
fn word(payload: &[u8], at: usize) -> Option<u64> {
    let b = payload.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

fn region(payload: &[u8], at: usize) -> Option<RegionDesc> {
    Some(RegionDesc {
        guest_phys_addr: word(payload, at)?,
        memory_size: word(payload, at + 8)?,
        userspace_addr: word(payload, at + 16)?,
        mmap_offset: word(payload, at + 24)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;

    const REQ_SET_MEM_TABLE: u32 = FrontendReq::SET_MEM_TABLE as u32;
    const REQ_SET_LOG_BASE: u32 = FrontendReq::SET_LOG_BASE as u32;
    const REQ_ADD_MEM_REG: u32 = FrontendReq::ADD_MEM_REG as u32;
    const MIB16: u64 = 16 << 20;
    const USER: u64 = 0x7f00_0000_0000;

    fn memfd(len: u64) -> OwnedFd {
        // SAFETY: memfd_create with a valid C string; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"region-check".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f.into()
    }

    fn table(regions: &[[u64; 4]]) -> Vec<u8> {
        let mut p = (regions.len() as u64).to_le_bytes().to_vec();
        for r in regions {
            r.iter().for_each(|w| p.extend_from_slice(&w.to_le_bytes()));
        }
        p
    }

    #[test]
    fn region_larger_than_file_is_refused() {
        let small = memfd(4096);
        let p = table(&[[0, MIB16, USER, 0]]);
        let err = check(REQ_SET_MEM_TABLE, &p, std::slice::from_ref(&small)).unwrap_err();
        assert!(err.contains("beyond the end of the file"), "{err}");
        // The same region in a file that holds it passes; so does ADD_MEM_REG's layout.
        let big = memfd(MIB16);
        assert_eq!(check(REQ_SET_MEM_TABLE, &p, &[big]), Ok(()));
        let mut add = 0u64.to_le_bytes().to_vec();
        add.extend_from_slice(&p[8..]);
        let err = check(REQ_ADD_MEM_REG, &add, &[small]).unwrap_err();
        assert!(err.starts_with("ADD_MEM_REG region 0"), "{err}");
        assert_eq!(check(REQ_ADD_MEM_REG, &add, &[memfd(MIB16)]), Ok(()));
    }

    #[test]
    fn every_region_of_a_table_is_checked() {
        let p = table(&[[0, MIB16, USER, 0], [MIB16, MIB16, USER + MIB16, 4096]]);
        let err = check(REQ_SET_MEM_TABLE, &p, &[memfd(MIB16), memfd(MIB16)]).unwrap_err();
        assert!(err.starts_with("SET_MEM_TABLE region 1"), "{err}");
        assert_eq!(
            check(REQ_SET_MEM_TABLE, &p, &[memfd(MIB16), memfd(MIB16 + 4096)]),
            Ok(())
        );
        // Fewer fds than regions: some region could not be checked.
        assert!(check(REQ_SET_MEM_TABLE, &p, &[memfd(MIB16)]).is_err());
    }

    #[test]
    fn unaligned_region_start_is_refused() {
        let p = table(&[[2, MIB16 - 4096, USER + 2, 0]]);
        let err = check(REQ_SET_MEM_TABLE, &p, &[memfd(MIB16)]).unwrap_err();
        assert!(err.contains("guest address not page-aligned"), "{err}");
    }

    #[test]
    fn dirty_log_smaller_than_its_file_claims_is_refused() {
        let log = |size: u64, offset: u64| [size.to_le_bytes(), offset.to_le_bytes()].concat();
        let err = check(REQ_SET_LOG_BASE, &log(512, 0), &[memfd(0)]).unwrap_err();
        assert!(err.contains("beyond the end of the file"), "{err}");
        assert_eq!(check(REQ_SET_LOG_BASE, &log(512, 0), &[memfd(512)]), Ok(()));
        let err = check(REQ_SET_LOG_BASE, &log(512, 4096), &[memfd(4096)]).unwrap_err();
        assert!(err.contains("beyond the end of the file"), "{err}");
    }

    #[test]
    fn messages_that_map_nothing_pass() {
        assert_eq!(
            check(FrontendReq::SET_FEATURES as u32, &[0; 8], &[]),
            Ok(())
        );
        let kick = FrontendReq::SET_VRING_KICK as u32;
        assert_eq!(check(kick, &[0; 8], &[memfd(0)]), Ok(()));
        // A request the vhost crate does not know maps nothing either.
        assert_eq!(check(u32::MAX, &[0; 8], &[memfd(0)]), Ok(()));
        // Short payloads are the library's to refuse.
        assert_eq!(check(REQ_SET_MEM_TABLE, &[1, 0], &[]), Ok(()));
        assert_eq!(check(REQ_SET_LOG_BASE, &[0; 4], &[memfd(0)]), Ok(()));
    }
}
