//! Checks on the files a frontend asks us to map (guest memory regions, dirty logs).
//!
//! Mapping `size` bytes at `offset` of a file succeeds even when the file is shorter; the
//! first touch of a page past its end then raises SIGBUS and kills the whole process, every
//! port with it. So every frontend fd is checked with fstat before anything maps it: it must
//! be a regular file (memfd, hugetlbfs, tmpfs, ... all are) and hold the whole area.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Why a frontend's file cannot back the mapping it describes.
#[derive(Debug, thiserror::Error)]
pub enum FileAreaError {
    #[error("{0}")]
    Unusable(&'static str),
    #[error("fstat: {0}")]
    Stat(io::Error),
}

/// The host page size (what mmap offsets must be multiples of).
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).unwrap_or(0).max(1)
}

/// Checks that `size` bytes at `offset` of `fd` can be mapped and touched without SIGBUS:
/// a non-empty area at a page-aligned offset, inside a regular file.
pub fn check_file_area(fd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<(), FileAreaError> {
    let bad = FileAreaError::Unusable;
    if size == 0 {
        return Err(bad("empty"));
    }
    if !offset.is_multiple_of(page_size()) {
        return Err(bad("offset not page-aligned"));
    }
    let end = offset
        .checked_add(size)
        .ok_or(bad("offset + size overflows"))?;
    // SAFETY: fstat writes only into this local stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid (borrowed) fd and a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(FileAreaError::Stat(io::Error::last_os_error()));
    }
    // Devices and sockets have no size to check (and no business backing guest memory).
    if (st.st_mode & libc::S_IFMT) != libc::S_IFREG {
        return Err(bad("not a regular file"));
    }
    if u64::try_from(st.st_size).unwrap_or(0) < end {
        return Err(bad("beyond the end of the file"));
    }
    Ok(())
}

/// One guest memory region of a `SET_MEM_TABLE` or `ADD_MEM_REG`, as the frontend sent it.
#[derive(Clone, Copy, Debug)]
pub struct RegionDesc {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub mmap_offset: u64,
}

/// Checks a guest memory region before anything maps it: its file holds it (see
/// [`check_file_area`]), neither address range wraps, and its guest and frontend addresses
/// are page-aligned, as QEMU always sends them. A misaligned start would shift every host
/// pointer derived from a guest address off its natural alignment (rings are read through
/// atomics), so it is refused rather than handled.
pub fn check_guest_region(fd: BorrowedFd<'_>, r: &RegionDesc) -> Result<(), FileAreaError> {
    let bad = FileAreaError::Unusable;
    let page = page_size();
    if !r.guest_phys_addr.is_multiple_of(page) {
        return Err(bad("guest address not page-aligned"));
    }
    if !r.userspace_addr.is_multiple_of(page) {
        return Err(bad("frontend address not page-aligned"));
    }
    let wraps = |start: u64| start.checked_add(r.memory_size).is_none();
    if wraps(r.guest_phys_addr) || wraps(r.userspace_addr) {
        return Err(bad("address + size overflows"));
    }
    check_file_area(fd, r.mmap_offset, r.memory_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::{AsFd, FromRawFd};

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a valid C string; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"file-area".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn why(r: Result<(), FileAreaError>) -> &'static str {
        match r {
            Err(FileAreaError::Unusable(w)) => w,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn region_larger_than_file_is_refused() {
        let page = page_size();
        let f = memfd(4096.max(page));
        assert!(check_file_area(f.as_fd(), 0, 4096.max(page)).is_ok());
        assert_eq!(
            why(check_file_area(f.as_fd(), 0, 16 << 20)),
            "beyond the end of the file"
        );
        // Inside the file alone, but not with the offset added.
        assert_eq!(
            why(check_file_area(f.as_fd(), page, 1)),
            "beyond the end of the file"
        );
        let empty = memfd(0);
        assert_eq!(
            why(check_file_area(empty.as_fd(), 0, 512)),
            "beyond the end of the file"
        );
    }

    #[test]
    fn lying_offsets_and_sizes_are_refused() {
        let page = page_size();
        let f = memfd(2 * page);
        assert_eq!(why(check_file_area(f.as_fd(), 0, 0)), "empty");
        assert_eq!(
            why(check_file_area(f.as_fd(), 2, 16)),
            "offset not page-aligned"
        );
        assert_eq!(
            why(check_file_area(f.as_fd(), page, u64::MAX - page + 1)),
            "offset + size overflows"
        );
        assert!(check_file_area(f.as_fd(), page, page).is_ok());
    }

    #[test]
    fn fds_that_are_not_files_are_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(
            why(check_file_area(a.as_fd(), 0, 4096)),
            "not a regular file"
        );
        let dev = File::open("/dev/zero").unwrap();
        assert_eq!(
            why(check_file_area(dev.as_fd(), 0, 4096)),
            "not a regular file"
        );
    }

    fn region(gpa: u64, size: u64, user: u64, offset: u64) -> RegionDesc {
        RegionDesc {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: user,
            mmap_offset: offset,
        }
    }

    #[test]
    fn unaligned_region_start_is_refused() {
        let page = page_size();
        let f = memfd(4 * page);
        let ok = region(page, 2 * page, 0x7f00_0000_0000, page);
        assert!(check_guest_region(f.as_fd(), &ok).is_ok());
        let gpa2 = region(2, 2 * page, 0x7f00_0000_0002, 0);
        assert_eq!(
            why(check_guest_region(f.as_fd(), &gpa2)),
            "guest address not page-aligned"
        );
        let user2 = region(0, 2 * page, 0x7f00_0000_0002, 0);
        assert_eq!(
            why(check_guest_region(f.as_fd(), &user2)),
            "frontend address not page-aligned"
        );
        let off2 = region(0, 2 * page, 0x7f00_0000_0000, 2);
        assert_eq!(
            why(check_guest_region(f.as_fd(), &off2)),
            "offset not page-aligned"
        );
    }

    #[test]
    fn regions_that_wrap_or_outgrow_their_file_are_refused() {
        let page = page_size();
        let f = memfd(4 * page);
        let top = u64::MAX - page + 1;
        assert_eq!(
            why(check_guest_region(f.as_fd(), &region(top, 2 * page, 0, 0))),
            "address + size overflows"
        );
        assert_eq!(
            why(check_guest_region(f.as_fd(), &region(0, 2 * page, top, 0))),
            "address + size overflows"
        );
        assert_eq!(
            why(check_guest_region(f.as_fd(), &region(0, 16 << 20, 0, 0))),
            "beyond the end of the file"
        );
    }
}
