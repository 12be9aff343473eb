//! The Postgres store: migrations, API keys, drops and their inventory, payments, orders and the
//! ledger. Postgres is the truth for what was sold; its constraints (migrations/0001_init.sql) are
//! the last guard. Confirmed orders are written by [`crate::writer`] in grouped transactions.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Timeouts};
use serde::Serialize;
use time::OffsetDateTime;
use tokio_postgres::NoTls;

use crate::config::DatabaseConfig;
use crate::drops::DropDef;
use crate::error::{Code, Error, Result};
use crate::ids::{DropId, FanId, HoldId, OrderId, RequestId};
use crate::payments::PaymentState;
use crate::tokens::sha256_hex;

/// Versioned migrations, applied in order at start under an advisory lock (so many processes
/// starting at once apply each exactly once).
/// A schema change that a rolling deploy runs beside the previous release adds the new shape
/// first; a later migration drops the old one (docs/OPERATIONS.md, "Schema changes").
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "payment_attempts",
        include_str!("../../migrations/0002_payment_attempts.sql"),
    ),
    (
        3,
        "archive",
        include_str!("../../migrations/0003_archive.sql"),
    ),
    (
        4,
        "line_marks",
        include_str!("../../migrations/0004_line_marks.sql"),
    ),
    (5, "audit", include_str!("../../migrations/0005_audit.sql")),
    (
        6,
        "restock",
        include_str!("../../migrations/0006_restock.sql"),
    ),
    (
        7,
        "refunds",
        include_str!("../../migrations/0007_refunds.sql"),
    ),
    (
        8,
        "orders_index",
        include_str!("../../migrations/0008_orders_index.sql"),
    ),
    (
        9,
        "refund_states",
        include_str!("../../migrations/0009_refund_states.sql"),
    ),
    (
        10,
        "drop_cancellations",
        include_str!("../../migrations/0010_drop_cancellations.sql"),
    ),
];
const MIGRATION_LOCK_ID: i64 = 0x466c_6f6f_6467;

/// A waiting room's high-water marks (migrations/0004_line_marks.sql): the join counter, the
/// highest place admitted, admissions ever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineMarks {
    pub seq: i64,
    pub place: i64,
    pub admitted: i64,
}

/// What [`Db::void_attempt`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Voiding {
    /// The attempt had recorded no payment (so it never reached the gateway); it is recorded
    /// `voided` now, so its insert, should it still land, finds it ended.
    Unrecorded,
    /// The attempt's state before; `Pending` means it is `Voiding` now.
    Was(PaymentState),
}

/// A payment attempt that hasn't settled: `pending` (in flight, or left halfway) or `voiding`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsettled {
    pub hold: HoldId,
    pub reference: String,
    pub fan: String,
    pub amount_cents: i64,
    pub state: PaymentState,
    /// Since the attempt was recorded, by Postgres' clock.
    pub age_ms: i64,
}

#[derive(Clone)]
pub struct Db {
    pool: Pool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Seller,
    Ops,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Seller => "seller",
            Scope::Ops => "ops",
        }
    }
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "seller" => Some(Scope::Seller),
            "ops" => Some(Scope::Ops),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiKey {
    pub key_id: String,
    pub scope: Scope,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrderItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seat: Option<String>,
    pub quantity: i32,
    pub price_cents: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Order {
    pub order_id: OrderId,
    pub hold_id: String,
    pub drop_id: String,
    pub fan: String,
    pub items: Vec<OrderItem>,
    pub total_cents: i64,
    pub currency: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// One entry of a drop's audit log (migrations/0005_audit.sql): an admission change or a close.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub entry_id: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The key that made the change (its id; the secret is never stored).
    pub key_id: String,
    /// `admission`, `close` or `cancel` (migrations/0010_drop_cancellations.sql).
    pub action: String,
    /// `{"field": {"before": …, "after": …}}` per field changed; `null` on rows an older
    /// release wrote (their `settings` says what the settings became).
    pub changes: Option<serde_json::Value>,
    /// An admission change's whole settings after it; `null` for a close.
    pub settings: Option<serde_json::Value>,
}

/// An open drop the public catalogue lists.
#[derive(Debug, Clone)]
pub struct CatalogueRow {
    pub drop_id: DropId,
    pub name: String,
    pub currency: String,
    pub opens_at: OffsetDateTime,
    /// Open already (on sale) rather than coming soon.
    pub opened: bool,
    /// Behind queue-server's waiting room.
    pub queue: bool,
    pub from_price_cents: Option<i64>,
    /// Postgres has sold every unit.
    pub sold_out: bool,
}

/// Postgres' view of one drop, for recovery.
#[derive(Debug, Default)]
pub struct SoldState {
    pub sold: HashMap<String, i64>,
    pub sold_seats: Vec<String>,
    pub bought: HashMap<String, i64>,
    /// Hold id → order id, for the holds asked about.
    pub orders: HashMap<String, String>,
}

impl Db {
    pub fn connect(cfg: &DatabaseConfig) -> Result<Db> {
        let pg: tokio_postgres::Config = cfg
            .url
            .parse()
            .map_err(|e| Error::invalid(format!("database.url: {e}")))?;
        let mut pg = pg;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        pg.connect_timeout(timeout);
        // A dead peer is noticed by TCP keepalive, a stuck statement by Postgres itself.
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_millis(cfg.keepalive_idle_ms));
        // Added to the URL's own `options` (e.g. a search_path), not in their place.
        let statement_timeout = format!("-c statement_timeout={}", cfg.statement_timeout_ms);
        let options = match pg.get_options() {
            Some(own) if !own.is_empty() => format!("{own} {statement_timeout}"),
            _ => statement_timeout,
        };
        pg.options(options);
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size.max(2))
            .timeouts(Timeouts {
                wait: Some(timeout),
                create: Some(timeout),
                recycle: Some(timeout),
            })
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| Error::invalid(format!("database: {e}")))?;
        Ok(Db { pool })
    }

    pub async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }

    pub async fn ping(&self) -> Result<()> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    pub async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_ID])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        for (version, name, sql) in MIGRATIONS {
            let done = tx
                .query_opt(
                    "SELECT 1 FROM schema_migrations WHERE version = $1",
                    &[version],
                )
                .await?;
            if done.is_none() {
                tracing::info!(version, name, "applying migration");
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    &[version, name],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Whether every migration this build knows is applied (for servers that don't migrate).
    pub async fn check_migrated(&self) -> Result<()> {
        let client = self.client().await?;
        let applied: Option<i32> = match client
            .query_one("SELECT max(version) FROM schema_migrations", &[])
            .await
        {
            Ok(row) => row.get(0),
            // No schema_migrations table yet: nothing was applied.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
            Err(e) => return Err(e.into()),
        };
        let latest = MIGRATIONS.iter().map(|(v, _, _)| *v).max();
        if applied.is_some() && applied >= latest {
            return Ok(());
        }
        Err(Error::msg(
            Code::Unavailable,
            format!(
                "Postgres' schema is at migration {applied:?}, this build needs {latest:?}: \
                 start booking-api first (it applies migrations)"
            ),
        )
        .retry_after(std::time::Duration::from_secs(1)))
    }

    // ---- API keys --------------------------------------------------------------------------------

    /// Makes a key and returns it whole (`fgk_<id>_<secret>`); only its hash is stored.
    pub async fn create_key(&self, scope: Scope, name: &str) -> Result<String> {
        let key_id = format!("{:012x}", rand::random::<u64>() >> 16);
        let secret = hex::encode(rand::random::<[u8; 24]>());
        let key = format!("fgk_{key_id}_{secret}");
        self.client()
            .await?
            .execute(
                "INSERT INTO api_keys (key_id, scope, name, key_sha256) VALUES ($1, $2, $3, $4)",
                &[&key_id, &scope.as_str(), &name, &sha256_hex(key.as_bytes())],
            )
            .await?;
        Ok(key)
    }

    pub async fn verify_key(&self, key: &str) -> Result<Option<ApiKey>> {
        let Some(key_id) = key
            .strip_prefix("fgk_")
            .and_then(|rest| rest.split('_').next())
        else {
            return Ok(None);
        };
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT scope, key_sha256 FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL",
                &[&key_id],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let stored: String = row.get(1);
        let given = sha256_hex(key.as_bytes());
        // Compare digests in constant time: a timing leak here would reveal a key's hash prefix.
        let same = stored.len() == given.len()
            && stored
                .bytes()
                .zip(given.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Ok(None);
        }
        let scope: String = row.get(0);
        Ok(Scope::parse(&scope).map(|scope| ApiKey {
            key_id: key_id.to_owned(),
            scope,
        }))
    }

    // ---- drops -----------------------------------------------------------------------------------

    pub async fn insert_drop(
        &self,
        def: &DropDef,
        seed: &str,
        definition: &serde_json::Value,
    ) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let admission = serde_json::to_value(&def.admission).map_err(Error::internal)?;
        tx.execute(
            "INSERT INTO drops (drop_id, seller_key_id, name, currency, kind, opens_at, per_fan_limit, hold_ttl_s, \
             admission, seed, seed_sha256, definition) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
            &[
                &def.drop_id.as_str(),
                &def.seller_key_id,
                &def.name,
                &def.currency,
                &def.kind.as_str(),
                &def.opens_at,
                &(def.per_fan_limit as i32),
                &((def.hold_ttl_ms / 1000) as i32),
                &admission,
                &seed,
                &def.seed_sha256,
                definition,
            ],
        )
        .await?;
        let inv = tx
            .prepare("INSERT INTO inventory (drop_id, bucket, name, price_cents, total) VALUES ($1,$2,$3,$4,$5)")
            .await?;
        let ledger = tx
            .prepare("INSERT INTO stock_ledger (drop_id, bucket, kind, delta_sold, note) VALUES ($1,$2,'load',0,$3)")
            .await?;
        for b in &def.buckets {
            tx.execute(
                &inv,
                &[
                    &def.drop_id.as_str(),
                    &b.id,
                    &b.name,
                    &b.price_cents,
                    &(b.total as i32),
                ],
            )
            .await?;
            tx.execute(
                &ledger,
                &[&def.drop_id.as_str(), &b.id, &format!("total {}", b.total)],
            )
            .await?;
        }
        if !def.buckets.iter().all(|b| b.rows.is_empty()) {
            // One statement per section: unnest keeps a 100,000-seat map to a handful of round trips.
            let stmt = tx
                .prepare(
                    "INSERT INTO seats (drop_id, seat_id, bucket, row_label, number) \
                     SELECT $1, s, $2, r, n FROM unnest($3::text[], $4::text[], $5::int[]) AS t(s, r, n)",
                )
                .await?;
            for b in &def.buckets {
                let (mut ids, mut rows, mut numbers) = (Vec::new(), Vec::new(), Vec::new());
                for (row, seats) in &b.rows {
                    for n in 1..=*seats {
                        ids.push(format!("{}-{}-{}", b.id, row, n));
                        rows.push(row.clone());
                        numbers.push(n as i32);
                    }
                }
                tx.execute(
                    &stmt,
                    &[&def.drop_id.as_str(), &b.id, &ids, &rows, &numbers],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// A drop's definition (as stored at creation) and its status.
    pub async fn drop_def(&self, drop: &DropId) -> Result<Option<(DropDef, String)>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT definition, status FROM drops WHERE drop_id = $1",
                &[&drop.as_str()],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let def: serde_json::Value = row.get(0);
        let def: DropDef = serde_json::from_value(def).map_err(Error::internal)?;
        Ok(Some((def, row.get(1))))
    }

    pub async fn seed(&self, drop: &DropId) -> Result<Option<String>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT seed FROM drops WHERE drop_id = $1",
                &[&drop.as_str()],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Raises a queue drop's kept line marks to these (never lowers them: instances report what
    /// they saw, in any order).
    pub async fn keep_line_marks(&self, drop: &DropId, marks: LineMarks) -> Result<()> {
        self.client()
            .await?
            .execute(
                "UPDATE drops SET line_seq_mark = GREATEST(line_seq_mark, $2), \
                 line_place_mark = GREATEST(line_place_mark, $3), \
                 line_admitted_mark = GREATEST(line_admitted_mark, $4) WHERE drop_id = $1",
                &[&drop.as_str(), &marks.seq, &marks.place, &marks.admitted],
            )
            .await?;
        Ok(())
    }

    /// A drop's kept line marks (zeros for an unknown drop, or one whose line never moved).
    pub async fn line_marks(&self, drop: &DropId) -> Result<LineMarks> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT line_seq_mark, line_place_mark, line_admitted_mark FROM drops \
                 WHERE drop_id = $1",
                &[&drop.as_str()],
            )
            .await?;
        Ok(row.map_or(LineMarks::default(), |r| LineMarks {
            seq: r.get(0),
            place: r.get(1),
            admitted: r.get(2),
        }))
    }

    pub async fn list_drops(
        &self,
        seller_key_id: &str,
        limit: i64,
    ) -> Result<Vec<(DropId, String)>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT drop_id, status FROM drops WHERE seller_key_id = $1 ORDER BY created_at DESC LIMIT $2",
                &[&seller_key_id, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((DropId::parse(r.get(0)).ok()?, r.get(1))))
            .collect())
    }

    /// Open drops and those closed in the last hour (holds may still be confirmed), newest first.
    pub async fn live_drops(&self, limit: i64) -> Result<Vec<DropId>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT drop_id FROM drops WHERE (status = 'open' OR closed_at > now() - interval '1 hour') \
                 AND archived_at IS NULL ORDER BY created_at DESC LIMIT $1",
                &[&limit],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| DropId::parse(r.get(0)).ok())
            .collect())
    }

    /// Closes the drop; the close is audited (by `key_id`) when the drop was open, so closing
    /// again adds nothing. One statement: two closes racing audit one close.
    pub async fn close_drop(&self, drop: &DropId, key_id: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                // `prior` locks the row, so a racing close waits and then sees it closed.
                "WITH prior AS (SELECT status FROM drops WHERE drop_id = $1 FOR NO KEY UPDATE), \
                 closed AS (UPDATE drops SET status = 'closed', closed_at = coalesce(closed_at, now()) \
                    WHERE drop_id = $1 RETURNING drop_id) \
                 INSERT INTO admission_audit (drop_id, key_id, action, changes) \
                 SELECT $1, $2, 'close', jsonb_build_object('status', \
                    jsonb_build_object('before', prior.status, 'after', 'closed')) \
                 FROM prior, closed WHERE prior.status <> 'closed'",
                &[&drop.as_str(), &key_id],
            )
            .await?;
        Ok(())
    }

    /// Adds `add` units to a SKU's total in Postgres with a `restock` ledger line, in one
    /// transaction (migrations/0006_restock.sql); returns the bucket's total after. With the
    /// `request_id` seen before (same SKU and units), adds nothing and returns the total as it is
    /// now (the caller raises Redis to it again: lua/restock.lua). Refuses a closed drop (the
    /// drop row is read `FOR SHARE`, so a racing close either waits for this or is seen) and a
    /// total past `max_total`.
    pub async fn restock(
        &self,
        drop: &DropId,
        bucket: &str,
        add: i64,
        request_id: &RequestId,
        max_total: i64,
    ) -> Result<Restocked> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let d = drop.as_str();
        let status: Option<String> = tx
            .query_opt(
                "SELECT status FROM drops WHERE drop_id = $1 FOR SHARE",
                &[&d],
            )
            .await?
            .map(|r| r.get(0));
        let Some(status) = status else {
            return Err(Error::new(Code::UnknownDrop));
        };
        // The row lock orders restocks of one SKU, so a retry that raced its first attempt reads
        // that attempt's ledger line below once it has committed.
        let total: i64 = tx
            .query_opt(
                "SELECT total::bigint FROM inventory WHERE drop_id = $1 AND bucket = $2 FOR UPDATE",
                &[&d, &bucket],
            )
            .await?
            .map(|r| r.get(0))
            .ok_or_else(|| Error::new(Code::UnknownSku))?;
        let request_id = request_id.as_str();
        let seen = tx
            .query_opt(
                "SELECT bucket, delta_total::bigint FROM stock_ledger \
                 WHERE drop_id = $1 AND kind = 'restock' AND request_id = $2",
                &[&d, &request_id],
            )
            .await?;
        if let Some(row) = seen {
            let (b, n): (String, i64) = (row.get(0), row.get(1));
            if b != bucket || n != add {
                return Err(Error::new(Code::IdempotencyKeyReused));
            }
            return Ok(Restocked {
                total,
                replay: true,
            });
        }
        if status != "open" {
            return Err(Error::new(Code::DropClosed));
        }
        if total + add > max_total {
            return Err(Error::invalid(format!(
                "the SKU's total would be {}, past the limit of {max_total}",
                total + add
            )));
        }
        let total: i64 = tx
            .query_one(
                "UPDATE inventory SET total = total + $3 WHERE drop_id = $1 AND bucket = $2 \
                 RETURNING total::bigint",
                &[&d, &bucket, &(add as i32)],
            )
            .await?
            .get(0);
        let inserted = tx
            .execute(
                "INSERT INTO stock_ledger (drop_id, bucket, kind, delta_sold, delta_total, request_id, note) \
                 VALUES ($1, $2, 'restock', 0, $3, $4, $5)",
                &[&d, &bucket, &(add as i32), &request_id, &format!("total now {total}")],
            )
            .await;
        match inserted {
            // The same request id for another SKU, committed since: not this request's twin.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                return Err(Error::new(Code::IdempotencyKeyReused));
            }
            r => r?,
        };
        tx.commit().await?;
        Ok(Restocked {
            total,
            replay: false,
        })
    }

    /// Records a refund of `order` (step 1 of a refund; migrations/0007_refunds.sql): `items`, or
    /// with `None` everything the order still has unrefunded. One transaction under the order
    /// row's lock, so racing refunds of one order are taken one at a time and never return more
    /// than it bought (409 `already_refunded` once nothing — or not that much — is left); the
    /// inventory rows are then locked in (drop, bucket) order, as the order writer locks them.
    /// The same `refund_id` again answers the refund as recorded (`new` false); with other items,
    /// 422 `idempotency_key_reused`.
    pub async fn record_refund(
        &self,
        order: OrderId,
        refund_id: &str,
        key_id: &str,
        items: Option<&[crate::scripts::HoldItem]>,
    ) -> Result<RefundRecord> {
        use crate::scripts::HoldItem;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT drop_id, fan_id, hold_id FROM orders WHERE order_id = $1 FOR UPDATE",
                &[&order.0],
            )
            .await?
            .ok_or_else(|| Error::new(Code::UnknownOrder))?;
        let (drop_id, fan_id, hold_id): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let decode = |v: serde_json::Value| -> Result<Vec<HoldItem>> {
            serde_json::from_value(v).map_err(Error::internal)
        };
        if let Some(r) = tx
            .query_opt(
                "SELECT items, amount_cents, state FROM refunds WHERE order_id = $1 AND refund_id = $2",
                &[&order.0, &refund_id],
            )
            .await?
        {
            let recorded = decode(r.get(0))?;
            if items.is_some_and(|asked| asked != recorded.as_slice()) {
                return Err(Error::new(Code::IdempotencyKeyReused));
            }
            return Ok(RefundRecord {
                refund_id: refund_id.to_owned(),
                order_id: order,
                hold_id,
                drop_id,
                fan_id,
                items: recorded,
                amount_cents: r.get(1),
                state: r.get(2),
                new: false,
            });
        }
        // What the order still has: (bucket, seat) → (units not refunded, price).
        let mut left: Vec<(HoldItem, i64)> = tx
            .query(
                "SELECT bucket, seat_id, (quantity - refunded)::bigint, price_cents FROM order_items \
                 WHERE order_id = $1 ORDER BY bucket, seat_id",
                &[&order.0],
            )
            .await?
            .iter()
            .map(|r| {
                let q: i64 = r.get(2);
                (
                    HoldItem {
                        b: r.get(0),
                        q: q as u32,
                        s: r.get(1),
                    },
                    r.get(3),
                )
            })
            .collect();
        let refunding: Vec<(HoldItem, i64)> = match items {
            None => {
                left.retain(|(i, _)| i.q > 0);
                left
            }
            Some(asked) => {
                let mut out: Vec<(HoldItem, i64)> = Vec::new();
                for a in asked {
                    let Some((have, price)) = left.iter().find(|(i, _)| i.b == a.b && i.s == a.s)
                    else {
                        return Err(Error::invalid(format!(
                            "the order has no item `{}`{}",
                            a.b,
                            a.s.as_deref()
                                .map(|s| format!(" seat `{s}`"))
                                .unwrap_or_default()
                        )));
                    };
                    if a.q == 0 || out.iter().any(|(o, _)| o.b == a.b && o.s == a.s) {
                        return Err(Error::invalid(
                            "each item once, with a quantity of at least 1",
                        ));
                    }
                    if a.q > have.q {
                        return Err(Error::new(Code::AlreadyRefunded));
                    }
                    out.push((a.clone(), *price));
                }
                out
            }
        };
        if refunding.is_empty() {
            return Err(Error::new(Code::AlreadyRefunded));
        }
        let mut buckets: Vec<String> = Vec::new();
        let mut seats: Vec<Option<String>> = Vec::new();
        let mut quantities: Vec<i32> = Vec::new();
        for (i, _) in &refunding {
            buckets.push(i.b.clone());
            seats.push(i.s.clone());
            quantities.push(i.q as i32);
        }
        tx.execute(
            "UPDATE order_items oi SET refunded = oi.refunded + t.q \
             FROM unnest($2::text[], $3::text[], $4::int[]) AS t(b, s, q) \
             WHERE oi.order_id = $1 AND oi.bucket = t.b AND oi.seat_id IS NOT DISTINCT FROM t.s",
            &[&order.0, &buckets, &seats, &quantities],
        )
        .await?;
        // Inventory rows in (drop, bucket) order, as the order writer takes them.
        tx.query(
            "SELECT 1 FROM inventory WHERE drop_id = $1 AND bucket = ANY($2) ORDER BY bucket FOR UPDATE",
            &[&drop_id, &buckets],
        )
        .await?;
        tx.execute(
            "WITH per AS (SELECT b, sum(q)::int AS q FROM unnest($2::text[], $3::int[]) AS t(b, q) GROUP BY b), \
             upd AS (UPDATE inventory i SET sold = i.sold - per.q FROM per \
                WHERE i.drop_id = $1 AND i.bucket = per.b) \
             INSERT INTO stock_ledger (drop_id, bucket, kind, delta_sold, order_id, note) \
             SELECT $1, b, 'refund', -q, $4, $5 FROM per",
            &[&drop_id, &buckets, &quantities, &order.0, &format!("refund {refund_id}")],
        )
        .await?;
        let units: i32 = quantities.iter().sum();
        tx.execute(
            "UPDATE fan_purchases SET units = units - $3 WHERE drop_id = $1 AND fan_id = $2",
            &[&drop_id, &fan_id, &units],
        )
        .await?;
        let amount_cents: i64 = refunding.iter().map(|(i, p)| i64::from(i.q) * p).sum();
        let items: Vec<HoldItem> = refunding.into_iter().map(|(i, _)| i).collect();
        tx.execute(
            "INSERT INTO refunds (order_id, refund_id, drop_id, fan_id, key_id, items, amount_cents) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &order.0,
                &refund_id,
                &drop_id,
                &fan_id,
                &key_id,
                &serde_json::to_value(&items).map_err(Error::internal)?,
                &amount_cents,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(RefundRecord {
            refund_id: refund_id.to_owned(),
            order_id: order,
            hold_id,
            drop_id,
            fan_id,
            items,
            amount_cents,
            state: "pending".into(),
            new: true,
        })
    }

    /// Moves a refund from state `from` to `to`; a late or repeated write changes nothing.
    /// Returns whether it moved.
    pub async fn set_refund_state(
        &self,
        order: OrderId,
        refund_id: &str,
        from: &str,
        to: &str,
    ) -> Result<bool> {
        let moved = self
            .client()
            .await?
            .execute(
                "UPDATE refunds SET state = $4, updated_at = now() \
                 WHERE order_id = $1 AND refund_id = $2 AND state = $3",
                &[&order.0, &refund_id, &from, &to],
            )
            .await?;
        Ok(moved == 1)
    }

    /// Sends a refund the resume round couldn't finish to the back of its work list.
    pub async fn touch_refund(&self, order: OrderId, refund_id: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                "UPDATE refunds SET updated_at = now() WHERE order_id = $1 AND refund_id = $2",
                &[&order.0, &refund_id],
            )
            .await?;
        Ok(())
    }

    async fn refunds_where(
        &self,
        clause: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<RefundRecord>> {
        let sql = format!(
            "SELECT r.order_id, r.refund_id, o.hold_id, r.drop_id, r.fan_id, r.items, \
             r.amount_cents, r.state FROM refunds r JOIN orders o USING (order_id) WHERE {clause}"
        );
        let rows = self.client().await?.query(&sql, params).await?;
        rows.iter()
            .map(|r| {
                Ok(RefundRecord {
                    order_id: OrderId(r.get(0)),
                    refund_id: r.get(1),
                    hold_id: r.get(2),
                    drop_id: r.get(3),
                    fan_id: r.get(4),
                    items: serde_json::from_value(r.get(5)).map_err(Error::internal)?,
                    amount_cents: r.get(6),
                    state: r.get(7),
                    new: false,
                })
            })
            .collect()
    }

    /// An order's refunds, oldest first (an order has at most one per unit it bought).
    pub async fn order_refunds(&self, order: OrderId) -> Result<Vec<RefundRecord>> {
        self.refunds_where(
            "r.order_id = $1 ORDER BY r.created_at, r.refund_id",
            &[&order.0],
        )
        .await
    }

    /// Refunds not finished (`pending`, `gateway_done`) and untouched for `after_ms`, least
    /// recently touched first, at most `limit`: of every drop, or only of `drops`.
    pub async fn refunds_to_resume(
        &self,
        limit: i64,
        after_ms: u64,
        drops: Option<&[DropId]>,
    ) -> Result<Vec<RefundRecord>> {
        let drops: Option<Vec<&str>> = drops.map(|d| d.iter().map(DropId::as_str).collect());
        self.refunds_where(
            "r.state IN ('pending', 'gateway_done') \
             AND r.updated_at <= now() - make_interval(secs => $2) \
             AND ($3::text[] IS NULL OR r.drop_id = ANY($3)) ORDER BY r.updated_at LIMIT $1",
            &[&limit, &(after_ms as f64 / 1000.0), &drops],
        )
        .await
    }

    /// Units of an order not refunded yet.
    pub async fn unrefunded_units(&self, order: OrderId) -> Result<i64> {
        Ok(self
            .client()
            .await?
            .query_one(
                "SELECT coalesce(sum(quantity - refunded), 0)::bigint FROM order_items WHERE order_id = $1",
                &[&order.0],
            )
            .await?
            .get(0))
    }

    /// A hold's payment attempts that took money or still may (authorized, captured) or are
    /// being voided, as (reference, state): the one its order was committed for is the only one
    /// ever `authorized` (and then `captured`, or `voiding` once a refund voids it).
    pub async fn money_attempts(&self, hold: &str) -> Result<Vec<(String, PaymentState)>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT reference, state FROM payment_attempts WHERE hold_id = $1 \
                 AND state IN ('authorized', 'captured', 'voiding') ORDER BY updated_at DESC",
                &[&hold],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.get(0), parse_state(r.get(1))?)))
            .collect()
    }

    /// A page of the drop's audit log, newest first: at most `limit` entries older than
    /// `before` (an `entry_id`), or the newest when `before` is `None`.
    pub async fn audit(
        &self,
        drop: &DropId,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT entry_id, at, key_id, action, changes, settings FROM admission_audit \
                 WHERE drop_id = $1 AND ($2::bigint IS NULL OR entry_id < $2) \
                 ORDER BY entry_id DESC LIMIT $3",
                &[&drop.as_str(), &before, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                entry_id: r.get(0),
                at: r.get(1),
                key_id: r.get(2),
                action: r.get(3),
                changes: r.get(4),
                settings: r.get(5),
            })
            .collect())
    }

    /// The public catalogue: open drops that opened (latest first) and that open within
    /// `soon_days` (soonest first), at most `limit` of each, with their lowest price and whether
    /// Postgres has sold every unit.
    pub async fn catalogue(&self, soon_days: u32, limit: i64) -> Result<Vec<CatalogueRow>> {
        let soon_days = i32::try_from(soon_days).unwrap_or(i32::MAX);
        let rows = self
            .client()
            .await?
            .query(
                "WITH picked AS ( \
                   (SELECT drop_id FROM drops WHERE status = 'open' AND archived_at IS NULL \
                      AND opens_at <= now() ORDER BY opens_at DESC LIMIT $2) \
                   UNION ALL \
                   (SELECT drop_id FROM drops WHERE status = 'open' AND archived_at IS NULL \
                      AND opens_at > now() AND opens_at <= now() + make_interval(days => $1) \
                      ORDER BY opens_at LIMIT $2)) \
                 SELECT d.drop_id, d.name, d.currency, d.opens_at, d.opens_at <= now(), \
                   d.admission->>'mode', i.from_price_cents, i.sold >= i.total \
                 FROM picked p JOIN drops d USING (drop_id) \
                 CROSS JOIN LATERAL (SELECT min(price_cents) AS from_price_cents, \
                   sum(sold) AS sold, sum(total) AS total FROM inventory WHERE drop_id = d.drop_id) i",
                &[&soon_days, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(CatalogueRow {
                    drop_id: DropId::parse(r.get(0)).ok()?,
                    name: r.get(1),
                    currency: r.get(2),
                    opens_at: r.get(3),
                    opened: r.get(4),
                    queue: r.get::<_, Option<&str>>(5) == Some("queue"),
                    from_price_cents: r.get(6),
                    sold_out: r.get::<_, Option<bool>>(7).unwrap_or(false),
                })
            })
            .collect())
    }

    /// Ops' change to a drop's admission settings, one at a time per drop: under the drop row's
    /// lock `merge` turns the stored settings into the new ones, which are saved and audited, and
    /// `publish` (writing them to Redis) runs before the commit. So two changes racing (a pause
    /// and a new rate) neither undo each other here nor reach Redis in another order than
    /// Postgres'. If `publish` fails nothing is saved.
    pub async fn update_admission(
        &self,
        drop: &DropId,
        key_id: &str,
        merge: impl FnOnce(Option<serde_json::Value>) -> Result<serde_json::Value>,
        publish: impl AsyncFnOnce(&serde_json::Value) -> Result<()>,
    ) -> Result<serde_json::Value> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                // NO KEY: orders, payments and the ledger reference this row (FOR KEY SHARE);
                // a full FOR UPDATE would stall every order write while Redis is called.
                "SELECT admission FROM drops WHERE drop_id = $1 FOR NO KEY UPDATE",
                &[&drop.as_str()],
            )
            .await?
            .ok_or_else(|| Error::new(Code::UnknownDrop))?;
        let stored: Option<serde_json::Value> = row.get(0);
        let before = stored.clone();
        let settings = merge(stored)?;
        tx.execute(
            "UPDATE drops SET admission = $2 WHERE drop_id = $1",
            &[&drop.as_str(), &settings],
        )
        .await?;
        // The audit log records changes: a change that sets every field to what it was is none.
        let changes = changed_fields(before.as_ref(), &settings);
        if !changes.as_object().is_some_and(|c| c.is_empty()) {
            tx.execute(
                "INSERT INTO admission_audit (drop_id, key_id, action, changes, settings) \
                 VALUES ($1, $2, 'admission', $3, $4)",
                &[&drop.as_str(), &key_id, &changes, &settings],
            )
            .await?;
        }
        publish(&settings).await?;
        tx.commit().await?;
        Ok(settings)
    }

    /// The drop's current admission settings (as ops last set them).
    pub async fn admission(&self, drop: &DropId) -> Result<Option<serde_json::Value>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT admission FROM drops WHERE drop_id = $1",
                &[&drop.as_str()],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    // ---- payments --------------------------------------------------------------------------------

    /// Records a payment attempt, `(hold, reference)`, before the gateway is called. Returns
    /// whether this call recorded it: an attempt already there — ended by the reconciler while
    /// this insert stalled, or the same reference used before — is never taken over.
    pub async fn begin_payment(
        &self,
        hold: &HoldId,
        fan: &FanId,
        gateway: &str,
        reference: &str,
        amount_cents: i64,
    ) -> Result<bool> {
        let written = self
            .client()
            .await?
            .execute(
                "INSERT INTO payment_attempts (hold_id, reference, drop_id, fan_id, gateway, amount_cents, state) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending') ON CONFLICT (hold_id, reference) DO NOTHING",
                &[&hold.as_str(), &reference, &hold.drop_id().as_str(), &fan.as_str(), &gateway, &amount_cents],
            )
            .await?;
        Ok(written == 1)
    }

    /// The state of one attempt, if it was recorded.
    pub async fn attempt_state(
        &self,
        hold: &HoldId,
        reference: &str,
    ) -> Result<Option<PaymentState>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT state FROM payment_attempts WHERE hold_id = $1 AND reference = $2",
                &[&hold.as_str(), &reference],
            )
            .await?;
        row.map(|r| parse_state(r.get(0))).transpose()
    }

    /// Moves one attempt from `from` to `to`; a write that arrives late, after the attempt moved
    /// on, changes nothing (nor any other attempt of the hold). Returns whether it moved.
    pub async fn set_payment_state(
        &self,
        hold: &HoldId,
        reference: &str,
        from: PaymentState,
        to: PaymentState,
    ) -> Result<bool> {
        let moved = self
            .client()
            .await?
            .execute(
                "UPDATE payment_attempts SET state = $4, updated_at = now() \
                 WHERE hold_id = $1 AND reference = $2 AND state = $3",
                &[&hold.as_str(), &reference, &from.as_str(), &to.as_str()],
            )
            .await?;
        Ok(moved == 1)
    }

    /// Ends an attempt without a sale — the reconciler's side of the arbitration with a request
    /// committing the same attempt: if still `pending`, it becomes `voiding` (no order can be
    /// committed for it from then on; the gateway void comes next); if never recorded, it is
    /// recorded `voided`. Says what it found.
    pub async fn void_attempt(
        &self,
        hold: &HoldId,
        fan: &str,
        gateway: &str,
        reference: &str,
        amount_cents: i64,
    ) -> Result<Voiding> {
        let client = self.client().await?;
        let recorded = client
            .execute(
                "INSERT INTO payment_attempts (hold_id, reference, drop_id, fan_id, gateway, amount_cents, state) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'voided') ON CONFLICT (hold_id, reference) DO NOTHING",
                &[&hold.as_str(), &reference, &hold.drop_id().as_str(), &fan, &gateway, &amount_cents],
            )
            .await?;
        if recorded == 1 {
            return Ok(Voiding::Unrecorded);
        }
        let row = client
            .query_one(
                "WITH prev AS (SELECT state FROM payment_attempts WHERE hold_id = $1 AND reference = $2 FOR UPDATE) \
                 UPDATE payment_attempts p SET state = CASE WHEN prev.state = 'pending' THEN 'voiding' ELSE p.state END, \
                 updated_at = CASE WHEN prev.state = 'pending' THEN now() ELSE p.updated_at END \
                 FROM prev WHERE p.hold_id = $1 AND p.reference = $2 RETURNING prev.state",
                &[&hold.as_str(), &reference],
            )
            .await?;
        parse_state(row.get(0)).map(Voiding::Was)
    }

    /// Attempts not yet settled (`pending` or `voiding`), least recently touched first, of every
    /// drop — or only of `drops`, when given.
    pub async fn unsettled(&self, limit: i64, drops: Option<&[DropId]>) -> Result<Vec<Unsettled>> {
        let drops: Option<Vec<&str>> = drops.map(|d| d.iter().map(DropId::as_str).collect());
        let rows = self
            .client()
            .await?
            .query(
                "SELECT hold_id, reference, fan_id, amount_cents, state, \
                 (extract(epoch FROM now() - created_at) * 1000)::bigint FROM payment_attempts \
                 WHERE state IN ('pending', 'voiding') AND ($2::text[] IS NULL OR drop_id = ANY($2)) \
                 ORDER BY updated_at LIMIT $1",
                &[&limit, &drops],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let Ok(hold) = HoldId::parse(r.get(0)) else {
                continue;
            };
            out.push(Unsettled {
                hold,
                reference: r.get(1),
                fan: r.get(2),
                amount_cents: r.get(3),
                state: parse_state(r.get(4))?,
                age_ms: r.get(5),
            });
        }
        Ok(out)
    }

    /// Sends an attempt the reconciler couldn't settle this round to the back of its work list
    /// ([`Db::unsettled`] takes the least recently touched first), so a few that keep failing
    /// never crowd out the rest.
    pub async fn touch_attempt(&self, hold: &HoldId, reference: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                "UPDATE payment_attempts SET updated_at = now() WHERE hold_id = $1 AND reference = $2",
                &[&hold.as_str(), &reference],
            )
            .await?;
        Ok(())
    }

    /// Authorized attempts whose order stands but whose capture failed, oldest first.
    pub async fn uncaptured(&self, limit: i64) -> Result<Vec<(HoldId, String)>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT p.hold_id, p.reference FROM payment_attempts p JOIN orders o USING (hold_id) \
                 WHERE p.state = 'authorized' AND p.updated_at < now() - interval '10 seconds' \
                 ORDER BY p.updated_at LIMIT $1",
                &[&limit],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((HoldId::parse(r.get(0)).ok()?, r.get(1))))
            .collect())
    }

    // ---- orders ----------------------------------------------------------------------------------

    async fn orders_where(
        &self,
        clause: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Order>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT o.order_id, o.hold_id, o.drop_id, o.fan_id, o.total_cents, o.currency, o.created_at, \
             d.kind, i.bucket, i.seat_id, i.quantity, i.price_cents \
             FROM orders o JOIN drops d USING (drop_id) JOIN order_items i USING (order_id) \
             WHERE {clause} ORDER BY o.created_at DESC, o.order_id, i.bucket, i.seat_id LIMIT 10000"
        );
        let rows = client.query(&sql, params).await?;
        let mut out: Vec<Order> = Vec::new();
        for r in rows {
            let order_id = OrderId(r.get(0));
            if out.last().map(|o| o.order_id) != Some(order_id) {
                out.push(Order {
                    order_id,
                    hold_id: r.get(1),
                    drop_id: r.get(2),
                    fan: r.get(3),
                    items: Vec::new(),
                    total_cents: r.get(4),
                    currency: r.get(5),
                    created_at: r.get(6),
                });
            }
            let kind: String = r.get(7);
            let bucket: String = r.get(8);
            let item = OrderItem {
                sku: (kind == "ga").then(|| bucket.clone()),
                section: (kind == "seated").then_some(bucket),
                seat: r.get(9),
                quantity: r.get(10),
                price_cents: r.get(11),
            };
            if let Some(o) = out.last_mut() {
                o.items.push(item);
            }
        }
        Ok(out)
    }

    pub async fn order(&self, order: OrderId) -> Result<Option<Order>> {
        Ok(self
            .orders_where("o.order_id = $1", &[&order.0])
            .await?
            .pop())
    }

    pub async fn order_by_hold(&self, hold: &HoldId) -> Result<Option<Order>> {
        Ok(self
            .orders_where("o.hold_id = $1", &[&hold.as_str()])
            .await?
            .pop())
    }

    pub async fn fan_orders(&self, fan: &FanId, drop: Option<&DropId>) -> Result<Vec<Order>> {
        match drop {
            Some(d) => {
                self.orders_where(
                    "o.fan_id = $1 AND o.drop_id = $2",
                    &[&fan.as_str(), &d.as_str()],
                )
                .await
            }
            None => self.orders_where("o.fan_id = $1", &[&fan.as_str()]).await,
        }
    }

    /// Everything Postgres knows was sold in a drop (units per bucket, seats, units per fan) and
    /// which of `holds` have an order — read in one snapshot, so a commit landing meanwhile is
    /// either in all of it or in none.
    pub async fn sold_state(&self, drop: &DropId, holds: &[String]) -> Result<SoldState> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let client = &tx;
        let d = drop.as_str();
        let mut state = SoldState::default();
        for r in client
            .query("SELECT hold_id, order_id::text FROM orders WHERE drop_id = $1 AND hold_id = ANY($2)", &[&d, &holds])
            .await?
        {
            state.orders.insert(r.get(0), r.get(1));
        }
        for r in client
            .query(
                "SELECT bucket, sold::bigint FROM inventory WHERE drop_id = $1",
                &[&d],
            )
            .await?
        {
            state.sold.insert(r.get(0), r.get(1));
        }
        for r in client
            .query(
                "SELECT seat_id FROM order_items WHERE drop_id = $1 AND seat_id IS NOT NULL AND refunded = 0",
                &[&d],
            )
            .await?
        {
            state.sold_seats.push(r.get(0));
        }
        for r in client
            .query(
                "SELECT fan_id, units::bigint FROM fan_purchases WHERE drop_id = $1",
                &[&d],
            )
            .await?
        {
            state.bought.insert(r.get(0), r.get(1));
        }
        tx.commit().await?;
        Ok(state)
    }

    // ---- archived drops ------------------------------------------------------------------------

    /// Closed drops the archiver should look at, oldest closing first: closed at least `after_s`
    /// ago and not archived all the way yet (with whether Postgres already marks them archived).
    /// `only`: just these drops (a process that looks after only the drops it served).
    pub async fn archive_candidates(
        &self,
        after_s: u64,
        limit: i64,
        only: Option<&[DropId]>,
    ) -> Result<Vec<(DropId, bool)>> {
        let only: Option<Vec<&str>> = only.map(|d| d.iter().map(DropId::as_str).collect());
        let rows = self
            .client()
            .await?
            .query(
                "SELECT drop_id, archived_at IS NOT NULL FROM drops \
                 WHERE status = 'closed' AND NOT archive_done \
                 AND closed_at <= now() - make_interval(secs => $1) \
                 AND ($3::text[] IS NULL OR drop_id = ANY($3)) ORDER BY closed_at LIMIT $2",
                &[&(after_s as f64), &limit, &only],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((DropId::parse(r.get(0)).ok()?, r.get(1))))
            .collect())
    }

    /// Marks a closed drop archived unless a payment of it is unsettled (pending, being voided,
    /// or authorized and not captured yet: the reconciler still needs its drop). Whether it is
    /// archived now.
    pub async fn mark_archived(&self, drop: &DropId) -> Result<bool> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE drops SET archived_at = coalesce(archived_at, now()) \
                 WHERE drop_id = $1 AND status = 'closed' AND NOT EXISTS (SELECT 1 FROM \
                 payment_attempts WHERE drop_id = $1 AND state IN ('pending', 'voiding', 'authorized'))",
                &[&drop.as_str()],
            )
            .await?;
        Ok(n == 1)
    }

    /// The archived drop's Redis keys are gone.
    pub async fn mark_archive_done(&self, drop: &DropId) -> Result<()> {
        self.client()
            .await?
            .execute(
                "UPDATE drops SET archive_done = true WHERE drop_id = $1 AND archived_at IS NOT NULL",
                &[&drop.as_str()],
            )
            .await?;
        Ok(())
    }

    pub async fn is_archived(&self, drop: &DropId) -> Result<bool> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT archived_at IS NOT NULL FROM drops WHERE drop_id = $1",
                &[&drop.as_str()],
            )
            .await?;
        Ok(row.is_some_and(|r| r.get(0)))
    }

    /// A drop's counts per bucket in Postgres, `(total, sold)`: an archived drop's final ones
    /// (what Redis counted before it let the drop go: nothing is held then); a rebuild compares
    /// them with what it read, to learn whether a sale or restock landed meanwhile.
    pub async fn final_counts(&self, drop: &DropId) -> Result<HashMap<String, (i64, i64)>> {
        Ok(self
            .client()
            .await?
            .query(
                "SELECT bucket, total::bigint, sold::bigint FROM inventory WHERE drop_id = $1",
                &[&drop.as_str()],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect())
    }

    /// The seats Postgres sold in a drop.
    pub async fn sold_seats(&self, drop: &DropId) -> Result<std::collections::HashSet<String>> {
        Ok(self
            .client()
            .await?
            .query(
                "SELECT seat_id FROM order_items WHERE drop_id = $1 AND seat_id IS NOT NULL AND refunded = 0",
                &[&drop.as_str()],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Opens the snapshot a sliced rebuild reads Postgres through ([`RecoverySnapshot`]).
    pub async fn recovery_snapshot(&self, drop: &DropId) -> Result<RecoverySnapshot> {
        let client = self.client().await?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let mut snap = RecoverySnapshot {
            client: Some(client),
            drop: drop.to_string(),
            sold: HashMap::new(),
            totals: HashMap::new(),
            sold_seats: std::collections::HashSet::new(),
            bought: Vec::new(),
            refunds: Vec::new(),
        };
        let c = snap.client()?;
        let d = drop.as_str();
        let (mut sold, mut totals) = (HashMap::new(), HashMap::new());
        for r in c
            .query(
                "SELECT bucket, sold::bigint, total::bigint FROM inventory WHERE drop_id = $1",
                &[&d],
            )
            .await?
        {
            sold.insert(r.get(0), r.get(1));
            totals.insert(r.get(0), r.get(2));
        }
        let mut sold_seats = std::collections::HashSet::new();
        for r in c
            .query(
                "SELECT seat_id FROM order_items WHERE drop_id = $1 AND seat_id IS NOT NULL AND refunded = 0",
                &[&d],
            )
            .await?
        {
            sold_seats.insert(r.get(0));
        }
        let bought = c
            .query(
                "SELECT fan_id, units::bigint FROM fan_purchases WHERE drop_id = $1",
                &[&d],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // Every refund recorded: their units are out of the sold counts read above (the same
        // snapshot), so the rebuild marks them returned (lua/refund.lua's markers).
        snap.refunds = c
            .query(
                "SELECT order_id::text || '|' || refund_id FROM refunds WHERE drop_id = $1",
                &[&d],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        (snap.sold, snap.totals, snap.sold_seats, snap.bought) = (sold, totals, sold_seats, bought);
        Ok(snap)
    }

    pub async fn record_rebuild(&self, drop: &DropId, note: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO stock_ledger (drop_id, bucket, kind, delta_sold, note) \
                 SELECT drop_id, bucket, 'rebuild', 0, $2 FROM inventory WHERE drop_id = $1",
                &[&drop.as_str(), &note],
            )
            .await?;
        Ok(())
    }
}

/// `{"field": {"before": …, "after": …}}` for each field of `after` whose value differs from
/// `before`'s (`null` where `before` has none). Numbers compare by value, so `5` and `5.0` are no
/// change.
pub fn changed_fields(
    before: Option<&serde_json::Value>,
    after: &serde_json::Value,
) -> serde_json::Value {
    let mut changes = serde_json::Map::new();
    let Some(after) = after.as_object() else {
        return serde_json::Value::Object(changes);
    };
    let null = serde_json::Value::Null;
    for (field, new) in after {
        let old = before.and_then(|b| b.get(field)).unwrap_or(&null);
        let same = match (old.as_f64(), new.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => old == new,
        };
        if !same {
            changes.insert(
                field.clone(),
                serde_json::json!({"before": old, "after": new}),
            );
        }
    }
    serde_json::Value::Object(changes)
}

fn parse_state(state: &str) -> Result<PaymentState> {
    PaymentState::parse(state).ok_or_else(|| Error::internal(format!("payments.state `{state}`")))
}

/// A refund as Postgres recorded it (migrations/0007_refunds.sql).
#[derive(Debug, Clone)]
pub struct RefundRecord {
    pub refund_id: String,
    pub order_id: OrderId,
    pub hold_id: String,
    pub drop_id: String,
    pub fan_id: String,
    /// What it returns, in the scripts' item shape.
    pub items: Vec<crate::scripts::HoldItem>,
    pub amount_cents: i64,
    /// `pending` | `gateway_done` | `returned`.
    pub state: String,
    /// Recorded by this call (false: the refund id was recorded before).
    pub new: bool,
}

/// A restock as Postgres recorded it: the SKU's total after, and whether the request id had
/// been seen before (nothing added this time).
#[derive(Debug, Clone, Copy)]
pub struct Restocked {
    pub total: i64,
    pub replay: bool,
}

/// Postgres' view of one drop for a sliced rebuild: what was sold (units per bucket, seats, units
/// per fan), read at the start of one repeatable-read, read-only transaction that stays open while
/// the rebuild asks, a slice of holds at a time, which have orders. So a commit landing during the
/// rebuild is in all of it or in none, however many slices it takes.
pub struct RecoverySnapshot {
    /// `None` once finished. Dropped unfinished (an error mid-rebuild), the connection is taken
    /// out of the pool, so a transaction left open never goes back into it.
    client: Option<deadpool_postgres::Object>,
    drop: String,
    pub sold: HashMap<String, i64>,
    /// Each bucket's total: the definition's, plus the units restocks added (0006_restock.sql).
    pub totals: HashMap<String, i64>,
    pub sold_seats: std::collections::HashSet<String>,
    pub bought: Vec<(String, i64)>,
    /// Every refund recorded, `"<order id>|<refund id>"` (lua/refund.lua's markers).
    pub refunds: Vec<String>,
}

impl RecoverySnapshot {
    fn client(&self) -> Result<&deadpool_postgres::Object> {
        self.client
            .as_ref()
            .ok_or_else(|| Error::internal("the recovery snapshot was already finished"))
    }

    /// Which of `holds` have an order: hold id → order id.
    pub async fn orders(&self, holds: &[String]) -> Result<HashMap<String, String>> {
        Ok(self
            .client()?
            .query(
                "SELECT hold_id, order_id::text FROM orders WHERE drop_id = $1 AND hold_id = ANY($2)",
                &[&self.drop, &holds],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    /// Ends the snapshot's transaction; the connection goes back to the pool.
    pub async fn finish(mut self) -> Result<()> {
        if let Some(client) = self.client.take() {
            match client.batch_execute("COMMIT").await {
                Ok(()) => drop(client),
                Err(e) => {
                    drop(deadpool_postgres::Object::take(client));
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }
}

impl Drop for RecoverySnapshot {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// Whether a Postgres error is a constraint refusing a sale (not a fault to retry).
pub fn is_constraint_violation(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("23"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changed_fields_names_each_change_with_before_and_after() {
        let before = json!({"mode": "queue", "rate_per_s": 5.0, "burst": 10, "paused": false});
        let after = json!({"mode": "queue", "rate_per_s": 7.5, "burst": 10, "paused": true, "shop_window_s": 60});
        assert_eq!(
            changed_fields(Some(&before), &after),
            json!({
                "rate_per_s": {"before": 5.0, "after": 7.5},
                "paused": {"before": false, "after": true},
                "shop_window_s": {"before": null, "after": 60},
            })
        );
        // The same value written as an integer or a float is no change; nothing changed is {}.
        let same = json!({"mode": "queue", "rate_per_s": 5, "burst": 10.0, "paused": false});
        assert_eq!(changed_fields(Some(&before), &same), json!({}));
        assert_eq!(changed_fields(Some(&before), &before), json!({}));
    }
}
