#!/usr/bin/env bash
# Brings up a single-replica Keel control plane with its defaults on 127.0.0.1:7001,
# data in /var/lib/keel. Ctrl-C stops it; running it again resumes from its data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/keel-target}"
cargo build --release --locked --bin keel --bin keelctl
exec "$CARGO_TARGET_DIR/release/keel" server "$@"
