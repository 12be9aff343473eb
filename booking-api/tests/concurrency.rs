//! Issue 3's concurrency acceptance tests: many fans hammer one drop at once through the real
//! booking-api, Redis and Postgres; after every run the counts must add up
//! (`available + held + sold == total`) and Postgres must agree with Redis on what was sold.
mod common;

use std::collections::{HashMap, HashSet};

use common::Harness;
use engine::ids::HoldId;
use engine::metrics::CONSTRAINT_REFUSALS;
use futures::future::join_all;
use serde_json::{json, Value};
use testkit::eventually;

/// `n` signed-in fans, made concurrently: (fan id, fan token).
async fn fans(h: &Harness, prefix: &str, n: usize) -> Vec<(String, String)> {
    join_all((0..n).map(|i| async move { h.fan(&format!("{prefix}{i}")).await })).await
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// The seat ids of a hold or an order, from its `items`.
fn seats_of(v: &Value) -> Vec<String> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["seat"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_fans_race_for_a_hundred_units() {
    let h = Harness::start().await;
    // Long enough that the 60 confirms and 20 releases below start well before any hold can
    // expire; the last 20 are then left to expire, which `eventually` waits for.
    let drop = h.ga_drop(100, 1, 10).await;
    let fans = fans(&h, "racer", 500).await;
    let answers = join_all(fans.iter().map(|(_, token)| {
        h.reserve(
            token,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 1}]}),
        )
    }))
    .await;

    let mut held = Vec::new();
    for ((_, token), (status, body)) in fans.iter().zip(&answers) {
        match status {
            201 => held.push((token.clone(), body["hold_id"].as_str().unwrap().to_owned())),
            // No hold is confirmed during the race, so nothing is ever sold out: it is all held.
            409 => assert_eq!(error_code(body), "all_held", "{body}"),
            _ => panic!("unexpected answer {status}: {body}"),
        }
    }
    assert_eq!(held.len(), 100, "exactly the stock is held");
    let distinct: HashSet<&String> = held.iter().map(|(_, id)| id).collect();
    assert_eq!(distinct.len(), 100, "every hold is its own");
    assert_eq!(h.counts(&drop).await, (100, 0, 100, 0));
    h.assert_invariants(&drop).await;

    let (to_confirm, rest) = held.split_at(60);
    let (to_release, to_expire) = rest.split_at(20);
    let confirms = join_all(to_confirm.iter().enumerate().map(|(i, (token, hold))| {
        let h = &h;
        async move { h.confirm(token, hold, &format!("ok_{i}")).await }
    }));
    let releases = join_all(
        to_release
            .iter()
            .map(|(token, hold)| h.release(token, hold)),
    );
    let (confirmed, released) = tokio::join!(confirms, releases);
    for (status, body) in &confirmed {
        assert_eq!(*status, 201, "{body}");
    }
    assert!(released.iter().all(|s| *s == 204), "{released:?}");
    let distinct_orders: HashSet<&str> = confirmed
        .iter()
        .map(|(_, o)| o["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(distinct_orders.len(), 60);

    eventually("the last 20 holds expire", || async {
        h.counts(&drop).await.2 == 0
    })
    .await;
    assert_eq!(h.counts(&drop).await, (100, 40, 0, 60));
    for (token, hold) in to_release {
        assert_eq!(h.hold_state(token, hold).await, "released");
    }
    for (token, hold) in to_expire {
        assert_eq!(h.hold_state(token, hold).await, "expired");
    }
    h.assert_invariants(&drop).await;
    assert_eq!(h.order_count(&drop, None).await, 60);
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_fans_race_for_overlapping_seats() {
    let h = Harness::start().await;
    let rows =
        json!([{"row": "1", "seats": 10}, {"row": "2", "seats": 10}, {"row": "3", "seats": 10}]);
    let drop = h
        .create_drop(json!({
            "name": "seated race", "per_fan_limit": 2, "hold_ttl_s": 300,
            "admission": {"mode": "open"},
            "inventory": {"kind": "seated", "sections": [
                {"section": "A", "price_cents": 9000, "rows": rows},
                {"section": "B", "price_cents": 5000, "rows": rows},
            ]}
        }))
        .await;
    let refusals_before = h.metric(CONSTRAINT_REFUSALS).await;

    let requests = common::seated_race_requests();
    let fans = fans(&h, "seat-racer", 200).await;
    let answers = join_all(
        fans.iter()
            .zip(&requests)
            .map(|((_, token), body)| h.reserve(token, &drop, body.clone())),
    )
    .await;

    let mut holds = Vec::new();
    let mut held_seats: HashMap<String, String> = HashMap::new();
    for (((_, token), request), (status, body)) in fans.iter().zip(&requests).zip(&answers) {
        match status {
            201 => {
                let hold = body["hold_id"].as_str().unwrap().to_owned();
                let seats = seats_of(body);
                assert_eq!(seats.len(), 2, "{body}");
                if let Some(asked) = request["seats"].as_array() {
                    let asked: Vec<&str> = asked.iter().map(|s| s.as_str().unwrap()).collect();
                    assert_eq!(seats, asked, "named seats are the ones asked for");
                } else {
                    // Best available: two adjacent seats of one row of the asked section.
                    let parts: Vec<Vec<&str>> =
                        seats.iter().map(|s| s.split('-').collect()).collect();
                    assert_eq!(parts[0][0], request["best_available"]["section"]);
                    assert_eq!(parts[0][..2], parts[1][..2], "same row: {seats:?}");
                    let n: Vec<u32> = parts.iter().map(|p| p[2].parse().unwrap()).collect();
                    assert_eq!(n[0].abs_diff(n[1]), 1, "adjacent: {seats:?}");
                }
                for seat in seats {
                    if let Some(other) = held_seats.insert(seat.clone(), hold.clone()) {
                        panic!("seat {seat} is in two holds: {other} and {hold}");
                    }
                }
                holds.push((token.clone(), hold));
            }
            409 => assert!(
                ["seat_unavailable", "all_held", "insufficient_stock"].contains(&error_code(body)),
                "{body}"
            ),
            _ => panic!("unexpected answer {status}: {body}"),
        }
    }
    assert!(!holds.is_empty());
    let (_, available, held, _) = h.counts(&drop).await;
    assert_eq!(held as usize, held_seats.len());
    assert_eq!(available as usize, 60 - held_seats.len());
    h.assert_invariants(&drop).await;

    let confirmed = join_all(holds.iter().enumerate().map(|(i, (token, hold))| {
        let h = &h;
        async move { h.confirm(token, hold, &format!("ok_{i}")).await }
    }))
    .await;
    let mut seat_orders: HashMap<String, String> = HashMap::new();
    for (status, order) in &confirmed {
        assert_eq!(*status, 201, "{order}");
        let order_id = order["order_id"].as_str().unwrap();
        for seat in seats_of(order) {
            if let Some(other) = seat_orders.insert(seat.clone(), order_id.to_owned()) {
                panic!("seat {seat} is in two orders: {other} and {order_id}");
            }
        }
    }
    assert_eq!(
        seat_orders.keys().collect::<HashSet<_>>(),
        held_seats.keys().collect::<HashSet<_>>(),
        "the orders hold exactly the seats that were held"
    );

    let (status, map) = h.get(&format!("/v1/drops/{drop}/seats"), None).await;
    assert_eq!(status, 200, "{map}");
    let states = testkit::seat_states(&map);
    let sold: HashSet<String> = states
        .iter()
        .filter(|(_, st)| *st == "sold")
        .map(|(seat, _)| seat.clone())
        .collect();
    assert_eq!(
        sold,
        seat_orders.keys().cloned().collect::<HashSet<_>>(),
        "every sold seat belongs to exactly one order, and every ordered seat is sold"
    );
    assert!(states.iter().all(|(_, st)| *st != "held"), "{map}");

    let db = h.server.engine.db().client().await.unwrap();
    let twice = db
        .query(
            "SELECT seat_id, count(*) FROM order_items WHERE drop_id = $1 AND seat_id IS NOT NULL \
             GROUP BY 1 HAVING count(*) > 1",
            &[&drop],
        )
        .await
        .unwrap();
    assert!(twice.is_empty(), "a seat was sold twice in Postgres");
    let sold_rows: i64 = db
        .query_one(
            "SELECT count(*) FROM order_items WHERE drop_id = $1 AND seat_id IS NOT NULL",
            &[&drop],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sold_rows as usize, sold.len());
    assert_eq!(
        h.metric(CONSTRAINT_REFUSALS).await,
        refusals_before,
        "Postgres' constraints refused a sale: Redis let a double sale through"
    );
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_fan_twenty_parallel_reserves_limit_four() {
    let h = Harness::start().await;
    let drop = h.ga_drop(100, 4, 300).await;
    let (_, token) = h.fan("greedy").await;
    let answers = join_all((0..20).map(|_| {
        h.reserve(
            &token,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 1}]}),
        )
    }))
    .await;
    let mut created = 0;
    for (status, body) in &answers {
        match status {
            201 => created += 1,
            422 => assert_eq!(error_code(body), "limit_exceeded", "{body}"),
            _ => panic!("unexpected answer {status}: {body}"),
        }
    }
    assert_eq!(created, 4);
    assert_eq!(h.counts(&drop).await, (100, 96, 4, 0));
    let (status, mine) = h
        .get(&format!("/v1/fans/me/holds?drop_id={drop}"), Some(&token))
        .await;
    assert_eq!(status, 200, "{mine}");
    assert_eq!(mine["holds"].as_array().unwrap().len(), 4);
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_confirms_make_one_order() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("eager").await;
    let (status, hold) = h
        .reserve(
            &token,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 2}]}),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap();

    let answers = join_all((0..20).map(|_| h.confirm(&token, hold_id, "ok_once"))).await;
    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    assert_eq!(
        created, 1,
        "exactly one confirm made the order: {answers:?}"
    );
    assert!(
        answers.iter().all(|(s, _)| *s == 200 || *s == 201),
        "{answers:?}"
    );
    let order_ids: HashSet<&str> = answers
        .iter()
        .map(|(_, o)| o["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(order_ids.len(), 1, "every answer carries the one order");
    assert!(answers.iter().all(|(_, o)| o["hold_id"] == hold_id));

    let payment = h.payment(hold_id).await;
    assert_eq!(payment.authorizations, 1, "{payment:?}");
    assert_eq!(payment.captures, 1, "{payment:?}");
    assert_eq!(h.order_count(&drop, Some(hold_id)).await, 1);
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_parallel_reserves_with_one_idempotency_key_make_one_hold() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("retrier").await;
    let body = json!({"items": [{"sku": "TEE", "quantity": 3}]});
    let answers =
        join_all((0..20).map(|_| h.reserve_with_key(&token, &drop, "one-click", body.clone())))
            .await;
    assert!(answers.iter().all(|(s, _)| *s == 201), "{answers:?}");
    let holds: HashSet<&str> = answers
        .iter()
        .map(|(_, v)| v["hold_id"].as_str().unwrap())
        .collect();
    assert_eq!(holds.len(), 1, "every retry gets the first hold back");
    assert_eq!(h.counts(&drop).await, (10, 7, 3, 0), "units taken once");
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

/// Two order writers — two booking-api instances' — commit `ORDERS_PER_WRITER` one-unit orders
/// each, concurrently, in batches of 8 and with no retries (so a deadlock would fail its batch
/// rather than be run again); `layout(writer, i)` gives order i's (bucket, fan). Every order must
/// commit, and Postgres' sold counts must match.
async fn two_writers_all_commit(
    h: &Harness,
    layout: impl Fn(usize, usize) -> (&'static str, String),
) {
    use engine::config::WriterConfig;
    use engine::ids::{DropId, FanId, OrderId};
    use engine::writer::{NewItem, NewOrder, Writer};

    let drop = h
        .create_drop(json!({
            "name": "two writers", "per_fan_limit": 1000, "hold_ttl_s": 300,
            "admission": {"mode": "open"},
            "inventory": {"kind": "ga", "skus": [
                {"sku": "A", "name": "A", "price_cents": 100, "quantity": 1000},
                {"sku": "B", "name": "B", "price_cents": 100, "quantity": 1000}]}
        }))
        .await;
    let drop_id = DropId::parse(&drop).unwrap();
    let db = h.server.engine.db();
    // Small batches, so each writer runs many transactions that overlap the other's.
    let cfg = WriterConfig {
        max_batch: 8,
        max_retries: 0,
        ..WriterConfig::default()
    };
    let writers = [
        Writer::spawn(db.clone(), &cfg),
        Writer::spawn(db.clone(), &cfg),
    ];
    // Each order is for a hold of its own with a pending payment, as confirm leaves it.
    let mut orders = Vec::new();
    for w in 0..2 {
        for i in 0..ORDERS_PER_WRITER {
            let (bucket, fan) = layout(w, i);
            let hold = HoldId::generate(&drop_id);
            let reference = format!("ok_{w}_{i}");
            db.begin_payment(&hold, &FanId::parse(&fan).unwrap(), "test", &reference, 100)
                .await
                .unwrap();
            let order = NewOrder {
                order_id: OrderId::generate(),
                hold_id: hold,
                reference,
                fan,
                currency: "USD".into(),
                total_cents: 100,
                per_fan_limit: 1000,
                items: vec![NewItem {
                    bucket: bucket.into(),
                    seat: None,
                    quantity: 1,
                    price_cents: 100,
                }],
            };
            orders.push((w, order));
        }
    }
    let results = join_all(orders.into_iter().map(|(w, o)| writers[w].commit(o))).await;
    let rows = db
        .client()
        .await
        .unwrap()
        .query(
            "SELECT bucket, sold FROM inventory WHERE drop_id = $1 ORDER BY bucket",
            &[&drop],
        )
        .await
        .unwrap();
    let sold: Vec<(String, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for r in &results {
        assert!(matches!(r, Ok(engine::writer::Committed::New(_))), "{r:?}");
    }
    let n = ORDERS_PER_WRITER as i32;
    assert_eq!(sold, vec![("A".into(), n), ("B".into(), n)]);
}

const ORDERS_PER_WRITER: usize = 150;

/// Two writers' batches take the same two inventory rows, one A then B, the other B then A: the
/// writer locks its rows in one order, so no deadlock (which would answer its fans 503 and leave
/// them to the reconciler).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_taking_rows_in_opposite_orders_both_commit() {
    let h = Harness::start().await;
    let fan = |w: usize, i: usize| format!("w{w}-{i}-{:08x}", rand::random::<u32>());
    two_writers_all_commit(&h, |w, i| {
        (if (w + i) % 2 == 0 { "A" } else { "B" }, fan(w, i))
    })
    .await;
    h.server.shutdown().await;
}

/// Two writers sell different rows (A, B) to the same two fans, in opposite orders. Without
/// order in how batches take per-fan rows, these deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_selling_to_the_same_fans_in_opposite_orders_both_commit() {
    let h = Harness::start().await;
    let fans = [0, 1].map(|i| format!("fan{i}-{:08x}", rand::random::<u32>()));
    two_writers_all_commit(&h, |w, i| (["A", "B"][w], fans[(w + i) % 2].clone())).await;
    h.server.shutdown().await;
}

/// Two ops change different admission settings at the same moment, one pausing and one setting
/// the rate: round after round, neither undoes the other, in Postgres or in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admission_changes_both_stand() {
    let h = Harness::start().await;
    let drop = h
        .create_drop(json!({
            "name": "ops race", "per_fan_limit": 2, "hold_ttl_s": 300,
            "admission": {"mode": "queue"},
            "inventory": {"kind": "ga", "skus": [{"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": 10}]}
        }))
        .await;
    let drop_id = engine::ids::DropId::parse(&drop).unwrap();
    let url = h.url(&format!("/v1/drops/{drop}/admission"));
    let put = |body: Value| h.http.put(&url).bearer_auth(&h.ops_key).json(&body).send();
    for round in 0..15u32 {
        let paused = round % 2 == 0;
        let rate = f64::from(round + 1);
        let (a, b) = tokio::join!(
            put(json!({ "paused": paused })),
            put(json!({ "rate_per_s": rate }))
        );
        assert_eq!(a.unwrap().status(), 200);
        assert_eq!(b.unwrap().status(), 200);

        let stored = h
            .server
            .engine
            .db()
            .admission(&drop_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (stored["paused"].as_bool(), stored["rate_per_s"].as_f64()),
            (Some(paused), Some(rate)),
            "Postgres, round {round}: {stored}"
        );
        let live = h.server.engine.redis().admission(&drop_id).await.unwrap();
        assert_eq!(
            (
                live["paused"].as_str(),
                live["rate_per_s"].parse::<f64>().ok()
            ),
            (if paused { "1" } else { "0" }, Some(rate)),
            "Redis, round {round}: {live:?}"
        );
    }
    h.server.shutdown().await;
}
