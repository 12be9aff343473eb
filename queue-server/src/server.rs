//! The server: accept loop with a connection bound (WebSockets hold their permit for their whole
//! life), HTTP/1.1 via hyper with upgrades, request timeout, metrics per route, and graceful
//! shutdown: `/readyz` fails for `queue.drain_unready_ms` first (a load balancer marks the
//! instance down while it still serves, so reconnecting fans land elsewhere), then stop
//! accepting, tell every socket to reconnect elsewhere (close 1012), wait for the connections to
//! drain within `queue.shutdown_grace_ms`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::config::ms;
use engine::queue::Queue;
use engine::{Config, Engine, Error};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::limits::Limits;
use crate::room::Rooms;
use crate::routes::App;
use web::{self as http, Body};

/// A running queue-server.
pub struct Running {
    pub addr: SocketAddr,
    /// The internal listener serving `/metrics` without a key (`queue.metrics_listen`), if any.
    pub metrics_addr: Option<SocketAddr>,
    pub engine: Arc<Engine>,
    pub queue: Arc<Queue>,
    rooms: Arc<Rooms>,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    draining: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Fails `/readyz` for `queue.drain_unready_ms` while still serving, then stops accepting,
    /// closes every socket with "reconnect", waits for connections to drain.
    pub async fn shutdown(self) {
        let unready = ms(self.engine.cfg().queue.drain_unready_ms);
        http::begin_draining(&self.draining, unready, "sockets are closed").await;
        let _ = self.shutdown.send(true);
        self.rooms.close_all();
        let _ = self.task.await;
        self.engine.close().await;
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

/// Starts queue-server on `cfg.queue.listen` (port 0 picks a free one).
pub async fn start(cfg: Config) -> Result<Running, Error> {
    let (listener, addr) = web::bind(cfg.queue.listen).await?;
    let metrics = match cfg.queue.metrics_listen {
        Some(at) => Some(web::bind(at).await?),
        None => None,
    };
    let metrics_addr = metrics.as_ref().map(|(_, a)| *a);
    let engine = Engine::start_as(cfg, engine::Role::Queue).await?;
    let queue = Arc::new(Queue::new(engine.clone()));
    let (shutdown, rx) = watch::channel(false);
    let qcfg = engine.cfg().queue.clone();
    let app = Arc::new(App {
        rooms: Rooms::new(queue.clone(), qcfg.clone(), rx.clone()),
        limits: Limits::new(engine.cfg()),
        metrics: web::metrics_handle(),
    });
    let rooms = app.rooms.clone();
    let draining = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(serve(
        listener,
        metrics.map(|(l, _)| l),
        app,
        draining.clone(),
        rx,
    ));
    tracing::info!(%addr, ?metrics_addr, "queue-server listening");
    Ok(Running {
        addr,
        metrics_addr,
        engine,
        queue,
        rooms,
        draining,
        shutdown,
        task,
    })
}

async fn serve(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    app: Arc<App>,
    draining: Arc<AtomicBool>,
    shutdown: watch::Receiver<bool>,
) {
    let cfg = app.rooms.queue.engine.cfg().queue.clone();
    let max = cfg.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(max));
    let tidy = {
        let app = app.clone();
        let every = ms(app.rooms.queue.engine.cfg().limits.tidy_interval_ms);
        http::every_until_shutdown(every, shutdown.clone(), move || app.limits.tidy())
    };
    // The per-drop gauges, read from Redis as booking-api reads them (engine::drop_metrics), so
    // either server's /metrics shows each drop's line.
    let drop_metrics = app.rooms.queue.engine.spawn_drop_metrics(shutdown.clone());
    let metrics = metrics.map(|l| {
        let engine = app.rooms.queue.engine.clone();
        tokio::spawn(http::serve_metrics_with(
            l,
            app.metrics.clone(),
            Arc::new(move || engine.drop_gauges_text()),
            permits.clone(),
            ms(cfg.header_read_timeout_ms),
            shutdown.clone(),
        ))
    });
    let timeout = ms(cfg.request_timeout_ms);
    let limits = http::ConnLimits {
        header_read_timeout: ms(cfg.header_read_timeout_ms),
        max_buf_size: cfg.max_read_buffer_bytes,
    };
    http::accept_loop(
        listener,
        permits.clone(),
        shutdown.clone(),
        |stream, peer, permit| {
            // Shared with the request handler: an upgraded WebSocket keeps it after the HTTP side ends.
            let permit = Arc::new(permit);
            let app = app.clone();
            let conn_permit = permit.clone();
            let draining = draining.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let app = app.clone();
                let permit = conn_permit.clone();
                let draining = draining.load(Ordering::SeqCst);
                async move {
                    Ok::<_, std::convert::Infallible>(
                        handle(&app, req, peer, timeout, permit, draining).await,
                    )
                }
            });
            http::spawn_connection(stream, service, limits, shutdown.clone(), permit);
        },
    )
    .await;
    tidy.abort();
    if let Some(m) = metrics {
        let _ = m.await;
    }
    let _ = drop_metrics.await;
    // Every connection and socket holds a permit: all of them back means everything drained.
    let drained =
        tokio::time::timeout(ms(cfg.shutdown_grace_ms), permits.acquire_many(max as u32)).await;
    if drained.is_err() {
        tracing::warn!("shutdown grace period over with connections still open");
    }
}

async fn handle(
    app: &Arc<App>,
    req: Request<Incoming>,
    peer: SocketAddr,
    timeout: Duration,
    permit: Arc<tokio::sync::OwnedSemaphorePermit>,
    draining: bool,
) -> Response<Body> {
    if draining && req.uri().path() == "/readyz" {
        return http::draining_refusal();
    }
    http::answer_within(timeout, app.handle(req, peer, permit)).await
}
