//! HTTP plumbing both servers share, kept out of the domain crate (`engine`): JSON answers, the
//! one place an [`engine::Error`] becomes a response (status, `{"error":{...}}`, `Retry-After`),
//! bounded body reads, headers, keyed rate limits, the process-wide metrics recorder, the accept
//! loop under a connection cap, one connection served until it ends or shutdown tells it to close,
//! draining (`/readyz` failing first), one request's handler under a timeout with its metrics,
//! periodic chores that stop at shutdown, and ([`process`]) logging and the shutdown signal.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::{Quota, RateLimiter};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use engine::{Code, Error};

pub mod process;

pub type Body = Full<Bytes>;

/// A JSON answer: anything the engine returns (a typed view) or a `serde_json::Value`.
pub fn json<T: serde::Serialize + ?Sized>(status: u16, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub fn empty(status: u16) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::NO_CONTENT);
    resp
}

pub fn bytes(content_type: &'static str, body: &'static [u8]) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

pub fn text(content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The error mapping: every refusal leaves through here.
pub fn error(e: &Error) -> Response<Body> {
    let mut resp = json(e.code.status(), &e.body());
    // Every 429 and 503 says when to retry, even one raised without a hint (e.g. a script's
    // `recovering`).
    let retry_after = e.retry_after.or_else(|| {
        matches!(e.code.status(), 429 | 503).then_some(std::time::Duration::from_secs(1))
    });
    if let Some(after) = retry_after {
        // Round up: a client told 1 s when 1.9 s are needed would come back too early.
        let secs = after.as_millis().div_ceil(1000).max(1);
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(RETRY_AFTER, v);
        }
    }
    resp
}

/// A handler's error as the response, counted in `floodgate_rejected_requests_total` by reason.
pub fn refusal(e: &Error) -> Response<Body> {
    if e.code.status() >= 400 {
        metrics::counter!(engine::metrics::REJECTED, "reason" => e.code.name()).increment(1);
    }
    error(e)
}

/// The methods a route table — (method, path pattern) pairs, a `{…}` segment matching any one —
/// has for a path's segments.
pub fn allowed_methods(routes: &[(&'static str, &str)], segments: &[&str]) -> Vec<&'static str> {
    routes
        .iter()
        .filter(|(_, pattern)| {
            let parts: Vec<&str> = pattern.trim_matches('/').split('/').collect();
            parts.len() == segments.len()
                && parts
                    .iter()
                    .zip(segments)
                    .all(|(p, s)| p.starts_with('{') || p == s)
        })
        .map(|(method, _)| *method)
        .collect()
}

/// Gives a 405 answer the `Allow` header it must carry (RFC 9110 §15.5.6): the methods `routes`
/// has for the path. Other answers are left alone.
pub fn allow(resp: &mut Response<Body>, routes: &[(&'static str, &str)], segments: &[&str]) {
    if resp.status() != StatusCode::METHOD_NOT_ALLOWED {
        return;
    }
    let methods = allowed_methods(routes, segments).join(", ");
    if let Ok(v) = HeaderValue::from_str(&methods) {
        resp.headers_mut().insert(hyper::header::ALLOW, v);
    }
}

/// Reads the whole body, refusing more than `http.max_body_bytes` with 413 `body_too_large`
/// (checked from Content-Length first, so an honest large upload isn't kept). A refused body is
/// still read to its end and dropped — up to `http.refused_body_drain_bytes`, for at most
/// `http.refused_body_drain_ms` — before the 413 goes out: hyper closes a connection whose
/// request body was left unread, the kernel answers the bytes still arriving with a reset, and
/// a client still writing its body then sees a broken pipe or a reset rather than the answer.
pub async fn read_body(
    req: Request<Incoming>,
    cfg: &engine::config::HttpConfig,
) -> Result<Bytes, Error> {
    let max = cfg.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A client that asked before sending (`Expect: 100-continue`) sends nothing until the body
    // is read: reading it would only ask for the upload the 413 refuses.
    let waits_to_send = req
        .headers()
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut body = req.into_body();
    let drain = engine::config::ms(cfg.refused_body_drain_ms);
    if let Some(declared) = declared.filter(|n| *n > max as u64) {
        // One that can't be read within the bound isn't started: the reset comes either way.
        if !waits_to_send && declared <= cfg.refused_body_drain_bytes {
            drain_refused(&mut body, declared, drain).await;
        }
        return Err(Error::new(Code::BodyTooLarge));
    }
    match Limited::new(&mut body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            // Past `max` while reading (no length declared): what is left of the bound.
            let left = cfg.refused_body_drain_bytes.saturating_sub(max as u64);
            drain_refused(&mut body, left, drain).await;
            Err(Error::new(Code::BodyTooLarge))
        }
        Err(e) => Err(Error::invalid(format!("could not read the body: {e}"))),
    }
}

/// Reads and drops at most `max_bytes` more of a refused body, for at most `within`; stops at
/// the body's end, a read error, or either bound (what is left then stays unread).
async fn drain_refused(body: &mut Incoming, max_bytes: u64, within: Duration) {
    let mut read = 0u64;
    let _ = tokio::time::timeout(within, async {
        while read < max_bytes {
            match body.frame().await {
                Some(Ok(frame)) => {
                    read += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
}

/// A header's value as text, if present and valid.
pub fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The client's address for per-IP limits: the peer, or what trusted proxies say it is
/// ([`engine::net::client_ip`]). Several `X-Forwarded-For` headers count as one list, in order.
pub fn client_ip(
    req: &Request<Incoming>,
    peer: std::net::IpAddr,
    trusted: &[engine::net::Cidr],
) -> std::net::IpAddr {
    if trusted.is_empty() {
        return peer;
    }
    let values: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let joined = (!values.is_empty()).then(|| values.join(","));
    engine::net::client_ip(peer, joined.as_deref(), trusted)
}

/// The bearer token of `Authorization`, if any.
pub fn bearer(req: &Request<Incoming>) -> Option<&str> {
    header(req, "authorization").and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    })
}

/// One query parameter's value (no percent-decoding needed for the ids we read).
pub fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}

/// A keyed rate limiter (governor's GCRA) that remembers at most `max_keys` keys, so an address
/// scan can't grow memory without bound. Past the bound it forgets the keys nearest a full bucket
/// first (the idle ones, whose state a fresh bucket equals), a few at a time: a scan of new keys
/// pushes out other scanners and idle clients, never a client it is limiting, and never every
/// bucket at once (starting over whole would hand a flooder a fresh burst each time).
pub struct KeyedLimit<K: std::hash::Hash + Eq + Clone> {
    limiter: RateLimiter<K, BoundedStore<K>, DefaultClock>,
}

impl<K: std::hash::Hash + Eq + Clone> KeyedLimit<K> {
    pub fn new(per_s: u32, burst: u32, max_keys: usize) -> Self {
        let nz = |v: u32| NonZeroU32::new(v.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(nz(per_s)).allow_burst(nz(burst));
        KeyedLimit {
            limiter: RateLimiter::new(quota, BoundedStore::new(max_keys), DefaultClock::default()),
        }
    }

    /// 429 `rate_limited`, with the wait, when `key` is past its quota.
    pub fn check(&self, key: &K) -> Result<(), Error> {
        self.limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Error::new(Code::RateLimited).retry_after(wait.max(Duration::from_secs(1)))
        })
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }

    /// Forgets every idle key (one whose bucket has refilled); servers call it every
    /// `limits.tidy_interval_ms`.
    pub fn tidy(&self) {
        self.limiter.retain_recent();
    }
}

impl KeyedLimit<std::net::IpAddr> {
    /// The per-address check: IPv6 clients by their /64 ([`ip_key`]).
    pub fn check_ip(&self, ip: std::net::IpAddr) -> Result<(), Error> {
        self.check(&ip_key(ip))
    }
}

/// The key a client address is limited by: an IPv4 address (or an IPv4-mapped IPv6 one) as is,
/// an IPv6 address by its /64 — one subscriber's whole allocation, since a host picks any of
/// its 2^64 addresses at will (privacy addresses), which would otherwise make a fresh bucket
/// per request.
pub fn ip_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            std::net::IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into())
        }
        v4 => v4,
    }
}

/// Shards of a [`BoundedStore`]: enough that concurrent checks rarely wait on one lock.
const LIMITER_SHARDS: usize = 16;

/// governor's state per key (the GCRA's theoretical arrival time, in nanoseconds since the
/// limiter started), in locked shards that each hold at most their share of `max_keys`.
struct BoundedStore<K> {
    shards: Box<[Mutex<HashMap<K, u64>>]>,
    per_shard: usize,
    hasher: std::hash::RandomState,
}

impl<K: std::hash::Hash + Eq + Clone> BoundedStore<K> {
    fn new(max_keys: usize) -> Self {
        BoundedStore {
            shards: (0..LIMITER_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            per_shard: (max_keys / LIMITER_SHARDS).max(1),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn shard(&self, key: &K) -> std::sync::MutexGuard<'_, HashMap<K, u64>> {
        use std::hash::BuildHasher;
        let i = (self.hasher.hash_one(key) % LIMITER_SHARDS as u64) as usize;
        // A panic under this lock leaves a map of plain numbers: still usable.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes room in a full shard: forgets the eighth of its keys with the earliest arrival times
    /// (idle keys first; then those with the most of their burst left). A scan pays for this once
    /// per eighth of a shard, so a check costs O(1) on average.
    fn evict(map: &mut HashMap<K, u64>) {
        let mut times: Vec<u64> = map.values().copied().collect();
        let k = (times.len() / 8).min(times.len().saturating_sub(1));
        let (_, &mut cut, _) = times.select_nth_unstable(k);
        let below = map.values().filter(|&&t| t < cut).count();
        let mut at_cut = k + 1 - below.min(k + 1);
        map.retain(|_, t| {
            if *t < cut {
                false
            } else if *t == cut && at_cut > 0 {
                at_cut -= 1;
                false
            } else {
                true
            }
        });
    }
}

impl<K: std::hash::Hash + Eq + Clone> governor::state::StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut map = self.shard(key);
        let prev = map.get(key).copied();
        // governor's own stores read 0 as "no state yet" too.
        let (outcome, next) = f(prev.filter(|&t| t > 0).map(Nanos::new))?;
        if prev.is_none() && map.len() >= self.per_shard {
            Self::evict(&mut map);
        }
        map.insert(key.clone(), next.as_u64());
        Ok(outcome)
    }
}

impl<K: std::hash::Hash + Eq + Clone> governor::state::keyed::ShrinkableKeyedStateStore<K>
    for BoundedStore<K>
{
    fn retain_recent(&self, drop_below: Nanos) {
        for shard in self.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, t| *t > drop_below.as_u64());
            map.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The process-wide metrics recorder (one per process, however many servers a test starts).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .and_then(|b| b.install_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle())
        })
        .clone()
}

/// `/metrics`: the process's Prometheus text.
pub fn metrics_page(handle: &PrometheusHandle) -> Response<Body> {
    metrics_page_with(handle, "")
}

/// `/metrics`: the process's Prometheus text, then `extra` (booking-api's per-drop gauges,
/// engine::drop_metrics, which the exporter's registry doesn't hold).
pub fn metrics_page_with(handle: &PrometheusHandle, extra: &str) -> Response<Body> {
    let mut page = handle.render();
    page.push_str(extra);
    text("text/plain; version=0.0.4", page)
}

/// What an internal metrics listener appends to each page ([`serve_metrics_with`]).
pub type MetricsExtra = Arc<dyn Fn() -> String + Send + Sync>;

/// The internal metrics listener (`http.metrics_listen`, `queue.metrics_listen`): `GET /metrics`
/// without a key, 404 `not_found` for anything else, until `shutdown`. Its connections count
/// against the server's connection cap (`permits`), and their heads against `header_read_timeout`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    permits: Arc<tokio::sync::Semaphore>,
    header_read_timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let none: MetricsExtra = Arc::new(String::new);
    serve_metrics_with(
        listener,
        handle,
        none,
        permits,
        header_read_timeout,
        shutdown,
    )
    .await
}

/// [`serve_metrics`], each page ending with what `extra` says at the time.
pub async fn serve_metrics_with(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    extra: MetricsExtra,
    permits: Arc<tokio::sync::Semaphore>,
    header_read_timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let stop = shutdown.clone();
    accept_loop(listener, permits, shutdown, |stream, _peer, permit| {
        let handle = handle.clone();
        let extra = extra.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let resp = if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
                metrics_page_with(&handle, &extra())
            } else {
                error(&Error::new(Code::NotFound))
            };
            async move { Ok::<_, std::convert::Infallible>(resp) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            }
            drop(permit);
        });
    })
    .await;
}

/// How a server reads its HTTP/1.1 connections (config `http.*` and `queue.*`).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A client must have sent a request's headers within this long.
    pub header_read_timeout: Duration,
    /// The most a connection's read buffer may grow to.
    pub max_buf_size: usize,
}

/// Serves one accepted API connection (HTTP/1.1, upgrades allowed: the WebSockets) on a task of
/// its own, counted in `floodgate_http_connections` and holding `permit` — the connection cap —
/// until it ends. When `shutdown` fires it is told to finish the request in hand and close
/// (hyper-util's GracefulShutdown can't watch a connection with upgrades, hence the select). A
/// permit shared with the requests (`Arc`, as queue-server's WebSockets take one) returns only
/// once the upgraded socket has ended too.
pub fn spawn_connection<S, P>(
    stream: tokio::net::TcpStream,
    service: S,
    limits: ConnLimits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    permit: P,
) where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    P: Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_buf_size)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .with_upgrades();
    metrics::gauge!(engine::metrics::HTTP_CONNECTIONS).increment(1.0);
    tokio::spawn(async move {
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
        metrics::gauge!(engine::metrics::HTTP_CONNECTIONS).decrement(1.0);
        drop(permit);
    });
}

/// `/readyz`'s answer while a server shuts down: 503, so a load balancer stops sending requests
/// (and new sockets) here before the listener closes.
pub fn draining_refusal() -> Response<Body> {
    refusal(&Error::msg(
        Code::Unavailable,
        "draining: this instance is shutting down; another serves",
    ))
}

/// Shutdown's first step: `/readyz` fails from now on (`draining` set) while the server goes on
/// serving for `unready`, so a load balancer's health checks take it out of rotation before
/// `next` (closing the listener, or the sockets) happens.
pub async fn begin_draining(
    draining: &std::sync::atomic::AtomicBool,
    unready: Duration,
    next: &'static str,
) {
    draining.store(true, std::sync::atomic::Ordering::SeqCst);
    if !unready.is_zero() {
        tracing::info!(?unready, "draining: /readyz fails before {next}");
        tokio::time::sleep(unready).await;
    }
}

/// Binds a listener for `at` (port 0 picks a free one): the listener and its address.
pub async fn bind(
    at: std::net::SocketAddr,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), Error> {
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .map_err(|e| Error::msg(Code::Internal, format!("cannot listen on {at}: {e}")))?;
    let addr = listener.local_addr().map_err(Error::internal)?;
    Ok((listener, addr))
}

/// The servers' accept loop: until `shutdown`, takes a permit from `permits` (the connection
/// cap: past it, new connections wait in the listen backlog), accepts, sets TCP_NODELAY and
/// hands the connection to `serve` with its permit, which it holds for the connection's life.
/// A failed accept (out of files, most likely) waits 50 ms rather than spin.
pub async fn accept_loop<F>(
    listener: tokio::net::TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut serve: F,
) where
    F: FnMut(tokio::net::TcpStream, std::net::SocketAddr, tokio::sync::OwnedSemaphorePermit),
{
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        serve(stream, peer, permit);
    }
}

/// Runs `f` every `period` until `shutdown` (e.g. dropping idle rate-limit keys).
pub fn every_until_shutdown<F>(
    period: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut f: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = tick.tick() => f(),
                _ = shutdown.changed() => return,
            }
        }
    })
}

/// Runs one request's `handler` (which answers with the route's metric label) within `timeout`
/// — past it, 503 `unavailable` with `Retry-After` — and counts the answer by route and status,
/// with its latency.
pub async fn answer_within<F>(timeout: Duration, handler: F) -> Response<Body>
where
    F: std::future::Future<Output = (Response<Body>, &'static str)>,
{
    let started = std::time::Instant::now();
    let (resp, route) = match tokio::time::timeout(timeout, handler).await {
        Ok(r) => r,
        Err(_) => (
            error(
                &Error::msg(Code::Unavailable, "The request took too long.")
                    .retry_after(Duration::from_secs(1)),
            ),
            "timeout",
        ),
    };
    let status = resp.status().as_u16().to_string();
    metrics::counter!(engine::metrics::HTTP_REQUESTS, "route" => route, "status" => status)
        .increment(1);
    metrics::histogram!(engine::metrics::HTTP_REQUEST_SECONDS, "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// Parses a JSON body: syntax errors are 400 `malformed_json`, wrong shapes 422 `invalid_request`.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    let malformed = |e: serde_json::Error| {
        Error::msg(
            Code::MalformedJson,
            format!("The body is not valid JSON: {e}"),
        )
    };
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Syntax
        | serde_json::error::Category::Eof
        | serde_json::error::Category::Io => malformed(e),
        // serde stops at the first error, so a wrong field early in a body that is cut short
        // later would pass for a shape error: check the syntax of the whole body first.
        serde_json::error::Category::Data => {
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Err(syntax) => malformed(syntax),
                Ok(_) => Error::invalid(e.to_string()),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scan of new keys (an attacker cycling addresses) fills the limiter past `max_keys`: a
    /// key that was already limited stays limited, whatever the limiter forgets to make room.
    #[test]
    fn a_key_scan_does_not_reset_a_limited_key() {
        let limit = KeyedLimit::new(1, 3, 64);
        for _ in 0..3 {
            limit.check(&u32::MAX).unwrap();
        }
        assert!(limit.check(&u32::MAX).is_err(), "past its burst");
        for k in 0..10_000u32 {
            let _ = limit.check(&k);
        }
        limit.tidy();
        let refused = limit
            .check(&u32::MAX)
            .expect_err("still limited after the scan");
        assert_eq!(refused.code, Code::RateLimited);
    }

    #[test]
    fn ipv6_is_keyed_by_its_64_and_ipv4_by_address() {
        let key = |s: &str| ip_key(s.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:1:2:abcd::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::ffff"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(key("198.51.100.7"), "198.51.100.7");
        assert_eq!(key("::ffff:198.51.100.7"), "198.51.100.7");
    }

    /// However many keys arrive between two `tidy` calls, the limiter remembers at most
    /// `max_keys` of them.
    #[test]
    fn a_key_scan_stays_within_max_keys() {
        let limit = KeyedLimit::new(1, 3, 64);
        for k in 0..10_000u32 {
            let _ = limit.check(&k);
            assert!(limit.len() <= 64, "{} keys after {k}", limit.len());
        }
    }
}
