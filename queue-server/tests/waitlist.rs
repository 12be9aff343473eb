//! The waiting list after a sell-out (docs/ARCHITECTURE.md, "The waiting list"): with a drop's
//! `admission.waitlist` on, the fans in line when it sells out — and those who join after — are
//! `waitlisted` instead of sent away; units that come back are offered by lua/admit.lua in line
//! order, each offer an admission for `offer_window_s` that passes to the next fan if unused, and
//! no unit is ever offered to two fans at once (the claims of the offers outstanding never pass
//! what is available).
mod common;

use common::Harness;
use engine::ids::DropId;
use serde_json::{json, Value};

/// The shortest offer window a drop may have: the test waits through one once.
const OFFER_WINDOW_S: u64 = 10;
/// The buyers' shop window (before the sell-out): their sessions must be over before their orders
/// are refunded, or the refunded units are theirs to take again while it lasts.
const BUYERS_SHOP_WINDOW_S: u64 = 15;
/// The window of the offers the test's fans use: long enough that no step races it.
const LONG_OFFER_WINDOW_S: u64 = 3_600;
const FANS_IN_LINE: usize = 50;

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// A waiting-list drop of `quantity` TEEs, one per fan; admission as fast as the test likes, so
/// what decides who enters is the stock alone.
async fn waitlist_drop(h: &Harness, quantity: u32) -> DropId {
    h.queue_drop(
        quantity,
        1,
        json!({"rate_per_s": 1000, "burst": 1000, "max_active": 1000,
               "shop_window_s": BUYERS_SHOP_WINDOW_S,
               "admit_margin_pct": 0, "leave_grace_s": 3600, "waitlist": true,
               "offer_window_s": LONG_OFFER_WINDOW_S}),
        None,
    )
    .await
}

async fn add_stock(h: &Harness, drop: &DropId, add: i64, request_id: &str) {
    let (status, v) = h
        .seller_post(
            &format!("/v1/drops/{drop}/skus/TEE/stock"),
            json!({"add": add, "request_id": request_id}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

/// Ops change the drop's offer window (offers made from then on).
async fn set_offer_window(h: &Harness, drop: &DropId, offer_window_s: u64) {
    h.set_admission(drop, json!({"offer_window_s": offer_window_s}))
        .await;
}

/// The drop's offers as Redis keeps them: fan id → offer end ms.
async fn offers(drop: &DropId) -> Vec<(String, i64)> {
    let out = common::redis_cli(&[
        "ZRANGE",
        &format!("fg:{{{drop}}}:offers"),
        "0",
        "-1",
        "WITHSCORES",
    ])
    .await;
    let words: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    words
        .chunks(2)
        .map(|p| (p[0].to_owned(), p[1].parse::<f64>().unwrap_or(0.0) as i64))
        .collect()
}

/// The books balance, and the offers outstanding (an offered fan who hasn't taken their unit,
/// whose window hasn't ended) never claim more than is available: no unit is offered twice.
async fn check_books(h: &Harness, drop: &DropId, fans: &[(String, String)], step: &str) {
    let (total, available, held, sold) = h.counts(drop).await;
    assert_eq!(available + held + sold, total, "{step}: the books");
    let mut outstanding = 0;
    for (fan, token) in fans {
        let (_, me) = h.me(drop, token).await;
        if me["status"] == "admitted" && me["offer"] == true {
            // One unit per fan: an offered fan who holds or bought theirs claims nothing more.
            let units = common::redis_cli(&["HGET", &format!("fg:{{{drop}}}:fans"), fan]).await;
            if units.parse::<i64>().unwrap_or(0) == 0 {
                outstanding += 1;
            }
        }
    }
    assert!(
        outstanding <= available,
        "{step}: {outstanding} offers outstanding for {available} units available"
    );
}

/// Polls `/queue/me` until `fan` is admitted on an offer; the answer.
async fn until_offered(h: &Harness, drop: &DropId, token: &str, who: &str) -> Value {
    let got = std::sync::Mutex::new(Value::Null);
    testkit::eventually(&format!("{who} is offered a unit"), || async {
        let (_, me) = h.me(drop, token).await;
        let offered = me["status"] == "admitted" && me["offer"] == true;
        *got.lock().unwrap() = me;
        offered
    })
    .await;
    got.into_inner().unwrap()
}

/// Buys one TEE with an admission token; the order id.
async fn buy(h: &Harness, drop: &DropId, token: &str, admission: &str, reference: &str) {
    let (status, v) = h.reserve_admitted(drop, token, admission, 1).await;
    assert_eq!(status, 201, "{v}");
    let hold = v["hold_id"].as_str().unwrap().to_owned();
    let (status, v) = h.confirm(token, &hold, reference).await;
    assert_eq!(status, 201, "{v}");
}

/// Sell out with 50 fans in line, bring 5 units back (2 by add-stock, 3 by refunds) → exactly the
/// first 5 on the waiting list are offered, in line order; then one more back on a short offer
/// window that its fan lets lapse → it passes to the next fan, and only to them; no unit is ever
/// offered to two fans; the books balance after every step. Offers the test's fans must use are
/// long (no step has to beat a clock); only the one that lapses is short.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn units_that_come_back_are_offered_in_line_order_and_an_unused_offer_passes_on() {
    let h = Harness::start().await;
    let drop = waitlist_drop(&h, 5).await;

    // Five buyers take the five units; the 50 behind them join while the units are held.
    let mut buyers = Vec::new();
    for i in 0..5 {
        let (_, token) = h.fan(&format!("buyer{i}"));
        let admission = h.join_until_admitted(&drop, &token).await;
        let (status, v) = h.reserve_admitted(&drop, &token, &admission, 1).await;
        assert_eq!(status, 201, "{v}");
        buyers.push((token, v["hold_id"].as_str().unwrap().to_owned()));
    }
    let mut fans: Vec<(String, String)> = Vec::new();
    for i in 0..FANS_IN_LINE {
        let (fan, token) = h.fan(&format!("w{i:02}"));
        let (status, v) = h.join(&drop, &token).await;
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["status"], "waiting", "held, not sold out yet: {v}");
        fans.push((fan.to_string(), token));
    }
    let mut orders = Vec::new();
    for (i, (token, hold)) in buyers.iter().enumerate() {
        let (status, v) = h.confirm(token, hold, &format!("ok_b{i}")).await;
        assert_eq!(status, 201, "{v}");
        orders.push(v["order_id"].as_str().unwrap().to_owned());
    }

    // Sold out: everyone in line is on the waiting list, in their order, and the line stays.
    testkit::eventually("the line in front says waitlisted", || async {
        h.me(&drop, &fans[0].1).await.1["status"] == "waitlisted"
    })
    .await;
    for (i, (_, token)) in fans.iter().enumerate() {
        let (status, me) = h.me(&drop, token).await;
        assert_eq!(status, 200, "{me}");
        assert_eq!(me["status"], "waitlisted", "fan {i}: {me}");
        assert_eq!(me["ahead"], i as i64, "fan {i}: {me}");
        assert_eq!(me["came_back"], 0, "fan {i}: {me}");
        assert_eq!(me["eta_s"], Value::Null, "fan {i}: {me}");
    }
    // A fan arriving after the sell-out joins the waiting list too, at its back.
    let (late_fan, late) = h.fan("late");
    let (status, v) = h.join(&drop, &late).await;
    assert_eq!(
        (status, v["status"].as_str()),
        (201, Some("waitlisted")),
        "{v}"
    );
    assert_eq!(v["ahead"], FANS_IN_LINE as i64, "{v}");
    fans.push((late_fan.to_string(), late));
    check_books(&h, &drop, &fans, "sold out").await;

    // The first fan's socket hears the waiting list, then the offer.
    let mut ws = common::connect(&h.queue.ws_url(), &drop, &fans[0].1).await;
    let w = common::wait_for(&mut ws, "waitlisted").await;
    assert_eq!(w["ahead"], 0, "{w}");

    // Two units come back: the first two fans are offered, nobody else.
    add_stock(&h, &drop, 2, "wl-restock-1").await;
    let offered = common::wait_for(&mut ws, "admitted").await;
    assert_eq!(offered["offer"], true, "{offered}");
    let mut admissions = Vec::new();
    for (i, (_, token)) in fans.iter().take(2).enumerate() {
        let me = until_offered(&h, &drop, token, &format!("fan {i}")).await;
        admissions.push(me["admission_token"].as_str().unwrap().to_owned());
    }
    check_books(&h, &drop, &fans, "2 back").await;
    let (_, me) = h.me(&drop, &fans[2].1).await;
    assert_eq!(me["status"], "waitlisted", "{me}");
    assert_eq!(me["ahead"], 0, "{me}");
    assert_eq!(me["came_back"], 2, "{me}");
    assert_eq!(offers(&drop).await.len(), 2);

    // Three more come back: the seller refunds three buyers' one-unit orders (once the buyers'
    // sessions are over: during one, a refunded buyer may take the unit again). Fans 2..5 are
    // offered.
    testkit::eventually_within(
        std::time::Duration::from_secs(BUYERS_SHOP_WINDOW_S + 60),
        "the buyers' sessions are over",
        || async {
            let mut over = true;
            for (token, _) in &buyers {
                over &= h.me(&drop, token).await.1["status"] == "done";
            }
            over
        },
    )
    .await;
    for (i, order) in orders.iter().take(3).enumerate() {
        let (status, v) = h
            .call(
                h.http
                    .post(h.url(&format!("/v1/orders/{order}/refunds")))
                    .bearer_auth(&h.seller_key)
                    .json(&json!({"refund_id": format!("wl-refund-{i}")})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["state"], "returned", "{v}");
    }
    for (i, (_, token)) in fans.iter().enumerate().take(5).skip(2) {
        let me = until_offered(&h, &drop, token, &format!("fan {i}")).await;
        admissions.push(me["admission_token"].as_str().unwrap().to_owned());
    }
    check_books(&h, &drop, &fans, "5 back").await;
    let mut offered: Vec<String> = offers(&drop).await.into_iter().map(|(f, _)| f).collect();
    offered.sort();
    let mut first_five: Vec<String> = fans.iter().take(5).map(|(f, _)| f.clone()).collect();
    first_five.sort();
    assert_eq!(offered, first_five, "exactly the first five are offered");
    for (i, (_, token)) in fans.iter().enumerate().skip(5).take(3) {
        let (_, me) = h.me(&drop, token).await;
        assert_eq!(me["status"], "waitlisted", "fan {i}: {me}");
        assert_eq!(me["ahead"], (i - 5) as i64, "fan {i}: {me}");
        assert_eq!(me["came_back"], 5, "fan {i}: {me}");
    }
    for (i, ((_, token), admission)) in fans.iter().zip(&admissions).enumerate() {
        buy(&h, &drop, token, admission, &format!("ok_w{i}")).await;
        check_books(&h, &drop, &fans, &format!("fan {i} bought")).await;
    }
    assert_eq!(h.counts(&drop).await, (7, 0, 0, 7));

    // The admission runs count what comes back by the rises of available + held they see: a run
    // sees it sold out again before the next unit comes back (docs/API.md, `came_back`).
    testkit::eventually("an admission run sees the drop sold out again", || async {
        common::redis_cli(&[
            "HGET",
            &format!("fg:{{{drop}}}:admission"),
            "free_units_seen",
        ])
        .await
            == "0"
    })
    .await;
    // One more comes back on a short window; its fan (5) lets it lapse: it passes to fan 6.
    set_offer_window(&h, &drop, OFFER_WINDOW_S).await;
    add_stock(&h, &drop, 1, "wl-restock-3").await;
    until_offered(&h, &drop, &fans[5].1, "fan 5").await;
    // Fan 6's own offer needn't be short.
    set_offer_window(&h, &drop, LONG_OFFER_WINDOW_S).await;
    check_books(&h, &drop, &fans, "fan 5 offered").await;
    let (_, six) = h.me(&drop, &fans[6].1).await;
    assert_eq!(six["status"], "waitlisted", "{six}");
    until_offered(&h, &drop, &fans[6].1, "fan 6, once fan 5's offer lapsed").await;
    let (_, five) = h.me(&drop, &fans[5].1).await;
    assert_eq!(five["status"], "done", "{five}");
    check_books(&h, &drop, &fans, "fan 5's offer passed on").await;
    let (_, seven) = h.me(&drop, &fans[7].1).await;
    assert_eq!(seven["status"], "waitlisted", "{seven}");
    assert_eq!(seven["ahead"], 0, "{seven}");
    assert_eq!(seven["came_back"], 6, "{seven}");
    testkit::eventually("fan 5's lapsed offer leaves the offers set", || async {
        let now: Vec<String> = offers(&drop).await.into_iter().map(|(f, _)| f).collect();
        !now.contains(&fans[5].0)
    })
    .await;
    assert!(offers(&drop).await.iter().any(|(f, _)| *f == fans[6].0));
    assert_eq!(h.counts(&drop).await, (8, 1, 0, 7));
    h.shutdown().await;
}

/// Without the waiting list (the default), a sold-out line closes for good, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_waiting_list_a_sold_out_line_closes() {
    let h = Harness::start().await;
    let drop = h
        .queue_drop(
            1,
            1,
            json!({"rate_per_s": 1000, "burst": 1000, "admit_margin_pct": 0}),
            None,
        )
        .await;
    let (_, buyer) = h.fan("buyer");
    let admission = h.join_until_admitted(&drop, &buyer).await;
    let (_, waiter) = h.fan("waiter");
    assert_eq!(h.join(&drop, &waiter).await.0, 201);
    buy(&h, &drop, &buyer, &admission, "ok_1").await;
    testkit::eventually("the waiter hears sold_out", || async {
        h.me(&drop, &waiter).await.1["status"] == "sold_out"
    })
    .await;
    let (_, late) = h.fan("late");
    let (_, v) = h.join(&drop, &late).await;
    assert_eq!(v["status"], "sold_out", "{v}");
    h.shutdown().await;
}

/// The setting's bad values are refused with the API's error and create nothing; its defaults
/// show in the drop's admission settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_waitlist_settings_are_refused() {
    let h = Harness::start().await;
    for (admission, says) in [
        (
            json!({"waitlist": true, "offer_window_s": 9}),
            "offer_window_s",
        ),
        (
            json!({"waitlist": true, "offer_window_s": 3601}),
            "offer_window_s",
        ),
        (json!({"waitlist": "yes"}), "boolean"),
        // An open drop has no line, so no waiting list.
        (json!({"mode": "open", "waitlist": true}), "waitlist"),
    ] {
        let mut adm = json!({"mode": "queue"});
        for (k, v) in admission.as_object().unwrap() {
            adm[k] = v.clone();
        }
        let (status, v) = h
            .seller_post(
                "/v1/drops",
                json!({"name": "bad waitlist", "per_fan_limit": 1, "hold_ttl_s": 300,
                       "admission": adm,
                       "inventory": {"kind": "ga", "skus": [
                           {"sku": "TEE", "name": "Tee", "price_cents": 100, "quantity": 1}]}}),
            )
            .await;
        assert_eq!(
            (status, code(&v)),
            (422, "invalid_request"),
            "{admission}: {v}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains(says),
            "{admission}: {v}"
        );
    }
    // Ops may change the offer window live (bounds too), not switch the waiting list.
    let drop = waitlist_drop(&h, 1).await;
    let url = h.url(&format!("/v1/drops/{drop}/admission"));
    let (status, v) = h
        .call(
            h.http
                .put(&url)
                .bearer_auth(&h.ops_key)
                .json(&json!({"offer_window_s": 30})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["admission"]["offer_window_s"], 30, "{v}");
    assert_eq!(v["admission"]["waitlist"], true, "{v}");
    let (status, v) = h
        .call(
            h.http
                .put(&url)
                .bearer_auth(&h.ops_key)
                .json(&json!({"offer_window_s": 5})),
        )
        .await;
    assert_eq!((status, code(&v)), (422, "invalid_request"), "{v}");
    let (status, _) = h
        .call(
            h.http
                .put(&url)
                .bearer_auth(&h.ops_key)
                .json(&json!({"waitlist": false})),
        )
        .await;
    assert_eq!(status, 422);
    // Off by default, with the default window.
    let plain = h.queue_drop(1, 1, json!({}), None).await;
    let (status, v) = h
        .call(
            h.http
                .get(h.url(&format!("/v1/drops/{plain}/admission")))
                .bearer_auth(&h.ops_key),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["admission"]["waitlist"], false, "{v}");
    assert_eq!(
        v["admission"]["offer_window_s"],
        engine::drops::DEFAULT_OFFER_WINDOW_S,
        "{v}"
    );
    h.shutdown().await;
}

/// The queue page on the waiting list, in headless Chromium at phone width: it says where the
/// fan stands and how many came back ("Sold out — you're #2 on the waiting list; …"), follows
/// the list as units come back, and takes the fan to the shop when one is offered to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_page_shows_the_waiting_list_and_takes_an_offer_to_the_shop() {
    let _one = testkit::ONE_BROWSER.lock().await;
    let h = Harness::start_for_pages().await;
    let drop = waitlist_drop(&h, 1).await;
    let (_, buyer) = h.fan("buyer");
    let admission = h.join_until_admitted(&drop, &buyer).await;
    // One fan ahead of ours, in line before the sell-out.
    let (_, ahead) = h.fan("ahead");
    assert_eq!(h.join(&drop, &ahead).await.0, 201);
    buy(&h, &drop, &buyer, &admission, "ok_page").await;
    testkit::eventually("the line becomes the waiting list", || async {
        h.me(&drop, &ahead).await.1["status"] == "waitlisted"
    })
    .await;

    let p = testkit::open_browser("queue-waitlist", testkit::PHONE).await;
    p.goto(&format!("{}/drops/{drop}", h.queue.url())).await;
    p.wait_text("#drop-name", "the drop's name", |t| t == "queue test")
        .await;
    p.el("#signin:not([hidden])").await;
    p.fill(
        "#fan-name",
        &format!("listed-{:08x}", rand::random::<u32>()),
    )
    .await;
    p.click("#signin-form button[type=submit]").await;
    p.el("#line:not([hidden])").await;
    let words = p
        .wait_text("#line-state", "the waiting list, #2", |t| {
            t.contains("#2 on the waiting list")
        })
        .await;
    assert!(
        words.starts_with("Sold out — you're #2 on the waiting list; none has come back yet"),
        "{words}"
    );
    assert_eq!(p.text("#eta").await, "if stock comes back");
    p.shot("waitlisted").await;

    // One comes back: offered to the fan ahead; ours is next, and hears it came back.
    add_stock(&h, &drop, 1, "page-restock-1").await;
    until_offered(&h, &drop, &ahead, "the fan ahead").await;
    let words = p
        .wait_text("#line-state", "#1, one came back", |t| {
            t.contains("#1 on the waiting list; 1 came back since it sold out")
        })
        .await;
    p.shot("one-came-back").await;
    assert!(words.starts_with("Sold out — "), "{words}");

    // Another comes back: it is offered to our fan, and the page takes them to the shop.
    add_stock(&h, &drop, 1, "page-restock-2").await;
    let shop = format!("{}/drops/{drop}/shop", h.queue.url());
    p.wait_url("the shop", |u| u == shop).await;
    p.el("#quantity-TEE").await;
    p.shot("offered").await;
    p.close().await;
    h.shutdown().await;
}
