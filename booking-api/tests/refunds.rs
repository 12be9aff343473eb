//! Refunds (issue 15): an order refunded, whole or some of its items, through
//! `POST /v1/orders/{order_id}/refunds` — recorded in Postgres (`engine::db::Db::record_refund`:
//! one transaction under the order row's lock), paid back through the gateway (a capture
//! refunded, an authorization voided), then its units or seats back in Redis' stock
//! (lua/refund.lua), each step idempotent by refund id; what a request couldn't finish the resume
//! round takes up. An order is never refunded past what it bought, however many refunds race; a
//! refunded seat sells again; refunds racing reserves of the returned units never oversell, and
//! Postgres' books agree with Redis' at the end.
mod common;

use common::{buy, Harness};
use engine::ids::OrderId;
use engine::scripts::HoldItem;
use futures::future::join_all;
use serde_json::json;

/// Postgres' side of a bucket: (inventory.sold, ledger sum of delta_sold, refund lines).
async fn pg_sold(h: &Harness, drop: &str, bucket: &str) -> (i64, i64, i64) {
    let db = h.server.engine.db().client().await.unwrap();
    let row = db
        .query_one(
            "SELECT (SELECT sold::bigint FROM inventory WHERE drop_id = $1 AND bucket = $2), \
             (SELECT coalesce(sum(delta_sold), 0)::bigint FROM stock_ledger WHERE drop_id = $1 AND bucket = $2), \
             (SELECT count(*) FROM stock_ledger WHERE drop_id = $1 AND bucket = $2 AND kind = 'refund')",
            &[&drop, &bucket],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

async fn fan_units(h: &Harness, drop: &str) -> i64 {
    let db = h.server.engine.db().client().await.unwrap();
    db.query_one(
        "SELECT coalesce(sum(units), 0)::bigint FROM fan_purchases WHERE drop_id = $1",
        &[&drop],
    )
    .await
    .unwrap()
    .get(0)
}

fn tee(q: u32) -> HoldItem {
    HoldItem {
        b: "TEE".into(),
        q,
        s: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_refunds_of_one_order_record_one() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 5, 60).await;
    let (order, _) = buy(
        &h,
        &drop,
        "buyer",
        json!({"items": [{"sku": "TEE", "quantity": 3}]}),
    )
    .await;
    assert_eq!(pg_sold(&h, &drop, "TEE").await, (3, 3, 0));
    let db = h.server.engine.db();
    let answers = join_all((0..100).map(|i| {
        let refund_id = format!("refund-{i}");
        async move { db.record_refund(order, &refund_id, "k", None).await }
    }))
    .await;
    let won: Vec<_> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
    assert_eq!(won.len(), 1, "one refund of the whole order");
    assert!(won[0].new);
    assert_eq!(won[0].items, vec![tee(3)]);
    assert_eq!(won[0].amount_cents, 3 * 2500);
    assert_eq!(won[0].state, "pending");
    for a in &answers {
        if let Err(e) = a {
            assert_eq!(e.code.name(), "already_refunded", "{e:?}");
        }
    }
    // The winner's id again is the same refund, recorded once.
    let again = db
        .record_refund(order, &won[0].refund_id, "k", None)
        .await
        .unwrap();
    assert!(!again.new);
    assert_eq!(again.items, vec![tee(3)]);
    assert_eq!(pg_sold(&h, &drop, "TEE").await, (0, 0, 1));
    assert_eq!(fan_units(&h, &drop).await, 0);
}

#[tokio::test]
async fn part_refunds_never_pass_what_the_order_bought() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 5, 60).await;
    let (order, _) = buy(
        &h,
        &drop,
        "buyer",
        json!({"items": [{"sku": "TEE", "quantity": 2}]}),
    )
    .await;
    let db = h.server.engine.db();
    let one = db
        .record_refund(order, "p1", "k", Some(&[tee(1)]))
        .await
        .unwrap();
    assert_eq!((one.new, one.amount_cents), (true, 2500));
    // The same id with other items is another request under a used id.
    let e = db
        .record_refund(order, "p1", "k", Some(&[tee(2)]))
        .await
        .unwrap_err();
    assert_eq!(e.code.name(), "idempotency_key_reused");
    let e = db
        .record_refund(order, "p2", "k", Some(&[tee(2)]))
        .await
        .unwrap_err();
    assert_eq!(e.code.name(), "already_refunded");
    let bad = HoldItem {
        b: "HOODIE".into(),
        q: 1,
        s: None,
    };
    let e = db
        .record_refund(order, "p3", "k", Some(&[bad]))
        .await
        .unwrap_err();
    assert_eq!(e.code.name(), "invalid_request");
    let e = db
        .record_refund(order, "p3", "k", Some(&[tee(0)]))
        .await
        .unwrap_err();
    assert_eq!(e.code.name(), "invalid_request");
    assert_eq!(pg_sold(&h, &drop, "TEE").await, (1, 1, 1));
    // The rest, then nothing is left.
    let rest = db.record_refund(order, "p4", "k", None).await.unwrap();
    assert_eq!(rest.items, vec![tee(1)]);
    let e = db.record_refund(order, "p5", "k", None).await.unwrap_err();
    assert_eq!(e.code.name(), "already_refunded");
    assert_eq!(pg_sold(&h, &drop, "TEE").await, (0, 0, 2));
    assert_eq!(fan_units(&h, &drop).await, 0);
    let e = db
        .record_refund(OrderId::generate(), "p6", "k", None)
        .await
        .unwrap_err();
    assert_eq!(e.code.name(), "unknown_order");
}

#[tokio::test]
async fn a_refunded_seat_can_be_sold_again_in_postgres() {
    let h = Harness::start().await;
    let drop = h
        .create_drop(json!({
            "name": "seated", "per_fan_limit": 2, "hold_ttl_s": 60, "admission": {"mode": "open"},
            "inventory": {"kind": "seated", "sections": [
                {"section": "A", "price_cents": 100, "rows": [{"row": "1", "seats": 4}]}]}
        }))
        .await;
    let (order, _) = buy(&h, &drop, "buyer", json!({"seats": ["A-1-1"]})).await;
    let db = h.server.engine.db();
    let client = db.client().await.unwrap();
    // Another order of the same seat, as a later live sale would write it.
    let resell = "WITH o AS (INSERT INTO orders (order_id, hold_id, drop_id, fan_id, total_cents, currency) \
                    VALUES (gen_random_uuid(), $2, $1, 'fan-x', 100, 'EUR') RETURNING order_id) \
                  INSERT INTO order_items (order_id, drop_id, bucket, seat_id, quantity, price_cents) \
                  SELECT order_id, $1, 'A', 'A-1-1', 1, 100 FROM o";
    let e = client
        .execute(resell, &[&drop, &format!("{drop}-h00000000000000aa")])
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("seat_sold_once"), "{e:?}");
    let r = db.record_refund(order, "s1", "k", None).await.unwrap();
    assert_eq!(
        r.items,
        vec![HoldItem {
            b: "A".into(),
            q: 1,
            s: Some("A-1-1".into())
        }]
    );
    client
        .execute(resell, &[&drop, &format!("{drop}-h00000000000000ab")])
        .await
        .expect("a refunded seat sells again");
}

/// A rebuild counts Postgres' refunds as returned — units available again, a refunded seat free,
/// the fan's count lowered — and the books balance against Postgres; it marks them returned too,
/// so a late step 3 (lua/refund.lua) returns nothing twice.
#[tokio::test]
async fn a_rebuild_counts_recorded_refunds_as_returned() {
    let h = Harness::start().await;
    let ga = h.ga_drop(5, 5, 60).await;
    let (order, ga_hold) = buy(
        &h,
        &ga,
        "buyer",
        json!({"items": [{"sku": "TEE", "quantity": 3}]}),
    )
    .await;
    let seated = h
        .create_drop(json!({
            "name": "seated", "per_fan_limit": 2, "hold_ttl_s": 60, "admission": {"mode": "open"},
            "inventory": {"kind": "seated", "sections": [
                {"section": "A", "price_cents": 100, "rows": [{"row": "1", "seats": 4}]}]}
        }))
        .await;
    let (seat_order, _) = buy(&h, &seated, "sitter", json!({"seats": ["A-1-1", "A-1-2"]})).await;
    let db = h.server.engine.db();
    let r1 = db
        .record_refund(order, "r1", "k", Some(&[tee(2)]))
        .await
        .unwrap();
    let ga_fan = r1.fan_id.clone();
    let seat = HoldItem {
        b: "A".into(),
        q: 1,
        s: Some("A-1-2".into()),
    };
    db.record_refund(seat_order, "r2", "k", Some(&[seat]))
        .await
        .unwrap();
    for drop in [&ga, &seated] {
        let d = engine::ids::DropId::parse(drop).unwrap();
        h.server.engine.recover(&d).await.unwrap();
        h.assert_invariants(drop).await;
    }
    assert_eq!(h.counts(&ga).await, (5, 4, 0, 1));
    // The request's own step 3, arriving after the rebuild, finds its marker.
    let late = h
        .server
        .engine
        .redis()
        .refund(
            &engine::ids::DropId::parse(&ga).unwrap(),
            &format!("{order}|r1"),
            &ga_hold,
            &ga_fan,
            &[tee(2)],
        )
        .await
        .unwrap();
    assert_eq!(late, engine::scripts::RefundReturn::Already);
    assert_eq!(h.counts(&ga).await, (5, 4, 0, 1));
    assert_eq!(h.counts(&seated).await, (4, 3, 0, 1));
    let (status, map) = h.get(&format!("/v1/drops/{seated}/seats"), None).await;
    assert_eq!(status, 200, "{map}");
    let states = testkit::booking::seat_states(&map);
    let state = |id: &str| states.iter().find(|(s, _)| s == id).unwrap().1;
    assert_eq!((state("A-1-1"), state("A-1-2")), ("sold", "free"));
    // The refunded seat sells again, and the buyer may buy two more units under a limit of 5.
    let (_, token) = h.fan("second").await;
    let (status, v) = h
        .reserve(&token, &seated, json!({"seats": ["A-1-2"]}))
        .await;
    assert_eq!(status, 201, "{v}");
}

/// `POST /v1/orders/{order}/refunds` with `key`.
async fn refund_with(
    h: &Harness,
    key: &str,
    order: &OrderId,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    h.call(
        h.http
            .post(h.url(&format!("/v1/orders/{order}/refunds")))
            .bearer_auth(key)
            .json(&body),
    )
    .await
}

async fn refund(h: &Harness, order: &OrderId, body: serde_json::Value) -> (u16, serde_json::Value) {
    refund_with(h, &h.seller_key, order, body).await
}

#[tokio::test]
async fn a_refund_pays_back_and_returns_the_units_to_stock() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 3, 60).await;
    let (order, hold) = buy(
        &h,
        &drop,
        "buyer",
        json!({"items": [{"sku": "TEE", "quantity": 3}]}),
    )
    .await;
    assert_eq!(h.counts(&drop).await, (10, 7, 0, 3));
    // One unit first, then the rest of the order.
    let (status, v) = refund(
        &h,
        &order,
        json!({"refund_id": "part-1", "items": [{"sku": "TEE", "quantity": 1}]}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["state"], "returned", "{v}");
    assert_eq!(v["amount_cents"], 2500, "{v}");
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    h.assert_invariants(&drop).await;
    let (status, v) = refund(&h, &order, json!({"refund_id": "rest"})).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        (v["state"].as_str(), v["amount_cents"].as_i64()),
        (Some("returned"), Some(5000))
    );
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0));
    h.assert_invariants(&drop).await;
    // The same id again is the same refund: nothing more comes back, nothing more is paid.
    let (status, again) = refund(&h, &order, json!({"refund_id": "rest"})).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["state"], "returned");
    let p = h.payment(&hold).await;
    assert_eq!((p.refunds, p.refunded_cents), (2, 7500));
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0));
    let (status, list) = h
        .get(&format!("/v1/orders/{order}/refunds"), Some(&h.seller_key))
        .await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list["refunds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["refund_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["part-1", "rest"]);
    // The fan's per-fan count went down with it: they may buy the limit again.
    let db = h.server.engine.db().client().await.unwrap();
    let fan: String = db
        .query_one("SELECT fan_id FROM orders WHERE order_id = $1", &[&order.0])
        .await
        .unwrap()
        .get(0);
    let token = h.fan_token(&fan).await;
    let (status, v) = h
        .reserve(
            &token,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 3}]}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
}

#[tokio::test]
async fn a_refunded_seat_is_free_on_the_map_and_sells_again() {
    let h = Harness::start().await;
    let drop = h
        .create_drop(json!({
            "name": "seated", "per_fan_limit": 2, "hold_ttl_s": 60, "admission": {"mode": "open"},
            "inventory": {"kind": "seated", "sections": [
                {"section": "A", "price_cents": 100, "rows": [{"row": "1", "seats": 4}]}]}
        }))
        .await;
    let (order, _) = buy(&h, &drop, "sitter", json!({"seats": ["A-1-1", "A-1-2"]})).await;
    // Ops may refund any drop's order.
    let (status, v) = refund_with(
        &h,
        &h.ops_key,
        &order,
        json!({"refund_id": "seat-2", "items": [{"seat": "A-1-2"}]}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["state"], "returned", "{v}");
    assert_eq!(h.counts(&drop).await, (4, 3, 0, 1));
    h.assert_invariants(&drop).await;
    testkit::wait::eventually("the seat map shows the seat free", || async {
        let (status, map) = h.get(&format!("/v1/drops/{drop}/seats"), None).await;
        assert_eq!(status, 200, "{map}");
        let states = testkit::booking::seat_states(&map);
        let state = |id: &str| states.iter().find(|(s, _)| s == id).unwrap().1;
        (state("A-1-1"), state("A-1-2")) == ("sold", "free")
    })
    .await;
    let (_, token) = h.fan("second").await;
    let (status, v) = h.reserve(&token, &drop, json!({"seats": ["A-1-2"]})).await;
    assert_eq!(status, 201, "{v}");
}

#[tokio::test]
async fn bad_refunds_are_refused_and_change_nothing() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 5, 60).await;
    let (order, hold) = buy(
        &h,
        &drop,
        "buyer",
        json!({"items": [{"sku": "TEE", "quantity": 2}]}),
    )
    .await;
    let before = (h.counts(&drop).await, pg_sold(&h, &drop, "TEE").await);
    let cases = [
        (
            json!({"refund_id": "x", "items": [{"sku": "HOODIE", "quantity": 1}]}),
            422,
            "invalid_request",
        ),
        (
            json!({"refund_id": "x", "items": [{"sku": "TEE", "quantity": 3}]}),
            409,
            "already_refunded",
        ),
        (
            json!({"refund_id": "x", "items": [{"sku": "TEE", "quantity": 0}]}),
            422,
            "invalid_request",
        ),
        (
            json!({"refund_id": "x", "items": [{"sku": "TEE"}]}),
            422,
            "invalid_request",
        ),
        (
            json!({"refund_id": "x", "items": [{"seat": "A-1-1"}]}),
            422,
            "invalid_request",
        ),
        (
            json!({"refund_id": "x", "items": []}),
            422,
            "invalid_request",
        ),
        // null is not "everything": a whole order refunded by a sent mistake (schemathesis).
        (
            json!({"refund_id": "x", "items": null}),
            422,
            "invalid_request",
        ),
        (json!({"refund_id": ""}), 422, "invalid_request"),
        (json!({"refund_id": "has space"}), 422, "invalid_request"),
        (
            json!({"refund_id": "x".repeat(129)}),
            422,
            "invalid_request",
        ),
        (
            json!({"items": [{"sku": "TEE", "quantity": 1}]}),
            422,
            "invalid_request",
        ),
        (
            json!({"refund_id": "x", "reason": "?"}),
            422,
            "invalid_request",
        ),
    ];
    for (body, status, code) in cases {
        let (got, v) = refund(&h, &order, body.clone()).await;
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {v}"
        );
    }
    let (got, v) = h
        .call(
            h.http
                .post(h.url(&format!("/v1/orders/{order}/refunds")))
                .bearer_auth(&h.seller_key)
                .body("{not json"),
        )
        .await;
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (400, Some("malformed_json"))
    );
    let (got, v) = refund(&h, &OrderId::generate(), json!({"refund_id": "x"})).await;
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (404, Some("unknown_order"))
    );
    let (got, v) = h
        .call(
            h.http
                .post(h.url("/v1/orders/not-an-order/refunds"))
                .bearer_auth(&h.seller_key)
                .json(&json!({"refund_id": "x"})),
        )
        .await;
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (404, Some("unknown_order"))
    );
    // Another seller's order is as unknown as none; a fan may not refund; no key is 401.
    let other = engine::db::Scope::Seller;
    let other_key = h
        .server
        .engine
        .db()
        .create_key(other, "other-seller")
        .await
        .unwrap();
    let (got, v) = refund_with(&h, &other_key, &order, json!({"refund_id": "x"})).await;
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (404, Some("unknown_order"))
    );
    let (_, fan_token) = h.fan("someone").await;
    let (got, _) = refund_with(&h, &fan_token, &order, json!({"refund_id": "x"})).await;
    assert_eq!(got, 401);
    let (got, _) = h
        .get(&format!("/v1/orders/{order}/refunds"), Some(&other_key))
        .await;
    assert_eq!(got, 404);
    assert_eq!(
        (h.counts(&drop).await, pg_sold(&h, &drop, "TEE").await),
        before
    );
    assert_eq!(h.payment(&hold).await.refunds, 0);
    let (_, list) = h
        .get(&format!("/v1/orders/{order}/refunds"), Some(&h.seller_key))
        .await;
    assert_eq!(list["refunds"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_http_refunds_of_one_order_make_one() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 5, 60).await;
    let (order, hold) = buy(
        &h,
        &drop,
        "buyer",
        json!({"items": [{"sku": "TEE", "quantity": 3}]}),
    )
    .await;
    // Each with its own refund id: one wins, the rest find nothing left.
    let answers = join_all((0..100).map(|i| {
        let h = &h;
        async move { refund(h, &order, json!({"refund_id": format!("r-{i}")})).await }
    }))
    .await;
    let won: Vec<_> = answers.iter().filter(|(s, _)| *s == 201).collect();
    assert_eq!(won.len(), 1, "{answers:?}");
    for (status, v) in &answers {
        assert!(
            *status == 201 || (*status == 409 && v["error"]["code"] == "already_refunded"),
            "{status} {v}"
        );
    }
    assert_eq!(won[0].1["state"], "returned");
    let p = h.payment(&hold).await;
    assert_eq!((p.refunds, p.refunded_cents), (1, 7500));
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0));
    h.assert_invariants(&drop).await;

    // And one refund id sent 100 times at once: one refund, paid back once.
    let (order, hold) = buy(
        &h,
        &drop,
        "buyer2",
        json!({"items": [{"sku": "TEE", "quantity": 2}]}),
    )
    .await;
    let answers = join_all((0..100).map(|_| {
        let h = &h;
        async move { refund(h, &order, json!({"refund_id": "same"})).await }
    }))
    .await;
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == 201).count(),
        1,
        "{answers:?}"
    );
    assert!(
        answers.iter().all(|(s, _)| *s == 201 || *s == 200),
        "{answers:?}"
    );
    let p = h.payment(&hold).await;
    assert_eq!((p.refunds, p.refunded_cents), (1, 5000));
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0));
    h.assert_invariants(&drop).await;
}

/// Many fans reserve (and pay for) the units refunds bring back while the refunds land: at no
/// point is more sold or held than the total, and at the end Redis' books balance and Postgres'
/// inventory, order items and ledger agree with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refunds_racing_reserves_of_the_returned_units_never_oversell() {
    let h = Harness::start().await;
    let total = 20u32;
    let drop = h.ga_drop(total, 2, 60).await;
    let mut orders = Vec::new();
    for i in 0..(total / 2) {
        let (order, _) = buy(
            &h,
            &drop,
            &format!("first{i}"),
            json!({"items": [{"sku": "TEE", "quantity": 2}]}),
        )
        .await;
        orders.push(order);
    }
    assert_eq!(h.counts(&drop).await, (20, 0, 0, 20));
    let refunds = join_all(orders.iter().enumerate().map(|(i, order)| {
        let h = &h;
        async move {
            // Half whole, half one unit.
            let body = if i % 2 == 0 {
                json!({"refund_id": "race"})
            } else {
                json!({"refund_id": "race", "items": [{"sku": "TEE", "quantity": 1}]})
            };
            let (status, v) = refund(h, order, body).await;
            assert_eq!(status, 201, "{v}");
        }
    }));
    let buyers = join_all((0..40).map(|i| {
        let h = &h;
        let drop = &drop;
        async move {
            let (_, token) = h.fan(&format!("racer{i}")).await;
            let mut bought = 0;
            for attempt in 0..20 {
                let (status, v) = h
                    .reserve(
                        &token,
                        drop,
                        json!({"items": [{"sku": "TEE", "quantity": 1}]}),
                    )
                    .await;
                let (_, a, held, s) = h.counts(drop).await;
                assert!(
                    held + s <= 20 && a >= 0,
                    "oversold: held {held} + sold {s} > 20"
                );
                if status == 201 {
                    let hold = v["hold_id"].as_str().unwrap().to_owned();
                    let (status, v) = h
                        .confirm(&token, &hold, &format!("ok_r{i}_{attempt}"))
                        .await;
                    assert_eq!(status, 201, "{v}");
                    bought += 1;
                    if bought == 2 {
                        break;
                    }
                } else {
                    assert_eq!(status, 409, "{v}");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            bought
        }
    }));
    let ((), bought) = tokio::join!(
        async {
            refunds.await;
        },
        buyers
    );
    let bought: u32 = bought.iter().sum();
    // 15 units came back (5 whole orders of 2, 5 single units); the racers took at most those.
    assert!(
        bought <= 15,
        "the racers bought {bought} of 15 returned units"
    );
    let (t, a, held, s) = h.counts(&drop).await;
    assert_eq!((t, held), (20, 0));
    assert_eq!(s, 5 + i64::from(bought));
    assert_eq!(a + s, t);
    h.assert_invariants(&drop).await;
}

/// A refund recorded but never taken further (its process stopped after step 1) is finished by
/// the resume round: paid back, units returned.
#[tokio::test]
async fn an_unfinished_refund_is_resumed_by_the_background_round() {
    let mut cfg = testkit::test_config();
    cfg.reconciler.refund_resume_after_ms = 100;
    let h = Harness::with_config(cfg).await;
    let drop = h.ga_drop(10, 5, 60).await;
    let (order, hold) = buy(
        &h,
        &drop,
        "buyer",
        json!({"items": [{"sku": "TEE", "quantity": 2}]}),
    )
    .await;
    h.server
        .engine
        .db()
        .record_refund(order, "stopped", "k", None)
        .await
        .unwrap();
    assert_eq!(
        h.counts(&drop).await,
        (10, 8, 0, 2),
        "only Postgres knows yet"
    );
    testkit::wait::eventually("the resume round finishes the refund", || async {
        let (_, list) = h
            .get(&format!("/v1/orders/{order}/refunds"), Some(&h.seller_key))
            .await;
        list["refunds"][0]["state"] == "returned"
    })
    .await;
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0));
    assert_eq!(h.payment(&hold).await.refunds, 1);
    h.assert_invariants(&drop).await;
}

/// A refund whose units Redis can't take back — its sold count disagrees with Postgres', so
/// lua/refund.lua answers `out_of_step` — puts the drop through recovery, as other out-of-step
/// findings do: the rebuild from Postgres counts the refund as returned and writes its marker, and
/// the next resume round finds it `already` and finishes it. Without the rebuild it would stay
/// `gateway_done`, retried by every round forever.
#[tokio::test]
async fn a_refund_redis_cannot_return_puts_the_drop_through_recovery() {
    let mut cfg = testkit::test_config();
    cfg.reconciler.refund_resume_after_ms = 100;
    let h = Harness::with_config(cfg).await;
    let drop = h.ga_drop(10, 5, 60).await;
    let (order, hold) = buy(
        &h,
        &drop,
        "buyer",
        json!({"items": [{"sku": "TEE", "quantity": 2}]}),
    )
    .await;
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    // Redis forgot the sale (its counts still add up, to a drop that sold nothing).
    let stock = format!("fg:{{{drop}}}:stock");
    common::redis_cli(&["HSET", &stock, "s:TEE", "0", "a:TEE", "10"]).await;
    let (status, v) = refund(&h, &order, json!({"refund_id": "out-of-step"})).await;
    assert!(status == 201 || status == 202, "{status} {v}");
    assert_eq!(v["state"], "gateway_done", "Redis refused the units: {v}");
    testkit::wait::eventually(
        "the rebuild and the resume round finish the refund",
        || async {
            let (_, list) = h
                .get(&format!("/v1/orders/{order}/refunds"), Some(&h.seller_key))
                .await;
            list["refunds"][0]["state"] == "returned"
        },
    )
    .await;
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0));
    assert_eq!(h.payment(&hold).await.refunds, 1);
    h.assert_invariants(&drop).await;
}

/// A closed drop's order is refunded too: paid back and counted, state `closed` (nothing sells).
#[tokio::test]
async fn a_closed_drops_order_is_refunded_with_state_closed() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 5, 60).await;
    let (order, hold) = buy(
        &h,
        &drop,
        "buyer",
        json!({"items": [{"sku": "TEE", "quantity": 2}]}),
    )
    .await;
    let (status, v) = h
        .seller_post(&format!("/v1/drops/{drop}/close"), json!({}))
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = refund(&h, &order, json!({"refund_id": "after-close"})).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["state"], "closed", "{v}");
    assert_eq!(h.payment(&hold).await.refunds, 1);
    h.assert_invariants(&drop).await;
}

/// A two-tee order whose confirm waits at the gateway's capture: the order committed in Postgres,
/// its payment authorized and not captured until `gate` opens. On a harness of its own whose
/// refund resume round comes back after 100 ms, and a GA drop of ten tees.
struct Uncaptured {
    h: Harness,
    drop: String,
    hold: String,
    order: OrderId,
    gate: std::sync::Arc<engine::payments::CaptureGate>,
    confirm: tokio::task::JoinHandle<(u16, serde_json::Value)>,
}

async fn order_with_its_capture_held(fan: &str) -> Uncaptured {
    let mut cfg = testkit::test_config();
    cfg.reconciler.refund_resume_after_ms = 100;
    let h = Harness::with_config(cfg).await;
    let drop = h.ga_drop(10, 5, 60).await;
    let (_, token) = h.fan(fan).await;
    let (status, v) = h
        .reserve(
            &token,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 2}]}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let hold = v["hold_id"].as_str().unwrap().to_owned();
    let gate = h.server.engine.test_gateway().unwrap().hold_captures();
    let arrived = gate.arrived.notified();
    let confirm = tokio::spawn({
        let (client, token, hold) = (h.client.clone(), token.clone(), hold.clone());
        let reference = format!("ok_{fan}");
        async move { client.confirm(&token, &hold, &reference).await }
    });
    // The order is committed; its capture waits at the gateway.
    arrived.await;
    let db = h.server.engine.db().client().await.unwrap();
    let order: uuid::Uuid = db
        .query_one("SELECT order_id FROM orders WHERE hold_id = $1", &[&hold])
        .await
        .unwrap()
        .get(0);
    Uncaptured {
        h,
        drop,
        hold,
        order: OrderId(order),
        gate,
        confirm,
    }
}

/// A refund of a whole order whose payment is authorized but not captured yet voids the
/// authorization instead of refunding a capture; the capture that comes after finds nothing to
/// take, and the units come back once the order's confirm has finished in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_uncaptured_payment_is_voided_not_refunded() {
    let Uncaptured {
        h,
        drop,
        hold,
        order,
        gate,
        confirm,
    } = order_with_its_capture_held("voided").await;
    let (status, v) = refund(&h, &order, json!({"refund_id": "before-capture"})).await;
    assert_eq!(status, 201, "{v}");
    // Voided at the gateway; the hold is still confirming in Redis, so the units wait.
    assert_eq!(v["state"], "gateway_done", "{v}");
    let p = h.payment(&hold).await;
    assert_eq!((p.voids, p.captures, p.refunds), (1, 0, 0));
    gate.open();
    let (status, v) = confirm.await.unwrap();
    assert_eq!(status, 201, "the order stands: {v}");
    testkit::wait::eventually("the units come back", || async {
        h.counts(&drop).await == (10, 10, 0, 0)
    })
    .await;
    let (_, list) = h
        .get(&format!("/v1/orders/{order}/refunds"), Some(&h.seller_key))
        .await;
    assert_eq!(list["refunds"][0]["state"], "returned", "{list}");
    let p = h.payment(&hold).await;
    assert_eq!(
        (p.voids, p.captures, p.refunds),
        (1, 0, 0),
        "never captured"
    );
    let db = h.server.engine.db().client().await.unwrap();
    let state: String = db
        .query_one(
            "SELECT state FROM payment_attempts WHERE hold_id = $1",
            &[&hold],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "voided");
    h.assert_invariants(&drop).await;
}

/// A part refund of an authorization can't void it (that would give back the rest too): the
/// payment is captured first, then the part refunded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_part_of_an_uncaptured_payment_is_captured_then_refunded() {
    let Uncaptured {
        h,
        drop,
        hold,
        order,
        gate,
        confirm,
    } = order_with_its_capture_held("part").await;
    let (status, v) = refund(
        &h,
        &order,
        json!({"refund_id": "one", "items": [{"sku": "TEE", "quantity": 1}]}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["state"], "pending", "the capture is held back: {v}");
    gate.open();
    let (status, v) = confirm.await.unwrap();
    assert_eq!(status, 201, "{v}");
    testkit::wait::eventually("the part refunded and returned", || async {
        h.counts(&drop).await == (10, 9, 0, 1)
    })
    .await;
    let p = h.payment(&hold).await;
    assert_eq!(
        (p.voids, p.captures, p.refunds, p.refunded_cents),
        (0, 1, 1, 2500)
    );
    h.assert_invariants(&drop).await;
}

/// Redis gives a sold hold's units back the way an ended hold's go (lua/lib.lua
/// `return_to_stock`): each item from sold to available, the fan's units down, the hold ended as
/// `state` — what Redis is left with when a hold expired (or was released) while its confirm
/// committed the order, and the confirm's alarm (the drop marked `recovering`) never reached
/// Redis. Redis' counts still add up, to a drop that didn't sell this order.
async fn redis_ended_the_sold_hold(drop: &str, hold: &str, state: &str) {
    let script = "local h = cjson.decode(redis.call('HGET', KEYS[1], ARGV[1])) \
        for _, it in ipairs(h.it) do \
          redis.call('HINCRBY', KEYS[2], 's:' .. it.b, -it.q) \
          redis.call('HINCRBY', KEYS[2], 'a:' .. it.b, it.q) \
        end \
        local left = redis.call('HINCRBY', KEYS[3], h.fan, -h.u) \
        if left <= 0 then redis.call('HDEL', KEYS[3], h.fan) end \
        h.st = ARGV[2] \
        redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(h)) \
        return h.u";
    let key = |k: &str| format!("fg:{{{drop}}}:{k}");
    let units = common::redis_cli(&[
        "EVAL",
        script,
        "3",
        &key("holds"),
        &key("stock"),
        &key("fans"),
        hold,
        state,
    ])
    .await;
    assert_eq!(units, "2", "the hold's units went back");
}

/// The `/metrics` page's value of the label-less series `name` (0 if absent).
async fn counter(h: &Harness, name: &str) -> f64 {
    let text = h
        .http
        .get(h.url("/metrics"))
        .bearer_auth(&h.ops_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A refund whose order's hold Redis ended unsold (`expired`, or `released`) — Redis gave its
/// units back while Postgres committed the order — can't wait for that hold's confirm to finish
/// (lua/refund.lua's `hold_not_sold`, right for a hold still confirming): nothing will finish it.
/// Redis hasn't the sale, as when its counts disagree (`out_of_step`): the drop is rebuilt from
/// Postgres, which counts the order's units as sold and the refund's as returned (its marker),
/// and the resume round finishes the refund — its units back on sale once, not twice. Before:
/// `gateway_done`, retried by every round forever.
#[tokio::test]
async fn a_refund_of_a_hold_redis_ended_unsold_goes_through_recovery() {
    let mut cfg = testkit::test_config();
    cfg.reconciler.refund_resume_after_ms = 100;
    let h = Harness::with_config(cfg).await;
    let drop = h.ga_drop(10, 5, 60).await;
    let tees = json!({"items": [{"sku": "TEE", "quantity": 2}]});
    let (expired, expired_hold) = buy(&h, &drop, "expired", tees.clone()).await;
    let (released, released_hold) = buy(&h, &drop, "released", tees.clone()).await;
    let (kept, _) = buy(&h, &drop, "kept", tees).await;
    assert_eq!(h.counts(&drop).await, (10, 4, 0, 6));
    redis_ended_the_sold_hold(&drop, &expired_hold, "expired").await;
    redis_ended_the_sold_hold(&drop, &released_hold, "released").await;
    assert_eq!(
        h.counts(&drop).await,
        (10, 8, 0, 2),
        "Redis forgot two sales"
    );
    // The refunds' counters (shared by the binary's tests running at once: they only grow).
    let names = [
        "floodgate_refunds_out_of_step_total",
        "floodgate_refunds_accepted_total",
        "floodgate_refunds_completed_total{state=\"returned\"}",
        "floodgate_refunds_resumed_total",
    ];
    let mut before = Vec::new();
    for name in names {
        before.push(counter(&h, name).await);
    }
    for order in [&expired, &released] {
        let (status, v) = refund(&h, order, json!({"refund_id": "ended"})).await;
        assert!(status == 201 || status == 202, "{status} {v}");
        assert_eq!(v["state"], "gateway_done", "Redis can't return them: {v}");
    }
    testkit::wait::eventually(
        "the rebuild and the resume round finish both refunds",
        || async {
            let mut done = true;
            for order in [&expired, &released] {
                let (_, list) = h
                    .get(&format!("/v1/orders/{order}/refunds"), Some(&h.seller_key))
                    .await;
                done &= list["refunds"][0]["state"] == "returned";
            }
            done
        },
    )
    .await;
    // The third order is still sold; the refunded units are available once (not 8 + 4).
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    h.assert_invariants(&drop).await;
    for hold in [&expired_hold, &released_hold] {
        assert_eq!(h.payment(hold).await.refunds, 1);
    }
    // Out of step at least once (the second refund may have met the drop already recovering);
    // both accepted, both finished, by the resume round.
    for (name, (was, by)) in names.iter().zip(before.iter().zip([1.0, 2.0, 2.0, 1.0])) {
        let now = counter(&h, name).await;
        assert!(now >= was + by, "{name}: {was} before, {now} after");
    }
    // The stock's ledger says why the drop was rebuilt.
    let db = h.server.engine.db().client().await.unwrap();
    let why: i64 = db
        .query_one(
            "SELECT count(*) FROM stock_ledger WHERE drop_id = $1 AND kind = 'rebuild' \
             AND note LIKE 'refund %'",
            &[&drop],
        )
        .await
        .unwrap()
        .get(0);
    assert!(why >= 1, "no ledger line names the refund");
    // The kept order still refunds the ordinary way, at once.
    let (status, v) = refund(&h, &kept, json!({"refund_id": "ordinary"})).await;
    assert_eq!(
        (status, v["state"].as_str()),
        (201, Some("returned")),
        "{v}"
    );
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0));
    h.assert_invariants(&drop).await;
}
