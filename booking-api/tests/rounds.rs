//! Many booking-api instances share a drop's background rounds: its sweep and reconcile run on
//! one instance at a time (a per-drop lease), so two instances run about what one would.
//!
//! Like every suite, it reads the Redis and Postgres URLs from the environment, so it runs as well
//! against a single node as against a cluster.

mod common;

use common::Harness;
use serde_json::{json, Value};

fn tee(quantity: u32) -> Value {
    json!({"items": [{"sku": "TEE", "quantity": quantity}]})
}

/// Each round asks, per drop, whether this instance runs it (sweep every 250 ms, reconcile every
/// second); counted over a fixed number of asks, not timed. Alone an instance runs every round it
/// asks about; two sharing a drop run at most 1.2× what one would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_run_a_drops_rounds_no_more_than_one() {
    let a = Harness::start().await;
    let b = Harness::start().await;
    let drop = a.ga_drop(10, 4, 300).await;
    // Test servers look after only the drops they served: each serves this one.
    for h in [&a, &b] {
        let (_, token) = h.fan("rounds").await;
        let (status, hold) = h.reserve(&token, &drop, tee(1)).await;
        assert_eq!(status, 201, "{hold}");
    }
    let counts = || {
        let (asked_a, held_a) = a.server.engine.round_lease_counts();
        let (asked_b, held_b) = b.server.engine.round_lease_counts();
        (asked_a, asked_b, held_a + held_b)
    };
    const ASKS: u64 = 60;
    let (a0, b0, held0) = counts();
    testkit::eventually("both instances' rounds come round 60 times", || async {
        let (a, b, _) = counts();
        a >= a0 + ASKS && b >= b0 + ASKS
    })
    .await;
    let (a1, b1, held1) = counts();
    let ran = held1 - held0;
    let one = (a1 - a0).min(b1 - b0);
    assert!(
        ran as f64 <= 1.2 * one as f64,
        "two instances ran the drop's rounds {ran} times while one asked {one} times"
    );
    a.assert_invariants(&drop).await;
    b.server.shutdown().await;
    a.server.shutdown().await;
}
