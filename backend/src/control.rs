//! The control socket (`--control PATH`): the runtime port API that `vhost-relay ctl`,
//! os-vif-like plugging agents and tests talk to. docs/control.md documents it as stable.
//!
//! One JSON object per line each way. A request is `{"command": "list" | "show" | "stats" |
//! "add" | "remove" | "reload", ...}`; the reply is `{"ok": true, "result": ...}` or
//! `{"ok": false, "error": "one line"}`. A client may send many requests on one connection.
//!
//! Whoever reaches the socket can add and remove ports, so it is made `0600` (root's, in a
//! service). Clients are still bounded, since a stuck or hostile tool must not cost the
//! ports anything: at most [`MAX_CLIENTS`] at once, [`MAX_REQUEST`] bytes per request, and
//! [`IDLE_TIMEOUT`] without a request before the connection is closed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::PortSpec;
use crate::service::{Origin, Service, ServiceError};

/// Control clients served at once; more are told so and closed.
pub const MAX_CLIENTS: usize = 16;
/// Longest request line; a longer one is refused and its connection closed.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may stay silent before its connection is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A request, as sent on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    List,
    Show {
        name: String,
    },
    Stats {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// `port` is a `[[port]]` table of the config file, in JSON.
    Add {
        port: Box<PortSpec>,
    },
    Remove {
        name: String,
    },
    Reload,
}

/// The control socket we bound; its file is removed when this is dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

impl ControlSocket {
    /// Binds `path`, replacing a stale socket left by a process that is gone, but never a
    /// live one (another vhost-relay serving it) or a file that is not a socket.
    pub fn bind(path: &Path) -> Result<ControlSocket, String> {
        let fail = |why: String| format!("control socket {}: {why}", path.display());
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(fail("a file that is not a socket is in the way".into()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(fail("another process is serving it".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| fail(format!("cannot remove the stale one: {e}")))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
        let ino = std::fs::symlink_metadata(path)
            .map_err(|e| fail(e.to_string()))?
            .ino();
        let socket = ControlSocket {
            listener,
            path: path.to_path_buf(),
            ino,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| fail(format!("cannot make it 0600: {e}")))?;
        Ok(socket)
    }

    /// Serves clients on a thread of its own.
    pub fn serve(&self, service: Arc<Service>) -> io::Result<()> {
        let listener = self.listener.try_clone()?;
        info!("control socket {}", self.path.display());
        thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, service))?;
        Ok(())
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn accept_loop(listener: UnixListener, service: Arc<Service>) {
    let clients = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                crate::warn_limited!("control socket: accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            let _ = send(
                &mut stream,
                &refusal(&format!(
                    "more than {MAX_CLIENTS} control clients at once; try again"
                )),
            );
            continue;
        }
        let (service, count) = (service.clone(), clients.clone());
        let spawned = thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(stream, &service) {
                    log::debug!("control client: {e}");
                }
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            warn!("control socket: cannot start a client thread: {e}");
            clients.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Answers one client's requests until it closes, stays silent too long, or sends a line
/// over the limit.
fn serve_client(stream: UnixStream, service: &Service) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .by_ref()
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && line.len() > MAX_REQUEST {
            let why = format!("request longer than {MAX_REQUEST} bytes; closing");
            return send(&mut out, &refusal(&why));
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = match serde_json::from_slice::<Request>(&line) {
            Ok(request) => answer(service, request),
            Err(e) => refusal(&format!("malformed request: {e}")),
        };
        send(&mut out, &reply)?;
    }
}

fn send(out: &mut UnixStream, reply: &Value) -> io::Result<()> {
    let mut text = reply.to_string();
    text.push('\n');
    out.write_all(text.as_bytes())
}

fn refusal(why: &str) -> Value {
    json!({ "ok": false, "error": why.replace('\n', " ") })
}

/// Carries out one request.
pub fn answer(service: &Service, request: Request) -> Value {
    let result: Result<Value, ServiceError> = match request {
        Request::List => Ok(json!(service.snapshots())),
        Request::Show { name } => service.snapshot(&name).map(|s| json!(s)),
        Request::Stats { name: Some(name) } => service.snapshot(&name).map(|s| json!([s])),
        Request::Stats { name: None } => Ok(json!(service.snapshots())),
        Request::Add { port } => add(service, *port).map(|()| Value::Null),
        Request::Remove { name } => service.remove(&name).map(|()| Value::Null),
        Request::Reload => service.reload().map(|s| json!(s)),
    };
    match result {
        Ok(result) => json!({ "ok": true, "result": result }),
        Err(e) => {
            warn!("control: {e}");
            refusal(&e.to_string())
        }
    }
}

/// `add`: the port is checked as a command-line port is, then started.
fn add(service: &Service, spec: PortSpec) -> Result<(), ServiceError> {
    const ORIGIN: &str = "add";
    if spec.fd.is_some() {
        return Err(crate::config::ConfigError::Invalid {
            origin: ORIGIN.into(),
            message: "an fd cannot be passed through the control socket; give a socket path".into(),
        }
        .into());
    }
    let cfg = spec.validate(ORIGIN)?;
    cfg.check_socket_dir(ORIGIN)?;
    service.add(cfg, Origin::Api)?;
    Ok(())
}
