#!/usr/bin/env bash
# The soak run: every fuzz target for at least 10 minutes (SECONDS each,
# default 600), one after the other; fails on the first crash.
#   scripts/fuzz-soak.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
shift || true
exec bash scripts/fuzz.sh "$seconds" "$@"
