#!/usr/bin/env bash
# Counts the instructions latchkey itself runs per uncontended Acquire+Release pair, with
# valgrind's callgrind. Unlike throughput, the count does not move with a shared VM's speed or
# with what the host steals, so two builds can be compared on a noisy machine (see "Latest run"
# in the README).
#
# Starts a private redis-server and latchkey under callgrind on free loopback ports, loads
# latchkey with `latchkey-bench uncontended --addr`, zeroes callgrind's counts once the first
# row is under way, counts for SECONDS, and takes the pairs from latchkey's own Acquire count
# (/metrics). Prints the count per pair and the functions that ran most of it, keeps the
# callgrind data for callgrind_annotate, and stops everything it started. Installs
# redis-server, valgrind and curl with apt-get if they are missing.
#
# Usage: deploy/instructions.sh [SECONDS]        (default 10)
# LATCHKEY_BIN_DIR: the directory holding latchkey and latchkey-bench; without it, the release
# build (built first).
# LATCHKEY_CALLGRIND_OUT: where to keep the callgrind data; without it,
# target/instructions.callgrind (a relative path is taken from the checkout's top directory).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/needs.sh
need_redis
for tool in valgrind curl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "latchkey: installing $tool with apt-get" >&2
        apt_install "$tool"
    fi
done
window=${1:-10}
if [ -z "${LATCHKEY_BIN_DIR:-}" ]; then
    need_cargo
    cargo build --release --locked --bins
    LATCHKEY_BIN_DIR=target/release
fi
out=${LATCHKEY_CALLGRIND_OUT:-target/instructions.callgrind}
mkdir -p "$(dirname "$out")"

work=$(mktemp -d /tmp/latchkey-instructions.XXXXXX)
pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap stop_all EXIT

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
    >"$work/redis.log" 2>&1 &
pids+=($!)

grpc_port=$(free_port)
metrics_port=$(free_port)
# valgrind runs latchkey in its own process: $! is the pid callgrind_control talks to. Under it
# latchkey runs tens of times slower (one thread at a time): a Redis call queued behind 63 others
# may take seconds, which the default Redis timeout would count as Redis being unavailable.
LATCHKEY_LISTEN=127.0.0.1:$grpc_port LATCHKEY_METRICS_LISTEN=127.0.0.1:$metrics_port \
    LATCHKEY_REDIS_URL=redis://127.0.0.1:$redis_port LATCHKEY_REDIS_TIMEOUT=60s \
    LATCHKEY_DATABASE_URL="sqlite://$work/stock.sqlite?mode=rwc" \
    valgrind --tool=callgrind --compress-strings=no --compress-pos=no \
    --callgrind-out-file="$work/callgrind.out.%p" "$LATCHKEY_BIN_DIR/latchkey" serve \
    >"$work/latchkey.log" 2>&1 &
latchkey=$!
pids+=("$latchkey")

# latchkey's granted-Acquire count, empty until the first grant.
acquired() {
    curl -sf "http://127.0.0.1:$metrics_port/metrics" |
        awk '/^latchkey_acquire_seconds_count\{outcome="granted"\}/ { print $2 }'
}
# Waits up to $1 seconds for "$2" (a command) to succeed.
wait_for() {
    local deadline=$((SECONDS + $1))
    until eval "$2"; do
        if [ "$SECONDS" -ge "$deadline" ]; then return 1; fi
        sleep 0.5
    done
}
fail() {
    echo "latchkey: $1; its log:" >&2
    cat "$2" >&2
    exit 1
}

wait_for 300 'curl -sf "http://127.0.0.1:$metrics_port/metrics" >/dev/null' ||
    fail "latchkey under callgrind did not start serving" "$work/latchkey.log"

# Long enough that the window ends inside the first row (64 clients, one connection each).
"$LATCHKEY_BIN_DIR/latchkey-bench" uncontended --addr "127.0.0.1:$grpc_port" \
    --duration "$((window * 2 + 60))s" >"$work/bench.log" 2>&1 &
pids+=($!)
wait_for 300 '[ -n "$(acquired)" ]' ||
    fail "the bench's load never reached latchkey" "$work/bench.log"
sleep 2

callgrind_control --zero "$latchkey" >/dev/null 2>&1
before=$(acquired)
sleep "$window"
after=$(acquired)
callgrind_control --dump=window "$latchkey" >/dev/null 2>&1
pairs=$((after - before))
[ "$pairs" -gt 0 ] || fail "no Acquire was granted during the window" "$work/bench.log"

dump=$(ls -t "$work"/callgrind.out."$latchkey".* | head -n 1)
cp "$dump" "$out"
total=$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")
echo "latchkey at 127.0.0.1:$grpc_port ($LATCHKEY_BIN_DIR/latchkey), $pairs pairs in ${window} s:"
echo "user-space instructions per uncontended Acquire+Release pair: $((total / pairs))"
echo "the functions that ran the most of them (their own instructions;" \
    "all of them: callgrind_annotate $out):"
# Thread entry points show (nearly) everything below them, callgrind folding the recursion in
# the Tokio worker loop into them: no function that really runs 90% of the instructions itself.
# (awk reads to the end, so no part of the pipe dies of SIGPIPE and fails the script.)
callgrind_annotate --auto=no --threshold=100 "$out" |
    awk '/file:function/ { on = 1; getline; next }
         on && NF && !/\((100\.0|9[0-9]\.[0-9]+)%\)/ && ++shown <= 20 { print substr($0, 1, 160) }'
