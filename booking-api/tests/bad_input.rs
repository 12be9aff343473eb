//! Bad input (issue 3's acceptance): malformed JSON, wrong types, bad quantities, unknown SKUs and
//! seats, duplicates, oversized bodies, missing / forged / expired credentials, other fans' holds,
//! unknown routes, bad drop and admission settings, and rate limits. Each case gets its documented
//! status and `error.code` (docs/API.md), and each family ends by checking that the drop's counts
//! are exactly as before and that `available + held + sold == total` still holds with Postgres.
mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::Harness;
use engine::config::AdmissionConfig;
use engine::db::Scope;
use engine::ids::{DropId, FanId};
use engine::tokens::{AdmissionClaims, AdmissionKeys};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{json, Value};
use testkit::{eventually, test_config, Reply, ADMISSION_SECRET};

/// The dev identity secret of the harnesses that sign their own fan tokens.
const DEV_SECRET: &str = "known";
/// `test_config`'s admission secret.
/// `http.max_body_bytes`' default.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Sends a request with a raw `Authorization` value (so malformed ones can be sent too).
async fn send(
    h: &Harness,
    method: Method,
    path: &str,
    auth: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let mut req = h.http.request(method, h.url(path));
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_vec());
    }
    h.send(req).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A reserve with a raw body and a fresh Idempotency-Key.
async fn reserve_raw(h: &Harness, token: &str, drop: &str, body: &[u8]) -> Reply {
    let key = format!("bad-{}", uuid::Uuid::new_v4());
    send(
        h,
        Method::POST,
        &format!("/v1/drops/{drop}/holds"),
        Some(&bearer(token)),
        &[("idempotency-key", &key)],
        Some(body),
    )
    .await
}

/// Sends a body past the bound, once, and expects 413 `body_too_large`. The server reads a
/// refused body of up to `http.refused_body_drain_bytes` (1 MiB) to its end before it answers,
/// so a client still writing it reads the answer rather than a broken pipe.
async fn refused_as_too_large(
    h: &Harness,
    case: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut req = h.http.request(method, h.url(path));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let r = req
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{case}: no answer: {e:?}"));
    let status = r.status().as_u16();
    let v = r.json::<Value>().await.unwrap_or_default();
    assert_eq!(status, 413, "{case}: {v}");
    assert_eq!(v["error"]["code"], "body_too_large", "{case}: {v}");
}

#[track_caller]
fn check(case: &str, r: &Reply, status: u16, code: &str) {
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (status, Some(code)),
        "{case}: {}",
        r.body
    );
}

/// A hold the test needs as a fixture (so "unchanged" covers held counts too).
async fn hold(h: &Harness, token: &str, drop: &str, body: Value) -> String {
    let (status, v) = h.reserve(token, drop, body).await;
    assert_eq!(status, 201, "fixture hold: {v}");
    v["hold_id"].as_str().unwrap().to_owned()
}

async fn hold_state(h: &Harness, token: &str, hold: &str) -> String {
    let (status, v) = h.get(&format!("/v1/holds/{hold}"), Some(token)).await;
    assert_eq!(status, 200, "{v}");
    v["state"].as_str().unwrap().to_owned()
}

async fn seat_state(h: &Harness, drop: &str, seat: &str) -> String {
    let (status, v) = h.get(&format!("/v1/drops/{drop}/seats"), None).await;
    assert_eq!(status, 200, "{v}");
    // Seat `S-R-n` is the n-th character of row R's states in section S.
    let mut parts = seat.splitn(3, '-');
    let (section, row) = (parts.next().unwrap(), parts.next().unwrap());
    let n: usize = parts.next().unwrap().parse().unwrap();
    let states = v["sections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["section"] == section)
        .flat_map(|s| s["rows"].as_array().unwrap())
        .find(|r| r["row"] == row)
        .and_then(|r| r["states"].as_str())
        .unwrap_or_else(|| panic!("no seat {seat} in {v}"));
    match states.chars().nth(n - 1) {
        Some('f') => "free",
        Some('h') => "held",
        Some('s') => "sold",
        other => panic!("seat {seat}: {other:?} in {v}"),
    }
    .to_owned()
}

/// Ends a family: the counts are exactly as before, and the invariants hold.
async fn unchanged(h: &Harness, drop: &str, before: (i64, i64, i64, i64)) {
    assert_eq!(h.counts(drop).await, before, "counts changed for {drop}");
    h.assert_invariants(drop).await;
}

fn ga_body(per_fan_limit: u32) -> Value {
    json!({
        "name": "bad input", "per_fan_limit": per_fan_limit, "hold_ttl_s": 300,
        "admission": {"mode": "open"},
        "inventory": {"kind": "ga", "skus": [
            {"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": 10},
            {"sku": "CAP", "name": "Cap", "price_cents": 1500, "quantity": 10}
        ]}
    })
}

fn seated_body(per_fan_limit: u32) -> Value {
    json!({
        "name": "bad input seated", "per_fan_limit": per_fan_limit, "hold_ttl_s": 300,
        "admission": {"mode": "open"},
        "inventory": {"kind": "seated", "sections": [
            {"section": "A", "price_cents": 5000, "rows": [{"row": "1", "seats": 10}, {"row": "2", "seats": 10}]},
            {"section": "B", "price_cents": 3000, "rows": [{"row": "1", "seats": 5}]}
        ]}
    })
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign_fan_token(claims: &Value, secret: &str, alg: Algorithm) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn with_dev_secret() -> engine::Config {
    let mut cfg = test_config();
    cfg.identity.dev_secret = DEV_SECRET.into();
    cfg
}

// ---- bodies ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400_and_changes_nothing() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let (_, token) = h.fan("mj").await;
    let held = hold(
        &h,
        &token,
        &drop,
        json!({"items": [{"sku": "TEE", "quantity": 1}]}),
    )
    .await;
    let before = h.counts(&drop).await;

    let bodies: &[(&str, &[u8])] = &[
        ("unterminated object", b"{"),
        (
            "unterminated array",
            br#"{"items": [{"sku": "TEE", "quantity": 1}]"#,
        ),
        ("not JSON at all", b"not json"),
        ("empty body", b""),
        (
            "trailing garbage",
            br#"{"items": [{"sku": "TEE", "quantity": 1}]} x"#,
        ),
        (
            "single quotes",
            b"{'items': [{'sku': 'TEE', 'quantity': 1}]}",
        ),
        (
            "trailing comma",
            br#"{"items": [{"sku": "TEE", "quantity": 1},]}"#,
        ),
        (
            "leading zero",
            br#"{"items": [{"sku": "TEE", "quantity": 01}]}"#,
        ),
        (
            "bare NaN",
            br#"{"items": [{"sku": "TEE", "quantity": NaN}]}"#,
        ),
        (
            "invalid UTF-8",
            b"{\"items\": [{\"sku\": \"\xff\xfe\", \"quantity\": 1}]}",
        ),
        ("a form body", b"items=TEE&quantity=1"),
    ];
    for (case, body) in bodies {
        let r = reserve_raw(&h, &token, &drop, body).await;
        check(&format!("reserve, {case}"), &r, 400, "malformed_json");
    }

    let confirm = format!("/v1/holds/{held}/confirm");
    let auth = bearer(&token);
    let seller = bearer(&h.seller_key);
    let ops = bearer(&h.ops_key);
    let admission = format!("/v1/drops/{drop}/admission");
    let elsewhere: &[(&str, Method, &str, Option<&str>)] = &[
        (
            "confirm",
            Method::POST,
            confirm.as_str(),
            Some(auth.as_str()),
        ),
        (
            "create drop",
            Method::POST,
            "/v1/drops",
            Some(seller.as_str()),
        ),
        ("fan session", Method::POST, "/v1/fans/session", None),
        (
            "admission update",
            Method::PUT,
            admission.as_str(),
            Some(ops.as_str()),
        ),
    ];
    for (case, method, path, auth) in elsewhere {
        let r = send(&h, method.clone(), path, *auth, &[], Some(b"{\"x\": ")).await;
        check(case, &r, 400, "malformed_json");
    }
    assert_eq!(hold_state(&h, &token, &held).await, "held");
    let (_, drops) = h.get("/v1/drops", Some(&h.seller_key)).await;
    assert_eq!(drops["drops"].as_array().unwrap().len(), 1, "{drops}");
    unchanged(&h, &drop, before).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_missing_and_unknown_fields_are_422() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let (_, token) = h.fan("wt").await;
    let held = hold(
        &h,
        &token,
        &drop,
        json!({"items": [{"sku": "TEE", "quantity": 1}]}),
    )
    .await;
    let before = h.counts(&drop).await;

    let too_many: Vec<Value> = (0..51)
        .map(|i| json!({"sku": format!("S{i}"), "quantity": 1}))
        .collect();
    let too_many = json!({ "items": too_many }).to_string();
    let bodies: &[(&str, &str)] = &[
        ("empty object", "{}"),
        ("array", "[]"),
        ("null", "null"),
        ("string", r#""items""#),
        ("number", "42"),
        ("items a string", r#"{"items": "TEE"}"#),
        (
            "items an object",
            r#"{"items": {"sku": "TEE", "quantity": 1}}"#,
        ),
        ("items null", r#"{"items": null}"#),
        ("items empty", r#"{"items": []}"#),
        ("item a string", r#"{"items": ["TEE"]}"#),
        ("missing quantity", r#"{"items": [{"sku": "TEE"}]}"#),
        ("missing sku", r#"{"items": [{"quantity": 1}]}"#),
        ("sku a number", r#"{"items": [{"sku": 7, "quantity": 1}]}"#),
        ("sku null", r#"{"items": [{"sku": null, "quantity": 1}]}"#),
        (
            "unknown item field",
            r#"{"items": [{"sku": "TEE", "quantity": 1, "size": "M"}]}"#,
        ),
        (
            "unknown top-level field",
            r#"{"items": [{"sku": "TEE", "quantity": 1}], "coupon": "FREE"}"#,
        ),
        (
            "misspelt items",
            r#"{"item": [{"sku": "TEE", "quantity": 1}]}"#,
        ),
        (
            "items twice",
            r#"{"items": [{"sku": "TEE", "quantity": 1}], "items": [{"sku": "CAP", "quantity": 1}]}"#,
        ),
        ("51 lines", &too_many),
    ];
    for (case, body) in bodies {
        let r = reserve_raw(&h, &token, &drop, body.as_bytes()).await;
        check(&format!("reserve, {case}"), &r, 422, "invalid_request");
    }

    let long_ref = "ok_".to_owned() + &"x".repeat(126);
    let long_ref = json!({"payment": {"gateway": "test", "reference": long_ref}}).to_string();
    let confirms: &[(&str, &str)] = &[
        ("empty object", "{}"),
        ("payment a string", r#"{"payment": "ok_1"}"#),
        ("missing reference", r#"{"payment": {"gateway": "test"}}"#),
        ("missing gateway", r#"{"payment": {"reference": "ok_1"}}"#),
        (
            "unknown gateway",
            r#"{"payment": {"gateway": "stripe", "reference": "ok_1"}}"#,
        ),
        (
            "empty reference",
            r#"{"payment": {"gateway": "test", "reference": ""}}"#,
        ),
        (
            "reference with a space",
            r#"{"payment": {"gateway": "test", "reference": "ok 1"}}"#,
        ),
        ("reference of 129 characters", &long_ref),
        (
            "reference a number",
            r#"{"payment": {"gateway": "test", "reference": 1}}"#,
        ),
        (
            "unknown field",
            r#"{"payment": {"gateway": "test", "reference": "ok_1", "tip": 5}}"#,
        ),
    ];
    for (case, body) in confirms {
        let r = send(
            &h,
            Method::POST,
            &format!("/v1/holds/{held}/confirm"),
            Some(&bearer(&token)),
            &[],
            Some(body.as_bytes()),
        )
        .await;
        check(&format!("confirm, {case}"), &r, 422, "invalid_request");
    }
    assert_eq!(hold_state(&h, &token, &held).await, "held");

    let long_fan = json!({ "fan": "f".repeat(65) }).to_string();
    let sessions: &[(&str, &str)] = &[
        ("empty object", "{}"),
        ("empty name", r#"{"fan": ""}"#),
        ("a colon", r#"{"fan": "a:b"}"#),
        ("a space", r#"{"fan": "a b"}"#),
        ("a brace", r#"{"fan": "{x}"}"#),
        ("65 characters", &long_fan),
        ("a number", r#"{"fan": 5}"#),
        ("unknown field", r#"{"fan": "x", "admin": true}"#),
    ];
    for (case, body) in sessions {
        let r = send(
            &h,
            Method::POST,
            "/v1/fans/session",
            None,
            &[],
            Some(body.as_bytes()),
        )
        .await;
        check(&format!("fan session, {case}"), &r, 422, "invalid_request");
    }
    unchanged(&h, &drop, before).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_quantities_are_refused_and_take_nothing() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let seated = h.create_drop(seated_body(4)).await;
    let (_, token) = h.fan("qty").await;
    hold(
        &h,
        &token,
        &drop,
        json!({"items": [{"sku": "TEE", "quantity": 1}]}),
    )
    .await;
    let before = h.counts(&drop).await;
    let before_seated = h.counts(&seated).await;

    let invalid = [
        ("zero", "0"),
        ("negative", "-1"),
        ("i64::MIN", "-9223372036854775808"),
        ("fraction", "1.5"),
        ("exponent", "1e3"),
        ("string", r#""2""#),
        ("null", "null"),
        ("bool", "true"),
        ("array", "[1]"),
        ("beyond i64", "100000000000000000000"),
    ];
    let over_limit = [
        ("limit + 1", "5"),
        ("10^12", "1000000000000"),
        ("2^32 + 1 (wraps to 1 as u32)", "4294967297"),
        ("i64::MAX", "9223372036854775807"),
    ];
    for (case, q) in invalid {
        let body = format!(r#"{{"items": [{{"sku": "TEE", "quantity": {q}}}]}}"#);
        let r = reserve_raw(&h, &token, &drop, body.as_bytes()).await;
        check(&format!("items, {case}"), &r, 422, "invalid_request");
        let body = format!(r#"{{"best_available": {{"section": "A", "quantity": {q}}}}}"#);
        let r = reserve_raw(&h, &token, &seated, body.as_bytes()).await;
        check(
            &format!("best_available, {case}"),
            &r,
            422,
            "invalid_request",
        );
    }
    for (case, q) in over_limit {
        let body = format!(r#"{{"items": [{{"sku": "TEE", "quantity": {q}}}]}}"#);
        let r = reserve_raw(&h, &token, &drop, body.as_bytes()).await;
        check(&format!("items, {case}"), &r, 422, "limit_exceeded");
        let body = format!(r#"{{"best_available": {{"section": "A", "quantity": {q}}}}}"#);
        let r = reserve_raw(&h, &token, &seated, body.as_bytes()).await;
        check(
            &format!("best_available, {case}"),
            &r,
            422,
            "limit_exceeded",
        );
    }
    let r = reserve_raw(
        &h,
        &token,
        &drop,
        br#"{"items": [{"sku": "TEE", "quantity": 3}, {"sku": "CAP", "quantity": 2}]}"#,
    )
    .await;
    check(
        "two lines summing past the limit",
        &r,
        422,
        "limit_exceeded",
    );
    let r = reserve_raw(
        &h,
        &token,
        &seated,
        br#"{"seats": ["A-1-1", "A-1-2", "A-1-3", "A-1-4", "A-1-5"]}"#,
    )
    .await;
    check("five named seats, limit 4", &r, 422, "limit_exceeded");
    // Within the limit on its own, past it with the fan's live hold: refused by reserve.lua.
    let r = reserve_raw(
        &h,
        &token,
        &drop,
        br#"{"items": [{"sku": "CAP", "quantity": 4}]}"#,
    )
    .await;
    check("4 more while holding 1", &r, 422, "limit_exceeded");
    assert_eq!(r.body["error"]["detail"]["per_fan_limit"], 4, "{}", r.body);

    unchanged(&h, &drop, before).await;
    unchanged(&h, &seated, before_seated).await;
    // The refusals took nothing from the fan's allowance either: exactly 3 more fit.
    let (status, v) = h
        .reserve(
            &token,
            &drop,
            json!({"items": [{"sku": "CAP", "quantity": 3}]}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = h
        .reserve(
            &token,
            &drop,
            json!({"items": [{"sku": "CAP", "quantity": 1}]}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("limit_exceeded"))
    );
    assert_eq!(h.counts(&drop).await, (20, 16, 4, 0));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_skus_seats_and_sections_are_404() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let seated = h.create_drop(seated_body(4)).await;
    let (_, token) = h.fan("unk").await;
    hold(
        &h,
        &token,
        &drop,
        json!({"items": [{"sku": "TEE", "quantity": 1}]}),
    )
    .await;
    hold(&h, &token, &seated, json!({"seats": ["B-1-1"]})).await;
    let before = h.counts(&drop).await;
    let before_seated = h.counts(&seated).await;

    for sku in ["HAT", "tee", "TEE ", "", "{TEE}", "TEE\u{0}"] {
        let body = json!({"items": [{"sku": sku, "quantity": 1}]}).to_string();
        let r = reserve_raw(&h, &token, &drop, body.as_bytes()).await;
        check(&format!("sku {sku:?}"), &r, 404, "unknown_sku");
    }
    let r = reserve_raw(
        &h,
        &token,
        &drop,
        br#"{"items": [{"sku": "TEE", "quantity": 1}, {"sku": "HAT", "quantity": 1}]}"#,
    )
    .await;
    check("a known and an unknown sku", &r, 404, "unknown_sku");

    let seats = [
        "Z-1-1",
        "A-3-1",
        "A-1-11",
        "B-1-6",
        "a-1-1", // well-formed, not in this drop
        "A-1-0",
        "A-1-07",
        "A-1-+1",
        "A-1--1",
        "A-1",
        "A-1-1-1",
        "A11",
        "",
        "A-1-1 ",
        " A-1-1",
        "A-1-4294967297",
        "A:1:1",
        "{A}-1-1",
    ];
    for seat in seats {
        let body = json!({ "seats": [seat] }).to_string();
        let r = reserve_raw(&h, &token, &seated, body.as_bytes()).await;
        check(&format!("seat {seat:?}"), &r, 404, "unknown_seat");
    }
    let r = reserve_raw(&h, &token, &seated, br#"{"seats": ["A-1-1", "Z-1-1"]}"#).await;
    check("a known and an unknown seat", &r, 404, "unknown_seat");
    assert_eq!(seat_state(&h, &seated, "A-1-1").await, "free");

    for section in ["Z", "a", "", "A-1"] {
        let body = json!({"best_available": {"section": section, "quantity": 1}}).to_string();
        let r = reserve_raw(&h, &token, &seated, body.as_bytes()).await;
        check(&format!("section {section:?}"), &r, 404, "unknown_section");
    }
    unchanged(&h, &drop, before).await;
    unchanged(&h, &seated, before_seated).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_mixed_requests_are_422() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let seated = h.create_drop(seated_body(4)).await;
    let (_, token) = h.fan("dup").await;
    hold(
        &h,
        &token,
        &drop,
        json!({"items": [{"sku": "CAP", "quantity": 1}]}),
    )
    .await;
    hold(&h, &token, &seated, json!({"seats": ["B-1-1"]})).await;
    let before = h.counts(&drop).await;
    let before_seated = h.counts(&seated).await;

    let ga_cases: &[(&str, &str)] = &[
        (
            "duplicate sku",
            r#"{"items": [{"sku": "TEE", "quantity": 1}, {"sku": "TEE", "quantity": 1}]}"#,
        ),
        (
            "items and seats",
            r#"{"items": [{"sku": "TEE", "quantity": 1}], "seats": ["A-1-1"]}"#,
        ),
        (
            "items and best_available",
            r#"{"items": [{"sku": "TEE", "quantity": 1}], "best_available": {"section": "A", "quantity": 1}}"#,
        ),
        ("seats on a GA drop", r#"{"seats": ["A-1-1"]}"#),
        (
            "best_available on a GA drop",
            r#"{"best_available": {"section": "A", "quantity": 1}}"#,
        ),
    ];
    for (case, body) in ga_cases {
        let r = reserve_raw(&h, &token, &drop, body.as_bytes()).await;
        check(case, &r, 422, "invalid_request");
    }
    let seated_cases: &[(&str, &str)] = &[
        ("duplicate seat", r#"{"seats": ["A-1-1", "A-1-1"]}"#),
        (
            "duplicate seat, apart",
            r#"{"seats": ["A-1-1", "A-1-2", "A-1-1"]}"#,
        ),
        (
            "items and seats",
            r#"{"items": [{"sku": "A", "quantity": 1}], "seats": ["A-1-1"]}"#,
        ),
        (
            "seats and best_available",
            r#"{"seats": ["A-1-1"], "best_available": {"section": "A", "quantity": 1}}"#,
        ),
        (
            "all three",
            r#"{"items": [{"sku": "A", "quantity": 1}], "seats": ["A-1-1"], "best_available": {"section": "A", "quantity": 1}}"#,
        ),
        (
            "items on a seated drop",
            r#"{"items": [{"sku": "A", "quantity": 1}]}"#,
        ),
        ("no seats", r#"{"seats": []}"#),
        ("a seat that is not a string", r#"{"seats": [7]}"#),
    ];
    for (case, body) in seated_cases {
        let r = reserve_raw(&h, &token, &seated, body.as_bytes()).await;
        check(case, &r, 422, "invalid_request");
    }
    assert_eq!(seat_state(&h, &seated, "A-1-1").await, "free");
    let r = send(
        &h,
        Method::GET,
        &format!("/v1/drops/{drop}/seats"),
        None,
        &[],
        None,
    )
    .await;
    check("seat map of a GA drop", &r, 422, "invalid_request");
    unchanged(&h, &drop, before).await;
    unchanged(&h, &seated, before_seated).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_64_kib_are_413() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let (_, token) = h.fan("big").await;
    let held = hold(
        &h,
        &token,
        &drop,
        json!({"items": [{"sku": "TEE", "quantity": 1}]}),
    )
    .await;
    let before = h.counts(&drop).await;

    // A reserve body of exactly `len` bytes: one line whose SKU is a long string.
    let sized = |len: usize| {
        let (head, tail) = (r#"{"items": [{"sku": ""#, r#"", "quantity": 1}]}"#);
        let body = format!("{head}{}{tail}", "X".repeat(len - head.len() - tail.len()));
        assert_eq!(body.len(), len);
        body
    };
    let r = reserve_raw(&h, &token, &drop, sized(MAX_BODY_BYTES).as_bytes()).await;
    check("exactly 64 KiB is read", &r, 404, "unknown_sku");
    let reserve = format!("/v1/drops/{drop}/holds");
    let auth = bearer(&token);
    for (case, len) in [("64 KiB + 1", MAX_BODY_BYTES + 1), ("1 MiB", 1 << 20)] {
        let key = format!("bad-{}", uuid::Uuid::new_v4());
        let headers = [("authorization", auth.as_str()), ("idempotency-key", &key)];
        let body = sized(len);
        refused_as_too_large(&h, case, Method::POST, &reserve, &headers, body.as_bytes()).await;
    }

    let big = "X".repeat(70 * 1024);
    let seller = bearer(&h.seller_key);
    let ops = bearer(&h.ops_key);
    let confirm = format!("/v1/holds/{held}/confirm");
    let admission = format!("/v1/drops/{drop}/admission");
    let confirm_body = json!({"payment": {"gateway": "test", "reference": big}}).to_string();
    let mut drop_body = ga_body(4);
    drop_body["name"] = json!(big);
    let drop_body = drop_body.to_string();
    let session_body = json!({ "fan": big }).to_string();
    let admission_body = json!({ "rate_per_s": 1, "pad": big }).to_string();
    let cases: &[(&str, Method, &str, Option<&str>, &str)] = &[
        (
            "confirm",
            Method::POST,
            confirm.as_str(),
            Some(auth.as_str()),
            confirm_body.as_str(),
        ),
        (
            "create drop",
            Method::POST,
            "/v1/drops",
            Some(seller.as_str()),
            drop_body.as_str(),
        ),
        (
            "fan session",
            Method::POST,
            "/v1/fans/session",
            None,
            session_body.as_str(),
        ),
        (
            "admission update",
            Method::PUT,
            admission.as_str(),
            Some(ops.as_str()),
            admission_body.as_str(),
        ),
    ];
    for (case, method, path, auth, body) in cases {
        let extra: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        refused_as_too_large(&h, case, method.clone(), path, &extra, body.as_bytes()).await;
    }
    assert_eq!(hold_state(&h, &token, &held).await, "held");
    let (_, drops) = h.get("/v1/drops", Some(&h.seller_key)).await;
    assert_eq!(drops["drops"].as_array().unwrap().len(), 1, "{drops}");
    unchanged(&h, &drop, before).await;
    h.server.shutdown().await;
}

/// A request body sent in `pieces` frames of `piece` bytes, with its length declared up front
/// (`Content-Length`) or not (chunked), as an upload in flight is.
struct Upload {
    piece: bytes::Bytes,
    pieces: usize,
    declared: bool,
}

impl hyper::body::Body for Upload {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.pieces == 0 {
            return std::task::Poll::Ready(None);
        }
        self.pieces -= 1;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(self.piece.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.pieces == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.declared {
            hyper::body::SizeHint::with_exact((self.piece.len() * self.pieces) as u64)
        } else {
            hyper::body::SizeHint::default()
        }
    }
}

/// Sends `body` as a reserve on a fresh connection with hyper's client (reqwest's own) and
/// answers the status and JSON, or the error the client met.
async fn upload(
    h: &Harness,
    token: &str,
    drop: &str,
    body: Upload,
) -> Result<(u16, Value), String> {
    let stream = tokio::net::TcpStream::connect(h.server.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::post(format!("/v1/drops/{drop}/holds"))
        .header("host", h.server.addr.to_string())
        .header("authorization", bearer(token))
        .header("idempotency-key", format!("bad-{}", uuid::Uuid::new_v4()))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| hyper::body::Body::poll_frame(std::pin::Pin::new(&mut body), cx))
            .await
    {
        let frame = frame.map_err(|e| format!("reading the answer: {e:?}"))?;
        if let Some(d) = frame.data_ref() {
            bytes.extend_from_slice(d);
        }
    }
    Ok((status, serde_json::from_slice(&bytes).unwrap_or_default()))
}

/// A refused upload reads its 413, never a broken pipe or a reset: 1 MiB bodies whose length is
/// declared (refused from `Content-Length`, before anything is read) and chunked ones (refused
/// past 64 KiB while reading), each sent once, 20 times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_reads_its_413() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let (_, token) = h.fan("uploader").await;
    let before = h.counts(&drop).await;
    for round in 0..20 {
        for declared in [true, false] {
            let body = Upload {
                piece: bytes::Bytes::from(vec![b' '; 16 * 1024]),
                pieces: 64,
                declared,
            };
            let case = format!("round {round}, 1 MiB, declared: {declared}");
            let (status, v) = upload(&h, &token, &drop, body)
                .await
                .unwrap_or_else(|e| panic!("{case}: no answer: {e}"));
            assert_eq!(status, 413, "{case}: {v}");
            assert_eq!(v["error"]["code"], "body_too_large", "{case}: {v}");
        }
    }
    unchanged(&h, &drop, before).await;
    h.server.shutdown().await;
}

// ---- credentials -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_tokens_missing_forged_or_expired_are_401() {
    let h = Harness::with_config(with_dev_secret()).await;
    let drop = h.create_drop(ga_body(4)).await;
    let (fan, token) = h.fan("alice").await;
    let held = hold(
        &h,
        &token,
        &drop,
        json!({"items": [{"sku": "TEE", "quantity": 1}]}),
    )
    .await;
    let before = h.counts(&drop).await;

    // Control: a token signed here with the dev secret is accepted, so the refusals below are
    // about the one thing each case gets wrong.
    let now = now_s();
    let good = sign_fan_token(
        &json!({"sub": fan, "exp": now + 3600}),
        DEV_SECRET,
        Algorithm::HS256,
    );
    assert_eq!(hold_state(&h, &good, &held).await, "held");

    let forged = sign_fan_token(
        &json!({"sub": fan, "exp": now + 3600}),
        "not-the-secret",
        Algorithm::HS256,
    );
    let expired = sign_fan_token(
        &json!({"sub": fan, "exp": now - 3600, "iat": now - 7200}),
        DEV_SECRET,
        Algorithm::HS256,
    );
    let no_exp = sign_fan_token(&json!({ "sub": fan }), DEV_SECRET, Algorithm::HS256);
    let bad_sub = sign_fan_token(
        &json!({"sub": "a:b", "exp": now + 3600}),
        DEV_SECRET,
        Algorithm::HS256,
    );
    let hs512 = sign_fan_token(
        &json!({"sub": fan, "exp": now + 3600}),
        DEV_SECRET,
        Algorithm::HS512,
    );
    // {"alg":"none","typ":"JWT"} . {"sub":"mallory","exp":4102444800} . (no signature)
    let alg_none =
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo0MTAyNDQ0ODAwfQ."
            .to_owned();
    // The fan's own signature over someone else's claims.
    let parts: Vec<&str> = token.split('.').collect();
    let swapped = format!(
        "{}.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo0MTAyNDQ0ODAwfQ.{}",
        parts[0], parts[2]
    );
    let auths: Vec<(&str, Option<String>)> = vec![
        ("no Authorization", None),
        ("Basic auth", Some("Basic YWxpY2U6cGFzcw==".into())),
        ("empty bearer", Some("Bearer ".into())),
        ("token without scheme", Some(token.clone())),
        ("garbage", Some(bearer("garbage"))),
        ("three dots", Some(bearer("a.b.c"))),
        ("forged: another secret", Some(bearer(&forged))),
        ("forged: alg none", Some(bearer(&alg_none))),
        ("forged: swapped claims", Some(bearer(&swapped))),
        ("expired", Some(bearer(&expired))),
        ("no exp claim", Some(bearer(&no_exp))),
        ("invalid fan id", Some(bearer(&bad_sub))),
        ("HS512", Some(bearer(&hs512))),
        ("a seller key", Some(bearer(&h.seller_key))),
        ("an ops key", Some(bearer(&h.ops_key))),
    ];
    let reserve_body = br#"{"items": [{"sku": "TEE", "quantity": 1}]}"# as &[u8];
    let confirm_body = br#"{"payment": {"gateway": "test", "reference": "ok_1"}}"# as &[u8];
    let holds_path = format!("/v1/drops/{drop}/holds");
    let hold_path = format!("/v1/holds/{held}");
    let confirm_path = format!("/v1/holds/{held}/confirm");
    let endpoints: &[(&str, Method, &str, Option<&[u8]>)] = &[
        (
            "reserve",
            Method::POST,
            holds_path.as_str(),
            Some(reserve_body),
        ),
        ("read hold", Method::GET, hold_path.as_str(), None),
        ("release", Method::DELETE, hold_path.as_str(), None),
        (
            "confirm",
            Method::POST,
            confirm_path.as_str(),
            Some(confirm_body),
        ),
        ("my holds", Method::GET, "/v1/fans/me/holds", None),
        ("my orders", Method::GET, "/v1/fans/me/orders", None),
    ];
    for (case, auth) in &auths {
        for (endpoint, method, path, body) in endpoints {
            let r = send(
                &h,
                method.clone(),
                path,
                auth.as_deref(),
                &[("idempotency-key", &format!("k-{}", uuid::Uuid::new_v4()))],
                *body,
            )
            .await;
            check(&format!("{endpoint}, {case}"), &r, 401, "unauthorized");
        }
    }
    assert_eq!(hold_state(&h, &token, &held).await, "held");
    unchanged(&h, &drop, before).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_missing_forged_or_out_of_scope_are_refused() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let (_, fan_token) = h.fan("keys").await;
    hold(
        &h,
        &fan_token,
        &drop,
        json!({"items": [{"sku": "TEE", "quantity": 1}]}),
    )
    .await;
    let before = h.counts(&drop).await;
    let other_seller = h
        .server
        .engine
        .db()
        .create_key(Scope::Seller, "another seller")
        .await
        .unwrap();
    let mut altered = h.seller_key.clone();
    let last = altered.pop().unwrap();
    altered.push(if last == '0' { '1' } else { '0' });
    let (key_id, _) = h
        .seller_key
        .strip_prefix("fgk_")
        .unwrap()
        .split_once('_')
        .unwrap();
    let other_secret = other_seller.rsplit('_').next().unwrap();
    let mixed = format!("fgk_{key_id}_{other_secret}");

    let unauthorized: Vec<(&str, Option<String>)> = vec![
        ("no Authorization", None),
        ("a fan token", Some(bearer(&fan_token))),
        ("an unknown key", Some(bearer("fgk_000000000000_deadbeef"))),
        ("a key with one character changed", Some(bearer(&altered))),
        ("a key id with another key's secret", Some(bearer(&mixed))),
        ("a bare prefix", Some(bearer("fgk_"))),
        ("the key without Bearer", Some(h.seller_key.clone())),
    ];
    let create = ga_body(4).to_string();
    for (case, auth) in &unauthorized {
        let r = send(
            &h,
            Method::POST,
            "/v1/drops",
            auth.as_deref(),
            &[],
            Some(create.as_bytes()),
        )
        .await;
        check(&format!("create drop, {case}"), &r, 401, "unauthorized");
        let r = send(&h, Method::GET, "/v1/drops", auth.as_deref(), &[], None).await;
        check(&format!("list drops, {case}"), &r, 401, "unauthorized");
        let r = send(
            &h,
            Method::POST,
            &format!("/v1/drops/{drop}/close"),
            auth.as_deref(),
            &[],
            None,
        )
        .await;
        check(&format!("close drop, {case}"), &r, 401, "unauthorized");
        let r = send(
            &h,
            Method::PUT,
            &format!("/v1/drops/{drop}/admission"),
            auth.as_deref(),
            &[],
            Some(br#"{"paused": true}"#),
        )
        .await;
        check(
            &format!("admission update, {case}"),
            &r,
            401,
            "unauthorized",
        );
    }

    let ops = bearer(&h.ops_key);
    let seller = bearer(&h.seller_key);
    let other = bearer(&other_seller);
    let r = send(
        &h,
        Method::POST,
        "/v1/drops",
        Some(&ops),
        &[],
        Some(create.as_bytes()),
    )
    .await;
    check("create drop with the ops key", &r, 403, "forbidden");
    let r = send(&h, Method::GET, "/v1/drops", Some(&ops), &[], None).await;
    check("list drops with the ops key", &r, 403, "forbidden");
    let close = format!("/v1/drops/{drop}/close");
    let r = send(&h, Method::POST, &close, Some(&ops), &[], None).await;
    check("close with the ops key", &r, 403, "forbidden");
    let r = send(&h, Method::POST, &close, Some(&other), &[], None).await;
    check("close another seller's drop", &r, 403, "forbidden");
    let admission = format!("/v1/drops/{drop}/admission");
    let r = send(
        &h,
        Method::PUT,
        &admission,
        Some(&seller),
        &[],
        Some(br#"{"paused": true}"#),
    )
    .await;
    check("admission update with a seller key", &r, 403, "forbidden");
    let r = send(&h, Method::GET, &admission, Some(&seller), &[], None).await;
    check("admission read with a seller key", &r, 403, "forbidden");
    let order = format!("/v1/orders/{}", uuid::Uuid::new_v4());
    let r = send(&h, Method::GET, &order, Some(&ops), &[], None).await;
    check("order read with the ops key", &r, 403, "forbidden");

    let (_, drops) = h.get("/v1/drops", Some(&h.seller_key)).await;
    assert_eq!(drops["drops"].as_array().unwrap().len(), 1, "{drops}");
    let (_, drops) = h.get("/v1/drops", Some(&other_seller)).await;
    assert_eq!(drops["drops"].as_array().unwrap().len(), 0, "{drops}");
    assert_eq!(h.drop_view(&drop).await["status"], "open");
    let (_, settings) = h.get(&admission, Some(&h.ops_key)).await;
    assert_eq!(settings["admission"]["paused"], false, "{settings}");
    unchanged(&h, &drop, before).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_drops_refuse_missing_or_bad_admission_tokens_with_403() {
    let h = Harness::start().await;
    let mut body = ga_body(4);
    body["admission"] = json!({"mode": "queue"});
    let drop = h.create_drop(body).await;
    let (fan, token) = h.fan("queued").await;
    let before = h.counts(&drop).await;

    let keys = |secret: &str| {
        AdmissionKeys::new(&AdmissionConfig {
            secrets: vec![secret.to_owned()],
            token_ttl_s: 60,
        })
    };
    let ours = keys(ADMISSION_SECRET);
    let drop_id = DropId::parse(&drop).unwrap();
    let fan_id = FanId::parse(&fan).unwrap();
    let (valid, _) = ours.issue(&drop_id, &fan_id, 1, None);
    let (forged, _) = keys("another-secret").issue(&drop_id, &fan_id, 1, None);
    let (other_fan, _) = ours.issue(&drop_id, &FanId::parse("someone-else").unwrap(), 1, None);
    let (other_drop, _) = ours.issue(&DropId::generate(), &fan_id, 1, None);
    let expired = ours.sign(&AdmissionClaims {
        drop: drop.clone(),
        fan: fan.clone(),
        place: 1,
        iat: now_s() - 120,
        exp: now_s() - 60,
        jti: "x".into(),
        ..Default::default()
    });
    let truncated = valid[..valid.len() - 2].to_owned();
    let cases: &[(&str, Option<&str>)] = &[
        ("no token", None),
        ("garbage", Some("garbage")),
        ("truncated", Some(truncated.as_str())),
        ("signed with another secret", Some(forged.as_str())),
        ("issued to another fan", Some(other_fan.as_str())),
        ("issued for another drop", Some(other_drop.as_str())),
        ("expired", Some(expired.as_str())),
    ];
    let reserve = br#"{"items": [{"sku": "TEE", "quantity": 1}]}"# as &[u8];
    for (case, admission) in cases {
        let key = format!("k-{}", uuid::Uuid::new_v4());
        let mut headers = vec![("idempotency-key", key.as_str())];
        if let Some(t) = admission {
            headers.push(("x-admission-token", t));
        }
        let r = send(
            &h,
            Method::POST,
            &format!("/v1/drops/{drop}/holds"),
            Some(&bearer(&token)),
            &headers,
            Some(reserve),
        )
        .await;
        check(case, &r, 403, "not_admitted");
    }
    unchanged(&h, &drop, before).await;
    // Control: the same request with a valid token, for a fan whose session is live, is served.
    h.admit(&drop, &fan).await;
    let r = send(
        &h,
        Method::POST,
        &format!("/v1/drops/{drop}/holds"),
        Some(&bearer(&token)),
        &[
            ("idempotency-key", "k-valid"),
            ("x-admission-token", &valid),
        ],
        Some(reserve),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

// ---- ids, other fans, routes -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_ids_are_404() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let (_, token) = h.fan("ids").await;
    hold(
        &h,
        &token,
        &drop,
        json!({"items": [{"sku": "TEE", "quantity": 1}]}),
    )
    .await;
    let before = h.counts(&drop).await;
    let auth = bearer(&token);
    let seller = bearer(&h.seller_key);
    let ops = bearer(&h.ops_key);
    let reserve = br#"{"items": [{"sku": "TEE", "quantity": 1}]}"# as &[u8];
    let idem = [("idempotency-key", "k-ids")];

    let unknown = DropId::generate().to_string();
    let bad_drops = [
        unknown.as_str(),
        "nope",
        "d0123456789ABCDEF",
        "d0123456789abcde",
        "d0123456789abcdef0",
        "x0123456789abcdef",
        "d0123456789abcdeg",
    ];
    for id in bad_drops {
        for (case, method, path, auth, body) in [
            ("drop", Method::GET, format!("/v1/drops/{id}"), None, None),
            (
                "seats",
                Method::GET,
                format!("/v1/drops/{id}/seats"),
                None,
                None,
            ),
            (
                "reserve",
                Method::POST,
                format!("/v1/drops/{id}/holds"),
                Some(&auth),
                Some(reserve),
            ),
            (
                "close",
                Method::POST,
                format!("/v1/drops/{id}/close"),
                Some(&seller),
                None,
            ),
            (
                "admission read",
                Method::GET,
                format!("/v1/drops/{id}/admission"),
                Some(&ops),
                None,
            ),
            (
                "admission update",
                Method::PUT,
                format!("/v1/drops/{id}/admission"),
                Some(&ops),
                Some(br#"{"paused": true}"# as &[u8]),
            ),
        ] {
            let r = send(&h, method, &path, auth.map(String::as_str), &idem, body).await;
            check(&format!("{case} of {id:?}"), &r, 404, "unknown_drop");
        }
    }
    let r = send(
        &h,
        Method::GET,
        "/v1/fans/me/holds?drop_id=nope",
        Some(&auth),
        &[],
        None,
    )
    .await;
    check("my holds in a malformed drop", &r, 404, "unknown_drop");
    let r = send(
        &h,
        Method::GET,
        "/v1/fans/me/orders?drop_id=nope",
        Some(&auth),
        &[],
        None,
    )
    .await;
    check("my orders in a malformed drop", &r, 404, "unknown_drop");

    let absent = format!("{drop}-h0123456789abcdef");
    let of_unknown_drop = format!("{unknown}-h0123456789abcdef");
    let bad_holds = [
        absent.as_str(),
        of_unknown_drop.as_str(),
        "nope",
        drop.as_str(),
        "d0123456789abcdef-h0123",
        "d0123456789abcdef-hxyz3456789abcdef",
        "d0123456789abcdef_h0123456789abcdef",
    ];
    let confirm = br#"{"payment": {"gateway": "test", "reference": "ok_1"}}"# as &[u8];
    for id in bad_holds {
        for (case, method, path, body) in [
            ("read", Method::GET, format!("/v1/holds/{id}"), None),
            ("release", Method::DELETE, format!("/v1/holds/{id}"), None),
            (
                "confirm",
                Method::POST,
                format!("/v1/holds/{id}/confirm"),
                Some(confirm),
            ),
        ] {
            let r = send(&h, method, &path, Some(&auth), &[], body).await;
            check(&format!("{case} hold {id:?}"), &r, 404, "unknown_hold");
        }
    }
    for id in [uuid::Uuid::new_v4().to_string(), "nope".into(), "1".into()] {
        let r = send(
            &h,
            Method::GET,
            &format!("/v1/orders/{id}"),
            Some(&auth),
            &[],
            None,
        )
        .await;
        check(&format!("order {id:?} as a fan"), &r, 404, "unknown_order");
        let r = send(
            &h,
            Method::GET,
            &format!("/v1/orders/{id}"),
            Some(&seller),
            &[],
            None,
        )
        .await;
        check(
            &format!("order {id:?} as the seller"),
            &r,
            404,
            "unknown_order",
        );
    }
    unchanged(&h, &drop, before).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_fans_hold_and_order_answer_404() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let (_, alice) = h.fan("alice").await;
    let (_, bob) = h.fan("bob").await;
    let held = hold(
        &h,
        &alice,
        &drop,
        json!({"items": [{"sku": "TEE", "quantity": 2}]}),
    )
    .await;
    let paid = hold(
        &h,
        &alice,
        &drop,
        json!({"items": [{"sku": "CAP", "quantity": 1}]}),
    )
    .await;
    let (status, order) = h.confirm(&alice, &paid, "ok_alice").await;
    assert_eq!(status, 201, "{order}");
    let order_id = order["order_id"].as_str().unwrap().to_owned();
    let before = h.counts(&drop).await;
    assert_eq!(before, (20, 17, 2, 1));

    let auth = bearer(&bob);
    let confirm = br#"{"payment": {"gateway": "test", "reference": "ok_bob"}}"# as &[u8];
    for hold in [&held, &paid] {
        let r = send(
            &h,
            Method::GET,
            &format!("/v1/holds/{hold}"),
            Some(&auth),
            &[],
            None,
        )
        .await;
        check("bob reads alice's hold", &r, 404, "unknown_hold");
        let r = send(
            &h,
            Method::DELETE,
            &format!("/v1/holds/{hold}"),
            Some(&auth),
            &[],
            None,
        )
        .await;
        check("bob releases alice's hold", &r, 404, "unknown_hold");
        let r = send(
            &h,
            Method::POST,
            &format!("/v1/holds/{hold}/confirm"),
            Some(&auth),
            &[],
            Some(confirm),
        )
        .await;
        check("bob pays for alice's hold", &r, 404, "unknown_hold");
    }
    let r = send(
        &h,
        Method::GET,
        &format!("/v1/orders/{order_id}"),
        Some(&auth),
        &[],
        None,
    )
    .await;
    check("bob reads alice's order", &r, 404, "unknown_order");
    let (status, mine) = h
        .get(&format!("/v1/fans/me/holds?drop_id={drop}"), Some(&bob))
        .await;
    assert_eq!(
        (status, mine["holds"].as_array().unwrap().len()),
        (200, 0),
        "{mine}"
    );
    let (status, mine) = h.get("/v1/fans/me/orders", Some(&bob)).await;
    assert_eq!(
        (status, mine["orders"].as_array().unwrap().len()),
        (200, 0),
        "{mine}"
    );

    assert_eq!(hold_state(&h, &alice, &held).await, "held");
    let (status, o) = h.get(&format!("/v1/orders/{order_id}"), Some(&alice)).await;
    assert_eq!(status, 200, "{o}");
    unchanged(&h, &drop, before).await;
    h.server.shutdown().await;
}

/// Another fan's confirm must not join the owner's confirm while it is in flight (it would be
/// handed the owner's result). A `slow_` payment keeps the owner's confirm in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_fan_cannot_join_a_confirm_in_flight() {
    let mut cfg = test_config();
    cfg.gateway.timeout_ms = 2_000;
    cfg.gateway.test_slow_ms = 2_000;
    // An authorization must end before the confirm deadline (Config::validate).
    cfg.holds.confirm_safety_margin_ms = 2_500;
    let h = Harness::with_config(cfg).await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, alice) = h.fan("alice").await;
    let (_, bob) = h.fan("bob").await;
    let held = hold(
        &h,
        &alice,
        &drop,
        json!({"items": [{"sku": "TEE", "quantity": 1}]}),
    )
    .await;
    let before = h.counts(&drop).await;

    let bob_tries = async {
        // Once alice's confirm has begun, the slow payment keeps it in flight for 2 s.
        eventually("alice's confirm is in flight", || async {
            hold_state(&h, &alice, &held).await == "confirming"
        })
        .await;
        let auth = bearer(&bob);
        let path = format!("/v1/holds/{held}/confirm");
        let hold_path = format!("/v1/holds/{held}");
        let same = br#"{"payment": {"gateway": "test", "reference": "slow_1"}}"# as &[u8];
        let other = br#"{"payment": {"gateway": "test", "reference": "ok_2"}}"# as &[u8];
        tokio::join!(
            send(&h, Method::POST, &path, Some(&auth), &[], Some(same)),
            send(&h, Method::POST, &path, Some(&auth), &[], Some(other)),
            send(&h, Method::GET, &hold_path, Some(&auth), &[], None),
            send(&h, Method::DELETE, &hold_path, Some(&auth), &[], None),
        )
    };
    let ((status, v), (same, other, read, release)) =
        tokio::join!(h.confirm(&alice, &held, "slow_1"), bob_tries);
    check(
        "bob confirms with alice's reference",
        &same,
        404,
        "unknown_hold",
    );
    check(
        "bob confirms with another reference",
        &other,
        404,
        "unknown_hold",
    );
    check("bob reads the confirming hold", &read, 404, "unknown_hold");
    check(
        "bob releases the confirming hold",
        &release,
        404,
        "unknown_hold",
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("payment_pending")),
        "{v}"
    );
    assert_eq!(h.counts(&drop).await, before);
    // The reconciler settles alice's payment; bob changed nothing.
    let (hr, dr) = (&h, &drop);
    eventually(
        "the reconciler sells alice's slow payment",
        move || async move { hr.counts(dr).await == (10, 9, 0, 1) },
    )
    .await;
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let (_, token) = h.fan("routes").await;
    let held = hold(
        &h,
        &token,
        &drop,
        json!({"items": [{"sku": "TEE", "quantity": 1}]}),
    )
    .await;
    let before = h.counts(&drop).await;
    let auth = bearer(&token);

    for path in [
        "/v1/nope",
        "/v2/drops",
        "/v1",
        "/v1/drops/x/y/z",
        "/static/nope.js",
        "/v1/holds/x/confirm/again",
    ] {
        let r = send(&h, Method::GET, path, Some(&auth), &[], None).await;
        check(&format!("GET {path}"), &r, 404, "not_found");
    }
    let order = format!("/v1/orders/{}", uuid::Uuid::new_v4());
    let hold_path = format!("/v1/holds/{held}");
    let drop_path = format!("/v1/drops/{drop}");
    let cases = [
        (Method::PATCH, "/v1/drops".to_owned()),
        (Method::DELETE, "/v1/drops".to_owned()),
        (Method::DELETE, drop_path.clone()),
        (Method::PUT, drop_path.clone()),
        (Method::GET, format!("{drop_path}/holds")),
        (Method::DELETE, format!("{drop_path}/holds")),
        (Method::GET, format!("{drop_path}/close")),
        (Method::POST, format!("{drop_path}/seats")),
        (Method::POST, format!("{drop_path}/admission")),
        (Method::PUT, hold_path.clone()),
        (Method::POST, hold_path.clone()),
        (Method::GET, format!("{hold_path}/confirm")),
        (Method::DELETE, format!("{hold_path}/confirm")),
        (Method::GET, "/v1/fans/session".to_owned()),
        (Method::POST, "/v1/fans/me/holds".to_owned()),
        (Method::DELETE, "/v1/fans/me/orders".to_owned()),
        (Method::DELETE, order),
    ];
    for (method, path) in cases {
        let r = send(&h, method.clone(), &path, Some(&auth), &[], Some(b"{}")).await;
        check(&format!("{method} {path}"), &r, 405, "method_not_allowed");
    }
    assert_eq!(hold_state(&h, &token, &held).await, "held");
    unchanged(&h, &drop, before).await;
    h.server.shutdown().await;
}

// ---- sellers and ops ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_drop_definitions_are_422_and_create_nothing() {
    let h = Harness::start().await;
    type Edit = fn(&mut Value);
    let ga_cases: &[(&str, Edit)] = &[
        ("hold_ttl_s 0", |b| b["hold_ttl_s"] = json!(0)),
        ("hold_ttl_s 3601", |b| b["hold_ttl_s"] = json!(3601)),
        ("hold_ttl_s -1", |b| b["hold_ttl_s"] = json!(-1)),
        ("hold_ttl_s 1.5", |b| b["hold_ttl_s"] = json!(1.5)),
        ("hold_ttl_s a string", |b| b["hold_ttl_s"] = json!("60")),
        ("per_fan_limit 0", |b| b["per_fan_limit"] = json!(0)),
        ("per_fan_limit 1001", |b| b["per_fan_limit"] = json!(1001)),
        ("per_fan_limit -1", |b| b["per_fan_limit"] = json!(-1)),
        ("empty name", |b| b["name"] = json!("")),
        ("blank name", |b| b["name"] = json!("   ")),
        ("name of 201 characters", |b| {
            b["name"] = json!("n".repeat(201))
        }),
        ("currency lower case", |b| b["currency"] = json!("usd")),
        ("currency of 2 letters", |b| b["currency"] = json!("US")),
        ("currency of 4 letters", |b| b["currency"] = json!("EURO")),
        ("currency empty", |b| b["currency"] = json!("")),
        ("currency a number", |b| b["currency"] = json!(840)),
        ("opens_at not RFC 3339", |b| {
            b["opens_at"] = json!("tomorrow")
        }),
        ("opens_at a number", |b| {
            b["opens_at"] = json!(1_700_000_000)
        }),
        ("no skus", |b| b["inventory"]["skus"] = json!([])),
        ("duplicate skus", |b| {
            let first = b["inventory"]["skus"][0].clone();
            b["inventory"]["skus"].as_array_mut().unwrap().push(first);
        }),
        ("negative price", |b| {
            b["inventory"]["skus"][0]["price_cents"] = json!(-1)
        }),
        ("price over 10^10", |b| {
            b["inventory"]["skus"][0]["price_cents"] = json!(10_000_000_001i64)
        }),
        ("negative quantity", |b| {
            b["inventory"]["skus"][0]["quantity"] = json!(-1)
        }),
        ("quantity over 10^7", |b| {
            b["inventory"]["skus"][0]["quantity"] = json!(10_000_001)
        }),
        ("quantity 10^12", |b| {
            b["inventory"]["skus"][0]["quantity"] = json!(1_000_000_000_000i64)
        }),
        ("sku with a space", |b| {
            b["inventory"]["skus"][0]["sku"] = json!("TEE M")
        }),
        ("sku with a brace", |b| {
            b["inventory"]["skus"][0]["sku"] = json!("{TEE}")
        }),
        ("empty sku", |b| {
            b["inventory"]["skus"][0]["sku"] = json!("")
        }),
        ("sku of 41 characters", |b| {
            b["inventory"]["skus"][0]["sku"] = json!("S".repeat(41))
        }),
        ("empty sku name", |b| {
            b["inventory"]["skus"][0]["name"] = json!("")
        }),
        ("201 skus", |b| {
            b["inventory"]["skus"] = json!((0..201)
                .map(|i| json!({"sku": format!("S{i}"), "name": "s", "price_cents": 1, "quantity": 1}))
                .collect::<Vec<_>>())
        }),
        ("unknown sku field", |b| {
            b["inventory"]["skus"][0]["color"] = json!("red")
        }),
        ("unknown top-level field", |b| b["discount"] = json!(10)),
        ("sections on a GA inventory", |b| {
            b["inventory"]["sections"] = json!([])
        }),
        ("unknown inventory kind", |b| {
            b["inventory"]["kind"] = json!("vip")
        }),
        ("no inventory kind", |b| {
            b["inventory"].as_object_mut().unwrap().remove("kind");
        }),
        ("no inventory", |b| {
            b.as_object_mut().unwrap().remove("inventory");
        }),
        ("no admission", |b| {
            b.as_object_mut().unwrap().remove("admission");
        }),
        ("no name", |b| {
            b.as_object_mut().unwrap().remove("name");
        }),
        ("no per_fan_limit", |b| {
            b.as_object_mut().unwrap().remove("per_fan_limit");
        }),
        ("no hold_ttl_s", |b| {
            b.as_object_mut().unwrap().remove("hold_ttl_s");
        }),
        ("unknown admission mode", |b| {
            b["admission"]["mode"] = json!("lottery")
        }),
        ("admission rate_per_s 0", |b| {
            b["admission"]["rate_per_s"] = json!(0)
        }),
        ("admission rate_per_s -1", |b| {
            b["admission"]["rate_per_s"] = json!(-1)
        }),
        ("admission burst 0", |b| b["admission"]["burst"] = json!(0)),
        ("admission max_active 0", |b| {
            b["admission"]["max_active"] = json!(0)
        }),
        ("unknown admission field", |b| {
            b["admission"]["vip"] = json!(true)
        }),
        ("a body that is an array", |b| *b = json!([])),
    ];
    let seated_cases: &[(&str, Edit)] = &[
        ("no sections", |b| b["inventory"]["sections"] = json!([])),
        ("a section with no rows", |b| {
            b["inventory"]["sections"][0]["rows"] = json!([])
        }),
        ("a row of 0 seats", |b| {
            b["inventory"]["sections"][0]["rows"][0]["seats"] = json!(0)
        }),
        ("a row of -1 seats", |b| {
            b["inventory"]["sections"][0]["rows"][0]["seats"] = json!(-1)
        }),
        ("a row of 1001 seats", |b| {
            b["inventory"]["sections"][0]["rows"][0]["seats"] = json!(1001)
        }),
        ("duplicate sections", |b| {
            let first = b["inventory"]["sections"][0].clone();
            b["inventory"]["sections"]
                .as_array_mut()
                .unwrap()
                .push(first);
        }),
        ("duplicate rows", |b| {
            b["inventory"]["sections"][0]["rows"][1]["row"] = json!("1")
        }),
        ("a section id with a dash", |b| {
            b["inventory"]["sections"][0]["section"] = json!("A-1")
        }),
        ("an empty section id", |b| {
            b["inventory"]["sections"][0]["section"] = json!("")
        }),
        ("a row label with a space", |b| {
            b["inventory"]["sections"][0]["rows"][0]["row"] = json!("1 2")
        }),
        ("a row label with a dash", |b| {
            b["inventory"]["sections"][0]["rows"][0]["row"] = json!("1-2")
        }),
        ("an empty row label", |b| {
            b["inventory"]["sections"][0]["rows"][0]["row"] = json!("")
        }),
        ("negative section price", |b| {
            b["inventory"]["sections"][0]["price_cents"] = json!(-1)
        }),
        ("more than 100000 seats", |b| {
            b["inventory"]["sections"][0]["rows"] = json!((1..=101)
                .map(|r| json!({"row": r.to_string(), "seats": 1000}))
                .collect::<Vec<_>>())
        }),
        ("skus on a seated inventory", |b| {
            b["inventory"]["skus"] = json!([])
        }),
    ];
    let auth = bearer(&h.seller_key);
    for (base, cases) in [(ga_body(4), ga_cases), (seated_body(4), seated_cases)] {
        for (case, edit) in cases {
            let mut body = base.clone();
            edit(&mut body);
            let r = send(
                &h,
                Method::POST,
                "/v1/drops",
                Some(&auth),
                &[],
                Some(body.to_string().as_bytes()),
            )
            .await;
            check(case, &r, 422, "invalid_request");
        }
        // Control: the unedited body is accepted.
        h.create_drop(base).await;
    }
    let (_, drops) = h.get("/v1/drops", Some(&h.seller_key)).await;
    assert_eq!(drops["drops"].as_array().unwrap().len(), 2, "{drops}");
    for d in drops["drops"].as_array().unwrap() {
        h.assert_invariants(d["drop_id"].as_str().unwrap()).await;
    }
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admission_updates_are_refused_and_change_nothing() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let path = format!("/v1/drops/{drop}/admission");
    let ops = bearer(&h.ops_key);
    let (hr, pr, or) = (&h, &path, &ops);
    let read = move || async move {
        let r = send(hr, Method::GET, pr, Some(or), &[], None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["admission"].clone()
    };
    let settings = read().await;
    let before = h.counts(&drop).await;

    let cases: &[(&str, &str)] = &[
        ("rate_per_s -1", r#"{"rate_per_s": -1}"#),
        ("rate_per_s 0", r#"{"rate_per_s": 0}"#),
        ("rate_per_s over 100000", r#"{"rate_per_s": 100001}"#),
        ("rate_per_s a string", r#"{"rate_per_s": "fast"}"#),
        ("burst 0", r#"{"burst": 0}"#),
        ("burst -1", r#"{"burst": -1}"#),
        ("burst over 10^6", r#"{"burst": 1000001}"#),
        ("max_active 0", r#"{"max_active": 0}"#),
        ("max_active 1.5", r#"{"max_active": 1.5}"#),
        ("shop_window_s 9", r#"{"shop_window_s": 9}"#),
        ("admit_margin_pct 1001", r#"{"admit_margin_pct": 1001}"#),
        ("leave_grace_s 14", r#"{"leave_grace_s": 14}"#),
        ("paused a string", r#"{"paused": "yes"}"#),
        ("mode is not ops' to change", r#"{"mode": "queue"}"#),
        ("unknown field", r#"{"rate": 5}"#),
        ("an array", "[]"),
        (
            "one bad field among good ones",
            r#"{"rate_per_s": 5, "burst": 0}"#,
        ),
    ];
    for (case, body) in cases {
        let r = send(
            &h,
            Method::PUT,
            &path,
            Some(&ops),
            &[],
            Some(body.as_bytes()),
        )
        .await;
        check(case, &r, 422, "invalid_request");
    }
    let good = br#"{"rate_per_s": 5}"# as &[u8];
    let r = send(
        &h,
        Method::PUT,
        &path,
        Some(&bearer(&h.seller_key)),
        &[],
        Some(good),
    )
    .await;
    check("a seller key", &r, 403, "forbidden");
    let (_, fan) = h.fan("ops-wannabe").await;
    let r = send(&h, Method::PUT, &path, Some(&bearer(&fan)), &[], Some(good)).await;
    check("a fan token", &r, 401, "unauthorized");
    let r = send(&h, Method::PUT, &path, None, &[], Some(good)).await;
    check("no key", &r, 401, "unauthorized");
    assert_eq!(read().await, settings);

    // Control: a good update from ops is stored.
    let r = send(&h, Method::PUT, &path, Some(&ops), &[], Some(good)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(read().await["rate_per_s"], 5.0);
    unchanged(&h, &drop, before).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_problems_are_422() {
    let h = Harness::start().await;
    let drop = h.create_drop(ga_body(4)).await;
    let (_, token) = h.fan("idem").await;
    let path = format!("/v1/drops/{drop}/holds");
    let auth = bearer(&token);
    let one = br#"{"items": [{"sku": "TEE", "quantity": 1}]}"# as &[u8];
    let two = br#"{"items": [{"sku": "TEE", "quantity": 2}]}"# as &[u8];
    let first = send(
        &h,
        Method::POST,
        &path,
        Some(&auth),
        &[("idempotency-key", "k-1")],
        Some(one),
    )
    .await;
    assert_eq!(first.status, 201, "{}", first.body);
    let before = h.counts(&drop).await;

    let long = "k".repeat(129);
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("no Idempotency-Key", &[]),
        ("an empty key", &[("idempotency-key", "")]),
        ("a key of 129 characters", &[("idempotency-key", &long)]),
        ("a key with a space", &[("idempotency-key", "k 1")]),
    ];
    for (case, headers) in cases {
        let r = send(&h, Method::POST, &path, Some(&auth), headers, Some(one)).await;
        check(case, &r, 422, "invalid_request");
    }
    let r = send(
        &h,
        Method::POST,
        &path,
        Some(&auth),
        &[("idempotency-key", "k-1")],
        Some(two),
    )
    .await;
    check(
        "the same key with another body",
        &r,
        422,
        "idempotency_key_reused",
    );
    // The same key and body is a replay: the first answer again, nothing new held.
    let replay = send(
        &h,
        Method::POST,
        &path,
        Some(&auth),
        &[("idempotency-key", "k-1")],
        Some(one),
    )
    .await;
    assert_eq!(replay.status, 201, "{}", replay.body);
    assert_eq!(replay.body["hold_id"], first.body["hold_id"]);
    unchanged(&h, &drop, before).await;

    // A request refused before the script runs is not stored: the key is still free.
    let zero = br#"{"items": [{"sku": "TEE", "quantity": 0}]}"# as &[u8];
    let r = send(
        &h,
        Method::POST,
        &path,
        Some(&auth),
        &[("idempotency-key", "k-2")],
        Some(zero),
    )
    .await;
    check("quantity 0", &r, 422, "invalid_request");
    let r = send(
        &h,
        Method::POST,
        &path,
        Some(&auth),
        &[("idempotency-key", "k-2")],
        Some(one),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_ne!(r.body["hold_id"], first.body["hold_id"]);
    assert_eq!(h.counts(&drop).await, (20, 18, 2, 0));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

// ---- rate limits -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_past_the_burst_gets_429_with_retry_after() {
    let mut cfg = test_config();
    cfg.limits.per_fan_per_s = 1;
    cfg.limits.per_fan_burst = 2;
    let h = Harness::with_config(cfg).await;
    let drop = h.create_drop(ga_body(4)).await;
    let (_, token) = h.fan("eager").await;
    let (_, other) = h.fan("patient").await;
    let before = h.counts(&drop).await;

    // The burst of 2 is spent at once; no timing involved.
    for _ in 0..2 {
        let (status, v) = h.get("/v1/fans/me/holds", Some(&token)).await;
        assert_eq!(status, 200, "{v}");
    }
    let r = send(
        &h,
        Method::GET,
        "/v1/fans/me/holds",
        Some(&bearer(&token)),
        &[],
        None,
    )
    .await;
    check("third request", &r, 429, "rate_limited");
    let after: u64 = r
        .retry_after
        .as_deref()
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(after >= 1, "Retry-After {after}");
    let r = reserve_raw(
        &h,
        &token,
        &drop,
        br#"{"items": [{"sku": "TEE", "quantity": 1}]}"#,
    )
    .await;
    check("a reserve past the burst", &r, 429, "rate_limited");
    assert!(r.retry_after.is_some());
    // Another fan has a bucket of their own.
    let (status, v) = h.get("/v1/fans/me/holds", Some(&other)).await;
    assert_eq!(status, 200, "{v}");
    unchanged(&h, &drop, before).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_past_the_burst_gets_429_with_retry_after() {
    let mut cfg = test_config();
    cfg.limits.per_ip_per_s = 1;
    cfg.limits.per_ip_burst = 3;
    let h = Harness::with_config(cfg).await;
    for _ in 0..3 {
        let r = send(&h, Method::GET, "/v1/nope", None, &[], None).await;
        check("within the burst", &r, 404, "not_found");
    }
    let r = send(&h, Method::GET, "/v1/nope", None, &[], None).await;
    check("past the burst", &r, 429, "rate_limited");
    assert!(r.retry_after.is_some());
    // Health checks are not API calls: never limited.
    let (status, _) = h.get("/healthz", None).await;
    assert_eq!(status, 200);
    h.server.shutdown().await;
}
