#!/usr/bin/env bash
# Longer hostile-frontend campaigns: the same fuzzer CI runs (backend/tests/hostile_frontend.rs)
# with bigger bounds. It reports every failure with its seed and case, starts a new backend
# after each, and goes on to the end of the budget.
#
#   scripts/fuzz.sh --secs 3600 --seed 42          # an hour from seed 42
#   scripts/fuzz.sh --iters 100000                 # a number of inputs instead of a time
#   scripts/fuzz.sh --seed 0x5eed0009 --case memory-tables:3:17   # replay one input
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

secs=600
seed=$(date +%s)
while [ $# -gt 0 ]; do
  case "$1" in
    --secs) secs=$2; shift 2 ;;
    --iters) export VHOST_RELAY_FUZZ_ITERS=$2; secs=; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --case) export VHOST_RELAY_FUZZ_CASE=$2; shift 2 ;;
    --verbose) export VHOST_RELAY_FUZZ_VERBOSE=1; shift ;;
    -h|--help) usage ;;
    *) echo "fuzz.sh: unknown argument $1" >&2; usage 2 >&2 ;;
  esac
done

export VHOST_RELAY_FUZZ_SEED=$seed
[ -n "$secs" ] && export VHOST_RELAY_FUZZ_SECS=$secs
export VHOST_RELAY_FUZZ_KEEP_GOING=1
echo "fuzz.sh: seed $seed, ${secs:+$secs s}${VHOST_RELAY_FUZZ_ITERS:+$VHOST_RELAY_FUZZ_ITERS inputs}"
exec cargo test -p vhost-relay --test hostile_frontend -- --nocapture
