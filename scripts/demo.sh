#!/usr/bin/env bash
# Demo: a QEMU guest (10.0.0.2) whose virtio-net NIC is served by vhost-relay, relayed to the VF
# end of a veth pair in a private network namespace, pings the host peer (10.0.0.1) on the
# other end. Addresses exist only inside that namespace; everything is removed at the end.
# Needs root. The demo itself is `cargo run -p qemu-tests --bin demo` (see qemu-tests/src/bin/demo.rs).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

bash scripts/install-deps.sh
cargo build --release -p vhost-relay
target_dir=${CARGO_TARGET_DIR:-$root/target}
export VHOST_RELAY_BIN=$target_dir/release/vhost-relay
exec cargo run -q -p qemu-tests --bin demo
