//! The work that keeps Redis honest without a request: the sweeper (expiry), the reconciler
//! (confirms that stopped halfway), the watcher (Redis restarts and lost drops), recovery
//! (rebuilding a drop from Postgres, in slices) and the archiver (closed drops leave Redis).

use super::*;

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

    /// Starts the sweeper, reconciler, watcher and archiver; they stop when `shutdown` turns true.
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
            shutdown.clone(),
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
        let e = self.clone();
        tasks.push(tokio::spawn(every(
            ms(self.cfg.redis.aof_check_interval_ms),
            shutdown.clone(),
            move || {
                let e = e.clone();
                async move {
                    e.aof_round().await;
                }
            },
        )));
        let e = self.clone();
        tasks.push(tokio::spawn(every(
            ms(self.cfg.drops.archive_interval_ms),
            shutdown,
            move || {
                let e = e.clone();
                async move {
                    e.archive_round().await;
                }
            },
        )));
        tasks
    }

    /// The AOF rewrite policy's look (engine::aof), at each server that keeps a file (every
    /// primary of a cluster): asks each for a rewrite when one is due there, and says which
    /// rewrite, if any, it asked for first.
    pub async fn aof_round(&self) -> Option<crate::aof::Rewrite> {
        let mut asked = None;
        for node in self.redis.aof_nodes() {
            let state = match self.redis.aof_state(&node).await {
                Ok(state) => state,
                Err(e) => {
                    tracing::debug!(%node, error = %e, "could not read Redis' AOF state");
                    continue;
                }
            };
            let quiet_for = self.aof_quiet.look(
                &node.to_string(),
                state.is_quiet(&self.cfg.redis),
                Instant::now(),
            );
            let Some(due) = crate::aof::due(&state, &self.cfg.redis, quiet_for) else {
                continue;
            };
            match self.redis.rewrite_aof(&node).await {
                Ok(()) => {
                    tracing::info!(
                        %node,
                        why = ?due,
                        growth_pct = state.growth_pct(),
                        ops_per_s = state.ops_per_s,
                        "asked Redis to rewrite its AOF"
                    );
                    asked = asked.or(Some(due));
                }
                // Another instance may have asked a moment before: Redis refuses a second one.
                // Any other refusal (a managed Redis that forbids the command) leaves the file
                // growing, which an operator must hear of (or set redis.aof_rewrite_growth_pct = 0).
                Err(e) if e.message.contains("already in progress") => {
                    tracing::debug!(%node, error = %e, "BGREWRITEAOF: another one runs");
                }
                Err(e) => {
                    tracing::warn!(%node, error = %e, "Redis refused BGREWRITEAOF: its AOF keeps growing");
                }
            }
        }
        asked
    }

    /// One sweep: every watched drop's overdue holds back to stock, in bounded batches.
    pub async fn sweep(&self) {
        for drop in self.watched_drops() {
            // One instance at a time sweeps a drop (docs/ARCHITECTURE.md, "Many instances").
            if !self.round_leases.held(&self.redis, &drop).await {
                continue;
            }
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

    /// One reconciler round: every unsettled payment attempt in Postgres (whatever its drop's
    /// age, whichever process served it), then every watched drop's overdue confirms (an attempt
    /// that never recorded its payment is only in Redis), then captures that failed, then
    /// refunds left unfinished (booking/refunds.rs), then a batch of each cancelled drop's
    /// orders refunded (booking/cancel.rs). A hold
    /// whose settlement fails is logged and left for the next round; the round goes on.
    pub async fn reconcile(&self) {
        let mut clocks = HashMap::new();
        self.reconcile_attempts(&mut clocks).await;
        // Every drop's overdue confirms this round found, summed: one drop's figure alone would
        // say only the last drop's (each drop's own is floodgate_drop_confirming_overdue_holds).
        let mut backlog = 0;
        for drop in self.watched_drops() {
            if !self.round_leases.held(&self.redis, &drop).await {
                continue;
            }
            match self.reconcile_drop(&drop).await {
                Ok(overdue) => backlog += overdue,
                Err(e) => tracing::debug!(%drop, error = %e, "reconciling this drop stopped"),
            }
        }
        metrics::gauge!(m::CONFIRMING_BACKLOG).set(backlog as f64);
        match self.db.uncaptured(self.cfg.reconciler.batch as i64).await {
            Ok(attempts) => {
                for (hold, reference) in attempts {
                    self.capture(&hold, &reference).await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "capture round skipped"),
        }
        self.resume_refunds().await;
        self.cancel_round().await;
    }

    /// The unsettled attempts Postgres has, each settled on its own (one failing doesn't stop
    /// the rest). A process told to look after only the drops it served
    /// (`reconciler.watch_newest_drops = 0`, the test servers on a shared stack) takes only
    /// those drops' attempts.
    async fn reconcile_attempts(&self, clocks: &mut HashMap<DropId, i64>) {
        let only = (self.cfg.reconciler.watch_newest_drops == 0).then(|| self.watched_drops());
        let attempts = match self
            .db
            .unsettled(self.cfg.reconciler.batch as i64, only.as_deref())
            .await
        {
            Ok(attempts) => attempts,
            Err(e) => {
                tracing::debug!(error = %e, "the round of unsettled payments was skipped");
                return;
            }
        };
        for attempt in attempts {
            if lock(&self.inflight).contains_key(&attempt.hold) {
                continue;
            }
            let settled = match self.settle_attempt(&attempt, clocks).await {
                Ok(settled) => settled,
                Err(e) => {
                    tracing::warn!(hold = %attempt.hold, error = %e, "settling this payment attempt failed; retrying next round");
                    false
                }
            };
            if !settled {
                if let Err(e) = self
                    .db
                    .touch_attempt(&attempt.hold, &attempt.reference)
                    .await
                {
                    tracing::debug!(hold = %attempt.hold, error = %e, "could not requeue the attempt");
                }
            }
        }
    }

    /// Redis' clock for `drop`, read once a round (an older reading only makes a deadline look
    /// less overdue, never more).
    async fn redis_now(&self, drop: &DropId, clocks: &mut HashMap<DropId, i64>) -> Result<i64> {
        if let Some(now) = clocks.get(drop) {
            return Ok(*now);
        }
        let now = self.redis.time_ms(drop).await?;
        clocks.insert(drop.clone(), now);
        Ok(now)
    }

    /// Settles one unsettled attempt if it is due; says whether it is done with (settled, or
    /// still in time), false when it needs another round.
    async fn settle_attempt(
        &self,
        attempt: &Unsettled,
        clocks: &mut HashMap<DropId, i64>,
    ) -> Result<bool> {
        let (hold, reference) = (&attempt.hold, attempt.reference.as_str());
        if attempt.state == PaymentState::Voiding {
            // Postgres has ended it; the gateway's void is what's missing. The hold goes back
            // if it is still confirming under this attempt (the process that began voiding it
            // may have died before its revert).
            let voided = self.finish_void(hold, reference).await;
            self.redis.confirm_revert(hold, reference).await?;
            return Ok(voided);
        }
        let drop = hold.drop_id();
        match self.redis.hold(hold).await? {
            Some(rec)
                if rec.st == HoldState::Confirming
                    && rec.reference.as_deref() == Some(reference) =>
            {
                let now = self.redis_now(&drop, clocks).await?;
                if rec.cexp.is_some_and(|deadline| deadline > now) {
                    return Ok(true);
                }
                let def = self.drop_def(&drop).await?;
                self.settle_overdue(&def, hold, &rec).await
            }
            // The hold isn't confirming under this attempt (any more): the attempt never sells.
            // It is left `pending` because its end wasn't written (a decline whose write
            // failed) or its hold was lost. Ended once its confirm deadline is surely past —
            // a request still authorizing it would otherwise meet a void that came first.
            _ if attempt.age_ms > self.cfg.holds.confirm_timeout_ms as i64 => {
                let found = self
                    .db
                    .void_attempt(
                        hold,
                        &attempt.fan,
                        self.gateway.name(),
                        reference,
                        attempt.amount_cents,
                    )
                    .await?;
                Ok(found != Voiding::Was(PaymentState::Pending)
                    || self.finish_void(hold, reference).await)
            }
            _ => Ok(true),
        }
    }

    /// Settles a drop's confirming holds past their confirm deadline (Redis' clock), each on its
    /// own: one failing is logged, and the others are still settled. Returns how many were
    /// overdue (at most `reconciler.batch`).
    pub async fn reconcile_drop(&self, drop: &DropId) -> Result<usize> {
        let now = self.redis.time_ms(drop).await?;
        let overdue = self
            .redis
            .overdue_confirming(drop, now, self.cfg.reconciler.batch)
            .await?;
        let found = overdue.len();
        if overdue.is_empty() {
            return Ok(0);
        }
        let def = self.drop_def(drop).await?;
        for hold in overdue {
            if lock(&self.inflight).contains_key(&hold) {
                continue;
            }
            let result = match self.redis.hold(&hold).await {
                Ok(Some(rec)) if rec.st == HoldState::Confirming => {
                    self.settle_overdue(&def, &hold, &rec).await
                }
                Ok(_) => Ok(false),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::warn!(%hold, error = %e, "settling this hold failed; retrying next round")
            }
        }
        Ok(found)
    }

    /// Settles one confirming hold past its confirm deadline: an order in Postgres → sold; an
    /// attempt that never recorded its payment (so never reached the gateway, which comes after)
    /// → recorded `voided`, hold back; else the gateway says: authorized → commit and sell;
    /// declined or unknown → void and revert. A gateway that doesn't answer leaves the hold for
    /// the next round (voiding a payment that may have gone through would sell nothing while
    /// the fan was charged). Postgres arbitrates with a request still committing the same
    /// attempt (maybe on another instance): the attempt leaves `pending` once, to `authorized`
    /// (the commit) or `voiding` (here). Says whether the hold was settled.
    pub(super) async fn settle_overdue(
        &self,
        def: &DropDef,
        hold: &HoldId,
        rec: &HoldRecord,
    ) -> Result<bool> {
        let Some(reference) = rec.reference.as_deref() else {
            return Ok(false);
        };
        let settled = if let Some(order) = self.db.order_by_hold(hold).await? {
            self.capture(hold, reference).await;
            self.redis.confirm_finish(hold, order.order_id).await?;
            true
        } else if self.db.attempt_state(hold, reference).await?.is_none() {
            self.void_and_revert(def, hold, rec).await?
        } else {
            let timeout = ms(self.cfg.gateway.timeout_ms);
            let lookup =
                match tokio::time::timeout(timeout, self.gateway.lookup(hold, reference)).await {
                    Ok(Ok(l)) => l,
                    _ => return Ok(false),
                };
            match lookup {
                Lookup::Authorized | Lookup::Captured => {
                    self.commit_and_finish(def, hold, rec).await?.is_some()
                }
                Lookup::Declined | Lookup::Voided | Lookup::Unknown => {
                    self.void_and_revert(def, hold, rec).await?
                }
            }
        };
        if settled {
            metrics::counter!(m::RECONCILED).increment(1);
        }
        Ok(settled)
    }

    /// A drop missing from Redis, left `recovering`, or loaded in an earlier Redis run (a restart
    /// or failover may have lost its last writes) → that drop recovers. Comparing each drop's
    /// stamped run id, rather than remembering the last one seen, also catches a restart that
    /// happened while this process was down. Both run ids come from one read on the node that
    /// owns the drop's slot (lua/drop_state.lua), so on a Redis Cluster each drop is judged by
    /// its own shard: a failover of one shard recovers only that shard's drops. Recoveries run as tasks of their own, up to
    /// `recovery.concurrent_drops` at once, so a huge drop's rebuild keeps neither the small
    /// drops' nor a later round's waiting.
    pub(super) async fn watch_redis(self: &Arc<Self>) {
        for drop in self.watched_drops() {
            // Watched by the instance running the drop's rounds (docs/ARCHITECTURE.md, "Many
            // instances"); a dead holder's drops are watched again within a lease.
            if !self.round_leases.held(&self.redis, &drop).await {
                continue;
            }
            let needs = match self.redis.drop_state_and_server_run(&drop).await {
                Ok(Some((state, server_run))) if state.run_id != server_run => true,
                Ok(Some((state, _))) if state.recovering => {
                    !self.rebuild_at_work(&drop, state.rebuild)
                }
                Ok(Some(_)) => {
                    lock(&self.rebuilds_seen).remove(&drop);
                    false
                }
                Ok(None) => true,
                Err(_) => return,
            };
            if !needs {
                continue;
            }
            {
                let mut r = lock(&self.recovering);
                if r.contains_key(&drop) {
                    continue;
                }
                if r.len() >= self.cfg.recovery.concurrent_drops {
                    // The rest wait for a later round.
                    return;
                }
                r.insert(drop.clone(), Instant::now());
            }
            let e = self.clone();
            tokio::spawn(async move {
                let _claim = Claimed {
                    engine: &e,
                    drop: drop.clone(),
                };
                if let Err(err) = e.recover_claimed(&drop).await {
                    tracing::warn!(%drop, error = %err, "recovery failed; retrying next round");
                }
            });
        }
    }

    /// Whether a rebuild or load of the drop (another instance's, or this one's) is at work: its
    /// slice count moved within `recovery.stalled_after_ms`. One that stalled (its process died)
    /// is taken over; two watchers must not keep superseding each other's rebuilds.
    fn rebuild_at_work(&self, drop: &DropId, rebuild: Option<(String, i64)>) -> bool {
        let mut seen = lock(&self.rebuilds_seen);
        let Some(now) = rebuild else {
            seen.remove(drop);
            return false;
        };
        match seen.get(drop) {
            Some(last) if last.progress == now => {
                last.since.elapsed() < ms(self.cfg.recovery.stalled_after_ms)
            }
            _ => {
                // Bounded by the drops looked after: an entry goes once its drop isn't
                // recovering any more (watch_redis).
                let last = SeenRebuild {
                    progress: now,
                    since: Instant::now(),
                };
                seen.insert(drop.clone(), last);
                true
            }
        }
    }

    pub(super) fn start_recovery(&self, drop: &DropId) {
        // The watcher does the work; this makes sure it looks at this drop soon.
        self.watch_drop(drop);
    }

    /// Recovery (and the rebuild command): make the drop's Redis state agree with Postgres.
    /// Reserves and confirms answer 503 `recovering` until it is done. If this process is already
    /// recovering the drop, returns at once with nothing kept or ended.
    pub async fn recover(&self, drop: &DropId) -> Result<(i64, i64)> {
        {
            let mut r = lock(&self.recovering);
            if r.contains_key(drop) {
                return Ok((0, 0));
            }
            r.insert(drop.clone(), Instant::now());
        }
        let _claim = Claimed {
            engine: self,
            drop: drop.clone(),
        };
        self.recover_claimed(drop).await
    }

    /// What recovery has done in this process so far: rebuilds' live holds kept and holds
    /// ended, script calls, and the most entries one call handled (at most `recovery.slice`).
    pub fn recovery_stats(&self) -> RebuildReport {
        *lock(&self.recovery_stats)
    }

    pub(super) fn count_slices(&self, report: &RebuildReport) {
        let mut s = lock(&self.recovery_stats);
        s.kept += report.kept;
        s.ended += report.ended;
        s.calls += report.calls;
        s.max_entries_per_call = s.max_entries_per_call.max(report.max_entries_per_call);
    }

    /// Recovery of a drop this process has claimed in `recovering`.
    async fn recover_claimed(&self, drop: &DropId) -> Result<(i64, i64)> {
        let mut result = self.recover_inner(drop).await;
        // An order committed meanwhile for a hold Redis had lost is in neither the rebuild nor
        // Redis: Postgres' sold counts moved during the rebuild → rebuild again.
        for _ in 1..self.cfg.reconciler.recover_rounds_max {
            match result {
                Ok((_, _, false)) => result = self.recover_inner(drop).await,
                _ => break,
            }
        }
        let (kept, ended, settled) = result?;
        if !settled {
            // Still moving: leave it `recovering`, the watcher comes back to it.
            self.redis.set_meta(drop, "recovering", "1").await?;
        }
        Ok((kept, ended))
    }

    /// One rebuild, in slices of `recovery.slice` entries (lua/rebuild.lua); the bool says
    /// whether Postgres' sold counts and totals stayed as read while it ran.
    pub(super) async fn recover_inner(&self, drop: &DropId) -> Result<(i64, i64, bool)> {
        if self.db.is_archived(drop).await? {
            // Postgres is an archived drop's only record: nothing to rebuild (and no meta key to
            // write, which would bring it back to readers half made). No longer looked after.
            self.forget_drop(drop);
            return Ok((0, 0, true));
        }
        self.redis.set_meta(drop, "recovering", "1").await?;
        let (def, status) = self
            .db
            .drop_def(drop)
            .await?
            .ok_or_else(|| Error::new(Code::UnknownDrop))?;
        let snapshot = self.db.recovery_snapshot(drop).await?;
        let mut image = self.drop_image(&def, &status);
        image.meta["recovering"] = json!("1");
        for (bucket, total, sold) in &mut image.buckets {
            *sold = snapshot.sold.get(bucket.as_str()).copied().unwrap_or(0);
            // The definition's total plus any restock's (Postgres raises it before Redis).
            if let Some(t) = snapshot.totals.get(bucket.as_str()) {
                *total = *t;
            }
        }
        for (seat, sold) in &mut image.seats {
            *sold = snapshot.sold_seats.contains(seat.as_str());
        }
        image.bought = snapshot.bought.clone();
        image.refunds = snapshot.refunds.clone();
        let admission = self.admission_settings(drop).await?;
        self.redis
            .set_admission(drop, admission_fields(&admission))
            .await?;
        if def.admission.mode == AdmissionMode::Queue {
            // The line's own keys, if Redis lost them or may have lost their tail: set up again
            // from the marks Postgres kept (lua/line_restore.lua), before the drop leaves
            // `recovering` and fans come back. Before lua/rebuild.lua: the script tells a drop
            // whose data came from another Redis run (a restart, a failover: its last joins may
            // be gone though the counter isn't) by the run id the rebuild stamps anew.
            let marks = self.db.line_marks(drop).await?;
            let q = &self.cfg.queue;
            let returning_ms = q.recovery_return_s.saturating_mul(1000);
            if self
                .redis
                .restore_line(drop, marks, q.line_seq_margin, returning_ms)
                .await?
            {
                tracing::info!(%drop, ?marks, "the line was lost or may have lost its tail: restored from its kept marks");
            }
        }
        let mut rebuild = self
            .redis
            .begin_rebuild(drop, &image, self.cfg.recovery.slice)
            .await?;
        while let Some(holds) = rebuild.next_holds().await? {
            let orders = snapshot.orders(&holds).await?;
            rebuild.sort(&holds, &orders).await?;
        }
        let report = rebuild.finish().await?;
        self.count_slices(&report);
        // Each bucket's (total, sold) as read: a sale or a restock that Postgres committed
        // meanwhile (its Redis step refused while `recovering`) means another round.
        let read: HashMap<String, (i64, i64)> = snapshot
            .totals
            .iter()
            .map(|(b, t)| (b.clone(), (*t, snapshot.sold.get(b).copied().unwrap_or(0))))
            .collect();
        snapshot.finish().await?;
        let settled = self.db.final_counts(drop).await? == read;
        let (kept, ended) = (report.kept, report.ended);
        let _ = self
            .db
            .record_rebuild(
                drop,
                &format!("recovered: {kept} live holds kept, {ended} ended"),
            )
            .await;
        metrics::counter!(m::RECOVERIES).increment(1);
        tracing::info!(%drop, kept, ended, settled, calls = report.calls, "drop recovered from Postgres");
        Ok((kept, ended, settled))
    }
}

impl Engine {
    /// One archiver round: up to `drops.archive_batch` closed drops, closed at least
    /// `drops.archive_after_s` ago, leave Redis (a process that looks after only the drops it
    /// served archives only those). How many were archived.
    pub async fn archive_round(&self) -> usize {
        let only = (self.cfg.reconciler.watch_newest_drops == 0).then(|| self.watched_drops());
        let candidates = match self
            .db
            .archive_candidates(
                self.cfg.drops.archive_after_s,
                self.cfg.drops.archive_batch as i64,
                only.as_deref(),
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "archiver round skipped");
                return 0;
            }
        };
        let mut archived = 0;
        for (drop, marked) in candidates {
            match self.archive(&drop, marked).await {
                Ok(true) => archived += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(%drop, error = %e, "archiving this drop failed; next round")
                }
            }
        }
        archived
    }

    /// Archives one closed drop: Postgres marks it archived (unless a payment of it is unsettled)
    /// — from then on readers serve it from Postgres and recovery skips it — then its Redis keys
    /// go (lua/archive.lua), then Postgres notes they are gone. A drop that still holds anything
    /// waits. Stopped halfway, the next round picks it up where it stopped.
    async fn archive(&self, drop: &DropId, marked: bool) -> Result<bool> {
        if !marked {
            // Nothing may still be held or being paid for (a flushed drop holds nothing).
            if let Some(state) = self.redis.drop_state(drop).await? {
                if state.status != "closed" || state.recovering {
                    return Ok(false);
                }
                if self.redis.counts(drop).await?.values().any(|c| c.held != 0) {
                    return Ok(false);
                }
            }
            if !self.db.mark_archived(drop).await? {
                return Ok(false);
            }
        }
        if let Err(why) = self.redis.archive(drop).await? {
            tracing::debug!(%drop, why, "archived drop's keys stay for now");
            return Ok(false);
        }
        self.db.mark_archive_done(drop).await?;
        self.forget_drop(drop);
        tracing::info!(%drop, "closed drop archived: Postgres serves it from now on");
        Ok(true)
    }

    /// An archived drop is no longer looked after by the sweeper, reconciler or watcher.
    fn forget_drop(&self, drop: &DropId) {
        lock(&self.touched).remove(drop);
        lock(&self.watched).retain(|d| d != drop);
    }
}

/// A rebuild of a drop as this process's watcher last saw it: its token and slices done, and since
/// when they haven't moved.
pub(super) struct SeenRebuild {
    progress: (String, i64),
    since: Instant,
}

/// A drop this process is recovering (its entry in `Engine::recovering`), released however the
/// recovery ends, a panic included.
struct Claimed<'a> {
    engine: &'a Engine,
    drop: DropId,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        lock(&self.engine.recovering).remove(&self.drop);
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
