//! Cancelling a whole drop (migrations/0010_drop_cancellations.sql): the drop is closed, as a
//! close does (audited as `cancel`), and a job refunds every order of it whole. The job's state is
//! a row in Postgres, so it survives a restart; its work is a background round
//! ([`Engine::cancel_round`], under each drop's round lease) that refunds at most
//! `reconciler.cancel_batch` orders at a time through the refunds engine (booking/refunds.rs),
//! each with the refund id `cancel-<drop id>`: an order refunded before a crash is the same refund
//! when the job picks it up again, so no order is refunded twice. Done once every order has its
//! refund and every one of them finished (the resume round finishes those the gateway or Redis
//! left halfway).

use super::*;
use crate::ids::RequestId;

/// `POST /v1/drops/{id}/cancel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelDrop {
    /// The caller's id for the request. The drop cancelled again (any id) is the same job.
    pub request_id: RequestId,
}

/// A cancellation job's state: one name in Rust, in the `drop_cancellations.state` CHECK and in
/// the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancellationState {
    /// Orders are still being refunded.
    Running,
    /// Every order is refunded and paid back.
    Done,
}

impl CancellationState {
    pub const ALL: [CancellationState; 2] = [CancellationState::Running, CancellationState::Done];

    pub fn as_str(self) -> &'static str {
        match self {
            CancellationState::Running => "running",
            CancellationState::Done => "done",
        }
    }

    fn parse(s: &str) -> Result<CancellationState> {
        CancellationState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| Error::internal(format!("drop_cancellations.state `{s}`")))
    }
}

/// A cancellation's progress (`GET /v1/drops/{id}/cancellation`, and the cancel's answer).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CancellationView {
    pub drop_id: String,
    pub request_id: String,
    pub state: CancellationState,
    /// Orders the job refunds: those it has refunded, plus those with something left to refund
    /// when it last looked.
    pub orders_total: i64,
    /// Orders whose cancel refund is finished (paid back, counted in the books).
    pub orders_refunded: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

const CANCELLATION_COLUMNS: &str =
    "drop_id, request_id, state, orders_total::bigint, orders_refunded::bigint, \
     started_at, finished_at";

fn cancellation_view(row: &tokio_postgres::Row) -> Result<CancellationView> {
    Ok(CancellationView {
        drop_id: row.get(0),
        request_id: row.get(1),
        state: CancellationState::parse(row.get(2))?,
        orders_total: row.get(3),
        orders_refunded: row.get(4),
        started_at: row.get(5),
        finished_at: row.get(6),
    })
}

/// The refund id the job gives each order of `drop`: one per order, the same on every run.
pub fn cancel_refund_id(drop: &DropId) -> String {
    format!("cancel-{drop}")
}

impl Engine {
    /// Cancels a drop for its seller or ops: closes it (audited as `cancel`) and records the job,
    /// in one transaction; the rounds refund its orders. The drop cancelled again is the same
    /// job, as it stands. Another seller's drop is as unknown as one that doesn't exist. An
    /// archived drop may be cancelled: its orders are refunded from Postgres (state `closed`).
    pub async fn cancel_drop(
        &self,
        key: &ApiKey,
        drop: &DropId,
        body: CancelDrop,
    ) -> Result<Made<CancellationView>> {
        match key.scope {
            Scope::Ops => self.drop_def(drop).await?,
            Scope::Seller => self
                .owned_drop(key, drop)
                .await
                .map_err(|e| not_found_as(e, Code::UnknownDrop))?,
        };
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let d = drop.as_str();
        // The drop row's lock: a racing cancel (or close) waits, then sees the job (or the close).
        let status: String = tx
            .query_opt(
                "SELECT status FROM drops WHERE drop_id = $1 FOR NO KEY UPDATE",
                &[&d],
            )
            .await?
            .ok_or_else(|| Error::new(Code::UnknownDrop))?
            .get(0);
        let existing = tx
            .query_opt(
                &format!(
                    "SELECT {CANCELLATION_COLUMNS} FROM drop_cancellations WHERE drop_id = $1"
                ),
                &[&d],
            )
            .await?;
        if let Some(row) = existing {
            tx.commit().await?;
            // The first cancel may have failed after its commit, before Redis heard of it: the
            // same cancel again closes Redis too.
            self.close_in_redis(drop).await?;
            self.watch_drop(drop);
            lock(&self.cancelled_here).insert(drop.clone());
            return Ok(Made::Existing(cancellation_view(&row)?));
        }
        tx.execute(
            "UPDATE drops SET status = 'closed', closed_at = coalesce(closed_at, now()) \
             WHERE drop_id = $1",
            &[&d],
        )
        .await?;
        tx.execute(
            "INSERT INTO admission_audit (drop_id, key_id, action, changes) \
             VALUES ($1, $2, 'cancel', jsonb_build_object('status', \
                jsonb_build_object('before', $3::text, 'after', 'closed')))",
            &[&d, &key.key_id, &status],
        )
        .await?;
        let row = tx
            .query_one(
                &format!(
                    "INSERT INTO drop_cancellations (drop_id, request_id, key_id, orders_total) \
                     VALUES ($1, $2, $3, ({})) RETURNING {CANCELLATION_COLUMNS}",
                    ORDERS_LEFT
                ),
                &[&d, &body.request_id.as_str(), &key.key_id],
            )
            .await?;
        tx.commit().await?;
        self.close_in_redis(drop).await?;
        self.watch_drop(drop);
        lock(&self.cancelled_here).insert(drop.clone());
        Ok(Made::New(cancellation_view(&row)?))
    }

    /// Marks a cancelled drop closed in Redis, so it sells nothing more (its existing holds may
    /// still confirm, as after a close). A drop Redis doesn't have — archived, or lost and waiting
    /// for recovery, which reads the closed status from Postgres — is left alone: writing one
    /// field would make a half-made drop.
    async fn close_in_redis(&self, drop: &DropId) -> Result<()> {
        if self
            .redis
            .drop_state(drop)
            .await?
            .is_some_and(|s| s.status != "closed")
        {
            self.redis.set_meta(drop, "status", "closed").await?;
        }
        Ok(())
    }

    /// A drop's cancellation, for its seller or ops; 404 `no_cancellation` if it wasn't cancelled.
    pub async fn cancellation(&self, key: &ApiKey, drop: &DropId) -> Result<CancellationView> {
        match key.scope {
            Scope::Ops => self.drop_def(drop).await?,
            Scope::Seller => self
                .owned_drop(key, drop)
                .await
                .map_err(|e| not_found_as(e, Code::UnknownDrop))?,
        };
        let row = self
            .db
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT {CANCELLATION_COLUMNS} FROM drop_cancellations WHERE drop_id = $1"
                ),
                &[&drop.as_str()],
            )
            .await?
            .ok_or_else(|| Error::new(Code::NoCancellation))?;
        cancellation_view(&row)
    }

    /// One round of the cancel job: each running cancellation (at most
    /// `reconciler.max_drops_watched` of them; a process that looks after only the drops it
    /// served takes only those and those it was asked to cancel) whose round lease this
    /// instance holds gets one batch. How many orders it refunded.
    pub async fn cancel_round(&self) -> usize {
        let drops = match self.running_cancellations().await {
            Ok(drops) => drops,
            Err(e) => {
                tracing::debug!(error = %e, "cancel round skipped");
                return 0;
            }
        };
        let mut refunded = 0;
        for drop in drops {
            // One instance at a time works a drop (docs/ARCHITECTURE.md, "Many instances").
            if !self.round_leases.held(&self.redis, &drop).await {
                continue;
            }
            match self.cancel_batch(&drop).await {
                Ok(n) => refunded += n,
                Err(e) => tracing::warn!(%drop, error = %e, "cancel batch failed; next round"),
            }
        }
        refunded
    }

    async fn running_cancellations(&self) -> Result<Vec<DropId>> {
        let rows = self
            .db
            .client()
            .await?
            .query(
                "SELECT drop_id FROM drop_cancellations WHERE state = 'running' \
                 ORDER BY started_at LIMIT $1",
                &[&(self.cfg.reconciler.max_drops_watched as i64)],
            )
            .await?;
        let only = (self.cfg.reconciler.watch_newest_drops == 0).then(|| {
            let mut drops = self.watched_drops();
            drops.extend(lock(&self.cancelled_here).iter().cloned());
            drops
        });
        Ok(rows
            .iter()
            .filter_map(|r| DropId::parse(r.get(0)).ok())
            .filter(|d| only.as_ref().is_none_or(|only| only.contains(d)))
            .collect())
    }

    /// One batch of a drop's cancel job: up to `reconciler.cancel_batch` orders that have
    /// something left to refund and no cancel refund yet, each refunded whole (recorded, then
    /// its next steps taken at once); then the progress is written, and the job marked done when
    /// Redis holds nothing of the drop, no order is left and every cancel refund is finished. How
    /// many orders it refunded.
    pub async fn cancel_batch(&self, drop: &DropId) -> Result<usize> {
        let refund_id = cancel_refund_id(drop);
        let client = self.db.client().await?;
        let job = client
            .query_opt(
                "SELECT key_id FROM drop_cancellations WHERE drop_id = $1 AND state = 'running'",
                &[&drop.as_str()],
            )
            .await?;
        let Some(job) = job else {
            return Ok(0);
        };
        // Every batch, not only the cancel: a cancel whose Redis write failed after Postgres
        // committed (its caller saw an error and may never retry) stops selling within a round,
        // and the `held == 0` test below can't be kept open by new holds.
        self.close_in_redis(drop).await?;
        let key_id: String = job.get(0);
        let orders = client
            .query(
                &format!("{ORDERS_LEFT_LIST} LIMIT $3"),
                &[
                    &drop.as_str(),
                    &refund_id,
                    &(self.cfg.reconciler.cancel_batch as i64),
                ],
            )
            .await?;
        // Not kept across the refunds: each takes a connection of its own.
        std::mem::drop(client);
        let mut refunded = 0;
        for row in &orders {
            let order = OrderId(row.get(0));
            match self
                .db
                .record_refund(order, &refund_id, &key_id, None)
                .await
            {
                Ok(rec) => {
                    self.advance_refund(&rec).await;
                    refunded += 1;
                }
                // Refunded whole meanwhile by another refund: nothing left for this one.
                Err(e) if e.code == Code::AlreadyRefunded => {}
                Err(e) => {
                    tracing::warn!(%drop, %order, error = %e, "cancel refund failed; next round")
                }
            }
        }
        // A hold still live may yet be bought (a close lets existing holds confirm): the job isn't
        // done while Redis holds anything. Read before Postgres' orders: a confirm commits its
        // order in Postgres before its units leave `held`, so an order whose hold is gone here is
        // in the count below.
        let quiet = match self.redis.drop_state(drop).await? {
            Some(_) => self.redis.counts(drop).await?.values().all(|c| c.held == 0),
            // An archived drop has no holds; one missing from Redis otherwise waits for recovery.
            None => self.db.is_archived(drop).await?,
        };
        // Progress: the cancel refunds finished, and those recorded plus the orders still left.
        let state = self
            .db
            .client()
            .await?
            .query_opt(
                &format!(
                    "WITH mine AS (SELECT count(*) AS recorded, \
                        count(*) FILTER (WHERE state IN ('returned', 'closed')) AS finished \
                        FROM refunds WHERE drop_id = $1 AND refund_id = $2), \
                     left_ AS (SELECT count(*) AS n FROM ({ORDERS_LEFT_LIST}) o) \
                     UPDATE drop_cancellations SET \
                        orders_total = mine.recorded + left_.n, \
                        orders_refunded = mine.finished, \
                        state = CASE WHEN $3 AND left_.n = 0 AND mine.finished = mine.recorded \
                            THEN 'done' ELSE 'running' END, \
                        finished_at = CASE WHEN $3 AND left_.n = 0 \
                            AND mine.finished = mine.recorded THEN now() END \
                     FROM mine, left_ WHERE drop_id = $1 AND drop_cancellations.state = 'running' \
                     RETURNING drop_cancellations.state"
                ),
                &[&drop.as_str(), &refund_id, &quiet],
            )
            .await?;
        if state.is_some_and(|row| row.get::<_, &str>(0) == "done") {
            lock(&self.cancelled_here).remove(drop);
        }
        Ok(refunded)
    }
}

/// The orders of drop `$1` that still have something to refund and no refund `$2` yet (the
/// cancel job's work list; `orders_drop_recent` and the refunds' primary key serve it).
const ORDERS_LEFT_LIST: &str = "SELECT o.order_id FROM orders o WHERE o.drop_id = $1 \
     AND NOT EXISTS (SELECT 1 FROM refunds r WHERE r.order_id = o.order_id AND r.refund_id = $2) \
     AND EXISTS (SELECT 1 FROM order_items i \
        WHERE i.order_id = o.order_id AND i.refunded < i.quantity)";

/// How many orders of drop `$1` have something to refund (no cancel refund exists yet).
const ORDERS_LEFT: &str = "SELECT count(*)::integer FROM orders o WHERE o.drop_id = $1 \
     AND EXISTS (SELECT 1 FROM order_items i \
        WHERE i.order_id = o.order_id AND i.refunded < i.quantity)";

#[cfg(test)]
mod tests {
    use super::*;

    /// The `drop_cancellations.state` CHECK names exactly the enum's states.
    #[test]
    fn cancellation_states_match_the_sql_check() {
        let sql = include_str!("../../../migrations/0010_drop_cancellations.sql");
        let list = sql
            .split_once("CHECK (state IN (")
            .and_then(|(_, rest)| rest.split_once(')'))
            .expect("a CHECK (state IN (...)) on drop_cancellations.state")
            .0;
        let in_sql: Vec<&str> = list
            .split(',')
            .map(|name| name.trim().trim_matches('\''))
            .collect();
        let in_rust: Vec<&str> = CancellationState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(in_sql, in_rust);
        for state in CancellationState::ALL {
            assert_eq!(CancellationState::parse(state.as_str()).unwrap(), state);
        }
    }
}
