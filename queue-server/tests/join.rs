//! Joining: one place per fan (tabs, devices, after admission), distinct places under a burst,
//! FIFO after opening, and the pre-queue's commit–reveal order.

mod common;

use std::collections::HashSet;

use common::{redis_cli, Harness};
use engine::queue::{prequeue_score, FanStatus};
use serde_json::json;
use sha2::{Digest, Sha256};
use testkit::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_tab_and_second_device_get_the_same_place() {
    let h = Harness::start().await;
    let drop = h.queue_drop(10, 2, json!({"paused": true}), None).await;
    let (fan, tab) = h.fan("tabs");
    let device = h.queue.engine.fans().issue_dev(&fan).unwrap();
    let (status, first) = h.join(&drop, &tab).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["status"], "waiting");
    let (status, again) = h.join(&drop, &tab).await;
    assert_eq!(status, 200, "{again}");
    let (_, other_device) = h.join(&drop, &device).await;
    assert_eq!(first["place"], again["place"]);
    assert_eq!(first["place"], other_device["place"]);
    let (status, me) = h.me(&drop, &device).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["place"], first["place"]);
    assert_eq!(me["status"], "waiting");
    assert_eq!(me["paused"], true);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_concurrent_joins_get_thousand_distinct_places() {
    let h = Harness::start().await;
    let drop = h.queue_drop(10, 2, json!({"paused": true}), None).await;
    let fans: Vec<_> = (0..1_000).map(|i| h.fan(&format!("crowd{i}"))).collect();
    let joins = fans.iter().map(|(_, token)| h.join(&drop, token));
    let answers = futures::future::join_all(joins).await;
    let mut places = HashSet::new();
    for (status, body) in answers {
        assert_eq!(status, 201, "{body}");
        places.insert(body["place"].as_i64().unwrap());
    }
    assert_eq!(places.len(), 1_000);
    assert_eq!(h.queue.engine.redis().line_len(&drop).await.unwrap(), 1_000);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_order_equals_join_order_after_opening() {
    let h = Harness::start().await;
    let drop = h
        .queue_drop(1_000, 1, json!({"rate_per_s": 1000, "burst": 7}), None)
        .await;
    let mut joined = Vec::new();
    for i in 0..60 {
        let (fan, _) = h.fan(&format!("fifo{i}"));
        let j = h
            .queue
            .queue
            .join(&drop, &fan, Default::default())
            .await
            .unwrap();
        assert_eq!(j.status, FanStatus::Waiting);
        joined.push(fan);
    }
    let mut admitted = Vec::new();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while admitted.len() < 60 {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for: everyone admitted"
        );
        let t = h.queue.queue.admit(&drop).await.unwrap();
        admitted.extend(t.admitted.into_iter().map(|(fan, _)| fan));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(admitted, joined);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prequeue_order_is_recomputable_from_the_revealed_seed() {
    let h = Harness::start().await;
    let drop = h
        .queue_drop(
            1_000,
            1,
            json!({"rate_per_s": 1000, "burst": 1000}),
            Some(4),
        )
        .await;
    let seed_url = format!("{}/v1/drops/{drop}/queue/seed", h.queue.url());
    let before: serde_json::Value = h
        .http
        .get(&seed_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        before["seed"].is_null(),
        "seed secret before opening: {before}"
    );
    let mut fans = Vec::new();
    for i in 0..30 {
        // Through the engine, not HTTP: an HTTP join starts this instance's admission loop,
        // which would admit some fans behind the test's back.
        let (fan, _) = h.fan(&format!("early{i}"));
        let joined = h
            .queue
            .queue
            .join(&drop, &fan, Default::default())
            .await
            .unwrap();
        assert_eq!(joined.status, FanStatus::PreQueue);
        assert!(joined.place < engine::queue::POST_OPEN_BASE);
        fans.push(fan);
    }
    // Nobody is admitted before opening.
    let t = h.queue.queue.admit(&drop).await.unwrap();
    assert!(t.admitted.is_empty());
    let mut admitted = Vec::new();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while admitted.len() < 30 {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for: the pre-queue admitted after opening"
        );
        let t = h.queue.queue.admit(&drop).await.unwrap();
        admitted.extend(t.admitted.into_iter().map(|(fan, _)| fan));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let after: serde_json::Value = h
        .http
        .get(&seed_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seed = after["seed"].as_str().expect("seed revealed after opening");
    assert_eq!(
        hex::encode(Sha256::digest(seed.as_bytes())),
        after["seed_sha256"].as_str().unwrap(),
        "the revealed seed matches the hash published at creation"
    );
    // Recompute HMAC-SHA256(seed, fan) cut to 52 bits by hand, independently of the engine.
    use hmac::Mac;
    let score = |fan: &engine::ids::FanId| {
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(seed.as_bytes()).unwrap();
        mac.update(fan.as_str().as_bytes());
        let d = mac.finalize().into_bytes();
        u64::from_be_bytes(d[..8].try_into().unwrap()) >> 12
    };
    let mut expected = fans.clone();
    expected.sort_by_key(|f| score(f));
    assert_eq!(admitted, expected);
    assert_eq!(score(&fans[0]) as i64, prequeue_score(seed, &fans[0]));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admitted_fan_joining_again_gets_no_second_place() {
    let h = Harness::start().await;
    let drop = h
        .queue_drop(100, 1, json!({"rate_per_s": 100, "burst": 10}), None)
        .await;
    let (fan, token) = h.fan("once");
    let (_, first) = h.join(&drop, &token).await;
    eventually("admitted", || async {
        h.me(&drop, &token).await.1["status"] == "admitted"
    })
    .await;
    let (status, again) = h.join(&drop, &token).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["place"], first["place"]);
    assert_eq!(again["status"], "admitted");
    let standing = h.queue.queue.standing(&drop, &fan).await.unwrap();
    assert_eq!(standing.ahead, None, "not back in the line");
    assert_eq!(h.queue.engine.redis().line_len(&drop).await.unwrap(), 0);
    h.shutdown().await;
}

/// Redis lost a queue drop that Postgres has (a flush, a failover to an empty replica): joining
/// answers 503 `recovering` until booking-api's watcher has rebuilt it, never `unknown_drop`
/// (which the page takes as final), and then the fan joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drop_redis_lost_is_recovering_not_unknown() {
    let h = Harness::start().await;
    let drop = h.queue_drop(10, 1, json!({}), None).await;
    let (_, token) = h.fan("after-the-flush");
    redis_cli(&["DEL", &engine::queue::QueueKeys::new(&drop).meta]).await;
    let (status, body) = h.join(&drop, &token).await;
    // This harness' booking-api watcher may have rebuilt it already (the drop is its own).
    assert!(
        status == 201 || (status == 503 && body["error"]["code"] == "recovering"),
        "{status} {body}"
    );
    eventually("the drop is rebuilt and the fan joins", || async {
        matches!(h.join(&drop, &token).await.0, 200 | 201)
    })
    .await;
    h.shutdown().await;
}

/// Before opening, an HTTP join shows no place and no rank, as `/me` and the socket don't: the
/// place is the fan's draw, and a draw seen could be shopped for under many names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_join_before_opening_reveals_no_draw() {
    let h = Harness::start().await;
    let drop = h.queue_drop(10, 1, json!({}), Some(600)).await;
    let (_, token) = h.fan("early-bird");
    let (status, joined) = h.join(&drop, &token).await;
    assert_eq!(status, 201, "{joined}");
    assert_eq!(joined["status"], "pre_queue", "{joined}");
    assert!(
        joined["place"].is_null() && joined["ahead"].is_null(),
        "{joined}"
    );
    h.shutdown().await;
}

/// After Redis lost a line (here: its keys deleted, then lua/line_restore.lua from kept marks),
/// a receipt brings its place back, unless the place was admitted already (at or below the
/// watermark), the fan bought their limit, or the receipt is older than the line's grace allows
/// (the fan had left); a forged receipt is refused; a fan new after the loss joins behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receipts_bring_places_back_after_the_line_is_lost() {
    use engine::db::LineMarks;
    use engine::queue::Returning;
    let h = Harness::start().await;
    let drop = h.queue_drop(10, 1, json!({"paused": true}), None).await;
    let mut fans = Vec::new();
    for name in ["admitted", "kept", "bought", "stale"] {
        let (fan, token) = h.fan(name);
        let (status, joined) = h.join(&drop, &token).await;
        assert_eq!(status, 201, "{joined}");
        let receipt = joined["receipt"].as_str().expect("a receipt").to_owned();
        fans.push((fan, token, joined["place"].as_i64().unwrap(), receipt));
    }
    let join_with = |token: &str, receipt: &str| {
        let url = format!("{}/v1/drops/{drop}/queue", h.queue.url());
        h.http
            .post(url)
            .bearer_auth(token)
            .header("X-Place-Receipt", receipt)
    };

    // The line is lost; the marks say 4 joins, and the first place was admitted.
    let key = |name: &str| engine::keys::drop_key(&drop, name);
    redis_cli(&[
        "DEL",
        &key("places"),
        &key("line"),
        &key("seq"),
        &key("seen"),
    ])
    .await;
    let redis = h.queue.engine.redis();
    let marks = LineMarks {
        seq: 4,
        place: fans[0].2,
        admitted: 1,
    };
    assert!(redis
        .restore_line(&drop, marks, 1_000_000, 0)
        .await
        .unwrap());
    assert!(
        !redis
            .restore_line(&drop, marks, 1_000_000, 0)
            .await
            .unwrap(),
        "a line still there is left alone"
    );
    redis_cli(&["HSET", &key("fans"), fans[2].0.as_str(), "1"]).await;

    let (status, back) = h.call(join_with(&fans[1].1, &fans[1].3)).await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(
        (back["status"].as_str(), back["place"].as_i64()),
        (Some("waiting"), Some(fans[1].2))
    );
    let (_, back) = h.call(join_with(&fans[0].1, &fans[0].3)).await;
    assert_eq!(back["status"], "done", "admitted before the loss: {back}");
    let (_, back) = h.call(join_with(&fans[2].1, &fans[2].3)).await;
    assert_eq!(back["status"], "done", "bought the limit: {back}");
    // A receipt issued long before the rebuild: that fan had left the line.
    let stale = redis
        .join(
            &drop,
            &fans[3].0,
            0,
            Returning {
                receipt: Some((fans[3].2, 1)),
                admitted: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(stale.status, FanStatus::Waiting);
    assert!(
        stale.place > fans[3].2 + 4,
        "a new place at the back: {stale:?}"
    );

    let (status, refused) = h.call(join_with(&fans[1].1, "r1.forged.receipt")).await;
    assert_eq!(status, 422, "{refused}");
    let other = fans[0].3.clone();
    let (status, refused) = h.call(join_with(&fans[1].1, &other)).await;
    assert_eq!(status, 422, "another fan's receipt: {refused}");

    let (_, newcomer) = h.fan("newcomer");
    let (status, joined) = h.join(&drop, &newcomer).await;
    assert_eq!(status, 201, "{joined}");
    assert!(
        joined["place"].as_i64().unwrap() > fans[3].2 + 1_000_000,
        "{joined}"
    );
    h.shutdown().await;
}
