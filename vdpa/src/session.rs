//! One frontend connection mirrored onto a vhost-vdpa device: a vhost-user request handler
//! (for the vhost crate's `BackendReqHandler`) that replays the session onto the device.
//!
//! vhost-user has no "start" message; a vDPA device has one (DRIVER_OK), after which its
//! rings cannot be re-pointed. So the session keeps what the frontend said, and (re)starts
//! the device from it whenever the picture changes while it runs (a ring enabled, a new
//! memory table, LOG_ALL switched): stop the device (suspend if it can, then reset), take
//! each ring's base from the guest's used index, and set it all up again. The base is the
//! used index, as QEMU does when it cannot suspend: the device forgets in-flight buffers on
//! reset, so they are offered again; for a device that completes in order (virtio-net
//! devices do) nothing is lost or sent twice.
//!
//! Direct mode: ring addresses are guest physical addresses (= IOVAs), the frontend's kick
//! and call eventfds go straight to the device, and no packet passes through this process.
//! Shadow mode (while the frontend logs dirty pages): see [`crate::shadow`].

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, info, warn};
use migration::{check_guest_region, DirtyBitmap, DirtyLog, LogMemory, RegionDesc};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{VdpaDevice, BACKEND_F_SUSPEND};
use crate::shadow::{GuestMem, RingAddr, ShadowQueue};

type VuResult<T> = vhost::vhost_user::Result<T>;

/// Queues of the one queue pair vDPA mode serves (see docs/vdpa.md: no control queue, so no
/// multiqueue).
pub const NUM_QUEUES: usize = 2;

/// The vhost-user feature bits (not virtio ones): the frontend logs dirty pages, and the
/// frontend speaks the protocol-feature negotiation. Never passed on to the device.
const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Shadow rings start on a 2 MiB boundary above guest memory.
const SHADOW_IOVA_ALIGN: u64 = 1 << 21;

/// Counters of packets relayed by this process (shadow mode only).
pub trait Counters: Send + Sync {
    /// `queue` is the virtqueue index (even: rx, odd: tx).
    fn relayed(&self, queue: usize, packets: u64, bytes: u64);
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("port {port}: the frontend wants features {missing:#x} the vDPA device does not offer (it offers {offered:#x})")]
    MissingFeatures {
        port: String,
        missing: u64,
        offered: u64,
    },
    #[error("port {port}: vDPA device {op}: {source}")]
    Device {
        port: String,
        op: String,
        source: io::Error,
    },
    #[error("port {port}: the vDPA device refused {what} (status {status:#x}); check `dmesg` and the device's driver")]
    Status {
        port: String,
        what: &'static str,
        status: u8,
    },
    #[error("port {port}: {message}")]
    Invalid { port: String, message: String },
    #[error("port {port}: {source}")]
    Relay {
        port: String,
        source: crate::shadow::RelayError,
    },
}

fn to_vu(e: SessionError) -> vhost::vhost_user::Error {
    warn!("{e}");
    vhost::vhost_user::Error::ReqHandlerError(io::Error::other(e.to_string()))
}

/// Features offered to the frontend: what the device offers that we can carry through both
/// direct and shadow mode, plus the vhost-user ones.
pub fn offered_features(device: u64) -> u64 {
    let drop_bits = [
        // The frontend's addresses are its own; no vIOMMU in between.
        VIRTIO_F_ACCESS_PLATFORM,
        // Shadow rings are split rings.
        VIRTIO_F_RING_PACKED,
        VIRTIO_F_IN_ORDER,
        VIRTIO_F_NOTIFICATION_DATA,
        VIRTIO_F_RING_RESET,
        VIRTIO_F_ADMIN_VQ,
        VIRTIO_F_SR_IOV,
        // The control queue (and so multiqueue, RSS, ...) is not mirrored onto the device.
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_CTRL_RX,
        VIRTIO_NET_F_CTRL_VLAN,
        VIRTIO_NET_F_CTRL_RX_EXTRA,
        VIRTIO_NET_F_GUEST_ANNOUNCE,
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_CTRL_MAC_ADDR,
        VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        VIRTIO_NET_F_NOTF_COAL,
        VIRTIO_NET_F_VQ_NOTF_COAL,
        VIRTIO_NET_F_RSS,
        VIRTIO_NET_F_HASH_REPORT,
    ];
    let mask = drop_bits.iter().fold(0u64, |m, b| m | (1u64 << b));
    // The vhost-user bits are ours to offer whatever the device says (a device's bits 26
    // and 30 mean nothing to the frontend).
    (device & !mask) | PROTOCOL_FEATURES | LOG_ALL
}

/// Protocol features: MQ only to answer GET_QUEUE_NUM (one pair), CONFIG for MAC/MTU from
/// the device, LOG_SHMFD for migration.
fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::LOG_SHMFD
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Shadow,
}

/// What the frontend said about one of its rings (size, guest addresses, base, eventfds,
/// enabled): the session replays it onto the device at each start.
#[derive(Default)]
struct FrontendRing {
    num: u16,
    /// Guest physical addresses.
    addr: Option<RingAddr>,
    base: u16,
    kick: Option<Arc<EventFd>>,
    call: Option<Arc<EventFd>>,
    enabled: bool,
}

impl FrontendRing {
    fn ready(&self) -> bool {
        self.num > 0 && self.addr.is_some() && self.kick.is_some() && self.call.is_some()
    }
}

/// One memory region of the frontend's table.
struct Region {
    gpa: u64,
    size: u64,
    /// The frontend's address for it (ring addresses come in these).
    user: u64,
}

/// The device as currently started.
struct Running {
    mode: Mode,
    /// Indices of the rings that were started.
    rings: Vec<usize>,
    relay: Option<Relay>,
}

/// The shadow relay thread and what it owns.
struct Relay {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    handle: JoinHandle<Vec<ShadowQueue>>,
}

pub struct Session<D: VdpaDevice> {
    port: String,
    dev: D,
    device_features: u64,
    acked: Option<u64>,
    mem: GuestMem,
    regions: Vec<Region>,
    /// IOVA ranges mapped in the device for guest memory.
    mapped: Vec<(u64, u64)>,
    /// The frontend's rings, by queue index.
    rings: Vec<FrontendRing>,
    running: Option<Running>,
    log: DirtyLog,
    counters: Arc<dyn Counters>,
    max_num: u16,
    /// Set by GET_VRING_BASE: the frontend stopped the device; wait for a new kick.
    stopped_by_frontend: bool,
}

impl<D: VdpaDevice> Session<D> {
    /// A session on `dev`; on failure the device is handed back with the error, so the port
    /// keeps it for the next frontend.
    #[allow(clippy::result_large_err)]
    pub fn new(
        port: &str,
        mut dev: D,
        counters: Arc<dyn Counters>,
    ) -> Result<Self, (SessionError, D)> {
        let derr = |op: &str, source| SessionError::Device {
            port: port.to_string(),
            op: op.to_string(),
            source,
        };
        let probed = dev
            .features()
            .map_err(|e| derr("VHOST_GET_FEATURES", e))
            .and_then(|f| {
                let n = dev
                    .max_vring_num()
                    .map_err(|e| derr("VHOST_VDPA_GET_VRING_NUM", e))?;
                Ok((f, n))
            })
            .and_then(|fm| dev.set_status(0).map(|_| fm).map_err(|e| derr("reset", e)));
        let (device_features, max_num) = match probed {
            Ok(v) => v,
            Err(e) => return Err((e, dev)),
        };
        Ok(Session {
            port: port.to_string(),
            dev,
            device_features,
            acked: None,
            mem: GuestMemoryMmap::new(),
            regions: Vec::new(),
            mapped: Vec::new(),
            rings: (0..NUM_QUEUES).map(|_| FrontendRing::default()).collect(),
            running: None,
            log: DirtyLog::new(format!("port {port}")),
            counters,
            max_num,
            stopped_by_frontend: false,
        })
    }

    /// The device, for the caller to keep for the next session.
    pub fn into_device(mut self) -> D {
        self.shutdown();
        // Move out without running Drop twice: Session has no Drop impl.
        self.dev
    }

    pub fn mode(&self) -> Option<Mode> {
        self.running.as_ref().map(|r| r.mode)
    }

    /// The end of the connection: the device is reset and guest memory unmapped from it.
    pub fn shutdown(&mut self) {
        if self.running.is_some() {
            self.stop();
        }
        let _ = self.dev.set_status(0);
        self.unmap_guest();
        self.mem = GuestMemoryMmap::new();
        self.regions.clear();
        self.rings = (0..NUM_QUEUES).map(|_| FrontendRing::default()).collect();
        self.acked = None;
    }

    fn derr(&self, op: impl Into<String>, source: io::Error) -> SessionError {
        SessionError::Device {
            port: self.port.clone(),
            op: op.into(),
            source,
        }
    }

    fn invalid(&self, message: impl Into<String>) -> SessionError {
        SessionError::Invalid {
            port: self.port.clone(),
            message: message.into(),
        }
    }

    /// The mode of the running device if ring `index` is one of its started rings.
    fn running_ring(&self, index: u8) -> Option<Mode> {
        self.running
            .as_ref()
            .filter(|r| r.rings.contains(&usize::from(index)))
            .map(|r| r.mode)
    }

    fn wanted_mode(&self) -> Mode {
        if self.acked.unwrap_or(0) & LOG_ALL != 0 {
            Mode::Shadow
        } else {
            Mode::Direct
        }
    }

    fn ring(&mut self, index: u32) -> Result<&mut FrontendRing, SessionError> {
        let port = self.port.clone();
        self.rings
            .get_mut(index as usize)
            .ok_or(SessionError::Invalid {
                port,
                message: format!("queue {index} does not exist (vDPA mode serves one queue pair)"),
            })
    }

    /// The frontend's address → guest physical address.
    fn to_gpa(&self, user: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = user.checked_sub(r.user)?;
            if off.checked_add(len)? > r.size {
                return None;
            }
            // Checked although set_mem_table refuses regions that wrap: these are the
            // frontend's numbers.
            r.gpa.checked_add(off)
        })
    }

    fn unmap_guest(&mut self) {
        if self.mapped.is_empty() {
            return;
        }
        let _ = self.dev.iotlb_batch(true);
        for (iova, size) in std::mem::take(&mut self.mapped) {
            if let Err(e) = self.dev.dma_unmap(iova, size) {
                warn!("port {}: unmapping {iova:#x}+{size:#x}: {e}", self.port);
            }
        }
        let _ = self.dev.iotlb_batch(false);
    }

    fn map_guest(&mut self) -> Result<(), SessionError> {
        self.dev
            .iotlb_batch(true)
            .map_err(|e| self.derr("IOTLB batch begin", e))?;
        let mut result = Ok(());
        for region in self.mem.iter() {
            let gpa = region.start_addr().0;
            let size = region.len();
            let va = region.as_ptr() as u64;
            match self.dev.dma_map(gpa, size, va) {
                Ok(()) => self.mapped.push((gpa, size)),
                Err(e) => {
                    result =
                        Err(self.derr(format!("DMA map of guest memory {gpa:#x}+{size:#x}"), e));
                    break;
                }
            }
        }
        let end = self.dev.iotlb_batch(false);
        result?;
        end.map_err(|e| self.derr("IOTLB batch end", e))
    }

    /// Starts the device once the frontend has set up everything: features, memory, and
    /// every ring fully described (size, addresses, kick and call) and enabled. Frontends
    /// describe the rings one by one and then enable them one by one (QEMU and DPDK's
    /// virtio_user both), so a start any earlier is undone a message later, and a device may
    /// not take it well: DPDK's VDUSE device waits about 100 ms for every ring to be ready,
    /// then aborts the start. Disabling any ring stops the device (see `set_vring_enable`)
    /// and it stays stopped until every ring is enabled again, so a teardown, which disables
    /// them one by one, stops it once and starts nothing.
    fn maybe_start(&mut self) -> Result<(), SessionError> {
        if self.running.is_some()
            || self.stopped_by_frontend
            || self.acked.is_none()
            || self.regions.is_empty()
        {
            return Ok(());
        }
        if !self.rings.iter().all(|v| v.ready() && v.enabled) {
            return Ok(());
        }
        let ready: Vec<usize> = (0..self.rings.len()).collect();
        let mode = self.wanted_mode();
        match self.start(mode, &ready) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = self.dev.set_status(0);
                Err(e)
            }
        }
    }

    fn start(&mut self, mode: Mode, rings: &[usize]) -> Result<(), SessionError> {
        let mut shadow_maps = Vec::new();
        let result = self.try_start(mode, rings, &mut shadow_maps);
        if result.is_err() {
            // Shadow rings mapped before the failure are freed with their queues: their
            // IOVAs must not keep pointing there (and must be free for the next try).
            for (iova, size) in shadow_maps {
                let _ = self.dev.dma_unmap(iova, size);
            }
        }
        result
    }

    fn try_start(
        &mut self,
        mode: Mode,
        rings: &[usize],
        shadow_maps: &mut Vec<(u64, u64)>,
    ) -> Result<(), SessionError> {
        let s_ack = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8 | VIRTIO_CONFIG_S_DRIVER as u8;
        let acked = self.acked.unwrap_or(0);
        let mut features = acked & !(LOG_ALL | PROTOCOL_FEATURES);
        features |= self.device_features & (1 << VIRTIO_F_ACCESS_PLATFORM);
        let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.dev.set_status(0).map_err(|e| self.derr("reset", e))?;
        self.dev
            .set_status(s_ack)
            .map_err(|e| self.derr("set status ACKNOWLEDGE|DRIVER", e))?;
        self.dev
            .set_features(features)
            .map_err(|e| self.derr(format!("VHOST_SET_FEATURES {features:#x}"), e))?;
        let s_feat = s_ack | VIRTIO_CONFIG_S_FEATURES_OK as u8;
        self.dev
            .set_status(s_feat)
            .map_err(|e| self.derr("set status FEATURES_OK", e))?;
        let st = self.dev.status().map_err(|e| self.derr("get status", e))?;
        if st & VIRTIO_CONFIG_S_FEATURES_OK as u8 == 0 {
            return Err(SessionError::Status {
                port: self.port.clone(),
                what: "FEATURES_OK",
                status: st,
            });
        }
        let mut shadow_iova = match mode {
            Mode::Shadow => self.shadow_iova_base(rings)?,
            Mode::Direct => 0,
        };
        let mut queues = Vec::new();
        let mut event_fds = Vec::new();
        for &q in rings {
            let v = &self.rings[q];
            let (num, base, enabled) = (v.num, v.base, v.enabled);
            let Some(addr) = v.addr else { continue };
            let (Some(gkick), gcall) = (v.kick.clone(), v.call.clone()) else {
                continue;
            };
            let qerr = |op: &str| format!("queue {q}: {op}");
            self.dev
                .set_vring_num(q, num)
                .map_err(|e| self.derr(qerr("VHOST_SET_VRING_NUM"), e))?;
            self.dev
                .set_vring_base(q, base)
                .map_err(|e| self.derr(qerr("VHOST_SET_VRING_BASE"), e))?;
            match mode {
                Mode::Direct => {
                    self.dev
                        .set_vring_addr(q, num, addr.desc, addr.avail, addr.used)
                        .map_err(|e| self.derr(qerr("VHOST_SET_VRING_ADDR"), e))?;
                    self.dev
                        .set_vring_kick(q, &gkick)
                        .map_err(|e| self.derr(qerr("VHOST_SET_VRING_KICK"), e))?;
                    if let Some(call) = &gcall {
                        self.dev
                            .set_vring_call(q, call)
                            .map_err(|e| self.derr(qerr("VHOST_SET_VRING_CALL"), e))?;
                    }
                }
                Mode::Shadow => {
                    let sq = ShadowQueue::new(q, num, addr, shadow_iova, base, event_idx)
                        .map_err(|e| self.derr(qerr("shadow ring"), e))?;
                    // Cannot overflow: shadow_iova_base checked the whole span.
                    shadow_iova = shadow_iova.wrapping_add(ShadowQueue::iova_size(num));
                    self.dev
                        .dma_map(sq.iova, sq.mem.len() as u64, sq.mem.va())
                        .map_err(|e| self.derr(qerr("DMA map of the shadow ring"), e))?;
                    shadow_maps.push((sq.iova, sq.mem.len() as u64));
                    self.dev
                        .set_vring_addr(q, num, addr.desc, sq.avail_iova(), sq.used_iova())
                        .map_err(|e| self.derr(qerr("VHOST_SET_VRING_ADDR"), e))?;
                    let dkick =
                        EventFd::new(EFD_NONBLOCK).map_err(|e| self.derr(qerr("eventfd"), e))?;
                    let dcall =
                        EventFd::new(EFD_NONBLOCK).map_err(|e| self.derr(qerr("eventfd"), e))?;
                    self.dev
                        .set_vring_kick(q, &dkick)
                        .map_err(|e| self.derr(qerr("VHOST_SET_VRING_KICK"), e))?;
                    self.dev
                        .set_vring_call(q, &dcall)
                        .map_err(|e| self.derr(qerr("VHOST_SET_VRING_CALL"), e))?;
                    queues.push(sq);
                    event_fds.push(ShadowEventFds {
                        guest_kick: gkick.clone(),
                        guest_call: gcall.clone(),
                        dev_kick: dkick,
                        dev_call: dcall,
                    });
                }
            }
            self.dev
                .set_vring_enable(q, enabled)
                .map_err(|e| self.derr(qerr("VHOST_VDPA_SET_VRING_ENABLE"), e))?;
        }
        let s_ok = s_feat | VIRTIO_CONFIG_S_DRIVER_OK as u8;
        self.dev
            .set_status(s_ok)
            .map_err(|e| self.derr("set status DRIVER_OK", e))?;
        let st = self.dev.status().map_err(|e| self.derr("get status", e))?;
        if st & VIRTIO_CONFIG_S_DRIVER_OK as u8 == 0 || st & VIRTIO_CONFIG_S_FAILED as u8 != 0 {
            return Err(SessionError::Status {
                port: self.port.clone(),
                what: "DRIVER_OK",
                status: st,
            });
        }
        let relay = match mode {
            Mode::Direct => {
                // Buffers the guest made available while the device was stopped: a kick
                // makes the device look (a spurious one is harmless).
                for &q in rings {
                    if let Some(k) = &self.rings[q].kick {
                        let _ = k.write(1);
                    }
                }
                None
            }
            Mode::Shadow => Some(
                spawn_relay(
                    &self.port,
                    queues,
                    event_fds,
                    self.mem.clone(),
                    self.counters.clone(),
                )
                .map_err(|e| self.derr("start the shadow relay thread", e))?,
            ),
        };
        info!(
            "port {}: vdpa: {}",
            self.port,
            match mode {
                Mode::Direct => "direct",
                Mode::Shadow => "shadow",
            }
        );
        self.running = Some(Running {
            mode,
            rings: rings.to_vec(),
            relay,
        });
        Ok(())
    }

    /// Where the shadow rings of `rings` go: above guest memory (whose top is the frontend's
    /// numbers, so every step is checked), inside the device's IOVA range.
    fn shadow_iova_base(&self, rings: &[usize]) -> Result<u64, SessionError> {
        let (first, last) = self
            .dev
            .iova_range()
            .map_err(|e| self.derr("VHOST_VDPA_GET_IOVA_RANGE", e))?;
        let top = self
            .regions
            .iter()
            .map(|r| r.gpa.saturating_add(r.size))
            .max()
            .unwrap_or(0);
        let need = rings.iter().try_fold(0u64, |sum, &q| {
            sum.checked_add(ShadowQueue::iova_size(self.rings[q].num))
        });
        let base = top.max(first).checked_next_multiple_of(SHADOW_IOVA_ALIGN);
        match (base, need) {
            (Some(base), Some(need))
                if base
                    .checked_add(need)
                    .is_some_and(|end| end <= last.saturating_add(1)) =>
            {
                Ok(base)
            }
            _ => Err(self.invalid(format!(
                "no room for shadow rings in the device's IOVA range {first:#x}-{last:#x} above guest memory (ends {top:#x}); migration needs it"
            ))),
        }
    }

    /// Stops the device; every started ring's base becomes the guest's used index.
    fn stop(&mut self) {
        let Some(run) = self.running.take() else {
            return;
        };
        if self.dev.backend_features() & BACKEND_F_SUSPEND != 0 {
            if let Err(e) = self.dev.suspend() {
                warn!(
                    "port {}: VHOST_VDPA_SUSPEND: {e}; resetting instead",
                    self.port
                );
            }
        }
        // After the reset the device writes nothing more, so the relay's last pass sees
        // every used entry it will ever make.
        if let Err(e) = self.dev.set_status(0) {
            warn!("port {}: resetting the vDPA device: {e}", self.port);
        }
        if let Some(relay) = run.relay {
            relay.stop.store(true, Ordering::Release);
            let _ = relay.wake.write(1);
            match relay.handle.join() {
                Ok(queues) => {
                    for mut sq in queues {
                        match sq.forward_used(&self.mem) {
                            Ok(b) if b.entries > 0 => {
                                self.counters.relayed(sq.q, u64::from(b.entries), b.bytes);
                                if let Some(call) =
                                    self.rings.get(sq.q).and_then(|v| v.call.as_ref())
                                {
                                    let _ = call.write(1);
                                }
                            }
                            Ok(_) => {}
                            Err(e) => warn!("port {}: {e}", self.port),
                        }
                        let _ = self.dev.dma_unmap(sq.iova, sq.mem.len() as u64);
                    }
                }
                Err(_) => warn!("port {}: the shadow relay thread panicked", self.port),
            }
        }
        for q in run.rings {
            let Some(addr) = self.rings[q].addr else {
                continue;
            };
            // used.idx follows the 2-byte flags; the address is the frontend's number.
            let idx = addr.used.checked_add(2).and_then(|a| {
                self.mem
                    .load::<u16>(GuestAddress(a), Ordering::Acquire)
                    .ok()
            });
            match idx {
                Some(idx) => self.rings[q].base = u16::from_le(idx),
                None => warn!(
                    "port {}: queue {q}: used ring {:#x} not in guest memory; base kept at {}",
                    self.port, addr.used, self.rings[q].base
                ),
            }
        }
        debug!("port {}: vdpa: stopped", self.port);
    }

    /// Stops and starts again with what the frontend last said.
    fn restart(&mut self) -> Result<(), SessionError> {
        if self.running.is_none() {
            return self.maybe_start();
        }
        self.stop();
        self.maybe_start()
    }
}

/// The eventfds of one shadowed queue: the frontend's pair and the device's pair, between
/// which the shadow relay thread passes notifications.
struct ShadowEventFds {
    guest_kick: Arc<EventFd>,
    guest_call: Option<Arc<EventFd>>,
    dev_kick: EventFd,
    dev_call: EventFd,
}

/// How often the relay looks at the rings without a notification (a safety net; every
/// direction is also driven by its eventfd).
const RELAY_POLL: Duration = Duration::from_millis(50);

fn spawn_relay(
    port: &str,
    mut queues: Vec<ShadowQueue>,
    event_fds: Vec<ShadowEventFds>,
    mem: GuestMem,
    counters: Arc<dyn Counters>,
) -> io::Result<Relay> {
    let stop = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let (stop2, wake2) = (stop.clone(), wake.clone());
    let port = port.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("shadow-{port}"))
        .spawn(move || {
            let mut broken = vec![false; queues.len()];
            let mut fds: Vec<libc::pollfd> = vec![libc::pollfd {
                fd: wake2.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            for efd in &event_fds {
                for fd in [efd.guest_kick.as_raw_fd(), efd.dev_call.as_raw_fd()] {
                    fds.push(libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            while !stop2.load(Ordering::Acquire) {
                for (i, sq) in queues.iter_mut().enumerate() {
                    if broken[i] {
                        continue;
                    }
                    let efd = &event_fds[i];
                    match sq.forward_avail(&mem) {
                        Ok(n) if n > 0 => {
                            let _ = efd.dev_kick.write(1);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            warn!("port {port}: shadow relay: {e}; queue stopped");
                            broken[i] = true;
                            continue;
                        }
                    }
                    match sq.forward_used(&mem) {
                        Ok(b) if b.entries > 0 => {
                            counters.relayed(sq.q, u64::from(b.entries), b.bytes);
                            if b.notify {
                                if let Some(c) = &efd.guest_call {
                                    let _ = c.write(1);
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            warn!("port {port}: shadow relay: {e}; queue stopped");
                            broken[i] = true;
                        }
                    }
                }
                for f in fds.iter_mut() {
                    f.revents = 0;
                }
                // SAFETY: `fds` is a valid array of pollfd for its length.
                let rc = unsafe {
                    libc::poll(
                        fds.as_mut_ptr(),
                        fds.len() as libc::nfds_t,
                        RELAY_POLL.as_millis() as libc::c_int,
                    )
                };
                if rc > 0 {
                    for f in fds.iter().filter(|f| f.revents & libc::POLLIN != 0) {
                        drain(f.fd);
                    }
                }
            }
            queues
        })?;
    Ok(Relay { stop, wake, handle })
}

/// Empties an eventfd (it may be the frontend's blocking one; poll said it is readable).
fn drain(fd: i32) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

fn file_to_eventfd(file: File) -> EventFd {
    // SAFETY: the frontend sent this fd as an eventfd; we own it now. If it is not one, the
    // kernel refuses it when we hand it to the device.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}

impl<D: VdpaDevice> VhostUserBackendReqHandlerMut for Session<D> {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.shutdown();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.shutdown();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(offered_features(self.device_features))
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = offered_features(self.device_features);
        if features & !offered != 0 {
            return Err(to_vu(SessionError::MissingFeatures {
                port: self.port.clone(),
                missing: features & !offered,
                offered,
            }));
        }
        let old = self.acked.replace(features);
        // Without a log yet (SET_LOG_BASE comes first from QEMU) the dirty log says so; the
        // switch to shadow rings happens anyway and marking starts with the log.
        let _ = self.log.set_log_all(features & LOG_ALL != 0);
        info!("port {}: guest features {features:#x}", self.port);
        if old == Some(features) {
            return self.maybe_start().map_err(to_vu);
        }
        self.restart().map_err(to_vu)
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() != files.len() {
            return Err(to_vu(self.invalid(format!(
                "memory table of {} region(s) with {} fd(s)",
                ctx.len(),
                files.len()
            ))));
        }
        let mut regions = Vec::new();
        let mut table = Vec::new();
        for (r, file) in ctx.iter().zip(files) {
            let gpa = r.guest_phys_addr;
            // The protocol shim checked this already; mapping a region larger than its
            // file would raise SIGBUS at the first touch, so check again where we map.
            let desc = RegionDesc {
                guest_phys_addr: gpa,
                memory_size: r.memory_size,
                userspace_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
            };
            check_guest_region(file.as_fd(), &desc).map_err(|e| {
                to_vu(self.invalid(format!(
                    "memory region {gpa:#x}+{:#x} at file offset {:#x}: {e}",
                    desc.memory_size, desc.mmap_offset
                )))
            })?;
            let mmap = r.mmap_region::<DirtyBitmap>(file)?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(gpa))
                .ok_or_else(|| to_vu(self.invalid(format!("memory region {gpa:#x} overflows"))))?;
            regions.push(region);
            table.push(Region {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                user: r.user_addr,
            });
        }
        regions.sort_by_key(|r| r.start_addr().0);
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| to_vu(self.invalid(format!("memory table: {e}"))))?;
        if let Err(e) = self.log.update_memory(&mem) {
            warn!("port {}: {e}", self.port);
        }
        let was_running = self.running.is_some();
        if was_running {
            self.stop();
        }
        self.unmap_guest();
        self.mem = mem;
        self.regions = table;
        self.map_guest().map_err(to_vu)?;
        self.maybe_start().map_err(to_vu)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = self.max_num;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(to_vu(self.invalid(format!(
                "queue {index}: ring size {num} (the device takes powers of two up to {max})"
            ))));
        }
        self.ring(index).map_err(to_vu)?.num = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        // A u16 in a u64: the ring sizes below cannot overflow; the addresses are checked
        // in to_gpa.
        let num = u64::from(self.ring(index).map_err(to_vu)?.num.max(1));
        let t = |a, len| self.to_gpa(a, len);
        let (Some(desc), Some(avail), Some(used)) = (
            t(descriptor, 16 * num),
            t(available, 6 + 2 * num),
            t(used, 6 + 8 * num),
        ) else {
            return Err(to_vu(self.invalid(format!(
                "queue {index}: ring addresses {descriptor:#x}/{available:#x}/{used:#x} are outside the memory table"
            ))));
        };
        let addr = RingAddr { desc, avail, used };
        let v = self.ring(index).map_err(to_vu)?;
        let changed = v.addr != Some(addr);
        v.addr = Some(addr);
        // QEMU sends it again (with the log flag) when logging starts: same rings, nothing
        // to do.
        if changed
            && self
                .running
                .as_ref()
                .is_some_and(|r| r.rings.contains(&(index as usize)))
        {
            return self.restart().map_err(to_vu);
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.ring(index).map_err(to_vu)?.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.ring(index).map_err(to_vu)?;
        if self.running.is_some() {
            self.stop();
            info!("port {}: vdpa: stopped by the frontend", self.port);
        }
        self.stopped_by_frontend = true;
        let v = self.ring(index).map_err(to_vu)?;
        v.kick = None;
        Ok(VhostUserVringState::new(index, u32::from(v.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let Some(fd) = fd else {
            return Err(to_vu(self.invalid(format!(
                "queue {index}: polling mode (no kick fd) is not supported"
            ))));
        };
        let kick = Arc::new(file_to_eventfd(fd));
        self.ring(index.into()).map_err(to_vu)?.kick = Some(kick.clone());
        self.stopped_by_frontend = false;
        if self.running_ring(index) == Some(Mode::Direct) {
            // A running device takes a new kick fd as it is (vhost polls the new one).
            return self
                .dev
                .set_vring_kick(index.into(), &kick)
                .map_err(|e| to_vu(self.derr(format!("queue {index}: VHOST_SET_VRING_KICK"), e)));
        }
        if self.running.is_some() {
            return self.restart().map_err(to_vu);
        }
        self.maybe_start().map_err(to_vu)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let call = fd.map(|f| Arc::new(file_to_eventfd(f)));
        self.ring(index.into()).map_err(to_vu)?.call = call.clone();
        match (self.running_ring(index), &call) {
            // QEMU swaps call fds on a running device whenever the guest masks or unmasks
            // the queue's interrupt vector: vhost-vdpa rewires its interrupt in place, so no
            // restart (which would reset the device each time).
            (Some(Mode::Direct), Some(call)) => self
                .dev
                .set_vring_call(index.into(), call)
                .map_err(|e| to_vu(self.derr(format!("queue {index}: VHOST_SET_VRING_CALL"), e))),
            (Some(_), _) => self.restart().map_err(to_vu),
            (None, _) => self.maybe_start().map_err(to_vu),
        }
    }

    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    /// Nothing to keep: the vhost crate's request handler keeps the acked protocol features
    /// itself (for REPLY_ACK), and nothing in this session depends on them.
    fn set_protocol_features(&mut self, _features: u64) -> VuResult<()> {
        Ok(())
    }

    /// Virtqueues, not pairs (QEMU compares it with the queues of its vhost device).
    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(NUM_QUEUES as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let v = self.ring(index).map_err(to_vu)?;
        if v.enabled == enable {
            return Ok(());
        }
        v.enabled = enable;
        if self.running.is_some() {
            return self.restart().map_err(to_vu);
        }
        self.maybe_start().map_err(to_vu)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let total = self
            .dev
            .config_size()
            .map_err(|e| to_vu(self.derr("VHOST_VDPA_GET_CONFIG_SIZE", e)))?;
        if offset.checked_add(size).is_none_or(|end| end > total) {
            return Err(to_vu(self.invalid(format!(
                "config read {offset}+{size} beyond the device's {total} bytes"
            ))));
        }
        let mut buf = vec![0u8; size as usize];
        self.dev
            .config(offset, &mut buf)
            .map_err(|e| to_vu(self.derr("VHOST_VDPA_GET_CONFIG", e)))?;
        Ok(buf)
    }

    fn set_config(
        &mut self,
        offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        Err(to_vu(self.invalid(format!(
            "config write at {offset} refused: the vDPA device's config is read-only here"
        ))))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(vhost::vhost_user::Error::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(vhost::vhost_user::Error::InvalidOperation(
            "no shared objects",
        ))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        Err(vhost::vhost_user::Error::InvalidOperation(
            "no inflight tracking",
        ))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        Err(vhost::vhost_user::Error::InvalidOperation(
            "no inflight tracking",
        ))
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(vhost::vhost_user::Error::InvalidOperation(
            "no memory slots",
        ))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        Err(vhost::vhost_user::Error::InvalidOperation(
            "no memory slots",
        ))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(vhost::vhost_user::Error::InvalidOperation(
            "no memory slots",
        ))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(vhost::vhost_user::Error::InvalidOperation(
            "no device state",
        ))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(vhost::vhost_user::Error::InvalidOperation(
            "no device state",
        ))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(vhost::vhost_user::Error::InvalidOperation(
            "no shared memory",
        ))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        let logmem = LogMemory::map(file.as_fd(), log.mmap_offset, log.mmap_size)
            .map_err(|e| to_vu(self.invalid(e.to_string())))?;
        self.log
            .set_log_base(&self.mem, logmem)
            .map_err(|e| to_vu(self.invalid(e.to_string())))?;
        // Logging was asked for before the log came: now it can start.
        if self.acked.unwrap_or(0) & LOG_ALL != 0 {
            let _ = self.log.set_log_all(true);
        }
        Ok(())
    }
}
