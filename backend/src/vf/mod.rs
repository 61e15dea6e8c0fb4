//! The VF side of the relay: a Linux netdev reached through packet sockets.
//!
//! The relay stands in for the guest on a Linux netdev that represents an SR-IOV VF (in the tests a
//! veth end inside a network namespace). Each virtio queue pair gets its own [`VfSocket`], which is
//! one of two kinds, chosen per port ([`VfMode`], `--vf-mode` / `vf_mode`):
//! - [`af_packet`]: an `AF_PACKET` socket with `PACKET_VNET_HDR`, an mmap'd `TPACKET_V2` receive
//!   ring and batched `sendmmsg` transmission straight out of guest memory. Works on every netdev,
//!   carries GSO and checksum offload information both ways. The default.
//! - [`af_xdp`]: an `AF_XDP` socket per netdev queue, fed by a tiny XDP redirect program
//!   ([`xdp_prog`]); zero copy where the driver allows it. Offloads are done in software on
//!   transmit and not used on receive (see [`af_xdp`] for what that means for device features).
//!
//! `auto` tries `AF_XDP` and falls back to `AF_PACKET`; [`open_queues`] logs which was chosen
//! and why.
//!
//! This module also answers the questions the device asks about the netdev itself (index, MTU,
//! MAC address, up) through [`interface_info`].

pub mod af_packet;
pub mod af_xdp;
mod socket;
pub(crate) mod sockopt;
mod sys;
#[cfg(test)]
mod testnet;
pub mod watch;
pub mod xdp_prog;

pub use af_packet::{PacketSocket, RingConfig, TxProgress, VfStats, MAX_RX_PACKET, MAX_TX_BATCH};
pub use af_xdp::XdpSocket;
pub use socket::{open_af_xdp, open_queues, VfMode, VfSocket};

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;

/// Errors of the VF data path. Every variant names the interface it concerns.
#[derive(Debug, thiserror::Error)]
pub enum VfError {
    /// `if_nametoindex` (or a later bind) found no interface of that name in our network namespace.
    #[error("network interface {ifname:?} does not exist (in this network namespace)")]
    NoSuchInterface { ifname: String },

    /// The name can never be an interface name (see [`validate_ifname`]), so we do not even
    /// ask the kernel.
    #[error("invalid network interface name {ifname:?}: {reason}")]
    InvalidName {
        ifname: String,
        reason: &'static str,
    },

    /// The kernel refused an operation for lack of privilege. `AF_PACKET` sockets need
    /// `CAP_NET_RAW` in the network namespace that owns the interface.
    #[error(
        "permission denied for {op} on interface {ifname:?} \
         (AF_PACKET needs CAP_NET_RAW in the interface's network namespace): {source}"
    )]
    Permission {
        ifname: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// Any other failing system call while setting up or using the socket.
    #[error("{op} on interface {ifname:?} failed: {source}")]
    Io {
        ifname: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// The interface is not an Ethernet device; the relay only speaks Ethernet frames.
    #[error("interface {ifname:?} is not an Ethernet device (ARPHRD type {hw_type})")]
    NotEthernet { ifname: String, hw_type: u16 },

    /// The ring configuration cannot be turned into a valid `PACKET_RX_RING` request.
    #[error("invalid receive ring configuration for interface {ifname:?}: {reason}")]
    BadRing { ifname: String, reason: String },

    /// Joining the `PACKET_FANOUT` group failed while the interface was up, e.g. because the group
    /// id is already used with other settings or for another interface.
    #[error("joining fanout group {group} on interface {ifname:?} failed: {source}")]
    Fanout {
        ifname: String,
        group: u16,
        #[source]
        source: io::Error,
    },

    /// `AF_XDP` cannot serve this interface (or setting it up failed); `auto` mode falls back
    /// to `AF_PACKET` on this error.
    #[error("AF_XDP on interface {ifname:?}: {reason}")]
    AfXdp { ifname: String, reason: String },

    /// The caller handed `tx_batch` a packet description that cannot be right (a programming error
    /// in the device, never something a guest can cause when the device validates descriptors).
    #[error("invalid transmit batch for interface {ifname:?}: packet {packet}: {reason}")]
    BadTxBatch {
        ifname: String,
        packet: usize,
        reason: &'static str,
    },
}

impl VfError {
    /// Classifies a failed system call: privilege problems and vanished interfaces get their own
    /// variants so that operators see the actual cause, not just an errno.
    pub(crate) fn from_os(ifname: &str, op: &'static str, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => VfError::Permission {
                ifname: ifname.to_owned(),
                op,
                source,
            },
            Some(libc::ENODEV) => VfError::NoSuchInterface {
                ifname: ifname.to_owned(),
            },
            _ => VfError::Io {
                ifname: ifname.to_owned(),
                op,
                source,
            },
        }
    }
}

/// What the device needs to know about the netdev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// Kernel interface index.
    pub index: u32,
    /// Current MTU (layer 3 payload bytes, without the Ethernet header).
    pub mtu: u32,
    /// Current hardware address.
    pub mac: [u8; 6],
    /// Administratively up (`IFF_UP`).
    pub up: bool,
}

/// Checks a transmit batch's description (see [`VfSocket::try_tx_batch`]): each packet a
/// non-empty range of `iovs`, of at most `max_iovs` iovecs if given, whose first iovec is
/// exactly the 10-byte [`crate::net_hdr::VnetHdr`].
pub(crate) fn check_tx_batch(
    ifname: &str,
    iovs: &[libc::iovec],
    pkts: &[std::ops::Range<usize>],
    max_iovs: Option<usize>,
) -> Result<(), VfError> {
    for (i, r) in pkts.iter().enumerate() {
        let bad = |reason| VfError::BadTxBatch {
            ifname: ifname.to_owned(),
            packet: i,
            reason,
        };
        if r.start >= r.end || r.end > iovs.len() {
            return Err(bad("iovec range empty or out of bounds"));
        }
        if max_iovs.is_some_and(|max| r.len() > max) {
            return Err(bad("more iovecs than UIO_MAXIOV (1024)"));
        }
        if iovs[r.start].iov_len != crate::net_hdr::VNET_HDR_LEN {
            return Err(bad("first iovec is not the 10-byte virtio-net header"));
        }
    }
    Ok(())
}

/// Checks that `ifname` can name a network interface; the error says why it cannot.
///
/// The kernel's rules (`dev_valid_name`): 1 to `IFNAMSIZ - 1` (15) bytes, not "." or "..", no
/// '/' and no byte its `isspace` takes for white space (which includes 0xA0). No NUL either,
/// which a C string cannot carry. ':' is allowed: the netdev ioctls read "eth0:1" as eth0.
pub fn validate_ifname(ifname: &str) -> Result<(), &'static str> {
    if ifname.is_empty() {
        return Err("empty");
    }
    if ifname.len() >= libc::IFNAMSIZ {
        return Err("longer than 15 bytes");
    }
    if ifname == "." || ifname == ".." {
        return Err("reserved name");
    }
    for b in ifname.bytes() {
        match b {
            b'/' => return Err("contains '/'"),
            0 => return Err("contains NUL"),
            b' ' | b'\t'..=b'\r' | 0xa0 => return Err("contains white space"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks that `ifname` can be an interface name ([`validate_ifname`]) and returns it as a C
/// string.
pub(crate) fn c_ifname(ifname: &str) -> Result<CString, VfError> {
    let bad = |reason| VfError::InvalidName {
        ifname: ifname.to_owned(),
        reason,
    };
    validate_ifname(ifname).map_err(bad)?;
    CString::new(ifname).map_err(|_| bad("contains NUL"))
}

/// A socket for the generic netdev ioctls (`SIOCGIF*`, `SIOCETHTOOL`): any socket serves,
/// and a UDP socket needs no privilege.
pub(crate) fn ioctl_socket(ifname: &str) -> Result<OwnedFd, VfError> {
    sockopt::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
        .map_err(|e| VfError::from_os(ifname, "socket(AF_INET) for ioctl", e))
}

/// Resolves an interface name to its index; a missing interface is an error naming it.
pub fn if_index(ifname: &str) -> Result<u32, VfError> {
    let c = c_ifname(ifname)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::ENXIO) => VfError::NoSuchInterface {
                ifname: ifname.to_owned(),
            },
            _ => VfError::from_os(ifname, "if_nametoindex", err),
        });
    }
    Ok(index)
}

/// Builds an `ifreq` carrying the interface name.
fn ifreq_for(name: &CString) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (name bytes and a union of integers/sockaddrs); all zero is
    // a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    ifr
}

/// Runs one `SIOCGIF*` ioctl on `fd` for `name`.
fn ifreq_ioctl(
    fd: &OwnedFd,
    ifname: &str,
    name: &CString,
    req: libc::c_ulong,
    op: &'static str,
) -> Result<libc::ifreq, VfError> {
    use std::os::fd::AsRawFd;
    let mut ifr = ifreq_for(name);
    // SAFETY: `ifr` is a valid, writable ifreq for the duration of the call; the SIOCGIF* requests
    // used here only write inside it.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, &mut ifr as *mut libc::ifreq) };
    if rc < 0 {
        return Err(VfError::from_os(ifname, op, io::Error::last_os_error()));
    }
    Ok(ifr)
}

/// Index, MTU, MAC address and up state of `ifname` (`SIOCGIFMTU`, `SIOCGIFHWADDR`,
/// `SIOCGIFFLAGS`). Needs no privilege. Fails with [`VfError::NoSuchInterface`] if it does not
/// exist and [`VfError::NotEthernet`] if it is not an Ethernet device.
pub fn interface_info(ifname: &str) -> Result<InterfaceInfo, VfError> {
    let index = if_index(ifname)?;
    let name = c_ifname(ifname)?;
    let fd = ioctl_socket(ifname)?;

    let ifr = ifreq_ioctl(&fd, ifname, &name, libc::SIOCGIFMTU, "SIOCGIFMTU")?;
    // SAFETY: SIOCGIFMTU filled the `ifru_mtu` member.
    let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };

    let ifr = ifreq_ioctl(&fd, ifname, &name, libc::SIOCGIFHWADDR, "SIOCGIFHWADDR")?;
    // SAFETY: SIOCGIFHWADDR filled the `ifru_hwaddr` member.
    let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    if hw.sa_family != libc::ARPHRD_ETHER {
        return Err(VfError::NotEthernet {
            ifname: ifname.to_owned(),
            hw_type: hw.sa_family,
        });
    }
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *dst = *src as u8;
    }

    let ifr = ifreq_ioctl(&fd, ifname, &name, libc::SIOCGIFFLAGS, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags } as u16 as libc::c_int;

    Ok(InterfaceInfo {
        index,
        mtu: u32::try_from(mtu).unwrap_or(0),
        mac,
        up: flags & libc::IFF_UP != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::testnet::{ip, with_netns};
    use super::*;

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        let fifteen = "abcdefghijklmno";
        for good in ["eth0", "a", fifteen, "eth0:1", "vf.0", "...", "vf-0_a"] {
            assert_eq!(validate_ifname(good), Ok(()), "{good:?}");
        }
        let bad = [
            ("", "empty"),
            ("abcdefghijklmnop", "longer than 15 bytes"),
            (".", "reserved name"),
            ("..", "reserved name"),
            ("a/b", "contains '/'"),
            ("a\0b", "contains NUL"),
            ("a b", "contains white space"),
            ("a\tb", "contains white space"),
            ("a\u{b}b", "contains white space"),
            ("\u{e0}", "contains white space"),
        ];
        for (name, why) in bad {
            assert_eq!(validate_ifname(name), Err(why), "{name:?}");
        }
    }

    #[test]
    fn names_are_validated_before_asking_the_kernel() {
        for bad in ["", "a/b", "sixteen-chars-xx", "with space", "."] {
            match interface_info(bad) {
                Err(VfError::InvalidName { ifname, .. }) => assert_eq!(ifname, bad),
                other => panic!("{bad:?}: expected InvalidName, got {other:?}"),
            }
        }
    }

    #[test]
    fn missing_interface_error_names_it() {
        with_netns(|| {
            let err = interface_info("nosuchvf0").expect_err("interface must not exist");
            assert!(matches!(err, VfError::NoSuchInterface { .. }), "{err:?}");
            assert!(err.to_string().contains("nosuchvf0"), "{err}");
        });
    }

    #[test]
    fn non_ethernet_interfaces_are_refused() {
        with_netns(|| match interface_info("lo") {
            Err(VfError::NotEthernet { ifname, hw_type }) => {
                assert_eq!((ifname.as_str(), hw_type), ("lo", libc::ARPHRD_LOOPBACK));
            }
            other => panic!("expected NotEthernet, got {other:?}"),
        });
    }

    #[test]
    fn reports_mtu_mac_and_state() {
        with_netns(|| {
            ip(&["link", "add", "vfa", "type", "veth", "peer", "name", "vfb"]);
            ip(&[
                "link",
                "set",
                "vfa",
                "address",
                "02:11:22:33:44:55",
                "mtu",
                "1400",
            ]);
            let info = interface_info("vfa").expect("vfa exists");
            assert_eq!(info.mtu, 1400);
            assert_eq!(info.mac, [0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
            assert!(!info.up);
            ip(&["link", "set", "vfa", "up"]);
            ip(&["link", "set", "vfb", "up"]);
            let info = interface_info("vfa").expect("vfa exists");
            assert!(info.up);
            assert!(info.index > 0);
            assert_eq!(info.index, if_index("vfa").expect("vfa exists"));
        });
    }
}
