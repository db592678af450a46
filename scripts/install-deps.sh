#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo drive (real registry,
# containerd, runc, image tools, FUSE). Idempotent; needs root.
set -euo pipefail
packages=(containerd runc docker-registry skopeo umoci stargz-snapshotter fuse3 iproute2 curl jq attr openssl
          golang-go golang-github-containerd-containerd-dev busybox-static tar g++ apache2-utils python3-pip)
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

# containerd 2.1 for tests/containerd2_e2e.rs, from Debian's unstable suite, unpacked into a cache
# directory (never installed over the system's containerd 1.6). The system's runc runs its
# containers: unstable's runc needs a newer glibc. Skipped when already unpacked.
containerd2_dir="${STREAMSNAP_CONTAINERD2_DIR:-/var/cache/streamsnap/containerd2}"
if [ ! -x "$containerd2_dir/root/usr/bin/containerd" ]; then
  echo "fetching containerd 2.x from Debian unstable into $containerd2_dir"
  mkdir -p "$containerd2_dir/lists/partial" "$containerd2_dir/sources.d" "$containerd2_dir/debs"
  # The same package mirror as this machine's own sources: unstable is the suite "sid" there.
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  if [ -z "$mirror" ]; then
    echo "no URIs: line in /etc/apt/sources.list.d/debian.sources: cannot find the package mirror" >&2
    exit 1
  fi
  printf 'Types: deb\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" > "$containerd2_dir/sources.d/sid.sources"
  apt_private=(-o "Dir::State::Lists=$containerd2_dir/lists" -o Dir::Etc::SourceList=/dev/null
               -o "Dir::Etc::SourceParts=$containerd2_dir/sources.d")
  apt-get -qq "${apt_private[@]}" update
  rm -f "$containerd2_dir"/debs/containerd_*.deb
  (cd "$containerd2_dir/debs" && apt-get -qq "${apt_private[@]}" download containerd)
  rm -rf "$containerd2_dir/root.partial"
  dpkg -x "$containerd2_dir"/debs/containerd_*.deb "$containerd2_dir/root.partial"
  mv "$containerd2_dir/root.partial" "$containerd2_dir/root"
fi
"$containerd2_dir/root/usr/bin/containerd" --version

# cargo-fuzz for the fuzz targets (tests/fuzz; libfuzzer-sys compiles libFuzzer with g++).
fuzz_version=0.13.2
if ! "$HOME/.cargo/bin/cargo-fuzz" --version 2>/dev/null | grep -q " $fuzz_version"; then
  "$HOME/.cargo/bin/cargo" install --locked cargo-fuzz --version "$fuzz_version"
fi

# tests/deploy_manifests.rs: kustomize (kubectl's built-in one; Debian's kubernetes-client when no
# kubectl or kustomize is installed) and kubernetes-validate, which ships the Kubernetes schemas
# it validates against (no network when it runs); PyYAML comes with it.
if ! command -v kustomize >/dev/null && ! command -v kubectl >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client
fi
k8s_validate_version=1.37.0
if ! kubernetes-validate --version 2>/dev/null | grep -q "$k8s_validate_version"; then
  # Debian's python3 is externally managed (PEP 668); this one tool goes beside it.
  python3 -m pip install --quiet --break-system-packages "kubernetes-validate==$k8s_validate_version"
fi
