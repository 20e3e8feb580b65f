# shellcheck shell=bash disable=SC2034
# Shared by scripts/up, scripts/down, scripts/test, scripts/token and the bench scripts:
# sourced, not run. Paths, logging, package installs, pid files, and
# running PostgreSQL's binaries as the postgres user.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$ROOT/.data"
LOGS="$DATA/logs"

say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

is_root() { [ "$(id -u)" = 0 ]; }

# Installs Debian packages. Services they ship are not started: the
# project starts its own servers on its own ports and directories.
apt_install() {
    is_root || die "missing packages: $*; install them (as root: apt-get install -y $*)"
    say "installing $*"
    local guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        guard=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$guard"
        chmod +x "$guard"
    fi
    local rc=0
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
    } >&2 || rc=$?
    [ -z "$guard" ] || rm -f "$guard"
    [ "$rc" = 0 ] || die "apt-get install $* failed"
}

# PostgreSQL's server binaries (initdb, pg_ctl): PG_BINDIR, pg_config, or
# Debian's PostgreSQL 15 directory. Prints the directory, or nothing.
pg_bindir() {
    local dir
    for dir in "${PG_BINDIR:-}" "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/15/bin; do
        if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            printf '%s\n' "$dir"
            return 0
        fi
    done
    return 1
}

# Installs what is missing of: redis-server, nginx, postgres (server),
# faketime (libfaketime, which a test preloads to skew a gateway's clock).
ensure_packages() {
    local want=() item
    for item in "$@"; do
        case "$item" in
        redis) command -v redis-server >/dev/null 2>&1 || want+=(redis-server redis-tools) ;;
        nginx) command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || want+=(nginx) ;;
        postgres) pg_bindir >/dev/null || want+=(postgresql-15 postgresql-client-15) ;;
        faketime) compgen -G '/usr/lib/*/faketime/libfaketimeMT.so.1' >/dev/null || want+=(libfaketime) ;;
        esac
    done
    [ "${#want[@]}" = 0 ] || apt_install "${want[@]}"
}

# A PostgreSQL binary as the postgres user (the server refuses root), run
# from / so an unreadable working directory does not matter.
as_postgres() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# True when the process in pid file $1 is alive (a zombie, dead but not
# yet reaped, is not).
pid_alive() {
    local pid
    [ -f "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null || true)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid"
}

is_zombie() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat%% *}" = Z ]
}

# A free loopback port: the kernel picks one for a listener that closes at
# once (another process may take it before it is used; callers check).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_redis_server PORT FSYNC DIR PIDFILE LOG [ARG...]: a redis-server on
# 127.0.0.1:PORT and, when DIR is fit for one (socket_dir_ok), on the unix
# socket DIR/redis.sock (redis_url_on), daemonized,
# with the project's persistence: AOF fsynced FSYNC (always, everysec, no),
# no RDB snapshots, AOF rewrites from 1 GiB on (docs/operations.md, "Redis
# disk"; deploy/k8s/datastores/redis.yaml sets the same). Further ARGs go to
# redis-server after these. Waits up to 10 s for PONG, and dies with the
# log's tail if none comes.
start_redis_server() {
    local port="$1" fsync="$2" dir="$3" pidfile="$4" log="$5" i
    shift 5
    local socket=()
    if socket_dir_ok "$dir"; then socket=(--unixsocket "$dir/redis.sock" --unixsocketperm 700); fi
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes \
        --appendfsync "$fsync" --save '' --auto-aof-rewrite-min-size 1gb \
        --daemonize yes --pidfile "$pidfile" --logfile "$log" "${socket[@]}" "$@"
    for ((i = 0; i < 100; i++)); do
        [ "$(redis-cli -p "$port" ping 2>/dev/null || true)" = PONG ] && return 0
        sleep 0.1
    done
    tail -n 20 "$log" >&2 || true
    die "redis did not answer PING on :$port within 10 s (log: $log)"
}

# redis_url_on PORT DIR: the REDIS_URL for the project's processes on this
# machine of a server that start_redis_server started: its unix socket,
# which costs Redis and the gateways 10-13 % less CPU per message than
# loopback TCP (docs/benchmarks.md), or TCP when no server answers on the
# socket (a data directory unfit for one, a Redis started without it) or
# CHAT_REDIS_TRANSPORT=tcp.
redis_url_on() {
    local port="$1" dir="$2"
    case "${CHAT_REDIS_TRANSPORT:-unix}" in
    unix | tcp) ;;
    *) die "CHAT_REDIS_TRANSPORT must be unix or tcp" ;;
    esac
    if [ "${CHAT_REDIS_TRANSPORT:-unix}" = unix ] &&
        [ "$(redis-cli -s "$dir/redis.sock" ping 2>/dev/null || true)" = PONG ]; then
        printf 'unix://%s/redis.sock\n' "$dir"
    else
        printf 'redis://127.0.0.1:%s\n' "$port"
    fi
}

# True when DIR can hold Redis's socket: DIR/redis.sock within the 107
# bytes of a socket path, and DIR plain enough to go into a URL as is.
socket_dir_ok() {
    local LC_ALL=C
    [ "${#1}" -le 90 ] && [[ "$1" =~ ^[A-Za-z0-9/._-]+$ ]]
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Sends SIGTERM to the process in pid file $1, waits up to $2 seconds
# (default 15), then SIGKILL. Removes the pid file. Quiet when none runs.
stop_pidfile() {
    local file="$1" wait="${2:-15}" pid i
    if pid_alive "$file"; then
        pid="$(cat "$file")"
        say "stopping $(basename "$file" .pid) (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < wait * 10; i++)); do
            pid_alive "$file" || break
            sleep 0.1
        done
        if pid_alive "$file"; then
            say "$(basename "$file" .pid) did not stop in ${wait}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

# Where PostgreSQL's data lives: .data/postgres, or, when the postgres user
# cannot enter the repository, a directory under /tmp that .data/postgres
# links to. Prints the path (creating nothing).
pg_data_dir() {
    if [ -L "$DATA/postgres" ]; then
        readlink "$DATA/postgres"
    else
        printf '%s\n' "$DATA/postgres"
    fi
}

# The JWT secret: CHAT_JWT_SECRET, else .data/jwt-secret (created by up).
jwt_secret() {
    if [ -n "${CHAT_JWT_SECRET:-}" ]; then
        printf '%s\n' "$CHAT_JWT_SECRET"
    elif [ -s "$DATA/jwt-secret" ]; then
        cat "$DATA/jwt-secret"
    else
        return 1
    fi
}

# Runtime threads for each of `$1` gateways sharing this machine: its share
# of the cores, at least one (GATEWAY_WORKER_THREADS in README.md).
gateway_threads() {
    local share=$(($(nproc) / $1))
    echo $((share > 0 ? share : 1))
}
