//! The front page, the fan's booking page, the seller's back office and the ops console: plain
//! HTML, CSS and JS compiled into the binary (no build step), each page under one policy
//! (`html_page`).

use hyper::Response;
use web::{bytes, Body};

/// The fan's booking page: pick, hold, pay.
pub fn booking_page() -> Response<Body> {
    html_page(include_bytes!("../static/book.html"))
}

/// The front page: the drops on sale and coming soon, from `GET /v1/catalogue`.
pub fn front_page() -> Response<Body> {
    html_page(include_bytes!("../static/front.html"))
}

/// The seller's back office: create drops, live counts, close, orders and their CSV.
pub fn seller_page() -> Response<Body> {
    html_page(include_bytes!("../static/seller.html"))
}

/// The ops console: live figures per drop (over `/v1/ops/ws`), admission controls, the audit log.
pub fn ops_page() -> Response<Body> {
    html_page(include_bytes!("../static/ops.html"))
}

/// A page with the policy every page has: scripts, styles, API calls and sockets from this origin
/// only (`default-src 'self'`, which stands for `script-src` — `/static/page.js` and each page's
/// own script — and for `connect-src`, whose `'self'` takes the ops console's WebSocket to the same
/// host and port), images from here or `data:`, and never framed by another site
/// (`frame-ancestors 'none'`: a page that takes payment or a key must not be). Like every asset it
/// is `no-cache` (`web::bytes`): a browser asks again before using what it kept, so a page and
/// the scripts it loads change together.
fn html_page(body: &'static [u8]) -> Response<Body> {
    let mut resp = bytes("text/html; charset=utf-8", body);
    resp.headers_mut().insert(
        "content-security-policy",
        hyper::header::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    resp
}

/// `/static/{name}`: the pages' scripts and styles; `None` (a 404) for any other name.
pub fn asset(name: &str) -> Option<Response<Body>> {
    match name {
        // What booking-api's own pages share (front, seller, ops), loaded before their scripts.
        "page.js" => Some(bytes(
            "text/javascript; charset=utf-8",
            include_bytes!("../static/page.js"),
        )),
        // The back office's and the ops console's tables and form grids, before their own CSS.
        "page.css" => Some(bytes(
            "text/css; charset=utf-8",
            include_bytes!("../static/page.css"),
        )),
        "ops.js" => Some(bytes(
            "text/javascript; charset=utf-8",
            include_bytes!("../static/ops.js"),
        )),
        "ops.css" => Some(bytes(
            "text/css; charset=utf-8",
            include_bytes!("../static/ops.css"),
        )),
        "seller.js" => Some(bytes(
            "text/javascript; charset=utf-8",
            include_bytes!("../static/seller.js"),
        )),
        "seller.css" => Some(bytes(
            "text/css; charset=utf-8",
            include_bytes!("../static/seller.css"),
        )),
        "front.js" => Some(bytes(
            "text/javascript; charset=utf-8",
            include_bytes!("../static/front.js"),
        )),
        "book.css" => Some(bytes(
            "text/css; charset=utf-8",
            include_bytes!("../static/book.css"),
        )),
        "fan.js" => Some(bytes(
            "text/javascript; charset=utf-8",
            include_bytes!("../static/fan.js"),
        )),
        "book.js" => Some(bytes(
            "text/javascript; charset=utf-8",
            include_bytes!("../static/book.js"),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every script and stylesheet a page loads from `/static/` is one `asset` serves (one it
    /// didn't know would be a 404: a page that does nothing), `no-cache` like the page itself, and
    /// every page carries the one policy, whose `'self'` lets it load them.
    #[test]
    fn every_asset_a_page_loads_is_served_under_the_pages_policy() {
        type Page = (&'static str, &'static str, fn() -> Response<Body>);
        let pages: [Page; 4] = [
            ("book", include_str!("../static/book.html"), booking_page),
            ("front", include_str!("../static/front.html"), front_page),
            ("seller", include_str!("../static/seller.html"), seller_page),
            ("ops", include_str!("../static/ops.html"), ops_page),
        ];
        for (page, html, serve) in pages {
            let resp = serve();
            assert_eq!(
                resp.headers()["content-security-policy"],
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                "{page}"
            );
            assert_eq!(resp.headers()["cache-control"], "no-cache", "{page}");
            let loads: Vec<&str> = html
                .split("=\"/static/")
                .skip(1)
                .filter_map(|rest| rest.split('"').next())
                .collect();
            assert!(
                loads.len() >= 2,
                "{page} loads its script and styles: {loads:?}"
            );
            for name in loads {
                let Some(file) = asset(name) else {
                    panic!("{page} loads /static/{name}, which is not served");
                };
                assert_eq!(file.headers()["cache-control"], "no-cache", "{name}");
                let kind = if name.ends_with(".js") {
                    "text/javascript"
                } else {
                    "text/css"
                };
                let content_type = file.headers()["content-type"].to_str().unwrap();
                assert!(content_type.starts_with(kind), "{name}: {content_type}");
            }
        }
    }
}
