//! Cancelling a drop from the seller's back office (`GET /seller`, static/seller.js's "Cancel
//! drop" button) in a real headless Chromium (testkit::browser): the drop closes, the row shows
//! the job's progress until every order is refunded, and the units are back in the live counts.
mod common;

use common::pages::{accept_confirms, drop_row, scroll_to, seller_sign_in};
use common::Harness;
use serde_json::json;
use testkit::{open_browser, DESKTOP, ONE_BROWSER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_cancel_a_drop_and_see_every_order_refunded() {
    let _one = ONE_BROWSER.lock().await;
    let h = Harness::start().await;
    let drop = h.ga_drop(6, 5, 60).await;
    let mut holds = Vec::new();
    for i in 0..3 {
        let (_, token) = h.fan(&format!("cancelled-{i}")).await;
        let (status, v) = h
            .reserve(
                &token,
                &drop,
                json!({"items": [{"sku": "TEE", "quantity": 2}]}),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        let hold = v["hold_id"].as_str().unwrap().to_owned();
        let (status, v) = h.confirm(&token, &hold, &format!("ok_c{i}")).await;
        assert_eq!(status, 201, "{v}");
        holds.push(hold);
    }

    let p = open_browser("browser_cancel", DESKTOP).await;
    seller_sign_in(&p, &h).await;
    accept_confirms(&p).await;
    let row = drop_row(&drop);
    p.wait_text(
        &format!("{row} .counts"),
        "the sales in the live counts",
        |t| t.contains("TEE: 0 / 0 / 6"),
    )
    .await;
    p.click(&format!("{row} .cancel-drop")).await;
    p.wait_text(&format!("{row} .cancel-state"), "the job done", |t| {
        t.contains("Cancelled: 3 of 3 orders refunded")
    })
    .await;
    p.wait_text(&format!("{row} .state"), "the closed badge", |t| {
        t.contains("closed")
    })
    .await;
    p.wait_text(
        &format!("{row} .counts"),
        "the units back in the counts",
        |t| t.contains("TEE: 6 / 0 / 0"),
    )
    .await;
    scroll_to(&p, "drops-title").await;
    p.shot("cancelled").await;
    for hold in &holds {
        assert_eq!(h.payment(hold).await.refunds, 1);
    }
    h.assert_invariants(&drop).await;
    p.close().await;
}
