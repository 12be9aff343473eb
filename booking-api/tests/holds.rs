//! The hold lifecycle (docs/ARCHITECTURE.md) one request at a time: declined and slow payments,
//! expiry, idempotent reserves, admission tokens on queue drops, seat choice, and who may see or
//! touch a hold. Each test makes its own drops and fans against the real Redis and Postgres.
mod common;

use common::{redis_cli, Harness};
use engine::config::AdmissionConfig;
use engine::ids::{DropId, FanId, HoldId};
use engine::keys::{drop_key, DropKeys};
use engine::tokens::{now_s, AdmissionClaims, AdmissionKeys};
use serde_json::{json, Value};
use testkit::{eventually, test_config, ADMISSION_SECRET};

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn seats_of(v: &Value) -> Vec<&str> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["seat"].as_str().unwrap())
        .collect()
}

fn tee(quantity: u32) -> Value {
    json!({"items": [{"sku": "TEE", "quantity": quantity}]})
}

/// A seated drop of one section `A` with these row lengths (rows named 1, 2, ...).
async fn seated_drop(h: &Harness, rows: &[u32], per_fan_limit: u32) -> String {
    let rows: Vec<Value> = rows
        .iter()
        .enumerate()
        .map(|(i, n)| json!({"row": (i + 1).to_string(), "seats": n}))
        .collect();
    h.create_drop(json!({
        "name": "seated", "per_fan_limit": per_fan_limit, "hold_ttl_s": 300,
        "admission": {"mode": "open"},
        "inventory": {"kind": "seated", "sections": [{"section": "A", "price_cents": 4000, "rows": rows}]}
    }))
    .await
}

fn queue_drop_body() -> Value {
    json!({
        "name": "queued", "per_fan_limit": 2, "hold_ttl_s": 300,
        "admission": {"mode": "queue"},
        "inventory": {"kind": "ga", "skus": [{"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": 10}]}
    })
}

/// What a waiting room with the test servers' secret signs.
fn waiting_room_keys() -> AdmissionKeys {
    AdmissionKeys::new(&AdmissionConfig {
        secrets: vec![ADMISSION_SECRET.into()],
        token_ttl_s: 60,
    })
}

// ---- payment outcomes -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn declined_payment_puts_hold_back_to_held() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("broke").await;
    let (status, hold) = h.reserve(&token, &drop, tee(2)).await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap();

    let (status, body) = h.confirm(&token, hold_id, "fail_card").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(error_code(&body), "payment_declined");
    let (status, v) = h.get(&format!("/v1/holds/{hold_id}"), Some(&token)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "held");
    assert_eq!(
        v["expires_at_ms"], hold["expires_at_ms"],
        "the original deadline"
    );
    assert_eq!(h.counts(&drop).await, (10, 8, 2, 0));

    let (status, order) = h.confirm(&token, hold_id, "ok_card").await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(h.hold_state(&token, hold_id).await, "sold");
    let payment = h.payment(hold_id).await;
    assert_eq!(payment.captures, 1, "{payment:?}");
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

/// After a declined attempt, a second one moves the hold to `confirming` but fails before it
/// records its payment (Postgres unreachable, the process killed): the payment row still holds the
/// first attempt. The reconciler must give the hold back rather than skip it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attempt_that_never_recorded_its_payment_is_reverted() {
    let mut cfg = test_config();
    cfg.holds.confirm_timeout_ms = 3_000;
    cfg.holds.confirm_safety_margin_ms = 500;
    let h = Harness::with_config(cfg).await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (fan, token) = h.fan("retrier").await;
    let (status, hold) = h.reserve(&token, &drop, tee(2)).await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap();
    let (status, body) = h.confirm(&token, hold_id, "fail_first").await;
    assert_eq!(status, 402, "{body}");

    // What confirm does before it records the payment, and then nothing more.
    let id = HoldId::parse(hold_id).unwrap();
    h.server
        .engine
        .redis()
        .confirm_begin(&id, &FanId::parse(&fan).unwrap(), "card_second")
        .await
        .unwrap();
    assert_eq!(h.hold_state(&token, hold_id).await, "confirming");

    eventually("the reconciler gives the hold back", || async {
        h.hold_state(&token, hold_id).await == "held"
    })
    .await;
    assert_eq!(h.counts(&drop).await, (10, 8, 2, 0));
    let (status, order) = h.confirm(&token, hold_id, "ok_third").await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    assert_eq!(h.order_count(&drop, Some(hold_id)).await, 1);
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_payment_is_settled_by_the_reconciler() {
    let mut cfg = test_config();
    // Short, so the reconciler takes the hold soon; long enough that the hold is still
    // `confirming` when the test looks right after the 503.
    cfg.holds.confirm_timeout_ms = 2_000;
    cfg.holds.confirm_safety_margin_ms = 500;
    let h = Harness::with_config(cfg).await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("patient").await;
    let (status, hold) = h.reserve(&token, &drop, tee(1)).await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap();

    let r = h.confirm_reply(&token, hold_id, "slow_1").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.code(), "payment_pending");
    assert!(r.retry_after.is_some(), "503 carries Retry-After");
    assert_eq!(h.hold_state(&token, hold_id).await, "confirming");
    assert_eq!(
        h.counts(&drop).await,
        (10, 9, 1, 0),
        "confirming counts as held"
    );

    eventually("the reconciler sells the slow payment's hold", || async {
        h.hold_state(&token, hold_id).await == "sold"
    })
    .await;
    assert_eq!(h.order_count(&drop, Some(hold_id)).await, 1);
    let (status, orders) = h
        .get(&format!("/v1/fans/me/orders?drop_id={drop}"), Some(&token))
        .await;
    assert_eq!(status, 200, "{orders}");
    assert_eq!(orders["orders"][0]["hold_id"], hold_id);
    assert_eq!(h.counts(&drop).await, (10, 9, 0, 1));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

/// Test servers share one Postgres full of other tests' drops; each looks after only the drops it
/// served (testkit's `reconciler.watch_newest_drops = 0`), so no test's sweeper, reconciler or
/// watcher ends, settles or rebuilds another test's hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_test_server_leaves_other_servers_drops_alone() {
    // The drop's reserves reclaim nothing, so only a sweeper can end its expired holds.
    let mut cfg = test_config();
    cfg.holds.reclaim_batch = 0;
    let maker = Harness::with_config(cfg).await;
    let drop = maker.ga_drop(10, 4, 1).await;
    let (_, token) = maker.fan("first").await;
    let (status, hold) = maker.reserve(&token, &drop, tee(1)).await;
    assert_eq!(status, 201, "{hold}");
    let expires_at_ms = hold["expires_at_ms"].as_i64().unwrap();
    maker.server.shutdown().await;

    let other = Harness::start().await;
    eventually("the server's clock passes the hold's deadline", || async {
        other.drop_view(&drop).await["server_now_ms"]
            .as_i64()
            .unwrap()
            > expires_at_ms
    })
    .await;
    other.server.engine.sweep().await;
    other.server.engine.reconcile().await;
    assert_eq!(
        other.counts(&drop).await,
        (10, 9, 1, 0),
        "a server that never served the drop left its expired hold alone"
    );

    // Once it serves the drop, the drop is its own to look after.
    let (_, token) = other.fan("second").await;
    let (status, hold) = other.reserve(&token, &drop, tee(1)).await;
    assert_eq!(status, 201, "{hold}");
    eventually("its sweeper returns both expired holds", || async {
        other.counts(&drop).await == (10, 10, 0, 0)
    })
    .await;
    other.assert_invariants(&drop).await;
    other.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirm_after_expiry_is_gone_and_units_return() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 1).await;
    let (_, token) = h.fan("late").await;
    let (status, hold) = h.reserve(&token, &drop, tee(3)).await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap();
    let expires_at_ms = hold["expires_at_ms"].as_i64().unwrap();
    eventually("the server's clock passes the hold's deadline", || async {
        let (_, v) = h.get(&format!("/v1/holds/{hold_id}"), Some(&token)).await;
        v["server_now_ms"].as_i64().unwrap() > expires_at_ms
    })
    .await;

    let (status, body) = h.confirm(&token, hold_id, "ok_late").await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(error_code(&body), "hold_expired");
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0), "the units are back");
    assert_eq!(h.hold_state(&token, hold_id).await, "expired");
    assert_eq!(h.order_count(&drop, None).await, 0);
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

/// The sweeper reclaims a hold from the expiries list even when meta's `next_due_ms` says nothing
/// is due — as a release before the list leaves it after its own reclaim (lua/expire.lua): on a
/// drop whose stock is all held, no reserve succeeds to lower it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweeper_reclaims_listed_holds_whatever_next_due_says() {
    let h = Harness::start().await;
    let drop = h.ga_drop(2, 4, 1).await;
    let (_, token) = h.fan("all-held").await;
    let (status, hold) = h.reserve(&token, &drop, tee(2)).await;
    assert_eq!(status, 201, "{hold}");
    let meta = drop_key(&DropId::parse(&drop).unwrap(), "meta");
    // 2^53: "no held hold", as the previous release's reclaim writes when its zset is empty.
    redis_cli(&["HSET", &meta, "next_due_ms", "9007199254740992"]).await;
    eventually("the sweeper puts the expired units back", || async {
        h.counts(&drop).await == (2, 2, 0, 0)
    })
    .await;
    let hold_id = hold["hold_id"].as_str().unwrap();
    assert_eq!(h.hold_state(&token, hold_id).await, "expired");
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

// ---- idempotency ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_idempotency_key_replays_first_answer() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("double-click").await;
    let (s1, first) = h.reserve_with_key(&token, &drop, "k-1", tee(2)).await;
    let (s2, second) = h.reserve_with_key(&token, &drop, "k-1", tee(2)).await;
    assert_eq!((s1, s2), (201, 201), "{first} {second}");
    assert_eq!(first["hold_id"], second["hold_id"]);
    assert_eq!(first["expires_at_ms"], second["expires_at_ms"]);
    assert_eq!(first["items"], second["items"]);
    assert_eq!(h.counts(&drop).await, (10, 8, 2, 0), "units taken once");
    let (_, mine) = h
        .get(&format!("/v1/fans/me/holds?drop_id={drop}"), Some(&token))
        .await;
    assert_eq!(mine["holds"].as_array().unwrap().len(), 1);
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_with_other_body_is_refused() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("changed-mind").await;
    let (status, first) = h.reserve_with_key(&token, &drop, "k-1", tee(1)).await;
    assert_eq!(status, 201, "{first}");
    let (status, body) = h.reserve_with_key(&token, &drop, "k-1", tee(2)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(error_code(&body), "idempotency_key_reused");
    assert_eq!(h.counts(&drop).await, (10, 9, 1, 0));
    // The refusal was not stored in the key's place: the first answer still replays.
    let (status, again) = h.reserve_with_key(&token, &drop, "k-1", tee(1)).await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["hold_id"], first["hold_id"]);
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_are_scoped_to_the_fan() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, alice) = h.fan("alice").await;
    let (_, bob) = h.fan("bob").await;
    let (s1, a) = h.reserve_with_key(&alice, &drop, "same-key", tee(1)).await;
    let (s2, b) = h.reserve_with_key(&bob, &drop, "same-key", tee(1)).await;
    assert_eq!((s1, s2), (201, 201), "{a} {b}");
    assert_ne!(a["hold_id"], b["hold_id"]);
    assert_eq!(h.counts(&drop).await, (10, 8, 2, 0));
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_idempotency_key_is_refused() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("forgetful").await;
    let (status, body) = h.reserve_with(&token, &drop, None, None, tee(1)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(error_code(&body), "invalid_request");
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0));
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sold_out_answer_is_replayed() {
    let h = Harness::start().await;
    let drop = h.ga_drop(1, 1, 300).await;
    let (_, winner) = h.fan("winner").await;
    let (status, hold) = h.reserve(&winner, &drop, tee(1)).await;
    assert_eq!(status, 201, "{hold}");
    let (status, order) = h
        .confirm(&winner, hold["hold_id"].as_str().unwrap(), "ok_w")
        .await;
    assert_eq!(status, 201, "{order}");

    let (_, loser) = h.fan("loser").await;
    let (s1, first) = h.reserve_with_key(&loser, &drop, "k-sold", tee(1)).await;
    assert_eq!(s1, 409, "{first}");
    assert_eq!(error_code(&first), "sold_out");
    let (s2, second) = h.reserve_with_key(&loser, &drop, "k-sold", tee(1)).await;
    assert_eq!(
        (s2, &second),
        (409, &first),
        "the stored refusal comes back"
    );
    // It was stored with its body: another body under that key is refused as reuse.
    let (s3, third) = h.reserve_with_key(&loser, &drop, "k-sold", tee(2)).await;
    assert_eq!(s3, 422, "{third}");
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replayed_refusal_is_the_first_answer_even_after_stock_returns() {
    let h = Harness::start().await;
    let drop = h.ga_drop(1, 1, 300).await;
    let (_, holder) = h.fan("holder").await;
    let (status, hold) = h.reserve(&holder, &drop, tee(1)).await;
    assert_eq!(status, 201, "{hold}");
    let (_, waiter) = h.fan("waiter").await;
    let (status, first) = h.reserve_with_key(&waiter, &drop, "k-w", tee(1)).await;
    assert_eq!(status, 409, "{first}");
    assert_eq!(error_code(&first), "all_held");

    assert_eq!(
        h.release(&holder, hold["hold_id"].as_str().unwrap()).await,
        204
    );
    assert_eq!(h.counts(&drop).await, (1, 1, 0, 0));
    let (status, again) = h.reserve_with_key(&waiter, &drop, "k-w", tee(1)).await;
    assert_eq!(
        (status, &again),
        (409, &first),
        "a replay, not a new decision"
    );
    let (status, fresh) = h.reserve_with_key(&waiter, &drop, "k-w2", tee(1)).await;
    assert_eq!(status, 201, "a new key is a new request: {fresh}");
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

/// Where a drop keeps its reserves' stored answers (docs/ARCHITECTURE.md, Choices): the value of
/// the holds-hash field of (fan, key), and whether the key of its own exists.
async fn stored_answer(drop: &str, fan: &str, key: &str) -> (String, bool) {
    let (drop, fan) = (DropId::parse(drop).unwrap(), FanId::parse(fan).unwrap());
    let holds = drop_key(&drop, "holds");
    let field = redis_cli(&["HGET", &holds, &DropKeys::answer_field(&fan, key)]).await;
    let exists = redis_cli(&["EXISTS", &DropKeys::idem(&drop, &fan, key)]).await;
    (field, exists == "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_are_stored_in_the_holds_hash_and_replayed_from_it() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 2, 300).await;
    let (fan, token) = h.fan("answered").await;
    let (status, first) = h.reserve_with_key(&token, &drop, "k-ok", tee(2)).await;
    assert_eq!(status, 201, "{first}");
    let hold = first["hold_id"].as_str().unwrap();
    let (stored, key_exists) = stored_answer(&drop, &fan, "k-ok").await;
    assert!(stored.ends_with(&format!("\n{hold}")), "{stored:?}");
    assert!(!key_exists, "a success writes no key of its own");
    let (status, again) = h.reserve_with_key(&token, &drop, "k-ok", tee(2)).await;
    assert_eq!(status, 201, "{again}");
    for field in ["hold_id", "expires_at_ms", "items"] {
        assert_eq!(again[field], first[field], "{field}: {first} {again}");
    }
    // A refusal is stored the same way, as its answer.
    let (status, refused) = h.reserve_with_key(&token, &drop, "k-over", tee(1)).await;
    assert_eq!((status, error_code(&refused)), (422, "limit_exceeded"));
    let (stored, key_exists) = stored_answer(&drop, &fan, "k-over").await;
    assert!(
        stored.contains("limit_exceeded") && !key_exists,
        "{stored:?}"
    );
    let (status, again) = h.reserve_with_key(&token, &drop, "k-over", tee(1)).await;
    assert_eq!((status, &again), (422, &refused));
    assert_eq!(h.counts(&drop).await, (10, 8, 2, 0));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drop_loaded_before_answers_moved_keeps_them_in_keys() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 2, 300).await;
    // As a drop loaded by the release before looks: no `answers` in its meta.
    let meta = drop_key(&DropId::parse(&drop).unwrap(), "meta");
    assert_eq!(redis_cli(&["HDEL", &meta, "answers"]).await, "1");
    let (fan, token) = h.fan("old-drop").await;
    let (status, first) = h.reserve_with_key(&token, &drop, "k-ok", tee(2)).await;
    assert_eq!(status, 201, "{first}");
    let (stored, key_exists) = stored_answer(&drop, &fan, "k-ok").await;
    assert!(stored.is_empty() && key_exists, "{stored:?}");
    let (status, again) = h.reserve_with_key(&token, &drop, "k-ok", tee(2)).await;
    assert_eq!(
        (status, &again["hold_id"]),
        (201, &first["hold_id"]),
        "{again}"
    );
    let (status, refused) = h.reserve_with_key(&token, &drop, "k-over", tee(1)).await;
    assert_eq!((status, error_code(&refused)), (422, "limit_exceeded"));
    let (stored, key_exists) = stored_answer(&drop, &fan, "k-over").await;
    assert!(stored.is_empty() && key_exists, "{stored:?}");
    let (status, again) = h.reserve_with_key(&token, &drop, "k-over", tee(2)).await;
    assert_eq!(
        (status, error_code(&again)),
        (422, "idempotency_key_reused")
    );
    assert_eq!(h.counts(&drop).await, (10, 8, 2, 0));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

// ---- queue drops: admission tokens ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_drop_admits_a_fan_with_a_signed_token() {
    let h = Harness::start().await;
    let drop = h.create_drop(queue_drop_body()).await;
    let (fan, token) = h.fan("admitted").await;
    h.admit(&drop, &fan).await;
    let (admission, _) = waiting_room_keys().issue(
        &DropId::parse(&drop).unwrap(),
        &FanId::parse(&fan).unwrap(),
        1,
        None,
    );
    let (status, hold) = h
        .reserve_with(&token, &drop, Some("k-1"), Some(&admission), tee(1))
        .await;
    assert_eq!(status, 201, "{hold}");
    assert_eq!(h.counts(&drop).await, (10, 9, 1, 0));
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_drop_without_admission_token_is_refused() {
    let h = Harness::start().await;
    let drop = h.create_drop(queue_drop_body()).await;
    let (_, token) = h.fan("gatecrasher").await;
    let (status, body) = h.reserve(&token, &drop, tee(1)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_code(&body), "not_admitted");
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0));
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_drop_refuses_forged_misdirected_and_expired_tokens() {
    let h = Harness::start().await;
    let drop = h.create_drop(queue_drop_body()).await;
    let other_drop = h.create_drop(queue_drop_body()).await;
    let (fan, token) = h.fan("queued").await;
    let (other_fan, _) = h.fan("friend").await;
    let keys = waiting_room_keys();
    let drop_id = DropId::parse(&drop).unwrap();
    let fan_id = FanId::parse(&fan).unwrap();
    let (good, claims) = keys.issue(&drop_id, &fan_id, 1, None);

    let mut bad_signature = good.clone();
    let last = bad_signature.pop().unwrap();
    bad_signature.push(if last == 'A' { 'B' } else { 'A' });
    // Claims for another place, carrying the good token's signature.
    let other_claims = AdmissionClaims {
        place: 0,
        ..claims.clone()
    };
    let signed_other = keys.sign(&other_claims);
    let (good_parts, other_parts): (Vec<&str>, Vec<&str>) =
        (good.split('.').collect(), signed_other.split('.').collect());
    let swapped_payload = format!("v1.{}.{}", other_parts[1], good_parts[2]);
    let (other_fans, _) = keys.issue(&drop_id, &FanId::parse(&other_fan).unwrap(), 1, None);
    let (other_drops, _) = keys.issue(&DropId::parse(&other_drop).unwrap(), &fan_id, 1, None);
    let expired = keys.sign(&AdmissionClaims {
        iat: now_s() - 120,
        exp: now_s() - 1,
        ..claims.clone()
    });
    let (foreign, _) = AdmissionKeys::new(&AdmissionConfig {
        secrets: vec!["some-other-secret".into()],
        token_ttl_s: 60,
    })
    .issue(&drop_id, &fan_id, 1, None);

    for (i, (what, admission)) in [
        ("bad signature", bad_signature.as_str()),
        (
            "payload swapped under a signature",
            swapped_payload.as_str(),
        ),
        ("another fan's token", other_fans.as_str()),
        ("another drop's token", other_drops.as_str()),
        ("expired token", expired.as_str()),
        ("token from another secret", foreign.as_str()),
        ("garbage", "not-a-token"),
    ]
    .into_iter()
    .enumerate()
    {
        let key = format!("k-{i}");
        let (status, body) = h
            .reserve_with(&token, &drop, Some(&key), Some(admission), tee(1))
            .await;
        assert_eq!(status, 403, "{what}: {body}");
        assert_eq!(error_code(&body), "not_admitted", "{what}");
    }
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0));
    // A genuine token alone is not enough: the session must be live in the active set too.
    let (status, body) = h
        .reserve_with(&token, &drop, Some("not-yet"), Some(&good), tee(1))
        .await;
    assert_eq!(status, 403, "token without an admitted session: {body}");
    assert_eq!(error_code(&body), "not_admitted");
    h.admit(&drop, &fan).await;
    let (status, hold) = h
        .reserve_with(&token, &drop, Some("good"), Some(&good), tee(1))
        .await;
    assert_eq!(status, 201, "the genuine token still works: {hold}");
    h.server.shutdown().await;
}

// ---- seats ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn best_available_takes_the_front_row_first() {
    let h = Harness::start().await;
    let drop = seated_drop(&h, &[10, 10], 4).await;
    let (_, token) = h.fan("front").await;
    let (status, hold) = h
        .reserve(
            &token,
            &drop,
            json!({"best_available": {"section": "A", "quantity": 2}}),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    assert_eq!(seats_of(&hold), ["A-1-1", "A-1-2"]);
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn best_available_avoids_orphan_seats() {
    let h = Harness::start().await;
    let drop = seated_drop(&h, &[10], 4).await;
    let (_, first) = h.fan("first").await;
    // Free now: 2-4 and 6-10. Front-first would take 2-3 and strand seat 4 alone.
    let (status, hold) = h
        .reserve(&first, &drop, json!({"seats": ["A-1-1", "A-1-5"]}))
        .await;
    assert_eq!(status, 201, "{hold}");
    let (_, second) = h.fan("second").await;
    let (status, hold) = h
        .reserve(
            &second,
            &drop,
            json!({"best_available": {"section": "A", "quantity": 2}}),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    assert_eq!(seats_of(&hold), ["A-1-6", "A-1-7"]);
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn best_available_moves_back_a_row_rather_than_strand_a_seat() {
    let h = Harness::start().await;
    let drop = seated_drop(&h, &[5, 3], 4).await;
    let (_, first) = h.fan("first").await;
    let (status, hold) = h.reserve(&first, &drop, json!({"seats": ["A-1-1"]})).await;
    assert_eq!(status, 201, "{hold}");
    // Row 1 has 2-5 free: any three of them leave one seat alone; row 2 fits three exactly.
    let (_, second) = h.fan("second").await;
    let (status, hold) = h
        .reserve(
            &second,
            &drop,
            json!({"best_available": {"section": "A", "quantity": 3}}),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    assert_eq!(seats_of(&hold), ["A-2-1", "A-2-2", "A-2-3"]);
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn best_available_strands_a_seat_only_when_nothing_else_fits() {
    let h = Harness::start().await;
    let drop = seated_drop(&h, &[3], 4).await;
    let (_, token) = h.fan("pair").await;
    let (status, hold) = h
        .reserve(
            &token,
            &drop,
            json!({"best_available": {"section": "A", "quantity": 2}}),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    assert_eq!(seats_of(&hold), ["A-1-1", "A-1-2"]);
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn named_seats_are_all_or_nothing() {
    let h = Harness::start().await;
    let drop = seated_drop(&h, &[4], 4).await;
    let (_, first) = h.fan("first").await;
    let (status, hold) = h.reserve(&first, &drop, json!({"seats": ["A-1-2"]})).await;
    assert_eq!(status, 201, "{hold}");

    let (_, second) = h.fan("second").await;
    let (status, body) = h
        .reserve(&second, &drop, json!({"seats": ["A-1-1", "A-1-2"]}))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(error_code(&body), "seat_unavailable");
    assert_eq!(body["error"]["detail"]["seats"], json!(["A-1-2"]));
    let (_, map) = h.get(&format!("/v1/drops/{drop}/seats"), None).await;
    let states = testkit::seat_states(&map);
    let state = |seat: &str| {
        states
            .iter()
            .find(|(s, _)| s == seat)
            .map(|(_, st)| st.to_string())
            .unwrap()
    };
    assert_eq!(state("A-1-1"), "free", "the free seat was not held");
    assert_eq!(state("A-1-2"), "held");
    assert_eq!(h.counts(&drop).await, (4, 3, 1, 0));
    let (_, mine) = h
        .get(&format!("/v1/fans/me/holds?drop_id={drop}"), Some(&second))
        .await;
    assert_eq!(mine["holds"], json!([]));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

// ---- releasing, ownership, confirming -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn released_hold_returns_units() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("undecided").await;
    let (status, hold) = h.reserve(&token, &drop, tee(3)).await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap();
    assert_eq!(h.counts(&drop).await, (10, 7, 3, 0));

    assert_eq!(h.release(&token, hold_id).await, 204);
    assert_eq!(h.counts(&drop).await, (10, 10, 0, 0));
    assert_eq!(h.hold_state(&token, hold_id).await, "released");
    assert_eq!(
        h.release(&token, hold_id).await,
        204,
        "releasing twice is harmless"
    );
    let (status, body) = h.confirm(&token, hold_id, "ok_1").await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(error_code(&body), "hold_released");
    // The per-fan count came back too: the whole limit is usable again.
    let (status, again) = h.reserve(&token, &drop, tee(4)).await;
    assert_eq!(status, 201, "{again}");
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_fans_hold_is_not_found() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, owner) = h.fan("owner").await;
    let (_, other) = h.fan("other").await;
    let (status, hold) = h.reserve(&owner, &drop, tee(2)).await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap();

    let (status, body) = h.get(&format!("/v1/holds/{hold_id}"), Some(&other)).await;
    assert_eq!((status, error_code(&body)), (404, "unknown_hold"), "{body}");
    assert_eq!(h.release(&other, hold_id).await, 404);
    let (status, body) = h.confirm(&other, hold_id, "ok_thief").await;
    assert_eq!((status, error_code(&body)), (404, "unknown_hold"), "{body}");
    assert_eq!(h.hold_state(&owner, hold_id).await, "held");
    assert_eq!(h.counts(&drop).await, (10, 8, 2, 0));

    let (status, order) = h.confirm(&owner, hold_id, "ok_owner").await;
    assert_eq!(status, 201, "{order}");
    let order_id = order["order_id"].as_str().unwrap();
    let (status, body) = h.get(&format!("/v1/orders/{order_id}"), Some(&other)).await;
    assert_eq!(
        (status, error_code(&body)),
        (404, "unknown_order"),
        "{body}"
    );
    let (status, body) = h.get(&format!("/v1/holds/{hold_id}"), Some(&other)).await;
    assert_eq!(status, 404, "{body}");
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_fans_confirm_during_the_owners_confirm_is_not_found() {
    let mut cfg = test_config();
    // The owner's `slow_` payment stays in flight for two seconds before it times out.
    cfg.gateway.timeout_ms = 2_000;
    cfg.gateway.test_slow_ms = 5_000;
    cfg.holds.confirm_safety_margin_ms = 2_500;
    let h = Harness::with_config(cfg).await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, owner) = h.fan("owner").await;
    let (_, other) = h.fan("other").await;
    let (status, hold) = h.reserve(&owner, &drop, tee(1)).await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap().to_owned();

    let owners_confirm = h.confirm(&owner, &hold_id, "slow_owner");
    let others = async {
        eventually("the owner's confirm begins", || async {
            h.hold_state(&owner, &hold_id).await == "confirming"
        })
        .await;
        // Same reference and another one: neither may join or block the owner's payment.
        let same = h.confirm(&other, &hold_id, "slow_owner").await;
        let different = h.confirm(&other, &hold_id, "ok_other").await;
        (same, different)
    };
    let ((status, body), ((s1, same), (s2, different))) = tokio::join!(owners_confirm, others);
    assert_eq!(status, 503, "the owner's payment is pending: {body}");
    assert_eq!((s1, error_code(&same)), (404, "unknown_hold"), "{same}");
    assert_eq!(
        (s2, error_code(&different)),
        (404, "unknown_hold"),
        "{different}"
    );
    eventually("the reconciler sells the owner's hold", || async {
        h.hold_state(&owner, &hold_id).await == "sold"
    })
    .await;
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn release_while_confirming_is_refused() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("wavering").await;
    let (status, hold) = h.reserve(&token, &drop, tee(1)).await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap();
    let (status, body) = h.confirm(&token, hold_id, "slow_1").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(h.hold_state(&token, hold_id).await, "confirming");

    let r = h
        .http
        .delete(h.url(&format!("/v1/holds/{hold_id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(error_code(&body), "hold_confirming", "{body}");
    assert_eq!(h.counts(&drop).await, (10, 9, 1, 0));
    eventually("the reconciler settles the payment", || async {
        h.hold_state(&token, hold_id).await == "sold"
    })
    .await;
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_reference_while_confirming_is_refused() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("two-cards").await;
    let (status, hold) = h.reserve(&token, &drop, tee(1)).await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap();
    let (status, body) = h.confirm(&token, hold_id, "slow_1").await;
    assert_eq!(status, 503, "{body}");

    let (status, body) = h.confirm(&token, hold_id, "ok_2").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(error_code(&body), "confirm_in_progress");
    eventually("the reconciler settles the first payment", || async {
        h.hold_state(&token, hold_id).await == "sold"
    })
    .await;
    assert_eq!(h.order_count(&drop, Some(hold_id)).await, 1);
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_holds_and_orders_are_listed() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("collector").await;
    let (_, stranger) = h.fan("stranger").await;
    let (_, bought) = h.reserve(&token, &drop, tee(1)).await;
    let (_, kept) = h.reserve(&token, &drop, tee(2)).await;
    let bought_id = bought["hold_id"].as_str().unwrap();
    let kept_id = kept["hold_id"].as_str().unwrap();
    let (status, order) = h.confirm(&token, bought_id, "ok_1").await;
    assert_eq!(status, 201, "{order}");

    let (status, holds) = h
        .get(&format!("/v1/fans/me/holds?drop_id={drop}"), Some(&token))
        .await;
    assert_eq!(status, 200, "{holds}");
    let holds = holds["holds"].as_array().unwrap();
    assert_eq!(holds.len(), 1, "only the live hold: {holds:?}");
    assert_eq!(holds[0]["hold_id"], kept_id);
    assert_eq!(holds[0]["state"], "held");
    assert!(holds[0]["expires_at"].is_string());
    let (_, everywhere) = h.get("/v1/fans/me/holds", Some(&token)).await;
    assert!(everywhere["holds"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["hold_id"] == kept_id));

    let (status, orders) = h
        .get(&format!("/v1/fans/me/orders?drop_id={drop}"), Some(&token))
        .await;
    assert_eq!(status, 200, "{orders}");
    let orders = orders["orders"].as_array().unwrap();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0]["hold_id"], bought_id);
    assert_eq!(orders[0]["order_id"], order["order_id"]);

    for path in [
        format!("/v1/fans/me/holds?drop_id={drop}"),
        format!("/v1/fans/me/orders?drop_id={drop}"),
    ] {
        let (status, v) = h.get(&path, Some(&stranger)).await;
        assert_eq!(status, 200, "{v}");
        let list = v.get("holds").or(v.get("orders")).unwrap();
        assert_eq!(list, &json!([]), "{path}");
    }
    h.server.shutdown().await;
}

// ---- drop status ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closed_drop_refuses_new_holds() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, early) = h.fan("early").await;
    let (status, hold) = h.reserve(&early, &drop, tee(2)).await;
    assert_eq!(status, 201, "{hold}");

    let (status, closed) = h
        .seller_post(&format!("/v1/drops/{drop}/close"), json!({}))
        .await;
    assert_eq!(status, 200, "{closed}");
    assert_eq!(h.drop_view(&drop).await["status"], "closed");
    let (_, late) = h.fan("late").await;
    let (status, body) = h.reserve(&late, &drop, tee(1)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(error_code(&body), "drop_closed");

    let (status, order) = h
        .confirm(&early, hold["hold_id"].as_str().unwrap(), "ok_1")
        .await;
    assert_eq!(status, 201, "an existing hold can still be paid: {order}");
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_open_drop_refuses() {
    let h = Harness::start().await;
    let drop = h
        .create_drop(json!({
            "name": "later", "opens_at": "2999-01-01T00:00:00Z", "per_fan_limit": 2, "hold_ttl_s": 300,
            "admission": {"mode": "open"},
            "inventory": {"kind": "ga", "skus": [{"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": 5}]}
        }))
        .await;
    let (_, token) = h.fan("eager").await;
    let (status, body) = h.reserve(&token, &drop, tee(1)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(error_code(&body), "not_open");
    assert_eq!(h.counts(&drop).await, (5, 5, 0, 0));
    h.server.shutdown().await;
}

/// Redis and Postgres disagree (here: Postgres says everything is sold, Redis that all is
/// available). Postgres' constraint refuses the confirm's order; the payment is voided, and the
/// drop is rebuilt from Postgres so the next fan isn't charged and refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_refused_by_postgres_voids_and_rebuilds_the_drop() {
    let h = Harness::start().await;
    let drop = h.ga_drop(2, 2, 300).await;
    h.server
        .engine
        .db()
        .client()
        .await
        .unwrap()
        .execute(
            "UPDATE inventory SET sold = total WHERE drop_id = $1",
            &[&drop],
        )
        .await
        .unwrap();
    let (_, token) = h.fan("refused").await;
    let (status, hold) = h.reserve(&token, &drop, tee(1)).await;
    assert_eq!(status, 201, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap();

    let (status, body) = h.confirm(&token, hold_id, "ok_refused").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(error_code(&body), "internal");
    assert_eq!(h.order_count(&drop, None).await, 0);
    let payment = h.payment(hold_id).await;
    assert_eq!((payment.captures, payment.voids), (0, 1), "{payment:?}");

    // Every test server in this process watches recent drops, so several may rebuild it in
    // turn: each answer is read whole, and `recovering` in between is waited out.
    eventually("the drop is rebuilt from Postgres", || async {
        let (status, v) = h.get(&format!("/v1/drops/{drop}"), None).await;
        let b = &v["inventory"][0];
        status == 200 && [&b["available"], &b["held"], &b["sold"]] == [0, 0, 2]
    })
    .await;
    let (_, other) = h.fan("next").await;
    let mut answer = h.reserve(&other, &drop, tee(1)).await;
    for _ in 0..300 {
        if answer.0 != 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        answer = h.reserve(&other, &drop, tee(1)).await;
    }
    assert_eq!(answer.0, 409, "{}", answer.1);
    assert_eq!(error_code(&answer.1), "sold_out");
    h.server.shutdown().await;
}

/// Reserve is a Redis Function (engine/src/scripts/function.rs), loaded when the engine starts: a
/// Redis that has lost its functions since (a restart without persistence, `FUNCTION FLUSH`) gets
/// reserve's library again from the next reserve, which answers as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reserve_loads_its_function_again_where_redis_lost_it() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token) = h.fan("forgetful").await;
    let libraries = || common::redis_cli(&["FUNCTION", "LIST", "LIBRARYNAME", "floodgate_*"]);
    assert!(
        libraries().await.contains("floodgate_"),
        "reserve's function library is loaded when the engine starts"
    );
    common::redis_cli(&["FUNCTION", "FLUSH"]).await;
    let (status, hold) = h.reserve(&token, &drop, tee(1)).await;
    assert_eq!(status, 201, "{hold}");
    assert!(
        libraries().await.contains("floodgate_"),
        "the reserve loaded its library again"
    );
}
