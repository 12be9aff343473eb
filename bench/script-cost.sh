#!/usr/bin/env bash
# script-cost.sh — what one reserve.lua call costs Redis, in CPU instructions counted by
# callgrind: deterministic, so it can be compared across commits and script variants on a busy,
# shared machine where timings can't. Reported against an empty script (`EVAL "return 1" 0`)
# counted the same way in the same run.
#
#   1. Starts its own Postgres (devstack) and a redis-server under `valgrind --tool=callgrind`
#      (no persistence: the AOF's cost is the same per write command for every variant).
#   2. Starts booking-api against them, creates a GA drop of 1,000,000 units, reserves once (the
#      script gets loaded), and stops booking-api (its background tasks would be counted too).
#   3. Warms up, zeroes the counters, runs N reserves with redis-benchmark (one client, fresh fan,
#      idempotency key and hold id per call, as `booking-api bench-args` gives them), stops Redis
#      and divides the instructions by the calls Redis counted.
#   4. The same for the empty script, in a second Redis under callgrind.
#   Reserve is called as the engine calls it: FCALL of a function library (clock.lua, lib.lua and
#   reserve.lua, engine/src/scripts/function.rs) since the engine made it a Redis Function;
#   EVALSHA of a script before.
#   With --old COMMIT, steps 1-3 run a second time, on a Redis and drop of their own, for
#   reserve.lua as it was at COMMIT (with that commit's clock.lua and lib.lua; a function if that
#   commit's engine called it as one, else a script), so a change is measured against what it
#   replaced in the same run. The keys and arguments are this
#   version's; the old lib.lua's idempotency key is pointed at this version's position of it
#   (a key the old script doesn't know of is passed and ignored: it costs the old script
#   ≈ 1.3k instructions per key, so the old figure is that much high).
#   Warm-up: each Redis first takes --warmup reserves, so the drop's fans and holds hashes (an
#   entry per reserve) are past Redis' listpack size, as a live drop's are: below it (128
#   entries by default, 512 in Debian's build) each new fan or hold is a scan of the whole
#   listpack, which inflated the figures of runs with the earlier 200-call warm-up.
#
# Usage: bench/script-cost.sh [--variant FILE [--as-script]] [--calls N] [--warmup N]
#                             [--old COMMIT] [--timed] [--profile DIR]
#   --variant FILE   measure FILE (a whole reserve.lua replacement, made a function library with
#                    lua/clock.lua and lua/lib.lua as the engine does) instead of lua/reserve.lua,
#                    with the same keys and arguments; with --as-script, a script (EVALSHA) of the
#                    three instead; a FILE starting `#!lua` is a whole function library, loaded by
#                    FUNCTION LOAD and called by FCALL of the function it registers
#   --calls N        reserves counted [3000]
#   --warmup N       reserves before counting [1000]
#   --old COMMIT     also measure reserve.lua as of COMMIT, in the same run
#   --profile DIR    keep each Redis' callgrind file (with --dump-instr=yes) in DIR, for
#                    `callgrind_annotate --inclusive=yes DIR/reserve.cg`; a redis-server with
#                    symbols first in PATH names Redis' own functions (Debian's is stripped)
#   --timed          no callgrind: report Redis' own `usec_per_call` (INFO commandstats) per
#                    script instead of instructions — for a quiet machine only (the lead's
#                    acceptance figure: `bench/script-cost.sh --timed --calls 300000 --old C`)
# Environment: BOOKING_API (the binary, [target/debug/booking-api]), DEVSTACK
# ([target/debug/devstack]), PORT_BASE (five ports from it are used [7300]).
set -euo pipefail

cd "$(dirname "$0")/.."

die() {
    echo "script-cost: $*" >&2
    exit 2
}

VARIANT=
CALLS=3000
WARMUP=1000
OLD=
TIMED=
PROFILE=
AS_SCRIPT=
while [[ $# -gt 0 ]]; do
    case $1 in
        --variant) VARIANT=$(realpath "${2:?--variant needs a file}"); shift 2 ;;
        --calls) CALLS=${2:?--calls needs a number}; shift 2 ;;
        --warmup) WARMUP=${2:?--warmup needs a number}; shift 2 ;;
        --old) OLD=${2:?--old needs a commit}; shift 2 ;;
        --timed) TIMED=1; shift ;;
        --as-script) AS_SCRIPT=1; shift ;;
        --profile) PROFILE=$(mkdir -p "${2:?--profile needs a folder}" && realpath "$2"); shift 2 ;;
        --inside-stack) INSIDE=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done

BOOKING_API=${BOOKING_API:-target/debug/booking-api}
DEVSTACK=${DEVSTACK:-target/debug/devstack}
PORT_BASE=${PORT_BASE:-7300}
for tool in valgrind redis-server redis-cli redis-benchmark curl python3; do
    command -v $tool >/dev/null || die "$tool not found"
done

if [[ -z ${INSIDE:-} ]]; then
    [[ -x $BOOKING_API && -x $DEVSTACK ]] ||
        cargo build -q -p floodgate-booking-api -p floodgate-devstack || die "build failed"
    args=(--inside-stack --calls "$CALLS" --warmup "$WARMUP")
    [[ -n $VARIANT ]] && args+=(--variant "$VARIANT")
    [[ -n $OLD ]] && args+=(--old "$OLD")
    [[ -n $TIMED ]] && args+=(--timed)
    [[ -n $PROFILE ]] && args+=(--profile "$PROFILE")
    [[ -n $AS_SCRIPT ]] && args+=(--as-script)
    exec "$DEVSTACK" run --name script-cost --redis-port $((PORT_BASE)) \
        --pg-port $((PORT_BASE + 1)) -- "$0" "${args[@]}"
fi

OUT=$(mktemp -d /tmp/script-cost.XXXXXX)
RPORT=$((PORT_BASE + 2))
BPORT=$((PORT_BASE + 3))
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$OUT"' EXIT

# start_redis NAME: a redis-server (under callgrind unless --timed) on RPORT; sets REDIS_PID.
start_redis() {
    local under=(valgrind --tool=callgrind --callgrind-out-file="$OUT/$1.cg")
    [[ -n $PROFILE ]] && under+=(--dump-instr=yes)
    [[ -n $TIMED ]] && under=()
    "${under[@]}" redis-server --port "$RPORT" --save '' --appendonly no --dir "$OUT" \
        >"$OUT/$1.log" 2>&1 &
    REDIS_PID=$!
    pids+=("$REDIS_PID")
    for _ in $(seq 600); do
        redis-cli -p "$RPORT" ping >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "redis-server didn't start: $(tail -3 "$OUT/$1.log")"
}

# held SKU: the units held of the drop's SKU (HELD_KEY, the stock hash), or nothing without one.
held() {
    [[ -n ${HELD_KEY:-} ]] && redis-cli -p "$RPORT" hget "$HELD_KEY" "h:$1" | tr -d '\r'
}

# count NAME ARGS...: warm up, zero the counters, run CALLS commands, stop Redis; prints Ir per
# call (or, with --timed, Redis' usec_per_call). With HELD_KEY set, at least 99 % of the
# measured calls must have taken their unit: a "failed" count of 0 says only that no call raised
# an error, and a refusal (sold out, over the limit) is an answer, far cheaper than a reserve.
# Not 100 %: redis-benchmark draws each call's idempotency key at random from 10^8, so a few
# hundred of 300,000 calls repeat an earlier key and get its first answer back (a replay).
count() {
    local name=$1
    shift
    redis-benchmark -p "$RPORT" -c 1 -n "$WARMUP" -r 100000000 "$@" >/dev/null
    redis-cli -p "$RPORT" config resetstat >/dev/null
    [[ -z $TIMED ]] && callgrind_control -z "$REDIS_PID" >/dev/null 2>&1
    local held_before
    held_before=$(held TEE)
    redis-benchmark -p "$RPORT" -c 1 -n "$CALLS" -r 100000000 "$@" >/dev/null
    local stats calls failed ir
    stats=$(redis-cli -p "$RPORT" info commandstats | tr -d '\r' | grep "^cmdstat_${1,,}:")
    calls=$(sed 's/.*:calls=\([0-9]*\),.*/\1/' <<<"$stats")
    failed=$(sed 's/.*failed_calls=\([0-9]*\).*/\1/' <<<"$stats")
    [[ $failed == 0 && $calls -gt 0 ]] || die "$name: $stats"
    if [[ -n $held_before ]]; then
        local took=$(($(held TEE) - held_before))
        echo "script-cost: $name: $took of $CALLS calls took a unit" >&2
        ((took * 100 >= CALLS * 99)) ||
            die "$name: only $took of $CALLS calls took a unit (the rest were refused or replayed)"
    fi
    redis-cli -p "$RPORT" shutdown nosave >/dev/null 2>&1 || true
    wait "$REDIS_PID" 2>/dev/null || true
    if [[ -n $TIMED ]]; then
        sed 's/.*usec_per_call=\([0-9.]*\).*/\1/' <<<"$stats"
        return
    fi
    ir=$(grep -m1 '^summary:' "$OUT/$name.cg" | awk '{print $2}')
    [[ -z $PROFILE ]] || cp "$OUT/$name.cg" "$PROFILE/"
    echo $((ir / calls))
}

export FLOODGATE_DATABASE_URL=$FLOODGATE_TEST_DATABASE_URL
export FLOODGATE_REDIS_URL=redis://127.0.0.1:$RPORT FLOODGATE_DEV_IDENTITY=true
export FLOODGATE_HTTP__LISTEN=127.0.0.1:$BPORT FLOODGATE_LOG=warn
key=$("$BOOKING_API" create-key --scope seller --name script-cost)
api() { curl -sf -H 'content-type: application/json' "$@"; }

# measure NAME DIR: steps 1-3 for the reserve script made of DIR/clock.lua, DIR/lib.lua and
# DIR/reserve.lua (loaded as they are; nothing is loaded when DIR is empty: the engine's own).
measure() {
    local name=$1 dir=$2
    start_redis "$name"
    "$BOOKING_API" serve >"$OUT/booking-$name.log" 2>&1 &
    local booking=$!
    pids+=("$booking")
    for _ in $(seq 600); do
        curl -sf "127.0.0.1:$BPORT/healthz" >/dev/null && break
        sleep 0.1
    done
    local drop fan
    drop=$(api -X POST "127.0.0.1:$BPORT/v1/drops" -H "Authorization: Bearer $key" -d '{"name":"cost",
  "per_fan_limit":4,"hold_ttl_s":3600,"admission":{"mode":"open"},"inventory":{"kind":"ga",
  "skus":[{"sku":"TEE","name":"Tee","price_cents":100,"quantity":1000000}]}}' |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["drop_id"])') ||
        die "creating the drop failed"
    fan=$(api -X POST "127.0.0.1:$BPORT/v1/fans/session" -d '{"fan":"warm"}' |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["fan_token"])')
    api -X POST "127.0.0.1:$BPORT/v1/drops/$drop/holds" -H "Authorization: Bearer $fan" \
        -H 'Idempotency-Key: warm' -d '{"items":[{"sku":"TEE","quantity":1}]}' >/dev/null ||
        die "the first reserve failed"
    # The call as the engine makes it: FCALL <function> <numkeys> <keys...> <args...>
    local call
    read -ra call <<<"$("$BOOKING_API" bench-args --drop-id "$drop")"
    kill "$booking"
    wait "$booking" 2>/dev/null || true
    # KEYS[9] was the live-hold zset (fanholds) before it was the expiries list: an old script
    # that adds to it (the original, a85e765, did) would ZADD to the list the warm-up reserve
    # made, so it starts without one.
    [[ $name == old ]] && redis-cli -p "$RPORT" del "fg:{$drop}:expiries" >/dev/null
    if [[ -n $dir && $(head -c5 "$dir/reserve.lua") == '#!lua' ]]; then
        # A whole function library (FUNCTION LOAD): called by FCALL of the function it registers.
        redis-cli -p "$RPORT" -x function load replace <"$dir/reserve.lua" >/dev/null
        call[0]=FCALL
        call[1]=$(grep -o "register_function('[^']*'" "$dir/reserve.lua" | cut -d"'" -f2)
    elif [[ -f $dir/as-function ]]; then
        # Assembled as engine::scripts' Function does (scripts/function.rs).
        call[0]=FCALL
        call[1]=floodgate_bench_$name
        { echo "#!lua name=${call[1]}"; echo 'local KEYS, ARGV'; cat "$dir/clock.lua"; echo
            cat "$dir/lib.lua"; echo; echo 'local function run(keys, args)'
            echo 'KEYS, ARGV = keys, args'; echo 'name_keys(KEYS)'; cat "$dir/reserve.lua"; echo
            echo 'end'; echo "redis.register_function('${call[1]}', run)"; } >"$dir/library.lua"
        redis-cli -p "$RPORT" -x function load replace <"$dir/library.lua" >/dev/null
    elif [[ -n $dir ]]; then
        # A script, as the engine loaded scripts before reserve became a function; a lib.lua with
        # name_keys (this version's) has the script name its keys first, as the engine does.
        call[0]=EVALSHA
        call[1]=$(redis-cli -p "$RPORT" script load "$(cat "$dir/clock.lua"; echo
            cat "$dir/lib.lua"; echo
            grep -q '^local function name_keys' "$dir/lib.lua" && echo 'name_keys(KEYS)'
            cat "$dir/reserve.lua")")
    fi
    HELD_KEY="fg:{$drop}:stock" count "$name" "${call[@]}"
}

what=lua/reserve.lua
dir=
if [[ -n $VARIANT ]]; then
    dir=$OUT/variant
    mkdir -p "$dir"
    cp lua/clock.lua lua/lib.lua "$dir/"
    cp "$VARIANT" "$dir/reserve.lua"
    [[ -n $AS_SCRIPT ]] || touch "$dir/as-function"
    what=$VARIANT
fi
reserve=$(measure reserve "$dir")
if [[ -n $OLD ]]; then
    mkdir -p "$OUT/old"
    for f in clock lib reserve; do
        git show "$OLD:lua/$f.lua" >"$OUT/old/$f.lua" || die "no lua/$f.lua at $OLD"
    done
    # Reserve was a script (EVALSHA) until the engine called it as a function.
    git cat-file -e "$OLD:engine/src/scripts/function.rs" 2>/dev/null && touch "$OUT/old/as-function"
    idem=$(grep -o 'idem = KEYS\[[0-9]*\]' lua/lib.lua)
    sed -i "s/idem = KEYS\[[0-9]*\]/$idem/" "$OUT/old/lib.lua"
    old=$(measure old "$OUT/old")
fi

# 4: the empty script, the same way.
start_redis empty
empty=$(count empty EVAL "return 1" 0)

unit="callgrind instructions (Ir) per call in redis-server"
[[ -n $TIMED ]] && unit="Redis' usec_per_call (INFO commandstats), not under callgrind"
echo "script-cost: $what, $CALLS calls each after $WARMUP, $unit"
echo "  reserve      $reserve"
[[ -n $OLD ]] && echo "  at $OLD  $old"
echo "  empty EVAL   $empty"
python3 -c "print(f'  ratio        {$reserve / $empty:.1f}x the empty script')"
[[ -n $OLD ]] && python3 -c "print(f'  reserve / at $OLD: {$reserve / $old:.3f}')"
exit 0
