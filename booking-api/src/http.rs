//! Request and response plumbing: bounded body reads, JSON answers, and the one place an
//! [`engine::Error`] becomes an HTTP response (status, `{"error":{...}}`, `Retry-After`).

use bytes::Bytes;
use engine::{Code, Error};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
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

pub fn empty(status: u16) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::NO_CONTENT);
    resp
}

pub fn bytes(content_type: &'static str, body: &'static [u8]) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
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
    // Every 429 and 503 says when to retry, even one raised without a hint (e.g. a script's
    // `recovering`).
    let retry_after = e.retry_after.or_else(|| {
        matches!(e.code.status(), 429 | 503).then_some(std::time::Duration::from_secs(1))
    });
    if let Some(after) = retry_after {
        // Round up: a client told 1 s when 1.9 s are needed would come back too early.
        let secs = after.as_millis().div_ceil(1000).max(1);
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(RETRY_AFTER, v);
        }
    }
    resp
}

/// Reads the whole body, refusing more than `max` bytes with 413 `body_too_large` (checked from
/// Content-Length first, so an honest large upload isn't read at all).
pub async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, Error> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(Error::new(Code::BodyTooLarge));
    }
    match Limited::new(req.into_body(), max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Error::new(Code::BodyTooLarge)),
        Err(e) => Err(Error::invalid(format!("could not read the body: {e}"))),
    }
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

/// One query parameter's value (no percent-decoding needed for the ids we read).
pub fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}
