#!/usr/bin/env bash
# End-to-end persister throughput, for docs/benchmarks-persister.md.
#
#   REDIS_URL=redis://127.0.0.1:PORT PG_URL=postgres://postgres@127.0.0.1:PORT \
#     persister/bench/e2e.sh [JOBS=300000] [PERSISTERS=1] [RUNS=3]
#
# It starts no server: give it a Redis it may wipe the keys chat:queue and
# chat:dead of, and a PostgreSQL cluster where it may drop and create the
# databases persister_bench and persister_bench_copy. Build first:
#   cargo build --release -p persister --bin persister --example ladder
#
# Each run: fresh migrated database, JOBS message jobs queued (ladder fill),
# CHECKPOINT, then PERSISTERS release persisters started at once; the time is
# from their start until XLEN chat:queue is 0 (every job stored, acked and
# deleted). Then the same rows are written with a plain binary COPY into a
# fresh migrated database (ladder copy), in the same run. Prints one line per
# run and the medians. Extra persister settings pass through the environment
# (PERSISTER_BATCH_SIZE, ...); IDS=v4 queues random message ids instead of
# time-ordered ones; NICE=-10 runs the persisters and the COPY client at that
# priority (on a machine shared with other work; renice the servers too).
set -euo pipefail
PRIO=()
[ -z "${NICE:-}" ] || PRIO=(nice -n "$NICE")
JOBS=${1:-300000}
PERSISTERS=${2:-1}
RUNS=${3:-3}
: "${REDIS_URL:?set REDIS_URL}" "${PG_URL:?set PG_URL (without a database name)}"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
LOG=${LOG:-$(mktemp /tmp/persister-e2e-XXXX.log)}
[ -x "$BIN/persister" ] && [ -x "$BIN/examples/ladder" ] || {
    echo "build first: cargo build --release -p persister --bin persister --example ladder" >&2
    exit 1
}

fresh_db() { # name
    psql -q "$PG_URL/postgres" -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null
    DATABASE_URL="$PG_URL/$1" RUST_LOG=warn "$BIN/persister" migrate
    psql -q "$PG_URL/$1" -c CHECKPOINT >/dev/null
}

# CPU seconds (user + system) used so far by these processes.
cpu_of() {
    local total=0 pid
    for pid in "$@"; do
        [ -r "/proc/$pid/stat" ] || continue
        total=$(echo "$total + $(awk '{print $14 + $15}' "/proc/$pid/stat") / $(getconf CLK_TCK)" | bc -l)
    done
    echo "$total"
}

# CPU seconds used so far by the Redis server (INFO cpu).
redis_cpu() {
    redis-cli -u "$REDIS_URL" INFO cpu | tr -d '\r' |
        awk -F: '$1 == "used_cpu_sys" || $1 == "used_cpu_user" {t += $2} END {print t}'
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

pids=()
cleanup() { [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT

echo "jobs=$JOBS persisters=$PERSISTERS batch=${PERSISTER_BATCH_SIZE:-default} concurrency=${PERSISTER_CONCURRENCY:-default} ids=${IDS:-v7} cores=$(nproc) log=$LOG"
persister_rates=() copy_rates=()
for run in $(seq 1 "$RUNS"); do
    fresh_db persister_bench
    redis-cli -u "$REDIS_URL" DEL chat:queue chat:dead >/dev/null
    REDIS_URL="$REDIS_URL" "$BIN/examples/ladder" --ids "${IDS:-v7}" fill --jobs "$JOBS" 2>>"$LOG"
    queued=$(redis-cli -u "$REDIS_URL" XLEN chat:queue)
    [ "$queued" = "$JOBS" ] || { echo "queued $queued, expected $JOBS" >&2; exit 1; }

    redis_cpu0=$(redis_cpu)
    start=$(date +%s.%N)
    pids=()
    for i in $(seq 1 "$PERSISTERS"); do
        (REDIS_URL="$REDIS_URL" DATABASE_URL="$PG_URL/persister_bench" PERSISTER_CONSUMER="bench$i" \
            PERSISTER_METRICS_LISTEN=127.0.0.1:0 RUST_LOG=warn exec "${PRIO[@]}" "$BIN/persister" run >/dev/null 2>>"$LOG") &
        pids+=($!)
    done
    # One redis-cli polling every 20 ms (a process per poll would cost CPU).
    redis-cli -u "$REDIS_URL" -r -1 -i 0.02 XLEN chat:queue |
        while read -r left; do [ "$left" != 0 ] || break; done || true
    end=$(date +%s.%N)
    redis_cpu1=$(redis_cpu)
    cpu=$(cpu_of "${pids[@]}")
    # The persisters' PostgreSQL backends (same machine), before they exit.
    backends=$(psql -At "$PG_URL/postgres" -c \
        "SELECT pid FROM pg_stat_activity WHERE datname = 'persister_bench' AND application_name = 'persister'")
    # shellcheck disable=SC2086
    pg_cpu=$(cpu_of $backends)
    r_cpu=$(echo "$redis_cpu1 - $redis_cpu0" | bc -l)
    kill "${pids[@]}"
    wait "${pids[@]}" || true
    pids=()
    stored=$(psql -At "$PG_URL/persister_bench" -c "SELECT count(*) FROM messages")
    [ "$stored" = "$JOBS" ] || { echo "stored $stored rows, expected $JOBS" >&2; exit 1; }
    secs=$(echo "$end - $start" | bc -l)
    p_rate=$(echo "$JOBS / $secs" | bc -l)

    fresh_db persister_bench_copy
    c_line=$(DATABASE_URL="$PG_URL/persister_bench_copy" "${PRIO[@]}" "$BIN/examples/ladder" --ids "${IDS:-v7}" copy --jobs "$JOBS" \
        --batch "${PERSISTER_BATCH_SIZE:-5000}" 2>>"$LOG")
    c_rate=$(echo "$c_line" | awk '{print $(NF-1)}')
    printf 'run %d: persister %.2f s = %.0f rows/s; plain COPY %.0f rows/s; persister/COPY %.0f%%; load %s\n' \
        "$run" "$secs" "$p_rate" "$c_rate" "$(echo "100 * $p_rate / $c_rate" | bc -l)" "$(cut -d' ' -f1 /proc/loadavg)"
    us() { echo "1000000 * $1 / $JOBS" | bc -l; }
    printf '       CPU per job: persister %.1f us, PostgreSQL backends %.1f us, Redis %.1f us; 2 cores / total = %.0f jobs/s\n' \
        "$(us "$cpu")" "$(us "$pg_cpu")" "$(us "$r_cpu")" "$(echo "2 * $JOBS / ($cpu + $pg_cpu + $r_cpu)" | bc -l)"
    persister_rates+=("$p_rate") copy_rates+=("$c_rate")
done
pm=$(printf '%s\n' "${persister_rates[@]}" | median)
cm=$(printf '%s\n' "${copy_rates[@]}" | median)
printf 'median of %d: persister %.0f rows/s, plain COPY %.0f rows/s, persister/COPY %.0f%%\n' \
    "$RUNS" "$pm" "$cm" "$(echo "100 * $pm / $cm" | bc -l)"
