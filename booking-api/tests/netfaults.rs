//! Network-fault tests: Redis runs in a network namespace of the test's own, behind a veth link
//! the test controls (devstack's `NetLink`: nftables drops a share of the packets, or all of them
//! for a partition; devstack's `DelayRelay` adds latency, since not every kernel has `tc netem`).
//! booking-api stays in the test process, in the root namespace. Each test ends with what the
//! fault tests (faults.rs) check: every answer a documented code with `Retry-After` on 503s, no
//! request hanging past the request timeout, every acknowledged hold and order there, nothing sold
//! twice, `available + held + sold == total`, and Redis agreeing with Postgres.
//!
//! Where the kernel refuses namespaces or nftables, each test says so on stderr and passes as a
//! skip; any other failure to build the link fails it. Run them one at a time:
//! `cargo test --workspace --test netfaults -- --test-threads=1` (`./dev test` does). Every test
//! fn is named `fault_*`.
mod common;
mod fault_kit;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Harness;
use devstack::{BehindLink, DelayRelay};
use fault_kit::{assert_consistent, confirming, eventually, pg_orders, seated_body, Fault};
use futures::future::join_all;
use serde_json::{json, Value};
use testkit::{new_key, test_config_for, BookingClient, Reply};

/// booking-api's request timeout in these tests: every answer comes within it, or it is a bug.
const REQUEST_TIMEOUT_MS: u64 = 4_000;

/// A client that gives up a little after booking-api's request timeout: a request it gives up on
/// hung past that timeout, and the test fails on it (`BookingClient::send` panics on a client
/// error).
fn impatient_api(h: &Harness) -> BookingClient {
    BookingClient {
        http: reqwest::Client::builder()
            .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS + 3_000))
            .pool_max_idle_per_host(256)
            .build()
            .expect("a client"),
        ..h.client.clone()
    }
}

/// What the fans saw: each answer by status and code, and what was acknowledged.
#[derive(Default)]
struct Seen {
    answers: HashMap<String, usize>,
    /// (drop, fan token, hold id) of every reserve answered 201.
    holds: Vec<(String, String, String)>,
    /// hold id → order id of every confirm answered 200 / 201.
    orders: HashMap<String, String>,
    /// (fan token, hold id, reference) of confirms never answered with an order.
    unpaid: Vec<(String, String, String)>,
    /// The quickest and the slowest reserve answer (a check that the link was slow at all).
    reserve_took: Option<(Duration, Duration)>,
}

impl Seen {
    fn count(&mut self, what: &str, r: &Reply) {
        *self
            .answers
            .entry(format!("{what} {} {}", r.status, r.code()))
            .or_default() += 1;
    }
}

/// Reserve answers the docs list for a reserve that may meet a slow or absent Redis.
fn check_reserve(r: &Reply) {
    r.check_5xx("reserve", &["unavailable", "recovering"]);
    let ok = matches!(
        (r.status, r.code()),
        (201, _)
            | (
                409,
                "sold_out" | "all_held" | "insufficient_stock" | "seat_unavailable"
            )
            | (422, "limit_exceeded")
            | (503, _)
    );
    assert!(ok, "reserve: an answer the docs don't list here: {r:?}");
}

/// Confirm answers the docs list for a confirm that may meet a slow or absent Redis. A 402 is
/// one: an attempt that ran past its confirm deadline (its answers lost on the slow link) is
/// voided or reverted by the reconciler, and a retry of it waiting for it hears that it ended.
fn check_confirm(r: &Reply) {
    r.check_5xx("confirm", &["unavailable", "payment_pending", "recovering"]);
    let ok = matches!(
        (r.status, r.code()),
        (200 | 201, _) | (402, "payment_declined") | (409, "confirm_in_progress") | (503, _)
    );
    assert!(ok, "confirm: an answer the docs don't list here: {r:?}");
}

/// One fan: a reserve (retried on 503 with the same Idempotency-Key, as a client retrying one
/// request does, at most `tries` times), then, for every other fan, a confirm (retried likewise;
/// after a 402 with another payment reference, as docs/API.md tells a client to).
async fn fan(
    api: BookingClient,
    drop: String,
    body: Value,
    pay: bool,
    tries: usize,
    seen: Arc<Mutex<Seen>>,
) {
    let token = api
        .fan_token(&format!("net-{}", uuid::Uuid::new_v4()))
        .await;
    let idem = new_key();
    let mut hold = None;
    for attempt in 0..tries {
        let started = std::time::Instant::now();
        let r = api.reserve_reply(&token, &drop, &idem, &body).await;
        let took = started.elapsed();
        check_reserve(&r);
        {
            let mut s = seen.lock().unwrap();
            s.count("reserve", &r);
            let (lo, hi) = s.reserve_took.unwrap_or((took, took));
            s.reserve_took = Some((lo.min(took), hi.max(took)));
        }
        if r.status != 503 {
            if r.status == 201 {
                hold = Some(r.str("hold_id"));
                if attempt > 0 {
                    *seen
                        .lock()
                        .unwrap()
                        .answers
                        .entry("reserve 201 after a 503".into())
                        .or_default() += 1;
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(50..300))).await;
    }
    let Some(hold) = hold else { return };
    seen.lock()
        .unwrap()
        .holds
        .push((drop.clone(), token.clone(), hold.clone()));
    if !pay {
        return;
    }
    let mut reference = format!("ok_{}", uuid::Uuid::new_v4());
    for _ in 0..tries {
        let c = api.confirm_reply(&token, &hold, &reference).await;
        check_confirm(&c);
        seen.lock().unwrap().count("confirm", &c);
        if c.status == 200 || c.status == 201 {
            assert_eq!(c.str("hold_id"), hold);
            seen.lock().unwrap().orders.insert(hold, c.str("order_id"));
            return;
        }
        if c.status == 402 {
            reference = format!("ok_{}", uuid::Uuid::new_v4());
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(50..300))).await;
    }
    seen.lock().unwrap().unpaid.push((token, hold, reference));
}

/// After the fault: every hold answered 201 still exists (held, confirming or sold); every order
/// answered is in Postgres and its hold reads `sold` with it; every unpaid confirm, retried now,
/// sells or finds its hold ended; then Redis and Postgres agree about every drop.
async fn check_acknowledged(
    f: &Fault,
    h: &Harness,
    api: &BookingClient,
    seen: &Seen,
    drops: &[&String],
) {
    for drop in drops {
        eventually("no hold is confirming", || async {
            confirming(h, drop).await == Some(0)
        })
        .await;
    }
    let mut orders = HashMap::new();
    for drop in drops {
        orders.extend(pg_orders(h, drop).await);
    }
    for (hold, order) in &seen.orders {
        assert_eq!(
            orders.get(hold),
            Some(order),
            "hold {hold}: answered order {order}, Postgres has {:?}",
            orders.get(hold)
        );
    }
    for (_, token, hold) in &seen.holds {
        let r = api
            .get_reply(&format!("/v1/holds/{hold}"), Some(token))
            .await;
        assert_eq!(r.status, 200, "an acknowledged hold {hold}: {r:?}");
        let state = r.body["state"].as_str().unwrap_or_default();
        assert!(
            matches!(state, "held" | "sold"),
            "an acknowledged hold {hold} is {state}: {r:?}"
        );
        if let Some(order) = seen.orders.get(hold) {
            assert_eq!(state, "sold", "hold {hold} was answered an order: {r:?}");
            assert_eq!(&r.str("order_id"), order);
        }
    }
    // A fan whose confirm never got an order pays again once the link is healthy: the hold
    // sells (201: its first attempt was reverted, nothing charged), or it had sold (200, its
    // order, whatever the reference).
    for (token, hold, _) in &seen.unpaid {
        let reference = format!("ok_retry_{}", uuid::Uuid::new_v4());
        let c = api.confirm_reply(token, hold, &reference).await;
        assert!(
            c.status == 200 || c.status == 201,
            "confirm of {hold} retried after healing: {c:?}"
        );
    }
    for drop in drops {
        assert_consistent(f, h, drop).await;
    }
}

// ---- 1. 200 ms of latency and 5 % loss between booking-api and Redis during a reserve burst ----
//
// The relay adds the round trip in user space and the link drops the packets, so TCP recovers a
// lost packet at the link's own (short) round trip: loss costs less here than behind a real
// 200 ms link, where `tc netem` would put both on one hop. Kernels with netem could do that; this
// one (CONFIG_NET_SCH_NETEM off) can't.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_slow_lossy_redis_during_a_reserve_burst() {
    let Some(f) = Fault::start_behind_link("fault-net-lossy", BehindLink::Redis).await else {
        return;
    };
    // booking-api reaches Redis through the relay (100 ms each way) and the lossy link.
    let relay = DelayRelay::start(f.redis_addr, Duration::ZERO).expect("the relay starts");
    let mut cfg = test_config_for(&format!("redis://{}", relay.addr()), &f.db_url);
    cfg.http.request_timeout_ms = REQUEST_TIMEOUT_MS;
    // A Redis command given up on soon after the round trip: some reserves answer 503 although
    // their script ran, and the fan's retry with the same Idempotency-Key must get that hold.
    cfg.redis.command_timeout_ms = 250;
    let h = Harness::with_config(cfg).await;
    let api = impatient_api(&h);
    let ga = h.ga_drop(150, 2, 600).await;
    let seated = h.create_drop(seated_body(&["A"], 8, 15, 2)).await;

    relay.set_delay(Duration::from_millis(100));
    f.link(|l| l.set_loss(5)).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let fans = (0..240).map(|i| {
        let (drop, body) = match i % 3 {
            0 => (
                ga.clone(),
                json!({"items": [{"sku": "TEE", "quantity": 1}]}),
            ),
            1 => (
                seated.clone(),
                json!({"best_available": {"section": "A", "quantity": 2}}),
            ),
            _ => (
                seated.clone(),
                json!({"seats": [format!("A-{}-{}", i % 8 + 1, i % 15 + 1)]}),
            ),
        };
        tokio::spawn(fan(api.clone(), drop, body, i % 2 == 0, 4, seen.clone()))
    });
    for t in join_all(fans).await {
        t.expect("a fan panicked (an undocumented answer, or no answer in time)");
    }
    f.link(|l| l.heal()).await;
    relay.set_delay(Duration::ZERO);

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "fault-net-lossy: {} holds, {} orders, {} confirms unpaid; reserves took {:?}; \
         answers {:?}",
        seen.holds.len(),
        seen.orders.len(),
        seen.unpaid.len(),
        seen.reserve_took,
        seen.answers
    );
    assert!(
        !seen.holds.is_empty(),
        "no reserve got through the lossy link"
    );
    // Not a time target: a check that the fault was in place. Every reserve crosses the relay
    // at least once each way, so none can have taken less than its round trip.
    let (quickest, _) = seen.reserve_took.expect("reserves were made");
    assert!(
        quickest >= Duration::from_millis(200),
        "a reserve answered in {quickest:?}: the 200 ms round trip wasn't in place"
    );
    check_acknowledged(&f, &h, &api, &seen, &[&ga, &seated]).await;
    // Each fan sent one reserve (retries reuse its Idempotency-Key): however many of its tries
    // timed out after the script ran, Redis has at most one hold of that fan.
    for drop in [&ga, &seated] {
        let mut per_fan: HashMap<String, usize> = HashMap::new();
        for raw in f.redis_holds(drop).await.values() {
            let hold: Value = serde_json::from_str(raw).unwrap();
            *per_fan
                .entry(hold["fan"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        for (fan, n) in per_fan {
            assert_eq!(n, 1, "{drop}: fan {fan} has {n} holds from one reserve");
        }
    }

    h.server.shutdown().await;
    drop(relay);
    f.stop().await;
}

// ---- 2. A 10 s partition between booking-api and Redis (or Postgres) during confirms -----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_partitioned_from_booking_api_during_confirms() {
    partitioned_during_confirms("fault-net-partition", BehindLink::Redis).await;
}

/// The same with Postgres behind the link: a confirm's order write (and the reconciler's reads)
/// meet the silence; a batch in flight at the cut resumes when TCP retransmits after healing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_postgres_partitioned_from_booking_api_during_confirms() {
    partitioned_during_confirms("fault-net-pg-partition", BehindLink::Postgres).await;
}

/// 120 fans hold a unit each and pay in 12 lanes; a 10 s partition cuts the server behind the
/// link off in the middle of it; afterwards every order answered is sold, every fan left unpaid
/// pays on retrying, and the books balance.
async fn partitioned_during_confirms(name: &str, which: BehindLink) {
    let Some(f) = Fault::start_behind_link(name, which).await else {
        return;
    };
    let mut cfg = test_config_for(&f.redis_url, &f.db_url);
    cfg.http.request_timeout_ms = REQUEST_TIMEOUT_MS;
    cfg.redis.command_timeout_ms = 1_000;
    cfg.database.timeout_ms = 1_000;
    // Short confirm deadlines, so the reconciler settles what the partition left halfway soon
    // after it heals.
    cfg.holds.confirm_timeout_ms = 3_000;
    cfg.holds.confirm_safety_margin_ms = 1_000;
    let h = Harness::with_config(cfg).await;
    let api = impatient_api(&h);
    let drop = h.ga_drop(200, 1, 600).await;

    // 120 fans hold one unit each.
    let holds: Vec<(String, String)> = join_all((0..120).map(|i| {
        let (api, drop) = (api.clone(), drop.clone());
        async move {
            let token = api
                .fan_token(&format!("part-{i}-{}", uuid::Uuid::new_v4()))
                .await;
            let body = json!({"items": [{"sku": "TEE", "quantity": 1}]});
            let r = api.reserve_reply(&token, &drop, &new_key(), &body).await;
            assert_eq!(r.status, 201, "reserve before the partition: {r:?}");
            (token, r.str("hold_id"))
        }
    }))
    .await;

    // Confirms run throughout, one fan after another in 12 lanes; the partition falls in the
    // middle of them. Each confirm is tried once: the retries come after healing.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let lanes: Vec<_> = (0..12)
        .map(|_| {
            let (api, holds, seen, next) = (api.clone(), holds.clone(), seen.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((token, hold)) = holds.get(i) else {
                        return;
                    };
                    let reference = format!("ok_{i}");
                    let c = api.confirm_reply(token, hold, &reference).await;
                    check_confirm(&c);
                    {
                        let mut s = seen.lock().unwrap();
                        s.count("confirm", &c);
                        if c.status == 200 || c.status == 201 {
                            s.orders.insert(hold.clone(), c.str("order_id"));
                        } else {
                            s.unpaid.push((token.clone(), hold.clone(), reference));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            })
        })
        .collect();
    eventually("20 confirms before the partition", || async {
        seen.lock().unwrap().orders.len() >= 20
    })
    .await;
    f.link(|l| l.partition()).await;
    // While Redis is out of reach, reads answer documented codes within the timeout too.
    let (token, hold) = &holds[0];
    let r = api
        .get_reply(&format!("/v1/holds/{hold}"), Some(token))
        .await;
    r.check_5xx("hold read in the partition", &["unavailable", "recovering"]);
    let r = api.get_reply(&format!("/v1/drops/{drop}"), None).await;
    r.check_5xx("drop read in the partition", &["unavailable", "recovering"]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    f.link(|l| l.heal()).await;
    for t in lanes {
        t.await
            .expect("a confirm lane panicked (an undocumented answer, or no answer in time)");
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "{name}: {} orders, {} confirms unpaid; answers {:?}",
        seen.orders.len(),
        seen.unpaid.len(),
        seen.answers
    );
    assert!(
        seen.answers.keys().any(|k| k.starts_with("confirm 503")),
        "no confirm met the partition: {:?}",
        seen.answers
    );
    let seen = Seen {
        holds: holds
            .iter()
            .map(|(t, h)| (drop.clone(), t.clone(), h.clone()))
            .collect(),
        ..seen
    };
    check_acknowledged(&f, &h, &api, &seen, &[&drop]).await;
    assert_eq!(pg_orders(&h, &drop).await.len(), holds.len());
    assert_eq!(h.counts(&drop).await, (200, 80, 0, 120));

    h.server.shutdown().await;
    f.stop().await;
}
