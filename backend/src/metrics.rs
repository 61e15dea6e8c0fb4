//! Prometheus metrics (`--metrics-listen ADDR:PORT`): [`render`] turns port snapshots into the
//! Prometheus text exposition format, [`MetricsServer`] answers `GET /metrics` with it.
//!
//! The names are a stable interface (docs/control.md): per virtqueue, with labels `port`,
//! `queue` and `direction` (`rx` = to the guest, `tx` = from it),
//! `vhost_relay_queue_{packets,bytes,drops,errors,retries}_total` (drops also by `reason`);
//! per port, `vhost_relay_port_connected`, `vhost_relay_port_dirty_logging` (0/1) and
//! `vhost_relay_port_{connects,disconnects}_total`; and `vhost_relay_build_info{version}`.
//!
//! The values live in the ports' own counters, so a scrape does not keep metric objects: it
//! encodes the snapshots of that moment through a [`Collector`] of constant metrics.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, error, info};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tiny_http::{Header, Method, Request, Response};

use crate::stats::PortStats;
use crate::status::{queue_snapshots, PortSnapshot, PortState, QueueSnapshot};

/// What a scrape reports: the snapshots of every port at that moment.
pub type Snapshots = Arc<dyn Fn() -> Vec<PortSnapshot> + Send + Sync>;

/// The `Content-Type` of [`render`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The path served.
pub const PATH: &str = "/metrics";

/// Longest a reply may take to send: a client that stops reading must not hold the one
/// thread that answers every scrape.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// One metric of the exposition: one series per queue or port, read from its snapshot.
struct Metric<T, V> {
    /// Counters without `_total`: the encoder appends it.
    name: &'static str,
    help: &'static str,
    value: fn(&T) -> V,
}

/// Per-queue counters besides drops.
const QUEUE_COUNTERS: [Metric<QueueSnapshot, u64>; 4] = [
    Metric {
        name: "vhost_relay_queue_packets",
        help: "Packets moved through the virtqueue (rx: to the guest, tx: from it).",
        value: |q| q.packets,
    },
    Metric {
        name: "vhost_relay_queue_bytes",
        help: "Bytes of the packets moved through the virtqueue.",
        value: |q| q.bytes,
    },
    Metric {
        name: "vhost_relay_queue_errors",
        help: "Malformed descriptor chains or packets refused on the virtqueue.",
        value: |q| q.errors,
    },
    Metric {
        name: "vhost_relay_queue_retries",
        help: "Sends tried again on a full VF send queue (nothing lost).",
        value: |q| q.retries,
    },
];

const DROPS: (&str, &str) = (
    "vhost_relay_queue_drops",
    "Packets lost on the virtqueue, by reason.",
);

/// Per-port 0/1 gauges.
const PORT_GAUGES: [Metric<PortSnapshot, bool>; 2] = [
    Metric {
        name: "vhost_relay_port_connected",
        help: "1 while a vhost-user frontend is connected to the port.",
        value: |p| p.state == PortState::Connected.name(),
    },
    Metric {
        name: "vhost_relay_port_dirty_logging",
        help: "1 while the frontend has dirty-page logging on (a live migration runs).",
        value: |p| p.dirty_logging,
    },
];

/// Per-port counters.
const PORT_COUNTERS: [Metric<PortSnapshot, u64>; 2] = [
    Metric {
        name: "vhost_relay_port_connects",
        help: "Frontend connections accepted (or made, in client mode) since the port started.",
        value: |p| p.connects,
    },
    Metric {
        name: "vhost_relay_port_disconnects",
        help: "Frontend connections that ended since the port started.",
        value: |p| p.disconnects,
    },
];

const BUILD_INFO: (&str, &str) = (
    "vhost_relay_build",
    "The running vhost-relay's version (always 1).",
);

/// The Prometheus text exposition of `ports`.
pub fn render(ports: &[PortSnapshot]) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Ports(ports.to_vec())));
    let mut out = String::new();
    // The encoder fails only when its writer does, and a String never does.
    prometheus_text::encode(&mut out, &registry).expect("encoding into a String");
    out
}

/// What can be reported of a port known only by its counters: its name and virtqueue
/// counters; state "opening", no connection, kind and socket unknown. For wiring the metrics
/// where only [`PortStats`] are at hand.
pub fn counters_snapshot(stats: &PortStats) -> PortSnapshot {
    PortSnapshot {
        name: stats.name.clone(),
        kind: "unknown",
        socket: String::new(),
        role: "unknown",
        state: PortState::Opening.name(),
        reason: None,
        queues: stats.pairs.len(),
        queues_enabled: 0,
        vf: None,
        vf_sockets: Vec::new(),
        vdpa_device: None,
        vdpa_mode: None,
        dirty_logging: false,
        cpus: Vec::new(),
        connection: None,
        connects: 0,
        disconnects: 0,
        queues_stats: queue_snapshots(stats),
    }
}

/// The snapshots of one scrape, as a collector of constant metrics.
#[derive(Debug)]
struct Ports(Vec<PortSnapshot>);

impl Collector for Ports {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.encode_queue_counters(&mut encoder)?;
        self.encode_drops(&mut encoder)?;
        self.encode_port_metrics(&mut encoder)?;
        let (name, help) = BUILD_INFO;
        let info = Info::new([("version", env!("CARGO_PKG_VERSION"))]);
        info.encode(encoder.encode_descriptor(name, help, None, MetricType::Info)?)
    }
}

impl Ports {
    /// Every virtqueue, with its port's name.
    fn queues(&self) -> impl Iterator<Item = (&str, &QueueSnapshot)> {
        self.0
            .iter()
            .flat_map(|p| p.queues_stats.iter().map(move |q| (p.name.as_str(), q)))
    }

    fn encode_queue_counters(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        for Metric { name, help, value } in QUEUE_COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (port, q) in self.queues() {
                let queue = q.queue.to_string();
                let labels = [
                    ("port", port),
                    ("queue", &queue),
                    ("direction", q.direction),
                ];
                ConstCounter::new(value(q)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn encode_drops(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let (name, help) = DROPS;
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (port, q) in self.queues() {
            let queue = q.queue.to_string();
            for (reason, &n) in &q.drops_by_reason {
                let labels = [
                    ("port", port),
                    ("queue", &queue),
                    ("direction", q.direction),
                    ("reason", reason),
                ];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn encode_port_metrics(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        for Metric { name, help, value } in PORT_GAUGES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for p in &self.0 {
                let gauge = ConstGauge::new(i64::from(value(p)));
                gauge.encode(family.encode_family(&[("port", p.name.as_str())])?)?;
            }
        }
        for Metric { name, help, value } in PORT_COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &self.0 {
                let counter = ConstCounter::new(value(p));
                counter.encode(family.encode_family(&[("port", p.name.as_str())])?)?;
            }
        }
        Ok(())
    }
}

/// The HTTP endpoint: `GET /metrics` answers [`render`] of the snapshots of that moment, other
/// paths 404, other methods 405. One thread answers the scrapes, one at a time (the crate's
/// own threads read the requests); dropping or [`MetricsServer::stop`] ends it.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` (only there; port 0 picks a free one, see [`Self::local_addr`]) and
    /// answers scrapes with `snapshots()`. A bind failure is returned as is.
    pub fn spawn(addr: SocketAddr, snapshots: Snapshots) -> io::Result<Self> {
        Self::spawn_with(addr, snapshots, SEND_TIMEOUT)
    }

    fn spawn_with(addr: SocketAddr, snapshots: Snapshots, timeout: Duration) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        // tiny_http cannot set timeouts on the connections it accepts, but Linux gives an
        // accepted socket the listener's options: SO_SNDTIMEO set here bounds every reply.
        // (Not SO_RCVTIMEO: it would time out accept() itself, which ends tiny_http's loop.)
        set_send_timeout(&listener, timeout)?;
        let addr = listener.local_addr()?;
        let server = tiny_http::Server::from_listener(listener, None).map_err(io::Error::other)?;
        let server = Arc::new(server);
        let stopping = Arc::new(AtomicBool::new(false));
        let (s, stop) = (server.clone(), stopping.clone());
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&s, &*snapshots, &stop))?;
        info!("metrics: serving http://{addr}{PATH}");
        Ok(MetricsServer {
            server,
            addr,
            stopping,
            thread: Some(thread),
        })
    }

    /// The address listened on (the port chosen, if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops answering and closes the listening socket.
    pub fn stop(self) {}
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set_send_timeout(listener: &TcpListener, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket fd and a pointer to a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Answers requests until stopped (or until the crate's accept loop fails, which ends it).
fn serve(server: &tiny_http::Server, snapshots: &dyn Fn() -> Vec<PortSnapshot>, stop: &AtomicBool) {
    loop {
        match server.recv() {
            Ok(rq) => answer(rq, snapshots),
            Err(_) if stop.load(Ordering::Relaxed) => return,
            Err(e) => {
                error!("metrics: no longer accepting scrapes: {e}");
                return;
            }
        }
    }
}

fn answer(rq: Request, snapshots: &dyn Fn() -> Vec<PortSnapshot>) {
    let path = rq.url().split('?').next().unwrap_or_default();
    let response = match (rq.method(), path) {
        (Method::Get | Method::Head, PATH) => Response::from_string(render(&snapshots()))
            .with_header(header("Content-Type", CONTENT_TYPE)),
        (_, PATH) => Response::from_string("only GET and HEAD are served here\n")
            .with_status_code(405)
            .with_header(header("Allow", "GET, HEAD")),
        _ => Response::from_string(format!("not found: the metrics are at {PATH}\n"))
            .with_status_code(404),
    };
    if let Err(e) = rq.respond(response) {
        debug!("metrics: a reply was not sent whole: {e}");
    }
}

/// A header from constant text (always valid).
fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name, value).expect("a constant header is valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    use crate::stats::DropReason;

    fn queue(queue: usize, packets: u64, bytes: u64, drops: &[(DropReason, u64)]) -> QueueSnapshot {
        let mut by_reason: BTreeMap<&'static str, u64> =
            DropReason::ALL.iter().map(|r| (r.name(), 0)).collect();
        for &(r, n) in drops {
            by_reason.insert(r.name(), n);
        }
        QueueSnapshot {
            queue,
            direction: if queue.is_multiple_of(2) { "rx" } else { "tx" },
            packets,
            bytes,
            drops: drops.iter().map(|d| d.1).sum(),
            drops_by_reason: by_reason,
            errors: 0,
            retries: 0,
            busy_ns: 0,
        }
    }

    fn port(name: &str, state: &'static str, queues_stats: Vec<QueueSnapshot>) -> PortSnapshot {
        PortSnapshot {
            state,
            queues_stats,
            ..counters_snapshot(&PortStats::new(name, 0))
        }
    }

    /// vm1: connected, migrating, traffic both ways with drops; vm2: listening, no traffic.
    fn two_ports() -> Vec<PortSnapshot> {
        let mut rx = queue(
            0,
            10,
            640,
            &[(DropReason::NoBuffers, 4), (DropReason::Kernel, 1)],
        );
        rx.errors = 2;
        let mut tx = queue(1, 7, 448, &[(DropReason::VfFull, 5)]);
        tx.retries = 9;
        let mut vm1 = port("vm1", "connected", vec![rx, tx]);
        vm1.dirty_logging = true;
        vm1.connects = 3;
        vm1.disconnects = 2;
        let vm2 = port(
            "vm2",
            "listening",
            vec![queue(0, 0, 0, &[]), queue(1, 0, 0, &[])],
        );
        vec![vm1, vm2]
    }

    fn assert_has_lines(text: &str, expected: &[&str]) {
        for line in expected {
            assert!(
                text.lines().any(|l| l == *line),
                "missing line `{line}` in:\n{text}"
            );
        }
    }

    #[test]
    fn known_counts_come_out_as_these_series() {
        let text = render(&two_ports());
        let version = format!(
            "vhost_relay_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert_has_lines(
            &text,
            &[
                r#"vhost_relay_queue_packets_total{port="vm1",queue="0",direction="rx"} 10"#,
                r#"vhost_relay_queue_packets_total{port="vm1",queue="1",direction="tx"} 7"#,
                r#"vhost_relay_queue_bytes_total{port="vm1",queue="0",direction="rx"} 640"#,
                r#"vhost_relay_queue_bytes_total{port="vm1",queue="1",direction="tx"} 448"#,
                r#"vhost_relay_queue_drops_total{port="vm1",queue="0",direction="rx",reason="no_buffers"} 4"#,
                r#"vhost_relay_queue_drops_total{port="vm1",queue="0",direction="rx",reason="kernel"} 1"#,
                r#"vhost_relay_queue_drops_total{port="vm1",queue="0",direction="rx",reason="vf_full"} 0"#,
                r#"vhost_relay_queue_drops_total{port="vm1",queue="1",direction="tx",reason="vf_full"} 5"#,
                r#"vhost_relay_queue_errors_total{port="vm1",queue="0",direction="rx"} 2"#,
                r#"vhost_relay_queue_errors_total{port="vm1",queue="1",direction="tx"} 0"#,
                r#"vhost_relay_queue_retries_total{port="vm1",queue="1",direction="tx"} 9"#,
                r#"vhost_relay_queue_packets_total{port="vm2",queue="0",direction="rx"} 0"#,
                r#"vhost_relay_port_connected{port="vm1"} 1"#,
                r#"vhost_relay_port_connected{port="vm2"} 0"#,
                r#"vhost_relay_port_dirty_logging{port="vm1"} 1"#,
                r#"vhost_relay_port_dirty_logging{port="vm2"} 0"#,
                r#"vhost_relay_port_connects_total{port="vm1"} 3"#,
                r#"vhost_relay_port_disconnects_total{port="vm1"} 2"#,
                &version,
                "# TYPE vhost_relay_queue_packets_total counter",
                "# TYPE vhost_relay_queue_drops_total counter",
                "# TYPE vhost_relay_port_connected gauge",
                "# TYPE vhost_relay_port_connects_total counter",
                "# TYPE vhost_relay_build_info gauge",
            ],
        );
        // One drops series per reason and queue.
        let drops = text
            .lines()
            .filter(|l| l.starts_with("vhost_relay_queue_drops_total{"));
        assert_eq!(drops.count(), 4 * DropReason::ALL.len());
    }

    /// A sample line split into its name, label keys and values (values unescaped), and value.
    fn parse_sample(line: &str) -> (String, Vec<(String, String)>, String) {
        let (series, value) = line.rsplit_once(' ').expect("a value");
        let Some((name, labels)) = series.split_once('{') else {
            return (series.into(), Vec::new(), value.into());
        };
        let mut pairs = Vec::new();
        let mut rest = labels.strip_suffix('}').expect("closing brace");
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"").expect("key=\"");
            let (mut val, mut chars) = (String::new(), after.char_indices());
            let end = loop {
                match chars.next().expect("closing quote") {
                    (_, '\\') => val.push(chars.next().expect("escaped char").1),
                    (i, '"') => break i,
                    (_, c) => val.push(c),
                }
            };
            pairs.push((key.into(), val));
            rest = after[end + 1..].trim_start_matches(',');
        }
        (name.into(), pairs, value.into())
    }

    #[test]
    fn every_sample_has_its_labels_help_and_type() {
        let mut ports = two_ports();
        ports[1].name = r#"odd"name\"#.into();
        let text = render(&ports);
        let (mut helped, mut typed) = (Vec::new(), Vec::new());
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.push(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.push(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            let (name, labels, value) = parse_sample(line);
            assert!(
                helped.contains(&name) && typed.contains(&name),
                "{line}: no HELP/TYPE before it"
            );
            assert!(value.parse::<u64>().is_ok(), "{line}: value");
            let keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
            let want: &[&str] = match name.as_str() {
                "vhost_relay_queue_drops_total" => &["port", "queue", "direction", "reason"],
                n if n.starts_with("vhost_relay_queue_") => &["port", "queue", "direction"],
                n if n.starts_with("vhost_relay_port_") => &["port"],
                "vhost_relay_build_info" => &["version"],
                n => panic!("unexpected metric {n}"),
            };
            assert_eq!(keys, want, "{line}");
            let port = labels
                .iter()
                .find(|(k, _)| k == "port")
                .map(|(_, v)| v.as_str());
            assert!(
                matches!(port, None | Some("vm1" | r#"odd"name\"#)),
                "{line}"
            );
            assert!(
                seen.insert(format!("{name}{labels:?}")),
                "{line}: duplicate series"
            );
        }
        assert_eq!(helped.len(), 10, "{helped:?}");
        assert_eq!(helped, typed);
    }

    fn get(addr: SocketAddr, path: &str) -> io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    }

    #[test]
    fn a_client_that_stalls_does_not_hold_up_the_next_scrape() {
        // Replies far bigger than the socket buffers (several MB on loopback), so a client
        // that never reads blocks the sender.
        let many: Vec<PortSnapshot> = (0..150)
            .map(|i| {
                port(
                    &format!("p{i}"),
                    "connected",
                    (0..48).map(|q| queue(q, 1, 1, &[])).collect(),
                )
            })
            .collect();
        let server = MetricsServer::spawn_with(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(move || many.clone()),
            Duration::from_secs(1),
        )
        .unwrap();
        let addr = server.local_addr();
        let _silent = TcpStream::connect(addr).unwrap();
        let mut stalled = TcpStream::connect(addr).unwrap();
        write!(stalled, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let reply = get(addr, PATH).unwrap();
        assert!(
            reply.starts_with("HTTP/1.0 200"),
            "{}",
            &reply[..reply.len().min(200)]
        );
        assert!(reply.contains(r#"vhost_relay_port_connected{port="p149"} 1"#));
        eprintln!(
            "answered after {:?}, {} bytes",
            started.elapsed(),
            reply.len()
        );
        server.stop();
        // tiny_http's accept thread lets go of the socket just after the server is gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(addr).is_ok() {
            assert!(Instant::now() < deadline, "still listening after stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
