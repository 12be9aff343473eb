#!/usr/bin/env bash
# queue-ws.sh — the waiting room at scale, in one command: builds the release binaries, starts a
# throwaway Redis + Postgres (devstack run), booking-api and queue-server with raised limits, runs
# `loadtest queue --fans $FANS` (19,000 WebSockets in the one queue-server process by default,
# held by client processes of loadtest over 127.0.x.y source addresses, beside a minimal
# tokio-tungstenite broadcast server measured the same way), prints the report, stops everything.
#
# Usage: bench/queue-ws.sh [extra loadtest queue options...]
#        SCENARIO=sale bench/queue-ws.sh [loadtest sale options...]
#   The same stack for the whole sale: bench/sale.sh (its script baselines, then `loadtest
#   sale`) runs against it instead of `loadtest queue`; FANS is then the sale's sockets
#   (--ws-fans), which size queue-server's connection cap, e.g.
#   SCENARIO=sale bench/queue-ws.sh --fans 50000 --ws-fans 19000 --stock 5000 --check
#   e.g. FANS=2000 bench/queue-ws.sh --rate-per-s 20 --admit-window-s 30
#        bench/queue-ws.sh --check        # exit 1 when a bar is missed
#
# Environment:
#   FANS                 sockets (one fan each)                              [19000]
#   SCENARIO             queue, or sale (above)                              [queue]
#   REDIS_PORT, PG_PORT, BOOKING_PORT, QUEUE_PORT, BASELINE_PORT
#                        ports on 127.0.0.1                    [7201 7202 7203 7204 7205]
#   STACK_NAME           devstack stack name ("test…" names start from empty state) [test-queue-ws]
#   OUT_DIR              report, logs, machine state, copies of the binaries run
#                                                   [$CARGO_TARGET_DIR/bench/queue-ws-<timestamp>]
#   SKIP_BUILD=1         use the release binaries already built
#   BIN_DIR              take loadtest, queue-server, booking-api and devstack from this directory
#                        (no build): pin one build for a series of runs
#   KEEP_BINARIES=1      keep the copies of the binaries in OUT_DIR/bin after the run (≈ 200 MB;
#                        by default only their SHA-256 sums stay, in OUT_DIR/binaries.sha256)
#   QUEUE_ENV            extra environment for queue-server, e.g.
#                        "FLOODGATE_QUEUE__BROADCAST_INTERVAL_MS=500" (pass the same
#                        --broadcast-interval-ms to loadtest so the baseline broadcasts alike)
#
# Limits: queue-server gets `ulimit -n` raised to the hard limit (one file per socket, plus
# Redis, the listener and the runtime's own), `queue.max_connections` = FANS + 200, and the
# per-IP join limit raised out of the way (the benchmark measures the room, not the limiter).
# booking-api's per-IP and per-fan limits are raised the same way for the fan-session setup.
#
# The binaries are copied into OUT_DIR before anything starts: the target directory may be
# shared, and a build from another checkout must not swap a binary in the middle of a run. Their
# SHA-256 sums stay with the report; the copies go when the run ends unless KEEP_BINARIES=1.
#
# Exit code: loadtest's (0; 1 with --check when a bar is missed), 2 on a setup error.
set -euo pipefail

cd "$(dirname "$0")/.."

die() {
    echo "queue-ws: $*" >&2
    exit 2
}

FANS=${FANS:-19000}
REDIS_PORT=${REDIS_PORT:-7201}
PG_PORT=${PG_PORT:-7202}
BOOKING_PORT=${BOOKING_PORT:-7203}
QUEUE_PORT=${QUEUE_PORT:-7204}
BASELINE_PORT=${BASELINE_PORT:-7205}
STACK_NAME=${STACK_NAME:-test-queue-ws}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
QUEUE_ENV=${QUEUE_ENV:-}
# Files queue-server needs besides its sockets: Redis connections, listener, epoll, logs, ...
SPARE_FILES=500
# How long a server gets to answer GET /readyz.
READY_TIMEOUT_S=60

if [[ ${1:-} != --inner ]]; then
    OUT_DIR=${OUT_DIR:-$TARGET_DIR/bench/queue-ws-$(date +%Y%m%d-%H%M%S)}
    mkdir -p "$OUT_DIR/bin"
    OUT_DIR=$(cd "$OUT_DIR" && pwd)
    FROM=${BIN_DIR:-$TARGET_DIR/release}
    if [[ -z ${SKIP_BUILD:-} && -z ${BIN_DIR:-} ]]; then
        echo "queue-ws: building release binaries" >&2
        cargo build --release -p floodgate-loadtest -p floodgate-queue-server \
            -p floodgate-booking-api -p floodgate-devstack >&2
    fi
    for bin in loadtest queue-server booking-api devstack; do
        [[ -x $FROM/$bin ]] || die "$FROM/$bin is missing (build, or unset SKIP_BUILD / BIN_DIR)"
        cp "$FROM/$bin" "$OUT_DIR/bin/"
    done
    (cd "$OUT_DIR" && sha256sum bin/*) > "$OUT_DIR/binaries.sha256"
    "$OUT_DIR/bin/loadtest" queue --help >/dev/null 2>&1 ||
        die "$FROM/loadtest has no queue scenario (a build from another checkout replaced it?)"
    git log -1 --format='%H %s' > "$OUT_DIR/commit.txt" 2>/dev/null || true

    # One open file per socket in queue-server; the client processes split theirs.
    ulimit -n "$(ulimit -Hn)"
    limit=$(ulimit -n)
    if [[ $limit != unlimited ]] && (( limit < FANS + SPARE_FILES )); then
        die "open-file limit $limit is below $FANS sockets + $SPARE_FILES; lower FANS or raise ulimit -Hn"
    fi
    export OUT_DIR FANS REDIS_PORT PG_PORT BOOKING_PORT QUEUE_PORT BASELINE_PORT QUEUE_ENV
    export SCENARIO=${SCENARIO:-queue}
    export KEEP_BINARIES=${KEEP_BINARIES:-}
    exec "$OUT_DIR/bin/devstack" run --name "$STACK_NAME" --redis-port "$REDIS_PORT" \
        --pg-port "$PG_PORT" -- bash "$0" --inner "$@"
fi
shift

# Inside `devstack run`: REDIS_URL and DATABASE_URL point at the throwaway stack.
BIN=$OUT_DIR/bin
secret() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }
# Fan tokens signed by booking-api must verify in queue-server: the same fresh secrets for both.
# Quoted: figment would read a secret of digits only as a number.
export FLOODGATE_DATABASE_URL=$DATABASE_URL
export FLOODGATE_REDIS_URL=$REDIS_URL
export FLOODGATE_DEV_IDENTITY=true
export FLOODGATE_IDENTITY__DEV_SECRET="\"$(secret)\""
export FLOODGATE_ADMISSION__SECRETS="[\"$(secret)\"]"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    # devstack runs from its copy too; Linux lets a running binary's file go.
    [[ -n ${KEEP_BINARIES:-} ]] || rm -rf "$OUT_DIR/bin"
}
trap cleanup EXIT

key() { # key SCOPE → a new API key (create-key prints it on its last line; applies migrations)
    "$BIN/booking-api" create-key --scope "$1" --name "bench-queue-ws-$1" | awk 'NF { k = $0 } END { print k }'
}
SELLER_KEY=$(key seller) || die "booking-api create-key failed"
OPS_KEY=$(key ops) || die "booking-api create-key failed"
[[ -n $SELLER_KEY && -n $OPS_KEY ]] || die "booking-api create-key printed no key"

FLOODGATE_HTTP__LISTEN=127.0.0.1:$BOOKING_PORT \
FLOODGATE_LIMITS__PER_IP_PER_S=1000000 FLOODGATE_LIMITS__PER_IP_BURST=1000000 \
FLOODGATE_LIMITS__PER_FAN_PER_S=1000000 FLOODGATE_LIMITS__PER_FAN_BURST=1000000 \
    "$BIN/booking-api" serve > "$OUT_DIR/booking-api.log" 2>&1 &
pids+=($!)

# shellcheck disable=SC2086 # QUEUE_ENV is a list of NAME=value words
env FLOODGATE_QUEUE__LISTEN=127.0.0.1:$QUEUE_PORT \
    FLOODGATE_QUEUE__BOOKING_PUBLIC_URL=http://127.0.0.1:$BOOKING_PORT \
    FLOODGATE_QUEUE__MAX_CONNECTIONS=$((FANS + 200)) \
    FLOODGATE_QUEUE__PER_IP_JOIN_PER_S=1000000 FLOODGATE_QUEUE__PER_IP_JOIN_BURST=1000000 \
    FLOODGATE_QUEUE__PER_IP_PER_S=1000000 FLOODGATE_QUEUE__PER_IP_BURST=1000000 \
    $QUEUE_ENV "$BIN/queue-server" > "$OUT_DIR/queue-server.log" 2>&1 &
QUEUE_PID=$!
pids+=("$QUEUE_PID")

wait_ready() { # wait_ready NAME PORT
    local deadline=$((SECONDS + READY_TIMEOUT_S))
    until curl -fsS "http://127.0.0.1:$2/readyz" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || { tail -20 "$OUT_DIR/$1.log" >&2; die "$1 not ready on :$2"; }
        sleep 0.25
    done
}
wait_ready booking-api "$BOOKING_PORT"
wait_ready queue-server "$QUEUE_PORT"

machine_state() { # machine_state FILE
    {
        date -u +%Y-%m-%dT%H:%M:%SZ
        uptime
        top -bn1 | head -15
    } > "$1" 2>&1 || true
}
machine_state "$OUT_DIR/machine-before.txt"
echo "queue-ws: $(uptime)" >&2
echo "queue-ws: queue-server pid $QUEUE_PID (open files $(ulimit -n)); output in $OUT_DIR" >&2

set +e
if [[ $SCENARIO == sale ]]; then
    BOOKING_URL=http://127.0.0.1:$BOOKING_PORT QUEUE_URL=http://127.0.0.1:$QUEUE_PORT \
        FLOODGATE_SELLER_KEY=$SELLER_KEY LOADTEST=$BIN/loadtest OUT_DIR=$OUT_DIR/baselines \
        bench/sale.sh --json "$OUT_DIR/report.json" --html "$OUT_DIR/report.html" "$@" |
        tee "$OUT_DIR/report.txt"
else
    "$BIN/loadtest" queue \
        --booking-url "http://127.0.0.1:$BOOKING_PORT" \
        --queue-url "http://127.0.0.1:$QUEUE_PORT" \
        --seller-key "$SELLER_KEY" --ops-key "$OPS_KEY" \
        --fans "$FANS" --server-pid "$QUEUE_PID" \
        --baseline-listen "127.0.0.1:$BASELINE_PORT" \
        --json "$OUT_DIR/report.json" "$@" | tee "$OUT_DIR/report.txt"
fi
rc=${PIPESTATUS[0]}
set -e
machine_state "$OUT_DIR/machine-after.txt"
curl -fsS -H "Authorization: Bearer $OPS_KEY" "http://127.0.0.1:$QUEUE_PORT/metrics" > "$OUT_DIR/queue-server-metrics.txt" 2>/dev/null || true
echo "queue-ws: raw outputs in $OUT_DIR" >&2
exit "$rc"
