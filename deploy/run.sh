#!/usr/bin/env bash
# Runs latchkey on this machine: installs redis-server with apt-get if it is missing, starts it
# on 127.0.0.1:6379 (no persistence) unless a Redis already answers there or
# LATCHKEY_REDIS_URL points elsewhere, then serves on LATCHKEY_LISTEN (127.0.0.1:50051).
# Extra arguments go to `latchkey serve` (see `latchkey serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/needs.sh
need_cargo

if [ -z "${LATCHKEY_REDIS_URL:-}" ]; then
    need_redis
    mkdir -p target
    if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
        echo "latchkey: starting redis-server on 127.0.0.1:6379" >&2
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            --logfile "$PWD/target/redis-6379.log" --dir "$PWD/target" >/dev/null
    fi
fi

cargo build --release --locked
exec ./target/release/latchkey serve "$@"
