//! What an operator can ask about a running port: its state, its frontend connection (what
//! was negotiated, which rings are enabled, whether dirty logging is on) and its counters.
//!
//! [`PortStatus`] is the live record, updated by the port's thread ([`crate::server`]) and by
//! the protocol shim (which sees every message the frontend sends, whatever the port's kind,
//! so it is the one place that knows what was negotiated). [`PortSnapshot`] is a point-in-time
//! copy of it, the one shape `ctl list/show/stats`, the control socket's JSON and the
//! Prometheus metrics are all made from.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};

use crate::stats::{DropReason, PortStats, QueueStats};

/// Where a port is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortState {
    /// Its VF or vDPA device is being opened.
    Opening,
    /// Its VF or vDPA device could not be opened (the reason); retried every few seconds.
    WaitingForDevice(String),
    /// Waiting for a frontend to connect.
    Listening,
    /// A frontend is connected.
    Connected,
    /// Client mode: trying to reach the frontend (the last reason it failed).
    Reconnecting(String),
    /// The port cannot serve any more (e.g. its listening socket failed); the reason.
    Broken(String),
    /// Removed, or the process is stopping.
    Stopped,
}

impl PortState {
    /// The state's name in `ctl` output, the JSON and the docs.
    pub fn name(&self) -> &'static str {
        match self {
            PortState::Opening => "opening",
            PortState::WaitingForDevice(_) => "waiting-for-device",
            PortState::Listening => "listening",
            PortState::Connected => "connected",
            PortState::Reconnecting(_) => "reconnecting",
            PortState::Broken(_) => "broken",
            PortState::Stopped => "stopped",
        }
    }

    /// Why the port is in this state, where it says.
    pub fn reason(&self) -> Option<&str> {
        match self {
            PortState::WaitingForDevice(r) | PortState::Reconnecting(r) | PortState::Broken(r) => {
                Some(r)
            }
            _ => None,
        }
    }
}

/// What the frontend of one connection negotiated, as the protocol shim saw it go by.
#[derive(Debug, Default)]
pub struct Negotiated {
    /// The virtio features of the last SET_FEATURES.
    pub features: AtomicU64,
    /// The protocol features of the last SET_PROTOCOL_FEATURES.
    pub protocol_features: AtomicU64,
    /// Bit `i`: ring `i` enabled by the last SET_VRING_ENABLE for it (at most 64 rings, as
    /// [`crate::device::MAX_QUEUE_PAIRS`] allows).
    pub enabled_rings: AtomicU64,
}

impl Negotiated {
    pub fn set_features(&self, features: u64) {
        self.features.store(features, Ordering::Relaxed);
    }

    pub fn set_protocol_features(&self, features: u64) {
        self.protocol_features.store(features, Ordering::Relaxed);
    }

    /// Ring `index` enabled or disabled; indexes past 63 cannot be (the shim refuses rings
    /// the port lacks) and are ignored.
    pub fn set_ring_enabled(&self, index: u32, enabled: bool) {
        if index < 64 {
            let bit = 1u64 << index;
            if enabled {
                self.enabled_rings.fetch_or(bit, Ordering::Relaxed);
            } else {
                self.enabled_rings.fetch_and(!bit, Ordering::Relaxed);
            }
        }
    }

    /// Whether the frontend acked VIRTIO_F_RING_PACKED: the rings are packed.
    pub fn packed_rings(&self) -> bool {
        let bit = 1u64 << virtio_bindings::virtio_config::VIRTIO_F_RING_PACKED;
        self.features.load(Ordering::Relaxed) & bit != 0
    }

    /// Whether the frontend asked for dirty logging (VHOST_F_LOG_ALL: a migration runs).
    pub fn dirty_logging(&self) -> bool {
        self.features.load(Ordering::Relaxed) & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
    }

    /// Queue pairs with both rings enabled.
    pub fn pairs_enabled(&self) -> usize {
        let rings = self.enabled_rings.load(Ordering::Relaxed);
        (0..32).filter(|p| (rings >> (2 * p)) & 3 == 3).count()
    }
}

/// The frontend connection a port serves now.
struct Connection {
    since: Instant,
    negotiated: Arc<Negotiated>,
    /// A handle on the frontend's socket, to end the connection when the port is removed.
    frontend: UnixStream,
}

/// The live record of one port, shared by its thread and whoever reports on it.
#[derive(Default)]
pub struct PortStatus {
    state: Mutex<Option<PortState>>,
    connection: Mutex<Option<Connection>>,
    connects: AtomicU64,
    disconnects: AtomicU64,
}

impl PortStatus {
    pub fn new() -> Self {
        PortStatus::default()
    }

    pub fn set_state(&self, state: PortState) {
        *lock(&self.state) = Some(state);
    }

    pub fn state(&self) -> PortState {
        lock(&self.state).clone().unwrap_or(PortState::Opening)
    }

    /// A frontend connected on `frontend` (a clone of its socket is kept to end the
    /// connection with); what it negotiates goes into the returned record.
    pub fn connected(&self, frontend: &UnixStream) -> std::io::Result<Arc<Negotiated>> {
        let negotiated = Arc::new(Negotiated::default());
        let frontend = frontend.try_clone()?;
        *lock(&self.connection) = Some(Connection {
            since: Instant::now(),
            negotiated: negotiated.clone(),
            frontend,
        });
        self.connects.fetch_add(1, Ordering::Relaxed);
        self.set_state(PortState::Connected);
        Ok(negotiated)
    }

    /// The connection ended.
    pub fn disconnected(&self) {
        if lock(&self.connection).take().is_some() {
            self.disconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ends the current connection, if any: the frontend sees its socket close (QEMU: the
    /// link goes down), and the session ends as it would had the frontend gone away.
    pub fn hang_up(&self) {
        if let Some(c) = lock(&self.connection).as_ref() {
            let _ = c.frontend.shutdown(std::net::Shutdown::Both);
        }
    }

    /// A copy of the connection's record for reporting.
    fn connection_snapshot(&self) -> Option<ConnectionSnapshot> {
        let conn = lock(&self.connection);
        let c = conn.as_ref()?;
        let features = c.negotiated.features.load(Ordering::Relaxed);
        let protocol = c.negotiated.protocol_features.load(Ordering::Relaxed);
        Some(ConnectionSnapshot {
            uptime_secs: c.since.elapsed().as_secs(),
            features,
            feature_names: virtio_feature_names(features),
            protocol_features: protocol,
            protocol_feature_names: protocol_feature_names(protocol),
            queues_enabled: c.negotiated.pairs_enabled(),
            dirty_logging: c.negotiated.dirty_logging(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A port as reported: by `ctl list` (the first fields), `ctl show` (all), `ctl stats`
/// (`name` and `queues_stats`), the control socket's JSON and the metrics.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PortSnapshot {
    pub name: String,
    /// "vf", "loopback" or "vdpa".
    pub kind: &'static str,
    /// The socket path, or "fd N" for an inherited socket.
    pub socket: String,
    /// The vhost-user role: "server" (we listen), "client" (we connect) or "fd" (inherited).
    pub role: &'static str,
    /// [`PortState::name`].
    pub state: &'static str,
    /// Why, for the states that have a reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Queue pairs configured.
    pub queues: usize,
    /// Queue pairs the frontend enabled (0 without a connection).
    pub queues_enabled: usize,
    /// The VF netdev (VF ports).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vf: Option<String>,
    /// The VF socket kind of each pair, e.g. "af-packet" or "af-xdp native zero-copy".
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vf_sockets: Vec<String>,
    /// The vhost-vdpa device (vDPA ports).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vdpa_device: Option<String>,
    /// vDPA ports: "direct" (the device serves the guest's rings) or "shadow" (our shadow
    /// rings relay, while dirty logging is on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vdpa_mode: Option<&'static str>,
    pub dirty_logging: bool,
    /// The CPU each pair's worker is pinned to (`None`: not pinned).
    pub cpus: Vec<Option<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionSnapshot>,
    /// Frontend connections accepted (or made, in client mode) since the port started.
    pub connects: u64,
    /// Of those, the ones that ended.
    pub disconnects: u64,
    /// One entry per virtqueue: 2*pair is rx (to the guest), 2*pair+1 is tx (from it).
    pub queues_stats: Vec<QueueSnapshot>,
}

/// What the current frontend negotiated.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ConnectionSnapshot {
    pub uptime_secs: u64,
    pub features: u64,
    pub feature_names: Vec<String>,
    pub protocol_features: u64,
    pub protocol_feature_names: Vec<String>,
    pub queues_enabled: usize,
    pub dirty_logging: bool,
}

/// The counters of one virtqueue.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub queue: usize,
    /// "rx" (to the guest) or "tx" (from it).
    pub direction: &'static str,
    pub packets: u64,
    pub bytes: u64,
    /// All drops; `drops_by_reason` splits them ([`DropReason::name`]).
    pub drops: u64,
    pub drops_by_reason: BTreeMap<&'static str, u64>,
    /// Malformed chains or packets refused.
    pub errors: u64,
    /// Sends tried again on a full VF queue (nothing lost).
    pub retries: u64,
    /// Worker time spent in this queue's batches that moved something (busy-poll spinning
    /// left out): `busy_ns / packets` is the CPU cost per packet.
    pub busy_ns: u64,
}

impl QueueSnapshot {
    fn of(queue: usize, direction: &'static str, stats: &QueueStats) -> Self {
        let c = stats.snapshot();
        QueueSnapshot {
            queue,
            direction,
            packets: c.packets,
            bytes: c.bytes,
            drops: c.drops,
            drops_by_reason: DropReason::ALL
                .iter()
                .map(|&r| (r.name(), c.dropped(r)))
                .collect(),
            errors: c.errors,
            retries: c.retries,
            busy_ns: c.busy_ns,
        }
    }
}

/// Every virtqueue's counters of a port, in virtqueue order.
pub fn queue_snapshots(stats: &PortStats) -> Vec<QueueSnapshot> {
    stats
        .pairs
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            [
                QueueSnapshot::of(2 * i, "rx", &p.rx),
                QueueSnapshot::of(2 * i + 1, "tx", &p.tx),
            ]
        })
        .collect()
}

impl PortStatus {
    /// Fills the live parts of `snap` (state, connection) from this record.
    pub fn fill(&self, snap: &mut PortSnapshot) {
        let state = self.state();
        snap.state = state.name();
        snap.reason = state.reason().map(str::to_string);
        snap.connection = self.connection_snapshot();
        snap.queues_enabled = snap.connection.as_ref().map_or(0, |c| c.queues_enabled);
        snap.dirty_logging = snap.connection.as_ref().is_some_and(|c| c.dirty_logging);
        snap.connects = self.connects.load(Ordering::Relaxed);
        snap.disconnects = self.disconnects.load(Ordering::Relaxed);
        if snap.kind == "vdpa" {
            snap.vdpa_mode = Some(if snap.dirty_logging {
                "shadow"
            } else {
                "direct"
            });
        }
    }
}

/// Names of the virtio-net feature bits set in `features` ("bit N" for bits without one).
pub fn virtio_feature_names(features: u64) -> Vec<String> {
    use virtio_bindings::virtio_config::*;
    use virtio_bindings::virtio_net::*;
    use virtio_bindings::virtio_ring::*;
    let named: &[(u32, &str)] = &[
        (VIRTIO_NET_F_CSUM, "CSUM"),
        (VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
        (VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, "CTRL_GUEST_OFFLOADS"),
        (VIRTIO_NET_F_MTU, "MTU"),
        (VIRTIO_NET_F_MAC, "MAC"),
        (VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
        (VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"),
        (VIRTIO_NET_F_GUEST_ECN, "GUEST_ECN"),
        (VIRTIO_NET_F_GUEST_UFO, "GUEST_UFO"),
        (VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
        (VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
        (VIRTIO_NET_F_HOST_ECN, "HOST_ECN"),
        (VIRTIO_NET_F_HOST_UFO, "HOST_UFO"),
        (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
        (VIRTIO_NET_F_STATUS, "STATUS"),
        (VIRTIO_NET_F_CTRL_VQ, "CTRL_VQ"),
        (VIRTIO_NET_F_CTRL_RX, "CTRL_RX"),
        (VIRTIO_NET_F_CTRL_VLAN, "CTRL_VLAN"),
        (VIRTIO_NET_F_GUEST_ANNOUNCE, "GUEST_ANNOUNCE"),
        (VIRTIO_NET_F_MQ, "MQ"),
        (VIRTIO_NET_F_CTRL_MAC_ADDR, "CTRL_MAC_ADDR"),
        (VIRTIO_F_NOTIFY_ON_EMPTY, "NOTIFY_ON_EMPTY"),
        (VIRTIO_RING_F_INDIRECT_DESC, "RING_INDIRECT_DESC"),
        (VIRTIO_RING_F_EVENT_IDX, "RING_EVENT_IDX"),
        (VIRTIO_F_VERSION_1, "VERSION_1"),
        (VIRTIO_F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
        (VIRTIO_F_RING_PACKED, "RING_PACKED"),
        (VIRTIO_F_IN_ORDER, "IN_ORDER"),
    ];
    let mut names = Vec::new();
    for bit in 0..64u32 {
        if features & (1u64 << bit) == 0 {
            continue;
        }
        let name = match named.iter().find(|(b, _)| *b == bit) {
            Some((_, n)) => n.to_string(),
            None if 1u64 << bit == VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() => {
                "PROTOCOL_FEATURES".into()
            }
            None if 1u64 << bit == VhostUserVirtioFeatures::LOG_ALL.bits() => "LOG_ALL".into(),
            None => format!("bit {bit}"),
        };
        names.push(name);
    }
    names
}

/// Names of the vhost-user protocol feature bits set in `features`.
pub fn protocol_feature_names(features: u64) -> Vec<String> {
    let known = VhostUserProtocolFeatures::from_bits_truncate(features);
    let mut names: Vec<String> = known.iter_names().map(|(n, _)| n.to_string()).collect();
    let unknown = features & !known.bits();
    names.extend(
        (0..64)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(|b| format!("bit {b}")),
    );
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_bits_are_named_and_unknown_ones_numbered() {
        let f = (1u64 << 15) | (1 << 32) | (1 << 30) | (1 << 26) | (1 << 63);
        assert_eq!(
            virtio_feature_names(f),
            [
                "MRG_RXBUF",
                "LOG_ALL",
                "PROTOCOL_FEATURES",
                "VERSION_1",
                "bit 63"
            ]
        );
        let p = VhostUserProtocolFeatures::MQ.bits()
            | VhostUserProtocolFeatures::REPLY_ACK.bits()
            | (1 << 62);
        assert_eq!(protocol_feature_names(p), ["MQ", "REPLY_ACK", "bit 62"]);
    }

    #[test]
    fn a_pair_counts_as_enabled_only_with_both_rings() {
        let n = Negotiated::default();
        n.set_ring_enabled(0, true);
        assert_eq!(n.pairs_enabled(), 0);
        n.set_ring_enabled(1, true);
        n.set_ring_enabled(3, true);
        assert_eq!(n.pairs_enabled(), 1);
        n.set_ring_enabled(2, true);
        assert_eq!(n.pairs_enabled(), 2);
        n.set_ring_enabled(0, false);
        assert_eq!(n.pairs_enabled(), 1);
        n.set_ring_enabled(200, true);
        assert_eq!(n.enabled_rings.load(Ordering::Relaxed), 0b1110);
    }

    #[test]
    fn dirty_logging_follows_log_all() {
        let n = Negotiated::default();
        assert!(!n.dirty_logging());
        n.set_features(VhostUserVirtioFeatures::LOG_ALL.bits() | 1);
        assert!(n.dirty_logging());
        n.set_features(1);
        assert!(!n.dirty_logging());
    }

    #[test]
    fn the_connection_counts_and_hangs_up() {
        let s = PortStatus::new();
        assert_eq!(s.state(), PortState::Opening);
        let (a, mut b) = UnixStream::pair().unwrap();
        let n = s.connected(&a).unwrap();
        n.set_features(1 << 15);
        assert_eq!(s.state(), PortState::Connected);
        let c = s.connection_snapshot().unwrap();
        assert_eq!(c.feature_names, ["MRG_RXBUF"]);
        s.hang_up();
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut b, &mut buf).unwrap(), 0);
        s.disconnected();
        s.disconnected();
        assert_eq!(s.connects.load(Ordering::Relaxed), 1);
        assert_eq!(s.disconnects.load(Ordering::Relaxed), 1);
        assert!(s.connection_snapshot().is_none());
    }
}
