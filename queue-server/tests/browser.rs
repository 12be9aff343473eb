//! The fan's queue page (`GET /drops/{id}` on queue-server, static/queue.{html,js,css}) driven in
//! a real headless Chromium at phone width, against an in-process booking-api and queue-server per
//! test: the fan waits (paused by ops), watches the line move, is admitted, lands on the shop
//! (`/drops/{id}/shop`, the same origin) and buys; a link carrying another fan's token asks
//! first; a reload keeps the place; a sold-out drop says so; stock all in others' holds says so,
//! and the fan gets in when it comes back. The browser harness (one browser at a time, bounded
//! waits, screenshots `target/browser-artifacts/queue-<test>-<step>.png`) is `testkit::browser`.
mod common;

use common::Harness;
use engine::ids::DropId;
use serde_json::{json, Value};
use testkit::{eventually, open_browser, Page, ONE_BROWSER, PHONE};

/// Opens the drop's queue page, joins as a new fan named `name`-<random>, and waits for the
/// line's card; returns the fan's name.
async fn join_in_browser(p: &Page, h: &Harness, drop: &DropId, name: &str) -> String {
    p.goto(&format!("{}/drops/{drop}", h.queue.url())).await;
    // The page learns the drop's name from booking-api (cross-origin): CORS works.
    p.wait_text("#drop-name", "the drop's name", |t| t == "queue test")
        .await;
    p.el("#signin:not([hidden])").await;
    let fan = format!("{name}-{:08x}", rand::random::<u32>());
    p.fill("#fan-name", &fan).await;
    p.shot("signin").await;
    p.click("#signin-form button[type=submit]").await;
    p.el("#line:not([hidden])").await;
    p.wait_text("#fan-label", "the fan's name", |t| t == fan)
        .await;
    fan
}

/// The fan the queue page keeps for `drop` in localStorage: (name, fan token).
async fn stored_fan(p: &Page, drop: &DropId) -> (String, String) {
    let raw = p.local_storage(&format!("floodgate.queue.{drop}")).await;
    let v: Value = raw
        .as_deref()
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(Value::Null);
    match (v["name"].as_str(), v["token"].as_str()) {
        (Some(n), Some(t)) => (n.to_owned(), t.to_owned()),
        _ => p.fail(&format!("no fan kept for the drop: {raw:?}")).await,
    }
}

/// Waits until the page says `state` (the `data-state` of #line-state); returns its words.
async fn line_state(p: &Page, state: &str) -> String {
    p.el(&format!("#line-state[data-state=\"{state}\"]")).await;
    p.text("#line-state").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_page_fan_waits_is_admitted_and_buys() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start_for_pages().await;
    let drop = h.queue_drop(20, 2, json!({"paused": true}), None).await;
    // Two fans join first (over HTTP), so ours has people ahead.
    for name in ["early-1", "early-2"] {
        let (_, token) = h.fan(name);
        let (status, v) = h.join(&drop, &token).await;
        assert_eq!(status, 201, "{v}");
    }
    let p = open_browser("queue-waits_then_buys", PHONE).await;
    let fan = join_in_browser(&p, &h, &drop, "queue-fan").await;

    // Paused by ops: the page says so, with the place and the two ahead.
    let words = line_state(&p, "paused").await;
    assert!(words.contains("paused"), "{words}");
    p.wait_text("#ahead", "two people ahead", |t| t == "2")
        .await;
    assert_eq!(p.text("#place").await, "#3");
    assert_eq!(p.text("#eta").await, "on hold");
    let bar = "#progress[role=progressbar][aria-valuemin=\"0\"][aria-valuemax=\"100\"]";
    let valuetext = p.attr(bar, "aria-valuetext").await;
    assert_eq!(valuetext, "2 people ahead of you");
    let status = p.attr("#status", "aria-live").await;
    assert_eq!(status, "polite");
    p.shot("paused").await;

    // Ops resume with room for one shopper: the first early fan goes in. The page counts the
    // admission from the tick frames (one fewer ahead) and stops saying "paused".
    h.set_admission(
        &drop,
        json!({"paused": false, "max_active": 1, "rate_per_s": 10, "burst": 5}),
    )
    .await;
    p.wait_text("#ahead", "one person ahead", |t| t == "1")
        .await;
    let words = line_state(&p, "waiting").await;
    assert!(words.contains("in line"), "{words}");
    // An ETA from the admission rate; once that one admission has left the measuring window
    // (a slow machine), the page honestly says it waits for shoppers instead.
    let eta = p.text("#eta").await;
    assert!(
        eta == "under a minute" || eta.starts_with("about ") || eta == "when shoppers finish",
        "an ETA from the admission rate: {eta}"
    );
    let now: u32 = p.attr(bar, "aria-valuenow").await.parse().unwrap();
    assert!(now > 0 && now < 100, "progress {now}");
    p.shot("moving").await;

    // Room for everyone: our fan is admitted and lands on the shop (the booking page, served by
    // queue-server from the queue page's own origin), signed in as the same fan and with the
    // admission token, neither of which ever went into an address.
    h.set_admission(&drop, json!({"max_active": 10})).await;
    let booking = format!("{}/drops/{drop}/shop", h.queue.url());
    p.wait_url("the booking page", |u| u == booking).await;
    p.wait_text("#drop-name", "the drop's name", |t| t == "queue test")
        .await;
    p.el("#whoami:not([hidden])").await;
    assert_eq!(p.text("#fan-label").await, fan);
    p.shot("booking").await;

    p.el("#quantity-TEE option[value=\"2\"]").await;
    let select = p.el("#quantity-TEE:enabled").await;
    if let Err(e) = select.select_by_value("2").await {
        p.fail(&format!("choose quantity 2: {e}")).await;
    }
    p.click("#hold-button:enabled").await;
    p.el("#hold-view:not([hidden])").await;
    p.wait_text("#hold-items", "the held tees", |t| t.contains("2 × Tee"))
        .await;
    p.shot("held").await;
    p.fill("#pay-reference", "ok_queue_1").await;
    p.click("#pay:enabled").await;
    p.el("#order-view:not([hidden])").await;
    let order_id = p
        .wait_text("#order-id", "the order number", |t| {
            !t.is_empty() && !t.contains("being finalised")
        })
        .await;
    p.shot("order").await;

    // The order is the fan's, in this drop.
    let token = p
        .local_storage("floodgate.fan_token")
        .await
        .expect("the booking page keeps the fan token");
    let (status, o) = h.get(&format!("/v1/orders/{order_id}"), Some(&token)).await;
    assert_eq!(status, 200, "{o}");
    assert_eq!(o["fan"], fan.as_str());
    assert_eq!(o["drop_id"], drop.as_str());
    assert_eq!(o["items"][0]["quantity"], 2);
    p.close().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_page_reload_keeps_the_place() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start_for_pages().await;
    let drop = h.queue_drop(20, 2, json!({"paused": true}), None).await;
    let (_, early) = h.fan("early");
    assert_eq!(h.join(&drop, &early).await.0, 201);
    let p = open_browser("queue-reload_keeps_place", PHONE).await;
    join_in_browser(&p, &h, &drop, "reloading-fan").await;

    line_state(&p, "paused").await;
    p.wait_text("#ahead", "one person ahead", |t| t == "1")
        .await;
    let place = p.text("#place").await;
    let raw_place = p.attr("#place", "data-place").await;
    assert_eq!(place, "#2");
    p.shot("before").await;
    let (name, token) = stored_fan(&p, &drop).await;

    p.reload().await;
    // Straight back in line: no sign-in, the same place, still paused, still one ahead.
    p.el("#line:not([hidden])").await;
    p.wait_text("#place", "the place", |t| t != "–").await;
    assert_eq!(p.text("#place").await, place);
    assert_eq!(p.attr("#place", "data-place").await, raw_place);
    line_state(&p, "paused").await;
    p.wait_text("#ahead", "one person ahead", |t| t == "1")
        .await;
    assert_eq!(p.text("#fan-label").await, name);
    assert!(p.el("#signin").await.is_displayed().await.ok() == Some(false));
    p.shot("after").await;

    // The server agrees: one place for this fan, the one the page shows.
    let (status, me) = h.me(&drop, &token).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["place"].to_string(), raw_place);
    assert_eq!(me["ahead"], 1);
    assert_eq!(me["paused"], true);
    p.close().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_page_shows_sold_out() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start_for_pages().await;
    let drop = h.queue_drop(1, 1, json!({"rate_per_s": 10}), None).await;
    // Another fan goes through the line and buys the only tee.
    let (_, buyer) = h.fan("buyer");
    let admission = h.join_until_admitted(&drop, &buyer).await;
    let (status, hold) = h.reserve_admitted(&drop, &buyer, &admission, 1).await;
    assert_eq!(status, 201, "{hold}");
    let (status, order) = h
        .confirm(&buyer, hold["hold_id"].as_str().unwrap(), "ok_sold_out")
        .await;
    assert_eq!(status, 201, "{order}");

    let p = open_browser("queue-sold_out", PHONE).await;
    join_in_browser(&p, &h, &drop, "too-late").await;
    let words = line_state(&p, "sold_out").await;
    assert!(words.contains("Sold out"), "{words}");
    // Said in the polite live region too, for screen readers (once the state has settled).
    eventually("the live region says sold out", || async {
        let said = p
            .client
            .execute(
                "return document.getElementById('status').textContent;",
                vec![],
            )
            .await
            .expect("read #status");
        said.as_str().is_some_and(|t| t.contains("Sold out"))
    })
    .await;
    p.shot("sold-out").await;
    p.close().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_page_shows_all_held_then_admits_when_the_stock_returns() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start_for_pages().await;
    // One tee. A 100 % margin lets one more fan in beside a shopper who may still buy it, once
    // the tee is back on sale.
    let drop = h
        .queue_drop(
            1,
            1,
            json!({"rate_per_s": 10, "admit_margin_pct": 100}),
            None,
        )
        .await;
    let (_, holder) = h.fan("holder");
    let admission = h.join_until_admitted(&drop, &holder).await;
    let (status, hold) = h.reserve_admitted(&drop, &holder, &admission, 1).await;
    assert_eq!(status, 201, "{hold}");

    let p = open_browser("queue-all_held", PHONE).await;
    join_in_browser(&p, &h, &drop, "hopeful").await;
    let words = line_state(&p, "all_held").await;
    assert!(words.contains("baskets"), "{words}");
    assert_eq!(p.text("#place").await, "#2");
    assert_eq!(p.text("#eta").await, "when stock returns");
    p.shot("all-held").await;

    // The holder gives the tee back: it is on sale again, the line moves, and the page takes
    // our fan to the booking page.
    assert_eq!(
        h.release(&holder, hold["hold_id"].as_str().unwrap()).await,
        204
    );
    let booking = format!("{}/drops/{drop}/shop", h.queue.url());
    p.wait_url("the booking page", |u| u == booking).await;
    p.el("#quantity-TEE").await;
    p.shot("admitted").await;
    p.close().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_page_before_opening_shows_the_pre_queue() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start_for_pages().await;
    let drop = h.queue_drop(20, 2, json!({}), Some(3600)).await;
    let p = open_browser("queue-pre_queue", PHONE).await;
    join_in_browser(&p, &h, &drop, "early-bird").await;
    let words = line_state(&p, "pre_queue").await;
    assert!(
        words.contains("The line opens at") && words.contains("fair draw"),
        "{words}"
    );
    // The countdown to opening (about an hour) and how many wait, from the ticks.
    p.wait_text("#line-state", "the countdown and the count", |t| {
        t.contains("(in 59:") && t.contains("1 fan is waiting")
    })
    .await;
    assert_eq!(p.text("#place").await, "–");
    p.shot("pre-queue").await;
    p.close().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_page_at_opening_says_opening_until_its_place_arrives() {
    let _one = ONE_BROWSER.lock().await;
    let mut cfg = common::test_config();
    // Exact positions once a minute: after opening, the page waits for its place from the draw
    // well past the countdown's end (the page once showed "in 0:00" all that time).
    cfg.queue.position_interval_ms = 60_000;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port();
    cfg.queue.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    cfg.http.cors_allow_origins = vec![format!("http://127.0.0.1:{port}")];
    let h = Harness::start_with(cfg).await;
    // Paused: nobody is admitted at opening either, so only a position could end the wait.
    let drop = h.queue_drop(20, 2, json!({"paused": true}), Some(12)).await;
    let p = open_browser("queue-opening", PHONE).await;
    join_in_browser(&p, &h, &drop, "on-the-dot").await;
    line_state(&p, "pre_queue").await;
    let words = p
        .wait_text("#line-state", "the opening notice", |t| {
            t.contains("Opening")
        })
        .await;
    assert!(!words.contains("0:00"), "{words}");
    assert_eq!(p.text("#place").await, "–");
    p.shot("opening").await;
    p.close().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_page_survives_restarts_and_polls_when_sockets_fail() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start_for_pages().await;
    let drop = h.queue_drop(20, 2, json!({"paused": true}), None).await;
    let (_, early) = h.fan("early");
    assert_eq!(h.join(&drop, &early).await.0, 201);
    let p = open_browser("queue-restarts", PHONE).await;
    join_in_browser(&p, &h, &drop, "steadfast").await;
    line_state(&p, "paused").await;
    p.wait_text("#ahead", "one person ahead", |t| t == "1")
        .await;
    let place = p.text("#place").await;

    // A deploy: queue-server closes every socket with 1012 and comes back. The page reconnects
    // by itself and goes on counting: the early fan is let in, nobody is ahead of ours now.
    let h = h.restart_queue().await;
    h.set_admission(
        &drop,
        json!({"paused": false, "max_active": 1, "rate_per_s": 10, "burst": 5}),
    )
    .await;
    p.wait_text("#ahead", "nobody ahead", |t| t == "0").await;
    line_state(&p, "waiting").await;
    assert_eq!(p.text("#place").await, place);
    p.wait_text("#conn", "live updates", |t| t.starts_with("Live"))
        .await;
    p.shot("after-restart").await;

    // From now on this browser's WebSockets fail (as behind a proxy that refuses them). After
    // the next restart the page gives up on sockets and polls, still in the same place.
    p.client
        .execute(
            "window.WebSocket = function () { throw new Error('no WebSockets here'); };",
            vec![],
        )
        .await
        .expect("break WebSockets");
    let h = h.restart_queue().await;
    p.wait_text("#conn", "the polling notice", |t| {
        t.contains("checking every few seconds")
    })
    .await;
    assert_eq!(p.text("#place").await, place);
    assert_eq!(p.text("#ahead").await, "0");
    p.shot("polling").await;

    // Room for our fan: the poll answers `admitted` and the page goes to the shop.
    h.set_admission(&drop, json!({"max_active": 10})).await;
    let booking = format!("{}/drops/{drop}/shop", h.queue.url());
    p.wait_url("the booking page", |u| u == booking).await;
    p.el("#whoami:not([hidden])").await;
    p.el("#pick:not([hidden])").await;
    p.close().await;
    h.shutdown().await;
}

/// Login CSRF: a link someone else made (`/drops/D#fan_token=<their token>`) must never switch the
/// fan this browser waits as. The page asks ("Continue as …?") and stores nothing until the fan
/// answers; declining keeps the fan and their place in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_page_crafted_link_asks_before_switching_fans() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start_for_pages().await;
    let drop = h.queue_drop(20, 2, json!({"paused": true}), None).await;
    let (attacker, attacker_token) = h.fan("attacker");
    let p = open_browser("queue-crafted_link", PHONE).await;
    let fan = join_in_browser(&p, &h, &drop, "victim").await;
    line_state(&p, "paused").await;
    let place = p.text("#place").await;
    let (_, token) = stored_fan(&p, &drop).await;

    let page = format!("{}/drops/{drop}", h.queue.url());
    p.goto("about:blank").await;
    p.goto(&format!("{page}#fan_token={attacker_token}")).await;
    let asks = p
        .wait_text("#switch:not([hidden])", "the question", |t| {
            t.contains(&format!("Continue as {attacker}"))
        })
        .await;
    assert!(asks.contains(&fan), "it names who waits here: {asks}");
    p.shot("asks").await;
    assert_eq!(stored_fan(&p, &drop).await, (fan.clone(), token.clone()));

    p.click("#switch-decline").await;
    p.wait_text("#fan-label", "the same fan", |t| t == fan)
        .await;
    line_state(&p, "paused").await;
    p.wait_text("#place", "the same place", |t| t == place)
        .await;
    assert_eq!(stored_fan(&p, &drop).await, (fan, token));
    // The attacker's fan never joined.
    let (status, _) = h.me(&drop, &attacker_token).await;
    assert_eq!(status, 404);
    p.close().await;
    h.shutdown().await;
}

/// At a phone's width the queue page, waiting in a paused line, is no wider than the screen (the
/// other tests here run at phone width too, but none measures it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_page_fits_a_phone() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start_for_pages().await;
    let drop = h.queue_drop(20, 2, json!({"paused": true}), None).await;
    let p = open_browser("queue-phone", PHONE).await;
    join_in_browser(&p, &h, &drop, "phone-fan").await;
    line_state(&p, "paused").await;
    let overflow = p.sideways_overflow_px().await;
    assert!(overflow <= 0, "wider than the phone by {overflow}px");
    p.shot("phone").await;
    p.close().await;
    h.shutdown().await;
}
