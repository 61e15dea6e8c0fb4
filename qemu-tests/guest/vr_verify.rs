//! `vr-verify HOST:PORT [MIB_PER_S]`: runs inside the migration harness's guest. Connects to the
//! host peer, reads the chunk stream until the peer closes (at most `MIB_PER_S` if given: a
//! reader slower than the link keeps megabytes the backend wrote queued, unread, in guest
//! memory at every moment, the migration's switch-over included), checks every chunk's sequence number and
//! checksum (see `src/chunk.rs`) and prints one result line:
//! `vr-verify result chunks=N bad=B partial=P first_bad=S bytes=T`, plus a line for each of the
//! first few bad chunks. Exit status 0 only if every chunk was intact and in order.
//!
//! Built by the harness with plain `rustc` and a statically linked C library, because the guest's
//! initramfs has no libc; hence std only, no crates.

#[path = "../src/chunk.rs"]
#[allow(dead_code)]
mod chunk;

use std::io::Read;
use std::net::TcpStream;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: vr-verify HOST:PORT [MIB_PER_S]");
        return ExitCode::from(2);
    };
    let max_rate: Option<f64> = std::env::args().nth(2).and_then(|r| r.parse().ok());
    let started = std::time::Instant::now();
    let mut stream = match TcpStream::connect(&addr) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vr-verify: connecting to {addr}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut buf = [0u8; chunk::CHUNK_LEN];
    let (mut chunks, mut bad, mut bytes) = (0u64, 0u64, 0u64);
    let mut first_bad: Option<u64> = None;
    let mut fill = 0usize;
    loop {
        match stream.read(&mut buf[fill..]) {
            Ok(0) => break,
            Ok(n) => {
                fill += n;
                bytes += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("vr-verify: reading after {bytes} bytes: {e}");
                break;
            }
        }
        if let Some(rate) = max_rate.filter(|r| *r > 0.0) {
            let due = bytes as f64 / (rate * 1024.0 * 1024.0);
            let ahead = due - started.elapsed().as_secs_f64();
            if ahead > 0.001 {
                std::thread::sleep(std::time::Duration::from_secs_f64(ahead));
            }
        }
        if fill == chunk::CHUNK_LEN {
            if let Err(why) = chunk::check(chunks, &buf) {
                bad += 1;
                first_bad.get_or_insert(chunks);
                if bad <= 5 {
                    println!("vr-verify bad chunk {chunks}: {why:?}");
                }
            }
            chunks += 1;
            fill = 0;
        }
    }
    println!(
        "{} chunks={chunks} bad={bad} partial={fill} first_bad={} bytes={bytes}",
        chunk::RESULT_PREFIX,
        first_bad.map_or("none".to_string(), |s| s.to_string())
    );
    if bad == 0 && fill == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
