//! Confirm deadlines are set on Redis' clock (lua/confirm_begin.lua) and compared on it only: a
//! booking-api whose own wall clock is wrong still sells, and its reconciler still settles a
//! confirm once Redis' clock passes its deadline. A binary of its own: the clock skew is
//! process-wide.
mod common;

use common::Harness;
use serde_json::json;
use testkit::{eventually, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirms_and_the_reconciler_keep_to_redis_clock_whatever_the_process_clock() {
    let mut cfg = test_config();
    cfg.holds.confirm_timeout_ms = 2_000;
    cfg.holds.confirm_safety_margin_ms = 500;
    let h = Harness::with_config(cfg).await;
    let drop = h.ga_drop(10, 4, 300).await;
    let tee = json!({"items": [{"sku": "TEE", "quantity": 1}]});

    // Ahead by a minute: the fresh confirm deadline looks long past to this clock.
    engine::tokens::skew_clock_ms(60_000);
    let (_, token) = h.fan("ahead").await;
    let (status, hold) = h.reserve(&token, &drop, tee.clone()).await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap();
    let (status, order) = h.confirm(&token, hold_id, "ok_ahead").await;
    assert_eq!(status, 201, "a clock ahead doesn't stop the sale: {order}");

    // Behind by ten minutes: a slow payment's deadline looks far off to this clock.
    engine::tokens::skew_clock_ms(-600_000);
    let (_, token) = h.fan("behind").await;
    let (status, hold) = h.reserve(&token, &drop, tee).await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap();
    let r = h.confirm_reply(&token, hold_id, "slow_behind").await;
    assert_eq!(r.status, 503, "{r:?}");
    eventually(
        "the reconciler settles the slow payment once Redis' clock passes its deadline",
        || async { h.hold_state(&token, hold_id).await == "sold" },
    )
    .await;
    engine::tokens::skew_clock_ms(0);
    assert_eq!(h.order_count(&drop, None).await, 2);
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}
