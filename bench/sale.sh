#!/usr/bin/env bash
# sale.sh — `loadtest sale` with its baselines in the same run (docs/BENCHMARKS.md, "The whole
# sale"): the waiting room's two scripts alone under redis-benchmark, on a queue drop of their own,
# so the sale's join rate and admission rate are also ratios.
#
#   1. A baseline drop (a queue drop, open now, stock and max_active out of the way, burst BURST):
#      redis-benchmark EVALSHA of lua/join.lua, a new fan each call (`__rand_int__`): joins/s.
#   2. On the line that made, EVALSHA of lua/admit.lua flat out with the rate at its maximum:
#      calls/s, and fans admitted per second (the drop's watermark before and after).
#   3. `loadtest sale "$@" --join-baseline-per-s J --admit-baseline-per-s A`: its report gives
#      the joins after opening as a ratio of J and the admissions/s beside A.
#
# Usage: bench/sale.sh [loadtest sale options...]
#   e.g. bench/sale.sh --fans 2000 --ws-fans 1000 --stock 500 --html sale.html
#
# Environment (`.dev/env` from `./dev up` is read when present; what is already set wins):
#   BOOKING_URL, QUEUE_URL, DATABASE_URL, REDIS_URL, FLOODGATE_SELLER_KEY   as for loadtest
#   REQUESTS   redis-benchmark calls of each script                 [200000]
#   CLIENTS    redis-benchmark clients                              [50]
#   BURST      the baseline drop's burst: most fans one admit call admits [1000]
#   LOADTEST   the binary                                           [target/release/loadtest]
#   OUT_DIR    raw outputs                          [target/bench/sale-<timestamp>]
#
# The scripts are loaded as the engine loads them (lua/clock.lua, a blank line, the script: the
# waiting room's scripts take no lib.lua), so their SHAs are the servers'.
#
# Exit code: loadtest's (1 when an invariant broke, or a bar was missed with --check), 2 on a
# setup error.
set -euo pipefail

cd "$(dirname "$0")/.."
. bench/lib.sh

die() {
    echo "sale: $*" >&2
    exit 2
}

load_dev_env

REDIS_URL=${REDIS_URL:-127.0.0.1:6379}
REQUESTS=${REQUESTS:-200000}
CLIENTS=${CLIENTS:-50}
BURST=${BURST:-1000}
LOADTEST=${LOADTEST:-target/release/loadtest}
OUT_DIR=${OUT_DIR:-target/bench/sale-$(date +%Y%m%d-%H%M%S)}
: "${BOOKING_URL:?BOOKING_URL is not set (./dev up writes .dev/env)}"
: "${FLOODGATE_SELLER_KEY:?FLOODGATE_SELLER_KEY is not set}"

for tool in redis-benchmark redis-cli curl jq; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y redis-tools curl jq)"
done
[[ -x $LOADTEST ]] || die "$LOADTEST is missing: cargo build --release -p floodgate-loadtest"
mkdir -p "$OUT_DIR"

redis_args "$REDIS_URL"
redis=("${REDIS_ARGS[@]}")

# The baseline drop.
body=$(jq -n --argjson burst "$BURST" '{
    name: "bench sale baseline", per_fan_limit: 1, hold_ttl_s: 600,
    admission: {mode: "queue", rate_per_s: 100000, burst: $burst, max_active: 10000000,
                leave_grace_s: 86400},
    inventory: {kind: "ga", skus: [{sku: "LT", name: "LT", price_cents: 100, quantity: 10000000}]}}')
drop=$(curl -sf -X POST "$BOOKING_URL/v1/drops" -H "Authorization: Bearer $FLOODGATE_SELLER_KEY" \
    -H 'Content-Type: application/json' -d "$body" | jq -r .drop_id) || die "creating the baseline drop failed"
[[ $drop == d* ]] || die "no drop id from POST /v1/drops"
echo "sale: baseline drop $drop" >&2

load() { # load SCRIPT → its SHA, loaded as engine::scripts composes it
    { cat lua/clock.lua; printf '\n\n'; cat "lua/$1.lua"; } | redis-cli "${redis[@]}" -x script load | tr -d '\r'
}
join_sha=$(load join)
admit_sha=$(load admit)
k() { printf 'fg:{%s}:%s ' "$drop" "$1"; }
# shellcheck disable=SC2046 # the key list is meant to split into words
join_keys=($(k meta; k admission; k places; k line; k seq; k active; k seen; k sessions; k fans; k watermark))
# shellcheck disable=SC2046
admit_keys=($(k meta; k admission; k stock; k fans; k active; k line; k bucket; k watermark; k places; k seen; k sessions; k seq))

csv_rps() { # the rps column of redis-benchmark --csv's last row (columns counted from the end)
    awk -F',' '$1 == "\"test\"" { for (i = 1; i <= NF; i++) if ($i == "\"rps\"") col = i; n = NF; next }
        NF > 0 { split($0, f, ","); m = NF } END { v = f[m - (n - col)]; gsub(/"/, "", v); print v }' "$1"
}

echo "sale: redis-benchmark EVALSHA join, $CLIENTS clients, $REQUESTS calls" >&2
redis-benchmark "${redis[@]}" -c "$CLIENTS" -P 1 -n "$REQUESTS" -r 100000000 --csv \
    EVALSHA "$join_sha" "${#join_keys[@]}" "${join_keys[@]}" \
    "bench-__rand_int__" 0 - - - - - - > "$OUT_DIR/join.csv"
join_rps=$(csv_rps "$OUT_DIR/join.csv")
waiting=$(redis-cli "${redis[@]}" zcard "fg:{$drop}:line" | tr -d '\r')

admitted() { redis-cli "${redis[@]}" hget "fg:{$drop}:watermark" admitted | tr -d '\r'; }
before=$(admitted)
started=$(date +%s.%N)
echo "sale: redis-benchmark EVALSHA admit on a line of $waiting, $CLIENTS clients" >&2
redis-benchmark "${redis[@]}" -c "$CLIENTS" -P 1 -n "$REQUESTS" --csv \
    EVALSHA "$admit_sha" "${#admit_keys[@]}" "${admit_keys[@]}" 100 > "$OUT_DIR/admit.csv"
took=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
after=$(admitted)
admit_rps=$(csv_rps "$OUT_DIR/admit.csv")
admit_fans_per_s=$(awk -v a="${before:-0}" -v b="${after:-0}" -v t="$took" 'BEGIN { printf "%.0f", (b - a) / t }')
curl -sf -X POST "$BOOKING_URL/v1/drops/$drop/close" -H "Authorization: Bearer $FLOODGATE_SELLER_KEY" \
    > /dev/null || echo "sale: couldn't close the baseline drop $drop" >&2

{
    echo "join script alone: ${join_rps} calls/s (a new fan each)"
    echo "admit script alone: ${admit_rps} calls/s, ${admit_fans_per_s} fans admitted/s (burst $BURST)"
} | tee "$OUT_DIR/baselines.txt"
(( ${admit_fans_per_s%.*} > 0 )) || die "the admission baseline admitted nobody (is the line empty?)"

set +e
"$LOADTEST" sale "$@" --join-baseline-per-s "$join_rps" --admit-baseline-per-s "$admit_fans_per_s"
rc=$?
set -e
echo "sale: raw baseline outputs in $OUT_DIR" >&2
exit "$rc"
