//! A port and its kind: what serves the rings of the frontends that connect to its socket.
//!
//! A port is opened once ([`crate::server::open_port`]) and outlives its frontend
//! connections. Its kind decides everything a connection does beyond the protocol shim
//! ([`crate::server`] has the one connection loop, and asks the kind for the rest):
//! - [`PortKind::Vf`] and [`PortKind::Loopback`]: our own queue pairs ([`Relay`]) serve the
//!   rings, under vhost-user-backend's request handling ([`crate::device::NetDevice`]);
//!   a VF port relays each pair to a queue of the VF netdev, and is watched for the VF
//!   being re-created; a loopback port sends each TX packet back on the pair's RX queue;
//! - [`PortKind::Vdpa`]: a kernel vhost-vdpa device serves the rings; the `vdpa` crate's
//!   session mirrors the vhost-user requests onto it.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use log::warn;
use vmm_sys_util::epoll::EventSet;

use crate::device::Handler;
use crate::queue_pair::{Link, QueuePair};
use crate::stats::PortStats;
use crate::vf::VfSocket;

/// One port: its name, counters and kind.
pub struct Port {
    pub name: String,
    pub stats: Arc<PortStats>,
    pub kind: PortKind,
    /// A VF port's watch thread (re-opens the VF's sockets when it is re-created); it ends
    /// when the port is stopped, and is joined then so the VF's sockets close with the port.
    pub watch: Mutex<Option<JoinHandle<()>>>,
}

/// What serves a port's rings.
pub enum PortKind {
    /// Our queue pairs, each relayed to a queue of the VF netdev.
    Vf(Arc<Relay>),
    /// Our queue pairs, each sending what the guest transmits back to it (tests, benchmarks).
    Loopback(Arc<Relay>),
    /// A kernel vhost-vdpa device.
    Vdpa(VdpaSlot),
}

impl Port {
    pub fn new(name: &str, stats: Arc<PortStats>, kind: PortKind) -> Self {
        Port {
            name: name.to_string(),
            stats,
            kind,
            watch: Mutex::new(None),
        }
    }

    /// The socket kind of each pair of a VF port (e.g. "AF_PACKET"), none for other kinds.
    pub fn vf_sockets(&self) -> Vec<String> {
        let PortKind::Vf(relay) = &self.kind else {
            return Vec::new();
        };
        (0..relay.pairs.len())
            .filter_map(|i| match &relay.pair(i)?.link {
                Link::Vf(sock) => Some(sock.describe()),
                Link::Loopback => None,
            })
            .collect()
    }

    /// Waits for the port's own threads (the VF watch) to end, once the port is stopped.
    pub fn join_threads(&self) {
        let watch = self.watch.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = watch {
            let _ = t.join();
        }
    }
}

/// A port's queue pairs: created once, kept across frontend connections.
pub struct Relay {
    pub name: String,
    pub pairs: Vec<Mutex<QueuePair>>,
    pub stats: Arc<PortStats>,
    /// The current session's worker epoll handlers (empty between sessions), so that VF
    /// sockets re-opened meanwhile ([`Relay::replace_vf`]) are watched by their worker.
    /// Taken before any pair's lock.
    pub handlers: Mutex<Vec<Arc<Handler>>>,
}

impl Relay {
    pub fn new(name: &str, pairs: Vec<QueuePair>, stats: Arc<PortStats>) -> Self {
        Relay {
            name: name.to_string(),
            pairs: pairs.into_iter().map(Mutex::new).collect(),
            stats,
            handlers: Mutex::new(Vec::new()),
        }
    }

    /// Event id of a pair's VF socket in its worker's epoll (ids up to the queue count are
    /// the library's).
    pub fn vf_event_id(&self) -> u64 {
        2 * self.pairs.len() as u64 + 1
    }

    /// Puts new VF sockets (one per pair, as [`crate::vf::open_queues`] opened them) in
    /// place of the pairs' old ones, moving the running session's epoll watch over.
    pub fn replace_vf(&self, socks: Vec<VfSocket>) {
        let handlers = self.handlers.lock().unwrap_or_else(|e| e.into_inner());
        let events = EventSet::IN | EventSet::EDGE_TRIGGERED;
        for (i, sock) in socks.into_iter().enumerate() {
            let Some(mut pair) = self.pair(i) else { break };
            if let Some(h) = handlers.get(i) {
                if let Link::Vf(old) = &pair.link {
                    let _ = h.unregister_listener(old.as_raw_fd(), events, self.vf_event_id());
                }
                if let Err(e) = h.register_listener(sock.as_raw_fd(), events, self.vf_event_id()) {
                    warn!(
                        "port {} pair {i}: cannot watch the re-opened VF socket: {e}",
                        self.name
                    );
                }
            }
            pair.replace_vf(sock);
        }
    }

    /// The VF is gone: every pair drops the guest's packets until [`Relay::replace_vf`].
    pub fn mark_vf_gone(&self) {
        for i in 0..self.pairs.len() {
            if let Some(mut pair) = self.pair(i) {
                pair.vf_gone = true;
            }
        }
    }

    pub fn pair(&self, index: usize) -> Option<MutexGuard<'_, QueuePair>> {
        // A poisoned lock means a worker panicked mid-batch; the pair's state is still
        // consistent at batch granularity, so keep serving rather than take the port down.
        self.pairs
            .get(index)
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A vDPA port's device, opened (and owned) once for the port's life: a session takes it
/// and gives it back, reset, when its frontend goes away.
pub struct VdpaSlot(Mutex<Option<vdpa::KernelDevice>>);

impl VdpaSlot {
    pub fn new(dev: vdpa::KernelDevice) -> Self {
        VdpaSlot(Mutex::new(Some(dev)))
    }

    /// The device, unless a session still holds it.
    pub fn take(&self) -> Option<vdpa::KernelDevice> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub fn put_back(&self, dev: vdpa::KernelDevice) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(dev);
    }
}
