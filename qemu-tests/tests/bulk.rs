//! Bulk TCP transfers of 50 MiB each way between the guest and the host peer, verified by
//! SHA-256 on both ends: a lost, duplicated, reordered-and-not-repaired or corrupted byte
//! anywhere in the relay changes the digest. Run with both VF socket kinds: in AF_XDP mode the
//! guest's TSO super-frames are segmented by the relay and every received frame is copied out of
//! the UMEM, so the digests check that path end to end.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qemu_tests::util::{parse_sum_line, sha256_file};
use qemu_tests::{
    e2e_test, ensure, find_stat, guest_ping_until_reply, Backend, Error, NetNs, Qemu, QemuConfig,
    Result, BOOT_TIMEOUT, PEER_IP,
};

const MIB: u64 = 1024 * 1024;
const SIZE_MIB: u64 = 50;
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(240);

/// Accepts one connection within `timeout`.
fn accept(listener: &TcpListener, timeout: Duration) -> Result<TcpStream> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("listener nonblocking", e))?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(|e| Error::io("stream blocking", e))?;
                s.set_read_timeout(Some(TRANSFER_TIMEOUT))
                    .map_err(|e| Error::io("read timeout", e))?;
                s.set_write_timeout(Some(TRANSFER_TIMEOUT))
                    .map_err(|e| Error::io("write timeout", e))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        what: "the guest to connect".into(),
                        secs: timeout.as_secs(),
                        detail: String::new(),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(Error::io("accepting the guest's connection", e)),
        }
    }
}

/// Serves `file` to the first client, then closes.
fn serve_file(listener: TcpListener, file: &Path) -> JoinHandle<Result<u64>> {
    let file = file.to_path_buf();
    std::thread::spawn(move || {
        let mut s = accept(&listener, Duration::from_secs(120))?;
        let mut f =
            File::open(&file).map_err(|e| Error::io(format!("opening {}", file.display()), e))?;
        let n = std::io::copy(&mut f, &mut s).map_err(|e| Error::io("sending to the guest", e))?;
        s.shutdown(Shutdown::Write)
            .map_err(|e| Error::io("shutting down the send side", e))?;
        // Wait for the guest to close too, so nothing is cut off by a reset.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        Ok(n)
    })
}

/// Receives everything the first client sends into `file`.
fn receive_file(listener: TcpListener, file: &Path) -> JoinHandle<Result<u64>> {
    let file = file.to_path_buf();
    std::thread::spawn(move || {
        let mut s = accept(&listener, Duration::from_secs(120))?;
        let mut f = File::create(&file)
            .map_err(|e| Error::io(format!("creating {}", file.display()), e))?;
        let n =
            std::io::copy(&mut s, &mut f).map_err(|e| Error::io("receiving from the guest", e))?;
        f.flush().map_err(|e| Error::io("flushing", e))?;
        Ok(n)
    })
}

fn join(h: JoinHandle<Result<u64>>) -> Result<u64> {
    h.join()
        .unwrap_or_else(|_| Err(Error::Check("transfer thread panicked".into())))
}

#[test]
fn bulk_50mib_each_way_checksummed() {
    bulk("bulk_50mib_each_way_checksummed", "af-packet", false);
}

#[test]
fn bulk_50mib_each_way_checksummed_af_xdp() {
    bulk("bulk_50mib_each_way_checksummed_af_xdp", "af-xdp", false);
}

/// Packed rings (`packed=on`): mergeable RX buffers, TSO super-frames and many laps of
/// both wrap counters, checked byte for byte.
#[test]
fn bulk_50mib_each_way_checksummed_packed_ring() {
    bulk(
        "bulk_50mib_each_way_checksummed_packed_ring",
        "af-packet",
        true,
    );
}

fn bulk(name: &str, mode: &str, packed: bool) {
    let tools: &[&str] = if mode == "af-xdp" {
        &["sha256sum", "ethtool"]
    } else {
        &["sha256sum"]
    };
    e2e_test(name, tools, |env| {
        let ns = NetNs::new("vrt")?;
        let sock = env.dir.join("bulk.sock");
        let mut relay = Backend::vhost_relay_port_in_mode(&ns, &sock, 1, env.dir.path(), mode)?;
        let mut cfg = QemuConfig::new(&env.image, &sock, env.dir.path());
        if packed {
            cfg.device_opts.push("packed=on".into());
        }
        let mut qemu = Qemu::boot(&cfg, BOOT_TIMEOUT)?;
        if packed {
            qemu.ensure_packed_rings()?;
        }
        env.step("guest ready");
        guest_ping_until_reply(&mut qemu, PEER_IP, Duration::from_secs(60))?;
        let before = relay.stats()?;

        // Host -> guest.
        let src = env.dir.join("to-guest.bin");
        qemu_tests::util::run(std::process::Command::new("dd").args([
            "if=/dev/urandom",
            &format!("of={}", src.display()),
            "bs=1M",
            &format!("count={SIZE_MIB}"),
            "status=none",
        ]))?;
        let src_sum = sha256_file(&src)?;
        let addr: SocketAddr = format!("{PEER_IP}:5001")
            .parse()
            .map_err(|_| Error::Check("bad address".into()))?;
        let server = serve_file(ns.tcp_listen(addr)?, &src);
        env.step("host -> guest transfer");
        let t = Instant::now();
        qemu.run_ok(&format!("nc {PEER_IP} 5001 > /tmp/rx"), TRANSFER_TIMEOUT)?;
        let sent = join(server)?;
        let secs = t.elapsed().as_secs_f64();
        let size = qemu.run_ok("wc -c < /tmp/rx", Duration::from_secs(30))?;
        let guest_sum = parse_sum_line(
            &qemu.run_ok("sha256sum /tmp/rx && rm /tmp/rx", Duration::from_secs(120))?,
        );
        env.step(&format!(
            "host -> guest: {sent} bytes in {secs:.1}s ({:.1} MiB/s), guest has {} bytes",
            sent as f64 / MIB as f64 / secs,
            size.trim()
        ));
        ensure(sent == SIZE_MIB * MIB, || format!("host sent {sent} bytes"))?;
        ensure(guest_sum.as_deref() == Some(src_sum.as_str()), || {
            format!(
                "host -> guest digest mismatch: host {src_sum}, guest {guest_sum:?} ({} bytes)",
                size.trim()
            )
        })?;

        // Guest -> host.
        env.step("guest generates 50 MiB");
        qemu.run_ok(
            &format!("dd if=/dev/urandom of=/tmp/tx bs=1M count={SIZE_MIB} 2>/dev/null"),
            Duration::from_secs(180),
        )?;
        let tx_sum = parse_sum_line(&qemu.run_ok("sha256sum /tmp/tx", Duration::from_secs(120))?)
            .ok_or_else(|| Error::Check("no digest from the guest's sha256sum".into()))?;
        let dst = env.dir.join("from-guest.bin");
        let addr: SocketAddr = format!("{PEER_IP}:5002")
            .parse()
            .map_err(|_| Error::Check("bad address".into()))?;
        let receiver = receive_file(ns.tcp_listen(addr)?, &dst);
        env.step("guest -> host transfer");
        let t = Instant::now();
        qemu.run_ok(
            &format!("nc {PEER_IP} 5002 < /tmp/tx && rm /tmp/tx"),
            TRANSFER_TIMEOUT,
        )?;
        let received = join(receiver)?;
        let secs = t.elapsed().as_secs_f64();
        env.step(&format!(
            "guest -> host: {received} bytes in {secs:.1}s ({:.1} MiB/s)",
            received as f64 / MIB as f64 / secs
        ));
        ensure(received == SIZE_MIB * MIB, || {
            format!(
                "host received {received} bytes, expected {}",
                SIZE_MIB * MIB
            )
        })?;
        let rx_sum = sha256_file(&dst)?;
        ensure(rx_sum == tx_sum, || {
            format!("guest -> host digest mismatch: guest {tx_sum}, host {rx_sum}")
        })?;

        // The relay's counters saw the volume go through: at least the payload each way.
        let after = relay.stats()?;
        for q in [0u16, 1] {
            let (b, a) = (
                find_stat(&before, "bulk", q)?,
                find_stat(&after, "bulk", q)?,
            );
            ensure(a.bytes - b.bytes >= SIZE_MIB * MIB, || {
                format!(
                    "queue {q} moved only {} bytes: {b} -> {a}",
                    a.bytes - b.bytes
                )
            })?;
            ensure(a.errors == 0, || format!("queue {q} counted errors: {a}"))?;
            env.step(&format!("counters: {a}"));
        }
        relay.ensure_running()?;
        Ok(())
    });
}
