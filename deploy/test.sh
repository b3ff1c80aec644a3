#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and integration tests.
# Installs redis-server with apt-get if it is missing. Tests start their own private
# redis-server processes on free loopback ports; nothing on port 6379 is used or needed.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/needs.sh
need_cargo
need_redis

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked "$@"
