//! The server: accept loop with a connection bound, HTTP/1.1 via hyper, request timeout, CORS,
//! metrics per route, and graceful shutdown: `/readyz` fails for `http.drain_unready_ms` first
//! (a load balancer marks the instance down while it still serves), then stop accepting, drain
//! in-flight requests within `http.shutdown_grace_ms`, stop background tasks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::config::{ms, HttpConfig};
use engine::{Config, Engine, Error};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::limits::Limits;
use crate::routes::App;
use web::{self as http, Body};

/// A running booking-api.
pub struct Running {
    pub addr: SocketAddr,
    /// The internal listener serving `/metrics` without a key (`http.metrics_listen`), if any.
    pub metrics_addr: Option<SocketAddr>,
    pub engine: Arc<Engine>,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    draining: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Fails `/readyz` for `http.drain_unready_ms` while still serving, then stops accepting,
    /// lets in-flight requests finish (bounded), stops background tasks.
    pub async fn shutdown(self) {
        let unready = ms(self.engine.cfg().http.drain_unready_ms);
        http::begin_draining(&self.draining, unready, "the listener closes").await;
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        self.engine.close().await;
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Starts booking-api on `cfg.http.listen` (port 0 picks a free one) with its background tasks.
pub async fn start(cfg: Config) -> Result<Running, Error> {
    let (listener, addr) = web::bind(cfg.http.listen).await?;
    let metrics = match cfg.http.metrics_listen {
        Some(at) => Some(web::bind(at).await?),
        None => None,
    };
    let metrics_addr = metrics.as_ref().map(|(_, a)| *a);
    let engine = Engine::start(cfg).await?;
    let (shutdown, rx) = watch::channel(false);
    let app = Arc::new(App {
        engine: engine.clone(),
        limits: Limits::new(&engine.cfg().limits),
        metrics: web::metrics_handle(),
        catalogue: crate::catalogue::CatalogueCache::new(std::time::Duration::from_millis(
            engine.cfg().drops.catalogue_refresh_ms,
        )),
        ops: crate::ops::OpsStreams::new(&engine, rx.clone()),
    });
    let draining = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(serve(
        listener,
        metrics.map(|(l, _)| l),
        app,
        draining.clone(),
        rx,
    ));
    tracing::info!(%addr, ?metrics_addr, "booking-api listening");
    Ok(Running {
        addr,
        metrics_addr,
        engine,
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
    let cfg = app.engine.cfg().http.clone();
    let mut background = app.engine.spawn_background(shutdown.clone());
    background.push(app.engine.spawn_drop_metrics(shutdown.clone()));
    background.push(
        app.engine
            .spawn_call_figures(app.ops.recent.clone(), shutdown.clone()),
    );
    let max = cfg
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let permits = Arc::new(Semaphore::new(max));
    let tidy = {
        let app = app.clone();
        let every = ms(app.engine.cfg().limits.tidy_interval_ms);
        http::every_until_shutdown(every, shutdown.clone(), move || app.limits.tidy())
    };
    let metrics = metrics.map(|l| {
        let engine = app.engine.clone();
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
    // Each connection is told to finish and close when shutdown begins; every one holds a permit
    // until it has, so all permits back means all drained.
    let (all_permits, conns_stop) = (permits.clone(), shutdown.clone());
    let limits = http::ConnLimits {
        header_read_timeout: ms(cfg.header_read_timeout_ms),
        max_buf_size: cfg.max_read_buffer_bytes,
    };
    http::accept_loop(listener, permits, shutdown, |stream, peer, permit| {
        let app = app.clone();
        let draining = draining.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            let draining = draining.load(Ordering::SeqCst);
            async move {
                Ok::<_, std::convert::Infallible>(handle(&app, req, peer, timeout, draining).await)
            }
        });
        // The ops console's stream is a WebSocket (crate::ops): the connection allows upgrades.
        http::spawn_connection(stream, service, limits, conns_stop.clone(), permit);
    })
    .await;
    tidy.abort();
    if let Some(m) = metrics {
        let _ = m.await;
    }
    let drained = tokio::time::timeout(
        ms(cfg.shutdown_grace_ms),
        all_permits.acquire_many(max as u32),
    )
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown grace period over with connections still open");
    }
    for t in background {
        let _ = t.await;
    }
}

async fn handle(
    app: &App,
    req: Request<Incoming>,
    peer: SocketAddr,
    timeout: Duration,
    draining: bool,
) -> Response<Body> {
    let origin = req.headers().get("origin").cloned();
    let mut resp = if draining && req.uri().path() == "/readyz" {
        http::draining_refusal()
    } else if req.method() == Method::OPTIONS {
        http::answer_within(timeout, async { (http::empty(204), "preflight") }).await
    } else {
        http::answer_within(timeout, app.handle(req, peer)).await
    };
    cors(&app.engine.cfg().http, origin, &mut resp);
    resp
}

/// Adds CORS headers when the request's Origin is on the allow-list (config `http.cors_allow_origins`).
fn cors(cfg: &HttpConfig, origin: Option<HeaderValue>, resp: &mut Response<Body>) {
    let Some(origin) = origin else { return };
    let allowed = &cfg.cors_allow_origins;
    let ok = origin
        .to_str()
        .is_ok_and(|o| allowed.iter().any(|a| a == o || a == "*"));
    if !ok {
        return;
    }
    let h = resp.headers_mut();
    h.insert("access-control-allow-origin", origin);
    h.insert("vary", HeaderValue::from_static("origin"));
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
    );
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static(
            "authorization, content-type, idempotency-key, x-admission-token, if-none-match",
        ),
    );
    h.insert(
        "access-control-expose-headers",
        HeaderValue::from_static("retry-after, etag"),
    );
    h.insert(
        "access-control-max-age",
        HeaderValue::from(cfg.cors_max_age_s),
    );
}
