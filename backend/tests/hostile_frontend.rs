//! A hostile-frontend fuzzer against the real `vhost-relay` binary.
//!
//! One process serves two loopback ports from a config file. Port A gets campaigns of
//! random and mutated vhost-user messages (every request type, lying sizes, fds of every
//! kind, bad memory geometry, floods, connection storms: see `hostile/gen.rs`); after each
//! batch the process must still run, port B must still serve a well-behaved frontend (a
//! frame sent on TX comes back on RX), and its fd count, RSS and mapping count must return
//! under a bound once the hostile connections are gone.
//!
//! Seeded and bounded: `VHOST_RELAY_FUZZ_SEED` (default fixed), `VHOST_RELAY_FUZZ_SECS`
//! (default 100 when neither bound is given) and/or `VHOST_RELAY_FUZZ_ITERS` (inputs).
//! Every input is derived from (seed, campaign, round, index) alone; a failure prints them
//! and `VHOST_RELAY_FUZZ_CASE=campaign:round[:index]` replays just that batch or input.
//! `scripts/fuzz.sh` runs longer campaigns.

mod hostile;
mod support;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hostile::gen::CAMPAIGNS;
use hostile::rng::Rng;
use hostile::wire::{send_session, send_storm, Guest, Input, Sent};
use support::*;

const DEFAULT_SEED: u64 = 0x5eed_0009;
const DEFAULT_SECS: u64 = 100;
/// A session the backend has not finished this long after the frontend closed is a hang
/// (a flood handled in quadratic time, a blocked handler).
const SESSION_TIMEOUT: Duration = Duration::from_secs(20);
/// The backend's fd limit: a usual default (systemd's soft limit), low enough that an
/// unbounded per-connection resource shows up within a CI run.
const NOFILE: u64 = 1024;

struct Settings {
    seed: u64,
    secs: Option<u64>,
    iters: Option<u64>,
    /// Report a failure, start a new process and go on (`VHOST_RELAY_FUZZ_KEEP_GOING=1`).
    keep_going: bool,
    /// Print each input's case before sending it (`VHOST_RELAY_FUZZ_VERBOSE=1`).
    verbose: bool,
    /// Run only these campaigns (`VHOST_RELAY_FUZZ_CAMPAIGNS=name,name`; default all).
    campaigns: Vec<usize>,
    /// Replay only (campaign, round, index or the whole batch).
    case: Option<(usize, u64, Option<u64>)>,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let n = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(n.unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

fn parse_case(text: &str) -> (usize, u64, Option<u64>) {
    let parts: Vec<&str> = text.split(':').collect();
    let campaign = CAMPAIGNS
        .iter()
        .position(|c| c.name == parts[0])
        .unwrap_or_else(|| panic!("VHOST_RELAY_FUZZ_CASE: no campaign {}", parts[0]));
    let num = |i: usize| {
        parts
            .get(i)
            .map(|p| p.parse().expect("VHOST_RELAY_FUZZ_CASE number"))
    };
    (campaign, num(1).unwrap_or(0), num(2))
}

fn settings() -> Settings {
    let (secs, iters) = (
        env_u64("VHOST_RELAY_FUZZ_SECS"),
        env_u64("VHOST_RELAY_FUZZ_ITERS"),
    );
    Settings {
        seed: env_u64("VHOST_RELAY_FUZZ_SEED").unwrap_or(DEFAULT_SEED),
        secs: secs.or(iters.is_none().then_some(DEFAULT_SECS)),
        iters,
        keep_going: std::env::var("VHOST_RELAY_FUZZ_KEEP_GOING").is_ok_and(|v| v == "1"),
        verbose: std::env::var("VHOST_RELAY_FUZZ_VERBOSE").is_ok_and(|v| v == "1"),
        campaigns: std::env::var("VHOST_RELAY_FUZZ_CAMPAIGNS")
            .map(|v| v.split(',').map(|n| parse_case(n).0).collect())
            .unwrap_or_default(),
        case: std::env::var("VHOST_RELAY_FUZZ_CASE")
            .ok()
            .map(|c| parse_case(&c)),
    }
}

/// Counts the ends of port A's sessions in the backend's log, reading only what is new.
struct LogWatch {
    file: File,
    partial: String,
    ended: usize,
}

impl LogWatch {
    fn poll(&mut self) -> usize {
        let mut new = String::new();
        let _ = self.file.read_to_string(&mut new);
        self.partial.push_str(&new);
        let done = self.partial.rfind('\n').map_or(0, |i| i + 1);
        let ends = [
            "port a: frontend disconnected",
            "port a: frontend connection ended",
            "port a: cannot start serving",
        ];
        self.ended += self.partial[..done]
            .lines()
            .filter(|l| ends.iter().any(|e| l.contains(e)))
            .count();
        self.partial.drain(..done);
        self.ended
    }
}

/// Runs `f` with this process's soft fd limit at `limit`, so children started in `f`
/// inherit it.
fn with_nofile<T>(limit: u64, f: impl FnOnce() -> T) -> T {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with valid pointers to local structures.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) };
    let new = libc::rlimit {
        rlim_cur: limit.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) };
    let r = f();
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) };
    r
}

/// The relay under test: ports "a" (hostile) and "b" (well-behaved), both loopback.
struct Relay {
    be: Backend,
    a: PathBuf,
    b: PathBuf,
    log: LogWatch,
}

fn start_relay(dir: &Path) -> Relay {
    std::fs::create_dir_all(dir).expect("run dir");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let config = dir.join("relay.toml");
    let text = format!(
        "[[port]]\nname = \"a\"\nsocket = \"{}\"\nloopback = true\nqueues = 2\n\n\
         [[port]]\nname = \"b\"\nsocket = \"{}\"\nloopback = true\n",
        a.display(),
        b.display()
    );
    std::fs::write(&config, text).expect("write config");
    let log = dir.join("vr.log");
    let child = with_nofile(NOFILE, || {
        spawn_backend(
            &["--config", config.to_str().expect("utf-8 path")],
            &log,
            None,
        )
    });
    let be = Backend {
        child,
        socket: a.clone(),
        log: log.clone(),
    };
    assert!(
        wait_for(Duration::from_secs(10), || a.exists() && b.exists()),
        "both ports listen"
    );
    let log = LogWatch {
        file: File::open(&log).expect("log"),
        partial: String::new(),
        ended: 0,
    };
    Relay { be, a, b, log }
}

/// What /proc says about the backend: open fds, resident KiB, mappings.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    fds: u64,
    rss_kib: u64,
    maps: u64,
}

fn usage(pid: u32) -> Usage {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_or(0, |m| m.lines().count() as u64);
    Usage { fds, rss_kib, maps }
}

impl Usage {
    /// The bound a backend with no hostile connection must return under, from a baseline:
    /// a few fds (a session being torn down), and room for what is legitimately kept after
    /// sessions end: malloc arenas of finished threads and glibc's cache of thread stacks.
    fn bound(self) -> Usage {
        Usage {
            fds: self.fds + 8,
            rss_kib: self.rss_kib + 64 * 1024,
            maps: self.maps + 128,
        }
    }

    fn within(self, b: Usage) -> bool {
        self.fds <= b.fds && self.rss_kib <= b.rss_kib && self.maps <= b.maps
    }
}

/// A well-behaved frontend on a port: negotiation, rings over memfd memory, one frame
/// sent on TX must come back on RX intact. Panics (via the support code) on any failure.
fn port_serves(socket: &Path) {
    let mut f = TestFrontend::connect(socket, 1, VIRTIO_NET_F_MRG_RXBUF);
    for i in 0..4 {
        f.post(0, &[(TestFrontend::buf_addr(0, i), 2048, true)]);
    }
    f.kick(0);
    let frame = test_support::driver::test_frame([2, 0, 0, 0, 0, 2], 7, 100);
    f.post_tx(1, TestFrontend::buf_addr(1, 0), &frame);
    f.kick(1);
    let used = f.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(used.len(), 1, "the port loops a frame back");
    let (head, len) = used[0];
    let got = f.read(TestFrontend::buf_addr(0, head as u16), len as usize);
    assert_eq!(&got[12..], &frame[..], "the port returns the frame intact");
}

/// [`port_serves`] as a result: `Err` names the port and what failed.
fn serves(socket: &Path, port: &str) -> Result<(), String> {
    std::panic::catch_unwind(|| port_serves(socket)).map_err(|e| {
        let why = e
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| format!("{:?}", e.downcast_ref::<&str>()));
        format!("port {port} no longer serves a well-behaved frontend: {why}")
    })
}

struct Fuzz {
    s: Settings,
    dir: PathBuf,
    relay: Relay,
    restarts: u32,
    /// Connections made to port A so far (each ends with one log line).
    sessions: usize,
    inputs: u64,
    messages: u64,
    /// Failure reports so far (more than one only with `keep_going`).
    failures: Vec<String>,
    bound: Usage,
}

impl Fuzz {
    fn new(s: Settings, dir: &Path) -> Fuzz {
        let relay = start_relay(&dir.join("run0"));
        let mut f = Fuzz {
            s,
            dir: dir.to_path_buf(),
            relay,
            restarts: 0,
            sessions: 0,
            inputs: 0,
            messages: 0,
            failures: Vec::new(),
            bound: Usage::default(),
        };
        f.warm_up();
        f
    }

    /// Warms up both ports (first sessions allocate what later ones reuse), then measures
    /// the baseline the resource checks compare with.
    fn warm_up(&mut self) {
        self.send(
            &hostile::gen::well_behaved(&mut Rng::for_case(0, 0, 0, 0)),
            &mut Rng::for_case(0, 0, 0, 1),
        )
        .expect("the warm-up session is sent");
        self.wait_sessions().expect("the warm-up session ends");
        port_serves(&self.relay.b);
        std::thread::sleep(Duration::from_millis(500));
        let base = usage(self.relay.be.child.id());
        self.bound = base.bound();
        println!(
            "hostile_frontend: baseline {base:?}, bound {:?}",
            self.bound
        );
    }

    /// After a failure, with `VHOST_RELAY_FUZZ_KEEP_GOING=1`: a fresh process, and on.
    fn restart(&mut self) {
        self.restarts += 1;
        self.relay = start_relay(&self.dir.join(format!("run{}", self.restarts)));
        self.sessions = 0;
        self.warm_up();
    }

    /// Sends one input to port A; counts the connections it made.
    fn send(&mut self, input: &Input, rng: &mut Rng) -> Result<(), String> {
        self.sessions += match input {
            Input::Session {
                msgs,
                garbage_rings,
                hold_open,
            } => {
                self.messages += msgs.len() as u64;
                let guest = Guest::new(garbage_rings.then_some(rng));
                let deadline = Instant::now() + SESSION_TIMEOUT;
                let b = self.relay.b.clone();
                let mut b_failed = None;
                let mut check_b = || {
                    if *hold_open {
                        b_failed = serves(&b, "B (with port A's connection open)").err();
                    }
                };
                let sent = send_session(&self.relay.a, msgs, &guest, deadline, &mut check_b);
                if let Some(e) = b_failed {
                    return Err(e);
                }
                match sent {
                    Sent::Done => 1,
                    Sent::Refused => return Err(self.refused()),
                    Sent::Stalled => {
                        return Err(format!(
                            "port A did not take the input's messages within {SESSION_TIMEOUT:?}"
                        ));
                    }
                }
            }
            Input::Storm { prefixes } => match send_storm(&self.relay.a, prefixes) {
                n if n == prefixes.len() => n,
                n => {
                    self.sessions += n;
                    return Err(format!(
                        "{} (connection {} of the storm)",
                        self.refused(),
                        n + 1
                    ));
                }
            },
        };
        Ok(())
    }

    /// Why port A refused a connection: the process died (it may not be reaped yet), or
    /// the port's thread did.
    fn refused(&mut self) -> String {
        let died = wait_for(Duration::from_millis(500), || {
            !matches!(self.relay.be.child.try_wait(), Ok(None))
        });
        match self.relay.be.child.try_wait() {
            Ok(Some(status)) if died => format!("vhost-relay died: {status}"),
            _ => "port A refuses connections (the process lives)".into(),
        }
    }

    /// Waits until port A has ended every session so far; the process must live meanwhile.
    fn wait_sessions(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.relay.be.child.try_wait() {
                return Err(format!("vhost-relay died: {status}"));
            }
            if self.relay.log.poll() >= self.sessions {
                return Ok(());
            }
            if start.elapsed() > SESSION_TIMEOUT {
                return Err(format!(
                    "port A has not finished the input's session after {SESSION_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn run_input(&mut self, campaign: usize, round: u64, index: u64) -> Result<(), String> {
        let mut rng = Rng::for_case(self.s.seed, campaign, round, index);
        let input = (CAMPAIGNS[campaign].generate)(&mut rng);
        self.inputs += 1;
        if self.s.verbose {
            println!(
                "input {}:{round}:{index}: {}",
                CAMPAIGNS[campaign].name,
                input.describe()
            );
        }
        let r = self
            .send(&input, &mut rng)
            .and_then(|()| self.wait_sessions());
        if self.s.verbose {
            println!("  after it: {:?}", usage(self.relay.be.child.id()));
        }
        r.map_err(|e| format!("{e}\n  input: {}", input.describe()))
    }

    /// After a batch: alive, port B serves, resources back under the bound.
    fn health(&mut self) -> Result<(), String> {
        if let Ok(Some(status)) = self.relay.be.child.try_wait() {
            return Err(format!("vhost-relay died: {status}"));
        }
        // Port A too: a hostile connection may cost only itself, not the port.
        serves(&self.relay.a, "A")?;
        self.sessions += 1;
        serves(&self.relay.b, "B")?;
        let pid = self.relay.be.child.id();
        let bound = self.bound;
        if !wait_for(Duration::from_secs(10), || usage(pid).within(bound)) {
            return Err(format!(
                "resources stay above the bound: {:?} > {bound:?}",
                usage(pid)
            ));
        }
        Ok(())
    }

    /// One batch of a campaign (or one input of it), then the health checks.
    fn batch(
        &mut self,
        campaign: usize,
        round: u64,
        only: Option<u64>,
        deadline: &dyn Fn(u64) -> bool,
    ) -> Result<(), String> {
        let c = &CAMPAIGNS[campaign];
        let indexes = only.map_or(0..c.batch, |i| i..i + 1);
        for index in indexes {
            if deadline(self.inputs) {
                break;
            }
            self.run_input(campaign, round, index)
                .map_err(|e| self.report(campaign, round, Some(index), &e))?;
        }
        self.health()
            .map_err(|e| self.report(campaign, round, only, &e))
    }

    fn report(&self, campaign: usize, round: u64, index: Option<u64>, what: &str) -> String {
        let case = format!(
            "{}:{round}{}",
            CAMPAIGNS[campaign].name,
            index.map_or(String::new(), |i| format!(":{i}"))
        );
        let log = self.relay.be.log_text();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!(
            "hostile_frontend FAILED (seed {seed:#x}, campaign {case}): {what}\n\
             reproduce: VHOST_RELAY_FUZZ_SEED={seed:#x} VHOST_RELAY_FUZZ_CASE={case} \
             cargo test -p vhost-relay --test hostile_frontend -- --nocapture\n\
             backend log (last lines):\n{}",
            tail.join("\n"),
            seed = self.s.seed,
        )
    }

    fn run(&mut self) -> Result<(), String> {
        let start = Instant::now();
        let (secs, iters) = (self.s.secs, self.s.iters);
        let deadline = move |inputs: u64| {
            secs.is_some_and(|s| start.elapsed() >= Duration::from_secs(s))
                || iters.is_some_and(|n| inputs >= n)
        };
        if let Some((c, round, index)) = self.s.case {
            return self.batch(c, round, index, &|_| false);
        }
        for round in 0.. {
            for c in 0..CAMPAIGNS.len() {
                if deadline(self.inputs) {
                    return Ok(());
                }
                if !self.s.campaigns.is_empty() && !self.s.campaigns.contains(&c) {
                    continue;
                }
                if let Err(e) = self.batch(c, round, None, &deadline) {
                    if !self.s.keep_going {
                        return Err(e);
                    }
                    println!(
                        "{e}\n(at {:.1} s; going on with a new process)",
                        start.elapsed().as_secs_f64()
                    );
                    self.failures.push(e);
                    self.restart();
                }
            }
        }
        Ok(())
    }
}

#[test]
fn hostile_frontends_cost_only_their_own_connection() {
    let s = settings();
    println!(
        "hostile_frontend: seed {:#x} (VHOST_RELAY_FUZZ_SEED), secs {:?}, iters {:?}",
        s.seed, s.secs, s.iters
    );
    let dir = temp_dir("hostile");
    let mut fuzz = Fuzz::new(s, &dir);
    let start = Instant::now();
    let result = fuzz.run();
    let t = start.elapsed().as_secs_f64();
    println!(
        "hostile_frontend: {} inputs ({} messages) in {t:.1} s: {:.1} inputs/s",
        fuzz.inputs,
        fuzz.messages,
        fuzz.inputs as f64 / t,
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(
        fuzz.failures.is_empty(),
        "{} failures:\n{}",
        fuzz.failures.len(),
        fuzz.failures.join("\n\n")
    );
}
