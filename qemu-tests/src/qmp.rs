//! A minimal QMP (QEMU Machine Protocol) client: enough to drive and watch a live migration.
//!
//! QMP is line-delimited JSON on a unix socket: a greeting, `qmp_capabilities`, then one reply
//! (`return` or `error`) per command, with asynchronous `event`s interleaved, which are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying until `timeout`: QEMU creates the socket shortly after it starts)
    /// and enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("connecting to QMP {}", path.display()),
                        e,
                    ))
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| Error::io("QMP read timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io("cloning the QMP socket", e))?;
        let mut q = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(q.parse_error(format!("greeting without QMP: {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn parse_error(&self, detail: String) -> Error {
        Error::Parse {
            what: format!("QMP on {}", self.path.display()),
            detail,
        }
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| Error::io(format!("reading QMP {}", self.path.display()), e))?;
        if n == 0 {
            return Err(Error::Check(format!(
                "QMP {} closed (QEMU exited?)",
                self.path.display()
            )));
        }
        serde_json::from_str(&line).map_err(|e| self.parse_error(format!("{e}: {line}")))
    }

    /// Runs `command` with `arguments` and returns its `return` value; a QMP `error` becomes
    /// [`Error::Check`] naming the command and QEMU's description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let msg = if arguments.as_object().is_some_and(|o| o.is_empty()) {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| Error::io(format!("writing QMP {}", self.path.display()), e))?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(Error::Check(format!(
                    "QMP `{command}` failed: {}",
                    e.get("desc").and_then(Value::as_str).unwrap_or("?")
                )));
            }
            return Err(self.parse_error(format!("reply to {command}: {reply}")));
        }
    }

    /// `query-status`'s `status` (`running`, `inmigrate`, `postmigrate`, `paused`, ...).
    pub fn status(&mut self) -> Result<String> {
        let r = self.execute("query-status", json!({}))?;
        r.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| self.parse_error(format!("query-status: {r}")))
    }
}

/// What `query-migrate` says about the current (or last) migration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MigrationInfo {
    /// `setup`, `active`, `device`, `completed`, `failed`, `cancelling`, `cancelled`, ...
    pub status: String,
    /// Milliseconds from start to completion (or so far).
    pub total_time_ms: Option<u64>,
    /// Milliseconds the guest was stopped (only once completed).
    pub downtime_ms: Option<u64>,
    /// RAM bytes sent so far.
    pub ram_transferred: Option<u64>,
    /// Pages re-sent because they were dirtied again.
    pub dirty_sync_count: Option<u64>,
    /// QEMU's error text for `failed`.
    pub error: Option<String>,
}

impl MigrationInfo {
    /// Reads the fields of a `query-migrate` reply.
    pub fn from_json(v: &Value) -> Self {
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        let ram = |k: &str| v.get("ram").and_then(|r| r.get(k)).and_then(Value::as_u64);
        MigrationInfo {
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string(),
            total_time_ms: u("total-time"),
            downtime_ms: u("downtime"),
            ram_transferred: ram("transferred"),
            dirty_sync_count: ram("dirty-sync-count"),
            error: v
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }

    /// Whether the migration has ended (one way or another).
    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_migrate_fields() {
        let v: Value = serde_json::from_str(
            r#"{"status":"completed","setup-time":2,"downtime":12,"total-time":2100,
               "ram":{"transferred":123456,"dirty-sync-count":4,"remaining":0}}"#,
        )
        .unwrap();
        let m = MigrationInfo::from_json(&v);
        assert_eq!(m.status, "completed");
        assert_eq!(m.downtime_ms, Some(12));
        assert_eq!(m.total_time_ms, Some(2100));
        assert_eq!(m.ram_transferred, Some(123456));
        assert_eq!(m.dirty_sync_count, Some(4));
        assert!(m.finished());
        let v: Value = serde_json::from_str(r#"{"status":"active","total-time":5}"#).unwrap();
        let m = MigrationInfo::from_json(&v);
        assert!(!m.finished());
        assert_eq!(m.downtime_ms, None);
        let m = MigrationInfo::from_json(&serde_json::json!({}));
        assert_eq!(m.status, "none");
    }
}
