//! The order writer: one task that groups confirmed orders into Postgres transactions (group
//! commit), one SAVEPOINT per order so a constraint refusing one order doesn't abort the rest.
//! Each caller gets its answer only after the transaction holding its order has committed.

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;

use crate::config::WriterConfig;
use crate::db::{is_constraint_violation, Db};
use crate::error::{Code, Error, Result};
use crate::ids::{HoldId, OrderId};

#[derive(Debug, Clone)]
pub struct NewItem {
    pub bucket: String,
    pub seat: Option<String>,
    pub quantity: i32,
    pub price_cents: i64,
}

#[derive(Debug, Clone)]
pub struct NewOrder {
    pub order_id: OrderId,
    pub hold_id: HoldId,
    /// The payment attempt this order is for: it must still be `pending` under this reference.
    pub reference: String,
    pub fan: String,
    pub currency: String,
    pub total_cents: i64,
    pub per_fan_limit: i32,
    pub items: Vec<NewItem>,
}

/// How a commit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// This order is now in Postgres.
    New(OrderId),
    /// The hold already had an order (a retry, or the reconciler got there first).
    Existing(OrderId),
    /// The payment attempt is no longer pending (the reconciler is voiding it): no order was made.
    Superseded,
    /// Postgres' constraints, the last guard, refused the order: Redis let through a sale that
    /// Postgres says is not there to sell. Never expected; nothing was written.
    Refused,
}

impl Committed {
    pub fn order_id(self) -> Option<OrderId> {
        match self {
            Committed::New(id) | Committed::Existing(id) => Some(id),
            Committed::Superseded | Committed::Refused => None,
        }
    }
}

struct Job {
    order: NewOrder,
    reply: oneshot::Sender<Result<Committed>>,
}

#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    pub fn spawn(db: Db, cfg: &WriterConfig) -> Writer {
        let (tx, rx) = mpsc::channel(cfg.queue_len.max(1));
        tokio::spawn(run(db, rx, cfg.max_batch.max(1), cfg.max_retries));
        Writer { tx }
    }

    /// Commits the order (or finds the hold's existing one); answers after the commit.
    pub async fn commit(&self, order: NewOrder) -> Result<Committed> {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(Job { order, reply }).map_err(|_| {
            metrics::counter!(crate::metrics::WRITER_REJECTED).increment(1);
            Error::msg(
                Code::Unavailable,
                "Too many payments are being recorded; retry shortly.",
            )
            .retry_after(std::time::Duration::from_secs(1))
        })?;
        answer
            .await
            .map_err(|_| Error::internal("order writer stopped"))?
    }
}

async fn run(db: Db, mut rx: mpsc::Receiver<Job>, max_batch: usize, max_retries: u32) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        metrics::histogram!(crate::metrics::WRITER_BATCH_ORDERS).record(batch.len() as f64);
        let jobs = std::mem::take(&mut batch);
        match write_batch(&db, &jobs, max_retries).await {
            Ok(results) => {
                for (job, result) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// One transaction for the whole batch; per-order results, sent only if the commit succeeds.
/// A batch Postgres aborts for another transaction's sake (a deadlock or serialization failure,
/// say with another instance's batch) is run again, up to `max_retries` times.
async fn write_batch(db: &Db, jobs: &[Job], max_retries: u32) -> Result<Vec<Result<Committed>>> {
    let mut retries = 0;
    loop {
        match try_batch(db, jobs).await {
            Ok(results) => return Ok(results),
            Err(Attempt::Retry(e)) if retries < max_retries => {
                retries += 1;
                metrics::counter!(crate::metrics::WRITER_RETRIES).increment(1);
                tracing::warn!(error = %e, retries, "Postgres aborted an order batch; running it again");
            }
            Err(Attempt::Retry(e)) => return Err(e.into()),
            Err(Attempt::Failed(e)) => return Err(e),
        }
    }
}

/// Why a batch didn't commit: worth running again, or not.
enum Attempt {
    Retry(tokio_postgres::Error),
    Failed(Error),
}

impl From<tokio_postgres::Error> for Attempt {
    fn from(e: tokio_postgres::Error) -> Self {
        let transient = [
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::T_R_SERIALIZATION_FAILURE,
        ];
        if e.code().is_some_and(|c| transient.contains(c)) {
            Attempt::Retry(e)
        } else {
            Attempt::Failed(e.into())
        }
    }
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

async fn try_batch(db: &Db, jobs: &[Job]) -> std::result::Result<Vec<Result<Committed>>, Attempt> {
    let mut client = db.client().await?;
    let mut tx = client.transaction().await?;
    lock_inventory(&tx, jobs).await?;
    // Orders go in (drop, fan) order, so two batches that share fans take their per-fan rows
    // (`fan_purchases`, keyed so) in the same order too (see lock_inventory).
    let mut by_fan: Vec<usize> = (0..jobs.len()).collect();
    by_fan.sort_by_cached_key(|&i| (jobs[i].order.hold_id.drop_id(), &jobs[i].order.fan));
    let mut results: Vec<Result<Committed>> = vec![Ok(Committed::Superseded); jobs.len()];
    for i in by_fan {
        let job = &jobs[i];
        let sp = tx.savepoint("one_order").await?;
        match insert_order(&sp, &job.order).await {
            Ok(done) => {
                sp.commit().await?;
                results[i] = Ok(done);
            }
            Err(e) if is_constraint_violation(&e) => {
                // The last guard fired: Redis let through a sale Postgres refuses. Never expected.
                tracing::error!(hold = %job.order.hold_id, error = %e, "Postgres refused an order");
                metrics::counter!(crate::metrics::CONSTRAINT_REFUSALS).increment(1);
                sp.rollback().await?;
                results[i] = Ok(Committed::Refused);
            }
            Err(e) => return Err(e.into()),
        }
    }
    tx.commit().await?;
    Ok(results)
}

/// Locks every inventory row the batch will update, in one order (drop, bucket) for every
/// writer. Orders update their rows one by one; two instances' batches taking the same rows in
/// opposite orders would deadlock, and Postgres only notices after `deadlock_timeout` (1 s).
async fn lock_inventory(
    tx: &deadpool_postgres::Transaction<'_>,
    jobs: &[Job],
) -> std::result::Result<(), tokio_postgres::Error> {
    let mut rows: Vec<(String, &str)> = jobs
        .iter()
        .flat_map(|j| {
            let drop = j.order.hold_id.drop_id().to_string();
            j.order
                .items
                .iter()
                .map(move |i| (drop.clone(), i.bucket.as_str()))
        })
        .collect();
    rows.sort_unstable();
    rows.dedup();
    let (drops, buckets): (Vec<String>, Vec<&str>) = rows.into_iter().unzip();
    tx.execute(
        "SELECT 1 FROM inventory i JOIN unnest($1::text[], $2::text[]) AS t(d, b) \
         ON i.drop_id = t.d AND i.bucket = t.b ORDER BY i.drop_id, i.bucket FOR UPDATE OF i",
        &[&drops, &buckets],
    )
    .await?;
    Ok(())
}

async fn insert_order(
    tx: &deadpool_postgres::Transaction<'_>,
    o: &NewOrder,
) -> std::result::Result<Committed, tokio_postgres::Error> {
    let drop = o.hold_id.drop_id();
    let d = drop.as_str();
    // Postgres arbitrates between this commit and a reconciler voiding the same attempt (maybe
    // on another instance): whoever moves the payment out of `pending` first wins.
    let claimed = tx
        .execute(
            "UPDATE payment_attempts SET state = 'authorized', updated_at = now() \
             WHERE hold_id = $1 AND reference = $2 AND state = 'pending'",
            &[&o.hold_id.as_str(), &o.reference],
        )
        .await?;
    if claimed == 0 {
        let row = tx
            .query_opt(
                "SELECT order_id FROM orders WHERE hold_id = $1",
                &[&o.hold_id.as_str()],
            )
            .await?;
        return Ok(match row {
            Some(r) => Committed::Existing(OrderId(r.get(0))),
            None => Committed::Superseded,
        });
    }
    let inserted = tx
        .query_opt(
            "INSERT INTO orders (order_id, hold_id, drop_id, fan_id, total_cents, currency) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (hold_id) DO NOTHING RETURNING order_id",
            &[
                &o.order_id.0,
                &o.hold_id.as_str(),
                &d,
                &o.fan,
                &o.total_cents,
                &o.currency,
            ],
        )
        .await?;
    if inserted.is_none() {
        let row = tx
            .query_one(
                "SELECT order_id FROM orders WHERE hold_id = $1",
                &[&o.hold_id.as_str()],
            )
            .await?;
        return Ok(Committed::Existing(OrderId(row.get(0))));
    }
    let buckets: Vec<&str> = o.items.iter().map(|i| i.bucket.as_str()).collect();
    let seats: Vec<Option<&str>> = o.items.iter().map(|i| i.seat.as_deref()).collect();
    let quantities: Vec<i32> = o.items.iter().map(|i| i.quantity).collect();
    let prices: Vec<i64> = o.items.iter().map(|i| i.price_cents).collect();
    tx.execute(
        "INSERT INTO order_items (order_id, drop_id, bucket, seat_id, quantity, price_cents) \
         SELECT $1, $2, b, s, q, p FROM unnest($3::text[], $4::text[], $5::int[], $6::bigint[]) AS t(b, s, q, p)",
        &[&o.order_id.0, &d, &buckets, &seats, &quantities, &prices],
    )
    .await?;
    // Per bucket: sold += units (CHECK sold <= total) and a 'sale' line in the ledger.
    tx.execute(
        "WITH per AS (SELECT b, sum(q)::int AS q FROM unnest($2::text[], $3::int[]) AS t(b, q) GROUP BY b), \
         upd AS (UPDATE inventory i SET sold = i.sold + per.q FROM per WHERE i.drop_id = $1 AND i.bucket = per.b) \
         INSERT INTO stock_ledger (drop_id, bucket, kind, delta_sold, order_id) SELECT $1, b, 'sale', q, $4 FROM per",
        &[&d, &buckets, &quantities, &o.order_id.0],
    )
    .await?;
    let units: i32 = quantities.iter().sum();
    tx.execute(
        "INSERT INTO fan_purchases (drop_id, fan_id, units, limit_units) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (drop_id, fan_id) DO UPDATE SET units = fan_purchases.units + EXCLUDED.units",
        &[&d, &o.fan, &units, &o.per_fan_limit],
    )
    .await?;
    Ok(Committed::New(o.order_id))
}
