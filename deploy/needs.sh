# Sourced by deploy/run.sh and deploy/test.sh: installs what latchkey needs on a fresh
# Debian-like machine, with apt-get, only when it is missing.

apt_install() {
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    if [ -z "${LATCHKEY_APT_UPDATED:-}" ]; then
        $sudo apt-get update -qq
        LATCHKEY_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

need_redis() {
    if ! command -v redis-server >/dev/null 2>&1; then
        echo "latchkey: installing redis-server with apt-get" >&2
        apt_install redis-server
    fi
}

need_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "latchkey: cargo is missing; install Rust with rustup (https://rustup.rs) first" >&2
        exit 1
    fi
}

# A free TCP port on loopback (nothing answers a connect to it).
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

# Unless LATCHKEY_TEST_DATABASE_URL is set, starts a private PostgreSQL cluster (initdb +
# pg_ctl, as the postgres user when run as root) on a free loopback port, exports its URL as
# LATCHKEY_TEST_DATABASE_URL, and removes it on exit. Installs PostgreSQL if missing.
need_test_postgres() {
    if [ -n "${LATCHKEY_TEST_DATABASE_URL:-}" ]; then return; fi
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
        echo "latchkey: installing PostgreSQL with apt-get" >&2
        apt_install postgresql
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    LATCHKEY_PG_DIR=$(mktemp -d /tmp/latchkey-pg.XXXXXX)
    local port run_as=()
    port=$(free_port)
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$LATCHKEY_PG_DIR"
        run_as=(runuser -u postgres --)
    fi
    LATCHKEY_PG_CTL=("${run_as[@]}" "$bin/pg_ctl" -D "$LATCHKEY_PG_DIR/data")
    "${run_as[@]}" "$bin/initdb" -D "$LATCHKEY_PG_DIR/data" -U postgres -A trust >/dev/null
    # fsync off: a throwaway cluster for tests; crash safety is PostgreSQL's business, not ours.
    "${LATCHKEY_PG_CTL[@]}" -w -l "$LATCHKEY_PG_DIR/log" \
        -o "-p $port -k $LATCHKEY_PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" \
        start >/dev/null
    trap 'stop_test_postgres' EXIT
    export LATCHKEY_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
    echo "latchkey: private PostgreSQL for tests at $LATCHKEY_TEST_DATABASE_URL" >&2
}

stop_test_postgres() {
    "${LATCHKEY_PG_CTL[@]}" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$LATCHKEY_PG_DIR"
}
