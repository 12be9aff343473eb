//! The order writer's group commit (issue 13, item 2): a batch writes its payment attempts,
//! orders and captures with set-based statements in one transaction; an order Postgres refuses
//! fails alone (the batch is written again one order at a time, counted as a fallback, and the
//! next batch is set-based again); an attempt no longer `pending` gets no order.
mod common;

use common::Harness;
use engine::config::WriterConfig;
use engine::ids::{DropId, FanId, HoldId, OrderId};
use engine::writer::{Committed, NewItem, NewOrder, NewPayment, Writer};
use futures::future::join_all;
use serde_json::json;

/// A GA drop with one SKU `A` of `quantity` units and `per_fan_limit`.
async fn drop_of(h: &Harness, quantity: u32, per_fan_limit: u32) -> DropId {
    let drop = h
        .create_drop(json!({
            "name": "writer", "per_fan_limit": per_fan_limit, "hold_ttl_s": 300,
            "admission": {"mode": "open"},
            "inventory": {"kind": "ga", "skus": [
                {"sku": "A", "name": "A", "price_cents": 100, "quantity": quantity}]}
        }))
        .await;
    DropId::parse(&drop).unwrap()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// An order of `units` of `A` for a hold of its own whose attempt is recorded `pending`, as a
/// confirm leaves it before the commit.
async fn pending_order(h: &Harness, drop: &DropId, fan: &str, units: i32) -> NewOrder {
    let hold = HoldId::generate(drop);
    let reference = unique("ok");
    h.server
        .engine
        .db()
        .begin_payment(
            &hold,
            &FanId::parse(fan).unwrap(),
            "test",
            &reference,
            100 * i64::from(units),
        )
        .await
        .unwrap();
    NewOrder {
        order_id: OrderId::generate(),
        hold_id: hold,
        reference,
        fan: fan.to_owned(),
        currency: "USD".into(),
        total_cents: 100 * i64::from(units),
        per_fan_limit: 2,
        items: vec![NewItem {
            bucket: "A".into(),
            seat: None,
            quantity: units,
            price_cents: 100,
        }],
    }
}

async fn sold(h: &Harness, drop: &DropId) -> (i32, i64) {
    let db = h.server.engine.db().client().await.unwrap();
    let sold: i32 = db
        .query_one(
            "SELECT sold FROM inventory WHERE drop_id = $1",
            &[&drop.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    let orders: i64 = db
        .query_one(
            "SELECT count(*) FROM orders WHERE drop_id = $1",
            &[&drop.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    (sold, orders)
}

async fn state(h: &Harness, o: &NewOrder) -> String {
    h.server
        .engine
        .db()
        .attempt_state(&o.hold_id, &o.reference)
        .await
        .unwrap()
        .unwrap()
        .as_str()
        .to_owned()
}

fn writer(h: &Harness) -> Writer {
    Writer::spawn(h.server.engine.db().clone(), &WriterConfig::default())
}

/// Nine good orders and one for more than its fan may buy, committed at once: Postgres'
/// `fan_within_limit` refuses that one alone, the nine commit, the batch fell back to one order
/// at a time (counted), and the next batch of good orders is written set-based again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_postgres_refuses_fails_alone_and_the_next_batch_is_set_based_again() {
    let h = Harness::start().await;
    let drop = drop_of(&h, 100, 2).await;
    let w = writer(&h);
    let mut orders = Vec::new();
    for i in 0..9 {
        orders.push(pending_order(&h, &drop, &unique(&format!("good{i}")), 1).await);
    }
    // Three units for a fan whose limit is two: the last guard refuses it.
    let greedy = pending_order(&h, &drop, &unique("greedy"), 3).await;
    orders.insert(4, greedy.clone());
    let results = join_all(orders.iter().cloned().map(|o| w.commit(o))).await;
    for (o, r) in orders.iter().zip(&results) {
        let r = r.as_ref().expect("the batch commits");
        if o.hold_id == greedy.hold_id {
            assert_eq!(*r, Committed::Refused, "the greedy order is refused");
        } else {
            assert_eq!(*r, Committed::New(o.order_id), "a good order commits");
        }
    }
    assert!(w.fallbacks() >= 1, "the refusal was a fallback");
    assert_eq!(sold(&h, &drop).await, (9, 9));
    assert_eq!(
        state(&h, &greedy).await,
        "pending",
        "the refused order's attempt was not claimed"
    );
    for o in orders.iter().filter(|o| o.hold_id != greedy.hold_id) {
        assert_eq!(state(&h, o).await, "authorized");
    }

    let after = w.fallbacks();
    let mut more = Vec::new();
    for i in 0..10 {
        more.push(pending_order(&h, &drop, &unique(&format!("later{i}")), 1).await);
    }
    let results = join_all(more.iter().cloned().map(|o| w.commit(o))).await;
    for (o, r) in more.iter().zip(results) {
        assert_eq!(r.unwrap(), Committed::New(o.order_id));
    }
    assert_eq!(w.fallbacks(), after, "good batches don't fall back");
    assert_eq!(sold(&h, &drop).await, (19, 19));
    h.server.shutdown().await;
}

/// A batch in which three attempts were voided meanwhile (a reconciler moved them to `voiding`)
/// writes orders only for the seven still pending; committed again, every hold gets its first
/// order back and nothing is sold twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_writes_orders_only_for_attempts_still_pending() {
    let h = Harness::start().await;
    let drop = drop_of(&h, 100, 2).await;
    let w = writer(&h);
    let db = h.server.engine.db();
    let mut orders = Vec::new();
    for i in 0..10 {
        orders.push(pending_order(&h, &drop, &unique(&format!("fan{i}")), 1).await);
    }
    for o in orders.iter().step_by(3).skip(1) {
        db.void_attempt(&o.hold_id, &o.fan, "test", &o.reference, o.total_cents)
            .await
            .unwrap();
    }
    let voided = |i: usize| i.is_multiple_of(3) && i > 0;
    let results = join_all(orders.iter().cloned().map(|o| w.commit(o))).await;
    for (i, (o, r)) in orders.iter().zip(results).enumerate() {
        let r = r.unwrap();
        if voided(i) {
            assert_eq!(
                r,
                Committed::Superseded,
                "order {i}: its attempt is voiding"
            );
            assert_eq!(state(&h, o).await, "voiding");
        } else {
            assert_eq!(r, Committed::New(o.order_id), "order {i}");
            assert_eq!(state(&h, o).await, "authorized");
        }
    }
    assert_eq!(sold(&h, &drop).await, (7, 7));

    // The same holds again (a retry, or a reconciler's commit), with fresh order ids.
    let again: Vec<NewOrder> = orders
        .iter()
        .map(|o| NewOrder {
            order_id: OrderId::generate(),
            ..o.clone()
        })
        .collect();
    let results = join_all(again.iter().cloned().map(|o| w.commit(o))).await;
    for (i, (o, r)) in orders.iter().zip(results).enumerate() {
        let expected = if voided(i) {
            Committed::Superseded
        } else {
            Committed::Existing(o.order_id)
        };
        assert_eq!(r.unwrap(), expected, "order {i} again");
    }
    assert_eq!(sold(&h, &drop).await, (7, 7));
    h.server.shutdown().await;
}

/// Payment attempts and captures go through the writer too: twenty attempts recorded at once
/// (one of them twice: recorded once), an attempt already there not taken over; captures move
/// only authorized attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payment_attempts_and_captures_are_recorded_in_shared_batches() {
    let h = Harness::start().await;
    let drop = drop_of(&h, 100, 2).await;
    let w = writer(&h);
    let payment = |fan: String| NewPayment {
        hold_id: HoldId::generate(&drop),
        reference: unique("ok"),
        fan,
        gateway: "test".into(),
        amount_cents: 100,
    };
    let payments: Vec<NewPayment> = (0..20).map(|i| payment(format!("p{i}"))).collect();
    let mut sent = payments.clone();
    sent.push(payments[7].clone());
    let recorded = join_all(sent.into_iter().map(|p| w.begin_payment(p))).await;
    let recorded: Vec<bool> = recorded.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        recorded.iter().filter(|r| **r).count(),
        20,
        "each attempt recorded once: {recorded:?}"
    );
    assert!(
        !w.begin_payment(payments[3].clone()).await.unwrap(),
        "an attempt already there is not recorded again"
    );
    let db = h.server.engine.db();
    for p in &payments {
        let s = db.attempt_state(&p.hold_id, &p.reference).await.unwrap();
        assert_eq!(s.map(|s| s.as_str()), Some("pending"));
    }

    // Half authorized (as a commit leaves them); captures of all twenty move only those.
    for p in payments.iter().step_by(2) {
        db.set_payment_state(
            &p.hold_id,
            &p.reference,
            engine::payments::PaymentState::Pending,
            engine::payments::PaymentState::Authorized,
        )
        .await
        .unwrap();
    }
    let moved = join_all(
        payments
            .iter()
            .map(|p| w.captured(p.hold_id.clone(), p.reference.clone())),
    )
    .await;
    for (i, (p, m)) in payments.iter().zip(moved).enumerate() {
        assert_eq!(m.unwrap(), i.is_multiple_of(2), "capture {i}");
        let s = db.attempt_state(&p.hold_id, &p.reference).await.unwrap();
        let want = if i.is_multiple_of(2) {
            "captured"
        } else {
            "pending"
        };
        assert_eq!(s.map(|s| s.as_str()), Some(want));
    }
    h.server.shutdown().await;
}

/// One attempt Postgres refuses (its drop is unknown to Postgres: the foreign key) fails alone;
/// the attempts recorded in the same batch are recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_record_postgres_refuses_fails_alone() {
    let h = Harness::start().await;
    let drop = drop_of(&h, 100, 2).await;
    let w = writer(&h);
    let payment = |drop: &DropId, fan: &str| NewPayment {
        hold_id: HoldId::generate(drop),
        reference: unique("ok"),
        fan: fan.to_owned(),
        gateway: "test".into(),
        amount_cents: 100,
    };
    let mut payments: Vec<NewPayment> = (0..9).map(|i| payment(&drop, &format!("q{i}"))).collect();
    let stray = payment(&DropId::generate(), "stray");
    payments.insert(3, stray.clone());
    let recorded = join_all(payments.iter().cloned().map(|p| w.begin_payment(p))).await;
    let db = h.server.engine.db();
    for (p, r) in payments.iter().zip(recorded) {
        if p.hold_id == stray.hold_id {
            assert!(r.is_err(), "the stray attempt is refused: {r:?}");
        } else {
            assert!(r.unwrap(), "a good attempt is recorded");
            let s = db.attempt_state(&p.hold_id, &p.reference).await.unwrap();
            assert_eq!(s.map(|s| s.as_str()), Some("pending"));
        }
    }
    h.server.shutdown().await;
}
