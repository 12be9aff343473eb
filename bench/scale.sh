#!/usr/bin/env bash
# scale.sh — issue 14's scale-out matrix in one session (docs/BENCHMARKS.md, "Scale-out"):
# each stage on a fresh stack started by `devstack up`:
#
#   single   one Redis, 1 booking-api + 1 queue-server
#   cluster1 a Redis Cluster (3 primaries, a replica each), 1 booking-api + 1 queue-server
#   cluster2 the same cluster, 2 + 2 instances behind HAProxy
#
# and in each stage, in this order:
#   1. sale: `loadtest sale`, FANS fans for UNITS units (with 2 instances straight to the
#      instances, --instances-from-env: one HAProxy process holds ≈ 9,900 sockets), its JSON
#      report in OUT_DIR/<stage>/sale.json;
#   2. one drop: redis-benchmark FCALL of lua/reserve.lua on the drop's own shard (-h/-p of
#      the primary that owns the drop's slot; `booking-api bench-args` gives the arguments),
#      then `loadtest reserve` closed loop through BOOKING_URL on the same drop;
#   3. (cluster stages) three drops whose slots three different primaries own, a closed-loop
#      `loadtest reserve` on each at once: the aggregate.
# Each figure also per CPU-second: the CPU (utime + stime from /proc/PID/stat) of every Redis
# node, booking-api instance and HAProxy over the run (redis-benchmark: the Redis nodes only),
# since on a small machine every process competes for the same cores. Then one table.
#
# Usage: bench/scale.sh [stage...]      (default: single cluster1 cluster2)
#
# Environment:
#   FANS [50000]  WS_FANS [19000, at most FANS]  UNITS [5000]
#   SALE_ARGS   more `loadtest sale` options
#               [--client-procs 4 --pre-queue-pct 4 --rate-per-s 100 --burst 100 --pre-open-s 60
#                --join-rate-per-s 1000 --poll-ms 15000 --http-connections 64 --max-duration-s 900]
#   REQUESTS [300000] redis-benchmark calls   CLIENTS [50] clients / workers per drop
#   DURATION_S [10] each loadtest reserve's measured seconds
#   REDIS_PORT [6470] (a cluster takes six from it)  PG_PORT [5470]
#   BOOKING_PORT [18090]  QUEUE_PORT [18091]  (the servers', or HAProxy's with 2 instances)
#   LOADTEST, BOOKING_API, QUEUE_SERVER, DEVSTACK  binaries [target/release/...]
#   OUT_DIR [target/bench/scale-<timestamp>]
# A quick check of the script itself (debug binaries are fine for that, not for figures):
#   FANS=2000 WS_FANS=400 UNITS=200 REQUESTS=20000 DURATION_S=3 \
#     SALE_ARGS="--pre-open-s 5 --rate-per-s 100 --burst 100 --max-duration-s 300" bench/scale.sh
# Needs a quiet machine for figures (check `uptime`); redis-benchmark, redis-cli, jq, ss, haproxy.
#
# Exit code: 0 when every stage ran and every sale held its invariants, 1 otherwise, 2 on a setup
# error.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

die() {
    echo "scale: $*" >&2
    exit 2
}

FANS=${FANS:-50000}
WS_FANS=${WS_FANS:-19000}
(( WS_FANS > FANS )) && WS_FANS=$FANS
UNITS=${UNITS:-5000}
SALE_ARGS=${SALE_ARGS:---client-procs 4 --pre-queue-pct 4 --rate-per-s 100 --burst 100 --pre-open-s 60 --join-rate-per-s 1000 --poll-ms 15000 --http-connections 64 --max-duration-s 900}
REQUESTS=${REQUESTS:-300000}
CLIENTS=${CLIENTS:-50}
DURATION_S=${DURATION_S:-10}
REDIS_PORT=${REDIS_PORT:-6470}
PG_PORT=${PG_PORT:-5470}
BOOKING_PORT=${BOOKING_PORT:-18090}
QUEUE_PORT=${QUEUE_PORT:-18091}
LOADTEST=${LOADTEST:-target/release/loadtest}
BOOKING_API=${BOOKING_API:-target/release/booking-api}
QUEUE_SERVER=${QUEUE_SERVER:-target/release/queue-server}
DEVSTACK=${DEVSTACK:-target/release/devstack}
OUT_DIR=${OUT_DIR:-target/bench/scale-$(date +%Y%m%d-%H%M%S)}
STAGES=("$@")
(( ${#STAGES[@]} )) || STAGES=(single cluster1 cluster2)

for tool in redis-benchmark redis-cli jq ss curl; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y redis-tools jq iproute2 curl)"
done
for bin in "$LOADTEST" "$BOOKING_API" "$QUEUE_SERVER" "$DEVSTACK"; do
    [[ -x $bin ]] || die "$bin is missing: cargo build --release -p floodgate-loadtest -p floodgate-booking-api -p floodgate-queue-server -p floodgate-devstack"
done
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
HZ=$(getconf CLK_TCK)

# The servers' limits out of the way (the load comes from few addresses and many fans) and room
# for the sockets; `devstack up` passes its environment on to the servers it starts.
ulimit -n "$(ulimit -Hn)"
export FLOODGATE_LIMITS__PER_IP_PER_S=1000000 FLOODGATE_LIMITS__PER_IP_BURST=1000000
export FLOODGATE_LIMITS__PER_FAN_PER_S=1000000 FLOODGATE_LIMITS__PER_FAN_BURST=1000000
export FLOODGATE_QUEUE__MAX_CONNECTIONS=$((WS_FANS + 200))
export FLOODGATE_QUEUE__PER_IP_JOIN_PER_S=1000000 FLOODGATE_QUEUE__PER_IP_JOIN_BURST=1000000
export FLOODGATE_QUEUE__PER_IP_PER_S=1000000 FLOODGATE_QUEUE__PER_IP_BURST=1000000

# pids_on PORT... → the pids listening on those ports (one line each).
pids_on() {
    local port
    for port in "$@"; do
        ss -Htlnp "sport = :$port" | grep -o 'pid=[0-9]*' | cut -d= -f2 | head -1
    done | sort -u
}
# cpu_s PID... → their CPU seconds so far (utime + stime; the fields after the comm's ')').
cpu_s() {
    local pid ticks=0 stat
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        stat=${stat##*) }
        read -r -a f <<< "$stat"
        ticks=$((ticks + f[11] + f[12]))
    done
    awk -v t="$ticks" -v hz="$HZ" 'BEGIN { printf "%.2f", t / hz }'
}
port_of() { local u=${1#*://}; u=${u%%/*}; echo "${u##*:}"; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f", a / b; else print "n/a" }'; }

# owner SLOT → host:port of the primary serving it (cluster), from CLUSTER NODES.
owner() {
    redis-cli "${NODE0[@]}" cluster nodes | tr -d '\r' | awk -v s="$1" '
        $3 ~ /master/ { for (i = 9; i <= NF; i++) { n = split($i, r, "-"); lo = r[1]; hi = (n > 1 ? r[2] : r[1])
            if ($i !~ /^\[/ && s >= lo && s <= hi) { split($2, a, "@"); print a[1]; exit } } }'
}
# shard_of DROP → host:port of the Redis that holds the drop's keys.
shard_of() {
    if [[ -n ${REDIS_CLUSTER_NODES:-} ]]; then
        owner "$(redis-cli "${NODE0[@]}" cluster keyslot "$1" | tr -d '\r')"
    else
        echo "${NODE0[1]}:${NODE0[3]}"
    fi
}
new_drop() { "$LOADTEST" reserve --setup-only --quiet; }

# reserve_run NAME DROP → runs loadtest reserve closed loop; JSON in $SDIR/NAME.json. No warm-up
# and few fan sessions: the CPU is read around the whole run, so its setup should cost little.
reserve_run() {
    "$LOADTEST" reserve --drop-id "$2" --mode closed --workers "$CLIENTS" --warmup-s 0 --fans 200 \
        --duration-s "$DURATION_S" --json "$SDIR/$1.json" --quiet > "$SDIR/$1.txt" 2>&1 || true
}

stage() { # stage NAME: one row of the table in $OUT_DIR/NAME/row.json
    local name=$1 flags=() instances=1
    case $name in
        single) ;;
        cluster1) flags=(--redis-cluster) ;;
        cluster2) flags=(--redis-cluster --instances 2); instances=2 ;;
        *) die "unknown stage $name (single, cluster1, cluster2)" ;;
    esac
    SDIR=$OUT_DIR/$name
    mkdir -p "$SDIR"
    local stack=test-scale-$name env_file=.dev/env-test-scale-$name
    rm -f "$env_file"
    echo "scale: $name: devstack up ${flags[*]}" >&2
    "$DEVSTACK" up --name "$stack" --redis-port "$REDIS_PORT" --pg-port "$PG_PORT" \
        --booking-port "$BOOKING_PORT" --queue-port "$QUEUE_PORT" \
        --booking-bin "$BOOKING_API" --queue-bin "$QUEUE_SERVER" "${flags[@]}" \
        > "$SDIR/devstack.log" 2>&1 &
    UP_PID=$!
    local deadline=$((SECONDS + 300))
    until grep -q 'Ctrl-C stops' "$SDIR/devstack.log" 2>/dev/null; do
        kill -0 "$UP_PID" 2>/dev/null || { tail -20 "$SDIR/devstack.log" >&2; die "$name: devstack up failed"; }
        (( SECONDS < deadline )) || die "$name: devstack up not ready after 300 s"
        sleep 1
    done
    (
        set -a
        # shellcheck disable=SC1090 # written by devstack up
        . "$env_file"
        set +a
        # 1. The sale.
        spread=()
        (( instances > 1 )) && spread=(--instances-from-env)
        echo "scale: $name: loadtest sale, $FANS fans ($WS_FANS on sockets) for $UNITS units" >&2
        # shellcheck disable=SC2086 # SALE_ARGS is a list of words
        "$LOADTEST" sale --quiet --fans "$FANS" --ws-fans "$WS_FANS" --stock "$UNITS" \
            "${spread[@]}" $SALE_ARGS --json "$SDIR/sale.json" --text "$SDIR/sale.txt" \
            > /dev/null 2> "$SDIR/sale.err"
        echo $? > "$SDIR/sale.rc"
    ) || true
    (
        set -a
        # shellcheck disable=SC1090
        . "$env_file"
        set +a
        export FLOODGATE_REDIS_URL=$REDIS_URL FLOODGATE_DATABASE_URL=$DATABASE_URL
        if [[ -n ${REDIS_CLUSTER_NODES:-} ]]; then
            first=${REDIS_CLUSTER_NODES%%,*}
            NODE0=(-h "${first%:*}" -p "${first##*:}")
            redis_ports=$(tr ',' '\n' <<< "$REDIS_CLUSTER_NODES" | sed 's/.*://')
        else
            redis_args "$REDIS_URL"
            NODE0=("${REDIS_ARGS[@]}")
            redis_ports=${NODE0[3]}
        fi
        # shellcheck disable=SC2086
        redis_pids=$(pids_on $redis_ports)
        booking_ports=$(port_of "$BOOKING_URL")
        if [[ -n ${BOOKING_INSTANCE_URLS:-} ]]; then
            booking_ports="$booking_ports $(tr ',' '\n' <<< "$BOOKING_INSTANCE_URLS" | while read -r u; do port_of "$u"; done)"
        fi
        # shellcheck disable=SC2086
        server_pids=$(pids_on $booking_ports)
        # shellcheck disable=SC2086
        all_pids=$(echo $redis_pids $server_pids)

        # 2. One drop: the script alone on its shard, then through booking-api.
        drop=$(new_drop) || die "$name: loadtest couldn't create a drop"
        shard=$(shard_of "$drop")
        [[ -n $shard ]] || die "$name: no primary owns drop $drop's slot"
        bench_args=$("$BOOKING_API" bench-args --drop-id "$drop" 2> "$SDIR/bench-args.err") ||
            die "$name: booking-api bench-args failed: $(tail -3 "$SDIR/bench-args.err")"
        read -r -a evalsha <<< "$bench_args"
        echo "scale: $name: redis-benchmark FCALL reserve on $shard (drop $drop), $REQUESTS calls" >&2
        # shellcheck disable=SC2086
        c0=$(cpu_s $redis_pids)
        t0=$(date +%s.%N)
        redis-benchmark -h "${shard%:*}" -p "${shard##*:}" -c "$CLIENTS" -P 1 -n "$REQUESTS" \
            -r 100000000 --csv "${evalsha[@]}" > "$SDIR/redis-benchmark.csv"
        t1=$(date +%s.%N)
        # shellcheck disable=SC2086
        rb_cpu=$(awk -v a="$c0" -v b="$(cpu_s $redis_pids)" 'BEGIN { print b - a }')
        rb_rps=$(awk -v n="$REQUESTS" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
        echo "scale: $name: loadtest reserve closed loop, $CLIENTS workers, ${DURATION_S} s" >&2
        # shellcheck disable=SC2086
        c0=$(cpu_s $all_pids)
        reserve_run one "$drop"
        # shellcheck disable=SC2086
        one_cpu=$(awk -v a="$c0" -v b="$(cpu_s $all_pids)" 'BEGIN { print b - a }')
        one_rps=$(jq -r '.throughput.ok_per_s // 0' "$SDIR/one.json" 2>/dev/null || echo 0)
        one_ok=$(jq -r '.throughput.ok_per_s * .measured_s' "$SDIR/one.json" 2>/dev/null || echo 0)

        # 3. Three drops on three shards at once (cluster only).
        agg_rps=n/a agg_cpu=0 agg_ok=0 shards=
        if [[ -n ${REDIS_CLUSTER_NODES:-} ]]; then
            declare -A seen=()
            drops=()
            for _ in $(seq 40); do
                d=$(new_drop) || continue
                s=$(shard_of "$d")
                [[ -n $s && -z ${seen[$s]:-} ]] || continue
                seen[$s]=1
                drops+=("$d")
                shards="$shards $s"
                (( ${#drops[@]} == 3 )) && break
            done
            (( ${#drops[@]} == 3 )) || die "$name: no three drops on three shards in 40 tries"
            echo "scale: $name: loadtest reserve on 3 drops at once (shards$shards)" >&2
            # shellcheck disable=SC2086
            c0=$(cpu_s $all_pids)
            for k in 0 1 2; do reserve_run "agg-$k" "${drops[$k]}" & done
            wait
            # shellcheck disable=SC2086
            agg_cpu=$(awk -v a="$c0" -v b="$(cpu_s $all_pids)" 'BEGIN { print b - a }')
            agg_rps=$(jq -s '[.[].throughput.ok_per_s] | add | floor' "$SDIR"/agg-{0,1,2}.json 2>/dev/null || echo n/a)
            agg_ok=$(jq -s '[.[] | .throughput.ok_per_s * .measured_s] | add' "$SDIR"/agg-{0,1,2}.json 2>/dev/null || echo 0)
        fi
        jq -n --arg stage "$name" --arg drop "$drop" --arg shard "$shard" --arg shards "$shards" \
            --argjson rb_rps "$rb_rps" --argjson rb_cpu "$rb_cpu" --argjson n "$REQUESTS" \
            --argjson one_rps "$one_rps" --argjson one_cpu "$one_cpu" --arg one_ok "$one_ok" \
            --arg agg_rps "$agg_rps" --argjson agg_cpu "$agg_cpu" \
            --arg agg_ok "$agg_ok" '{stage: $stage, drop: $drop, shard: $shard, shards: $shards,
              rb_per_s: $rb_rps, rb_per_cpu_s: (if $rb_cpu > 0 then $n / $rb_cpu else null end),
              reserve_per_s: $one_rps,
              reserve_per_cpu_s: (if $one_cpu > 0 then ($one_ok | tonumber) / $one_cpu else null end),
              ratio: (if $rb_rps > 0 then $one_rps / $rb_rps else null end),
              agg_per_s: ($agg_rps | tonumber? // null),
              agg_per_cpu_s: (if $agg_cpu > 0 then ($agg_ok | tonumber) / $agg_cpu else null end)}' \
            > "$SDIR/reserve.json"
    ) || echo "scale: $name: the reserve runs failed (see $SDIR)" >&2
    echo "scale: $name: stopping the stack" >&2
    kill -INT "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" 2>/dev/null || true
}

for s in "${STAGES[@]}"; do stage "$s"; done

rc=0
echo
echo "scale-out — $FANS fans for $UNITS units; reserves: $CLIENTS closed-loop workers per drop, ${DURATION_S} s ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
echo "machine: $(nproc) CPUs, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo); load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '  %-9s %-11s %6s %6s %9s %9s | %9s %9s %9s %9s %6s | %9s %9s\n' \
    stage sold tau adm "sold_out" "admit→ws" "script/s" "/CPU-s" "reserve/s" "/CPU-s" ratio "3 drops/s" "/CPU-s"
printf '  %-9s %-11s %6s %6s %9s %9s | %9s %9s %9s %9s %6s | %9s %9s\n' \
    "" "" "" "×rate" "p99 ms" "p99 ms" "" "" "" "" "" "" ""
for s in "${STAGES[@]}"; do
    d=$OUT_DIR/$s
    [[ -f $d/sale.json ]] || rc=1
    [[ $(cat "$d/sale.rc" 2>/dev/null) == 0 ]] || rc=1
    sale=$(jq -r '[
        "\(.outcome.sold_api)/\(.outcome.stock)",
        (.fairness.tau_after_open // "n/a" | if type == "number" then (. * 1000 | round / 1000) else . end),
        (if .admission.intervals > 0 then (.admission.ratio * 1000 | round / 1000) else "n/a" end),
        (.sold_out.sockets.p99_ms | round),
        ([.admitted_push[].delay.p99_ms] | max // 0 | round)] | map(tostring) | join(" ")' \
        "$d/sale.json" 2>/dev/null || echo "- - - - -")
    res=$(jq -r '[.rb_per_s, .rb_per_cpu_s, .reserve_per_s, .reserve_per_cpu_s, .ratio, .agg_per_s, .agg_per_cpu_s]
        | map(if . == null then "n/a" elif . < 10 then (. * 100 | round / 100) else round end)
        | map(tostring) | join(" ")' "$d/reserve.json" 2>/dev/null || echo "- - - - - - -")
    # shellcheck disable=SC2086 # the fields are words
    printf '  %-9s %-11s %6s %6s %9s %9s | %9s %9s %9s %9s %6s | %9s %9s\n' "$s" $sale $res
done
echo "  sold: API count/stock; tau: τ(join, admission) after opening; adm: admissions/s ÷ set rate where"
echo "  the bucket limited; sold_out: p99 after the last sale; admit→ws: the slowest instance's p99 from"
echo "  admission run to the \`admitted\` frame. script/s: redis-benchmark FCALL reserve on the drop's"
echo "  shard (per CPU-s: of the Redis nodes); reserve/s: loadtest via booking-api, same drop (per CPU-s:"
echo "  Redis nodes + booking-api instances + HAProxy); 3 drops: three shards' drops at once."
echo "  raw outputs: $OUT_DIR"
exit "$rc"
