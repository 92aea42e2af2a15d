# Shared by the stream bench scripts (sourced, not run): CPU pinning, a
# process's CPU time by thread, waiting for a port.

# pin_b / pin_c: run on CPU 0 (the broker) / CPU 1 (the client) where there are two.
pin_b="" pin_c=""
if [ "$(nproc)" -ge 2 ]; then pin_b="taskset -c 0" pin_c="taskset -c 1"; fi

# "tid ns" per thread of pid $1: its run time so far (/proc/<pid>/task/*/schedstat).
cpu_ns() { for f in /proc/"$1"/task/*/schedstat; do t=${f%/schedstat}; echo "${t##*/} $(cut -d' ' -f1 "$f" 2>/dev/null)"; done; }

# ns of CPU the threads used between two cpu_ns snapshots $1 and $2 (a thread
# that ended in between is not counted).
cpu_delta() {
  awk 'NR == FNR { a[$1] = $2; next } { d += $2 - ($1 in a ? a[$1] : 0) } END { printf "%.0f", d }' \
    <(echo "$1") <(echo "$2")
}

# Wait (at most 10 s) until 127.0.0.1:$1 takes connections.
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; }
