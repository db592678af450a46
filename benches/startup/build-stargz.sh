#!/usr/bin/env bash
# Builds containerd-stargz-grpc, the stargz snapshotter baseline of the start-up benchmark, from
# Debian's packaged sources (golang-github-containerd-stargz-snapshotter-dev and its -dev
# dependencies) in GOPATH mode: no module download. Debian ships the library without the daemon's
# main package; benches/startup/stargz/main.go is ours. Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="$PWD/target/stargz/containerd-stargz-grpc"
src=benches/startup/stargz
if [ ! -x "$out" ] || [ -n "$(find "$src" -newer "$out" -name '*.go' | head -1)" ]; then
  mkdir -p "$(dirname "$out")"
  (cd "$src" && GOPATH="$PWD/gopath:/usr/share/gocode" GO111MODULE=off GOFLAGS= \
    GOCACHE="$(dirname "$out")/go-cache" go build -o "$out" .) >&2
fi
echo "$out"
