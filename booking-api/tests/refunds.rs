//! Refunds, first step (issue 15): recording a refund in Postgres (`engine::db::Db::record_refund`)
//! — one transaction under the order row's lock that marks the order's items refunded, lowers
//! `inventory.sold` and the fan's `fan_purchases`, adds a `refund` ledger line and a `pending`
//! refunds row. Idempotent by refund id; an order is never refunded past what it bought, however
//! many refunds race; a refunded seat can be sold again (the "sold once" guard covers live sales).
//! The gateway and the return of units to Redis come after this step (not yet built).
mod common;

use common::Harness;
use engine::ids::OrderId;
use engine::scripts::HoldItem;
use futures::future::join_all;
use serde_json::json;

/// A fan buys `body`'s items of `drop`; (order id, hold id).
async fn buy(h: &Harness, drop: &str, name: &str, body: serde_json::Value) -> (OrderId, String) {
    let (_, token) = h.fan(name).await;
    let (status, v) = h.reserve(&token, drop, body).await;
    assert_eq!(status, 201, "{v}");
    let hold = v["hold_id"].as_str().unwrap().to_owned();
    let (status, v) = h.confirm(&token, &hold, &format!("ok_{name}")).await;
    assert_eq!(status, 201, "{v}");
    (
        OrderId::parse(v["order_id"].as_str().unwrap()).unwrap(),
        hold,
    )
}

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

/// Until the return script exists, a rebuild is how Redis learns of a recorded refund: it counts
/// Postgres' refunds as returned — units available again, a refunded seat free, the fan's count
/// lowered — and the books balance against Postgres.
#[tokio::test]
async fn a_rebuild_counts_recorded_refunds_as_returned() {
    let h = Harness::start().await;
    let ga = h.ga_drop(5, 5, 60).await;
    let (order, _) = buy(
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
    db.record_refund(order, "r1", "k", Some(&[tee(2)]))
        .await
        .unwrap();
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
