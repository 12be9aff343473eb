//! The public catalogue behind the front page (`GET /v1/catalogue`, `GET /`): the drops on sale
//! and coming soon, bounded, read from Postgres at most once per refresh interval, rate-limited
//! per address like the rest of the public API.
mod common;

use common::Harness;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

fn config(refresh_ms: u64) -> engine::Config {
    let mut cfg = testkit::test_config();
    cfg.drops.catalogue_refresh_ms = refresh_ms;
    // The shared Postgres holds every other test's drops too.
    cfg.drops.catalogue_max_drops = 500;
    cfg.queue.public_url = "http://queue.example:8081/".into();
    cfg
}

fn in_days(days: i64) -> String {
    (OffsetDateTime::now_utc() + Duration::days(days))
        .format(&Rfc3339)
        .unwrap()
}

async fn catalogue(h: &Harness) -> Value {
    let (status, v) = h.get("/v1/catalogue", None).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// The entry for `drop` in the catalogue's `list` (`on_sale` or `coming_soon`).
fn entry<'a>(v: &'a Value, list: &str, drop: &str) -> Option<&'a Value> {
    v[list]
        .as_array()
        .expect("a list")
        .iter()
        .find(|e| e["drop_id"] == drop)
}

fn listed(v: &Value, drop: &str) -> bool {
    entry(v, "on_sale", drop).is_some() || entry(v, "coming_soon", drop).is_some()
}

#[tokio::test]
async fn the_catalogue_lists_drops_on_sale_and_coming_soon() {
    let h = Harness::with_config(config(0)).await;
    let on_sale = h
        .create_drop(json!({
            "name": "on sale", "per_fan_limit": 2, "hold_ttl_s": 60, "admission": {"mode": "open"},
            "inventory": {"kind": "ga", "skus": [
                {"sku": "A", "name": "A", "price_cents": 2500, "quantity": 5},
                {"sku": "B", "name": "B", "price_cents": 1200, "quantity": 5}]}
        }))
        .await;
    let soon = h
        .create_drop(json!({
            "name": "soon", "per_fan_limit": 2, "hold_ttl_s": 60, "opens_at": in_days(2),
            "admission": {"mode": "queue", "rate_per_s": 5.0, "max_active": 50},
            "inventory": {"kind": "ga", "skus": [{"sku": "A", "name": "A", "price_cents": 900, "quantity": 5}]}
        }))
        .await;
    let later = h
        .create_drop(json!({
            "name": "later", "per_fan_limit": 2, "hold_ttl_s": 60, "opens_at": in_days(40),
            "admission": {"mode": "open"},
            "inventory": {"kind": "ga", "skus": [{"sku": "A", "name": "A", "price_cents": 900, "quantity": 5}]}
        }))
        .await;
    let closed = h.ga_drop(5, 2, 60).await;
    let (status, _) = h
        .seller_post(&format!("/v1/drops/{closed}/close"), json!({}))
        .await;
    assert_eq!(status, 200);
    let sold_out = h.ga_drop(1, 1, 60).await;
    let (_, fan) = h.fan("catalogue-fan").await;
    let (status, hold) = h
        .reserve(
            &fan,
            &sold_out,
            json!({"items": [{"sku": "TEE", "quantity": 1}]}),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    let (status, order) = h
        .confirm(&fan, hold["hold_id"].as_str().unwrap(), "ok_catalogue")
        .await;
    assert_eq!(status, 201, "{order}");

    let v = catalogue(&h).await;
    let e = entry(&v, "on_sale", &on_sale).unwrap_or_else(|| panic!("on sale: {v}"));
    assert_eq!(e["name"], "on sale");
    assert_eq!(e["state"], "on_sale");
    assert_eq!(e["from_price_cents"], 1200);
    assert_eq!(e["currency"], "USD");
    assert_eq!(e["admission_mode"], "open");
    assert_eq!(e["url"], format!("/drops/{on_sale}"));
    assert!(
        e["opens_at"].as_str().is_some_and(|t| t.contains('T')),
        "{e}"
    );

    let e = entry(&v, "coming_soon", &soon).unwrap_or_else(|| panic!("coming soon: {v}"));
    assert_eq!(e["state"], "coming_soon");
    assert_eq!(e["from_price_cents"], 900);
    assert_eq!(e["admission_mode"], "queue");
    // A queue drop's fan page is its queue page, at queue-server's public URL.
    assert_eq!(e["url"], format!("http://queue.example:8081/drops/{soon}"));

    let e = entry(&v, "on_sale", &sold_out).unwrap_or_else(|| panic!("sold out: {v}"));
    assert_eq!(e["state"], "sold_out");

    assert!(!listed(&v, &later), "opens in 40 days: {v}");
    assert!(!listed(&v, &closed), "closed: {v}");
    assert_eq!(
        v["soon_days"],
        engine::config::DEFAULT_CATALOGUE_SOON_DAYS,
        "{v}"
    );
    // Soonest first among those coming, latest opened first among those on sale.
    for (list, newest_first) in [("on_sale", true), ("coming_soon", false)] {
        let times: Vec<OffsetDateTime> = v[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| OffsetDateTime::parse(e["opens_at"].as_str().unwrap(), &Rfc3339).unwrap())
            .collect();
        let mut sorted = times.clone();
        sorted.sort();
        if newest_first {
            sorted.reverse();
        }
        assert_eq!(times, sorted, "{list} order");
    }
}

#[tokio::test]
async fn the_catalogue_is_bounded_and_read_at_most_once_per_refresh() {
    // A refresh interval longer than the test: after the first read, Postgres isn't asked again.
    let mut cfg = config(3_600_000);
    cfg.drops.catalogue_max_drops = 2;
    let h = Harness::with_config(cfg).await;
    let first = h.ga_drop(5, 2, 60).await;
    let a = catalogue(&h).await;
    assert!(a["on_sale"].as_array().unwrap().len() <= 2, "{a}");
    assert!(a["coming_soon"].as_array().unwrap().len() <= 2, "{a}");
    assert!(listed(&a, &first), "{a}");
    let second = h.ga_drop(5, 2, 60).await;
    for _ in 0..20 {
        let b = catalogue(&h).await;
        assert_eq!(b, a, "served from the cache");
        assert!(!listed(&b, &second));
    }
}

#[tokio::test]
async fn the_catalogue_is_rate_limited_per_address() {
    let mut cfg = config(0);
    cfg.limits.per_ip_per_s = 1;
    cfg.limits.per_ip_burst = 3;
    let h = Harness::with_config(cfg).await;
    let mut limited = None;
    for _ in 0..10 {
        let r = h.get_reply("/v1/catalogue", None).await;
        if r.status != 200 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("a 429 within 10 requests");
    assert_eq!((r.status, r.code()), (429, "rate_limited"), "{r:?}");
    assert!(r.retry_after.is_some(), "{r:?}");
}

#[tokio::test]
async fn the_front_page_is_served_at_the_root() {
    let h = Harness::with_config(config(0)).await;
    let r = h.http.get(h.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ctype = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ctype.starts_with("text/html"), "{ctype}");
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let html = r.text().await.unwrap();
    assert!(html.contains("/static/front.js"), "{html}");
    let r = h.http.get(h.url("/static/front.js")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Other methods on the catalogue are refused, and change nothing.
    let (status, v) = h
        .call(h.http.post(h.url("/v1/catalogue")).json(&json!({})))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{v}"
    );
}
