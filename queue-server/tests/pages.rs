//! The fan's two pages (queue-server's waiting room, booking-api's booking page) as served.
mod common;

use common::Harness;

/// Each page names an inline icon, so a browser asks neither server for `/favicon.ico` (which
/// neither serves: every page load logged a 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_name_an_inline_icon_so_no_favicon_is_fetched() {
    let h = Harness::start().await;
    let drop = h.client.ga_drop(5, 2, 300).await;
    for url in [
        format!("{}/drops/{drop}", h.queue.url()),
        format!("{}/drops/{drop}", h.booking.url()),
    ] {
        let page = reqwest::get(&url)
            .await
            .expect("the page")
            .text()
            .await
            .expect("its HTML");
        assert!(
            page.contains(r#"<link rel="icon" href="data:,">"#),
            "{url} names no icon, so browsers fetch /favicon.ico"
        );
    }
    h.shutdown().await;
}
