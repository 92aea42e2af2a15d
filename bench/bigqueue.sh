#!/usr/bin/env bash
# A large persistent queue: fill, kill -9 + restart, drain, with the broker's RSS
# sampled every second. Method and results: docs/benchmarks.md.
#
#   bench/bigqueue.sh [-n MESSAGES] [-s SIZE] [-p PERF] TARGET...
#     TARGET = label=/path/to/warren      fresh process and data dir; all three phases
#            | label=amqp://...:5673/%2f  a running RabbitMQ (its beam.smp is sampled);
#                                         fill and drain only (restart it by hand)
#
# Phases (one durable queue "big", persistent messages):
#   fill    one producer, publisher confirms (1000 outstanding), no consumer
#   restart (warren) kill -9, start again on the same data dir: seconds until the
#           AMQP port accepts (recovery runs before the listener opens), RSS after
#   drain   one consumer, prefetch 1000, multi-ack every 100, until MESSAGES consumed
# Each phase prints msg/s, broker CPU per message (utime+stime / messages) and the
# largest RSS sample; the data dir's size is printed before and after fill, after
# drain and 60 s after drain (data files are unlinked by the flush that settles
# their last chunk; the 60 s figure shows nothing else is waiting to be reclaimed).
set -euo pipefail
n=1000000 size=1024 perf=target/release/examples/perf
while getopts "n:s:p:" o; do
  case $o in n) n=$OPTARG ;; s) size=$OPTARG ;; p) perf=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { sed -n 2,17p "$0"; exit 2; }
tck=$(getconf CLK_TCK)
port=5681
pin_b="" pin_c=""
if [ "$(nproc)" -ge 2 ]; then pin_b="taskset -c 0" pin_c="taskset -c 1"; fi

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_mib() { awk '/VmRSS/ {printf "%d", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo 0; }

# sample_rss PID FILE: writes the max RSS (MiB) seen to FILE until killed
sample_rss() {
  local max=0 r
  while kill -0 "$1" 2>/dev/null; do
    r=$(rss_mib "$1"); [ "${r:-0}" -gt "$max" ] && max=$r && echo "$max" >"$2"
    sleep 1
  done
}

start_warren() { # binary data -> sets pid
  WARREN_AMQP_PORT=$port WARREN_ADMIN_ENABLED=false WARREN_DATA_DIR=$2 \
    $pin_b "$1" >>"$2.log" 2>&1 &
  pid=$!
  local t0; t0=$(date +%s.%N)
  for _ in $(seq 6000); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.01; done
  up=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
}

phase() { # label name pid uri perf-args...
  local label=$1 name=$2 bpid=$3 uri=$4; shift 4
  local maxf; maxf=$(mktemp); echo 0 >"$maxf"
  sample_rss "$bpid" "$maxf" & local sampler=$!
  local t0 t1 out
  t0=$(cpu_ticks "$bpid")
  out=$($pin_c "$perf" --uri "$uri" -z 100000 -s "$size" -u big --durable-queue --keep-queue "$@" 2>&1 | grep '^RESULT' || true)
  t1=$(cpu_ticks "$bpid")
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
  local p c rate moved
  p=$(sed -n 's/.* published=\([0-9]*\).*/\1/p' <<<"$out")
  c=$(sed -n 's/.* consumed=\([0-9]*\).*/\1/p' <<<"$out")
  if [ "$name" = fill ]; then moved=${p:-0}; rate=$(sed -n 's/.* publish_rate=\([0-9]*\).*/\1/p' <<<"$out")
  else moved=${c:-0}; rate=$(sed -n 's/.* consume_rate=\([0-9]*\).*/\1/p' <<<"$out"); fi
  awk -v l="$label" -v n="$name" -v r="${rate:-0}" -v m="$moved" -v d=$((t1 - t0)) -v t="$tck" -v x="$(cat "$maxf")" \
    'BEGIN { printf "%-10s %-8s %9d msgs %9d msg/s %7.2f us CPU/msg  max RSS %5d MiB\n", l, n, m, r, (m > 0 ? d * 1e6 / t / m : 0), x }'
  rm -f "$maxf"
}

for t in "$@"; do
  label=${t%%=*} target=${t#*=}
  echo "# $label: $n x $size B persistent messages"
  if [[ $target == amqp://* ]]; then
    bpid=$(pgrep -f beam.smp | head -1)
    [ -n "$pin_b" ] && taskset -a -pc 0 "$bpid" >/dev/null
    phase "$label" fill "$bpid" "$target" -x1 -y0 -C "$n" --persistent --confirm 1000
    phase "$label" drain "$bpid" "$target" -x0 -y1 -q1000 --multi-ack-every 100 --cmessages "$n"
    continue
  fi
  data=$(mktemp -d /tmp/warren-big.XXXXXX)
  uri="amqp://guest:guest@127.0.0.1:$port/%2f"
  start_warren "$target" "$data"
  echo "$label disk before fill: $(du -sm "$data" | cut -f1) MiB"
  phase "$label" fill "$pid" "$uri" -x1 -y0 -C "$n" --persistent --confirm 1000
  echo "$label disk after fill: $(du -sm "$data" | cut -f1) MiB ($((n * size / 1048576)) MiB of bodies)"
  kill -9 "$pid"; wait "$pid" 2>/dev/null || true
  start_warren "$target" "$data"
  sleep 1
  echo "$label restart: serving after ${up} s, RSS $(rss_mib "$pid") MiB"
  phase "$label" drain "$pid" "$uri" -x0 -y1 -q1000 --multi-ack-every 100 --cmessages "$n"
  echo "$label disk after drain: $(du -sm "$data" | cut -f1) MiB"
  sleep 60
  echo "$label disk 60 s after drain: $(du -sm "$data" | cut -f1) MiB"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$data" "$data.log"
done
