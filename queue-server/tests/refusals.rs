//! Cheap refusals: what a flood of made-up drop ids costs Postgres (both servers), the waiting
//! room's per-IP limit ahead of any token or lookup, and `/metrics` kept off the public listener
//! without an ops key.

mod common;

use std::time::Instant;

use common::{test_config, Harness};
use engine::ids::DropId;
use serde_json::json;

fn unknown_drop() -> DropId {
    DropId::parse(&format!("d{:016x}", rand::random::<u64>())).unwrap()
}

/// Postgres reads of drop definitions so far by both servers.
fn reads(h: &Harness) -> u64 {
    h.booking.engine.drop_reads() + h.queue.engine.drop_reads()
}

/// Every route that takes a drop id, on both servers, asked about `drop` once: (what, status).
async fn ask_everything(h: &Harness, drop: &DropId, token: &str) -> Vec<(&'static str, u16)> {
    let q = h.queue.url();
    let hold = format!("{drop}-h{:016x}", rand::random::<u64>());
    let reserve = json!({"items": [{"sku": "TEE", "quantity": 1}]});
    let requests = [
        ("drop view", h.http.get(h.url(&format!("/v1/drops/{drop}")))),
        (
            "seat map",
            h.http.get(h.url(&format!("/v1/drops/{drop}/seats"))),
        ),
        (
            "reserve",
            h.http
                .post(h.url(&format!("/v1/drops/{drop}/holds")))
                .bearer_auth(token)
                .header("Idempotency-Key", testkit::new_key())
                .json(&reserve),
        ),
        (
            "hold",
            h.http
                .get(h.url(&format!("/v1/holds/{hold}")))
                .bearer_auth(token),
        ),
        (
            "join",
            h.http
                .post(format!("{q}/v1/drops/{drop}/queue"))
                .bearer_auth(token),
        ),
        (
            "poll",
            h.http
                .get(format!("{q}/v1/drops/{drop}/queue/me"))
                .bearer_auth(token),
        ),
        (
            "seed",
            h.http.get(format!("{q}/v1/drops/{drop}/queue/seed")),
        ),
    ];
    let mut out = Vec::new();
    for (what, req) in requests {
        out.push((what, h.call(req).await.0));
    }
    out
}

/// A flood of lookups of a few made-up drop ids reaches Postgres once per id per
/// `drops.unknown_ttl_ms` on each server, not once per request; and a drop created meanwhile is
/// found at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_unknown_drop_ids_reach_postgres_once_per_ttl() {
    let h = Harness::start_with(test_config()).await;
    let (_, token) = h.fan("flooder");
    let ids: Vec<DropId> = (0..10).map(|_| unknown_drop()).collect();
    let before = reads(&h);
    let started = Instant::now();
    let mut requests = 0;
    for _ in 0..15 {
        for drop in &ids {
            for (what, status) in ask_everything(&h, drop, &token).await {
                requests += 1;
                assert_eq!(status, 404, "{what} of an unknown drop");
            }
        }
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let read = reads(&h) - before;
    // Each server reads each id once per TTL it spans (the first read, and once per TTL since).
    let ttl_ms = test_config().drops.unknown_ttl_ms;
    let bound = 2 * ids.len() as u64 * (1 + elapsed_ms / ttl_ms + 1);
    assert!(
        read <= bound,
        "{requests} requests about {} unknown drops cost {read} Postgres reads in {elapsed_ms} ms \
         (at most {bound})",
        ids.len()
    );

    // A drop this booking-api creates is known at once, even right after a miss on its id
    // elsewhere would have been cached (ids are random, so none was).
    let drop = h.queue_drop(10, 1, json!({}), None).await;
    let (status, _) = h.get(&format!("/v1/drops/{drop}"), None).await;
    assert_eq!(status, 200);
    h.shutdown().await;
}

/// Made-up ids that never repeat get past the cache of unknown ids; what bounds their cost is the
/// budget of Postgres reads for uncached drops (`drops.lookups_per_s`, `drops.lookup_burst`):
/// past it they answer 503 `unavailable` with `Retry-After`, and a cached drop still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_new_drop_ids_costs_postgres_at_most_the_lookup_budget() {
    let mut cfg = test_config();
    cfg.drops.lookups_per_s = 5;
    cfg.drops.lookup_burst = 20;
    let h = Harness::start_with(cfg).await;
    let (_, token) = h.fan("flooder");
    let real = h.queue_drop(10, 1, json!({}), None).await;
    assert_eq!(h.get(&format!("/v1/drops/{real}"), None).await.0, 200);
    let before = reads(&h);
    let started = Instant::now();
    let mut refused = 0;
    for _ in 0..60 {
        for (what, status) in ask_everything(&h, &unknown_drop(), &token).await {
            assert!(
                status == 404 || status == 503,
                "{what} of an unknown drop: {status}"
            );
            refused += u32::from(status == 503);
        }
    }
    let elapsed_s = started.elapsed().as_secs();
    let read = reads(&h) - before;
    // Per server: the burst, then the rate (rounded up to whole seconds).
    let bound = 2 * (20 + 5 * (elapsed_s + 1));
    assert!(
        read <= bound,
        "420 requests about new unknown drops cost {read} Postgres reads in {elapsed_s} s \
         (at most {bound})"
    );
    assert!(refused > 0, "the budget never ran out");
    let r = h
        .send(h.http.get(h.url(&format!("/v1/drops/{}", unknown_drop()))))
        .await;
    if r.status == 503 {
        assert_eq!(r.code(), "unavailable", "{r:?}");
        assert!(r.retry_after.is_some(), "{r:?}");
    }
    // The drop this process has cached costs no lookup: it answers whatever the budget says.
    assert_eq!(h.get(&format!("/v1/drops/{real}"), None).await.0, 200);
    h.shutdown().await;
}

/// Every queue-server route but `/healthz` counts against the per-IP limit before it looks at a
/// token, a drop id, Redis or Postgres: past the burst even a valid fan is refused 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_waiting_room_route_is_limited_per_ip_before_the_token() {
    let mut cfg = test_config();
    cfg.queue.per_ip_per_s = 1;
    cfg.queue.per_ip_burst = 5;
    let h = Harness::start_with(cfg).await;
    let drop = h.queue_drop(10, 1, json!({}), None).await;
    let (_, token) = h.fan("fan");
    let q = h.queue.url();
    for _ in 0..5 {
        let (status, _) = h
            .call(
                h.http
                    .get(format!("{q}/v1/drops/{drop}/queue/me"))
                    .bearer_auth("not-a-token"),
            )
            .await;
        assert_eq!(status, 401);
    }
    let ws = h
        .http
        .get(format!("{q}/v1/drops/{drop}/queue/ws"))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
    let limited = [
        (
            "poll",
            h.http
                .get(format!("{q}/v1/drops/{drop}/queue/me"))
                .bearer_auth(&token),
        ),
        (
            "join",
            h.http
                .post(format!("{q}/v1/drops/{drop}/queue"))
                .bearer_auth(&token),
        ),
        ("socket", ws),
        (
            "seed",
            h.http.get(format!("{q}/v1/drops/{drop}/queue/seed")),
        ),
        ("page", h.http.get(format!("{q}/drops/{drop}"))),
        ("readyz", h.http.get(format!("{q}/readyz"))),
        ("metrics", h.http.get(format!("{q}/metrics"))),
    ];
    for (what, req) in limited {
        let r = h.send(req).await;
        assert_eq!(r.status, 429, "{what}: {r:?}");
        assert_eq!(r.code(), "rate_limited", "{what}");
        assert!(r.retry_after.is_some(), "{what}: {r:?}");
    }
    let (status, _) = h.call(h.http.get(format!("{q}/healthz"))).await;
    assert_eq!(status, 200, "liveness is never limited");
    h.shutdown().await;
}

/// queue-server's public `/metrics` answers only an ops key; the internal listener
/// (`queue.metrics_listen`) answers Prometheus without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_metrics_need_the_ops_key_or_the_internal_listener() {
    let mut cfg = test_config();
    cfg.queue.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let h = Harness::start_with(cfg).await;
    let url = format!("{}/metrics", h.queue.url());
    let r = h.send(h.http.get(&url)).await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = h.send(h.http.get(&url).bearer_auth(&h.seller_key)).await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = h
        .http
        .get(&url)
        .bearer_auth(&h.ops_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("floodgate_"));

    let internal = h.queue.metrics_addr.expect("an internal metrics listener");
    let r = h
        .http
        .get(format!("http://{internal}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("floodgate_"));
    let r = h
        .http
        .get(format!("http://{internal}/v1/drops/x/queue/seed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the internal listener serves metrics only");
    h.shutdown().await;
}

/// queue-server reports the per-drop gauges too (engine::drop_metrics, read from Redis, as
/// booking-api does): a paused line's length, admissions and active shoppers, labelled `drop`, on
/// both its listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_metrics_show_each_drops_line() {
    let mut cfg = test_config();
    cfg.queue.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let h = Harness::start_with(cfg).await;
    let drop = h.queue_drop(20, 2, json!({"paused": true}), None).await;
    for name in ["gauge-1", "gauge-2"] {
        let (_, token) = h.fan(name);
        let (status, v) = h.join(&drop, &token).await;
        assert_eq!(status, 201, "{v}");
    }
    let internal = h.queue.metrics_addr.expect("an internal metrics listener");
    let want = [
        format!("{}{{drop=\"{drop}\"}} 2", engine::metrics::DROP_LINE_FANS),
        format!("{}{{drop=\"{drop}\"}} 0", engine::metrics::DROP_ADMITTED),
        format!(
            "{}{{drop=\"{drop}\"}} 0",
            engine::metrics::DROP_ACTIVE_SHOPPERS
        ),
        format!(
            "{}{{drop=\"{drop}\"}} 1",
            engine::metrics::DROP_ADMISSION_PAUSED
        ),
    ];
    for (what, url, key) in [
        ("internal", format!("http://{internal}/metrics"), None),
        (
            "public",
            format!("{}/metrics", h.queue.url()),
            Some(h.ops_key.clone()),
        ),
    ] {
        let started = Instant::now();
        loop {
            let mut req = h.http.get(&url);
            if let Some(k) = &key {
                req = req.bearer_auth(k);
            }
            let text = req.send().await.unwrap().text().await.unwrap();
            let missing: Vec<&String> = want
                .iter()
                .filter(|w| !text.lines().any(|l| l == w.as_str()))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "{what} /metrics never showed {missing:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    h.shutdown().await;
}
