//! 5,000 concurrent WebSocket waiters on one queue-server: every one hears exact positions on
//! the slow cadence and the shared ticks, is admitted with a token for their own place, and the
//! line is admitted in order. Its own test binary: it holds ~10,000 sockets (both ends) in one
//! process, which must stay under the per-process open-file limit (20,000 here).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{connect, next_message, Harness};
use engine::ids::FanId;
use futures::StreamExt;
use serde_json::json;

const WAITERS: usize = 5_000;
/// Sockets opening at once: each open is a join and a few reads in Redis.
const CONNECTING: usize = 100;

/// What one waiter saw.
struct Seen {
    fan: FanId,
    place: i64,
    positions: usize,
    ticks: usize,
    admitted_place: Option<i64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_waiters_hear_positions_and_are_admitted_in_order() {
    let h = Harness::start().await;
    let drop = h
        .queue_drop(
            WAITERS as u32 * 2,
            1,
            json!({"paused": true, "rate_per_s": 1000, "burst": 100, "max_active": 100000}),
            None,
        )
        .await;
    let ws = h.queue.ws_url();
    // Waiters that have heard two exact positions: the one on connect and one from the cadence.
    let heard_twice = Arc::new(AtomicUsize::new(0));
    let fans: Vec<(FanId, String)> = (0..WAITERS).map(|i| h.fan(&format!("crowd{i}"))).collect();
    let mut tasks = Vec::with_capacity(WAITERS);
    let mut opening = futures::stream::iter(fans)
        .map(|(fan, token)| {
            let (ws, drop) = (ws.clone(), drop.clone());
            async move { (fan, connect(&ws, &drop, &token).await) }
        })
        .buffer_unordered(CONNECTING);
    while let Some((fan, mut socket)) = opening.next().await {
        let heard_twice = heard_twice.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen {
                fan,
                place: 0,
                positions: 0,
                ticks: 0,
                admitted_place: None,
            };
            while let Some(m) = next_message(&mut socket).await {
                match m["type"].as_str().unwrap_or("") {
                    "position" => {
                        seen.place = m["place"].as_i64().unwrap();
                        seen.positions += 1;
                        if seen.positions == 2 {
                            heard_twice.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    "tick" => seen.ticks += 1,
                    "admitted" => {
                        let token = m["admission_token"].as_str().unwrap().to_owned();
                        seen.admitted_place = Some(token_place(&token));
                        break;
                    }
                    "paused" => {}
                    other => panic!("unexpected {other}: {m}"),
                }
            }
            seen
        }));
    }
    assert_eq!(tasks.len(), WAITERS);
    testkit::eventually("every waiter hears a second exact position", || async {
        heard_twice.load(Ordering::Relaxed) == WAITERS
    })
    .await;

    h.set_admission(&drop, json!({"paused": false})).await;
    let mut seen = Vec::with_capacity(WAITERS);
    for t in tasks {
        seen.push(t.await.expect("waiter task"));
    }

    let mut places = HashMap::new();
    for s in &seen {
        assert_eq!(
            s.admitted_place,
            Some(s.place),
            "{} admitted for its own place",
            s.fan
        );
        assert!(s.positions >= 2 && s.ticks >= 1, "{} heard updates", s.fan);
        assert!(
            places.insert(s.place, s.fan.clone()).is_none(),
            "places are distinct"
        );
    }
    // In order: admission deadlines (admission time + shop window, from Redis TIME) never go
    // down along the line. Fans admitted in one run share a deadline.
    let active = h
        .queue
        .engine
        .redis()
        .active_deadlines(&drop)
        .await
        .unwrap();
    let deadline: HashMap<String, i64> = active.into_iter().collect();
    let mut by_place: Vec<&Seen> = seen.iter().collect();
    by_place.sort_by_key(|s| s.place);
    let deadlines: Vec<i64> = by_place.iter().map(|s| deadline[s.fan.as_str()]).collect();
    assert!(
        deadlines.windows(2).all(|w| w[0] <= w[1]),
        "a fan further back was admitted before one ahead of them"
    );
    h.shutdown().await;
}

/// The place an admission token was issued for (its claims are base64url JSON).
fn token_place(token: &str) -> i64 {
    use base64::Engine as _;
    let claims = token.split('.').nth(1).expect("v1.<claims>.<mac>");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["place"].as_i64().unwrap()
}
