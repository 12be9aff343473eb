#!/usr/bin/env bash
# reserve-baseline.sh — reserve through booking-api against the reserve script alone, on the same
# drop, in the same run (docs/BENCHMARKS.md, Bars: bar ≥ 0.6×, goal ≥ 0.75×).
#
#   1. redis-benchmark calls reserve directly (FCALL of its function): 50 clients, no pipelining.
#      That is the ceiling: Redis doing nothing but the script.
#   2. loadtest reserve, closed loop, 50 workers, against booking-api and the same drop: the
#      same script behind HTTP, auth and validation.
#   3. loadtest reserve, open loop at half of step 2's throughput, HALF_RUNS times on fresh
#      drops: latency from each request's intended send time (bar: p99 ≤ 5 ms at half of peak).
#   Then prints both throughputs, the ratio loadtest / redis-benchmark, p50/p99 of both, and
#   the half-of-peak runs' p50 / p99 / p99.9 against the latency bar, each with the number of
#   AOF rewrites Redis ran during it (a rewrite forks and rewrites the whole file: on two shared
#   cores it is the largest single cause of a missed latency bar; see docs/BENCHMARKS.md).
#
# Usage: bench/reserve-baseline.sh [--drop-id D]
#
# Environment (`.dev/env` from `./dev up` is read when present; what is already set wins):
#   REDIS_URL            redis://[:password@]host:port[/db] or host:port   [127.0.0.1:6379]
#   BOOKING_URL, FLOODGATE_SELLER_KEY, DATABASE_URL    as for loadtest
#   DROP_ID              the drop to use (or --drop-id); if unset, loadtest creates one
#   REQUESTS             redis-benchmark requests            [300000]
#   CLIENTS              clients / workers on both sides     [50]
#   DURATION_S           loadtest's measured seconds         [10]
#   HALF_RUNS            open-loop runs at half of peak (0 skips them)        [3]
#   HALF_DURATION_S      measured seconds of each (after a 3 s warm-up)       [20]
#   LOADTEST, BOOKING_API  binaries  [target/release/loadtest, target/release/booking-api]
#   OUT_DIR              where raw outputs go                [target/bench/reserve-<timestamp>]
#
# The reserve call comes from `booking-api bench-args --drop-id D`, which prints one line:
# `FCALL <function> <numkeys> <keys...> <args...>` (reserve is a Redis Function; with --evalsha,
# `EVALSHA <sha> ...` of the same code as a script), with `__rand_int__` where each call needs a
# fresh value (redis-benchmark replaces it, given -r).
#
# Both runs hold units of the drop (for the hold TTL), so each run should get a fresh drop,
# which is the default. Exit code: loadtest's (1 if an invariant was violated), or 2 on a setup
# error.
set -euo pipefail

cd "$(dirname "$0")/.."
. bench/lib.sh

die() {
    echo "reserve-baseline: $*" >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --drop-id) DROP_ID=${2:?--drop-id needs a value}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done

load_dev_env

REDIS_URL=${REDIS_URL:-127.0.0.1:6379}
REQUESTS=${REQUESTS:-300000}
CLIENTS=${CLIENTS:-50}
DURATION_S=${DURATION_S:-10}
HALF_RUNS=${HALF_RUNS:-3}
HALF_DURATION_S=${HALF_DURATION_S:-20}
LOADTEST=${LOADTEST:-target/release/loadtest}
BOOKING_API=${BOOKING_API:-target/release/booking-api}
OUT_DIR=${OUT_DIR:-target/bench/reserve-$(date +%Y%m%d-%H%M%S)}

command -v redis-benchmark >/dev/null || die "redis-benchmark not found (apt-get install -y redis-tools)"
command -v jq >/dev/null || die "jq not found (apt-get install -y jq)"
command -v redis-cli >/dev/null || die "redis-cli not found (apt-get install -y redis-tools)"

if [[ ! -x $LOADTEST || ! -x $BOOKING_API ]]; then
    echo "reserve-baseline: building release binaries" >&2
    cargo build --release -p floodgate-loadtest -p floodgate-booking-api >&2
fi

redis_args "$REDIS_URL"

# redis_info SECTION FIELD → the field's value from INFO (empty when absent).
redis_info() {
    redis-cli "${REDIS_ARGS[@]}" info "$1" |
        tr -d '\r' | awk -F: -v f="$2" '$1 == f { print $2 }'
}
aof_rewrite_pct=$(redis-cli "${REDIS_ARGS[@]}" \
    config get auto-aof-rewrite-percentage | tail -n 1)

mkdir -p "$OUT_DIR"

if [[ -z ${DROP_ID:-} ]]; then
    DROP_ID=$("$LOADTEST" reserve --setup-only --quiet) || die "loadtest couldn't create a drop"
    echo "reserve-baseline: created drop $DROP_ID" >&2
fi

bench_args=$("$BOOKING_API" bench-args --drop-id "$DROP_ID") || die "booking-api bench-args failed"
read -r -a evalsha_args <<< "$bench_args"
[[ ${evalsha_args[0]:-} =~ ^(FCALL|EVALSHA)$ ]] || die "bench-args should start with FCALL, got: $bench_args"
echo "$bench_args" > "$OUT_DIR/bench-args.txt"

# 1. The script alone.
echo "reserve-baseline: redis-benchmark ${evalsha_args[0]}, $CLIENTS clients, -P 1, $REQUESTS requests" >&2
redis-benchmark "${REDIS_ARGS[@]}" -c "$CLIENTS" -P 1 \
    -n "$REQUESTS" -r 100000000 --csv "${evalsha_args[@]}" > "$OUT_DIR/redis-benchmark.csv"

# redis-benchmark --csv: a header line ("test","rps",...,"p50_latency_ms",...) and one row per
# test. The first column holds the command line, which may itself contain commas, so columns are
# counted from the end of the row.
csv_field() { # csv_field FILE COLUMN-NAME → the value in the last row
    awk -F',' -v name="\"$2\"" '
        $1 == "\"test\"" { n = NF; for (i = 1; i <= NF; i++) if ($i == name) col = i; next }
        NF > 0 { row = $0; m = NF; split($0, f, ",") }
        END {
            if (!col || !m) exit 1
            v = f[m - (n - col)]; gsub(/"/, "", v); print v
        }' "$1"
}
rb_rps=$(csv_field "$OUT_DIR/redis-benchmark.csv" rps) || die "can't read rps from redis-benchmark's output"
rb_p50=$(csv_field "$OUT_DIR/redis-benchmark.csv" p50_latency_ms || echo n/a)
rb_p99=$(csv_field "$OUT_DIR/redis-benchmark.csv" p99_latency_ms || echo n/a)

# 2. Through booking-api, same drop.
echo "reserve-baseline: loadtest reserve, closed loop, $CLIENTS workers, ${DURATION_S} s" >&2
set +e
"$LOADTEST" reserve --drop-id "$DROP_ID" --mode closed --workers "$CLIENTS" \
    --duration-s "$DURATION_S" --json "$OUT_DIR/loadtest.json" --quiet > "$OUT_DIR/loadtest.txt"
loadtest_rc=$?
set -e
[[ -f $OUT_DIR/loadtest.json ]] || { cat "$OUT_DIR/loadtest.txt" >&2; die "loadtest failed (exit $loadtest_rc)"; }

lt_rps=$(jq -r '.throughput.total_per_s' "$OUT_DIR/loadtest.json")
lt_ok_rps=$(jq -r '.throughput.ok_per_s' "$OUT_DIR/loadtest.json")
lt_p50=$(jq -r '.latency.all.p50_ms' "$OUT_DIR/loadtest.json")
lt_p99=$(jq -r '.latency.all.p99_ms' "$OUT_DIR/loadtest.json")
lt_codes=$(jq -r '.reserve.by_status | to_entries | map("\(.key): \(.value)") | join(", ")' "$OUT_DIR/loadtest.json")

ratio=$(awk -v a="$lt_rps" -v b="$rb_rps" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')

echo
echo "reserve baseline — drop $DROP_ID, $CLIENTS clients, no pipelining ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
printf '  %-36s %12s %10s %10s\n' "" "req/s" "p50 ms" "p99 ms"
printf '  %-36s %12.0f %10s %10s\n' "redis-benchmark FCALL reserve" "$rb_rps" "$rb_p50" "$rb_p99"
printf '  %-36s %12.0f %10.3f %10.3f\n' "loadtest via booking-api (closed)" "$lt_rps" "$lt_p50" "$lt_p99"
echo "  ratio loadtest / redis-benchmark: ${ratio}×   (bar ≥ 0.6×, goal ≥ 0.75×)"
echo "  loadtest answers by status: ${lt_codes:-none}; 201/s: $(printf '%.0f' "$lt_ok_rps")"
if awk -v ok="$lt_ok_rps" -v all="$lt_rps" 'BEGIN { exit !(all > 0 && ok < 0.99 * all) }'; then
    echo "  warning: over 1 % of booking-api's answers were not 201: the ratio compares different work" >&2
    echo "  (429s mean booking-api's limits.per_ip_per_s / per_fan_per_s throttled the load generator)" >&2
fi

# 3. Latency at half of peak: open loop, so a slow answer can't slow the arrivals down.
half=$(awk -v r="$lt_ok_rps" 'BEGIN { printf "%d", r / 2 }')
if (( HALF_RUNS > 0 && half > 0 )); then
    echo "  open loop at half of peak, $half/s, ${HALF_DURATION_S} s each (bar p99 ≤ 5 ms;" \
        "Redis auto-aof-rewrite-percentage ${aof_rewrite_pct:-?}):"
    for ((i = 1; i <= HALF_RUNS; i++)); do
        echo "reserve-baseline: open loop at $half/s, run $i of $HALF_RUNS" >&2
        rewrites_before=$(redis_info persistence aof_rewrites)
        set +e
        "$LOADTEST" reserve --rate "$half" --warmup-s 3 --duration-s "$HALF_DURATION_S" \
            --json "$OUT_DIR/half-$i.json" --quiet > "$OUT_DIR/half-$i.txt"
        rc=$?
        set -e
        (( rc == 0 )) || loadtest_rc=$rc
        rewrites=$(( $(redis_info persistence aof_rewrites) - rewrites_before ))
        [[ -f $OUT_DIR/half-$i.json ]] || { echo "    run $i: no report (exit $rc)"; continue; }
        jq -r --arg i "$i" --arg rw "$rewrites" 'def r2: (. * 100 | round) / 100;
            "    run \($i): \(.throughput.ok_per_s | floor)/s  p50 \(.latency.all.p50_ms | r2) ms  p99 \(.latency.all.p99_ms | r2) ms  p99.9 \(.latency.all.p99_9_ms | r2) ms  (service time p99 \(.latency.service.p99_ms | r2) ms; AOF rewrites \($rw))"' \
            "$OUT_DIR/half-$i.json"
    done
fi
echo "  raw outputs: $OUT_DIR"
if [[ $loadtest_rc -ne 0 ]]; then
    echo "reserve-baseline: loadtest reported an invariant violation (exit $loadtest_rc):" >&2
    grep -E '^  FAIL|^INVARIANT' "$OUT_DIR/loadtest.txt" >&2 || true
fi
exit "$loadtest_rc"
