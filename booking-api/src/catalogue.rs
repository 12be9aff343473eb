//! The public catalogue (`GET /v1/catalogue`, read by the front page at `/`), served from memory.
//! On a sale's day thousands of fans open `/` at once: each process reads the catalogue from
//! Postgres at most once per `drops.catalogue_refresh_ms` (one bounded query, see
//! `engine::db::Db::catalogue`) and answers every request between with the same bytes; while
//! one request reads, the others answer with the catalogue it replaces.

use std::time::{Duration, Instant};

use bytes::Bytes;
use engine::{Engine, Error};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;
use web::Body;

pub struct CatalogueCache {
    refresh: Duration,
    /// The last read and when it was made; locked only to look or swap, never across a read.
    last: std::sync::Mutex<Option<(Instant, Result<Bytes, Error>)>>,
    /// Held by the one request reading Postgres. Requests that find the catalogue stale meanwhile
    /// answer with the stale one; only those that find none at all wait for the read.
    reading: tokio::sync::Mutex<()>,
}

impl CatalogueCache {
    pub fn new(refresh: Duration) -> CatalogueCache {
        CatalogueCache {
            refresh,
            last: std::sync::Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    /// The catalogue as JSON, with `Cache-Control` for as long as this process keeps it.
    pub async fn answer(&self, engine: &Engine) -> Result<Response<Body>, Error> {
        let body = self.body(engine).await?;
        let mut resp = Response::new(Body::new(body));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // Browsers and shared caches may keep it as long as this process does.
        let max_age = self.refresh.as_secs();
        if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={max_age}")) {
            resp.headers_mut().insert(CACHE_CONTROL, v);
        }
        Ok(resp)
    }

    /// The last read if younger than the refresh interval, else a new one. A failed read is
    /// remembered for the interval too (a Postgres outage costs it one query per interval, not
    /// one per fan), and the last good catalogue is served meanwhile.
    async fn body(&self, engine: &Engine) -> Result<Bytes, Error> {
        if let Some(fresh) = self.fresh() {
            return fresh;
        }
        let _reading = match self.reading.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                if let Some(stale) = self.last_good() {
                    return Ok(stale);
                }
                self.reading.lock().await
            }
        };
        // Another request may have read it while this one waited.
        if let Some(fresh) = self.fresh() {
            return fresh;
        }
        let read = match engine.catalogue().await {
            Ok(c) => serde_json::to_vec(&c)
                .map(Bytes::from)
                .map_err(Error::internal),
            Err(e) => Err(e),
        };
        let body = match (read, self.last_good()) {
            (Err(e), Some(good)) => {
                tracing::warn!(error = %e, "catalogue read failed; serving the last one");
                Ok(good)
            }
            (read, _) => read,
        };
        *self.lock() = Some((Instant::now(), body.clone()));
        body
    }

    fn fresh(&self) -> Option<Result<Bytes, Error>> {
        match self.lock().as_ref() {
            Some((at, body)) if at.elapsed() < self.refresh => Some(body.clone()),
            _ => None,
        }
    }

    fn last_good(&self) -> Option<Bytes> {
        match self.lock().as_ref() {
            Some((_, Ok(body))) => Some(body.clone()),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Result<Bytes, Error>)>> {
        // A panic while holding it can only have happened between a look and a swap of a
        // complete value: what it holds is whole either way.
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}
