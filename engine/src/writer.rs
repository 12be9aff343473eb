//! The order writer: one task that groups what confirms write to Postgres — payment attempts
//! recorded, orders, captures recorded — into one transaction per batch (group commit), with
//! set-based statements (a statement per kind of work, not per order). If Postgres refuses the
//! batch's orders (a constraint, the last guard), they are written again one at a time, a
//! SAVEPOINT each, so the refused order fails alone. Each caller gets its answer only after the
//! transaction holding its write has committed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

/// A payment attempt to record as `pending`, before the gateway is called.
#[derive(Debug, Clone)]
pub struct NewPayment {
    pub hold_id: HoldId,
    pub reference: String,
    pub fan: String,
    pub gateway: String,
    pub amount_cents: i64,
}

/// What a confirm asks the writer to write; each kind goes into the batch's one transaction.
enum Work {
    /// Record an attempt (`begin_payment`): answers whether this call recorded it.
    Payment(NewPayment),
    /// Commit an order for an authorized attempt.
    Order(NewOrder),
    /// Record a capture: `authorized` → `captured`. Answers whether it moved.
    Captured { hold_id: HoldId, reference: String },
}

enum Done {
    Recorded(bool),
    Order(Committed),
}

struct Job {
    work: Work,
    reply: oneshot::Sender<Result<Done>>,
}

/// Two lanes, each a task with its own queue and its own transactions: orders in one, payment
/// attempts and captures (which never touch an inventory row) in the other. A confirm's three
/// writes come one after another, so while one lane waits for its commit the other works: an
/// attempt recorded never waits behind a batch of orders queuing for a busy inventory row.
#[derive(Clone)]
pub struct Writer {
    orders: mpsc::Sender<Job>,
    payments: mpsc::Sender<Job>,
    fallbacks: Arc<AtomicU64>,
}

impl Writer {
    pub fn spawn(db: Db, cfg: &WriterConfig) -> Writer {
        let fallbacks = Arc::new(AtomicU64::new(0));
        let lane = || {
            let (tx, rx) = mpsc::channel(cfg.queue_len.max(1));
            tokio::spawn(run(
                db.clone(),
                rx,
                cfg.max_batch.max(1),
                cfg.max_retries,
                fallbacks.clone(),
            ));
            tx
        };
        let (orders, payments) = (lane(), lane());
        Writer {
            orders,
            payments,
            fallbacks,
        }
    }

    /// Commits the order (or finds the hold's existing one); answers after the commit.
    pub async fn commit(&self, order: NewOrder) -> Result<Committed> {
        match self.submit(Work::Order(order)).await? {
            Done::Order(c) => Ok(c),
            Done::Recorded(_) => Err(Error::internal("order writer: wrong answer")),
        }
    }

    /// Records a payment attempt as `pending` (see [`Db::begin_payment`]); answers after the
    /// commit whether this call recorded it.
    pub async fn begin_payment(&self, payment: NewPayment) -> Result<bool> {
        self.recorded(Work::Payment(payment)).await
    }

    /// Records an attempt's capture (`authorized` → `captured`); answers whether it moved.
    pub async fn captured(&self, hold_id: HoldId, reference: String) -> Result<bool> {
        self.recorded(Work::Captured { hold_id, reference }).await
    }

    /// Batches whose set-based order statements Postgres refused, and which were written again
    /// one order at a time (each in a SAVEPOINT) — this writer's, since it started.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    async fn recorded(&self, work: Work) -> Result<bool> {
        match self.submit(work).await? {
            Done::Recorded(b) => Ok(b),
            Done::Order(_) => Err(Error::internal("order writer: wrong answer")),
        }
    }

    async fn submit(&self, work: Work) -> Result<Done> {
        let (reply, answer) = oneshot::channel();
        let lane = match work {
            Work::Order(_) => &self.orders,
            Work::Payment(_) | Work::Captured { .. } => &self.payments,
        };
        lane.try_send(Job { work, reply }).map_err(|_| {
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

async fn run(
    db: Db,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    max_retries: u32,
    fallbacks: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let jobs = std::mem::take(&mut batch);
        let orders = jobs
            .iter()
            .filter(|j| matches!(j.work, Work::Order(_)))
            .count();
        if orders > 0 {
            metrics::histogram!(crate::metrics::WRITER_BATCH_ORDERS).record(orders as f64);
        }
        match write_batch(&db, &jobs, max_retries, &fallbacks).await {
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

/// One transaction for the whole batch; per-job results, sent only if the commit succeeds.
/// A batch Postgres aborts for another transaction's sake (a deadlock or serialization failure,
/// say with another instance's batch) is run again, up to `max_retries` times. A batch whose
/// set-based orders Postgres refused is run again at once, its orders one at a time.
async fn write_batch(
    db: &Db,
    jobs: &[Job],
    max_retries: u32,
    fallbacks: &AtomicU64,
) -> Result<Vec<Result<Done>>> {
    let mut retries = 0;
    let mut one_by_one = false;
    loop {
        match try_batch(db, jobs, one_by_one).await {
            Ok(results) => return Ok(results),
            // Only the set-based statements answer this, so the next round is the last of it.
            Err(Attempt::Refused(e)) => {
                one_by_one = true;
                fallbacks.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(crate::metrics::WRITER_FALLBACKS).increment(1);
                tracing::warn!(error = %e, "Postgres refused a batch of orders; writing them one at a time");
            }
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

/// Why a batch didn't commit: worth running again, again one order at a time, or not.
enum Attempt {
    Retry(tokio_postgres::Error),
    /// A constraint refused the set-based statements of the batch's orders.
    Refused(tokio_postgres::Error),
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

type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// The batch: its payment attempts and captures recorded in one statement (no transaction
/// around it: one round trip and one commit), then its orders in one transaction — set-based
/// (each statement covers every order of the batch), or with `one_by_one` (after Postgres refused
/// them set-based: a constraint, the last guard, fired for some order) one order at a time, each
/// in a SAVEPOINT, so the one refused order fails alone. The two lanes never mix the two kinds,
/// so a batch is one or the other; inventory rows are locked before any attempt row of the
/// orders.
async fn try_batch(
    db: &Db,
    jobs: &[Job],
    one_by_one: bool,
) -> std::result::Result<Vec<Result<Done>>, Attempt> {
    let mut results: Vec<Option<Result<Done>>> = (0..jobs.len()).map(|_| None).collect();
    let mut orders: Vec<(usize, &NewOrder)> = Vec::new();
    let mut payments: Vec<(usize, &NewPayment)> = Vec::new();
    let mut captures: Vec<(usize, &HoldId, &str)> = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        match &j.work {
            Work::Order(o) => orders.push((i, o)),
            Work::Payment(p) => payments.push((i, p)),
            Work::Captured { hold_id, reference } => {
                captures.push((i, hold_id, reference.as_str()))
            }
        }
    }
    let mut client = db.client().await?;
    if !payments.is_empty() || !captures.is_empty() {
        match record_payments(&client, &payments, &captures).await {
            Ok(done) => {
                for (i, done) in done {
                    results[i] = Some(Ok(Done::Recorded(done)));
                }
            }
            // Never expected (a constraint refused some attempt's row): each job again on its
            // own, so the one refused fails alone.
            Err(e) if is_constraint_violation(&e) => {
                tracing::warn!(error = %e, "Postgres refused a batch of payment records; writing them one at a time");
                for p in &payments {
                    results[p.0] = Some(one_record(&client, &[*p], &[]).await);
                }
                for c in &captures {
                    results[c.0] = Some(one_record(&client, &[], &[*c]).await);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !orders.is_empty() && one_by_one {
        let mut tx = client.transaction().await?;
        lock_inventory(&tx, orders.iter().map(|(_, o)| *o)).await?;
        for (i, c) in orders_one_by_one(&mut tx, &orders).await? {
            results[i] = Some(c.map(Done::Order));
        }
        tx.commit().await?;
    } else if !orders.is_empty() {
        // No SAVEPOINT around them (two round trips a batch): a refusal rolls the batch back,
        // and it runs again from the start, one order at a time.
        match insert_orders(&client, &orders).await {
            Ok(done) => {
                for (i, c) in done {
                    results[i] = Some(Ok(Done::Order(c)));
                }
            }
            Err(e) if is_constraint_violation(&e) => return Err(Attempt::Refused(e)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::internal("order writer: a job went unanswered"))))
        .collect())
}

/// One payment record on its own (after its batch was refused): its answer, or its error.
async fn one_record(
    client: &deadpool_postgres::Client,
    payment: &[(usize, &NewPayment)],
    capture: &[(usize, &HoldId, &str)],
) -> Result<Done> {
    match record_payments(client, payment, capture).await {
        Ok(done) => Ok(Done::Recorded(done.first().is_some_and(|(_, d)| *d))),
        Err(e) => Err(e.into()),
    }
}

/// Records attempts as `pending` and captures (`authorized` → `captured`) in one statement; per
/// job, whether it recorded its attempt (an attempt already there, or named twice in the batch,
/// is recorded by one job at most) or moved its attempt to `captured`.
async fn record_payments(
    client: &deadpool_postgres::Client,
    payments: &[(usize, &NewPayment)],
    captures: &[(usize, &HoldId, &str)],
) -> std::result::Result<Vec<(usize, bool)>, tokio_postgres::Error> {
    let mut sorted: Vec<&(usize, &NewPayment)> = payments.iter().collect();
    sorted.sort_by(|a, b| {
        (a.1.hold_id.as_str(), &a.1.reference).cmp(&(b.1.hold_id.as_str(), &b.1.reference))
    });
    let holds: Vec<&str> = sorted.iter().map(|(_, p)| p.hold_id.as_str()).collect();
    let refs: Vec<&str> = sorted.iter().map(|(_, p)| p.reference.as_str()).collect();
    let drops: Vec<String> = sorted
        .iter()
        .map(|(_, p)| p.hold_id.drop_id().to_string())
        .collect();
    let fans: Vec<&str> = sorted.iter().map(|(_, p)| p.fan.as_str()).collect();
    let gateways: Vec<&str> = sorted.iter().map(|(_, p)| p.gateway.as_str()).collect();
    let amounts: Vec<i64> = sorted.iter().map(|(_, p)| p.amount_cents).collect();
    let mut pairs: Vec<(&str, &str)> = captures.iter().map(|(_, h, r)| (h.as_str(), *r)).collect();
    pairs.sort_unstable();
    pairs.dedup();
    let (c_holds, c_refs): (Vec<&str>, Vec<&str>) = pairs.into_iter().unzip();
    // Both halves see one snapshot; an attempt is never recorded and captured in one batch (a
    // capture follows its order's commit, which follows the attempt's).
    let rows = client
        .query(
            &client
                .prepare_cached(
                    "WITH recorded AS ( \
                       INSERT INTO payment_attempts (hold_id, reference, drop_id, fan_id, gateway, amount_cents, state) \
                       SELECT h, r, d, f, g, a, 'pending' \
                       FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[]) AS t(h, r, d, f, g, a) \
                       ON CONFLICT (hold_id, reference) DO NOTHING RETURNING hold_id, reference), \
                     captured AS ( \
                       UPDATE payment_attempts p SET state = 'captured', updated_at = now() \
                       FROM unnest($7::text[], $8::text[]) AS t(h, r) \
                       WHERE p.hold_id = t.h AND p.reference = t.r AND p.state = 'authorized' \
                       RETURNING p.hold_id, p.reference) \
                     SELECT true, hold_id, reference FROM recorded \
                     UNION ALL SELECT false, hold_id, reference FROM captured",
                )
                .await?,
            &[
                &holds, &refs, &drops, &fans, &gateways, &amounts, &c_holds, &c_refs,
            ],
        )
        .await?;
    // (hold id, reference) of the attempts recorded, and of those captured.
    let mut written: HashSet<(String, String)> = HashSet::new();
    let mut moved: HashSet<(String, String)> = HashSet::new();
    for r in &rows {
        let key = (r.get::<_, String>(1), r.get::<_, String>(2));
        if r.get::<_, bool>(0) {
            written.insert(key);
        } else {
            moved.insert(key);
        }
    }
    let recorded = payments.iter().map(|(i, p)| {
        // The first job naming an attempt takes the "recorded"; a repeat is not recorded.
        (
            *i,
            written.remove(&(p.hold_id.to_string(), p.reference.clone())),
        )
    });
    let captured = captures
        .iter()
        .map(|(i, h, r)| (*i, moved.remove(&(h.to_string(), r.to_string()))));
    Ok(recorded.chain(captured).collect())
}

/// The batch's orders, set-based, in one round trip: `BEGIN`, the lock of the batch's inventory
/// rows (in one order for every writer), one statement and `COMMIT` go out together, and Postgres
/// runs them in order. The statement moves every attempt still `pending` to `authorized`
/// (`UPDATE … RETURNING`) and writes orders only for the attempts it got back — their items,
/// ledger lines, one inventory update per (drop, bucket) and one per-fan row per (drop, fan). A
/// job whose attempt was not pending any more (a reconciler is voiding it) gets no order; a hold
/// that already had one gets that one back. If a statement fails, Postgres answers the `COMMIT`
/// with a rollback: nothing of the batch stays.
async fn insert_orders(
    client: &deadpool_postgres::Client,
    orders: &[(usize, &NewOrder)],
) -> std::result::Result<Vec<(usize, Committed)>, tokio_postgres::Error> {
    // Orders go in (drop, fan) order, so two batches that share fans take their per-fan rows
    // (`fan_purchases`, keyed so) in the same order too (see lock_inventory); the first job of a
    // hold in that order writes its order.
    let mut by_fan: Vec<&NewOrder> = orders.iter().map(|(_, o)| *o).collect();
    by_fan.sort_by_cached_key(|o| (o.hold_id.drop_id(), o.fan.clone()));
    let order_ids: Vec<uuid::Uuid> = by_fan.iter().map(|o| o.order_id.0).collect();
    let o_holds: Vec<&str> = by_fan.iter().map(|o| o.hold_id.as_str()).collect();
    let o_drops: Vec<String> = by_fan
        .iter()
        .map(|o| o.hold_id.drop_id().to_string())
        .collect();
    let o_fans: Vec<&str> = by_fan.iter().map(|o| o.fan.as_str()).collect();
    let totals: Vec<i64> = by_fan.iter().map(|o| o.total_cents).collect();
    let currencies: Vec<&str> = by_fan.iter().map(|o| o.currency.as_str()).collect();
    let limits: Vec<i32> = by_fan.iter().map(|o| o.per_fan_limit).collect();
    let o_refs: Vec<&str> = by_fan.iter().map(|o| o.reference.as_str()).collect();
    let positions: Vec<i32> = (0..by_fan.len() as i32).collect();
    let items: Vec<(uuid::Uuid, &NewItem)> = by_fan
        .iter()
        .flat_map(|o| o.items.iter().map(move |i| (o.order_id.0, i)))
        .collect();
    let i_orders: Vec<uuid::Uuid> = items.iter().map(|(o, _)| *o).collect();
    let i_buckets: Vec<&str> = items.iter().map(|(_, i)| i.bucket.as_str()).collect();
    let i_seats: Vec<Option<&str>> = items.iter().map(|(_, i)| i.seat.as_deref()).collect();
    let i_qty: Vec<i32> = items.iter().map(|(_, i)| i.quantity).collect();
    let i_prices: Vec<i64> = items.iter().map(|(_, i)| i.price_cents).collect();
    let (lock_drops, lock_buckets) = inventory_rows(by_fan.iter().copied());
    let lock = client.prepare_cached(LOCK_INVENTORY).await?;
    // One statement: its sub-statements see one snapshot, and the foreign keys of the items are
    // checked at its end, when their orders are in. Only orders the INSERT returned (no order
    // for the hold yet) get items, stock, ledger and per-fan rows.
    let write = client
        .prepare_cached(
            "WITH claimed AS ( \
                   UPDATE payment_attempts p SET state = 'authorized', updated_at = now() \
                   FROM unnest($2::text[], $13::text[]) AS t(h, r) \
                   WHERE p.hold_id = t.h AND p.reference = t.r AND p.state = 'pending' \
                   RETURNING p.hold_id, p.reference), \
                 input AS ( \
                   SELECT DISTINCT ON (t.hold_id) t.* \
                   FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::int[], $13::text[], $14::int[]) \
                   AS t(order_id, hold_id, drop_id, fan_id, total, currency, lim, reference, pos) \
                   JOIN claimed c ON c.hold_id = t.hold_id AND c.reference = t.reference \
                   ORDER BY t.hold_id, t.pos), \
                 o AS ( \
                   INSERT INTO orders (order_id, hold_id, drop_id, fan_id, total_cents, currency) \
                   SELECT order_id, hold_id, drop_id, fan_id, total, currency FROM input \
                   ON CONFLICT (hold_id) DO NOTHING RETURNING order_id, hold_id), \
                 it AS ( \
                   SELECT t.*, input.drop_id, input.fan_id, input.lim \
                   FROM unnest($8::uuid[], $9::text[], $10::text[], $11::int[], $12::bigint[]) AS t(order_id, bucket, seat, q, p) \
                   JOIN o USING (order_id) JOIN input USING (order_id)), \
                 items AS ( \
                   INSERT INTO order_items (order_id, drop_id, bucket, seat_id, quantity, price_cents) \
                   SELECT order_id, drop_id, bucket, seat, q, p FROM it), \
                 per_order AS ( \
                   SELECT drop_id, bucket, order_id, sum(q)::int AS q FROM it GROUP BY drop_id, bucket, order_id), \
                 ledger AS ( \
                   INSERT INTO stock_ledger (drop_id, bucket, kind, delta_sold, order_id) \
                   SELECT drop_id, bucket, 'sale', q, order_id FROM per_order), \
                 stock AS ( \
                   UPDATE inventory i SET sold = i.sold + per.q \
                   FROM (SELECT drop_id, bucket, sum(q)::int AS q FROM per_order GROUP BY drop_id, bucket) per \
                   WHERE i.drop_id = per.drop_id AND i.bucket = per.bucket), \
                 fans AS ( \
                   INSERT INTO fan_purchases (drop_id, fan_id, units, limit_units) \
                   SELECT drop_id, fan_id, sum(q)::int, max(lim) FROM it \
                   GROUP BY drop_id, fan_id ORDER BY drop_id, fan_id \
                   ON CONFLICT (drop_id, fan_id) DO UPDATE SET units = fan_purchases.units + EXCLUDED.units) \
                 SELECT hold_id, order_id FROM o",
        )
        .await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 14] = [
        &order_ids,
        &o_holds,
        &o_drops,
        &o_fans,
        &totals,
        &currencies,
        &limits,
        &i_orders,
        &i_buckets,
        &i_seats,
        &i_qty,
        &i_prices,
        &o_refs,
        &positions,
    ];
    let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&lock_drops, &lock_buckets];
    // Sent together, answered in order; the COMMIT is sent whatever happens to the rest.
    // `biased`: polled top to bottom, so each statement (prepared above) goes out in this order
    // on the first poll, whatever try_join's fairness rotation would pick.
    let (_, _, rows, _) = tokio::try_join!(
        biased;
        client.batch_execute("BEGIN"),
        client.execute(&lock, &lock_params),
        client.query(&write, &params),
        client.batch_execute("COMMIT"),
    )?;
    let made: HashMap<String, OrderId> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), OrderId(r.get(1))))
        .collect();
    // Everyone else: the hold's order if it has one (a retry, the reconciler first, or another
    // job of the batch), else nothing was made (the attempt is no longer pending). Read after the
    // commit: an order committed since by another writer is found too.
    let others: Vec<&str> = orders
        .iter()
        .map(|(_, o)| o.hold_id.as_str())
        .filter(|h| !made.contains_key(*h))
        .collect();
    let mut existing: HashMap<String, OrderId> = HashMap::new();
    if !others.is_empty() {
        existing = client
            .query(
                &client
                    .prepare_cached("SELECT hold_id, order_id FROM orders WHERE hold_id = ANY($1)")
                    .await?,
                &[&others],
            )
            .await?
            .iter()
            .map(|r| (r.get::<_, String>(0), OrderId(r.get(1))))
            .collect();
    }
    Ok(orders
        .iter()
        .map(|(i, o)| {
            let committed = match made.get(o.hold_id.as_str()) {
                Some(id) if *id == o.order_id => Committed::New(*id),
                Some(id) => Committed::Existing(*id),
                None => existing
                    .get(o.hold_id.as_str())
                    .map_or(Committed::Superseded, |id| Committed::Existing(*id)),
            };
            (*i, committed)
        })
        .collect())
}

/// The batch's orders again, one at a time, each in a SAVEPOINT, after Postgres refused the
/// set-based statements: the order a constraint refuses is `Refused`, the others commit.
async fn orders_one_by_one(
    tx: &mut Tx<'_>,
    orders: &[(usize, &NewOrder)],
) -> std::result::Result<Vec<(usize, Result<Committed>)>, Attempt> {
    let mut by_fan: Vec<&(usize, &NewOrder)> = orders.iter().collect();
    by_fan.sort_by_cached_key(|(_, o)| (o.hold_id.drop_id(), o.fan.clone()));
    let mut out = Vec::with_capacity(orders.len());
    for (i, order) in by_fan {
        let sp = tx.savepoint("one_order").await?;
        match insert_order(&sp, order).await {
            Ok(done) => {
                sp.commit().await?;
                out.push((*i, Ok(done)));
            }
            Err(e) if is_constraint_violation(&e) => {
                // The last guard fired: Redis let through a sale Postgres refuses. Never expected.
                tracing::error!(hold = %order.hold_id, error = %e, "Postgres refused an order");
                metrics::counter!(crate::metrics::CONSTRAINT_REFUSALS).increment(1);
                sp.rollback().await?;
                out.push((*i, Ok(Committed::Refused)));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// The statement that locks inventory rows, `$1` drops and `$2` buckets, in (drop, bucket) order.
const LOCK_INVENTORY: &str =
    "SELECT 1 FROM inventory i JOIN unnest($1::text[], $2::text[]) AS t(d, b) \
     ON i.drop_id = t.d AND i.bucket = t.b ORDER BY i.drop_id, i.bucket FOR UPDATE OF i";

/// The (drop, bucket) inventory rows the orders update, sorted, once each.
fn inventory_rows<'a>(orders: impl Iterator<Item = &'a NewOrder>) -> (Vec<String>, Vec<&'a str>) {
    let mut rows: Vec<(String, &str)> = orders
        .flat_map(|o| {
            let drop = o.hold_id.drop_id().to_string();
            o.items
                .iter()
                .map(move |i| (drop.clone(), i.bucket.as_str()))
        })
        .collect();
    rows.sort_unstable();
    rows.dedup();
    rows.into_iter().unzip()
}

/// Locks every inventory row the batch will update, in one order (drop, bucket) for every
/// writer. Orders update their rows one by one; two instances' batches taking the same rows in
/// opposite orders would deadlock, and Postgres only notices after `deadlock_timeout` (1 s).
async fn lock_inventory<'a>(
    tx: &Tx<'_>,
    orders: impl Iterator<Item = &'a NewOrder>,
) -> std::result::Result<(), tokio_postgres::Error> {
    let (drops, buckets) = inventory_rows(orders);
    tx.execute(
        &tx.prepare_cached(LOCK_INVENTORY).await?,
        &[&drops, &buckets],
    )
    .await?;
    Ok(())
}

async fn insert_order(
    tx: &Tx<'_>,
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
