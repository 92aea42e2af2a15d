#!/usr/bin/env bash
# The Stream-protocol consume from first against the kernel's own cost of sending the
# same bytes (method and results: docs/benchmarks.md, "Where the consume's CPU goes").
#
#   bench/stream_floor.sh [-n MESSAGES] [-r ROUNDS] [-P SPORT:APORT] [-R RABBIT_SPORT] WARREN STREAM_PERF
#
# Publishes MESSAGES (16 B, confirms, batches of 100) to a fresh warren (and, with -R,
# to the RabbitMQ whose stream port that is), then per round: consumes them all from
# first from warren (and RabbitMQ), msg/s and broker CPU per message
# (/proc/<pid>/task/*/schedstat), then "floor": the same segment file sent whole to a
# loopback socket with sendfile(2) in 256 KiB calls, by a bare sender (python3) whose
# reader only drains: its CPU per message is what the kernel charges the sender for
# the bytes, with no protocol, credit or wake-up around them. Broker and sender on
# CPU 0, clients and the drain on CPU 1.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
n=10000000 rounds=3 ports=5690:5691 rport=""
while getopts "n:r:P:R:" o; do
  case $o in n) n=$OPTARG ;; r) rounds=$OPTARG ;; P) ports=$OPTARG ;; R) rport=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
[ $# -eq 2 ] || { sed -n 2,14p "$0"; exit 2; }
bin=$1 perf=$2
IFS=: read -r sport aport <<<"$ports"
data=$(mktemp -d /tmp/warren-floor.XXXXXX)
WARREN_AMQP_PORT=$aport WARREN_STREAM__LISTENERS__TCP__DEFAULT=$sport WARREN_ADMIN_ENABLED=false \
  WARREN_DATA_DIR=$data $pin_b "$bin" >/dev/null 2>&1 &
wpid=$!
trap 'kill $wpid 2>/dev/null; wait $wpid 2>/dev/null; rm -rf "$data"' EXIT
wait_port "$sport"
rpid=""
if [ -n "$rport" ]; then
  rpid=$(pgrep -f beam.smp | head -1)
  [ -n "$pin_b" ] && taskset -a -pc 0 "$rpid" >/dev/null
fi
$pin_c "$perf" --port "$sport" --mode publish --stream floor --messages "$n" | tail -1
[ -n "$rport" ] && $pin_c "$perf" --port "$rport" --mode publish --stream floor --messages "$n" | tail -1
seg=$(ls "$data"/streams/*/*.segment | head -1)
bytes=$(stat -c %s "$seg")
awk -v b="$bytes" -v n="$n" 'BEGIN { printf "warren segment: %d bytes, %.1f per message\n", b, b / n }'

# Sender CPU in ns for the whole file, in 256 KiB sendfile(2) calls.
floor() {
  $pin_b python3 - "$seg" "$pin_c" <<'EOF'
import os, resource, socket, subprocess, sys
path, pin = sys.argv[1], sys.argv[2].split()
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
drain = subprocess.Popen(pin + [sys.executable, "-c", f"""
import socket
s = socket.create_connection(("127.0.0.1", {srv.getsockname()[1]}))
b = bytearray(1 << 20)
while s.recv_into(b): pass
"""])
c, _ = srv.accept()
fd = os.open(path, os.O_RDONLY); size = os.fstat(fd).st_size
r0 = resource.getrusage(resource.RUSAGE_SELF)
pos = 0
while pos < size:
    pos += os.sendfile(c.fileno(), fd, pos, min(1 << 18, size - pos))
r1 = resource.getrusage(resource.RUSAGE_SELF)
c.close(); drain.wait()
print(int((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1e9))
EOF
}

consume() { # label port pid
  local a b out
  a=$(cpu_ns "$3")
  out=$($pin_c "$perf" --port "$2" --mode consume --stream floor --messages "$n" 2>&1 | tail -1)
  b=$(cpu_ns "$3")
  awk -v l="$1" -v r="$(sed -n 's/.* rate=\([0-9]*\).*/\1/p' <<<"$out")" -v d="$(cpu_delta "$a" "$b")" -v n="$n" \
    'BEGIN { printf "%-8s %10d msg/s  %6.2f ns CPU/msg\n", l, r, d / n }'
}

for round in $(seq "$rounds"); do
  echo "# round $round"
  consume warren "$sport" "$wpid"
  [ -n "$rport" ] && consume rabbitmq "$rport" "$rpid"
  awk -v d="$(floor)" -v n="$n" -v b="$bytes" \
    'BEGIN { printf "%-8s %10s        %6.2f ns CPU/msg  (%.0f ns per KiB)\n", "floor", "", d / n, d / (b / 1024) }'
done
[ -n "$rport" ] && $pin_c "$perf" --port "$rport" --mode delete --stream floor >/dev/null 2>&1 || true
