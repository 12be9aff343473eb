//! The public catalogue (`GET /v1/catalogue`, read by the front page at `/`), served from memory.
//! On a sale's day thousands of fans open `/` at once: each process reads the catalogue from
//! Postgres at most once per `drops.catalogue_refresh_ms` (one bounded query, see
//! `engine::db::Db::catalogue`) and answers every request between with the same bytes.

use std::time::{Duration, Instant};

use bytes::Bytes;
use engine::{Engine, Error};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;
use tokio::sync::Mutex;
use web::Body;

pub struct CatalogueCache {
    refresh: Duration,
    /// The last read and when it was made. Held across a read, so requests that find it stale
    /// together wait for one read instead of each making their own.
    last: Mutex<Option<(Instant, Result<Bytes, Error>)>>,
}

impl CatalogueCache {
    pub fn new(refresh: Duration) -> CatalogueCache {
        CatalogueCache {
            refresh,
            last: Mutex::new(None),
        }
    }

    /// The catalogue as JSON: the last read if younger than the refresh interval, else a new
    /// one. A failed read is remembered for the interval too (a Postgres outage costs it one
    /// query per interval, not one per fan), and the last good catalogue is served meanwhile.
    pub async fn answer(&self, engine: &Engine) -> Result<Response<Body>, Error> {
        let mut last = self.last.lock().await;
        let body = match last.as_ref() {
            Some((at, body)) if at.elapsed() < self.refresh => body.clone(),
            _ => {
                let fresh = match engine.catalogue().await {
                    Ok(c) => serde_json::to_vec(&c)
                        .map(Bytes::from)
                        .map_err(Error::internal),
                    Err(e) => Err(e),
                };
                let body = match (fresh, last.take()) {
                    (Err(e), Some((_, Ok(good)))) => {
                        tracing::warn!(error = %e, "catalogue read failed; serving the last one");
                        Ok(good)
                    }
                    (fresh, _) => fresh,
                };
                *last = Some((Instant::now(), body.clone()));
                body
            }
        }?;
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
}
