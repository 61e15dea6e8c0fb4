//! Hostile inputs on the wire: vhost-user messages whose every field (header size included)
//! may lie, carrying file descriptors of any kind, sent over fresh connections.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use test_support::driver::{DriverMemory, DriverQueue};
use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::support::{raw_message, DirtyLogFd};

/// The guest memory every input shares with the backend (when it sends it at all).
pub const GUEST_SIZE: u64 = 1 << 20;
/// The frontend's "virtual address" of guest memory: only used by the backend to translate
/// ring addresses, so a constant keeps inputs independent of this process's layout.
pub const GUEST_UADDR: u64 = 0x7f00_0000_0000;
pub const RING_SIZE: u16 = 256;
pub const RINGS: usize = 4;
/// Ring `q` sits at `q * RING_STRIDE` in guest memory; buffers above all rings.
pub const RING_STRIDE: u64 = 0x1_0000;
const BUFS: u64 = 0x8_0000;
/// Longest wait for the end-of-input probe's reply; a backend that takes longer is not
/// blocked by it (a hang is caught by the session's end not coming).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub const FLAG_VERSION: u32 = 0x1;
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// A file descriptor to attach, made fresh for each message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fd {
    /// The input's guest memory (a `GUEST_SIZE` memfd).
    Guest,
    /// The kick / call eventfd of ring `q` (the input kicks every ring after its messages).
    Kick(usize),
    Call(usize),
    /// A memfd of this many bytes (0 included).
    Memfd(u64),
    DevNull,
    Pipe,
    Socket,
    Eventfd,
    Dir,
}

impl Fd {
    /// Size of the file behind it if it is one that can be mapped.
    pub fn file_size(self) -> Option<u64> {
        match self {
            Fd::Guest => Some(GUEST_SIZE),
            Fd::Memfd(n) => Some(n),
            _ => None,
        }
    }
}

/// One message as sent: `size` and `cut` make the header lie or the message end early.
#[derive(Clone, Debug)]
pub struct Msg {
    pub req: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<Fd>,
    /// Header size field, if not the payload's length.
    pub size: Option<u32>,
    /// Send only this many bytes of the encoded message.
    pub cut: Option<usize>,
}

impl Msg {
    pub fn new(req: FrontendReq, payload: Vec<u8>) -> Msg {
        Msg {
            req: req as u32,
            flags: FLAG_VERSION,
            payload,
            fds: Vec::new(),
            size: None,
            cut: None,
        }
    }

    pub fn with_fds(mut self, fds: &[Fd]) -> Msg {
        self.fds = fds.to_vec();
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = raw_message(self.req, 0, &self.payload);
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        if let Some(size) = self.size {
            b[8..12].copy_from_slice(&size.to_le_bytes());
        }
        if let Some(cut) = self.cut {
            b.truncate(cut);
        }
        b
    }

    /// One line for a failure report.
    pub fn describe(&self) -> String {
        let name = FrontendReq::try_from(self.req)
            .map(|r| format!("{r:?}"))
            .unwrap_or_else(|_| format!("request {}", self.req));
        let head: Vec<String> = self
            .payload
            .iter()
            .take(48)
            .map(|b| format!("{b:02x}"))
            .collect();
        format!(
            "{name} flags={:#x} size={:?} cut={:?} fds={:?} payload({})={}",
            self.flags,
            self.size,
            self.cut,
            self.fds,
            self.payload.len(),
            head.join("")
        )
    }
}

/// Payload builders, little-endian as on the wire.
pub fn le64(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

/// VhostUserVringAddr: index, flags, desc, used, avail, log.
pub fn vring_addr(index: u32, flags: u32, desc: u64, used: u64, avail: u64, log: u64) -> Vec<u8> {
    let mut p = vring_state(index, flags);
    for v in [desc, used, avail, log] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// One memory region: guest physical address, size, frontend address, offset in its fd.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub gpa: u64,
    pub size: u64,
    pub uaddr: u64,
    pub offset: u64,
}

impl Region {
    pub fn bytes(&self) -> Vec<u8> {
        [self.gpa, self.size, self.uaddr, self.offset]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }
}

pub fn mem_table(regions: &[Region]) -> Vec<u8> {
    let mut p = vring_state(regions.len() as u32, 0);
    for r in regions {
        p.extend_from_slice(&r.bytes());
    }
    p
}

/// ADD_MEM_REG / REM_MEM_REG: 8 bytes of padding, then the region.
pub fn single_region(r: &Region) -> Vec<u8> {
    [vec![0u8; 8], r.bytes()].concat()
}

/// The shim's largest payload: a bigger header size ends the connection.
const MAX_PAYLOAD: usize = 64 * 1024;

/// A message as the backend reads it: request, payload, the fds that arrived with it.
pub type Seen = (u32, Vec<u8>, Vec<Fd>);

/// The messages as the backend reads them (a lying size shifts every later message):
/// (request, payload, fds arriving with it), and whether the stream ends on a whole message.
pub fn backend_view(msgs: &[Msg]) -> (Vec<Seen>, bool) {
    let mut stream = Vec::new();
    let mut fd_at = Vec::new();
    for m in msgs {
        fd_at.push((stream.len(), m.fds.clone()));
        stream.extend(m.encode());
    }
    let mut out = Vec::new();
    let (mut pos, mut next_fds) = (0, fd_at.iter().peekable());
    while pos + 12 <= stream.len() {
        let word = |i: usize| u32::from_le_bytes(stream[pos + i..pos + i + 4].try_into().unwrap());
        let (req, size) = (word(0), word(8) as usize);
        if size > MAX_PAYLOAD {
            return (out, false);
        }
        let end = (pos + 12 + size).min(stream.len());
        let mut fds = Vec::new();
        while let Some((_, f)) = next_fds.next_if(|(at, _)| *at < end) {
            fds.extend_from_slice(f);
        }
        out.push((req, stream[pos + 12..end].to_vec(), fds));
        pos = end;
    }
    (out, pos == stream.len())
}

/// What an input does: messages on one connection (with a guest behind them), or a storm
/// of short connections.
#[derive(Clone, Debug)]
pub enum Input {
    /// `hold_open`: the connection stays open while the other port is checked.
    Session {
        msgs: Vec<Msg>,
        garbage_rings: bool,
        hold_open: bool,
    },
    Storm {
        prefixes: Vec<Vec<u8>>,
    },
}

impl Input {
    pub fn describe(&self) -> String {
        match self {
            Input::Storm { prefixes } => format!(
                "{} connections closed after {:?} bytes",
                prefixes.len(),
                prefixes.iter().map(Vec::len).collect::<Vec<_>>()
            ),
            Input::Session {
                msgs,
                garbage_rings,
                ..
            } => {
                let mut s = format!("{} messages (garbage rings: {garbage_rings})", msgs.len());
                // Floods are long: their start and end say enough.
                for (i, m) in msgs.iter().enumerate() {
                    if i < 40 || i + 10 >= msgs.len() {
                        s.push_str(&format!("\n    #{i} {}", m.describe()));
                    } else if i == 40 {
                        s.push_str("\n    ...");
                    }
                }
                s
            }
        }
    }
}

/// The guest side of a session input: memory with rings, a TX packet posted on ring 1 and
/// RX buffers on ring 0, so a backend that accepts the rings has real work to do.
pub struct Guest {
    pub mem: DriverMemory,
    pub queues: Vec<DriverQueue>,
}

impl Guest {
    pub fn new(garbage: Option<&mut crate::hostile::rng::Rng>) -> Guest {
        let mem = DriverMemory::new(GUEST_SIZE as usize).expect("guest memory");
        let queues: Vec<DriverQueue> = (0..RINGS)
            .map(|q| {
                DriverQueue::new(&mem.mem, q, q as u64 * RING_STRIDE, RING_SIZE).expect("ring")
            })
            .collect();
        let mut g = Guest { mem, queues };
        match garbage {
            Some(rng) => {
                for q in 0..RINGS {
                    let span = g.queues[q].layout.span(RING_SIZE) as usize;
                    g.mem
                        .write(q as u64 * RING_STRIDE, &rng.bytes(span))
                        .expect("garbage");
                }
            }
            None => g.post_work(),
        }
        g
    }

    fn post_work(&mut self) {
        for i in 0..8 {
            let addr = BUFS + i * 2048;
            self.queues[0]
                .post(&self.mem.mem, &[(addr, 2048, true)])
                .expect("rx");
        }
        let frame = test_support::driver::test_frame([2, 0, 0, 0, 0, 1], 1, 64);
        let bytes = [vec![0u8; 12], frame].concat();
        let addr = BUFS + 0x4_0000;
        self.mem.write(addr, &bytes).expect("tx packet");
        self.queues[1]
            .post(&self.mem.mem, &[(addr, bytes.len() as u32, false)])
            .expect("tx");
    }

    /// Ring `q`'s SET_VRING_ADDR payload as QEMU would send it.
    pub fn ring_addr(q: usize, log: bool) -> Vec<u8> {
        let l = test_support::driver::RingLayout::at(q as u64 * RING_STRIDE, RING_SIZE);
        let c = test_support::frontend::vring_config(GUEST_UADDR, l, RING_SIZE, log);
        vring_addr(
            q as u32,
            c.flags,
            c.desc_table_addr,
            c.used_ring_addr,
            c.avail_ring_addr,
            c.log_addr.unwrap_or(0),
        )
    }

    pub fn kick_all(&self) {
        for q in &self.queues {
            let _ = q.kick();
        }
    }

    /// A fresh fd of `kind` (the guest's own for `Guest`, `Kick`, `Call`).
    fn open(&self, kind: Fd) -> OwnedFd {
        let dup = |fd: i32| {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd this guest owns; the new fd is ours.
            let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            assert!(n >= 0, "dup: {}", std::io::Error::last_os_error());
            // SAFETY: n is a fresh fd owned by nobody else.
            unsafe { OwnedFd::from_raw_fd(n) }
        };
        match kind {
            Fd::Guest => dup(self.mem.memfd.as_raw_fd()),
            Fd::Kick(q) => dup(self.queues[q % RINGS].kick.as_raw_fd()),
            Fd::Call(q) => dup(self.queues[q % RINGS].call.as_raw_fd()),
            Fd::Memfd(n) => DirtyLogFd::new(n).0.file.into(),
            Fd::DevNull => File::open("/dev/null").expect("/dev/null").into(),
            Fd::Dir => File::open("/").expect("/").into(),
            Fd::Pipe => pipe_end(),
            Fd::Socket => UnixStream::pair().expect("socketpair").0.into(),
            Fd::Eventfd => {
                let e = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
                dup(e.as_raw_fd())
            }
        }
    }
}

fn pipe_end() -> OwnedFd {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fresh fds, both owned below.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fds from pipe2; the write end is closed at once.
    unsafe {
        drop(OwnedFd::from_raw_fd(fds[1]));
        OwnedFd::from_raw_fd(fds[0])
    }
}

/// How sending an input went.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// The connection was refused: the backend is gone or stopped accepting.
    Refused,
    /// Sent (or cut short by the backend dropping the connection).
    Done,
    /// The backend stopped reading for longer than the time allowed: a hang.
    Stalled,
}

/// Sends `msgs` on a new connection to `socket`, plays the guest (kicks), then closes the
/// sending side. The backend may drop the connection at any point, which ends the input
/// early; if it stops reading until `deadline`, the input is `Stalled`.
pub fn send_session(
    socket: &Path,
    msgs: &[Msg],
    guest: &Guest,
    deadline: Instant,
    before_close: &mut dyn FnMut(),
) -> Sent {
    let Ok(stream) = UnixStream::connect(socket) else {
        return Sent::Refused;
    };
    let seen = drain_replies(&stream);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    for m in msgs {
        // A backend that reads slowly (not stalled) must also finish in time.
        if Instant::now() >= deadline {
            return Sent::Stalled;
        }
        let fds: Vec<OwnedFd> = m.fds.iter().map(|&k| guest.open(k)).collect();
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let bytes = m.encode();
        match send_all(&stream, &bytes, &raw, deadline) {
            Sent::Done => {}
            Sent::Stalled => return Sent::Stalled,
            Sent::Refused => break,
        }
    }
    guest.kick_all();
    finish(&stream, msgs, &seen);
    before_close();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Sent::Done
}

/// One message, fds with its first byte, retrying a full socket until `deadline`.
/// `Refused` here: the backend closed the connection.
fn send_all(stream: &UnixStream, bytes: &[u8], fds: &[i32], deadline: Instant) -> Sent {
    let mut off = 0;
    while off < bytes.len() {
        let fds = if off == 0 { fds } else { &[] };
        match stream.send_with_fds(&[&bytes[off..]], fds) {
            Ok(n) if n > 0 => off += n,
            Ok(_) => return Sent::Refused,
            Err(e) if e.errno() == libc::EAGAIN && Instant::now() < deadline => {}
            Err(e) if e.errno() == libc::EAGAIN => return Sent::Stalled,
            Err(_) => return Sent::Refused,
        }
    }
    Sent::Done
}

/// What the reply reader saw: GET_FEATURES replies so far, and whether the backend closed.
#[derive(Default)]
pub struct Replies {
    features: AtomicUsize,
    closed: AtomicBool,
}

/// Reads and discards whatever the backend replies, until it closes, so it never blocks on
/// a full socket; counts GET_FEATURES replies (the end-of-input probe).
fn drain_replies(stream: &UnixStream) -> Arc<Replies> {
    let mut r = stream.try_clone().expect("clone stream");
    let seen = Arc::new(Replies::default());
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut hdr = [0u8; 12];
        while r.read_exact(&mut hdr).is_ok() {
            let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
            if word(0) == FrontendReq::GET_FEATURES as u32 && word(4) & 0x4 != 0 {
                s.features.fetch_add(1, Ordering::Release);
            }
            let size = u64::from(word(8));
            if std::io::copy(&mut (&mut r).take(size), &mut std::io::sink()).ok() != Some(size) {
                break;
            }
        }
        s.closed.store(true, Ordering::Release);
    });
    seen
}

/// Ends an input: a GET_FEATURES probe, and a wait for its reply (or the backend closing),
/// so the backend has handled every message before the frontend goes. A frontend that
/// closes at once would lose what the backend had not read yet: the shim drops the rest.
/// No probe after a stream cut mid-message (the backend would take it as the rest).
fn finish(stream: &UnixStream, msgs: &[Msg], seen: &Replies) {
    let (view, whole) = backend_view(msgs);
    if whole {
        let probe = Msg::new(FrontendReq::GET_FEATURES, vec![]).encode();
        let answers = 1 + view
            .iter()
            .filter(|(r, ..)| *r == FrontendReq::GET_FEATURES as u32)
            .count();
        let start = Instant::now();
        if send_all(stream, &probe, &[], start + PROBE_TIMEOUT) == Sent::Done {
            while seen.features.load(Ordering::Acquire) < answers
                && !seen.closed.load(Ordering::Acquire)
                && start.elapsed() < PROBE_TIMEOUT
            {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    // The workers had kicks: a moment to act on them before the session is torn down.
    std::thread::sleep(Duration::from_millis(1));
}

/// Opens one connection per prefix, writes the prefix, and closes them in reverse order.
/// Returns how many connections were made.
pub fn send_storm(socket: &Path, prefixes: &[Vec<u8>]) -> usize {
    let mut open = Vec::new();
    for p in prefixes {
        let Ok(mut s) = UnixStream::connect(socket) else {
            break;
        };
        drain_replies(&s);
        let _ = s.write_all(p);
        open.push(s);
    }
    let n = open.len();
    // The reply drain holds a clone of each stream: shut down, or it is never closed.
    while let Some(s) = open.pop() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    n
}
