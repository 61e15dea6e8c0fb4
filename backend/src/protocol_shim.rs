//! A control-plane shim between the frontend's socket and vhost-user-backend.
//!
//! QEMU's virtio-net sends `SET_VRING_ENABLE` as soon as the guest driver acks its features
//! (`peer_attach`), which is before `SET_FEATURES` reaches the backend (that only comes with
//! `vhost_net_start`, at DRIVER_OK). The vhost crate's dispatcher and vhost-user-backend's
//! handler both refuse `SET_VRING_ENABLE` until PROTOCOL_FEATURES has been *acked* by
//! `SET_FEATURES`, and drop the connection, so a QEMU guest could never bring its NIC up.
//!
//! So the shim defers them: an early `SET_VRING_ENABLE` is answered here (an ack when the
//! frontend asked for one), its latest state per ring is remembered, and replayed to the
//! backend right after the `SET_FEATURES` that acks PROTOCOL_FEATURES (QEMU 10 does not
//! send it again at start). Everything else, file descriptors included, is relayed
//! unchanged in both directions. The shim only sees the control plane; packets never pass
//! through it.
//!
//! It also answers `VHOST_USER_SEND_RARP` (after a migration, for a guest without
//! GUEST_ANNOUNCE): neither the vhost crate's dispatcher nor vhost-user-backend knows that
//! request, and the dispatcher would drop the connection on it. The shim hands the MAC to the
//! port's announcer (see [`crate::announce`]) and acks if asked to.
//!
//! And it refuses memory tables and dirty logs whose files cannot back them (see
//! [`crate::region_check`]) before the library maps and touches them.
//!
//! On the way back it completes the `GET_VRING_BASE` reply of a packed ring: vhost-user
//! carries the used position in the upper 16 bits of the base (QEMU migrates it), and
//! vhost-user-backend answers the avail position alone. At a stop nothing is in flight, so
//! the used position is the avail one (see [`packed_base_reply`]).

use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use crate::status::Negotiated;
use crate::vhost_user_backend_workarounds::EnableDeferral;
use log::{debug, warn};
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, MAX_ATTACHED_FD_ENTRIES};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Message header: request, flags, payload size (all u32, little-endian on the wire). The
/// vhost crate's header type (`VhostUserMsgHeader`) is private to it, so not its size.
const HDR_LEN: usize = 3 * std::mem::size_of::<u32>();
/// Largest payload we relay: the vhost crate refuses anything bigger on either end, so a
/// frontend claiming more is dropped here before we allocate for it.
const MAX_PAYLOAD: usize = vhost::vhost_user::message::MAX_MSG_SIZE;
/// Most fds one message carries (a memory table with the maximum number of regions): what
/// the vhost crate receives with one message, so a frontend sending more is dropped here.
const MAX_FDS: usize = MAX_ATTACHED_FD_ENTRIES;
/// Memory regions one connection may have mapped at once, as answered to GET_MAX_MEM_SLOTS
/// and enforced on SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG. Every region keeps an fd
/// and a mapping open in the process, so this bounds what one frontend can hold (the
/// library would answer 509 and enforce nothing). QEMU needs one slot per RAM section of
/// the guest (a handful, more with DIMMs or virtio-mem) and takes any value it is given;
/// 32 is also the most regions one SET_MEM_TABLE can carry (MAX_FDS).
pub const MAX_MEM_SLOTS: usize = MAX_FDS;

/// The protocol version in every message's flags. The vhost crate names only its mask
/// (`VhostUserHeaderFlag::VERSION`) and sets 1 in its private header constructor.
const FLAG_VERSION: u32 = 0x1;

/// One message, as read from the frontend.
struct Message {
    request: u32,
    flags: u32,
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// What to do with a frontend message.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Forward,
    /// Forward, then send these deferred SET_VRING_ENABLE (index, enable) states.
    ForwardThenReplay(Vec<(u32, u32)>),
    /// Swallow for now; reply with an ack if asked to.
    Absorb {
        ack: bool,
    },
    /// SEND_RARP: announce this MAC (`None`: the payload was too short to hold one), then
    /// ack if asked to. Never forwarded.
    Rarp {
        mac: Option<[u8; 6]>,
        ack: bool,
    },
    /// Answer with this u64 here; never forwarded.
    Reply(u64),
    /// A protocol error or a frontend over its limits: close the connection.
    Drop(String),
}

/// The filter's state for one connection.
struct Filter {
    /// SET_VRING_ENABLE held back until the backend can take it (a vhost-user-backend
    /// workaround).
    enables: EnableDeferral,
    /// Memory regions the backend holds after the messages forwarded so far. Exact, as
    /// the backend ends the connection on any SET_MEM_TABLE, ADD_MEM_REG or REM_MEM_REG
    /// it fails.
    mem_slots: usize,
}

/// The little-endian u32 at `at` in `payload`, if it is long enough.
fn u32_at(payload: &[u8], at: usize) -> Option<u32> {
    let b = payload.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

impl Filter {
    /// The state for a connection to a port with `rings` virtqueues.
    fn new(rings: usize) -> Filter {
        Filter {
            enables: EnableDeferral::new(rings),
            mem_slots: 0,
        }
    }

    fn judge(&mut self, request: u32, flags: u32, payload: &[u8]) -> Verdict {
        let ack = flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0;
        match FrontendReq::try_from(request) {
            Ok(FrontendReq::SET_FEATURES) => self.set_features(payload),
            Ok(FrontendReq::SEND_RARP) => Verdict::Rarp {
                mac: crate::announce::mac_from_payload(payload),
                ack,
            },
            Ok(FrontendReq::RESET_OWNER | FrontendReq::RESET_DEVICE) => {
                self.enables.reset();
                Verdict::Forward
            }
            Ok(FrontendReq::SET_VRING_ENABLE) => self.set_vring_enable(payload, ack),
            Ok(FrontendReq::GET_MAX_MEM_SLOTS) => Verdict::Reply(MAX_MEM_SLOTS as u64),
            Ok(FrontendReq::SET_MEM_TABLE) => match u32_at(payload, 0) {
                Some(n) => self.set_mem_slots(n as usize),
                None => Verdict::Drop("SET_MEM_TABLE without a region count".into()),
            },
            Ok(FrontendReq::ADD_MEM_REG) => self.set_mem_slots(self.mem_slots + 1),
            // Removing a region the backend lacks fails there and ends the connection, so
            // counting down never lets the backend hold more than we count.
            Ok(FrontendReq::REM_MEM_REG) => self.set_mem_slots(self.mem_slots.saturating_sub(1)),
            _ => Verdict::Forward,
        }
    }

    fn set_features(&mut self, payload: &[u8]) -> Verdict {
        let features = payload
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        let states = self.enables.features_set(features);
        if states.is_empty() {
            Verdict::Forward
        } else {
            Verdict::ForwardThenReplay(states)
        }
    }

    fn set_vring_enable(&mut self, payload: &[u8], ack: bool) -> Verdict {
        let request = u32_at(payload, 0).zip(u32_at(payload, 4));
        match self.enables.vring_enable(request) {
            Ok(true) => Verdict::Absorb { ack },
            Ok(false) => Verdict::Forward,
            Err(why) => Verdict::Drop(why),
        }
    }

    /// The backend is about to hold `n` regions: fine within the limit we advertise.
    fn set_mem_slots(&mut self, n: usize) -> Verdict {
        if n > MAX_MEM_SLOTS {
            return Verdict::Drop(format!(
                "{n} memory regions, over the {MAX_MEM_SLOTS} advertised"
            ));
        }
        self.mem_slots = n;
        Verdict::Forward
    }
}

/// Records what the frontend negotiates, for `ctl show` and the metrics: the shim is the one
/// place that sees every message whatever the port's kind. Called for messages the filter
/// let through (forwarded, deferred or answered), never for one that ends the connection.
fn observe(negotiated: &Negotiated, request: u32, payload: &[u8]) {
    let u64_at_0 = || {
        payload
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    match FrontendReq::try_from(request) {
        Ok(FrontendReq::SET_FEATURES) => negotiated.set_features(u64_at_0().unwrap_or(0)),
        Ok(FrontendReq::SET_PROTOCOL_FEATURES) => {
            negotiated.set_protocol_features(u64_at_0().unwrap_or(0))
        }
        Ok(FrontendReq::SET_VRING_ENABLE) => {
            if let (Some(index), Some(on)) = (u32_at(payload, 0), u32_at(payload, 4)) {
                negotiated.set_ring_enabled(index, on != 0);
            }
        }
        _ => {}
    }
}

/// What the shim calls with the MAC of a `SEND_RARP` (on the shim's thread, before acking).
pub type RarpHandler = Box<dyn Fn([u8; 6]) + Send>;

/// Relays between `frontend` (QEMU) and `backend` (the library's end) until either side
/// closes; then closes both, so each side sees the disconnect it would have seen directly.
/// `rings` is the number of virtqueues the port serves (2 per queue pair): a frontend
/// naming another ring is dropped.
pub fn spawn(
    port: &str,
    rings: usize,
    frontend: UnixStream,
    backend: UnixStream,
    on_rarp: RarpHandler,
    negotiated: Arc<Negotiated>,
) -> io::Result<JoinHandle<()>> {
    let fe_write = Arc::new(Mutex::new(frontend.try_clone()?));
    let be_read = backend.try_clone()?;
    let fe_shut = frontend.try_clone()?;
    let be_shut = backend.try_clone()?;
    let label = port.to_string();
    let negotiated_replies = negotiated.clone();
    let up = thread::Builder::new().name(format!("shim-{port}")).spawn({
        let fe_write = fe_write.clone();
        let label = label.clone();
        move || {
            let ends = Ends {
                frontend,
                backend,
                fe_write: &fe_write,
            };
            if let Err(e) = frontend_to_backend(&label, rings, ends, &on_rarp, &negotiated) {
                debug!("port {label}: frontend side: {e}");
            }
            let _ = fe_shut.shutdown(std::net::Shutdown::Both);
            let _ = be_shut.shutdown(std::net::Shutdown::Both);
        }
    })?;
    thread::Builder::new()
        .name(format!("shim-{port}-replies"))
        .spawn(move || {
            let negotiated = negotiated_replies;
            let fe = fe_write
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_clone();
            match fe {
                Ok(fe) => {
                    if let Err(e) = backend_to_frontend(be_read, fe, &fe_write, &negotiated) {
                        debug!("port {label}: backend side: {e}");
                    }
                    let _ = fe_write
                        .lock()
                        .map(|s| s.shutdown(std::net::Shutdown::Both));
                }
                Err(e) => warn!("port {label}: {e}"),
            }
            let _ = up.join();
        })
}

/// The sockets the frontend-to-backend direction reads and writes.
struct Ends<'a> {
    frontend: UnixStream,
    backend: UnixStream,
    /// The frontend's socket for replies, shared with the other direction.
    fe_write: &'a Mutex<UnixStream>,
}

fn frontend_to_backend(
    port: &str,
    rings: usize,
    ends: Ends<'_>,
    on_rarp: &RarpHandler,
    negotiated: &Negotiated,
) -> io::Result<()> {
    let Ends {
        mut frontend,
        mut backend,
        fe_write,
    } = ends;
    let mut filter = Filter::new(rings);
    loop {
        // The message (and any fd it carries) is dropped, so closed, unless forwarded.
        let Some(msg) = read_message(&mut frontend)? else {
            return Ok(());
        };
        if let Err(e) = crate::region_check::check(msg.request, &msg.bytes[HDR_LEN..], &msg.fds) {
            warn!("port {port}: {e}: refused, closing the connection");
            return Ok(());
        }
        let verdict = filter.judge(msg.request, msg.flags, &msg.bytes[HDR_LEN..]);
        if !matches!(verdict, Verdict::Drop(_)) {
            observe(negotiated, msg.request, &msg.bytes[HDR_LEN..]);
        }
        match verdict {
            Verdict::Forward => {
                log::trace!(
                    "port {port}: request {} ({} bytes, {} fds)",
                    msg.request,
                    msg.bytes.len() - HDR_LEN,
                    msg.fds.len()
                );
                send_with_fds(&mut backend, &msg.bytes, &msg.fds)?
            }
            Verdict::ForwardThenReplay(states) => {
                send_with_fds(&mut backend, &msg.bytes, &msg.fds)?;
                replay_enables(port, &mut backend, &states)?;
            }
            Verdict::Absorb { ack } => {
                debug!("port {port}: SET_VRING_ENABLE before SET_FEATURES deferred");
                if ack {
                    send_u64_reply(fe_write, msg.request, 0)?;
                }
            }
            Verdict::Rarp { mac, ack } => {
                match mac {
                    Some(mac) => on_rarp(mac),
                    None => warn!("port {port}: SEND_RARP without a MAC address; ignored"),
                }
                if ack {
                    send_u64_reply(fe_write, msg.request, 0)?;
                }
            }
            Verdict::Reply(value) => send_u64_reply(fe_write, msg.request, value)?,
            Verdict::Drop(why) => {
                warn!("port {port}: frontend dropped: {why}");
                return Ok(());
            }
        }
    }
}

/// Sends the deferred SET_VRING_ENABLE states to the backend, as the frontend would have.
fn replay_enables(port: &str, backend: &mut UnixStream, states: &[(u32, u32)]) -> io::Result<()> {
    for (index, enable) in states {
        debug!("port {port}: replaying deferred SET_VRING_ENABLE {index} {enable}");
        // The payload is a VhostUserVringState: ring index, then the enable state.
        let state = [index.to_le_bytes(), enable.to_le_bytes()].concat();
        let m = message(FrontendReq::SET_VRING_ENABLE as u32, FLAG_VERSION, &state);
        backend.write_all(&m)?;
    }
    Ok(())
}

/// A u64 reply to `request`: for a REPLY_ACK, 0 means "done".
fn send_u64_reply(fe_write: &Mutex<UnixStream>, request: u32, value: u64) -> io::Result<()> {
    let flags = FLAG_VERSION | VhostUserHeaderFlag::REPLY.bits();
    let reply = message(request, flags, &value.to_le_bytes());
    fe_write
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .write_all(&reply)
}

/// One message as it goes on the wire: the header, then `payload` (ours, so small).
fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let size = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut m = Vec::with_capacity(HDR_LEN + payload.len());
    for word in [request, flags, size] {
        m.extend_from_slice(&word.to_le_bytes());
    }
    m.extend_from_slice(payload);
    m
}

fn backend_to_frontend(
    mut backend: UnixStream,
    mut frontend: UnixStream,
    fe_write: &Mutex<UnixStream>,
    negotiated: &Negotiated,
) -> io::Result<()> {
    loop {
        let Some(mut msg) = read_message(&mut backend)? else {
            return Ok(());
        };
        if msg.request == FrontendReq::GET_VRING_BASE as u32 && negotiated.packed_rings() {
            packed_base_reply(&mut msg.bytes[HDR_LEN..]);
        }
        let _guard = fe_write.lock().unwrap_or_else(|e| e.into_inner());
        send_with_fds(&mut frontend, &msg.bytes, &msg.fds)?;
    }
}

/// Completes a packed ring's GET_VRING_BASE reply payload (ring index, then the base): the
/// used position (upper 16 bits) is the avail one (lower 16), as nothing is in flight once
/// the ring stopped. A payload too short to be a reply is left for the frontend to refuse.
fn packed_base_reply(payload: &mut [u8]) {
    let Some(base) = u32_at(payload, 4) else {
        return;
    };
    let avail = base & 0xffff;
    payload[4..8].copy_from_slice(&(avail | avail << 16).to_le_bytes());
}

/// Reads one whole message with the fds that came with it; `None` at a clean end of stream.
fn read_message(sock: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; HDR_LEN];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HDR_LEN {
        let n = recv_with_fds(sock, &mut hdr[got..], &mut fds)?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "partial message header",
                ))
            };
        }
        got += n;
    }
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message {request} claims a {size}-byte payload"),
        ));
    }
    let mut bytes = vec![0u8; HDR_LEN + size];
    bytes[..HDR_LEN].copy_from_slice(&hdr);
    sock.read_exact(&mut bytes[HDR_LEN..])?;
    Ok(Some(Message {
        request,
        flags,
        bytes,
        fds,
    }))
}

/// `recvmsg` into `buf`, collecting any fds passed with it, each owned (so closed) at once.
///
/// `ScmSocket` refuses (ENOBUFS) a message whose fds did not all fit the `MAX_FDS` we offer
/// (MSG_CTRUNC), and closes the ones it did get; the caller then ends the connection.
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let (n, count) = loop {
        // SAFETY: the one iovec points at `buf`, borrowed mutably for this call and valid for
        // `buf.len()` bytes of any value.
        match unsafe { sock.recv_with_fds(&mut iov, &mut raw) } {
            Ok(got) => break got,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) if e.errno() == libc::ENOBUFS => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("more than {MAX_FDS} fds in one message"),
                ))
            }
            Err(e) => return Err(e.into()),
        }
    };
    for &fd in raw.get(..count).unwrap_or(&[]) {
        // SAFETY: recv_with_fds returned `count` fds, new in this process and owned by us
        // alone; each is wrapped exactly once.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(n)
}

/// Sends `bytes` with `fds` attached to the first byte, then the rest.
fn send_with_fds(sock: &mut UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    if fds.is_empty() {
        return sock.write_all(bytes);
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let sent = loop {
        match sock.send_with_fds(&[bytes], &raw) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(e.into()),
        }
    };
    sock.write_all(bytes.get(sent..).unwrap_or(&[]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost::vhost_user::message::VhostUserVirtioFeatures;

    const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

    const NEED_REPLY: u32 = FLAG_VERSION | VhostUserHeaderFlag::NEED_REPLY.bits();

    fn set_features(bits: u64) -> Vec<u8> {
        bits.to_le_bytes().to_vec()
    }

    fn enable(index: u32, on: u32) -> Vec<u8> {
        [index.to_le_bytes(), on.to_le_bytes()].concat()
    }

    #[test]
    fn deferred_enables_are_replayed_after_set_features() {
        let mut f = Filter::new(4);
        for (i, on) in [(0, 1), (1, 1), (2, 1), (3, 1), (2, 0), (3, 0)] {
            assert!(matches!(
                f.judge(
                    FrontendReq::SET_VRING_ENABLE as u32,
                    FLAG_VERSION,
                    &enable(i, on)
                ),
                Verdict::Absorb { .. }
            ));
        }
        assert_eq!(
            f.judge(
                FrontendReq::SET_FEATURES as u32,
                FLAG_VERSION,
                &set_features(PROTOCOL_FEATURES_BIT)
            ),
            Verdict::ForwardThenReplay(vec![(0, 1), (1, 1), (2, 0), (3, 0)])
        );
        // Replayed once only.
        assert_eq!(
            f.judge(
                FrontendReq::SET_FEATURES as u32,
                FLAG_VERSION,
                &set_features(PROTOCOL_FEATURES_BIT)
            ),
            Verdict::Forward
        );
    }

    #[test]
    fn early_enable_is_absorbed_until_features_are_set() {
        let mut f = Filter::new(4);
        assert_eq!(
            f.judge(FrontendReq::SET_VRING_ENABLE as u32, NEED_REPLY, &[0; 8]),
            Verdict::Absorb { ack: true }
        );
        // A short payload is absorbed without a deferred state, not a panic.
        assert!(matches!(
            f.judge(FrontendReq::SET_VRING_ENABLE as u32, FLAG_VERSION, &[1]),
            Verdict::Absorb { .. }
        ));
        assert_eq!(
            f.judge(FrontendReq::SET_VRING_ENABLE as u32, FLAG_VERSION, &[0; 8]),
            Verdict::Absorb { ack: false }
        );
        // Without PROTOCOL_FEATURES the library enables rings itself; still absorb.
        assert_eq!(
            f.judge(
                FrontendReq::SET_FEATURES as u32,
                FLAG_VERSION,
                &set_features(1 << 32)
            ),
            Verdict::Forward
        );
        assert!(matches!(
            f.judge(FrontendReq::SET_VRING_ENABLE as u32, FLAG_VERSION, &[0; 8]),
            Verdict::Absorb { .. }
        ));
        assert_eq!(
            f.judge(
                FrontendReq::SET_FEATURES as u32,
                FLAG_VERSION,
                &set_features(1 << 32 | PROTOCOL_FEATURES_BIT)
            ),
            Verdict::ForwardThenReplay(vec![(0, 0)])
        );
        assert_eq!(
            f.judge(FrontendReq::SET_VRING_ENABLE as u32, FLAG_VERSION, &[0; 8]),
            Verdict::Forward
        );
        assert_eq!(
            f.judge(FrontendReq::RESET_DEVICE as u32, FLAG_VERSION, &[]),
            Verdict::Forward
        );
        assert!(matches!(
            f.judge(FrontendReq::SET_VRING_ENABLE as u32, FLAG_VERSION, &[0; 8]),
            Verdict::Absorb { .. }
        ));
        // A short SET_FEATURES payload counts as no features, not a panic.
        assert_eq!(
            f.judge(FrontendReq::SET_FEATURES as u32, FLAG_VERSION, &[1, 2]),
            Verdict::Forward
        );
    }

    fn region_count(n: u32) -> Vec<u8> {
        [n.to_le_bytes(), [0; 4]].concat()
    }

    #[test]
    fn deferral_is_bounded_by_the_ports_rings() {
        let mut f = Filter::new(2);
        // Any number of early enables of the port's rings keeps one state per ring: the
        // latest, replayed once, in ring order.
        for n in 0..100_000u32 {
            assert!(matches!(
                f.judge(
                    FrontendReq::SET_VRING_ENABLE as u32,
                    FLAG_VERSION,
                    &enable(1 - n % 2, n % 3)
                ),
                Verdict::Absorb { .. }
            ));
        }
        assert_eq!(f.enables.rings(), 2);
        assert_eq!(
            f.judge(
                FrontendReq::SET_FEATURES as u32,
                FLAG_VERSION,
                &set_features(PROTOCOL_FEATURES_BIT)
            ),
            Verdict::ForwardThenReplay(vec![(0, 99_999 % 3), (1, 99_998 % 3)])
        );
    }

    #[test]
    fn enable_of_a_ring_the_port_lacks_drops_the_connection() {
        let mut f = Filter::new(2);
        for index in [2, 3, u32::MAX] {
            assert!(matches!(
                f.judge(
                    FrontendReq::SET_VRING_ENABLE as u32,
                    FLAG_VERSION,
                    &enable(index, 1)
                ),
                Verdict::Drop(_)
            ));
        }
        // Nothing of them was kept, and it is the same once features are set.
        assert_eq!(
            f.judge(
                FrontendReq::SET_FEATURES as u32,
                FLAG_VERSION,
                &set_features(PROTOCOL_FEATURES_BIT)
            ),
            Verdict::Forward
        );
        assert!(matches!(
            f.judge(
                FrontendReq::SET_VRING_ENABLE as u32,
                FLAG_VERSION,
                &enable(2, 1)
            ),
            Verdict::Drop(_)
        ));
        assert_eq!(
            f.judge(
                FrontendReq::SET_VRING_ENABLE as u32,
                FLAG_VERSION,
                &enable(1, 1)
            ),
            Verdict::Forward
        );
    }

    #[test]
    fn memory_slots_are_limited_to_what_is_advertised() {
        let mut f = Filter::new(2);
        let add = FrontendReq::ADD_MEM_REG as u32;
        let rem = FrontendReq::REM_MEM_REG as u32;
        let table = FrontendReq::SET_MEM_TABLE as u32;
        assert_eq!(
            f.judge(FrontendReq::GET_MAX_MEM_SLOTS as u32, FLAG_VERSION, &[]),
            Verdict::Reply(MAX_MEM_SLOTS as u64)
        );
        assert_eq!(
            f.judge(table, FLAG_VERSION, &region_count(2)),
            Verdict::Forward
        );
        for _ in 2..MAX_MEM_SLOTS {
            assert_eq!(f.judge(add, FLAG_VERSION, &[0; 40]), Verdict::Forward);
        }
        assert!(matches!(
            f.judge(add, FLAG_VERSION, &[0; 40]),
            Verdict::Drop(_)
        ));
        // A removal makes room for one more; a new table replaces the count.
        assert_eq!(f.judge(rem, FLAG_VERSION, &[0; 40]), Verdict::Forward);
        assert_eq!(f.judge(add, FLAG_VERSION, &[0; 40]), Verdict::Forward);
        assert!(matches!(
            f.judge(add, FLAG_VERSION, &[0; 40]),
            Verdict::Drop(_)
        ));
        assert_eq!(
            f.judge(table, FLAG_VERSION, &region_count(1)),
            Verdict::Forward
        );
        assert_eq!(f.judge(add, FLAG_VERSION, &[0; 40]), Verdict::Forward);
        let over = region_count(MAX_MEM_SLOTS as u32 + 1);
        assert!(matches!(
            f.judge(table, FLAG_VERSION, &over),
            Verdict::Drop(_)
        ));
        assert!(matches!(
            f.judge(table, FLAG_VERSION, &[1, 0]),
            Verdict::Drop(_)
        ));
        let full = region_count(MAX_MEM_SLOTS as u32);
        assert_eq!(f.judge(table, FLAG_VERSION, &full), Verdict::Forward);
    }

    #[test]
    fn a_packed_base_reply_carries_the_used_position_too() {
        // Ring 1 stopped at slot 5, wrap counter 0 (second lap).
        let mut payload = [1u32.to_le_bytes(), 5u32.to_le_bytes()].concat();
        packed_base_reply(&mut payload);
        assert_eq!(u32_at(&payload, 4), Some(5 | 5 << 16));
        let mut payload = [0u32.to_le_bytes(), 0x8003u32.to_le_bytes()].concat();
        packed_base_reply(&mut payload);
        assert_eq!(u32_at(&payload, 4), Some(0x8003_8003));
        let mut short = [0u8; 6];
        packed_base_reply(&mut short);
        assert_eq!(short, [0u8; 6]);
    }

    #[test]
    fn send_rarp_is_answered_here_never_forwarded() {
        let mut f = Filter::new(4);
        let mac = [0x52, 0x54, 0, 1, 2, 3, 0, 0];
        assert_eq!(
            f.judge(FrontendReq::SEND_RARP as u32, FLAG_VERSION, &mac),
            Verdict::Rarp {
                mac: Some([0x52, 0x54, 0, 1, 2, 3]),
                ack: false
            }
        );
        assert_eq!(
            f.judge(FrontendReq::SEND_RARP as u32, NEED_REPLY, &mac[..4]),
            Verdict::Rarp {
                mac: None,
                ack: true
            }
        );
    }

    #[test]
    fn fds_with_a_message_that_is_not_forwarded_are_closed() {
        let (qemu, fe) = UnixStream::pair().unwrap();
        let (be, _lib) = UnixStream::pair().unwrap();
        let handle = spawn("t", 2, fe, be, Box::new(|_| {}), Default::default()).unwrap();
        let mut qemu_w = qemu.try_clone().unwrap();
        // Answered by the shim, each with an fd it should not carry.
        for (request, payload) in [
            (FrontendReq::SET_VRING_ENABLE, enable(0, 1)),
            (FrontendReq::GET_MAX_MEM_SLOTS, Vec::new()),
        ] {
            let (mut kept, passed) = UnixStream::pair().unwrap();
            let m = message(request as u32, NEED_REPLY, &payload);
            send_with_fds(&mut qemu_w, &m, &[OwnedFd::from(passed)]).unwrap();
            let mut reply = [0u8; 20];
            (&qemu).read_exact(&mut reply).unwrap();
            assert_eq!(&reply[0..4], &(request as u32).to_le_bytes());
            // The shim's copy was the last one: its end is closed.
            kept.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut b = [0u8; 1];
            assert_eq!(kept.read(&mut b).unwrap(), 0, "{request:?}'s fd closed");
        }
        drop(qemu_w);
        drop(qemu);
        handle.join().unwrap();
    }

    /// A SET_VRING_KICK header carrying `n` fds, each the far end of a socket pair; the near
    /// ends come back, to see which fds are still open.
    fn send_kick_with_fds(sock: &mut UnixStream, n: usize) -> Vec<UnixStream> {
        let m = message(FrontendReq::SET_VRING_KICK as u32, FLAG_VERSION, &[0; 8]);
        let (kept, passed): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| {
                let (kept, passed) = UnixStream::pair().unwrap();
                (kept, OwnedFd::from(passed))
            })
            .unzip();
        send_with_fds(sock, &m, &passed).unwrap();
        kept
    }

    /// Whether the peer of `kept` is closed (every copy of the fd passed).
    fn peer_closed(kept: &UnixStream) -> bool {
        kept.set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        matches!((&*kept).read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn a_message_with_more_fds_than_allowed_is_refused_and_its_fds_closed() {
        let (mut tx, mut rx) = UnixStream::pair().unwrap();
        let kept = send_kick_with_fds(&mut tx, MAX_FDS);
        let msg = read_message(&mut rx).unwrap().unwrap();
        assert_eq!(msg.fds.len(), MAX_FDS);
        drop(msg);
        assert!(kept.iter().all(peer_closed), "fds of a read message closed");

        // A fresh connection each: the refused message's payload is left unread.
        for n in [MAX_FDS + 1, 2 * MAX_FDS, 60] {
            let (mut tx, mut rx) = UnixStream::pair().unwrap();
            let kept = send_kick_with_fds(&mut tx, n);
            let e = read_message(&mut rx).err().expect("too many fds refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{n} fds: {e}");
            assert!(kept.iter().all(peer_closed), "{n} fds: all closed");
        }
    }

    #[test]
    fn relays_messages_with_fds_and_answers_early_enables() {
        let (qemu, fe) = UnixStream::pair().unwrap();
        let (be, mut lib) = UnixStream::pair().unwrap();
        let (rarp_tx, rarp_rx) = std::sync::mpsc::channel();
        let on_rarp: RarpHandler = Box::new(move |mac| {
            let _ = rarp_tx.send(mac);
        });
        let handle = spawn("t", 2, fe, be, on_rarp, Default::default()).unwrap();
        let mut qemu_w = qemu.try_clone().unwrap();
        // Early SET_VRING_ENABLE with NEED_REPLY: answered by the shim.
        let m = message(
            FrontendReq::SET_VRING_ENABLE as u32,
            NEED_REPLY,
            &enable(0, 1),
        );
        qemu_w.write_all(&m).unwrap();
        let mut reply = [0u8; 20];
        (&qemu).read_exact(&mut reply).unwrap();
        assert_eq!(
            &reply[0..4],
            &(FrontendReq::SET_VRING_ENABLE as u32).to_le_bytes()
        );
        assert_eq!(
            &reply[4..8],
            &(FLAG_VERSION | VhostUserHeaderFlag::REPLY.bits()).to_le_bytes()
        );
        assert_eq!(&reply[12..20], &[0u8; 8]);
        // A message with an fd goes through with the fd.
        let (r, w) = UnixStream::pair().unwrap();
        let kick = FrontendReq::SET_VRING_KICK as u32;
        let m = message(kick, FLAG_VERSION, &1u64.to_le_bytes());
        let fd = OwnedFd::from(w);
        send_with_fds(&mut qemu_w, &m, std::slice::from_ref(&fd)).unwrap();
        let got = read_message(&mut lib).unwrap().unwrap();
        assert_eq!(got.bytes, m);
        assert_eq!(got.fds.len(), 1);
        // The fd really is the same socket: write through it, read at the other end.
        let mut passed = UnixStream::from(got.fds.into_iter().next().unwrap());
        passed.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        (&r).read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        // SEND_RARP never reaches the library (its dispatcher would drop the connection):
        // the MAC goes to the announcer and, with NEED_REPLY, the shim acks.
        let mac = [0x52, 0x54, 0, 0xab, 0xcd, 0xef, 0, 0];
        let m = message(FrontendReq::SEND_RARP as u32, NEED_REPLY, &mac);
        qemu_w.write_all(&m).unwrap();
        let mut reply = [0u8; 20];
        (&qemu).read_exact(&mut reply).unwrap();
        assert_eq!(&reply[0..4], &(FrontendReq::SEND_RARP as u32).to_le_bytes());
        assert_eq!(
            &reply[4..8],
            &(FLAG_VERSION | VhostUserHeaderFlag::REPLY.bits()).to_le_bytes()
        );
        assert_eq!(&reply[12..20], &[0u8; 8]);
        assert_eq!(
            rarp_rx.recv_timeout(std::time::Duration::from_secs(5)),
            Ok([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        // Backend replies reach the frontend.
        let reply_flags = FLAG_VERSION | VhostUserHeaderFlag::REPLY.bits();
        let rep = message(FrontendReq::SET_LOG_FD as u32, reply_flags, &[]);
        lib.write_all(&rep).unwrap();
        let mut got = [0u8; HDR_LEN];
        (&qemu).read_exact(&mut got).unwrap();
        assert_eq!(got[..], rep[..]);
        // A lying size closes both sides.
        let lying = [FrontendReq::GET_FEATURES as u32, FLAG_VERSION, 0x7fff_ffff];
        qemu_w
            .write_all(&lying.map(u32::to_le_bytes).concat())
            .unwrap();
        let mut rest = Vec::new();
        let _ = lib.read_to_end(&mut rest);
        assert!(rest.is_empty());
        drop(qemu_w);
        drop(qemu);
        handle.join().unwrap();
    }
}
