//! Test harness: a booking-api started in-process on 127.0.0.1:0 against the Redis and Postgres
//! that `./dev test` started (FLOODGATE_TEST_REDIS_URL / FLOODGATE_TEST_DATABASE_URL), and a small
//! client. Every test makes its own drops and fans, so tests run in parallel without sharing data.
//! The config and bounded waits every suite shares are in `testkit`.
#![allow(dead_code)]

use booking_api::Running;
use engine::db::Scope;
use engine::Config;
use serde_json::{json, Value};

pub struct Harness {
    pub server: Running,
    pub http: reqwest::Client,
    pub base: String,
    pub seller_key: String,
    pub ops_key: String,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::with_config(testkit::test_config()).await
    }

    pub async fn with_config(cfg: Config) -> Harness {
        let server = booking_api::start(cfg).await.expect("booking-api starts");
        let seller_key = server
            .engine
            .db()
            .create_key(Scope::Seller, "test-seller")
            .await
            .unwrap();
        let ops_key = server
            .engine
            .db()
            .create_key(Scope::Ops, "test-ops")
            .await
            .unwrap();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .unwrap();
        let base = server.url();
        Harness {
            server,
            http,
            base,
            seller_key,
            ops_key,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A fan token from the dev identity provider; names get a random suffix so tests never share fans.
    pub async fn fan(&self, name: &str) -> (String, String) {
        let fan = format!("{name}-{:08x}", rand::random::<u32>());
        let r: Value = self
            .http
            .post(self.url("/v1/fans/session"))
            .json(&json!({ "fan": fan }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (fan, r["fan_token"].as_str().unwrap().to_owned())
    }

    pub async fn create_drop(&self, body: Value) -> String {
        let r = self
            .http
            .post(self.url("/v1/drops"))
            .bearer_auth(&self.seller_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 201, "create drop: {v}");
        v["drop_id"].as_str().unwrap().to_owned()
    }

    pub async fn ga_drop(&self, quantity: u32, per_fan_limit: u32, hold_ttl_s: u32) -> String {
        self.create_drop(json!({
            "name": "test drop", "per_fan_limit": per_fan_limit, "hold_ttl_s": hold_ttl_s,
            "admission": {"mode": "open"},
            "inventory": {"kind": "ga", "skus": [{"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": quantity}]}
        }))
        .await
    }

    /// Puts a fan in a queue drop's active set, as the waiting room's admission would, for tests
    /// that sign admission tokens themselves (reserve checks the session as well as the token).
    pub async fn admit(&self, drop: &str, fan: &str) {
        self.server
            .engine
            .redis()
            .test_admit(
                &engine::ids::DropId::parse(drop).unwrap(),
                &engine::ids::FanId::parse(fan).unwrap(),
                300_000,
            )
            .await
            .unwrap();
    }

    /// POST a reserve; returns (status, body).
    pub async fn reserve(&self, token: &str, drop: &str, body: Value) -> (u16, Value) {
        let key = format!("k-{}", uuid::Uuid::new_v4());
        self.reserve_with_key(token, drop, &key, body).await
    }

    pub async fn reserve_with_key(
        &self,
        token: &str,
        drop: &str,
        key: &str,
        body: Value,
    ) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(&format!("/v1/drops/{drop}/holds")))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        testkit::answer(r).await
    }

    pub async fn confirm(&self, token: &str, hold: &str, reference: &str) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(&format!("/v1/holds/{hold}/confirm")))
            .bearer_auth(token)
            .json(&json!({"payment": {"gateway": "test", "reference": reference}}))
            .send()
            .await
            .unwrap();
        testkit::answer(r).await
    }

    pub async fn release(&self, token: &str, hold: &str) -> u16 {
        self.http
            .delete(self.url(&format!("/v1/holds/{hold}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.http.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        testkit::answer(r).await
    }

    pub async fn drop_view(&self, drop: &str) -> Value {
        let (status, v) = self.get(&format!("/v1/drops/{drop}"), None).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    /// Sums of the live counts over the drop's buckets: (total, available, held, sold).
    pub async fn counts(&self, drop: &str) -> (i64, i64, i64, i64) {
        let v = self.drop_view(drop).await;
        let mut sums = (0, 0, 0, 0);
        for b in v["inventory"].as_array().unwrap() {
            sums.0 += b["total"].as_i64().unwrap();
            sums.1 += b["available"].as_i64().unwrap();
            sums.2 += b["held"].as_i64().unwrap();
            sums.3 += b["sold"].as_i64().unwrap();
        }
        sums
    }

    /// Checks `available + held + sold == total` for every bucket, and Postgres' record of the
    /// sale: inventory.sold, order items and the ledger all agree with Redis' sold count.
    pub async fn assert_invariants(&self, drop: &str) {
        let v = self.drop_view(drop).await;
        let db = self.server.engine.db().client().await.unwrap();
        for b in v["inventory"].as_array().unwrap() {
            let bucket = b["sku"].as_str().or(b["section"].as_str()).unwrap();
            let (t, a, h, s) = (
                b["total"].as_i64().unwrap(),
                b["available"].as_i64().unwrap(),
                b["held"].as_i64().unwrap(),
                b["sold"].as_i64().unwrap(),
            );
            assert!(a >= 0 && h >= 0 && s >= 0, "negative count in {b}");
            assert_eq!(
                a + h + s,
                t,
                "available + held + sold != total for {bucket}: {b}"
            );
            let row = db
                .query_one(
                    "SELECT (SELECT sold::bigint FROM inventory WHERE drop_id = $1 AND bucket = $2), \
                     (SELECT coalesce(sum(quantity), 0)::bigint FROM order_items WHERE drop_id = $1 AND bucket = $2), \
                     (SELECT coalesce(sum(delta_sold), 0)::bigint FROM stock_ledger WHERE drop_id = $1 AND bucket = $2)",
                    &[&drop, &bucket],
                )
                .await
                .unwrap();
            let (inv, items, ledger): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
            assert_eq!(inv, s, "Postgres inventory.sold != Redis sold for {bucket}");
            assert_eq!(items, s, "Postgres order items != Redis sold for {bucket}");
            assert_eq!(ledger, s, "ledger sum != Redis sold for {bucket}");
        }
    }

    /// POST a reserve with every header chosen: no `Idempotency-Key` when `key` is None, an
    /// `X-Admission-Token` when `admission` is Some.
    pub async fn reserve_with(
        &self,
        token: &str,
        drop: &str,
        key: Option<&str>,
        admission: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(self.url(&format!("/v1/drops/{drop}/holds")))
            .bearer_auth(token)
            .json(&body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        if let Some(a) = admission {
            req = req.header("X-Admission-Token", a);
        }
        let r = req.send().await.unwrap();
        testkit::answer(r).await
    }

    /// POST a confirm; returns (status, the `Retry-After` header if any, body).
    pub async fn confirm_with_retry_after(
        &self,
        token: &str,
        hold: &str,
        reference: &str,
    ) -> (u16, Option<String>, Value) {
        let r = self
            .http
            .post(self.url(&format!("/v1/holds/{hold}/confirm")))
            .bearer_auth(token)
            .json(&json!({"payment": {"gateway": "test", "reference": reference}}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (status, retry_after, r.json().await.unwrap_or(Value::Null))
    }

    /// POST with the seller key, e.g. `/v1/drops/{id}/close`.
    pub async fn seller_post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.seller_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        testkit::answer(r).await
    }

    /// A hold's state as its fan reads it (`GET /v1/holds/{id}`).
    pub async fn hold_state(&self, token: &str, hold: &str) -> String {
        let (status, v) = self.get(&format!("/v1/holds/{hold}"), Some(token)).await;
        assert_eq!(status, 200, "GET hold {hold}: {v}");
        v["state"].as_str().unwrap_or_default().to_owned()
    }

    /// The sum of a metric's samples at `/metrics` (0 when the metric is absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
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

    /// What the test gateway recorded of a hold's payment.
    pub async fn payment(&self, hold_id: &str) -> engine::payments::TestPayment {
        let gateway = self.server.engine.test_gateway();
        let hold = engine::ids::HoldId::parse(hold_id).unwrap();
        gateway
            .expect("the test gateway is on")
            .payment(&hold)
            .expect("a payment for the hold")
    }

    /// How many orders Postgres has for a drop (and for one hold, if given).
    pub async fn order_count(&self, drop: &str, hold: Option<&str>) -> i64 {
        let db = self.server.engine.db().client().await.unwrap();
        let row = match hold {
            Some(h) => db
                .query_one(
                    "SELECT count(*) FROM orders WHERE drop_id = $1 AND hold_id = $2",
                    &[&drop, &h],
                )
                .await
                .unwrap(),
            None => db
                .query_one("SELECT count(*) FROM orders WHERE drop_id = $1", &[&drop])
                .await
                .unwrap(),
        };
        row.get(0)
    }
}
