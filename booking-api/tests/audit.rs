//! The drop audit log (`GET /v1/drops/{id}/audit`): one entry per admission change and per close,
//! with which key made it and each changed field's value before and after; refused requests add
//! nothing, and bad paging parameters are refused without reading anything.
mod common;

use common::Harness;
use serde_json::{json, Value};

/// The key id inside an API key (`fgk_<key id>_<secret>`).
fn key_id(key: &str) -> &str {
    key.strip_prefix("fgk_")
        .and_then(|rest| rest.split('_').next())
        .unwrap()
}

async fn audit(h: &Harness, drop: &str, query: &str, key: &str) -> (u16, Value) {
    h.get(&format!("/v1/drops/{drop}/audit{query}"), Some(key))
        .await
}

async fn put_admission(h: &Harness, drop: &str, body: Value) -> (u16, Value) {
    h.call(
        h.http
            .put(h.url(&format!("/v1/drops/{drop}/admission")))
            .bearer_auth(&h.ops_key)
            .json(&body),
    )
    .await
}

fn entries(v: &Value) -> Vec<Value> {
    v["entries"].as_array().expect("entries").clone()
}

#[tokio::test]
async fn admission_changes_and_closes_are_audited_with_before_and_after() {
    let h = Harness::start().await;
    let drop = h
        .create_drop(json!({
            "name": "audited", "per_fan_limit": 2, "hold_ttl_s": 60,
            "admission": {"mode": "queue", "rate_per_s": 5.0, "burst": 10, "max_active": 50},
            "inventory": {"kind": "ga", "skus": [{"sku": "TEE", "name": "Tee", "price_cents": 100, "quantity": 5}]}
        }))
        .await;
    let (status, v) = audit(&h, &drop, "", &h.ops_key).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["drop_id"], drop);
    assert!(entries(&v).is_empty(), "{v}");

    h.set_admission(&drop, json!({"paused": true})).await;
    h.set_admission(
        &drop,
        json!({"rate_per_s": 7.5, "burst": 20, "paused": true}),
    )
    .await;
    // Refused or empty changes change nothing, so they add nothing to the log.
    let (status, _) = put_admission(&h, &drop, json!({"rate_per_s": 0.0})).await;
    assert_eq!(status, 422);
    let (status, _) = put_admission(&h, &drop, json!({})).await;
    assert_eq!(status, 200);
    let (status, v) = h
        .seller_post(&format!("/v1/drops/{drop}/close"), json!({}))
        .await;
    assert_eq!(status, 200, "{v}");
    // Closing again is no change.
    let (status, _) = h
        .seller_post(&format!("/v1/drops/{drop}/close"), json!({}))
        .await;
    assert_eq!(status, 200);

    let (status, v) = audit(&h, &drop, "", &h.ops_key).await;
    assert_eq!(status, 200, "{v}");
    let got = entries(&v);
    assert_eq!(got.len(), 3, "{v}");
    // Newest first.
    assert_eq!(got[0]["action"], "close");
    assert_eq!(got[0]["key_id"], key_id(&h.seller_key));
    assert_eq!(
        got[0]["changes"],
        json!({"status": {"before": "open", "after": "closed"}})
    );
    assert_eq!(got[1]["action"], "admission");
    assert_eq!(got[1]["key_id"], key_id(&h.ops_key));
    assert_eq!(
        got[1]["changes"],
        json!({"rate_per_s": {"before": 5.0, "after": 7.5}, "burst": {"before": 10, "after": 20}})
    );
    assert_eq!(got[1]["settings"]["rate_per_s"], 7.5);
    assert_eq!(
        got[2]["changes"],
        json!({"paused": {"before": false, "after": true}})
    );
    for e in &got {
        assert!(e["at"].as_str().is_some_and(|t| t.contains('T')), "{e}");
        assert!(e["entry_id"].as_i64().is_some(), "{e}");
    }
    assert!(got[0]["entry_id"].as_i64() > got[1]["entry_id"].as_i64());
    assert!(v["next_before"].is_null(), "{v}");
    // The key's secret is never in the log.
    let text = v.to_string();
    assert!(!text.contains(&h.seller_key) && !text.contains(&h.ops_key));

    // The seller who owns the drop reads the same log.
    let (status, mine) = audit(&h, &drop, "", &h.seller_key).await;
    assert_eq!(status, 200, "{mine}");
    assert_eq!(entries(&mine), got);

    // Paged: one at a time, newest first, each page naming where the next starts.
    let (status, p1) = audit(&h, &drop, "?limit=1", &h.ops_key).await;
    assert_eq!(status, 200, "{p1}");
    assert_eq!(entries(&p1), got[..1].to_vec());
    let next = p1["next_before"].as_i64().expect("a next page");
    let (status, p2) = audit(&h, &drop, &format!("?limit=2&before={next}"), &h.ops_key).await;
    assert_eq!(status, 200, "{p2}");
    assert_eq!(entries(&p2), got[1..].to_vec());
    assert!(p2["next_before"].is_null(), "{p2}");
}

#[tokio::test]
async fn the_audit_log_is_for_its_seller_and_ops_only() {
    let h = Harness::start().await;
    let drop = h.ga_drop(5, 2, 60).await;
    h.set_admission(&drop, json!({"burst": 3})).await;
    let other =
        testkit::BookingClient::with_new_keys(h.base.clone(), &h.server.engine, "other").await;
    let (_, fan) = h.fan("audit-fan").await;

    let (status, v) = audit(&h, &drop, "", &other.seller_key).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    let (status, v) = audit(&h, &drop, "", &fan).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    let (status, v) = h.get(&format!("/v1/drops/{drop}/audit"), None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    // Another ops key reads any drop's log.
    let (status, v) = audit(&h, &drop, "", &other.ops_key).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(entries(&v).len(), 1);

    for unknown in ["d0000000000000000", "not-a-drop"] {
        let (status, v) = audit(&h, unknown, "", &h.ops_key).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (404, Some("unknown_drop")),
            "{v}"
        );
    }
    let (status, _) = h
        .call(
            h.http
                .post(h.url(&format!("/v1/drops/{drop}/audit")))
                .bearer_auth(&h.ops_key),
        )
        .await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn bad_audit_paging_is_refused() {
    let h = Harness::start().await;
    let drop = h.ga_drop(5, 2, 60).await;
    let max = engine::config::DEFAULT_AUDIT_PAGE_MAX;
    for query in [
        "?limit=0".to_owned(),
        "?limit=-1".to_owned(),
        "?limit=abc".to_owned(),
        format!("?limit={}", max + 1),
        "?before=abc".to_owned(),
        "?before=0".to_owned(),
        "?before=-5".to_owned(),
    ] {
        let (status, v) = audit(&h, &drop, &query, &h.ops_key).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (422, Some("invalid_request")),
            "{query}: {v}"
        );
    }
    let (status, v) = audit(&h, &drop, &format!("?limit={max}"), &h.ops_key).await;
    assert_eq!(status, 200, "{v}");
}

/// Changes racing each other are applied one at a time under the drop row's lock, so the log
/// is a chain: each entry's `before` is what the entry before it left. Closes racing each other
/// record one close.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_changes_each_record_what_they_changed() {
    let h = Harness::start().await;
    let drop = h.ga_drop(5, 2, 60).await;
    const CHANGES: u32 = 24;
    let tasks: Vec<_> = (1..=CHANGES)
        .map(|i| {
            let client = h.client.clone();
            let drop = drop.clone();
            tokio::spawn(async move {
                // Each burst value once; every third change also flips `paused`.
                let body = if i % 3 == 0 {
                    json!({"burst": i, "paused": i % 2 == 0})
                } else {
                    json!({"burst": i})
                };
                client.set_admission(&drop, body).await;
            })
        })
        .collect();
    let closes: Vec<_> = (0..8)
        .map(|_| {
            let client = h.client.clone();
            let drop = drop.clone();
            tokio::spawn(async move {
                let (status, v) = client
                    .seller_post(&format!("/v1/drops/{drop}/close"), json!({}))
                    .await;
                assert_eq!(status, 200, "{v}");
            })
        })
        .collect();
    for t in tasks.into_iter().chain(closes) {
        t.await.unwrap();
    }

    let (status, v) = audit(&h, &drop, "", &h.ops_key).await;
    assert_eq!(status, 200, "{v}");
    let mut got = entries(&v);
    got.reverse(); // oldest first
    let closes: Vec<_> = got.iter().filter(|e| e["action"] == "close").collect();
    assert_eq!(closes.len(), 1, "one close recorded: {v}");
    // Replay the admission entries from the drop's own settings: each `before` must be the
    // current value, and applying every `after` must end at the stored settings.
    let (status, stored) = h
        .call(
            h.http
                .get(h.url(&format!("/v1/drops/{drop}/admission")))
                .bearer_auth(&h.ops_key),
        )
        .await;
    assert_eq!(status, 200, "{stored}");
    let mut current = json!({"burst": Value::Null, "paused": Value::Null});
    let admissions: Vec<&Value> = got.iter().filter(|e| e["action"] == "admission").collect();
    assert!(!admissions.is_empty());
    for e in &admissions {
        for (field, change) in e["changes"].as_object().unwrap() {
            let known = &current[field];
            if !known.is_null() {
                assert_eq!(&change["before"], known, "{field} in {e}");
            }
            current[field] = change["after"].clone();
        }
    }
    assert_eq!(current["burst"], stored["admission"]["burst"], "{v}");
    assert_eq!(current["paused"], stored["admission"]["paused"], "{v}");
}
