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
}

pub const DEFAULT_ADMIT_RATE_PER_S: f64 = 10.0;
pub const DEFAULT_ADMIT_BURST: u32 = 20;
pub const DEFAULT_MAX_ACTIVE: u32 = 1_000;
pub const DEFAULT_SHOP_WINDOW_S: u32 = 300;
pub const DEFAULT_ADMIT_MARGIN_PCT: u32 = 10;
/// Two minutes: a phone changing networks or a browser restarting comes back well within it,
/// while a closed tab stops taking an admission slot soon after.
pub const DEFAULT_LEAVE_GRACE_S: u32 = 120;
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
