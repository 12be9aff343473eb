//! The happy path end to end: create a drop, reserve, confirm, read the order.
mod common;

use common::Harness;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_confirm_and_read_the_order() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("alice").await;
    let (status, hold) = h
        .reserve(
            &token,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 2}]}),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    assert_eq!(hold["total_cents"], 5000);
    let hold_id = hold["hold_id"].as_str().unwrap();
    assert_eq!(h.counts(&drop).await, (10, 8, 2, 0));
    let (status, order) = h.confirm(&token, hold_id, "ok_1").await;
    assert_eq!(status, 201, "{order}");
    let order_id = order["order_id"].as_str().unwrap();
    let (status, again) = h.confirm(&token, hold_id, "ok_1").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["order_id"].as_str().unwrap(), order_id);
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    let (status, o) = h.get(&format!("/v1/orders/{order_id}"), Some(&token)).await;
    assert_eq!(status, 200, "{o}");
    assert_eq!(o["items"][0]["quantity"], 2);
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}
