//! The ops console (`GET /ops`, static/ops.{html,js,css}) and its live stream (`GET /v1/ops/ws`).
//! In a real headless Chromium (testkit::browser) against an in-process booking-api and
//! queue-server: an ops engineer pauses the line and changes the rate from the console, a fan's
//! queue page (another tab) shows "paused" and moves on when the line resumes, and the audit log
//! shows both changes with the key, before and after; the console fits a phone. Without a
//! browser: the stream refuses a key in the URL, a missing, wrong or seller key and a socket that
//! says nothing; it is bounded; and it pushes figures read from Redis, including the reserves and
//! confirms each instance wrote there.

use std::time::{Duration, Instant};

use engine::Config;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use testkit::{open_browser, BookingClient, Page, DESKTOP, ONE_BROWSER, PHONE};
use tokio_tungstenite::tungstenite::Message;

struct Stack {
    booking: booking_api::Running,
    queue: queue_server::Running,
    client: BookingClient,
}

impl Stack {
    /// booking-api and queue-server sharing secrets, booking-api letting the queue page's origin
    /// call it (the page asks booking-api for the drop's name).
    async fn start(mut cfg: Config) -> Stack {
        cfg.identity.dev_secret = "ops-test-dev-secret".into();
        cfg.database.pool_size = 4;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free local port")
            .port();
        cfg.queue.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        cfg.http.cors_allow_origins = vec![format!("http://127.0.0.1:{port}")];
        let booking = booking_api::start(cfg.clone())
            .await
            .expect("booking-api starts");
        cfg.queue.booking_public_url = booking.url();
        let queue = queue_server::start(cfg).await.expect("queue-server starts");
        let client = BookingClient::with_new_keys(booking.url(), &booking.engine, "ops-test").await;
        Stack {
            booking,
            queue,
            client,
        }
    }

    async fn stop(self) {
        self.queue.shutdown().await;
        self.booking.shutdown().await;
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/v1/ops/ws", self.booking.addr)
    }

    /// A queue drop of 20 tees.
    async fn queue_drop(&self, admission: Value) -> String {
        let mut adm = json!({"mode": "queue"});
        for (k, v) in admission.as_object().cloned().unwrap_or_default() {
            adm[k] = v;
        }
        self.client
            .create_drop(json!({
                "name": "ops test", "per_fan_limit": 2, "hold_ttl_s": 300, "admission": adm,
                "inventory": {"kind": "ga", "skus": [{"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": 20}]}
            }))
            .await
    }
}

/// The part of an API key the audit log names it by: after `fgk_`, up to the next `_`.
fn key_id(key: &str) -> String {
    key.trim_start_matches("fgk_")
        .split('_')
        .next()
        .unwrap()
        .to_owned()
}

async fn sign_in(p: &Page, s: &Stack) {
    p.goto(&format!("{}/ops", s.booking.url())).await;
    p.el("#signin:not([hidden])").await;
    p.fill("#ops-key", &s.client.ops_key).await;
    p.click("#signin-form button[type=submit]").await;
    p.el("#console:not([hidden])").await;
}

/// Picks the drop in the console and waits for its first figures.
async fn pick(p: &Page, drop: &str) {
    p.el(&format!("#drop-picker option[value=\"{drop}\"]"))
        .await;
    let select = p.el("#drop-picker").await;
    if let Err(e) = select.select_by_value(drop).await {
        p.fail(&format!("pick the drop: {e}")).await;
    }
    p.el("#watch:not([hidden])").await;
    p.wait_text("#fig-line_fans .value", "the first figures", |t| {
        !t.is_empty() && t != "–"
    })
    .await;
}

/// Waits (bounded) for the confirm() dialog; its text, accepted.
async fn accept_confirm(p: &Page) -> String {
    let until = Instant::now() + testkit::browser::WAIT;
    loop {
        if let Ok(text) = p.client.get_alert_text().await {
            p.client.accept_alert().await.expect("accept the dialog");
            return text;
        }
        if Instant::now() > until {
            p.fail("waiting for the confirm dialog").await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_ops_pause_and_rate_change_reach_the_fan_page_and_the_audit_log() {
    let _one = ONE_BROWSER.lock().await;
    let s = Stack::start(testkit::test_config()).await;
    let drop = s
        .queue_drop(json!({"paused": false, "rate_per_s": 10, "burst": 5, "max_active": 1}))
        .await;
    // An early fan takes the one shopper's place, so ours waits.
    let (_, early) = s.client.fan("ops-early").await;
    let url = format!("{}/v1/drops/{drop}/queue", s.queue.url());
    let (status, v) = s
        .client
        .call(s.client.http.post(url).bearer_auth(&early))
        .await;
    assert_eq!(status, 201, "{v}");

    let p = open_browser("ops_console", DESKTOP).await;
    // Tab 1: the fan's queue page.
    p.goto(&format!("{}/drops/{drop}", s.queue.url())).await;
    p.wait_text("#drop-name", "the drop's name", |t| t == "ops test")
        .await;
    p.el("#signin:not([hidden])").await;
    p.fill(
        "#fan-name",
        &format!("ops-fan-{:08x}", rand::random::<u32>()),
    )
    .await;
    p.click("#signin-form button[type=submit]").await;
    p.el("#line:not([hidden])").await;
    let fan_tab = p.client.window().await.unwrap();

    // Tab 2: the ops console.
    let ops_tab = p.client.new_window(true).await.unwrap().handle;
    p.client.switch_to_window(ops_tab.clone()).await.unwrap();
    sign_in(&p, &s).await;
    pick(&p, &drop).await;
    p.wait_text("#paused-now", "the line running", |t| t == "running")
        .await;
    let rate = p.el("#rate").await.prop("value").await.unwrap();
    assert_eq!(rate.as_deref(), Some("10"));

    // Pause: no confirmation needed; the console's figures say so within a sample or two.
    p.click("#pause").await;
    p.wait_text("#controls-ok", "the pause applied", |t| {
        t.contains("paused")
    })
    .await;
    p.el("#line-state[data-state=\"paused\"]").await;
    p.shot("paused").await;

    // The fan's page says it too.
    p.client.switch_to_window(fan_tab.clone()).await.unwrap();
    p.el("#line-state[data-state=\"paused\"]").await;
    p.shot("fan-paused").await;

    // The rate 10 → 4 (less than half) and max active 1 → 4 (four times): asked first.
    p.client.switch_to_window(ops_tab.clone()).await.unwrap();
    p.fill("#rate", "4").await;
    p.fill("#max-active", "4").await;
    p.click("#apply").await;
    let asked = accept_confirm(&p).await;
    assert!(asked.contains("admitted per second: 10 → 4"), "{asked}");
    assert!(asked.contains("max active shoppers: 1 → 4"), "{asked}");
    p.wait_text("#controls-ok", "the change applied", |t| t == "Applied.")
        .await;
    let (_, adm) = s
        .client
        .get(
            &format!("/v1/drops/{drop}/admission"),
            Some(&s.client.ops_key),
        )
        .await;
    assert_eq!(adm["admission"]["rate_per_s"], 4.0, "{adm}");
    assert_eq!(adm["admission"]["max_active"], 4, "{adm}");
    // A change the console turned down isn't sent.
    p.fill("#burst", "50").await;
    p.click("#apply").await;
    p.client.get_alert_text().await.ok();
    let until = Instant::now() + testkit::browser::WAIT;
    while p.client.dismiss_alert().await.is_err() {
        assert!(
            Instant::now() < until,
            "the burst change was not asked about"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.wait_text("#controls-ok", "the refusal", |t| t == "Not applied.")
        .await;
    let (_, adm) = s
        .client
        .get(
            &format!("/v1/drops/{drop}/admission"),
            Some(&s.client.ops_key),
        )
        .await;
    assert_eq!(adm["admission"]["burst"], 5, "{adm}");

    // Resume: the fan moves — admitted, the page takes them to the shop.
    p.click("#resume").await;
    p.wait_text("#paused-now", "the line running again", |t| t == "running")
        .await;

    // The audit log: every change, with the key, before and after.
    let kid = key_id(&s.client.ops_key);
    let audit = p
        .wait_text("#audit", "the three changes in the audit log", |t| {
            t.contains("paused: false → true")
                && t.contains("paused: true → false")
                && t.contains("rate_per_s: 10 → 4")
                && t.contains("max_active: 1 → 4")
        })
        .await;
    assert_eq!(audit.matches(kid.as_str()).count(), 3, "{audit}");
    p.wait_text("#fig-admitted_per_s .sub", "the new rate", |t| {
        t.contains("set rate 4")
    })
    .await;
    p.client
        .execute(
            "document.getElementById('figures-title').scrollIntoView();",
            vec![],
        )
        .await
        .unwrap();
    p.shot("console").await;

    // The key is in the tab's session storage and in no address the page used.
    let seen = p
        .client
        .execute(
            "return [sessionStorage.getItem('floodgate.ops_key'), localStorage.length, location.href,
                     performance.getEntriesByType('resource').map(e => e.name)];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(seen[0], json!(s.client.ops_key));
    assert_eq!(seen[1], json!(0));
    let secret = s.client.ops_key.rsplit('_').next().unwrap().to_owned();
    let urls = json!([seen[2], seen[3]]).to_string();
    assert!(
        urls.contains("/v1/drops/"),
        "resource timing lists the API calls: {urls}"
    );
    assert!(!urls.contains(&secret), "a URL carries the key: {urls}");

    p.client.switch_to_window(fan_tab).await.unwrap();
    let shop = format!("{}/drops/{drop}/shop", s.queue.url());
    p.wait_url("the fan admitted to the shop", |u| u == shop)
        .await;
    p.close().await;
    s.stop().await;
}

/// A drop on its waiting list (sold out with `admission.waitlist` on): the console labels the
/// line's state "waiting list", as it labels the others ("sold out", "all held"), not with the
/// raw word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_ops_labels_the_waiting_list() {
    let _one = ONE_BROWSER.lock().await;
    let s = Stack::start(testkit::test_config()).await;
    let drop = s
        .client
        .create_drop(json!({
            "name": "ops waiting list", "per_fan_limit": 1, "hold_ttl_s": 300,
            "admission": {"mode": "queue", "rate_per_s": 1000, "burst": 1000, "max_active": 1000,
                          "waitlist": true, "offer_window_s": 60},
            "inventory": {"kind": "ga", "skus": [{"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": 1}]}
        }))
        .await;
    // One fan joins, is admitted and buys the one tee: sold out, the line is the waiting list.
    let (_, token) = s.client.fan("ops-buyer").await;
    let line = format!("{}/v1/drops/{drop}/queue", s.queue.url());
    let (status, v) = s
        .client
        .call(s.client.http.post(&line).bearer_auth(&token))
        .await;
    assert_eq!(status, 201, "{v}");
    let admission = std::sync::Mutex::new(String::new());
    testkit::eventually("the fan is admitted", || async {
        let me = format!("{line}/me");
        let (_, v) = s
            .client
            .call(s.client.http.get(me).bearer_auth(&token))
            .await;
        let got = v["admission_token"].as_str().unwrap_or_default();
        *admission.lock().unwrap() = got.to_owned();
        !got.is_empty()
    })
    .await;
    let admission = admission.into_inner().unwrap();
    let (status, hold) = s
        .client
        .reserve_with(
            &token,
            &drop,
            Some(&testkit::new_key()),
            Some(&admission),
            json!({"items": [{"sku": "TEE", "quantity": 1}]}),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    let hold = hold["hold_id"].as_str().unwrap().to_owned();
    let (status, order) = s.client.confirm(&token, &hold, "ok_ops").await;
    assert_eq!(status, 201, "{order}");

    let p = open_browser("ops_waiting_list", DESKTOP).await;
    sign_in(&p, &s).await;
    pick(&p, &drop).await;
    p.el("#line-state[data-state=\"waitlist\"]").await;
    p.wait_text("#line-state", "the waiting list's label", |t| {
        t == "waiting list"
    })
    .await;
    p.close().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_ops_console_fits_a_phone() {
    let _one = ONE_BROWSER.lock().await;
    let s = Stack::start(testkit::test_config()).await;
    // A long name with markup in it: shown as text, and it doesn't widen the page.
    let name = "Phone drop <b>bold</b> with a name long enough to wrap on a phone";
    let drop = s
        .client
        .create_drop(json!({
            "name": name, "per_fan_limit": 2, "hold_ttl_s": 300,
            "admission": {"mode": "queue", "rate_per_s": 5},
            "inventory": {"kind": "ga", "skus": [{"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": 20}]}
        }))
        .await;
    let p = open_browser("ops_phone", PHONE).await;
    sign_in(&p, &s).await;
    pick(&p, &drop).await;
    let option = p
        .text(&format!("#drop-picker option[value=\"{drop}\"]"))
        .await;
    assert!(option.starts_with(name), "{option}");
    p.el("#audit-empty:not([hidden])").await;
    p.shot("phone").await;
    let overflow = p.sideways_overflow_px().await;
    assert!(
        overflow <= 0,
        "the console scrolls sideways by {overflow}px"
    );
    p.close().await;
    s.stop().await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A frame the stream sent, parsed and checked against docs/ops-frames.schema.json: every frame a
/// test reads goes through here, so the schema and the server can't drift apart.
fn checked_frame(text: &str) -> Value {
    static SCHEMA: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    let schema = SCHEMA.get_or_init(|| {
        let doc: Value = serde_json::from_str(include_str!("../../docs/ops-frames.schema.json"))
            .expect("docs/ops-frames.schema.json is JSON");
        jsonschema::validator_for(&doc).expect("docs/ops-frames.schema.json is a JSON Schema")
    });
    let frame: Value = serde_json::from_str(text).expect("a JSON frame");
    let errors: Vec<String> = schema.iter_errors(&frame).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "frame {frame} breaks docs/ops-frames.schema.json: {errors:?}"
    );
    frame
}

async fn next_json(ws: &mut Socket) -> Option<Value> {
    loop {
        match tokio::time::timeout(testkit::browser::WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Some(checked_frame(&t)),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return None,
        }
    }
}

/// The socket's close code and reason, reading past anything before it.
async fn close_of(ws: &mut Socket) -> Option<(u16, String)> {
    loop {
        match tokio::time::timeout(testkit::browser::WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return Some((f.code.into(), f.reason.to_string()))
            }
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

async fn send(ws: &mut Socket, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Opens a stream; a 503 (the bound, while sockets closed just before still let go of their
/// slots) is tried again, within a generous deadline.
async fn open(s: &Stack) -> Socket {
    let until = Instant::now() + testkit::browser::WAIT;
    loop {
        match tokio_tungstenite::connect_async(s.ws_url()).await {
            Ok((ws, _)) => return ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(r))
                if r.status() == 503 && Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the ops socket opens: {e}"),
        }
    }
}

/// Opens a stream and signs in with the ops key: the `drops` frame is its answer.
async fn signed_in(s: &Stack) -> Socket {
    let mut ws = open(s).await;
    send(
        &mut ws,
        json!({"type": "auth", "api_key": s.client.ops_key}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await.unwrap()["type"], "drops");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_stream_refuses_bad_keys_and_pushes_every_instances_figures() {
    let mut cfg = testkit::test_config();
    cfg.http.ops_stream_auth_timeout_ms = 500;
    cfg.http.ops_stream_max_subscribers = 2;
    let s = Stack::start(cfg).await;
    let drop = s.client.ga_drop(10, 4, 300).await;

    // A key in the URL: refused before the upgrade, whatever the key.
    for q in ["api_key", "key", "token"] {
        let url = format!("{}?{q}={}", s.ws_url(), s.client.ops_key);
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 422, "{q}")
            }
            other => panic!("{q} in the URL: {:?}", other.map(|_| ())),
        }
    }
    // Plain HTTP: 422 (this endpoint speaks WebSocket).
    let (status, v) = s
        .client
        .call(s.client.http.get(s.client.url("/v1/ops/ws")))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("invalid_request"))
    );

    // No key: a watch first is refused; a wrong key; a seller key.
    let cases = [
        (json!({"type": "watch", "drop_id": drop}), "unauthorized"),
        (
            json!({"type": "auth", "api_key": "fgk_nope_nope"}),
            "unauthorized",
        ),
        (
            json!({"type": "auth", "api_key": s.client.seller_key}),
            "forbidden",
        ),
    ];
    for (first, code) in cases {
        let mut ws = open(&s).await;
        send(&mut ws, first.clone()).await;
        let e = next_json(&mut ws).await.expect("an error frame");
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some(code)),
            "{first}"
        );
        assert_eq!(
            close_of(&mut ws).await,
            Some((1008, code.to_owned())),
            "{first}"
        );
    }
    // Nothing said in time.
    let mut ws = open(&s).await;
    assert_eq!(
        close_of(&mut ws).await,
        Some((1008, "auth_timeout".to_owned()))
    );

    // The ops key: the drops, then the picked drop's history and figures.
    let mut ws = open(&s).await;
    send(
        &mut ws,
        json!({"type": "auth", "api_key": s.client.ops_key}),
    )
    .await;
    let drops = next_json(&mut ws).await.unwrap();
    assert_eq!(drops["type"], "drops", "{drops}");
    let listed = drops["drops"].as_array().unwrap();
    assert!(
        listed.iter().any(|d| d["drop_id"] == drop.as_str()
            && d["name"] == "test drop"
            && d["mode"] == "open"),
        "{drops}"
    );
    // At most two streams: a third is 503 while two are open (an authenticated one holds a slot).
    let mut second = signed_in(&s).await;
    match tokio_tungstenite::connect_async(s.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("a third stream: {:?}", other.map(|_| ())),
    }
    second.close(None).await.unwrap();

    send(&mut ws, json!({"type": "watch", "drop_id": "not-a-drop"})).await;
    let e = next_json(&mut ws).await.unwrap();
    assert_eq!(e["code"], "unknown_drop", "{e}");
    send(&mut ws, json!({"type": "watch", "drop_id": drop})).await;
    let history = next_json(&mut ws).await.unwrap();
    assert_eq!(
        (history["type"].as_str(), history["drop_id"].as_str()),
        (Some("history"), Some(drop.as_str()))
    );
    assert!(history["samples"].is_array(), "{history}");

    // A sale: a reserve and a confirm, which this instance writes to Redis within a second.
    let (_, token) = s.client.fan("ops-buyer").await;
    let (status, hold) = s
        .client
        .reserve(
            &token,
            &drop,
            json!({"items": [{"sku": "TEE", "quantity": 2}]}),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    let (status, order) = s
        .client
        .confirm(&token, hold["hold_id"].as_str().unwrap(), "ok_ops")
        .await;
    assert_eq!(status, 201, "{order}");
    let until = Instant::now() + testkit::browser::WAIT;
    let mut seen_reserve = false;
    let mut seen_confirm = false;
    let mut last = Value::Null;
    while !(seen_reserve && seen_confirm) {
        assert!(
            Instant::now() < until,
            "no figures with the sale; last {last}"
        );
        let f = next_json(&mut ws).await.expect("a figures frame");
        assert_eq!(f["type"], "figures", "{f}");
        assert_eq!(f["drop_id"], drop.as_str());
        assert_eq!(f["state"], "open");
        assert_eq!(
            f["available_units"].as_i64().unwrap()
                + f["held_units"].as_i64().unwrap()
                + f["sold_units"].as_i64().unwrap(),
            10,
            "{f}"
        );
        if f["reserve"]["p99_ms"].as_f64().is_some_and(|p| p > 0.0) {
            assert!(f["reserve"]["per_s"].as_f64().unwrap() > 0.0, "{f}");
            assert_eq!(f["reserve"]["error_rate"], 0.0, "{f}");
            assert!(f["instances"].as_u64().unwrap() >= 1, "{f}");
            seen_reserve = true;
        }
        if f["confirm"]["p99_ms"].as_f64().is_some_and(|p| p > 0.0) {
            assert_eq!(f["sold_units"], 2, "{f}");
            seen_confirm = true;
        }
        last = f;
    }
    // The samples became the drop's history: a new console starts its charts with them.
    let mut again = signed_in(&s).await;
    send(&mut again, json!({"type": "watch", "drop_id": drop})).await;
    let history = next_json(&mut again).await.unwrap();
    let samples = history["samples"].as_array().unwrap();
    assert!(!samples.is_empty(), "{history}");
    assert!(
        samples
            .windows(2)
            .all(|w| w[0]["at_ms"].as_i64() <= w[1]["at_ms"].as_i64()),
        "oldest first"
    );
    std::mem::drop((again, ws));
    s.stop().await;
}

/// Two booking-api instances on one Redis: a stream from either combines both instances'
/// reserves (the figures describe the sale, not the instance serving the console).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_stream_combines_every_instances_calls() {
    let s = Stack::start(testkit::test_config()).await;
    let mut cfg = s.booking.engine.cfg().clone();
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    let other = booking_api::start(cfg).await.expect("a second booking-api");
    let via_other = BookingClient::new(other.url());
    let drop = s.client.ga_drop(1000, 1, 300).await;

    let mut ws = signed_in(&s).await;
    send(&mut ws, json!({"type": "watch", "drop_id": drop})).await;
    assert_eq!(next_json(&mut ws).await.unwrap()["type"], "history");

    // Reserves through both instances until a sample shows both (each writes once a second).
    let until = Instant::now() + testkit::browser::WAIT;
    let body = json!({"items": [{"sku": "TEE", "quantity": 1}]});
    let mut last = Value::Null;
    'sale: loop {
        assert!(
            Instant::now() < until,
            "no sample combined two instances; last {last}"
        );
        for client in [&s.client, &via_other] {
            let (_, token) = s.client.fan("ops-two").await;
            let (status, hold) = client.reserve(&token, &drop, body.clone()).await;
            assert_eq!(status, 201, "{hold}");
        }
        // Read what arrived meanwhile, without waiting for more than one frame.
        while let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(50), ws.next()).await
        {
            let f = checked_frame(&t);
            if f["type"] == "figures" && f["instances"] == 2 {
                assert!(f["reserve"]["per_s"].as_f64().unwrap() > 0.0, "{f}");
                assert!(f["reserve"]["p99_ms"].as_f64().unwrap() > 0.0, "{f}");
                break 'sale;
            }
            last = f;
        }
    }
    std::mem::drop(ws);
    other.shutdown().await;
    s.stop().await;
}

/// Sockets that never authenticate hold no slot: the bound is taken after the auth frame, so
/// reconnecting every auth timeout can't lock ops out of the console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_stream_slots_go_to_authenticated_consoles_only() {
    let mut cfg = testkit::test_config();
    cfg.http.ops_stream_max_subscribers = 2;
    let s = Stack::start(cfg).await;

    // Twice the bound of sockets that say nothing (the auth timeout is 5 s: they stay open).
    let mut silent = Vec::new();
    for _ in 0..4 {
        let (ws, _) = tokio_tungstenite::connect_async(s.ws_url())
            .await
            .expect("an unauthenticated socket upgrades");
        silent.push(ws);
    }
    // An ops console still connects and hears its drops.
    let ws = signed_in(&s).await;
    // Past the bound of authenticated consoles: told so after the auth frame, closed with 1013.
    let second = signed_in(&s).await;
    let mut third = match tokio_tungstenite::connect_async(s.ws_url()).await {
        Ok((third, _)) => third,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            std::mem::drop((silent, ws, second));
            return s.stop().await;
        }
        Err(e) => panic!("a third console: {e}"),
    };
    send(
        &mut third,
        json!({"type": "auth", "api_key": s.client.ops_key}),
    )
    .await;
    let e = next_json(&mut third).await.expect("an error frame");
    assert_eq!(e["code"], "unavailable", "{e}");
    assert_eq!(
        close_of(&mut third).await,
        Some((1013, "unavailable".to_owned()))
    );
    std::mem::drop((silent, ws, second));
    s.stop().await;
}

/// A console's frames are handled at most one per `http.ops_stream_interval_ms` (a watch reads up
/// to 900 samples, a drops frame queries Postgres): a second watch sent at once waits its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_stream_takes_one_client_frame_per_interval() {
    let mut cfg = testkit::test_config();
    // Long enough that the second watch can't be answered while the test looks.
    cfg.http.ops_stream_interval_ms = 60_000;
    let s = Stack::start(cfg).await;
    let drop = s.client.ga_drop(10, 4, 300).await;
    let mut ws = signed_in(&s).await;
    send(&mut ws, json!({"type": "watch", "drop_id": drop})).await;
    send(&mut ws, json!({"type": "watch", "drop_id": drop})).await;
    let history = next_json(&mut ws).await.unwrap();
    assert_eq!(history["type"], "history", "{history}");
    // The first watch's figures at once; the second watch's history not before the interval.
    let mut heard = Vec::new();
    while let Ok(Some(Ok(Message::Text(t)))) =
        tokio::time::timeout(Duration::from_secs(2), ws.next()).await
    {
        heard.push(checked_frame(&t)["type"].clone());
    }
    assert!(!heard.contains(&json!("history")), "{heard:?}");
    std::mem::drop(ws);
    s.stop().await;
}

/// Reserves to drop ids that don't exist aren't counted: only calls the engine answered for a
/// drop it knows take one of the window's `http.ops_recent_max_drops` places, so junk ids can't
/// crowd out the real drop's figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_stream_figures_ignore_unknown_drops() {
    let mut cfg = testkit::test_config();
    cfg.http.ops_recent_max_drops = 2;
    let s = Stack::start(cfg).await;
    let drop = s.client.ga_drop(1000, 1, 300).await;
    let mut ws = signed_in(&s).await;
    send(&mut ws, json!({"type": "watch", "drop_id": drop})).await;
    assert_eq!(next_json(&mut ws).await.unwrap()["type"], "history");

    let until = Instant::now() + testkit::browser::WAIT;
    let body = json!({"items": [{"sku": "TEE", "quantity": 1}]});
    let mut last = Value::Null;
    'sale: loop {
        assert!(
            Instant::now() < until,
            "the real drop's reserves never counted; last {last}"
        );
        // Junk ids first, each window: before the fix they took both places.
        for n in 0..4 {
            let (_, token) = s.client.fan(&format!("ops-junk-{n}")).await;
            let junk = format!("d{:016x}", rand_junk(n));
            let (status, e) = s.client.reserve(&token, &junk, body.clone()).await;
            assert_eq!(
                (status, e["error"]["code"].as_str()),
                (404, Some("unknown_drop")),
                "{e}"
            );
        }
        let (_, token) = s.client.fan("ops-real").await;
        let (status, hold) = s.client.reserve(&token, &drop, body.clone()).await;
        assert_eq!(status, 201, "{hold}");
        while let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(50), ws.next()).await
        {
            let f = checked_frame(&t);
            if f["type"] == "figures" && f["reserve"]["per_s"].as_f64().is_some_and(|r| r > 0.0) {
                break 'sale;
            }
            last = f;
        }
    }
    std::mem::drop(ws);
    s.stop().await;
}

fn rand_junk(n: u64) -> u64 {
    0x0bad_0000_0000_0000 | (n << 8) | u64::from(std::process::id() & 0xff)
}
