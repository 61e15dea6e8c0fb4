//! Link events from rtnetlink: a VF deleted and created again (a driver reset, a VF
//! re-provisioned) comes back under the same name with a new interface index, and packet
//! sockets bound to the old index see nothing of it. [`LinkWatch`] tells which interfaces
//! appeared, so a port can re-open its sockets on the new one.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::sockopt;

/// An interface that exists now (`RTM_NEWLINK`: created, or its state changed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkUp {
    pub index: u32,
    pub name: String,
}

/// An `AF_NETLINK`/`NETLINK_ROUTE` socket in the `RTMGRP_LINK` group of the calling
/// thread's network namespace.
pub struct LinkWatch {
    fd: OwnedFd,
    buf: Vec<u8>,
}

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const RTA_HDRLEN: usize = 4;

impl AsRawFd for LinkWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl LinkWatch {
    pub fn open() -> io::Result<Self> {
        let fd = sockopt::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )?;
        // SAFETY: sockaddr_nl is plain old data; zero is valid (pid 0: the kernel assigns).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        sockopt::bind(fd.as_raw_fd(), &addr)?;
        Ok(LinkWatch {
            fd,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Waits for the next batch of link messages and returns the interfaces they show
    /// present. A lost batch (`ENOBUFS`: the kernel's queue overflowed) is reported as an
    /// empty list: the caller then checks its interface by name itself.
    pub fn wait(&mut self) -> io::Result<Vec<LinkUp>> {
        // SAFETY: `buf` is writable for its length for the duration of the call.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOBUFS) | Some(libc::EINTR) => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        Ok(parse(&self.buf[..n as usize]))
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The `RTM_NEWLINK` messages of one datagram, as (index, name); anything malformed ends
/// the parse (the kernel never sends it, and a lie costs only this batch).
fn parse(b: &[u8]) -> Vec<LinkUp> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind)) = (u32_at(b, at), u16_at(b, at + 4)) {
        let len = len as usize;
        let Some(msg) = b.get(at..at + len).filter(|_| len >= NLMSG_HDRLEN) else {
            break;
        };
        if kind == libc::RTM_NEWLINK {
            if let Some(up) = parse_link(&msg[NLMSG_HDRLEN..]) {
                out.push(up);
            }
        }
        at += len.next_multiple_of(4);
    }
    out
}

/// An `ifinfomsg` and its attributes: the index and `IFLA_IFNAME`.
fn parse_link(b: &[u8]) -> Option<LinkUp> {
    let index = u32_at(b, 4)?;
    let mut at = IFINFOMSG_LEN;
    while let (Some(len), Some(kind)) = (u16_at(b, at), u16_at(b, at + 2)) {
        let len = usize::from(len);
        if len < RTA_HDRLEN {
            return None;
        }
        let data = b.get(at + RTA_HDRLEN..at + len)?;
        if kind == libc::IFLA_IFNAME {
            let name = data.split(|&c| c == 0).next()?;
            return Some(LinkUp {
                index,
                name: String::from_utf8_lossy(name).into_owned(),
            });
        }
        at += len.next_multiple_of(4);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::testnet::{ip, with_netns};
    use super::*;

    #[test]
    fn a_created_interface_is_reported_with_its_index() {
        with_netns(|| {
            let mut w = LinkWatch::open().expect("netlink socket");
            ip(&["link", "add", "wa0", "type", "veth", "peer", "name", "wb0"]);
            let index = super::super::if_index("wa0").expect("wa0 exists");
            let mut seen = Vec::new();
            while !seen.iter().any(|l: &LinkUp| l.name == "wa0") {
                seen.extend(w.wait().expect("link messages"));
            }
            let l = seen.iter().find(|l| l.name == "wa0").unwrap();
            assert_eq!(l.index, index);
        });
    }

    #[test]
    fn truncated_messages_end_the_parse() {
        assert!(parse(&[]).is_empty());
        assert!(parse(&[200, 0, 0, 0, 16, 0]).is_empty());
        let mut m = vec![0u8; 40];
        m[..4].copy_from_slice(&40u32.to_ne_bytes());
        m[4..6].copy_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
        m[20..24].copy_from_slice(&7u32.to_ne_bytes());
        // An attribute claiming more bytes than there are.
        m[32..34].copy_from_slice(&100u16.to_ne_bytes());
        m[34..36].copy_from_slice(&libc::IFLA_IFNAME.to_ne_bytes());
        assert!(parse(&m).is_empty());
    }
}
