#!/bin/sh
# Benchmark vhost-relay against DPDK testpmd (see qemu-tests/src/bin/bench.rs and
# docs/performance.md). Run as root after scripts/install-deps.sh. Builds release binaries,
# runs every scenario several times alternating ours and the peer's, prints the table and
# writes it into docs/performance.md. `--quick` for a short smoke run, `--no-write` to only print.
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p vhost-relay -p qemu-tests --bin vhost-relay --bin bench
target="${CARGO_TARGET_DIR:-target}"
VHOST_RELAY_BIN="$target/release/vhost-relay" exec "$target/release/bench" "$@"
