//! The seller's back office (`GET /seller`, static/seller.{html,js,css}) in a real headless
//! Chromium (testkit::browser): sign in with the seller key, create a GA drop and a seated drop
//! from the page and buy from each as a fan (through the API, for speed), see the live counts and
//! revenue, search the orders, download the CSV and parse it, close a drop; bad input shows the
//! API's own message and creates nothing; the page fits a phone.
mod common;

use common::Harness;
use serde_json::json;
use testkit::{open_browser, Page, DESKTOP, ONE_BROWSER, PHONE};

async fn sign_in(p: &Page, h: &Harness) {
    p.goto(&h.url("/seller")).await;
    p.el("#signin:not([hidden])").await;
    p.fill("#seller-key", &h.seller_key).await;
    p.click("#signin-form button[type=submit]").await;
    p.el("#office:not([hidden])").await;
}

/// Submits the create form and returns the new drop's id.
async fn create(p: &Page) -> String {
    p.click("#create-button").await;
    p.el("#create-ok:not([hidden])").await;
    let id = p.attr("#create-ok", "data-drop-id").await;
    assert!(id.starts_with('d'), "drop id {id:?}");
    id
}

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

/// Scrolls the element with this id to the top of the viewport (for the screenshots).
async fn scroll_to(p: &Page, id: &str) {
    p.client
        .execute(
            "document.getElementById(arguments[0]).scrollIntoView();",
            vec![json!(id)],
        )
        .await
        .unwrap();
}

async fn drop_count(h: &Harness) -> usize {
    let (status, v) = h.get("/v1/drops", Some(&h.seller_key)).await;
    assert_eq!(status, 200, "{v}");
    v["drops"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_seller_creates_a_ga_drop_sells_exports_and_closes() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let p = open_browser("browser_seller_ga", DESKTOP).await;
    sign_in(&p, &h).await;
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

    let tag = format!("{:08x}", rand::random::<u32>());
    let name = format!("Back office tees {tag} <b>x</b>");
    p.fill("#drop-name", &name).await;
    p.fill("#sku-rows .sku-qty", "5").await;
    let drop = create(&p).await;
    let v = h.drop_view(&drop).await;
    assert_eq!(v["name"], name.as_str());
    assert_eq!(v["inventory"][0]["total"], 5);

    let fan = format!("-fan{tag}");
    let order = buy(
        &h,
        &drop,
        &fan,
        json!({"items": [{"sku": "TEE", "quantity": 2}]}),
    )
    .await;
    let row = format!("#drops [data-drop-id=\"{drop}\"]");
    p.wait_text(
        &format!("{row} .counts"),
        "the sale in the live counts",
        |t| t.contains("TEE: 3 / 0 / 2"),
    )
    .await;
    let revenue = p.text(&format!("{row} .revenue")).await;
    assert!(revenue.contains("50.00"), "{revenue}");
    // The name is text, not markup.
    let shown = p.text(&format!("{row} a")).await;
    assert_eq!(shown, name);
    scroll_to(&p, "drops-title").await;
    p.shot("sold").await;

    // Orders: search by fan.
    let select = p.el("#orders-drop").await;
    select.select_by_value(&drop).await.unwrap();
    p.fill("#orders-fan", &fan).await;
    p.click("#orders-form button[type=submit]").await;
    let orow = format!("#orders [data-order-id=\"{order}\"]");
    p.wait_text(&format!("{orow} .fan"), "the fan's order", |t| t == fan)
        .await;
    assert_eq!(p.text(&format!("{orow} .payment")).await, "captured");
    scroll_to(&p, "orders-title").await;
    p.shot("orders").await;

    // CSV: the page downloads it (a Blob it fetched with the key); read that Blob and parse it.
    p.fill("#orders-fan", "").await;
    p.click("#csv-button").await;
    p.wait_text("#status", "the download", |t| t.contains("CSV"))
        .await;
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
    let csv = csv.as_str().unwrap().to_owned();
    let lines: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines[0],
        "order_id,created_at,fan,items,total_cents,currency,payment_state"
    );
    assert_eq!(lines.len(), 2, "{csv}");
    let cells: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(cells[0], order);
    assert_eq!(
        cells[2],
        format!("'{fan}"),
        "a formula-looking fan id is escaped"
    );
    assert_eq!(cells[3], "TEE x2");
    assert_eq!(cells[6], "captured");

    // Close it.
    p.client
        .execute("window.confirm = () => true;", vec![])
        .await
        .unwrap();
    p.click(&format!("{row} .close-drop")).await;
    p.wait_text(&format!("{row} .state"), "the drop closed", |t| {
        t == "closed"
    })
    .await;
    assert_eq!(h.drop_view(&drop).await["status"], "closed");
    p.shot("closed").await;
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_seller_creates_a_seated_drop_with_a_live_preview() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let p = open_browser("browser_seller_seated", DESKTOP).await;
    sign_in(&p, &h).await;
    p.click("input[name=kind][value=seated]").await;
    p.el("#seated-editor:not([hidden])").await;
    p.fill("#drop-name", "Back office concert").await;
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
    let drop = create(&p).await;
    let v = h.drop_view(&drop).await;
    assert_eq!(v["kind"], "seated");
    assert_eq!(v["inventory"][0]["total"], 8);
    assert_eq!(v["inventory"][1]["total"], 6);

    let fan = format!("seat-fan-{:08x}", rand::random::<u32>());
    buy(&h, &drop, &fan, json!({"seats": ["A-1-2"]})).await;
    let row = format!("#drops [data-drop-id=\"{drop}\"]");
    p.wait_text(&format!("{row} .counts"), "the seat sold", |t| {
        t.contains("Section A: 7 / 0 / 1") && t.contains("Section B: 6 / 0 / 0")
    })
    .await;
    let revenue = p.text(&format!("{row} .revenue")).await;
    assert!(revenue.contains("90.00"), "{revenue}");
    p.shot("sold").await;
    h.assert_invariants(&drop).await;
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_seller_page_fits_a_phone() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h.ga_drop(5, 2, 300).await;
    let p = open_browser("browser_seller_phone", PHONE).await;
    sign_in(&p, &h).await;
    p.wait_text(
        &format!("#drops [data-drop-id=\"{drop}\"] .counts"),
        "the drop's counts",
        |t| t.contains("TEE: 5 / 0 / 0"),
    )
    .await;
    let overflow = p.sideways_overflow_px().await;
    assert!(overflow <= 0, "the page scrolls sideways by {overflow}px");
    p.shot("phone").await;
    p.close().await;
}
