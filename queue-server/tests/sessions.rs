//! A shopping session has a hard end (docs/ARCHITECTURE.md, invariants): admission fixes its shop
//! end (reserves accepted until then) and its hard end (shop end + hold TTL + confirm grace);
//! nothing the fan does moves either, and no admission token outlives the session.
mod common;

use common::Harness;
use serde_json::{json, Value};

/// The shortest shop window a drop may have; the test's loop runs through it once.
const SHOP_WINDOW_S: i64 = 10;
const HOLD_TTL_S: i64 = 30;
const CONFIRM_GRACE_MS: i64 = 1_000;

fn num(v: &Value, field: &str) -> i64 {
    v[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

/// A fan looping reserve/release (today's way to keep a session for good) loses the right to
/// reserve at the shop end the admission answer told them, keeps a hold taken before it (and can
/// pay for it after), never holds a token past the hard end, and the next fan gets the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reserve_release_loop_does_not_outlive_the_shop_window() {
    let mut cfg = common::test_config();
    cfg.holds.confirm_grace_ms = CONFIRM_GRACE_MS as u64;
    let h = Harness::start_with(cfg).await;
    let drop = h
        .new_drop(json!({
            "name": "session end", "per_fan_limit": 1, "hold_ttl_s": HOLD_TTL_S,
            "admission": {"mode": "queue", "rate_per_s": 50, "burst": 50, "max_active": 1,
                          "shop_window_s": SHOP_WINDOW_S},
            "inventory": {"kind": "ga", "skus": [
                {"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": 20}]}
        }))
        .await;
    let (looper, token) = h.fan("looper");
    let admission = h.join_until_admitted(&drop, &token).await;
    let (status, me) = h.me(&drop, &token).await;
    assert_eq!(
        (status, me["status"].as_str()),
        (200, Some("admitted")),
        "{me}"
    );
    let shop_end = num(&me, "shop_ends_at_ms");
    let hard_end = num(&me, "session_ends_at_ms");
    assert_eq!(
        hard_end,
        shop_end + HOLD_TTL_S * 1000 + CONFIRM_GRACE_MS,
        "hard end = shop end + hold TTL + confirm grace: {me}"
    );
    assert!(num(&me, "expires_at") * 1000 <= hard_end, "{me}");
    // A second fan waits behind the only slot.
    let (_, next) = h.fan("next");
    let (status, joined) = h.join(&drop, &next).await;
    assert_eq!(status, 201, "{joined}");

    // Reserve and release until refused; in the last seconds before the shop end, keep a hold.
    let mut kept: Option<String> = None;
    let looping = async {
        loop {
            let (status, body) = h.reserve_admitted(&drop, &token, &admission, 1).await;
            match status {
                201 => {
                    let now = num(&body, "server_now_ms");
                    assert!(
                        now < shop_end,
                        "a hold taken at {now}, past the shop end {shop_end}"
                    );
                    let hold = body["hold_id"].as_str().unwrap().to_owned();
                    if now > shop_end - 3_000 {
                        kept = Some(hold);
                    } else {
                        assert_eq!(h.client.release(&token, &hold).await, 204);
                    }
                }
                // Holding the one unit the limit allows: wait for the shop end.
                422 => {
                    assert_eq!(body["error"]["code"], "limit_exceeded", "{body}");
                    assert!(kept.is_some(), "{body}");
                }
                _ => {
                    assert_eq!(status, 403, "{body}");
                    return body;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    // Generous: the window is 10 s; before the fix the loop never ended.
    let refusal = tokio::time::timeout(std::time::Duration::from_secs(60), looping)
        .await
        .expect("no reserve was refused within 60 s: the loop kept the session");
    assert_eq!(refusal["error"]["code"], "not_admitted", "{refusal}");
    assert_eq!(
        refusal["error"]["detail"]["shop_ended_at_ms"], shop_end,
        "{refusal}"
    );

    // The session never reaches past the hard end: the slot's deadline, and every token.
    let deadline: f64 = common::redis_cli(&[
        "ZSCORE",
        &engine::keys::drop_key(&drop, "active"),
        looper.as_str(),
    ])
    .await
    .trim()
    .parse()
    .expect("the looper is still active (a live hold)");
    assert!(deadline as i64 <= hard_end, "{deadline} vs {hard_end}");
    let (_, me) = h.me(&drop, &token).await;
    if me["status"] == "admitted" {
        assert!(num(&me, "expires_at") * 1000 <= hard_end, "{me}");
    }

    // A hold taken before the shop end is still paid after it; the sale ends the session (the
    // limit is bought) and the next fan gets the slot.
    let kept = kept.expect("a hold was kept in the last seconds of the window");
    let (status, order) = h.client.confirm(&token, &kept, "ok_session").await;
    assert_eq!(status, 201, "{order}");
    testkit::eventually("the next fan is admitted", || async {
        h.me(&drop, &next).await.1["status"] == "admitted"
    })
    .await;
    h.shutdown().await;
}
