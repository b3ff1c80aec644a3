#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and integration tests.
# Installs redis-server and PostgreSQL with apt-get if they are missing. Tests start their own
# private redis-server processes on free loopback ports (nothing on port 6379 is used), and this
# script starts a private PostgreSQL cluster on a free port for the PostgreSQL half of the stock
# tests, unless LATCHKEY_TEST_DATABASE_URL names one (a server where tests may create databases).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/needs.sh
need_cargo
need_redis
need_test_postgres

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked "$@"
