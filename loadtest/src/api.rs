//! booking-api's contract as loadtest uses it: setup calls (drop, fan sessions), the drop's
//! live counts, and decoding the small parts of answers the run needs.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode};
use serde::Deserialize;

use crate::http::{bearer, path_segment, Slot, Target};

/// Concurrent connections used to create fan sessions.
pub const SETUP_CONCURRENCY: usize = 32;
/// Attempts per setup call when the server answers 429 or 503 (it asks us to come back):
/// with the backoff below, about half a minute, enough for thousands of fan sessions through
/// booking-api's default per-IP limit.
const SETUP_ATTEMPTS: u32 = 20;
/// Longest wait between setup attempts (exponential backoff from 50 ms).
const SETUP_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What the created drop looks like.
#[derive(Debug, Clone)]
pub struct DropSpec {
    pub name: String,
    pub sku: String,
    pub stock: u64,
    pub per_fan_limit: u32,
    pub hold_ttl_s: u32,
}

impl DropSpec {
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "per_fan_limit": self.per_fan_limit,
            "hold_ttl_s": self.hold_ttl_s,
            "admission": { "mode": "open" },
            "inventory": {
                "kind": "ga",
                "skus": [{
                    "sku": self.sku,
                    "name": "loadtest",
                    "price_cents": 1000,
                    "quantity": self.stock,
                }],
            },
        })
    }
}

/// A drop behind the waiting room (`loadtest queue`, `loadtest sale`): one GA SKU, admission
/// settings given.
#[derive(Debug, Clone)]
pub struct QueueDropSpec {
    pub name: String,
    pub sku: String,
    pub stock: u64,
    pub per_fan_limit: u32,
    pub hold_ttl_s: u32,
    /// RFC 3339; None: open now.
    pub opens_at: Option<String>,
    pub admission: AdmissionSettings,
    /// `admission.shop_window_s` and `admission.leave_grace_s`; None: booking-api's defaults.
    pub shop_window_s: Option<u32>,
    pub leave_grace_s: Option<u32>,
}

/// `admission` settings of a queue drop, as `POST /v1/drops` and
/// `PUT /v1/drops/{drop_id}/admission` take them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionSettings {
    pub rate_per_s: f64,
    pub burst: u64,
    pub max_active: u64,
    pub paused: bool,
}

impl AdmissionSettings {
    /// The body of `PUT /v1/drops/{drop_id}/admission`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "rate_per_s": self.rate_per_s,
            "burst": self.burst,
            "max_active": self.max_active,
            "paused": self.paused,
        })
    }
}

impl QueueDropSpec {
    pub fn body(&self) -> serde_json::Value {
        let mut admission = self.admission.body();
        admission["mode"] = "queue".into();
        if let Some(s) = self.shop_window_s {
            admission["shop_window_s"] = s.into();
        }
        if let Some(s) = self.leave_grace_s {
            admission["leave_grace_s"] = s.into();
        }
        let mut body = serde_json::json!({
            "name": self.name,
            "per_fan_limit": self.per_fan_limit,
            "hold_ttl_s": self.hold_ttl_s,
            "admission": admission,
            "inventory": {
                "kind": "ga",
                "skus": [{
                    "sku": self.sku,
                    "name": "loadtest",
                    "price_cents": 1000,
                    "quantity": self.stock,
                }],
            },
        });
        if let Some(at) = &self.opens_at {
            body["opens_at"] = at.as_str().into();
        }
        body
    }
}

/// The reserve request body: the same bytes for every request of a run.
pub fn hold_body(sku: &str, quantity: u32) -> Bytes {
    let v = serde_json::json!({ "items": [{ "sku": sku, "quantity": quantity }] });
    Bytes::from(v.to_string())
}

/// The confirm request body for `hold_id`, paid with the test gateway's always-succeeding
/// reference.
pub fn confirm_body(hold_id: &str) -> Bytes {
    let v = serde_json::json!({ "payment": { "gateway": "test", "reference": format!("ok_{hold_id}") } });
    Bytes::from(v.to_string())
}

/// The `code` of an error answer `{"error":{"code":"...","message":"..."}}`, if it is one.
pub fn error_code(body: &[u8]) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Outer<'a> {
        #[serde(borrow)]
        error: Inner<'a>,
    }
    #[derive(Deserialize)]
    struct Inner<'a> {
        #[serde(borrow)]
        code: Cow<'a, str>,
    }
    serde_json::from_slice::<Outer<'_>>(body)
        .ok()
        .map(|o| o.error.code)
}

/// The `hold_id` of a 201 answer to a reserve.
pub fn hold_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Created<'a> {
        #[serde(borrow)]
        hold_id: Cow<'a, str>,
    }
    serde_json::from_slice::<Created<'_>>(body)
        .ok()
        .map(|c| c.hold_id.into_owned())
}

/// A setup client: one connection, retries on 429/503.
pub struct Setup {
    target: Target,
    slot: Slot,
}

impl Setup {
    pub fn new(target: Target, timeout: Duration) -> Self {
        Self {
            target,
            slot: Slot::new(timeout),
        }
    }

    /// Sends one JSON request; retries (bounded) while the server answers 429 or 503.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
        body: Option<Bytes>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let uri = self.target.uri(path)?;
        let mut backoff = Duration::from_millis(50);
        for attempt in 1..=SETUP_ATTEMPTS {
            let req = || {
                (
                    self.target
                        .request(method.clone(), uri.clone(), auth, body.clone()),
                    (),
                )
            };
            let (result, ()) = self.slot.send(&self.target, req).await;
            let (status, bytes) = match result {
                Ok(answer) => answer,
                // The server closes keep-alive connections left idle (booking-api after
                // `http.header_read_timeout_ms`), as the setup connection is during a run: a GET
                // is safe to send again on a fresh connection.
                Err(_) if method == Method::GET && attempt == 1 => continue,
                Err(e) => bail!("{method} {path}: {e} error talking to {}", self.target.addr),
            };
            let retry = status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::SERVICE_UNAVAILABLE;
            if !retry || attempt == SETUP_ATTEMPTS {
                return Ok((status, bytes));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(SETUP_BACKOFF_MAX);
        }
        unreachable!("the last attempt returns")
    }

    /// `PUT /v1/drops/{drop_id}/admission` with the ops key.
    pub async fn put_admission(
        &mut self,
        ops_key: &str,
        drop_id: &str,
        settings: &AdmissionSettings,
    ) -> anyhow::Result<()> {
        let auth = bearer(ops_key)?;
        let path = format!("/v1/drops/{}/admission", path_segment(drop_id));
        let body = Bytes::from(settings.body().to_string());
        let (status, bytes) = self
            .call(Method::PUT, &path, Some(&auth), Some(body))
            .await?;
        if status != StatusCode::OK {
            bail!(
                "PUT {path} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(())
    }

    /// `POST /v1/drops` with a drop's body (`DropSpec::body`, `QueueDropSpec::body`) → its id.
    pub async fn create_drop(
        &mut self,
        seller_key: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<String> {
        let auth = bearer(seller_key)?;
        let body = Bytes::from(body.to_string());
        let (status, bytes) = self
            .call(Method::POST, "/v1/drops", Some(&auth), Some(body))
            .await?;
        if status != StatusCode::CREATED {
            bail!(
                "POST /v1/drops answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).context("POST /v1/drops: answer is not JSON")?;
        v.get("drop_id")
            .and_then(|d| d.as_str())
            .map(str::to_owned)
            .with_context(|| format!("POST /v1/drops: no drop_id in {v}"))
    }

    /// `POST /v1/fans/session` → the fan token itself.
    pub async fn fan_token(&mut self, fan: &str) -> anyhow::Result<String> {
        let body = Bytes::from(serde_json::json!({ "fan": fan }).to_string());
        let (status, bytes) = self
            .call(Method::POST, "/v1/fans/session", None, Some(body))
            .await?;
        if !status.is_success() {
            bail!(
                "POST /v1/fans/session answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).context("POST /v1/fans/session: answer is not JSON")?;
        v.get("fan_token")
            .and_then(|t| t.as_str())
            .map(str::to_owned)
            .with_context(|| format!("POST /v1/fans/session: no fan_token in {v}"))
    }

    /// `GET /metrics` with the ops key: the Prometheus text.
    pub async fn metrics(&mut self, ops_key: &str) -> anyhow::Result<String> {
        let auth = bearer(ops_key)?;
        let (status, bytes) = self
            .call(Method::GET, "/metrics", Some(&auth), None)
            .await?;
        if status != StatusCode::OK {
            bail!("GET /metrics answered {status}");
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// `GET path` (optionally with a bearer) → its status and JSON body (`null` if not JSON).
    pub async fn get_json(
        &mut self,
        path: &str,
        auth: Option<&HeaderValue>,
    ) -> anyhow::Result<(StatusCode, serde_json::Value)> {
        let (status, bytes) = self.call(Method::GET, path, auth, None).await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    }

    /// `GET /v1/drops/{drop_id}` as JSON.
    pub async fn get_drop(&mut self, drop_id: &str) -> anyhow::Result<serde_json::Value> {
        let path = format!("/v1/drops/{}", path_segment(drop_id));
        let (status, bytes) = self.call(Method::GET, &path, None, None).await?;
        if status != StatusCode::OK {
            bail!(
                "GET {path} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        serde_json::from_slice(&bytes).with_context(|| format!("GET {path}: answer is not JSON"))
    }
}

/// The fan name of session `i` of run `run_id`.
pub fn fan_name(run_id: &str, i: usize) -> String {
    format!("lt-{run_id}-{i}")
}

/// Creates `count` fan sessions over [`SETUP_CONCURRENCY`] connections; returns their
/// `Authorization` values in fan order.
pub async fn create_fans(
    target: &Target,
    run_id: &str,
    count: usize,
    timeout: Duration,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<HeaderValue>> {
    create_fan_tokens(target, run_id, count, timeout, progress)
        .await?
        .iter()
        .map(|t| bearer(t))
        .collect()
}

/// Creates `count` fan sessions over [`SETUP_CONCURRENCY`] connections; returns their fan
/// tokens in fan order.
pub async fn create_fan_tokens(
    target: &Target,
    run_id: &str,
    count: usize,
    timeout: Duration,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SETUP_CONCURRENCY.min(count) {
        let next = Arc::clone(&next);
        let mut setup = Setup::new(target.clone(), timeout);
        let run_id = run_id.to_owned();
        let progress = progress.clone();
        tasks.spawn(async move {
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(made);
                }
                made.push((i, setup.fan_token(&fan_name(&run_id, i)).await?));
                progress.inc(1);
            }
        });
    }
    let mut tokens: Vec<Option<String>> = vec![None; count];
    while let Some(joined) = tasks.join_next().await {
        for (i, token) in joined.context("fan session task panicked")?? {
            tokens[i] = Some(token);
        }
    }
    tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.with_context(|| format!("fan session {i} was not created")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_body_is_an_open_ga_drop_with_one_sku() {
        let spec = DropSpec {
            name: "loadtest 1".into(),
            sku: "LT".into(),
            stock: 1_000_000,
            per_fan_limit: 1000,
            hold_ttl_s: 600,
        };
        let v = spec.body();
        assert_eq!(v["admission"]["mode"], "open");
        assert_eq!(v["inventory"]["kind"], "ga");
        assert_eq!(v["inventory"]["skus"][0]["sku"], "LT");
        assert_eq!(v["inventory"]["skus"][0]["quantity"], 1_000_000);
        assert_eq!(v["per_fan_limit"], 1000);
        assert_eq!(v["hold_ttl_s"], 600);
    }

    #[test]
    fn queue_drop_body_carries_the_admission_settings() {
        let spec = QueueDropSpec {
            name: "loadtest queue 1".into(),
            sku: "LT".into(),
            stock: 1_000_000,
            per_fan_limit: 1,
            hold_ttl_s: 600,
            opens_at: None,
            shop_window_s: None,
            leave_grace_s: Some(3600),
            admission: AdmissionSettings {
                rate_per_s: 50.0,
                burst: 50,
                max_active: 1_000_000,
                paused: true,
            },
        };
        let v = spec.body();
        assert_eq!(v["admission"]["mode"], "queue");
        assert_eq!(v["admission"]["rate_per_s"], 50.0);
        assert_eq!(v["admission"]["burst"], 50);
        assert_eq!(v["admission"]["max_active"], 1_000_000);
        assert_eq!(v["admission"]["paused"], true);
        assert_eq!(v["per_fan_limit"], 1);
        assert_eq!(v["hold_ttl_s"], 600);
        assert_eq!(v["admission"]["leave_grace_s"], 3600);
        assert!(v["admission"].get("shop_window_s").is_none(), "{v}");
        assert!(v.get("opens_at").is_none(), "{v}");
        let put = spec.admission.body();
        assert!(put.get("mode").is_none(), "mode can't be changed: {put}");
    }

    #[test]
    fn hold_and_confirm_bodies() {
        let v: serde_json::Value = serde_json::from_slice(&hold_body("LT", 2)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({ "items": [{ "sku": "LT", "quantity": 2 }] })
        );
        let v: serde_json::Value = serde_json::from_slice(&confirm_body("h1")).unwrap();
        assert_eq!(v["payment"]["gateway"], "test");
        assert_eq!(v["payment"]["reference"], "ok_h1");
    }

    #[test]
    fn error_codes_are_read_from_error_answers_only() {
        let body = br#"{"error":{"code":"sold_out","message":"nothing left"}}"#;
        assert_eq!(error_code(body).as_deref(), Some("sold_out"));
        assert_eq!(
            error_code(br#"{"error":{"code":"a\"b","message":""}}"#).as_deref(),
            Some("a\"b")
        );
        assert_eq!(error_code(br#"{"hold_id":"h1"}"#), None);
        assert_eq!(error_code(b"<html>"), None);
    }

    #[test]
    fn hold_id_is_read_from_a_created_hold() {
        let body = br#"{"hold_id":"d1.h9","expires_at":1,"server_now_ms":0,"items":[],"total_cents":0,"currency":"USD"}"#;
        assert_eq!(hold_id(body).as_deref(), Some("d1.h9"));
        assert_eq!(hold_id(b"{}"), None);
    }

    #[test]
    fn fan_names_are_unique_per_run() {
        assert_eq!(fan_name("ab12", 7), "lt-ab12-7");
    }
}
