//! What the engine shows, as typed results the servers serialize: a drop with its live counts,
//! its seats, a fan's holds and orders, an order for its seller.

use serde::Serialize;

use super::*;
use crate::db::AuditEntry;
use crate::drops::AdmissionMode;
use crate::scripts::Counts;

/// Something a request made, or found already made (a repeated confirm): servers
/// answer 201 for the first, 200 for the second.
#[derive(Debug, Clone)]
pub enum Made<T> {
    New(T),
    Existing(T),
}

/// A drop with its live counts (`GET /v1/drops/{id}`, creating and closing one).
#[derive(Debug, Clone, Serialize)]
pub struct DropView {
    pub drop_id: DropId,
    pub name: String,
    pub currency: String,
    pub kind: &'static str,
    pub status: String,
    pub opens_at: String,
    pub per_fan_limit: u32,
    pub hold_ttl_s: u64,
    pub admission: AdmissionModeView,
    pub seed_sha256: String,
    pub inventory: Vec<InventoryView>,
    pub server_now_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdmissionModeView {
    pub mode: AdmissionMode,
}

/// One SKU (GA drops) or section (seated drops) with its live counts; `held` includes confirming.
#[derive(Debug, Clone, Serialize)]
pub struct InventoryView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
    pub name: String,
    pub price_cents: i64,
    pub total: i64,
    pub available: i64,
    pub held: i64,
    pub sold: i64,
    /// Seated drops: the section's rows, front first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<RowView>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RowView {
    pub row: String,
    pub seats: u32,
}

/// A seller's drops (`GET /v1/drops`).
#[derive(Debug, Clone, Serialize)]
pub struct DropList {
    pub drops: Vec<DropSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DropSummary {
    pub drop_id: DropId,
    pub name: String,
    pub status: String,
    pub kind: &'static str,
    pub opens_at: String,
    pub currency: String,
}

/// A hold as its fan sees it (a reserve's answer, `GET /v1/holds/{id}`, the fan's holds). A
/// hold Redis no longer keeps but that was sold shows only what its order says.
#[derive(Debug, Clone, Serialize)]
pub struct HoldView {
    pub hold_id: HoldId,
    pub drop_id: DropId,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    pub server_now_ms: i64,
    pub items: Vec<PricedItem>,
    pub total_cents: i64,
    pub currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
}

/// One item of a hold with its price: a seat, or units of a SKU.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum PricedItem {
    Seat {
        seat: String,
        section: String,
        price_cents: i64,
    },
    Units {
        sku: String,
        quantity: u32,
        price_cents: i64,
    },
    /// As a sold hold's order records it (once Redis no longer keeps the hold).
    Ordered(OrderItem),
}

/// A fan's live holds (`GET /v1/fans/me/holds`).
#[derive(Debug, Clone, Serialize)]
pub struct FanHolds {
    pub holds: Vec<HoldView>,
    pub server_now_ms: i64,
}

/// A fan's orders (`GET /v1/fans/me/orders`).
#[derive(Debug, Clone, Serialize)]
pub struct FanOrders {
    pub orders: Vec<Order>,
}

/// A drop's admission settings (`GET`/`PUT /v1/drops/{id}/admission`).
#[derive(Debug, Clone, Serialize)]
pub struct AdmissionView {
    pub drop_id: DropId,
    pub admission: Value,
}

impl Engine {
    pub async fn drop_view(&self, drop: &DropId) -> Result<DropView> {
        let def = self.drop_def(drop).await?;
        match self.live_status(drop).await? {
            Some(status) => self.drop_view_of(&def, &status).await,
            None => self.archived_view(&def).await,
        }
    }

    pub(super) async fn drop_view_of(&self, def: &DropDef, status: &str) -> Result<DropView> {
        let counts = self.redis.counts(&def.drop_id).await?;
        Ok(self.view_with_counts(def, status, &counts))
    }

    /// An archived drop, from Postgres: closed, its final counts, nothing held.
    pub(super) async fn archived_view(&self, def: &DropDef) -> Result<DropView> {
        let counts = self
            .db
            .final_counts(&def.drop_id)
            .await?
            .into_iter()
            .map(|(bucket, (total, sold))| {
                let c = Counts {
                    total,
                    available: total - sold,
                    held: 0,
                    sold,
                };
                (bucket, c)
            })
            .collect();
        Ok(self.view_with_counts(def, "closed", &counts))
    }

    fn view_with_counts(
        &self,
        def: &DropDef,
        status: &str,
        counts: &HashMap<String, Counts>,
    ) -> DropView {
        let ga = def.kind == Kind::Ga;
        let inventory = def
            .buckets
            .iter()
            .map(|b| {
                let c = counts.get(&b.id);
                InventoryView {
                    sku: ga.then(|| b.id.clone()),
                    section: (!ga).then(|| b.id.clone()),
                    name: b.name.clone(),
                    price_cents: b.price_cents,
                    total: c.map_or(i64::from(b.total), |c| c.total),
                    available: c.map_or(0, |c| c.available),
                    held: c.map_or(0, |c| c.held),
                    sold: c.map_or(0, |c| c.sold),
                    rows: (def.kind == Kind::Seated).then(|| {
                        b.rows
                            .iter()
                            .map(|(row, seats)| RowView {
                                row: row.clone(),
                                seats: *seats,
                            })
                            .collect()
                    }),
                }
            })
            .collect();
        DropView {
            drop_id: def.drop_id.clone(),
            name: def.name.clone(),
            currency: def.currency.clone(),
            kind: def.kind.as_str(),
            status: status.to_owned(),
            opens_at: rfc3339(def.opens_at),
            per_fan_limit: def.per_fan_limit,
            hold_ttl_s: def.hold_ttl_ms / 1000,
            admission: AdmissionModeView {
                mode: def.admission.mode,
            },
            seed_sha256: def.seed_sha256.clone(),
            inventory,
            server_now_ms: now_ms(),
        }
    }

    pub async fn list_drops(&self, seller: &ApiKey) -> Result<DropList> {
        let drops = self
            .db
            .list_drops(&seller.key_id, self.cfg.drops.max_drops_listed)
            .await?;
        let mut out = Vec::with_capacity(drops.len());
        for (drop, status) in drops {
            let def = self.drop_def(&drop).await?;
            out.push(DropSummary {
                drop_id: drop,
                name: def.name.clone(),
                status,
                kind: def.kind.as_str(),
                opens_at: rfc3339(def.opens_at),
                currency: def.currency.clone(),
            });
        }
        Ok(DropList { drops: out })
    }

    pub(super) fn hold_view(&self, def: &DropDef, hold: &HoldId, rec: &HoldRecord) -> HoldView {
        let (items, total) = priced_items(def, &rec.it);
        HoldView {
            hold_id: hold.clone(),
            drop_id: def.drop_id.clone(),
            state: rec.st.as_str(),
            expires_at: Some(rfc3339_ms(rec.exp)),
            expires_at_ms: Some(rec.exp),
            server_now_ms: now_ms(),
            items,
            total_cents: total,
            currency: def.currency.clone(),
            order_id: rec.oid.clone().filter(|o| !o.is_empty()),
        }
    }

    pub async fn hold(&self, fan: &FanId, hold: &HoldId) -> Result<HoldView> {
        let drop = hold.drop_id();
        let def = self
            .drop_def(&drop)
            .await
            .map_err(|e| not_found_as(e, Code::UnknownHold))?;
        if let Some(rec) = self.redis.hold(hold).await? {
            if rec.fan != fan.as_str() {
                return Err(Error::new(Code::UnknownHold));
            }
            return Ok(self.hold_view(&def, hold, &rec));
        }
        // Purged from Redis: a sold hold still has its order.
        match self.db.order_by_hold(hold).await? {
            Some(order) if order.fan == fan.as_str() => Ok(HoldView {
                hold_id: hold.clone(),
                drop_id: drop,
                state: HoldState::Sold.as_str(),
                expires_at: None,
                expires_at_ms: None,
                server_now_ms: now_ms(),
                items: order.items.into_iter().map(PricedItem::Ordered).collect(),
                total_cents: order.total_cents,
                currency: order.currency,
                order_id: Some(order.order_id.to_string()),
            }),
            _ => Err(Error::new(Code::UnknownHold)),
        }
    }

    /// The fan's live holds in one drop, or in every drop this process looks after.
    pub async fn fan_holds(&self, fan: &FanId, drop: Option<&DropId>) -> Result<FanHolds> {
        let drops = match drop {
            Some(d) => vec![d.clone()],
            // Without a drop: the newest drops this process looks after, a bounded number.
            None => self
                .watched_drops()
                .into_iter()
                .take(self.cfg.drops.fan_holds_max_drops)
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
        Ok(FanHolds {
            holds: out,
            server_now_ms: now_ms(),
        })
    }

    pub async fn fan_orders(&self, fan: &FanId, drop: Option<&DropId>) -> Result<FanOrders> {
        let orders = self.db.fan_orders(fan, drop).await?;
        Ok(FanOrders { orders })
    }

    pub async fn order_for_fan(&self, fan: &FanId, order: OrderId) -> Result<Order> {
        match self.db.order(order).await? {
            Some(o) if o.fan == fan.as_str() => Ok(o),
            _ => Err(Error::new(Code::UnknownOrder)),
        }
    }

    pub async fn order_for_seller(&self, seller: &ApiKey, order: OrderId) -> Result<Order> {
        let o = self
            .db
            .order(order)
            .await?
            .ok_or_else(|| Error::new(Code::UnknownOrder))?;
        let drop = DropId::parse(&o.drop_id)?;
        self.owned_drop(seller, &drop)
            .await
            .map_err(|e| not_found_as(e, Code::UnknownOrder))?;
        Ok(o)
    }
}

/// Items with prices as the API shows them, and their total.
pub(super) fn priced_items(def: &DropDef, items: &[HoldItem]) -> (Vec<PricedItem>, i64) {
    let mut total = 0i64;
    let out = items
        .iter()
        .map(|i| {
            let price = def.bucket(&i.b).map_or(0, |b| b.price_cents);
            total += price * i64::from(i.q);
            match &i.s {
                Some(seat) => PricedItem::Seat {
                    seat: seat.clone(),
                    section: i.b.clone(),
                    price_cents: price,
                },
                None => PricedItem::Units {
                    sku: i.b.clone(),
                    quantity: i.q,
                    price_cents: price,
                },
            }
        })
        .collect();
    (out, total)
}

/// A page of a drop's audit log (`GET /v1/drops/{id}/audit`), newest first. `next_before` is
/// the `before` that asks for the next page; `null` on the last.
#[derive(Debug, Clone, Serialize)]
pub struct AuditPage {
    pub drop_id: DropId,
    pub entries: Vec<AuditEntry>,
    pub next_before: Option<i64>,
}

/// The public catalogue (`GET /v1/catalogue`, booking-api's front page).
#[derive(Debug, Clone, Serialize)]
pub struct Catalogue {
    /// Opened, latest opening first: `on_sale`, or `sold_out` once Postgres sold every unit.
    pub on_sale: Vec<CatalogueDrop>,
    /// Opening within `soon_days`, soonest first.
    pub coming_soon: Vec<CatalogueDrop>,
    pub soon_days: u32,
    /// When this catalogue was read from Postgres (it is served from memory a while).
    pub generated_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CatalogueDrop {
    pub drop_id: DropId,
    pub name: String,
    pub opens_at: String,
    pub currency: String,
    /// The lowest price of any SKU or section.
    pub from_price_cents: Option<i64>,
    /// `on_sale`, `sold_out` or `coming_soon`.
    pub state: &'static str,
    pub admission_mode: AdmissionMode,
    /// The fan's page: the booking page (`/drops/{id}`, on this server), or a queue drop's queue
    /// page on queue-server (`{queue.public_url}/drops/{id}`).
    pub url: String,
}

impl Engine {
    /// A page of the drop's audit log, for an ops key or the seller who owns the drop: at most
    /// `limit` entries (1..=`drops.audit_page_max`, that when `None`) older than `before`.
    pub async fn drop_audit(
        &self,
        key: &ApiKey,
        drop: &DropId,
        before: Option<i64>,
        limit: Option<u32>,
    ) -> Result<AuditPage> {
        let max = self.cfg.drops.audit_page_max;
        let limit = limit.unwrap_or(max);
        if limit == 0 || limit > max {
            return Err(Error::invalid(format!("limit must be 1..={max}")));
        }
        if before.is_some_and(|b| b < 1) {
            return Err(Error::invalid("before must be an entry_id (1 or more)"));
        }
        match key.scope {
            Scope::Ops => {
                self.drop_def(drop).await?;
            }
            Scope::Seller => {
                self.owned_drop(key, drop).await?;
            }
        }
        // One more than asked, to know whether another page follows.
        let mut entries = self.db.audit(drop, before, i64::from(limit) + 1).await?;
        let next_before = if entries.len() > limit as usize {
            entries.truncate(limit as usize);
            entries.last().map(|e| e.entry_id)
        } else {
            None
        };
        Ok(AuditPage {
            drop_id: drop.clone(),
            entries,
            next_before,
        })
    }

    /// The catalogue as Postgres has it now: one bounded query (booking-api serves it from
    /// memory between reads, `drops.catalogue_refresh_ms`).
    pub async fn catalogue(&self) -> Result<Catalogue> {
        let d = &self.cfg.drops;
        let limit = i64::try_from(d.catalogue_max_drops).unwrap_or(i64::MAX);
        let mut rows = self.db.catalogue(d.catalogue_soon_days, limit).await?;
        rows.sort_by_key(|r| r.opens_at);
        let queue_url = self.cfg.queue.public_url.trim_end_matches('/');
        let mut on_sale = Vec::new();
        let mut coming_soon = Vec::new();
        for r in rows {
            let (mode, url) = if r.queue {
                (
                    AdmissionMode::Queue,
                    format!("{queue_url}/drops/{}", r.drop_id),
                )
            } else {
                (AdmissionMode::Open, format!("/drops/{}", r.drop_id))
            };
            let state = match (r.opened, r.sold_out) {
                (false, _) => "coming_soon",
                (true, true) => "sold_out",
                (true, false) => "on_sale",
            };
            let entry = CatalogueDrop {
                drop_id: r.drop_id,
                name: r.name,
                opens_at: rfc3339(r.opens_at),
                currency: r.currency,
                from_price_cents: r.from_price_cents,
                state,
                admission_mode: mode,
                url,
            };
            if r.opened {
                on_sale.push(entry);
            } else {
                coming_soon.push(entry);
            }
        }
        // Latest opened first.
        on_sale.reverse();
        Ok(Catalogue {
            on_sale,
            coming_soon,
            soon_days: d.catalogue_soon_days,
            generated_at: rfc3339(OffsetDateTime::now_utc()),
        })
    }
}
