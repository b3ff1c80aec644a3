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

# A free TCP port on loopback (nothing answers a connect to it), below the kernel's ephemeral
# range, so an outgoing connection's local port cannot take it between this check and the bind.
free_port() {
    local port low
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || low=32768
    if [ "$low" -le 10000 ]; then low=65536; fi
    while :; do
        port=$((10000 + RANDOM % (low - 10000)))
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
    local port run_as=() try
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$LATCHKEY_PG_DIR"
        run_as=(runuser -u postgres --)
    fi
    LATCHKEY_PG_CTL=("${run_as[@]}" "$bin/pg_ctl" -D "$LATCHKEY_PG_DIR/data")
    # From here on the directory (and any server started in it) goes when the script ends.
    trap 'stop_test_postgres' EXIT
    "${run_as[@]}" "$bin/initdb" -D "$LATCHKEY_PG_DIR/data" -U postgres -A trust >/dev/null
    # Another process may still take the port first: then try another one.
    for try in 1 2 3 4 5; do
        port=$(free_port)
        # fsync off: a throwaway cluster for tests; crash safety is PostgreSQL's business.
        if "${LATCHKEY_PG_CTL[@]}" -w -l "$LATCHKEY_PG_DIR/log" \
            -o "-p $port -k $LATCHKEY_PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" \
            start >/dev/null; then
            break
        fi
        if [ "$try" = 5 ]; then
            echo "latchkey: the test PostgreSQL did not start; its log:" >&2
            cat "$LATCHKEY_PG_DIR/log" >&2
            exit 1
        fi
        echo "latchkey: the test PostgreSQL could not start on port $port; trying another" >&2
    done
    export LATCHKEY_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
    echo "latchkey: private PostgreSQL for tests at $LATCHKEY_TEST_DATABASE_URL" >&2
}

stop_test_postgres() {
    "${LATCHKEY_PG_CTL[@]}" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$LATCHKEY_PG_DIR"
}
