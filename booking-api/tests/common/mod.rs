//! Test harness: a booking-api started in-process on 127.0.0.1:0 against the Redis and Postgres
//! that `./dev test` started (FLOODGATE_TEST_REDIS_URL / FLOODGATE_TEST_DATABASE_URL). A harness
//! derefs to its `testkit::BookingClient` (the one client of the API every suite uses), so tests
//! call `h.reserve(…)`; what needs the server's engine (Postgres checks, the test gateway) is
//! here. Every test makes its own drops and fans, so tests run in parallel without sharing data.
#![allow(dead_code)]

pub mod pages;

use booking_api::Running;
use engine::ids::{HoldId, OrderId};
use engine::Config;
use testkit::BookingClient;

pub struct Harness {
    pub server: Running,
    pub client: BookingClient,
}

impl std::ops::Deref for Harness {
    type Target = BookingClient;

    fn deref(&self) -> &BookingClient {
        &self.client
    }
}

impl Harness {
    pub async fn start() -> Harness {
        Self::with_config(testkit::test_config()).await
    }

    pub async fn with_config(cfg: Config) -> Harness {
        let server = booking_api::start(cfg).await.expect("booking-api starts");
        let client = BookingClient::with_new_keys(server.url(), &server.engine, "test").await;
        Harness { server, client }
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

    /// Checks `available + held + sold == total` for every bucket, and Postgres' record of the
    /// sale: inventory.sold, order items (less what was refunded) and the ledger all agree with
    /// Redis' sold count.
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
                     (SELECT coalesce(sum(quantity - refunded), 0)::bigint FROM order_items WHERE drop_id = $1 AND bucket = $2), \
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

/// A fan named `name` reserves `body` of `drop` and pays for it (the reference `ok_<name>`, which
/// the test gateway approves); (order id, hold id).
pub async fn buy(
    h: &Harness,
    drop: &str,
    name: &str,
    body: serde_json::Value,
) -> (OrderId, String) {
    let (_, token) = h.fan(name).await;
    let (status, v) = h.reserve(&token, drop, body).await;
    assert_eq!(status, 201, "{v}");
    let hold = v["hold_id"].as_str().unwrap().to_owned();
    let (status, v) = h.confirm(&token, &hold, &format!("ok_{name}")).await;
    assert_eq!(status, 201, "{v}");
    (
        OrderId::parse(v["order_id"].as_str().unwrap()).unwrap(),
        hold,
    )
}

/// [`buy`] of `units` tees (the SKU `TEE` of a `ga_drop`).
pub async fn buy_tees(h: &Harness, drop: &str, name: &str, units: u32) -> (OrderId, String) {
    let body = serde_json::json!({"items": [{"sku": "TEE", "quantity": units}]});
    buy(h, drop, name, body).await
}

/// Waits until the test gateway has captured every hold's payment (the capture follows the
/// order's commit), so that a refund of each refunds a capture rather than voiding it.
pub async fn wait_captured(h: &Harness, holds: &[String]) {
    testkit::wait::eventually("every payment captured", || async {
        let gw = h.server.engine.test_gateway().unwrap();
        holds.iter().all(|hold| {
            gw.payment(&HoldId::parse(hold).unwrap())
                .is_some_and(|p| p.captures == 1)
        })
    })
    .await;
}

/// `redis-cli -u <the test Redis> args...`, its stdout: for tests that play a fault on a drop's
/// keys.
pub async fn redis_cli(args: &[&str]) -> String {
    let url = std::env::var("FLOODGATE_TEST_REDIS_URL").unwrap();
    let out = tokio::process::Command::new("redis-cli")
        .arg("-u")
        .arg(&url)
        .args(args)
        .output()
        .await
        .expect("redis-cli runs");
    assert!(out.status.success(), "redis-cli {args:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim_end_matches('\n')
        .to_owned()
}

/// The seated race's 200 requests for a drop of sections A and B, 3 rows of 10 seats: 120 fans
/// ask for named adjacent pairs (each of the 54 pairs about twice; neighbouring pairs share a
/// seat, so they collide), 80 for the best two in a section.
pub fn seated_race_requests() -> Vec<serde_json::Value> {
    let mut pairs = Vec::new();
    for section in ["A", "B"] {
        for row in 1..=3 {
            for n in 1..=9 {
                pairs.push(vec![
                    format!("{section}-{row}-{n}"),
                    format!("{section}-{row}-{}", n + 1),
                ]);
            }
        }
    }
    (0..200)
        .map(|i| {
            if i % 5 < 3 {
                serde_json::json!({"seats": pairs[(i * 7) % pairs.len()]})
            } else {
                let section = if i % 2 == 0 { "A" } else { "B" };
                serde_json::json!({"best_available": {"section": section, "quantity": 2}})
            }
        })
        .collect()
}

/// RFC 4180: records of fields, fields quoted with `"` when they hold `,`, `"` or a line break,
/// `""` for a quote inside.
pub fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(
        field.is_empty() && record.is_empty(),
        "the CSV ends with a line break"
    );
    records
}
