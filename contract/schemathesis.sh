#!/usr/bin/env bash
# contract/schemathesis.sh — fuzzes both servers against docs/openapi.yaml with schemathesis.
#
# Starts a stack with `devstack up` (Redis, Postgres, booking-api, queue-server, a seller key and
# an ops key; the debug binaries `./dev test` builds), then runs schemathesis once per server
# with contract/hooks.py (credentials, live ids, the error-shape, every-operation-2xx and stock
# invariant checks), and stops the stack. Exits non-zero on any failure.
#
# schemathesis comes from PyPI, pinned, into a virtual environment under .dev/ (made once,
# reused). Environment:
#   CONTRACT_MAX_EXAMPLES   cases per operation and phase (default 50: about 3 minutes)
#   CONTRACT_SEED           hypothesis seed (default: random; printed to reproduce)
#   CONTRACT_CHECKS         schemathesis' --checks (default: the ones this contract holds)
#   CONTRACT_LIVE_ID_SHARE  how often hooks.py swaps a generated id for a live one (default 0.8)
#   CONTRACT_REDIS_PORT, CONTRACT_PG_PORT, CONTRACT_BOOKING_PORT, CONTRACT_QUEUE_PORT
#                           the stack's ports (default 6392, 5442, 18080, 18081)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCHEMATHESIS_VERSION=4.32.5
VENV=.dev/venv
TARGET_DIR=${CARGO_TARGET_DIR:-target}
NAME=test-contract
MAX_EXAMPLES=${CONTRACT_MAX_EXAMPLES:-50}
SEED=${CONTRACT_SEED:-$RANDOM$RANDOM}
REDIS_PORT=${CONTRACT_REDIS_PORT:-6392}
PG_PORT=${CONTRACT_PG_PORT:-5442}
BOOKING_PORT=${CONTRACT_BOOKING_PORT:-18080}
QUEUE_PORT=${CONTRACT_QUEUE_PORT:-18081}
START_TIMEOUT_S=180

say() { echo "contract: $*" >&2; }

# python3's venv module (Debian splits it into python3-venv), with apt when it is missing.
ensure_venv_module() {
    python3 -c 'import ensurepip, venv' 2>/dev/null && return 0
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            say "python3's venv module is missing: sudo apt-get install -y python3-venv"
            exit 1
        fi
    fi
    say "installing python3-venv with apt-get ..."
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv </dev/null
}

ensure_schemathesis() {
    if "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q " $SCHEMATHESIS_VERSION\$"; then
        return 0
    fi
    ensure_venv_module
    say "installing schemathesis $SCHEMATHESIS_VERSION into $VENV ..."
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
}

ensure_schemathesis
for bin in devstack booking-api queue-server; do
    if [ ! -x "$TARGET_DIR/debug/$bin" ]; then
        say "$TARGET_DIR/debug/$bin is missing: cargo build --workspace --bins"
        exit 1
    fi
done

# The fuzzer is one client sending hundreds of requests a second from one address, some of them
# as the same fan: the per-IP and per-fan limits would answer most of them 429.
export FLOODGATE_LIMITS__PER_IP_PER_S=1000000 FLOODGATE_LIMITS__PER_IP_BURST=1000000
export FLOODGATE_LIMITS__PER_FAN_PER_S=1000000 FLOODGATE_LIMITS__PER_FAN_BURST=1000000
export FLOODGATE_QUEUE__PER_IP_JOIN_PER_S=1000000 FLOODGATE_QUEUE__PER_IP_JOIN_BURST=1000000
export FLOODGATE_QUEUE__PER_FAN_POLL_PER_S=1000000 FLOODGATE_QUEUE__PER_FAN_POLL_BURST=1000000
export FLOODGATE_QUEUE__PER_IP_PER_S=1000000 FLOODGATE_QUEUE__PER_IP_BURST=1000000
# Most generated drop ids are made up and new: the budget of Postgres lookups for drops not
# cached yet would answer 503 to them past its burst.
export FLOODGATE_DROPS__LOOKUPS_PER_S=1000000 FLOODGATE_DROPS__LOOKUP_BURST=1000000

env_file=.dev/env-$NAME
log=.dev/contract-stack.log
mkdir -p .dev
rm -f "$env_file"
say "starting the stack (log: $log) ..."
"$TARGET_DIR/debug/devstack" up --name "$NAME" \
    --redis-port "$REDIS_PORT" --pg-port "$PG_PORT" \
    --booking-port "$BOOKING_PORT" --queue-port "$QUEUE_PORT" \
    --booking-bin "$TARGET_DIR/debug/booking-api" --queue-bin "$TARGET_DIR/debug/queue-server" \
    >"$log" 2>&1 &
stack_pid=$!
stop_stack() {
    if kill -0 "$stack_pid" 2>/dev/null; then
        kill -TERM "$stack_pid" 2>/dev/null || true
        wait "$stack_pid" 2>/dev/null || true
    fi
}
trap stop_stack EXIT
trap 'say "interrupted"; exit 130' INT TERM

waited=0
until [ -s "$env_file" ] && grep -q '^DEMO_QUEUE_DROP_ID=' "$env_file"; do
    if ! kill -0 "$stack_pid" 2>/dev/null || [ "$waited" -ge "$START_TIMEOUT_S" ]; then
        say "the stack did not come up:"
        tail -n 40 "$log" >&2
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done
set -a
# shellcheck disable=SC1090
. "$env_file"
set +a

export SCHEMATHESIS_HOOKS=contract.hooks PYTHONPATH=$PWD PYTHONDONTWRITEBYTECODE=1
root=$PWD
report=$root/.dev/contract-report
checks=not_a_server_error,status_code_conformance,content_type_conformance
checks=$checks,response_schema_conformance,response_headers_conformance,negative_data_rejection
checks=$checks,error_shape,every_operation_2xx_and_stock_invariant
checks=${CONTRACT_CHECKS:-$checks}
status=0
run() {
    local server=$1 url=$2
    shift 2
    say "== $server at $url (seed $SEED, $MAX_EXAMPLES examples per operation and phase)"
    # From .dev/: schemathesis keeps a cache directory where it runs.
    (cd .dev && "$root/$VENV/bin/schemathesis" --config-file "$root/contract/schemathesis.toml" \
        run "$root/docs/openapi.yaml" --url "$url" \
        --checks "$checks" --phases examples,coverage,fuzzing \
        --max-examples "$MAX_EXAMPLES" --seed "$SEED" --workers 2 \
        --generation-database none --no-color --suppress-health-check all \
        --report junit --report-dir "$report/$server" "$@") || status=1
}
run booking-api "$BOOKING_URL" --include-tag booking-api --exclude-tag websocket
run queue-server "$QUEUE_URL" --include-tag queue-server --exclude-tag websocket
if [ "$status" -ne 0 ]; then
    say "FAILED (reproduce with CONTRACT_SEED=$SEED contract/schemathesis.sh)"
fi
exit "$status"
