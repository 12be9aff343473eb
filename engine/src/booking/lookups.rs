//! What keeps a flood of made-up drop ids away from Postgres: the drop ids Postgres didn't know,
//! remembered for `drops.unknown_ttl_ms` (at most `drops.unknown_cache_entries`, the oldest
//! forgotten first), and a token bucket over the reads of drops this process hasn't cached
//! (`drops.lookups_per_s`, `drops.lookup_burst`). The first answers every repeat of an id without
//! a query; the second bounds the queries that new ids cost, however many addresses send them.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::config::DropsConfig;
use crate::ids::DropId;

pub(super) struct Lookups {
    ttl: Duration,
    max_unknown: usize,
    /// Unknown drop id → when it stops being believed.
    unknown: HashMap<DropId, Instant>,
    /// The same entries in the order they were made, which is the order they expire in (one
    /// TTL for all): forgetting the expired or oldest ones costs no scan.
    order: VecDeque<(Instant, DropId)>,
    per_s: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl Lookups {
    pub(super) fn new(cfg: &DropsConfig) -> Lookups {
        Lookups {
            ttl: Duration::from_millis(cfg.unknown_ttl_ms),
            max_unknown: cfg.unknown_cache_entries,
            unknown: HashMap::new(),
            order: VecDeque::new(),
            per_s: f64::from(cfg.lookups_per_s),
            burst: f64::from(cfg.lookup_burst),
            tokens: f64::from(cfg.lookup_burst),
            refilled: Instant::now(),
        }
    }

    /// Whether `drop` was unknown to Postgres less than a TTL ago.
    pub(super) fn is_unknown(&self, drop: &DropId) -> bool {
        self.unknown
            .get(drop)
            .is_some_and(|until| Instant::now() < *until)
    }

    /// Remembers that Postgres doesn't know `drop`.
    pub(super) fn unknown(&mut self, drop: &DropId) {
        let now = Instant::now();
        self.forget(now);
        if self.max_unknown == 0 {
            return;
        }
        while self.unknown.len() >= self.max_unknown {
            let Some((_, oldest)) = self.order.pop_front() else {
                break;
            };
            self.unknown.remove(&oldest);
        }
        let until = now + self.ttl;
        self.unknown.insert(drop.clone(), until);
        self.order.push_back((until, drop.clone()));
    }

    /// `drop` exists now (this process just created it).
    pub(super) fn known(&mut self, drop: &DropId) {
        self.unknown.remove(drop);
    }

    /// Takes one Postgres read from the bucket; false when it's empty.
    pub(super) fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f64() * self.per_s;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until the bucket holds a read again.
    pub(super) fn wait(&self) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens) / self.per_s.max(f64::MIN_POSITIVE)).max(0.0))
    }

    /// Drops the expired entries from the front of `order` (and from `unknown`, unless the id
    /// was remembered again since: then its newer entry stays).
    fn forget(&mut self, now: Instant) {
        while let Some((until, _)) = self.order.front() {
            if *until > now {
                break;
            }
            if let Some((until, drop)) = self.order.pop_front() {
                if self.unknown.get(&drop) == Some(&until) {
                    self.unknown.remove(&drop);
                }
            }
        }
        // Entries removed by `known` or re-inserted leave stale twins in `order`; they go as
        // they reach the front, and this keeps `order` within twice the map's bound.
        if self.order.len() > 2 * self.max_unknown.max(1) {
            let unknown = &self.unknown;
            self.order
                .retain(|(until, drop)| unknown.get(drop) == Some(until));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ttl_ms: u64, entries: usize, per_s: u32, burst: u32) -> DropsConfig {
        DropsConfig {
            unknown_ttl_ms: ttl_ms,
            unknown_cache_entries: entries,
            lookups_per_s: per_s,
            lookup_burst: burst,
            ..DropsConfig::default()
        }
    }

    fn id(n: u32) -> DropId {
        DropId::parse(&format!("d{n:016x}")).unwrap()
    }

    #[test]
    fn an_unknown_id_is_remembered_for_the_ttl_and_a_created_one_at_once_forgotten() {
        let mut l = Lookups::new(&cfg(60_000, 10, 1, 1));
        l.unknown(&id(1));
        assert!(l.is_unknown(&id(1)));
        assert!(!l.is_unknown(&id(2)));
        l.known(&id(1));
        assert!(!l.is_unknown(&id(1)));

        let mut l = Lookups::new(&cfg(0, 10, 1, 1));
        l.unknown(&id(1));
        assert!(!l.is_unknown(&id(1)), "a TTL of 0 remembers nothing");
    }

    #[test]
    fn unknown_ids_stay_within_their_bound_oldest_forgotten_first() {
        let mut l = Lookups::new(&cfg(60_000, 100, 1, 1));
        for n in 0..10_000 {
            l.unknown(&id(n));
            assert!(l.unknown.len() <= 100);
            assert!(l.order.len() <= 200);
        }
        assert!(l.is_unknown(&id(9_999)));
        assert!(!l.is_unknown(&id(0)));
    }

    #[test]
    fn the_lookup_budget_is_its_burst_then_its_rate() {
        let mut l = Lookups::new(&cfg(1_000, 10, 1, 5));
        for _ in 0..5 {
            assert!(l.take());
        }
        assert!(!l.take(), "the burst is spent");
        assert!(l.wait() > Duration::ZERO);
    }
}
