#!/usr/bin/env bash
# memory.sh — Redis bytes per live hold and per idempotency answer (issue 13, item 4): what a
# sale keeps in Redis for every reserve, and what each AOF rewrite forks and copies. Counted,
# not timed, so the figures hold on a busy shared machine.
#
#   1. Starts its own Postgres (devstack) and a plain redis-server (no persistence, so nothing
#      but the dataset is counted), booking-api against them, and a GA drop of 1,000,000 units.
#   2. Runs N reserves of the real reserve.lua with redis-benchmark (FCALL; a fresh fan,
#      idempotency key and hold id per call, as `booking-api bench-args` gives them): N live
#      holds, N idempotency answers, N fans.
#   3. Reports `used_memory` grown per reserve (everything), and per structure: the holds hash
#      (each hold's record and its stored answer beside it), the expiries list and the per-fan
#      hash per entry (`MEMORY USAGE … SAMPLES 0`, exact), and, on a drop that keeps its answers
#      in keys of their own (a drop loaded before they moved), an idempotency answer (`MEMORY
#      USAGE` of 1,000 of them, averaged).
#
# Usage: bench/memory.sh [--reserves N]     (default 100000)
# Environment: BOOKING_API [target/release/booking-api], DEVSTACK [target/debug/devstack],
# PORT_BASE (four ports from it [7320]).
# Per waiter in a line: `loadtest sale --line-only` reports Redis memory per waiter.
set -euo pipefail

cd "$(dirname "$0")/.."

die() {
    echo "memory: $*" >&2
    exit 2
}

N=100000
while [[ $# -gt 0 ]]; do
    case $1 in
        --reserves) N=${2:?--reserves needs a number}; shift 2 ;;
        --inside-stack) INSIDE=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done

BOOKING_API=${BOOKING_API:-target/release/booking-api}
DEVSTACK=${DEVSTACK:-target/debug/devstack}
PORT_BASE=${PORT_BASE:-7320}
for tool in redis-server redis-cli redis-benchmark curl python3; do
    command -v $tool >/dev/null || die "$tool not found"
done

if [[ -z ${INSIDE:-} ]]; then
    [[ -x $BOOKING_API ]] || cargo build -q --release -p floodgate-booking-api || die "build failed"
    [[ -x $DEVSTACK ]] || cargo build -q -p floodgate-devstack || die "build failed"
    exec "$DEVSTACK" run --name memory --redis-port $((PORT_BASE)) \
        --pg-port $((PORT_BASE + 1)) -- "$0" --inside-stack --reserves "$N"
fi

OUT=$(mktemp -d /tmp/memory.XXXXXX)
RPORT=$((PORT_BASE + 2))
BPORT=$((PORT_BASE + 3))
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$OUT"' EXIT
rc() { redis-cli -p "$RPORT" "$@"; }

redis-server --port "$RPORT" --save '' --appendonly no --dir "$OUT" >"$OUT/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do rc ping >/dev/null 2>&1 && break; sleep 0.1; done
export FLOODGATE_DATABASE_URL=$FLOODGATE_TEST_DATABASE_URL
export FLOODGATE_REDIS_URL=redis://127.0.0.1:$RPORT FLOODGATE_DEV_IDENTITY=true
export FLOODGATE_HTTP__LISTEN=127.0.0.1:$BPORT FLOODGATE_LOG=warn
key=$("$BOOKING_API" create-key --scope seller --name memory)
"$BOOKING_API" serve >"$OUT/booking.log" 2>&1 &
booking=$!
pids+=("$booking")
for _ in $(seq 600); do
    curl -sf "127.0.0.1:$BPORT/healthz" >/dev/null && break
    sleep 0.1
done
api() { curl -sf -H 'content-type: application/json' "$@"; }
drop=$(api -X POST "127.0.0.1:$BPORT/v1/drops" -H "Authorization: Bearer $key" -d '{"name":"memory",
  "per_fan_limit":4,"hold_ttl_s":3600,"admission":{"mode":"open"},"inventory":{"kind":"ga",
  "skus":[{"sku":"TEE","name":"Tee","price_cents":100,"quantity":1000000}]}}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["drop_id"])') || die "creating the drop failed"
read -ra evalsha <<<"$("$BOOKING_API" bench-args --drop-id "$drop")"
# The script is loaded by booking-api's first call; one reserve through it does that.
fan=$(api -X POST "127.0.0.1:$BPORT/v1/fans/session" -d '{"fan":"warm"}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["fan_token"])')
api -X POST "127.0.0.1:$BPORT/v1/drops/$drop/holds" -H "Authorization: Bearer $fan" \
    -H 'Idempotency-Key: warm' -d '{"items":[{"sku":"TEE","quantity":1}]}' >/dev/null ||
    die "the first reserve failed"
# booking-api's sweeper and others would write meanwhile: stop it before counting.
kill "$booking"
wait "$booking" 2>/dev/null || true

used() { rc info memory | tr -d '\r' | sed -n 's/^used_memory:\([0-9]*\)$/\1/p'; }
# MEMORY USAGE of a key that isn't there prints nothing: count it as 0.
usage() { local b; b=$(rc memory usage "$1" samples 0 | tr -d '\r'); echo "${b:-0}"; }
k() { echo "fg:{$drop}:$1"; }
before=$(used)
redis-benchmark -p "$RPORT" -c 20 -n "$N" -r 1000000000 "${evalsha[@]}" >/dev/null
after=$(used)
# Every reserve that took a unit put its hold on the expiries list once (lua/lib.lua).
holds=$(rc llen "$(k expiries)")
[[ $holds -ge $((N * 99 / 100)) ]] || die "only $holds holds after $N reserves"
idem_sample=$(rc --scan --pattern "$(k 'idem:*')" | head -1000 || true)
idem_bytes=0
idem_n=0
while read -r key; do
    [[ -n $key ]] || continue
    idem_bytes=$((idem_bytes + $(usage "$key")))
    idem_n=$((idem_n + 1))
done <<<"$idem_sample"

echo "memory: $N reserves of lua/reserve.lua (GA, one unit each, a fresh fan each), Redis $(rc info server | tr -d '\r' | sed -n 's/^redis_version://p')"
python3 - "$N" "$before" "$after" "$holds" \
    "$(usage "$(k holds)")" "$(usage "$(k expiries)")" "$(usage "$(k deadlines)")" \
    "$(usage "$(k fans)")" "$(rc hlen "$(k fans)")" "$idem_bytes" "$idem_n" <<'EOF'
import sys
n, before, after, holds, h, ex, dl, fans, nfans, idem, nidem = map(int, sys.argv[1:])
print(f"  used_memory grown per reserve   {(after - before) / n:8.0f} B (everything below, and Redis' own)")
print(f"  holds hash per hold             {h / holds:8.0f} B  (its record and its stored answer)")
print(f"  expiries list per hold          {ex / holds:8.0f} B")
if dl:
    print(f"  deadlines zset per hold         {dl / holds:8.0f} B  (the index before the list)")
# Every fan here has one live hold: a count field and an "h|<fan>" live-hold list (lua/lib.lua).
print(f"  per-fan hash per fan            {fans / max(nfans // 2, 1):8.0f} B  (count and live-hold list)")
if nidem:
    print(f"  idempotency answer (key)        {idem / nidem:8.0f} B  (mean of {nidem})")
EOF
