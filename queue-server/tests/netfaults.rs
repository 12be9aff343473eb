//! Network-fault test of the waiting room: Redis runs in a network namespace of the test's own,
//! behind a veth link the test partitions (devstack's `NetLink`: nftables drops every packet, so
//! sockets to Redis stay open and hear nothing). Fans keep WebSockets open through a 10 s
//! partition; every frame they get is one the docs list, each hears the line is `unavailable`
//! while it is (not silence, which a page takes for a dead socket), a socket opened or a poll
//! made during the partition is answered within the request timeout (an `error` frame, a 503
//! with `Retry-After`), and after healing the line is intact (same places) and admission resumes.
//!
//! Skips, saying why on stderr, only where the kernel refuses namespaces or nftables. Run it on
//! its own: `cargo test --workspace --test netfaults -- --test-threads=1` (`./dev test` does).
//! Every test fn is named `fault_*`.
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{connect, Harness, Socket};
use devstack::{free_port, Stack, StackConfig};
use engine::ids::{DropId, FanId};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// queue-server's request timeout here; nothing may take longer to answer.
const REQUEST_TIMEOUT_MS: u64 = 4_000;
const PARTITION: Duration = Duration::from_secs(10);

/// Frame types the docs list for the waiting room's socket (docs/API.md).
const FRAME_TYPES: &[&str] = &[
    "position",
    "tick",
    "admitted",
    "pre_queue",
    "paused",
    "all_held",
    "sold_out",
    "closed",
    "done",
    "error",
];

/// What one socket received: each frame with when it came, and how the socket ended.
#[derive(Default)]
struct Heard {
    frames: Vec<(Instant, Value)>,
    closed: Option<(Instant, String)>,
}

/// Reads a socket until it closes, keeping every frame (the reader answers pings, as a browser).
fn listen(mut ws: Socket) -> (Arc<Mutex<Heard>>, tokio::task::JoinHandle<()>) {
    let heard = Arc::new(Mutex::new(Heard::default()));
    let h = heard.clone();
    let task = tokio::spawn(async move {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).expect("a JSON frame");
                    h.lock().unwrap().frames.push((Instant::now(), v));
                }
                Ok(Message::Close(c)) => {
                    let why = c.map_or("no code".into(), |c| format!("{} {}", c.code, c.reason));
                    h.lock().unwrap().closed = Some((Instant::now(), why));
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    h.lock().unwrap().closed = Some((Instant::now(), format!("error {e}")));
                    return;
                }
            }
        }
        h.lock().unwrap().closed = Some((Instant::now(), "ended".into()));
    });
    (heard, task)
}

fn check_frame(v: &Value) {
    // Every frame also against docs/ws-frames.schema.json, as the other queue tests do.
    common::checked_frame(&v.to_string());
    let kind = v["type"].as_str().unwrap_or_default();
    assert!(FRAME_TYPES.contains(&kind), "an undocumented frame: {v}");
    if kind == "error" {
        let code = v["code"].as_str().unwrap_or_default();
        assert!(
            matches!(code, "unavailable" | "recovering"),
            "an error frame the partition shouldn't cause: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_partitioned_from_queue_server_with_sockets_open() {
    let stack = tokio::task::spawn_blocking(|| {
        Stack::start_with_redis_behind_link(StackConfig {
            name: "fault-net-queue".into(),
            redis_port: free_port(),
            pg_port: free_port(),
        })
    })
    .await
    .unwrap();
    let stack = match stack {
        Ok(s) => Arc::new(Mutex::new(s)),
        Err(e) if devstack::is_kernel_refusal(&e) => {
            eprintln!("SKIPPED fault_redis_partitioned_from_queue_server_with_sockets_open: {e:#}");
            return;
        }
        Err(e) => panic!("the stack behind a link starts: {e:#}"),
    };
    let link = |what: &'static str| {
        let stack = stack.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let s = stack.lock().unwrap();
                let l = s.link().expect("a link");
                match what {
                    "partition" => l.partition(),
                    _ => l.heal(),
                }
            })
            .await
            .unwrap()
            .expect("the link changes")
        }
    };
    let (redis_url, db_url) = {
        let s = stack.lock().unwrap();
        (s.redis_url(), s.database_url())
    };
    let mut cfg = testkit::test_config_for(&redis_url, &db_url);
    // As common::test_config: both servers accept each other's fan tokens; two pools.
    cfg.identity.dev_secret = "queue-test-dev-secret".into();
    cfg.database.pool_size = 4;
    cfg.queue.request_timeout_ms = REQUEST_TIMEOUT_MS;
    cfg.http.request_timeout_ms = REQUEST_TIMEOUT_MS;
    cfg.redis.command_timeout_ms = 1_000;
    let h = Harness::start_with(cfg).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS + 3_000))
        .build()
        .unwrap();

    // 20 fans wait in a paused line, sockets open.
    let drop = h.queue_drop(100, 1, json!({"paused": true}), None).await;
    let ws_base = h.queue.ws_url();
    let mut fans: Vec<(FanId, String, i64)> = Vec::new();
    let mut sockets = Vec::new();
    for i in 0..20 {
        let (fan, token) = h.fan(&format!("net{i}"));
        let mut ws = connect(&ws_base, &drop, &token).await;
        let first = common::wait_for(&mut ws, "position").await;
        let place = first["place"].as_i64().expect("a place");
        fans.push((fan, token, place));
        sockets.push(listen(ws));
    }
    // A fan's place, read straight from Redis (a poll would count as presence); a read that
    // fails (the pool reconnecting after healing) is tried again.
    let place_of = |drop: DropId, fan: FanId| {
        let queue = h.queue.queue.clone();
        async move {
            let place = Mutex::new(None);
            testkit::eventually("a standing read succeeds", || async {
                match queue.standing(&drop, &fan).await {
                    Ok(s) => {
                        *place.lock().unwrap() = Some(s.place);
                        true
                    }
                    Err(_) => false,
                }
            })
            .await;
            place.into_inner().unwrap().flatten()
        }
    };

    // The partition: queue-server (and booking-api) can't reach Redis for 10 s.
    link("partition").await;
    let cut = Instant::now();
    // A poll and a new socket meanwhile are answered within the request timeout.
    let (_, token, _) = &fans[0];
    let r = http
        .get(format!("{}/v1/drops/{drop}/queue/me", h.queue.url()))
        .bearer_auth(token)
        .send()
        .await
        .expect("a poll in the partition is answered in time");
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").is_some();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert!(
        status == 200 || (status == 503 && retry_after),
        "poll in the partition: {status} {body}"
    );
    if status == 503 {
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
    }
    let (_, late_token) = h.fan("late");
    let late = tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS + 3_000), async {
        let mut ws = connect(&ws_base, &drop, &late_token).await;
        let first = ws.next().await;
        (ws, first)
    })
    .await
    .expect("a socket opened in the partition hears something in time");
    match &late.1 {
        Some(Ok(Message::Text(t))) => {
            let v: Value = serde_json::from_str(t).unwrap();
            check_frame(&v);
            eprintln!("a socket opened in the partition heard {v}");
        }
        Some(Ok(Message::Close(c))) => eprintln!("a socket opened in the partition closed: {c:?}"),
        other => panic!("a socket opened in the partition: {other:?}"),
    }
    std::mem::drop(late);
    let left = PARTITION.saturating_sub(cut.elapsed());
    tokio::time::sleep(left).await;
    link("heal").await;
    let healed = Instant::now();

    // Every socket hears documented frames only; each still open hears the line again (a tick)
    // after healing; one that closed had said why (an error frame or a close code).
    let mut quiet_for = Duration::ZERO;
    for (heard, _) in &sockets {
        testkit::eventually("each open socket hears a tick after healing", || async {
            let h = heard.lock().unwrap();
            h.closed.is_some()
                || h.frames
                    .iter()
                    .any(|(at, f)| *at > healed && f["type"] == "tick")
        })
        .await;
        let h = heard.lock().unwrap();
        for (_, f) in &h.frames {
            check_frame(f);
        }
        // Not silence: while the line couldn't move, the socket heard so.
        if h.closed.is_none() {
            assert!(
                h.frames
                    .iter()
                    .any(|(at, f)| *at > cut && *at < healed && f["state"] == "unavailable"),
                "a socket heard nothing of the partition: {:?}",
                h.frames.iter().map(|(_, f)| f).collect::<Vec<_>>()
            );
        }
        // The longest stretch without a frame around the partition, for the report.
        let mut last = cut;
        for (at, _) in h.frames.iter().filter(|(at, _)| *at > cut) {
            quiet_for = quiet_for.max(at.duration_since(last));
            last = *at;
        }
        if let Some((_, why)) = &h.closed {
            let said = h.frames.iter().any(|(_, f)| f["type"] == "error");
            assert!(
                said || why.starts_with("10"),
                "a socket closed without a word: {why}"
            );
        }
    }
    let closed: HashMap<String, usize> =
        sockets.iter().fold(HashMap::new(), |mut m, (heard, _)| {
            let why = heard
                .lock()
                .unwrap()
                .closed
                .as_ref()
                .map_or("open".into(), |(_, w)| w.clone());
            *m.entry(why).or_default() += 1;
            m
        });
    eprintln!(
        "fault-net-queue: sockets after the partition {closed:?}; longest silence from the cut \
         {quiet_for:?}"
    );

    // The line is intact: every fan keeps the place it had.
    for (fan, _, place) in &fans {
        assert_eq!(
            place_of(drop.clone(), fan.clone()).await,
            Some(*place),
            "fan {fan} lost its place"
        );
    }
    // Admission resumes: unpaused, the first fan in line is admitted and can buy.
    h.set_admission(&drop, json!({"paused": false, "rate_per_s": 5, "burst": 5}))
        .await;
    let (i, first) = fans
        .iter()
        .enumerate()
        .min_by_key(|(_, (_, _, p))| *p)
        .unwrap();
    let heard = sockets[i].0.clone();
    let admitted = |heard: Arc<Mutex<Heard>>| async move {
        let h = heard.lock().unwrap();
        h.frames
            .iter()
            .find(|(_, f)| f["type"] == "admitted")
            .map(|(_, f)| f["admission_token"].as_str().unwrap_or_default().to_owned())
    };
    testkit::eventually("the first fan in line is admitted on its socket", || {
        let heard = heard.clone();
        async move { admitted(heard).await.is_some() }
    })
    .await;
    let admission = admitted(heard).await.unwrap();
    let (status, hold) = h.reserve_admitted(&drop, &first.1, &admission, 1).await;
    assert_eq!(status, 201, "{hold}");
    let (status, order) = h
        .confirm(&first.1, hold["hold_id"].as_str().unwrap(), "ok_net")
        .await;
    assert_eq!(status, 201, "{order}");
    let (available, held, sold) = h.stock(&drop).await;
    assert_eq!(available + held + sold, 100);
    assert_eq!(sold, 1);

    for (_, task) in sockets {
        task.abort();
    }
    h.shutdown().await;
    tokio::task::spawn_blocking(move || stack.lock().unwrap().stop())
        .await
        .unwrap();
}
