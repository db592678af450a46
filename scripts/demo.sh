#!/usr/bin/env bash
# Lazy-pull demo, end to end on one machine (root): a real registry, an image
# converted to eStargz by ctr-remote, `streamsnap mount`, and the registry's
# own count of bytes served at each step.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE and overlay mounts)" >&2; exit 1; }
bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --quiet
bin=$PWD/target/debug/streamsnap

work=$(mktemp -d /tmp/streamsnap-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "registry on loopback"
port=$(free_port)
cat > "$work/registry.yml" <<YAML
version: 0.1
log: {level: info, formatter: text, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
YAML
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
pids+=($!)
until curl -sf "http://127.0.0.1:$port/v2/" >/dev/null; do sleep 0.1; done
# The registry's own count of body bytes written, from its log.
served() { grep -o 'http.response.written=[0-9]*' "$work/registry.log" | cut -d= -f2 | awk '{s+=$1} END {print s+0}'; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b-a}'; }

step "image: busybox userland + 512 MiB of model weights"
layout=$work/layout
umoci init --layout "$layout" && umoci new --image "$layout:demo"
umoci unpack --image "$layout:demo" "$work/bundle" >/dev/null
root=$work/bundle/rootfs
mkdir -p "$root/bin" "$root/models" "$root/etc"
cp /bin/busybox "$root/bin/busybox"
for a in sh ls cat echo sha256sum wc; do ln -sf busybox "$root/bin/$a"; done
echo "hello from a lazily pulled image" > "$root/etc/motd"
for i in 1 2; do head -c $((256 << 20)) /dev/urandom > "$root/models/weights-$i.bin"; done
umoci repack --image "$layout:demo" "$work/bundle" >/dev/null
src=127.0.0.1:$port/demo/app
skopeo copy --quiet --dest-tls-verify=false "oci:$layout:demo" "docker://$src:gzip"

step "convert to eStargz with ctr-remote (private containerd)"
mkdir -p "$work/ctd"
cat > "$work/ctd/config.toml" <<TOML
version = 2
root = "$work/ctd/root"
state = "$work/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/ctd/containerd.sock"
TOML
containerd --config "$work/ctd/config.toml" > "$work/ctd/log" 2>&1 &
pids+=($!)
until [ -S "$work/ctd/containerd.sock" ]; do sleep 0.1; done
cr() { ctr-remote --address "$work/ctd/containerd.sock" "$@"; }
cr content fetch --plain-http "$src:gzip" >/dev/null
cr image convert --oci --estargz "$src:gzip" "$src:esgz" >/dev/null
cr image push --plain-http "$src:esgz" >/dev/null
layer_bytes=$(curl -s -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://127.0.0.1:$port/v2/demo/app/manifests/esgz" | jq '[.layers[].size] | add')
echo "image layers: $layer_bytes bytes"

mount_image() {
  "$bin" mount --state-dir "$work/state" "$src:esgz" "$work/mnt" > "$work/mount.out" 2> "$work/mount.log" &
  mpid=$!
  pids+=($mpid)
  until grep -q '^mounted' "$work/mount.out" 2>/dev/null; do
    kill -0 $mpid 2>/dev/null || { cat "$work/mount.log"; exit 1; }
    sleep 0.05
  done
}

step "streamsnap mount (cold cache)"
before=$(served); t0=$(date +%s.%N)
mount_image
echo "mounted in $(elapsed "$t0") s; registry served $(( $(served) - before )) bytes (footer + TOC) of $layer_bytes"
ls -l "$work/mnt" "$work/mnt/models"

step "run a program from the mount"
before=$(served)
chroot "$work/mnt" /bin/sh -c 'cat /etc/motd; ls /bin | wc -l'
echo "registry served $(( $(served) - before )) more bytes (busybox and motd only)"

step "read all model weights (sequential, verified chunk by chunk)"
before=$(served); t0=$(date +%s.%N)
chroot "$work/mnt" /bin/sha256sum /models/weights-1.bin /models/weights-2.bin
echo "registry served $(( $(served) - before )) more bytes in $(elapsed "$t0") s"

step "unmount (SIGTERM) and mount again with the same state dir"
kill -TERM $mpid; wait $mpid
before=$(served)
mount_image
cat "$work/mnt/models/weights-1.bin" "$work/mnt/models/weights-2.bin" | sha256sum
echo "second mount + full re-read: registry served $(( $(served) - before )) bytes (TOC only: contents come from the cache)"
kill -TERM $mpid; wait $mpid
step "done"
