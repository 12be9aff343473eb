//! What the page tests (browser.rs, seller_browser.rs) do on the pages, written once: the seller's
//! back office (sign in, create a drop from its form), the fan's booking page (sign in, hold,
//! pay), and a second window (the fan's page open beside the back office).

use serde_json::json;
use testkit::Page;

use super::Harness;

// ---- the seller's back office (/seller) -----------------------------------------------------

/// Opens the back office and signs in with the harness' seller key.
pub async fn seller_sign_in(p: &Page, h: &Harness) {
    p.goto(&h.url("/seller")).await;
    p.el("#signin:not([hidden])").await;
    p.fill("#seller-key", &h.seller_key).await;
    p.click("#signin-form button[type=submit]").await;
    p.el("#office:not([hidden])").await;
}

/// Submits the create form as filled in and returns the new drop's id.
pub async fn create_in_office(p: &Page) -> String {
    p.click("#create-button").await;
    p.el("#create-ok:not([hidden])").await;
    let id = p.attr("#create-ok", "data-drop-id").await;
    assert!(id.starts_with('d'), "drop id {id:?}");
    id
}

/// Fills the create form for a GA drop named `name` with the form's own SKU row (TEE at 25.00)
/// holding `quantity`, and creates it.
pub async fn create_ga_in_office(p: &Page, name: &str, quantity: u32) -> String {
    p.fill("#drop-name", name).await;
    p.fill("#sku-rows .sku-qty", &quantity.to_string()).await;
    create_in_office(p).await
}

/// Adds a SKU row to the create form and fills it in.
pub async fn add_sku_in_office(p: &Page, sku: &str, name: &str, price_cents: u32, quantity: u32) {
    p.click("#add-sku").await;
    let row = "#sku-rows tr:last-child";
    p.fill(&format!("{row} .sku-id"), sku).await;
    p.fill(&format!("{row} .sku-name"), name).await;
    p.fill(&format!("{row} .sku-price"), &price_cents.to_string())
        .await;
    p.fill(&format!("{row} .sku-qty"), &quantity.to_string())
        .await;
}

/// The CSS selector of a drop's row in the back office's list.
pub fn drop_row(drop: &str) -> String {
    format!("#drops [data-drop-id=\"{drop}\"]")
}

/// Answers every `window.confirm` of the page with OK (the back office confirms each change).
pub async fn accept_confirms(p: &Page) {
    p.client
        .execute("window.confirm = () => true;", vec![])
        .await
        .unwrap();
}

/// Scrolls the element with this id to the top of the viewport (for the screenshots).
pub async fn scroll_to(p: &Page, id: &str) {
    p.client
        .execute(
            "document.getElementById(arguments[0]).scrollIntoView();",
            vec![json!(id)],
        )
        .await
        .unwrap();
}

// ---- the fan's booking page (/drops/{id}) ---------------------------------------------------

/// The fan token the booking page keeps in localStorage after signing in.
pub async fn fan_token(p: &Page) -> String {
    match p.local_storage("floodgate.fan_token").await {
        Some(t) if !t.is_empty() => t,
        other => {
            p.fail(&format!("no fan token in localStorage: {other:?}"))
                .await
        }
    }
}

/// Signs in through the booking page's form and waits for the picking view.
pub async fn fan_sign_in(p: &Page, name: &str) {
    p.el("#signin:not([hidden])").await;
    p.fill("#fan-name", name).await;
    p.shot("signin").await;
    p.click("#signin-form button[type=submit]").await;
    p.el("#whoami:not([hidden])").await;
    p.el("#pick:not([hidden])").await;
}

/// Picks `quantity` of the GA drop's SKU `TEE` and holds it; waits for the hold view.
pub async fn hold_tees(p: &Page, quantity: u32) {
    let option = format!("#quantity-TEE option[value=\"{quantity}\"]");
    p.el(&option).await;
    let select = p.el("#quantity-TEE:enabled").await;
    if let Err(e) = select.select_by_value(&quantity.to_string()).await {
        p.fail(&format!("choose quantity {quantity}: {e}")).await;
    }
    p.shot("picked").await;
    p.click("#hold-button:enabled").await;
    p.el("#hold-view:not([hidden])").await;
}

/// Picks these seats on the seat map and holds them; waits for the hold view.
pub async fn hold_seats(p: &Page, seats: &[&str]) {
    for seat in seats {
        p.click(&format!("#seat-map button[data-seat=\"{seat}\"]:enabled"))
            .await;
    }
    p.click("#hold-seats:enabled").await;
    p.el("#hold-view:not([hidden])").await;
}

/// Pays for the hold on screen with the test gateway (`reference` starting `ok_` is approved);
/// the order id the page shows.
pub async fn pay(p: &Page, reference: &str) -> String {
    p.fill("#pay-reference", reference).await;
    p.click("#pay:enabled").await;
    p.el("#order-view:not([hidden])").await;
    p.wait_text("#order-id", "the order number", |t| {
        !t.is_empty() && !t.contains("being finalised")
    })
    .await
}

// ---- windows --------------------------------------------------------------------------------

/// Opens a second browser window (a window, not a tab: both stay visible, so both pages keep
/// refreshing), loads `url` in it and works there.
pub async fn open_second_window(p: &Page, url: &str) {
    let w = p.client.new_window(false).await.expect("a new window");
    p.client
        .switch_to_window(w.handle)
        .await
        .expect("switch to the new window");
    p.goto(url).await;
}

/// With two windows open, works in the one not in use.
pub async fn to_other_window(p: &Page) {
    let current = p.client.window().await.expect("the current window");
    let other = p
        .client
        .windows()
        .await
        .expect("the windows")
        .into_iter()
        .find(|w| *w != current)
        .expect("a second window");
    p.client
        .switch_to_window(other)
        .await
        .expect("switch windows");
}

// ---- the front page -------------------------------------------------------------------------

/// The front page's test server: the catalogue read fresh on every request, and room for every
/// drop the shared Postgres holds.
pub fn front_config() -> engine::Config {
    let mut cfg = testkit::test_config();
    cfg.drops.catalogue_refresh_ms = 0;
    cfg.drops.catalogue_max_drops = 500;
    cfg.queue.public_url = "http://queue.example:8081".into();
    cfg
}
