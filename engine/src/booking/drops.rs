//! Sellers' drops: creating one (Postgres, then Redis in one script), finding its definition,
//! closing it; ops' admission settings, applied one change at a time under the drop row's lock.

use super::*;
use crate::ids::RequestId;

/// Ops' partial update of a drop's admission settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionUpdate {
    pub rate_per_s: Option<f64>,
    pub burst: Option<u32>,
    pub max_active: Option<u32>,
    pub paused: Option<bool>,
    pub shop_window_s: Option<u32>,
    pub admit_margin_pct: Option<u32>,
    pub leave_grace_s: Option<u32>,
    /// The waiting list's offer window; the waiting list itself is fixed at creation.
    pub offer_window_s: Option<u32>,
}

impl AdmissionUpdate {
    /// Sets the fields this update names; the rest stay as they are.
    pub(super) fn apply(&self, s: &mut AdmissionSettings) {
        if let Some(v) = self.rate_per_s {
            s.rate_per_s = v;
        }
        if let Some(v) = self.burst {
            s.burst = v;
        }
        if let Some(v) = self.max_active {
            s.max_active = v;
        }
        if let Some(v) = self.paused {
            s.paused = v;
        }
        if let Some(v) = self.shop_window_s {
            s.shop_window_s = v;
        }
        if let Some(v) = self.admit_margin_pct {
            s.admit_margin_pct = v;
        }
        if let Some(v) = self.leave_grace_s {
            s.leave_grace_s = v;
        }
        if let Some(v) = self.offer_window_s {
            s.offer_window_s = v;
        }
    }

    /// The settings after this update: the stored ones (the drop's own when none are stored or
    /// they no longer parse) with the named fields set, refused if that breaks a bound.
    pub(super) fn applied_to(
        &self,
        stored: Option<Value>,
        drop: &AdmissionSettings,
    ) -> Result<AdmissionSettings> {
        let mut s = stored
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_else(|| drop.clone());
        self.apply(&mut s);
        // The seller's choice, like the mode: stored settings from before the field existed
        // read as off, so the drop's own always wins.
        s.waitlist = drop.waitlist;
        s.validate()?;
        Ok(s)
    }
}

/// A seller's request to add stock to a SKU (`POST /v1/drops/{id}/skus/{sku}/stock`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddStock {
    /// Units to add, at least 1; the SKU's total may not pass `drops.max_units_per_sku`.
    pub add: i64,
    /// Makes the request idempotent, as every write is: the same id again adds nothing and
    /// answers the SKU as it is now. Required, because a restock whose answer was lost can only
    /// be retried safely under its first id.
    pub request_id: RequestId,
}

/// What a restock left: the SKU's counts in Redis after it.
#[derive(Debug, serde::Serialize)]
pub struct StockView {
    pub drop_id: DropId,
    pub sku: String,
    /// Units this request added (0 when its request id was seen before).
    pub added: i64,
    pub total: i64,
    pub available: i64,
}

impl Engine {
    /// The fields of a drop's Redis meta hash, the same at creation and at every rebuild.
    pub(super) fn meta_fields(&self, def: &DropDef, status: &str) -> Value {
        json!({
            "status": status,
            "recovering": "0",
            "kind": def.kind.as_str(),
            "per_fan_limit": def.per_fan_limit,
            "hold_ttl_ms": def.hold_ttl_ms,
            "opens_at_ms": def.opens_at_ms(),
            "mode": match def.admission.mode { AdmissionMode::Open => "open", AdmissionMode::Queue => "queue" },
            "confirm_timeout_ms": self.cfg.holds.confirm_timeout_ms,
            "confirm_grace_ms": self.cfg.holds.confirm_grace_ms,
            "reclaim_batch": self.cfg.holds.reclaim_batch,
            "done_ttl_ms": self.cfg.holds.done_ttl_ms,
        })
    }

    /// A drop as `load_drop` and `rebuild` both take it: its meta fields, buckets, seat layout
    /// and every seat, with nothing sold (recovery then adds what Postgres sold).
    pub(super) fn drop_image(&self, def: &DropDef, status: &str) -> DropImage {
        DropImage {
            meta: self.meta_fields(def, status),
            buckets: def
                .buckets
                .iter()
                .map(|b| (b.id.clone(), i64::from(b.total), 0))
                .collect(),
            layout: def
                .buckets
                .iter()
                .filter(|b| !b.rows.is_empty())
                .map(|b| (b.id.clone(), json!(b.rows).to_string()))
                .collect(),
            seats: def.seat_ids().map(|(id, ..)| (id, false)).collect(),
            bought: Vec::new(),
            refunds: Vec::new(),
        }
    }

    pub async fn create_drop(&self, seller: &ApiKey, body: CreateDrop) -> Result<DropView> {
        let drop_id = DropId::generate();
        let seed = crate::tokens::random_secret();
        let seed_sha256 = sha256_hex(seed.as_bytes());
        let now = OffsetDateTime::now_utc();
        let def = body.into_def(
            drop_id.clone(),
            seller.key_id.clone(),
            seed_sha256,
            now,
            &self.cfg.drops,
        )?;
        let definition = serde_json::to_value(&def).map_err(Error::internal)?;
        self.db.insert_drop(&def, &seed, &definition).await?;
        // If Redis fails here the drop is in Postgres but not (wholly) loaded: the watcher finds
        // it missing or still `recovering` and recovery loads it, so the seller's retry-free
        // success is still true.
        let image = self.drop_image(&def, "open");
        let (_, report) = self
            .redis
            .load_drop(&drop_id, &image, self.cfg.recovery.slice)
            .await?;
        self.count_slices(&report);
        self.redis
            .set_admission(&drop_id, admission_fields(&def.admission))
            .await?;
        let def = Arc::new(def);
        lock(&self.drops).insert(drop_id.clone(), def.clone());
        lock(&self.lookups).known(&drop_id);
        self.watch_drop(&drop_id);
        self.drop_view_of(&def, "open").await
    }

    pub(super) fn watch_drop(&self, drop: &DropId) {
        let mut touched = lock(&self.touched);
        // On the reserve path: refresh a drop's mark at most every few seconds, not per request.
        if touched
            .get(drop)
            .is_some_and(|at| at.elapsed() < ms(self.cfg.reconciler.served_refresh_ms))
        {
            return;
        }
        if touched.len() >= self.cfg.reconciler.max_drops_watched {
            let keep = ms(self.cfg.reconciler.served_keep_ms);
            touched.retain(|_, at| at.elapsed() < keep);
        }
        if touched.len() < self.cfg.reconciler.max_drops_watched || touched.contains_key(drop) {
            touched.insert(drop.clone(), Instant::now());
        }
    }

    /// The cached definition, read from Postgres on first use. An id Postgres doesn't know is
    /// remembered as unknown for `drops.unknown_ttl_ms`, and reads of drops not cached here take
    /// a token from a per-process budget (`drops.lookups_per_s`): past it, 503 `unavailable`.
    /// So a flood of made-up ids costs Postgres a bounded number of queries a second.
    pub async fn drop_def(&self, drop: &DropId) -> Result<Arc<DropDef>> {
        if let Some(def) = self.cached_drop(drop)? {
            return Ok(def);
        }
        let filling = self.drop_fills.enter(drop).await;
        if let Some(def) = self.cached_drop(drop)? {
            return Ok(def);
        }
        if filling.failed_while_waiting() {
            return Err(Error::unavailable(
                "Postgres",
                "a concurrent load of the drop failed",
            ));
        }
        {
            let mut lookups = lock(&self.lookups);
            if !lookups.take() {
                let wait = lookups.wait().max(Duration::from_secs(1));
                return Err(Error::msg(
                    Code::Unavailable,
                    "Too many lookups of drops this server hasn't seen yet; retry shortly.",
                )
                .retry_after(wait));
            }
        }
        self.drop_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let found = self
            .db
            .drop_def(drop)
            .await
            .inspect_err(|_| filling.failed())?;
        let Some((def, _)) = found else {
            lock(&self.lookups).unknown(drop);
            return Err(Error::new(Code::UnknownDrop));
        };
        let def = Arc::new(def);
        let mut cache = lock(&self.drops);
        // Full, it forgets one definition (a miss costs one read), never all of them at once:
        // starting over would send every live drop back to Postgres together.
        if cache.len() >= self.cfg.drops.cache_entries {
            if let Some(any) = cache.keys().next().cloned() {
                cache.remove(&any);
            }
        }
        cache.insert(drop.clone(), def.clone());
        Ok(def)
    }

    /// The definition if cached; 404 `unknown_drop` if Postgres lately said there is none.
    fn cached_drop(&self, drop: &DropId) -> Result<Option<Arc<DropDef>>> {
        if let Some(def) = lock(&self.drops).get(drop) {
            return Ok(Some(def.clone()));
        }
        if lock(&self.lookups).is_unknown(drop) {
            return Err(Error::new(Code::UnknownDrop));
        }
        Ok(None)
    }

    /// Status from Redis; a drop missing there (flushed, lost) starts recovery and answers 503.
    /// `None`: the drop is archived (Redis has none of it; Postgres serves it).
    pub(super) async fn live_status(&self, drop: &DropId) -> Result<Option<String>> {
        match self.redis.drop_state(drop).await? {
            Some(state) if !state.recovering => Ok(Some(state.status)),
            None if self.db.is_archived(drop).await? => Ok(None),
            _ => {
                self.start_recovery(drop);
                Err(recovering())
            }
        }
    }

    pub(super) async fn owned_drop(&self, seller: &ApiKey, drop: &DropId) -> Result<Arc<DropDef>> {
        let def = self.drop_def(drop).await?;
        if def.seller_key_id != seller.key_id {
            return Err(Error::msg(
                Code::Forbidden,
                "This drop belongs to another seller.",
            ));
        }
        Ok(def)
    }

    pub async fn close_drop(&self, seller: &ApiKey, drop: &DropId) -> Result<DropView> {
        let def = self.owned_drop(seller, drop).await?;
        self.db.close_drop(drop, &seller.key_id).await?;
        // An archived drop is closed already and has no Redis state left to mark.
        if self.db.is_archived(drop).await? {
            return self.archived_view(&def).await;
        }
        self.redis.set_meta(drop, "status", "closed").await?;
        self.drop_view_of(&def, "closed").await
    }

    /// Adds stock to a SKU of the seller's open drop: Postgres' total first, with a `restock`
    /// ledger line (db.rs `restock`), then Redis' total and available rise to it
    /// (lua/restock.lua), so no moment has Redis selling units Postgres doesn't count. If Redis
    /// fails between the two, the same request (same `request_id`) raises it again; a rebuild
    /// takes the total from Postgres in any case. Admission reads Redis' stock on its next run.
    pub async fn add_stock(
        &self,
        seller: &ApiKey,
        drop: &DropId,
        sku: &str,
        body: AddStock,
    ) -> Result<StockView> {
        let max = i64::from(self.cfg.drops.max_units_per_sku);
        if body.add < 1 || body.add > max {
            return Err(Error::invalid(format!("add must be in 1..={max}")));
        }
        let def = self.owned_drop(seller, drop).await?;
        match def.buckets.iter().find(|b| b.id == sku) {
            Some(b) if b.rows.is_empty() => {}
            Some(_) => {
                return Err(Error::msg(
                    Code::UnknownSku,
                    "A section of a seated drop has the seats of its map; only a SKU takes stock.",
                ))
            }
            None => return Err(Error::new(Code::UnknownSku)),
        }
        let done = self
            .db
            .restock(drop, sku, body.add, &body.request_id, max)
            .await?;
        let (total, available) = self.redis.restock(drop, sku, done.total).await?;
        Ok(StockView {
            drop_id: drop.clone(),
            sku: sku.to_owned(),
            added: if done.replay { 0 } else { body.add },
            total,
            available,
        })
    }

    pub async fn admission_settings(&self, drop: &DropId) -> Result<AdmissionSettings> {
        let def = self.drop_def(drop).await?;
        let stored = self.db.admission(drop).await?.unwrap_or(Value::Null);
        Ok(serde_json::from_value(stored).unwrap_or_else(|_| def.admission.clone()))
    }

    pub async fn set_admission(
        &self,
        ops: &ApiKey,
        drop: &DropId,
        update: AdmissionUpdate,
    ) -> Result<AdmissionView> {
        let def = self.drop_def(drop).await?;
        let value = self
            .db
            .update_admission(
                drop,
                &ops.key_id,
                |stored| {
                    let s = update.applied_to(stored, &def.admission)?;
                    serde_json::to_value(&s).map_err(Error::internal)
                },
                async |value| {
                    let s: AdmissionSettings =
                        serde_json::from_value(value.clone()).map_err(Error::internal)?;
                    self.redis.set_admission(drop, admission_fields(&s)).await
                },
            )
            .await?;
        Ok(AdmissionView {
            drop_id: drop.clone(),
            admission: value,
        })
    }
}

pub(super) fn admission_fields(s: &AdmissionSettings) -> Vec<(String, String)> {
    vec![
        (
            "mode".into(),
            match s.mode {
                AdmissionMode::Open => "open",
                AdmissionMode::Queue => "queue",
            }
            .into(),
        ),
        ("rate_per_s".into(), s.rate_per_s.to_string()),
        ("burst".into(), s.burst.to_string()),
        ("max_active".into(), s.max_active.to_string()),
        ("paused".into(), if s.paused { "1" } else { "0" }.into()),
        ("shop_window_s".into(), s.shop_window_s.to_string()),
        ("admit_margin_pct".into(), s.admit_margin_pct.to_string()),
        ("leave_grace_s".into(), s.leave_grace_s.to_string()),
        ("waitlist".into(), if s.waitlist { "1" } else { "0" }.into()),
        ("offer_window_s".into(), s.offer_window_s.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn drop_settings() -> AdmissionSettings {
        serde_json::from_value(json!({"mode": "queue", "rate_per_s": 5.0, "max_active": 50}))
            .unwrap()
    }

    pub(super) fn update(body: Value) -> AdmissionUpdate {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    pub(super) fn an_admission_update_sets_only_what_it_names() {
        let drop = drop_settings();
        let s = update(json!({"paused": true}))
            .applied_to(None, &drop)
            .unwrap();
        assert_eq!(
            s,
            AdmissionSettings {
                paused: true,
                ..drop.clone()
            }
        );
        let s = update(json!({
            "rate_per_s": 2.5, "burst": 3, "max_active": 7, "paused": false, "shop_window_s": 60,
            "admit_margin_pct": 0, "leave_grace_s": 30, "offer_window_s": 45
        }))
        .applied_to(None, &drop)
        .unwrap();
        assert_eq!(
            s,
            AdmissionSettings {
                mode: AdmissionMode::Queue,
                rate_per_s: 2.5,
                burst: 3,
                max_active: 7,
                paused: false,
                shop_window_s: 60,
                admit_margin_pct: 0,
                leave_grace_s: 30,
                waitlist: false,
                offer_window_s: 45,
            }
        );
        // An empty update changes nothing.
        assert_eq!(update(json!({})).applied_to(None, &drop).unwrap(), drop);
    }

    #[test]
    pub(super) fn an_admission_update_builds_on_the_stored_settings() {
        let drop = drop_settings();
        let stored = AdmissionSettings {
            paused: true,
            burst: 40,
            ..drop.clone()
        };
        let s = update(json!({"rate_per_s": 1.0}))
            .applied_to(Some(serde_json::to_value(&stored).unwrap()), &drop)
            .unwrap();
        assert_eq!(
            s,
            AdmissionSettings {
                rate_per_s: 1.0,
                ..stored
            }
        );
        // Stored settings that no longer parse give way to the drop's own.
        let s = update(json!({"burst": 9}))
            .applied_to(Some(json!({"mode": "queue", "rate": 3})), &drop)
            .unwrap();
        assert_eq!(s, AdmissionSettings { burst: 9, ..drop });
    }

    #[test]
    pub(super) fn an_admission_update_past_a_bound_is_refused() {
        let drop = drop_settings();
        for (body, says) in [
            (json!({"rate_per_s": 0.0}), "rate_per_s"),
            (json!({"rate_per_s": 100001.0}), "rate_per_s"),
            (json!({"burst": 0}), "burst"),
            (json!({"max_active": 0}), "max_active"),
            (json!({"shop_window_s": 9}), "shop_window_s"),
            (json!({"admit_margin_pct": 1001}), "admit_margin_pct"),
            (json!({"leave_grace_s": 14}), "leave_grace_s"),
            (json!({"offer_window_s": 9}), "offer_window_s"),
            (json!({"offer_window_s": 3601}), "offer_window_s"),
        ] {
            let err = update(body.clone())
                .applied_to(None, &drop)
                .expect_err("refused");
            assert_eq!(err.code, Code::InvalidRequest, "{body}");
            assert!(err.message.contains(says), "{body}: {err}");
        }
        // Neither an unknown field nor the mode (fixed at creation) can be sent.
        for body in [
            json!({"rate": 5}),
            json!({"mode": "open"}),
            json!({"waitlist": true}),
            json!({"burst": -1}),
        ] {
            assert!(
                serde_json::from_value::<AdmissionUpdate>(body.clone()).is_err(),
                "{body}"
            );
        }
    }
}
