//! The migration scenarios, what each one checks, and the report table.
//!
//! A scenario either returns an [`Outcome`] (passed or not, with the figures and what was
//! wrong) or an error (the lab is then torn down and the next scenario boots a fresh one).
//! Scenarios that need the same kind of guest share one boot: the guest simply keeps moving.

use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use crate::util::ScratchDir;

/// Echoes lost across one migration (10 ms apart), beyond those that fell into the guest's
/// measured downtime, that still count as "a few". After the guest resumes on the destination
/// it must announce itself before the wire sends the pings there, and a TCG guest on two busy
/// cores takes its time: 2-4 echoes lost on a quiet machine, 13 seen with a load average of 8
/// (seven builds beside the test). A backend that broke the switch-over loses everything until
/// the peer's ARP entry ages out (seconds: hundreds of echoes), which this still catches. The
/// loss itself is a measurement: docs/migration.md reports it.
pub const PING_LOSS_LIMIT: u64 = 20;
/// The same for the testpmd reference: on this two-core machine its two busy-polling
/// processes and the TCG guest fight for the CPUs, which stretches the switch-over (4-25
/// echoes lost per migration on a quiet machine, 67 seen in a CI run with a benchmark
/// running beside it). It is the reference for correctness, not speed, so its limit only
/// says "the guest stayed reachable": 1.5 s of pings.
pub const TESTPMD_PING_LOSS_LIMIT: u64 = 150;

/// Echoes that may be lost across `migrations`: each migration's limit plus one echo per 10 ms
/// of the downtime QEMU measured (no backend can answer for a guest that is not running).
fn loss_limit(kind: BackendKind, migrations: &[Migration]) -> u64 {
    let per_migration = match kind {
        BackendKind::Testpmd => TESTPMD_PING_LOSS_LIMIT,
        _ => PING_LOSS_LIMIT,
    };
    migrations
        .iter()
        .map(|m| per_migration + m.info.downtime_ms.unwrap_or(0) / 10)
        .sum()
}
/// Size of the checksummed stream into the guest.
pub const STREAM_MIB: u64 = 100;
/// How fast the guest's verifier reads the stream (the link does about 35 MiB/s here).
pub const STREAM_READ_MIB_S: u32 = 20;
/// Migrations of the round-trip scenario (there and back, five times).
pub const ROUND_TRIPS: u32 = 5;

/// What a scenario exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Peer pings the guest every 10 ms across a migration; afterwards the traffic goes
    /// through the destination's backend and the source's is idle.
    Ping,
    /// A >= 100 MiB stream of numbered, checksummed chunks into the guest across a migration,
    /// verified in the guest.
    Stream,
    /// Two queue pairs, eight verified streams spread over both, migrated; both pairs' counters
    /// move on both hosts.
    Multiqueue,
    /// There and back five times in a row, pinged all along.
    RoundTrips,
    /// A migration slowed down by `max-bandwidth`, cancelled half way, then retried.
    Cancel,
    /// The stream scenario against the test-only build that does not log RX data: it must
    /// report corruption (proves the stream scenario can fail).
    NegativeControl,
    /// The stream scenario with packed rings (`packed=on`): the used descriptors written
    /// back and the positions carried in VRING_BASE, across the switch-over.
    PackedStream,
    /// The negative control with packed rings: proves the packed stream scenario can fail.
    PackedNegative,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::Ping,
        Scenario::Stream,
        Scenario::Multiqueue,
        Scenario::RoundTrips,
        Scenario::Cancel,
        Scenario::NegativeControl,
        Scenario::PackedStream,
        Scenario::PackedNegative,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ping => "ping",
            Scenario::Stream => "stream",
            Scenario::Multiqueue => "multiqueue",
            Scenario::RoundTrips => "roundtrips",
            Scenario::Cancel => "cancel",
            Scenario::NegativeControl => "negative",
            Scenario::PackedStream => "stream-packed",
            Scenario::PackedNegative => "negative-packed",
        }
    }

    /// Whether the guest it needs has packed rings.
    fn packed(self) -> bool {
        matches!(self, Scenario::PackedStream | Scenario::PackedNegative)
    }

    /// Whether it must find corruption (a negative control).
    pub fn expects_corruption(self) -> bool {
        matches!(self, Scenario::NegativeControl | Scenario::PackedNegative)
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    /// Queue pairs of the guest it needs.
    fn queues(self) -> u16 {
        if self == Scenario::Multiqueue {
            2
        } else {
            1
        }
    }

    /// The backend the scenario's lab runs for a requested backend; `None` if it does not
    /// apply (the negative control exists only for vhost-relay).
    fn lab_backend(self, requested: BackendKind) -> Option<BackendKind> {
        match (self, requested) {
            (s, BackendKind::VhostRelay) if s.expects_corruption() => {
                Some(BackendKind::VhostRelayNoRxLog)
            }
            (s, _) if s.expects_corruption() => None,
            (_, k) => Some(k),
        }
    }
}

/// The result of one scenario run.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub scenario: Scenario,
    pub backend: BackendKind,
    pub run: u32,
    pub passed: bool,
    /// Every completed migration's figures.
    pub migrations: Vec<Migration>,
    /// Ping echoes lost, if the scenario pinged.
    pub lost: Option<u64>,
    /// Corrupted chunks, if the scenario streamed.
    pub corrupted: Option<u64>,
    /// What was measured besides, and what went wrong.
    pub note: String,
}

impl Outcome {
    fn new(scenario: Scenario, backend: BackendKind) -> Self {
        Outcome {
            scenario,
            backend,
            run: 1,
            passed: false,
            migrations: Vec::new(),
            lost: None,
            corrupted: None,
            note: String::new(),
        }
    }

    fn fail(scenario: Scenario, backend: BackendKind, e: &Error) -> Self {
        let mut o = Outcome::new(scenario, backend);
        o.note = format!("ERROR: {e}");
        o
    }

    /// Sets `passed` from the problems found and puts them first in the note.
    fn judge(mut self, problems: Vec<String>, info: Vec<String>) -> Self {
        self.passed = problems.is_empty();
        let mut parts = problems;
        parts.extend(info);
        self.note = parts.join("; ");
        self
    }
}

/// Runs `scenarios` for `backend`, `runs` times, calling `report` after each. Scenarios with
/// the same guest shape share one boot; an error tears the lab down so the next scenario
/// starts clean.
pub fn run(
    image: &GuestImage,
    backend: BackendKind,
    scenarios: &[Scenario],
    runs: u32,
    mut report: impl FnMut(&Outcome),
) -> Vec<Outcome> {
    let mut out = Vec::new();
    for run in 1..=runs.max(1) {
        // (lab backend, queues, packed) in first-seen order, each with its scenarios.
        let mut groups: Vec<((BackendKind, u16, bool), Vec<Scenario>)> = Vec::new();
        for &s in scenarios {
            let Some(kind) = s.lab_backend(backend) else {
                continue;
            };
            let key = (kind, s.queues(), s.packed());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(s),
                None => groups.push((key, vec![s])),
            }
        }
        for ((kind, _, _), group) in groups {
            let mut lab: Option<(Lab, ScratchDir)> = None;
            for s in group {
                let mut o = match ensure_lab(&mut lab, image, kind, s) {
                    Ok(l) => match run_one(l, s) {
                        Ok(o) => o,
                        Err(e) => {
                            lab = None;
                            Outcome::fail(s, kind, &e)
                        }
                    },
                    Err(e) => Outcome::fail(s, kind, &e),
                };
                o.run = run;
                if !o.passed {
                    // A failed check may leave the guest anywhere: start over.
                    lab = None;
                }
                report(&o);
                out.push(o);
            }
        }
    }
    out
}

fn ensure_lab<'a>(
    lab: &'a mut Option<(Lab, ScratchDir)>,
    image: &GuestImage,
    kind: BackendKind,
    s: Scenario,
) -> Result<&'a mut Lab> {
    if lab.is_none() {
        let dir = ScratchDir::new("vrm")?;
        let (queues, packed) = (s.queues(), s.packed());
        let rings = if packed { " packed" } else { "" };
        let tag = format!("migrate {} q{queues}{rings}", kind.label());
        let l = Lab::new(image, dir.path(), kind, (queues, packed), &tag)?;
        *lab = Some((l, dir));
    }
    match lab {
        Some((l, _)) => {
            l.step(&format!("scenario {}", s.name()));
            Ok(l)
        }
        None => Err(Error::Check("no lab".into())),
    }
}

/// Runs one scenario on a ready lab.
pub fn run_one(lab: &mut Lab, s: Scenario) -> Result<Outcome> {
    match s {
        Scenario::Ping => ping(lab),
        Scenario::Stream
        | Scenario::NegativeControl
        | Scenario::PackedStream
        | Scenario::PackedNegative => stream(lab, s),
        Scenario::Multiqueue => multiqueue(lab),
        Scenario::RoundTrips => round_trips(lab),
        Scenario::Cancel => cancel(lab),
    }
}

fn ping(lab: &mut Lab) -> Result<Outcome> {
    let mut o = Outcome::new(Scenario::Ping, lab.kind);
    let (mut problems, mut info) = (Vec::new(), Vec::new());
    let pinger = PeerPing::start(&lab.ns, &lab.dir)?;
    std::thread::sleep(Duration::from_secs(1));
    o.migrations.push(lab.migrate()?);
    std::thread::sleep(Duration::from_secs(2));
    let r = pinger.stop()?;
    o.lost = Some(r.lost);
    info.push(format!("{} echoes sent", r.transmitted));
    let limit = loss_limit(lab.kind, &o.migrations);
    if r.lost > limit {
        problems.push(format!("{} echoes lost (limit {limit})", r.lost));
    }
    if r.received + limit.max(50) < r.transmitted {
        problems.push(format!(
            "only {} of {} echoes answered",
            r.received, r.transmitted
        ));
    }
    // The peer now reaches the guest through the destination's VF and backend only.
    let (dst, src) = (lab.guest.host, 1 - lab.guest.host);
    let d0 = lab.hosts[dst].counters()?;
    let s0 = lab.hosts[src].counters()?;
    crate::peer_ping(&lab.ns, GUEST_IP, 10)?;
    let d = lab.hosts[dst].counters()?.since(&d0);
    let s = lab.hosts[src].counters()?.since(&s0);
    info.push(format!("after: destination {d}, source {s}"));
    if d.total_to_guest() < 10 || d.total_from_guest() < 10 {
        problems.push(format!(
            "10 echoes did not go through the destination's backend: {d}"
        ));
    }
    if s.total_to_guest() + s.total_from_guest() > 0 {
        problems.push(format!("the source backend still moved packets: {s}"));
    }
    Ok(o.judge(problems, info))
}

fn stream(lab: &mut Lab, scenario: Scenario) -> Result<Outcome> {
    let expect_corruption = scenario.expects_corruption();
    let mut o = Outcome::new(scenario, lab.kind);
    let (mut problems, mut info) = (Vec::new(), Vec::new());
    const PORT: u16 = 7001;
    let min = STREAM_MIB * 1024 * 1024 / chunk::CHUNK_LEN as u64;
    // A lagging reader with a big receive buffer: megabytes the backend wrote sit unread in
    // guest memory at every moment, so pages it failed to log are still there to be found
    // at the switch-over (TCP cannot repair them: their headers were already checked).
    lab.guest_run(
        "echo '4096 8388608 8388608' > /proc/sys/net/ipv4/tcp_rmem",
        Duration::from_secs(20),
    )?;
    let sender = StreamSender::start(&lab.ns, PORT, min)?;
    start_verifier(lab, PORT, None, Some(STREAM_READ_MIB_S))?;
    // Migrate with the stream in full flow: a fifth in, the rest during and after.
    let t = Instant::now();
    sender.wait_sent(min / 5, Duration::from_secs(180))?;
    let (before, t_before) = (sender.sent(), t.elapsed());
    let m = lab.migrate()?;
    let during = sender.sent().saturating_sub(before);
    let mig_secs = m.wall.as_secs_f64();
    o.migrations.push(m);
    let sent = sender.finish()?;
    let total_secs = t.elapsed().as_secs_f64();
    let v = verifier_verdict(lab, PORT, Duration::from_secs(300))?;
    o.corrupted = Some(v.bad);
    let mib = |chunks: u64| chunks as f64 * chunk::CHUNK_LEN as f64 / (1024.0 * 1024.0);
    info.push(format!(
        "{:.0} MiB sent ({:.1} MiB/s before, {:.1} MiB/s during the {:.1} s migration, {:.0} s in all)",
        mib(sent),
        mib(before) / t_before.as_secs_f64().max(0.001),
        mib(during) / mig_secs.max(0.001),
        mig_secs,
        total_secs
    ));
    if during == 0 {
        problems.push("nothing was sent while the guest migrated".into());
    }
    if expect_corruption {
        if v.bad == 0 {
            problems.push(format!(
                "no corruption detected although RX data was not logged ({} chunks intact)",
                v.chunks
            ));
        } else {
            info.push(format!(
                "{} of {} chunks corrupted, as expected: {}",
                v.bad,
                v.chunks,
                v.detail.lines().next().unwrap_or("")
            ));
        }
    } else {
        if v.bad > 0 {
            problems.push(format!(
                "{} of {} chunks corrupted: {}",
                v.bad,
                v.chunks,
                v.detail.replace('\n', " | ")
            ));
        }
        if v.chunks != sent || v.partial != 0 {
            problems.push(format!(
                "the guest received {} chunks (+{} bytes), {sent} were sent",
                v.chunks, v.partial
            ));
        }
    }
    Ok(o.judge(problems, info))
}

fn multiqueue(lab: &mut Lab) -> Result<Outcome> {
    let mut o = Outcome::new(Scenario::Multiqueue, lab.kind);
    let (mut problems, mut info) = (Vec::new(), Vec::new());
    let queues = lab.guest_run("ls /sys/class/net/eth0/queues", Duration::from_secs(20))?;
    if !(queues.contains("rx-1") && queues.contains("tx-1")) {
        problems.push(format!(
            "the guest did not enable 2 queue pairs: {queues:?}"
        ));
    }
    const FLOWS: u16 = 8;
    const BASE: u16 = 7100;
    let min = 8 * 1024 * 1024 / chunk::CHUNK_LEN as u64;
    let mut senders = Vec::new();
    for i in 0..FLOWS {
        senders.push(StreamSender::start(&lab.ns, BASE + i, min)?);
    }
    for i in 0..FLOWS {
        // Alternate CPUs: the guest transmits (ACKs, window updates) on its CPU's queue.
        start_verifier(lab, BASE + i, Some(1 + u32::from(i % 2)), None)?;
    }
    for s in &senders {
        s.wait_sent(min / 4, Duration::from_secs(180))?;
    }
    let relay = lab.kind != BackendKind::Testpmd;
    let src = lab.guest.host;
    let src0 = if relay {
        Some(lab.hosts[src].counters()?)
    } else {
        None
    };
    o.migrations.push(lab.migrate()?);
    let dst = lab.guest.host;
    let dst0 = if relay {
        Some(lab.hosts[dst].counters()?)
    } else {
        None
    };
    let mut sent = Vec::new();
    for s in senders {
        match s.finish() {
            Ok(n) => sent.push(n),
            Err(e) => {
                // Say what the guest's side saw before giving up on the lab.
                let guest = lab
                    .guest_run(
                        "for f in /tmp/verify-*; do echo \"$f: $(cat $f)\"; done; dmesg | tail -5",
                        Duration::from_secs(30),
                    )
                    .unwrap_or_else(|e| format!("<{e}>"));
                return Err(Error::Check(format!("{e}; guest verifiers:\n{guest}")));
            }
        }
    }
    let mut bad = 0;
    for (i, n) in sent.iter().enumerate() {
        let port = BASE + i as u16;
        let v = verifier_verdict(lab, port, Duration::from_secs(300))?;
        bad += v.bad;
        if v.bad > 0 || v.chunks != *n || v.partial != 0 {
            problems.push(format!(
                "flow {port}: {} of {} chunks received, {} corrupted {}",
                v.chunks, n, v.bad, v.detail
            ));
        }
    }
    o.corrupted = Some(bad);
    // Source: what it moved up to and during the migration; destination: after it.
    let (s, d) = match (src0, dst0) {
        (Some(s0), Some(d0)) => (
            lab.hosts[src].counters()?.since(&s0),
            lab.hosts[dst].counters()?.since(&d0),
        ),
        _ => (
            lab.hosts[src].stop_with_counters()?,
            lab.hosts[dst].stop_with_counters()?,
        ),
    };
    info.push(format!("source {s}; destination {d}"));
    for (side, c) in [("source", &s), ("destination", &d)] {
        for pair in 0..2 {
            let to = c.to_guest.get(pair).copied().unwrap_or(0);
            let from = c.from_guest.get(pair).copied().unwrap_or(0);
            if to < 10 || from < 10 {
                problems.push(format!(
                    "{side} queue pair {pair} hardly moved: {to} to / {from} from the guest"
                ));
            }
        }
    }
    Ok(o.judge(problems, info))
}

fn round_trips(lab: &mut Lab) -> Result<Outcome> {
    let mut o = Outcome::new(Scenario::RoundTrips, lab.kind);
    let (mut problems, mut info) = (Vec::new(), Vec::new());
    let home = lab.guest.host;
    let pinger = PeerPing::start(&lab.ns, &lab.dir)?;
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..2 * ROUND_TRIPS {
        o.migrations.push(lab.migrate()?);
        // The guest's console and network work on the new host before the next move.
        crate::guest_ping_until_reply(&mut lab.guest.qemu, PEER_IP, Duration::from_secs(30))?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let r = pinger.stop()?;
    o.lost = Some(r.lost);
    info.push(format!(
        "{} migrations, {} echoes sent",
        o.migrations.len(),
        r.transmitted
    ));
    let limit = loss_limit(lab.kind, &o.migrations);
    if r.lost > limit {
        problems.push(format!("{} echoes lost (limit {limit})", r.lost));
    }
    if lab.guest.host != home {
        problems.push("the guest did not end where it started".into());
    }
    Ok(o.judge(problems, info))
}

fn cancel(lab: &mut Lab) -> Result<Outcome> {
    let mut o = Outcome::new(Scenario::Cancel, lab.kind);
    let (mut problems, mut info) = (Vec::new(), Vec::new());
    let pinger = PeerPing::start(&lab.ns, &lab.dir)?;
    let params = lab
        .guest
        .qmp
        .execute("query-migrate-parameters", json!({}))?;
    let bw = params
        .get("max-bandwidth")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(128 << 20);
    // 4 MiB/s: the guest's few tens of MiB of non-zero RAM then take seconds to copy.
    lab.guest.qmp.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 4u64 << 20 }),
    )?;
    let (dst, _dst_qmp, uri) = lab.spawn_destination()?;
    lab.start_migration(&uri)?;
    let half = util::wait_until(
        "the slowed migration to copy 8 MiB",
        Duration::from_secs(60),
        || {
            let m = lab.query_migration()?;
            if m.finished() {
                return Err(Error::Check(format!(
                    "migration ended `{}` before it could be cancelled",
                    m.status
                )));
            }
            Ok((m.ram_transferred.unwrap_or(0) >= 8 << 20).then_some(m))
        },
    )?;
    lab.guest.qmp.execute("migrate_cancel", json!({}))?;
    let end = lab.wait_migration(Duration::from_secs(60))?;
    info.push(format!(
        "cancelled while `{}` after {} ms, {} MiB copied",
        half.status,
        half.total_time_ms.unwrap_or(0),
        half.ram_transferred.unwrap_or(0) >> 20
    ));
    if end.status != "cancelled" {
        problems.push(format!("migration ended `{}`, not cancelled", end.status));
    }
    let st = lab.guest.qmp.status()?;
    if st != "running" {
        problems.push(format!("source guest is `{st}` after the cancel"));
    }
    drop(dst);
    // Still served by the source backend, logging off again.
    crate::guest_ping_until_reply(&mut lab.guest.qemu, PEER_IP, Duration::from_secs(30))?;
    crate::peer_ping(&lab.ns, GUEST_IP, 5)?;
    lab.guest
        .qmp
        .execute("migrate-set-parameters", json!({ "max-bandwidth": bw }))?;
    o.migrations.push(lab.migrate()?);
    crate::guest_ping_until_reply(&mut lab.guest.qemu, PEER_IP, Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs(1));
    let r = pinger.stop()?;
    o.lost = Some(r.lost);
    info.push(format!("retry completed; {} echoes sent", r.transmitted));
    // Twice the limit of the one migration that completed: the cancelled one paused nothing,
    // but its copy competed with the guest for the CPUs.
    let limit = 2 * loss_limit(lab.kind, &o.migrations);
    if r.lost > limit {
        problems.push(format!("{} echoes lost (limit {limit})", r.lost));
    }
    Ok(o.judge(problems, info))
}

/// `a` or `a-b` for a list of figures.
fn range(v: &[u64]) -> String {
    match (v.iter().min(), v.iter().max()) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}-{b}"),
        _ => "-".into(),
    }
}

/// The report: one row per scenario run, backends next to each other per scenario.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut rows: Vec<&Outcome> = outcomes.iter().collect();
    let order = |s: Scenario| Scenario::ALL.iter().position(|x| *x == s).unwrap_or(0);
    rows.sort_by_key(|o| (order(o.scenario), o.run, o.backend.label()));
    let mut t = String::from(
        "| scenario | backend | run | result | migrations | total time (ms) | downtime (ms) | pings lost | chunks corrupted | notes |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for o in rows {
        let total: Vec<u64> = o
            .migrations
            .iter()
            .filter_map(|m| m.info.total_time_ms)
            .collect();
        let down: Vec<u64> = o
            .migrations
            .iter()
            .filter_map(|m| m.info.downtime_ms)
            .collect();
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |x| x.to_string());
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            o.scenario.name(),
            o.backend.label(),
            o.run,
            if o.passed { "pass" } else { "FAIL" },
            o.migrations.len(),
            range(&total),
            range(&down),
            opt(o.lost),
            opt(o.corrupted),
            o.note.replace('|', "/").replace('\n', " ")
        ));
    }
    t
}

/// Prepares everything a migration run needs that does not depend on the backend: the guest
/// image with the verifier. Also a convenience for tests.
pub fn prepare_image() -> Result<GuestImage> {
    image_with_verifier(&GuestImage::ensure()?)
}

/// Runs `scenarios` for `backend` once and fails, listing every failed scenario with its
/// note, unless all passed. For the end-to-end tests.
pub fn run_and_check(
    image: &GuestImage,
    backend: BackendKind,
    scenarios: &[Scenario],
) -> Result<()> {
    let outcomes = run(image, backend, scenarios, 1, |o| {
        eprintln!(
            "[migrate] {} {}: {} — {}",
            o.scenario.name(),
            o.backend.label(),
            if o.passed { "pass" } else { "FAIL" },
            o.note
        )
    });
    eprintln!("{}", table(&outcomes));
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| format!("{} ({}): {}", o.scenario.name(), o.backend.label(), o.note))
        .collect();
    ensure(failed.is_empty(), || failed.join("\n"))?;
    ensure(!outcomes.is_empty(), || "no scenario ran".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_round_trip_their_names() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::parse(s.name()), Some(s));
        }
        assert_eq!(Scenario::parse("nope"), None);
    }

    #[test]
    fn negative_control_only_for_vhost_relay() {
        assert_eq!(
            Scenario::NegativeControl.lab_backend(BackendKind::VhostRelay),
            Some(BackendKind::VhostRelayNoRxLog)
        );
        assert_eq!(
            Scenario::NegativeControl.lab_backend(BackendKind::Testpmd),
            None
        );
        assert_eq!(
            Scenario::PackedNegative.lab_backend(BackendKind::VhostRelay),
            Some(BackendKind::VhostRelayNoRxLog)
        );
        assert_eq!(
            Scenario::PackedNegative.lab_backend(BackendKind::Testpmd),
            None
        );
        assert_eq!(
            Scenario::Ping.lab_backend(BackendKind::Testpmd),
            Some(BackendKind::Testpmd)
        );
    }

    #[test]
    fn table_shows_failures_and_ranges() {
        let mut o = Outcome::new(Scenario::RoundTrips, BackendKind::VhostRelay);
        for (t, d) in [(2000, 10), (2500, 30)] {
            o.migrations.push(Migration {
                info: MigrationInfo {
                    status: "completed".into(),
                    total_time_ms: Some(t),
                    downtime_ms: Some(d),
                    ..Default::default()
                },
                wall: Duration::from_secs(2),
            });
        }
        let o = o.judge(vec!["3 | lost".into()], vec![]);
        let t = table(&[o]);
        assert!(t.contains("| roundtrips | vhost-relay | 1 | FAIL | 2 | 2000-2500 | 10-30 |"));
        assert!(t.contains("3 / lost"));
    }
}
