//! Two queue pairs (`--queues 2`, guest with 2 CPUs and `mq=on`), both carrying traffic.
//!
//! The guest's transmit queue follows the sending CPU (virtio-net sets up XPS one queue per CPU),
//! so flows are started pinned alternately to CPU 0 and CPU 1. Towards the guest, vhost-relay
//! spreads flows over the receive queues by flow hash, so 16 TCP flows (their ACKs and the
//! host's replies) land on both. vhost-relay's SIGUSR1 counters must show packets on all four
//! virtqueues.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qemu_tests::{
    e2e_test, ensure, find_stat, guest_ping_until_reply, Backend, Error, NetNs, Qemu, QemuConfig,
    Result, BOOT_TIMEOUT, PEER_IP,
};

const FLOWS: u16 = 16;
const BASE_PORT: u16 = 6000;
/// Bytes each guest flow sends (dd bs=64k count=16).
const FLOW_BYTES: u64 = 16 * 64 * 1024;
/// Bytes the host sends back on each flow, so the receive queues carry data too.
const REPLY_BYTES: usize = 256 * 1024;

/// Accepts one connection, reads everything, replies with `REPLY_BYTES`, closes.
fn sink(listener: TcpListener) -> JoinHandle<Result<u64>> {
    std::thread::spawn(move || {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("nonblocking", e))?;
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(Error::io("accepting a guest flow", e)),
            }
        };
        s.set_nonblocking(false)
            .map_err(|e| Error::io("blocking", e))?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| Error::io("timeout", e))?;
        let mut got = 0u64;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = s
                .read(&mut buf)
                .map_err(|e| Error::io("reading a guest flow", e))?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        s.write_all(&vec![0x5a; REPLY_BYTES])
            .map_err(|e| Error::io("replying", e))?;
        Ok(got)
    })
}

#[test]
fn two_queue_pairs_both_carry_traffic() {
    two_pairs("two_queue_pairs_both_carry_traffic", "af-packet", false);
}

/// AF_XDP: one socket per VF queue (the veth has two), each fed by the XDP program by queue.
#[test]
fn two_queue_pairs_both_carry_traffic_af_xdp() {
    two_pairs("two_queue_pairs_both_carry_traffic_af_xdp", "af-xdp", false);
}

/// Packed rings (`packed=on`) on all four virtqueues.
#[test]
fn two_queue_pairs_both_carry_traffic_packed_ring() {
    two_pairs(
        "two_queue_pairs_both_carry_traffic_packed_ring",
        "af-packet",
        true,
    );
}

fn two_pairs(name: &str, mode: &str, packed: bool) {
    let tools: &[&str] = if mode == "af-xdp" { &["ethtool"] } else { &[] };
    e2e_test(name, tools, |env| {
        let ns = NetNs::with_queues("vrt", 2)?;
        let sock = env.dir.join("mq.sock");
        let mut relay = Backend::vhost_relay_port_in_mode(&ns, &sock, 2, env.dir.path(), mode)?;
        let mut cfg = QemuConfig::new(&env.image, &sock, env.dir.path()).queues(2);
        if packed {
            cfg.device_opts.push("packed=on".into());
        }
        let mut qemu = Qemu::boot(&cfg, BOOT_TIMEOUT)?;
        if packed {
            qemu.ensure_packed_rings()?;
        }
        env.step("guest ready (2 CPUs, 2 queue pairs)");
        let cpus = qemu.run_ok("nproc", Duration::from_secs(20))?;
        ensure(cpus.trim() == "2", || {
            format!("guest has {cpus:?} CPUs, expected 2")
        })?;
        let queues = qemu.run_ok("ls /sys/class/net/eth0/queues", Duration::from_secs(20))?;
        ensure(queues.contains("rx-1") && queues.contains("tx-1"), || {
            format!("the guest did not enable the second queue pair: {queues:?}")
        })?;
        guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;

        let mut sinks = Vec::new();
        for i in 0..FLOWS {
            let addr: SocketAddr = format!("{PEER_IP}:{}", BASE_PORT + i)
                .parse()
                .map_err(|_| Error::Check("bad address".into()))?;
            sinks.push(sink(ns.tcp_listen(addr)?));
        }
        let before = relay.stats()?;
        env.step("16 flows, pinned alternately to CPU 0 and CPU 1");
        let script = format!(
            "for i in $(seq 0 {last}); do \
               taskset $((1 + i % 2)) sh -c \"dd if=/dev/zero bs=64k count=16 2>/dev/null | nc {PEER_IP} $(({BASE_PORT} + i)) > /tmp/reply-$i\" & \
             done; wait; cat /tmp/reply-* | wc -c; rm /tmp/reply-*",
            last = FLOWS - 1
        );
        let replied = qemu.run_ok(&script, Duration::from_secs(240))?;
        for (i, s) in sinks.into_iter().enumerate() {
            let got = s
                .join()
                .unwrap_or_else(|_| Err(Error::Check("sink thread panicked".into())))?;
            ensure(got == FLOW_BYTES, || {
                format!("flow {i}: host received {got} bytes, expected {FLOW_BYTES}")
            })?;
        }
        let expect_replies = u64::from(FLOWS) * REPLY_BYTES as u64;
        ensure(replied.trim() == expect_replies.to_string(), || {
            format!(
                "guest received {} reply bytes, expected {expect_replies}",
                replied.trim()
            )
        })?;

        let after = relay.stats()?;
        for q in 0..4u16 {
            let (b, a) = (find_stat(&before, "mq", q)?, find_stat(&after, "mq", q)?);
            env.step(&format!(
                "queue {q}: +{} packets, +{} bytes ({a})",
                a.packets - b.packets,
                a.bytes - b.bytes
            ));
            ensure(a.packets - b.packets >= 20, || {
                format!("virtqueue {q} carried almost nothing: {b} -> {a}")
            })?;
            ensure(a.errors == 0, || {
                format!("virtqueue {q} counted errors: {a}")
            })?;
        }
        relay.ensure_running()?;
        Ok(())
    });
}
