//! Refunds in the seller's back office (`GET /seller`, static/seller.js's refund cell) in a real
//! headless Chromium (testkit::browser): an order found in the orders list is refunded from its
//! row, the row says so, and the units are back in the drop's live counts — and on sale: a fan
//! buys them again. The refund's answer reaches the page as text only.
mod common;

use common::pages::{accept_confirms, drop_row, scroll_to, seller_sign_in};
use common::Harness;
use serde_json::json;
use testkit::{open_browser, DESKTOP, ONE_BROWSER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_refund_an_order_and_see_the_units_back() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h.ga_drop(5, 5, 60).await;
    let fan = format!("refunded-{:08x}", rand::random::<u32>());
    let token = h.fan_token(&fan).await;
    let (status, hold) = h
        .reserve(
            &token,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 2}]}),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    let hold = hold["hold_id"].as_str().unwrap().to_owned();
    let (status, order) = h.confirm(&token, &hold, "ok_refund").await;
    assert_eq!(status, 201, "{order}");
    let order = order["order_id"].as_str().unwrap().to_owned();

    let p = open_browser("browser_refund", DESKTOP).await;
    seller_sign_in(&p, &h).await;
    accept_confirms(&p).await;
    let row = drop_row(&drop);
    p.wait_text(
        &format!("{row} .counts"),
        "the sale in the live counts",
        |t| t.contains("TEE: 3 / 0 / 2"),
    )
    .await;

    let select = p.el("#orders-drop").await;
    select.select_by_value(&drop).await.unwrap();
    p.fill("#orders-fan", &fan).await;
    p.click("#orders-form button[type=submit]").await;
    let orow = format!("#orders [data-order-id=\"{order}\"]");
    p.wait_text(&format!("{orow} .fan"), "the fan's order", |t| t == fan)
        .await;
    p.click(&format!("{orow} .refund-button")).await;
    p.wait_text(
        &format!("{orow} .refund-state"),
        "the refund's answer",
        |t| t.contains("back on sale"),
    )
    .await;
    scroll_to(&p, "orders-title").await;
    p.shot("refunded").await;
    // The units are back in the live counts, and the gateway paid the fan back once.
    p.wait_text(
        &format!("{row} .counts"),
        "the units back in the counts",
        |t| t.contains("TEE: 5 / 0 / 0"),
    )
    .await;
    scroll_to(&p, "drops-title").await;
    p.shot("units-back").await;
    assert_eq!(h.payment(&hold).await.refunds, 1);
    h.assert_invariants(&drop).await;
    // And on sale: another fan buys all five.
    let (_, other) = h.fan("after-refund").await;
    let (status, v) = h
        .reserve(
            &other,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 5}]}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    p.close().await;
}
