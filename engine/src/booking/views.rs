//! What the engine shows: a drop with its live counts, its seats, a fan's holds and orders,
//! an order for its seller.

use super::*;

/// Drops `GET /v1/fans/me/holds` looks in when no `drop_id` is given.
pub(super) const FAN_HOLDS_DROPS_MAX: usize = 100;

impl Engine {
    pub async fn drop_view(&self, drop: &DropId) -> Result<Answer> {
        let def = self.drop_def(drop).await?;
        let status = self.live_status(drop).await?;
        Ok((200, self.drop_view_of(&def, &status).await?))
    }

    pub(super) async fn drop_view_of(&self, def: &DropDef, status: &str) -> Result<Value> {
        let counts = self.redis.counts(&def.drop_id).await?;
        let inventory: Vec<Value> = def
            .buckets
            .iter()
            .map(|b| {
                let c = counts.get(&b.id);
                let mut v = json!({
                    "name": b.name,
                    "price_cents": b.price_cents,
                    "total": c.map_or(i64::from(b.total), |c| c.total),
                    "available": c.map_or(0, |c| c.available),
                    "held": c.map_or(0, |c| c.held),
                    "sold": c.map_or(0, |c| c.sold),
                });
                let key = if def.kind == Kind::Ga {
                    "sku"
                } else {
                    "section"
                };
                v[key] = json!(b.id);
                if def.kind == Kind::Seated {
                    v["rows"] = json!(b
                        .rows
                        .iter()
                        .map(|(r, n)| json!({"row": r, "seats": n}))
                        .collect::<Vec<_>>());
                }
                v
            })
            .collect();
        Ok(json!({
            "drop_id": def.drop_id,
            "name": def.name,
            "currency": def.currency,
            "kind": def.kind.as_str(),
            "status": status,
            "opens_at": rfc3339(def.opens_at),
            "per_fan_limit": def.per_fan_limit,
            "hold_ttl_s": def.hold_ttl_ms / 1000,
            "admission": {"mode": def.admission.mode},
            "seed_sha256": def.seed_sha256,
            "inventory": inventory,
            "server_now_ms": now_ms(),
        }))
    }

    pub async fn seats_view(&self, drop: &DropId) -> Result<Answer> {
        let def = self.drop_def(drop).await?;
        if def.kind != Kind::Seated {
            return Err(Error::invalid("this drop has no seats"));
        }
        self.live_status(drop).await?;
        let states = self.redis.seat_states(drop).await?;
        let seats: Vec<Value> = def
            .seat_ids()
            .map(|(id, b, row, n)| {
                let state = match states.get(&id).map(String::as_str) {
                    Some("-") => "free",
                    Some("#") => "sold",
                    _ => "held",
                };
                json!({"seat": id, "section": b.id, "row": row, "number": n, "state": state})
            })
            .collect();
        Ok((
            200,
            json!({"drop_id": drop, "seats": seats, "server_now_ms": now_ms()}),
        ))
    }

    pub async fn list_drops(&self, seller: &ApiKey) -> Result<Answer> {
        let drops = self
            .db
            .list_drops(&seller.key_id, self.cfg.drops.max_drops_listed)
            .await?;
        let mut out = Vec::with_capacity(drops.len());
        for (drop, status) in drops {
            let def = self.drop_def(&drop).await?;
            out.push(json!({
                "drop_id": drop, "name": def.name, "status": status, "kind": def.kind.as_str(),
                "opens_at": rfc3339(def.opens_at), "currency": def.currency,
            }));
        }
        Ok((200, json!({ "drops": out })))
    }

    pub(super) fn hold_view(&self, def: &DropDef, hold: &HoldId, rec: &HoldRecord) -> Value {
        let (items, total) = priced_items(def, &rec.it);
        let mut v = json!({
            "hold_id": hold,
            "drop_id": def.drop_id,
            "state": rec.st.as_str(),
            "expires_at": rfc3339_ms(rec.exp),
            "expires_at_ms": rec.exp,
            "server_now_ms": now_ms(),
            "items": items,
            "total_cents": total,
            "currency": def.currency,
        });
        if let Some(oid) = rec.oid.as_deref().filter(|o| !o.is_empty()) {
            v["order_id"] = json!(oid);
        }
        v
    }

    pub async fn hold(&self, fan: &FanId, hold: &HoldId) -> Result<Answer> {
        let drop = hold.drop_id();
        let def = self
            .drop_def(&drop)
            .await
            .map_err(|e| not_found_as(e, Code::UnknownHold))?;
        if let Some(rec) = self.redis.hold(hold).await? {
            if rec.fan != fan.as_str() {
                return Err(Error::new(Code::UnknownHold));
            }
            return Ok((200, self.hold_view(&def, hold, &rec)));
        }
        // Purged from Redis: a sold hold still has its order.
        match self.db.order_by_hold(hold).await? {
            Some(order) if order.fan == fan.as_str() => Ok((
                200,
                json!({
                    "hold_id": hold, "drop_id": drop, "state": "sold", "order_id": order.order_id,
                    "items": order.items, "total_cents": order.total_cents, "currency": order.currency,
                    "server_now_ms": now_ms(),
                }),
            )),
            _ => Err(Error::new(Code::UnknownHold)),
        }
    }

    /// The fan's live holds in one drop, or in every drop this process looks after.
    pub async fn fan_holds(&self, fan: &FanId, drop: Option<&DropId>) -> Result<Answer> {
        let drops = match drop {
            Some(d) => vec![d.clone()],
            // Without a drop: the newest drops this process looks after, a bounded number.
            None => self
                .watched_drops()
                .into_iter()
                .take(FAN_HOLDS_DROPS_MAX)
                .collect(),
        };
        let mut out = Vec::new();
        for d in drops {
            let Ok(def) = self.drop_def(&d).await else {
                continue;
            };
            for (hold, rec) in self.redis.fan_live_holds(&d, fan).await? {
                out.push(self.hold_view(&def, &hold, &rec));
            }
        }
        Ok((200, json!({ "holds": out, "server_now_ms": now_ms() })))
    }

    pub async fn fan_orders(&self, fan: &FanId, drop: Option<&DropId>) -> Result<Answer> {
        let orders = self.db.fan_orders(fan, drop).await?;
        Ok((200, json!({ "orders": orders })))
    }

    pub async fn order_for_fan(&self, fan: &FanId, order: OrderId) -> Result<Answer> {
        match self.db.order(order).await? {
            Some(o) if o.fan == fan.as_str() => Ok((200, json!(o))),
            _ => Err(Error::new(Code::UnknownOrder)),
        }
    }

    pub async fn order_for_seller(&self, seller: &ApiKey, order: OrderId) -> Result<Answer> {
        let o = self
            .db
            .order(order)
            .await?
            .ok_or_else(|| Error::new(Code::UnknownOrder))?;
        let drop = DropId::parse(&o.drop_id)?;
        self.owned_drop(seller, &drop)
            .await
            .map_err(|e| not_found_as(e, Code::UnknownOrder))?;
        Ok((200, json!(o)))
    }
}

/// Items with prices as the API shows them, and their total.
pub(super) fn priced_items(def: &DropDef, items: &[HoldItem]) -> (Vec<Value>, i64) {
    let mut total = 0i64;
    let out = items
        .iter()
        .map(|i| {
            let price = def.bucket(&i.b).map_or(0, |b| b.price_cents);
            total += price * i64::from(i.q);
            match &i.s {
                Some(seat) => json!({"seat": seat, "section": i.b, "price_cents": price}),
                None => json!({"sku": i.b, "quantity": i.q, "price_cents": price}),
            }
        })
        .collect();
    (out, total)
}
