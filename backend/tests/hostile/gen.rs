//! The campaigns: generators of hostile inputs, each from its own seeded [`Rng`].
//!
//! Most start from what a real frontend sends (the negotiation of `support`'s
//! `TestFrontend` / qemu-tests' `VuSession`, as raw messages) and break it: mutated fields,
//! lying sizes, wrong fds, bad memory geometry, floods.

use vhost::vhost_user::message::{FrontendReq as R, VhostUserProtocolFeatures as P};

use super::rng::Rng;
use super::wire::*;

pub use test_support::features::{
    VHOST_F_LOG_ALL as LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES as PROTOCOL_FEATURES,
};
use test_support::features::{VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF};
const FEATURES: u64 = VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES | VIRTIO_NET_F_MRG_RXBUF;
const MIB: u64 = 1 << 20;

pub struct Campaign {
    pub name: &'static str,
    /// Inputs per batch; the health checks run after every batch.
    pub batch: u64,
    pub generate: fn(&mut Rng) -> Input,
}

pub const CAMPAIGNS: &[Campaign] = &[
    Campaign {
        name: "mutated-session",
        batch: 40,
        generate: mutated_session,
    },
    Campaign {
        name: "random-messages",
        batch: 40,
        generate: random_messages,
    },
    Campaign {
        name: "memory-tables",
        batch: 40,
        generate: memory_tables,
    },
    Campaign {
        name: "dirty-logs",
        batch: 40,
        generate: dirty_logs,
    },
    Campaign {
        name: "floods",
        batch: 2,
        generate: floods,
    },
    Campaign {
        name: "connect-storm",
        batch: 3,
        generate: storm,
    },
];

fn session(msgs: Vec<Msg>) -> Input {
    Input::Session {
        msgs,
        garbage_rings: false,
        hold_open: false,
    }
}

/// SET_OWNER .. GET_QUEUE_NUM with `features` and protocol features `pf`.
fn negotiation(features: u64, pf: P) -> Vec<Msg> {
    vec![
        Msg::new(R::SET_OWNER, vec![]),
        Msg::new(R::GET_FEATURES, vec![]),
        Msg::new(R::SET_FEATURES, le64(features)),
        Msg::new(R::GET_PROTOCOL_FEATURES, vec![]),
        Msg::new(R::SET_PROTOCOL_FEATURES, le64(pf.bits())),
        Msg::new(R::GET_QUEUE_NUM, vec![]),
    ]
}

fn default_protocol() -> P {
    P::MQ | P::REPLY_ACK | P::LOG_SHMFD | P::CONFIGURE_MEM_SLOTS
}

/// The whole guest memory as one region, as QEMU sends it.
fn guest_region() -> Region {
    Region {
        gpa: 0,
        size: GUEST_SIZE,
        uaddr: GUEST_UADDR,
        offset: 0,
    }
}

/// NUM, ADDR, BASE, CALL, KICK, ENABLE for ring `q` with `addr` as SET_VRING_ADDR payload.
fn ring_setup(q: usize, addr: Vec<u8>) -> Vec<Msg> {
    let fd_word = le64(q as u64);
    vec![
        Msg::new(R::SET_VRING_NUM, vring_state(q as u32, RING_SIZE.into())),
        Msg::new(R::SET_VRING_ADDR, addr),
        Msg::new(R::SET_VRING_BASE, vring_state(q as u32, 0)),
        Msg::new(R::SET_VRING_CALL, fd_word.clone()).with_fds(&[Fd::Call(q)]),
        Msg::new(R::SET_VRING_KICK, fd_word).with_fds(&[Fd::Kick(q)]),
        Msg::new(R::SET_VRING_ENABLE, vring_state(q as u32, 1)),
    ]
}

/// A well-behaved session: negotiation, the guest memory, `rings` rings set up.
fn valid_session(rings: usize, features: u64) -> Vec<Msg> {
    let mut m = negotiation(features, default_protocol());
    m.push(Msg::new(R::SET_MEM_TABLE, mem_table(&[guest_region()])).with_fds(&[Fd::Guest]));
    for q in 0..rings {
        m.extend(ring_setup(q, Guest::ring_addr(q, false)));
    }
    m
}

/// What QEMU sends to start a NIC with every ring, and nothing else.
pub fn well_behaved(_: &mut Rng) -> Input {
    session(valid_session(RINGS, FEATURES))
}

/// A later request a real frontend may send, with a sane payload.
fn extra(rng: &mut Rng) -> Msg {
    let q = rng.below(RINGS as u64) as u32;
    let extra_region = Region {
        gpa: 2 * MIB,
        size: MIB,
        uaddr: GUEST_UADDR + 2 * MIB,
        offset: 0,
    };
    let log = [le64(4096), le64(0)].concat();
    match rng.below(12) {
        0 => Msg::new(R::SEND_RARP, le64(0x5634_1200_5452)),
        1 => Msg::new(R::GET_VRING_BASE, vring_state(q, 0)),
        2 => Msg::new(R::SET_LOG_BASE, log).with_fds(&[Fd::Memfd(4096)]),
        3 => Msg::new(R::SET_FEATURES, le64(FEATURES | LOG_ALL)),
        4 => Msg::new(R::ADD_MEM_REG, single_region(&extra_region)).with_fds(&[Fd::Memfd(MIB)]),
        5 => Msg::new(R::REM_MEM_REG, single_region(&extra_region)),
        6 => Msg::new(R::GET_CONFIG, [vring_state(0, 12), vec![0; 16]].concat()),
        7 => Msg::new(R::SET_VRING_ENABLE, vring_state(q, rng.below(2) as u32)),
        8 => Msg::new(R::GET_MAX_MEM_SLOTS, vec![]),
        9 => Msg::new(R::SET_VRING_ERR, le64(q.into())).with_fds(&[Fd::Eventfd]),
        10 => Msg::new(R::SET_MEM_TABLE, mem_table(&[guest_region()])).with_fds(&[Fd::Guest]),
        _ => Msg::new(R::VRING_KICK, vring_state(q, 0)),
    }
}

pub fn random_fd(rng: &mut Rng) -> Fd {
    let q = rng.below(RINGS as u64) as usize;
    let size = rng.pick(&[0, 1, 512, 4096, 8192, 64 << 10, MIB, 2 * MIB]);
    rng.pick(&[
        Fd::Guest,
        Fd::Kick(q),
        Fd::Call(q),
        Fd::Memfd(size),
        Fd::DevNull,
        Fd::Pipe,
        Fd::Socket,
        Fd::Eventfd,
        Fd::Dir,
    ])
}

/// Mostly none or one; sometimes more than any message carries (the shim takes 32 at most).
fn random_fds(rng: &mut Rng) -> Vec<Fd> {
    let n = match rng.below(10) {
        0..=4 => 0,
        5..=7 => 1,
        8 => 2 + rng.below(8),
        _ => 30 + rng.below(30),
    };
    (0..n).map(|_| random_fd(rng)).collect()
}

fn random_message(rng: &mut Rng) -> Msg {
    let req = match rng.below(20) {
        0 => rng.next() as u32,
        _ => rng.below(50) as u32,
    };
    let len = match rng.below(6) {
        0 => 0,
        1 => rng.pick(&[4, 8, 12, 16, 20, 40, 48, 72, 264]),
        2 => rng.below(4096) as usize,
        _ => rng.below(300) as usize,
    };
    let mut payload = rng.bytes(len);
    for _ in 0..rng.below(4) {
        overwrite_field(rng, &mut payload);
    }
    let flags = if rng.one_in(10) {
        rng.next() as u32
    } else {
        FLAG_VERSION | rng.pick(&[0, FLAG_NEED_REPLY])
    };
    Msg {
        req,
        flags,
        payload,
        fds: random_fds(rng),
        size: None,
        cut: None,
    }
}

/// Replaces an aligned 4- or 8-byte field of `p` with an interesting value.
fn overwrite_field(rng: &mut Rng, p: &mut [u8]) {
    let width = rng.pick(&[4usize, 8]);
    if p.len() < width {
        return;
    }
    let at = rng.below((p.len() / width) as u64) as usize * width;
    let v = rng.interesting().to_le_bytes();
    p[at..at + width].copy_from_slice(&v[..width]);
}

/// One random change to a message stream.
fn mutate(rng: &mut Rng, msgs: &mut Vec<Msg>) {
    if msgs.is_empty() {
        msgs.push(random_message(rng));
        return;
    }
    let i = rng.below(msgs.len() as u64) as usize;
    let m = &mut msgs[i];
    match rng.below(12) {
        0 if !m.payload.is_empty() => {
            let bit = rng.below(m.payload.len() as u64 * 8);
            m.payload[(bit / 8) as usize] ^= 1 << (bit % 8);
        }
        1 => overwrite_field(rng, &mut m.payload),
        2 => m.req = rng.below(50) as u32,
        3 => {
            let any = rng.next() as u32;
            m.flags = rng.pick(&[0, FLAG_VERSION | FLAG_NEED_REPLY, 0x2, 0x4, 0x1f, any]);
        }
        4 => m.size = Some(lying_size(rng, m.payload.len())),
        5 => m.cut = Some(rng.below(12 + m.payload.len() as u64) as usize),
        6 => m.fds = random_fds(rng),
        7 => drop(msgs.remove(i)),
        8 => msgs.insert(i, msgs[i].clone()),
        9 => {
            let j = rng.below(msgs.len() as u64) as usize;
            msgs.swap(i, j);
        }
        10 => msgs.insert(i, random_message(rng)),
        _ => {
            let n = rng.below(64) as usize;
            let new_len = m.payload.len().saturating_sub(8) + n;
            m.payload.resize(new_len, rng.next() as u8);
        }
    }
}

fn lying_size(rng: &mut Rng, len: usize) -> u32 {
    let len = len as u32;
    let any = rng.next() as u32;
    rng.pick(&[
        len.wrapping_add(1),
        len.wrapping_sub(1),
        len + 8,
        0,
        12,
        0x1000,
        0x1_0000,
        0x10_0000,
        u32::MAX,
        any,
    ])
}

pub fn mutated_session(rng: &mut Rng) -> Input {
    let features = if rng.one_in(4) { rng.next() } else { FEATURES };
    let mut msgs = valid_session(1 + rng.below(RINGS as u64) as usize, features);
    for _ in 0..rng.below(5) {
        msgs.push(extra(rng));
    }
    for _ in 0..1 + rng.below(4) {
        mutate(rng, &mut msgs);
    }
    Input::Session {
        msgs,
        garbage_rings: rng.one_in(4),
        hold_open: false,
    }
}

pub fn random_messages(rng: &mut Rng) -> Input {
    let mut msgs = if rng.one_in(2) {
        negotiation(FEATURES, default_protocol())
    } else {
        vec![]
    };
    for _ in 0..1 + rng.below(20) {
        msgs.push(random_message(rng));
    }
    Input::Session {
        msgs,
        garbage_rings: rng.one_in(2),
        hold_open: false,
    }
}

/// A region of questionable geometry, `prev` being the one before it in the table.
fn odd_region(rng: &mut Rng, i: u64, prev: Option<Region>, file: u64) -> Region {
    let size = rng.pick(&[
        file,
        file,
        file / 2,
        file * 2,
        file + 4096,
        0,
        4096,
        1 << 40,
        u64::MAX,
    ]);
    let (x, y, z) = (rng.interesting(), rng.interesting(), rng.interesting());
    let p = prev.unwrap_or(Region {
        gpa: 0,
        size: 0,
        uaddr: GUEST_UADDR,
        offset: 0,
    });
    let gpa = rng.pick(&[
        i * 4 * MIB,
        i * 4 * MIB,
        p.gpa.wrapping_add(p.size),
        p.gpa,
        p.gpa.wrapping_add(4096),
        2,
        0x1001,
        u64::MAX - 0xfff,
        x,
    ]);
    let uaddr = rng.pick(&[
        GUEST_UADDR.wrapping_add(gpa),
        GUEST_UADDR.wrapping_add(gpa),
        p.uaddr,
        3,
        u64::MAX - 0xfff,
        y,
    ]);
    let offset = rng.pick(&[0, 0, 0, 4096, 1, file, z]);
    Region {
        gpa,
        size,
        uaddr,
        offset,
    }
}

/// Memory tables (or ADD_MEM_REG sequences) with bad sizes and alignments, then rings
/// placed inside the first region, even past the end of its file.
pub fn memory_tables(rng: &mut Rng) -> Input {
    let mut msgs = negotiation(FEATURES, default_protocol());
    let n = match rng.below(10) {
        0 => 0,
        1 => 9 + rng.below(4),
        _ => 1 + rng.below(3),
    };
    let (mut regions, mut fds, mut prev) = (Vec::new(), Vec::new(), None);
    for i in 0..n {
        let fd = match rng.below(8) {
            0 => random_fd(rng),
            1..=3 => Fd::Guest,
            _ => Fd::Memfd(rng.pick(&[0, 4096, 8192, 64 << 10, MIB, 2 * MIB])),
        };
        let r = odd_region(rng, i, prev, fd.file_size().unwrap_or(4096));
        regions.push(r);
        fds.push(fd);
        prev = Some(r);
    }
    if rng.one_in(2) {
        msgs.push(Msg::new(R::SET_MEM_TABLE, mem_table(&regions)).with_fds(&fds));
    } else {
        for (r, fd) in regions.iter().zip(&fds) {
            msgs.push(Msg::new(R::ADD_MEM_REG, single_region(r)).with_fds(&[*fd]));
        }
        if let Some(r) = regions.first().filter(|_| rng.one_in(3)) {
            msgs.push(Msg::new(R::REM_MEM_REG, single_region(r)));
        }
    }
    rings_in(
        rng,
        regions.first().copied(),
        fds.first().copied(),
        &mut msgs,
    );
    Input::Session {
        msgs,
        garbage_rings: rng.one_in(3),
        hold_open: false,
    }
}

/// Two rings at a chosen place of `region` (the guest's own layout if none).
fn rings_in(rng: &mut Rng, region: Option<Region>, fd: Option<Fd>, msgs: &mut Vec<Msg>) {
    let r = region.unwrap_or(guest_region());
    let file = fd.and_then(Fd::file_size).unwrap_or(0);
    let inside = rng.below(r.size.max(1)) & !0xf;
    let at = rng.pick(&[0, 0, file, r.size.wrapping_sub(2 * RING_STRIDE), inside, 2]);
    for q in 0..2 {
        let l = test_support::driver::RingLayout::at(q as u64 * RING_STRIDE, RING_SIZE);
        let base = r.uaddr.wrapping_add(at);
        let addr = vring_addr(
            q as u32,
            0,
            base.wrapping_add(l.desc),
            base.wrapping_add(l.used),
            base.wrapping_add(l.avail),
            0,
        );
        msgs.extend(ring_setup(q, addr));
    }
}

/// Dirty logs of bad sizes, offsets and kinds, then LOG_ALL on running rings with work.
pub fn dirty_logs(rng: &mut Rng) -> Input {
    let mut msgs = valid_session(2, FEATURES);
    let (x, y) = (rng.interesting(), rng.interesting());
    let size = rng.pick(&[0, 512, 4096, 8192, 32, x]);
    let offset = rng.pick(&[0, 0, 0, 1, 4096, y]);
    let fds = match rng.below(8) {
        0 => vec![],
        1 => vec![random_fd(rng)],
        2 => vec![Fd::Memfd(4096), Fd::Memfd(4096)],
        _ => vec![Fd::Memfd(rng.pick(&[0, 512, 4096, 8192]))],
    };
    let mut log = Msg::new(R::SET_LOG_BASE, [le64(size), le64(offset)].concat()).with_fds(&fds);
    if rng.one_in(2) {
        log.flags |= FLAG_NEED_REPLY;
    }
    if rng.one_in(5) {
        log.req = R::SET_LOG_FD as u32;
    }
    msgs.push(log);
    msgs.push(Msg::new(R::SET_FEATURES, le64(FEATURES | LOG_ALL)));
    for q in 0..2 {
        let mut addr = Guest::ring_addr(q, true);
        if rng.one_in(3) {
            addr[32..40].copy_from_slice(&rng.interesting().to_le_bytes());
        }
        msgs.push(Msg::new(R::SET_VRING_ADDR, addr));
    }
    if rng.one_in(4) {
        mutate(rng, &mut msgs);
    }
    session(msgs)
}

/// Many messages at once: early enables, memory slots, cheap requests, table churn.
pub fn floods(rng: &mut Rng) -> Input {
    let mut msgs = vec![
        Msg::new(R::SET_OWNER, vec![]),
        Msg::new(R::GET_FEATURES, vec![]),
    ];
    match rng.below(4) {
        0 => {
            for i in 0..100_000u32 {
                msgs.push(Msg::new(R::SET_VRING_ENABLE, vring_state(i, 1)));
            }
            msgs.push(Msg::new(R::SET_FEATURES, le64(FEATURES)));
        }
        1 => {
            msgs = negotiation(FEATURES, default_protocol());
            for i in 0..1000u64 {
                let r = Region {
                    gpa: i * 8192,
                    size: 4096,
                    uaddr: GUEST_UADDR + i * 8192,
                    offset: 0,
                };
                msgs.push(Msg::new(R::ADD_MEM_REG, single_region(&r)).with_fds(&[Fd::Memfd(4096)]));
            }
        }
        2 => {
            msgs = valid_session(2, FEATURES);
            for _ in 0..20_000 {
                msgs.push(cheap_request(rng));
            }
        }
        _ => {
            msgs = valid_session(2, FEATURES);
            for _ in 0..500 {
                msgs.push(
                    Msg::new(R::SET_MEM_TABLE, mem_table(&[guest_region()])).with_fds(&[Fd::Guest]),
                );
            }
        }
    }
    // Held open while port B is checked: what a flood holds must not starve the others.
    Input::Session {
        msgs,
        garbage_rings: false,
        hold_open: true,
    }
}

fn cheap_request(rng: &mut Rng) -> Msg {
    let q = rng.below(2) as u32;
    match rng.below(5) {
        0 => Msg::new(R::GET_FEATURES, vec![]),
        1 => Msg::new(R::GET_PROTOCOL_FEATURES, vec![]),
        2 => Msg::new(R::SET_VRING_ENABLE, vring_state(q, 1)),
        3 => Msg::new(R::VRING_KICK, vring_state(q, 0)),
        _ => Msg::new(R::GET_QUEUE_NUM, vec![]),
    }
}

/// Up to 64 connections at once, each closed after nothing, part of a header, or a message.
pub fn storm(rng: &mut Rng) -> Input {
    let n = 8 + rng.below(57);
    let prefixes = (0..n)
        .map(|_| {
            let whole = Msg::new(R::GET_FEATURES, vec![]).encode();
            match rng.below(4) {
                0 => vec![],
                1 => whole[..rng.below(12) as usize].to_vec(),
                2 => whole,
                _ => random_message(rng).encode(),
            }
        })
        .collect();
    Input::Storm { prefixes }
}
