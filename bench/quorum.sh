#!/usr/bin/env bash
# A 3-node quorum queue, warren against RabbitMQ, side by side in one go.
# Method and results: docs/benchmarks.md ("Quorum queues, 3 nodes").
#
#   bench/quorum.sh [-r ROUNDS] [-d SECS] [-s BYTES] [-q PREFETCH] [-w WARREN] [-p PERF] [-n] [-f TRIALS]
#     -s   message size (default 16)
#     -q   consumer prefetch (default 1000; below 100 every message is acked, else every 100th)
#     -n   warren only (no RabbitMQ cluster)
#     -f   failover instead of throughput: TRIALS times, bench/failover.py kills the
#          leader's node of a fresh quorum queue (kill -9) and measures the time to
#          the next publisher confirm; the killed node is restarted between trials
#     -B   publishing behind a backlog instead: fill a fresh quorum queue with BACKLOG
#          persistent messages of -s bytes (confirms, 1000 in flight), then 4 producers
#          publish to it one message at a time (each waits for its confirm, so each
#          message is one log entry) for -d seconds, no consumer; prints their msg/s
#          and the brokers' CPU per message published
#
# Starts three warren nodes (127.0.0.1..3, one cluster) and three RabbitMQ nodes
# (q1..q3@localhost, one cluster, no plugins), then for every round runs
# examples/perf against each cluster's first node: one producer and one consumer,
# 16-byte persistent messages, publisher confirms (1000 in flight), a fresh
# quorum queue per run (`--queue-type quorum`), consumer prefetch 1000 acking
# every 100. It prints msg/s consumed and the CPU of all three broker processes
# (utime+stime from /proc/<pid>/stat over the run) per message consumed.
set -euo pipefail
rounds=2 secs=10 size=16 prefetch=1000 warren=target/release/warren perf=target/release/examples/perf rabbit=1 trials=0 backlog=0
while getopts "r:d:s:q:w:p:nf:B:" o; do
  case $o in
    r) rounds=$OPTARG ;; d) secs=$OPTARG ;; s) size=$OPTARG ;; q) prefetch=$OPTARG ;; w) warren=$OPTARG ;; p) perf=$OPTARG ;; n) rabbit=0 ;;
    f) trials=$OPTARG rabbit=0 ;; B) backlog=$OPTARG ;; *) exit 2 ;;
  esac
done
tck=$(getconf CLK_TCK)
work=$(mktemp -d /tmp/warren-quorum-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ "$rabbit" = 1 ]; then
    for n in 1 2 3; do rabbitmqctl -n "q$n@localhost" stop >/dev/null 2>&1 || true; done
  fi
  rm -rf "$work"
}
trap cleanup EXIT

wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# --- warren: three nodes ----------------------------------------------------------
warren_pids=()
start_node() { # n: (re)start warren@127.0.0.n on its data directory
  local n=$1 ip=127.0.0.$1 dir=$work/w$1 seeds=""
  mkdir -p "$dir"
  [ "$n" -gt 1 ] && seeds="\"warren@127.0.0.1:25701\""
  cat >"$dir/warren.toml" <<EOF
bind = "$ip"
amqp_port = 5701
admin_port = 15701
data_dir = "$dir"
log = "warn"

[cluster]
node_name = "warren@$ip"
listen = "$ip:25701"
cookie = "quorum-bench"
seeds = [$seeds]
EOF
  "$warren" --config "$dir/warren.toml" >>"$dir/log" 2>&1 &
  pids+=($!)
  warren_pids[$((n - 1))]=$!
  wait_port "$ip" 5701
}
all_running() {
  for _ in $(seq 150); do
    [ "$(curl -s -u guest:guest "http://$1:15701/api/nodes" | grep -o '"running":true' | wc -l)" -ge 3 ] && return 0
    sleep 0.2
  done
  return 1
}
for n in 1 2 3; do start_node "$n"; done
# All three members before measuring (a declare commits once a majority has it).
all_running 127.0.0.1

if [ "$trials" -gt 0 ]; then
  py=target/test-venv/bin/python
  [ -x "$py" ] || py=python3
  for t in $(seq "$trials"); do
    specs=()
    for n in 1 2 3; do
      specs+=("warren@127.0.0.$n,127.0.0.$n,5701,http://127.0.0.$n:15701,${warren_pids[$((n - 1))]}")
    done
    "$py" bench/failover.py "failover-$t-$$" "${specs[@]}"
    for n in 1 2 3; do
      kill -0 "${warren_pids[$((n - 1))]}" 2>/dev/null || start_node "$n"
    done
    all_running 127.0.0.1
  done
  exit 0
fi

# --- RabbitMQ: three nodes ----------------------------------------------------------
rabbit_pids=()
if [ "$rabbit" = 1 ]; then
  : >"$work/plugins"
  for n in 1 2 3; do
    mkdir -p "$work/r$n"
    printf 'listeners.tcp.default = 127.0.0.1:%s\nloopback_users = none\n' $((5710 + n)) >"$work/r$n/rabbitmq.conf"
  done
  # rabbitmq-server runs as the rabbitmq user (Debian's package).
  chmod 755 "$work" && chown -R rabbitmq:rabbitmq "$work/plugins" "$work"/r?
  for n in 1 2 3; do
    env RABBITMQ_NODENAME="q$n@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_NODE_PORT=$((5710 + n)) RABBITMQ_DIST_PORT=$((25710 + n)) \
      RABBITMQ_MNESIA_BASE="$work/r$n/mnesia" RABBITMQ_LOG_BASE="$work/r$n/log" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$work/plugins" RABBITMQ_CONFIG_FILE="$work/r$n/rabbitmq.conf" \
      rabbitmq-server >"$work/r$n.out" 2>&1 &
    wait_port 127.0.0.1 $((5710 + n))
  done
  for n in 2 3; do
    rabbitmqctl -q -n "q$n@localhost" stop_app
    rabbitmqctl -q -n "q$n@localhost" join_cluster q1@localhost
    rabbitmqctl -q -n "q$n@localhost" start_app
  done
  for p in $(pgrep -f beam.smp); do
    grep -qaz "^RABBITMQ_NODENAME=q[123]@localhost$" "/proc/$p/environ" && rabbit_pids+=("$p")
  done
  [ ${#rabbit_pids[@]} -eq 3 ] || { echo "expected 3 RabbitMQ nodes, found ${#rabbit_pids[@]}" >&2; exit 1; }
fi

cpu_ticks() { local s=0; for p in "$@"; do s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $s; }

run_one() { # label uri pids...
  local label=$1 uri=$2 out t0 t1 rate moved
  shift 2
  t0=$(cpu_ticks "$@")
  out=$("$perf" --uri "$uri" -z "$secs" -x1 -y1 -s"$size" -q"$prefetch" --persistent --queue-type quorum \
    --confirm 1000 --multi-ack-every $((prefetch < 100 ? 1 : 100)) 2>&1 | grep '^RESULT' || true)
  t1=$(cpu_ticks "$@")
  moved=$(sed -n 's/.* consumed=\([0-9]*\).*/\1/p' <<<"$out")
  rate=$(sed -n 's/.* consume_rate=\([0-9]*\).*/\1/p' <<<"$out")
  awk -v l="$label" -v r="${rate:-0}" -v m="${moved:-0}" -v d=$((t1 - t0)) -v t="$tck" \
    'BEGIN { printf "%-10s quorum_3_nodes_1p1c_confirms %10d msg/s  %7.2f us CPU/msg (3 nodes)\n", l, r, (m > 0 ? d * 1e6 / t / m : 0) }'
}

run_backlog() { # label uri queue pids...
  local label=$1 uri=$2 queue=$3 out t0 t1 rate moved
  shift 3
  "$perf" --uri "$uri" -x1 -y0 -s"$size" -C "$backlog" -z 600 --persistent --queue-type quorum \
    --confirm 1000 -u "$queue" --keep-queue >/dev/null 2>&1
  t0=$(cpu_ticks "$@")
  out=$("$perf" --uri "$uri" -z "$secs" -x4 -y0 -s"$size" --persistent --queue-type quorum \
    --confirm 1 -u "$queue" --keep-queue 2>&1 | grep '^RESULT' || true)
  t1=$(cpu_ticks "$@")
  moved=$(sed -n 's/.* published=\([0-9]*\).*/\1/p' <<<"$out")
  rate=$(sed -n 's/.* publish_rate=\([0-9]*\).*/\1/p' <<<"$out")
  awk -v l="$label" -v r="${rate:-0}" -v m="${moved:-0}" -v d=$((t1 - t0)) -v t="$tck" -v b="$backlog" \
    'BEGIN { printf "%-10s quorum_behind_%d_4p_confirm_each %8d msg/s  %7.2f us CPU/msg (3 nodes)\n", l, b, r, (m > 0 ? d * 1e6 / t / m : 0) }'
}

for round in $(seq "$rounds"); do
  echo "# round $round"
  if [ "$backlog" -gt 0 ]; then
    run_backlog warren "amqp://guest:guest@127.0.0.1:5701/%2f" "backlog-$round" "${warren_pids[@]}"
    if [ "$rabbit" = 1 ]; then
      run_backlog rabbitmq "amqp://guest:guest@127.0.0.1:5711/%2f" "backlog-$round" "${rabbit_pids[@]}"
    fi
    continue
  fi
  run_one warren "amqp://guest:guest@127.0.0.1:5701/%2f" "${warren_pids[@]}"
  if [ "$rabbit" = 1 ]; then
    run_one rabbitmq "amqp://guest:guest@127.0.0.1:5711/%2f" "${rabbit_pids[@]}"
  fi
done
