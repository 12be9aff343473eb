//! Many queue-server instances share one line: a fan admitted by any instance's admission run
//! hears `admitted` on whichever instance holds their socket, pushed (not found by a position
//! round), in join order; and two instances run no more admission scripts than one.
//!
//! Like every suite, it reads the Redis and Postgres URLs from the environment, so it runs as well
//! against a single node as against a cluster.

mod common;

use std::time::{Duration, Instant};

use common::{Harness, Socket};
use engine::ids::FanId;
use serde_json::{json, Value};

/// How long every fan may take to hear `admitted` once the line opens: generous, for a machine
/// that two cores share with the whole suite (at the test's rate it takes about 4 s).
const PATIENCE: Duration = Duration::from_secs(90);

/// A config whose position round never comes within a test: only the push (or the per-tick
/// catch-up) can tell a fan admitted by the other instance.
fn push_only_config() -> engine::Config {
    let mut cfg = common::test_config();
    cfg.queue.position_interval_ms = 3_600_000;
    cfg
}

/// A second queue-server beside the harness's, against the same Redis and Postgres.
async fn second_queue_server(h: &Harness) -> queue_server::Running {
    let mut cfg = h.queue.engine.cfg().clone();
    cfg.queue.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    queue_server::start(cfg)
        .await
        .expect("a second queue-server starts")
}

/// An admission token's claims (`v1.<base64 JSON>.<signature>`); booking-api checks the signature.
fn token_claims(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a token's payload");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64");
    serde_json::from_slice(&json).expect("JSON claims")
}

/// Reads `ws` until its `admitted` frame, which it returns; panics if the socket closes or
/// `deadline` passes first.
async fn until_admitted(ws: &mut Socket, who: &str, deadline: Instant) -> Value {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{who} never heard `admitted`"));
        match msg {
            Some(Ok(Message::Text(t))) => {
                let m = common::checked_frame(&t);
                match m["type"].as_str() {
                    Some("admitted") => return m,
                    Some("tick" | "position" | "paused") => {}
                    _ => panic!("{who} heard {m} before `admitted`"),
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                panic!("{who}'s socket closed before `admitted`")
            }
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_fan_hears_admitted_on_their_own_instance_in_join_order() {
    let h = Harness::start_with(push_only_config()).await;
    let other = second_queue_server(&h).await;
    let drop = h
        .queue_drop(
            1_000,
            1,
            json!({"paused": true, "rate_per_s": 50, "burst": 10, "max_active": 1000}),
            None,
        )
        .await;
    // 200 fans join one after the other (each socket's first frame, its position, says its join
    // is done), every other one on the second instance.
    const FANS: usize = 200;
    let mut fans: Vec<(FanId, Socket, &str)> = Vec::with_capacity(FANS);
    for i in 0..FANS {
        let (fan, token) = h.fan(&format!("spread{i}"));
        let (base, on) = if i.is_multiple_of(2) {
            (h.queue.ws_url(), "first")
        } else {
            (other.ws_url(), "second")
        };
        let mut ws = common::connect(&base, &drop, &token).await;
        let first = common::next_message(&mut ws).await;
        let first = first.unwrap_or_else(|| panic!("fan {i}'s socket closed at once"));
        assert_eq!(first["type"], "position", "fan {i}: {first}");
        assert_eq!(first["ahead"], i, "fan {i} joins behind the {i} before");
        fans.push((fan, ws, on));
    }
    h.set_admission(&drop, json!({"paused": false})).await;

    let deadline = Instant::now() + PATIENCE;
    let heard = futures::future::join_all(fans.iter_mut().enumerate().map(
        |(i, (fan, ws, on))| async move {
            let who = format!("fan {i} ({fan}, on the {on} instance)");
            until_admitted(ws, &who, deadline).await
        },
    ))
    .await;

    // In join order: each admission run takes the head of the line, so a later joiner's session
    // never ends before an earlier one's; and every token is the fan's own, for their own place.
    let mut last: Option<(i64, i64)> = None;
    for (i, ((fan, _, _), admitted)) in fans.iter().zip(&heard).enumerate() {
        let token = admitted["admission_token"].as_str().expect("a token");
        let claims = token_claims(token);
        assert_eq!(claims["fan"], fan.as_str(), "fan {i}'s token is theirs");
        let place = claims["place"].as_i64().expect("a place");
        let standing = h.queue.queue.standing(&drop, fan).await.unwrap();
        assert_eq!(Some(place), standing.place, "fan {i}'s place");
        let shop_end = admitted["shop_ends_at_ms"].as_i64().expect("a shop end");
        if let Some((last_place, end)) = last {
            assert!(place > last_place, "fan {i} joined after fan {}", i - 1);
            assert!(
                shop_end >= end,
                "fan {i} was admitted before fan {} ahead of them",
                i - 1
            );
        }
        last = Some((place, shop_end));
    }
    other.shutdown().await;
    h.shutdown().await;
}

/// Admission runs a drop costs with two instances, against the ticks of one: the runs happen on
/// the instance holding the drop's lease, so two instances with waiters run about what one
/// would (the bar: at most 1.2×). Counted over a fixed number of ticks, not timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_run_no_more_admissions_than_one() {
    let h = Harness::start().await;
    let other = second_queue_server(&h).await;
    // Paused: every tick still runs the script (it is what says the line is paused), and no
    // fan leaves the rooms by being admitted.
    let drop = h.queue_drop(100, 1, json!({"paused": true}), None).await;
    let mut sockets = Vec::new();
    for i in 0..4_usize {
        let (_, token) = h.fan(&format!("counted{i}"));
        let base = if i.is_multiple_of(2) {
            h.queue.ws_url()
        } else {
            other.ws_url()
        };
        let mut ws = common::connect(&base, &drop, &token).await;
        common::wait_for(&mut ws, "position").await;
        sockets.push(ws);
    }
    let counts = || {
        (
            h.queue.queue.room_ticks(),
            other.queue.room_ticks(),
            h.queue.queue.admission_runs() + other.queue.admission_runs(),
        )
    };
    // Both rooms settle first (each has ticked a lease's length, so leases and the feed are up).
    let settled = counts();
    testkit::eventually("both rooms tick for a while", || async {
        let (a, b, _) = counts();
        a >= settled.0 + 30 && b >= settled.1 + 30
    })
    .await;
    const TICKS: u64 = 100;
    let (a0, b0, runs0) = counts();
    testkit::eventually("both rooms tick 100 more times", || async {
        let (a, b, _) = counts();
        a >= a0 + TICKS && b >= b0 + TICKS
    })
    .await;
    let (a1, b1, runs1) = counts();
    let runs = runs1 - runs0;
    // One instance runs the script once per tick: the fewer ticks of the two is what one
    // instance alone would have run over the same while.
    let one = (a1 - a0).min(b1 - b0);
    assert!(
        runs as f64 <= 1.2 * one as f64,
        "two instances ran {runs} admission scripts in the time one ticks {one} times"
    );
    std::mem::drop(sockets);
    other.shutdown().await;
    h.shutdown().await;
}

/// A push can be lost (sharded pub/sub drops its subscribers when a shard fails over): the
/// instance holding the fan's socket catches up on its own, from the admission watermark. Here
/// the test is the instance holding the lease, and its pushes leave the fan out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fan_whose_push_was_lost_hears_admitted_from_the_catch_up() {
    let h = Harness::start_with(push_only_config()).await;
    let drop = h
        .queue_drop(
            100,
            1,
            json!({"paused": true, "rate_per_s": 100, "burst": 10}),
            None,
        )
        .await;
    // The test holds the drop's admission lease, so queue-server's room never runs the line
    // while the test's runs keep coming (a lease's length of silence would make it run it).
    let lease = engine::keys::drop_key(&drop, "lease:admit");
    let taken = h
        .queue
        .engine
        .redis()
        .lease(&lease, "the-test", 600_000, false);
    assert!(
        taken.await.unwrap(),
        "nobody held the lease before the room"
    );
    let beat = {
        let q = h.queue.queue.clone();
        let drop = drop.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(mut t) = q.admit(&drop).await {
                    // The push that should have named the fans this run admitted is lost.
                    t.admitted.clear();
                    let _ = q.publish(&drop, &t).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let (fan, token) = h.fan("unpushed");
    let mut ws = common::connect(&h.queue.ws_url(), &drop, &token).await;
    assert_eq!(common::wait_for(&mut ws, "position").await["ahead"], 0);
    h.set_admission(&drop, json!({"paused": false})).await;
    let admitted = until_admitted(&mut ws, "the fan", Instant::now() + PATIENCE).await;
    let claims = token_claims(admitted["admission_token"].as_str().unwrap());
    assert_eq!(claims["fan"], fan.as_str());
    beat.abort();
    h.shutdown().await;
}

/// An ops change reaches the sockets of every instance, not only the one running the line: the
/// others take the line's state from the runs the feed brings.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ops_change_reaches_the_sockets_of_both_instances() {
    let h = Harness::start_with(push_only_config()).await;
    let other = second_queue_server(&h).await;
    let drop = h
        .queue_drop(
            100,
            1,
            json!({"paused": true, "rate_per_s": 0.001, "burst": 1}),
            None,
        )
        .await;
    let mut sockets = Vec::new();
    for (i, base) in [h.queue.ws_url(), other.ws_url()].into_iter().enumerate() {
        let (_, token) = h.fan(&format!("ops{i}"));
        let mut ws = common::connect(&base, &drop, &token).await;
        common::wait_for(&mut ws, "paused").await;
        sockets.push(ws);
    }
    // Open (the bucket's one token admits the first fan; the second waits on).
    h.set_admission(&drop, json!({"paused": false})).await;
    let (mut first, mut second) = (sockets.remove(0), sockets.remove(0));
    until_admitted(&mut first, "the first fan", Instant::now() + PATIENCE).await;
    loop {
        let tick = common::wait_for(&mut second, "tick").await;
        if tick["state"] == "open" {
            break;
        }
    }
    h.set_admission(&drop, json!({"paused": true})).await;
    common::wait_for(&mut second, "paused").await;
    other.shutdown().await;
    h.shutdown().await;
}
