#!/usr/bin/env bash
# A large stream on warren alone (issue 12: "a stream of 100M messages costs no
# per-message RAM"): publish N messages with confirms (examples/stream_perf, 16 B,
# batches of 100), kill -9, restart (time until the stream port answers), consume all
# from `first`; broker RSS sampled every second. Method and results: docs/benchmarks.md.
#
#   bench/stream_big.sh [-n MESSAGES] [-p STREAM_PERF] [-P SPORT:APORT] WARREN_BINARY
set -euo pipefail
n=100000000 perf=target/release/examples/stream_perf ports=5690:5691
while getopts "n:p:P:" o; do
  case $o in n) n=$OPTARG ;; p) perf=$OPTARG ;; P) ports=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] || { sed -n 2,7p "$0"; exit 2; }
bin=$1 sport=${ports%%:*} aport=${ports##*:}
data=$(mktemp -d /tmp/warren-stream-big.XXXXXX)
pin_b="" pin_c=""
if [ "$(nproc)" -ge 2 ]; then pin_b="taskset -c 0" pin_c="taskset -c 1"; fi
pid="" sampler=""
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$data"; }
trap cleanup EXIT

start() {
  WARREN_AMQP_PORT=$aport WARREN_STREAM__LISTENERS__TCP__DEFAULT=$sport WARREN_ADMIN_ENABLED=false \
    WARREN_DATA_DIR=$data/d $pin_b "$bin" >>"$data/log" 2>&1 &
  pid=$!
  for _ in $(seq 400); do (exec 3<>"/dev/tcp/127.0.0.1/$sport") 2>/dev/null && return; sleep 0.025; done
  echo "warren did not start: $(tail -5 "$data/log")" >&2; exit 1
}
rss() { awk '/VmRSS/{print $2}' "/proc/$pid/status" 2>/dev/null || echo 0; }
sample() { : >"$data/rss.$1"; while kill -0 "$pid" 2>/dev/null; do rss >>"$data/rss.$1"; sleep 1; done; }
max() { sort -n "$data/rss.$1" | tail -1; }

start
sample publish & sampler=$!
$pin_c "$perf" --port "$sport" --mode publish --messages "$n" --stream big
echo "stored: $(du -sh "$data/d" | cut -f1), RSS now $(( $(rss) / 1024 )) MiB"
kill -9 "$pid"; wait "$sampler" 2>/dev/null || true
t0=$(date +%s.%N); start; t1=$(date +%s.%N)
echo "restart after kill -9: serving in $(echo "$t1 - $t0" | bc) s, RSS $(( $(rss) / 1024 )) MiB"
sample consume & sampler=$!
$pin_c "$perf" --port "$sport" --mode consume --messages "$n" --stream big
kill "$pid"; wait "$sampler" 2>/dev/null || true
echo "max RSS: publishing $(( $(max publish) / 1024 )) MiB, consuming $(( $(max consume) / 1024 )) MiB"
