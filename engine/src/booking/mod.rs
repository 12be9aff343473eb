//! The booking engine: what booking-api's handlers call. Drops, reserves, releases, confirms
//! (the hold lifecycle in docs/ARCHITECTURE.md), and the background work that keeps Redis honest:
//! the sweeper (expiry), the reconciler (confirms that stopped halfway) and the watcher (Redis
//! restarts and lost drops → recovery from Postgres).
//!
//! # Layout
//! - this file — the [`Engine`] itself: what it owns, starting it, readiness.
//! - `drops.rs` — sellers' drops: creating, loading into Redis, closing; ops' admission settings.
//! - `lookups.rs` — unknown drop ids remembered briefly, and the budget of Postgres reads of
//!   drops not cached yet.
//! - `holds.rs` — a fan's reserve and release.
//! - `confirm.rs` — paying for a hold: confirm begin, payment, the order's commit, finish or revert.
//! - `background.rs` — the sweeper, the reconciler, the Redis watcher, recovery and the archiver.
//! - `orders.rs` — a drop's orders for its seller: search, pages, the CSV export.
//! - `refunds.rs` — refunds of an order: recorded, paid back, units returned to stock; the round
//!   that resumes those left unfinished.
//! - `views.rs` — what the engine shows: drops, seats, holds, orders, a drop's audit log and the
//!   public catalogue.
//! - `seatmap.rs` — seat maps served from one snapshot per drop and process, read once per
//!   refresh however many pages poll.

mod background;
mod cancel;
mod confirm;
mod drops;
mod holds;
mod lookups;
mod orders;
mod refunds;
mod seatmap;
mod views;

pub use cancel::{CancelDrop, CancellationState, CancellationView};
use confirm::Inflight;
pub use confirm::{ConfirmBody, Payment};
use drops::admission_fields;
pub use drops::{AddStock, AdmissionUpdate, StockView};
pub use orders::{
    csv_cell, OrderCursor, OrderSearch, OrdersPage, SellerOrder, ORDERS_CSV_HEADER, ORDERS_PAGE_SQL,
};
pub use refunds::{RefundItem, RefundList, RefundRequest, RefundState, RefundView};
pub use seatmap::SeatsView;
use views::priced_items;
pub use views::{
    AdmissionModeView, AdmissionView, AuditPage, Catalogue, CatalogueDrop, DropList, DropSummary,
    DropView, FanHolds, FanOrders, HoldView, InventoryView, Made, PricedItem, RowView,
};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::config::{ms, Config};
use crate::db::{ApiKey, Db, Order, OrderItem, Scope, Unsettled, Voiding};
use crate::drops::{
    AdmissionMode, AdmissionSettings, CreateDrop, DropDef, HoldRequest, HoldRequestBody, Kind,
};
use crate::error::{Code, Error, Result};
use crate::ids::{DropId, FanId, HoldId, IdempotencyKey, OrderId, PaymentReference};
use crate::metrics as m;
use crate::payments::{GatewayError, Lookup, PaymentGateway, PaymentState, TestGateway};
use crate::scripts::{
    ConfirmBegin, DropImage, Finish, HoldItem, HoldRecord, HoldState, RebuildReport, Redis,
    ReserveArgs, Reserved,
};
use crate::tokens::{now_ms, sha256_hex, AdmissionKeys, FanAuth};
use crate::writer::{Committed, NewItem, NewOrder, Writer};

/// Which server an engine runs in; each starts only what it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// booking-api: applies migrations, writes orders, runs the background work.
    Booking,
    /// queue-server: reads drops and runs the waiting room; no writer, no migrations.
    Queue,
}

/// The façade both servers use: its fields are the crate's, so a server reaches Redis and Postgres
/// only through the engine's methods (tests get [`Engine::redis`] and [`Engine::db`] under the
/// `testing` feature, which only test builds turn on).
pub struct Engine {
    pub(crate) cfg: Config,
    pub(crate) redis: Redis,
    pub(crate) db: Db,
    /// The order writer: booking-api's only ([`Role::Queue`] sells nothing).
    writer: Option<Writer>,
    pub(crate) gateway: Arc<dyn PaymentGateway>,
    /// The same gateway as `gateway` when it's the test one, so tests can read its records.
    #[cfg(feature = "testing")]
    pub(crate) test_gateway: Option<Arc<TestGateway>>,
    pub(crate) fans: FanAuth,
    pub(crate) admission: AdmissionKeys,
    drops: Mutex<HashMap<DropId, Arc<DropDef>>>,
    /// Drop ids Postgres didn't know lately, and the budget of reads for uncached drops.
    lookups: Mutex<lookups::Lookups>,
    /// Postgres reads of a drop definition on a request's behalf (tests count them).
    drop_reads: std::sync::atomic::AtomicU64,
    drop_fills: crate::fill::FillGate<DropId>,
    /// Each seated drop's seat map as this process last read it, shared by every request.
    seat_maps: seatmap::SeatMaps,
    inflight: Mutex<HashMap<HoldId, Inflight>>,
    /// Drops the background tasks look after: Postgres' newest live drops…
    watched: Mutex<Vec<DropId>>,
    /// …plus every drop this process served lately, so its own drops are never crowded out.
    touched: Mutex<HashMap<DropId, Instant>>,
    recovering: Mutex<HashMap<DropId, Instant>>,
    /// Drops this process was asked to cancel: a process that looks after only the drops it
    /// served (`reconciler.watch_newest_drops = 0`) still works their jobs, archived ones
    /// included (booking/cancel.rs). Bounded by the running jobs asked of this process: a job
    /// leaves when done.
    cancelled_here: Mutex<std::collections::HashSet<DropId>>,
    /// What this process's rebuilds did ([`Engine::recovery_stats`]).
    recovery_stats: Mutex<RebuildReport>,
    /// Other instances' rebuilds in progress as this watcher last saw them: (token, slices done)
    /// and since when unchanged.
    rebuilds_seen: Mutex<HashMap<DropId, background::SeenRebuild>>,
    /// Which drops' sweep and reconcile rounds run here (docs/ARCHITECTURE.md, "Many
    /// instances").
    pub(crate) round_leases: crate::lease::Leases,
    /// How long each Redis node has looked quiet to the AOF policy (engine::aof).
    aof_quiet: crate::aof::QuietWatch,
    /// The per-drop gauges' last round as Prometheus text (engine::drop_metrics).
    pub(crate) drop_gauges: Mutex<String>,
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
    /// booking-api's engine: connects Redis and Postgres, applies migrations, starts the order
    /// writer.
    pub async fn start(cfg: Config) -> Result<Arc<Engine>> {
        Self::start_as(cfg, Role::Booking).await
    }

    /// An engine for `role`: the waiting room's neither migrates Postgres (booking-api owns the
    /// schema; this one refuses to start on an unmigrated one) nor starts an order writer.
    pub async fn start_as(cfg: Config, role: Role) -> Result<Arc<Engine>> {
        cfg.validate()?;
        let redis = Redis::connect(&cfg.redis)
            .await?
            .with_seat_map_steps(cfg.seats.map_scan_chunk, cfg.seats.map_read_bytes);
        let db = Db::connect(&cfg.database)?;
        let writer = match role {
            Role::Booking => {
                db.migrate().await?;
                Some(Writer::spawn(db.clone(), &cfg.writer))
            }
            Role::Queue => {
                db.check_migrated().await?;
                None
            }
        };
        let test = Arc::new(
            TestGateway::new(ms(cfg.gateway.test_slow_ms)).with_call_latency(
                ms(cfg.gateway.test_call_min_ms),
                ms(cfg.gateway.test_call_max_ms),
            ),
        );
        let fans = FanAuth::new(&cfg.identity)?;
        let admission = AdmissionKeys::new(&cfg.admission);
        Ok(Arc::new(Engine {
            redis,
            db,
            writer,
            #[cfg(feature = "testing")]
            test_gateway: Some(test.clone()),
            gateway: test,
            fans,
            admission,
            drops: Mutex::new(HashMap::new()),
            lookups: Mutex::new(lookups::Lookups::new(&cfg.drops)),
            drop_reads: Default::default(),
            drop_fills: Default::default(),
            seat_maps: Default::default(),
            inflight: Mutex::new(HashMap::new()),
            watched: Mutex::new(Vec::new()),
            touched: Mutex::new(HashMap::new()),
            cancelled_here: Mutex::new(Default::default()),
            recovering: Mutex::new(HashMap::new()),
            recovery_stats: Mutex::new(RebuildReport::default()),
            rebuilds_seen: Mutex::new(HashMap::new()),
            round_leases: crate::lease::Leases::new("rounds", cfg.reconciler.round_lease_ms),
            aof_quiet: crate::aof::QuietWatch::default(),
            drop_gauges: Mutex::new(String::new()),
            cfg,
        }))
    }

    /// The configuration this engine runs with.
    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    /// Fan identity: verifying fan tokens, and the dev identity provider.
    pub fn fans(&self) -> &FanAuth {
        &self.fans
    }

    /// Closes the Redis pool (at shutdown, after the last request).
    pub async fn close(&self) {
        // Another instance takes this one's drops' rounds over at once, not a lease later.
        self.round_leases.release_all(&self.redis).await;
        self.redis.quit().await;
    }

    /// The SHA-1 of lua/reserve.lua as loaded (for `redis-benchmark`'s EVALSHA).
    pub fn reserve_script_sha(&self) -> String {
        self.redis.reserve_sha()
    }

    /// The name of the reserve function the engine calls (for `redis-benchmark`'s FCALL).
    pub fn reserve_function(&self) -> String {
        self.redis.reserve_function()
    }

    /// The live drops the background work looks after at most (`reconciler.max_drops_watched`),
    /// newest first: what `booking-api rebuild` rebuilds when given no drop.
    pub async fn live_drops(&self) -> Result<Vec<DropId>> {
        self.db
            .live_drops(self.cfg.reconciler.max_drops_watched as i64)
            .await
    }

    /// Creates an API key for `scope` (applying migrations first, so it works on a new
    /// database) and returns it whole; only its hash is stored.
    pub async fn create_key(cfg: &Config, scope: Scope, name: &str) -> Result<String> {
        let db = Db::connect(&cfg.database)?;
        db.migrate().await?;
        db.create_key(scope, name).await
    }

    /// An API key of either scope (401 if missing or unknown), for what sellers and ops may
    /// both read: the handler checks what the scope allows.
    pub async fn any_api_key(&self, token: &str) -> Result<ApiKey> {
        self.db
            .verify_key(token)
            .await?
            .ok_or_else(|| Error::msg(Code::Unauthorized, "Unknown or revoked API key."))
    }

    /// The API key `token` names, if it has `scope`: 401 when unknown or revoked, 403 when it
    /// has another scope.
    pub async fn api_key(&self, token: &str, scope: Scope) -> Result<ApiKey> {
        let key = self
            .db
            .verify_key(token)
            .await?
            .ok_or_else(|| Error::msg(Code::Unauthorized, "Unknown or revoked API key."))?;
        if key.scope != scope {
            return Err(Error::msg(
                Code::Forbidden,
                format!("This needs a {} key.", scope.as_str()),
            ));
        }
        Ok(key)
    }

    /// This process' per-drop round leases: (asked, held) as [`crate::lease::Leases::counts`].
    pub fn round_lease_counts(&self) -> (u64, u64) {
        self.round_leases.counts()
    }

    /// Redis, for tests that look behind the engine.
    #[cfg(feature = "testing")]
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Postgres, for tests that look behind the engine.
    #[cfg(feature = "testing")]
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// How many times [`Engine::drop_def`] has read Postgres, for tests that check a flood of
    /// unknown drop ids stays away from it.
    #[cfg(feature = "testing")]
    pub fn drop_reads(&self) -> u64 {
        self.drop_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many times this process has read a seat map whole (from Redis, or Postgres once
    /// archived), for tests that check a crowd of requests shares one read.
    #[cfg(feature = "testing")]
    pub fn seat_map_reads(&self) -> u64 {
        self.seat_maps.reads()
    }

    /// The test gateway's records, for tests (when the engine pays through it).
    #[cfg(feature = "testing")]
    pub fn test_gateway(&self) -> Option<&Arc<TestGateway>> {
        self.test_gateway.as_ref()
    }

    pub async fn ready(&self) -> Result<()> {
        self.redis.ping().await?;
        self.db.ping().await
    }
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
