//! [`BookingClient`]: the one client of booking-api's HTTP API that every test suite uses (the
//! booking tests, the waiting-room tests, the fault tests). It talks HTTP to a URL (only its
//! keys are made through the engine), so testkit never depends on a server crate; what else needs
//! the server's engine (Postgres checks, the test gateway) stays in each crate's `tests/common`.
//!
//! Answers come two ways: `(status, JSON body)` for most tests ([`BookingClient::call`]), and a
//! [`Reply`] that also keeps `Retry-After` for tests that check 503s ([`BookingClient::send`]).

use std::fmt::Display;

use engine::db::Scope;
use serde_json::{json, Value};

/// One answer: status, JSON body (`null` when there is none) and the `Retry-After` header.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<String>,
}

impl Reply {
    /// The error code (`""` when the answer isn't an error).
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// A string field of the body; panics, with the answer, when it is missing.
    pub fn str(&self, field: &str) -> String {
        self.body[field]
            .as_str()
            .unwrap_or_else(|| panic!("no {field} in {self:?}"))
            .to_owned()
    }

    /// A 5xx always names its code; a 503 must be one of `allowed` and say when to retry.
    pub fn check_5xx(&self, what: &str, allowed: &[&str]) {
        if self.status < 500 {
            return;
        }
        assert!(
            !self.code().is_empty(),
            "{what}: a 5xx without a code: {self:?}"
        );
        if self.status == 503 {
            assert!(
                allowed.contains(&self.code()),
                "{what}: 503 `{}` is not one of {allowed:?}: {self:?}",
                self.code()
            );
            assert!(
                self.retry_after.is_some(),
                "{what}: 503 without Retry-After: {self:?}"
            );
        }
    }
}

/// Every seat of a `GET /v1/drops/{id}/seats` answer (docs/API.md: per row, a string with a
/// character per seat) as (seat id `S-R-n`, `"free"` | `"held"` | `"sold"`).
pub fn seat_states(map: &Value) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    for section in map["sections"].as_array().into_iter().flatten() {
        let s = section["section"].as_str().unwrap_or_default();
        for row in section["rows"].as_array().into_iter().flatten() {
            let r = row["row"].as_str().unwrap_or_default();
            for (i, c) in row["states"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .enumerate()
            {
                let state = match c {
                    'f' => "free",
                    'h' => "held",
                    's' => "sold",
                    other => panic!("seat state {other:?} in {map}"),
                };
                out.push((format!("{s}-{r}-{}", i + 1), state));
            }
        }
    }
    out
}

/// A fresh `Idempotency-Key` (128 random bits).
pub fn new_key() -> String {
    format!("k-{:032x}", rand::random::<u128>())
}

/// A client of one booking-api: cheap to clone (tasks can own one). The seller and ops keys are
/// empty until [`BookingClient::with_keys`].
#[derive(Clone)]
pub struct BookingClient {
    pub http: reqwest::Client,
    /// `http://host:port`, no trailing slash.
    pub base: String,
    pub seller_key: String,
    pub ops_key: String,
}

impl BookingClient {
    pub fn new(base: impl Into<String>) -> BookingClient {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .expect("an HTTP client");
        BookingClient {
            http,
            base: base.into(),
            seller_key: String::new(),
            ops_key: String::new(),
        }
    }

    /// A client of the booking-api at `base` that `engine` serves, with a seller key and an ops
    /// key made for it in the engine's Postgres (`{name}-seller`, `{name}-ops`).
    pub async fn with_new_keys(
        base: impl Into<String>,
        engine: &engine::Engine,
        name: &str,
    ) -> BookingClient {
        let seller_key = engine
            .db()
            .create_key(Scope::Seller, &format!("{name}-seller"))
            .await
            .expect("a seller key");
        let ops_key = engine
            .db()
            .create_key(Scope::Ops, &format!("{name}-ops"))
            .await
            .expect("an ops key");
        BookingClient::new(base).with_keys(seller_key, ops_key)
    }

    pub fn with_keys(mut self, seller_key: String, ops_key: String) -> BookingClient {
        self.seller_key = seller_key;
        self.ops_key = ops_key;
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    // ---- raw --------------------------------------------------------------------------------

    /// Sends `req`; the answer with its `Retry-After`.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let r = req.send().await.expect("the server answers");
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = r.json().await.unwrap_or(Value::Null);
        Reply {
            status,
            body,
            retry_after,
        }
    }

    /// Sends `req`; (status, JSON body).
    pub async fn call(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let r = self.send(req).await;
        (r.status, r.body)
    }

    fn reserve_request(
        &self,
        token: &str,
        drop: impl Display,
        key: Option<&str>,
        admission: Option<&str>,
        body: &Value,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .post(self.url(&format!("/v1/drops/{drop}/holds")))
            .bearer_auth(token)
            .json(body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        if let Some(a) = admission {
            req = req.header("X-Admission-Token", a);
        }
        req
    }

    fn confirm_request(&self, token: &str, hold: &str, reference: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(&format!("/v1/holds/{hold}/confirm")))
            .bearer_auth(token)
            .json(&json!({"payment": {"gateway": "test", "reference": reference}}))
    }

    fn get_request(&self, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        let req = self.http.get(self.url(path));
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    // ---- fans -------------------------------------------------------------------------------

    /// A new fan (`name` and a random suffix, so tests never share fans) and a dev token.
    pub async fn fan(&self, name: &str) -> (String, String) {
        let fan = format!("{name}-{:08x}", rand::random::<u32>());
        let token = self.fan_token(&fan).await;
        (fan, token)
    }

    /// A dev token for exactly this fan name (the same fan across booking-api processes).
    pub async fn fan_token(&self, fan: &str) -> String {
        let r = self
            .send(
                self.http
                    .post(self.url("/v1/fans/session"))
                    .json(&json!({ "fan": fan })),
            )
            .await;
        assert!(r.status == 200 || r.status == 201, "fan session: {r:?}");
        r.str("fan_token")
    }

    // ---- sellers and ops --------------------------------------------------------------------

    /// Creates a drop from a whole `POST /v1/drops` body; its id.
    pub async fn create_drop(&self, body: Value) -> String {
        let (status, v) = self.seller_post("/v1/drops", body).await;
        assert_eq!(status, 201, "create drop: {v}");
        v["drop_id"].as_str().expect("a drop_id").to_owned()
    }

    /// An open GA drop of one SKU, `TEE`.
    pub async fn ga_drop(&self, quantity: u32, per_fan_limit: u32, hold_ttl_s: u32) -> String {
        self.create_drop(json!({
            "name": "test drop", "per_fan_limit": per_fan_limit, "hold_ttl_s": hold_ttl_s,
            "admission": {"mode": "open"},
            "inventory": {"kind": "ga", "skus": [{"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": quantity}]}
        }))
        .await
    }

    /// POST with the seller key, e.g. `/v1/drops/{id}/close`.
    pub async fn seller_post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(
            self.http
                .post(self.url(path))
                .bearer_auth(&self.seller_key)
                .json(&body),
        )
        .await
    }

    /// Ops' admission settings (`PUT /v1/drops/{id}/admission`); must answer 200.
    pub async fn set_admission(&self, drop: impl Display, body: Value) {
        let (status, v) = self
            .call(
                self.http
                    .put(self.url(&format!("/v1/drops/{drop}/admission")))
                    .bearer_auth(&self.ops_key)
                    .json(&body),
            )
            .await;
        assert_eq!(status, 200, "set admission: {v}");
    }

    // ---- holds ------------------------------------------------------------------------------

    /// A reserve with a fresh `Idempotency-Key`.
    pub async fn reserve(&self, token: &str, drop: impl Display, body: Value) -> (u16, Value) {
        self.reserve_with(token, drop, Some(&new_key()), None, body)
            .await
    }

    pub async fn reserve_with_key(
        &self,
        token: &str,
        drop: impl Display,
        key: &str,
        body: Value,
    ) -> (u16, Value) {
        self.reserve_with(token, drop, Some(key), None, body).await
    }

    /// A reserve with every header chosen: no `Idempotency-Key` when `key` is None, an
    /// `X-Admission-Token` when `admission` is Some.
    pub async fn reserve_with(
        &self,
        token: &str,
        drop: impl Display,
        key: Option<&str>,
        admission: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        self.call(self.reserve_request(token, drop, key, admission, &body))
            .await
    }

    /// A reserve under `key`, answered as a [`Reply`].
    pub async fn reserve_reply(
        &self,
        token: &str,
        drop: impl Display,
        key: &str,
        body: &Value,
    ) -> Reply {
        self.send(self.reserve_request(token, drop, Some(key), None, body))
            .await
    }

    /// Pays a hold with the test gateway (`ok_…` succeeds, `fail_…` is declined, `slow_…` times
    /// out).
    pub async fn confirm(&self, token: &str, hold: &str, reference: &str) -> (u16, Value) {
        self.call(self.confirm_request(token, hold, reference))
            .await
    }

    /// A confirm answered as a [`Reply`] (with its `Retry-After`).
    pub async fn confirm_reply(&self, token: &str, hold: &str, reference: &str) -> Reply {
        self.send(self.confirm_request(token, hold, reference))
            .await
    }

    /// Gives a hold back (`DELETE /v1/holds/{id}`); the status.
    pub async fn release(&self, token: &str, hold: &str) -> u16 {
        let req = self
            .http
            .delete(self.url(&format!("/v1/holds/{hold}")))
            .bearer_auth(token);
        self.call(req).await.0
    }

    /// A hold's state as its fan reads it (`GET /v1/holds/{id}`).
    pub async fn hold_state(&self, token: &str, hold: &str) -> String {
        let (status, v) = self.get(&format!("/v1/holds/{hold}"), Some(token)).await;
        assert_eq!(status, 200, "GET hold {hold}: {v}");
        v["state"].as_str().unwrap_or_default().to_owned()
    }

    // ---- reads ------------------------------------------------------------------------------

    /// A GET, with a bearer token if given.
    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.call(self.get_request(path, token)).await
    }

    /// A GET answered as a [`Reply`].
    pub async fn get_reply(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(self.get_request(path, token)).await
    }

    /// The public drop view; must answer 200.
    pub async fn drop_view(&self, drop: impl Display) -> Value {
        let (status, v) = self.get(&format!("/v1/drops/{drop}"), None).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    /// Sums of the live counts over the drop's buckets: (total, available, held, sold).
    pub async fn counts(&self, drop: impl Display) -> (i64, i64, i64, i64) {
        let v = self.drop_view(drop).await;
        let mut sums = (0, 0, 0, 0);
        for b in v["inventory"].as_array().expect("inventory") {
            sums.0 += b["total"].as_i64().expect("total");
            sums.1 += b["available"].as_i64().expect("available");
            sums.2 += b["held"].as_i64().expect("held");
            sums.3 += b["sold"].as_i64().expect("sold");
        }
        sums
    }

    /// The sum of a metric's samples at `/metrics` (0 when the metric is absent), read with the
    /// ops key (the public listener serves metrics to nobody else).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(self.url("/metrics"))
            .bearer_auth(&self.ops_key)
            .send()
            .await
            .expect("booking-api answers")
            .text()
            .await
            .expect("a metrics page");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let metric = series.split('{').next()?;
                if metric == name {
                    value.parse::<f64>().ok()
                } else {
                    None
                }
            })
            .sum()
    }
}
