#!/usr/bin/env bash
# Side-by-side benchmark of warren builds (and optionally RabbitMQ) in one go.
# Method and results: docs/benchmarks.md.
#
#   bench/compare.sh [-r ROUNDS] [-d SECS] [-p PERF] [-S REGEX] TARGET...
#     -S   only the scenarios whose name matches REGEX (grep -E)
#     TARGET = label=/path/to/warren        a warren binary (fresh process + data dir per run)
#            | label=amqp://...:5673/%2f    a running broker (RabbitMQ: its beam.smp is measured)
#
# For every round, scenario and target (interleaved, so load drifts hit all alike) it
# runs examples/perf and prints one line: msg/s (consumed, or published when there is
# no consumer) and the broker's own CPU per message (utime+stime from /proc/<pid>/stat
# over the run divided by the messages moved). The broker is pinned to CPU 0 and the
# load client to CPU 1 (taskset), when the machine has two CPUs or more.
set -euo pipefail
rounds=2 secs=10 perf=target/release/examples/perf only=.
while getopts "r:d:p:S:" o; do
  case $o in r) rounds=$OPTARG ;; d) secs=$OPTARG ;; p) perf=$OPTARG ;; S) only=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { sed -n 2,14p "$0"; exit 2; }
tck=$(getconf CLK_TCK)
port=5680
pin_b="" pin_c=""
if [ "$(nproc)" -ge 2 ]; then pin_b="taskset -c 0" pin_c="taskset -c 1"; fi

# name|perf arguments
scenarios=(
  "a1_1p1c_ack_each|-x1 -y1 -s16 -q1000"
  "a2_1p1c_multi_ack|-x1 -y1 -s16 -q1000 --multi-ack-every 100"
  "c_1p1c_autoack|-x1 -y1 -s16 --autoack"
  "e1_persistent_confirms_1p1c|-x1 -y1 -s16 -q1000 --persistent --durable-queue --confirm 1000 --multi-ack-every 100"
  "e2_persistent_confirms_publish_only|-x2 -y0 -s16 --persistent --durable-queue --confirm 1000"
  "e3_persistent_confirm_each_1p|-x1 -y0 -s16 --persistent --durable-queue --confirm 1"
  "e4_persistent_confirm_each_4p|-x4 -y0 -s16 --persistent --durable-queue --confirm 1"
)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run_one() { # label target scenario-name args
  local label=$1 target=$2 name=$3 args=$4 uri pid data="" out
  if [[ $target == amqp://* ]]; then
    uri=$target
    pid=$(pgrep -f beam.smp | head -1)
    [ -n "$pin_b" ] && taskset -a -pc 0 "$pid" >/dev/null
  else
    data=$(mktemp -d /tmp/warren-bench.XXXXXX)
    WARREN_AMQP_PORT=$port WARREN_ADMIN_ENABLED=false WARREN_DATA_DIR=$data \
      $pin_b "$target" >"$data.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
    uri="amqp://guest:guest@127.0.0.1:$port/%2f"
  fi
  local t0 t1
  t0=$(cpu_ticks "$pid")
  # shellcheck disable=SC2086
  out=$($pin_c "$perf" --uri "$uri" -z "$secs" $args 2>&1 | grep '^RESULT' || true)
  t1=$(cpu_ticks "$pid")
  if [ -n "$data" ]; then kill "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$data" "$data.log"; fi
  local p c rate moved
  p=$(sed -n 's/.* published=\([0-9]*\).*/\1/p' <<<"$out")
  c=$(sed -n 's/.* consumed=\([0-9]*\).*/\1/p' <<<"$out")
  if [[ $args == *"-y0"* ]]; then moved=${p:-0}; rate=$(sed -n 's/.* publish_rate=\([0-9]*\).*/\1/p' <<<"$out")
  else moved=${c:-0}; rate=$(sed -n 's/.* consume_rate=\([0-9]*\).*/\1/p' <<<"$out"); fi
  awk -v l="$label" -v n="$name" -v r="${rate:-0}" -v m="$moved" -v d=$((t1 - t0)) -v t="$tck" \
    'BEGIN { printf "%-10s %-38s %10d msg/s  %7.2f us CPU/msg\n", l, n, r, (m > 0 ? d * 1e6 / t / m : 0) }'
}

for round in $(seq "$rounds"); do
  echo "# round $round"
  for s in "${scenarios[@]}"; do
    grep -qE "$only" <<<"${s%%|*}" || continue
    for t in "$@"; do
      run_one "${t%%=*}" "${t#*=}" "${s%%|*}" "${s#*|}"
    done
  done
done
