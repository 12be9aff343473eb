//! The ops console's live stream, `GET /v1/ops/ws` (docs/API.md, "The ops stream"): a WebSocket
//! that pushes one drop's figures (engine::ops_figures) every `http.ops_stream_interval_ms`.
//!
//! **The ops key never travels in a URL** (proxies and logs keep URLs, and a browser's
//! `EventSource` can't send an `Authorization` header): the socket's first message is
//! `{"type":"auth","api_key":"…"}`, within `http.ops_stream_auth_timeout_ms`; a URL with a query
//! naming a key is refused (422) before the upgrade. Then the server sends the drops the console
//! may pick (`drops`); the client picks one (`{"type":"watch","drop_id":"…"}`) and hears its
//! chart history (`history`) and a `figures` frame a second until it picks another or closes.
//! The server handles at most one client frame per `http.ops_stream_interval_ms` (the rest wait).
//! At most `http.ops_stream_max_subscribers` authenticated streams at once per process: the slot
//! is taken after the auth frame, so sockets that never authenticate (bounded by
//! `http.max_connections` and the auth timeout) can't hold the slots and lock ops out. Past the
//! bound, a 503 before the upgrade when it's already full, or after the auth frame an `error`
//! frame (`unavailable`) and close 1013.

use std::sync::Arc;
use std::time::Duration;

use engine::config::ms;
use engine::db::Scope;
use engine::ids::DropId;
use engine::ops_figures::{OpsSample, RecentCalls};
use engine::{Code, Engine, Error};
use futures::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, Message};
use tokio_tungstenite::WebSocketStream;
use web::Body;

/// What a client must send first: the refusals quote it.
const AUTH_FIRST: &str =
    r#"A socket's first message must be {"type":"auth","api_key":"<ops key>"}."#;

/// The ops streams of one process: their bound, the shutdown signal that ends them, and this
/// process's reserve and confirm counts (written to Redis by [`Engine::spawn_call_figures`]).
pub struct OpsStreams {
    permits: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    pub recent: Arc<RecentCalls>,
}

impl OpsStreams {
    pub fn new(engine: &Engine, shutdown: watch::Receiver<bool>) -> OpsStreams {
        let cfg = &engine.cfg().http;
        OpsStreams {
            permits: Arc::new(Semaphore::new(cfg.ops_stream_max_subscribers)),
            shutdown,
            recent: Arc::new(RecentCalls::new(cfg.ops_recent_max_drops)),
        }
    }

    /// Checks the upgrade request and answers 101, then serves the socket in a task of its own.
    pub fn open(
        &self,
        engine: &Arc<Engine>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Error> {
        refuse_key_in_url(&req)?;
        let resp = accept(&req)?;
        // A cheap early 503 while the bound is full; the slot itself is taken after the auth
        // frame (serve), so an unauthenticated socket never holds one.
        if self.permits.available_permits() == 0 {
            return Err(too_many());
        }
        tokio::spawn(serve(
            engine.clone(),
            req,
            self.permits.clone(),
            self.shutdown.clone(),
        ));
        Ok(resp)
    }
}

fn too_many() -> Error {
    Error::msg(
        Code::Unavailable,
        "Too many ops streams are open on this instance (http.ops_stream_max_subscribers).",
    )
    .retry_after(Duration::from_secs(5))
}

/// 422 for a URL whose query names a credential (`api_key`, `key`, `token`, `access_token`),
/// before the upgrade and without looking at it.
pub fn refuse_key_in_url<B>(req: &Request<B>) -> Result<(), Error> {
    let carries = req.uri().query().is_some_and(|q| {
        q.split('&').any(|kv| {
            matches!(
                kv.split('=').next(),
                Some("api_key" | "key" | "token" | "access_token")
            )
        })
    });
    if carries {
        return Err(Error::invalid(format!(
            "The ops key never goes in a URL (proxies and logs keep URLs): open the socket without it. {AUTH_FIRST}"
        )));
    }
    Ok(())
}

fn accept(req: &Request<Incoming>) -> Result<Response<Body>, Error> {
    let h = req.headers();
    let upgrade = h
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let (true, Some(key)) = (upgrade, h.get(SEC_WEBSOCKET_KEY)) else {
        return Err(Error::invalid(
            "This endpoint speaks WebSocket: send an Upgrade: websocket request.",
        ));
    };
    let mut resp = Response::new(Body::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = resp.headers_mut();
    hs.insert(UPGRADE, HeaderValue::from_static("websocket"));
    hs.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    hs.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key.as_bytes())).map_err(Error::internal)?,
    );
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Auth { api_key: String },
    Watch { drop_id: String },
    Drops,
}

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

fn error_frame(e: &Error) -> Message {
    Message::Text(
        json!({"type": "error", "code": e.code.name(), "message": e.message})
            .to_string()
            .into(),
    )
}

async fn send(ws: &mut Socket, v: &Value, timeout: Duration) -> bool {
    let msg = Message::Text(v.to_string().into());
    matches!(
        tokio::time::timeout(timeout, ws.send(msg)).await,
        Ok(Ok(()))
    )
}

/// Tells the client why (an `error` frame) and closes with `code` and the error's code as reason.
async fn refuse(mut ws: Socket, e: Option<Error>, code: CloseCode, timeout: Duration) {
    let reason = match &e {
        Some(e) => {
            let _ = tokio::time::timeout(timeout, ws.send(error_frame(e))).await;
            e.code.name()
        }
        None => "auth_timeout",
    };
    let close = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(timeout, ws.close(Some(close))).await;
    // Read the client's close, so the refusal isn't lost to a reset.
    let until = tokio::time::Instant::now() + timeout;
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(until, ws.next()).await {}
}

/// The first frame: an ops key, or why not (`None`: nothing in time).
async fn authenticate(engine: &Engine, ws: &mut Socket) -> Result<(), Option<Error>> {
    let deadline = tokio::time::Instant::now() + ms(engine.cfg().http.ops_stream_auth_timeout_ms);
    loop {
        let text = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(None),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => {
                return Err(Some(Error::new(Code::Unauthorized)))
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(_))) => {
                return Err(Some(Error::invalid(format!(
                    "A binary frame came first. {AUTH_FIRST}"
                ))))
            }
        };
        let Ok(ClientFrame::Auth { api_key }) = serde_json::from_str::<ClientFrame>(&text) else {
            return Err(Some(Error::msg(
                Code::Unauthorized,
                format!("The first message is not an auth frame. {AUTH_FIRST}"),
            )));
        };
        return engine
            .api_key(&api_key, Scope::Ops)
            .await
            .map(|_| ())
            .map_err(Some);
    }
}

async fn drops_frame(engine: &Engine) -> Value {
    match engine.ops_drops().await {
        Ok(drops) => json!({"type": "drops", "drops": drops}),
        Err(e) => json!({"type": "error", "code": e.code.name(), "message": e.message}),
    }
}

async fn serve(
    engine: Arc<Engine>,
    req: Request<Incoming>,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let upgraded = match hyper::upgrade::on(req).await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "ops socket upgrade failed");
            return;
        }
    };
    let cfg = &engine.cfg().http;
    let send_timeout = ms(cfg.ops_stream_send_timeout_ms);
    let config = WebSocketConfig::default()
        .read_buffer_size(cfg.ops_stream_max_message_bytes)
        .max_message_size(Some(cfg.ops_stream_max_message_bytes))
        .max_frame_size(Some(cfg.ops_stream_max_message_bytes));
    let mut ws =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    if let Err(e) = authenticate(&engine, &mut ws).await {
        refuse(ws, e, CloseCode::Policy, send_timeout).await;
        return;
    }
    let permit: OwnedSemaphorePermit = match permits.try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            refuse(ws, Some(too_many()), CloseCode::Again, send_timeout).await;
            return;
        }
    };
    if !send(&mut ws, &drops_frame(&engine).await, send_timeout).await {
        return;
    }
    let period = ms(engine.cfg().http.ops_stream_interval_ms);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // At most one client frame per interval: a watch reads up to `http.ops_history_len` samples
    // and a drops frame queries Postgres, so frames sent faster wait their turn (the socket
    // isn't read meanwhile, so the client's own TCP window holds the rest).
    let mut next_frame_at = tokio::time::Instant::now();
    let mut watching: Option<DropId> = None;
    let mut previous: Option<OpsSample> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(drop) = &watching else {
                    // Nothing picked yet: a ping keeps proxies from closing a quiet tunnel and
                    // finds a console that vanished without closing.
                    if !matches!(
                        tokio::time::timeout(send_timeout, ws.send(Message::Ping(Default::default()))).await,
                        Ok(Ok(()))
                    ) {
                        break;
                    }
                    continue;
                };
                let frame = match engine.ops_sample(drop, previous.as_ref()).await {
                    Ok(Some(s)) => {
                        if let Err(e) = engine.push_ops_history(drop, &s).await {
                            tracing::debug!(%drop, error = %e, "ops history: push failed");
                        }
                        let mut v = serde_json::to_value(&s).unwrap_or(Value::Null);
                        v["type"] = json!("figures");
                        previous = Some(s);
                        v
                    }
                    Ok(None) => json!({"type": "error", "code": "unknown_drop", "drop_id": drop,
                        "message": "Redis has no state for this drop (archived, or not loaded yet)."}),
                    Err(e) => json!({"type": "error", "code": e.code.name(), "message": e.message}),
                };
                if !send(&mut ws, &frame, send_timeout).await {
                    break;
                }
            }
            incoming = ws.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                tokio::time::sleep_until(next_frame_at).await;
                next_frame_at = tokio::time::Instant::now() + period;
                let reply = match serde_json::from_str::<ClientFrame>(&text) {
                    Ok(ClientFrame::Watch { drop_id }) => match DropId::parse(&drop_id) {
                        Ok(drop) => {
                            let history = engine.ops_history(&drop).await.unwrap_or_default();
                            previous = None;
                            watching = Some(drop.clone());
                            tick.reset_immediately();
                            json!({"type": "history", "drop_id": drop, "samples": history})
                        }
                        Err(_) => json!({"type": "error", "code": "unknown_drop",
                            "message": Code::UnknownDrop.message()}),
                    },
                    Ok(ClientFrame::Drops) => drops_frame(&engine).await,
                    Ok(ClientFrame::Auth { .. }) | Err(_) => json!({"type": "error",
                        "code": "invalid_request",
                        "message": r#"Send {"type":"watch","drop_id":"…"} or {"type":"drops"}."#}),
                };
                if !send(&mut ws, &reply, send_timeout).await {
                    break;
                }
            }
            _ = shutdown.changed() => {
                let close = CloseFrame {
                    code: CloseCode::Restart,
                    reason: "server restarting: reconnect".into(),
                };
                let _ = tokio::time::timeout(send_timeout, ws.close(Some(close))).await;
                break;
            }
        }
    }
    std::mem::drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_in_the_url_is_refused() {
        for q in ["api_key=fgk_x", "key=1", "a=1&token", "access_token=x"] {
            let req = Request::get(format!("/v1/ops/ws?{q}")).body(()).unwrap();
            let e = refuse_key_in_url(&req).unwrap_err();
            assert_eq!(e.code, Code::InvalidRequest, "{q}");
        }
        let req = Request::get("/v1/ops/ws?drop=d1").body(()).unwrap();
        assert!(refuse_key_in_url(&req).is_ok());
    }
}
