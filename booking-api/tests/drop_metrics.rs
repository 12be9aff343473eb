//! Per-drop gauges at `/metrics` (engine::drop_metrics): read from Redis by one task per process,
//! so they show what every instance did to the drop, labelled `drop`.

mod common;

use std::time::{Duration, Instant};

use common::Harness;
use engine::ids::{DropId, FanId};
use engine::metrics as m;
use engine::queue::Returning;
use serde_json::json;

/// The `/metrics` page, with the ops key.
async fn page(h: &Harness) -> String {
    reqwest::Client::new()
        .get(h.url("/metrics"))
        .bearer_auth(&h.ops_key)
        .send()
        .await
        .expect("booking-api answers")
        .text()
        .await
        .expect("a metrics page")
}

/// The value of `name{labels}` on `text`, if there.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let series = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.parse().ok())
}

/// Waits (generously: the round is on its own cadence, the machine is shared) until every
/// `(metric, labels, value)` shows at `/metrics`; panics with the page's figures if not.
async fn wait_for(h: &Harness, want: &[(&str, String, f64)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = page(h).await;
        let missing: Vec<String> = want
            .iter()
            .filter(|(name, labels, value)| sample(&text, name, labels) != Some(*value))
            .map(|(name, labels, value)| {
                format!(
                    "{name}{{{labels}}}: want {value}, have {:?}",
                    sample(&text, name, labels)
                )
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "never showed: {missing:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn per_drop_gauges_show_what_redis_has() {
    let mut cfg = testkit::test_config();
    cfg.http.drop_metrics_interval_ms = 100;
    // The shared test Postgres holds other tests' drops, newer ones among them.
    cfg.http.drop_metrics_max_drops = 10_000;
    cfg.http.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let h = Harness::with_config(cfg).await;

    // An open drop: 10 units, a hold of 3 and a sale of 2.
    let open = h.ga_drop(10, 5, 300).await;
    let (_, token) = h.fan("metrics-a").await;
    let tee = |q: u32| json!({"items": [{"sku": "TEE", "quantity": q}]});
    let (status, hold) = h.reserve(&token, &open, tee(3)).await;
    assert_eq!(status, 201, "{hold}");
    let (_, token) = h.fan("metrics-b").await;
    let (status, hold) = h.reserve(&token, &open, tee(2)).await;
    assert_eq!(status, 201, "{hold}");
    let (status, order) = h
        .confirm(&token, hold["hold_id"].as_str().unwrap(), "ok_card")
        .await;
    assert_eq!(status, 201, "{order}");

    // A queue drop, paused, with three fans in line and two shopping.
    let queue = h
        .create_drop(json!({
            "name": "metrics queue", "per_fan_limit": 2, "hold_ttl_s": 300,
            "admission": {"mode": "queue", "rate_per_s": 7.0, "burst": 10, "max_active": 40},
            "inventory": {"kind": "ga", "skus": [{"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": 20}]}
        }))
        .await;
    h.set_admission(&queue, json!({"paused": true})).await;
    let qid = DropId::parse(&queue).unwrap();
    for i in 0..3 {
        let fan = FanId::parse(&format!("metrics-line-{i}")).unwrap();
        h.server
            .engine
            .redis()
            .join(&qid, &fan, 0, Returning::default())
            .await
            .expect("joins the line");
    }
    h.admit(&queue, "metrics-in-0").await;
    h.admit(&queue, "metrics-in-1").await;
    // A session whose deadline passed (admission drops it on its next run) counts no more.
    h.server
        .engine
        .redis()
        .test_admit(&qid, &FanId::parse("metrics-gone").unwrap(), -60_000)
        .await
        .unwrap();

    let o = format!("drop=\"{open}\"");
    let q = format!("drop=\"{queue}\"");
    wait_for(
        &h,
        &[
            (m::DROP_AVAILABLE_UNITS, o.clone(), 5.0),
            (m::DROP_HELD_UNITS, o.clone(), 3.0),
            (m::DROP_SOLD_UNITS, o.clone(), 2.0),
            (m::DROP_CONFIRMING_HOLDS, o.clone(), 0.0),
            (m::DROP_RECOVERING, o.clone(), 0.0),
            (m::DROP_LINE_STATE, format!("{o},state=\"open\""), 1.0),
            (m::DROP_LINE_FANS, q.clone(), 3.0),
            (m::DROP_JOINS, q.clone(), 3.0),
            (m::DROP_ACTIVE_SHOPPERS, q.clone(), 2.0),
            (m::DROP_MAX_ACTIVE, q.clone(), 40.0),
            (m::DROP_ADMISSION_RATE, q.clone(), 7.0),
            (m::DROP_ADMISSION_PAUSED, q.clone(), 1.0),
            (m::DROP_AVAILABLE_UNITS, q.clone(), 20.0),
            (m::DROP_LINE_STATE, format!("{q},state=\"paused\""), 1.0),
        ],
    )
    .await;

    // Closed, the drop says so (and stays reported while it is live: closed in the last hour).
    let (status, v) = h
        .seller_post(&format!("/v1/drops/{queue}/close"), json!({}))
        .await;
    assert_eq!(status, 200, "{v}");
    wait_for(
        &h,
        &[(m::DROP_LINE_STATE, format!("{q},state=\"closed\""), 1.0)],
    )
    .await;
    let text = page(&h).await;
    assert_eq!(
        sample(&text, m::DROP_LINE_STATE, &format!("{q},state=\"paused\"")),
        None
    );

    // The internal listener (no key) serves them too.
    let internal = h.server.metrics_addr.expect("an internal metrics listener");
    let text = reqwest::get(format!("http://{internal}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(sample(&text, m::DROP_SOLD_UNITS, &o), Some(2.0), "{text}");
}

/// `http.drop_metrics_max_drops` bounds the `drop` label: at most that many drops are reported.
#[tokio::test]
async fn per_drop_gauges_are_bounded() {
    let mut cfg = testkit::test_config();
    cfg.http.drop_metrics_interval_ms = 100;
    cfg.http.drop_metrics_max_drops = 2;
    let h = Harness::with_config(cfg).await;
    for _ in 0..3 {
        h.ga_drop(5, 1, 300).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = page(&h).await;
        let drops: std::collections::HashSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(m::DROP_SOLD_UNITS))
            .filter_map(|l| l.strip_prefix("{drop=\""))
            .filter_map(|l| l.split('"').next())
            .collect();
        assert!(drops.len() <= 2, "{drops:?}");
        if drops.len() == 2 {
            let reported = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{} ", m::DROP_METRICS_DROPS)));
            assert_eq!(reported, Some("2"));
            return;
        }
        assert!(Instant::now() < deadline, "never reported two drops");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Holds past their confirm deadline count per drop (`floodgate_drop_confirming_overdue_holds`),
/// and the reconciler's `floodgate_confirming_backlog_holds` is every watched drop's overdue holds
/// in its round, not the last drop's it looked at. The overdue entries here have no hold record
/// behind them, so no round can settle them and they stay overdue for the test.
#[tokio::test]
async fn overdue_confirms_count_per_drop_and_in_the_reconcilers_backlog() {
    let h = Harness::start().await;
    let a = h.ga_drop(5, 2, 60).await;
    let b = h.ga_drop(5, 2, 60).await;
    for (drop, n) in [(&a, 2), (&b, 1)] {
        for i in 0..n {
            let hold = format!("{drop}-h{i:016x}");
            common::redis_cli(&["ZADD", &format!("fg:{{{drop}}}:confirming"), "1", &hold]).await;
        }
    }
    wait_for(
        &h,
        &[
            (
                m::DROP_CONFIRMING_OVERDUE_HOLDS,
                format!("drop=\"{a}\""),
                2.0,
            ),
            (
                m::DROP_CONFIRMING_OVERDUE_HOLDS,
                format!("drop=\"{b}\""),
                1.0,
            ),
        ],
    )
    .await;
    // The process-wide gauge: other tests' servers in this binary set it too, so wait for ours.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let text = page(&h).await;
        let backlog = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{} ", m::CONFIRMING_BACKLOG)))
            .and_then(|v| v.parse::<f64>().ok());
        if backlog == Some(3.0) {
            break;
        }
        if !seen.contains(&backlog) {
            seen.push(backlog);
        }
        assert!(
            Instant::now() < deadline,
            "the backlog never counted both drops' 3 overdue holds; it showed {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
