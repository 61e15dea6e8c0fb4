//! `vdpa-probe`: opens a vhost-vdpa device with the vhost crate and reports what it is;
//! with `--traffic N`, also drives it directly (memfd memory DMA-mapped at IOVA 0, one queue
//! pair) and checks that N frames sent on TX come back on RX. This checks the test
//! environment (VDUSE fixture, vdpa bus, vhost_vdpa) without vhost-relay in the picture.
//!
//! ```text
//! vdpa-probe [--dev /dev/vhost-vdpa-0] [--traffic N]
//! ```
//! Prints `probe device_id=.. features=.. mac=.. status=.. max_pairs=.. mtu=.. vqs=..
//! vring_num=..` and, with traffic, `probe traffic sent=N received=N corrupt=0 PASS` (exit 0)
//! or a FAIL line (exit 1).

use std::process::ExitCode;
use std::time::Duration;

use test_support::driver::{loopback, DriverError, DriverMemory, DriverQueue};
use vhost::vdpa::VhostVdpa;
use vhost::vhost_kern::vdpa::VhostKernVdpa;
use vhost::vhost_kern::VhostKernFeatures;
use vhost::{VhostBackend, VringConfigData};

use test_support::features::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
};
/// vhost-vdpa's backend feature: IOTLB updates as `vhost_msg_v2`.
const VHOST_BACKEND_F_IOTLB_MSG_V2: u64 =
    1 << vhost::vhost_kern::vhost_binding::VHOST_BACKEND_F_IOTLB_MSG_V2;
const S_ACK: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;
const QSIZE: u16 = 256;
const MEM: usize = 4 << 20;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;

#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("usage: vdpa-probe [--dev /dev/vhost-vdpa-0] [--traffic N] ({0})")]
    Usage(String),
    #[error("{what} on {dev}: {source}")]
    Vhost {
        what: &'static str,
        dev: String,
        #[source]
        source: vhost::Error,
    },
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("{0}")]
    Check(String),
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("probe FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), ProbeError> {
    let mut dev = "/dev/vhost-vdpa-0".to_string();
    let mut traffic = 0u32;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dev" => dev = it.next().ok_or_else(|| ProbeError::Usage("--dev".into()))?,
            "--traffic" => {
                traffic = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| ProbeError::Usage("--traffic needs a number".into()))?
            }
            other => return Err(ProbeError::Usage(format!("unknown argument {other}"))),
        }
    }
    let dm = DriverMemory::new(MEM)?;
    let vh = |what: &'static str| {
        let dev = dev.clone();
        move |source| ProbeError::Vhost { what, dev, source }
    };
    let mut v = VhostKernVdpa::new(&dev, &dm.mem).map_err(vh("open"))?;
    v.set_owner().map_err(vh("VHOST_SET_OWNER"))?;
    let features = v.get_features().map_err(vh("VHOST_GET_FEATURES"))?;
    let device_id = v.get_device_id().map_err(vh("VHOST_VDPA_GET_DEVICE_ID"))?;
    let mut cfg = [0u8; 12];
    v.get_config(0, &mut cfg)
        .map_err(vh("VHOST_VDPA_GET_CONFIG"))?;
    let vqs = v.get_vqs_count().map_err(vh("VHOST_VDPA_GET_VQS_COUNT"))?;
    let vring_num = v.get_vring_num().map_err(vh("VHOST_VDPA_GET_VRING_NUM"))?;
    let backend = v
        .get_backend_features()
        .map_err(vh("VHOST_GET_BACKEND_FEATURES"))?;
    let mac: Vec<String> = cfg[..6].iter().map(|b| format!("{b:02x}")).collect();
    let le = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    println!(
        "probe device_id={device_id} features={features:#x} backend_features={backend:#x} mac={} status={} max_pairs={} mtu={} vqs={vqs} vring_num={vring_num}",
        mac.join(":"),
        le(6),
        le(8),
        le(10)
    );
    if traffic == 0 {
        return Ok(());
    }

    v.set_backend_features(backend & VHOST_BACKEND_F_IOTLB_MSG_V2)
        .map_err(vh("VHOST_SET_BACKEND_FEATURES"))?;
    v.set_status(0).map_err(vh("reset"))?;
    v.set_status(S_ACK | S_DRIVER)
        .map_err(vh("status DRIVER"))?;
    let want = VIRTIO_F_VERSION_1
        | VIRTIO_F_ACCESS_PLATFORM
        | VIRTIO_NET_F_MAC
        | VIRTIO_NET_F_MTU
        | VIRTIO_NET_F_STATUS;
    v.set_features(features & want)
        .map_err(vh("VHOST_SET_FEATURES"))?;
    v.set_status(S_ACK | S_DRIVER | S_FEATURES_OK)
        .map_err(vh("status FEATURES_OK"))?;
    let st = v.get_status().map_err(vh("VHOST_VDPA_GET_STATUS"))?;
    if st & S_FEATURES_OK == 0 {
        return Err(ProbeError::Check(format!(
            "device refused FEATURES_OK (status {st:#x})"
        )));
    }
    let base = dm.host_base()?;
    v.dma_map(0, dm.size, base as *const u8, false)
        .map_err(vh("IOTLB update (dma_map)"))?;
    let mut queues = Vec::new();
    for q in 0..2usize {
        let dq = DriverQueue::new(&dm.mem, q, q as u64 * 0x1_0000, QSIZE)?;
        let l = dq.layout;
        v.set_vring_num(q, QSIZE)
            .map_err(vh("VHOST_SET_VRING_NUM"))?;
        let c = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: l.desc,
            used_ring_addr: l.used,
            avail_ring_addr: l.avail,
            log_addr: None,
        };
        v.set_vring_addr(q, &c)
            .map_err(vh("VHOST_SET_VRING_ADDR"))?;
        v.set_vring_base(q, 0).map_err(vh("VHOST_SET_VRING_BASE"))?;
        v.set_vring_call(q, &dq.call)
            .map_err(vh("VHOST_SET_VRING_CALL"))?;
        v.set_vring_kick(q, &dq.kick)
            .map_err(vh("VHOST_SET_VRING_KICK"))?;
        v.set_vring_enable(q, true)
            .map_err(vh("VHOST_VDPA_SET_VRING_ENABLE"))?;
        queues.push(dq);
    }
    v.set_status(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)
        .map_err(vh("status DRIVER_OK"))?;
    let st = v.get_status().map_err(vh("VHOST_VDPA_GET_STATUS"))?;
    if st & S_DRIVER_OK == 0 {
        return Err(ProbeError::Check(format!(
            "device failed DRIVER_OK (status {st:#x})"
        )));
    }
    let (rx, tx) = queues.split_at_mut(1);
    let mut src = [0u8; 6];
    src.copy_from_slice(&cfg[..6]);
    let r = loopback(
        &dm,
        &mut rx[0],
        &mut tx[0],
        RX_BUFS,
        TX_BUFS,
        src,
        traffic,
        200,
        Duration::from_secs(10),
    )?;
    let _ = v.set_status(0);
    let line = format!(
        "probe traffic sent={} received={} corrupt={}",
        r.sent, r.received, r.corrupt
    );
    if r.received == traffic && r.corrupt == 0 {
        println!("{line} PASS");
        Ok(())
    } else {
        Err(ProbeError::Check(line))
    }
}
