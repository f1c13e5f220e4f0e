#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test from one build.
# KEEL_E2E=1 makes a missing prerequisite a failure instead of a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/keel-target}"
export KEEL_E2E="${KEEL_E2E:-1}"
# One build per run: incremental state would only pile up in the persistent target dir.
export CARGO_INCREMENTAL=0
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo nextest run --locked --no-fail-fast --profile ci
