//! Recovery at scale (issue 11, item 9): a drop of 200,000 holds is rebuilt after a Redis restart
//! in bounded slices, while another drop on the same Redis keeps selling. Like faults.rs, the test
//! starts a PostgreSQL + Redis stack of its own with devstack and restarts its Redis, so it is a
//! `fault_*` test: `./dev test` runs it in the serial phase, one at a time.
//!
//! What it checks is work, never time (docs/ARCHITECTURE.md, Choices: tests never assert a time):
//! each recovery script call says how many entries it handled, and none may handle more than
//! `recovery.slice`; the other drop's reserves, `/readyz` and a drop creation must all answer
//! while the big drop recovers (a script holding Redis for seconds makes every other client wait
//! and, past Redis' `busy-reply-threshold`, answers them `BUSY`). Two booking-api instances
//! recover at once, as in production: neither may keep superseding the other's rebuild (then the
//! big drop would start over for good and never come back).
mod common;
mod fault_kit;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Harness;
use fault_kit::{assert_consistent, key, Fault};
use serde_json::json;
use testkit::{new_key, test_config_for};

/// Holds written into the big drop before Redis restarts.
const HOLDS: usize = 200_000;
/// Fans those holds belong to (`HOLDS / FANS` each, the drop's per-fan limit).
const FANS: usize = 2_000;
/// Entries per recovery script call, in this test.
const SLICE: usize = 500;
/// Recovering 200,000 holds in slices takes a while on a shared two-core machine.
const BIG_RECOVERY_DEADLINE: Duration = Duration::from_secs(600);

/// Redis commands sent through `redis-cli --pipe` (RESP), for bulk test setup.
async fn redis_pipe(f: &Fault, commands: &[Vec<String>]) {
    let mut resp = Vec::new();
    for cmd in commands {
        resp.extend_from_slice(format!("*{}\r\n", cmd.len()).as_bytes());
        for arg in cmd {
            resp.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            resp.extend_from_slice(arg.as_bytes());
            resp.extend_from_slice(b"\r\n");
        }
    }
    let mut child = tokio::process::Command::new("redis-cli")
        .arg("-h")
        .arg(f.redis_addr.ip().to_string())
        .arg("-p")
        .arg(f.redis_addr.port().to_string())
        .arg("--pipe")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli --pipe runs");
    let mut stdin = child.stdin.take().expect("redis-cli's stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, &resp)
        .await
        .expect("write to redis-cli");
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .expect("redis-cli --pipe ends");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("errors: 0"),
        "redis-cli --pipe: {said}"
    );
}

/// Writes `HOLDS` held holds of one unit of `TEE` into `drop`, exactly as reserve.lua would have
/// (the hold JSON lua/lib.lua describes, its place in the expiries list, the per-fan count and
/// the stock moved from available to held; not the fans' live-hold lists, which a rebuild makes
/// afresh). Through HTTP, 200,000 reserves would take
/// minutes of this machine; what matters here is what recovery finds in Redis, and the books are
/// checked balanced before the restart.
async fn write_holds(f: &Fault, drop: &str) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_millis() as i64;
    // Far past the test: every written hold is live when recovery reads it.
    let expires_at_ms = now_ms + 3_600_000;
    let per_fan = HOLDS / FANS;
    let mut commands: Vec<Vec<String>> = Vec::new();
    let (mut holds, mut expiries) = (Vec::new(), Vec::new());
    let flush =
        |holds: &mut Vec<String>, expiries: &mut Vec<String>, commands: &mut Vec<Vec<String>>| {
            if holds.is_empty() {
                return;
            }
            let mut c = vec!["HSET".to_owned(), key(drop, "holds")];
            c.append(holds);
            commands.push(c);
            let mut c = vec!["RPUSH".to_owned(), key(drop, "expiries")];
            c.append(expiries);
            commands.push(c);
        };
    for i in 0..HOLDS {
        let fan = format!("bulk-{}", i % FANS);
        let id = format!("{drop}-h{:016x}", i);
        let hold = json!({
            "fan": fan, "st": "held", "exp": expires_at_ms, "u": 1, "c": now_ms - (HOLDS - i) as i64,
            "it": [{"b": "TEE", "q": 1}],
        });
        holds.push(id.clone());
        holds.push(hold.to_string());
        expiries.push(id.clone());
        if holds.len() >= 2_000 {
            flush(&mut holds, &mut expiries, &mut commands);
        }
    }
    flush(&mut holds, &mut expiries, &mut commands);
    let mut c = vec!["HSET".to_owned(), key(drop, "fans")];
    for i in 0..FANS {
        c.push(format!("bulk-{i}"));
        c.push(per_fan.to_string());
    }
    commands.push(c);
    commands.push(vec![
        "HINCRBY".into(),
        key(drop, "stock"),
        "a:TEE".into(),
        format!("-{HOLDS}"),
    ]);
    commands.push(vec![
        "HINCRBY".into(),
        key(drop, "stock"),
        "h:TEE".into(),
        HOLDS.to_string(),
    ]);
    redis_pipe(f, &commands).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_huge_drop_recovers_in_slices_while_another_drop_sells() {
    let f = Fault::start("fault-recovery-slices").await;
    let mut cfg = test_config_for(&f.redis_url, &f.db_url);
    cfg.recovery.slice = SLICE;
    let h = Harness::with_config(cfg.clone()).await;
    let total = (HOLDS + 1_000) as u32;
    // The big drop first, the small one second: a watcher that recovers the newest drop first
    // and the rest one by one has the small one selling before the big one's rebuild begins.
    let big = h.ga_drop(total, (HOLDS / FANS) as u32, 3_600).await;
    let small = h.ga_drop(100_000, 1_000, 600).await;
    // A few real sales in the big drop, so the rebuild has Postgres' record to respect.
    for i in 0..5 {
        let token = h
            .fan_token(&format!("buyer-{i}-{}", uuid::Uuid::new_v4()))
            .await;
        let r = h
            .reserve_reply(
                &token,
                &big,
                &new_key(),
                &json!({"items": [{"sku": "TEE", "quantity": 1}]}),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        let c = h
            .confirm_reply(&token, &r.str("hold_id"), &format!("ok_{i}"))
            .await;
        assert_eq!(c.status, 201, "{c:?}");
    }
    write_holds(&f, &big).await;
    let expected = (
        i64::from(total),
        i64::from(total) - HOLDS as i64 - 5,
        HOLDS as i64,
        5,
    );
    assert_eq!(h.counts(&big).await, expected, "before the restart");
    h.server.shutdown().await;

    // Redis restarts (from its AOF, which has every write above: `kill -9` loses nothing Redis
    // acknowledged). A script that runs past 1 s makes Redis answer BUSY to everyone else.
    f.with(|s| s.kill_redis())
        .await
        .expect("redis-server is killed");
    f.with(|s| s.start_redis())
        .await
        .expect("redis-server restarts from its AOF");
    let out = f
        .redis_cli(&["CONFIG", "SET", "busy-reply-threshold", "1000"])
        .await;
    assert_eq!(out.trim(), "OK", "{out}");

    // Two booking-apis started now find both drops from another Redis run and recover them; one
    // rebuild of a drop must not keep superseding the other's (each would start over for good).
    let h = Harness::with_config(cfg.clone()).await;
    let other = Harness::with_config(cfg).await;
    // The small drop recovers first (a moment: it has no holds). Until then its reserves may
    // answer 503 `recovering` — its own recovery, not the big drop's.
    testkit::eventually_within(
        BIG_RECOVERY_DEADLINE,
        "the small drop is rebuilt",
        || async { rebuilt(&h, &small).await },
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let seller = {
        let (api, small, big, f_addr) = (
            h.client.clone(),
            small.clone(),
            big.clone(),
            (f.redis_addr, key(&big, "meta")),
        );
        let (stop, during, bad) = (stop.clone(), during.clone(), bad.clone());
        tokio::spawn(async move {
            let token = api
                .fan_token(&format!("small-{}", uuid::Uuid::new_v4()))
                .await;
            let body = json!({"items": [{"sku": "TEE", "quantity": 1}]});
            let mut sold = 1;
            // Every reserve and readiness check answers, however long the big drop takes. Past
            // the per-fan limit, a new fan.
            let mut token = token;
            while !stop.load(Ordering::SeqCst) {
                if sold % 900 == 0 {
                    token = api
                        .fan_token(&format!("small-{}", uuid::Uuid::new_v4()))
                        .await;
                }
                let big_recovering = big_meta_recovering(f_addr.0, &f_addr.1).await;
                let r = api.reserve_reply(&token, &small, &new_key(), &body).await;
                if r.status == 201 {
                    sold += 1;
                    if big_recovering {
                        during.fetch_add(1, Ordering::SeqCst);
                    }
                } else {
                    bad.lock().unwrap().push(format!("reserve: {r:?}"));
                }
                let ready = api.get_reply("/readyz", None).await;
                if ready.status != 200 {
                    bad.lock().unwrap().push(format!("readyz: {ready:?}"));
                }
            }
            let _ = big;
        })
    };

    // Mid-recovery a seller creates a drop: it answers too.
    testkit::eventually_within(
        BIG_RECOVERY_DEADLINE,
        "the big drop is recovering",
        || async {
            big_meta_recovering(f.redis_addr, &key(&big, "meta")).await
                || during.load(Ordering::SeqCst) > 0
        },
    )
    .await;
    let created = h.ga_drop(10, 1, 60).await;
    assert!(!created.is_empty());

    testkit::eventually_within(
        BIG_RECOVERY_DEADLINE,
        "the big drop is recovered",
        || async { h.get_reply(&format!("/v1/drops/{big}"), None).await.status == 200 },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    seller.await.expect("the small drop's seller panicked");
    let bad = std::mem::take(&mut *bad.lock().unwrap());
    assert!(
        bad.is_empty(),
        "the small drop or readiness noticed the big drop's recovery: {} answers, first {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(
        during.load(Ordering::SeqCst) > 0,
        "the small drop sold nothing while the big drop was recovering: the two never overlapped"
    );

    // Every recovery script call of either instance handled at most `recovery.slice` entries;
    // between them they rebuilt every hold (superseded attempts included).
    let (a, b) = (
        h.server.engine.recovery_stats(),
        other.server.engine.recovery_stats(),
    );
    eprintln!("recovery: {a:?}, the other instance: {b:?}");
    let stats = engine::scripts::RebuildReport {
        kept: a.kept + b.kept,
        ended: a.ended + b.ended,
        calls: a.calls + b.calls,
        max_entries_per_call: a.max_entries_per_call.max(b.max_entries_per_call),
    };
    assert!(
        stats.max_entries_per_call <= SLICE as u64,
        "a recovery script call handled {} entries (slice {SLICE})",
        stats.max_entries_per_call
    );
    assert!(
        stats.calls >= (2 * HOLDS / SLICE) as u64,
        "{} calls can't have visited {HOLDS} holds twice in slices of {SLICE}",
        stats.calls
    );

    // The books balance: every written hold kept (they are live), the sales stand.
    assert_eq!(h.counts(&big).await, expected, "after the recovery");
    assert_consistent(&f, &h, &big).await;
    assert_consistent(&f, &h, &small).await;
    other.server.shutdown().await;
    h.server.shutdown().await;
    f.stop().await;
}

/// Whether recovery rebuilt `drop` (its `rebuild` line in the ledger).
async fn rebuilt(h: &Harness, drop: &str) -> bool {
    let db = h.server.engine.db().client().await.unwrap();
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM stock_ledger WHERE drop_id = $1 AND kind = 'rebuild'",
            &[&drop],
        )
        .await
        .unwrap()
        .get(0);
    n > 0
}

/// Whether the big drop's meta says `recovering` (read with redis-cli, off the engine).
async fn big_meta_recovering(addr: std::net::SocketAddr, meta: &str) -> bool {
    let out = tokio::process::Command::new("redis-cli")
        .arg("-h")
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["HGET", meta, "recovering"])
        .output()
        .await
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).trim() == "1"
}
