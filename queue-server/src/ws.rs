//! The WebSocket side: the upgrade handshake on hyper, then one task per socket that first waits
//! for the socket's auth frame, then writes what its bounded queue holds, reads (and discards)
//! what the client sends, and on shutdown sends a close frame telling the client to reconnect
//! (1012, service restart).
//!
//! **The fan token never travels in a URL**: proxies, load balancers and access logs keep URLs.
//! A socket authenticates with its first message, `{"type":"auth","fan_token":"…"}`, within
//! `queue.ws_auth_timeout_ms`; a socket asked for with `?fan_token=` is refused before the
//! upgrade ([`refuse_token_in_url`]). Until then it holds a connection slot and nothing else: no
//! join, no room, no Redis.

use std::sync::Arc;
use std::time::Duration;

use engine::config::{ms, QueueConfig};
use engine::ids::{DropId, FanId};
use engine::queue::{FanStatus, Proofs, Standing};
use engine::{Code, Error};
use futures::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::room::{frame, Frame, Rooms};
use web::Body;

/// What a client must send first, and how: the refusals' messages quote it.
const AUTH_FIRST: &str =
    r#"A socket's first message must be {"type":"auth","fan_token":"<fan token>"}."#;

/// Refuses a request whose URL carries the fan token (`?fan_token=`, with or without a value):
/// 422 `invalid_request`, before the socket's upgrade (and before the HTTP join and poll look
/// at their `Authorization`). The token is not looked at.
pub fn refuse_token_in_url<B>(req: &Request<B>) -> Result<(), Error> {
    let carries = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.split('=').next() == Some("fan_token"))
    });
    if carries {
        return Err(Error::invalid(
            r#"The fan token never goes in a URL (proxies and logs keep URLs): open the socket without it and send {"type":"auth","fan_token":"<fan token>"} as its first message."#,
        ));
    }
    Ok(())
}

/// The first message a socket sends. Fields other than these are ignored, so a later page may
/// add some without an older server refusing it in the middle of a rolling deploy.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Auth {
        fan_token: String,
        /// What the page kept from before, for the case Redis lost the line (docs/API.md, "The
        /// line after Redis loss"): the last place receipt it was handed, its admission token.
        #[serde(default)]
        receipt: Option<String>,
        #[serde(default)]
        admission_token: Option<String>,
    },
}

/// What an auth frame brought besides the fan: see [`engine::queue::Proofs`].
#[derive(Default)]
struct Brought {
    receipt: Option<String>,
    admission_token: Option<String>,
}

impl Brought {
    fn proofs(&self) -> Proofs<'_> {
        Proofs {
            receipt: self.receipt.as_deref(),
            admission_token: self.admission_token.as_deref(),
        }
    }
}

/// Why a socket never got past its auth frame.
enum Refused {
    /// The client closed, or the connection broke: nobody to tell.
    Gone,
    /// Nothing arrived within `queue.ws_auth_timeout_ms`: closed 1008 `auth_timeout`.
    Timeout,
    /// A bad first message or token: an `error` frame, then closed 1008 with the code as reason.
    Frame(Error),
}

pub fn ws_config(cfg: &QueueConfig) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(cfg.ws_read_buffer_bytes)
        .write_buffer_size(cfg.ws_write_buffer_bytes)
        // tungstenite panics unless the cap exceeds the buffer.
        .max_write_buffer_size(
            cfg.ws_max_write_buffer_bytes
                .max(cfg.ws_write_buffer_bytes + 1),
        )
        .max_message_size(Some(cfg.ws_max_message_bytes))
        .max_frame_size(Some(cfg.ws_max_message_bytes))
}

/// Checks the upgrade request; the 101 answer and the handshake's accept key, or why not.
pub fn accept(req: &Request<Incoming>) -> Result<Response<Body>, Error> {
    let h = req.headers();
    let upgrade = h
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = h.get(SEC_WEBSOCKET_KEY);
    let (true, Some(key)) = (upgrade, key) else {
        return Err(Error::msg(
            Code::InvalidRequest,
            "This endpoint speaks WebSocket: send an Upgrade: websocket request.",
        ));
    };
    let accept = derive_accept_key(key.as_bytes());
    let mut resp = Response::new(Body::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static("websocket"));
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    resp.headers_mut().insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).map_err(Error::internal)?,
    );
    Ok(resp)
}

/// After the 101: waits for the socket's auth frame, then joins the fan, queues the first
/// messages (position first), enters the room, and serves the socket until it closes, is dropped
/// as slow, or the server shuts down.
pub async fn serve(
    rooms: Arc<Rooms>,
    req: Request<Incoming>,
    drop: DropId,
    permit: Arc<OwnedSemaphorePermit>,
) {
    let cfg = &rooms.queue.engine.cfg().queue;
    let config = ws_config(cfg);
    // The awaits before the line's loop are boxed: an async fn's state is as big as its biggest
    // await, and this one lives as long as the socket. Inline, the join's Redis and Postgres
    // futures made every waiting socket's task several KiB larger for its whole life.
    let upgraded = match Box::pin(hyper::upgrade::on(req)).await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade failed");
            return;
        }
    };
    let mut ws = Box::pin(WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Server,
        Some(config),
    ))
    .await;
    metrics::gauge!(engine::metrics::QUEUE_WS_CONNECTIONS).increment(1.0);
    match Box::pin(authenticate(&rooms, &mut ws)).await {
        Ok((fan, brought)) => wait_in_line(&rooms, ws, &drop, &fan, &brought).await,
        Err(refused) => Box::pin(refuse(ws, refused, cfg)).await,
    }
    metrics::gauge!(engine::metrics::QUEUE_WS_CONNECTIONS).decrement(1.0);
    std::mem::drop(permit);
}

/// Reads the socket's first message: the fan of a good auth frame, or why not. Pings and pongs
/// don't count (tungstenite answers pings itself); any other frame first is refused.
async fn authenticate<S>(
    rooms: &Rooms,
    ws: &mut WebSocketStream<S>,
) -> Result<(FanId, Brought), Refused>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let timeout = ms(rooms.queue.engine.cfg().queue.ws_auth_timeout_ms);
    let deadline = tokio::time::Instant::now() + timeout;
    let invalid = |why: &str| Refused::Frame(Error::invalid(format!("{why} {AUTH_FIRST}")));
    loop {
        let text = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(Refused::Timeout),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return Err(Refused::Gone),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Binary(_) | Message::Frame(_)))) => {
                return Err(invalid("A binary frame came before the auth frame."))
            }
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|_| {
            Refused::Frame(Error::msg(
                Code::MalformedJson,
                format!("The first message is not JSON. {AUTH_FIRST}"),
            ))
        })?;
        let ClientFrame::Auth {
            fan_token,
            receipt,
            admission_token,
        } = serde_json::from_value(value)
            .map_err(|_| invalid("The first message is not an auth frame."))?;
        let fan = rooms
            .queue
            .engine
            .fans()
            .verify(&fan_token)
            .map_err(Refused::Frame)?;
        let brought = Brought {
            receipt,
            admission_token,
        };
        return Ok((fan, brought));
    }
}

/// Tells a socket whose auth failed why (an `error` frame, unless it timed out) and closes it
/// with 1008 (policy violation) and the code as reason, waiting `queue.ws_close_wait_ms` for
/// the client's close: it is read before the connection drops, so the refusal isn't lost to a
/// TCP reset.
async fn refuse<S>(mut ws: WebSocketStream<S>, refused: Refused, cfg: &QueueConfig)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let send_timeout = ms(cfg.ws_send_timeout_ms);
    let reason = match refused {
        Refused::Gone => return,
        Refused::Timeout => "auth_timeout",
        Refused::Frame(e) => {
            let error = json!({"type": "error", "code": e.code.name(), "message": e.message});
            let sent = ws.send(Message::Text(frame(&error)));
            if !matches!(tokio::time::timeout(send_timeout, sent).await, Ok(Ok(()))) {
                return;
            }
            e.code.name()
        }
    };
    let close = CloseFrame {
        code: CloseCode::Policy,
        reason: reason.into(),
    };
    if !matches!(
        tokio::time::timeout(send_timeout, ws.close(Some(close))).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let until = tokio::time::Instant::now() + ms(cfg.ws_close_wait_ms);
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(until, ws.next()).await {}
}

/// An authenticated socket: joins the fan, queues what it hears first, and serves it until it
/// closes, is dropped as slow, or the server shuts down.
async fn wait_in_line<S>(
    rooms: &Arc<Rooms>,
    mut ws: WebSocketStream<S>,
    drop: &DropId,
    fan: &FanId,
    brought: &Brought,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let cfg = &rooms.queue.engine.cfg().queue;
    let (tx, mut rx) = mpsc::channel::<Frame>(cfg.send_queue_len.max(4));
    let refuse = |e: Error| {
        let _ = tx.try_send(frame(
            &json!({"type": "error", "code": e.code.name(), "message": e.message}),
        ));
    };
    let conn = match Box::pin(first_messages(rooms, drop, fan, brought, &tx)).await {
        Ok(Some(place)) => rooms
            .enter(drop, fan, place, tx.clone())
            .map_err(refuse)
            .ok(),
        Ok(None) => None,
        Err(e) => {
            refuse(e);
            None
        }
    };
    // From here the room holds the only sender (if it took the socket): when it lets go, the
    // socket's queue ends and so does the socket.
    std::mem::drop(tx);
    let mut ping = tokio::time::interval(ms(cfg.ws_ping_interval_ms));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let idle_timeout = ms(cfg.ws_idle_timeout_ms);
    let send_timeout = ms(cfg.ws_send_timeout_ms);
    let mut heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if heard.elapsed() >= idle_timeout {
                    // Gone without a close (a phone out of coverage, a killed tab): free the
                    // slot; its place survives the grace if it comes back.
                    break;
                }
                let sent = tokio::time::timeout(send_timeout, ws.send(Message::Ping(Default::default())));
                if !matches!(sent.await, Ok(Ok(()))) {
                    break;
                }
            }
            msg = rx.recv() => match msg {
                Some(m) => {
                    if !send_soon(&mut ws, Message::Text(m), send_timeout).await {
                        break;
                    }
                }
                None => {
                    // The room let go of this socket: admitted, ended, too slow — or the server
                    // is shutting down, and then the fan is told to come back (1012, service
                    // restart). The room does it, not a shutdown branch here: that would cost
                    // every socket a wake-up registration on each frame it sends.
                    if rooms.shutting_down() {
                        let close = CloseFrame {
                            code: CloseCode::Restart,
                            reason: "server restarting: reconnect, your place is kept".into(),
                        };
                        let _ = tokio::time::timeout(ms(cfg.ws_close_wait_ms), ws.close(Some(close))).await;
                    } else {
                        let _ = tokio::time::timeout(send_timeout, ws.close(None)).await;
                    }
                    break;
                }
            },
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => heard = tokio::time::Instant::now(),
            },
        }
    }
    if let Some(conn) = conn {
        rooms.leave(drop, conn);
    }
}

/// Sends one message; false when the socket failed or stayed blocked for `timeout`. The
/// timeout's timer is armed only when the write doesn't complete at once: a tick goes to every
/// socket together, and a timer registered and cancelled per send would cost each tick 19,000
/// trips through the runtime's timer wheel for sends that almost never block.
async fn send_soon<S>(ws: &mut S, msg: Message, timeout: Duration) -> bool
where
    S: futures::Sink<Message> + Unpin,
{
    let send = ws.send(msg);
    tokio::pin!(send);
    match futures::poll!(&mut send) {
        std::task::Poll::Ready(r) => r.is_ok(),
        std::task::Poll::Pending => {
            matches!(tokio::time::timeout(timeout, send).await, Ok(Ok(())))
        }
    }
}

/// Joins and queues what a new socket hears first; the fan's place when they wait (enter the
/// room).
async fn first_messages(
    rooms: &Arc<Rooms>,
    drop: &DropId,
    fan: &FanId,
    brought: &Brought,
    tx: &mpsc::Sender<Frame>,
) -> Result<Option<i64>, Error> {
    let joined = rooms.queue.join(drop, fan, brought.proofs()).await?;
    let view = rooms.view(drop).await?;
    let send = |v: serde_json::Value| {
        let _ = tx.try_send(frame(&v));
    };
    match joined.status {
        FanStatus::SoldOut => send(json!({"type": "sold_out"})),
        FanStatus::Closed => send(json!({"type": "closed"})),
        FanStatus::Done => send(json!({"type": "done"})),
        FanStatus::Admitted => {
            let standing = rooms.queue.standing(drop, fan).await?;
            send(rooms.admitted_message(
                drop,
                fan,
                joined.place,
                standing.session,
                standing.offered(),
            ))
        }
        FanStatus::PreQueue => {
            send(
                json!({"type": "pre_queue", "opens_at": joined.opens_at_ms, "waiting": view.waiting}),
            );
            return Ok(Some(joined.place));
        }
        // On the waiting list, the standing message is `waitlisted` (the view says so).
        FanStatus::Waiting | FanStatus::Waitlisted => {
            let standing: Standing = rooms.queue.standing(drop, fan).await?;
            let mut said = None;
            if let Some(msg) =
                rooms.standing_message(drop, fan, &standing, &view, joined.opens_at_ms)
            {
                let admitted = msg["type"] == "admitted";
                said = msg["type"].as_str().map(str::to_owned);
                send(msg);
                if admitted {
                    return Ok(None);
                }
            }
            // Not twice: a waitlisted fan's own `waitlisted` says the state already.
            if let Some(state) = view.state_message() {
                if said.as_deref() != state["type"].as_str() {
                    send(state);
                }
            }
            return Ok(Some(joined.place));
        }
    }
    Ok(None)
}
