//! The XDP side of `AF_XDP`: an `XSKMAP` and a four-instruction redirect program, attached to
//! the VF through a BPF link, all with raw `bpf(2)` calls.
//!
//! No C toolchain, no ELF object and no libbpf are involved at run time: the program is the
//! BPF equivalent of
//!
//! ```c
//! return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
//! ```
//!
//! written out as instructions below. `bpf_redirect_map`'s low flag bits are the action taken
//! when the map has no socket at that key (Linux >= 5.3), so a queue without an `AF_XDP`
//! socket keeps reaching the host stack instead of being dropped.
//!
//! The program is attached with `BPF_LINK_CREATE` (Linux >= 5.9) rather than the netlink
//! `IFLA_XDP` attribute: a link is owned by its file descriptor, so the program is detached when
//! the port's sockets close, including when the process dies, and never left behind on the VF.
//! A link also refuses (`EBUSY`) to replace a program someone else attached, so we never take
//! over a VF that another XDP user owns.
//!
//! Only one XDP program can be attached to a netdev per mode, so all queue pairs of a port share
//! one [`XdpProgram`] (its map holds one socket per queue id).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;

const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`: `BPF_XDP`.
const BPF_XDP: u32 = 37;
const BPF_PSEUDO_MAP_FD: u8 = 1;
/// `BPF_FUNC_redirect_map`.
const BPF_FUNC_REDIRECT_MAP: i32 = 51;
const XDP_PASS: i32 = 2;

/// `XDP_FLAGS_SKB_MODE`: generic XDP, run on the skb by the core network stack; works on every
/// netdev, always copies.
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE`: native XDP in the driver; the only mode that allows zero copy.
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// `offsetof(struct xdp_md, rx_queue_index)`.
const XDP_MD_RX_QUEUE_INDEX: i16 = 16;

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BpfInsn {
    code: u8,
    /// dst register in the low nibble, src register in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// The redirect program; `map_fd` is patched into the 64-bit immediate load of the map.
pub fn redirect_program(map_fd: RawFd) -> [BpfInsn; 6] {
    [
        // r2 = *(u32 *)(r1 + offsetof(struct xdp_md, rx_queue_index))   (BPF_LDX|BPF_MEM|BPF_W)
        insn(0x61, 2, 1, XDP_MD_RX_QUEUE_INDEX, 0),
        // r1 = map (BPF_LD|BPF_DW|BPF_IMM with src = BPF_PSEUDO_MAP_FD; two instruction slots)
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        // r3 = XDP_PASS   (BPF_ALU64|BPF_MOV|BPF_K)
        insn(0xb7, 3, 0, 0, XDP_PASS),
        // r0 = bpf_redirect_map(r1, r2, r3)   (BPF_JMP|BPF_CALL)
        insn(0x85, 0, 0, 0, BPF_FUNC_REDIRECT_MAP),
        // return r0   (BPF_JMP|BPF_EXIT)
        insn(0x95, 0, 0, 0, 0),
    ]
}

/// `union bpf_attr` as far as `BPF_MAP_CREATE` reads it.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr` for `BPF_MAP_UPDATE_ELEM`.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` (XDP needs no target-specific part).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `bpf_attr` prefix of `size_of::<T>()` bytes; the
    // kernel copies that many bytes in (and treats the rest of its union as zero), and for the
    // commands used here only writes through pointers we put in it (the verifier log buffer).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_from(rc: libc::c_long) -> io::Result<OwnedFd> {
    let raw = RawFd::try_from(rc).map_err(|_| io::Error::other("bpf returned a bad fd"))?;
    // SAFETY: the bpf() commands used here return a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    // At most 15 bytes: the kernel wants a NUL-terminated name of [A-Za-z0-9_.].
    for (d, s) in out.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    out
}

/// Which step of setting up the program failed, for the error message.
#[derive(Debug, thiserror::Error)]
pub enum XdpProgError {
    #[error("creating the XSKMAP failed: {0}")]
    Map(#[source] io::Error),
    #[error("loading the XDP program failed: {source}{}", if log.is_empty() { String::new() } else { format!(" (verifier: {log})") })]
    Load {
        #[source]
        source: io::Error,
        log: String,
    },
    #[error("attaching the XDP program ({mode}) failed: {source}")]
    Attach {
        mode: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("adding the socket of queue {queue} to the XSKMAP failed: {source}")]
    MapUpdate {
        queue: u32,
        #[source]
        source: io::Error,
    },
}

/// The map, program and link of one port; dropping the last reference detaches the program.
#[derive(Debug)]
pub struct XdpProgram {
    map: OwnedFd,
    // Drop order does not matter: the link holds its own reference to the program.
    _prog: OwnedFd,
    _link: OwnedFd,
    /// The attach flags in force ([`XDP_FLAGS_DRV_MODE`] or [`XDP_FLAGS_SKB_MODE`]).
    pub flags: u32,
}

impl XdpProgram {
    /// Creates a map for `queues` sockets, loads the program and attaches it to `ifindex`,
    /// native mode first (`try_native`), then generic mode.
    pub fn attach(ifindex: u32, queues: u32, try_native: bool) -> Result<Self, XdpProgError> {
        let mut m = MapCreateAttr {
            map_type: BPF_MAP_TYPE_XSKMAP,
            key_size: 4,
            value_size: 4,
            max_entries: queues.max(1),
            map_name: name16("vhost_relay_xsk"),
            ..Default::default()
        };
        let map = bpf(BPF_MAP_CREATE, &mut m)
            .and_then(fd_from)
            .map_err(XdpProgError::Map)?;

        let insns = redirect_program(map.as_raw_fd());
        let license = c"GPL"; // bpf_redirect_map is available to any license; GPL is customary.
        let mut log = vec![0u8; 4096];
        let mut p = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            prog_name: name16("vhost_relay"),
            expected_attach_type: BPF_XDP,
            ..Default::default()
        };
        let prog = match bpf(BPF_PROG_LOAD, &mut p).and_then(fd_from) {
            Ok(fd) => fd,
            Err(source) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                return Err(XdpProgError::Load {
                    source,
                    log: String::from_utf8_lossy(&log[..end]).trim().to_string(),
                });
            }
        };

        let mut modes = Vec::with_capacity(2);
        if try_native {
            modes.push(XDP_FLAGS_DRV_MODE);
        }
        modes.push(XDP_FLAGS_SKB_MODE);
        let mut last = None;
        for flags in modes {
            let mut l = LinkCreateAttr {
                prog_fd: prog.as_raw_fd() as u32,
                target_ifindex: ifindex,
                attach_type: BPF_XDP,
                flags,
            };
            match bpf(BPF_LINK_CREATE, &mut l).and_then(fd_from) {
                Ok(link) => {
                    return Ok(XdpProgram {
                        map,
                        _prog: prog,
                        _link: link,
                        flags,
                    })
                }
                Err(e) => {
                    log::debug!(
                        "ifindex {ifindex}: XDP attach ({}) failed: {e}",
                        mode_name(flags)
                    );
                    last = Some((flags, e));
                }
            }
        }
        let (flags, source) = last.unwrap_or((XDP_FLAGS_SKB_MODE, io::Error::other("no mode")));
        Err(XdpProgError::Attach {
            mode: mode_name(flags),
            source,
        })
    }

    /// True when the program runs in the driver (native XDP).
    pub fn native(&self) -> bool {
        self.flags & XDP_FLAGS_DRV_MODE != 0
    }

    /// Directs the packets of `queue` to the socket `xsk`.
    pub fn insert(&self, queue: u32, xsk: RawFd) -> Result<(), XdpProgError> {
        let key = queue;
        let value = xsk as u32;
        let mut a = MapElemAttr {
            map_fd: self.map.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut a)
            .map(|_| ())
            .map_err(|source| XdpProgError::MapUpdate { queue, source })
    }
}

/// Name of an attach mode for logs.
pub fn mode_name(flags: u32) -> &'static str {
    if flags & XDP_FLAGS_DRV_MODE != 0 {
        "native"
    } else {
        "generic"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<BpfInsn>(), 8);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(MapElemAttr, value), 16);
        assert_eq!(std::mem::offset_of!(MapCreateAttr, map_name), 28);
    }

    #[test]
    fn program_encodes_registers_and_map_fd() {
        let p = redirect_program(7);
        assert_eq!((p[0].code, p[0].regs, p[0].off), (0x61, 0x12, 16));
        assert_eq!((p[1].code, p[1].regs, p[1].imm), (0x18, 0x11, 7));
        assert_eq!(p[2], BpfInsn::default());
        assert_eq!((p[3].regs, p[3].imm), (3, XDP_PASS));
        assert_eq!(p[4].imm, 51);
    }
}
