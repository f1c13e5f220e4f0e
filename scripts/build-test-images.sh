#!/usr/bin/env bash
# Builds small OCI image tarballs from Debian's busybox-static, with no network, into the
# directory given (default: ./images). Each tarball is an OCI image layout whose manifest
# carries the image's name, so `keel agent --images-dir` (and `ctr images import`) import it
# under that name:
#
#   busybox.tar      docker.io/library/busybox:latest   sh, sleep, httpd, nc, wget and every
#                                                       other busybox applet; Cmd ["sh"]
#   entrypoint.tar   docker.io/keel/entrypoint:latest   the same files, with Entrypoint
#                                                       ["echo", "entrypoint"] and Cmd
#                                                       ["from-cmd"] (Kubernetes' command and
#                                                       args semantics)
#
# The output is reproducible: the same busybox gives byte-identical tarballs.
set -euo pipefail
out=$(realpath -m "${1:-images}")
busybox=${BUSYBOX:-/bin/busybox}
if ! "$busybox" --list >/dev/null 2>&1 || ldd "$busybox" >/dev/null 2>&1; then
  echo "$busybox is not a static busybox (install Debian's busybox-static)" >&2
  exit 1
fi
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The root filesystem: busybox, a link for every applet, and the few files images have.
root=$work/rootfs
mkdir -p "$root"/{bin,etc,tmp,root,var/www,proc,sys,dev}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
printf '<html><body>keel test image</body></html>\n' >"$root/var/www/index.html"
chmod 1777 "$root/tmp"

blobs=$work/blobs
mkdir -p "$blobs"
# Stores a file as a blob; prints "sha256:<hex> <size>".
put() {
  local sum size
  sum=$(sha256sum "$1" | cut -d' ' -f1)
  size=$(stat -c %s "$1")
  cp "$1" "$blobs/$sum"
  echo "sha256:$sum $size"
}

tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -C "$root" -cf "$work/layer.tar" .
read -r layer layer_size < <(put "$work/layer.tar")

arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
image() { # name file config-json-fragment
  local name=$1 file=$2 cfg=$3 dir=$work/$2
  printf '{"architecture":"%s","os":"linux","config":{%s},"rootfs":{"type":"layers","diff_ids":["%s"]},"history":[{"created_by":"scripts/build-test-images.sh"}]}' \
    "$arch" "$cfg" "$layer" >"$work/config.json"
  read -r config config_size < <(put "$work/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
    "$config" "$config_size" "$layer" "$layer_size" >"$work/manifest.json"
  read -r manifest manifest_size < <(put "$work/manifest.json")
  rm -rf "$dir" && mkdir -p "$dir/blobs/sha256"
  for d in "$layer" "$config" "$manifest"; do cp "$blobs/${d#sha256:}" "$dir/blobs/sha256/"; done
  printf '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$manifest_size" "$name" "${name##*:}" >"$dir/index.json"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$dir" -cf "$out/.$file.tar.$$" oci-layout index.json blobs
  mv -f "$out/.$file.tar.$$" "$out/$file.tar"
  echo "$out/$file.tar: $name"
}

path='"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]'
image docker.io/library/busybox:latest busybox "$path,\"Cmd\":[\"sh\"]"
image docker.io/keel/entrypoint:latest entrypoint "$path,\"Entrypoint\":[\"echo\",\"entrypoint\"],\"Cmd\":[\"from-cmd\"],\"WorkingDir\":\"/tmp\""
