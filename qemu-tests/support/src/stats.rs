//! vhost-relay's per-queue counters as it logs them on SIGUSR1: one
//! `stats port=NAME queue=Q dir=rx|tx packets=N bytes=N drops=N errors=N ...` line per virtqueue
//! (more `name=N` fields may follow). [`StatsRequest`] asks a running process for them and
//! reads its answer from the log; [`parse_stats_line`] and [`stats_field`] read a line.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Direction of a virtqueue as vhost-relay names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Towards the guest (even virtqueues).
    Rx,
    /// From the guest (odd virtqueues).
    Tx,
}

/// The fields every stats line has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStat {
    pub port: String,
    pub queue: u16,
    pub dir: Dir,
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    pub errors: u64,
    /// The worker's time in this queue's batches that moved something; `None` from a
    /// vhost-relay that does not report it (an older `--baseline` binary).
    pub busy_ns: Option<u64>,
}

impl fmt::Display for QueueStat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "port={} queue={} dir={} packets={} bytes={} drops={} errors={}",
            self.port,
            self.queue,
            match self.dir {
                Dir::Rx => "rx",
                Dir::Tx => "tx",
            },
            self.packets,
            self.bytes,
            self.drops,
            self.errors
        )
    }
}

/// The stats part of a log line (env_logger puts a timestamp and level first), from `port=`.
fn stats_part(line: &str) -> Option<&str> {
    let start = line.find("stats port=")?;
    line.get(start + "stats ".len()..)
}

/// The text of field `name` (`name=VALUE`) of a stats line.
fn field_text<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    stats_part(line)?.split_whitespace().find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The numeric field `name` (`name=N`) of a stats line, any of them (`retries`,
/// `drop_vf_full`, ...); `None` if the line is no stats line or lacks a numeric `name`.
pub fn stats_field(line: &str, name: &str) -> Option<u64> {
    field_text(line, name)?.parse().ok()
}

/// Parses a stats line anywhere in a log line; `None` unless it has every [`QueueStat`] field.
pub fn parse_stats_line(line: &str) -> Option<QueueStat> {
    let dir = match field_text(line, "dir")? {
        "rx" => Dir::Rx,
        "tx" => Dir::Tx,
        _ => return None,
    };
    Some(QueueStat {
        port: field_text(line, "port")?.to_string(),
        queue: field_text(line, "queue")?.parse().ok()?,
        dir,
        packets: stats_field(line, "packets")?,
        bytes: stats_field(line, "bytes")?,
        drops: stats_field(line, "drops")?,
        errors: stats_field(line, "errors")?,
        busy_ns: stats_field(line, "busy_ns"),
    })
}

/// One SIGUSR1 sent to a process that logs to `log`, and what it has logged since.
#[derive(Debug)]
pub struct StatsRequest {
    log: PathBuf,
    /// The log's length when the signal went out: the answer is what comes after.
    start: usize,
}

impl StatsRequest {
    /// Notes where `log` ends, then sends SIGUSR1 to `pid`.
    pub fn send(pid: u32, log: &Path) -> io::Result<Self> {
        let start = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        let start = usize::try_from(start).map_err(io::Error::other)?;
        let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
        // SAFETY: kill(2) has no memory-safety preconditions; the caller names its own child.
        if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("SIGUSR1 to {pid}: {e}")));
        }
        Ok(StatsRequest {
            log: log.to_path_buf(),
            start,
        })
    }

    /// The complete lines logged since the signal (the logger may be mid-line).
    pub fn answer(&self) -> io::Result<String> {
        let text = std::fs::read(&self.log).map_err(|e| {
            io::Error::new(e.kind(), format!("reading {}: {e}", self.log.display()))
        })?;
        let new = String::from_utf8_lossy(text.get(self.start..).unwrap_or(&[])).into_owned();
        Ok(match new.rfind('\n') {
            Some(i) => new[..=i].to_string(),
            None => String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_env_logger_stats_lines() {
        let l = "[2026-11-21T19:33:37Z INFO  vhost_relay::stats] stats port=vm1 queue=3 dir=tx packets=3 bytes=180 drops=1 errors=0";
        assert_eq!(
            parse_stats_line(l),
            Some(QueueStat {
                port: "vm1".into(),
                queue: 3,
                dir: Dir::Tx,
                packets: 3,
                bytes: 180,
                drops: 1,
                errors: 0,
                busy_ns: None,
            })
        );
        let l = "stats port=a queue=1 dir=tx packets=2 bytes=0 drops=0 errors=0 busy_ns=4100";
        assert_eq!(parse_stats_line(l).unwrap().busy_ns, Some(4100));
        let l = "stats port=a queue=0 dir=rx packets=18446744073709551615 bytes=0 drops=0 errors=2";
        let s = parse_stats_line(l).unwrap();
        assert_eq!((s.dir, s.packets, s.errors), (Dir::Rx, u64::MAX, 2));
    }

    #[test]
    fn display_round_trips() {
        let l = "stats port=vm1 queue=2 dir=rx packets=5 bytes=300 drops=1 errors=0";
        let s = parse_stats_line(l).unwrap();
        assert_eq!(format!("stats {s}"), l);
    }

    #[test]
    fn rejects_malformed_stats_lines() {
        assert_eq!(parse_stats_line("port lb: listening on /tmp/lb.sock"), None);
        assert_eq!(
            parse_stats_line("stats port=a queue=0 dir=up packets=1 bytes=0 drops=0 errors=0"),
            None
        );
        assert_eq!(
            parse_stats_line("stats port=a queue=0 dir=rx packets=1 bytes=0 drops=0"),
            None
        );
        assert_eq!(
            parse_stats_line("stats port=a queue=x dir=rx packets=1 bytes=0 drops=0 errors=0"),
            None
        );
    }

    #[test]
    fn reads_any_numeric_field() {
        let l = "[..] stats port=vf queue=1 dir=tx packets=9 bytes=1 drops=0 errors=0 retries=4 drop_vf_full=2";
        assert_eq!(stats_field(l, "retries"), Some(4));
        assert_eq!(stats_field(l, "drop_vf_full"), Some(2));
        assert_eq!(stats_field(l, "port"), None);
        assert_eq!(stats_field(l, "missing"), None);
        assert_eq!(stats_field("packets=3", "packets"), None);
    }
}
