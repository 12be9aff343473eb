//! The reference model: what each Lua script in `lua/` does, written again in plain Rust over plain
//! maps that mirror one drop's Redis keys (and a record standing for what Postgres holds). The
//! model test runs every step against the real scripts and this model and compares the two.
//!
//! Written from the scripts' headers and the rules in docs/ARCHITECTURE.md, not by calling the
//! engine, so a script that drifts from those rules shows up as a difference. One deliberate
//! simplification: meta's `next_due_ms` (a cache that only saves reserve a `redis.call`) is not
//! modelled; the model reclaims whenever a script may, and the test checks instead that
//! `next_due_ms` never exceeds the earliest deadline, which is exactly what makes skipping safe.

use std::collections::{BTreeMap, BTreeSet};

use engine::ids::FanId;
use engine::keys::DropKeys;
use engine::queue::Returning;
use serde_json::{json, Value};

/// The model's clock starts here (ms since the epoch; 13 digits, as today's clocks).
pub const T0_MS: i64 = 1_700_000_000_000;
/// Places after opening are `POST_OPEN_BASE + n` (lua/join.lua).
pub const POST_OPEN_BASE: i64 = 1 << 52;

/// One item of a hold: bucket (SKU or section), quantity, seat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub bucket: String,
    pub quantity: i64,
    pub seat: Option<String>,
}

impl Item {
    pub fn to_json(&self) -> Value {
        let mut v = json!({"b": self.bucket, "q": self.quantity});
        if let Some(s) = &self.seat {
            v["s"] = json!(s);
        }
        v
    }
}

/// A hold as the holds hash keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Hold {
    pub fan: String,
    pub state: &'static str,
    pub expires_at_ms: i64,
    pub confirm_deadline_ms: Option<i64>,
    pub reference: Option<String>,
    pub order: Option<String>,
    pub units: i64,
    pub created_ms: i64,
    pub items: Vec<Item>,
    pub ended_ms: Option<i64>,
    /// The holds-hash field of the stored answer of the reserve that made it (lua/lib.lua).
    pub answer: Option<String>,
}

impl Hold {
    /// The JSON the scripts store (lua/lib.lua names the short fields).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "fan": self.fan, "st": self.state, "exp": self.expires_at_ms, "u": self.units,
            "c": self.created_ms,
            "it": self.items.iter().map(Item::to_json).collect::<Vec<_>>(),
        });
        if let Some(x) = self.confirm_deadline_ms {
            v["cexp"] = json!(x);
        }
        if let Some(x) = &self.reference {
            v["ref"] = json!(x);
        }
        if let Some(x) = &self.order {
            v["oid"] = json!(x);
        }
        if let Some(x) = self.ended_ms {
            v["ended"] = json!(x);
        }
        if let Some(x) = &self.answer {
            v["k"] = json!(x);
        }
        v
    }
}

/// A reserve request after the engine parsed it against the drop (ids exist, no repeats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Items(Vec<(String, u32)>),
    Seats(Vec<(String, String)>),
    /// `scan_seats_max`: seats best-available examines at most (whole rows, front first).
    Best {
        section: String,
        quantity: u32,
        scan_seats_max: usize,
    },
}

/// What reserve answered (the replay flag aside).
#[derive(Debug, Clone, PartialEq)]
pub enum ReserveOut {
    Held {
        hold: String,
        expires_at_ms: i64,
        items: Vec<Item>,
    },
    Refused {
        code: String,
        detail: Value,
    },
}

fn refused(code: &str, detail: Value) -> ReserveOut {
    ReserveOut::Refused {
        code: code.into(),
        detail,
    }
}

/// One admission run's answer (lua/admit.lua's Returns).
#[derive(Debug, Clone, PartialEq)]
pub struct TickOut {
    pub state: String,
    pub watermark: i64,
    pub admitted_total: i64,
    pub waiting: i64,
    pub active: i64,
    pub left: i64,
    /// The session ends of this call's admissions ((0, 0) when it admitted none).
    pub session: (i64, i64),
    /// The join counter.
    pub seq: i64,
    /// Units come back since the sell-out (the waiting list).
    pub came_back: i64,
    pub admitted: Vec<(String, i64)>,
}

/// A drop's fixed settings, as the engine loads them into Redis and rebuilds them there.
#[derive(Debug, Clone)]
pub struct DropSpec {
    pub seated: bool,
    pub queue: bool,
    /// (bucket, total): SKUs, or sections with their seat counts.
    pub buckets: Vec<(String, i64)>,
    /// Seated drops: section → rows (label, seats), front row first.
    pub layout: Vec<(String, Vec<(String, u32)>)>,
    pub per_fan_limit: i64,
    pub hold_ttl_ms: i64,
    pub opens_at_ms: i64,
    pub confirm_timeout_ms: i64,
    pub confirm_grace_ms: i64,
    pub reclaim_batch: i64,
    pub done_ttl_ms: i64,
}

impl DropSpec {
    pub fn seat_ids(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (section, rows) in &self.layout {
            for (row, n) in rows {
                for s in 1..=*n {
                    out.push(format!("{section}-{row}-{s}"));
                }
            }
        }
        out
    }

    /// The meta fields, as the engine's `meta_fields` writes them.
    pub fn meta_payload(&self, status: &str, recovering: &str) -> Value {
        json!({
            "status": status, "recovering": recovering,
            "kind": if self.seated { "seated" } else { "ga" },
            "per_fan_limit": self.per_fan_limit, "hold_ttl_ms": self.hold_ttl_ms,
            "opens_at_ms": self.opens_at_ms, "mode": if self.queue { "queue" } else { "open" },
            "confirm_timeout_ms": self.confirm_timeout_ms,
            "confirm_grace_ms": self.confirm_grace_ms, "reclaim_batch": self.reclaim_batch,
            "done_ttl_ms": self.done_ttl_ms,
        })
    }

    pub fn layout_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (section, rows) in &self.layout {
            m.insert(
                section.clone(),
                json!(rows.iter().map(|(r, n)| json!([r, n])).collect::<Vec<_>>()),
            );
        }
        Value::Object(m)
    }
}

/// What Postgres holds for the drop: its status, ops' admission settings and the committed
/// orders (by hold).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub status: String,
    pub admission: BTreeMap<String, String>,
    /// hold id → (order id, fan, items)
    pub orders: BTreeMap<String, (String, String, Vec<Item>)>,
    /// The drop is archived (`drops.archived_at`): the engine never writes its Redis keys again
    /// (close, recovery and the watcher leave it alone).
    pub archived: bool,
    /// The line's kept marks (join counter, highest place admitted, admissions ever), as
    /// queue-server raises them after admission runs (migrations/0004_line_marks.sql).
    pub line_marks: (i64, i64, i64),
    /// bucket → units restocks added to inventory.total (migrations/0006_restock.sql).
    pub restocked: BTreeMap<String, i64>,
    /// Refunds recorded (migrations/0007_refunds.sql), by their marker `"<order id>|<refund
    /// id>"`: (the order's hold, its fan, the items refunded). Postgres counts their units as
    /// returned from the moment they are recorded.
    pub refunds: BTreeMap<String, (String, String, Vec<Item>)>,
}

impl Record {
    /// A bucket's total in Postgres: the spec's, plus what restocks added.
    pub fn total(&self, spec: &DropSpec, bucket: &str) -> i64 {
        let base = spec
            .buckets
            .iter()
            .find(|(b, _)| b == bucket)
            .map_or(0, |(_, t)| *t);
        base + self.restocked.get(bucket).copied().unwrap_or(0)
    }

    /// Units of `bucket` sold and not refunded (`inventory.sold`).
    pub fn sold(&self, bucket: &str) -> i64 {
        let units = |items: &[Item]| -> i64 {
            items
                .iter()
                .filter(|i| i.bucket == bucket)
                .map(|i| i.quantity)
                .sum()
        };
        self.orders
            .values()
            .map(|(_, _, it)| units(it))
            .sum::<i64>()
            - self
                .refunds
                .values()
                .map(|(_, _, it)| units(it))
                .sum::<i64>()
    }

    /// Units each fan bought and kept (`fan_purchases`: a refund lowers its row, never drops it).
    pub fn bought(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for (_, fan, items) in self.orders.values() {
            *out.entry(fan.clone()).or_insert(0) += items.iter().map(|i| i.quantity).sum::<i64>();
        }
        for (_, fan, items) in self.refunds.values() {
            *out.entry(fan.clone()).or_insert(0) -= items.iter().map(|i| i.quantity).sum::<i64>();
        }
        out
    }

    /// Seats sold and not refunded (the "sold once" guard's seats).
    pub fn sold_seats(&self) -> Vec<String> {
        self.orders
            .iter()
            .flat_map(|(hold, (_, _, it))| {
                it.iter()
                    .filter_map(|i| i.seat.clone())
                    .filter(|seat| !self.seat_refunded(hold, seat))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn seat_refunded(&self, hold: &str, seat: &str) -> bool {
        self.refunds
            .values()
            .any(|(h, _, it)| h == hold && it.iter().any(|i| i.seat.as_deref() == Some(seat)))
    }

    /// What the order of `hold` still has: its items less what its refunds took.
    pub fn unrefunded(&self, hold: &str) -> Vec<Item> {
        let Some((_, _, items)) = self.orders.get(hold) else {
            return Vec::new();
        };
        let mut left = items.clone();
        for (h, _, refunded) in self.refunds.values() {
            if h != hold {
                continue;
            }
            for r in refunded {
                if let Some(i) = left
                    .iter_mut()
                    .find(|i| i.bucket == r.bucket && i.seat == r.seat)
                {
                    i.quantity -= r.quantity;
                }
            }
        }
        left.retain(|i| i.quantity > 0);
        left
    }
}

/// One drop's Redis keys, as plain maps (a missing key is an empty map).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Store {
    pub meta: BTreeMap<String, String>,
    pub stock: BTreeMap<String, i64>,
    pub seats: BTreeMap<String, String>,
    pub holds: BTreeMap<String, Hold>,
    pub deadlines: BTreeMap<String, i64>,
    /// Hold ids in the order reserve made them (lua/lib.lua `reclaim`).
    pub expiries: Vec<String>,
    pub confirming: BTreeMap<String, i64>,
    pub done: BTreeMap<String, i64>,
    pub fans: BTreeMap<String, i64>,
    pub fanholds: BTreeSet<String>,
    pub layout: BTreeMap<String, Value>,
    pub active: BTreeMap<String, i64>,
    /// Admitted fan → "<shop end ms>:<hard end ms>".
    pub sessions: BTreeMap<String, String>,
    /// Fan → shop end ms: the fans meta's demand_units (admission's running sum) counts.
    pub shopping: BTreeMap<String, i64>,
    /// Fan → offer end ms: the fans the waiting list offered a unit.
    pub offers: BTreeMap<String, i64>,
    /// (fan, idempotency key) → (body sha, first answer)
    pub idem: BTreeMap<(String, String), (String, ReserveOut)>,
    pub admission: BTreeMap<String, String>,
    pub places: BTreeMap<String, i64>,
    pub line: BTreeMap<String, i64>,
    pub seq: i64,
    pub seen: BTreeMap<String, i64>,
    /// The token bucket's hash, each field as a number.
    pub bucket: BTreeMap<String, f64>,
    pub watermark: BTreeMap<String, i64>,
    /// Refunds returned to stock (lua/refund.lua's markers, a rebuild's too).
    pub refunds: BTreeSet<String>,
}

/// Members of a zset in Redis' order (score, then member bytes).
fn zset_order(z: &BTreeMap<String, i64>) -> Vec<(String, i64)> {
    let mut v: Vec<(String, i64)> = z.iter().map(|(k, s)| (k.clone(), *s)).collect();
    v.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    v
}

fn num(m: &BTreeMap<String, String>, field: &str) -> Option<i64> {
    m.get(field)
        .and_then(|v| v.parse::<f64>().ok())
        .map(|f| f as i64)
}

fn incr(m: &mut BTreeMap<String, i64>, field: &str, by: i64) -> i64 {
    let v = m.entry(field.to_owned()).or_insert(0);
    *v += by;
    *v
}

/// lib.lua's `can_take`: what a fan holding or having bought `units` may still take.
fn can_take(limit: i64, units: i64) -> i64 {
    (limit - units).max(0)
}

/// meta's per_fan_limit as the admission scripts read it (1 when absent).
fn limit_or_1(meta: &BTreeMap<String, String>) -> i64 {
    num(meta, "per_fan_limit").unwrap_or(1)
}

/// Lua's `string.format('%.6f', x)` read back with `tonumber`.
fn six_places(x: f64) -> f64 {
    format!("{x:.6}").parse().unwrap_or(0.0)
}

/// The model of one drop.
#[derive(Debug, Clone)]
pub struct Model {
    pub spec: DropSpec,
    pub now_ms: i64,
    pub store: Store,
    pub record: Record,
    /// The redis-server run id (scripts stamp it; confirm_begin compares it).
    pub run_id: String,
    /// What each fan's page keeps (outside Redis and Postgres): its last place receipt and its
    /// admission token, presented when it joins again after the line was lost.
    pub pages: BTreeMap<String, Page>,
}

/// A fan's page: the last receipt (place, issued ms) and admission token (place, issued ms, shop
/// end ms, hard end ms) queue-server handed it.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub receipt: Option<(i64, i64)>,
    pub token: Option<(i64, i64, i64, i64)>,
}

impl Model {
    pub fn new(spec: DropSpec, run_id: String) -> Model {
        Model {
            spec,
            now_ms: T0_MS,
            store: Store::default(),
            record: Record {
                status: "open".into(),
                ..Record::default()
            },
            run_id,
            pages: BTreeMap::new(),
        }
    }

    fn meta_num(&self, field: &str, default: i64) -> i64 {
        num(&self.store.meta, field).unwrap_or(default)
    }

    // ---- lib.lua ----------------------------------------------------------------------------

    /// lib.lua's `fan_units_moved`: a counted fan's units went from `old` to `new`, so meta's
    /// demand_units moves by the change in what the fan may still take.
    fn fan_units_moved(&mut self, fan: &str, old: i64, new: i64) {
        if !self.store.shopping.contains_key(fan) {
            return;
        }
        let Some(demand) = num(&self.store.meta, "demand_units") else {
            return;
        };
        let limit = self.meta_num("per_fan_limit", 1);
        let by = can_take(limit, new) - can_take(limit, old);
        if by != 0 {
            self.store
                .meta
                .insert("demand_units".into(), (demand + by).to_string());
        }
    }

    fn return_to_stock(&mut self, id: &str, final_state: &'static str) {
        let now = self.now_ms;
        let Some(mut h) = self.store.holds.get(id).cloned() else {
            return;
        };
        let purge_at = purge_at(&self.store.meta, &h, now);
        let s = &mut self.store;
        for item in &h.items {
            incr(&mut s.stock, &format!("a:{}", item.bucket), item.quantity);
            incr(&mut s.stock, &format!("h:{}", item.bucket), -item.quantity);
            if let Some(seat) = &item.seat {
                s.seats.insert(seat.clone(), "-".into());
            }
        }
        let left = incr(&mut s.fans, &h.fan, -h.units);
        if left <= 0 {
            s.fans.remove(&h.fan);
        }
        s.deadlines.remove(id);
        s.confirming.remove(id);
        s.fanholds.remove(&format!("{}|{id}", h.fan));
        let (fan, units) = (h.fan.clone(), h.units);
        h.state = final_state;
        h.ended_ms = Some(now);
        s.holds.insert(id.to_owned(), h);
        s.done.insert(id.to_owned(), purge_at);
        self.fan_units_moved(&fan, left + units, left.max(0));
    }

    /// Held holds due by `due_by` go back to stock, at most `limit` deadlines looked at: the
    /// zset's earliest first, then the list's head while its holds' deadlines have passed.
    /// Returns how many.
    fn reclaim(&mut self, limit: i64, due_by: i64) -> i64 {
        let limit = limit.max(0) as usize;
        let mut expired = 0;
        let due: Vec<String> = zset_order(&self.store.deadlines)
            .into_iter()
            .take_while(|(_, at)| *at <= due_by)
            .take(limit)
            .map(|(id, _)| id)
            .collect();
        let mut seen = due.len();
        for id in due {
            if self.store.holds.get(&id).map(|h| h.state) == Some("held") {
                self.return_to_stock(&id, "expired");
                expired += 1;
            } else {
                self.store.deadlines.remove(&id);
            }
        }
        let mut popped = 0;
        for id in self.store.expiries.clone() {
            let hold = self.store.holds.get(&id);
            if hold.is_some_and(|h| h.expires_at_ms > due_by) || seen == limit {
                break;
            }
            seen += 1;
            popped += 1;
            if hold.map(|h| h.state) == Some("held") {
                self.return_to_stock(&id, "expired");
                expired += 1;
            }
        }
        self.store.expiries.drain(..popped);
        expired
    }

    /// Whether a deadline has passed that no reclaim has looked at yet (expire.lua's "more").
    fn reclaim_due(&self) -> bool {
        let now = self.now_ms;
        let s = &self.store;
        s.deadlines.values().any(|at| *at <= now)
            || s.expiries
                .first()
                .is_some_and(|id| s.holds.get(id).is_none_or(|h| h.expires_at_ms <= now))
    }

    /// Returns how many it purged.
    fn purge_ended(&mut self, limit: i64) -> usize {
        let now = self.now_ms;
        let gone: Vec<String> = zset_order(&self.store.done)
            .into_iter()
            .take_while(|(_, at)| *at <= now)
            .take(limit.max(0) as usize)
            .map(|(id, _)| id)
            .collect();
        let purged = gone.len();
        for id in gone {
            let answer = match self.store.holds.remove(&id) {
                Some(h) => h.answer,
                None => Some(id.clone()).filter(|id| id.starts_with(DropKeys::ANSWER_PREFIX)),
            };
            if let Some(field) = answer {
                self.store
                    .idem
                    .retain(|(fan, key), _| answer_field(fan, key) != field);
            }
            self.store.done.remove(&id);
        }
        purged
    }

    /// Whether the drop keeps its stored answers in its holds hash (lua/lib.lua), as every drop
    /// loaded by this release does; else under keys of their own.
    pub fn answers_in_holds(&self) -> bool {
        self.store.meta.get("answers").map(String::as_str) == Some("holds")
    }

    // ---- load_drop.lua ----------------------------------------------------------------------

    pub fn load_drop(&mut self) -> bool {
        if !self.store.meta.is_empty() {
            return false;
        }
        let spec = self.spec.clone();
        let meta = spec.meta_payload("open", "0");
        self.set_meta_from(&meta);
        for (b, total) in &spec.buckets {
            for (k, v) in [("a", *total), ("h", 0), ("s", 0), ("t", *total)] {
                self.store.stock.insert(format!("{k}:{b}"), v);
            }
        }
        for seat in spec.seat_ids() {
            self.store.seats.insert(seat, "-".into());
        }
        self.set_layout();
        self.store.meta.insert("run_id".into(), self.run_id.clone());
        self.store.meta.insert("answers".into(), "holds".into());
        true
    }

    fn set_meta_from(&mut self, meta: &Value) {
        for (k, v) in meta.as_object().into_iter().flatten() {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            self.store.meta.insert(k.clone(), text);
        }
    }

    fn set_layout(&mut self) {
        if let Value::Object(m) = self.spec.layout_json() {
            for (k, v) in m {
                self.store.layout.insert(k, v);
            }
        }
    }

    // ---- reserve.lua --------------------------------------------------------------------------

    fn shortage(&self, bucket: &str, want: i64) -> Option<(&'static str, Value)> {
        let avail = *self.store.stock.get(&format!("a:{bucket}")).unwrap_or(&0);
        let held = *self.store.stock.get(&format!("h:{bucket}")).unwrap_or(&0);
        if avail >= want {
            return None;
        }
        if avail == 0 && held == 0 {
            return Some(("sold_out", json!({"bucket": bucket})));
        }
        if avail == 0 {
            return Some(("all_held", json!({"bucket": bucket})));
        }
        Some((
            "insufficient_stock",
            json!({"bucket": bucket, "available": avail}),
        ))
    }

    /// The best block of `n` adjacent free seats: front row first; within the section, a block
    /// that leaves no single free seat stranded beside it, if any exists. Whole rows are read
    /// while fewer than `max_seats` have been (the first row always); later rows aren't looked at.
    fn best_available(&self, section: &str, n: i64, max_seats: usize) -> Option<Vec<String>> {
        let rows: Vec<(String, i64)> = self
            .store
            .layout
            .get(section)
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap_or_default().to_owned(),
                    r[1].as_i64().unwrap_or(0),
                )
            })
            .collect();
        let mut fallback = None;
        let mut examined = 0;
        for (label, count) in rows {
            if examined >= max_seats {
                break;
            }
            examined += count.max(0) as usize;
            let ids: Vec<String> = (1..=count)
                .map(|s| format!("{section}-{label}-{s}"))
                .collect();
            let free: Vec<bool> = ids
                .iter()
                .map(|id| self.store.seats.get(id).map(String::as_str) == Some("-"))
                .collect();
            let mut s = 0usize;
            while (s as i64) < count {
                if free[s] {
                    let mut e = s;
                    while ((e + 1) as i64) < count && free[e + 1] {
                        e += 1;
                    }
                    let spare = (e - s + 1) as i64 - n;
                    let mut off = 0;
                    while off <= spare {
                        let start = s + off as usize;
                        let block: Vec<String> = ids[start..start + n as usize].to_vec();
                        if off != 1 && spare - off != 1 {
                            return Some(block);
                        }
                        if fallback.is_none() {
                            fallback = Some(block);
                        }
                        off += 1;
                    }
                    s = e + 1;
                } else {
                    s += 1;
                }
            }
        }
        fallback
    }

    /// Returns the answer and whether it was a replay.
    /// A fan's session ends as the sessions hash has them (what their admission token carries).
    pub fn session_of(&self, fan: &str) -> Option<(i64, i64)> {
        let (shop, hard) = self.store.sessions.get(fan)?.split_once(':')?;
        Some((shop.parse().ok()?, hard.parse().ok()?))
    }

    pub fn reserve(
        &mut self,
        fan: &str,
        key: &str,
        body_sha: &str,
        hold_id: &str,
        req: &Request,
    ) -> (ReserveOut, bool) {
        let now = self.now_ms;
        let idem_key = (fan.to_owned(), key.to_owned());
        if let Some((sha, first)) = self.store.idem.get(&idem_key) {
            if sha != body_sha {
                return (refused("idempotency_key_reused", json!({})), false);
            }
            return (first.clone(), true);
        }
        if !self.store.meta.contains_key("status") {
            return (refused("unknown_drop", json!({})), false);
        }
        if self.store.meta.get("recovering").map(String::as_str) == Some("1") {
            return (refused("recovering", json!({})), false);
        }
        let limit = self.meta_num("per_fan_limit", 0);
        let ttl_ms = self.meta_num("hold_ttl_ms", 0);
        let answers_in_holds = self.answers_in_holds();
        let answer = |m: &mut Model, out: ReserveOut| {
            m.store
                .idem
                .insert(idem_key.clone(), (body_sha.to_owned(), out.clone()));
            // A refusal's stored answer in the holds hash is purged at hold TTL + 10 minutes; a
            // hold's goes with the hold's record.
            if answers_in_holds && matches!(out, ReserveOut::Refused { .. }) {
                m.store
                    .done
                    .insert(answer_field(fan, key), now + ttl_ms + 600_000);
            }
            (out, false)
        };
        if self.store.meta.get("status").map(String::as_str) != Some("open") {
            return answer(self, refused("drop_closed", json!({})));
        }
        let opens_at = self.meta_num("opens_at_ms", 0);
        if now < opens_at {
            return answer(self, refused("not_open", json!({"opens_at_ms": opens_at})));
        }
        let queue = self.store.meta.get("mode").map(String::as_str) == Some("queue");
        if queue && self.store.active.get(fan).is_none_or(|d| *d < now) {
            return (refused("not_admitted", json!({})), false);
        }
        // The fan's admission token carries the session's ends: the ones admission stored.
        let session = self.session_of(fan);
        if let Some((shop_end, _)) = session.filter(|_| queue) {
            if now >= shop_end {
                return (
                    refused("not_admitted", json!({"shop_ended_at_ms": shop_end})),
                    false,
                );
            }
        }
        // lua/lib.lua RESERVE_RECLAIM_LAG_MS: reserve leaves the freshest deadlines to the sweeper.
        let batch = self.meta_num("reclaim_batch", 8);
        self.reclaim(batch, now - 1_000);

        let (mut items, units): (Vec<Item>, i64) = match req {
            Request::Items(list) => (
                list.iter()
                    .map(|(b, q)| Item {
                        bucket: b.clone(),
                        quantity: *q as i64,
                        seat: None,
                    })
                    .collect(),
                list.iter().map(|(_, q)| *q as i64).sum(),
            ),
            Request::Seats(list) => (
                list.iter()
                    .map(|(b, s)| Item {
                        bucket: b.clone(),
                        quantity: 1,
                        seat: Some(s.clone()),
                    })
                    .collect(),
                list.len() as i64,
            ),
            Request::Best { quantity, .. } => (Vec::new(), *quantity as i64),
        };
        let bought = *self.store.fans.get(fan).unwrap_or(&0);
        if bought + units > limit {
            return answer(
                self,
                refused(
                    "limit_exceeded",
                    json!({"per_fan_limit": limit, "already": bought}),
                ),
            );
        }
        match req {
            Request::Items(_) => {
                for item in &items {
                    if let Some((code, detail)) = self.shortage(&item.bucket, item.quantity) {
                        return answer(self, refused(code, detail));
                    }
                }
            }
            Request::Seats(_) => {
                let taken: Vec<String> = items
                    .iter()
                    .filter_map(|i| i.seat.clone())
                    .filter(|s| self.store.seats.get(s).map(String::as_str) != Some("-"))
                    .collect();
                if !taken.is_empty() {
                    if let Some((code @ ("sold_out" | "all_held"), detail)) =
                        self.shortage(&items[0].bucket, 1)
                    {
                        return answer(self, refused(code, detail));
                    }
                    return answer(self, refused("seat_unavailable", json!({"seats": taken})));
                }
            }
            Request::Best {
                section,
                scan_seats_max,
                ..
            } => {
                if let Some((code, detail)) = self.shortage(section, units) {
                    return answer(self, refused(code, detail));
                }
                let Some(seats) = self.best_available(section, units, *scan_seats_max) else {
                    return answer(
                        self,
                        refused(
                            "insufficient_stock",
                            json!({"bucket": section, "adjacent": false}),
                        ),
                    );
                };
                items = seats
                    .into_iter()
                    .map(|s| Item {
                        bucket: section.clone(),
                        quantity: 1,
                        seat: Some(s),
                    })
                    .collect();
            }
        }

        let exp = now + ttl_ms;
        let s = &mut self.store;
        for item in &items {
            incr(&mut s.stock, &format!("a:{}", item.bucket), -item.quantity);
            incr(&mut s.stock, &format!("h:{}", item.bucket), item.quantity);
            if let Some(seat) = &item.seat {
                s.seats.insert(seat.clone(), hold_id.to_owned());
            }
        }
        incr(&mut s.fans, fan, units);
        s.holds.insert(
            hold_id.to_owned(),
            Hold {
                fan: fan.to_owned(),
                state: "held",
                expires_at_ms: exp,
                confirm_deadline_ms: None,
                reference: None,
                order: None,
                units,
                created_ms: now,
                items: items.clone(),
                ended_ms: None,
                answer: answers_in_holds.then(|| answer_field(fan, key)),
            },
        );
        s.expiries.push(hold_id.to_owned());
        s.fanholds.insert(format!("{fan}|{hold_id}"));
        if queue {
            let grace = num(&s.meta, "confirm_grace_ms").unwrap_or(60_000);
            let until = match session {
                Some((_, hard_end)) => (exp + grace).min(hard_end),
                None => exp + grace,
            };
            if let Some(d) = s.active.get_mut(fan) {
                *d = (*d).max(until);
            }
            if s.shopping.contains_key(fan) {
                let demand = num(&s.meta, "demand_units").unwrap_or(0);
                s.meta
                    .insert("demand_units".into(), (demand - units).to_string());
            }
        }
        answer(
            self,
            ReserveOut::Held {
                hold: hold_id.to_owned(),
                expires_at_ms: exp,
                items,
            },
        )
    }

    /// lib.lua's `recovering`: a drop being rebuilt is frozen; scripts that would write to it
    /// answer `recovering` (what changes nothing still answers as before).
    fn recovering(&self) -> bool {
        self.store.meta.get("recovering").map(String::as_str) == Some("1")
    }

    // ---- release.lua, expire.lua -----------------------------------------------------------

    /// Ok(()) for released or already ended; Err(code).
    pub fn release(&mut self, id: &str, fan: &str) -> Result<(), String> {
        let Some(h) = self.store.holds.get(id).filter(|h| h.fan == fan) else {
            return Err("unknown_hold".into());
        };
        match h.state {
            "confirming" => Err("hold_confirming".into()),
            "sold" => Err("hold_sold".into()),
            "held" if self.recovering() => Err("recovering".into()),
            "held" => {
                self.return_to_stock(id, "released");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    pub fn expire(&mut self, limit: i64) -> (i64, i64) {
        if !self.store.meta.contains_key("status") || self.recovering() {
            return (0, 0);
        }
        let expired = self.reclaim(limit, self.now_ms);
        let purged = self.purge_ended(limit);
        let more = self.reclaim_due() || purged as i64 == limit;
        (expired, more as i64)
    }

    // ---- confirm_begin / confirm_finish / confirm_revert -------------------------------------

    /// Ok("began" | "in_progress" | "sold:<order>") or Err(code).
    pub fn confirm_begin(
        &mut self,
        id: &str,
        fan: &str,
        reference: &str,
    ) -> Result<String, String> {
        let now = self.now_ms;
        let Some(h) = self.store.holds.get(id).filter(|h| h.fan == fan).cloned() else {
            return Err("unknown_hold".into());
        };
        match h.state {
            "sold" => return Ok(format!("sold:{}", h.order.clone().unwrap_or_default())),
            "confirming" if h.reference.as_deref() == Some(reference) => {
                return Ok("in_progress".into())
            }
            "confirming" => return Err("confirm_in_progress".into()),
            "released" => return Err("hold_released".into()),
            "expired" => return Err("hold_expired".into()),
            _ => {}
        }
        if self.recovering() {
            return Err("recovering".into());
        }
        if self.store.meta.get("run_id") != Some(&self.run_id) {
            self.store.meta.insert("recovering".into(), "1".into());
            return Err("recovering".into());
        }
        if now >= h.expires_at_ms {
            self.return_to_stock(id, "expired");
            return Err("hold_expired".into());
        }
        let timeout = self.meta_num("confirm_timeout_ms", 60_000);
        let mut h = h;
        h.state = "confirming";
        h.reference = Some(reference.to_owned());
        h.confirm_deadline_ms = Some(now + timeout);
        self.store.holds.insert(id.to_owned(), h);
        self.store.deadlines.remove(id);
        self.store.confirming.insert(id.to_owned(), now + timeout);
        Ok("began".into())
    }

    /// "sold" | "already" | "ended" | "unknown" | "recovering"
    pub fn confirm_finish(&mut self, id: &str, order: &str) -> &'static str {
        let now = self.now_ms;
        let Some(mut h) = self.store.holds.get(id).cloned() else {
            return "unknown";
        };
        match h.state {
            "sold" => return "already",
            "confirming" | "held" => {}
            _ => return "ended",
        }
        if self.recovering() {
            return "recovering";
        }
        let purge_at = purge_at(&self.store.meta, &h, now);
        let limit = self.meta_num("per_fan_limit", 0);
        let s = &mut self.store;
        for item in &h.items {
            incr(&mut s.stock, &format!("h:{}", item.bucket), -item.quantity);
            incr(&mut s.stock, &format!("s:{}", item.bucket), item.quantity);
            if let Some(seat) = &item.seat {
                s.seats.insert(seat.clone(), "#".into());
            }
        }
        s.deadlines.remove(id);
        s.confirming.remove(id);
        s.fanholds.remove(&format!("{}|{id}", h.fan));
        h.state = "sold";
        h.order = Some(order.to_owned());
        h.ended_ms = Some(now);
        let fan = h.fan.clone();
        s.holds.insert(id.to_owned(), h);
        s.done.insert(id.to_owned(), purge_at);
        let prefix = format!("{fan}|");
        if limit > 0
            && *s.fans.get(&fan).unwrap_or(&0) >= limit
            && !s.fanholds.iter().any(|m| m.starts_with(&prefix))
        {
            s.active.remove(&fan);
            s.shopping.remove(&fan);
        }
        "sold"
    }

    /// "held" | "expired" | "noop" | "unknown" | "recovering"
    pub fn confirm_revert(&mut self, id: &str, reference: &str) -> &'static str {
        let Some(mut h) = self.store.holds.get(id).cloned() else {
            return "unknown";
        };
        if h.state != "confirming" || h.reference.as_deref().unwrap_or("") != reference {
            return "noop";
        }
        if self.recovering() {
            return "recovering";
        }
        if self.now_ms >= h.expires_at_ms {
            self.return_to_stock(id, "expired");
            return "expired";
        }
        h.state = "held";
        h.confirm_deadline_ms = None;
        h.reference = None;
        let exp = h.expires_at_ms;
        self.store.holds.insert(id.to_owned(), h);
        self.store.confirming.remove(id);
        self.store.deadlines.insert(id.to_owned(), exp);
        "held"
    }

    // ---- Postgres' side ----------------------------------------------------------------------

    /// The order of a confirming hold commits in Postgres, unless Postgres' constraints refuse it
    /// (a seat sold twice, more units than the total, a fan past the limit, one order per hold).
    /// Returns whether it committed.
    pub fn commit(&mut self, id: &str, order: &str) -> bool {
        let Some(h) = self.store.holds.get(id).filter(|h| h.state == "confirming") else {
            return false;
        };
        if self.record.orders.contains_key(id) {
            return false;
        }
        let sold_seats: BTreeSet<String> = self.record.sold_seats().into_iter().collect();
        let seat_taken = h
            .items
            .iter()
            .any(|i| i.seat.as_ref().is_some_and(|s| sold_seats.contains(s)));
        let over_total = h.items.iter().any(|i| {
            self.record.sold(&i.bucket) + i.quantity > self.record.total(&self.spec, &i.bucket)
        });
        let over_limit = self.record.bought().get(&h.fan).copied().unwrap_or(0) + h.units
            > self.spec.per_fan_limit;
        if seat_taken || over_total || over_limit {
            return false;
        }
        self.record.orders.insert(
            id.to_owned(),
            (order.to_owned(), h.fan.clone(), h.items.clone()),
        );
        true
    }

    // ---- restock.lua (after Postgres' restock) ------------------------------------------------

    /// Postgres adds `add` units to a bucket's total (the engine's db `restock`, with its ledger
    /// line); returns the total after, which the script then raises Redis to.
    pub fn restock_record(&mut self, bucket: &str, add: i64) -> i64 {
        *self.record.restocked.entry(bucket.to_owned()).or_insert(0) += add;
        self.record.total(&self.spec, bucket)
    }

    /// Raises a bucket's total and available to `target`: Ok((total, available)) or Err(code).
    pub fn restock(&mut self, bucket: &str, target: i64) -> Result<(i64, i64), String> {
        // A bucket missing from Redis: the drop was lost, and its rebuild is due.
        let Some(total) = self.store.stock.get(&format!("t:{bucket}")).copied() else {
            return Err("recovering".into());
        };
        if self.recovering() {
            return Err("recovering".into());
        }
        let a = format!("a:{bucket}");
        let mut available = self.store.stock.get(&a).copied().unwrap_or(0);
        if target > total {
            available += target - total;
            self.store.stock.insert(a, available);
            self.store.stock.insert(format!("t:{bucket}"), target);
            return Ok((target, available));
        }
        Ok((total, available))
    }

    // ---- refund.lua (after Postgres recorded the refund) ----------------------------------

    /// Postgres records refund `refund_id` of the order of `hold` (the engine's db
    /// `record_refund`): everything the order has left, or with `part` one unit of its first
    /// item left. Its marker, when Postgres has it (recorded now or before); `None` when the
    /// hold has no order or nothing is left to refund.
    pub fn refund_record(&mut self, hold: &str, refund_id: &str, part: bool) -> Option<String> {
        let (order, fan, _) = self.record.orders.get(hold)?.clone();
        let marker = format!("{order}|{refund_id}");
        if self.record.refunds.contains_key(&marker) {
            return Some(marker);
        }
        let mut items = self.record.unrefunded(hold);
        if items.is_empty() {
            return None;
        }
        if part {
            items.truncate(1);
            items[0].quantity = 1;
        }
        self.record
            .refunds
            .insert(marker.clone(), (hold.to_owned(), fan, items));
        Some(marker)
    }

    /// lua/refund.lua: the recorded refund `marker`'s units back to stock, once.
    /// Ok("returned <status>") | Ok("already") | Err(code).
    pub fn refund_return(&mut self, marker: &str) -> Result<String, String> {
        if self.store.refunds.contains(marker) {
            return Ok("already".into());
        }
        let Some(status) = self.store.meta.get("status").cloned() else {
            return Err("recovering".into());
        };
        if self.recovering() {
            return Err("recovering".into());
        }
        let (hold, fan, items) = self
            .record
            .refunds
            .get(marker)
            .cloned()
            .ok_or("no refund")?;
        match self.store.holds.get(&hold).map(|h| h.state) {
            // Live: its confirm finishes (or it expires) first.
            Some("held" | "confirming") => return Err("hold_not_sold".into()),
            // Ended unsold while Postgres has its order: Redis hasn't the sale.
            Some(state) if state != "sold" => return Err("out_of_step".into()),
            _ => {}
        }
        let mut per_bucket: BTreeMap<&str, i64> = BTreeMap::new();
        for i in &items {
            *per_bucket.entry(&i.bucket).or_insert(0) += i.quantity;
            if let Some(seat) = &i.seat {
                if self.store.seats.get(seat).map(String::as_str) != Some("#") {
                    return Err("out_of_step".into());
                }
            }
        }
        for (b, q) in &per_bucket {
            if self
                .store
                .stock
                .get(&format!("s:{b}"))
                .copied()
                .unwrap_or(0)
                < *q
            {
                return Err("out_of_step".into());
            }
        }
        let s = &mut self.store;
        let mut units = 0;
        for i in &items {
            incr(&mut s.stock, &format!("s:{}", i.bucket), -i.quantity);
            incr(&mut s.stock, &format!("a:{}", i.bucket), i.quantity);
            if let Some(seat) = &i.seat {
                s.seats.insert(seat.clone(), "-".into());
            }
            units += i.quantity;
        }
        let left = incr(&mut s.fans, &fan, -units);
        if left <= 0 {
            s.fans.remove(&fan);
        }
        s.refunds.insert(marker.to_owned());
        self.fan_units_moved(&fan, left + units, left.max(0));
        Ok(format!("returned {status}"))
    }

    /// Ops change admission settings: Postgres, then Redis' admission hash (recovery writes
    /// Postgres' settings back into Redis before it rebuilds).
    pub fn set_admission(&mut self, fields: &[(String, String)]) {
        for (k, v) in fields {
            self.record.admission.insert(k.clone(), v.clone());
            self.store.admission.insert(k.clone(), v.clone());
        }
    }

    pub fn restore_admission(&mut self) {
        for (k, v) in self.record.admission.clone() {
            self.store.admission.insert(k, v);
        }
    }

    /// The seller closes the drop: Postgres first, then Redis' meta.
    pub fn close(&mut self) {
        self.record.status = "closed".into();
        if !self.record.archived {
            self.store.meta.insert("status".into(), "closed".into());
        }
    }

    // ---- archive.lua ------------------------------------------------------------------------

    /// Ok("archived") once every key of the drop is gone (but its idempotency keys, which
    /// expire by themselves); Err(code) while it is open, being rebuilt, or holds anything.
    pub fn archive(&mut self) -> Result<String, String> {
        let meta = &self.store.meta;
        if meta.get("status").is_some_and(|s| s != "closed") {
            return Err("open".into());
        }
        if meta.contains_key("rebuild_token") {
            return Err("rebuilding".into());
        }
        let s = &self.store.stock;
        if s.iter().any(|(k, v)| k.starts_with("h:") && *v != 0) {
            return Err("live_holds".into());
        }
        // Stored answers in keys of their own outlive the drop's keys (they expire by themselves);
        // those in the holds hash go with it.
        let mut idem = std::mem::take(&mut self.store.idem);
        if self.answers_in_holds() {
            idem.clear();
        }
        self.store = Store {
            idem,
            ..Store::default()
        };
        self.record.archived = true;
        Ok("archived".into())
    }

    // ---- rebuild.lua ------------------------------------------------------------------------

    /// Returns (live holds kept, holds ended).
    pub fn rebuild(&mut self) -> (i64, i64) {
        let now = self.now_ms;
        let spec = self.spec.clone();
        let meta = spec.meta_payload(&self.record.status, "1");
        let was_closed = self.store.meta.get("status").map(String::as_str) == Some("closed");
        if !self.store.meta.contains_key("status") {
            self.store.meta.insert("answers".into(), "holds".into());
        }
        self.set_meta_from(&meta);
        if was_closed {
            self.store.meta.insert("status".into(), "closed".into());
        }
        self.set_layout();
        let s = &mut self.store;
        // rebuild.lua drops what the holds decide and counts it afresh from them; admission's
        // running sum too (the next admission run counts it).
        s.shopping.clear();
        s.meta.remove("demand_units");
        s.seats.clear();
        s.fans.clear();
        s.fanholds.clear();
        s.deadlines.clear();
        s.expiries.clear();
        s.confirming.clear();
        for seat in spec.seat_ids() {
            s.seats.insert(seat, "-".into());
        }
        for seat in self.record.sold_seats() {
            s.seats.insert(seat, "#".into());
        }
        // Every refund Postgres recorded is counted as returned (sold above is net of it).
        for marker in self.record.refunds.keys() {
            s.refunds.insert(marker.clone());
        }
        let finish_ended = |s: &mut Store, id: &str, mut h: Hold, state: &'static str| {
            h.state = state;
            h.ended_ms = Some(now);
            s.done.insert(id.to_owned(), purge_at(&s.meta, &h, now));
            s.holds.insert(id.to_owned(), h);
            s.deadlines.remove(id);
            s.confirming.remove(id);
        };
        let mut live: Vec<(String, Hold)> = Vec::new();
        let mut ended = 0;
        for (id, h) in s.holds.clone() {
            if let Some((order, _, _)) = self.record.orders.get(&id) {
                if h.state != "sold" {
                    let mut h = h;
                    h.order = Some(order.clone());
                    finish_ended(s, &id, h, "sold");
                }
            } else if h.state == "held" && h.expires_at_ms <= now {
                finish_ended(s, &id, h, "expired");
                ended += 1;
            } else if h.state == "held" || h.state == "confirming" {
                live.push((id, h));
            } else if h.state == "sold" {
                let mut h = h;
                h.state = "confirming";
                h.confirm_deadline_ms = Some(now);
                h.order = None;
                s.holds.insert(id.clone(), h.clone());
                s.done.remove(&id);
                live.push((id, h));
            }
        }
        live.sort_by(|x, y| {
            x.1.created_ms
                .cmp(&y.1.created_ms)
                .then_with(|| x.0.cmp(&y.0))
        });
        let mut room: BTreeMap<String, i64> = BTreeMap::new();
        let mut held: BTreeMap<String, i64> = BTreeMap::new();
        for (b, _) in &spec.buckets {
            room.insert(b.clone(), self.record.total(&spec, b) - self.record.sold(b));
            held.insert(b.clone(), 0);
        }
        let limit = spec.per_fan_limit;
        let mut fan_units = self.record.bought();
        let mut kept = 0;
        for (id, h) in live {
            let mut fits = fan_units.get(&h.fan).copied().unwrap_or(0) + h.units <= limit;
            let mut need: BTreeMap<String, i64> = BTreeMap::new();
            for item in &h.items {
                *need.entry(item.bucket.clone()).or_insert(0) += item.quantity;
                if let Some(seat) = &item.seat {
                    if s.seats.get(seat).map(String::as_str) != Some("-") {
                        fits = false;
                    }
                }
            }
            for (b, q) in &need {
                if room.get(b).copied().unwrap_or(0) < *q {
                    fits = false;
                }
            }
            if fits {
                for (b, q) in &need {
                    *room.get_mut(b).expect("every bucket has room") -= q;
                    *held.get_mut(b).expect("every bucket has held") += q;
                }
                for item in &h.items {
                    if let Some(seat) = &item.seat {
                        s.seats.insert(seat.clone(), id.clone());
                    }
                }
                *fan_units.entry(h.fan.clone()).or_insert(0) += h.units;
                s.fanholds.insert(format!("{}|{id}", h.fan));
                if h.state == "held" {
                    s.deadlines.insert(id.clone(), h.expires_at_ms);
                } else {
                    s.confirming
                        .insert(id.clone(), h.confirm_deadline_ms.unwrap_or(now));
                }
                kept += 1;
            } else {
                finish_ended(s, &id, h, "expired");
                ended += 1;
            }
        }
        for (fan, units) in fan_units {
            s.fans.insert(fan, units);
        }
        for (b, _) in &spec.buckets {
            s.stock.insert(format!("a:{b}"), room[b]);
            s.stock.insert(format!("h:{b}"), held[b]);
            s.stock.insert(format!("s:{b}"), self.record.sold(b));
            s.stock
                .insert(format!("t:{b}"), self.record.total(&spec, b));
        }
        s.meta.insert("recovering".into(), "0".into());
        s.meta.insert("run_id".into(), self.run_id.clone());
        (kept, ended)
    }

    // ---- join.lua ---------------------------------------------------------------------------

    /// Ok((place, new, status)) or Err(status the wrapper turns into an error).
    /// join.lua; `returning` what the fan's page presents (receipt, admission token).
    pub fn join(
        &mut self,
        fan: &str,
        prequeue_score: i64,
        returning: &Returning,
    ) -> Result<(i64, bool, String), String> {
        let now = self.now_ms;
        let limit = self.meta_num("per_fan_limit", 0);
        let rebuilt = num(&self.store.meta, "line_rebuilt_ms");
        let Some(status) = self.store.meta.get("status").cloned() else {
            return Err("unknown_drop".into());
        };
        let opens_at = self.meta_num("opens_at_ms", 0);
        if self.store.meta.get("recovering").map(String::as_str) == Some("1") {
            return Err("recovering".into());
        }
        if self.store.meta.get("mode").map(String::as_str) != Some("queue") {
            return Err("not_queue".into());
        }
        let line_state = self.store.admission.get("line_state").cloned();
        let sold_out = line_state.as_deref() == Some("sold_out");
        // After opening, a place in the line is on the waiting list once the line became one.
        let in_line = if line_state.as_deref() == Some("waitlist") {
            "waitlisted"
        } else {
            "waiting"
        };
        let s = &mut self.store;
        if let Some(place) = s.places.get(fan).copied() {
            let mut st = if s.active.get(fan).is_some_and(|d| *d >= now) {
                "admitted"
            } else if s.line.contains_key(fan) {
                if now < opens_at {
                    "pre_queue"
                } else {
                    in_line
                }
            } else {
                "done"
            };
            if st == "waiting" || st == "waitlisted" || st == "pre_queue" {
                s.seen.insert(fan.to_owned(), now);
                if status == "closed" {
                    st = "closed";
                }
                if sold_out {
                    st = "sold_out";
                }
            }
            return Ok((place, false, st.into()));
        }
        if status == "closed" {
            return Ok((0, false, "closed".into()));
        }
        if sold_out {
            return Ok((0, false, "sold_out".into()));
        }
        if let Some(rebuilt) = rebuilt {
            if let Some((place, iat, shop_end, hard_end)) = returning
                .admitted
                .map(|(p, i, e)| (p, i, e.shop_end_ms, e.hard_end_ms))
            {
                if iat < rebuilt && now < shop_end {
                    s.places.insert(fan.to_owned(), place);
                    let d = s.active.entry(fan.to_owned()).or_insert(shop_end);
                    *d = (*d).max(shop_end);
                    s.sessions
                        .insert(fan.to_owned(), format!("{shop_end}:{hard_end}"));
                    if let Some(demand) = num(&s.meta, "demand_units") {
                        if s.shopping.insert(fan.to_owned(), shop_end).is_none() {
                            let take = limit_or_1(&s.meta) - s.fans.get(fan).copied().unwrap_or(0);
                            if take > 0 {
                                s.meta
                                    .insert("demand_units".into(), (demand + take).to_string());
                            }
                        }
                    }
                    return Ok((place, false, "admitted".into()));
                }
            }
            let grace_ms = s
                .admission
                .get("leave_grace_s")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(120.0) as i64
                * 1000;
            if let Some((place, iat)) = returning.receipt {
                if iat < rebuilt && iat >= rebuilt - 2 * grace_ms {
                    let bought = s.fans.get(fan).copied().unwrap_or(0);
                    if limit > 0 && bought >= limit {
                        return Ok((0, false, "done".into()));
                    }
                    s.places.insert(fan.to_owned(), place);
                    if place <= s.watermark.get("place").copied().unwrap_or(0) {
                        return Ok((place, false, "done".into()));
                    }
                    s.line.insert(fan.to_owned(), place);
                    s.seen.insert(fan.to_owned(), now);
                    let st = if now < opens_at { "pre_queue" } else { in_line };
                    return Ok((place, false, st.into()));
                }
            }
        }
        let (place, st) = if now < opens_at {
            (prequeue_score, "pre_queue")
        } else {
            s.seq += 1;
            (POST_OPEN_BASE + s.seq, in_line)
        };
        s.places.insert(fan.to_owned(), place);
        s.line.insert(fan.to_owned(), place);
        s.seen.insert(fan.to_owned(), now);
        Ok((place, true, st.into()))
    }

    /// queue-server's presence refresh: waiters still in `seen` are seen now.
    /// line_restore.lua, as recovery runs it for a queue drop (before the rebuild stamps this
    /// run): true if it restored the line. A line is restored when its counter is gone (and a
    /// mark was kept), or when the drop's data is from another redis-server run (its tail may be
    /// lost though the counter is there): the counter goes above both it and its mark, the
    /// watermark to the higher of Redis' and the kept one.
    pub fn restore_line(&mut self, margin: i64, returning_ms: i64) -> bool {
        let now = self.now_ms;
        let (seq, place, admitted) = self.record.line_marks;
        let same_run = self.store.meta.get("run_id") == Some(&self.run_id);
        let s = &mut self.store;
        // A counter of 0 is no counter: INCR and this script only ever set it above 0.
        let has_seq = s.seq != 0;
        if s.meta.is_empty()
            || (has_seq && same_run)
            || (!has_seq && (seq, place, admitted) == (0, 0, 0))
        {
            return false;
        }
        s.seq = s.seq.max(seq) + margin;
        let wm = |w: &BTreeMap<String, i64>, f: &str| w.get(f).copied().unwrap_or(0);
        let (wm_place, wm_admitted) = (wm(&s.watermark, "place"), wm(&s.watermark, "admitted"));
        s.watermark.insert("place".into(), wm_place.max(place));
        s.watermark
            .insert("admitted".into(), wm_admitted.max(admitted));
        s.meta.insert("line_rebuilt_ms".into(), now.to_string());
        s.meta.insert(
            "line_returning_until_ms".into(),
            (now + returning_ms).to_string(),
        );
        true
    }

    /// queue-server after an admission run: raises the kept marks to the run's (never lowers).
    pub fn keep_marks(&mut self, t: &TickOut) {
        let m = &mut self.record.line_marks;
        *m = (
            m.0.max(t.seq),
            m.1.max(t.watermark),
            m.2.max(t.admitted_total),
        );
    }

    pub fn touch(&mut self, fans: &[String]) {
        for f in fans {
            if let Some(at) = self.store.seen.get_mut(f) {
                *at = self.now_ms;
            }
        }
    }

    // ---- admit.lua --------------------------------------------------------------------------

    pub fn admit(&mut self, leave_batch: i64, admit_batch: i64) -> TickOut {
        let now = self.now_ms;
        let s = &mut self.store;
        let mut watermark = s.watermark.get("place").copied().unwrap_or(0);
        let mut admitted_ever = s.watermark.get("admitted").copied().unwrap_or(0);
        let setting = |k: &str| s.admission.get(k).and_then(|v| v.parse::<f64>().ok());
        let rate = setting("rate_per_s").unwrap_or(0.0);
        let grace_ms = setting("leave_grace_s").unwrap_or(120.0) as i64 * 1000;
        let burst = setting("burst").unwrap_or(0.0);
        let max_active = setting("max_active").unwrap_or(0.0) as i64;
        let paused = s.admission.get("paused").map(String::as_str) == Some("1");
        let shop_window_s = setting("shop_window_s").unwrap_or(300.0) as i64;
        let mut margin = setting("admit_margin_pct").unwrap_or(0.0) as i64;
        let offer_window_s = setting("offer_window_s").unwrap_or(120.0) as i64;
        let waitlist_on = s.admission.get("waitlist").map(String::as_str) == Some("1");
        let line_sold_out = s.admission.get("line_state").map(String::as_str) == Some("sold_out");
        let mut waitlisted = s.admission.get("line_state").map(String::as_str) == Some("waitlist");
        let mut left = 0;
        let tick =
            |s: &Store, state: &str, active: i64, admitted: Vec<(String, i64)>, w, a, left| {
                TickOut {
                    state: state.into(),
                    watermark: w,
                    admitted_total: a,
                    waiting: s.line.len() as i64,
                    active,
                    left,
                    session: (0, 0),
                    seq: s.seq,
                    came_back: num(&s.admission, "came_back_units").unwrap_or(0),
                    admitted,
                }
            };
        let Some(status) = s.meta.get("status").cloned() else {
            return tick(s, "unknown_drop", 0, vec![], watermark, admitted_ever, 0);
        };
        let last_run = s.bucket.get("run_ms").map(|v| *v as i64);
        let mut quiet_until = s.bucket.get("quiet_until_ms").map_or(0, |v| *v as i64);
        let mut cutoff = s.bucket.get("quiet_cutoff_ms").map(|v| *v as i64);
        if let Some(last) = last_run {
            if (now - last) as f64 > grace_ms as f64 / 4.0 {
                quiet_until = now + grace_ms;
                cutoff = Some(last - grace_ms);
                s.bucket.insert("quiet_until_ms".into(), quiet_until as f64);
                s.bucket
                    .insert("quiet_cutoff_ms".into(), (last - grace_ms) as f64);
            }
        }
        s.bucket.insert("run_ms".into(), now as f64);
        let returning_until = num(&s.meta, "line_returning_until_ms").unwrap_or(0);
        if s.meta.get("recovering").map(String::as_str) == Some("1") || now < returning_until {
            return tick(s, "recovering", 0, vec![], watermark, admitted_ever, 0);
        }
        let cutoff = match cutoff {
            Some(c) if now < quiet_until => c,
            _ => now - grace_ms,
        };
        let gone: Vec<String> = zset_order(&s.seen)
            .into_iter()
            .take_while(|(_, at)| *at < cutoff)
            .take(leave_batch.max(0) as usize)
            .map(|(f, _)| f)
            .collect();
        for fan in gone {
            s.seen.remove(&fan);
            if s.line.remove(&fan).is_some() {
                s.places.remove(&fan);
                left += 1;
            }
        }
        let ended: Vec<String> = zset_order(&s.active)
            .into_iter()
            .take_while(|(_, d)| *d < now)
            .take(leave_batch.max(1) as usize)
            .map(|(f, _)| f)
            .collect();
        for fan in ended {
            s.active.remove(&fan);
            s.sessions.remove(&fan);
        }
        let active = s.active.values().filter(|d| **d >= now).count() as i64;
        let lapsed: Vec<String> = zset_order(&s.offers)
            .into_iter()
            .take_while(|(_, end)| *end < now)
            .take(leave_batch.max(1) as usize)
            .map(|(f, _)| f)
            .collect();
        for fan in lapsed {
            s.offers.remove(&fan);
        }
        // The running sum: counted afresh when absent, else fans whose shop end came leave it.
        let limit = limit_or_1(&s.meta);
        let units_of = |s: &Store, f: &str| s.fans.get(f).copied().unwrap_or(0);
        let shop_end_of = |s: &Store, f: &str| {
            s.sessions
                .get(f)
                .and_then(|v| v.split_once(':'))
                .and_then(|(shop, _)| shop.parse::<i64>().ok())
        };
        // A sum that can't be right is counted afresh, like a missing one (see admit.lua).
        let demand_now =
            num(&s.meta, "demand_units").filter(|d| !(*d < 0 || (*d > 0 && s.shopping.is_empty())));
        let mut demand = match demand_now {
            None => {
                s.shopping.clear();
                let mut demand = 0;
                let fans: Vec<String> = s
                    .active
                    .iter()
                    .filter(|(_, d)| **d >= now)
                    .map(|(f, _)| f.clone())
                    .collect();
                for f in fans {
                    if let Some(shop) = shop_end_of(s, &f).filter(|shop| now < *shop) {
                        demand += can_take(limit, units_of(s, &f));
                        s.shopping.insert(f, shop);
                    }
                }
                s.meta.insert("demand_units".into(), demand.to_string());
                demand
            }
            Some(mut demand) => {
                let due: Vec<String> = zset_order(&s.shopping)
                    .into_iter()
                    .take_while(|(_, shop)| *shop <= now)
                    .take(leave_batch.max(1) as usize)
                    .map(|(f, _)| f)
                    .collect();
                for f in due {
                    demand -= can_take(limit, units_of(s, &f));
                    s.shopping.remove(&f);
                }
                s.meta.insert("demand_units".into(), demand.to_string());
                demand
            }
        };
        // With no counted fan's shop end left behind, the sum is what admission used to count
        // on every run: over the active fans before their shop end.
        if s.shopping.values().all(|shop| *shop > now) {
            let counted: i64 = s
                .active
                .iter()
                .filter(|(f, d)| **d >= now && shop_end_of(s, f).is_none_or(|end| now < end))
                .map(|(f, _)| can_take(limit, units_of(s, f)))
                .sum();
            assert_eq!(
                demand, counted,
                "admission's running sum against a count over the active fans"
            );
        }
        // Every answer before the bucket is read admits no one and moves no watermark.
        let early =
            |s: &Store, state: &str| tick(s, state, active, vec![], watermark, admitted_ever, left);
        if status == "closed" {
            return early(s, "closed");
        }
        if line_sold_out {
            return early(s, "sold_out");
        }
        let (mut available, mut held) = (0, 0);
        for (k, v) in &s.stock {
            if k.starts_with("a:") {
                available += v;
            } else if k.starts_with("h:") {
                held += v;
            }
        }
        if available == 0 && held == 0 && !waitlisted {
            if !waitlist_on {
                s.admission.insert("line_state".into(), "sold_out".into());
                return early(s, "sold_out");
            }
            waitlisted = true;
            s.admission.insert("line_state".into(), "waitlist".into());
            s.admission.insert("came_back_units".into(), "0".into());
            s.admission.insert("free_units_seen".into(), "0".into());
        }
        if waitlisted {
            let (free, seen) = (
                available + held,
                num(&s.admission, "free_units_seen").unwrap_or(0),
            );
            if free != seen {
                let mut came_back = num(&s.admission, "came_back_units").unwrap_or(0);
                if free > seen {
                    came_back += free - seen;
                }
                s.admission
                    .insert("free_units_seen".into(), free.to_string());
                s.admission
                    .insert("came_back_units".into(), came_back.to_string());
            }
            margin = 0;
        }
        let (mut tokens, mut last) = match (s.bucket.get("tokens"), s.bucket.get("last_ms")) {
            (Some(t), Some(l)) => (*t, *l as i64),
            _ => (burst, now),
        };
        let elapsed = (now - last).max(0);
        tokens = burst.min(tokens + elapsed as f64 * rate / 1000.0);
        last = last.max(now);
        let save_bucket = |s: &mut Store, tokens: f64| {
            s.bucket.insert("tokens".into(), six_places(tokens));
            s.bucket.insert("last_ms".into(), last as f64);
        };
        let opens_at = num(&s.meta, "opens_at_ms").unwrap_or(0);
        let state = if paused {
            "paused"
        } else if now < opens_at {
            "pre_queue"
        } else if waitlisted {
            "waitlist"
        } else if available == 0 {
            "all_held"
        } else {
            "open"
        };
        if (state != "open" && state != "waitlist") || available == 0 {
            save_bucket(s, tokens);
            return tick(s, state, active, vec![], watermark, admitted_ever, left);
        }
        let mut n = tokens.floor() as i64;
        n = n.min(max_active - active);
        n = n.min(s.line.len() as i64);
        n = n.min(admit_batch.max(1));
        if n > 0 {
            let room = available * (100 + margin) - demand * 100;
            let by_stock = if room > 0 { room / (limit * 100) } else { 0 };
            n = n.min(by_stock);
        }
        if n <= 0 {
            save_bucket(s, tokens);
            return tick(s, state, active, vec![], watermark, admitted_ever, left);
        }
        let popped: Vec<(String, i64)> = zset_order(&s.line).into_iter().take(n as usize).collect();
        let shop_end = now
            + if waitlisted {
                offer_window_s
            } else {
                shop_window_s
            } * 1000;
        let hard_end = shop_end
            + num(&s.meta, "hold_ttl_ms").unwrap_or(0)
            + num(&s.meta, "confirm_grace_ms").unwrap_or(60_000);
        for (fan, place) in &popped {
            s.line.remove(fan);
            s.active.insert(fan.clone(), shop_end);
            s.sessions
                .insert(fan.clone(), format!("{shop_end}:{hard_end}"));
            if s.shopping.insert(fan.clone(), shop_end).is_none() {
                demand += can_take(limit, units_of(s, fan));
            }
            s.seen.remove(fan);
            if waitlisted {
                s.offers.insert(fan.clone(), shop_end);
            }
            watermark = watermark.max(*place);
        }
        s.meta.insert("demand_units".into(), demand.to_string());
        let count = popped.len() as i64;
        tokens -= count as f64;
        admitted_ever += count;
        save_bucket(s, tokens);
        s.watermark.insert("place".into(), watermark);
        s.watermark.insert("admitted".into(), admitted_ever);
        let mut out = tick(
            s,
            state,
            active + count,
            popped,
            watermark,
            admitted_ever,
            left,
        );
        out.session = (shop_end, hard_end);
        out
    }
}

/// The holds-hash field of a fan's stored answer for `key` (engine::keys).
pub fn answer_field(fan: &str, key: &str) -> String {
    DropKeys::answer_field(&FanId::parse(fan).expect("a fan id"), key)
}

/// When a hold ending at `now` is purged (lua/lib.lua `purge_at`): `done_ttl_ms` after it ended,
/// and not before its stored answer's window (hold TTL + 10 minutes after it was made) if it has
/// one.
fn purge_at(meta: &BTreeMap<String, String>, h: &Hold, now: i64) -> i64 {
    let at = now + num(meta, "done_ttl_ms").unwrap_or(3_600_000);
    match h.answer {
        Some(_) => at.max(h.created_ms + num(meta, "hold_ttl_ms").unwrap_or(0) + 600_000),
        None => at,
    }
}
