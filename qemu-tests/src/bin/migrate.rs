//! `migrate`: the live-migration harness for operators.
//!
//! ```text
//! cargo run -p qemu-tests --bin migrate -- [--backend vhost-relay|testpmd|both]
//!     [--scenario all|ping|stream|multiqueue|roundtrips|cancel|negative[,...]] [--runs N]
//!     [--output FILE]
//! ```
//!
//! Two simulated hosts on this machine (a backend each, their VF veths on one bridge with a
//! peer), a guest booted on one and migrated while traffic runs; prints a Markdown table of
//! pass/fail, total time, downtime, pings lost and chunks corrupted. Run as root (network
//! namespaces). See docs/migration.md.

use std::process::ExitCode;

use qemu_tests::migration::scenarios::{self, Scenario};
use qemu_tests::migration::BackendKind;
use qemu_tests::{check_prerequisites, util, Error, Result, BASE_TOOLS};

const USAGE: &str = "usage: migrate [--backend vhost-relay|testpmd|both] \
[--scenario all|ping|stream|multiqueue|roundtrips|cancel|negative[,...]] [--runs N] [--output FILE]";

struct Args {
    backends: Vec<BackendKind>,
    scenarios: Vec<Scenario>,
    runs: u32,
    output: Option<std::path::PathBuf>,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        backends: vec![BackendKind::VhostRelay],
        scenarios: Scenario::ALL.to_vec(),
        runs: 1,
        output: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--backend" => {
                a.backends = match value()?.as_str() {
                    "vhost-relay" => vec![BackendKind::VhostRelay],
                    "testpmd" => vec![BackendKind::Testpmd],
                    "both" => vec![BackendKind::VhostRelay, BackendKind::Testpmd],
                    other => return Err(format!("unknown backend `{other}`\n{USAGE}")),
                }
            }
            "--scenario" => {
                let v = value()?;
                a.scenarios = if v == "all" {
                    Scenario::ALL.to_vec()
                } else {
                    v.split(',')
                        .map(|s| {
                            Scenario::parse(s.trim())
                                .ok_or_else(|| format!("unknown scenario `{s}`\n{USAGE}"))
                        })
                        .collect::<std::result::Result<_, _>>()?
                };
            }
            "--runs" => {
                a.runs = value()?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("--runs needs a positive number\n{USAGE}"))?
            }
            "--output" => a.output = Some(value()?.into()),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<bool> {
    let mut tools = BASE_TOOLS.to_vec();
    tools.push("rustc");
    if args.scenarios.iter().any(|s| s.expects_corruption())
        && args.backends.contains(&BackendKind::VhostRelay)
        && std::env::var_os("VHOST_RELAY_NO_RX_LOG_BIN").is_none()
    {
        tools.push("cargo");
    }
    if args.backends.contains(&BackendKind::Testpmd) {
        tools.extend(["dpdk-testpmd", "ethtool"]);
    }
    if !check_prerequisites(&tools)? {
        return Err(Error::Prerequisite("run as root".into()));
    }
    // One guest machine-wide at a time, like the end-to-end tests.
    let _lock = util::FileLock::acquire(&util::cache_dir().join("e2e.lock"))?;
    let image = scenarios::prepare_image()?;
    let started = std::time::SystemTime::now();
    let mut all = Vec::new();
    for &b in &args.backends {
        all.extend(scenarios::run(&image, b, &args.scenarios, args.runs, |o| {
            eprintln!(
                "==> {} / {} run {}: {}",
                o.scenario.name(),
                o.backend.label(),
                o.run,
                if o.passed { "pass" } else { "FAIL" }
            )
        }));
    }
    let table = scenarios::table(&all);
    let secs = started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    println!("{table}");
    println!("guest kernel {}; {secs} s in all", image.kernel_package);
    if let Some(p) = &args.output {
        std::fs::write(p, &table).map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
    }
    Ok(all.iter().all(|o| o.passed))
}
