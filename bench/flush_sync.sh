#!/usr/bin/env bash
# Times SQLite flushes: 20 flushes of 100 changed senders each, taken from
# the daemon's own debug line ("flushed N rows in T"), on the disk of the
# current directory. Prints the median.
#
#   bench/flush_sync.sh [BINARY]      # default: target/release/ratelimit-policyd
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/ratelimit-policyd}
LG=$ROOT/target/release/ratelimit-loadgen
(cd "$ROOT" && cargo build --release --quiet --bins)
W=$(mktemp -d "$PWD/rl-flush.XXXXXX")
trap 'kill "$P" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"' EXIT
cat > "$W/c.toml" <<EOT
listen = "127.0.0.1:0"
control_socket = "$W/control.sock"
[limits]
default_quota = 1000000000
timezone = "UTC"
[database]
url = "sqlite://$W/r.db"
flush_interval = "1h"
[log]
syslog = false
level = "debug"
EOT
"$BIN" --config "$W/c.toml" > "$W/log" 2>&1 &
P=$!
for _ in $(seq 1 100); do grep -q listening "$W/log" && break; sleep 0.1; done
ADDR=$(grep -o 'listening on [^ ]*' "$W/log" | cut -d' ' -f3)
for _ in $(seq 1 20); do
    "$LG" run --target "$ADDR" -c 1 -u 100 --duration 0.05 --warmup 0 --json > /dev/null
    "$BIN" --config "$W/c.toml" flush > /dev/null
done
grep -o 'flushed [0-9]* rows in [^ ]*' "$W/log" | awk '{print $5}' | python3 -c '
import re, statistics, sys
unit = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}
ms = [float(m.group(1)) * unit[m.group(2)] for m in (re.match(r"([0-9.]+)(ns|µs|us|ms|s)$", l.strip()) for l in sys.stdin) if m]
print(f"{len(ms)} flushes of 100 rows: median {statistics.median(ms):.2f} ms, max {max(ms):.2f} ms")'
