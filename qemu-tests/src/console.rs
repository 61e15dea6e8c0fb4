//! Driving the guest's shell over its serial console.
//!
//! QEMU's `-serial stdio` is connected to pipes: a reader thread appends everything the guest
//! prints to a buffer (and to a log file, for post-mortems), and commands are written to QEMU's
//! stdin. Each command is framed by two markers printed by the guest shell itself, so its output
//! and exit status are found reliably even with a kernel message or a prompt around them. The
//! marker text is split in the command (`@@S""TART`) so that, should the tty ever echo input, the
//! echo cannot be mistaken for the marker.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Output and exit status of a command run in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestOutput {
    /// What the command printed (stdout and stderr), `\r` removed.
    pub output: String,
    /// `$?` of the command.
    pub status: i32,
}

#[derive(Default)]
struct Buffer {
    data: Vec<u8>,
    closed: bool,
}

type Shared = Arc<(Mutex<Buffer>, Condvar)>;

/// A guest console: a byte stream from the guest and a writer to it.
pub struct Console {
    shared: Shared,
    writer: Box<dyn Write + Send>,
    /// Searches start here; everything before was consumed by earlier waits.
    cursor: usize,
    next_id: u64,
    log: Option<PathBuf>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("cursor", &self.cursor)
            .field("log", &self.log)
            .finish()
    }
}

/// Bytes of console output shown in timeout errors.
const TAIL_BYTES: usize = 3000;

impl Console {
    /// Starts `cmd` with its stdin and stdout as a console (stderr as the caller set it);
    /// `what` names it in errors.
    pub fn spawn(
        what: &str,
        cmd: &mut std::process::Command,
        log: Option<&Path>,
    ) -> Result<(std::process::Child, Console)> {
        use std::process::Stdio;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting `{}`", crate::util::describe(cmd)), e))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Check(format!("{what} started without stdio pipes")));
        };
        match Console::new(stdout, stdin, log) {
            Ok(console) => Ok((child, console)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Starts reading `reader` in a thread; everything read is also appended to `log`.
    pub fn new(
        reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
        log: Option<&Path>,
    ) -> Result<Self> {
        let shared: Shared = Arc::new((Mutex::new(Buffer::default()), Condvar::new()));
        let mut log_file = match log {
            Some(p) => Some(
                std::fs::File::create(p)
                    .map_err(|e| Error::io(format!("creating console log {}", p.display()), e))?,
            ),
            None => None,
        };
        let sh = Arc::clone(&shared);
        let mut reader = reader;
        std::thread::Builder::new()
            .name("guest-console".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Some(f) = log_file.as_mut() {
                        let _ = f.write_all(&buf[..n]);
                    }
                    let (lock, cv) = &*sh;
                    if let Ok(mut b) = lock.lock() {
                        b.data.extend_from_slice(&buf[..n]);
                    }
                    cv.notify_all();
                }
                let (lock, cv) = &*sh;
                if let Ok(mut b) = lock.lock() {
                    b.closed = true;
                }
                cv.notify_all();
            })
            .map_err(|e| Error::io("spawning the console reader thread", e))?;
        Ok(Console {
            shared,
            writer: Box::new(writer),
            cursor: 0,
            next_id: 1,
            log: log.map(Path::to_path_buf),
        })
    }

    /// The console log file, if any.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Writes raw text to the guest.
    pub fn send(&mut self, text: &str) -> Result<()> {
        self.writer
            .write_all(text.as_bytes())
            .and_then(|_| self.writer.flush())
            .map_err(|e| Error::io("writing to the guest console", e))
    }

    /// The last few KiB the guest printed (all of it, consumed or not).
    pub fn tail(&self) -> String {
        let (lock, _) = &*self.shared;
        match lock.lock() {
            Ok(b) => {
                let start = b.data.len().saturating_sub(TAIL_BYTES);
                clean(&String::from_utf8_lossy(&b.data[start..]))
            }
            Err(_) => String::from("<console buffer poisoned>"),
        }
    }

    /// Waits until `needle` appears after the cursor; moves the cursor past it and returns the
    /// text from the old cursor up to the needle.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let (start, end) = self.wait_match(needle, timeout, |hay| {
            find(hay, needle.as_bytes()).map(|p| (p, p + needle.len()))
        })?;
        let text = self.slice(self.cursor, start);
        self.cursor = end;
        Ok(text)
    }

    /// Runs a shell command in the guest and returns its output and status. The command's stdin
    /// is `/dev/null`, so a command that reads stdin cannot swallow the console.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<GuestOutput> {
        let id = self.next_id;
        self.next_id += 1;
        let start_marker = format!("@@START-{id}@@");
        let end_prefix = format!("@@END-{id}@@ ");
        self.send(&format!(
            "echo @@S\"\"TART-{id}@@\n{{ {cmd}\n}} </dev/null\necho @@E\"\"ND-{id}@@ $?\n"
        ))?;
        let what = format!("guest command `{cmd}`");
        let (_, after_start) = self.wait_match(&what, timeout, |hay| {
            find(hay, start_marker.as_bytes()).map(|p| (p, p + start_marker.len()))
        })?;
        self.cursor = after_start;
        let (end_at, line_end) = self.wait_match(&what, timeout, |hay| {
            let p = find(hay, end_prefix.as_bytes())?;
            let rest = &hay[p + end_prefix.len()..];
            let nl = rest.iter().position(|&b| b == b'\n')?;
            Some((p, p + end_prefix.len() + nl + 1))
        })?;
        let status_text = self.slice(end_at + end_prefix.len(), line_end);
        let status = status_text
            .trim()
            .parse::<i32>()
            .map_err(|_| Error::Parse {
                what: format!("exit status of `{cmd}`"),
                detail: status_text.clone(),
            })?;
        let output = self.slice(self.cursor, end_at);
        self.cursor = line_end;
        Ok(GuestOutput {
            output: output.trim_start_matches('\n').to_string(),
            status,
        })
    }

    /// Like [`Console::run`], but a non-zero status is an error carrying the output.
    pub fn run_ok(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        let out = self.run(cmd, timeout)?;
        if out.status == 0 {
            Ok(out.output)
        } else {
            Err(Error::GuestCommand {
                cmd: cmd.to_string(),
                status: out.status,
                output: out.output,
            })
        }
    }

    /// Waits for `matcher` (given the unconsumed bytes, returns absolute offsets relative to
    /// them) to match; returns absolute buffer offsets.
    fn wait_match(
        &mut self,
        what: &str,
        timeout: Duration,
        mut matcher: impl FnMut(&[u8]) -> Option<(usize, usize)>,
    ) -> Result<(usize, usize)> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.shared;
        let mut guard = lock
            .lock()
            .map_err(|_| Error::Check("console buffer poisoned".into()))?;
        loop {
            let from = self.cursor.min(guard.data.len());
            if let Some((s, e)) = matcher(&guard.data[from..]) {
                return Ok((from + s, from + e));
            }
            if guard.closed {
                drop(guard);
                return Err(Error::ConsoleClosed {
                    what: what.to_string(),
                    tail: self.tail(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                drop(guard);
                return Err(Error::ConsoleTimeout {
                    what: what.to_string(),
                    secs: timeout.as_secs(),
                    tail: self.tail(),
                });
            }
            guard = match cv.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(_) => return Err(Error::Check("console buffer poisoned".into())),
            };
        }
    }

    fn slice(&self, from: usize, to: usize) -> String {
        let (lock, _) = &*self.shared;
        match lock.lock() {
            Ok(b) => {
                let to = to.min(b.data.len());
                let from = from.min(to);
                clean(&String::from_utf8_lossy(&b.data[from..to]))
            }
            Err(_) => String::new(),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Drops the `\r` the tty adds before each `\n`.
fn clean(s: &str) -> String {
    s.replace('\r', "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// A real `sh` on pipes stands in for the guest shell: same framing, same `$?`.
    fn shell() -> (std::process::Child, Console) {
        let mut child = Command::new("sh")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        (child, Console::new(stdout, stdin, None).unwrap())
    }

    #[test]
    fn runs_commands_and_returns_status() {
        let (mut child, mut c) = shell();
        let t = Duration::from_secs(10);
        let out = c.run("echo hello; echo world", t).unwrap();
        assert_eq!(
            out,
            GuestOutput {
                output: "hello\nworld\n".into(),
                status: 0
            }
        );
        let out = c.run("echo partial; false", t).unwrap();
        assert_eq!(out.status, 1);
        assert_eq!(out.output, "partial\n");
        assert_eq!(
            c.run("exit_code() { return 7; }; exit_code", t)
                .unwrap()
                .status,
            7
        );
        match c.run_ok("echo why; exit_code", t) {
            Err(Error::GuestCommand {
                status: 7, output, ..
            }) => assert_eq!(output, "why\n"),
            other => panic!("unexpected {other:?}"),
        }
        // stdin is /dev/null: `cat` must not eat the next command.
        assert_eq!(c.run_ok("cat; echo after", t).unwrap(), "after\n");
        // A background job does not break the framing.
        assert_eq!(c.run_ok("sleep 0.1 &", t).unwrap(), "");
        drop(c);
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn wait_for_consumes_text() {
        let (mut child, mut c) = shell();
        c.send("echo one; echo READY; echo two; echo READY\n")
            .unwrap();
        let t = Duration::from_secs(10);
        assert_eq!(c.wait_for("READY", t).unwrap(), "one\n");
        assert_eq!(c.wait_for("READY", t).unwrap(), "\ntwo\n");
        drop(c);
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn timeouts_show_the_last_output() {
        let (mut child, mut c) = shell();
        c.send("echo something-printed\n").unwrap();
        match c.wait_for("never", Duration::from_millis(500)) {
            Err(e @ Error::ConsoleTimeout { .. }) => {
                assert!(e.to_string().contains("something-printed"), "{e}")
            }
            other => panic!("unexpected {other:?}"),
        }
        drop(c);
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn closed_console_is_reported() {
        let (mut child, mut c) = shell();
        c.send("echo bye; exit 0\n").unwrap();
        let _ = child.wait();
        match c.run("echo x", Duration::from_secs(10)) {
            Err(Error::ConsoleClosed { tail, .. }) => assert!(tail.contains("bye")),
            // Writing to the dead shell may fail first.
            Err(Error::Io { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
