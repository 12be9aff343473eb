//! The front page, the fan's booking page, the seller's back office and the ops console: plain HTML, CSS and JS compiled into the binary (no
//! build step).

use hyper::Response;
use web::{bytes, Body};

pub fn booking_page() -> Response<Body> {
    let mut resp = bytes(
        "text/html; charset=utf-8",
        include_bytes!("../static/book.html"),
    );
    resp.headers_mut().insert(
        "content-security-policy",
        // frame-ancestors: a page that takes payment must not be framed by another site.
        hyper::header::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    resp
}

/// The front page: the drops on sale and coming soon, from `GET /v1/catalogue`.
pub fn front_page() -> Response<Body> {
    let mut resp = bytes(
        "text/html; charset=utf-8",
        include_bytes!("../static/front.html"),
    );
    resp.headers_mut().insert(
        "content-security-policy",
        hyper::header::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    resp
}

/// The seller's back office: create drops, live counts, close, orders and their CSV.
pub fn seller_page() -> Response<Body> {
    let mut resp = bytes(
        "text/html; charset=utf-8",
        include_bytes!("../static/seller.html"),
    );
    resp.headers_mut().insert(
        "content-security-policy",
        hyper::header::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    resp
}

/// The ops console: live figures per drop (over `/v1/ops/ws`), admission controls, the audit log.
pub fn ops_page() -> Response<Body> {
    let mut resp = bytes(
        "text/html; charset=utf-8",
        include_bytes!("../static/ops.html"),
    );
    resp.headers_mut().insert(
        "content-security-policy",
        // connect-src 'self' covers the page's own WebSocket (ws: to the same host and port).
        hyper::header::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    resp
}

pub fn asset(name: &str) -> Option<Response<Body>> {
    match name {
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
