#!/usr/bin/env bash
# Side-by-side stream benchmark of warren and RabbitMQ in one go (issue 12's targets).
# Method and results: docs/benchmarks.md.
#
#   bench/streams.sh [-r ROUNDS] [-n MESSAGES] [-N AMQP_MESSAGES] [-p STREAM_PERF] [-P SPORT:APORT] TARGET...
#     TARGET = label=/path/to/warren       a warren binary (fresh process + data dir per round)
#            | label=rabbitmq:SPORT:APORT  a running RabbitMQ (stream port, AMQP port; its
#                                          beam.smp is measured)
#
# Per round and target, with examples/stream_perf (rabbitmq-stream-client 0.4, 16 B):
#   pubsub       1 producer (batches of 100, confirms) + 1 consumer from first, N messages
#   publish      publish only with confirms, N messages (kept for the next two)
#   consume      Stream protocol consumer from first over those N stored messages
#   amqp_consume AMQP 0-9-1 consumer (x-stream-offset first, prefetch 1000, multi-ack
#                100; warren's codec as the client, --amqp-client raw) over a stream of
#                M stored messages
# After publish, the chunks the stored stream took (messages per chunk: what a
# consumer pays per chunk is paid once for that many messages).
# Each line: msg/s and the broker's CPU per message: the run time of its threads over
# that run (/proc/<pid>/task/*/schedstat, ns; a thread that ends meanwhile
# is not counted), divided by the messages moved. Broker pinned to CPU 0, client to
# CPU 1. -P: the ports a warren target listens on (default 5690:5691).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
rounds=1 n=2000000 m=10000000 perf=target/release/examples/stream_perf wports=5690:5691
while getopts "r:n:N:p:P:" o; do
  case $o in r) rounds=$OPTARG ;; n) n=$OPTARG ;; N) m=$OPTARG ;; p) perf=$OPTARG ;; P) wports=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { sed -n 2,20p "$0"; exit 2; }

pid="" sport="" aport="" data=""
start_target() { # target
  local t=$1
  if [[ $t == rabbitmq:* ]]; then
    IFS=: read -r _ sport aport <<<"$t"
    pid=$(pgrep -f beam.smp | head -1)
    [ -n "$pin_b" ] && taskset -a -pc 0 "$pid" >/dev/null
    data=""
  else
    IFS=: read -r sport aport <<<"$wports"
    data=$(mktemp -d /tmp/warren-sbench.XXXXXX)
    WARREN_AMQP_PORT=$aport WARREN_STREAM__LISTENERS__TCP__DEFAULT=$sport WARREN_ADMIN_ENABLED=false \
      WARREN_DATA_DIR=$data $pin_b "$t" >"$data.log" 2>&1 &
    pid=$!
    wait_port "$sport"
  fi
}
stop_target() {
  if [ -n "$data" ]; then kill "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$data" "$data.log"; fi
}

# Chunks stored so far: warren (all streams of its data directory, 64 B per
# index record) or RabbitMQ (the stream $1's osiris index, 29 B per record).
chunks() {
  local t=0 f
  if [ -n "$data" ]; then
    for f in "$data"/streams/*/*.index; do [ -e "$f" ] && t=$((t + ($(stat -c %s "$f") - 8) / 64)); done
  else
    for f in /var/lib/rabbitmq/mnesia/*/stream/__"$1"_*/*.index; do [ -e "$f" ] && t=$((t + ($(stat -c %s "$f") - 8) / 29)); done
  fi
  echo "$t"
}

measure() { # label scenario stream_perf-args...
  local label=$1 name=$2 out t0 t1 rate moved ns
  shift 2
  t0=$(cpu_ns "$pid")
  out=$($pin_c "$perf" --port "$sport" --amqp-uri "amqp://guest:guest@127.0.0.1:$aport/%2f" "$@" 2>&1 | tail -1)
  t1=$(cpu_ns "$pid")
  ns=$(cpu_delta "$t0" "$t1")
  rate=$(sed -n 's/.* rate=\([0-9]*\).*/\1/p' <<<"$out")
  moved=$(sed -n 's/.* messages=\([0-9]*\).*/\1/p' <<<"$out")
  [ -n "$rate" ] || echo "$label $name failed: $out" >&2
  awk -v l="$label" -v s="$name" -v r="${rate:-0}" -v m="${moved:-0}" -v d="$ns" \
    'BEGIN { printf "%-10s %-14s %10d msg/s  %7.3f us CPU/msg\n", l, s, r, (m > 0 ? d / 1e3 / m : 0) }'
}

for round in $(seq "$rounds"); do
  echo "# round $round"
  for t in "$@"; do
    label=${t%%=*}
    start_target "${t#*=}"
    measure "$label" pubsub --mode pubsub --stream sb-pubsub --messages "$n"
    c0=$(chunks sb-stored)
    measure "$label" publish --mode publish --stream sb-stored --messages "$n"
    c1=$(chunks sb-stored)
    [ -n "$data" ] || c0=0
    awk -v l="$label" -v c=$((c1 - c0)) -v n="$n" \
      'BEGIN { printf "%-10s %-14s %10d chunks  %7.0f msg/chunk\n", l, "stored", c, (c > 0 ? n / c : 0) }'
    measure "$label" consume --mode consume --stream sb-stored --messages "$n"
    # The AMQP 0-9-1 stream: filled over the Stream protocol (not measured), then read.
    $pin_c "$perf" --port "$sport" --mode publish --stream sb-amqp --messages "$m" >/dev/null
    measure "$label" amqp_consume --mode amqp-consume --stream sb-amqp --messages "$m"
    for s in sb-pubsub sb-stored sb-amqp; do
      $pin_c "$perf" --port "$sport" --mode delete --stream "$s" >/dev/null 2>&1 || true
    done
    stop_target
  done
done
