#!/usr/bin/env bash
# Full check of the workspace, as CI runs it: dependencies, formatting, lints, build, unit tests,
# then the end-to-end tests with real QEMU guests (qemu-tests). Needs root (apt, network
# namespaces). Works on a fresh clone with only cargo installed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

step() { printf '\n=== %s\n' "$*"; }

step "installing dependencies"
bash scripts/install-deps.sh

# rustfmt and clippy are rustup components a minimal toolchain may lack.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  if command -v rustup >/dev/null 2>&1; then
    rustup component add rustfmt clippy
  fi
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build"
cargo build --workspace

# The end-to-end tests run the vhost-relay binary just built (not a stale release build).
target_dir=${CARGO_TARGET_DIR:-$root/target}
export VHOST_RELAY_BIN=${VHOST_RELAY_BIN:-$target_dir/debug/vhost-relay}

step "unit and integration tests"
cargo test --workspace --exclude qemu-tests

step "Debian package: build, dpkg -i, check, dpkg -r, dpkg -P (scripts/test-deb.sh)"
bash scripts/test-deb.sh

# One guest at a time: TCG guests on two cores are slow enough already. --nocapture shows each
# step's timing in the CI log.
step "end-to-end tests (QEMU guests, DPDK testpmd)"
start=$(date +%s)
cargo test -p qemu-tests -- --test-threads=1 --nocapture
echo "end-to-end tests took $(( $(date +%s) - start ))s"
