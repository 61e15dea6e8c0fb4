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
    if raw < 0 {
        return Err(last_err());
    }
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
    if rc < 0 {
        Err(last_err())
    } else {
        Ok(())
    }
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
    if rc < 0 {
        Err(last_err())
    } else {
        Ok(())
    }
}

/// Reads and clears the socket's pending error (`SO_ERROR`), e.g. `ENETDOWN` after the link
/// went down. Call it when epoll reports `EPOLLERR`, which otherwise stays set.
pub fn take_error(fd: RawFd) -> Option<io::Error> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val`/`len` are valid and writable.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Some(last_err())
    } else if val != 0 {
        Some(io::Error::from_raw_os_error(val))
    } else {
        None
    }
}
