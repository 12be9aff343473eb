//! Refunds of an order, whole or some of its items (migrations/0007_refunds.sql and 0009), in
//! steps each idempotent by the refund's id, so a crash or a failure between two steps only
//! leaves the next one to do again:
//! 1. recorded in Postgres (`Db::record_refund`: the items marked refunded, sold and the fan's
//!    units lowered, a `refund` ledger line) → `pending`;
//! 2. the money back: a captured payment refunded at the gateway, an authorization not yet
//!    captured voided (when the refund leaves nothing of the order; a part of an authorization
//!    is captured first, then refunded) → `gateway_done`;
//! 3. the units or seats back in Redis' stock (lua/refund.lua, once per refund by its marker)
//!    → `returned`; a closed or archived drop's → `closed` (nothing goes back on sale).
//!
//! The request runs the steps at once; what it couldn't finish (the gateway down, Redis
//! rebuilding, the order's confirm not finished in Redis yet) the resume round takes up again
//! ([`Engine::resume_refunds`], under each drop's round lease). A step 3 that finds Redis
//! without the sale (`out_of_step`: its counts short of it, or the order's hold ended there
//! unsold) doesn't wait for what can't come: the drop is rebuilt from Postgres, which counts the
//! refund as returned, and the next round finishes it. Metrics: `floodgate_refunds_*`
//! (engine::metrics).

use super::*;
use crate::db::RefundRecord;
use crate::ids::RefundId;
use crate::scripts::RefundReturn;

/// A refund's state: one name in Rust, in the `refunds.state` CHECK (a test holds the two
/// together) and in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundState {
    /// Recorded in Postgres: its units count as returned there; the money isn't back yet.
    Pending,
    /// The gateway refunded (or voided) it; the units aren't back in Redis' stock yet.
    GatewayDone,
    /// Its units or seats are back on sale.
    Returned,
    /// Paid back and counted in the books, but the drop is closed (or archived): nothing sells
    /// its units again.
    Closed,
}

impl RefundState {
    pub const ALL: [RefundState; 4] = [
        RefundState::Pending,
        RefundState::GatewayDone,
        RefundState::Returned,
        RefundState::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefundState::Pending => "pending",
            RefundState::GatewayDone => "gateway_done",
            RefundState::Returned => "returned",
            RefundState::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Result<RefundState> {
        RefundState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| Error::internal(format!("refunds.state `{s}`")))
    }

    /// Every step done.
    pub fn finished(self) -> bool {
        matches!(self, RefundState::Returned | RefundState::Closed)
    }
}

/// `POST /v1/orders/{order_id}/refunds`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    /// The seller's id for this refund: the same id again is the same refund.
    pub refund_id: RefundId,
    /// What to refund; absent: everything the order still has. `null` is refused (422), not read
    /// as "everything": a refund of the whole order is too costly a default for a sent mistake.
    #[serde(default, deserialize_with = "present_items")]
    pub items: Option<Vec<RefundItem>>,
}

/// `items` when the body has the field: a list, never `null` (left out, serde's default applies).
fn present_items<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<RefundItem>>, D::Error> {
    Vec::deserialize(d).map(Some)
}

/// One item to refund: units of a SKU, or a seat.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundItem {
    #[serde(default)]
    pub sku: Option<String>,
    #[serde(default)]
    pub quantity: Option<u32>,
    #[serde(default)]
    pub seat: Option<String>,
}

/// A refund as the API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RefundView {
    pub refund_id: String,
    pub order_id: OrderId,
    pub drop_id: String,
    pub items: Vec<PricedItem>,
    pub amount_cents: i64,
    pub state: RefundState,
}

/// An order's refunds (`GET /v1/orders/{order_id}/refunds`), oldest first.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RefundList {
    pub order_id: OrderId,
    pub refunds: Vec<RefundView>,
}

impl Engine {
    /// Refunds an order (or some of its items) for its drop's seller or ops: step 1 at once
    /// (a refusal changes nothing), then as many of the next steps as go through now. The same
    /// refund id again answers the refund as it stands (and takes its next steps).
    pub async fn refund(
        &self,
        key: &ApiKey,
        order: OrderId,
        body: RefundRequest,
    ) -> Result<Made<RefundView>> {
        let def = self.refunds_drop(key, order).await?;
        let items = match &body.items {
            None => None,
            Some(items) => Some(self.refund_items(&def, items)?),
        };
        let rec = self
            .db
            .record_refund(
                order,
                body.refund_id.as_str(),
                &key.key_id,
                items.as_deref(),
            )
            .await?;
        if rec.new {
            metrics::counter!(m::REFUNDS_ACCEPTED).increment(1);
        }
        self.watch_drop(&def.drop_id);
        let state = self.advance_refund(&rec).await;
        let view = refund_view(&def, &rec, state);
        Ok(if rec.new {
            Made::New(view)
        } else {
            Made::Existing(view)
        })
    }

    /// An order's refunds, for its drop's seller or ops.
    pub async fn order_refunds(&self, key: &ApiKey, order: OrderId) -> Result<RefundList> {
        let def = self.refunds_drop(key, order).await?;
        let refunds = self
            .db
            .order_refunds(order)
            .await?
            .iter()
            .map(|r| Ok(refund_view(&def, r, RefundState::parse(&r.state)?)))
            .collect::<Result<_>>()?;
        Ok(RefundList {
            order_id: order,
            refunds,
        })
    }

    /// The order's drop, if `key` may refund it: ops, or the drop's seller (another seller's
    /// order is as unknown as one that doesn't exist).
    async fn refunds_drop(&self, key: &ApiKey, order: OrderId) -> Result<Arc<DropDef>> {
        let o = self
            .db
            .order(order)
            .await?
            .ok_or_else(|| Error::new(Code::UnknownOrder))?;
        let drop = DropId::parse(&o.drop_id)?;
        match key.scope {
            Scope::Ops => self.drop_def(&drop).await,
            Scope::Seller => self
                .owned_drop(key, &drop)
                .await
                .map_err(|e| not_found_as(e, Code::UnknownOrder)),
        }
    }

    /// The request's items in the scripts' shape: `{"sku", "quantity"}` of a GA drop, `{"seat"}`
    /// of a seated one; 1..=`drops.max_items_per_hold` of them (no order has more). Whether the
    /// order has them is Postgres' to say (422, or 409 `already_refunded` past what is left).
    fn refund_items(&self, def: &DropDef, items: &[RefundItem]) -> Result<Vec<HoldItem>> {
        let max = self.cfg.drops.max_items_per_hold;
        if items.is_empty() || items.len() > max {
            return Err(Error::invalid(format!(
                "`items` must have 1..={max} entries (or be left out: the whole order)"
            )));
        }
        items
            .iter()
            .map(|i| match (&i.sku, &i.seat, def.kind) {
                (Some(sku), None, Kind::Ga) => match i.quantity {
                    Some(q) if q >= 1 => Ok(HoldItem {
                        b: sku.clone(),
                        q,
                        s: None,
                    }),
                    _ => Err(Error::invalid("each SKU's `quantity` must be at least 1")),
                },
                (None, Some(seat), Kind::Seated) if matches!(i.quantity, None | Some(1)) => {
                    // A seat id is SECTION-ROW-N, and a section has no `-`.
                    let section = seat.split('-').next().unwrap_or_default();
                    Ok(HoldItem {
                        b: section.to_owned(),
                        q: 1,
                        s: Some(seat.clone()),
                    })
                }
                (_, _, Kind::Ga) => Err(Error::invalid(
                    "each item of a GA drop's order is {\"sku\", \"quantity\"}",
                )),
                (_, _, Kind::Seated) => Err(Error::invalid(
                    "each item of a seated drop's order is {\"seat\"}",
                )),
            })
            .collect()
    }

    /// Takes a recorded refund as far as it goes now; its state after. A step that fails is
    /// logged and left to the resume round.
    pub(super) async fn advance_refund(&self, rec: &RefundRecord) -> RefundState {
        let mut state = match RefundState::parse(&rec.state) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(order = %rec.order_id, error = %e, "a refund in an unknown state");
                return RefundState::Pending;
            }
        };
        if state == RefundState::Pending {
            match self.refund_payment(rec).await {
                Ok(true) => {
                    state = self
                        .refund_moved(rec, RefundState::Pending, RefundState::GatewayDone)
                        .await;
                }
                Ok(false) => {
                    metrics::counter!(m::REFUND_GATEWAY_FAILURES).increment(1);
                    return state;
                }
                Err(e) => {
                    metrics::counter!(m::REFUND_GATEWAY_FAILURES).increment(1);
                    tracing::warn!(order = %rec.order_id, refund = %rec.refund_id, error = %e,
                        "refund: the gateway step failed; the resume round tries again");
                    return state;
                }
            }
        }
        if state == RefundState::GatewayDone {
            match self.return_refund(rec).await {
                Ok(Some(done)) => {
                    state = self.refund_moved(rec, RefundState::GatewayDone, done).await;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(order = %rec.order_id, refund = %rec.refund_id, error = %e,
                        "refund: the return to stock waits; the resume round tries again");
                }
            }
        }
        state
    }

    /// Writes a step's end; the state the refund is in after (another process may have moved
    /// it first: it is read back).
    async fn refund_moved(
        &self,
        rec: &RefundRecord,
        from: RefundState,
        to: RefundState,
    ) -> RefundState {
        match self
            .db
            .set_refund_state(rec.order_id, &rec.refund_id, from.as_str(), to.as_str())
            .await
        {
            Ok(true) => {
                if to.finished() {
                    metrics::counter!(m::REFUNDS_COMPLETED, "state" => to.as_str()).increment(1);
                }
                to
            }
            Ok(false) => self
                .db
                .order_refunds(rec.order_id)
                .await
                .ok()
                .and_then(|all| {
                    all.into_iter()
                        .find(|r| r.refund_id == rec.refund_id)
                        .and_then(|r| RefundState::parse(&r.state).ok())
                })
                .unwrap_or(from),
            Err(e) => {
                tracing::warn!(order = %rec.order_id, error = %e, "refund step done, not recorded; repeated next round");
                from
            }
        }
    }

    /// Step 2: the money back. True once the gateway holds none of it for the fan: the capture
    /// refunded (by refund id), or the authorization voided.
    async fn refund_payment(&self, rec: &RefundRecord) -> Result<bool> {
        let hold = HoldId::parse(&rec.hold_id)?;
        let attempts = self.db.money_attempts(&rec.hold_id).await?;
        let timeout = ms(self.cfg.gateway.timeout_ms);
        let find = |want: PaymentState| {
            attempts
                .iter()
                .find(|(_, s)| *s == want)
                .map(|(r, _)| r.clone())
        };
        if let Some(reference) = find(PaymentState::Captured) {
            return self
                .gateway_refund(&hold, &reference, rec, timeout)
                .await
                .map(|()| true);
        }
        if let Some(reference) = find(PaymentState::Authorized) {
            if self.db.unrefunded_units(rec.order_id).await? > 0 {
                // Part of an authorization: voiding would give back the rest too. The capture
                // is due anyway (the capture round would take it); then the part is refunded.
                self.capture(&hold, &reference).await;
                if self.db.attempt_state(&hold, &reference).await? == Some(PaymentState::Captured) {
                    self.gateway_refund(&hold, &reference, rec, timeout).await?;
                    return Ok(true);
                }
                return Ok(false);
            }
            // Nothing of the order is left: the authorization goes. Postgres first (authorized →
            // voiding, which the capture round never takes), so a capture and this void never
            // both settle it.
            self.db
                .set_payment_state(
                    &hold,
                    &reference,
                    PaymentState::Authorized,
                    PaymentState::Voiding,
                )
                .await?;
            return self.void_for_refund(&hold, &reference).await;
        }
        if let Some(reference) = find(PaymentState::Voiding) {
            return self.void_for_refund(&hold, &reference).await;
        }
        // Voided: the gateway holds nothing for the order (or it was never paid through one).
        Ok(true)
    }

    async fn gateway_refund(
        &self,
        hold: &HoldId,
        reference: &str,
        rec: &RefundRecord,
        timeout: Duration,
    ) -> Result<()> {
        match tokio::time::timeout(
            timeout,
            self.gateway
                .refund(hold, reference, &rec.refund_id, rec.amount_cents),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::msg(
                Code::PaymentPending,
                format!("the gateway refused the refund: {e}"),
            )),
            Err(_) => Err(Error::new(Code::PaymentPending)),
        }
    }

    /// Voids the order's authorization (Postgres has it `voiding`); a capture that reached the
    /// gateway first is found by a lookup and recorded, and the refund goes through it next
    /// round.
    async fn void_for_refund(&self, hold: &HoldId, reference: &str) -> Result<bool> {
        let timeout = ms(self.cfg.gateway.timeout_ms);
        let looked = match tokio::time::timeout(timeout, self.gateway.lookup(hold, reference)).await
        {
            Ok(Ok(found)) => found,
            _ => return Ok(false),
        };
        if looked == Lookup::Captured {
            self.db
                .set_payment_state(
                    hold,
                    reference,
                    PaymentState::Voiding,
                    PaymentState::Captured,
                )
                .await?;
            return Ok(false);
        }
        Ok(self.finish_void(hold, reference).await)
    }

    /// Step 3: the units back in Redis' stock; the refund's final state, or `None` to try again.
    async fn return_refund(&self, rec: &RefundRecord) -> Result<Option<RefundState>> {
        let drop = DropId::parse(&rec.drop_id)?;
        if self.db.is_archived(&drop).await? {
            // Postgres is an archived drop's only record, and it counted the units at step 1.
            return Ok(Some(RefundState::Closed));
        }
        let marker = format!("{}|{}", rec.order_id, rec.refund_id);
        match self
            .redis
            .refund(&drop, &marker, &rec.hold_id, &rec.fan_id, &rec.items)
            .await?
        {
            RefundReturn::Returned { closed: false } => Ok(Some(RefundState::Returned)),
            RefundReturn::Returned { closed: true } => Ok(Some(RefundState::Closed)),
            RefundReturn::Already => {
                let closed = self
                    .redis
                    .drop_state(&drop)
                    .await?
                    .is_some_and(|s| s.status == "closed");
                Ok(Some(if closed {
                    RefundState::Closed
                } else {
                    RefundState::Returned
                }))
            }
            RefundReturn::HoldNotSold => Ok(None),
            RefundReturn::OutOfStep => {
                // Redis disagrees with Postgres: it hasn't the sale this returns (its counts are
                // short of it, or the order's hold ended there unsold — it expired or was
                // released while the confirm committed the order). Nothing Redis does later
                // would sell it, so waiting can't help: rebuild the drop from Postgres, as a sale
                // the store refused does (confirm.rs). The rebuild counts the order's units as
                // sold and the recorded refund's as returned, and writes its marker, so the next
                // round's step 3 answers `already`; until then, left unfinished. The script
                // answers this only while the drop isn't recovering, so once per rebuild.
                tracing::warn!(%drop, order = %rec.order_id, refund = %rec.refund_id,
                    "refund: Redis hasn't the sale it returns; the drop is rebuilt");
                metrics::counter!(m::REFUNDS_OUT_OF_STEP).increment(1);
                self.redis.set_meta(&drop, "recovering", "1").await?;
                self.start_recovery(&drop);
                // The stock's audit trail says why this rebuild happened (the rebuild adds its
                // own line when it ends).
                let note = format!(
                    "refund {}|{}: Redis hasn't the sale it returns; rebuilt from Postgres",
                    rec.order_id, rec.refund_id
                );
                if let Err(e) = self.db.record_rebuild(&drop, &note).await {
                    tracing::warn!(%drop, error = %e, "refund: the ledger line of an out-of-step refund wasn't written");
                }
                Ok(None)
            }
        }
    }

    /// One resume round: refunds left unfinished for `reconciler.refund_resume_after_ms` (the
    /// gateway or Redis failed, or a process stopped, between steps), at most
    /// `reconciler.refund_batch`, each under its drop's round lease. How many it finished.
    pub async fn resume_refunds(&self) -> usize {
        let only = (self.cfg.reconciler.watch_newest_drops == 0).then(|| self.watched_drops());
        let refunds = match self
            .db
            .refunds_to_resume(
                self.cfg.reconciler.refund_batch as i64,
                self.cfg.reconciler.refund_resume_after_ms,
                only.as_deref(),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "the refunds' resume round was skipped");
                return 0;
            }
        };
        let mut finished = 0;
        for rec in refunds {
            let Ok(drop) = DropId::parse(&rec.drop_id) else {
                continue;
            };
            // One instance at a time takes a drop's refunds (docs/ARCHITECTURE.md, "Many
            // instances"); every step is idempotent, so a hand-over costs only repeated calls.
            if !self.round_leases.held(&self.redis, &drop).await {
                continue;
            }
            metrics::counter!(m::REFUNDS_RESUMED).increment(1);
            if self.advance_refund(&rec).await.finished() {
                finished += 1;
            } else if let Err(e) = self.db.touch_refund(rec.order_id, &rec.refund_id).await {
                tracing::debug!(order = %rec.order_id, error = %e, "could not requeue the refund");
            }
        }
        finished
    }
}

fn refund_view(def: &DropDef, rec: &RefundRecord, state: RefundState) -> RefundView {
    let (items, _) = priced_items(def, &rec.items);
    RefundView {
        refund_id: rec.refund_id.clone(),
        order_id: rec.order_id,
        drop_id: rec.drop_id.clone(),
        items,
        amount_cents: rec.amount_cents,
        state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `refunds.state` CHECK, as the last migration that sets it lists it, names exactly
    /// the enum's states.
    #[test]
    fn refund_states_match_the_sql_check() {
        let sql = include_str!("../../../migrations/0009_refund_states.sql");
        let list = sql
            .split_once("CHECK (state IN (")
            .and_then(|(_, rest)| rest.split_once(')'))
            .expect("a CHECK (state IN (...)) on refunds.state")
            .0;
        let in_sql: Vec<&str> = list
            .split(',')
            .map(|name| name.trim().trim_matches('\''))
            .collect();
        let in_rust: Vec<&str> = RefundState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(in_sql, in_rust);
        for state in RefundState::ALL {
            assert_eq!(RefundState::parse(state.as_str()).unwrap(), state);
        }
    }
}
