//! The harness's error type.
//!
//! Every variant carries enough context (which command, which guest command, which process and
//! its log tail) that a failing end-to-end test explains itself without re-running it by hand:
//! under TCG a re-run costs minutes.

use std::path::PathBuf;

/// Errors of the end-to-end harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on the host failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// A host command ran but failed.
    #[error("host command `{cmd}` failed ({status}):\n{output}")]
    Command {
        cmd: String,
        status: String,
        output: String,
    },

    /// A tool or privilege the end-to-end tests need is missing.
    #[error("missing prerequisite: {0}")]
    Prerequisite(String),

    /// No `vhost-relay` binary was found in any of the places tests look.
    #[error(
        "no vhost-relay binary: set VHOST_RELAY_BIN or build it (`cargo build -p vhost-relay`); tried {tried:?}"
    )]
    BinaryNotFound { tried: Vec<PathBuf> },

    /// A program of the `guest-tools` crate is not built beside the running test.
    #[error(
        "no guest tool {name}: build it (`cargo build -p guest-tools`, or `cargo build --workspace`); tried {tried:?}"
    )]
    GuestToolNotFound { name: String, tried: Vec<PathBuf> },

    /// The guest image could not be prepared.
    #[error("guest image: {0}")]
    GuestImage(String),

    /// Nothing matched on the guest console within the time allowed.
    #[error("timed out after {secs}s waiting for {what} on the guest console; last console output:\n{tail}")]
    ConsoleTimeout {
        what: String,
        secs: u64,
        tail: String,
    },

    /// The guest console closed (QEMU exited) while waiting for something.
    #[error("guest console closed while waiting for {what}; last console output:\n{tail}")]
    ConsoleClosed { what: String, tail: String },

    /// A command run in the guest exited non-zero.
    #[error("guest command `{cmd}` exited with status {status}; its output:\n{output}")]
    GuestCommand {
        cmd: String,
        status: i32,
        output: String,
    },

    /// A process the harness started exited when it should have kept running.
    #[error("{what} exited early ({status}); last lines of {log}:\n{tail}")]
    ProcessExited {
        what: String,
        status: String,
        log: PathBuf,
        tail: String,
    },

    /// Waiting for some host-side condition took too long.
    #[error("timed out after {secs}s waiting for {what}{detail}")]
    Timeout {
        what: String,
        secs: u64,
        detail: String,
    },

    /// Output of a tool (testpmd, vhost-relay's counters, ping) did not have the expected form.
    #[error("cannot parse {what}: {detail}")]
    Parse { what: String, detail: String },

    /// A test's own check failed.
    #[error("check failed: {0}")]
    Check(String),
}

impl Error {
    /// Wraps an `io::Error` with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result alias of the harness.
pub type Result<T> = std::result::Result<T, Error>;

/// Fails with [`Error::Check`] unless `cond` holds; keeps test bodies short and their failures
/// readable (the message names what was expected and what was seen).
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Check(msg()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_reports_the_message_only_on_failure() {
        assert!(ensure(true, || unreachable!()).is_ok());
        let err = ensure(false, || "rx queue 2 moved 0 packets".to_string());
        match err {
            Err(Error::Check(m)) => assert_eq!(m, "rx queue 2 moved 0 packets"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn io_errors_name_the_operation() {
        let e = Error::io(
            "reading /x",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert!(e.to_string().starts_with("reading /x: "));
    }
}
