#!/usr/bin/env bash
# Runs every fuzz target (tests/fuzz) for SECONDS each (default 20: the CI run),
# starting from the committed seed corpus; fails on the first crash, leaving
# the crashing input under $FUZZ_OUT (printed). New corpus entries go to a
# scratch copy, so the committed corpus stays small.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# Works on stable Rust: no sanitizer (`--sanitizer none`), which needs no
# nightly flags; libFuzzer's coverage instrumentation is stable rustc flags.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
seconds="${1:-20}"
shift || true
fuzz_dir=tests/fuzz
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo fuzz list --fuzz-dir "$fuzz_dir")
fi
out="${FUZZ_OUT:-$(mktemp -d /tmp/streamsnap-fuzz.XXXXXX)}"
echo "fuzzing ${targets[*]} for ${seconds}s each; scratch corpus and crashes in $out"
flags=(--fuzz-dir "$fuzz_dir" --sanitizer none -O --debug-assertions)
cargo fuzz build "${flags[@]}"
for t in "${targets[@]}"; do
  mkdir -p "$out/corpus/$t" "$out/artifacts/$t"
  log="$out/$t.log"
  if ! cargo fuzz run "${flags[@]}" "$t" "$out/corpus/$t" "$fuzz_dir/corpus/$t" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
      -artifact_prefix="$out/artifacts/$t/" >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $t failed; crashing input in $out/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  echo "$t: $runs runs in ${seconds}s, 0 crashes"
done
