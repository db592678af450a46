#!/usr/bin/env bash
# Start-up benchmark, one command (root): installs what it needs, builds the
# image once (kept in /var/tmp/streamsnap-bench), runs every scenario side by
# side and writes target/startup-bench/startup-*.{md,png}. Options are passed
# on, e.g. `--unshaped`, `--rate 10000 --rtt 5`, `--runs 5`, `--only curl,estargz`.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
  echo "run as root: the benchmark makes a network namespace, mounts and starts containerd" >&2
  exit 1
fi
bash scripts/install-deps.sh --bench
export PATH="$HOME/.cargo/bin:$PATH"
STREAMSNAP_STARGZ_BIN="$(bash benches/startup/build-stargz.sh)"
export STREAMSNAP_STARGZ_BIN
cargo bench --bench startup -- "$@"
