#!/usr/bin/env bash
# The whole test suite: installs what the tests need, checks formatting and
# lints, then runs unit and integration tests against real components.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "run as root: the tests mount FUSE and overlayfs and start containerd" >&2
  exit 1
fi
bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --no-fail-fast 2>&1
# Every fuzz target for 20 s from the committed corpus (scripts/fuzz-soak.sh runs them long).
bash scripts/fuzz.sh 20
