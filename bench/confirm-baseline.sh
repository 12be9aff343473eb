#!/usr/bin/env bash
# confirm-baseline.sh — confirms through booking-api against a raw Postgres client writing the
# same rows, in the same run on the same Postgres (docs/BENCHMARKS.md, Bars: confirm ≥ 0.5×,
# goal ≥ 0.8×).
#
#   1. The baseline: pgbench, PGBENCH_CLIENTS clients, each transaction writing what BATCH
#      confirms write — a payment attempt, an order, an order item, a ledger line and a fan's
#      purchase per order, and one update of the (one) inventory row per transaction — as
#      set-based statements. That is the ceiling: Postgres doing nothing but those rows.
#   2. Confirms through booking-api: `loadtest reserve --confirm-pct 100` (RATE reserves a
#      second for RESERVE_S seconds, then every hold confirmed, closed loop over CONNECTIONS
#      connections), with the per-step breakdown of a confirm read from booking-api's metrics.
#   Then prints orders per second of both, the ratio, p50/p99 of a confirm and where its time
#   went (begin, payment row, authorize, order commit, capture, finish), for each scenario:
#     base  one booking-api, a gateway that answers at once;
#     half  as base, but the confirms paced at half of base's rate (an open loop: latency from
#           each confirm's due time; bar p99 ≤ 50 ms); needs base before it;
#     slow  one booking-api, a test gateway taking SLOW_MIN_MS–SLOW_MAX_MS per call (real
#           gateways do), over SLOW_CONNECTIONS connections (a confirm then lasts ≥ 0.4 s);
#     two   two booking-api instances confirming holds of the same SKU (the follow-up workers
#           alternate between them).
#
# Usage: bench/confirm-baseline.sh            (against the stack in DATABASE_URL / REDIS_URL)
#        target/release/devstack run --name bench --redis-port 6471 --pg-port 5491 -- \
#            bench/confirm-baseline.sh        (on a stack of its own)
#
# The script starts its own booking-api instances (ports PORT_BASE, PORT_BASE+1) on that Redis
# and Postgres with the rate limits raised, makes a seller and an ops key, and stops them at the
# end. Environment:
#   DATABASE_URL, REDIS_URL  the stack (devstack run sets both)
#   SCENARIOS            which to run                                  [base half slow two]
#   RATE, RESERVE_S      reserves per second and seconds before the confirms   [4000, 5]
#   CONNECTIONS          confirm connections (base, two)               [64]
#   SLOW_CONNECTIONS     confirm connections with the slow gateway     [512]
#   SLOW_MIN_MS, SLOW_MAX_MS  the slow gateway's time per call         [200, 500]
#   PGBENCH_CLIENTS, PGBENCH_S, BATCH   the baseline                   [64, 10, 10]
#   PORT_BASE            first booking-api port                        [18480]
#   AOF_REWRITE          `off`: no automatic AOF rewrite during the runs (auto-aof-rewrite-
#                        percentage 0, as docs/OPERATIONS.md advises for a sale; put back at the
#                        end); anything else leaves Redis as it is            [on]
#   PG_BIN               PostgreSQL's binaries (pgbench, psql)         [/usr/lib/postgresql/15/bin]
#   LOADTEST, BOOKING_API  binaries  [target/release/loadtest, target/release/booking-api]
#   OUT_DIR              raw outputs                   [target/bench/confirm-<timestamp>]
#
# The baseline's rows go to a drop of their own that nothing reserves from. Exit code: 1 if a
# loadtest run reported an invariant violation, 2 on a setup error, else 0.
set -euo pipefail

cd "$(dirname "$0")/.."

die() {
    echo "confirm-baseline: $*" >&2
    exit 2
}

case ${1:-} in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) die "unknown argument: $1" ;;
esac

: "${DATABASE_URL:?DATABASE_URL must name the stack's Postgres (devstack run sets it)}"
: "${REDIS_URL:?REDIS_URL must name the stack's Redis (devstack run sets it)}"
SCENARIOS=${SCENARIOS:-base half slow two}
RATE=${RATE:-4000}
RESERVE_S=${RESERVE_S:-5}
CONNECTIONS=${CONNECTIONS:-64}
SLOW_CONNECTIONS=${SLOW_CONNECTIONS:-512}
SLOW_MIN_MS=${SLOW_MIN_MS:-200}
SLOW_MAX_MS=${SLOW_MAX_MS:-500}
PGBENCH_CLIENTS=${PGBENCH_CLIENTS:-64}
PGBENCH_S=${PGBENCH_S:-10}
BATCH=${BATCH:-10}
PORT_BASE=${PORT_BASE:-18480}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
LOADTEST=${LOADTEST:-target/release/loadtest}
BOOKING_API=${BOOKING_API:-target/release/booking-api}
OUT_DIR=${OUT_DIR:-target/bench/confirm-$(date +%Y%m%d-%H%M%S)}

command -v jq >/dev/null || die "jq not found (apt-get install -y jq)"
command -v redis-cli >/dev/null || die "redis-cli not found (apt-get install -y redis-tools)"
command -v curl >/dev/null || die "curl not found"
[[ -x $PG_BIN/pgbench && -x $PG_BIN/psql ]] || die "pgbench and psql not found in $PG_BIN (set PG_BIN)"
if [[ ! -x $LOADTEST || ! -x $BOOKING_API ]]; then
    echo "confirm-baseline: building release binaries" >&2
    cargo build --release -p floodgate-loadtest -p floodgate-booking-api >&2
fi
mkdir -p "$OUT_DIR"

# REDIS_URL → redis-cli's arguments, to count AOF rewrites during each run (a rewrite forks
# Redis; on two shared cores it is the largest single cause of a latency tail).
url=${REDIS_URL#redis://}
url=${url%%/*}
redis_cli=(redis-cli)
if [[ $url == *@* ]]; then
    auth=${url%@*}
    url=${url##*@}
    [[ $auth == *:* ]] && redis_cli+=(-a "${auth#*:}" --no-auth-warning)
fi
[[ $url == *:* ]] && redis_cli+=(-h "${url%:*}" -p "${url##*:}") || redis_cli+=(-h "${url:-127.0.0.1}")
aof_rewrites() {
    "${redis_cli[@]}" info persistence | tr -d '\r' | awk -F: '$1 == "aof_rewrites" { print $2 }'
}
aof_pct=$("${redis_cli[@]}" config get auto-aof-rewrite-percentage | tail -n 1)
if [[ ${AOF_REWRITE:-on} == off ]]; then
    "${redis_cli[@]}" config set auto-aof-rewrite-percentage 0 >/dev/null
fi

# Every booking-api shares these: the same stores and the same fan-token secret, so a fan signed
# in at one is known at the other; limits raised so the load generator (one address, a thousand
# fans) measures confirms, not the limiter.
export FLOODGATE_DATABASE_URL=$DATABASE_URL FLOODGATE_REDIS_URL=$REDIS_URL
export FLOODGATE_DEV_IDENTITY=true
export FLOODGATE_IDENTITY__DEV_SECRET="\"$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')\""
export FLOODGATE_LIMITS__PER_IP_PER_S=1000000 FLOODGATE_LIMITS__PER_IP_BURST=1000000
export FLOODGATE_LIMITS__PER_FAN_PER_S=1000000 FLOODGATE_LIMITS__PER_FAN_BURST=1000000
export FLOODGATE_LOG=${FLOODGATE_LOG:-warn}

pids=()
stop_instances() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
trap 'stop_instances; "${redis_cli[@]}" config set auto-aof-rewrite-percentage "$aof_pct" >/dev/null || true' EXIT

# start_instances N [ENV=VALUE ...] — N booking-api instances on PORT_BASE.., ready when it returns.
start_instances() {
    local n=$1 i port deadline
    shift
    for ((i = 0; i < n; i++)); do
        port=$((PORT_BASE + i))
        env "$@" FLOODGATE_HTTP__LISTEN="127.0.0.1:$port" "$BOOKING_API" serve \
            > "$OUT_DIR/booking-api-$port.log" 2>&1 &
        pids+=($!)
    done
    for ((i = 0; i < n; i++)); do
        port=$((PORT_BASE + i))
        deadline=$((SECONDS + 60))
        until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do
            ((SECONDS < deadline)) || die "booking-api on $port didn't start (see $OUT_DIR/booking-api-$port.log)"
            sleep 0.2
        done
    done
}

key() { "$BOOKING_API" create-key --scope "$1" --name "confirm-baseline" | tail -n 1; }
SELLER_KEY=$(key seller) || die "booking-api create-key failed (is DATABASE_URL reachable?)"
OPS_KEY=$(key ops) || die "booking-api create-key failed"
export FLOODGATE_SELLER_KEY=$SELLER_KEY FLOODGATE_OPS_KEY=$OPS_KEY

start_instances 1
base_url="http://127.0.0.1:$PORT_BASE"

# 1. The baseline, on a drop of its own.
bench_drop=$("$LOADTEST" reserve --booking-url "$base_url" --database-url "$DATABASE_URL" \
    --setup-only --quiet --stock 10000000) || die "loadtest couldn't create the baseline's drop"
[[ $bench_drop =~ ^d[0-9a-f]{16}$ ]] || die "unexpected drop id: $bench_drop"
currency=$("$PG_BIN/psql" "$DATABASE_URL" -Atc "SELECT currency FROM drops WHERE drop_id = '$bench_drop'")
bucket=$("$PG_BIN/psql" "$DATABASE_URL" -Atc "SELECT bucket FROM inventory WHERE drop_id = '$bench_drop'")
# What BATCH confirms of one unit each write, set-based, one statement and one transaction: a
# payment attempt (its trigger keeps the previous release's `payments` row in step, as for a
# confirm), an order, its item, a ledger line, the fan's purchase, and the one inventory row once.
# Hold ids and fans are fresh per transaction, so only the inventory row is shared, as between
# confirms of one SKU; one statement holds that row's lock for the least time a client can.
cat > "$OUT_DIR/baseline.sql" <<SQL
BEGIN;
WITH o AS (
    SELECT gen_random_uuid() AS order_id, '$bench_drop-h' || md5(random()::text) AS hold_id,
           'pgbench-' || md5(random()::text) AS fan
    FROM generate_series(1, $BATCH)
), pay AS (
    INSERT INTO payment_attempts (hold_id, reference, drop_id, fan_id, gateway, amount_cents, state)
    SELECT hold_id, 'ok_' || hold_id, '$bench_drop', fan, 'test', 1000, 'captured' FROM o
), ord AS (
    INSERT INTO orders (order_id, hold_id, drop_id, fan_id, total_cents, currency)
    SELECT order_id, hold_id, '$bench_drop', fan, 1000, '$currency' FROM o
), item AS (
    INSERT INTO order_items (order_id, drop_id, bucket, seat_id, quantity, price_cents)
    SELECT order_id, '$bench_drop', '$bucket', NULL, 1, 1000 FROM o
), led AS (
    INSERT INTO stock_ledger (drop_id, bucket, kind, delta_sold, order_id)
    SELECT '$bench_drop', '$bucket', 'sale', 1, order_id FROM o
), fp AS (
    INSERT INTO fan_purchases (drop_id, fan_id, units, limit_units)
    SELECT '$bench_drop', fan, 1, 1000 FROM o
    ON CONFLICT (drop_id, fan_id) DO UPDATE SET units = fan_purchases.units + EXCLUDED.units
)
UPDATE inventory SET sold = sold + $BATCH WHERE drop_id = '$bench_drop' AND bucket = '$bucket';
COMMIT;
SQL
echo "confirm-baseline: pgbench, $PGBENCH_CLIENTS clients, $BATCH orders a transaction, ${PGBENCH_S} s" >&2
"$PG_BIN/pgbench" -n -M prepared -c "$PGBENCH_CLIENTS" -j 2 -T "$PGBENCH_S" \
    -f "$OUT_DIR/baseline.sql" "$DATABASE_URL" > "$OUT_DIR/pgbench.txt" 2>&1 ||
    { cat "$OUT_DIR/pgbench.txt" >&2; die "pgbench failed"; }
tps=$(awk '/^tps = / { print $3; exit }' "$OUT_DIR/pgbench.txt")
pg_lat=$(awk '/^latency average = / { print $4; exit }' "$OUT_DIR/pgbench.txt")
[[ -n $tps ]] || die "can't read tps from pgbench's output ($OUT_DIR/pgbench.txt)"
baseline=$(awk -v t="$tps" -v b="$BATCH" 'BEGIN { printf "%.0f", t * b }')

# 2. Confirms through booking-api, per scenario.
rc_all=0
results=()
for scenario in $SCENARIOS; do
    stop_instances
    urls=(--booking-url "$base_url")
    connections=$CONNECTIONS
    pace=()
    case $scenario in
        base) start_instances 1 ;;
        half)
            [[ -f $OUT_DIR/base.json ]] || die "half needs base before it in SCENARIOS"
            half_rate=$(jq -r '.confirm.tally.succeeded / .confirm.elapsed_s / 2 | floor' "$OUT_DIR/base.json")
            start_instances 1
            pace=(--follow-up-rate "$half_rate")
            ;;
        slow)
            start_instances 1 FLOODGATE_GATEWAY__TEST_CALL_MIN_MS="$SLOW_MIN_MS" \
                FLOODGATE_GATEWAY__TEST_CALL_MAX_MS="$SLOW_MAX_MS"
            connections=$SLOW_CONNECTIONS
            ;;
        two)
            start_instances 2
            urls+=(--also-booking-url "http://127.0.0.1:$((PORT_BASE + 1))")
            ;;
        *) die "unknown scenario: $scenario (base, slow, two)" ;;
    esac
    echo "confirm-baseline: $scenario — $RATE reserves/s for ${RESERVE_S} s, then every hold confirmed over $connections connections" >&2
    rewrites_before=$(aof_rewrites)
    set +e
    "$LOADTEST" reserve "${urls[@]}" --database-url "$DATABASE_URL" --rate "$RATE" \
        --duration-s "$RESERVE_S" --confirm-pct 100 --connections "$connections" \
        "${pace[@]}" --request-timeout-ms 60000 --json "$OUT_DIR/$scenario.json" --quiet \
        > "$OUT_DIR/$scenario.txt"
    rc=$?
    set -e
    echo $(( $(aof_rewrites) - rewrites_before )) > "$OUT_DIR/$scenario.aof-rewrites"
    [[ -f $OUT_DIR/$scenario.json ]] || { cat "$OUT_DIR/$scenario.txt" >&2; die "loadtest failed in $scenario (exit $rc)"; }
    ((rc == 0)) || rc_all=1
    results+=("$scenario")
done
stop_instances

echo
echo "confirm baseline ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores; Redis auto-aof-rewrite-percentage $("${redis_cli[@]}" config get auto-aof-rewrite-percentage | tail -n 1))"
printf '  %-44s %10s %9s %9s\n' "" "orders/s" "p50 ms" "p99 ms"
printf '  %-44s %10s %9s %9s\n' "pgbench, $PGBENCH_CLIENTS clients, $BATCH orders a transaction" \
    "$baseline" "" "avg ${pg_lat:-?}"
for scenario in "${results[@]}"; do
    f=$OUT_DIR/$scenario.json
    case $scenario in
        base) name="confirms, 1 booking-api, $CONNECTIONS connections" ;;
        half) name="  … paced at half of that, $half_rate/s (open)" ;;
        slow) name="confirms, gateway ${SLOW_MIN_MS}–${SLOW_MAX_MS} ms, $SLOW_CONNECTIONS conns" ;;
        two) name="confirms, 2 booking-api, $CONNECTIONS connections" ;;
    esac
    rate=$(jq -r '.confirm.tally.succeeded / .confirm.elapsed_s' "$f")
    printf '  %-44s %10.0f %9.2f %9.2f   ratio %s×  %s; AOF rewrites %s\n' "$name" "$rate" \
        "$(jq -r '.confirm.latency.p50_ms' "$f")" "$(jq -r '.confirm.latency.p99_ms' "$f")" \
        "$(awk -v a="$rate" -v b="$baseline" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')" \
        "$(jq -r 'if .passed then "invariants hold" else "INVARIANT VIOLATED" end' "$f")" \
        "$(cat "$OUT_DIR/$scenario.aof-rewrites")"
    jq -r 'def r2: (. * 100 | round) / 100;
        "      by status: \(.confirm.tally.by_status | to_entries | map("\(.key) \(.value)") | join(", "))",
        "      per step (mean ms): \(.confirm.steps // [] | map("\(.step) \(.mean_ms | r2)") | join(", "))"' "$f"
done
echo "  (bar ≥ 0.5× the baseline, goal ≥ 0.8×; at half of peak p99 ≤ 50 ms; raw outputs: $OUT_DIR)"
exit "$rc_all"
