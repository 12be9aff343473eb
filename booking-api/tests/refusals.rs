//! Cheap refusals at booking-api: the per-IP limit keys IPv6 clients by /64 and comes before
//! readiness and metrics, and `/metrics` is kept off the public listener without an ops key.

mod common;

use common::Harness;

/// A config whose per-IP limit is 3 requests, then one a second, believing `X-Forwarded-For`
/// from the test client (loopback), so a test can speak for any address.
fn tight_per_ip() -> engine::Config {
    let mut cfg = testkit::test_config();
    cfg.limits.per_ip_per_s = 1;
    cfg.limits.per_ip_burst = 3;
    cfg.limits.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    cfg
}

/// The status of a public read sent on behalf of `client`.
async fn from(h: &Harness, client: &str) -> u16 {
    let r = h
        .send(
            h.http
                .get(h.url("/v1/drops/d0123456789abcdef"))
                .header("X-Forwarded-For", client),
        )
        .await;
    assert!(
        r.status == 404 || r.status == 429,
        "{client}: {r:?} (404 `unknown_drop`, or limited)"
    );
    r.status
}

/// An IPv6 host picks any address of its /64 at will: every address in one /64 shares one
/// bucket, another /64 has its own; IPv4 addresses are limited one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipv6_clients_are_limited_by_their_64() {
    let h = Harness::with_config(tight_per_ip()).await;
    for client in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"] {
        assert_eq!(from(&h, client).await, 404, "{client}: within the burst");
    }
    for client in ["2001:db8:1:2::1", "2001:db8:1:2:abcd:ef01:2345:6789"] {
        assert_eq!(
            from(&h, client).await,
            429,
            "{client}: same /64, burst spent"
        );
    }
    assert_eq!(from(&h, "2001:db8:1:3::1").await, 404, "another /64");
    for _ in 0..3 {
        assert_eq!(from(&h, "198.51.100.7").await, 404);
    }
    assert_eq!(from(&h, "198.51.100.7").await, 429);
    assert_eq!(from(&h, "198.51.100.8").await, 404, "IPv4 by address");
    // An IPv4-mapped IPv6 address is the IPv4 client it maps.
    assert_eq!(from(&h, "::ffff:198.51.100.7").await, 429);
    h.server.shutdown().await;
}

/// Readiness (Redis and Postgres) and metrics (a key in Postgres) count against the per-IP limit
/// like the API; liveness never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_and_metrics_are_limited_per_ip() {
    let h = Harness::with_config(tight_per_ip()).await;
    let client = "203.0.113.9";
    for _ in 0..3 {
        assert_eq!(from(&h, client).await, 404);
    }
    for path in ["/readyz", "/metrics"] {
        let r = h
            .send(
                h.http
                    .get(h.url(path))
                    .bearer_auth(&h.ops_key)
                    .header("X-Forwarded-For", client),
            )
            .await;
        assert_eq!(r.status, 429, "{path}: {r:?}");
        assert_eq!(r.code(), "rate_limited", "{path}");
        assert!(r.retry_after.is_some(), "{path}: {r:?}");
    }
    let r = h
        .send(
            h.http
                .get(h.url("/healthz"))
                .header("X-Forwarded-For", client),
        )
        .await;
    assert_eq!(r.status, 200, "liveness is never limited");
    h.server.shutdown().await;
}

/// The public `/metrics` answers only an ops key; the internal listener (`http.metrics_listen`)
/// answers Prometheus without one, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_need_the_ops_key_or_the_internal_listener() {
    let mut cfg = testkit::test_config();
    cfg.http.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let h = Harness::with_config(cfg).await;
    let r = h.send(h.http.get(h.url("/metrics"))).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.code(), "unauthorized");
    let r = h
        .send(h.http.get(h.url("/metrics")).bearer_auth(&h.seller_key))
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = h
        .http
        .get(h.url("/metrics"))
        .bearer_auth(&h.ops_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("floodgate_http_requests_total"));

    let internal = h.server.metrics_addr.expect("an internal metrics listener");
    let r = h
        .http
        .get(format!("http://{internal}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("floodgate_http_requests_total"));
    for path in ["/v1/drops/d0123456789abcdef", "/healthz", "/"] {
        let r = h
            .http
            .get(format!("http://{internal}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "the internal listener serves {path}?");
    }
    h.server.shutdown().await;
}
