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
