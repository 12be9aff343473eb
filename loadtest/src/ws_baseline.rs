//! The baseline for the waiting room's figures (`loadtest ws-baseline`, hidden): the least a
//! tokio-tungstenite server can do to push one frame to every socket. It accepts WebSockets on
//! any path, says `hello` to each, and every `interval_ms` broadcasts a frame shaped like
//! queue-server's `tick` (same fields, same size), whose `at_ms` is this process's clock when
//! the tick starts — where queue-server's is Redis' clock when its admission script runs. One
//! `tokio::sync::broadcast` channel, one task per socket, the same buffer sizes as queue-server.
//! No join, no Redis, no room bookkeeping: what is left is the cost of the sockets themselves.
//!
//! It prints `listening <addr>` on stdout once bound, and runs until killed.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::cli::WsBaselineArgs;

/// A write that takes longer than this means the client stopped reading (as in queue-server).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// The first place after opening, as queue-server numbers them (`2^52 + n`): ticks carry
/// watermarks of this size, so the frame is as long as queue-server's.
const POST_OPEN_BASE: i64 = 1 << 52;
/// A write backlog cap above the write buffer (tungstenite panics otherwise), as queue-server.
const MAX_WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// The broadcast frame of tick `n`.
pub fn tick_frame(n: i64, waiting: i64, at_ms: i64) -> String {
    json!({
        "type": "tick",
        "state": "open",
        "watermark": POST_OPEN_BASE + n,
        "admitted_total": n,
        "waiting": waiting,
        "admit_rate_per_s": 50.0,
        "configured_rate_per_s": 50.0,
        "at_ms": at_ms,
    })
    .to_string()
}

pub async fn run(args: WsBaselineArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {addr}")?;
        out.flush()?;
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(args.read_buffer_bytes)
        .write_buffer_size(args.write_buffer_bytes)
        .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES.max(args.write_buffer_bytes + 1))
        .max_message_size(Some(crate::cli::MAX_WS_MESSAGE_BYTES))
        .max_frame_size(Some(crate::cli::MAX_WS_MESSAGE_BYTES));
    let (tx, _) = broadcast::channel::<Message>(args.send_queue_len);
    tokio::spawn(ticker(tx.clone(), args.interval_ms));
    loop {
        let (stream, _peer): (_, SocketAddr) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                // Out of files, most likely: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut rx = tx.subscribe();
        tokio::spawn(async move {
            let Ok(mut ws) =
                tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
            else {
                return;
            };
            let hello = Message::Text(Utf8Bytes::from_static(r#"{"type":"hello"}"#));
            if ws.send(hello).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    m = rx.recv() => match m {
                        Ok(m) => match tokio::time::timeout(SEND_TIMEOUT, ws.send(m)).await {
                            Ok(Ok(())) => {}
                            _ => return,
                        },
                        // Too slow: queue-server drops such a client; here it just skips ahead.
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    incoming = ws.next() => match incoming {
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                        Some(Ok(_)) => {}
                    },
                }
            }
        });
    }
}

async fn ticker(tx: broadcast::Sender<Message>, interval_ms: u64) {
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0i64;
    loop {
        tick.tick().await;
        let at_ms = crate::ws_clients::wall_us() / 1000;
        let waiting = tx.receiver_count() as i64;
        let frame = Message::Text(Utf8Bytes::from(tick_frame(n, waiting, at_ms)));
        // No receivers yet is fine.
        let _ = tx.send(frame);
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_frame_has_queue_servers_fields() {
        let v: serde_json::Value = serde_json::from_str(&tick_frame(3, 19_000, 1_795_440_137_175))
            .expect("the frame is JSON");
        assert_eq!(v["type"], "tick");
        assert_eq!(v["at_ms"], 1_795_440_137_175i64);
        assert_eq!(v["admitted_total"], 3);
        assert_eq!(v["watermark"], (1i64 << 52) + 3);
    }
}
