//! Prints the vhost-relay(1) man page (roff) rendered from the clap definition in
//! src/cli.rs, so the page lists exactly the options the binary accepts.
//!
//! `cargo run -q -p vhost-relay --example vhost-relay-man > vhost-relay.1`
//! (scripts/build-deb.sh does this for the package).

use std::io::Write;
use std::process::ExitCode;

use clap::CommandFactory;

// The binary's own module, compiled here as well: one definition, no copy.
// Its fields are read only by main.rs.
#[allow(dead_code)]
#[path = "../src/cli.rs"]
mod cli;

fn main() -> ExitCode {
    let mut page = Vec::new();
    let rendered = clap_mangen::Man::new(cli::Cli::command()).render(&mut page);
    match rendered.and_then(|()| std::io::stdout().write_all(&page)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-relay-man: cannot write the man page: {e}");
            ExitCode::FAILURE
        }
    }
}
