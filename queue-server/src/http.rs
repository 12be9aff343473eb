//! Request and response plumbing: JSON answers and the one place an [`engine::Error`] becomes an
//! HTTP response (status, `{"error":{...}}`, `Retry-After`).

use bytes::Bytes;
use engine::Error;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};

pub type Body = Full<Bytes>;

pub fn json(status: u16, value: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub fn text(content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The error mapping: every refusal leaves through here.
pub fn error(e: &Error) -> Response<Body> {
    let mut resp = json(e.code.status(), &e.body());
    let retry_after = e.retry_after.or_else(|| {
        matches!(e.code.status(), 429 | 503).then_some(std::time::Duration::from_secs(1))
    });
    if let Some(after) = retry_after {
        let secs = after.as_millis().div_ceil(1000).max(1);
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(RETRY_AFTER, v);
        }
    }
    resp
}

/// A header's value as text, if present and valid.
pub fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The bearer token of `Authorization`, if any.
pub fn bearer(req: &Request<Incoming>) -> Option<&str> {
    header(req, "authorization").and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    })
}

/// One query parameter's value (fan tokens are base64url JWTs: no percent-decoding needed).
pub fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}
