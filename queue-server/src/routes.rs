//! The route table. Fan routes authenticate with the fan token (Authorization: Bearer; the
//! WebSocket with its first message, see [`ws`]; a `fan_token` in the URL is refused), joins are
//! limited per client IP, and errors are mapped in [`web::refusal`]. The fan's queue page, the
//! shop it hands the fan to (booking-api's page, served on this origin) and their assets are
//! public.

use std::net::SocketAddr;
use std::sync::Arc;

use engine::db::Scope;
use engine::drops::AdmissionMode;
use engine::ids::{DropId, FanId};
use engine::queue::{FanStatus, Proofs};
use engine::tokens::now_ms;
use engine::{Code, Error};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;

use crate::limits::Limits;
use crate::pages;
use crate::room::Rooms;
use crate::ws;
use web::{self as http, bearer, Body};

pub struct App {
    pub rooms: Arc<Rooms>,
    pub limits: Limits,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

type Answer = Result<Response<Body>, Error>;

fn ok(status: u16, body: serde_json::Value) -> Answer {
    Ok(http::json(status, &body))
}

fn drop_id(s: &str) -> Result<DropId, Error> {
    DropId::parse(s).map_err(|_| Error::new(Code::UnknownDrop))
}

/// The metric label of a request the per-IP limit refused before routing it.
const RATE_LIMITED_ROUTE: &str = "rate_limited";

/// Every route queue-server answers, as (method, path pattern); the patterns are its metric
/// labels. docs/openapi.yaml describes each one and no other (tests/openapi.rs).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/drops/{id}"),
    ("GET", "/drops/{id}/shop"),
    ("GET", "/static/{name}"),
    ("GET", "/v1/drops/{id}/queue/ws"),
    ("POST", "/v1/drops/{id}/queue"),
    ("GET", "/v1/drops/{id}/queue/me"),
    ("GET", "/v1/drops/{id}/queue/seed"),
];

/// Whether some API route (`/v1/…`) of [`ROUTES`] has this path with any method: then another
/// method is 405 `method_not_allowed`, as at booking-api, rather than 404.
fn known_path(segments: &[&str]) -> bool {
    segments.first() == Some(&"v1") && !http::allowed_methods(ROUTES, segments).is_empty()
}

impl App {
    fn fan(&self, req: &Request<Incoming>) -> Result<FanId, Error> {
        ws::refuse_token_in_url(req)?;
        let token = bearer(req).ok_or_else(|| Error::new(Code::Unauthorized))?;
        self.rooms.queue.engine.fans().verify(token)
    }

    fn client_ip(&self, req: &Request<Incoming>, peer: SocketAddr) -> std::net::IpAddr {
        let trusted = &self.rooms.queue.engine.cfg().limits.trusted_proxies;
        http::client_ip(req, peer.ip(), trusted)
    }

    /// Routes one request. `route` is the metric label: the path pattern, never the raw path.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        permit: Arc<OwnedSemaphorePermit>,
    ) -> (Response<Body>, &'static str) {
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        // Every route but liveness: the per-IP limit first, before any token, id or store.
        if segments != ["healthz"] {
            if let Err(e) = self.limits.check_ip(self.client_ip(&req, peer)) {
                return (http::refusal(&e), RATE_LIMITED_ROUTE);
            }
        }
        let method = req.method().clone();
        let (route, result): (&'static str, Answer) = match (&method, segments.as_slice()) {
            (&Method::GET, ["healthz"]) => ("/healthz", ok(200, json!({"status": "ok"}))),
            (&Method::GET, ["readyz"]) => ("/readyz", self.readyz().await),
            (&Method::GET, ["metrics"]) => ("/metrics", self.metrics(&req).await),
            (&Method::GET, ["drops", _]) => (
                "/drops/{id}",
                Ok(pages::queue_page(
                    &self.rooms.queue.engine.cfg().queue.booking_public_url,
                )),
            ),
            (&Method::GET, ["drops", _, "shop"]) => (
                "/drops/{id}/shop",
                Ok(pages::shop_page(
                    &self.rooms.queue.engine.cfg().queue.booking_public_url,
                )),
            ),
            (&Method::GET, ["static", name]) => (
                "/static/{name}",
                pages::asset(name).ok_or_else(|| Error::new(Code::NotFound)),
            ),
            (&Method::GET, ["v1", "drops", d, "queue", "ws"]) => (
                "/v1/drops/{id}/queue/ws",
                self.websocket(req, d, peer, permit).await,
            ),
            (&Method::POST, ["v1", "drops", d, "queue"]) => {
                ("/v1/drops/{id}/queue", self.join(&req, d, peer).await)
            }
            (&Method::GET, ["v1", "drops", d, "queue", "me"]) => {
                ("/v1/drops/{id}/queue/me", self.me(&req, d).await)
            }
            (&Method::GET, ["v1", "drops", d, "queue", "seed"]) => {
                ("/v1/drops/{id}/queue/seed", self.seed(d).await)
            }
            _ if known_path(&segments) => ("unknown", Err(Error::new(Code::MethodNotAllowed))),
            _ => ("unknown", Err(Error::new(Code::NotFound))),
        };
        let mut resp = result.unwrap_or_else(|e| http::refusal(&e));
        http::allow(&mut resp, ROUTES, &segments);
        (resp, route)
    }

    /// Prometheus text, for an ops key only: the public listener doesn't tell the world its
    /// traffic (`queue.metrics_listen` serves it without a key, privately).
    async fn metrics(&self, req: &Request<Incoming>) -> Answer {
        let key = bearer(req).ok_or_else(|| {
            Error::msg(
                Code::Unauthorized,
                "Send `Authorization: Bearer <ops key>`.",
            )
        })?;
        self.rooms.queue.engine.api_key(key, Scope::Ops).await?;
        Ok(http::metrics_page_with(
            &self.metrics,
            &self.rooms.queue.engine.drop_gauges_text(),
        ))
    }

    async fn readyz(&self) -> Answer {
        match self.rooms.queue.engine.ready().await {
            Ok(()) => ok(200, json!({"status": "ready"})),
            Err(e) => Err(e),
        }
    }

    async fn websocket(
        self: &Arc<Self>,
        req: Request<Incoming>,
        d: &str,
        peer: SocketAddr,
        permit: Arc<OwnedSemaphorePermit>,
    ) -> Answer {
        ws::refuse_token_in_url(&req)?;
        let drop = drop_id(d)?;
        self.limits.check_join(&self.client_ip(&req, peer))?;
        let resp = ws::accept(&req)?;
        // The fan authenticates with the socket's first message (ws::serve).
        tokio::spawn(ws::serve(self.rooms.clone(), req, drop, permit));
        Ok(resp)
    }

    /// HTTP join: `{"place","ahead","status"}` (and a place receipt while waiting), idempotent.
    /// `X-Place-Receipt` and `X-Admission-Token` bring back what the fan held if Redis lost the
    /// line (as the socket's auth frame does).
    async fn join(&self, req: &Request<Incoming>, d: &str, peer: SocketAddr) -> Answer {
        self.limits.check_join(&self.client_ip(req, peer))?;
        let drop = drop_id(d)?;
        let fan = self.fan(req)?;
        let proofs = Proofs {
            receipt: http::header(req, "x-place-receipt"),
            admission_token: http::header(req, "x-admission-token"),
        };
        let joined = self.rooms.queue.join(&drop, &fan, proofs).await?;
        self.rooms.touch(&drop)?;
        // Before opening the place is the fan's draw, and a draw seen could be a draw shopped
        // for (join under many names, keep the best): like `/me` and the socket, show none.
        let (place, ahead) = match joined.status {
            FanStatus::Waiting | FanStatus::Waitlisted => (
                Some(joined.place),
                self.rooms.queue.standing(&drop, &fan).await?.ahead,
            ),
            FanStatus::PreQueue => (None, None),
            _ => (Some(joined.place), None),
        };
        let status = if joined.new { 201 } else { 200 };
        let mut answer = json!({"place": place, "ahead": ahead, "status": joined.status.as_str()});
        if matches!(joined.status, FanStatus::Waiting | FanStatus::Waitlisted) {
            answer["receipt"] = json!(self.rooms.queue.receipt(&drop, &fan, joined.place));
        }
        ok(status, answer)
    }

    /// HTTP poll: `{"status","place","ahead","eta_s","paused"}`, plus the token once admitted.
    async fn me(&self, req: &Request<Incoming>, d: &str) -> Answer {
        let drop = drop_id(d)?;
        let fan = self.fan(req)?;
        self.limits.check_poll(&fan)?;
        let def = self.rooms.queue.engine.drop_def(&drop).await?;
        // Before the view: a view runs the room's admission loop, and a drop without a waiting
        // room has no line to run.
        if def.admission.mode != AdmissionMode::Queue {
            return Err(engine::queue::not_queue());
        }
        let view = self.rooms.view(&drop).await?;
        // A poll is presence: a fan polling keeps their place as a socket would.
        self.rooms
            .queue
            .touch_presence(&drop, std::slice::from_ref(&fan), view.redis_now_ms())
            .await?;
        let standing = self.rooms.queue.standing(&drop, &fan).await?;
        let Some(place) = standing.place else {
            return Err(Error::msg(
                Code::NotFound,
                "This fan has no place in the line: join first (POST /v1/drops/{drop_id}/queue).",
            ));
        };
        let now = now_ms();
        let paused = view.state == engine::queue::LineState::Paused;
        if standing.deadline_ms.is_some_and(|d| d >= now) {
            let offer = standing.offered();
            let msg = self
                .rooms
                .admitted_message(&drop, &fan, place, standing.session, offer);
            return ok(
                200,
                json!({
                    "status": "admitted", "place": place, "ahead": 0, "eta_s": 0, "paused": paused,
                    "offer": offer,
                    "admission_token": msg["admission_token"], "expires_at": msg["expires_at"],
                    "shop_ends_at_ms": msg["shop_ends_at_ms"],
                    "session_ends_at_ms": msg["session_ends_at_ms"],
                    "booking_url": msg["booking_url"],
                }),
            );
        }
        use engine::queue::LineState as S;
        let status = match (standing.ahead, view.state) {
            (_, S::SoldOut) => "sold_out",
            (_, S::Closed) => "closed",
            (Some(_), _) if now < def.opens_at_ms() => "pre_queue",
            (Some(_), S::AllHeld) => "all_held",
            (Some(_), S::Waitlist) => "waitlisted",
            (Some(_), _) => "waiting",
            (None, _) => "done",
        };
        let ahead = standing.ahead.filter(|_| status != "pre_queue");
        let waitlisted = status == "waitlisted";
        let mut answer = json!({
            "status": status,
            "place": if status == "pre_queue" { None } else { Some(place) },
            "ahead": ahead,
            // On the waiting list nothing moves at a rate: units come back when they do.
            "eta_s": ahead.filter(|_| !waitlisted).and_then(|a| view.eta_s(a)),
            "paused": paused,
        });
        if waitlisted {
            answer["came_back"] = json!(view.came_back);
        }
        // In the line after opening: a receipt for the place (before opening the place is the
        // fan's draw, not shown; the draw comes back by itself, it is HMAC(seed, fan)).
        if standing.ahead.is_some() && status != "pre_queue" {
            answer["receipt"] = json!(self.rooms.queue.receipt(&drop, &fan, place));
        }
        ok(200, answer)
    }

    /// The commit–reveal seed: its SHA-256 always, the seed itself once the drop has opened.
    async fn seed(&self, d: &str) -> Answer {
        let drop = drop_id(d)?;
        let (sha, seed, opens_at_ms) = self.rooms.queue.seed_reveal(&drop).await?;
        ok(
            200,
            json!({"drop_id": drop, "seed_sha256": sha, "seed": seed, "opens_at_ms": opens_at_ms}),
        )
    }
}
