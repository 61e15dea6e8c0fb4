//! A raw `AF_PACKET` socket on one interface, for the "other side" of a test: the wire behind a
//! VF, the peer of a veth pair.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How a [`RawSocket`] is set up beyond "every frame on the interface".
#[derive(Clone, Copy, Debug)]
pub struct RawOptions {
    /// The EtherType to receive (`ETH_P_ALL` for everything).
    pub protocol: u16,
    /// `PACKET_VNET_HDR`: frames carry a virtio-net header, so GSO packets are seen whole with
    /// their offload metadata.
    pub vnet_hdr: bool,
    /// `PACKET_IGNORE_OUTGOING`: do not receive what this host sends on the interface.
    pub ignore_outgoing: bool,
    /// A receive buffer for bursts of thousands of frames (`SO_RCVBUFFORCE`, 16 MiB): a test
    /// reads slower than the backend sends, and a full buffer would look like loss.
    pub large_rcvbuf: bool,
}

impl Default for RawOptions {
    fn default() -> Self {
        RawOptions {
            protocol: libc::ETH_P_ALL as u16,
            vnet_hdr: false,
            ignore_outgoing: false,
            large_rcvbuf: false,
        }
    }
}

/// The largest frame [`RawSocket::recv`] returns whole (a GSO packet with its header).
const MAX_FRAME: usize = 70_000;

/// A bound, non-blocking packet socket; frames are sent to and received from its interface.
#[derive(Debug)]
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: i32,
    protocol: u16,
}

/// `what` failed with the calling thread's errno.
fn os_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl RawSocket {
    /// Opens a socket on `ifname` in the calling thread's network namespace.
    pub fn open(ifname: &str, options: RawOptions) -> io::Result<RawSocket> {
        let name = std::ffi::CString::new(ifname)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has NUL"))?;
        // SAFETY: if_nametoindex reads a valid C string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(os_error(&format!("no interface {ifname}")));
        }
        let ifindex = i32::try_from(index).map_err(io::Error::other)?;
        // SAFETY: plain socket call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(options.protocol.to_be()),
            )
        };
        if raw < 0 {
            return Err(os_error("AF_PACKET socket"));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sock = RawSocket {
            fd,
            ifindex,
            protocol: options.protocol,
        };
        sock.configure(options)?;
        let sll = sock.addr();
        // SAFETY: a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(os_error(&format!("bind to {ifname}")));
        }
        Ok(sock)
    }

    /// The socket options of `options`, set before binding.
    fn configure(&self, options: RawOptions) -> io::Result<()> {
        if options.vnet_hdr {
            self.set_int(
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                1,
                "PACKET_VNET_HDR",
            )?;
        }
        if options.ignore_outgoing {
            let opt = libc::PACKET_IGNORE_OUTGOING;
            self.set_int(libc::SOL_PACKET, opt, 1, "PACKET_IGNORE_OUTGOING")?;
        }
        if options.large_rcvbuf {
            let opt = libc::SO_RCVBUFFORCE;
            self.set_int(libc::SOL_SOCKET, opt, 16 << 20, "SO_RCVBUFFORCE")?;
        }
        Ok(())
    }

    fn set_int(&self, level: i32, name: i32, value: libc::c_int, what: &str) -> io::Result<()> {
        // SAFETY: the option buffer is a live c_int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if rc != 0 {
            return Err(os_error(what));
        }
        Ok(())
    }

    fn addr(&self) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = self.protocol.to_be();
        sll.sll_ifindex = self.ifindex;
        sll
    }

    /// Sends one Ethernet frame (with a virtio-net header first if `vnet_hdr` is on).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let sll = self.addr();
        // SAFETY: a valid buffer and address of the sizes passed.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(os_error("sendto"));
        }
        if rc as usize != frame.len() {
            return Err(io::Error::other(format!(
                "sendto took {rc} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }

    /// The next frame, waiting at most until `deadline`; `None` if none came.
    pub fn recv(&self, deadline: Instant) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            // SAFETY: a writable buffer of the length passed.
            let rc = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if rc >= 0 {
                buf.truncate(rc as usize);
                return Some(buf);
            }
            if !wait_readable(self.fd.as_raw_fd(), deadline) {
                return None;
            }
        }
    }

    /// Frames until `want` of them matched `pred` or `timeout` passed; only matching ones.
    pub fn recv_matching(
        &self,
        want: usize,
        timeout: Duration,
        pred: impl Fn(&[u8]) -> bool,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < want {
            match self.recv(deadline) {
                Some(f) if pred(&f) => got.push(f),
                Some(_) => {}
                None => break,
            }
        }
        got
    }
}

/// Waits until `fd` is readable or `deadline` passes.
pub fn wait_readable(fd: i32, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = left.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    rc > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_interface_is_an_error() {
        let e = RawSocket::open("no-such-if0", RawOptions::default()).unwrap_err();
        assert!(e.to_string().contains("no-such-if0"), "{e}");
    }

    /// Needs root, as every namespace test of the workspace does.
    #[test]
    fn frames_cross_a_veth_pair_and_the_protocol_filters() {
        let got = crate::netns::with_new_netns(|| {
            crate::netns::veth_pair("rsa", "rsb").expect("veth pair");
            let any = RawSocket::open("rsb", RawOptions::default()).expect("open rsb");
            let rarp = RawOptions {
                protocol: libc::ETH_P_RARP as u16,
                ..RawOptions::default()
            };
            let rarp_only = RawSocket::open("rsb", rarp).expect("open rsb for RARP");
            let out = RawSocket::open("rsa", RawOptions::default()).expect("open rsa");
            let mut frame = vec![0xff; 6];
            frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x88, 0xb5]);
            frame.resize(60, 0x5a);
            out.send(&frame).expect("send");
            let is_ours = |f: &[u8]| f == frame.as_slice();
            let seen = any.recv_matching(1, Duration::from_secs(2), is_ours);
            // By now the frame has reached rsb's sockets: had it matched, it would be queued.
            (
                seen,
                rarp_only.recv(Instant::now() + Duration::from_millis(200)),
            )
        })
        .expect("a new namespace");
        assert_eq!(got.0.len(), 1, "the frame arrived");
        assert_eq!(got.1, None, "a RARP socket saw a frame of another protocol");
    }
}
