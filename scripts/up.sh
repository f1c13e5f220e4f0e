#!/usr/bin/env bash
# The README's run command: installs what Keel needs, builds it, builds the test images into
# the agent's images directory, and runs `keel up`, which brings up a replica, an agent and
# a managed containerd in the background. `keel down` stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/keel-target}"
cargo build --release --locked --bin keel --bin keelctl
install -m 0755 "$CARGO_TARGET_DIR/release/keel" "$CARGO_TARGET_DIR/release/keelctl" /usr/local/bin/
images=/var/lib/keel-agent/images
[ -f "$images/busybox.tar" ] || bash scripts/build-test-images.sh "$images" >/dev/null
exec keel up "$@"
