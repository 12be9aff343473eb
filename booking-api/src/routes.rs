//! The route table. Each handler authenticates, parses its ids (a malformed id is the same 404 as
//! an unknown one), and calls the engine; errors are mapped in [`web::refusal`].

use std::net::SocketAddr;
use std::sync::Arc;

use engine::booking::{
    AddStock, AdmissionUpdate, CancelDrop, ConfirmBody, Made, OrderCursor, OrderSearch,
    RefundRequest,
};
use engine::db::{ApiKey, Scope};
use engine::drops::{CreateDrop, HoldRequestBody};
use engine::ids::{DropId, FanId, HoldId, IdempotencyKey, OrderId};
use engine::ops_figures::Call;
use engine::tokens::sha256_hex;
use engine::{Code, Engine, Error};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use serde::Deserialize;
use serde_json::json;

use crate::catalogue::CatalogueCache;
use crate::limits::Limits;
use crate::pages;
use web::{self as http, bearer, header, parse_json, query_param, read_body, Body};

pub struct App {
    pub engine: Arc<Engine>,
    pub limits: Limits,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The public catalogue behind the front page, read from Postgres once per interval.
    pub catalogue: CatalogueCache,
    /// The ops console's live streams and this process's reserve and confirm figures.
    pub ops: crate::ops::OpsStreams,
}

/// Whether an answer counts as a failed call in the ops console's error rates: a server-side
/// failure (5xx), not an expected refusal such as `sold_out`.
fn failed<T>(r: &Result<T, Error>) -> bool {
    r.as_ref().is_err_and(|e| e.code.status() >= 500)
}

/// Whether a reserve's or confirm's answer counts in the ops figures: not when the engine didn't
/// know the drop (or the hold), so junk ids take none of `http.ops_recent_max_drops`' places in
/// a window (crowding out the real drops) and cost no Redis writes.
fn counts<T>(r: &Result<T, Error>) -> bool {
    !r.as_ref()
        .is_err_and(|e| matches!(e.code, Code::UnknownDrop | Code::UnknownHold))
}

type Answer = Result<Response<Body>, Error>;

/// 200 with the engine's answer as JSON.
fn ok<T: serde::Serialize>(body: T) -> Answer {
    Ok(http::json(200, &body))
}

/// 201 with what the request made.
fn created<T: serde::Serialize>(body: T) -> Answer {
    Ok(http::json(201, &body))
}

/// A seat map with its version as `ETag`, or 304 without a body when the client's
/// `If-None-Match` names that version. `no-cache`: a browser may keep it but must ask again each
/// time, so a poll always learns of a change.
fn seat_map_answer(req: &Request<Incoming>, seats: &engine::booking::SeatsView) -> Response<Body> {
    let etag = format!("\"{}\"", seats.version());
    let unchanged = header(req, "if-none-match").is_some_and(|v| {
        v.split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == etag || t == "*")
    });
    let mut resp = if unchanged {
        http::empty(304)
    } else {
        http::text("application/json", seats.json())
    };
    if let Ok(v) = hyper::header::HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(hyper::header::ETAG, v);
    }
    resp.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    resp
}

impl App {
    /// Routes one request. `route` is the metric label: the path pattern, never the raw path.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> (Response<Body>, &'static str) {
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        let (route, result): (&'static str, Answer) = match (&method, segments.as_slice()) {
            (&Method::GET, ["healthz"]) => ("/healthz", ok(json!({"status": "ok"}))),
            // Readiness asks Redis and Postgres, and metrics check a key in Postgres: the per-IP
            // limit comes first, as for the API.
            (&Method::GET, ["readyz"]) => (
                "/readyz",
                match self.check_ip(&req, peer) {
                    Ok(()) => self.readyz().await,
                    Err(e) => Err(e),
                },
            ),
            (&Method::GET, ["metrics"]) => (
                "/metrics",
                match self.check_ip(&req, peer) {
                    Ok(()) => self.metrics(&req).await,
                    Err(e) => Err(e),
                },
            ),
            (&Method::GET, [""]) => ("/", Ok(pages::front_page())),
            (&Method::GET, ["drops", _]) => ("/drops/{id}", Ok(pages::booking_page())),
            (&Method::GET, ["seller"]) => ("/seller", Ok(pages::seller_page())),
            (&Method::GET, ["ops"]) => ("/ops", Ok(pages::ops_page())),
            (&Method::GET, ["static", name]) => (
                "/static/{name}",
                pages::asset(name).ok_or_else(|| Error::new(Code::NotFound)),
            ),
            _ => {
                let limited = self.check_ip(&req, peer);
                let route = api_route(&method, &segments);
                let result = match limited {
                    Err(e) => Err(e),
                    Ok(()) => self.api(req, &method, &segments).await,
                };
                (route, result)
            }
        };
        let mut resp = result.unwrap_or_else(|e| http::refusal(&e));
        http::allow(&mut resp, ROUTES, &segments);
        (resp, route)
    }

    /// The per-IP limit (IPv6 by /64), before any key, token, id or store is looked at.
    fn check_ip(&self, req: &Request<Incoming>, peer: SocketAddr) -> Result<(), Error> {
        let trusted = &self.engine.cfg().limits.trusted_proxies;
        self.limits
            .check_ip(http::client_ip(req, peer.ip(), trusted))
    }

    /// Prometheus text, for an ops key only: the public listener doesn't tell the world its
    /// traffic (`http.metrics_listen` serves it without a key, privately).
    async fn metrics(&self, req: &Request<Incoming>) -> Answer {
        self.key(req, Scope::Ops).await?;
        Ok(http::metrics_page_with(
            &self.metrics,
            &self.engine.drop_gauges_text(),
        ))
    }

    async fn readyz(&self) -> Answer {
        match self.engine.ready().await {
            Ok(()) => ok(json!({"status": "ready"})),
            Err(e) => Err(e),
        }
    }

    async fn api(&self, req: Request<Incoming>, method: &Method, seg: &[&str]) -> Answer {
        let e = &self.engine;
        match (method, seg) {
            (&Method::POST, ["v1", "fans", "session"]) => self.fan_session(req).await,
            (&Method::POST, ["v1", "drops"]) => {
                let seller = self.key(&req, Scope::Seller).await?;
                let body: CreateDrop = parse_json(&self.body(req).await?)?;
                created(e.create_drop(&seller, body).await?)
            }
            (&Method::GET, ["v1", "drops"]) => {
                let seller = self.key(&req, Scope::Seller).await?;
                ok(e.list_drops(&seller).await?)
            }
            (&Method::GET, ["v1", "catalogue"]) => self.catalogue.answer(e).await,
            (&Method::GET, ["v1", "drops", id]) => ok(e.drop_view(&drop_id(id)?).await?),
            (&Method::GET, ["v1", "drops", id, "seats"]) => {
                let seats = e.seats_view(&drop_id(id)?).await?;
                Ok(seat_map_answer(&req, &seats))
            }
            (&Method::POST, ["v1", "drops", id, "close"]) => {
                let seller = self.key(&req, Scope::Seller).await?;
                ok(e.close_drop(&seller, &drop_id(id)?).await?)
            }
            (&Method::POST, ["v1", "drops", id, "cancel"]) => {
                let key = self.any_key(&req).await?;
                let drop = drop_id(id)?;
                let body: CancelDrop = parse_json(&self.body(req).await?)?;
                // 202 either way: the job refunds the orders after the answer.
                let job = match e.cancel_drop(&key, &drop, body).await? {
                    Made::New(job) | Made::Existing(job) => job,
                };
                Ok(http::json(202, &job))
            }
            (&Method::GET, ["v1", "drops", id, "cancellation"]) => {
                let key = self.any_key(&req).await?;
                ok(e.cancellation(&key, &drop_id(id)?).await?)
            }
            (&Method::POST, ["v1", "drops", id, "skus", sku, "stock"]) => {
                let seller = self.key(&req, Scope::Seller).await?;
                let drop = drop_id(id)?;
                let body: AddStock = parse_json(&self.body(req).await?)?;
                ok(e.add_stock(&seller, &drop, sku, body).await?)
            }
            (&Method::GET, ["v1", "drops", id, "audit"]) => {
                let key = self.any_key(&req).await?;
                let drop = drop_id(id)?;
                let before = query_param(&req, "before")
                    .map(|v| {
                        v.parse::<i64>()
                            .map_err(|_| Error::invalid("before must be an entry_id"))
                    })
                    .transpose()?;
                let limit = query_param(&req, "limit")
                    .map(|v| {
                        v.parse::<u32>()
                            .map_err(|_| Error::invalid("limit must be a whole number"))
                    })
                    .transpose()?;
                ok(e.drop_audit(&key, &drop, before, limit).await?)
            }
            (&Method::GET, ["v1", "drops", id, "orders"]) => {
                let key = self.any_key(&req).await?;
                let drop = drop_id(id)?;
                ok(e.drop_orders(&key, &drop, &order_search(&req)?).await?)
            }
            (&Method::GET, ["v1", "drops", id, "orders.csv"]) => {
                let key = self.any_key(&req).await?;
                let drop = drop_id(id)?;
                let csv = e.drop_orders_csv(&key, &drop, &order_search(&req)?).await?;
                Ok(csv_answer(&drop, csv))
            }
            (&Method::GET, ["v1", "drops", id, "admission"]) => {
                self.key(&req, Scope::Ops).await?;
                let drop = drop_id(id)?;
                let s = e.admission_settings(&drop).await?;
                ok(json!({"drop_id": drop, "admission": s}))
            }
            (&Method::GET, ["v1", "ops", "ws"]) => self.ops.open(e, req),
            (&Method::PUT, ["v1", "drops", id, "admission"]) => {
                let ops = self.key(&req, Scope::Ops).await?;
                let drop = drop_id(id)?;
                let update: AdmissionUpdate = parse_json(&self.body(req).await?)?;
                ok(e.set_admission(&ops, &drop, update).await?)
            }
            (&Method::POST, ["v1", "drops", id, "holds"]) => {
                let fan = self.fan(&req)?;
                let drop = drop_id(id)?;
                let key = header(&req, "idempotency-key")
                    .ok_or_else(|| Error::invalid("the Idempotency-Key header is required"))?;
                let key = IdempotencyKey::parse(key).map_err(|e| Error::invalid(e.0))?;
                let token = header(&req, "x-admission-token").map(str::to_owned);
                let raw = self.body(req).await?;
                let body: HoldRequestBody = parse_json(&raw)?;
                let body_sha256 = sha256_hex(&raw);
                let started = std::time::Instant::now();
                let held = e
                    .reserve(&fan, &drop, &key, token.as_deref(), body, &body_sha256)
                    .await;
                let took = started.elapsed();
                if counts(&held) {
                    self.ops
                        .recent
                        .record(&drop, Call::Reserve, took, failed(&held));
                }
                created(held?)
            }
            (&Method::GET, ["v1", "fans", "me", "holds"]) => {
                let fan = self.fan(&req)?;
                let drop = query_param(&req, "drop_id").map(drop_id).transpose()?;
                ok(e.fan_holds(&fan, drop.as_ref()).await?)
            }
            (&Method::GET, ["v1", "fans", "me", "orders"]) => {
                let fan = self.fan(&req)?;
                let drop = query_param(&req, "drop_id").map(drop_id).transpose()?;
                ok(e.fan_orders(&fan, drop.as_ref()).await?)
            }
            (&Method::GET, ["v1", "holds", id]) => {
                let fan = self.fan(&req)?;
                ok(e.hold(&fan, &hold_id(id)?).await?)
            }
            (&Method::DELETE, ["v1", "holds", id]) => {
                let fan = self.fan(&req)?;
                e.release(&fan, &hold_id(id)?).await?;
                Ok(http::empty(204))
            }
            (&Method::POST, ["v1", "holds", id, "confirm"]) => {
                let fan = self.fan(&req)?;
                let hold = hold_id(id)?;
                let ConfirmBody { payment } = parse_json(&self.body(req).await?)?;
                let started = std::time::Instant::now();
                let confirmed = e.confirm(&fan, &hold, payment).await;
                let took = started.elapsed();
                if counts(&confirmed) {
                    self.ops.recent.record(
                        &hold.drop_id(),
                        Call::Confirm,
                        took,
                        failed(&confirmed),
                    );
                }
                match confirmed? {
                    Made::New(order) => created(order),
                    Made::Existing(order) => ok(order),
                }
            }
            (&Method::GET, ["v1", "orders", id]) => {
                let order = OrderId::parse(id).map_err(|_| Error::new(Code::UnknownOrder))?;
                if bearer(&req).is_some_and(|t| t.starts_with("fgk_")) {
                    let seller = self.key(&req, Scope::Seller).await?;
                    ok(e.order_for_seller(&seller, order).await?)
                } else {
                    let fan = self.fan(&req)?;
                    ok(e.order_for_fan(&fan, order).await?)
                }
            }
            (&Method::POST, ["v1", "orders", id, "refunds"]) => {
                let key = self.any_key(&req).await?;
                let order = OrderId::parse(id).map_err(|_| Error::new(Code::UnknownOrder))?;
                let body: RefundRequest = parse_json(&self.body(req).await?)?;
                match e.refund(&key, order, body).await? {
                    Made::New(refund) => created(refund),
                    Made::Existing(refund) => ok(refund),
                }
            }
            (&Method::GET, ["v1", "orders", id, "refunds"]) => {
                let key = self.any_key(&req).await?;
                let order = OrderId::parse(id).map_err(|_| Error::new(Code::UnknownOrder))?;
                ok(e.order_refunds(&key, order).await?)
            }
            _ if api_route(method, seg) != "unknown" => Err(Error::new(Code::MethodNotAllowed)),
            _ => Err(Error::new(Code::NotFound)),
        }
    }

    async fn body(&self, req: Request<Incoming>) -> Result<bytes::Bytes, Error> {
        read_body(req, &self.engine.cfg().http).await
    }

    /// The signed-in fan, rate-limited per fan.
    fn fan(&self, req: &Request<Incoming>) -> Result<FanId, Error> {
        let token = bearer(req).ok_or_else(|| {
            Error::msg(
                Code::Unauthorized,
                "Send `Authorization: Bearer <fan_token>`.",
            )
        })?;
        let fan = self.engine.fans().verify(token)?;
        self.limits.check_fan(fan.as_str())?;
        Ok(fan)
    }

    /// An API key with the given scope (401 if missing or unknown, 403 if another scope).
    async fn key(&self, req: &Request<Incoming>, scope: Scope) -> Result<ApiKey, Error> {
        let token = bearer(req).ok_or_else(|| {
            Error::msg(
                Code::Unauthorized,
                "Send `Authorization: Bearer <api key>`.",
            )
        })?;
        self.engine.api_key(token, scope).await
    }

    /// An API key of either scope: reads both sellers and ops may make.
    async fn any_key(&self, req: &Request<Incoming>) -> Result<ApiKey, Error> {
        let token = bearer(req).ok_or_else(|| {
            Error::msg(
                Code::Unauthorized,
                "Send `Authorization: Bearer <api key>`.",
            )
        })?;
        self.engine.any_api_key(token).await
    }

    async fn fan_session(&self, req: Request<Incoming>) -> Answer {
        if !self.engine.fans().dev_enabled() {
            return Err(Error::msg(
                Code::NotFound,
                "The development identity provider is off.",
            ));
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Session {
            fan: FanId,
        }
        let Session { fan } = parse_json(&self.body(req).await?)?;
        let token = self.engine.fans().issue_dev(&fan)?;
        created(json!({"fan": fan, "fan_token": token}))
    }
}

/// The search of `GET /v1/drops/{id}/orders` (and `.csv`): `fan`, `order_id`, `cursor`, `limit`,
/// each optional, each refused (422) when it doesn't parse. Values are percent-decoded; a `+`
/// stays a `+` (fan ids may hold one, never a space).
fn order_search(req: &Request<Incoming>) -> Result<OrderSearch, Error> {
    let param = |name: &str| -> Result<Option<String>, Error> {
        query_param(req, name)
            .map(|v| {
                percent_decode(v)
                    .ok_or_else(|| Error::invalid(format!("{name} is not percent-encoded UTF-8")))
            })
            .transpose()
    };
    Ok(OrderSearch {
        fan: param("fan")?
            .map(|v| FanId::parse(&v).map_err(|e| Error::invalid(format!("fan: {}", e.0))))
            .transpose()?,
        order_id: param("order_id")?
            .map(|v| {
                OrderId::parse(&v)
                    .map_err(|_| Error::invalid("order_id must be an order id (a UUID)"))
            })
            .transpose()?,
        cursor: param("cursor")?
            .map(|v| OrderCursor::parse(&v))
            .transpose()?,
        limit: param("limit")?
            .map(|v| {
                v.parse::<u32>()
                    .map_err(|_| Error::invalid("limit must be a whole number"))
            })
            .transpose()?,
    })
}

/// `%XX` decoded; `None` for a bad escape or bytes that aren't UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The CSV export as a download (`orders-<drop>.csv`), never cached by a browser or proxy.
fn csv_answer(drop: &DropId, csv: String) -> Response<Body> {
    let mut resp = http::text("text/csv; charset=utf-8", csv);
    let disposition = format!("attachment; filename=\"orders-{drop}.csv\"");
    if let Ok(v) = hyper::header::HeaderValue::from_str(&disposition) {
        resp.headers_mut()
            .insert(hyper::header::CONTENT_DISPOSITION, v);
    }
    resp.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

fn drop_id(s: &str) -> Result<DropId, Error> {
    DropId::parse(s).map_err(|_| Error::new(Code::UnknownDrop))
}

fn hold_id(s: &str) -> Result<HoldId, Error> {
    HoldId::parse(s).map_err(|_| Error::new(Code::UnknownHold))
}

/// Every route booking-api answers, as (method, path pattern); the patterns are its metric
/// labels. docs/openapi.yaml describes each one and no other (queue-server/tests/openapi.rs).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/drops/{id}"),
    ("GET", "/seller"),
    ("GET", "/ops"),
    ("GET", "/static/{name}"),
    ("POST", "/v1/fans/session"),
    ("GET", "/v1/ops/ws"),
    ("GET", "/v1/catalogue"),
    ("POST", "/v1/drops"),
    ("GET", "/v1/drops"),
    ("GET", "/v1/drops/{id}"),
    ("GET", "/v1/drops/{id}/seats"),
    ("POST", "/v1/drops/{id}/close"),
    ("POST", "/v1/drops/{id}/cancel"),
    ("GET", "/v1/drops/{id}/cancellation"),
    ("GET", "/v1/drops/{id}/admission"),
    ("PUT", "/v1/drops/{id}/admission"),
    ("GET", "/v1/drops/{id}/audit"),
    ("GET", "/v1/drops/{id}/orders"),
    ("GET", "/v1/drops/{id}/orders.csv"),
    ("POST", "/v1/drops/{id}/skus/{sku}/stock"),
    ("POST", "/v1/drops/{id}/holds"),
    ("GET", "/v1/fans/me/holds"),
    ("GET", "/v1/fans/me/orders"),
    ("GET", "/v1/holds/{id}"),
    ("DELETE", "/v1/holds/{id}"),
    ("POST", "/v1/holds/{id}/confirm"),
    ("GET", "/v1/orders/{id}"),
    ("POST", "/v1/orders/{id}/refunds"),
    ("GET", "/v1/orders/{id}/refunds"),
];

/// The route pattern for metrics labels (bounded cardinality) and 405 detection.
fn api_route(_method: &Method, seg: &[&str]) -> &'static str {
    match seg {
        ["v1", "fans", "session"] => "/v1/fans/session",
        ["v1", "ops", "ws"] => "/v1/ops/ws",
        ["v1", "catalogue"] => "/v1/catalogue",
        ["v1", "drops"] => "/v1/drops",
        ["v1", "drops", _] => "/v1/drops/{id}",
        ["v1", "drops", _, "seats"] => "/v1/drops/{id}/seats",
        ["v1", "drops", _, "close"] => "/v1/drops/{id}/close",
        ["v1", "drops", _, "cancel"] => "/v1/drops/{id}/cancel",
        ["v1", "drops", _, "cancellation"] => "/v1/drops/{id}/cancellation",
        ["v1", "drops", _, "admission"] => "/v1/drops/{id}/admission",
        ["v1", "drops", _, "audit"] => "/v1/drops/{id}/audit",
        ["v1", "drops", _, "orders"] => "/v1/drops/{id}/orders",
        ["v1", "drops", _, "orders.csv"] => "/v1/drops/{id}/orders.csv",
        ["v1", "drops", _, "skus", _, "stock"] => "/v1/drops/{id}/skus/{sku}/stock",
        ["v1", "drops", _, "holds"] => "/v1/drops/{id}/holds",
        ["v1", "fans", "me", "holds"] => "/v1/fans/me/holds",
        ["v1", "fans", "me", "orders"] => "/v1/fans/me/orders",
        ["v1", "holds", _] => "/v1/holds/{id}",
        ["v1", "holds", _, "confirm"] => "/v1/holds/{id}/confirm",
        ["v1", "orders", _] => "/v1/orders/{id}",
        ["v1", "orders", _, "refunds"] => "/v1/orders/{id}/refunds",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API routes' metric labels are the patterns of [`ROUTES`], so the table the contract
    /// test reads is the one requests are named by.
    #[test]
    fn api_routes_are_named_by_the_route_table() {
        for (method, pattern) in ROUTES.iter().filter(|(_, p)| p.starts_with("/v1/")) {
            let path = pattern.replace("{id}", "x").replace("{sku}", "y");
            let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(api_route(&method, &segments), *pattern);
        }
    }
}
