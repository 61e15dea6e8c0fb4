//! The socket calls of the VF side (`AF_PACKET`, `AF_XDP`, the ioctl and netlink sockets):
//! creation, binding, options and pending errors, each unsafe call in one place.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

pub fn last_err() -> io::Error {
    io::Error::last_os_error()
}

/// `socket(domain, ty, protocol)`, owned; `ty` carries `SOCK_CLOEXEC` and friends.
pub fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(domain, ty, protocol) };
    check(raw)?;
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `bind(fd, addr)` with `addr`'s size as the address length (`addr` is a `sockaddr_*`).
pub fn bind<T>(fd: RawFd, addr: &T) -> io::Result<()> {
    // SAFETY: `addr` points to a live `T` of `size_of::<T>()` bytes, which the kernel only
    // reads (and refuses if it is no address of the socket's family).
    let rc = unsafe {
        libc::bind(
            fd,
            (addr as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    check(rc)
}

/// `setsockopt(fd, level, name, val)` with `val`'s size as the option length.
pub fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: `val` points to a live `T` of `size_of::<T>()` bytes, which the kernel only reads.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    check(rc)
}

/// An option value the kernel may fill with any bytes.
///
/// # Safety
/// Implement only for plain old data: every bit pattern (all zero included) is a valid value.
pub unsafe trait OptionValue: Copy {}
// SAFETY: integers and the kernel's counter/offset structs (integers only) are plain old data.
unsafe impl OptionValue for libc::c_int {}
// SAFETY: as above.
unsafe impl OptionValue for super::sys::TpacketStats {}
// SAFETY: as above.
unsafe impl OptionValue for libc::xdp_statistics {}
// SAFETY: as above.
unsafe impl OptionValue for libc::xdp_mmap_offsets {}

/// `getsockopt(fd, level, name)`: the value, and how many of its bytes the kernel wrote (an
/// older kernel may know a shorter struct; the rest stays zero).
pub fn getsockopt<T: OptionValue>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<(T, usize)> {
    // SAFETY: `T` is plain old data (`OptionValue`), so all zero is a valid value.
    let mut val: T = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `val` is a live, writable `T` of `len` bytes, and any bytes the kernel writes
    // there make a valid `T`.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&mut val as *mut T).cast(), &mut len) };
    check(rc)?;
    Ok((val, len as usize))
}

/// A system call's return value: negative is the error in `errno`.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(last_err())
    } else {
        Ok(())
    }
}

/// Reads and clears the socket's pending error (`SO_ERROR`), e.g. `ENETDOWN` after the link
/// went down. Call it when epoll reports `EPOLLERR`, which otherwise stays set.
pub fn take_error(fd: RawFd) -> Option<io::Error> {
    match getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_ERROR) {
        Err(e) => Some(e),
        Ok((0, _)) => None,
        Ok((errno, _)) => Some(io::Error::from_raw_os_error(errno)),
    }
}
