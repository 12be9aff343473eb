//! Paying for a hold (the hold lifecycle in docs/ARCHITECTURE.md): confirm begin in Redis, a
//! payments row, authorize, the order's commit through the writer, capture, then confirm finish —
//! or void and revert. Concurrent confirms of one hold wait for the first.

use super::*;
use crate::writer::NewPayment;

/// A payment as the fan sends it: `{"gateway": "test", "reference": "ok_1"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payment {
    pub gateway: String,
    pub reference: PaymentReference,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmBody {
    pub payment: Payment,
}

/// The result of one confirm, shared with concurrent confirms of the same hold.
pub(super) type ConfirmResult = Result<(Order, bool)>;

pub(super) struct Inflight {
    /// The hold's fan: another fan's confirm must not join (it would be handed this one's order).
    fan: FanId,
    reference: PaymentReference,
    done: watch::Receiver<Option<ConfirmResult>>,
}

/// Removes a hold's in-flight confirm entry when its task ends, however it ends.
pub(super) struct InflightGuard {
    engine: Arc<Engine>,
    hold: HoldId,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        lock(&self.engine.inflight).remove(&self.hold);
    }
}

impl Engine {
    /// Pays for a hold. Concurrent confirms of one hold in this process share one attempt; the
    /// first answers 201, the others (and later repeats) 200 with the same order.
    pub async fn confirm(
        self: &Arc<Self>,
        fan: &FanId,
        hold: &HoldId,
        payment: Payment,
    ) -> Result<Made<Order>> {
        if payment.gateway != self.gateway.name() {
            return Err(Error::invalid(format!(
                "payment.gateway must be `{}`",
                self.gateway.name()
            )));
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
            return result.map(|(order, new)| {
                if new {
                    Made::New(order)
                } else {
                    Made::Existing(order)
                }
            });
        }
        let mut rx = waiting.ok_or_else(|| Error::internal("confirm wait"))?;
        let result = rx
            .wait_for(|v| v.is_some())
            .await
            .map_err(|_| Error::internal("confirm leader vanished"))?
            .clone()
            .ok_or_else(|| Error::internal("confirm result missing"))?;
        result.map(|(order, _)| Made::Existing(order))
    }

    pub(super) async fn confirm_once(
        &self,
        fan: &FanId,
        hold: &HoldId,
        payment: &Payment,
    ) -> ConfirmResult {
        let def = self
            .drop_def(&hold.drop_id())
            .await
            .map_err(|e| not_found_as(e, Code::UnknownHold))?;
        self.watch_drop(&def.drop_id);
        let step = Instant::now();
        let begun = match self
            .redis
            .confirm_begin(hold, fan, payment.reference.as_str())
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
        // The confirm deadline is on Redis' clock, so it is never compared with this process's:
        // what is left of it (less the safety margin) is read off Redis' clock once, after the
        // begin, and counted down on this process's monotonic clock from before that read —
        // so the local cut-off falls no later than the real one.
        let asked = Instant::now();
        let redis_now = self.redis.time_ms(&def.drop_id).await?;
        let margin_ms = self.cfg.holds.confirm_safety_margin_ms as i64;
        let left_ms = rec.cexp.map_or(0, |d| d - margin_ms - redis_now).max(0);
        let cut_off = asked + ms(left_ms as u64);
        let step = confirm_step("begin", step);
        let (_, total) = priced_items(&def, &rec.it);
        // If this fails nothing was charged: the hold stays confirming and the reconciler settles it.
        // Recorded through the order writer, in one transaction with other confirms' writes.
        let recorded = self
            .writer()?
            .begin_payment(NewPayment {
                hold_id: hold.clone(),
                reference: payment.reference.as_str().to_owned(),
                fan: fan.as_str().to_owned(),
                gateway: self.gateway.name().to_owned(),
                amount_cents: total,
            })
            .await?;
        let step = confirm_step("payment_row", step);
        if !recorded {
            return self
                .attempt_already_recorded(hold, &payment.reference)
                .await;
        }
        // The reconciler takes holds past their confirm deadline and ends attempts it finds
        // unrecorded: an insert that landed late (a stall, a partition) must not go on to charge
        // the fan for a hold that may be back in stock. Nothing is charged yet.
        if Instant::now() >= cut_off {
            return Err(payment_pending());
        }
        // Bounded by `gateway.timeout_ms`, below the safety margin (Config::validate): an
        // authorization that starts before the cut-off ends before the confirm deadline, when
        // the reconciler may look it up.
        let timeout = ms(self.cfg.gateway.timeout_ms);
        let auth = tokio::time::timeout(
            timeout,
            self.gateway
                .authorize(hold, payment.reference.as_str(), total, &def.currency),
        )
        .await
        .unwrap_or(Err(GatewayError::Timeout));
        confirm_step("authorize", step);
        match auth {
            Ok(()) => {}
            Err(GatewayError::Declined) => {
                // A failed write leaves the attempt `pending`; the reconciler ends it.
                if let Err(e) = self
                    .db
                    .set_payment_state(
                        hold,
                        payment.reference.as_str(),
                        PaymentState::Pending,
                        PaymentState::Declined,
                    )
                    .await
                {
                    tracing::warn!(%hold, error = %e, "could not record a decline; the reconciler ends the attempt");
                }
                self.redis
                    .confirm_revert(hold, payment.reference.as_str())
                    .await?;
                return Err(Error::new(Code::PaymentDeclined));
            }
            Err(e) => {
                tracing::info!(%hold, error = %e, "payment pending; the reconciler will settle it");
                return Err(payment_pending());
            }
        }
        // Past this point only the reconciler may settle: it takes holds past their confirm
        // deadline, and we must not commit one it may be reverting.
        if Instant::now() >= cut_off {
            return Err(payment_pending());
        }
        // Redis may have lost the hold while this payment was authorized (a restart from an AOF
        // that missed its last second, a failover): its units are then free there, and once the
        // drop is rebuilt another fan may take and pay for them — an order committed now would
        // meet that sale at Postgres' final check (a seat sold twice: 500, the payment voided).
        // So only a hold Redis still keeps is committed: confirming, or held (a copy from before
        // this confirm began: the units are still the hold's). Else this payment is voided (its
        // authorization is over, so the void can't come first) and the fan hears how the hold
        // ended. Known limit: a restart between this read and the commit still slips through;
        // the confirm's finish then finds no hold and the drop is rebuilt (docs/ARCHITECTURE.md).
        let gone = match self.redis.hold(hold).await? {
            Some(now) if matches!(now.st, HoldState::Confirming | HoldState::Held) => None,
            Some(_) => Some(Code::HoldExpired),
            None => Some(Code::UnknownHold),
        };
        if let Some(code) = gone {
            let voided = match self.void_and_revert(&def, hold, &rec).await {
                Ok(voided) => voided,
                // Voided in Postgres and at the gateway; only the hold's revert found nothing
                // to revert (or the drop is being rebuilt, which settles the hold).
                Err(e) if matches!(e.code, Code::UnknownHold | Code::Recovering) => true,
                Err(e) => return Err(e),
            };
            // Not voided: the attempt is authorized, so its order is committed or committing
            // (the reconciler got there first): the commit below finds it.
            if voided {
                tracing::warn!(%hold, "Redis lost the hold during its payment: voided, not sold");
                return Err(Error::new(code));
            }
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

    /// The attempt `(hold, reference)` was in Postgres before this confirm recorded it: the same
    /// reference used by an earlier attempt, or the reconciler ended this one while its insert
    /// stalled. Either way this confirm charges nothing. An ended attempt's reference is spent
    /// with it: the hold goes back to `held` and the fan pays again with another.
    async fn attempt_already_recorded(
        &self,
        hold: &HoldId,
        reference: &PaymentReference,
    ) -> ConfirmResult {
        match self.db.attempt_state(hold, reference.as_str()).await? {
            Some(PaymentState::Declined | PaymentState::Voiding | PaymentState::Voided) => {
                self.redis.confirm_revert(hold, reference.as_str()).await?;
                Err(Error::msg(
                    Code::PaymentDeclined,
                    "The attempt with this payment ended without a sale and nothing was charged; the hold is yours until it expires: pay again.",
                ))
            }
            _ => Err(payment_pending()),
        }
    }

    /// Commits the order for a confirming hold (after authorization), captures, and marks it sold.
    /// `Ok(None)`: the payment attempt was voided meanwhile (by a reconciler, maybe on another
    /// instance); the hold has been reverted and nothing was sold.
    pub(super) async fn commit_and_finish(
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
        let step = Instant::now();
        let committed = self.writer()?.commit(new).await?;
        let step = confirm_step("order_commit", step);
        if committed == Committed::Refused {
            // Postgres' final check refused the sale: undo the payment and the hold, and rebuild
            // the drop from Postgres, since Redis disagrees with it (else every later buyer of
            // these units would be authorized, voided and refused the same way). The hold goes
            // back first: a drop being rebuilt takes no script calls.
            self.void_and_revert(def, hold, rec).await?;
            self.flag_for_rebuild(&def.drop_id, hold).await;
            return Err(Error::msg(
                Code::Internal,
                "The sale was refused by the store's final check.",
            ));
        }
        let Some(order_id) = committed.order_id() else {
            self.void_and_revert(def, hold, rec).await?;
            return Ok(None);
        };
        self.capture(hold, &reference).await;
        let step = confirm_step("capture", step);
        let finished = self.redis.confirm_finish(hold, order_id).await;
        confirm_step("finish", step);
        match finished {
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
                self.flag_for_rebuild(&def.drop_id, hold).await;
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

    /// The order writer; queue-server's engine has none and never confirms.
    fn writer(&self) -> Result<&Writer> {
        self.writer.as_ref().ok_or_else(|| {
            Error::internal("a confirm reached an engine without an order writer (queue-server's)")
        })
    }

    /// Captures an authorized attempt; a failure leaves it `authorized` for the reconciler's
    /// capture round.
    pub(super) async fn capture(&self, hold: &HoldId, reference: &str) {
        let timeout = ms(self.cfg.gateway.timeout_ms);
        match tokio::time::timeout(timeout, self.gateway.capture(hold, reference)).await {
            Ok(Ok(())) => {
                // Through the writer, batched with other confirms' writes.
                let recorded = match self.writer() {
                    Ok(writer) => writer.captured(hold.clone(), reference.to_owned()).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = recorded {
                    tracing::warn!(%hold, error = %e, "captured, but not recorded; the capture round repeats it");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(%hold, error = %e, "capture failed; retried by the reconciler")
            }
            Err(_) => tracing::warn!(%hold, "capture timed out; retried by the reconciler"),
        }
    }

    /// Marks a drop whose Redis state disagrees with Postgres `recovering`, for the watcher to
    /// rebuild. The confirm's answer doesn't wait on it. When Redis can't take the mark, the
    /// error is logged for ops: if Redis restarted or failed over, the watcher's run-id check
    /// rebuilds the drop anyway; otherwise (a timeout, a refused write) nothing will until the
    /// next refused sale marks it again or ops run `booking-api rebuild --drop-id D`
    /// (docs/OPERATIONS.md), which the log line names.
    async fn flag_for_rebuild(&self, drop: &DropId, hold: &HoldId) {
        if let Err(e) = self.redis.set_meta(drop, "recovering", "1").await {
            tracing::error!(
                %drop, %hold, error = %e,
                "Redis disagrees with Postgres and could not be marked for a rebuild: \
                 run `booking-api rebuild --drop-id {drop}` once Redis answers"
            );
        }
    }

    /// Ends the hold's confirming attempt without a sale and gives the hold back: Postgres first
    /// (`pending` → `voiding`, or an unrecorded attempt recorded `voided`: the arbitration with a
    /// request committing the same attempt), then the gateway's void, then the hold back to
    /// `held` (if that attempt is still the one confirming it). The hold goes back even if the
    /// void fails: no order can be committed for a `voiding` attempt, and the reconciler calls
    /// the void again until the gateway confirms it. Returns false, touching nothing, if the
    /// attempt is authorized: its order is committed or committing, and the hold will be sold.
    pub(super) async fn void_and_revert(
        &self,
        def: &DropDef,
        hold: &HoldId,
        rec: &HoldRecord,
    ) -> Result<bool> {
        let reference = rec.reference.as_deref().unwrap_or_default();
        let (_, amount) = priced_items(def, &rec.it);
        let found = self
            .db
            .void_attempt(hold, &rec.fan, self.gateway.name(), reference, amount)
            .await?;
        match found {
            Voiding::Was(PaymentState::Authorized | PaymentState::Captured) => return Ok(false),
            Voiding::Was(PaymentState::Pending | PaymentState::Voiding) => {
                self.finish_void(hold, reference).await;
            }
            Voiding::Unrecorded | Voiding::Was(PaymentState::Declined | PaymentState::Voided) => {}
        }
        self.redis.confirm_revert(hold, reference).await?;
        Ok(true)
    }

    /// Asks the gateway to void a `voiding` attempt; once it confirms, the attempt is `voided`.
    /// A failure leaves it `voiding`, for the reconciler's next round. Says whether it is voided.
    pub(super) async fn finish_void(&self, hold: &HoldId, reference: &str) -> bool {
        let timeout = ms(self.cfg.gateway.timeout_ms);
        match tokio::time::timeout(timeout, self.gateway.void(hold, reference)).await {
            Ok(Ok(())) => match self
                .db
                .set_payment_state(hold, reference, PaymentState::Voiding, PaymentState::Voided)
                .await
            {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(%hold, error = %e, "voided, but not recorded; voided again next round");
                    false
                }
            },
            Ok(Err(e)) => {
                tracing::warn!(%hold, error = %e, "void failed; retried by the reconciler");
                false
            }
            Err(_) => {
                tracing::warn!(%hold, "void timed out; retried by the reconciler");
                false
            }
        }
    }

    pub(super) async fn existing_order(&self, hold: &HoldId, fan: &FanId) -> Result<Order> {
        match self.db.order_by_hold(hold).await? {
            Some(o) if o.fan == fan.as_str() => Ok(o),
            _ => Err(Error::new(Code::UnknownHold)),
        }
    }

    /// Another process is confirming this hold with the same reference: wait a little for it.
    pub(super) async fn wait_other_confirm(&self, hold: &HoldId, fan: &FanId) -> ConfirmResult {
        let until = Instant::now() + ms(self.cfg.holds.confirm_wait_other_ms);
        while Instant::now() < until {
            tokio::time::sleep(ms(100)).await;
            match self.redis.hold(hold).await? {
                Some(rec) if rec.st == HoldState::Sold => {
                    return self.existing_order(hold, fan).await.map(|o| (o, false))
                }
                Some(rec) if rec.st == HoldState::Confirming => continue,
                // That attempt ended unsold (declined, or voided past its confirm deadline):
                // an attempt's reference is spent with it, so the fan pays again with another.
                Some(rec) if rec.st == HoldState::Held => {
                    return Err(Error::msg(
                        Code::PaymentDeclined,
                        "The attempt with this payment ended without a sale and nothing was charged; the hold is yours until it expires: pay again.",
                    ))
                }
                Some(_) => return Err(Error::new(Code::HoldExpired)),
                None => return Err(Error::new(Code::UnknownHold)),
            }
        }
        Err(payment_pending())
    }
}

/// Records how long one step of a confirm took (`floodgate_confirm_step_seconds{step}`, for the
/// breakdown the confirm benchmark prints) and starts the next.
fn confirm_step(step: &'static str, since: Instant) -> Instant {
    let now = Instant::now();
    metrics::histogram!(m::CONFIRM_STEP_SECONDS, "step" => step)
        .record(now.duration_since(since).as_secs_f64());
    now
}

pub(super) fn payment_pending() -> Error {
    Error::new(Code::PaymentPending).retry_after(Duration::from_secs(2))
}

/// A hold's items as an order shows them.
pub(super) fn order_items(def: &DropDef, items: &[HoldItem]) -> Vec<OrderItem> {
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
