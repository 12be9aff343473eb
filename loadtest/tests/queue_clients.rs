//! loadtest's socket clients (`loadtest queue-clients`: the child processes that hold the `queue`
//! scenario's and bench/queue-ws.sh's sockets) against a real queue-server and booking-api, in
//! process on the Redis and Postgres that `./dev test` started: they authenticate as the server
//! asks (the fan token in the socket's first message, never in the URL), and every socket waits
//! in the line and hears its position.

use std::process::Stdio;
use std::time::Duration;

use engine::ids::FanId;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

mod common;
use common::Servers;

const SOCKETS: usize = 5;

/// The child's next stdout line of `kind` (progress lines in between are skipped).
async fn line_of(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    kind: &str,
) -> Value {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("a `{kind}` line within 60 s"))
            .expect("the child's stdout reads")
            .unwrap_or_else(|| panic!("the child ended before its `{kind}` line"));
        let v: Value = serde_json::from_str(&line).expect("a JSON line");
        if v["type"] == kind {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_clients_authenticate_and_wait_in_line() {
    let Servers {
        booking,
        queue,
        client,
        ..
    } = Servers::start(common::config(), "loadtest-test").await;
    // Paused: every socket stays in the line.
    let drop = client
        .create_drop(json!({
            "name": "loadtest clients", "per_fan_limit": 1, "hold_ttl_s": 300,
            "admission": {"mode": "queue", "paused": true},
            "inventory": {"kind": "ga", "skus": [{"sku": "LT", "name": "LT", "price_cents": 100, "quantity": 10}]}
        }))
        .await;
    let tokens: Vec<String> = (0..SOCKETS)
        .map(|i| {
            let fan = FanId::parse(&format!("lt-{i}-{:08x}", rand::random::<u32>())).unwrap();
            queue.engine.fans().issue_dev(&fan).unwrap()
        })
        .collect();
    let init = json!({
        "target": queue.addr,
        "url": format!("{}/v1/drops/{drop}/queue/ws", queue.ws_url()),
        "tokens": tokens,
        "count": SOCKETS,
        "first_fan": 0,
        "source_net": 201,
        "sockets_per_addr": SOCKETS,
        "read_buffer_bytes": 4096,
        "connect_concurrency": SOCKETS,
        "connect_timeout_ms": 30_000,
    });

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .arg("queue-clients")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("loadtest queue-clients starts");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    stdin
        .write_all(format!("{init}\n").as_bytes())
        .await
        .unwrap();
    let connected = line_of(&mut lines, "connected").await;
    assert_eq!(
        (connected["opened"].as_u64(), connected["failed"].as_u64()),
        (Some(SOCKETS as u64), Some(0)),
        "{connected}"
    );
    stdin.write_all(b"stop\n").await.unwrap();
    let report = line_of(&mut lines, "report").await;
    assert!(
        report["failures"].as_object().is_some_and(|f| f.is_empty()),
        "{report}"
    );
    assert_eq!(report["bad_frames"], 0, "{report}");
    // The first frame of an authenticated socket in a paused line: its position.
    let positions = report["frames_by_type"]["position"].as_u64().unwrap_or(0);
    assert!(positions >= SOCKETS as u64, "{report}");
    assert!(report["frames_by_type"]["error"].is_null(), "{report}");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the child exits after its report")
        .unwrap();
    assert!(status.success());
    queue.shutdown().await;
    booking.shutdown().await;
}
