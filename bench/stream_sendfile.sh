#!/usr/bin/env bash
# warren's Stream-protocol consume with stream.sendfile off and on, over the same
# stored stream (method and results: docs/benchmarks.md, "sendfile of chunk data").
#
#   bench/stream_sendfile.sh [-n MESSAGES] [-r ROUNDS] [-P SPORT:APORT] WARREN STREAM_PERF
#
# Publishes MESSAGES (16 B, confirms) once, then per round starts warren on that data
# directory with WARREN_STREAM__SENDFILE=false, then =true, and consumes all of them
# from first each time: msg/s and broker CPU per message (/proc/<pid>/task/*/schedstat).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
n=10000000 rounds=3 ports=5690:5691
while getopts "n:r:P:" o; do
  case $o in n) n=$OPTARG ;; r) rounds=$OPTARG ;; P) ports=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
[ $# -eq 2 ] || { sed -n 2,9p "$0"; exit 2; }
bin=$1 perf=$2
IFS=: read -r sport aport <<<"$ports"
data=$(mktemp -d /tmp/warren-sendfile.XXXXXX)
trap 'rm -rf "$data"' EXIT
pid=""
start() {
  WARREN_STREAM__SENDFILE=$1 WARREN_AMQP_PORT=$aport WARREN_STREAM__LISTENERS__TCP__DEFAULT=$sport \
    WARREN_ADMIN_ENABLED=false WARREN_DATA_DIR=$data $pin_b "$bin" >/dev/null 2>&1 &
  pid=$!
  wait_port "$sport"
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }
start true
$pin_c "$perf" --port "$sport" --mode publish --stream sf --messages "$n" | tail -1
stop
for _ in $(seq "$rounds"); do
  for sf in false true; do
    start $sf
    t0=$(cpu_ns "$pid")
    out=$($pin_c "$perf" --port "$sport" --mode consume --stream sf --messages "$n" 2>&1 | tail -1)
    t1=$(cpu_ns "$pid")
    ns=$(cpu_delta "$t0" "$t1")
    echo "sendfile=$sf $out cpu_us_per_msg=$(awk -v d="$ns" -v n="$n" 'BEGIN { printf "%.4f", d / 1e3 / n }')"
    stop
  done
done
