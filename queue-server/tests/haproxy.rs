//! Many instances behind HAProxy (issue 14): two booking-api and two queue-server processes
//! behind one HAProxy (devstack's `Fleet`, what `./dev up --instances 2` runs), each test on a
//! stack of its own:
//! - `fault_instances_killed_behind_haproxy_mid_sale` (below);
//! - `fault_rolling_restart_behind_haproxy_fails_nothing`: the rolling-deploy runbook on both
//!   pairs while fans buy and wait;
//! - `fault_fan_pages_work_through_haproxy`: the queue page, the shop and the booking page in
//!   headless Chromium, on HAProxy's hosts;
//! - `fault_clients_without_an_address_cannot_fail_the_health_checks`.
//!
//! The first: a sale going through HAProxy, and one instance of each server killed with SIGKILL
//! in the middle:
//! - a request in flight to the killed instance may fail (502); a retry with the same
//!   idempotency key gets the original outcome (the same hold, then the same order);
//! - once HAProxy has marked them down, nothing fails: every reserve, confirm and new socket of
//!   the fans who come after succeeds at the first try;
//! - the fans' sockets on the killed queue-server reconnect (through HAProxy, to the other one)
//!   and keep their places;
//! - nothing is sold twice, `available + held + sold == total`, and Postgres agrees.
//!
//! Every fan comes from an address of its own (`X-Forwarded-For`, which HAProxy passes on and the
//! instances trust from 127.0.0.1) under per-IP limits far below what the test sends in all: the
//! limits see fans, not the balancer.
//!
//! Starts its own stack and processes (debug binaries: `cargo build --workspace --bins` first, as
//! `./dev test` does). Named `fault_*`: `./dev test` runs it in its serial phase.
mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::checked_frame;
use devstack::instances::{Fleet, FleetConfig};
use devstack::{free_port, Stack, StackConfig};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// How long any one fan keeps retrying before the test gives up: generous, the machine is
/// shared.
const DEADLINE: Duration = Duration::from_secs(120);
/// Per-IP limits of booking-api here: a fan makes a handful of requests, the test hundreds.
const PER_IP_PER_S: u32 = 5;
const PER_IP_BURST: u32 = 20;

struct Sale {
    stack: Option<Stack>,
    fleet: Arc<Mutex<Fleet>>,
    booking: String,
    fan_host: String,
    seller_key: String,
    db_url: String,
}

impl Drop for Sale {
    fn drop(&mut self) {
        self.fleet.lock().unwrap_or_else(|p| p.into_inner()).stop();
        if let Some(mut s) = self.stack.take() {
            s.stop();
        }
    }
}

/// The debug binaries beside this test's executable (`target/debug/deps/haproxy-…`).
fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/debug");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: cargo build --workspace --bins",
        bin.display()
    );
    bin
}

fn create_key(booking_bin: &PathBuf, env: &[(String, String)], scope: &str) -> String {
    let out = std::process::Command::new(booking_bin)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["create-key", "--scope", scope, "--name", "fault-haproxy"])
        .output()
        .expect("booking-api create-key runs");
    assert!(
        out.status.success(),
        "create-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .expect("a key")
        .to_owned()
}

async fn start(name: &'static str, drain_unready_ms: u64) -> Sale {
    tokio::task::spawn_blocking(move || {
        let stack = Stack::start(StackConfig {
            name: name.into(),
            redis_port: free_port(),
            pg_port: free_port(),
        })
        .expect("the stack starts");
        let (booking_bin, queue_bin) = (bin("booking-api"), bin("queue-server"));
        let shared: Vec<(String, String)> = [
            ("FLOODGATE_DATABASE_URL", stack.database_url()),
            ("FLOODGATE_REDIS_URL", stack.redis_url()),
            ("FLOODGATE_DEV_IDENTITY", "true".into()),
            ("FLOODGATE_IDENTITY__DEV_SECRET", "\"fault-haproxy\"".into()),
            ("FLOODGATE_ADMISSION__SECRETS", "[\"fault-haproxy\"]".into()),
            // A confirm in flight on the killed instance is settled by the other one's
            // reconciler soon after, not a minute later.
            ("FLOODGATE_HOLDS__CONFIRM_TIMEOUT_MS", "4000".into()),
            ("FLOODGATE_HOLDS__CONFIRM_SAFETY_MARGIN_MS", "2000".into()),
            ("FLOODGATE_GATEWAY__TIMEOUT_MS", "1000".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let mut booking_env = shared.clone();
        booking_env.push((
            "FLOODGATE_LIMITS__PER_IP_PER_S".into(),
            PER_IP_PER_S.to_string(),
        ));
        booking_env.push((
            "FLOODGATE_LIMITS__PER_IP_BURST".into(),
            PER_IP_BURST.to_string(),
        ));
        let seller_key = create_key(&booking_bin, &booking_env, "seller");
        let (booking_port, queue_port) = (free_port(), free_port());
        let fleet = Fleet::start(
            &FleetConfig {
                booking_bin,
                queue_bin,
                instances: 2,
                booking_port,
                queue_port,
                booking_env,
                queue_env: shared,
                state_dir: stack.state_dir().join("fleet"),
                drain_unready_ms,
            },
            &|| false,
        )
        .expect("two booking-api and two queue-server behind HAProxy start");
        Sale {
            db_url: stack.database_url(),
            stack: Some(stack),
            fleet: Arc::new(Mutex::new(fleet)),
            booking: format!("http://127.0.0.1:{booking_port}"),
            fan_host: format!("http://127.0.0.1:{queue_port}"),
            seller_key,
        }
    })
    .await
    .expect("the start task")
}

impl Sale {
    async fn with_fleet<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Fleet) -> T + Send + 'static,
    ) -> T {
        let fleet = self.fleet.clone();
        tokio::task::spawn_blocking(move || f(&mut fleet.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .expect("the fleet task")
    }

    /// HAProxy's view of one server: `UP`, `DOWN`, or on its way (`UP 1/2`).
    async fn status(&self, backend: &'static str, server: &'static str) -> String {
        self.with_fleet(move |f| {
            f.haproxy()
                .and_then(|h| h.server_status(backend, server))
                .ok()
                .flatten()
                .unwrap_or_default()
        })
        .await
    }

    /// `POST /v1/drops` as the seller, through HAProxy; the new drop's id.
    async fn create_drop(&self, body: Value) -> String {
        let req = reqwest::Client::new()
            .post(format!("{}/v1/drops", self.booking))
            .bearer_auth(&self.seller_key)
            .json(&body);
        let (status, v) = send(req).await;
        assert_eq!(status, 201, "create drop: {v}");
        v["drop_id"].as_str().expect("a drop id").to_owned()
    }

    /// A fan signed in through `host` (the dev identity provider); their token.
    async fn session(&self, fan: &Fan) -> String {
        let (status, s) = send(
            fan.http
                .post(format!("{}/v1/fans/session", self.fan_host))
                .json(&json!({"fan": fan.name})),
        )
        .await;
        assert!(status == 200 || status == 201, "session: {status} {s}");
        s["fan_token"].as_str().expect("a fan token").to_owned()
    }

    fn psql(&self, sql: &str) -> String {
        let out = std::process::Command::new("psql")
            .args([
                self.db_url.as_str(),
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-c", sql])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// One SKU of tees, one per fan.
fn tees(quantity: u32, admission: Value) -> Value {
    json!({
        "name": "fault haproxy", "per_fan_limit": 1, "hold_ttl_s": 600, "admission": admission,
        "inventory": {"kind": "ga", "skus": [{"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": quantity}]}
    })
}

/// A fan: their own address (every request says it in `X-Forwarded-For`) and client.
#[derive(Clone)]
struct Fan {
    name: String,
    addr: String,
    http: reqwest::Client,
}

impl Fan {
    fn new(name: String, n: usize) -> Fan {
        let addr = format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-forwarded-for", addr.parse().expect("an address"));
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("a client");
        Fan { name, addr, http }
    }
}

/// One answer: status (0: no answer at all, the connection failed) and body.
async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.json().await.unwrap_or(Value::Null);
            (status, body)
        }
        Err(_) => (0, Value::Null),
    }
}

/// Whether a failure is the killed instance's: no answer, HAProxy's 502 / 503 (a request in
/// flight to it, or no server left for a moment), or a store briefly unavailable.
fn instance_lost(status: u16) -> bool {
    matches!(status, 0 | 502 | 503 | 504)
}

/// What one buyer got, and how.
#[derive(Debug, Default)]
struct Bought {
    hold: String,
    order: String,
    /// Answers that were the killed instance's (see [`instance_lost`]), retried.
    lost: Vec<u16>,
}

/// Signs in, holds one tee under an idempotency key and pays for it. With `strict`, any
/// answer but the expected one is a failure; without, answers of a lost instance are retried
/// with the same key (and the same payment reference).
async fn buy(sale_booking: String, drop: String, fan: Fan, strict: bool) -> Result<Bought, String> {
    let mut bought = Bought::default();
    let until = Instant::now() + DEADLINE;
    let url = |p: &str| format!("{sale_booking}{p}");
    let again = |what: &str, status: u16, body: &Value, bought: &mut Bought| {
        if strict || !instance_lost(status) || Instant::now() > until {
            return Err(format!("{} {what}: {status} {body}", fan.name));
        }
        bought.lost.push(status);
        Ok(())
    };

    let token = loop {
        let (status, body) = send(
            fan.http
                .post(url("/v1/fans/session"))
                .json(&json!({"fan": fan.name})),
        )
        .await;
        match (status, body["fan_token"].as_str()) {
            (200 | 201, Some(t)) => break t.to_owned(),
            _ => again("session", status, &body, &mut bought)?,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let key = uuid::Uuid::new_v4().to_string();
    let body = json!({"items": [{"sku": "TEE", "quantity": 1}]}).to_string();
    let reserve = || {
        fan.http
            .post(url(&format!("/v1/drops/{drop}/holds")))
            .bearer_auth(&token)
            .header("idempotency-key", &key)
            .header("content-type", "application/json")
            .body(body.clone())
    };
    bought.hold = loop {
        let (status, got) = send(reserve()).await;
        match (status, got["hold_id"].as_str()) {
            (201, Some(h)) => break h.to_owned(),
            _ => again("reserve", status, &got, &mut bought)?,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The same key again: the original answer, nothing new held.
    let (status, replay) = loop {
        let (status, got) = send(reserve()).await;
        if !instance_lost(status) {
            break (status, got);
        }
        again("reserve replay", status, &got, &mut bought)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if status != 201 || replay["hold_id"] != bought.hold.as_str() {
        return Err(format!(
            "{}: reserve replayed as {status} {replay}, first {}",
            fan.name, bought.hold
        ));
    }

    let mut attempt = 0;
    let hold = bought.hold.clone();
    let confirm = |reference: String| {
        fan.http
            .post(url(&format!("/v1/holds/{hold}/confirm")))
            .bearer_auth(&token)
            .json(&json!({"payment": {"gateway": "test", "reference": reference}}))
    };
    let reference = |attempt: u32| format!("ok_{}_{attempt}", fan.name);
    bought.order = loop {
        let (status, got) = send(confirm(reference(attempt))).await;
        match (
            status,
            got["order_id"].as_str(),
            got["error"]["code"].as_str(),
        ) {
            (200 | 201, Some(o), _) => break o.to_owned(),
            // The payment attempt in flight on the killed instance was voided by the
            // reconciler: nothing charged, the hold is held again; pay anew.
            (402, _, Some("payment_declined")) if !strict => attempt += 1,
            // Still being settled by the reconciler.
            (409, _, Some("confirm_in_progress")) | (503, _, Some("payment_pending"))
                if !strict =>
            {
                bought.lost.push(status)
            }
            _ => again("confirm", status, &got, &mut bought)?,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (status, again_got) = loop {
        let (status, got) = send(confirm(reference(attempt))).await;
        if !instance_lost(status) {
            break (status, got);
        }
        again("confirm replay", status, &got, &mut bought)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if status != 200 || again_got["order_id"] != bought.order.as_str() {
        return Err(format!(
            "{}: confirm replayed as {status} {again_got}, first {}",
            fan.name, bought.order
        ));
    }
    Ok(bought)
}

/// The places one waiter was told, one per connection; and for each of its sockets that closed,
/// the close code (None: the connection was lost without one) and, when the test is rolling
/// instances, HAProxy's state of the one being rolled right then.
#[derive(Default)]
struct Waiter {
    places: Vec<u64>,
    closes: Vec<(Option<u16>, String)>,
}

/// Asks HAProxy about the queue-server being rolled (`queue-{rolling + 1}`).
#[derive(Clone)]
struct Probe {
    fleet: Arc<Mutex<Fleet>>,
    rolling: Arc<AtomicUsize>,
}

impl Probe {
    async fn status(&self) -> String {
        let (fleet, i) = (self.fleet.clone(), self.rolling.load(Ordering::SeqCst));
        tokio::task::spawn_blocking(move || {
            let fleet = fleet.lock().unwrap_or_else(|p| p.into_inner());
            fleet
                .haproxy()
                .and_then(|h| h.server_status("queue", &format!("queue-{}", i + 1)))
                .ok()
                .flatten()
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default()
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a socket to the line through HAProxy from the fan's address and authenticates it;
/// the place of its first `position` frame. None if any of it failed.
async fn join_line(ws_base: &str, drop: &str, fan: &Fan, token: &str) -> Option<(Socket, u64)> {
    let mut req = format!("{ws_base}/v1/drops/{drop}/queue/ws")
        .into_client_request()
        .ok()?;
    req.headers_mut()
        .insert("x-forwarded-for", fan.addr.parse().ok()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.ok()?;
    let auth = json!({"type": "auth", "fan_token": token}).to_string();
    ws.send(Message::text(auth)).await.ok()?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .ok()??;
        if let Ok(Message::Text(t)) = msg {
            let frame = checked_frame(&t);
            if frame["type"] == "position" {
                return Some((ws, frame["place"].as_u64()?));
            }
        } else if !matches!(msg, Ok(Message::Ping(_) | Message::Pong(_))) {
            return None;
        }
    }
}

/// What every waiter of a test shares: where the line is, the count of waiters whose latest
/// socket is up, the probe of HAProxy (rolling tests), and the signal to stop.
#[derive(Clone)]
struct Line {
    ws_base: String,
    drop: String,
    connected: Arc<AtomicUsize>,
    probe: Option<Probe>,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// A fan waiting on a socket, as the page does: on a close (a 1012, or the connection lost with
/// its instance) it connects again, through HAProxy, until `stop`. Records each connection's
/// place; `connected` counts the waiters whose latest socket is up.
async fn wait_in_line(line: Line, fan: Fan, token: String, log: Arc<Mutex<Waiter>>) {
    let Line {
        ws_base,
        drop,
        connected,
        probe,
        mut stop,
    } = line;
    let until = Instant::now() + DEADLINE * 2;
    loop {
        let Some((mut ws, place)) = join_line(&ws_base, &drop, &fan, &token).await else {
            assert!(
                Instant::now() < until,
                "{} never got back in line",
                fan.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        log.lock().unwrap().places.push(place);
        connected.fetch_add(1, Ordering::SeqCst);
        let closed = loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => { checked_frame(&t); }
                    Some(Ok(Message::Close(frame))) => break Some(frame.map(|f| u16::from(f.code))),
                    Some(Err(_)) | None => break Some(None),
                    Some(Ok(_)) => {}
                },
                _ = stop.changed() => break None,
            }
        };
        connected.fetch_sub(1, Ordering::SeqCst);
        let Some(code) = closed else {
            let _ = ws.close(None).await;
            return;
        };
        let status = match &probe {
            Some(p) => p.status().await,
            None => String::new(),
        };
        log.lock().unwrap().closes.push((code, status));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_instances_killed_behind_haproxy_mid_sale() {
    let sale = start("fault-haproxy", devstack::haproxy::DRAIN_UNREADY_MS).await;
    let ws_base = sale.fan_host.replace("http://", "ws://");
    const TOTAL: u32 = 400;
    let drop = sale.create_drop(tees(TOTAL, json!({"mode": "open"}))).await;
    // A line nobody leaves: paused, so every place stays as it was given.
    let line = sale
        .create_drop(tees(10, json!({"mode": "queue", "paused": true})))
        .await;

    // The fan pages of both servers on the fan host: the queue page, the shop, their assets.
    let page = reqwest::Client::new();
    for path in [
        format!("/drops/{line}"),
        format!("/drops/{line}/shop"),
        "/static/book.js".to_owned(),
    ] {
        let r = page
            .get(format!("{}{path}", sale.fan_host))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path} on the fan host");
    }

    // Waiters on sockets through HAProxy (leastconn spreads them over both queue-servers).
    const WAITERS: usize = 30;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let connected = Arc::new(AtomicUsize::new(0));
    let mut waiters = Vec::new();
    let mut n = 0;
    for i in 0..WAITERS {
        n += 1;
        let fan = Fan::new(format!("waiter-{i}"), n);
        let (status, s) = send(
            fan.http
                .post(format!("{}/v1/fans/session", sale.fan_host))
                .json(&json!({"fan": fan.name})),
        )
        .await;
        assert!(status == 200 || status == 201, "session: {s}");
        let token = s["fan_token"].as_str().unwrap().to_owned();
        let log = Arc::new(Mutex::new(Waiter::default()));
        waiters.push((fan.name.clone(), log.clone()));
        let waiting = Line {
            ws_base: ws_base.clone(),
            drop: line.clone(),
            connected: connected.clone(),
            probe: None,
            stop: stop_rx.clone(),
        };
        tokio::spawn(wait_in_line(waiting, fan, token, log));
    }
    testkit::eventually_within(DEADLINE, "every waiter is in line", || {
        let c = connected.clone();
        async move { c.load(Ordering::SeqCst) == WAITERS }
    })
    .await;

    // The sale: buyers keep coming, 12 at a time; one instance of each server is killed while
    // they do.
    const BUYERS: usize = 160;
    let done = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..12)
        .map(|_| {
            let (done, results, next) = (done.clone(), results.clone(), next.clone());
            let (booking, drop) = (sale.booking.clone(), drop.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= BUYERS {
                        return;
                    }
                    let fan = Fan::new(format!("buyer-{i}"), 10_000 + i);
                    let got = buy(booking.clone(), drop.clone(), fan.clone(), false).await;
                    results.lock().unwrap().push((fan.name, got));
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    testkit::eventually_within(DEADLINE, "a third of the buyers are done", || {
        let d = done.clone();
        async move { d.load(Ordering::SeqCst) >= BUYERS / 3 }
    })
    .await;
    sale.with_fleet(|f| {
        f.booking[0].kill().expect("booking-api-1 is killed");
        f.queue[0].kill().expect("queue-server-1 is killed");
    })
    .await;
    for (backend, server) in [("booking", "booking-1"), ("queue", "queue-1")] {
        testkit::eventually_within(
            DEADLINE,
            "HAProxy marks the killed instance down",
            || async { sale.status(backend, server).await == "DOWN" },
        )
        .await;
    }
    for w in workers {
        w.await.expect("a buyer worker");
    }

    // Marked down, nothing fails: fans who come now buy, and join the line, at the first try.
    let strict: Vec<_> = (0..40)
        .map(|i| {
            let fan = Fan::new(format!("late-buyer-{i}"), 20_000 + i);
            tokio::spawn(buy(sale.booking.clone(), drop.clone(), fan, true))
        })
        .collect();
    let mut late = Vec::new();
    for s in strict {
        late.push(s.await.expect("a late buyer"));
    }
    let failed: Vec<&String> = late.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed after HAProxy marked the instance down, the first: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    for i in 0..10 {
        let fan = Fan::new(format!("late-waiter-{i}"), 30_000 + i);
        let (status, s) = send(
            fan.http
                .post(format!("{}/v1/fans/session", sale.fan_host))
                .json(&json!({"fan": fan.name})),
        )
        .await;
        assert!(status == 200 || status == 201, "late session: {status} {s}");
        let token = s["fan_token"].as_str().unwrap();
        assert!(
            join_line(&ws_base, &line, &fan, token).await.is_some(),
            "{} could not join the line after HAProxy marked queue-1 down",
            fan.name
        );
    }

    // The waiters of the killed queue-server are back (on the other), each in their place.
    testkit::eventually_within(DEADLINE, "every waiter is back in line", || {
        let c = connected.clone();
        async move { c.load(Ordering::SeqCst) == WAITERS }
    })
    .await;
    let _ = stop_tx.send(true);
    let mut moved = 0;
    for (name, log) in &waiters {
        let places = &log.lock().unwrap().places;
        assert!(
            places.windows(2).all(|w| w[0] == w[1]),
            "{name} lost their place: {places:?}"
        );
        if places.len() > 1 {
            moved += 1;
        }
    }
    assert!(
        moved > 0,
        "no waiter's socket was on the killed queue-server (leastconn spreads them)"
    );

    // Every buyer bought exactly once; retries got the original answers (checked in `buy`).
    let results = std::mem::take(&mut *results.lock().unwrap());
    let mut lost: HashMap<u16, usize> = HashMap::new();
    let mut orders = Vec::new();
    for (name, r) in &results {
        match r {
            Ok(b) => {
                for s in &b.lost {
                    *lost.entry(*s).or_default() += 1;
                }
                orders.push(b.order.clone());
            }
            Err(e) => panic!("buyer {name}: {e}"),
        }
    }
    orders.extend(late.into_iter().map(|r| r.unwrap().order));
    eprintln!("answers of the lost instances, retried: {lost:?}");
    let sold = orders.len();
    assert_eq!(sold, BUYERS + 40);

    assert_books(&sale, &drop, TOTAL, &orders).await;
}

/// The books after a run in which `orders` were answered (one tee each): through HAProxy,
/// available + held + sold == total and the sold count is theirs; Postgres has exactly those
/// orders, no hold sold twice, no fan with other than one tee.
async fn assert_books(sale: &Sale, drop: &str, total_units: u32, orders: &[String]) {
    let sold = orders.len();
    let view = send(reqwest::Client::new().get(format!("{}/v1/drops/{drop}", sale.booking))).await;
    assert_eq!(view.0, 200, "{}", view.1);
    let (mut total, mut counted, mut sold_view) = (0, 0, 0);
    for sku in view.1["inventory"].as_array().expect("inventory") {
        let (t, a, h, s) = (
            sku["total"].as_i64().unwrap(),
            sku["available"].as_i64().unwrap(),
            sku["held"].as_i64().unwrap(),
            sku["sold"].as_i64().unwrap(),
        );
        assert_eq!(a + h + s, t, "available + held + sold == total: {sku}");
        total += t;
        counted += a + h + s;
        sold_view += s;
    }
    assert_eq!(
        (total, counted),
        (i64::from(total_units), i64::from(total_units))
    );
    assert_eq!(sold_view, sold as i64, "sold in the drop's view");
    let pg = |sql: &str| sale.psql(&sql.replace("$DROP", &format!("'{drop}'")));
    assert_eq!(
        pg("SELECT count(*) FROM orders WHERE drop_id = $DROP"),
        sold.to_string()
    );
    assert_eq!(
        pg("SELECT count(*) FROM (SELECT hold_id FROM orders WHERE drop_id = $DROP GROUP BY hold_id HAVING count(*) > 1) t"),
        "0",
        "a hold sold twice"
    );
    assert_eq!(
        pg("SELECT count(*) FROM fan_purchases WHERE drop_id = $DROP AND units <> 1"),
        "0",
        "a fan bought other than one tee"
    );
    assert_eq!(
        pg("SELECT coalesce(sum(sold), 0) FROM inventory WHERE drop_id = $DROP"),
        sold.to_string()
    );
    let distinct: std::collections::HashSet<&String> = orders.iter().collect();
    assert_eq!(distinct.len(), sold, "an order answered to two fans");
}

/// The rolling-deploy runbook (docs/OPERATIONS.md, "Rolling deploys") played on both pairs of
/// instances in turn while fans buy and wait: SIGTERM one booking-api and one queue-server,
/// wait for them to exit, start them again, wait until HAProxy has them up, then the next pair.
/// Nothing fails at any point; HAProxy has marked a draining instance down before it exits and
/// before its sockets are told 1012; every waiter is told 1012 (never cut off) and keeps its
/// place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_rolling_restart_behind_haproxy_fails_nothing() {
    // Twice the default drain: HAProxy's checks compete with the whole test for two cores.
    let sale = start(
        "fault-haproxy-roll",
        2 * devstack::haproxy::DRAIN_UNREADY_MS,
    )
    .await;
    let ws_base = sale.fan_host.replace("http://", "ws://");
    const TOTAL: u32 = 20_000;
    let drop = sale.create_drop(tees(TOTAL, json!({"mode": "open"}))).await;
    let line = sale
        .create_drop(tees(10, json!({"mode": "queue", "paused": true})))
        .await;

    const WAITERS: usize = 20;
    let rolling = Arc::new(AtomicUsize::new(0));
    let probe = Probe {
        fleet: sale.fleet.clone(),
        rolling: rolling.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let connected = Arc::new(AtomicUsize::new(0));
    let mut waiters = Vec::new();
    for i in 0..WAITERS {
        let fan = Fan::new(format!("waiter-{i}"), 1 + i);
        let token = sale.session(&fan).await;
        let log = Arc::new(Mutex::new(Waiter::default()));
        waiters.push((fan.name.clone(), log.clone()));
        let waiting = Line {
            ws_base: ws_base.clone(),
            drop: line.clone(),
            connected: connected.clone(),
            probe: Some(probe.clone()),
            stop: stop_rx.clone(),
        };
        tokio::spawn(wait_in_line(waiting, fan, token, log));
    }
    testkit::eventually_within(DEADLINE, "every waiter is in line", || {
        let c = connected.clone();
        async move { c.load(Ordering::SeqCst) == WAITERS }
    })
    .await;

    // Buyers keep coming, 8 at a time, until both pairs are rolled; each must succeed at the
    // first try.
    let buying = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (buying, next) = (buying.clone(), next.clone());
            let (booking, drop) = (sale.booking.clone(), drop.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                while buying.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let fan = Fan::new(format!("buyer-{i}"), 10_000 + i);
                    got.push(buy(booking.clone(), drop.clone(), fan, true).await);
                    // A steady trickle: the stock lasts, and the machine has room for
                    // HAProxy's checks.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                got
            })
        })
        .collect();

    for i in 0..2 {
        rolling.store(i, Ordering::SeqCst);
        // 1. Drain.
        sale.with_fleet(move |f| {
            assert!(f.booking[i].terminate(), "SIGTERM booking-api-{}", i + 1);
            assert!(f.queue[i].terminate(), "SIGTERM queue-server-{}", i + 1);
        })
        .await;
        let (booking_server, queue_server) =
            (format!("booking-{}", i + 1), format!("queue-{}", i + 1));
        testkit::eventually_within(DEADLINE, "both drained instances exit", || {
            sale.with_fleet(move |f| {
                matches!(f.booking[i].exited(), Ok(Some(_)))
                    && matches!(f.queue[i].exited(), Ok(Some(_)))
            })
        })
        .await;
        for (backend, server) in [("booking", &booking_server), ("queue", &queue_server)] {
            let (b, s) = (backend.to_owned(), server.clone());
            let status = sale
                .with_fleet(move |f| {
                    f.haproxy()
                        .and_then(|h| h.server_status(&b, &s))
                        .ok()
                        .flatten()
                })
                .await;
            assert_eq!(
                status.as_deref(),
                Some("DOWN"),
                "{server} exited before HAProxy marked it down"
            );
        }
        // 2. Upgrade (the same binary here) and 3. bring it back.
        sale.with_fleet(move |f| {
            f.booking[i].restart().expect("booking-api starts again");
            f.queue[i].restart().expect("queue-server starts again");
        })
        .await;
        sale.with_fleet(|f| f.wait_all_up(&|| false))
            .await
            .expect("HAProxy has every instance up again");
    }
    buying.store(false, Ordering::SeqCst);
    let mut orders = Vec::new();
    let mut failed = Vec::new();
    for w in workers {
        for r in w.await.expect("a buyer worker") {
            match r {
                Ok(b) => orders.push(b.order),
                Err(e) => failed.push(e),
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed during the rolling restart, the first: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        !orders.is_empty(),
        "nobody bought during the rolling restart"
    );

    testkit::eventually_within(DEADLINE, "every waiter is back in line", || {
        let c = connected.clone();
        async move { c.load(Ordering::SeqCst) == WAITERS }
    })
    .await;
    let _ = stop_tx.send(true);
    for (name, log) in &waiters {
        let log = log.lock().unwrap();
        assert!(
            log.places.windows(2).all(|w| w[0] == w[1]),
            "{name} lost their place: {:?}",
            log.places
        );
        // Each waiter sat on one of the two queue-servers, both were rolled.
        assert!(!log.closes.is_empty(), "{name}'s socket was never closed");
        for (code, status) in &log.closes {
            assert_eq!(*code, Some(1012), "{name}'s socket closed without 1012");
            assert_eq!(
                status, "DOWN",
                "{name} was told 1012 before HAProxy marked its queue-server down"
            );
        }
    }
    assert_books(&sale, &drop, TOTAL, &orders).await;
}

/// `./dev up --instances 2` as a fan sees it, in headless Chromium: on HAProxy's fan host the
/// queue page signs the fan in and waits on its socket, hands the admitted fan to the shop on the
/// same host (queue-server's `/drops/{id}/shop`), which holds and pays at booking-api through the
/// same host — no cross-origin call anywhere (the instances allow no CORS origin at all). The
/// booking page on the booking host works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_fan_pages_work_through_haproxy() {
    use testkit::{open_browser, ONE_BROWSER, PHONE};
    let _one = ONE_BROWSER.lock().await;
    let sale = start("fault-haproxy-pages", devstack::haproxy::DRAIN_UNREADY_MS).await;
    let line = sale
        .create_drop(tees(
            20,
            json!({"mode": "queue", "rate_per_s": 5, "burst": 5, "max_active": 10}),
        ))
        .await;

    let p = open_browser("haproxy-fan-host", PHONE).await;
    p.goto(&format!("{}/drops/{line}", sale.fan_host)).await;
    // The drop's name comes from booking-api's API, on the page's own host.
    p.wait_text("#drop-name", "the drop's name", |t| t == "fault haproxy")
        .await;
    p.el("#signin:not([hidden])").await;
    let fan = format!("pages-{:08x}", rand::random::<u32>());
    p.fill("#fan-name", &fan).await;
    p.click("#signin-form button[type=submit]").await;
    let shop = format!("{}/drops/{line}/shop", sale.fan_host);
    p.wait_url("the shop on the fan host", |u| u == shop).await;
    p.el("#whoami:not([hidden])").await;
    assert_eq!(p.text("#fan-label").await, fan);
    p.click("#hold-button:enabled").await;
    p.el("#hold-view:not([hidden])").await;
    p.fill("#pay-reference", "ok_pages_1").await;
    p.click("#pay:enabled").await;
    p.el("#order-view:not([hidden])").await;
    let order = p
        .wait_text("#order-id", "the order number", |t| {
            !t.is_empty() && !t.contains("being finalised")
        })
        .await;
    p.shot("order").await;
    assert_eq!(
        sale.psql(&format!(
            "SELECT fan_id FROM orders WHERE order_id::text = '{order}' AND drop_id = '{line}'"
        )),
        fan
    );

    // `admitted`'s `booking_url` (the fan host's `/drops/{id}?admission_token=…`, for other
    // front ends) is booking-api's page, which takes the token from the link; without a token
    // the same path is the queue page.
    let booking_page_marker = r#"<meta name="floodgate-api-url" content="">"#;
    let link = page_at(
        &sale.fan_host,
        &format!("/drops/{line}?admission_token=v1.x"),
    )
    .await;
    assert!(link.contains(booking_page_marker), "{link}");
    let queue_page = page_at(&sale.fan_host, &format!("/drops/{line}")).await;
    assert!(!queue_page.contains(booking_page_marker), "{queue_page}");

    // The booking host serves booking-api's own page.
    let drop = sale.create_drop(tees(5, json!({"mode": "open"}))).await;
    p.goto(&format!("{}/drops/{drop}", sale.booking)).await;
    p.wait_text("#drop-name", "the drop's name", |t| t == "fault haproxy")
        .await;
    p.close().await;
}

/// GET `path` on `host`: 200 and its body.
async fn page_at(host: &str, path: &str) -> String {
    let r = reqwest::get(format!("{host}{path}")).await.unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    r.text().await.unwrap()
}

/// Requests that carry no client address of their own (a load test through HAProxy) all count
/// as 127.0.0.1, the balancer, which the instances trust: they can spend that address's per-IP
/// budget, but HAProxy's health checks say they come from an address of their own, so the
/// instances stay up — a 429 to a check would take every instance out of the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_clients_without_an_address_cannot_fail_the_health_checks() {
    let sale = start("fault-haproxy-checks", devstack::haproxy::DRAIN_UNREADY_MS).await;
    let drop = sale.create_drop(tees(5, json!({"mode": "open"}))).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/drops/{drop}", sale.booking);
    let mut refused = 0;
    // Several of HAProxy's check intervals (500 ms) with 127.0.0.1's budget spent.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let (status, body) = send(http.get(&url)).await;
        match status {
            200 => {}
            429 => refused += 1,
            _ => panic!("GET {url}: {status} {body}"),
        }
        for server in ["booking-1", "booking-2"] {
            let status = sale.status("booking", server).await;
            assert!(
                status == "UP",
                "{server} is {status} while 127.0.0.1's budget is spent"
            );
        }
    }
    assert!(
        refused > 0,
        "the requests never spent 127.0.0.1's per-IP budget"
    );
}
