//! Draining an instance for a rolling deploy (docs/OPERATIONS.md, "Rolling deploys"): on
//! shutdown `/readyz` fails first, while requests and sockets are still served, so the load
//! balancer marks the instance down before anything is refused; only then are the sockets told
//! 1012 ("reconnect") and the listener closed.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{connect, test_config, until_closed, Harness};
use serde_json::json;

async fn status(http: &reqwest::Client, url: String) -> Option<u16> {
    http.get(url).send().await.ok().map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_readyz_before_closing_sockets_and_the_listener() {
    let mut cfg = test_config();
    // Long enough that the test sees the unready stretch on a busy machine; nothing asserts a
    // time, only the order of what the servers do.
    cfg.http.drain_unready_ms = 4_000;
    cfg.queue.drain_unready_ms = 4_000;
    let h = Harness::start_with(cfg).await;
    let drop = h.queue_drop(10, 1, json!({"paused": true}), None).await;
    let (_, token) = h.fan("drain");
    let mut ws = connect(&h.queue.ws_url(), &drop, &token).await;

    // Reads the socket until it closes; `closed` is set when it has.
    let closed = Arc::new(AtomicBool::new(false));
    let reader = {
        let closed = closed.clone();
        tokio::spawn(async move {
            let (_, close) = until_closed(&mut ws).await;
            closed.store(true, Ordering::SeqCst);
            close.map(|c| u16::from(c.code))
        })
    };

    let Harness {
        booking,
        queue,
        client,
    } = h;
    let (queue_url, booking_url) = (queue.url(), booking.url());
    let http = client.http.clone();
    let stopping_queue = tokio::spawn(queue.shutdown());
    let stopping_booking = tokio::spawn(booking.shutdown());

    for url in [&queue_url, &booking_url] {
        testkit::eventually("/readyz answers 503 while draining", || {
            let (http, url) = (http.clone(), format!("{url}/readyz"));
            async move { status(&http, url).await == Some(503) }
        })
        .await;
    }
    // Unready, but still serving: the socket is open, liveness and the API answer.
    assert!(
        !closed.load(Ordering::SeqCst),
        "the socket closed before /readyz failed"
    );
    assert_eq!(
        status(&http, format!("{queue_url}/healthz")).await,
        Some(200)
    );
    assert_eq!(
        status(&http, format!("{booking_url}/v1/drops/{drop}")).await,
        Some(200)
    );
    assert_eq!(
        status(&http, format!("{queue_url}/drops/{drop}")).await,
        Some(200)
    );

    // Then the socket is told to reconnect elsewhere, and both servers stop.
    assert_eq!(reader.await.unwrap(), Some(1012));
    stopping_queue.await.unwrap();
    stopping_booking.await.unwrap();
    assert_eq!(status(&http, format!("{queue_url}/healthz")).await, None);
    assert_eq!(status(&http, format!("{booking_url}/healthz")).await, None);
}
