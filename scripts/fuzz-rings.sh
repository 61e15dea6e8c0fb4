#!/usr/bin/env bash
# A longer campaign of the data-path fuzzers than CI's: the RX/TX/loopback ring fuzzers and
# the offload fuzzer (backend/src/fuzz/), and the vDPA shadow-ring fuzzer
# (vdpa/tests/fuzz_shadow.rs). CI runs the same targets with a fixed seed and a small budget
# (`cargo test`); this picks a fresh seed and runs each target for a time budget.
#
#   scripts/fuzz-rings.sh [SECONDS_PER_TARGET [SEED]]    (default 600 s, seed from the clock)
#   FUZZ_RELEASE=1 scripts/fuzz-rings.sh ...             optimised, debug assertions kept
#
# A failure prints VHOST_RELAY_FUZZ_SEED and VHOST_RELAY_FUZZ_ONLY: set both to replay that
# one input under `cargo test -p vhost-relay --lib fuzz::` (or `-p vdpa --test fuzz_shadow`).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-600}
seed=${2:-$(date +%s)}
export VHOST_RELAY_FUZZ_SEED=$seed VHOST_RELAY_FUZZ_SECS=$secs
export VHOST_RELAY_FUZZ_ITERS=${VHOST_RELAY_FUZZ_ITERS:-1000000000}
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

profile=()
if [ "${FUZZ_RELEASE:-0}" = 1 ]; then
    # The checks that turn silent corruption into a failure stay on: overflow checks and the
    # standard library's debug assertions (e.g. copy_nonoverlapping on overlapping ranges).
    export CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true
    profile=(--release)
fi

echo "fuzz-rings: seed $seed, $secs s per target"
status=0
cargo test "${profile[@]}" -p vhost-relay --lib fuzz:: -- --nocapture || status=1
cargo test "${profile[@]}" -p vdpa --test fuzz_shadow -- --nocapture || status=1
exit $status
