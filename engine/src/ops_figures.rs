//! The ops console's live figures (booking-api's `GET /v1/ops/ws`, docs/API.md "The ops
//! stream"): one sample per drop per second, read from Redis so it describes every instance, not
//! the one serving the console.
//!
//! - What Redis already counts is read as it is ([`Engine::drop_figures`]: fans in line, the join
//!   and admission counters, active shoppers, available / held / sold, the line's state). Joins
//!   and admissions per second are the difference of their counters between two samples.
//! - What only a process knows — how many reserves and confirms it answered in the last second,
//!   how many failed, how long they took — each booking-api instance counts in memory
//!   ([`RecentCalls`], bounded by `http.ops_recent_max_drops` drops and a fixed histogram per
//!   drop, counted with atomics so concurrent requests never wait on each other) and writes once
//!   a second ([`Engine::spawn_call_figures`]), per drop it served, to a
//!   small hash `fg:{drop}:ops:calls:<instance>` with a TTL (`http.ops_call_figures_ttl_ms`), and
//!   its instance id to `fg:{drop}:ops:instances` (a zset, by write time). A sample sums the
//!   instances' rates and takes the **largest** of their p99s: the p99 of the union isn't
//!   recoverable from per-instance p99s, and the largest is the honest bound (it is never lower
//!   than the true one by more than one instance's share).
//! - The charts' history: every sample (at most one a second per drop, whichever stream takes
//!   `fg:{drop}:ops:sampled` first) is pushed to the list `fg:{drop}:ops:history`, trimmed to
//!   `http.ops_history_len` (900: 15 minutes) and kept an hour after the last push. A console
//!   opening a drop reads it whole, so its charts start with the last 15 minutes anyone watched.
//!
//! Every read is O(1) or bounded by a setting: no key here grows with a sale.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fred::interfaces::{HashesInterface, KeysInterface, ListInterface, SortedSetsInterface};
use fred::types::{Expiration, SetOptions};
use serde::Serialize;
use tokio::sync::watch;

use crate::booking::Engine;
use crate::error::{Code, Error, Result};
use crate::ids::DropId;
use crate::keys::drop_key;

/// Buckets of a latency histogram: bucket `i` holds calls that took at most
/// `FIRST_BUCKET_US × BUCKET_GROWTH^i` µs (the last one everything slower), so a p99 is read to
/// within 15 %, from 50 µs to ≈ 30 s, in 384 bytes.
pub const LATENCY_BUCKETS: usize = 96;
const FIRST_BUCKET_US: f64 = 50.0;
const BUCKET_GROWTH: f64 = 1.15;
/// How long an instance id stays in a drop's instance zset (and the zset itself) after its last
/// write: long past any entry's TTL, so the zset never grows with restarts.
const INSTANCES_KEEP_MS: i64 = 60_000;
/// How long a drop's chart history outlives its last sample.
const HISTORY_KEEP_MS: i64 = 3_600_000;

fn bucket_of(us: f64) -> usize {
    if us <= FIRST_BUCKET_US {
        return 0;
    }
    let i = ((us / FIRST_BUCKET_US).ln() / BUCKET_GROWTH.ln()).ceil();
    (i as usize).min(LATENCY_BUCKETS - 1)
}

fn bucket_upper_us(i: usize) -> f64 {
    FIRST_BUCKET_US * BUCKET_GROWTH.powi(i as i32)
}

/// A reserve or a confirm, as booking-api answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Reserve,
    Confirm,
}

/// One kind of call to one drop in one window: how many, how many failed, how long they took.
#[derive(Debug, Clone)]
struct Calls {
    n: u64,
    errors: u64,
    buckets: [u32; LATENCY_BUCKETS],
}

impl Default for Calls {
    fn default() -> Self {
        Calls {
            n: 0,
            errors: 0,
            buckets: [0; LATENCY_BUCKETS],
        }
    }
}

impl Calls {
    #[cfg(test)]
    fn record(&mut self, took: Duration, error: bool) {
        self.n += 1;
        self.errors += u64::from(error);
        let b = &mut self.buckets[bucket_of(took.as_secs_f64() * 1e6)];
        *b = b.saturating_add(1);
    }

    /// The 99th percentile, as the upper bound of its bucket (µs); `None` without calls.
    fn p99_us(&self) -> Option<u64> {
        if self.n == 0 {
            return None;
        }
        let rank = (self.n as f64 * 0.99).ceil() as u64;
        let mut seen = 0u64;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                return Some(bucket_upper_us(i).round() as u64);
            }
        }
        Some(bucket_upper_us(LATENCY_BUCKETS - 1).round() as u64)
    }
}

/// What one instance saw of one drop's calls in one window: what it writes to Redis.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallFigures {
    pub window_ms: u64,
    pub reserve_n: u64,
    pub reserve_errors: u64,
    pub reserve_p99_us: Option<u64>,
    pub confirm_n: u64,
    pub confirm_errors: u64,
    pub confirm_p99_us: Option<u64>,
}

/// [`Calls`] that many requests count at once: each field its own atomic.
struct SharedCalls {
    n: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU32; LATENCY_BUCKETS],
}

impl Default for SharedCalls {
    fn default() -> Self {
        SharedCalls {
            n: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

impl SharedCalls {
    // Relaxed: the counts are read only after `take` has swapped their map out under its shard's
    // write lock, which orders every increment made under a read lock before the read.
    fn record(&self, took: Duration, error: bool) {
        self.n.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        // A bucket can't wrap: 4 billion calls to one drop within one window.
        self.buckets[bucket_of(took.as_secs_f64() * 1e6)].fetch_add(1, Ordering::Relaxed);
    }

    fn load(&self) -> Calls {
        Calls {
            n: self.n.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
        }
    }
}

/// Shards of [`RecentCalls`]' map: a call takes its drop's shard's lock shared (only a new drop
/// in the window takes it exclusively), so calls never wait on each other, and `take` holds
/// each shard exclusively for no more than a swap.
const RECENT_SHARDS: usize = 16;

type Shard = RwLock<HashMap<DropId, Box<[SharedCalls; 2]>>>;

/// This process's reserves and confirms per drop since the last flush. A call to a drop past
/// `max_drops` in one window is not counted (the figures of the drops already counted stay
/// whole): the map's size is bounded whatever ids requests carry, and booking-api records only
/// calls for a drop the engine knew (routes.rs `counts`), so junk ids don't take the places.
///
/// Taken on every reserve and confirm, so nothing here serialises requests: the drops are
/// spread over [`RECENT_SHARDS`] maps by hash, a call to a drop already in the window finds it
/// under its shard's read lock (shared by every call) and counts with atomic increments, and
/// the window's drop count is one atomic, claimed under the shard's write lock by a drop's first
/// call. The window turns over shard by shard (`take`): a call landing in a shard already turned
/// counts in the next window, never in neither; the taken drops' places are given back once
/// every shard has turned, so each window holds at most `max_drops` (and while it turns, the
/// two windows together do).
pub struct RecentCalls {
    max_drops: usize,
    /// Drops in the window, over every shard: at most `max_drops`.
    drops: AtomicUsize,
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// When the window began; only `take` touches it.
    since: Mutex<Instant>,
    instance: String,
}

impl RecentCalls {
    pub fn new(max_drops: usize) -> RecentCalls {
        RecentCalls {
            max_drops,
            drops: AtomicUsize::new(0),
            shards: (0..RECENT_SHARDS).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            since: Mutex::new(Instant::now()),
            instance: hex::encode(rand::random::<[u8; 8]>()),
        }
    }

    fn shard(&self, drop: &DropId) -> &Shard {
        &self.shards[self.hasher.hash_one(drop) as usize % RECENT_SHARDS]
    }

    /// This process, as its figures' key names it: random, so a restarted process is new.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Counts one answered call. `error`: the answer was a server-side failure (5xx), not an
    /// expected refusal such as `sold_out`.
    pub fn record(&self, drop: &DropId, call: Call, took: Duration, error: bool) {
        let shard = self.shard(drop);
        {
            let counted = shard.read().unwrap_or_else(|p| p.into_inner());
            if let Some(calls) = counted.get(drop) {
                calls[call as usize].record(took, error);
                return;
            }
        }
        // Past the bound, calls to drops not counted take no lock at all.
        if self.drops.load(Ordering::Acquire) >= self.max_drops {
            return;
        }
        // The drop's first call in this window (or a racing one: checked again under the lock).
        let mut counted = shard.write().unwrap_or_else(|p| p.into_inner());
        if !counted.contains_key(drop) {
            let claimed = self
                .drops
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max_drops).then_some(n + 1)
                })
                .is_ok();
            if !claimed {
                return;
            }
        }
        counted.entry(drop.clone()).or_default()[call as usize].record(took, error);
    }

    /// The window's figures per drop (drops without calls left out); a new window starts.
    pub fn take(&self) -> Vec<(DropId, CallFigures)> {
        let since = {
            let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *since, Instant::now())
        };
        let mut drops = Vec::new();
        for shard in self.shards.iter() {
            let taken = std::mem::take(&mut *shard.write().unwrap_or_else(|p| p.into_inner()));
            drops.extend(taken);
        }
        // Their places are given back only now that every shard has turned: a drop's first call
        // meanwhile claims against this window's drops too, whichever shard it lands in, so
        // neither this window nor the next holds more than `max_drops` (given back shard by
        // shard, a place freed in a shard already turned could go to a drop in one not yet
        // turned, and this window would hold more). The cost: during the turnover (16 swaps) a
        // drop new to the next window is counted only if both windows' drops fit the bound —
        // only a process near it loses such a call, as it loses calls past the bound anyway.
        self.drops.fetch_sub(drops.len(), Ordering::AcqRel);
        let window_ms = (since.elapsed().as_millis() as u64).max(1);
        drops
            .into_iter()
            .map(|(drop, calls)| {
                let [r, c] = [calls[0].load(), calls[1].load()];
                let f = CallFigures {
                    window_ms,
                    reserve_n: r.n,
                    reserve_errors: r.errors,
                    reserve_p99_us: r.p99_us(),
                    confirm_n: c.n,
                    confirm_errors: c.errors,
                    confirm_p99_us: c.p99_us(),
                };
                (drop, f)
            })
            .collect()
    }
}

/// Calls per second, error rate and p99 of one kind of call, over every instance that wrote.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CallRate {
    pub per_s: f64,
    /// Failed (5xx) calls over all calls; `null` without calls.
    pub error_rate: Option<f64>,
    /// The largest of the instances' p99s (ms); `null` without calls.
    pub p99_ms: Option<f64>,
}

/// One sample of a drop, as the ops stream sends it (`{"type":"figures", …}`).
#[derive(Debug, Clone, Serialize)]
pub struct OpsSample {
    pub drop_id: String,
    /// This process's clock when the sample was read (ms since the epoch).
    pub at_ms: i64,
    pub state: &'static str,
    pub paused: bool,
    pub recovering: bool,
    pub line_fans: i64,
    /// Joins ever and admissions ever (the counters behind the rates).
    pub joins: i64,
    pub admitted: i64,
    /// Per second since the previous sample; `null` on the first.
    pub joins_per_s: Option<f64>,
    pub admitted_per_s: Option<f64>,
    pub rate_per_s: f64,
    pub active_shoppers: i64,
    pub max_active: i64,
    pub available_units: i64,
    pub held_units: i64,
    pub sold_units: i64,
    pub confirming_holds: i64,
    pub reserve: CallRate,
    pub confirm: CallRate,
    /// booking-api instances whose call figures are in this sample.
    pub instances: usize,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn calls_key(drop: &DropId, instance: &str) -> String {
    drop_key(drop, &format!("ops:calls:{instance}"))
}

/// A drop the console may pick, as the stream's `drops` frame lists it.
#[derive(Debug, Clone, Serialize)]
pub struct OpsDrop {
    pub drop_id: DropId,
    pub name: String,
    /// `open` or `queue`.
    pub mode: &'static str,
}

impl Engine {
    /// Writes one instance's window of one drop (a hash with a TTL, and the instance in the
    /// drop's instance zset).
    pub async fn write_call_figures(
        &self,
        instance: &str,
        drop: &DropId,
        f: &CallFigures,
    ) -> Result<()> {
        let key = calls_key(drop, instance);
        let c = self.redis.at(&key);
        // Every field every window (an empty p99: no calls), so none is left from an earlier one.
        let p99 = |p: Option<u64>| p.map(|p| p.to_string()).unwrap_or_default();
        let fields: Vec<(&str, String)> = vec![
            ("window_ms", f.window_ms.to_string()),
            ("reserve_n", f.reserve_n.to_string()),
            ("reserve_errors", f.reserve_errors.to_string()),
            ("reserve_p99_us", p99(f.reserve_p99_us)),
            ("confirm_n", f.confirm_n.to_string()),
            ("confirm_errors", f.confirm_errors.to_string()),
            ("confirm_p99_us", p99(f.confirm_p99_us)),
        ];
        let _: () = c.hset(&key, fields).await?;
        let ttl = self.cfg.http.ops_call_figures_ttl_ms.max(1) as i64;
        let _: () = c.pexpire(&key, ttl, None).await?;
        let instances = drop_key(drop, "ops:instances");
        let now = now_ms();
        let _: () = c
            .zadd(&instances, None, None, false, false, (now as f64, instance))
            .await?;
        let _: () = c
            .zremrangebyscore(
                &instances,
                f64::NEG_INFINITY,
                (now - INSTANCES_KEEP_MS) as f64,
            )
            .await?;
        let _: () = c.pexpire(&instances, INSTANCES_KEEP_MS, None).await?;
        Ok(())
    }

    /// The drop's calls over every instance that wrote lately: rates summed, p99 the largest.
    /// Reads at most `http.ops_max_instances` instances (the latest writers).
    pub async fn call_rates(&self, drop: &DropId) -> Result<(CallRate, CallRate, usize)> {
        let instances_key = drop_key(drop, "ops:instances");
        let c = self.redis.at(&instances_key);
        let max = self.cfg.http.ops_max_instances.max(1) as i64;
        let instances: Vec<String> = c.zrevrange(&instances_key, 0, max - 1, false).await?;
        let (mut reserve, mut confirm) = (Sums::default(), Sums::default());
        let mut seen = 0;
        for instance in instances {
            let h: HashMap<String, String> = c.hgetall(calls_key(drop, &instance)).await?;
            if h.is_empty() {
                continue; // expired: that instance answered nothing lately
            }
            seen += 1;
            let num = |k: &str| h.get(k).and_then(|v| v.parse::<f64>().ok());
            let window_s = num("window_ms").unwrap_or(1000.0).max(1.0) / 1000.0;
            reserve.add(
                num("reserve_n").unwrap_or(0.0),
                num("reserve_errors").unwrap_or(0.0),
                num("reserve_p99_us"),
                window_s,
            );
            confirm.add(
                num("confirm_n").unwrap_or(0.0),
                num("confirm_errors").unwrap_or(0.0),
                num("confirm_p99_us"),
                window_s,
            );
        }
        Ok((reserve.rate(), confirm.rate(), seen))
    }

    /// One sample of the drop: its Redis figures, the instances' calls, and the join and
    /// admission rates since `previous` (the same drop's last sample). `None`: Redis has no
    /// state for the drop.
    pub async fn ops_sample(
        &self,
        drop: &DropId,
        previous: Option<&OpsSample>,
    ) -> Result<Option<OpsSample>> {
        let Some(f) = self.drop_figures(drop).await? else {
            return Ok(None);
        };
        let (reserve, confirm, instances) = self.call_rates(drop).await?;
        let at_ms = now_ms();
        let per_s = |now: i64, before: i64, before_ms: i64| {
            let dt = (at_ms - before_ms) as f64 / 1000.0;
            (dt > 0.0).then(|| ((now - before).max(0) as f64) / dt)
        };
        let (joins_per_s, admitted_per_s) = match previous {
            Some(p) => (
                per_s(f.joins, p.joins, p.at_ms),
                per_s(f.admitted, p.admitted, p.at_ms),
            ),
            None => (None, None),
        };
        Ok(Some(OpsSample {
            drop_id: f.drop,
            at_ms,
            state: f.state,
            paused: f.paused,
            recovering: f.recovering,
            line_fans: f.line_fans,
            joins: f.joins,
            admitted: f.admitted,
            joins_per_s,
            admitted_per_s,
            rate_per_s: f.rate_per_s,
            active_shoppers: f.active_shoppers,
            max_active: f.max_active,
            available_units: f.available_units,
            held_units: f.held_units,
            sold_units: f.sold_units,
            confirming_holds: f.confirming_holds,
            reserve,
            confirm,
            instances,
        }))
    }

    /// Adds `sample` to the drop's chart history, unless another stream added one for this
    /// drop within the last `http.ops_stream_interval_ms` (so N consoles still make one a
    /// second). Returns whether it was added.
    pub async fn push_ops_history(&self, drop: &DropId, sample: &OpsSample) -> Result<bool> {
        let gate = drop_key(drop, "ops:sampled");
        let c = self.redis.at(&gate);
        let interval = self.cfg.http.ops_stream_interval_ms.max(2) as i64;
        // A little under the interval, so a stream that ticks a hair early still samples.
        let px = interval - interval / 10;
        let taken: Option<String> = c
            .set(
                &gate,
                sample.at_ms.to_string(),
                Some(Expiration::PX(px)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        if taken.is_none() {
            return Ok(false);
        }
        let history = drop_key(drop, "ops:history");
        let json = serde_json::to_string(sample).map_err(Error::internal)?;
        let len = self.cfg.http.ops_history_len.max(1) as i64;
        let _: () = c.lpush(&history, json).await?;
        let _: () = c.ltrim(&history, 0, len - 1).await?;
        let _: () = c.pexpire(&history, HISTORY_KEEP_MS, None).await?;
        Ok(true)
    }

    /// The drop's chart history, oldest first (at most `http.ops_history_len` samples).
    pub async fn ops_history(&self, drop: &DropId) -> Result<Vec<serde_json::Value>> {
        let history = drop_key(drop, "ops:history");
        let len = self.cfg.http.ops_history_len.max(1) as i64;
        let raw: Vec<String> = self.redis.at(&history).lrange(&history, 0, len - 1).await?;
        Ok(raw
            .iter()
            .rev()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect())
    }

    /// The drops a console may pick: Postgres' live drops (open, or closed in the last hour),
    /// newest first, at most `http.drop_metrics_max_drops`.
    pub async fn ops_drops(&self) -> Result<Vec<OpsDrop>> {
        let max = self.cfg.http.drop_metrics_max_drops.max(1) as i64;
        let mut out = Vec::new();
        for drop in self.db.live_drops(max).await? {
            match self.drop_def(&drop).await {
                Ok(def) => out.push(OpsDrop {
                    drop_id: drop,
                    name: def.name.clone(),
                    mode: match def.admission.mode {
                        crate::drops::AdmissionMode::Queue => "queue",
                        crate::drops::AdmissionMode::Open => "open",
                    },
                }),
                Err(e) if e.code == Code::UnknownDrop => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Writes `recent`'s window to Redis every `http.ops_stream_interval_ms` (one hash per drop
    /// this process served), until `shutdown` turns true. A failed write is logged and the
    /// window dropped: these are figures for people, not records.
    pub fn spawn_call_figures(
        self: &Arc<Self>,
        recent: Arc<RecentCalls>,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let e = self.clone();
        let period = Duration::from_millis(self.cfg.http.ops_stream_interval_ms.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        for (drop, f) in recent.take() {
                            if let Err(err) = e.write_call_figures(recent.instance(), &drop, &f).await {
                                tracing::debug!(%drop, error = %err, "ops figures: write failed");
                            }
                        }
                    }
                    _ = shutdown.changed() => return,
                }
                if *shutdown.borrow() {
                    return;
                }
            }
        })
    }
}

#[derive(Default)]
struct Sums {
    per_s: f64,
    n: f64,
    errors: f64,
    p99_us: Option<f64>,
}

impl Sums {
    fn add(&mut self, n: f64, errors: f64, p99_us: Option<f64>, window_s: f64) {
        self.per_s += n / window_s;
        self.n += n;
        self.errors += errors;
        if let Some(p) = p99_us {
            self.p99_us = Some(self.p99_us.map_or(p, |q| q.max(p)));
        }
    }

    fn rate(&self) -> CallRate {
        CallRate {
            per_s: self.per_s,
            error_rate: (self.n > 0.0).then(|| self.errors / self.n),
            p99_ms: self.p99_us.map(|p| p / 1000.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_the_bucket_of_the_99th_call() {
        let mut c = Calls::default();
        for _ in 0..99 {
            c.record(Duration::from_millis(1), false);
        }
        c.record(Duration::from_millis(500), true);
        let p99 = c.p99_us().unwrap();
        assert!((1000..=1150).contains(&p99), "{p99}");
        c.record(Duration::from_millis(500), false);
        // 101 calls: the 100th is slow now.
        let p99 = c.p99_us().unwrap();
        assert!((500_000..=575_000).contains(&p99), "{p99}");
        assert_eq!((c.n, c.errors), (101, 1));
        assert_eq!(Calls::default().p99_us(), None);
    }

    #[test]
    fn buckets_cover_fifty_microseconds_to_thirty_seconds() {
        assert_eq!(bucket_of(1.0), 0);
        assert_eq!(bucket_of(50.0), 0);
        assert!(bucket_upper_us(LATENCY_BUCKETS - 1) > 25e6);
        assert_eq!(bucket_of(1e9), LATENCY_BUCKETS - 1);
        for us in [51.0, 333.0, 12_345.0, 2e6] {
            let b = bucket_of(us);
            assert!(
                bucket_upper_us(b) >= us && bucket_upper_us(b - 1) < us,
                "{us}"
            );
        }
    }

    #[test]
    fn recent_calls_are_bounded_by_drops_and_start_afresh() {
        let r = RecentCalls::new(2);
        let d = |s: &str| DropId::parse(s).unwrap();
        let (a, b, c) = (
            d("da000000000000000"),
            d("db000000000000000"),
            d("dc000000000000000"),
        );
        r.record(&a, Call::Reserve, Duration::from_millis(2), false);
        r.record(&b, Call::Confirm, Duration::from_millis(2), true);
        r.record(&c, Call::Reserve, Duration::from_millis(2), false);
        r.record(&a, Call::Reserve, Duration::from_millis(2), false);
        let mut taken = r.take();
        taken.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[0].1.reserve_n, 2);
        assert_eq!((taken[1].1.confirm_n, taken[1].1.confirm_errors), (1, 1));
        assert!(r.take().is_empty());
    }

    /// Many threads recording while another takes windows: no window holds more than
    /// `max_drops` drops, and with room for every drop in two windows at once (a turnover's
    /// two) no call is lost or counted twice across the turnovers.
    #[test]
    fn recent_calls_stay_bounded_and_whole_under_concurrent_calls() {
        const THREADS: usize = 8;
        const CALLS: usize = 5_000;
        let drops: Vec<DropId> = (0..6)
            .map(|i| DropId::parse(&format!("d{i:016}")).unwrap())
            .collect();
        let room = 2 * drops.len();
        for max_drops in [4, room] {
            let r = RecentCalls::new(max_drops);
            let done = std::sync::atomic::AtomicBool::new(false);
            let mut windows = std::thread::scope(|s| {
                let taker = s.spawn(|| {
                    let mut windows = Vec::new();
                    while !done.load(Ordering::Acquire) {
                        windows.push(r.take());
                        std::thread::yield_now();
                    }
                    windows
                });
                let recorders: Vec<_> = (0..THREADS)
                    .map(|t| {
                        let (r, drops) = (&r, &drops);
                        s.spawn(move || {
                            for i in 0..CALLS {
                                let call = if i % 3 == 0 {
                                    Call::Confirm
                                } else {
                                    Call::Reserve
                                };
                                let took = Duration::from_micros((i % 700) as u64 * 10);
                                let drop = &drops[(t + i) % drops.len()];
                                r.record(drop, call, took, i % 10 == 0);
                            }
                        })
                    })
                    .collect();
                for recorder in recorders {
                    recorder.join().unwrap();
                }
                done.store(true, Ordering::Release);
                taker.join().unwrap()
            });
            windows.push(r.take());
            for w in &windows {
                assert!(w.len() <= max_drops, "{} drops in a window", w.len());
            }
            if max_drops == room {
                let n: u64 = windows
                    .iter()
                    .flatten()
                    .map(|(_, f)| f.reserve_n + f.confirm_n)
                    .sum();
                assert_eq!(n, (THREADS * CALLS) as u64);
            }
            assert_eq!(r.drops.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn instances_sum_rates_and_take_the_largest_p99() {
        let mut s = Sums::default();
        s.add(10.0, 1.0, Some(2000.0), 1.0);
        s.add(30.0, 0.0, Some(9000.0), 2.0);
        let r = s.rate();
        assert_eq!(r.per_s, 25.0);
        assert_eq!(r.error_rate, Some(1.0 / 40.0));
        assert_eq!(r.p99_ms, Some(9.0));
        assert_eq!(Sums::default().rate().error_rate, None);
    }
}
