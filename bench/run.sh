#!/usr/bin/env bash
# Measures ratelimit-policyd against the DUNNO floor and prints the tables of
# BENCHMARKS.md. Loopback only; everything it starts is stopped on exit.
#
#   bench/run.sh [RUNS] [SECONDS]      # defaults: 3 runs of 3 s per cell
#
# Every cell runs the floor and the daemon alternately, RUNS times each, and
# reports medians; the ratio is daemon/floor from the same cell, so machine
# noise mostly cancels. Senders are preloaded (SQLite) so the daemon is in
# its steady state: every sender already cached.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${1:-3}
SECS=${2:-3}
B=$ROOT/target/release
(cd "$ROOT" && cargo build --release --quiet --bins)

WORK=$(mktemp -d /tmp/rl-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
FLOOR=$(free_port)
"$B/ratelimit-loadgen" floor --listen "127.0.0.1:$FLOOR" 2>/dev/null &
PIDS+=($!)

# daemon USERS FLUSH [URL]: starts the daemon on a database with USERS
# senders; sets DAEMON_PID, PORT, DIR.
daemon() {
    DIR=$WORK/d$1-$RANDOM
    mkdir -p "$DIR"
    PORT=$(free_port)
    local url=${3:-sqlite://$DIR/r.db}
    if [[ $url == sqlite* ]]; then
        "$B/ratelimit-loadgen" populate-sqlite --path "$DIR/r.db" --users "$1" 2>/dev/null
    fi
    cat > "$DIR/c.toml" <<EOF
listen = "127.0.0.1:$PORT"
control_socket = "$DIR/control.sock"
[limits]
default_quota = 1000000000
timezone = "UTC"
[database]
url = "$url"
flush_interval = "$2"
[log]
syslog = false
file = "$DIR/daemon.log"
level = "notice"
EOF
    "$B/ratelimit-policyd" run --config "$DIR/c.toml" --quiet &
    DAEMON_PID=$!
    PIDS+=("$DAEMON_PID")
    for _ in $(seq 1 600); do
        "$B/ratelimit-policyd" status --config "$DIR/c.toml" --top 0 >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "daemon did not start" >&2
    exit 1
}
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
# reread NAME: three full re-reads (`reload`) of the running daemon's rows,
# timed, with its RSS before and after.
reread() {
    local before times=() t0 t1
    before=$(rss_kib "$DAEMON_PID")
    for _ in 1 2 3; do
        t0=$(date +%s.%N)
        "$B/ratelimit-policyd" reload --config "$DIR/c.toml" >/dev/null
        t1=$(date +%s.%N)
        times+=("$(python3 -c "print(f'{$t1 - $t0:.2f}')")")
    done
    echo "- $1, 1M rows: a full re-read (\`reload\`) took ${times[*]} s; RSS ${before} → $(rss_kib "$DAEMON_PID") KiB."
}
load() { "$B/ratelimit-loadgen" run --target "127.0.0.1:$1" -c "$2" -u "$3" --duration "$SECS" --warmup 1 --json; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(date -u +%Y-%m-%d)"
echo
echo "## Throughput and latency: daemon vs floor (medians of $RUNS runs of ${SECS} s)"
echo
echo "| senders | C | floor req/s | daemon req/s | daemon/floor | daemon p50 µs | p99 µs | p99.9 µs | floor p99 µs |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for users in 1000 100000 1000000; do
    daemon "$users" 3600s
    [ "$users" = 1000 ] && RSS_SMALL=$(rss_kib "$DAEMON_PID")
    [ "$users" = 1000000 ] && RSS_BIG=$(rss_kib "$DAEMON_PID") && LOAD_1M=$(grep -o 'loaded 1000000 counters from sqlite in [^ ]*' "$DIR/daemon.log")
    for c in 1 8 64 256; do
        for _ in $(seq 1 "$RUNS"); do
            load "$FLOOR" "$c" "$users" | sed 's/^/floor /'
            load "$PORT" "$c" "$users" | sed 's/^/daemon /'
        done > "$WORK/cell.txt"
        python3 - "$users" "$c" "$WORK/cell.txt" <<'EOF'
import json, statistics, sys
users, c, path = sys.argv[1], sys.argv[2], sys.argv[3]
runs = {"floor": [], "daemon": []}
for line in open(path):
    who, data = line.split(" ", 1)
    runs[who].append(json.loads(data))
med = lambda who, f: statistics.median(f(r) for r in runs[who])
f = med("floor", lambda r: r["req_per_sec"])
d = med("daemon", lambda r: r["req_per_sec"])
lat = lambda who, k: int(med(who, lambda r: r["latency_us"][k]))
print(f"| {int(users):,} | {c} | {f:,.0f} | {d:,.0f} | {d / f:.2f} | {lat('daemon','p50')} | {lat('daemon','p99')} | {lat('daemon','p999')} | {lat('floor','p99')} |")
EOF
    done
    [ "$users" = 1000000 ] && REREAD_SQLITE=$(reread SQLite)
    kill "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true
done

echo
echo "## Memory and start-up"
echo
echo "- RSS with 1k senders: ${RSS_SMALL} KiB; with 1M senders: ${RSS_BIG} KiB;" \
    "$(( (RSS_BIG - RSS_SMALL) * 1024 / 999000 )) bytes per cached sender."
echo "- SQLite, 1M rows: ${LOAD_1M}."
echo "$REREAD_SQLITE"

# MariaDB, if there is one: 1M rows loaded at start.
MYSQL="mariadb --protocol=tcp -h127.0.0.1 -P3306 -uroot"
if $MYSQL -e "SELECT 1" >/dev/null 2>&1; then
    DB=rl_bench_$$
    $MYSQL -e "CREATE DATABASE $DB CHARACTER SET utf8"
    $MYSQL "$DB" < "$ROOT/schema.sql"
    $MYSQL "$DB" -e "INSERT INTO ratelimit (sender, quota, used, expiry) SELECT CONCAT('user', seq, '@example.com'), 1000000000, 0, 4102444800 FROM seq_0_to_999999"
    daemon 1000000 3600s "mysql://root@127.0.0.1:3306/$DB"
    echo "- MariaDB, 1M rows: $(grep -o 'loaded 1000000 counters from mysql in [^ ]*' "$DIR/daemon.log")."
    reread MariaDB
    kill "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true
    $MYSQL -e "DROP DATABASE $DB"
fi

echo
echo "## Flushing 100k changed rows under load (SQLite, 1M cached senders)"
echo
daemon 1000000 3600s
"$B/ratelimit-loadgen" run --target "127.0.0.1:$PORT" -c 64 -u 100000 --duration 8 --warmup 0 --json > /dev/null
pending=$("$B/ratelimit-policyd" status --config "$DIR/c.toml" --json --top 0 | python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["pending_rows"])')
quiet=$(load "$PORT" 64 100000)
"$B/ratelimit-loadgen" run --target "127.0.0.1:$PORT" -c 64 -u 100000 --duration 4 --warmup 0 --json > "$WORK/during.json" &
LG=$!
sleep 1
start=$(date +%s.%N)
msg=$("$B/ratelimit-policyd" flush --config "$DIR/c.toml")
took=$(python3 -c "print(f'{$(date +%s.%N) - $start:.2f}')")
wait $LG
python3 - "$pending" "$msg" "$took" "$quiet" "$(cat "$WORK/during.json")" <<'EOF'
import json, sys
pending, msg, took, quiet, during = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5])
print(f"- {pending} rows pending; `ratelimit-policyd flush` answered \"{msg}\" after {took} s.")
q, d = quiet["latency_us"], during["latency_us"]
print(f"- Requests (64 connections, 100k senders) without a flush: p99 {q['p99']} µs, p99.9 {q['p999']} µs, max {q['max']} µs;")
print(f"  during a 4 s run containing the flush: p99 {d['p99']} µs, p99.9 {d['p999']} µs, max {d['max']} µs ({during['req_per_sec']:,.0f} req/s).")
EOF
