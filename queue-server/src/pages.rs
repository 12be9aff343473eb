//! The fan's queue page: plain HTML, CSS and JS compiled into the binary (no build step). The
//! page's base styles are booking-api's `book.css`, embedded from there, so the waiting room and
//! the shop it leads to look alike and can't drift apart; `queue.css` adds only the line's parts.
//!
//! The shop (`/drops/{id}/shop`) is booking-api's booking page itself, embedded from there and
//! served here, on the queue page's origin, told where booking-api is: the queue page hands the
//! admitted fan and their admission token over in this origin's storage, so who the fan is never
//! rides in a link (docs/ARCHITECTURE.md, Choices: the hand-off from the line to the shop).

use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;
use web::{bytes, Body};

const PAGE: &str = include_str!("../static/queue.html");
const SHOP: &str = include_str!("../../booking-api/static/book.html");
/// The shop page's placeholder for booking-api's URL (empty at booking-api: its own origin).
const SHOP_API_META: &str = r#"<meta name="floodgate-api-url" content="">"#;

/// The page, told where booking-api is (`queue.booking_public_url`): it signs the fan in there.
/// The CSP lets it call that origin and nothing else.
pub fn queue_page(booking_public_url: &str) -> Response<Body> {
    let url = booking_public_url.trim_end_matches('/');
    page(PAGE.replace("{{booking_url}}", &attr_escape(url)), url)
}

/// The shop: booking-api's booking page, told to call booking-api at `booking_public_url`.
pub fn shop_page(booking_public_url: &str) -> Response<Body> {
    let url = booking_public_url.trim_end_matches('/');
    let meta = format!(
        r#"<meta name="floodgate-api-url" content="{}">"#,
        attr_escape(url)
    );
    page(SHOP.replace(SHOP_API_META, &meta), url)
}

/// An HTML page of this origin that may call booking-api (`url`) and nothing else.
fn page(html: String, url: &str) -> Response<Body> {
    let mut resp = Response::new(Body::from(html));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // 'self' covers the page's own WebSocket (ws: and wss: on the same host, in CSP 3 browsers).
    // frame-ancestors: a sign-in form, and a page that takes payment, must not be framed by
    // another site.
    let csp = format!(
        "default-src 'self'; connect-src 'self' {}; img-src 'self' data:; frame-ancestors 'none'",
        origin(url).unwrap_or("")
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert("content-security-policy", v);
    }
    resp
}

pub fn asset(name: &str) -> Option<Response<Body>> {
    match name {
        "book.css" => Some(bytes(
            "text/css; charset=utf-8",
            include_bytes!("../../booking-api/static/book.css"),
        )),
        // The shop is booking-api's page: its script, as booking-api serves it.
        "book.js" => Some(bytes(
            "text/javascript; charset=utf-8",
            include_bytes!("../../booking-api/static/book.js"),
        )),
        // Shared with the booking page, which owns it.
        "fan.js" => Some(bytes(
            "text/javascript; charset=utf-8",
            include_bytes!("../../booking-api/static/fan.js"),
        )),
        "queue.css" => Some(bytes(
            "text/css; charset=utf-8",
            include_bytes!("../static/queue.css"),
        )),
        "queue.js" => Some(bytes(
            "text/javascript; charset=utf-8",
            include_bytes!("../static/queue.js"),
        )),
        _ => None,
    }
}

/// `scheme://host[:port]` of an http(s) URL; None when it isn't one a CSP source may name.
fn origin(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let host_len = rest.find('/').unwrap_or(rest.len());
    let ok = host_len > 0
        && rest[..host_len]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    ok.then(|| &url[..url.len() - rest.len() + host_len])
}

fn attr_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shop_is_told_where_booking_api_is() {
        assert!(
            SHOP.contains(SHOP_API_META),
            "book.html has the placeholder"
        );
        let resp = shop_page("http://127.0.0.1:8080/");
        let csp = resp.headers()["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("connect-src 'self' http://127.0.0.1:8080;"),
            "{csp}"
        );
    }

    #[test]
    fn origin_is_scheme_and_authority() {
        assert_eq!(
            origin("http://127.0.0.1:8080"),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            origin("https://shop.example.com/base"),
            Some("https://shop.example.com")
        );
        assert_eq!(origin("ftp://x"), None);
        assert_eq!(origin("https://a;b"), None);
        assert_eq!(origin("http://"), None);
    }
}
