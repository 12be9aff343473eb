//! The booking engine: what booking-api's handlers call. Drops, reserves, releases, confirms
//! (the hold lifecycle in docs/ARCHITECTURE.md), and the background work that keeps Redis honest:
//! the sweeper (expiry), the reconciler (confirms that stopped halfway) and the watcher (Redis
//! restarts and lost drops → recovery from Postgres).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::config::{ms, Config};
use crate::db::{ApiKey, Db, Order, OrderItem, Voiding};
use crate::drops::{
    AdmissionMode, AdmissionSettings, CreateDrop, DropDef, HoldRequest, HoldRequestBody, Kind,
};
use crate::error::{Code, Error, Result};
use crate::ids::{DropId, FanId, HoldId, OrderId};
use crate::metrics as m;
use crate::payments::{GatewayError, Lookup, PaymentGateway, PaymentState, TestGateway};
use crate::scripts::{
    ConfirmBegin, Finish, HoldItem, HoldRecord, HoldState, Redis, ReserveArgs, Reserved,
};
use crate::tokens::{now_ms, sha256_hex, AdmissionKeys, FanAuth};
use crate::writer::{Committed, NewItem, NewOrder, Writer};

/// An answer for a handler: HTTP status and JSON body.
pub type Answer = (u16, Value);

/// A payment as the fan sends it: `{"gateway": "test", "reference": "ok_1"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payment {
    pub gateway: String,
    pub reference: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmBody {
    pub payment: Payment,
}

/// Ops' partial update of a drop's admission settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionUpdate {
    pub rate_per_s: Option<f64>,
    pub burst: Option<u32>,
    pub max_active: Option<u32>,
    pub paused: Option<bool>,
    pub shop_window_s: Option<u32>,
    pub admit_margin_pct: Option<u32>,
    pub leave_grace_s: Option<u32>,
}

impl AdmissionUpdate {
    /// Sets the fields this update names; the rest stay as they are.
    fn apply(&self, s: &mut AdmissionSettings) {
        if let Some(v) = self.rate_per_s {
            s.rate_per_s = v;
        }
        if let Some(v) = self.burst {
            s.burst = v;
        }
        if let Some(v) = self.max_active {
            s.max_active = v;
        }
        if let Some(v) = self.paused {
            s.paused = v;
        }
        if let Some(v) = self.shop_window_s {
            s.shop_window_s = v;
        }
        if let Some(v) = self.admit_margin_pct {
            s.admit_margin_pct = v;
        }
        if let Some(v) = self.leave_grace_s {
            s.leave_grace_s = v;
        }
    }

    /// The settings after this update: the stored ones (the drop's own when none are stored or
    /// they no longer parse) with the named fields set, refused if that breaks a bound.
    fn applied_to(
        &self,
        stored: Option<Value>,
        drop: &AdmissionSettings,
    ) -> Result<AdmissionSettings> {
        let mut s = stored
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_else(|| drop.clone());
        self.apply(&mut s);
        s.validate()?;
        Ok(s)
    }
}

/// The result of one confirm, shared with concurrent confirms of the same hold.
type ConfirmResult = Result<(Order, bool)>;

struct Inflight {
    /// The hold's fan: another fan's confirm must not join (it would be handed this one's order).
    fan: FanId,
    reference: String,
    done: watch::Receiver<Option<ConfirmResult>>,
}

/// Removes a hold's in-flight confirm entry when its task ends, however it ends.
struct InflightGuard {
    engine: Arc<Engine>,
    hold: HoldId,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        lock(&self.engine.inflight).remove(&self.hold);
    }
}

/// How long a confirm waits for another process already confirming the same hold.
const CONFIRM_WAIT_OTHER_MS: u64 = 3_000;
/// Expire calls per drop per sweep, at most (each takes `holds.sweep_batch` holds).
const SWEEP_ROUNDS_MAX: usize = 20;
/// Rebuilds of one drop in a row while sales keep landing in Postgres during them.
const RECOVER_ROUNDS_MAX: usize = 3;
/// How often the list of drops to look after is read from Postgres.
const WATCHED_REFRESH: Duration = Duration::from_secs(5);
/// How long a drop this process served stays looked after without further traffic.
const TOUCHED_KEEP: Duration = Duration::from_secs(3600);
/// Drops `GET /v1/fans/me/holds` looks in when no `drop_id` is given.
const FAN_HOLDS_DROPS_MAX: usize = 100;
/// How often a busy drop's "served lately" mark is refreshed.
const TOUCHED_REFRESH: Duration = Duration::from_secs(10);

pub struct Engine {
    pub cfg: Config,
    pub redis: Redis,
    pub db: Db,
    pub writer: Writer,
    pub gateway: Arc<dyn PaymentGateway>,
    /// The same gateway as `gateway` when it's the test one, so tests can read its records.
    pub test_gateway: Option<Arc<TestGateway>>,
    pub fans: FanAuth,
    pub admission: AdmissionKeys,
    drops: Mutex<HashMap<DropId, Arc<DropDef>>>,
    drop_fills: crate::fill::FillGate<DropId>,
    inflight: Mutex<HashMap<HoldId, Inflight>>,
    /// Drops the background tasks look after: Postgres' newest live drops…
    watched: Mutex<Vec<DropId>>,
    /// …plus every drop this process served lately, so its own drops are never crowded out.
    touched: Mutex<HashMap<DropId, Instant>>,
    recovering: Mutex<HashMap<DropId, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these maps leaves it usable: each entry is self-contained.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn rfc3339_ms(ms_since_epoch: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms_since_epoch) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Engine {
    /// Connects Redis and Postgres, applies migrations, starts the order writer.
    pub async fn start(cfg: Config) -> Result<Arc<Engine>> {
        cfg.validate()?;
        let redis = Redis::connect(&cfg.redis).await?;
        let db = Db::connect(&cfg.database)?;
        db.migrate().await?;
        let writer = Writer::spawn(db.clone(), &cfg.writer);
        let test = Arc::new(TestGateway::new(ms(cfg.gateway.test_slow_ms)));
        let fans = FanAuth::new(&cfg.identity)?;
        let admission = AdmissionKeys::new(&cfg.admission);
        Ok(Arc::new(Engine {
            redis,
            db,
            writer,
            gateway: test.clone(),
            test_gateway: Some(test),
            fans,
            admission,
            drops: Mutex::new(HashMap::new()),
            drop_fills: Default::default(),
            inflight: Mutex::new(HashMap::new()),
            watched: Mutex::new(Vec::new()),
            touched: Mutex::new(HashMap::new()),
            recovering: Mutex::new(HashMap::new()),
            cfg,
        }))
    }

    // ---- drops ----------------------------------------------------------------------------------

    /// The fields of a drop's Redis meta hash, the same at creation and at every rebuild.
    fn meta_fields(&self, def: &DropDef, status: &str) -> Value {
        json!({
            "status": status,
            "recovering": "0",
            "kind": def.kind.as_str(),
            "per_fan_limit": def.per_fan_limit,
            "hold_ttl_ms": def.hold_ttl_ms,
            "opens_at_ms": def.opens_at_ms(),
            "mode": match def.admission.mode { AdmissionMode::Open => "open", AdmissionMode::Queue => "queue" },
            "confirm_timeout_ms": self.cfg.holds.confirm_timeout_ms,
            "confirm_grace_ms": self.cfg.holds.confirm_grace_ms,
            "reclaim_batch": self.cfg.holds.reclaim_batch,
            "done_ttl_ms": self.cfg.holds.done_ttl_ms,
        })
    }

    /// What `load_drop.lua` and `rebuild.lua` both take about a drop: its meta fields, every seat
    /// id and the seat layout. Each caller adds its `buckets` (and rebuild what Postgres sold).
    fn redis_payload(&self, def: &DropDef, status: &str) -> Value {
        let mut layout = serde_json::Map::new();
        for b in def.buckets.iter().filter(|b| !b.rows.is_empty()) {
            layout.insert(b.id.clone(), json!(b.rows));
        }
        json!({
            "meta": self.meta_fields(def, status),
            "seats": def.seat_ids().map(|(id, ..)| id).collect::<Vec<_>>(),
            "layout": layout,
        })
    }

    pub async fn create_drop(&self, seller: &ApiKey, body: CreateDrop) -> Result<Answer> {
        let drop_id = DropId::generate();
        let seed = crate::tokens::random_secret();
        let seed_sha256 = sha256_hex(seed.as_bytes());
        let now = OffsetDateTime::now_utc();
        let def = body.into_def(
            drop_id.clone(),
            seller.key_id.clone(),
            seed_sha256,
            now,
            &self.cfg.drops,
        )?;
        let definition = serde_json::to_value(&def).map_err(Error::internal)?;
        self.db.insert_drop(&def, &seed, &definition).await?;
        let mut payload = self.redis_payload(&def, "open");
        payload["buckets"] = json!(def
            .buckets
            .iter()
            .map(|b| json!([b.id, b.total]))
            .collect::<Vec<_>>());
        // If Redis fails here the drop is in Postgres but not loaded: the watcher finds it missing
        // and recovery loads it, so the seller's retry-free success is still true.
        self.redis.load_drop(&drop_id, &payload).await?;
        self.redis
            .set_admission(&drop_id, admission_fields(&def.admission))
            .await?;
        let def = Arc::new(def);
        lock(&self.drops).insert(drop_id.clone(), def.clone());
        self.watch_drop(&drop_id);
        let view = self.drop_view_of(&def, "open").await?;
        Ok((201, view))
    }

    fn watch_drop(&self, drop: &DropId) {
        let mut touched = lock(&self.touched);
        // On the reserve path: refresh a drop's mark at most every few seconds, not per request.
        if touched
            .get(drop)
            .is_some_and(|at| at.elapsed() < TOUCHED_REFRESH)
        {
            return;
        }
        if touched.len() >= self.cfg.reconciler.max_drops_watched {
            touched.retain(|_, at| at.elapsed() < TOUCHED_KEEP);
        }
        if touched.len() < self.cfg.reconciler.max_drops_watched || touched.contains_key(drop) {
            touched.insert(drop.clone(), Instant::now());
        }
    }

    /// The cached definition, read from Postgres on first use.
    pub async fn drop_def(&self, drop: &DropId) -> Result<Arc<DropDef>> {
        if let Some(def) = lock(&self.drops).get(drop) {
            return Ok(def.clone());
        }
        let filling = self.drop_fills.enter(drop).await;
        if let Some(def) = lock(&self.drops).get(drop) {
            return Ok(def.clone());
        }
        if filling.failed_while_waiting() {
            return Err(Error::unavailable(
                "Postgres",
                "a concurrent load of the drop failed",
            ));
        }
        let (def, _) = self
            .db
            .drop_def(drop)
            .await
            .inspect_err(|_| filling.failed())?
            .ok_or_else(|| Error::new(Code::UnknownDrop))?;
        let def = Arc::new(def);
        let mut cache = lock(&self.drops);
        if cache.len() >= self.cfg.drops.cache_entries {
            cache.clear();
        }
        cache.insert(drop.clone(), def.clone());
        Ok(def)
    }

    /// Status from Redis; a drop missing there (flushed, lost) starts recovery and answers 503.
    async fn live_status(&self, drop: &DropId) -> Result<String> {
        match self.redis.drop_state(drop).await? {
            Some(state) if !state.recovering => Ok(state.status),
            _ => {
                self.start_recovery(drop);
                Err(recovering())
            }
        }
    }

    pub async fn drop_view(&self, drop: &DropId) -> Result<Answer> {
        let def = self.drop_def(drop).await?;
        let status = self.live_status(drop).await?;
        Ok((200, self.drop_view_of(&def, &status).await?))
    }

    async fn drop_view_of(&self, def: &DropDef, status: &str) -> Result<Value> {
        let counts = self.redis.counts(&def.drop_id).await?;
        let inventory: Vec<Value> = def
            .buckets
            .iter()
            .map(|b| {
                let c = counts.get(&b.id);
                let mut v = json!({
                    "name": b.name,
                    "price_cents": b.price_cents,
                    "total": c.map_or(i64::from(b.total), |c| c.total),
                    "available": c.map_or(0, |c| c.available),
                    "held": c.map_or(0, |c| c.held),
                    "sold": c.map_or(0, |c| c.sold),
                });
                let key = if def.kind == Kind::Ga {
                    "sku"
                } else {
                    "section"
                };
                v[key] = json!(b.id);
                if def.kind == Kind::Seated {
                    v["rows"] = json!(b
                        .rows
                        .iter()
                        .map(|(r, n)| json!({"row": r, "seats": n}))
                        .collect::<Vec<_>>());
                }
                v
            })
            .collect();
        Ok(json!({
            "drop_id": def.drop_id,
            "name": def.name,
            "currency": def.currency,
            "kind": def.kind.as_str(),
            "status": status,
            "opens_at": rfc3339(def.opens_at),
            "per_fan_limit": def.per_fan_limit,
            "hold_ttl_s": def.hold_ttl_ms / 1000,
            "admission": {"mode": def.admission.mode},
            "seed_sha256": def.seed_sha256,
            "inventory": inventory,
            "server_now_ms": now_ms(),
        }))
    }

    pub async fn seats_view(&self, drop: &DropId) -> Result<Answer> {
        let def = self.drop_def(drop).await?;
        if def.kind != Kind::Seated {
            return Err(Error::invalid("this drop has no seats"));
        }
        self.live_status(drop).await?;
        let states = self.redis.seat_states(drop).await?;
        let seats: Vec<Value> = def
            .seat_ids()
            .map(|(id, b, row, n)| {
                let state = match states.get(&id).map(String::as_str) {
                    Some("-") => "free",
                    Some("#") => "sold",
                    _ => "held",
                };
                json!({"seat": id, "section": b.id, "row": row, "number": n, "state": state})
            })
            .collect();
        Ok((
            200,
            json!({"drop_id": drop, "seats": seats, "server_now_ms": now_ms()}),
        ))
    }

    pub async fn list_drops(&self, seller: &ApiKey) -> Result<Answer> {
        let drops = self
            .db
            .list_drops(&seller.key_id, self.cfg.drops.max_drops_listed)
            .await?;
        let mut out = Vec::with_capacity(drops.len());
        for (drop, status) in drops {
            let def = self.drop_def(&drop).await?;
            out.push(json!({
                "drop_id": drop, "name": def.name, "status": status, "kind": def.kind.as_str(),
                "opens_at": rfc3339(def.opens_at), "currency": def.currency,
            }));
        }
        Ok((200, json!({ "drops": out })))
    }

    async fn owned_drop(&self, seller: &ApiKey, drop: &DropId) -> Result<Arc<DropDef>> {
        let def = self.drop_def(drop).await?;
        if def.seller_key_id != seller.key_id {
            return Err(Error::msg(
                Code::Forbidden,
                "This drop belongs to another seller.",
            ));
        }
        Ok(def)
    }

    pub async fn close_drop(&self, seller: &ApiKey, drop: &DropId) -> Result<Answer> {
        let def = self.owned_drop(seller, drop).await?;
        self.db.close_drop(drop).await?;
        self.redis.set_meta(drop, "status", "closed").await?;
        Ok((200, self.drop_view_of(&def, "closed").await?))
    }

    pub async fn admission_settings(&self, drop: &DropId) -> Result<AdmissionSettings> {
        let def = self.drop_def(drop).await?;
        let stored = self.db.admission(drop).await?.unwrap_or(Value::Null);
        Ok(serde_json::from_value(stored).unwrap_or_else(|_| def.admission.clone()))
    }

    pub async fn set_admission(
        &self,
        ops: &ApiKey,
        drop: &DropId,
        update: AdmissionUpdate,
    ) -> Result<Answer> {
        let def = self.drop_def(drop).await?;
        let value = self
            .db
            .update_admission(
                drop,
                &ops.key_id,
                |stored| {
                    let s = update.applied_to(stored, &def.admission)?;
                    serde_json::to_value(&s).map_err(Error::internal)
                },
                async |value| {
                    let s: AdmissionSettings =
                        serde_json::from_value(value.clone()).map_err(Error::internal)?;
                    self.redis.set_admission(drop, admission_fields(&s)).await
                },
            )
            .await?;
        Ok((200, json!({"drop_id": drop, "admission": value})))
    }

    // ---- holds ----------------------------------------------------------------------------------

    pub async fn reserve(
        &self,
        fan: &FanId,
        drop: &DropId,
        idempotency_key: Option<&str>,
        admission_token: Option<&str>,
        body: &[u8],
    ) -> Result<Answer> {
        let key = idempotency_key
            .ok_or_else(|| Error::invalid("the Idempotency-Key header is required"))?;
        if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::invalid(
                "Idempotency-Key must be 1..=128 printable ASCII characters",
            ));
        }
        let def = self.drop_def(drop).await?;
        self.watch_drop(drop);
        if def.admission.mode == AdmissionMode::Queue {
            let token = admission_token.ok_or_else(|| {
                Error::msg(
                    Code::NotAdmitted,
                    "This drop has a waiting room: join it to get an admission token.",
                )
            })?;
            self.admission.verify(token, drop, fan)?;
        }
        let parsed: HoldRequestBody = parse_json(body)?;
        let request = HoldRequest::parse(parsed, &def, self.cfg.drops.max_items_per_hold)?;
        let hold_id = HoldId::generate(drop);
        let seats: Vec<(String, String)>;
        let args = match &request {
            HoldRequest::Items(items) => ReserveArgs::Items(items),
            HoldRequest::Seats(list) => {
                seats = list
                    .iter()
                    .map(|s| (s.section().to_owned(), s.to_string()))
                    .collect();
                ReserveArgs::Seats(&seats)
            }
            HoldRequest::Best { section, quantity } => ReserveArgs::Best {
                section,
                quantity: *quantity,
            },
        };
        let started = Instant::now();
        let (reserved, _replay) = self
            .redis
            .reserve(drop, fan, key, &sha256_hex(body), &hold_id, args)
            .await?;
        metrics::histogram!(m::RESERVE_SECONDS).record(started.elapsed().as_secs_f64());
        match reserved {
            Reserved::Held {
                hold_id,
                expires_at_ms,
                now_ms,
                items,
            } => {
                metrics::counter!(m::HOLDS_CREATED).increment(1);
                let (items, total) = priced_items(&def, &items);
                Ok((
                    201,
                    json!({
                        "hold_id": hold_id,
                        "drop_id": drop,
                        "state": "held",
                        "expires_at": rfc3339_ms(expires_at_ms),
                        "expires_at_ms": expires_at_ms,
                        "server_now_ms": now_ms,
                        "items": items,
                        "total_cents": total,
                        "currency": def.currency,
                    }),
                ))
            }
            Reserved::Refused {
                code: Code::Recovering | Code::UnknownDrop,
                ..
            } => {
                self.start_recovery(drop);
                Err(recovering())
            }
            Reserved::Refused { code, detail } => {
                let mut e = Error::new(code);
                if !detail.is_null() && detail != json!({}) && detail != json!([]) {
                    e = e.detail(detail);
                }
                Err(e)
            }
        }
    }

    fn hold_view(&self, def: &DropDef, hold: &HoldId, rec: &HoldRecord) -> Value {
        let (items, total) = priced_items(def, &rec.it);
        let mut v = json!({
            "hold_id": hold,
            "drop_id": def.drop_id,
            "state": rec.st.as_str(),
            "expires_at": rfc3339_ms(rec.exp),
            "expires_at_ms": rec.exp,
            "server_now_ms": now_ms(),
            "items": items,
            "total_cents": total,
            "currency": def.currency,
        });
        if let Some(oid) = rec.oid.as_deref().filter(|o| !o.is_empty()) {
            v["order_id"] = json!(oid);
        }
        v
    }

    pub async fn hold(&self, fan: &FanId, hold: &HoldId) -> Result<Answer> {
        let drop = hold.drop_id();
        let def = self
            .drop_def(&drop)
            .await
            .map_err(|e| not_found_as(e, Code::UnknownHold))?;
        if let Some(rec) = self.redis.hold(hold).await? {
            if rec.fan != fan.as_str() {
                return Err(Error::new(Code::UnknownHold));
            }
            return Ok((200, self.hold_view(&def, hold, &rec)));
        }
        // Purged from Redis: a sold hold still has its order.
        match self.db.order_by_hold(hold).await? {
            Some(order) if order.fan == fan.as_str() => Ok((
                200,
                json!({
                    "hold_id": hold, "drop_id": drop, "state": "sold", "order_id": order.order_id,
                    "items": order.items, "total_cents": order.total_cents, "currency": order.currency,
                    "server_now_ms": now_ms(),
                }),
            )),
            _ => Err(Error::new(Code::UnknownHold)),
        }
    }

    /// The fan's live holds in one drop, or in every drop this process looks after.
    pub async fn fan_holds(&self, fan: &FanId, drop: Option<&DropId>) -> Result<Answer> {
        let drops = match drop {
            Some(d) => vec![d.clone()],
            // Without a drop: the newest drops this process looks after, a bounded number.
            None => self
                .watched_drops()
                .into_iter()
                .take(FAN_HOLDS_DROPS_MAX)
                .collect(),
        };
        let mut out = Vec::new();
        for d in drops {
            let Ok(def) = self.drop_def(&d).await else {
                continue;
            };
            for (hold, rec) in self.redis.fan_live_holds(&d, fan).await? {
                out.push(self.hold_view(&def, &hold, &rec));
            }
        }
        Ok((200, json!({ "holds": out, "server_now_ms": now_ms() })))
    }

    pub async fn fan_orders(&self, fan: &FanId, drop: Option<&DropId>) -> Result<Answer> {
        let orders = self.db.fan_orders(fan, drop).await?;
        Ok((200, json!({ "orders": orders })))
    }

    pub async fn order_for_fan(&self, fan: &FanId, order: OrderId) -> Result<Answer> {
        match self.db.order(order).await? {
            Some(o) if o.fan == fan.as_str() => Ok((200, json!(o))),
            _ => Err(Error::new(Code::UnknownOrder)),
        }
    }

    pub async fn order_for_seller(&self, seller: &ApiKey, order: OrderId) -> Result<Answer> {
        let o = self
            .db
            .order(order)
            .await?
            .ok_or_else(|| Error::new(Code::UnknownOrder))?;
        let drop = DropId::parse(&o.drop_id)?;
        self.owned_drop(seller, &drop)
            .await
            .map_err(|e| not_found_as(e, Code::UnknownOrder))?;
        Ok((200, json!(o)))
    }

    pub async fn release(&self, fan: &FanId, hold: &HoldId) -> Result<()> {
        self.redis.release(hold, fan).await?;
        metrics::counter!(m::HOLDS_RELEASED).increment(1);
        Ok(())
    }

    // ---- confirmation ---------------------------------------------------------------------------

    /// Pays for a hold. Concurrent confirms of one hold in this process share one attempt; the
    /// first answers 201, the others (and later repeats) 200 with the same order.
    pub async fn confirm(
        self: &Arc<Self>,
        fan: &FanId,
        hold: &HoldId,
        body: &[u8],
    ) -> Result<Answer> {
        let ConfirmBody { payment } = parse_json(body)?;
        if payment.gateway != self.gateway.name() {
            return Err(Error::invalid(format!(
                "payment.gateway must be `{}`",
                self.gateway.name()
            )));
        }
        let r = &payment.reference;
        if r.is_empty() || r.len() > 128 || !r.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::invalid(
                "payment.reference must be 1..=128 printable ASCII characters",
            ));
        }
        // Some(receiver): another request here is confirming this hold; None: we lead.
        let (waiting, leader) = {
            let mut inflight = lock(&self.inflight);
            match inflight.get(hold) {
                Some(other) if other.fan != *fan => return Err(Error::new(Code::UnknownHold)),
                Some(other) if other.reference != payment.reference => {
                    return Err(Error::new(Code::ConfirmInProgress));
                }
                Some(other) => (Some(other.done.clone()), None),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(
                        hold.clone(),
                        Inflight {
                            fan: fan.clone(),
                            reference: payment.reference.clone(),
                            done: rx,
                        },
                    );
                    (None, Some(tx))
                }
            }
        };
        if let Some(tx) = leader {
            // Its own task: a client that hangs up mid-payment must not cut the confirm in half.
            let (engine, fan, hold) = (self.clone(), fan.clone(), hold.clone());
            let task = tokio::spawn(async move {
                // Leaves the in-flight map however the task ends, a panic included.
                let _leave = InflightGuard {
                    engine: engine.clone(),
                    hold: hold.clone(),
                };
                let started = Instant::now();
                let result = engine.confirm_once(&fan, &hold, &payment).await;
                metrics::histogram!(m::CONFIRM_SECONDS).record(started.elapsed().as_secs_f64());
                let _ = tx.send(Some(result.clone()));
                result
            });
            let result = task
                .await
                .map_err(|e| Error::internal(format!("confirm task: {e}")))?;
            return result.map(|(order, new)| (if new { 201 } else { 200 }, json!(order)));
        }
        let mut rx = waiting.ok_or_else(|| Error::internal("confirm wait"))?;
        let result = rx
            .wait_for(|v| v.is_some())
            .await
            .map_err(|_| Error::internal("confirm leader vanished"))?
            .clone()
            .ok_or_else(|| Error::internal("confirm result missing"))?;
        result.map(|(order, _)| (200, json!(order)))
    }

    async fn confirm_once(&self, fan: &FanId, hold: &HoldId, payment: &Payment) -> ConfirmResult {
        let def = self
            .drop_def(&hold.drop_id())
            .await
            .map_err(|e| not_found_as(e, Code::UnknownHold))?;
        self.watch_drop(&def.drop_id);
        let begun = match self
            .redis
            .confirm_begin(hold, fan, &payment.reference)
            .await
        {
            // Ended holds are purged from Redis after `holds.done_ttl_ms`; a sold one still has
            // its order, and repeating its confirm must keep answering with it.
            Err(e) if e.code == Code::UnknownHold => {
                return self.existing_order(hold, fan).await.map(|o| (o, false));
            }
            other => other?,
        };
        let rec = match begun {
            ConfirmBegin::Sold(_) => {
                return self.existing_order(hold, fan).await.map(|o| (o, false))
            }
            ConfirmBegin::InProgress(_) => return self.wait_other_confirm(hold, fan).await,
            ConfirmBegin::Began(rec) => rec,
        };
        let (_, total) = priced_items(&def, &rec.it);
        // If this fails nothing was charged: the hold stays confirming and the reconciler settles it.
        let recorded = self
            .db
            .begin_payment(hold, fan, self.gateway.name(), &payment.reference, total)
            .await?;
        // The reconciler takes holds past their confirm deadline, and reverts one whose payment
        // row isn't this attempt's: an insert that landed late (a stall, a partition) must not go
        // on to charge the fan for a hold that may be back in stock. Nothing is charged yet.
        let deadline = rec.cexp.unwrap_or(i64::MAX);
        if !recorded || now_ms() > deadline - self.cfg.holds.confirm_safety_margin_ms as i64 {
            return Err(payment_pending());
        }
        let timeout = ms(self.cfg.gateway.timeout_ms);
        let auth = tokio::time::timeout(
            timeout,
            self.gateway
                .authorize(hold, &payment.reference, total, &def.currency),
        )
        .await
        .unwrap_or(Err(GatewayError::Timeout));
        match auth {
            Ok(()) => {}
            Err(GatewayError::Declined) => {
                let _ = self
                    .db
                    .set_payment_state(hold, PaymentState::Declined)
                    .await;
                self.redis.confirm_revert(hold, &payment.reference).await?;
                return Err(Error::new(Code::PaymentDeclined));
            }
            Err(e) => {
                tracing::info!(%hold, error = %e, "payment pending; the reconciler will settle it");
                return Err(payment_pending());
            }
        }
        // Past this point only the reconciler may settle: it takes holds past their confirm
        // deadline, and we must not commit one it may be reverting.
        if now_ms() > deadline - self.cfg.holds.confirm_safety_margin_ms as i64 {
            return Err(payment_pending());
        }
        self.commit_and_finish(&def, hold, &rec)
            .await?
            .ok_or_else(|| {
                Error::msg(
                    Code::PaymentDeclined,
                    "The payment took too long and was voided; the hold is yours until it expires.",
                )
            })
    }

    /// Commits the order for a confirming hold (after authorization), captures, and marks it sold.
    /// `Ok(None)`: the payment attempt was voided meanwhile (by a reconciler, maybe on another
    /// instance); the hold has been reverted and nothing was sold.
    async fn commit_and_finish(
        &self,
        def: &DropDef,
        hold: &HoldId,
        rec: &HoldRecord,
    ) -> Result<Option<(Order, bool)>> {
        let (_, total) = priced_items(def, &rec.it);
        let reference = rec.reference.clone().unwrap_or_default();
        let new = NewOrder {
            order_id: OrderId::generate(),
            hold_id: hold.clone(),
            reference: reference.clone(),
            fan: rec.fan.clone(),
            currency: def.currency.clone(),
            total_cents: total,
            per_fan_limit: def.per_fan_limit as i32,
            items: rec
                .it
                .iter()
                .map(|i| NewItem {
                    bucket: i.b.clone(),
                    seat: i.s.clone(),
                    quantity: i.q as i32,
                    price_cents: def.bucket(&i.b).map_or(0, |b| b.price_cents),
                })
                .collect(),
        };
        let committed = self.writer.commit(new).await?;
        if committed == Committed::Refused {
            // Postgres' final check refused the sale: undo the payment and the hold, and rebuild
            // the drop from Postgres, since Redis disagrees with it (else every later buyer of
            // these units would be authorized, voided and refused the same way).
            let _ = self.redis.set_meta(&def.drop_id, "recovering", "1").await;
            self.void_and_revert(hold, &reference).await?;
            return Err(Error::msg(
                Code::Internal,
                "The sale was refused by the store's final check.",
            ));
        }
        let Some(order_id) = committed.order_id() else {
            self.void_and_revert(hold, &reference).await?;
            return Ok(None);
        };
        self.capture(hold).await;
        match self.redis.confirm_finish(hold, order_id).await {
            Ok(Finish::Sold | Finish::Already) => {}
            // The order is committed: the sale stands, and the fan hears so. Redis still says
            // `confirming`; past the confirm deadline the reconciler finds the order and
            // finishes the hold.
            Err(e) => {
                tracing::warn!(%hold, %order_id, error = %e, "sold, but Redis missed the finish; the reconciler completes it")
            }
            Ok(Finish::Ended | Finish::Unknown) => {
                metrics::counter!(m::OVERSELL_ALARMS).increment(1);
                tracing::error!(%hold, %order_id, "order committed for a hold whose units went back to stock");
                // Redis doesn't count this sale (it lost the hold, or gave its units back): the
                // watcher rebuilds the drop from Postgres.
                let _ = self.redis.set_meta(&def.drop_id, "recovering", "1").await;
            }
        }
        if let Committed::New(_) = committed {
            metrics::counter!(m::HOLDS_CONFIRMED).increment(1);
            metrics::counter!(m::SOLD_UNITS).increment(u64::from(rec.u));
        }
        let order = Order {
            order_id,
            hold_id: hold.to_string(),
            drop_id: def.drop_id.to_string(),
            fan: rec.fan.clone(),
            items: order_items(def, &rec.it),
            total_cents: total,
            currency: def.currency.clone(),
            created_at: OffsetDateTime::now_utc(),
        };
        Ok(Some((order, matches!(committed, Committed::New(_)))))
    }

    /// Captures an authorized payment; a failure leaves it `authorized` for the reconciler's
    /// capture round.
    async fn capture(&self, hold: &HoldId) {
        let timeout = ms(self.cfg.gateway.timeout_ms);
        match tokio::time::timeout(timeout, self.gateway.capture(hold)).await {
            Ok(Ok(())) => {
                let _ = self
                    .db
                    .set_payment_state(hold, PaymentState::Captured)
                    .await;
            }
            Ok(Err(e)) => {
                tracing::warn!(%hold, error = %e, "capture failed; retried by the reconciler")
            }
            Err(_) => tracing::warn!(%hold, "capture timed out; retried by the reconciler"),
        }
    }

    /// Voids the attempt at the gateway and reverts the hold, if that attempt is still the one
    /// confirming it.
    async fn void_and_revert(&self, hold: &HoldId, reference: &str) -> Result<()> {
        let _ =
            tokio::time::timeout(ms(self.cfg.gateway.timeout_ms), self.gateway.void(hold)).await;
        let _ = self.db.set_payment_state(hold, PaymentState::Voided).await;
        self.redis.confirm_revert(hold, reference).await?;
        Ok(())
    }

    /// The payment row belongs to another attempt than the one confirming under `reference`.
    /// If the hold is still confirming under it, that attempt never recorded its payment (a
    /// Postgres or process failure between confirm_begin and begin_payment) and so never reached
    /// the gateway, which comes after: the row and the gateway's record are an earlier attempt's,
    /// already ended, so only the hold goes back. Leaving it would keep it `confirming` for good,
    /// its units out of stock. If the hold moved on, a newer attempt owns the row: not ours.
    async fn revert_unrecorded(&self, hold: &HoldId, reference: &str) -> Result<()> {
        match self.redis.hold(hold).await? {
            Some(now)
                if now.st == HoldState::Confirming
                    && now.reference.as_deref() == Some(reference) =>
            {
                tracing::info!(%hold, "reverting a confirm attempt that never recorded its payment");
                self.redis.confirm_revert(hold, reference).await?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn existing_order(&self, hold: &HoldId, fan: &FanId) -> Result<Order> {
        match self.db.order_by_hold(hold).await? {
            Some(o) if o.fan == fan.as_str() => Ok(o),
            _ => Err(Error::new(Code::UnknownHold)),
        }
    }

    /// Another process is confirming this hold with the same reference: wait a little for it.
    async fn wait_other_confirm(&self, hold: &HoldId, fan: &FanId) -> ConfirmResult {
        let until = Instant::now() + ms(CONFIRM_WAIT_OTHER_MS);
        while Instant::now() < until {
            tokio::time::sleep(ms(100)).await;
            match self.redis.hold(hold).await? {
                Some(rec) if rec.st == HoldState::Sold => {
                    return self.existing_order(hold, fan).await.map(|o| (o, false))
                }
                Some(rec) if rec.st == HoldState::Confirming => continue,
                Some(rec) if rec.st == HoldState::Held => {
                    return Err(Error::new(Code::PaymentDeclined))
                }
                Some(_) => return Err(Error::new(Code::HoldExpired)),
                None => return Err(Error::new(Code::UnknownHold)),
            }
        }
        Err(payment_pending())
    }

    // ---- background work ------------------------------------------------------------------------

    fn watched_drops(&self) -> Vec<DropId> {
        let mut drops = lock(&self.watched).clone();
        let mut touched = lock(&self.touched);
        touched.retain(|_, at| at.elapsed() < TOUCHED_KEEP);
        for drop in touched.keys() {
            if !drops.contains(drop) {
                drops.push(drop.clone());
            }
        }
        drops
    }

    async fn refresh_watched(&self) {
        match self
            .db
            .live_drops(self.cfg.reconciler.max_drops_watched as i64)
            .await
        {
            Ok(drops) => *lock(&self.watched) = drops,
            Err(e) => tracing::debug!(error = %e, "could not refresh the watched drops"),
        }
    }

    /// Starts the sweeper, reconciler and watcher; they stop when `shutdown` turns true.
    pub fn spawn_background(
        self: &Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        let e = self.clone();
        tasks.push(tokio::spawn(every(
            ms(self.cfg.holds.sweep_interval_ms),
            shutdown.clone(),
            move || {
                let e = e.clone();
                async move { e.sweep().await }
            },
        )));
        let e = self.clone();
        tasks.push(tokio::spawn(every(
            ms(self.cfg.reconciler.interval_ms),
            shutdown.clone(),
            move || {
                let e = e.clone();
                async move { e.reconcile().await }
            },
        )));
        let e = self.clone();
        let last_refresh = Arc::new(Mutex::new(None::<Instant>));
        tasks.push(tokio::spawn(every(
            ms(self.cfg.reconciler.watch_interval_ms),
            shutdown,
            move || {
                let (e, last_refresh) = (e.clone(), last_refresh.clone());
                async move {
                    let stale = lock(&last_refresh).is_none_or(|t| t.elapsed() >= WATCHED_REFRESH);
                    if stale {
                        e.refresh_watched().await;
                        *lock(&last_refresh) = Some(Instant::now());
                    }
                    e.watch_redis().await
                }
            },
        )));
        tasks
    }

    /// One sweep: every watched drop's overdue holds back to stock, in bounded batches.
    pub async fn sweep(&self) {
        for drop in self.watched_drops() {
            for _ in 0..SWEEP_ROUNDS_MAX {
                match self.redis.expire(&drop, self.cfg.holds.sweep_batch).await {
                    Ok((expired, more)) => {
                        if expired > 0 {
                            metrics::counter!(m::HOLDS_EXPIRED).increment(expired as u64);
                        }
                        if more == 0 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%drop, error = %e, "sweep of this drop failed");
                        break;
                    }
                }
            }
        }
    }

    /// One reconciler round: every watched drop's overdue confirms, then captures that failed.
    pub async fn reconcile(&self) {
        for drop in self.watched_drops() {
            if let Err(e) = self.reconcile_drop(&drop).await {
                tracing::debug!(%drop, error = %e, "reconciling this drop stopped");
            }
        }
        match self.db.uncaptured(self.cfg.reconciler.batch as i64).await {
            Ok(holds) => {
                for hold in holds {
                    self.capture(&hold).await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "capture round skipped"),
        }
    }

    /// Settles confirming holds past their confirm deadline: an order in Postgres → sold; else the
    /// gateway says: authorized → commit and sell; declined or unknown → void and revert. A
    /// gateway that doesn't answer leaves the hold for the next round. Postgres arbitrates with a
    /// request still committing the same attempt (maybe on another instance): the payment leaves
    /// `pending` once, to `authorized` (the commit) or `voided` (here).
    pub async fn reconcile_drop(&self, drop: &DropId) -> Result<usize> {
        let overdue = self
            .redis
            .overdue_confirming(drop, now_ms(), self.cfg.reconciler.batch)
            .await?;
        metrics::gauge!(m::CONFIRMING_BACKLOG).set(overdue.len() as f64);
        if overdue.is_empty() {
            return Ok(0);
        }
        let def = self.drop_def(drop).await?;
        let timeout = ms(self.cfg.gateway.timeout_ms);
        let mut settled = 0;
        for hold in overdue {
            if lock(&self.inflight).contains_key(&hold) {
                continue;
            }
            let Some(rec) = self.redis.hold(&hold).await? else {
                continue;
            };
            if rec.st != HoldState::Confirming {
                continue;
            }
            let reference = match rec.reference.clone() {
                Some(r) => r,
                None => self.db.payment_reference(&hold).await?.unwrap_or_default(),
            };
            if let Some(order) = self.db.order_by_hold(&hold).await? {
                self.capture(&hold).await;
                self.redis.confirm_finish(&hold, order.order_id).await?;
            } else {
                let lookup =
                    match tokio::time::timeout(timeout, self.gateway.lookup(&hold, &reference))
                        .await
                    {
                        Ok(Ok(l)) => l,
                        // No answer is not "unknown": voiding a payment that may have gone through
                        // would sell nothing while the fan was charged. Try again next round.
                        _ => continue,
                    };
                match lookup {
                    Lookup::Authorized | Lookup::Captured => {
                        self.commit_and_finish(&def, &hold, &rec).await?;
                    }
                    Lookup::Declined | Lookup::Voided | Lookup::Unknown => {
                        match self.db.void_pending_payment(&hold, &reference).await? {
                            // An order is landing for this attempt: the next round finishes it.
                            Voiding::Was(PaymentState::Authorized | PaymentState::Captured) => {
                                continue
                            }
                            Voiding::Superseded => {
                                self.revert_unrecorded(&hold, &reference).await?
                            }
                            Voiding::NoPayment | Voiding::Was(_) => {
                                self.void_and_revert(&hold, &reference).await?
                            }
                        }
                    }
                }
            }
            metrics::counter!(m::RECONCILED).increment(1);
            settled += 1;
        }
        Ok(settled)
    }

    /// A drop missing from Redis, left `recovering`, or loaded in an earlier Redis run (a restart
    /// or failover may have lost its last writes) → that drop recovers. Comparing each drop's
    /// stamped run id, rather than remembering the last one seen, also catches a restart that
    /// happened while this process was down.
    async fn watch_redis(&self) {
        let Ok(run_id) = self.redis.run_id().await else {
            return;
        };
        for drop in self.watched_drops() {
            let needs = match self.redis.drop_state(&drop).await {
                Ok(Some(state)) => state.recovering || state.run_id != run_id,
                Ok(None) => true,
                Err(_) => return,
            };
            if needs {
                if let Err(e) = self.recover(&drop).await {
                    tracing::warn!(%drop, error = %e, "recovery failed; retrying next round");
                }
            }
        }
    }

    fn start_recovery(&self, drop: &DropId) {
        // The watcher does the work; this makes sure it looks at this drop soon.
        self.watch_drop(drop);
    }

    /// Recovery (and the rebuild command): make the drop's Redis state agree with Postgres.
    /// Reserves and confirms answer 503 `recovering` until it is done.
    pub async fn recover(&self, drop: &DropId) -> Result<(i64, i64)> {
        {
            let mut r = lock(&self.recovering);
            if r.get(drop)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
            {
                return Ok((0, 0));
            }
            r.insert(drop.clone(), Instant::now());
        }
        let mut result = self.recover_inner(drop).await;
        // An order committed meanwhile for a hold Redis had lost is in neither the rebuild nor
        // Redis: Postgres' sold counts moved during the rebuild → rebuild again.
        for _ in 1..RECOVER_ROUNDS_MAX {
            match result {
                Ok((_, _, false)) => result = self.recover_inner(drop).await,
                _ => break,
            }
        }
        lock(&self.recovering).remove(drop);
        let (kept, ended, settled) = result?;
        if !settled {
            // Still moving: leave it `recovering`, the watcher comes back to it.
            self.redis.set_meta(drop, "recovering", "1").await?;
        }
        Ok((kept, ended))
    }

    /// One rebuild; the bool says whether Postgres' sold counts stayed as read while it ran.
    async fn recover_inner(&self, drop: &DropId) -> Result<(i64, i64, bool)> {
        self.redis.set_meta(drop, "recovering", "1").await?;
        let (def, status) = self
            .db
            .drop_def(drop)
            .await?
            .ok_or_else(|| Error::new(Code::UnknownDrop))?;
        let holds = self.redis.hold_ids(drop).await?;
        let sold = self.db.sold_state(drop, &holds).await?;
        let mut payload = self.redis_payload(&def, &status);
        payload["meta"]["recovering"] = json!("1");
        payload["buckets"] = json!(def
            .buckets
            .iter()
            .map(|b| json!([b.id, b.total, sold.sold.get(&b.id).copied().unwrap_or(0)]))
            .collect::<Vec<_>>());
        payload["sold_seats"] = json!(sold.sold_seats);
        // Maps, even empty, serialize as JSON objects, which is what rebuild.lua indexes.
        payload["bought"] = json!(sold.bought);
        payload["orders"] = json!(sold.orders);
        let admission = self.admission_settings(drop).await?;
        self.redis
            .set_admission(drop, admission_fields(&admission))
            .await?;
        let (kept, ended) = self.redis.rebuild(drop, &payload).await?;
        let settled = self.db.sold_state(drop, &[]).await?.sold == sold.sold;
        let _ = self
            .db
            .record_rebuild(
                drop,
                &format!("recovered: {kept} live holds kept, {ended} ended"),
            )
            .await;
        metrics::counter!(m::RECOVERIES).increment(1);
        tracing::info!(%drop, kept, ended, settled, "drop recovered from Postgres");
        Ok((kept, ended, settled))
    }

    pub async fn ready(&self) -> Result<()> {
        self.redis.ping().await?;
        self.db.ping().await
    }
}

/// Runs `f` every `period` until shutdown.
async fn every<F, Fut>(period: Duration, mut shutdown: watch::Receiver<bool>, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => f().await,
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

fn admission_fields(s: &AdmissionSettings) -> Vec<(String, String)> {
    vec![
        (
            "mode".into(),
            match s.mode {
                AdmissionMode::Open => "open",
                AdmissionMode::Queue => "queue",
            }
            .into(),
        ),
        ("rate_per_s".into(), s.rate_per_s.to_string()),
        ("burst".into(), s.burst.to_string()),
        ("max_active".into(), s.max_active.to_string()),
        ("paused".into(), if s.paused { "1" } else { "0" }.into()),
        ("shop_window_s".into(), s.shop_window_s.to_string()),
        ("admit_margin_pct".into(), s.admit_margin_pct.to_string()),
        ("leave_grace_s".into(), s.leave_grace_s.to_string()),
    ]
}

/// A hold or order whose drop doesn't exist is itself unknown; other errors (503s) stay as they are.
fn not_found_as(e: Error, code: Code) -> Error {
    if matches!(e.code, Code::UnknownDrop | Code::Forbidden) {
        Error::new(code)
    } else {
        e
    }
}

/// 503 `recovering`: the drop's Redis state is being rebuilt from Postgres.
pub(crate) fn recovering() -> Error {
    Error::new(Code::Recovering).retry_after(Duration::from_secs(1))
}

fn payment_pending() -> Error {
    Error::new(Code::PaymentPending).retry_after(Duration::from_secs(2))
}

/// Parses a JSON body: syntax errors are 400 `malformed_json`, wrong shapes 422 `invalid_request`.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
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

/// Items with prices as the API shows them, and their total.
fn priced_items(def: &DropDef, items: &[HoldItem]) -> (Vec<Value>, i64) {
    let mut total = 0i64;
    let out = items
        .iter()
        .map(|i| {
            let price = def.bucket(&i.b).map_or(0, |b| b.price_cents);
            total += price * i64::from(i.q);
            match &i.s {
                Some(seat) => json!({"seat": seat, "section": i.b, "price_cents": price}),
                None => json!({"sku": i.b, "quantity": i.q, "price_cents": price}),
            }
        })
        .collect();
    (out, total)
}

/// A hold's items as an order shows them.
fn order_items(def: &DropDef, items: &[HoldItem]) -> Vec<OrderItem> {
    items
        .iter()
        .map(|i| OrderItem {
            sku: (def.kind == Kind::Ga).then(|| i.b.clone()),
            section: (def.kind == Kind::Seated).then(|| i.b.clone()),
            seat: i.s.clone(),
            quantity: i.q as i32,
            price_cents: def.bucket(&i.b).map_or(0, |b| b.price_cents),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_settings() -> AdmissionSettings {
        serde_json::from_value(json!({"mode": "queue", "rate_per_s": 5.0, "max_active": 50}))
            .unwrap()
    }

    fn update(body: Value) -> AdmissionUpdate {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn an_admission_update_sets_only_what_it_names() {
        let drop = drop_settings();
        let s = update(json!({"paused": true}))
            .applied_to(None, &drop)
            .unwrap();
        assert_eq!(
            s,
            AdmissionSettings {
                paused: true,
                ..drop.clone()
            }
        );
        let s = update(json!({
            "rate_per_s": 2.5, "burst": 3, "max_active": 7, "paused": false, "shop_window_s": 60,
            "admit_margin_pct": 0, "leave_grace_s": 30
        }))
        .applied_to(None, &drop)
        .unwrap();
        assert_eq!(
            s,
            AdmissionSettings {
                mode: AdmissionMode::Queue,
                rate_per_s: 2.5,
                burst: 3,
                max_active: 7,
                paused: false,
                shop_window_s: 60,
                admit_margin_pct: 0,
                leave_grace_s: 30,
            }
        );
        // An empty update changes nothing.
        assert_eq!(update(json!({})).applied_to(None, &drop).unwrap(), drop);
    }

    #[test]
    fn an_admission_update_builds_on_the_stored_settings() {
        let drop = drop_settings();
        let stored = AdmissionSettings {
            paused: true,
            burst: 40,
            ..drop.clone()
        };
        let s = update(json!({"rate_per_s": 1.0}))
            .applied_to(Some(serde_json::to_value(&stored).unwrap()), &drop)
            .unwrap();
        assert_eq!(
            s,
            AdmissionSettings {
                rate_per_s: 1.0,
                ..stored
            }
        );
        // Stored settings that no longer parse give way to the drop's own.
        let s = update(json!({"burst": 9}))
            .applied_to(Some(json!({"mode": "queue", "rate": 3})), &drop)
            .unwrap();
        assert_eq!(s, AdmissionSettings { burst: 9, ..drop });
    }

    #[test]
    fn an_admission_update_past_a_bound_is_refused() {
        let drop = drop_settings();
        for (body, says) in [
            (json!({"rate_per_s": 0.0}), "rate_per_s"),
            (json!({"rate_per_s": 100001.0}), "rate_per_s"),
            (json!({"burst": 0}), "burst"),
            (json!({"max_active": 0}), "max_active"),
            (json!({"shop_window_s": 9}), "shop_window_s"),
            (json!({"admit_margin_pct": 1001}), "admit_margin_pct"),
            (json!({"leave_grace_s": 14}), "leave_grace_s"),
        ] {
            let err = update(body.clone())
                .applied_to(None, &drop)
                .expect_err("refused");
            assert_eq!(err.code, Code::InvalidRequest, "{body}");
            assert!(err.message.contains(says), "{body}: {err}");
        }
        // Neither an unknown field nor the mode (fixed at creation) can be sent.
        for body in [
            json!({"rate": 5}),
            json!({"mode": "open"}),
            json!({"burst": -1}),
        ] {
            assert!(
                serde_json::from_value::<AdmissionUpdate>(body.clone()).is_err(),
                "{body}"
            );
        }
    }
}
