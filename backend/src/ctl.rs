//! `vhost-relay ctl`: sends one request to a running vhost-relay's control socket and prints
//! the reply, as text for people or (`--json`) as the reply's JSON for scripts.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::control::Request;

/// How long to wait for the reply: a `remove` waits for the port's session to end.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `request` and prints the reply; failure (no daemon, an error reply) exits 1 with
/// one line on stderr.
pub fn run(control: &Path, request: Request, json: bool) -> ExitCode {
    let text_of = |reply: &Value| render(&request, reply);
    match exchange(control, &request) {
        Ok(reply) if reply["ok"] == Value::Bool(true) => {
            if json {
                println!("{reply}");
            } else {
                print!("{}", text_of(&reply["result"]));
            }
            ExitCode::SUCCESS
        }
        Ok(reply) => {
            if json {
                println!("{reply}");
            }
            let why = reply["error"]
                .as_str()
                .unwrap_or("the reply has no error text");
            eprintln!("vhost-relay ctl: {why}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vhost-relay ctl: {}: {e}", control.display());
            ExitCode::FAILURE
        }
    }
}

/// One request, one reply line.
fn exchange(control: &Path, request: &Request) -> std::io::Result<Value> {
    let mut stream = UnixStream::connect(control)?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(std::io::Error::other("closed without a reply"));
    }
    Ok(serde_json::from_str(&reply)?)
}

/// The text form of a successful reply.
fn render(request: &Request, result: &Value) -> String {
    let empty = Vec::new();
    let ports = result.as_array().unwrap_or(&empty);
    match request {
        Request::List => list(ports),
        Request::Show { .. } => show(result),
        Request::Stats { .. } => ports.iter().map(stats).collect(),
        Request::Add { .. } | Request::Remove { .. } => "ok\n".into(),
        Request::Reload => reload(result),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The state, with its reason where it has one.
fn state(port: &Value) -> String {
    match port["reason"].as_str() {
        Some(why) => format!("{} ({why})", text(&port["state"])),
        None => text(&port["state"]),
    }
}

fn list(ports: &[Value]) -> String {
    let mut rows = vec![["NAME", "KIND", "ROLE", "QUEUES", "SOCKET", "STATE"].map(String::from)];
    for p in ports {
        rows.push([
            text(&p["name"]),
            text(&p["kind"]),
            text(&p["role"]),
            format!("{}/{}", p["queues_enabled"], p["queues"]),
            text(&p["socket"]),
            state(p),
        ]);
    }
    table(&rows)
}

/// Columns padded to their widest cell (the last one is not padded).
fn table(rows: &[[String; 6]]) -> String {
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        for (c, cell) in r.iter().enumerate() {
            if c + 1 < r.len() {
                out.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            } else {
                out.push_str(cell);
            }
        }
        out.push('\n');
    }
    out
}

fn show(p: &Value) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<20} {v}\n"));
    line("name", text(&p["name"]));
    line("kind", text(&p["kind"]));
    line(
        "socket",
        format!("{} ({})", text(&p["socket"]), text(&p["role"])),
    );
    line("state", state(p));
    line(
        "queue pairs",
        format!(
            "{} configured, {} enabled",
            p["queues"], p["queues_enabled"]
        ),
    );
    if !p["vf"].is_null() {
        line("vf", text(&p["vf"]));
    }
    if let Some(socks) = p["vf_sockets"].as_array() {
        for (i, s) in socks.iter().enumerate() {
            line(&format!("vf socket {i}"), text(s));
        }
    }
    if !p["vdpa_device"].is_null() {
        line("vdpa device", text(&p["vdpa_device"]));
        line("vdpa mode", text(&p["vdpa_mode"]));
    }
    line("dirty logging", on_off(&p["dirty_logging"]));
    let cpus: Vec<String> = p["cpus"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|c| c.as_u64().map_or("any".into(), |n| n.to_string()))
                .collect()
        })
        .unwrap_or_default();
    line("worker cpus", cpus.join(" "));
    line(
        "connects",
        format!("{} ({} ended)", p["connects"], p["disconnects"]),
    );
    let c = &p["connection"];
    if c.is_null() {
        line("connection", "none".into());
    } else {
        line("connected for", format!("{} s", c["uptime_secs"]));
        line("features", names(&c["features"], &c["feature_names"]));
        line(
            "protocol features",
            names(&c["protocol_features"], &c["protocol_feature_names"]),
        );
    }
    out
}

fn on_off(v: &Value) -> String {
    if v.as_bool() == Some(true) {
        "on"
    } else {
        "off"
    }
    .into()
}

fn names(bits: &Value, names: &Value) -> String {
    let list: Vec<String> = names
        .as_array()
        .map(|n| n.iter().map(text).collect())
        .unwrap_or_default();
    format!("{:#x} {}", bits.as_u64().unwrap_or(0), list.join(" "))
}

fn stats(p: &Value) -> String {
    let mut out = format!(
        "port {}: {} connects, {} disconnects\n",
        text(&p["name"]),
        p["connects"],
        p["disconnects"]
    );
    for q in p["queues_stats"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  queue {} {}: packets={} bytes={} drops={} errors={} retries={}",
            q["queue"],
            text(&q["direction"]),
            q["packets"],
            q["bytes"],
            q["drops"],
            q["errors"],
            q["retries"]
        ));
        let by: Vec<String> = q["drops_by_reason"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_u64() != Some(0))
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        if !by.is_empty() {
            out.push_str(&format!(" ({})", by.join(" ")));
        }
        out.push('\n');
    }
    out
}

fn reload(summary: &Value) -> String {
    ["started", "restarted", "stopped", "unchanged"]
        .iter()
        .map(|k| {
            let names: Vec<String> = summary[k]
                .as_array()
                .map(|a| a.iter().map(text).collect())
                .unwrap_or_default();
            format!(
                "{k}: {}\n",
                if names.is_empty() {
                    "-".into()
                } else {
                    names.join(" ")
                }
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn port() -> Value {
        json!({
            "name": "vm1", "kind": "vf", "socket": "/run/vm1.sock", "role": "server",
            "state": "broken", "reason": "accept failed", "queues": 2, "queues_enabled": 1,
            "vf": "eth1", "vf_sockets": ["AF_PACKET"], "dirty_logging": true, "cpus": [3, null],
            "connects": 4, "disconnects": 3,
            "connection": {"uptime_secs": 7, "features": 32768, "feature_names": ["MRG_RXBUF"],
                           "protocol_features": 2, "protocol_feature_names": ["MQ"]},
            "queues_stats": [{"queue": 0, "direction": "rx", "packets": 5, "bytes": 300,
                "drops": 2, "drops_by_reason": {"no_buffers": 2, "vf_full": 0}, "errors": 0, "retries": 0}]
        })
    }

    #[test]
    fn list_is_a_table_with_the_reason_of_a_broken_port() {
        let out = list(&[port()]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("NAME  KIND  ROLE    QUEUES  SOCKET"),
            "{out}"
        );
        assert!(
            lines[1]
                .starts_with("vm1   vf    server  1/2     /run/vm1.sock  broken (accept failed)"),
            "{out}"
        );
    }

    #[test]
    fn show_and_stats_name_what_an_operator_asks_about() {
        let out = show(&port());
        for want in [
            "dirty logging        on",
            "worker cpus          3 any",
            "features             0x8000 MRG_RXBUF",
            "vf socket 0          AF_PACKET",
            "connects             4 (3 ended)",
        ] {
            assert!(out.contains(want), "missing '{want}' in:\n{out}");
        }
        let out = stats(&port());
        assert!(
            out.contains(
                "queue 0 rx: packets=5 bytes=300 drops=2 errors=0 retries=0 (no_buffers=2)"
            ),
            "{out}"
        );
    }
}
