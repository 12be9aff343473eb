//! Closed drops are archived (issue 11, item 8): after `drops.archive_after_s` a closed drop with
//! nothing held and no unsettled payment leaves Redis (every key of it, by UNLINK), Postgres marks
//! it archived, and from then on readers serve it from Postgres and recovery never rebuilds it.
//!
//! The test server archives at once (`archive_after_s = 0`) and only drops it served (the shared
//! test stack's config), and the test runs archiver rounds itself (`Engine::archive_round`), so
//! what each round did is known without waiting on a clock.
mod common;

use common::Harness;
use engine::ids::DropId;
use serde_json::json;
use testkit::{new_key, test_config};

async fn archived_in_postgres(h: &Harness, drop: &str) -> bool {
    let db = h.server.engine.db().client().await.unwrap();
    db.query_one(
        "SELECT archived_at IS NOT NULL FROM drops WHERE drop_id = $1",
        &[&drop],
    )
    .await
    .unwrap()
    .get(0)
}

async fn present_keys(h: &Harness, drop: &str) -> Vec<String> {
    h.server
        .engine
        .redis()
        .present_keys(&DropId::parse(drop).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_drop_is_archived_and_served_from_postgres() {
    let mut cfg = test_config();
    cfg.drops.archive_after_s = 0;
    let h = Harness::with_config(cfg).await;
    let ga = h.ga_drop(10, 4, 600).await;
    let seated = h
        .create_drop(json!({
            "name": "archived seats", "per_fan_limit": 4, "hold_ttl_s": 600,
            "admission": {"mode": "open"},
            "inventory": {"kind": "seated", "sections": [{"section": "A", "price_cents": 4000,
                "rows": [{"row": "1", "seats": 4}, {"row": "2", "seats": 4}]}]}
        }))
        .await;

    // A sale in each, and a hold still live in the GA drop when it closes.
    let (_, buyer) = h.fan("archive-buyer").await;
    let r = h
        .reserve_reply(
            &buyer,
            &ga,
            &new_key(),
            &json!({"items": [{"sku": "TEE", "quantity": 2}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let sold_hold = r.str("hold_id");
    let c = h.confirm_reply(&buyer, &sold_hold, "ok_archive").await;
    assert_eq!(c.status, 201, "{c:?}");
    let order = c.str("order_id");
    let r = h
        .reserve_reply(
            &buyer,
            &seated,
            &new_key(),
            &json!({"seats": ["A-1-2", "A-2-3"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let c = h
        .confirm_reply(&buyer, &r.str("hold_id"), "ok_archive_seats")
        .await;
    assert_eq!(c.status, 201, "{c:?}");
    let (_, holder) = h.fan("archive-holder").await;
    let r = h
        .reserve_reply(
            &holder,
            &ga,
            &new_key(),
            &json!({"items": [{"sku": "TEE", "quantity": 1}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let live_hold = r.str("hold_id");
    for drop in [&ga, &seated] {
        let (status, v) = h
            .seller_post(&format!("/v1/drops/{drop}/close"), json!({}))
            .await;
        assert_eq!(status, 200, "close: {v}");
    }

    // The GA drop still holds a unit (it may still be paid for): it stays. The seated one goes.
    h.server.engine.archive_round().await;
    assert!(
        !archived_in_postgres(&h, &ga).await,
        "a drop with a live hold was archived"
    );
    assert!(!present_keys(&h, &ga).await.is_empty());
    assert!(archived_in_postgres(&h, &seated).await);
    assert_eq!(present_keys(&h, &seated).await, Vec::<String>::new());

    // The hold is given back: the next round archives the GA drop too.
    assert_eq!(h.release(&holder, &live_hold).await, 204);
    h.server.engine.archive_round().await;
    assert!(archived_in_postgres(&h, &ga).await);
    assert_eq!(
        present_keys(&h, &ga).await,
        Vec::<String>::new(),
        "an archived drop's keys stay in Redis"
    );

    // Readers answer from Postgres: the final counts, the seat map, the sale.
    assert_eq!(h.counts(&ga).await, (10, 8, 0, 2));
    let v = h.drop_view(&ga).await;
    assert_eq!(v["status"], "closed", "{v}");
    assert_eq!(h.counts(&seated).await, (8, 6, 0, 2));
    let (status, seats) = h.get(&format!("/v1/drops/{seated}/seats"), None).await;
    assert_eq!(status, 200, "{seats}");
    // A-1-2 and A-2-3 sold, every other seat free (a character per seat, seat 1 first).
    assert_eq!(
        seats["sections"],
        json!([{"section": "A", "rows": [
            {"row": "1", "states": "fsff"},
            {"row": "2", "states": "ffsf"}]}]),
        "the archived drop's seats: {seats}"
    );
    let (status, v) = h.get(&format!("/v1/holds/{sold_hold}"), Some(&buyer)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "sold");
    assert_eq!(v["order_id"], order.as_str());
    let (status, v) = h.get(&format!("/v1/orders/{order}"), Some(&buyer)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["hold_id"], sold_hold.as_str());
    let (status, v) = h
        .get(&format!("/v1/fans/me/orders?drop_id={ga}"), Some(&buyer))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["orders"].as_array().map(Vec::len), Some(1), "{v}");

    // A reserve is refused as on any closed drop (not 503 `recovering`), and changes nothing.
    let r = h
        .reserve_reply(
            &holder,
            &ga,
            &new_key(),
            &json!({"items": [{"sku": "TEE", "quantity": 1}]}),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "drop_closed"), "{r:?}");

    // Recovery never rebuilds it: asked to (the rebuild command, a watcher that saw it missing),
    // it leaves Redis empty, and a later round finds nothing more to do.
    let engine = &h.server.engine;
    assert_eq!(
        engine.recover(&DropId::parse(&ga).unwrap()).await.unwrap(),
        (0, 0)
    );
    assert_eq!(present_keys(&h, &ga).await, Vec::<String>::new());
    assert_eq!(engine.archive_round().await, 0);
    assert_eq!(present_keys(&h, &ga).await, Vec::<String>::new());
    assert_eq!(h.counts(&ga).await, (10, 8, 0, 2));
    h.server.shutdown().await;
}
