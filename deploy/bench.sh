#!/usr/bin/env bash
# Runs latchkey's benchmark: every scenario, release build, against a private redis-server and
# (for the PostgreSQL reduce-stock runs) a private PostgreSQL, both on free loopback ports.
# Writes the table to stdout and JSON to target/bench.json. Extra arguments go to
# latchkey-bench (e.g. `hot-lock --duration 20s`; see `latchkey-bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/needs.sh
need_cargo
need_redis
need_test_postgres

cargo build --release --locked --bins
args=("$@")
if [ ${#args[@]} -eq 0 ]; then args=(all); fi
./target/release/latchkey-bench "${args[@]}" \
    --postgres-url "$LATCHKEY_TEST_DATABASE_URL" --json target/bench.json
