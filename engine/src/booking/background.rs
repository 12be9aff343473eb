//! The work that keeps Redis honest without a request: the sweeper (expiry), the reconciler
//! (confirms that stopped halfway), the watcher (Redis restarts and lost drops) and recovery
//! (rebuilding a drop from Postgres).

use super::*;

/// Rebuilds of one drop in a row while sales keep landing in Postgres during them.
pub(super) const RECOVER_ROUNDS_MAX: usize = 3;

impl Engine {
    pub(super) fn watched_drops(&self) -> Vec<DropId> {
        let mut drops = lock(&self.watched).clone();
        let mut touched = lock(&self.touched);
        let keep = ms(self.cfg.reconciler.served_keep_ms);
        touched.retain(|_, at| at.elapsed() < keep);
        for drop in touched.keys() {
            if !drops.contains(drop) {
                drops.push(drop.clone());
            }
        }
        drops
    }

    pub(super) async fn refresh_watched(&self) {
        let newest = self
            .cfg
            .reconciler
            .watch_newest_drops
            .min(self.cfg.reconciler.max_drops_watched);
        if newest == 0 {
            // Only the drops this process served (`touched`); Postgres isn't asked.
            return;
        }
        match self.db.live_drops(newest as i64).await {
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
                    let refresh = ms(e.cfg.reconciler.watched_refresh_ms);
                    let stale = lock(&last_refresh).is_none_or(|t| t.elapsed() >= refresh);
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
            for _ in 0..self.cfg.holds.sweep_rounds_max {
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
    pub(super) async fn watch_redis(&self) {
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

    pub(super) fn start_recovery(&self, drop: &DropId) {
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
    pub(super) async fn recover_inner(&self, drop: &DropId) -> Result<(i64, i64, bool)> {
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
}

/// Runs `f` every `period` until shutdown.
pub(super) async fn every<F, Fut>(period: Duration, mut shutdown: watch::Receiver<bool>, f: F)
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
