//! Test harness: a booking-api (drops, fan sessions, reserves) and a queue-server started
//! in-process on 127.0.0.1:0 against the Redis and Postgres that `./dev test` started
//! (FLOODGATE_TEST_REDIS_URL / FLOODGATE_TEST_DATABASE_URL), sharing identity and admission
//! secrets as a deployment would. A harness derefs to its `testkit::BookingClient` (the one client
//! of booking-api every suite uses) for drops, admission settings, holds and reads; what is the
//! waiting room's is here. Every test makes its own drops and fans.
#![allow(dead_code)]

use std::time::Duration;

use engine::ids::{DropId, FanId};
use engine::Config;
use serde_json::{json, Value};
use testkit::BookingClient;

/// testkit's test config with what this suite adds: booking-api and queue-server in one test
/// must accept each other's fan tokens, so the dev identity secret is fixed.
pub fn test_config() -> Config {
    let mut cfg = testkit::test_config();
    cfg.identity.dev_secret = "queue-test-dev-secret".into();
    // Two servers per test, each with its own pool.
    cfg.database.pool_size = 4;
    cfg
}

pub struct Harness {
    pub booking: booking_api::Running,
    pub queue: queue_server::Running,
    /// The client of `booking`.
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
        Harness::start_with(test_config()).await
    }

    /// A harness whose booking-api lets the queue page (queue-server's origin) call it, as a
    /// deployment serving the page must (`http.cors_allow_origins`): queue-server's port is
    /// picked first, so booking-api can be told its origin.
    pub async fn start_for_pages() -> Harness {
        let mut cfg = test_config();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free local port")
            .port();
        cfg.queue.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        cfg.http.cors_allow_origins = vec![format!("http://127.0.0.1:{port}")];
        Harness::start_with(cfg).await
    }

    pub async fn start_with(cfg: Config) -> Harness {
        let booking = booking_api::start(cfg.clone())
            .await
            .expect("booking-api starts");
        let mut qcfg = cfg;
        qcfg.queue.booking_public_url = booking.url();
        let queue = queue_server::start(qcfg)
            .await
            .expect("queue-server starts");
        let client =
            BookingClient::with_new_keys(booking.url(), &booking.engine, "queue-test").await;
        Harness {
            booking,
            queue,
            client,
        }
    }

    /// Stops queue-server as a deploy would (its sockets are told 1012, "reconnect") and starts
    /// a new one on the same address.
    pub async fn restart_queue(self) -> Harness {
        let Harness {
            booking,
            queue,
            client,
        } = self;
        let mut cfg = queue.engine.cfg().clone();
        cfg.queue.listen = queue.addr;
        queue.shutdown().await;
        let queue = queue_server::start(cfg)
            .await
            .expect("queue-server starts again");
        Harness {
            booking,
            queue,
            client,
        }
    }

    pub async fn shutdown(self) {
        self.queue.shutdown().await;
        self.booking.shutdown().await;
    }

    /// A new fan (random suffix) and a dev token for them, issued by queue-server's engine (the
    /// client's `fan` asks booking-api's session endpoint; the tokens are the same kind).
    pub fn fan(&self, name: &str) -> (FanId, String) {
        let fan = FanId::parse(&format!("{name}-{:08x}", rand::random::<u32>())).unwrap();
        let token = self.queue.engine.fans().issue_dev(&fan).unwrap();
        (fan, token)
    }

    /// A queue drop of one SKU; `admission` is merged into `{"mode": "queue"}`, `opens_in_s`
    /// puts opening in the future.
    pub async fn queue_drop(
        &self,
        quantity: u32,
        per_fan_limit: u32,
        admission: Value,
        opens_in_s: Option<i64>,
    ) -> DropId {
        let mut adm = json!({"mode": "queue"});
        for (k, v) in admission.as_object().cloned().unwrap_or_default() {
            adm[k] = v;
        }
        let mut body = json!({
            "name": "queue test", "per_fan_limit": per_fan_limit, "hold_ttl_s": 300,
            "admission": adm,
            "inventory": {"kind": "ga", "skus": [{"sku": "TEE", "name": "Tee", "price_cents": 2500, "quantity": quantity}]}
        });
        if let Some(s) = opens_in_s {
            let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(s);
            body["opens_at"] = json!(at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap());
        }
        self.new_drop(body).await
    }

    /// Creates a drop from a whole `POST /v1/drops` body; its id, parsed.
    pub async fn new_drop(&self, body: Value) -> DropId {
        DropId::parse(&self.client.create_drop(body).await).expect("a drop id")
    }

    /// HTTP join; (status, body).
    pub async fn join(&self, drop: &DropId, token: &str) -> (u16, Value) {
        let url = format!("{}/v1/drops/{drop}/queue", self.queue.url());
        self.call(self.http.post(url).bearer_auth(token)).await
    }

    /// Joins `token`'s fan over HTTP and polls until the line admits it; its admission token.
    pub async fn join_until_admitted(&self, drop: &DropId, token: &str) -> String {
        let (status, joined) = self.join(drop, token).await;
        assert_eq!(status, 201, "{joined}");
        let admission = std::sync::Mutex::new(String::new());
        testkit::eventually("the fan is admitted", || async {
            let (_, me) = self.me(drop, token).await;
            let got = me["admission_token"].as_str().unwrap_or_default();
            *admission.lock().unwrap() = got.to_owned();
            !got.is_empty()
        })
        .await;
        admission.into_inner().unwrap()
    }

    /// The drop's live counts summed over its SKUs: (available, held, sold).
    pub async fn stock(&self, drop: &DropId) -> (i64, i64, i64) {
        let (_, available, held, sold) = self.client.counts(drop).await;
        (available, held, sold)
    }

    pub async fn me(&self, drop: &DropId, token: &str) -> (u16, Value) {
        let url = format!("{}/v1/drops/{drop}/queue/me", self.queue.url());
        self.call(self.http.get(url).bearer_auth(token)).await
    }

    /// A reserve of `qty` tees at booking-api with an admission token.
    pub async fn reserve_admitted(
        &self,
        drop: &DropId,
        token: &str,
        admission: &str,
        qty: u32,
    ) -> (u16, Value) {
        let body = json!({"items": [{"sku": "TEE", "quantity": qty}]});
        self.client
            .reserve_with(
                token,
                drop,
                Some(&testkit::new_key()),
                Some(admission),
                body,
            )
            .await
    }
}

/// A fan's WebSocket to the waiting room.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a socket to the drop's line at `base` (a queue-server's ws:// URL) and authenticates it
/// as the page does: no token in the URL, `{"type":"auth","fan_token":…}` as its first message.
pub async fn connect(base: &str, drop: &DropId, fan_token: &str) -> Socket {
    let mut ws = open(base, drop).await;
    send_auth(&mut ws, fan_token).await;
    ws
}

/// Opens a socket to the drop's line without authenticating it.
pub async fn open(base: &str, drop: &DropId) -> Socket {
    let url = format!("{base}/v1/drops/{drop}/queue/ws");
    // Small buffers, as the server's: tungstenite's default read buffer is 128 KiB per socket,
    // which the crowd test would multiply by thousands.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), false)
        .await
        .expect("websocket connects");
    ws
}

/// Sends the auth frame, the first message every socket must send.
pub async fn send_auth(ws: &mut Socket, fan_token: &str) {
    send_text(
        ws,
        &json!({"type": "auth", "fan_token": fan_token}).to_string(),
    )
    .await;
}

/// Sends one text frame.
pub async fn send_text(ws: &mut Socket, text: &str) {
    use futures::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text(text))
        .await
        .expect("the frame is sent");
}

/// Reads the socket until the server closes it (30 s per message at most): the frames it sent
/// on the way (each checked against the schema) and its close frame, if it sent one.
pub async fn until_closed(
    ws: &mut Socket,
) -> (
    Vec<Value>,
    Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>,
) {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut frames = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a message or the close within 30 s");
        match msg {
            Some(Ok(Message::Text(t))) => frames.push(checked_frame(&t)),
            Some(Ok(Message::Close(close))) => return (frames, close),
            None | Some(Err(_)) => return (frames, None),
            Some(Ok(_)) => {}
        }
    }
}

/// The next JSON message on the socket (30 s at most); None once the socket has closed.
pub async fn next_message(ws: &mut Socket) -> Option<Value> {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a message within 30 s");
        match msg {
            Some(Ok(Message::Text(t))) => return Some(checked_frame(&t)),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// A frame the server sent, parsed and checked against docs/ws-frames.schema.json: every frame a
/// test reads goes through here, so the schema and the server can't drift apart.
pub fn checked_frame(text: &str) -> Value {
    static SCHEMA: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    let schema = SCHEMA.get_or_init(|| {
        let doc: Value = serde_json::from_str(include_str!("../../../docs/ws-frames.schema.json"))
            .expect("docs/ws-frames.schema.json is JSON");
        jsonschema::validator_for(&doc).expect("docs/ws-frames.schema.json is a JSON Schema")
    });
    let frame: Value = serde_json::from_str(text).expect("a JSON frame");
    let errors: Vec<String> = schema.iter_errors(&frame).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "frame {frame} breaks docs/ws-frames.schema.json: {errors:?}"
    );
    frame
}

/// Reads until a message of type `kind` arrives (30 s per message at most); panics if the
/// socket closes first.
pub async fn wait_for(ws: &mut Socket, kind: &str) -> Value {
    loop {
        match next_message(ws).await {
            Some(m) if m["type"] == kind => return m,
            Some(_) => {}
            None => panic!("socket closed while waiting for {kind}"),
        }
    }
}

/// `redis-cli -u <the test Redis> args...`, its stdout (trimmed): for tests that play a fault
/// on a drop's keys.
pub async fn redis_cli(args: &[&str]) -> String {
    redis_cli_at(&test_config().redis.url, args).await
}

/// `redis-cli` against the Redis at `url` (a stack of a test's own); its output, trimmed. On a
/// Redis Cluster (`redis-cluster://HOST:PORT?node=...`, which redis-cli doesn't read) it asks the
/// first node with `-c`, following `MOVED`/`ASK` to the shard that owns the key: a drop's keys
/// live on one shard, not necessarily the first node's.
pub async fn redis_cli_at(url: &str, args: &[&str]) -> String {
    let target = match url.strip_prefix("redis-cluster://") {
        Some(rest) => {
            let first = rest.split(['?', ',', '/']).next().unwrap_or(rest);
            vec!["-c".to_owned(), "-u".to_owned(), format!("redis://{first}")]
        }
        None => vec!["-u".to_owned(), url.to_owned()],
    };
    let out = tokio::process::Command::new("redis-cli")
        .args(&target)
        .args(args)
        .output()
        .await
        .expect("redis-cli runs");
    assert!(out.status.success(), "redis-cli {args:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
