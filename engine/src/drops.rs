//! Drops: what a seller may create (parsed from the request, every bound checked), the
//! definition every process caches (immutable after creation, but for `status`), and the
//! parsing of a fan's reserve request against it.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::DropsConfig;
use crate::error::{Code, Error, Result};
use crate::ids::{parse_row_label, DropId, SeatId, Section, Sku};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Ga,
    Seated,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Ga => "ga",
            Kind::Seated => "seated",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdmissionMode {
    /// No waiting room: any signed-in fan may reserve.
    Open,
    /// Reserves need an admission token from the waiting room.
    Queue,
}

/// Waiting-room settings. Stored with the drop at creation and in Redis, where ops change them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionSettings {
    pub mode: AdmissionMode,
    #[serde(default = "default_rate_per_s")]
    pub rate_per_s: f64,
    #[serde(default = "default_burst")]
    pub burst: u32,
    #[serde(default = "default_max_active")]
    pub max_active: u32,
    #[serde(default)]
    pub paused: bool,
    #[serde(default = "default_shop_window_s")]
    pub shop_window_s: u32,
    #[serde(default = "default_admit_margin_pct")]
    pub admit_margin_pct: u32,
    /// A waiter none of whose sockets (or polls) has been seen for this long leaves the line;
    /// back within it, they keep their place.
    #[serde(default = "default_leave_grace_s")]
    pub leave_grace_s: u32,
    /// The waiting list after a sell-out (the seller's choice at creation, fixed after): fans in
    /// line then, and new arrivals, are waitlisted instead of sent away, and units that come back
    /// are offered to them in line order (lua/admit.lua). Queue drops only.
    #[serde(default = "default_waitlist")]
    pub waitlist: bool,
    /// How long an offered fan has to take the unit (their shop window); unused, the offer passes
    /// to the next fan on the waiting list.
    #[serde(default = "default_offer_window_s")]
    pub offer_window_s: u32,
}

pub const DEFAULT_ADMIT_RATE_PER_S: f64 = 10.0;
pub const DEFAULT_ADMIT_BURST: u32 = 20;
pub const DEFAULT_MAX_ACTIVE: u32 = 1_000;
pub const DEFAULT_SHOP_WINDOW_S: u32 = 300;
pub const DEFAULT_ADMIT_MARGIN_PCT: u32 = 10;
/// Two minutes: a phone changing networks or a browser restarting comes back well within it,
/// while a closed tab stops taking an admission slot soon after.
pub const DEFAULT_LEAVE_GRACE_S: u32 = 120;
/// Off: a sold-out line closes for good unless the seller asks for the waiting list.
pub const DEFAULT_WAITLIST: bool = false;
/// Two minutes: enough to pick and pay for a unit the fan already wanted, short enough that an
/// offer nobody answers passes on soon.
pub const DEFAULT_OFFER_WINDOW_S: u32 = 120;
/// Bounds of `offer_window_s`: the floor is the shop window's, the ceiling an hour.
pub const OFFER_WINDOW_S_MIN: u32 = 10;
pub const OFFER_WINDOW_S_MAX: u32 = 3_600;
fn default_rate_per_s() -> f64 {
    DEFAULT_ADMIT_RATE_PER_S
}
fn default_burst() -> u32 {
    DEFAULT_ADMIT_BURST
}
fn default_max_active() -> u32 {
    DEFAULT_MAX_ACTIVE
}
fn default_shop_window_s() -> u32 {
    DEFAULT_SHOP_WINDOW_S
}
fn default_admit_margin_pct() -> u32 {
    DEFAULT_ADMIT_MARGIN_PCT
}
fn default_leave_grace_s() -> u32 {
    DEFAULT_LEAVE_GRACE_S
}
fn default_waitlist() -> bool {
    DEFAULT_WAITLIST
}
fn default_offer_window_s() -> u32 {
    DEFAULT_OFFER_WINDOW_S
}

impl AdmissionSettings {
    pub fn validate(&self) -> Result<()> {
        if !(self.rate_per_s.is_finite() && self.rate_per_s > 0.0 && self.rate_per_s <= 100_000.0) {
            return Err(Error::invalid(
                "admission.rate_per_s must be in (0, 100000]",
            ));
        }
        if !(1..=1_000_000).contains(&self.burst) {
            return Err(Error::invalid("admission.burst must be in 1..=1000000"));
        }
        if !(1..=10_000_000).contains(&self.max_active) {
            return Err(Error::invalid(
                "admission.max_active must be in 1..=10000000",
            ));
        }
        if !(10..=86_400).contains(&self.shop_window_s) {
            return Err(Error::invalid(
                "admission.shop_window_s must be in 10..=86400",
            ));
        }
        if self.admit_margin_pct > 1_000 {
            return Err(Error::invalid(
                "admission.admit_margin_pct must be in 0..=1000",
            ));
        }
        // The floor leaves room for three presence marks per grace, from sockets (every
        // presence interval) and from the page's fallback polling (every 5 s).
        if !(15..=86_400).contains(&self.leave_grace_s) {
            return Err(Error::invalid(
                "admission.leave_grace_s must be in 15..=86400",
            ));
        }
        if !(OFFER_WINDOW_S_MIN..=OFFER_WINDOW_S_MAX).contains(&self.offer_window_s) {
            return Err(Error::invalid(format!(
                "admission.offer_window_s must be in {OFFER_WINDOW_S_MIN}..={OFFER_WINDOW_S_MAX}"
            )));
        }
        if self.waitlist && self.mode != AdmissionMode::Queue {
            return Err(Error::invalid(
                "admission.waitlist needs admission.mode \"queue\": an open drop has no line",
            ));
        }
        Ok(())
    }
}

/// The unit Redis counts stock in: a SKU (GA) or a section (seated).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bucket {
    pub id: String,
    pub name: String,
    pub price_cents: i64,
    pub total: u32,
    /// Seated only: rows front first, `(label, seats)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rows: Vec<(String, u32)>,
}

/// A drop as every process caches it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DropDef {
    pub drop_id: DropId,
    pub seller_key_id: String,
    pub name: String,
    pub currency: String,
    pub kind: Kind,
    #[serde(with = "time::serde::rfc3339")]
    pub opens_at: OffsetDateTime,
    pub per_fan_limit: u32,
    pub hold_ttl_ms: u64,
    pub admission: AdmissionSettings,
    pub seed_sha256: String,
    pub buckets: Vec<Bucket>,
}

impl DropDef {
    pub fn bucket(&self, id: &str) -> Option<&Bucket> {
        self.buckets.iter().find(|b| b.id == id)
    }

    pub fn total_units(&self) -> u64 {
        self.buckets.iter().map(|b| u64::from(b.total)).sum()
    }

    /// Whether this drop has this seat.
    pub fn has_seat(&self, seat: &SeatId) -> bool {
        let mut parts = seat.as_str().split('-');
        let (Some(section), Some(row), Some(number)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let Ok(number) = number.parse::<u32>() else {
            return false;
        };
        self.bucket(section)
            .and_then(|b| b.rows.iter().find(|(label, _)| label == row))
            .is_some_and(|(_, seats)| (1..=*seats).contains(&number))
    }

    /// Every seat id, section by section, rows front first.
    pub fn seat_ids(&self) -> impl Iterator<Item = (String, &Bucket, &str, u32)> + '_ {
        self.buckets.iter().flat_map(|b| {
            b.rows.iter().flat_map(move |(row, seats)| {
                (1..=*seats).map(move |n| (format!("{}-{}-{}", b.id, row, n), b, row.as_str(), n))
            })
        })
    }

    pub fn opens_at_ms(&self) -> i64 {
        (self.opens_at.unix_timestamp_nanos() / 1_000_000) as i64
    }
}

// ---- creation -----------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDrop {
    pub name: String,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub opens_at: Option<OffsetDateTime>,
    pub per_fan_limit: i64,
    pub hold_ttl_s: i64,
    pub admission: AdmissionSettings,
    pub inventory: InventoryRequest,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum InventoryRequest {
    Ga { skus: Vec<SkuRequest> },
    Seated { sections: Vec<SectionRequest> },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkuRequest {
    pub sku: Sku,
    pub name: String,
    pub price_cents: i64,
    pub quantity: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionRequest {
    pub section: Section,
    pub price_cents: i64,
    pub rows: Vec<RowRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowRequest {
    pub row: String,
    pub seats: i64,
}

fn check_name(what: &str, name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(Error::invalid(format!("{what} must be 1..=200 characters")));
    }
    Ok(name.to_owned())
}

fn check_price(what: &str, price: i64) -> Result<i64> {
    if !(0..=10_000_000_000).contains(&price) {
        return Err(Error::invalid(format!(
            "{what}.price_cents must be in 0..=10000000000"
        )));
    }
    Ok(price)
}

impl CreateDrop {
    /// Checks every field and bound; the result can be stored and loaded as it is.
    pub fn into_def(
        self,
        drop_id: DropId,
        seller_key_id: String,
        seed_sha256: String,
        now: OffsetDateTime,
        limits: &DropsConfig,
    ) -> Result<DropDef> {
        let name = check_name("name", &self.name)?;
        let currency = self.currency.unwrap_or_else(|| "USD".to_owned());
        if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(Error::invalid(
                "currency must be a three-letter ISO 4217 code, e.g. USD",
            ));
        }
        if !(1..=1000).contains(&self.per_fan_limit) {
            return Err(Error::invalid("per_fan_limit must be in 1..=1000"));
        }
        let hold_ttl_ms = if (1..=3600).contains(&self.hold_ttl_s) {
            (self.hold_ttl_s as u64) * 1000
        } else {
            return Err(Error::invalid("hold_ttl_s must be in 1..=3600"));
        };
        self.admission.validate()?;
        let mut buckets = Vec::new();
        let mut seats_total = 0usize;
        let mut seen = HashSet::new();
        match self.inventory {
            InventoryRequest::Ga { skus } => {
                if skus.is_empty() || skus.len() > limits.max_buckets {
                    return Err(Error::invalid(format!(
                        "inventory.skus must have 1..={} entries",
                        limits.max_buckets
                    )));
                }
                for s in skus {
                    if !seen.insert(s.sku.to_string()) {
                        return Err(Error::invalid(format!("sku `{}` appears twice", s.sku)));
                    }
                    if s.quantity < 0 || s.quantity > i64::from(limits.max_units_per_sku) {
                        return Err(Error::invalid(format!(
                            "sku `{}`: quantity must be in 0..={}",
                            s.sku, limits.max_units_per_sku
                        )));
                    }
                    buckets.push(Bucket {
                        id: s.sku.to_string(),
                        name: check_name("sku name", &s.name)?,
                        price_cents: check_price("sku", s.price_cents)?,
                        total: s.quantity as u32,
                        rows: Vec::new(),
                    });
                }
            }
            InventoryRequest::Seated { sections } => {
                if sections.is_empty() || sections.len() > limits.max_buckets {
                    return Err(Error::invalid(format!(
                        "inventory.sections must have 1..={} entries",
                        limits.max_buckets
                    )));
                }
                for s in sections {
                    if !seen.insert(s.section.to_string()) {
                        return Err(Error::invalid(format!(
                            "section `{}` appears twice",
                            s.section
                        )));
                    }
                    if s.rows.is_empty() {
                        return Err(Error::invalid(format!(
                            "section `{}` has no rows",
                            s.section
                        )));
                    }
                    let mut rows = Vec::new();
                    let mut row_seen = HashSet::new();
                    for r in s.rows {
                        let label = parse_row_label(&r.row)?;
                        if !row_seen.insert(label.clone()) {
                            return Err(Error::invalid(format!(
                                "section `{}`: row `{label}` appears twice",
                                s.section
                            )));
                        }
                        if !(1..=1000).contains(&r.seats) {
                            return Err(Error::invalid("a row has 1..=1000 seats"));
                        }
                        seats_total += r.seats as usize;
                        rows.push((label, r.seats as u32));
                    }
                    if seats_total > limits.max_seats {
                        return Err(Error::invalid(format!(
                            "a drop has at most {} seats",
                            limits.max_seats
                        )));
                    }
                    buckets.push(Bucket {
                        id: s.section.to_string(),
                        name: s.section.to_string(),
                        price_cents: check_price("section", s.price_cents)?,
                        total: rows.iter().map(|(_, n)| n).sum(),
                        rows,
                    });
                }
            }
        }
        let kind = if seats_total > 0 {
            Kind::Seated
        } else {
            Kind::Ga
        };
        Ok(DropDef {
            drop_id,
            seller_key_id,
            name,
            currency,
            kind,
            opens_at: self.opens_at.unwrap_or(now),
            per_fan_limit: self.per_fan_limit as u32,
            hold_ttl_ms,
            admission: self.admission,
            seed_sha256,
            buckets,
        })
    }
}

// ---- a fan's reserve request ---------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldRequestBody {
    #[serde(default)]
    pub items: Option<Vec<ItemRequest>>,
    #[serde(default)]
    pub seats: Option<Vec<String>>,
    #[serde(default)]
    pub best_available: Option<BestRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    pub sku: String,
    pub quantity: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BestRequest {
    pub section: String,
    pub quantity: i64,
}

/// A reserve request checked against its drop: every SKU, seat and section exists, no repeats,
/// quantities in 1..=per-fan limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldRequest {
    Items(Vec<(String, u32)>),
    Seats(Vec<SeatId>),
    Best { section: String, quantity: u32 },
}

impl HoldRequest {
    pub fn parse(body: HoldRequestBody, drop: &DropDef, max_items: usize) -> Result<HoldRequest> {
        let quantity = |q: i64| -> Result<u32> {
            if q < 1 {
                return Err(Error::invalid("quantity must be at least 1"));
            }
            if q > i64::from(drop.per_fan_limit) {
                return Err(Error::msg(
                    Code::LimitExceeded,
                    format!("at most {} per fan in this drop", drop.per_fan_limit),
                ));
            }
            Ok(q as u32)
        };
        let one_of = [
            body.items.is_some(),
            body.seats.is_some(),
            body.best_available.is_some(),
        ];
        if one_of.iter().filter(|x| **x).count() != 1 {
            return Err(Error::invalid(
                "send exactly one of `items`, `seats` or `best_available`",
            ));
        }
        if let Some(items) = body.items {
            if drop.kind != Kind::Ga {
                return Err(Error::invalid(
                    "this drop is seated: reserve `seats` or `best_available`",
                ));
            }
            if items.is_empty() || items.len() > max_items {
                return Err(Error::invalid(format!(
                    "`items` must have 1..={max_items} entries"
                )));
            }
            let mut seen = HashSet::new();
            let mut out = Vec::with_capacity(items.len());
            let mut sum = 0u64;
            for item in items {
                let q = quantity(item.quantity)?;
                if drop.bucket(&item.sku).is_none() {
                    return Err(Error::msg(
                        Code::UnknownSku,
                        format!("no sku `{}` in this drop", item.sku),
                    ));
                }
                if !seen.insert(item.sku.clone()) {
                    return Err(Error::invalid(format!("sku `{}` appears twice", item.sku)));
                }
                sum += u64::from(q);
                out.push((item.sku, q));
            }
            quantity(sum as i64)?;
            return Ok(HoldRequest::Items(out));
        }
        if let Some(seats) = body.seats {
            if drop.kind != Kind::Seated {
                return Err(Error::invalid("this drop has no seats: reserve `items`"));
            }
            if seats.is_empty() || seats.len() > max_items {
                return Err(Error::invalid(format!(
                    "`seats` must have 1..={max_items} entries"
                )));
            }
            quantity(seats.len() as i64)?;
            let mut seen = HashSet::new();
            let mut out = Vec::with_capacity(seats.len());
            for s in seats {
                let seat = SeatId::parse(&s)
                    .ok()
                    .filter(|seat| drop.has_seat(seat))
                    .ok_or_else(|| {
                        Error::msg(Code::UnknownSeat, format!("no seat `{s}` in this drop"))
                    })?;
                if !seen.insert(seat.clone()) {
                    return Err(Error::invalid(format!("seat `{s}` appears twice")));
                }
                out.push(seat);
            }
            return Ok(HoldRequest::Seats(out));
        }
        let best = body
            .best_available
            .ok_or_else(|| Error::invalid("nothing to reserve"))?;
        if drop.kind != Kind::Seated {
            return Err(Error::invalid("this drop has no seats: reserve `items`"));
        }
        let q = quantity(best.quantity)?;
        if drop.bucket(&best.section).is_none() {
            return Err(Error::msg(
                Code::UnknownSection,
                format!("no section `{}` in this drop", best.section),
            ));
        }
        Ok(HoldRequest::Best {
            section: best.section,
            quantity: q,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    /// Small bounds, so every one of them can be crossed in a test.
    fn limits() -> DropsConfig {
        DropsConfig {
            max_buckets: 3,
            max_seats: 10,
            max_units_per_sku: 100,
            ..DropsConfig::default()
        }
    }

    fn ga() -> Value {
        json!({
            "name": "Tour tee", "per_fan_limit": 4, "hold_ttl_s": 300,
            "admission": {"mode": "open"},
            "inventory": {"kind": "ga", "skus": [
                {"sku": "TEE-M", "name": "Tee, M", "price_cents": 2500, "quantity": 100},
                {"sku": "TEE-L", "name": "Tee, L", "price_cents": 2500, "quantity": 0}]}
        })
    }

    fn seated() -> Value {
        json!({
            "name": "Quartet", "per_fan_limit": 4, "hold_ttl_s": 60,
            "admission": {"mode": "queue"},
            "inventory": {"kind": "seated", "sections": [
                {"section": "A", "price_cents": 5000, "rows": [{"row": "1", "seats": 3}, {"row": "2", "seats": 2}]},
                {"section": "B", "price_cents": 3000, "rows": [{"row": "1", "seats": 1}]}]}
        })
    }

    fn create(body: Value) -> Result<DropDef> {
        let req: CreateDrop =
            serde_json::from_value(body).map_err(|e| Error::invalid(e.to_string()))?;
        req.into_def(
            DropId::generate(),
            "key1".to_owned(),
            "00".repeat(32),
            OffsetDateTime::UNIX_EPOCH,
            &limits(),
        )
    }

    #[track_caller]
    fn refused(body: Value, says: &str) {
        let err = create(body).expect_err(says);
        assert_eq!(err.code, Code::InvalidRequest, "{err}");
        assert!(err.message.contains(says), "`{err}` should say `{says}`");
    }

    #[test]
    fn ga_drop_takes_defaults_and_keeps_sku_order() {
        let def = create(ga()).unwrap();
        assert_eq!(def.kind, Kind::Ga);
        assert_eq!(def.currency, "USD");
        assert_eq!(def.opens_at, OffsetDateTime::UNIX_EPOCH);
        assert_eq!(def.hold_ttl_ms, 300_000);
        assert_eq!(def.per_fan_limit, 4);
        let ids: Vec<_> = def.buckets.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, ["TEE-M", "TEE-L"]);
        assert_eq!(def.total_units(), 100);
        assert_eq!(def.bucket("TEE-L").map(|b| b.total), Some(0));
        let a = &def.admission;
        assert_eq!(a.mode, AdmissionMode::Open);
        assert_eq!(a.rate_per_s, DEFAULT_ADMIT_RATE_PER_S);
        assert_eq!(a.burst, DEFAULT_ADMIT_BURST);
        assert_eq!(a.max_active, DEFAULT_MAX_ACTIVE);
        assert!(!a.paused);
        assert_eq!(a.shop_window_s, DEFAULT_SHOP_WINDOW_S);
        assert_eq!(a.admit_margin_pct, DEFAULT_ADMIT_MARGIN_PCT);
        assert_eq!(a.leave_grace_s, DEFAULT_LEAVE_GRACE_S);
        assert!(!a.waitlist);
        assert_eq!(a.offer_window_s, DEFAULT_OFFER_WINDOW_S);
    }

    #[test]
    fn seated_drop_counts_its_rows_and_knows_its_seats() {
        let def = create(seated()).unwrap();
        assert_eq!(def.kind, Kind::Seated);
        assert_eq!(def.bucket("A").map(|b| b.total), Some(5));
        assert_eq!(def.total_units(), 6);
        let seats: Vec<_> = def.seat_ids().map(|(id, ..)| id).collect();
        assert_eq!(
            seats,
            ["A-1-1", "A-1-2", "A-1-3", "A-2-1", "A-2-2", "B-1-1"]
        );
        let has = |s: &str| def.has_seat(&SeatId::parse(s).unwrap());
        assert!(has("A-1-3") && has("A-2-2") && has("B-1-1"));
        assert!(!has("A-1-4") && !has("A-3-1") && !has("B-2-1") && !has("C-1-1"));
    }

    #[test]
    fn drop_fields_are_bounded() {
        let mut body = ga();
        body["name"] = json!("  Tour tee  ");
        body["currency"] = json!("EUR");
        body["per_fan_limit"] = json!(1000);
        body["hold_ttl_s"] = json!(3600);
        body["opens_at"] = json!("2030-01-01T10:00:00Z");
        let def = create(body).unwrap();
        assert_eq!(def.name, "Tour tee");
        assert_eq!(def.currency, "EUR");
        assert_eq!(def.per_fan_limit, 1000);
        assert_eq!(def.hold_ttl_ms, 3_600_000);
        assert_eq!(def.opens_at_ms(), 1_893_492_000_000);
        let mut body = ga();
        body["name"] = json!("é".repeat(200));
        body["hold_ttl_s"] = json!(1);
        body["per_fan_limit"] = json!(1);
        create(body).unwrap();

        for (field, value, says) in [
            ("name", json!(""), "name must be 1..=200"),
            ("name", json!("   "), "name must be 1..=200"),
            ("name", json!("x".repeat(201)), "name must be 1..=200"),
            ("currency", json!("usd"), "currency"),
            ("currency", json!("US"), "currency"),
            ("currency", json!("USDX"), "currency"),
            ("per_fan_limit", json!(0), "per_fan_limit"),
            ("per_fan_limit", json!(1001), "per_fan_limit"),
            ("hold_ttl_s", json!(0), "hold_ttl_s"),
            ("hold_ttl_s", json!(3601), "hold_ttl_s"),
            ("colour", json!("red"), "unknown field"),
        ] {
            let mut body = ga();
            body[field] = value;
            refused(body, says);
        }
    }

    #[test]
    fn admission_settings_are_bounded() {
        let ok = |patch: Value| {
            let mut body = json!({"mode": "queue"});
            for (k, v) in patch.as_object().unwrap() {
                body[k] = v.clone();
            }
            serde_json::from_value::<AdmissionSettings>(body)
                .unwrap()
                .validate()
        };
        for edge in [
            json!({"rate_per_s": 0.001}),
            json!({"rate_per_s": 100000}),
            json!({"burst": 1}),
            json!({"burst": 1000000}),
            json!({"max_active": 1}),
            json!({"max_active": 10000000}),
            json!({"shop_window_s": 10}),
            json!({"shop_window_s": 86400}),
            json!({"admit_margin_pct": 0}),
            json!({"admit_margin_pct": 1000}),
            json!({"leave_grace_s": 15}),
            json!({"leave_grace_s": 86400}),
        ] {
            assert!(ok(edge.clone()).is_ok(), "{edge} is within bounds");
        }
        for (past, says) in [
            (json!({"rate_per_s": 0}), "rate_per_s"),
            (json!({"rate_per_s": -1}), "rate_per_s"),
            (json!({"rate_per_s": 100000.5}), "rate_per_s"),
            (json!({"burst": 0}), "burst"),
            (json!({"burst": 1000001}), "burst"),
            (json!({"max_active": 0}), "max_active"),
            (json!({"max_active": 10000001}), "max_active"),
            (json!({"shop_window_s": 9}), "shop_window_s"),
            (json!({"shop_window_s": 86401}), "shop_window_s"),
            (json!({"admit_margin_pct": 1001}), "admit_margin_pct"),
            (json!({"leave_grace_s": 14}), "leave_grace_s"),
            (json!({"leave_grace_s": 86401}), "leave_grace_s"),
        ] {
            let err = ok(past.clone()).expect_err("past a bound");
            assert_eq!(err.code, Code::InvalidRequest);
            assert!(err.message.contains(says), "{past}: {err}");
        }
        let mut nan = serde_json::from_value::<AdmissionSettings>(json!({"mode": "open"})).unwrap();
        nan.rate_per_s = f64::NAN;
        assert!(nan.validate().is_err());
        nan.rate_per_s = f64::INFINITY;
        assert!(nan.validate().is_err());
        // A drop is refused when its admission settings are.
        let mut body = ga();
        body["admission"]["burst"] = json!(0);
        refused(body, "admission.burst");
        let mut body = ga();
        body["admission"]["mode"] = json!("lottery");
        refused(body, "unknown variant");
    }

    #[test]
    fn skus_are_bounded() {
        let mut body = ga();
        body["inventory"]["skus"][0]["quantity"] = json!(100);
        body["inventory"]["skus"][0]["price_cents"] = json!(10_000_000_000i64);
        body["inventory"]["skus"][1]["price_cents"] = json!(0);
        create(body).unwrap();

        let sku = |n: usize| json!({"sku": format!("S{n}"), "name": "s", "price_cents": 1, "quantity": 1});
        let mut body = ga();
        body["inventory"]["skus"] = json!([]);
        refused(body, "inventory.skus must have 1..=3");
        let mut body = ga();
        body["inventory"]["skus"] = json!([sku(1), sku(2), sku(3), sku(4)]);
        refused(body, "inventory.skus must have 1..=3");
        let mut body = ga();
        body["inventory"]["skus"] = json!([sku(1), sku(2), sku(1)]);
        refused(body, "sku `S1` appears twice");
        for (field, value, says) in [
            ("quantity", json!(-1), "quantity must be in 0..=100"),
            ("quantity", json!(101), "quantity must be in 0..=100"),
            ("price_cents", json!(-1), "price_cents"),
            ("price_cents", json!(10_000_000_001i64), "price_cents"),
            ("name", json!(" "), "sku name must be 1..=200"),
            ("sku", json!("TEE M"), "sku `TEE M`"),
            ("sku", json!("S".repeat(41)), "1..=40"),
        ] {
            let mut body = ga();
            body["inventory"]["skus"][0][field] = value;
            refused(body, says);
        }
    }

    #[test]
    fn sections_rows_and_seats_are_bounded() {
        let section =
            |id: &str, rows: Value| json!({"section": id, "price_cents": 1, "rows": rows});
        let one_row = json!([{"row": "1", "seats": 1}]);
        let with_sections = |sections: Value| {
            let mut body = seated();
            body["inventory"]["sections"] = sections;
            body
        };
        // Exactly max_seats (10) over the drop is fine; one more is not, whichever section has it.
        let ten = json!([{"row": "1", "seats": 6}, {"row": "2", "seats": 4}]);
        create(with_sections(json!([section("A", ten)]))).unwrap();
        refused(
            with_sections(json!([
                section("A", json!([{"row": "1", "seats": 6}])),
                section("B", json!([{"row": "1", "seats": 5}]))
            ])),
            "at most 10 seats",
        );
        refused(
            with_sections(json!([])),
            "inventory.sections must have 1..=3",
        );
        refused(
            with_sections(json!([
                section("A", one_row.clone()),
                section("B", one_row.clone()),
                section("C", one_row.clone()),
                section("D", one_row.clone())
            ])),
            "inventory.sections must have 1..=3",
        );
        refused(
            with_sections(json!([
                section("A", one_row.clone()),
                section("A", one_row.clone())
            ])),
            "section `A` appears twice",
        );
        refused(
            with_sections(json!([section("A", json!([]))])),
            "section `A` has no rows",
        );
        refused(
            with_sections(json!([section(
                "A",
                json!([{"row": "1", "seats": 1}, {"row": "1", "seats": 2}])
            )])),
            "row `1` appears twice",
        );
        for (row, seats, says) in [
            ("1", 0, "a row has 1..=1000 seats"),
            ("1", 1001, "a row has 1..=1000 seats"),
            ("", 1, "row ``"),
            ("A-1", 1, "row `A-1`"),
            ("123456789", 1, "row `123456789`"),
        ] {
            refused(
                with_sections(json!([section("A", json!([{"row": row, "seats": seats}]))])),
                says,
            );
        }
        for bad in ["A-B", "", "S".repeat(17).as_str()] {
            refused(
                with_sections(json!([section(bad, one_row.clone())])),
                "section `",
            );
        }
        let mut body = seated();
        body["inventory"]["sections"][0]["price_cents"] = json!(-1);
        refused(body, "section.price_cents");
        // A GA drop's body can't describe seats, nor the other way round.
        let mut body = ga();
        body["inventory"]["sections"] = json!([]);
        refused(body, "unknown field");
    }

    // ---- reserve requests ----

    fn parse(drop: &DropDef, body: Value) -> Result<HoldRequest> {
        let body: HoldRequestBody =
            serde_json::from_value(body).map_err(|e| Error::invalid(e.to_string()))?;
        HoldRequest::parse(body, drop, 3)
    }

    #[track_caller]
    fn refused_hold(drop: &DropDef, body: Value, code: Code, says: &str) {
        let err = parse(drop, body.clone()).expect_err("refused");
        assert_eq!(err.code, code, "{body}: {err}");
        assert!(
            err.message.contains(says),
            "{body}: `{err}` should say `{says}`"
        );
    }

    #[test]
    fn items_are_checked_against_the_drop() {
        let drop = create(ga()).unwrap();
        assert_eq!(
            parse(
                &drop,
                json!({"items": [{"sku": "TEE-M", "quantity": 1}, {"sku": "TEE-L", "quantity": 3}]})
            )
            .unwrap(),
            HoldRequest::Items(vec![("TEE-M".into(), 1), ("TEE-L".into(), 3)])
        );
        let invalid = Code::InvalidRequest;
        let item = |sku: &str, q: i64| json!({"sku": sku, "quantity": q});
        for (body, code, says) in [
            (json!({}), invalid, "exactly one of"),
            (
                json!({"items": [item("TEE-M", 1)], "best_available": {"section": "A", "quantity": 1}}),
                invalid,
                "exactly one of",
            ),
            (json!({"items": []}), invalid, "`items` must have 1..=3"),
            (
                json!({"items": [item("TEE-M", 1), item("TEE-L", 1), item("X", 1), item("Y", 1)]}),
                invalid,
                "`items` must have 1..=3",
            ),
            (json!({"items": [item("TEE-M", 0)]}), invalid, "at least 1"),
            (json!({"items": [item("TEE-M", -2)]}), invalid, "at least 1"),
            (
                json!({"items": [item("TEE-M", 5)]}),
                Code::LimitExceeded,
                "at most 4",
            ),
            (
                json!({"items": [item("TEE-M", 2), item("TEE-L", 3)]}),
                Code::LimitExceeded,
                "at most 4",
            ),
            (
                json!({"items": [item("TEE-XL", 1)]}),
                Code::UnknownSku,
                "no sku `TEE-XL`",
            ),
            (
                json!({"items": [item("TEE-M", 1), item("TEE-M", 1)]}),
                invalid,
                "sku `TEE-M` appears twice",
            ),
            (json!({"seats": ["A-1-1"]}), invalid, "no seats"),
            (
                json!({"best_available": {"section": "A", "quantity": 1}}),
                invalid,
                "no seats",
            ),
            (
                json!({"items": [{"sku": "TEE-M", "quantity": 1, "size": "M"}]}),
                invalid,
                "unknown field",
            ),
        ] {
            refused_hold(&drop, body, code, says);
        }
    }

    #[test]
    fn seats_and_best_available_are_checked_against_the_drop() {
        let drop = create(seated()).unwrap();
        let seat = |s: &str| SeatId::parse(s).unwrap();
        assert_eq!(
            parse(&drop, json!({"seats": ["A-2-2", "B-1-1"]})).unwrap(),
            HoldRequest::Seats(vec![seat("A-2-2"), seat("B-1-1")])
        );
        assert_eq!(
            parse(
                &drop,
                json!({"best_available": {"section": "A", "quantity": 4}})
            )
            .unwrap(),
            HoldRequest::Best {
                section: "A".into(),
                quantity: 4
            }
        );
        let invalid = Code::InvalidRequest;
        for (body, code, says) in [
            (
                json!({"items": [{"sku": "A", "quantity": 1}]}),
                invalid,
                "this drop is seated",
            ),
            (json!({"seats": []}), invalid, "`seats` must have 1..=3"),
            (
                json!({"seats": ["A-1-1", "A-1-2", "A-1-3", "A-2-1"]}),
                invalid,
                "`seats` must have 1..=3",
            ),
            (
                json!({"seats": ["A-1-4"]}),
                Code::UnknownSeat,
                "no seat `A-1-4`",
            ),
            (
                json!({"seats": ["A-3-1"]}),
                Code::UnknownSeat,
                "no seat `A-3-1`",
            ),
            (
                json!({"seats": ["C-1-1"]}),
                Code::UnknownSeat,
                "no seat `C-1-1`",
            ),
            (
                json!({"seats": ["A-1-01"]}),
                Code::UnknownSeat,
                "no seat `A-1-01`",
            ),
            (
                json!({"seats": ["A-1"]}),
                Code::UnknownSeat,
                "no seat `A-1`",
            ),
            (
                json!({"seats": ["A-1-1", "A-1-1"]}),
                invalid,
                "seat `A-1-1` appears twice",
            ),
            (
                json!({"seats": ["A-1-1"], "best_available": {"section": "A", "quantity": 1}}),
                invalid,
                "exactly one of",
            ),
            (
                json!({"best_available": {"section": "C", "quantity": 1}}),
                Code::UnknownSection,
                "no section `C`",
            ),
            (
                json!({"best_available": {"section": "A", "quantity": 0}}),
                invalid,
                "at least 1",
            ),
            (
                json!({"best_available": {"section": "A", "quantity": 5}}),
                Code::LimitExceeded,
                "at most 4",
            ),
        ] {
            refused_hold(&drop, body, code, says);
        }
        // The per-fan limit counts seats too (3 seats of a limit of 2).
        let mut body = seated();
        body["per_fan_limit"] = json!(2);
        let drop = create(body).unwrap();
        refused_hold(
            &drop,
            json!({"seats": ["A-1-1", "A-1-2", "A-1-3"]}),
            Code::LimitExceeded,
            "at most 2",
        );
    }
}
