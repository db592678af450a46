#!/usr/bin/env bash
# Build and run containerd's snapshotter conformance suite (containerd 1.6,
# Debian package golang-github-containerd-containerd-dev) against streamsnap,
# or against containerd's own overlayfs snapshotter as a baseline.
#
# Usage (as root):
#   STREAMSNAP_BIN=target/debug/streamsnap tests/conformance/run.sh [go test flags...]
#   CONFORMANCE_BASELINE=overlayfs        tests/conformance/run.sh [go test flags...]
#   e.g.  ... run.sh -test.run 'TestConformance/^(Basic|Walk)$'   (one case or a few)
#         ... run.sh -test.run TestContract                      (only our extra checks)
#
# Tests: TestConformance = containerd 1.6 snapshots/testsuite, unmodified;
#        TestContract    = extra checks containerd itself relies on (contract_test.go).
#
# Everything after the script name is passed to the test binary verbatim
# (-test.v is always passed). GOPATH mode, no module downloads.
#
# Environment:
#   STREAMSNAP_BIN, CONFORMANCE_BASELINE   mode (see streamsnap_conformance_test.go)
#   STREAMSNAP_EXTRA_ARGS                   extra args for `streamsnap serve`
#   CONFORMANCE_WORK   build dir (default: <repo>/target/conformance)
#   CONFORMANCE_TIMEOUT  -test.timeout (default 30m)
#   CONFORMANCE_PARALLEL -test.parallel (default: number of CPUs)
#   CONFORMANCE_BUILD_ONLY=1   only build the test binary
#   STREAMSNAP_LOG_DIR  where server logs go (default: $CONFORMANCE_WORK/logs/<timestamp>)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
repo="$(cd "$here/../.." && pwd -P)"
work="${CONFORMANCE_WORK:-$repo/target/conformance}"
debian_gopath=/usr/share/gocode
pkg=streamsnap.dev/conformance

die() { echo "run.sh: $*" >&2; exit 2; }

command -v go >/dev/null 2>&1 || die "go not found (apt-get install golang-go)"
[ -d "$debian_gopath/src/github.com/containerd/containerd/snapshots/testsuite" ] ||
    die "containerd sources missing (apt-get install golang-github-containerd-containerd-dev)"

if [ -z "${CONFORMANCE_BUILD_ONLY:-}" ]; then
    [ "$(id -u)" = 0 ] || die "must run as root (the suite mounts filesystems)"
    if [ -z "${CONFORMANCE_BASELINE:-}" ]; then
        [ -n "${STREAMSNAP_BIN:-}" ] || die "set STREAMSNAP_BIN=/path/to/streamsnap or CONFORMANCE_BASELINE=overlayfs"
        # resolve relative to the caller's cwd before we cd anywhere
        case "$STREAMSNAP_BIN" in
            */*) [ -x "$STREAMSNAP_BIN" ] || die "STREAMSNAP_BIN=$STREAMSNAP_BIN is not executable"
                 STREAMSNAP_BIN="$(cd "$(dirname "$STREAMSNAP_BIN")" && pwd -P)/$(basename "$STREAMSNAP_BIN")" ;;
            *)   STREAMSNAP_BIN="$(command -v "$STREAMSNAP_BIN")" || die "STREAMSNAP_BIN not found in PATH" ;;
        esac
        export STREAMSNAP_BIN
    fi
fi

# Private GOPATH: <work>/gopath/src/streamsnap.dev/conformance -> tests/conformance
gopath="$work/gopath"
mkdir -p "$gopath/src/$(dirname "$pkg")" "$work/gocache" "$work/bin"
link="$gopath/src/$pkg"
if [ "$(readlink "$link" 2>/dev/null || true)" != "$here" ]; then
    rm -rf "$link"
    ln -s "$here" "$link"
fi

export GO111MODULE=off
export GOPATH="$gopath:$debian_gopath"
export GOCACHE="$work/gocache"
export GOFLAGS=
export GOPROXY=off
export CGO_ENABLED="${CGO_ENABLED:-1}"
command -v gcc >/dev/null 2>&1 || export CGO_ENABLED=0

testbin="$work/bin/conformance.test"
echo "run.sh: building $testbin (GOPATH=$GOPATH)" >&2
# -p 2: keep the build light; cwd outside the symlink so the import path resolves.
(cd "$gopath/src/$pkg/.." && go test -c -p 2 -o "$testbin" "$pkg")

if [ -n "${CONFORMANCE_BUILD_ONLY:-}" ]; then
    echo "run.sh: built $testbin" >&2
    exit 0
fi

if [ -z "${STREAMSNAP_LOG_DIR:-}" ]; then
    STREAMSNAP_LOG_DIR="$work/logs/$(date +%Y%m%d-%H%M%S)"
fi
export STREAMSNAP_LOG_DIR

# Keep the temp dirs (and hence the unix socket paths) short: sun_path is 108 bytes.
export TMPDIR="${CONFORMANCE_TMPDIR:-/tmp}"

cd "$work"
set +e
"$testbin" -test.v \
    -test.timeout "${CONFORMANCE_TIMEOUT:-30m}" \
    -test.parallel "${CONFORMANCE_PARALLEL:-$(nproc)}" \
    "$@"
rc=$?
set -e
if [ $rc -ne 0 ]; then
    echo "run.sh: conformance suite FAILED (exit $rc); server logs (if any): $STREAMSNAP_LOG_DIR" >&2
else
    echo "run.sh: conformance suite passed" >&2
fi
exit $rc
