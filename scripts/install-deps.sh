#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo drive (real registry,
# containerd, runc, image tools, FUSE). Idempotent; needs root.
set -euo pipefail
packages=(containerd runc docker-registry skopeo umoci stargz-snapshotter fuse3 iproute2 curl jq attr
          golang-go golang-github-containerd-containerd-dev busybox-static tar g++)
# The start-up benchmark also builds a Debian userland, shapes a link and plots.
if [ "${1:-}" = "--bench" ]; then
  packages+=(debootstrap gnuplot-nox iputils-ping)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The Debian packages enable system services we do not use: tests start their own.
for svc in containerd docker-registry; do
  systemctl disable --now "$svc" >/dev/null 2>&1 || true
done
# cargo-fuzz for the fuzz targets (tests/fuzz; libfuzzer-sys compiles libFuzzer with g++).
fuzz_version=0.13.2
if ! "$HOME/.cargo/bin/cargo-fuzz" --version 2>/dev/null | grep -q " $fuzz_version"; then
  "$HOME/.cargo/bin/cargo" install --locked cargo-fuzz --version "$fuzz_version"
fi
