//! Fault tests of the waiting room on a stack of their own (they flush its Redis, or kill a Redis
//! Cluster's primary). Run them one at a time:
//! `cargo test --workspace --test faults -- --test-threads=1` (`./dev test` does).
//! Every test fn is named `fault_*`.
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{open, redis_cli_at, send_text, Harness, Socket};
use devstack::{free_port, Stack, StackConfig};
use engine::ids::{DropId, FanId};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// How long admission waits for returning fans after the line is restored (the test's
/// `queue.recovery_return_s`): the reconnects below take a fraction of it.
const RETURN_S: u64 = 10;
const WAITERS: usize = 200;

/// One fan's view of the line: its place, its last receipt, and what admitted it.
#[derive(Debug, Clone, Default)]
struct Fan {
    place: i64,
    receipt: Option<String>,
    /// (admission token, shop end ms) of each `admitted` frame.
    admitted: Vec<(String, i64)>,
    /// Every other frame but `position`, and how the socket ended: what a failure prints.
    other: Vec<String>,
    ended: Option<String>,
}

/// Opens a socket for `fan` that presents `auth` extras, and records what it hears into `seen`.
async fn wait(
    base: &str,
    drop: &DropId,
    token: &str,
    extras: Value,
    seen: Arc<Mutex<Fan>>,
) -> tokio::task::JoinHandle<()> {
    let mut ws: Socket = open(base, drop).await;
    let mut auth = json!({"type": "auth", "fan_token": token});
    for (k, v) in extras.as_object().cloned().unwrap_or_default() {
        auth[k] = v;
    }
    send_text(&mut ws, &auth.to_string()).await;
    tokio::spawn(async move {
        let ended = loop {
            let msg = match ws.next().await {
                Some(Ok(msg)) => msg,
                other => break format!("{other:?}"),
            };
            let t = match msg {
                Message::Text(t) => t,
                Message::Close(c) => break format!("closed: {c:?}"),
                _ => continue,
            };
            let v: Value = common::checked_frame(&t);
            let mut f = seen.lock().unwrap();
            match v["type"].as_str() {
                Some("position") => {
                    f.place = v["place"].as_i64().unwrap_or(f.place);
                    if let Some(r) = v["receipt"].as_str() {
                        f.receipt = Some(r.to_owned());
                    }
                }
                Some("admitted") => {
                    let token = v["admission_token"].as_str().unwrap().to_owned();
                    f.admitted
                        .push((token, v["shop_ends_at_ms"].as_i64().unwrap()));
                }
                _ => f.other.push(t.to_string()),
            }
        };
        seen.lock().unwrap().ended = Some(ended);
    })
}

/// A fan waiting on a socket: its id, its fan token, and what its socket heard.
type Waiter = (FanId, String, Arc<Mutex<Fan>>);

/// `n` fans named `<prefix>NNN` wait for `drop` on a socket each, until every one has been told
/// its place and handed a receipt. The sockets' listeners come back too, for the test to end.
async fn seat_waiters(
    h: &Harness,
    drop: &DropId,
    prefix: &str,
    n: usize,
) -> (Vec<Waiter>, Vec<tokio::task::JoinHandle<()>>) {
    let base = h.queue.ws_url();
    let fans: Vec<Waiter> = (0..n)
        .map(|i| {
            let (fan, token) = h.fan(&format!("{prefix}{i:03}"));
            (fan, token, Arc::new(Mutex::new(Fan::default())))
        })
        .collect();
    let mut listeners = Vec::new();
    for (_, token, seen) in &fans {
        listeners.push(wait(&base, drop, token, json!({}), seen.clone()).await);
    }
    testkit::eventually("every waiter has a place and a receipt", || async {
        fans.iter().all(|(_, _, s)| {
            let f = s.lock().unwrap();
            f.place > 0 && f.receipt.is_some()
        })
    })
    .await;
    (fans, listeners)
}

/// Unpauses the (paused) line until at least `k` of `fans` have been admitted on their sockets.
async fn admit_at_least(h: &Harness, drop: &DropId, fans: &[Waiter], k: usize) {
    h.client.set_admission(drop, json!({"paused": false})).await;
    testkit::eventually(&format!("{k} waiters are admitted"), || async {
        fans.iter()
            .filter(|(_, _, s)| !s.lock().unwrap().admitted.is_empty())
            .count()
            >= k
    })
    .await;
}

/// What each fan's socket has heard so far.
fn heard(fans: &[Waiter]) -> HashMap<FanId, Fan> {
    fans.iter()
        .map(|(f, _, s)| (f.clone(), s.lock().unwrap().clone()))
        .collect()
}

/// What a returning page presents with its socket's auth: the receipt it kept and, if it was
/// admitted, its admission token.
fn kept(before: &Fan) -> Value {
    let mut extras = json!({"receipt": before.receipt});
    if let Some((admission, _)) = before.admitted.last() {
        extras["admission_token"] = json!(admission);
    }
    extras
}

/// Admission runs admit the head of the line: with `waiting` as (place, shop end) pairs, in
/// place order, admission times never fall.
fn assert_admitted_in_place_order(mut waiting: Vec<(i64, i64)>) {
    waiting.sort();
    for pair in waiting.windows(2) {
        assert!(
            pair[0].1 <= pair[1].1,
            "place {} was admitted (shop end {}) after place {} (shop end {}): out of order",
            pair[0].0,
            pair[0].1,
            pair[1].0,
            pair[1].1
        );
    }
}

/// The claims of an admission token (its middle part is base64url JSON).
fn claims(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// A stack of the test's own: Redis and Postgres on free ports, state under `name`.
async fn own_stack(name: &'static str) -> Stack {
    tokio::task::spawn_blocking(move || {
        Stack::start(StackConfig {
            name: name.into(),
            redis_port: free_port(),
            pg_port: free_port(),
        })
    })
    .await
    .unwrap()
    .expect("the stack starts")
}

/// booking-api and queue-server on `redis_url` and `database_url` — the line's marks kept every
/// 200 ms, returning fans awaited `RETURN_S` after a restore — and a queue drop of 1,000 whose
/// line starts paused and admits `rate_per_s` once it runs.
async fn paused_line(redis_url: &str, database_url: &str, rate_per_s: u32) -> (Harness, DropId) {
    let mut cfg = testkit::test_config_for(redis_url, database_url);
    // As common::test_config: both servers accept each other's fan tokens.
    cfg.identity.dev_secret = "queue-test-dev-secret".into();
    cfg.database.pool_size = 4;
    cfg.queue.recovery_return_s = RETURN_S;
    cfg.queue.line_marks_interval_ms = 200;
    let h = Harness::start_with(cfg).await;
    let drop = h
        .queue_drop(
            1_000,
            1,
            json!({"rate_per_s": rate_per_s, "burst": 1, "max_active": 1000, "paused": true}),
            None,
        )
        .await;
    (h, drop)
}

/// Waits until booking-api's watcher has rebuilt `drop` from Postgres (a `rebuild` line in its
/// ledger) and Redis, at `redis_url`, no longer has it recovering.
async fn wait_rebuilt(h: &Harness, drop: &DropId, redis_url: &str) {
    let db = h.booking.engine.db();
    testkit::eventually("the drop is rebuilt (a ledger line)", || async {
        // The look shares booking-api's small pool with the rebuild itself: a connection not
        // free within the pool's timeout (a busy machine) is "not yet", not a failure.
        let Ok(c) = db.client().await else {
            return false;
        };
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM stock_ledger WHERE drop_id = $1 AND kind = 'rebuild'",
                &[&drop.as_str()],
            )
            .await
            .unwrap()
            .get(0);
        n > 0
    })
    .await;
    testkit::eventually("the drop is no longer recovering", || async {
        let meta = engine::keys::drop_key(drop, "meta");
        redis_cli_at(redis_url, &["HGET", &meta, "recovering"]).await == "0"
    })
    .await;
}

/// 200 fans wait on sockets and some are admitted; Redis is flushed. The drop is rebuilt, the
/// line restored from its kept marks, and every fan comes back — in reverse order, the worst
/// case — with its receipt and, if admitted, its admission token. The admitted get their
/// sessions back (not a second admission); the others are admitted in their original order, at
/// their original places; a fan new after the loss joins behind all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_the_line_survives_a_redis_flush() {
    let stack = own_stack("fault-line-flush").await;
    let (h, drop) = paused_line(&stack.redis_url(), &stack.database_url(), 20).await;
    let base = h.queue.ws_url();
    let redis_url = stack.redis_url();

    // 200 waiters, each on a socket, each told its place (and handed a receipt).
    let (fans, listeners) = seat_waiters(&h, &drop, "w", WAITERS).await;

    // Some are admitted (20 a second); the line's marks reach Postgres; then Redis loses all.
    admit_at_least(&h, &drop, &fans, 30).await;
    let db = h.booking.engine.db();
    testkit::eventually("the line's marks are kept", || async {
        db.line_marks(&drop).await.unwrap().place > 0
    })
    .await;
    assert_eq!(redis_cli_at(&redis_url, &["FLUSHALL"]).await, "OK");
    for l in listeners {
        l.abort();
    }
    let before = heard(&fans);
    let was_admitted = |f: &FanId| !before[f].admitted.is_empty();

    // The drop is rebuilt and its line restored (booking-api's watcher notices the loss).
    testkit::eventually("the drop is rebuilt and its line restored", || async {
        let meta = engine::keys::drop_key(&drop, "meta");
        let fields = redis_cli_at(
            &redis_url,
            &["HMGET", &meta, "recovering", "line_rebuilt_ms"],
        )
        .await;
        let mut lines = fields.lines();
        lines.next() == Some("0") && lines.next().is_some_and(|l| !l.is_empty())
    })
    .await;

    // Everyone comes back, last place first, with what their page kept.
    let mut order: Vec<&Waiter> = fans.iter().collect();
    order.sort_by_key(|(f, _, _)| std::cmp::Reverse(before[f].place));
    let mut listeners = Vec::new();
    for (fan, token, seen) in &order {
        *seen.lock().unwrap() = Fan::default();
        let extras = kept(&before[fan]);
        listeners.push(wait(&base, &drop, token, extras, seen.clone()).await);
    }
    // A fan new after the loss.
    let (_, newcomer) = h.fan("newcomer");
    let (status, joined) = h.join(&drop, &newcomer).await;
    assert_eq!(status, 201, "{joined}");
    let highest = before.values().map(|f| f.place).max().unwrap();
    assert!(
        joined["place"].as_i64().unwrap() > highest,
        "the newcomer's place {joined} must follow every restored one (up to {highest})"
    );

    // A page whose socket ends before its admission comes back again, as a page does:
    // queue-server may close a socket while the restored line settles (a single round of coming
    // back left 2 of 200 fans closed and never admitted in one fresh-clone run).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let all_back = loop {
        for (l, (fan, token, seen)) in listeners.iter_mut().zip(&order) {
            let again = {
                let s = seen.lock().unwrap();
                s.ended.is_some() && s.admitted.is_empty()
            };
            if !again {
                continue;
            }
            *seen.lock().unwrap() = Fan::default();
            l.abort();
            *l = wait(&base, &drop, token, kept(&before[fan]), seen.clone()).await;
        }
        if fans
            .iter()
            .all(|(_, _, s)| !s.lock().unwrap().admitted.is_empty())
        {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if !all_back {
        let missing: Vec<String> = fans
            .iter()
            .filter_map(|(f, _, s)| {
                let s = s.lock().unwrap();
                s.admitted
                    .is_empty()
                    .then(|| format!("{f} (before: {:?}) now: {s:?}", before[f]))
            })
            .collect();
        panic!(
            "within 120 s, {} returning fans were neither admitted nor given their session back: {missing:#?}",
            missing.len()
        );
    }
    let after = heard(&fans);
    // The admitted have their sessions back, not a second admission: the same shop end.
    let mut waiting: Vec<(i64, i64)> = Vec::new();
    for (fan, b) in &before {
        let a = &after[fan];
        let (token, shop_end) = a.admitted.first().unwrap();
        assert_eq!(
            claims(token)["place"].as_i64(),
            Some(b.place),
            "{fan}: admitted at its original place"
        );
        if was_admitted(fan) {
            assert_eq!(
                Some(shop_end),
                b.admitted.last().map(|(_, e)| e),
                "{fan} was admitted before the loss: its session comes back as it was"
            );
        } else {
            waiting.push((b.place, *shop_end));
        }
    }
    assert!(
        waiting.len() >= 100,
        "most fans were still waiting: {}",
        waiting.len()
    );
    let shops_after_loss = waiting.iter().min().unwrap().1;
    assert_admitted_in_place_order(waiting);
    let shops_before = before
        .values()
        .flat_map(|f| f.admitted.iter().map(|(_, e)| *e))
        .max()
        .unwrap();
    assert!(
        shops_after_loss > shops_before,
        "the waiters were admitted after the loss"
    );
    for l in listeners {
        l.abort();
    }
    h.shutdown().await;
    std::mem::drop(stack);
}

/// Issue 14 on a Redis Cluster: fans wait on sockets for a queue drop, some are admitted, and
/// the primary that owns the drop's slot is killed (`kill -9`). Its replica takes over (a new run
/// id): booking-api's watcher rebuilds the drop from Postgres and restores its line. The line
/// keeps its order: every fan is admitted at its original place, the admitted keep their
/// sessions, and the others are admitted in place order after the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_cluster_failover_keeps_the_line() {
    const FANS: usize = 60;
    let base_port = devstack::cluster::free_base_port().expect("six free ports for a cluster");
    let stack = tokio::task::spawn_blocking(move || {
        Stack::start_cluster(StackConfig {
            name: "fault-cluster-line".into(),
            redis_port: base_port,
            pg_port: free_port(),
        })
    })
    .await
    .unwrap()
    .expect("the cluster stack starts");
    let (h, drop) = paused_line(&stack.redis_url(), &stack.database_url(), 10).await;
    let stack = Mutex::new(stack);
    let base = h.queue.ws_url();
    let slot = engine::keys::drop_slot(&drop);
    let owner = |nodes: &[devstack::cluster::ClusterNode]| {
        nodes
            .iter()
            .filter(|n| n.primary && !n.failed)
            .find(|n| n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|n| n.port)
    };
    let nodes = stack
        .lock()
        .unwrap()
        .cluster_topology()
        .expect("the topology");
    let killed = owner(&nodes).expect("the drop's primary");

    let (fans, mut listeners) = seat_waiters(&h, &drop, "c", FANS).await;
    // Some are admitted, then admission pauses: the rest wait through the failover.
    admit_at_least(&h, &drop, &fans, 10).await;
    h.client.set_admission(&drop, json!({"paused": true})).await;
    let db = h.booking.engine.db();
    testkit::eventually("the line's marks are kept", || async {
        db.line_marks(&drop).await.unwrap().place > 0
    })
    .await;
    let before = heard(&fans);

    tokio::task::block_in_place(|| stack.lock().unwrap().kill_cluster_node(killed))
        .expect("the primary is killed");
    let alive = nodes
        .iter()
        .find(|n| n.port != killed)
        .expect("another node")
        .port;
    let redis_url = format!("redis-cluster://127.0.0.1:{alive}");
    testkit::eventually("a replica serves the drop's slot", || async {
        let nodes = tokio::task::block_in_place(|| stack.lock().unwrap().cluster_topology());
        nodes
            .ok()
            .and_then(|n| owner(&n))
            .is_some_and(|p| p != killed)
    })
    .await;
    // booking-api's watcher sees the shard's new run id and rebuilds the drop from Postgres.
    wait_rebuilt(&h, &drop, &redis_url).await;

    // Pages whose socket the failover ended come back with what they kept — whenever it ends, as
    // a page does: queue-server may tell a socket `recovering` (and close it) after booking-api's
    // rebuild is done, so this goes on until everyone is admitted rather than looking once (a
    // socket closed just after a single look was never reconnected: a flaky failure).
    let mut back: HashSet<FanId> = HashSet::new();
    let mut unpaused = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let all = loop {
        for (l, (fan, token, seen)) in listeners.iter_mut().zip(&fans) {
            let again = {
                let s = seen.lock().unwrap();
                // Ended before coming back, or came back and ended again before its admission.
                s.ended.is_some() && (!back.contains(fan) || s.admitted.is_empty())
            };
            if !again {
                continue;
            }
            let extras = kept(&before[fan]);
            *seen.lock().unwrap() = Fan::default();
            l.abort();
            *l = wait(&base, &drop, token, extras, seen.clone()).await;
            back.insert(fan.clone());
        }
        if !unpaused {
            h.client
                .set_admission(&drop, json!({"paused": false}))
                .await;
            unpaused = true;
        }
        if fans
            .iter()
            .all(|(_, _, s)| !s.lock().unwrap().admitted.is_empty())
        {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let after = heard(&fans);
    assert!(
        all,
        "within 120 s some fans were never admitted: {after:#?}"
    );

    // Everyone at their original place; the admitted kept their sessions; the rest in order.
    let mut waiting: Vec<(i64, i64)> = Vec::new();
    for (fan, b) in &before {
        let a = &after[fan];
        for (token, _) in &a.admitted {
            assert_eq!(
                claims(token)["place"].as_i64(),
                Some(b.place),
                "{fan}: admitted at its original place ({a:?})"
            );
        }
        match b.admitted.last() {
            Some((_, shop_end)) => assert!(
                a.admitted.iter().all(|(_, e)| e == shop_end),
                "{fan} was admitted before the failover: its session stays as it was ({a:?})"
            ),
            None => waiting.push((b.place, a.admitted[0].1)),
        }
    }
    assert!(
        waiting.len() >= FANS / 2,
        "most fans waited: {}",
        waiting.len()
    );
    assert_admitted_in_place_order(waiting);
    for l in listeners {
        l.abort();
    }
    h.shutdown().await;
    std::mem::drop(stack);
}

/// An HTTP join that presents `receipt` (`X-Place-Receipt`) if given; (status, body).
async fn join_with(h: &Harness, drop: &DropId, token: &str, receipt: Option<&str>) -> (u16, Value) {
    let url = format!("{}/v1/drops/{drop}/queue", h.queue.url());
    let mut req = h.http.post(url).bearer_auth(token);
    if let Some(r) = receipt {
        req = req.header("x-place-receipt", r);
    }
    h.call(req).await
}

/// Whether any file of Redis' AOF directory holds `needle` (a key written after the writes a
/// copy of the file must hold: the AOF is appended in order).
fn aof_holds(dir: &std::path::Path, needle: &str) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        let bytes = std::fs::read(e.unwrap().path()).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
    })
}

/// Issue 14: Redis loses the line's last joins but not the line. It restarts from an AOF that
/// missed its tail (what a failover to a replica lagging a moment behind does too): the join
/// counter is still there, but below places it had handed out. The fans whose joins were lost
/// come back with their receipts only after fans new since the restart have joined, and still
/// get their own places back, ahead of the newcomers; the line admits them in place order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_a_redis_that_lost_its_last_joins_keeps_the_line() {
    const KEPT: usize = 20;
    const LOST: usize = 20;
    const NEW: usize = 20;
    let mut stack = own_stack("fault-line-rewind").await;
    let (h, drop) = paused_line(&stack.redis_url(), &stack.database_url(), 20).await;
    let redis_url = stack.redis_url();
    let aof = stack.state_dir().join("redis/appendonlydir");
    let copy = aof.with_file_name("appendonlydir.copy");

    // (fan, token, place, receipt) of each fan's first join.
    let join_all = |prefix: &'static str, n: usize| {
        let h = &h;
        let drop = &drop;
        async move {
            let mut out = Vec::new();
            for i in 0..n {
                let (fan, token) = h.fan(&format!("{prefix}{i:03}"));
                let (status, joined) = join_with(h, drop, &token, None).await;
                assert_eq!(status, 201, "{fan} joins: {joined}");
                let place = joined["place"].as_i64().unwrap();
                let receipt = joined["receipt"].as_str().unwrap().to_owned();
                out.push((fan, token, place, receipt));
            }
            out
        }
    };

    // Fans whose joins Redis keeps: the AOF copy is taken once a write after them is in the
    // file (it is appended in order, so theirs are whole before it).
    let kept = join_all("k", KEPT).await;
    let marker = format!("fault-line-rewind-{:08x}", rand::random::<u32>());
    assert_eq!(redis_cli_at(&redis_url, &["SET", &marker, "1"]).await, "OK");
    testkit::eventually("the kept joins are in the AOF", || async {
        aof_holds(&aof, &marker)
    })
    .await;
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(&aof).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    // Fans whose joins Redis will lose; then Redis is SIGKILLed and restarts from the copy.
    let lost = join_all("l", LOST).await;
    tokio::task::block_in_place(|| stack.kill_redis()).expect("redis-server is killed");
    std::fs::remove_dir_all(&aof).unwrap();
    std::fs::rename(&copy, &aof).unwrap();
    tokio::task::block_in_place(|| stack.start_redis()).expect("redis-server restarts");
    let seq_key = engine::keys::drop_key(&drop, "seq");
    let seq: i64 = redis_cli_at(&redis_url, &["GET", &seq_key])
        .await
        .parse()
        .unwrap();
    assert_eq!(
        seq, KEPT as i64,
        "the counter survived, without the lost joins"
    );

    // booking-api's watcher sees the new run and rebuilds the drop.
    wait_rebuilt(&h, &drop, &redis_url).await;

    // Fans new since the restart join first; then the lost and the kept come back with their
    // receipts.
    let new = join_all("n", NEW).await;
    let first_new = new.iter().map(|f| f.2).min().unwrap();
    for (fan, token, place, receipt) in lost.iter().chain(&kept) {
        let (status, joined) = join_with(&h, &drop, token, Some(receipt)).await;
        assert_eq!(
            joined["place"].as_i64(),
            Some(*place),
            "{fan} joined before the loss at {place} and comes back with its receipt: its place, \
             not a new one ({joined}); the first newcomer's is {first_new}"
        );
        assert_eq!(status, 200, "{fan} comes back: {joined}");
    }
    let last_old = lost.iter().chain(&kept).map(|f| f.2).max().unwrap();
    assert!(
        last_old < first_new,
        "every fan new since the loss is behind every fan from before it ({last_old} < {first_new})"
    );

    // The line admits them all, in place order: nobody new before anyone from before the loss.
    h.client
        .set_admission(&drop, json!({"paused": false}))
        .await;
    let all: Vec<_> = kept.iter().chain(&lost).chain(&new).collect();
    let shop_ends: std::sync::Mutex<HashMap<FanId, i64>> = Default::default();
    let admitted = testkit::wait_until(Duration::from_secs(120), || async {
        for (fan, token, _, _) in &all {
            if shop_ends.lock().unwrap().contains_key(fan) {
                continue;
            }
            let (status, me) = h.me(&drop, token).await;
            if status == 200 && me["status"] == "admitted" {
                let end = me["shop_ends_at_ms"].as_i64().unwrap();
                shop_ends.lock().unwrap().insert(fan.clone(), end);
            }
        }
        shop_ends.lock().unwrap().len() == all.len()
    })
    .await;
    let shop_ends = shop_ends.into_inner().unwrap();
    assert!(
        admitted,
        "within 120 s only {} of {} fans were admitted",
        shop_ends.len(),
        all.len()
    );
    assert_admitted_in_place_order(all.iter().map(|f| (f.2, shop_ends[&f.0])).collect());
    h.shutdown().await;
    std::mem::drop(stack);
}
