//! The fan's booking page (`GET /drops/{id}`, static/book.{html,js,css}) driven in a real headless
//! Chromium through ChromeDriver, against an in-process booking-api per test, and the front page
//! (`GET /`). The browser harness (one browser at a time, bounded waits, screenshots under
//! `target/browser-artifacts/`) is `testkit::browser`; the steps on the pages are common::pages.
mod common;

use common::pages::{
    add_sku_in_office, create_in_office, fan_sign_in as sign_in, fan_token, front_config,
    hold_tees, pay, seller_sign_in,
};
use common::Harness;
use serde_json::{json, Value};
use testkit::{open_browser, Page, DESKTOP, ONE_BROWSER, PHONE};

/// `m:ss` from the countdown, in seconds.
fn clock_secs(text: &str) -> Option<u64> {
    let (m, s) = text.trim().split_once(':')?;
    if s.len() != 2 {
        return None;
    }
    Some(m.parse::<u64>().ok()? * 60 + s.parse::<u64>().ok()?)
}

/// Waits until the countdown shows a time, then until it shows a smaller one; returns both.
async fn countdown_ticks(p: &Page) -> (u64, u64) {
    let sel = "#hold-view:not([hidden]) #countdown";
    let first = p
        .wait_text(sel, "a countdown", |t| clock_secs(t).is_some_and(|s| s > 0))
        .await;
    let first = clock_secs(&first).unwrap();
    let later = p
        .wait_text(sel, "the countdown to go down", |t| {
            clock_secs(t).is_some_and(|s| s < first && s > 0)
        })
        .await;
    (first, clock_secs(&later).unwrap())
}

/// The fan's live holds of `drop`, through the API.
async fn live_holds(h: &Harness, token: &str, drop: &str) -> Vec<Value> {
    let (status, v) = h
        .get(&format!("/v1/fans/me/holds?drop_id={drop}"), Some(token))
        .await;
    assert_eq!(status, 200, "{v}");
    v["holds"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["drop_id"] == drop && x["state"] == "held")
        .cloned()
        .collect()
}

async fn order_ids(h: &Harness, token: &str) -> Vec<String> {
    let (status, v) = h.get("/v1/fans/me/orders", Some(token)).await;
    assert_eq!(status, 200, "{v}");
    v["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_fan_holds_pays_and_sees_the_order() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let p = open_browser("browser_fan_holds_pays_and_sees_the_order", PHONE).await;

    p.goto(&h.url(&format!("/drops/{drop}"))).await;
    p.wait_text("#drop-name", "the drop's name", |t| t == "test drop")
        .await;
    p.wait_text("#inventory .avail", "the stock", |t| {
        t.contains("10 of 10 left")
    })
    .await;
    p.shot("drop").await;
    sign_in(&p, &format!("browser-fan-{:08x}", rand::random::<u32>())).await;
    p.shot("signed-in").await;

    hold_tees(&p, 2).await;
    let (first, later) = countdown_ticks(&p).await;
    assert!(first <= 300 && later < first, "countdown {first} → {later}");
    let items = p.text("#hold-items").await;
    assert!(items.contains("2 × Tee"), "hold items: {items}");
    let total = p.text("#hold-total").await;
    assert!(total.contains("50.00"), "hold total: {total}");
    p.shot("held").await;
    let token = fan_token(&p).await;
    assert_eq!(h.counts(&drop).await, (10, 8, 2, 0));

    let order_id = pay(&p, "ok_browser_1").await;
    let paid = p.text("#order-total").await;
    assert!(paid.contains("50.00"), "paid: {paid}");
    p.shot("order").await;

    let orders = order_ids(&h, &token).await;
    assert_eq!(orders, vec![order_id.clone()], "the fan's orders");
    let (status, o) = h.get(&format!("/v1/orders/{order_id}"), Some(&token)).await;
    assert_eq!(status, 200, "{o}");
    assert_eq!(o["drop_id"], drop.as_str());
    assert_eq!(o["items"][0]["quantity"], 2);
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    h.assert_invariants(&drop).await;

    // The page lists the order under "Your orders" too.
    p.wait_text(
        "#orders:not([hidden]) #orders-list",
        "the order in the list",
        |t| t.contains(&order_id),
    )
    .await;
    p.close().await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_refresh_resumes_the_hold() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let p = open_browser("browser_refresh_resumes_the_hold", PHONE).await;

    p.goto(&h.url(&format!("/drops/{drop}"))).await;
    sign_in(&p, &format!("browser-fan-{:08x}", rand::random::<u32>())).await;
    hold_tees(&p, 3).await;
    let (_, before) = countdown_ticks(&p).await;
    let total = p.text("#hold-total").await;
    let items = p.text("#hold-items").await;
    p.shot("held").await;
    let token = fan_token(&p).await;
    let holds = live_holds(&h, &token, &drop).await;
    assert_eq!(holds.len(), 1, "{holds:?}");
    let hold_id = holds[0]["hold_id"].as_str().unwrap().to_owned();

    p.reload().await;
    p.el("#hold-view:not([hidden])").await;
    let (after, _) = countdown_ticks(&p).await;
    assert!(
        after <= before,
        "the countdown started over after the reload: {before} → {after}"
    );
    assert_eq!(p.text("#hold-total").await, total);
    assert_eq!(p.text("#hold-items").await, items);
    assert!(p.el("#pick").await.is_displayed().await.ok() == Some(false));
    p.shot("resumed").await;

    // Still the same hold (no second one was made), still held.
    let holds = live_holds(&h, &token, &drop).await;
    assert_eq!(holds.len(), 1, "{holds:?}");
    assert_eq!(holds[0]["hold_id"].as_str().unwrap(), hold_id);
    assert_eq!(h.hold_state(&token, &hold_id).await, "held");
    assert_eq!(h.counts(&drop).await, (10, 7, 3, 0));
    h.assert_invariants(&drop).await;
    p.close().await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_seat_map_hold() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h
        .create_drop(json!({
            "name": "browser concert", "per_fan_limit": 4, "hold_ttl_s": 300,
            "admission": {"mode": "open"},
            "inventory": {"kind": "seated", "sections": [
                {"section": "A", "price_cents": 9000, "rows": [{"row": "1", "seats": 8}, {"row": "2", "seats": 8}]},
                {"section": "B", "price_cents": 5000, "rows": [{"row": "1", "seats": 10}]}
            ]}
        }))
        .await;
    // Someone else holds A-1-1 first: the map shows it taken.
    let (_, other) = h.fan("other").await;
    let (status, v) = h.reserve(&other, &drop, json!({"seats": ["A-1-1"]})).await;
    assert_eq!(status, 201, "{v}");

    let p = open_browser("browser_seat_map_hold", DESKTOP).await;
    p.goto(&h.url(&format!("/drops/{drop}"))).await;
    p.el("#seated:not([hidden]) #seat-map button[data-seat=\"A-1-3\"]")
        .await;
    sign_in(&p, &format!("browser-fan-{:08x}", rand::random::<u32>())).await;
    let taken = p.el("#seat-map button[data-seat=\"A-1-1\"]").await;
    assert_eq!(taken.is_enabled().await.ok(), Some(false), "A-1-1 is held");

    p.click("#seat-map button[data-seat=\"A-1-3\"]:enabled")
        .await;
    p.click("#seat-map button[data-seat=\"A-1-4\"]:enabled")
        .await;
    p.el("#seat-map button[data-seat=\"A-1-3\"].selected[aria-pressed=\"true\"]")
        .await;
    p.wait_text("#seat-selection", "the two seats picked", |t| {
        t.contains("2 seats selected") && t.contains("A-1-3") && t.contains("A-1-4")
    })
    .await;
    // The seat just clicked (still under the pointer) looks like the other pick, not like a
    // hovered free seat (book.css once let hover win: white number on a pale fill).
    let hovered = p
        .css("#seat-map button[data-seat=\"A-1-4\"]", "background-color")
        .await;
    let other_pick = p
        .css("#seat-map button[data-seat=\"A-1-3\"]", "background-color")
        .await;
    assert_eq!(hovered, other_pick, "a picked seat under the pointer");
    p.shot("picked").await;
    p.click("#hold-seats:enabled").await;
    p.el("#hold-view:not([hidden])").await;
    let items = p
        .wait_text("#hold-items", "the held seats", |t| {
            t.contains("Section A, row 1, seat 3") && t.contains("Section A, row 1, seat 4")
        })
        .await;
    assert_eq!(items.lines().count(), 2, "hold items: {items}");
    countdown_ticks(&p).await;
    let total = p.text("#hold-total").await;
    assert!(total.contains("180.00"), "hold total: {total}");
    p.shot("held").await;
    let token = fan_token(&p).await;
    let holds = live_holds(&h, &token, &drop).await;
    assert_eq!(holds.len(), 1, "{holds:?}");
    let hold_id = holds[0]["hold_id"].as_str().unwrap().to_owned();

    // A declined payment: the page says so and the hold stays.
    p.fill("#pay-reference", "fail_x").await;
    p.click("#pay:enabled").await;
    p.wait_text("#error:not([hidden])", "the declined message", |t| {
        t.contains("declined")
    })
    .await;
    p.el("#hold-view:not([hidden])").await;
    p.el("#pay:enabled").await;
    p.shot("declined").await;
    assert_eq!(h.hold_state(&token, &hold_id).await, "held");
    assert_eq!(order_ids(&h, &token).await, Vec::<String>::new());

    // Paying again with a good reference makes the order.
    let order_id = pay(&p, "ok_y").await;
    let ordered = p.text("#order-items").await;
    assert!(
        ordered.contains("Section A, row 1, seat 3")
            && ordered.contains("Section A, row 1, seat 4"),
        "order items: {ordered}"
    );
    assert!(
        p.el("#error").await.is_displayed().await.ok() == Some(false),
        "the decline message is gone"
    );
    p.shot("order").await;

    assert_eq!(order_ids(&h, &token).await, vec![order_id]);
    let v = h.drop_view(&drop).await;
    let a = v["inventory"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["section"] == "A")
        .unwrap()
        .clone();
    assert_eq!(
        (a["sold"].as_i64(), a["held"].as_i64()),
        (Some(2), Some(1)),
        "{a}"
    );
    h.assert_invariants(&drop).await;

    // Back on the map the two seats show as sold.
    p.click("#back-to-drop").await;
    p.el("#pick:not([hidden]) #seat-map button[data-seat=\"A-1-3\"].sold:disabled")
        .await;
    p.el("#seat-map button[data-seat=\"A-1-4\"].sold:disabled")
        .await;
    p.shot("sold-seats").await;
    p.close().await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_sold_out_is_shown() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h.ga_drop(1, 1, 300).await;
    let (_, other) = h.fan("early-bird").await;
    let (status, hold) = h
        .reserve(
            &other,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 1}]}),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    let (status, order) = h
        .confirm(&other, hold["hold_id"].as_str().unwrap(), "ok_first")
        .await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(h.counts(&drop).await, (1, 0, 0, 1));

    let p = open_browser("browser_sold_out_is_shown", PHONE).await;
    p.goto(&h.url(&format!("/drops/{drop}"))).await;
    p.wait_text("#inventory .avail", "the sold-out state", |t| {
        t.contains("Sold out")
    })
    .await;
    sign_in(&p, &format!("browser-fan-{:08x}", rand::random::<u32>())).await;
    p.wait_text("body", "Sold out on the page", |t| t.contains("Sold out"))
        .await;
    let hold = p.el("#hold-button").await;
    assert_eq!(
        hold.is_enabled().await.ok(),
        Some(false),
        "Hold is disabled when sold out"
    );
    p.shot("sold-out").await;
    h.assert_invariants(&drop).await;
    p.close().await;
    h.server.shutdown().await;
}

/// Login CSRF: a link someone else made (`/drops/D#fan_token=<their token>`) must never sign this
/// browser in as them. The page asks ("Continue as …?") and stores nothing until the fan answers;
/// declining keeps the fan who was signed in, and a reload too. Accepting is how a site with its
/// own identity provider still hands a fan over by link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_link_with_another_fans_token_asks_before_switching() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (attacker, attacker_token) = h.fan("attacker").await;
    let p = open_browser("crafted_link_asks_before_switching", PHONE).await;
    let page = h.url(&format!("/drops/{drop}"));
    p.goto(&page).await;
    let victim = format!("victim-{:08x}", rand::random::<u32>());
    sign_in(&p, &victim).await;
    let victim_token = fan_token(&p).await;

    // The crafted link, opened as a new page load (a hash change alone reloads nothing).
    let crafted = format!("{page}#fan_token={attacker_token}&fan={victim}");
    p.goto("about:blank").await;
    p.goto(&crafted).await;
    let asks = p
        .wait_text("#switch:not([hidden])", "the question", |t| {
            t.contains(&format!("Continue as {attacker}"))
        })
        .await;
    assert!(asks.contains(&victim), "it names who is signed in: {asks}");
    p.shot("asks").await;
    assert_eq!(fan_token(&p).await, victim_token, "nothing stored yet");
    // The token left the address bar at once.
    let url = p
        .wait_url("the address without the token", |u| !u.contains('#'))
        .await;
    assert!(!url.contains("fan_token"), "{url}");

    p.click("#switch-decline").await;
    p.wait_text("#fan-label", "the fan who was signed in", |t| t == victim)
        .await;
    assert_eq!(fan_token(&p).await, victim_token, "declining keeps the fan");
    p.reload().await;
    p.wait_text("#fan-label", "the same fan after a reload", |t| t == victim)
        .await;
    assert_eq!(fan_token(&p).await, victim_token);

    // Asked again and accepted: the link's fan, as a deliberate choice.
    p.goto("about:blank").await;
    p.goto(&crafted).await;
    p.click("#switch-accept").await;
    p.wait_text("#fan-label", "the link's fan", |t| t == attacker)
        .await;
    assert_eq!(fan_token(&p).await, attacker_token);
    p.close().await;
    h.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_long_seat_rows_fit_their_box_at_1280px() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h
        .create_drop(json!({
            "name": "wide hall", "per_fan_limit": 4, "hold_ttl_s": 300,
            "admission": {"mode": "open"},
            "inventory": {"kind": "seated", "sections": [
                {"section": "A", "price_cents": 9000,
                 "rows": [{"row": "1", "seats": 12}, {"row": "2", "seats": 40}, {"row": "3", "seats": 120}]}
            ]}
        }))
        .await;
    let p = open_browser("browser_long_seat_rows_fit_their_box_at_1280px", DESKTOP).await;
    p.goto(&h.url(&format!("/drops/{drop}"))).await;
    p.el("#seated:not([hidden]) #seat-map button[data-seat=\"A-3-120\"]")
        .await;
    p.shot("wide-rows").await;
    // Every row, and every seat in it, within the map's box (no horizontal overflow).
    let found = p
        .client
        .execute(
            r#"const map = document.getElementById('seat-map');
               const box = map.getBoundingClientRect();
               return [...map.querySelectorAll('.seat-row')].map((r) => {
                 const rb = r.getBoundingClientRect();
                 const last = r.lastElementChild.getBoundingClientRect();
                 return [r.getAttribute('aria-label'), rb.right <= box.right + 0.5,
                         last.right <= box.right + 0.5, r.scrollWidth <= r.clientWidth + 1];
               });"#,
            vec![],
        )
        .await
        .expect("the script runs");
    let rows = found.as_array().expect("a list of rows").clone();
    assert_eq!(rows.len(), 3, "{found}");
    for r in &rows {
        assert_eq!(
            (&r[1], &r[2], &r[3]),
            (&json!(true), &json!(true), &json!(true)),
            "{} is wider than the seat map's box at 1280 px: {found}",
            r[0]
        );
    }
    let map_scroll = p
        .client
        .execute(
            "const m = document.getElementById('seat-map'); return m.scrollWidth <= m.clientWidth + 1;",
            vec![],
        )
        .await
        .expect("the script runs");
    assert_eq!(map_scroll, json!(true), "the seat map scrolls sideways");
    p.close().await;
    h.server.shutdown().await;
}

/// The front page (`GET /`) lists a drop the seller made a moment ago in the back office, with
/// its opening time, from-price and state, and links to its booking page; a queue drop coming soon
/// links to its queue page. A name that looks like HTML is shown as text, never parsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_front_page_lists_a_drop_made_in_the_back_office() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::with_config(front_config()).await;
    let p = open_browser("browser_front_page_lists_a_new_drop", DESKTOP).await;
    seller_sign_in(&p, &h).await;
    let tag = format!("{:08x}", rand::random::<u32>());
    let name = format!("Front tee {tag} <b>bold</b>");
    // The form's own SKU row (TEE at 25.00) and a cap at 12.50, the from-price.
    p.fill("#drop-name", &name).await;
    add_sku_in_office(&p, "CAP", "Cap", 1250, 5).await;
    let drop = create_in_office(&p).await;
    let opens = time::OffsetDateTime::now_utc() + time::Duration::days(2);
    let soon = h
        .create_drop(json!({
            "name": format!("Front hoodie {tag}"), "per_fan_limit": 2, "hold_ttl_s": 300,
            "opens_at": opens.format(&time::format_description::well_known::Rfc3339).unwrap(),
            "admission": {"mode": "queue", "rate_per_s": 5.0, "max_active": 50},
            "inventory": {"kind": "ga", "skus": [{"sku": "H", "name": "Hoodie", "price_cents": 6000, "quantity": 5}]}
        }))
        .await;

    p.goto(&h.url("/")).await;
    let card = format!("#on-sale [data-drop-id=\"{drop}\"]");
    p.wait_text(&card, "the new drop on the front page", |t| {
        t.contains(&name)
    })
    .await;
    let text = p.text(&card).await;
    assert!(text.contains("12.50"), "from-price: {text}");
    assert!(text.contains("On sale"), "state: {text}");
    // The name is text: no <b> element came from it.
    let bold = p
        .client
        .execute(
            "return document.querySelectorAll(arguments[0]).length;",
            vec![json!(format!("{card} b"))],
        )
        .await
        .unwrap();
    assert_eq!(bold, json!(0), "API data parsed as HTML");
    let link = p.attr(&format!("{card} a"), "href").await;
    assert!(link.ends_with(&format!("/drops/{drop}")), "{link}");

    let soon_card = format!("#coming-soon [data-drop-id=\"{soon}\"]");
    let text = p
        .wait_text(&soon_card, "the drop coming soon", |t| {
            t.contains("Front hoodie")
        })
        .await;
    assert!(
        text.contains("Coming soon") && text.contains("60.00"),
        "{text}"
    );
    let link = p.attr(&format!("{soon_card} a"), "href").await;
    assert_eq!(link, format!("http://queue.example:8081/drops/{soon}"));
    p.shot("front").await;

    // Its link leads to the fan's booking page.
    p.click(&format!("{card} a")).await;
    p.wait_text("#drop-name", "the booking page", |t| t == name)
        .await;
    p.close().await;
    h.server.shutdown().await;
}

/// At a phone's width the front page shows its drops, one column, nothing wider than the screen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_front_page_fits_a_phone() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::with_config(front_config()).await;
    let drop = h.ga_drop(5, 2, 300).await;
    let p = open_browser("browser_front_page_fits_a_phone", PHONE).await;
    p.goto(&h.url("/")).await;
    p.wait_text(
        &format!("#on-sale [data-drop-id=\"{drop}\"]"),
        "the drop on the front page",
        |t| t.contains("test drop"),
    )
    .await;
    let overflow = p.sideways_overflow_px().await;
    assert!(overflow <= 0, "wider than the phone by {overflow}");
    p.shot("phone").await;
    p.close().await;
    h.server.shutdown().await;
}

/// At a phone's width the booking page, signed in and picking, is no wider than the screen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_book_page_fits_a_phone() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h.ga_drop(5, 2, 300).await;
    let p = open_browser("browser_book_page_fits_a_phone", PHONE).await;
    p.goto(&h.url(&format!("/drops/{drop}"))).await;
    sign_in(&p, &format!("phone-fan-{:08x}", rand::random::<u32>())).await;
    p.wait_text("#inventory .avail", "the stock", |t| {
        t.contains("5 of 5 left")
    })
    .await;
    let overflow = p.sideways_overflow_px().await;
    assert!(overflow <= 0, "wider than the phone by {overflow}");
    p.shot("phone").await;
    p.close().await;
    h.server.shutdown().await;
}
