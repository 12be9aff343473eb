//! The seller's back office (`GET /seller`, static/seller.{html,js,css}) in a real headless
//! Chromium (testkit::browser), each flow of issue 15 at desktop width with the fan's booking page
//! open in a second window where the flow reaches the fan: a GA drop and a seated drop created
//! from the back office and bought by a fan on the fan page, then seen in the seller's live counts,
//! revenue and orders; stock added from the back office and seen on the fan page without a reload;
//! the orders' CSV downloaded and parsed; a drop closed and the fan page saying so. Bad input shows
//! the API's own message and changes nothing; the page fits a phone. The page steps are
//! common::pages.
mod common;

use common::pages::{
    accept_confirms, add_sku_in_office, create_ga_in_office, create_in_office, drop_row,
    fan_sign_in, hold_seats, hold_tees, open_second_window, pay, scroll_to, seller_sign_in,
    to_other_window,
};
use common::{parse_csv, Harness};
use serde_json::json;
use testkit::{open_browser, Page, DESKTOP, ONE_BROWSER, PHONE};

/// Buys through the API as `fan` (exactly this id); the order id.
async fn buy(h: &Harness, drop: &str, fan: &str, body: serde_json::Value) -> String {
    let token = h.fan_token(fan).await;
    let (status, hold) = h.reserve(&token, drop, body).await;
    assert_eq!(status, 201, "{hold}");
    let (status, order) = h
        .confirm(&token, hold["hold_id"].as_str().unwrap(), "ok_1")
        .await;
    assert_eq!(status, 201, "{order}");
    order["order_id"].as_str().unwrap().to_owned()
}

async fn drop_count(h: &Harness) -> usize {
    let (status, v) = h.get("/v1/drops", Some(&h.seller_key)).await;
    assert_eq!(status, 200, "{v}");
    v["drops"].as_array().unwrap().len()
}

fn tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Back in the back office (the other window): the drop's counts show `counts` (each line a
/// bucket's `name: available / held / sold`), its revenue `revenue`, and a search by the fan
/// finds `order`, captured.
async fn seller_sees_the_sale(
    p: &Page,
    drop: &str,
    fan: &str,
    order: &str,
    counts: &[&str],
    revenue: &str,
) {
    to_other_window(p).await;
    let row = drop_row(drop);
    p.wait_text(
        &format!("{row} .counts"),
        "the sale in the live counts",
        |t| counts.iter().all(|c| t.contains(c)),
    )
    .await;
    p.wait_text(&format!("{row} .revenue"), "the revenue", |t| {
        t.contains(revenue)
    })
    .await;
    scroll_to(p, "drops-title").await;
    p.shot("sold").await;

    let select = p.el("#orders-drop").await;
    select.select_by_value(drop).await.unwrap();
    p.fill("#orders-fan", fan).await;
    p.click("#orders-form button[type=submit]").await;
    let orow = format!("#orders [data-order-id=\"{order}\"]");
    p.wait_text(&format!("{orow} .fan"), "the fan's order", |t| t == fan)
        .await;
    assert_eq!(p.text(&format!("{orow} .payment")).await, "captured");
    scroll_to(p, "orders-title").await;
    p.shot("orders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_a_ga_drop_made_in_the_back_office_is_bought_on_the_fan_page() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let p = open_browser("browser_seller_ga", DESKTOP).await;
    seller_sign_in(&p, &h).await;
    p.shot("signed-in").await;
    // The key is in the tab's session storage, nowhere else.
    let stored = p
        .client
        .execute(
            "return [sessionStorage.getItem('floodgate.seller_key'), localStorage.length];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(stored, json!([h.seller_key, 0]));

    // Bad input: the API's own message, and no drop.
    let before = drop_count(&h).await;
    p.fill("#drop-name", "Bad tees").await;
    p.fill("#sku-rows .sku-qty", "-1").await;
    p.click("#create-button").await;
    let err = p
        .wait_text("#create-error", "the API's refusal", |t| !t.is_empty())
        .await;
    assert!(err.contains("quantity"), "{err}");
    assert_eq!(drop_count(&h).await, before);
    p.shot("refused").await;

    // Two SKUs: tees at 25.00 and caps at 12.50.
    let tag = tag();
    let name = format!("Back office tees {tag} <b>x</b>");
    add_sku_in_office(&p, "CAP", "Cap", 1250, 4).await;
    let drop = create_ga_in_office(&p, &name, 5).await;
    let v = h.drop_view(&drop).await;
    assert_eq!(v["name"], name.as_str());
    assert_eq!(v["inventory"][0]["total"], 5);
    assert_eq!(v["inventory"][1]["total"], 4);
    // The name is text, not markup.
    assert_eq!(p.text(&format!("{} a", drop_row(&drop))).await, name);

    // A fan buys two tees on the fan page, in a window of their own.
    open_second_window(&p, &h.url(&format!("/drops/{drop}"))).await;
    p.wait_text("#drop-name", "the fan page", |t| t == name)
        .await;
    let fan = format!("ga-fan-{tag}");
    fan_sign_in(&p, &fan).await;
    hold_tees(&p, 2).await;
    let order = pay(&p, "ok_office_ga").await;
    // Another fan buys a cap, so the revenue sums two SKUs: 2 × 25.00 + 1 × 12.50.
    buy(
        &h,
        &drop,
        &format!("cap-fan-{tag}"),
        json!({"items": [{"sku": "CAP", "quantity": 1}]}),
    )
    .await;

    seller_sees_the_sale(
        &p,
        &drop,
        &fan,
        &order,
        &["TEE: 3 / 0 / 2", "CAP: 3 / 0 / 1"],
        "62.50",
    )
    .await;
    h.assert_invariants(&drop).await;
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_a_seated_drop_made_in_the_back_office_is_bought_on_the_fan_page() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let p = open_browser("browser_seller_seated", DESKTOP).await;
    seller_sign_in(&p, &h).await;
    p.click("input[name=kind][value=seated]").await;
    p.el("#seated-editor:not([hidden])").await;
    let name = format!("Back office concert {}", tag());
    p.fill("#drop-name", &name).await;
    p.fill("#section-rows .section-id", "A").await;
    p.fill("#section-rows .section-price", "9000").await;
    p.fill("#section-rows .section-rows", "4, 4").await;
    p.wait_text("#preview-summary", "the preview", |t| {
        t == "1 section, 8 seats"
    })
    .await;
    p.click("#add-section").await;
    p.fill("#section-rows tr:nth-child(2) .section-id", "B")
        .await;
    p.fill("#section-rows tr:nth-child(2) .section-price", "3000")
        .await;
    p.fill("#section-rows tr:nth-child(2) .section-rows", "6")
        .await;
    p.wait_text("#preview-summary", "the preview to grow", |t| {
        t == "2 sections, 14 seats"
    })
    .await;
    p.el("#seat-preview [data-seat=\"B-1-6\"]").await;
    scroll_to(&p, "section-rows").await;
    p.shot("preview").await;
    let drop = create_in_office(&p).await;
    let v = h.drop_view(&drop).await;
    assert_eq!(v["kind"], "seated");
    assert_eq!(v["inventory"][0]["total"], 8);
    assert_eq!(v["inventory"][1]["total"], 6);

    // A fan picks two seats on the fan page's map and pays: 90.00 + 30.00.
    open_second_window(&p, &h.url(&format!("/drops/{drop}"))).await;
    p.el("#seated:not([hidden]) #seat-map button[data-seat=\"A-1-2\"]")
        .await;
    let fan = format!("seat-fan-{}", tag());
    fan_sign_in(&p, &fan).await;
    hold_seats(&p, &["A-1-2", "B-1-1"]).await;
    let order = pay(&p, "ok_office_seated").await;

    seller_sees_the_sale(
        &p,
        &drop,
        &fan,
        &order,
        &["Section A: 7 / 0 / 1", "Section B: 5 / 0 / 1"],
        "120.00",
    )
    .await;
    h.assert_invariants(&drop).await;
    p.close().await;
}

/// Stock added from the back office reaches the fan page without a reload (the page reads the
/// drop's counts again every few seconds). A refusal shows the API's message; a dismissed
/// confirmation adds nothing; a seated drop's sections have no "add stock".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_stock_added_in_the_back_office_shows_on_the_fan_page() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let p = open_browser("browser_seller_add_stock", DESKTOP).await;
    seller_sign_in(&p, &h).await;
    let drop = create_ga_in_office(&p, &format!("Restocked tees {}", tag()), 2).await;

    open_second_window(&p, &h.url(&format!("/drops/{drop}"))).await;
    p.wait_text("#inventory .avail", "the stock before", |t| {
        t.contains("2 of 2 left")
    })
    .await;
    to_other_window(&p).await;
    let row = drop_row(&drop);
    let form = format!("{row} [data-bucket=\"TEE\"] .add-stock");

    // Refused by the API: its message, nothing added.
    p.fill(&format!("{form} .add-stock-qty"), "0").await;
    p.click(&format!("{form} .add-stock-button")).await;
    let err = p
        .wait_text(
            &format!("{form} .add-stock-error"),
            "the API's refusal",
            |t| !t.is_empty(),
        )
        .await;
    assert!(err.contains("add must be in 1..="), "{err}");
    // Dismissed at the confirmation: nothing sent.
    p.client
        .execute("window.confirm = () => false;", vec![])
        .await
        .unwrap();
    p.fill(&format!("{form} .add-stock-qty"), "3").await;
    p.click(&format!("{form} .add-stock-button")).await;
    assert_eq!(h.counts(&drop).await, (2, 2, 0, 0));

    accept_confirms(&p).await;
    p.click(&format!("{form} .add-stock-button")).await;
    p.wait_text("#status", "the stock added", |t| {
        t.contains("Added 3 to TEE")
    })
    .await;
    p.wait_text(&format!("{row} .counts"), "the new total", |t| {
        t.contains("TEE: 5 / 0 / 0")
    })
    .await;
    assert!(
        p.el(&format!("{form} .add-stock-error"))
            .await
            .is_displayed()
            .await
            .ok()
            == Some(false),
        "the refusal is gone"
    );
    scroll_to(&p, "drops-title").await;
    p.shot("added").await;
    assert_eq!(h.counts(&drop).await, (5, 5, 0, 0));
    h.assert_invariants(&drop).await;

    // The fan page, never reloaded, shows the new stock.
    to_other_window(&p).await;
    p.wait_text("#inventory .avail", "the added stock", |t| {
        t.contains("5 of 5 left")
    })
    .await;
    p.shot("fan-page").await;
    p.close().await;
}

/// The orders' CSV, downloaded from the back office and parsed: one record per order, and fan
/// ids that a spreadsheet would run as a formula (`+`, `-`, `@`: fan ids can't start with `=`)
/// come out with a leading `'`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_seller_downloads_the_orders_as_csv() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 2, 300).await;
    let tag = tag();
    let mut orders = Vec::new();
    for fan in [
        format!("+fan{tag}"),
        format!("-fan{tag}"),
        format!("@fan{tag}"),
    ] {
        let order = buy(
            &h,
            &drop,
            &fan,
            json!({"items": [{"sku": "TEE", "quantity": 2}]}),
        )
        .await;
        orders.push((order, fan));
    }
    let p = open_browser("browser_seller_csv", DESKTOP).await;
    seller_sign_in(&p, &h).await;
    p.el(&format!("#orders-drop option[value=\"{drop}\"]"))
        .await;
    let select = p.el("#orders-drop").await;
    select.select_by_value(&drop).await.unwrap();
    p.click("#csv-button").await;
    p.wait_text("#status", "the download", |t| t.contains("CSV"))
        .await;
    // The page saved a Blob it fetched with the key; read that Blob back.
    let csv = p
        .client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             document.getElementById('csv-link').csvBlob.text()
               .then(done, e => done('ERR ' + e));",
            vec![],
        )
        .await
        .unwrap();
    let records = parse_csv(csv.as_str().unwrap());
    assert_eq!(
        records[0].join(","),
        "order_id,created_at,fan,items,total_cents,currency,payment_state"
    );
    assert_eq!(records.len(), 4, "{records:?}");
    for (order, fan) in &orders {
        let r = records
            .iter()
            .find(|r| &r[0] == order)
            .unwrap_or_else(|| panic!("order {order} in {records:?}"));
        assert_eq!(
            r[2],
            format!("'{fan}"),
            "a formula-looking fan id is escaped"
        );
        assert_eq!(r[3], "TEE x2");
        assert_eq!(r[4], "5000");
        assert_eq!(r[6], "captured");
    }
    p.close().await;
}

/// A drop closed from the back office: the fan page, open beside it, says so without a reload and
/// offers nothing to hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_a_drop_closed_in_the_back_office_is_closed_on_the_fan_page() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h.ga_drop(5, 2, 300).await;
    let p = open_browser("browser_seller_close", DESKTOP).await;
    seller_sign_in(&p, &h).await;
    let row = drop_row(&drop);
    p.wait_text(&format!("{row} .state"), "the drop open", |t| t == "open")
        .await;

    open_second_window(&p, &h.url(&format!("/drops/{drop}"))).await;
    fan_sign_in(&p, &format!("close-fan-{}", tag())).await;
    p.el("#hold-button:enabled").await;
    to_other_window(&p).await;
    accept_confirms(&p).await;
    p.click(&format!("{row} .close-drop")).await;
    p.wait_text(&format!("{row} .state"), "the drop closed", |t| {
        t == "closed"
    })
    .await;
    // A closed drop's SKUs take no stock: the form is gone.
    assert!(
        p.el(&format!("{row} .add-stock"))
            .await
            .is_displayed()
            .await
            .ok()
            == Some(false),
        "add stock on a closed drop"
    );
    assert_eq!(h.drop_view(&drop).await["status"], "closed");
    p.shot("closed").await;

    to_other_window(&p).await;
    p.wait_text("#drop-notice", "the fan page saying it's closed", |t| {
        t.contains("This drop is closed")
    })
    .await;
    p.wait_text("#drop-meta", "the closed badge", |t| t.contains("Closed"))
        .await;
    let hold = p.el("#hold-button").await;
    assert_eq!(
        hold.is_enabled().await.ok(),
        Some(false),
        "Hold after close"
    );
    p.shot("fan-page").await;
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_seller_page_fits_a_phone() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h.ga_drop(5, 2, 300).await;
    let p = open_browser("browser_seller_phone", PHONE).await;
    seller_sign_in(&p, &h).await;
    p.wait_text(
        &format!("{} .counts", drop_row(&drop)),
        "the drop's counts",
        |t| t.contains("TEE: 5 / 0 / 0"),
    )
    .await;
    let overflow = p.sideways_overflow_px().await;
    assert!(overflow <= 0, "the page scrolls sideways by {overflow}px");
    p.shot("phone").await;
    p.close().await;
}
