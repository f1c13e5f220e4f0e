#!/usr/bin/env bash
# Installs what Keel needs on Debian 12, as root: protoc for the build; containerd, runc, the
# CNI plugins, iproute2, iptables (the portmap plugin) and nftables for the node agent;
# busybox-static for the test images; docker-registry, skopeo and apache2-utils for the pull
# tests; etcd for the store benchmark's peer; procps for kill(1)
# in the process harness; strace for the test that checks a flush reaches the device.
# Idempotent.
set -euo pipefail
need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v etcd >/dev/null || need+=(etcd-server)
command -v kill >/dev/null || need+=(procps)
command -v strace >/dev/null || need+=(strace)
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v nft >/dev/null || need+=(nftables)
# The pull tests: a real registry on 127.0.0.1, skopeo to fill it, htpasswd for its users.
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
command -v htpasswd >/dev/null || need+=(apache2-utils)
# A static busybox (the dynamic one of the `busybox` package cannot run in an image).
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The generated-client examples (examples/python_*.py) need grpcio from PyPI.
if ! python3 -c "import grpc, grpc_tools, grpc_reflection" 2>/dev/null; then
  python3 -m pip install --quiet --root-user-action=ignore grpcio grpcio-tools grpcio-reflection
fi
command -v cargo >/dev/null || { echo "cargo is required (rustup)" >&2; exit 1; }
cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked
