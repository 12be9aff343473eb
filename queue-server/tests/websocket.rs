//! The WebSocket: it authenticates with its first message (never a token in the URL), then hears
//! its position first, then `admitted` with a token booking-api accepts; a queue drop's reserve
//! is refused without an admitted session.

mod common;

use std::time::Duration;

use common::Harness;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

async fn next_json<S>(ws: &mut S) -> Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a message within 30 s")
            .expect("socket open")
            .expect("no socket error");
        if let Message::Text(t) = msg {
            return common::checked_frame(&t);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_fan_gets_position_then_admitted_and_reserves() {
    let h = Harness::start().await;
    let drop = h.queue_drop(10, 2, json!({"paused": true}), None).await;
    let (_, token) = h.fan("socket");
    // The handshake as docs/API.md gives it: a URL without the token, then the auth frame.
    let url = format!("{}/v1/drops/{drop}/queue/ws", h.queue.ws_url());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let auth = json!({"type": "auth", "fan_token": token}).to_string();
    ws.send(Message::text(auth)).await.unwrap();
    let first = next_json(&mut ws).await;
    assert_eq!(first["type"], "position", "{first}");
    assert_eq!(first["ahead"], 0);
    let second = next_json(&mut ws).await;
    assert_eq!(second["type"], "paused", "{second}");

    h.set_admission(
        &drop,
        json!({"paused": false, "rate_per_s": 10, "burst": 5}),
    )
    .await;
    let admitted = loop {
        let m = next_json(&mut ws).await;
        if m["type"] == "admitted" {
            break m;
        }
        assert!(
            ["tick", "position", "paused"].contains(&m["type"].as_str().unwrap()),
            "{m}"
        );
    };
    let admission = admitted["admission_token"].as_str().unwrap();
    assert!(admitted["booking_url"]
        .as_str()
        .unwrap()
        .contains(&format!("/drops/{drop}?admission_token=")));
    let (status, hold) = h.reserve_admitted(&drop, &token, admission, 1).await;
    assert_eq!(status, 201, "{hold}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_drop_reserve_needs_an_admitted_session() {
    let h = Harness::start().await;
    let drop = h.queue_drop(10, 2, json!({"paused": true}), None).await;
    let (fan, token) = h.fan("gatecrasher");
    // A correctly signed token, but the fan was never admitted by the waiting room.
    let (admission, _) = h.queue.queue.admission_token(&drop, &fan, 1, None);
    let (status, body) = h.reserve_admitted(&drop, &token, &admission, 1).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "not_admitted");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_tells_sockets_to_reconnect() {
    let h = Harness::start().await;
    let drop = h.queue_drop(10, 2, json!({"paused": true}), None).await;
    let (_, token) = h.fan("bye");
    let mut ws = common::connect(&h.queue.ws_url(), &drop, &token).await;
    assert_eq!(next_json(&mut ws).await["type"], "position");
    let Harness { booking, queue, .. } = h;
    let stopping = tokio::spawn(queue.shutdown());
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.unwrap().code), 1012);
    std::mem::drop(ws);
    stopping.await.unwrap();
    booking.shutdown().await;
}

/// With a shared frame on every admission run (`broadcast_interval_ms` = `tick_ms`), there is
/// never a run without a broadcast: exact positions must still come (a position round's slices
/// wait for a quiet moment, but never more than a broadcast interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn positions_keep_coming_when_every_run_broadcasts() {
    let mut cfg = common::test_config();
    cfg.queue.tick_ms = 100;
    cfg.queue.broadcast_interval_ms = 100;
    cfg.queue.position_interval_ms = 300;
    let h = Harness::start_with(cfg).await;
    let drop = h.queue_drop(10, 2, json!({"paused": true}), None).await;
    let (_, token) = h.fan("busy-line");
    let mut ws = common::connect(&h.queue.ws_url(), &drop, &token).await;
    // The first position comes with the join; the next ones only from position rounds.
    for _ in 0..3 {
        // Ticks keep the socket busy, so bound the whole wait, not each message.
        let position = tokio::time::timeout(
            Duration::from_secs(30),
            common::wait_for(&mut ws, "position"),
        )
        .await
        .expect("a position within 30 s");
        assert_eq!(position["ahead"], 0, "{position}");
    }
    h.shutdown().await;
}

/// One fan token can't hold every connection slot: past `queue.max_sockets_per_fan` sockets in
/// one drop's line, another gets `error` `rate_limited` and closes; the ones open keep working,
/// and closing one makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sockets_per_fan_are_capped() {
    let mut cfg = common::test_config();
    cfg.queue.max_sockets_per_fan = 2;
    let h = Harness::start_with(cfg).await;
    let drop = h.queue_drop(10, 1, json!({"paused": true}), None).await;
    let ws = h.queue.ws_url();
    let (_, token) = h.fan("many-tabs");
    let mut first = common::connect(&ws, &drop, &token).await;
    common::wait_for(&mut first, "position").await;
    let mut second = common::connect(&ws, &drop, &token).await;
    common::wait_for(&mut second, "position").await;

    let mut third = common::connect(&ws, &drop, &token).await;
    let refused = loop {
        let m = common::next_message(&mut third)
            .await
            .expect("an error before the close");
        if m["type"] == "error" {
            break m;
        }
    };
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert!(
        common::next_message(&mut third).await.is_none(),
        "then it closes"
    );

    let _ = first.close(None).await;
    testkit::eventually("a closed socket makes room for another", || async {
        let mut again = common::connect(&ws, &drop, &token).await;
        loop {
            match common::next_message(&mut again).await {
                // Only the room sends ticks: this socket is in (a refused one hears its first
                // messages, then `error`, then the close).
                Some(m) if m["type"] == "tick" => return true,
                Some(m) if m["type"] == "error" => return false,
                Some(_) => {}
                None => return false,
            }
        }
    })
    .await;
    h.shutdown().await;
}

/// The fan token never travels in a URL (proxies and load balancers log URLs): a socket asked for
/// with `?fan_token=` is refused before the upgrade, with `invalid_request` saying how to
/// authenticate instead, whether or not the token is good; so are the HTTP join and poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_token_in_the_url_is_refused() {
    let h = Harness::start().await;
    let drop = h.queue_drop(10, 2, json!({"paused": true}), None).await;
    let (_, token) = h.fan("in-url");
    for query in [format!("fan_token={token}"), "x=1&fan_token".to_owned()] {
        let url = format!("{}/v1/drops/{drop}/queue/ws?{query}", h.queue.ws_url());
        let refused = tokio_tungstenite::connect_async(url).await;
        let Err(tokio_tungstenite::tungstenite::Error::Http(resp)) = refused else {
            panic!("?{query}: the upgrade should be refused, got {refused:?}");
        };
        assert_eq!(resp.status().as_u16(), 422, "?{query}");
        let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
            .expect("a JSON error body");
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(r#"{"type":"auth","fan_token":"#),
            "the message says how to authenticate: {body}"
        );
    }
    // Nor does the HTTP join or poll take one (they read `Authorization: Bearer`).
    let base = h.queue.url();
    for (method, path) in [("POST", "queue"), ("GET", "queue/me")] {
        let url = format!("{base}/v1/drops/{drop}/{path}?fan_token={token}");
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let (status, body) = h.call(h.http.request(method, url)).await;
        assert_eq!(status, 422, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    }
    // Nothing joined the fan.
    let (status, _) = h.me(&drop, &token).await;
    assert_eq!(status, 404);
    h.shutdown().await;
}

/// A socket that connects and says nothing is closed once `queue.ws_auth_timeout_ms` has passed
/// (1008, reason `auth_timeout`), without ever joining anyone. The test waits for the close with
/// a generous deadline; how fast it comes is not its business.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_socket_that_never_authenticates_is_closed() {
    let mut cfg = common::test_config();
    cfg.queue.ws_auth_timeout_ms = 300;
    let h = Harness::start_with(cfg).await;
    let drop = h.queue_drop(10, 2, json!({"paused": true}), None).await;
    let mut ws = common::open(&h.queue.ws_url(), &drop).await;
    let (frames, close) = common::until_closed(&mut ws).await;
    assert!(frames.is_empty(), "no frame before auth: {frames:?}");
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    assert_eq!(close.reason.as_str(), "auth_timeout");
    h.shutdown().await;
}

/// An auth frame with a forged or malformed token: `error` `unauthorized`, then the close (1008,
/// reason `unauthorized`); the socket never joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_token_in_auth_is_refused_and_closed() {
    let h = Harness::start().await;
    let drop = h.queue_drop(10, 2, json!({"paused": true}), None).await;
    let (_, good) = h.fan("forger");
    // The same claims under another signature, and no JWT at all.
    let (head, _) = good.rsplit_once('.').unwrap();
    let forged = format!("{head}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    for token in [forged.as_str(), "not-a-token"] {
        let mut ws = common::connect(&h.queue.ws_url(), &drop, token).await;
        let (frames, close) = common::until_closed(&mut ws).await;
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0]["type"], "error", "{frames:?}");
        assert_eq!(frames[0]["code"], "unauthorized", "{frames:?}");
        let close = close.expect("a close frame");
        assert_eq!(
            (u16::from(close.code), close.reason.as_str()),
            (1008, "unauthorized")
        );
    }
    let (status, _) = h.me(&drop, &good).await;
    assert_eq!(status, 404, "nobody joined");
    h.shutdown().await;
}

/// Until it has authenticated, a socket may send the auth frame and nothing else: anything else
/// first (another type, an auth frame without a token, text that isn't JSON, a binary frame) is
/// refused with an `error` and the close (1008, the code as reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frames_before_auth_are_refused() {
    let h = Harness::start().await;
    let drop = h.queue_drop(10, 2, json!({"paused": true}), None).await;
    let (_, token) = h.fan("chatty");
    let cases = [
        (Message::text(r#"{"type":"hello"}"#), "invalid_request"),
        (Message::text(r#"{"type":"auth"}"#), "invalid_request"),
        (
            Message::text(json!({"type": "auth", "fan_token": 7}).to_string()),
            "invalid_request",
        ),
        (Message::text("auth please"), "malformed_json"),
        (
            Message::binary(token.clone().into_bytes()),
            "invalid_request",
        ),
    ];
    for (first, code) in cases {
        let mut ws = common::open(&h.queue.ws_url(), &drop).await;
        ws.send(first.clone()).await.unwrap();
        let (frames, close) = common::until_closed(&mut ws).await;
        assert_eq!(frames.len(), 1, "{first:?}: {frames:?}");
        assert_eq!(frames[0]["code"], code, "{first:?}: {frames:?}");
        let close = close.expect("a close frame");
        assert_eq!((u16::from(close.code), close.reason.as_str()), (1008, code));
    }
    let (status, _) = h.me(&drop, &token).await;
    assert_eq!(status, 404, "nobody joined");
    h.shutdown().await;
}
