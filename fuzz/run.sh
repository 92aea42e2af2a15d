#!/usr/bin/env bash
# Bounded fuzz run of every target: `fuzz/run.sh <seconds per target> [target...]`.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); works on stable Rust through
# RUSTC_BOOTSTRAP=1. Runs niced; new corpus entries land in fuzz/corpus/<target>/
# (only the committed `seed-*` files are tracked), crashes in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(frame_decoder method_decoder content_header connection stream_frame stream_session)
export RUSTC_BOOTSTRAP=1
nice -n 10 cargo fuzz build -s none >/dev/null
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  extra=()
  [ "$t" = connection ] && extra=(-max_len=8192 -timeout=20)
  echo "== $t (${secs}s)"
  if ! nice -n 10 cargo fuzz run -s none "$t" "corpus/$t" -- \
      -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 "${extra[@]}" \
      2>&1 | tee "/tmp/warren-fuzz-$t.log" | grep -E "^(stat::number_of_executed_units|stat::average_exec_per_sec|==[0-9]+== ERROR|SUMMARY|artifact_prefix|Test unit written)"; then
    :
  fi
  if grep -qE "ERROR: libFuzzer|deadly signal|panicked" "/tmp/warren-fuzz-$t.log"; then
    echo "!! $t crashed; see /tmp/warren-fuzz-$t.log and fuzz/artifacts/$t/"
    status=1
  fi
done
exit $status
