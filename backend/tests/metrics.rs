//! The Prometheus endpoint as an operator meets it: scraped with `curl`, validated with
//! `promtool check metrics` (Debian package `prometheus`; CI installs it, and a missing
//! promtool fails these tests), first from the library's server with known counters, then
//! from the real binary after known loopback traffic.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::{round_trip, stats_field, stats_line, temp_dir, wait_for, Backend, TestFrontend};
use test_support::metrics::{curl, promtool_check, sample, served_url};
use vhost_relay::metrics::{self, MetricsServer, CONTENT_TYPE};
use vhost_relay::stats::{DropReason, PortStats};

/// Two ports with known counters; the second's name needs escaping in a label value.
fn known_ports() -> Vec<Arc<PortStats>> {
    let vm1 = PortStats::new("vm1", 2);
    vm1.pairs[0].rx.add_packets(10, 640);
    vm1.pairs[0].rx.add_drops(DropReason::NoBuffers, 4);
    vm1.pairs[1].tx.add_packets(7, 448);
    vm1.pairs[1].tx.add_errors(2);
    vm1.pairs[1].tx.add_retries(9);
    let odd = PortStats::new(r#"odd"name\"#, 1);
    odd.pairs[0].tx.add_drops(DropReason::VfFull, 3);
    vec![Arc::new(vm1), Arc::new(odd)]
}

fn serve_known_ports() -> MetricsServer {
    let ports = known_ports();
    let snapshots = move || {
        ports
            .iter()
            .map(|p| metrics::counters_snapshot(p))
            .collect()
    };
    MetricsServer::spawn("127.0.0.1:0".parse().unwrap(), Arc::new(snapshots)).expect("bind")
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

#[test]
fn a_scrape_passes_promtool_and_carries_the_counters() {
    let server = serve_known_ports();
    let reply = curl(&url(server.local_addr(), "/metrics"), &[]).expect("scrape");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.content_type, CONTENT_TYPE);
    promtool_check(&reply.body).unwrap_or_else(|e| panic!("{e}\n{}", reply.body));
    let q = |name: &str, port: &str, queue: u32, dir: &str| {
        let series = format!(r#"{name}{{port="{port}",queue="{queue}",direction="{dir}"}}"#);
        sample(&reply.body, &series).unwrap_or_else(|| panic!("no {series} in\n{}", reply.body))
    };
    assert_eq!(q("vhost_relay_queue_packets_total", "vm1", 0, "rx"), 10);
    assert_eq!(q("vhost_relay_queue_bytes_total", "vm1", 0, "rx"), 640);
    assert_eq!(q("vhost_relay_queue_packets_total", "vm1", 3, "tx"), 7);
    assert_eq!(q("vhost_relay_queue_errors_total", "vm1", 3, "tx"), 2);
    assert_eq!(q("vhost_relay_queue_retries_total", "vm1", 3, "tx"), 9);
    let drops = |port: &str, queue: u32, dir: &str, reason: &str| {
        let series = format!(
            r#"vhost_relay_queue_drops_total{{port="{port}",queue="{queue}",direction="{dir}",reason="{reason}"}}"#
        );
        sample(&reply.body, &series)
    };
    assert_eq!(drops("vm1", 0, "rx", "no_buffers"), Some(4));
    assert_eq!(drops("vm1", 0, "rx", "vf_full"), Some(0));
    assert_eq!(drops(r#"odd\"name\\"#, 1, "tx", "vf_full"), Some(3));
    let build = format!(
        r#"vhost_relay_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&reply.body, &build), Some(1));
    // The check bites: a counter named without `_total` is a lint error for promtool.
    let wrong = reply
        .body
        .replace("vhost_relay_queue_bytes_total", "vhost_relay_queue_bytes");
    assert!(
        promtool_check(&wrong).is_err(),
        "promtool accepted a malformed exposition"
    );
}

#[test]
fn other_paths_are_not_found_and_other_methods_refused() {
    let server = serve_known_ports();
    let addr = server.local_addr();
    for path in ["/", "/metrics/x", "/metricsx", "/favicon.ico"] {
        let reply = curl(&url(addr, path), &[]).expect("request");
        assert_eq!(reply.status, 404, "{path}: {}", reply.body);
    }
    for method in ["POST", "PUT", "DELETE"] {
        // -i: the headers come with the body, to see Allow.
        let reply = curl(&url(addr, "/metrics"), &["-i", "-X", method]).expect("request");
        assert_eq!(reply.status, 405, "{method}: {}", reply.body);
        assert!(reply.body.contains("Allow: GET, HEAD"), "{}", reply.body);
        assert!(!reply.body.contains("vhost_relay_"), "{method} got metrics");
    }
    let head = curl(&url(addr, "/metrics?x=1"), &["-I"]).expect("HEAD");
    assert_eq!(head.status, 200);
    assert_eq!(head.content_type, CONTENT_TYPE);
    assert!(!head.body.contains("vhost_relay_"), "HEAD got a body");
}

/// The URL the binary logged it serves metrics at.
fn metrics_url(be: &Backend) -> String {
    let mut url = None;
    let logged = wait_for(Duration::from_secs(10), || {
        url = served_url(&be.log_text());
        url.is_some()
    });
    assert!(logged, "no 'metrics: serving' line in:\n{}", be.log_text());
    url.unwrap()
}

#[test]
fn the_binary_counts_known_loopback_traffic() {
    let dir = temp_dir("metrics-loopback");
    let mut be = Backend::start(&dir, &["--loopback", "--metrics-listen", "127.0.0.1:0"]);
    let url = metrics_url(&be);
    let mut f = TestFrontend::connect(&be.socket, 1, 0);
    for tag in 0..5 {
        round_trip(&mut f, tag);
    }
    let series = |q: u32, dir: &str| format!(r#"{{port="vr",queue="{q}",direction="{dir}"}}"#);
    let packets = |text: &str, q, dir| {
        sample(
            text,
            &format!("vhost_relay_queue_packets_total{}", series(q, dir)),
        )
    };
    // Counters are published once per batch: wait for the last one.
    let mut body = String::new();
    let counted = wait_for(Duration::from_secs(5), || {
        body = curl(&url, &[]).expect("scrape").body;
        packets(&body, 0, "rx") == Some(5) && packets(&body, 1, "tx") == Some(5)
    });
    assert!(counted, "5 packets each way expected:\n{body}");
    promtool_check(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    // Bytes as the SIGUSR1 report counts them.
    for (q, dir) in [(0, "rx"), (1, "tx")] {
        let logged = stats_field(&stats_line(&be.child, &be.log, q as usize), "bytes");
        let bytes = sample(
            &body,
            &format!("vhost_relay_queue_bytes_total{}", series(q, dir)),
        );
        assert_eq!(bytes, Some(logged), "queue {q}");
    }
    assert!(be.is_running());
}
