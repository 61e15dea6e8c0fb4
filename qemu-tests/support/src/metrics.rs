//! vhost-relay's Prometheus endpoint as an operator's tools see it: [`curl`] fetches (a real
//! HTTP client), [`promtool_check`] validates with Prometheus' own checker (`promtool check
//! metrics`, Debian package `prometheus`), [`sample`] reads one series' value.

use std::io::{self, Write};
use std::process::{Command, Stdio};

/// The URL vhost-relay logged it serves metrics at (`metrics: serving http://ADDR/metrics`),
/// from its log text: with `--metrics-listen 127.0.0.1:0` the port is known only from there.
pub fn served_url(log: &str) -> Option<String> {
    log.lines().find_map(|l| {
        let url = l.split("metrics: serving ").nth(1)?.trim();
        url.starts_with("http://").then(|| url.to_string())
    })
}

/// What `curl` got back.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `curl -sS [ARGS] URL` (10 s at most); a transport failure is an error, any HTTP status
/// is a [`Reply`].
pub fn curl(url: &str, args: &[&str]) -> io::Result<Reply> {
    // The status and content type follow the body, one per line.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}\n%{content_type}",
        ])
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running curl: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(io::Error::other(format!(
            "curl {url}: {}: {why}",
            out.status
        )));
    }
    let mut parts = text.rsplitn(3, '\n');
    let content_type = parts.next().unwrap_or_default().to_string();
    let status = parts.next().and_then(|s| s.parse().ok());
    let body = parts.next().unwrap_or_default().to_string();
    let status = status.ok_or_else(|| io::Error::other(format!("curl {url}: no status")))?;
    Ok(Reply {
        status,
        content_type,
        body,
    })
}

/// Runs `promtool check metrics` on `exposition`: `Err` with promtool's words if it finds
/// anything wrong (format errors and lint problems alike), or if promtool is missing.
pub fn promtool_check(exposition: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => "promtool is not installed: it is in the Debian package \
                                        prometheus (scripts/install-deps.sh installs it)"
                .to_string(),
            _ => format!("running promtool: {e}"),
        })?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let written = stdin.write_all(exposition.as_bytes());
    drop(stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for promtool: {e}"))?;
    written.map_err(|e| format!("feeding promtool: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "promtool check metrics: {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// The value of `series` (a name with its labels exactly as rendered, e.g.
/// `vhost_relay_queue_packets_total{port="lb",queue="1",direction="tx"}`).
pub fn sample(exposition: &str, series: &str) -> Option<u64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The sum of every series starting with `prefix` (e.g. a name and its first labels, for
/// the drops of one queue over all reasons).
pub fn sum(exposition: &str, prefix: &str) -> u64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_url_is_read_from_the_log() {
        let log = "[x INFO vhost_relay::metrics] metrics: serving http://127.0.0.1:41/metrics\n";
        assert_eq!(
            served_url(log).as_deref(),
            Some("http://127.0.0.1:41/metrics")
        );
        assert_eq!(served_url("port a: listening\n"), None);
    }

    #[test]
    fn a_series_is_found_only_whole() {
        let text = "# TYPE a_total counter\na_total{x=\"1\"} 5\na_total{x=\"12\"} 7\n";
        assert_eq!(sample(text, "a_total{x=\"1\"}"), Some(5));
        assert_eq!(sample(text, "a_total{x=\"12\"}"), Some(7));
        assert_eq!(sample(text, "a_total{x=\"2\"}"), None);
        assert_eq!(sample(text, "a_total"), None);
        assert_eq!(sum(text, "a_total{"), 12);
        assert_eq!(sum(text, "a_total{x=\"1\""), 5);
    }
}
