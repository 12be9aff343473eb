//! A fan's reserve (one script call, idempotent per key) and release.

use super::*;

impl Engine {
    /// A reserve: `body` as parsed, `body_sha256` of its bytes as sent (a retry under the same
    /// key must send the very same request).
    pub async fn reserve(
        &self,
        fan: &FanId,
        drop: &DropId,
        key: &IdempotencyKey,
        admission_token: Option<&str>,
        body: HoldRequestBody,
        body_sha256: &str,
    ) -> Result<HoldView> {
        let def = self.drop_def(drop).await?;
        self.watch_drop(drop);
        let mut session = None;
        if def.admission.mode == AdmissionMode::Queue {
            let token = admission_token.ok_or_else(|| {
                Error::msg(
                    Code::NotAdmitted,
                    "This drop has a waiting room: join it to get an admission token.",
                )
            })?;
            session = self.admission.verify(token, drop, fan)?.session();
        }
        let request = HoldRequest::parse(body, &def, self.cfg.drops.max_items_per_hold)?;
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
                scan_seats_max: self.cfg.seats.best_scan_seats_max,
            },
        };
        let started = Instant::now();
        let (reserved, _replay) = self
            .redis
            .reserve(
                drop,
                fan,
                key.as_str(),
                body_sha256,
                &hold_id,
                session,
                args,
            )
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
                Ok(HoldView {
                    hold_id,
                    drop_id: drop.clone(),
                    state: HoldState::Held.as_str(),
                    expires_at: Some(rfc3339_ms(expires_at_ms)),
                    expires_at_ms: Some(expires_at_ms),
                    server_now_ms: now_ms,
                    items,
                    total_cents: total,
                    currency: def.currency.clone(),
                    order_id: None,
                })
            }
            Reserved::Refused {
                code: Code::UnknownDrop,
                ..
            } if self.db.is_archived(drop).await? => {
                // Archived: closed for good, Postgres its only record (nothing to rebuild).
                Err(Error::new(Code::DropClosed))
            }
            Reserved::Refused {
                code: Code::Recovering | Code::UnknownDrop,
                ..
            } => {
                self.start_recovery(drop);
                Err(recovering())
            }
            Reserved::Refused {
                code: Code::NotAdmitted,
                detail,
            } if detail.get("shop_ended_at_ms").is_some() => Err(Error::msg(
                Code::NotAdmitted,
                "Your shopping window has ended: no new holds; a hold you have can still be paid until it expires.",
            )
            .detail(detail)),
            Reserved::Refused { code, detail } => {
                let mut e = Error::new(code);
                if !detail.is_null() && detail != json!({}) && detail != json!([]) {
                    e = e.detail(detail);
                }
                Err(e)
            }
        }
    }

    pub async fn release(&self, fan: &FanId, hold: &HoldId) -> Result<()> {
        self.redis.release(hold, fan).await?;
        metrics::counter!(m::HOLDS_RELEASED).increment(1);
        Ok(())
    }
}
