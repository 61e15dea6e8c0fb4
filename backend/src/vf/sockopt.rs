//! Socket-option calls both VF socket kinds (`AF_PACKET`, `AF_XDP`) make.

use std::io;
use std::os::fd::RawFd;

pub fn last_err() -> io::Error {
    io::Error::last_os_error()
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
