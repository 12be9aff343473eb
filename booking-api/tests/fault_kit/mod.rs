//! What the fault tests share (booking-api/tests/faults.rs, cluster_faults.rs, netfaults.rs,
//! recovery.rs): a stack of the test's own ([`Fault`]), shoppers that reserve and pay through
//! the fault ([`shopper`]), and the checks every fault run ends with ([`assert_consistent`]:
//! Redis agrees with itself and with Postgres hold by hold, nothing is sold twice, the books
//! balance).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devstack::{free_port, BehindLink, NetLink, Stack, StackConfig};
use engine::ids::DropId;
use serde_json::{json, Value};
use testkit::{new_key, BookingClient, Reply};

use crate::common::Harness;

/// How long recovery may take before a test gives up: generous, the machine is shared.
pub const RECOVERY_DEADLINE: Duration = Duration::from_secs(60);

// ---- the stack --------------------------------------------------------------------------------

/// A Postgres + Redis pair of this test's own. devstack is blocking: its calls run on tokio's
/// blocking pool.
pub struct Fault {
    pub stack: Arc<Mutex<Stack>>,
    /// Where Redis listens: 127.0.0.1, or the inside end of the stack's link.
    pub redis_addr: SocketAddr,
    pub redis_url: String,
    pub db_url: String,
}

impl Fault {
    pub async fn start(name: &str) -> Fault {
        Fault::start_with(name, None)
            .await
            .expect("the fault stack starts")
    }

    /// A stack whose Redis or Postgres runs behind a [`NetLink`] (its own network namespace),
    /// so the test can drop packets between the servers and it. None, with the reason on
    /// stderr, where the kernel refuses namespaces or nftables: the caller skips.
    pub async fn start_behind_link(name: &str, which: BehindLink) -> Option<Fault> {
        match Fault::start_with(name, Some(which)).await {
            Ok(f) => Some(f),
            Err(e) if devstack::is_kernel_refusal(&e) => {
                eprintln!("SKIPPED {name}: {e:#}");
                None
            }
            Err(e) => panic!("the fault stack behind a link starts: {e:#}"),
        }
    }

    async fn start_with(name: &str, behind_link: Option<BehindLink>) -> anyhow::Result<Fault> {
        let cfg = StackConfig {
            name: name.to_owned(),
            redis_port: free_port(),
            pg_port: free_port(),
        };
        let stack = tokio::task::spawn_blocking(move || match behind_link {
            Some(which) => Stack::start_behind_link(cfg, which),
            None => Stack::start(cfg),
        })
        .await
        .expect("the stack start task")?;
        Ok(Fault::of(stack))
    }

    /// A stack whose Redis is a cluster of its own (devstack's [`Stack::start_cluster`]: six
    /// redis-servers, three primaries with a replica each), with its own Postgres.
    pub async fn start_cluster(name: &str) -> Fault {
        let cfg = StackConfig {
            name: name.to_owned(),
            redis_port: devstack::cluster::free_base_port().expect("six free ports for a cluster"),
            pg_port: free_port(),
        };
        let stack = tokio::task::spawn_blocking(move || Stack::start_cluster(cfg))
            .await
            .expect("the stack start task")
            .expect("the cluster stack starts");
        Fault::of(stack)
    }

    fn of(stack: Stack) -> Fault {
        Fault {
            redis_addr: stack.redis_addr(),
            redis_url: stack.redis_url(),
            db_url: stack.database_url(),
            stack: Arc::new(Mutex::new(stack)),
        }
    }

    /// Runs `f` on the stack's link (loss, partition, heal) off the async workers.
    pub async fn link(&self, f: impl FnOnce(&NetLink) -> anyhow::Result<()> + Send + 'static) {
        self.with(move |s| f(s.link().expect("a stack behind a link")))
            .await
            .expect("the link changes");
    }

    /// Runs a blocking devstack call (stop / start / kill) off the async workers.
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Stack) -> T + Send + 'static,
    ) -> T {
        let stack = self.stack.clone();
        tokio::task::spawn_blocking(move || f(&mut stack.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .expect("the devstack task")
    }

    pub async fn stop(self) {
        self.with(|s| s.stop()).await;
    }

    /// `redis-cli -c -p PORT args...`, its stdout (`-c` follows a Redis Cluster's redirections to
    /// the node that holds the key; the same on one Redis).
    pub async fn redis_cli(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new("redis-cli")
            .arg("-c")
            .arg("-h")
            .arg(self.redis_addr.ip().to_string())
            .arg("-p")
            .arg(self.redis_addr.port().to_string())
            .args(args)
            .output()
            .await
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn flushall(&self) {
        let out = self.redis_cli(&["FLUSHALL"]).await;
        assert_eq!(out.trim(), "OK", "FLUSHALL answered {out}");
    }

    /// A Redis hash as field → value (redis-cli's JSON: values may hold newlines, as the stored
    /// answers in a holds hash do).
    pub async fn redis_hash(&self, key: &str) -> HashMap<String, String> {
        let out = self.redis_cli(&["--json", "HGETALL", key]).await;
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("HGETALL {key}: {e}: {out}"))
    }

    /// A drop's hold records by id: its holds hash without the stored answers beside them
    /// (`i:` fields, lua/lib.lua).
    pub async fn redis_holds(&self, drop: &str) -> HashMap<String, String> {
        let mut holds = self.redis_hash(&key(drop, "holds")).await;
        holds.retain(|field, _| !field.starts_with(engine::keys::DropKeys::ANSWER_PREFIX));
        holds
    }
}

pub fn key(drop: &str, name: &str) -> String {
    format!("fg:{{{drop}}}:{name}")
}

/// Polls `f` until it holds; panics with `what` after [`RECOVERY_DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    testkit::eventually_within(RECOVERY_DEADLINE, what, f).await
}

// ---- what Redis and Postgres hold ---------------------------------------------------------------

/// Confirming holds of a drop, read straight from its confirming ZSET (None: Redis didn't answer).
pub async fn confirming(h: &Harness, drop: &str) -> Option<usize> {
    let d = DropId::parse(drop).unwrap();
    h.server
        .engine
        .redis()
        .overdue_confirming(&d, i64::MAX, 1_000_000)
        .await
        .ok()
        .map(|v| v.len())
}

/// Postgres' orders of a drop: hold id → order id.
pub async fn pg_orders(h: &Harness, drop: &str) -> HashMap<String, String> {
    let db = h.server.engine.db().client().await.unwrap();
    db.query(
        "SELECT hold_id, order_id::text FROM orders WHERE drop_id = $1",
        &[&drop],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Seats Postgres sold in a drop, checking on the way that none was sold twice.
pub async fn pg_sold_seats(h: &Harness, drop: &str) -> HashSet<String> {
    let db = h.server.engine.db().client().await.unwrap();
    let rows = db
        .query(
            "SELECT seat_id, count(*) FROM order_items WHERE drop_id = $1 AND seat_id IS NOT NULL \
             GROUP BY seat_id",
            &[&drop],
        )
        .await
        .unwrap();
    let mut seats = HashSet::new();
    for r in rows {
        let (seat, n): (String, i64) = (r.get(0), r.get(1));
        assert_eq!(n, 1, "seat {seat} of {drop} sold {n} times");
        seats.insert(seat);
    }
    seats
}

/// Every bucket: Postgres' sold within total, and order items / ledger / inventory agree.
pub async fn assert_pg_sane(h: &Harness, drop: &str) {
    let db = h.server.engine.db().client().await.unwrap();
    for r in db
        .query(
            "SELECT i.bucket, i.total::bigint, i.sold::bigint, \
             (SELECT coalesce(sum(quantity), 0)::bigint FROM order_items o WHERE o.drop_id = i.drop_id AND o.bucket = i.bucket), \
             (SELECT count(*) FROM orders o WHERE o.drop_id = i.drop_id) \
             FROM inventory i WHERE i.drop_id = $1",
            &[&drop],
        )
        .await
        .unwrap()
    {
        let (bucket, total, sold, items): (String, i64, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        assert!(sold <= total, "{drop}/{bucket}: sold {sold} > total {total}");
        assert_eq!(sold, items, "{drop}/{bucket}: inventory.sold != order items");
    }
    let bad: i64 = db
        .query_one(
            "SELECT count(*) FROM fan_purchases f WHERE f.drop_id = $1 AND f.units <> \
             (SELECT coalesce(sum(i.quantity), 0) FROM orders o JOIN order_items i USING (order_id) \
              WHERE o.drop_id = f.drop_id AND o.fan_id = f.fan_id)",
            &[&drop],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad, 0, "{drop}: fan_purchases disagree with the orders");
}

/// Redis agrees with itself and with Postgres, hold by hold (call it when no request is in
/// flight): a hold with an order is `sold` and a `sold` hold has an order; per bucket, held ==
/// the units of live holds; each seat is `#` iff Postgres sold it, else held by the live hold
/// that has it, else free; each fan's count == units bought (Postgres) + units in live holds.
/// Then the harness' own check: available + held + sold == total and Postgres' sold == Redis'.
pub async fn assert_consistent(f: &Fault, h: &Harness, drop: &str) {
    let stock = f.redis_hash(&key(drop, "stock")).await;
    let holds = f.redis_holds(drop).await;
    let seats = f.redis_hash(&key(drop, "seats")).await;
    // The fans hash: fan → units, and "h|<fan>" → the fan's live hold ids (lua/lib.lua).
    let (live_lists, fans): (HashMap<String, String>, HashMap<String, String>) = f
        .redis_hash(&key(drop, "fans"))
        .await
        .into_iter()
        .partition(|(field, _)| field.starts_with("h|"));
    let orders = pg_orders(h, drop).await;
    let sold_seats = pg_sold_seats(h, drop).await;
    let db = h.server.engine.db().client().await.unwrap();
    let bought: HashMap<String, i64> = db
        .query(
            "SELECT fan_id, units::bigint FROM fan_purchases WHERE drop_id = $1",
            &[&drop],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    let mut held: HashMap<String, i64> = HashMap::new();
    let mut live_units: HashMap<String, i64> = HashMap::new();
    let mut held_seats: HashMap<String, String> = HashMap::new();
    let mut live_ids: HashMap<String, Vec<String>> = HashMap::new();
    for (id, raw) in &holds {
        let hold: Value = serde_json::from_str(raw).unwrap();
        let st = hold["st"].as_str().unwrap();
        assert_eq!(
            orders.contains_key(id),
            st == "sold",
            "{drop}: hold {id} is `{st}` in Redis; its order in Postgres: {:?}",
            orders.get(id)
        );
        if st == "held" || st == "confirming" {
            let fan = hold["fan"].as_str().unwrap().to_owned();
            live_ids
                .entry(format!("h|{fan}"))
                .or_default()
                .push(id.clone());
            *live_units.entry(fan).or_default() += hold["u"].as_i64().unwrap();
            for item in hold["it"].as_array().unwrap() {
                let b = item["b"].as_str().unwrap().to_owned();
                *held.entry(b).or_default() += item["q"].as_i64().unwrap();
                if let Some(seat) = item["s"].as_str() {
                    let other = held_seats.insert(seat.to_owned(), id.clone());
                    assert!(other.is_none(), "{drop}: seat {seat} in two live holds");
                }
            }
        }
    }
    for field in stock.keys() {
        if let Some(bucket) = field.strip_prefix("h:") {
            let h_count: i64 = stock[field].parse().unwrap();
            assert_eq!(
                h_count,
                held.get(bucket).copied().unwrap_or(0),
                "{drop}/{bucket}: Redis' held count != units of live holds"
            );
        }
    }
    let mut redis_sold_seats = 0;
    for (seat, state) in &seats {
        match state.as_str() {
            "#" => {
                redis_sold_seats += 1;
                assert!(
                    sold_seats.contains(seat),
                    "{drop}: seat {seat} sold in Redis, not in Postgres"
                );
            }
            "-" => {
                assert!(
                    !sold_seats.contains(seat),
                    "{drop}: seat {seat} sold in Postgres, free in Redis"
                );
                assert!(
                    !held_seats.contains_key(seat),
                    "{drop}: seat {seat} free in Redis but in live hold {}",
                    held_seats[seat]
                );
            }
            hold => assert_eq!(
                held_seats.get(seat).map(String::as_str),
                Some(hold),
                "{drop}: seat {seat} marked held by {hold}"
            ),
        }
    }
    assert_eq!(
        redis_sold_seats,
        sold_seats.len(),
        "{drop}: sold seats, Redis vs Postgres"
    );
    let every_fan: HashSet<&String> = fans
        .keys()
        .chain(bought.keys())
        .chain(live_units.keys())
        .collect();
    let listed: HashMap<String, Vec<String>> = live_lists
        .into_iter()
        .map(|(field, ids)| {
            let mut ids: Vec<String> = ids.split(',').map(str::to_owned).collect();
            ids.sort();
            (field, ids)
        })
        .collect();
    for ids in live_ids.values_mut() {
        ids.sort();
    }
    assert_eq!(
        listed, live_ids,
        "{drop}: the fans' live-hold lists != their live holds"
    );
    for fan in every_fan {
        let counted: i64 = fans.get(fan).map_or(0, |v| v.parse().unwrap());
        let expected =
            bought.get(fan).copied().unwrap_or(0) + live_units.get(fan).copied().unwrap_or(0);
        assert_eq!(
            counted, expected,
            "{drop}: fan {fan}'s count in Redis != bought + live holds"
        );
    }
    assert_pg_sane(h, drop).await;
    h.assert_invariants(drop).await;
}

pub fn seated_body(sections: &[&str], rows: u32, seats: u32, per_fan_limit: u32) -> Value {
    json!({
        "name": "fault seated", "per_fan_limit": per_fan_limit, "hold_ttl_s": 600,
        "admission": {"mode": "open"},
        "inventory": {"kind": "seated", "sections": sections.iter().map(|s| json!({
            "section": s, "price_cents": 4000,
            "rows": (1..=rows).map(|r| json!({"row": r.to_string(), "seats": seats})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()}
    })
}

// ---- shoppers -----------------------------------------------------------------------------------

/// What a shopper buys: GA units, or a seated drop's seats (sections `A` and `B`, 10 rows of 20,
/// as [`seated_body`] makes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropKind {
    Ga,
    Seated,
}

/// What shoppers saw, for the checks afterwards.
#[derive(Default)]
pub struct Seen {
    /// Reserve and confirm requests sent, retries included.
    pub reserves: usize,
    pub confirms: usize,
    /// 5xx answers by "<what> <status> <code>" (e.g. `reserve 503 recovering`).
    pub errors: HashMap<String, usize>,
    /// (drop, fan token, hold id, the confirm's last answer if the hold was paid for)
    pub holds: Vec<(String, String, String, Option<Reply>)>,
}

/// One shopper: fan after fan reserves (GA units; best-available or named seats) and pays for
/// most holds, retrying a 503 as a client would (the same Idempotency-Key, the same payment
/// reference), until `stop`; a quarter of the holds are left held (live holds must survive a
/// recovery or end cleanly).
pub async fn shopper(
    api: BookingClient,
    drop: String,
    kind: DropKind,
    stop: Arc<AtomicBool>,
    confirmed: Arc<AtomicUsize>,
    seen: Arc<Mutex<Seen>>,
) {
    let retry = |r: &Reply| r.status == 503 && !stop.load(Ordering::SeqCst);
    let pause = || tokio::time::sleep(Duration::from_millis(rand::random_range(5..40)));
    let note = |what: &str, r: &Reply| {
        let mut s = seen.lock().unwrap();
        match what {
            "reserve" => s.reserves += 1,
            _ => s.confirms += 1,
        }
        if r.status >= 500 {
            let key = format!("{what} {} {}", r.status, r.code());
            *s.errors.entry(key).or_default() += 1;
        }
    };
    'fans: while !stop.load(Ordering::SeqCst) {
        let token = api
            .fan_token(&format!("shopper-{}", uuid::Uuid::new_v4()))
            .await;
        while !stop.load(Ordering::SeqCst) {
            let body = reserve_body(kind);
            let idem = new_key();
            let r = loop {
                let r = api.reserve_reply(&token, &drop, &idem, &body).await;
                r.check_5xx("reserve", &["unavailable", "recovering"]);
                note("reserve", &r);
                if !retry(&r) {
                    break r;
                }
                pause().await;
            };
            let hold = match (r.status, r.code()) {
                (201, _) => r.str("hold_id"),
                (409, "insufficient_stock" | "all_held" | "sold_out") => {
                    pause().await;
                    continue;
                }
                (409, "seat_unavailable") if kind == DropKind::Seated => {
                    pause().await;
                    continue;
                }
                (422, "limit_exceeded") => continue 'fans,
                (503, _) => break 'fans,
                _ => panic!("reserve {body}: unexpected {r:?}"),
            };
            if rand::random_bool(0.25) {
                let held = (drop.clone(), token.clone(), hold, None);
                seen.lock().unwrap().holds.push(held);
                continue;
            }
            let reference = format!("ok_{}", uuid::Uuid::new_v4());
            let c = loop {
                let c = api.confirm_reply(&token, &hold, &reference).await;
                c.check_5xx("confirm", &["unavailable", "payment_pending", "recovering"]);
                note("confirm", &c);
                if !retry(&c) {
                    break c;
                }
                pause().await;
            };
            match (c.status, c.code()) {
                (200 | 201, _) => {
                    assert_eq!(c.str("hold_id"), hold);
                    confirmed.fetch_add(1, Ordering::SeqCst);
                }
                // The hold was lost with Redis' last writes, or a rebuild ended it (Postgres sold
                // its seat meanwhile): refused cleanly, nothing charged.
                (404, "unknown_hold") | (410, "hold_expired") => {}
                // Given up at `stop`: the reconciler settles it.
                (503, _) => {}
                _ => panic!("confirm {hold}: unexpected {c:?}"),
            }
            let paid = (drop.clone(), token.clone(), hold, Some(c));
            seen.lock().unwrap().holds.push(paid);
            pause().await;
        }
    }
}

/// A reserve's body: one or two GA units; or, half the time each, one or two best-available
/// seats of a section, or one named seat.
fn reserve_body(kind: DropKind) -> Value {
    let section = ["A", "B"][rand::random_range(0..2)];
    match kind {
        DropKind::Ga => {
            json!({"items": [{"sku": "TEE", "quantity": rand::random_range(1..=2)}]})
        }
        DropKind::Seated if rand::random_bool(0.5) => {
            json!({"best_available": {"section": section, "quantity": rand::random_range(1..=2)}})
        }
        DropKind::Seated => {
            let row = rand::random_range(1..=10);
            let seat = format!("{section}-{row}-{}", rand::random_range(1..=20));
            json!({"seats": [seat]})
        }
    }
}
