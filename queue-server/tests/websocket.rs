//! The WebSocket: position first, then `admitted` with a token booking-api accepts; a queue
//! drop's reserve is refused without an admitted session.

mod common;

use std::time::Duration;

use common::Harness;
use futures::StreamExt;
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
    let url = format!(
        "{}/v1/drops/{drop}/queue/ws?fan_token={token}",
        h.queue.ws_url()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
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
    let (admission, _) = h.queue.queue.admission_token(&drop, &fan, 1);
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
    let url = format!(
        "{}/v1/drops/{drop}/queue/ws?fan_token={token}",
        h.queue.ws_url()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
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
