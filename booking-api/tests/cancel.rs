//! Cancelling a whole drop (issue 15): `POST /v1/drops/{id}/cancel` closes the drop (audited as
//! `cancel`) and records a job in Postgres (migrations/0010_drop_cancellations.sql) that the
//! reconciler's rounds work in batches of `reconciler.cancel_batch`, refunding every order whole
//! through the refunds engine with the refund id `cancel-<drop>`; `GET …/cancellation` reports
//! its progress. Every order is refunded and paid back once, Redis' stock and Postgres' books agree
//! at the end, the same request again is the same job, and a job a process left halfway (stopped
//! after one batch) is finished by the next process.
mod common;

use common::{buy, buy_tees, wait_captured, Harness};
use engine::ids::{HoldId, OrderId};
use engine::payments::PaymentGateway;
use serde_json::{json, Value};
use testkit::BookingClient;

async fn cancel_with(c: &BookingClient, key: &str, drop: &str, body: Value) -> (u16, Value) {
    c.call(
        c.http
            .post(c.url(&format!("/v1/drops/{drop}/cancel")))
            .bearer_auth(key)
            .json(&body),
    )
    .await
}

async fn progress(c: &BookingClient, drop: &str) -> Value {
    let (status, v) = c
        .get(
            &format!("/v1/drops/{drop}/cancellation"),
            Some(&c.seller_key),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn wait_done(c: &BookingClient, drop: &str) -> Value {
    testkit::wait::eventually("the cancel job is done", || async {
        progress(c, drop).await["state"] == "done"
    })
    .await;
    progress(c, drop).await
}

/// How many of the drop's audit lines record a cancel, and the audit log.
async fn cancel_lines(h: &Harness, drop: &str) -> (usize, Value) {
    let (_, audit) = h
        .get(&format!("/v1/drops/{drop}/audit"), Some(&h.seller_key))
        .await;
    let cancels = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "cancel")
        .count();
    (cancels, audit)
}

/// The order's refunds' ids.
async fn refund_ids(c: &BookingClient, order: &OrderId) -> Vec<String> {
    let (status, v) = c
        .get(&format!("/v1/orders/{order}/refunds"), Some(&c.seller_key))
        .await;
    assert_eq!(status, 200, "{v}");
    v["refunds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["refund_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_drop_refunds_every_order_once() {
    let h = Harness::start().await;
    let drop = h.ga_drop(60, 5, 60).await;
    let mut orders = Vec::new();
    for i in 0..30 {
        orders.push(buy_tees(&h, &drop, &format!("fan{i}"), i % 2 + 1).await);
    }
    let holds: Vec<String> = orders.iter().map(|(_, h)| h.clone()).collect();
    wait_captured(&h, &holds).await;
    assert_eq!(h.counts(&drop).await, (60, 15, 0, 45));
    // One order the seller refunded already: the job has nothing left of it to refund.
    let (status, v) = h
        .seller_post(
            &format!("/v1/orders/{}/refunds", orders[0].0),
            json!({"refund_id": "before"}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    // And one (of 2 units) it refunded in part: the job refunds the rest.
    let (status, v) = h
        .seller_post(
            &format!("/v1/orders/{}/refunds", orders[1].0),
            json!({"refund_id": "part", "items": [{"sku": "TEE", "quantity": 1}]}),
        )
        .await;
    assert_eq!(status, 201, "{v}");

    let (status, job) = cancel_with(&h, &h.seller_key, &drop, json!({"request_id": "c1"})).await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["orders_total"], 29, "{job}");
    assert_eq!(job["request_id"], "c1", "{job}");
    assert!(job["finished_at"].is_null(), "{job}");
    // Closed at once: nothing sells from now on.
    assert_eq!(h.drop_view(&drop).await["status"], "closed");
    let (_, token) = h.fan("late").await;
    let (status, _) = h
        .reserve(
            &token,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 1}]}),
        )
        .await;
    assert_ne!(status, 201, "a cancelled drop sells nothing");

    let done = wait_done(&h, &drop).await;
    assert_eq!(
        (&done["orders_total"], &done["orders_refunded"]),
        (&json!(29), &json!(29)),
        "{done}"
    );
    assert!(done["finished_at"].is_string(), "{done}");
    let refund_id = format!("cancel-{drop}");
    for (i, (order, hold)) in orders.iter().enumerate() {
        let want = match i {
            0 => vec!["before".to_owned()],
            1 => vec!["part".to_owned(), refund_id.clone()],
            _ => vec![refund_id.clone()],
        };
        assert_eq!(refund_ids(&h, order).await, want);
        let p = h.payment(hold).await;
        assert_eq!(
            p.refunds as usize,
            want.len(),
            "paid back once each: {order}"
        );
        assert_eq!(p.refunded_cents, p.amount_cents, "paid back whole: {order}");
    }
    assert_eq!(h.counts(&drop).await, (60, 60, 0, 0));
    h.assert_invariants(&drop).await;

    // The same drop cancelled again (any request id): the same job, as it stands.
    let (status, again) = cancel_with(&h, &h.seller_key, &drop, json!({"request_id": "c2"})).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again, done);
    // The audit log says who cancelled it, once.
    let (cancels, audit) = cancel_lines(&h, &drop).await;
    assert_eq!(cancels, 1, "{audit}");
}

/// A process stopped after one batch of the job: the next one, on the same Redis and Postgres,
/// finishes it, and no order is refunded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_mid_job_finishes_it() {
    let mut cfg = testkit::test_config();
    cfg.reconciler.cancel_batch = 5;
    // The first process's rounds run once at its start only: the test takes its one batch.
    cfg.reconciler.interval_ms = 3_600_000;
    let h = Harness::with_config(cfg).await;
    let drop = h.ga_drop(40, 5, 60).await;
    let mut orders = Vec::new();
    for i in 0..12 {
        orders.push(buy_tees(&h, &drop, &format!("fan{i}"), 2).await);
    }
    let holds: Vec<String> = orders.iter().map(|(_, h)| h.clone()).collect();
    wait_captured(&h, &holds).await;
    let (status, job) = cancel_with(&h, &h.seller_key, &drop, json!({"request_id": "c"})).await;
    assert_eq!(status, 202, "{job}");
    let d = engine::ids::DropId::parse(&drop).unwrap();
    assert_eq!(h.server.engine.cancel_batch(&d).await.unwrap(), 5);
    let half = progress(&h, &drop).await;
    assert_eq!(
        (
            &half["state"],
            &half["orders_total"],
            &half["orders_refunded"]
        ),
        (&json!("running"), &json!(12), &json!(5)),
        "{half}"
    );
    let first_gw = h.server.engine.test_gateway().unwrap().clone();
    let refunded_first: Vec<bool> = holds
        .iter()
        .map(|hold| {
            first_gw
                .payment(&HoldId::parse(hold).unwrap())
                .unwrap()
                .refunds
                == 1
        })
        .collect();
    assert_eq!(refunded_first.iter().filter(|r| **r).count(), 5);

    // The first process stops; a new one starts on the same Redis and Postgres.
    let Harness { server, client } = h;
    server.shutdown().await;
    let mut cfg = testkit::test_config();
    cfg.reconciler.cancel_batch = 5;
    let server = booking_api::start(cfg).await.expect("booking-api starts");
    // The gateway is a service outside the process that remembers the captures; the test
    // gateway lives in the process, so the new one is told what the old one had.
    let gw = server.engine.test_gateway().unwrap().clone();
    for (i, (_, hold)) in orders.iter().enumerate() {
        if !refunded_first[i] {
            let hold = HoldId::parse(hold).unwrap();
            gw.authorize(&hold, &format!("ok_fan{i}"), 5000, "USD")
                .await
                .unwrap();
            gw.capture(&hold, &format!("ok_fan{i}")).await.unwrap();
        }
    }
    let c = BookingClient::new(server.url()).with_keys(client.seller_key, client.ops_key);
    let h = Harness { server, client: c };
    // A test server looks after only the drops it served (`reconciler.watch_newest_drops = 0`):
    // the cancel sent again (the same job) shows it this one; a production process takes every
    // running job from Postgres.
    let (status, again) = cancel_with(&h, &h.seller_key, &drop, json!({"request_id": "c"})).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["started_at"], job["started_at"], "the same job");
    let done = wait_done(&h, &drop).await;
    assert_eq!(
        (&done["orders_total"], &done["orders_refunded"]),
        (&json!(12), &json!(12)),
        "{done}"
    );
    for (i, (order, hold)) in orders.iter().enumerate() {
        assert_eq!(refund_ids(&h, order).await, vec![format!("cancel-{drop}")]);
        let hold = HoldId::parse(hold).unwrap();
        let (first, second) = (
            first_gw.payment(&hold).unwrap().refunds,
            gw.payment(&hold).map_or(0, |p| p.refunds),
        );
        assert_eq!(first + second, 1, "order {i} paid back once");
    }
    assert_eq!(h.counts(&drop).await, (40, 40, 0, 0));
    h.assert_invariants(&drop).await;
}

/// Bad input answers its documented 4xx and changes nothing: the drop stays open, no job.
#[tokio::test]
async fn bad_cancels_change_nothing() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 5, 60).await;
    let (_, hold) = buy_tees(&h, &drop, "buyer", 2).await;
    let before = h.counts(&drop).await;
    let unknown = engine::ids::DropId::generate().to_string();
    let (status, v) = cancel_with(&h, &h.seller_key, &unknown, json!({"request_id": "x"})).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("unknown_drop"))
    );
    let other = h
        .server
        .engine
        .db()
        .create_key(engine::db::Scope::Seller, "other-seller")
        .await
        .unwrap();
    let (status, v) = cancel_with(&h, &other, &drop, json!({"request_id": "x"})).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("unknown_drop"))
    );
    let (status, _) = h
        .get(&format!("/v1/drops/{drop}/cancellation"), Some(&other))
        .await;
    assert_eq!(status, 404);
    let (_, fan) = h.fan("someone").await;
    let (status, _) = cancel_with(&h, &fan, &drop, json!({"request_id": "x"})).await;
    assert_eq!(status, 401);
    let (status, v) = cancel_with(&h, &h.seller_key, &drop, json!({})).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("invalid_request")),
        "{v}"
    );
    let (status, v) = cancel_with(
        &h,
        &h.seller_key,
        &drop,
        json!({"request_id": "x", "extra": 1}),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    let (status, v) = h
        .get(
            &format!("/v1/drops/{drop}/cancellation"),
            Some(&h.seller_key),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("no_cancellation"))
    );

    assert_eq!(h.drop_view(&drop).await["status"], "open");
    assert_eq!(h.counts(&drop).await, before);
    assert_eq!(h.payment(&hold).await.refunds, 0);
    let (_, audit) = h
        .get(&format!("/v1/drops/{drop}/audit"), Some(&h.seller_key))
        .await;
    assert!(audit["entries"].as_array().unwrap().is_empty(), "{audit}");
}

/// A seated drop cancelled by 20 requests at once, seller's and ops': one job, one audit line,
/// every seat free again and every order paid back once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cancels_of_a_seated_drop_make_one_job() {
    let h = Harness::start().await;
    let drop = h
        .create_drop(json!({
            "name": "seated", "per_fan_limit": 2, "hold_ttl_s": 60, "admission": {"mode": "open"},
            "inventory": {"kind": "seated", "sections": [
                {"section": "A", "price_cents": 100, "rows": [{"row": "1", "seats": 8}]}]}
        }))
        .await;
    let mut orders = Vec::new();
    for i in 0..4 {
        let seats = json!({"seats": [format!("A-1-{}", 2 * i + 1), format!("A-1-{}", 2 * i + 2)]});
        orders.push(buy(&h, &drop, &format!("sitter{i}"), seats).await);
    }
    let holds: Vec<String> = orders.iter().map(|(_, h)| h.clone()).collect();
    wait_captured(&h, &holds).await;
    assert_eq!(h.counts(&drop).await, (8, 0, 0, 8));
    let answers = futures::future::join_all((0..20).map(|i| {
        let h = &h;
        let drop = &drop;
        async move {
            let key = if i % 2 == 0 {
                &h.seller_key
            } else {
                &h.ops_key
            };
            cancel_with(h, key, drop, json!({"request_id": format!("c{i}")})).await
        }
    }))
    .await;
    let started: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(status, v)| {
            assert_eq!(*status, 202, "{v}");
            v["started_at"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(started.len(), 1, "one job: {answers:?}");
    let done = wait_done(&h, &drop).await;
    assert_eq!(
        (&done["orders_total"], &done["orders_refunded"]),
        (&json!(4), &json!(4)),
        "{done}"
    );
    for hold in &holds {
        assert_eq!(h.payment(hold).await.refunds, 1);
    }
    assert_eq!(h.counts(&drop).await, (8, 8, 0, 0));
    h.assert_invariants(&drop).await;
    let (cancels, audit) = cancel_lines(&h, &drop).await;
    assert_eq!(cancels, 1, "{audit}");
}

/// An archived drop may be cancelled too: its orders are refunded from Postgres (state `closed`,
/// nothing back on sale), paid back once, and Postgres' books count the units returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_archived_drop_is_cancelled_from_postgres() {
    let mut cfg = testkit::test_config();
    cfg.drops.archive_after_s = 0;
    let h = Harness::with_config(cfg).await;
    let drop = h.ga_drop(10, 5, 600).await;
    let mut orders = Vec::new();
    for i in 0..3 {
        orders.push(buy_tees(&h, &drop, &format!("fan{i}"), 2).await);
    }
    let holds: Vec<String> = orders.iter().map(|(_, h)| h.clone()).collect();
    wait_captured(&h, &holds).await;
    let (status, v) = h
        .seller_post(&format!("/v1/drops/{drop}/close"), json!({}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(h.server.engine.archive_round().await, 1);

    let (status, job) = cancel_with(&h, &h.ops_key, &drop, json!({"request_id": "c"})).await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["orders_total"], 3, "{job}");
    let done = wait_done(&h, &drop).await;
    assert_eq!(done["orders_refunded"], 3, "{done}");
    let db = h.server.engine.db().client().await.unwrap();
    let row = db
        .query_one(
            "SELECT (SELECT sold::bigint FROM inventory WHERE drop_id = $1), \
             (SELECT coalesce(sum(delta_sold), 0)::bigint FROM stock_ledger WHERE drop_id = $1), \
             (SELECT count(*) FROM refunds WHERE drop_id = $1 AND state = 'closed'), \
             (SELECT archived_at IS NOT NULL FROM drops WHERE drop_id = $1)",
            &[&drop],
        )
        .await
        .unwrap();
    let got: (i64, i64, i64, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(got, (0, 0, 3, true));
    for hold in &holds {
        assert_eq!(h.payment(hold).await.refunds, 1);
    }
}

/// A hold still live when the drop is cancelled may still be bought (a close lets existing holds
/// confirm): the job isn't done while the drop holds anything, and refunds that order too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hold_live_at_the_cancel_is_refunded_once_bought() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 5, 600).await;
    let (_, first) = buy_tees(&h, &drop, "early", 2).await;
    let (_, token) = h.fan("late").await;
    let (status, v) = h
        .reserve(
            &token,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 3}]}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let late = v["hold_id"].as_str().unwrap().to_owned();
    wait_captured(&h, std::slice::from_ref(&first)).await;

    let (status, job) = cancel_with(&h, &h.seller_key, &drop, json!({"request_id": "c"})).await;
    assert_eq!(status, 202, "{job}");
    testkit::wait::eventually("the first order refunded", || async {
        progress(&h, &drop).await["orders_refunded"] == 1
    })
    .await;
    let v = progress(&h, &drop).await;
    assert_eq!(v["state"], "running", "not done while a hold is live: {v}");
    let (status, v) = h.confirm(&token, &late, "ok_late").await;
    assert_eq!(status, 201, "{v}");
    let done = wait_done(&h, &drop).await;
    assert_eq!(
        (&done["orders_total"], &done["orders_refunded"]),
        (&json!(2), &json!(2)),
        "{done}"
    );
    for hold in [&first, &late] {
        assert_eq!(h.payment(hold).await.refunds, 1);
    }
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0));
    h.assert_invariants(&drop).await;
}

/// A cancel commits in Postgres before it tells Redis: if that write is lost (the caller saw an
/// error), the drop must not go on selling. The same cancel again closes Redis, and so does the
/// job's next batch even if nobody retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_whose_redis_close_was_lost_still_stops_the_sale() {
    let mut cfg = testkit::test_config();
    // The rounds run once at the start only: the test takes the job's batches itself.
    cfg.reconciler.interval_ms = 3_600_000;
    let h = Harness::with_config(cfg).await;
    let drop = h.ga_drop(40, 5, 60).await;
    buy_tees(&h, &drop, "early", 1).await;
    let d = engine::ids::DropId::parse(&drop).unwrap();
    let redis = h.server.engine.redis();
    let reopen = || async {
        // What Redis looks like when the cancel's own write never reached it.
        redis.set_meta(&d, "status", "open").await.unwrap();
    };
    let status_in_redis = || async { redis.drop_state(&d).await.unwrap().unwrap().status };

    let (status, job) = cancel_with(&h, &h.seller_key, &drop, json!({"request_id": "c1"})).await;
    assert_eq!(status, 202, "{job}");
    reopen().await;
    // The same cancel again: the same job, and Redis closed this time.
    let (status, again) = cancel_with(&h, &h.seller_key, &drop, json!({"request_id": "c2"})).await;
    assert_eq!(
        (status, &again["request_id"]),
        (202, &json!("c1")),
        "{again}"
    );
    assert_eq!(status_in_redis().await, "closed");

    // Nobody retries: the job's next batch closes it.
    reopen().await;
    h.server.engine.cancel_batch(&d).await.unwrap();
    assert_eq!(status_in_redis().await, "closed");
    let (_, token) = h.fan("late").await;
    let (status, v) = h
        .reserve(
            &token,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 1}]}),
        )
        .await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (409, &json!("drop_closed")),
        "{v}"
    );
}
