//! When Redis rewrites its append-only file. A rewrite forks Redis and writes the whole dataset
//! again; on a machine where Redis shares cores with the servers it took reserve p99 from ≈ 3 ms
//! to 17–52 ms while it ran (docs/BENCHMARKS.md). Redis' own policy rewrites whenever the file has
//! doubled, which during a sale is every minute or two — the busiest minutes. With Redis' own
//! rewrites off (`auto-aof-rewrite-percentage 0`, as the dev stack runs it), booking-api's
//! background task asks for one only when the file (at least `redis.aof_rewrite_min_bytes`) has
//! grown `redis.aof_rewrite_growth_pct` and Redis has been quiet (fewer than
//! `redis.aof_quiet_ops_per_s` commands a second) on every look for `redis.aof_quiet_for_ms`,
//! or — so the file and a restart's replay stay bounded — once it has grown
//! `redis.aof_rewrite_max_growth_pct` whatever the load, measured from a base of at least
//! `redis.aof_rewrite_min_bytes` (so a Redis started empty reaches the ceiling at 16 × 64 MiB at
//! the defaults, not at 64 MiB: ≈ 800,000 reserves; docs/OPERATIONS.md says when to raise it).

use crate::config::RedisConfig;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the policy reads from Redis (`INFO persistence`, `INFO stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AofState {
    /// `appendonly yes`.
    pub enabled: bool,
    /// A rewrite running or scheduled already.
    pub busy_rewriting: bool,
    pub current_bytes: u64,
    /// The file's size after the last rewrite (or at start).
    pub base_bytes: u64,
    /// Commands a second, as Redis measures them (`instantaneous_ops_per_sec`).
    pub ops_per_s: u64,
    /// Rewrites since Redis started (`aof_rewrites`, Redis 7).
    pub rewrites: u64,
}

impl AofState {
    /// Reads the fields from `INFO` text; a missing field reads as 0 (AOF off, say).
    pub fn parse(info: &str) -> AofState {
        let field = |name: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        AofState {
            enabled: field("aof_enabled") == 1,
            busy_rewriting: field("aof_rewrite_in_progress") == 1
                || field("aof_rewrite_scheduled") == 1,
            current_bytes: field("aof_current_size"),
            base_bytes: field("aof_base_size"),
            ops_per_s: field("instantaneous_ops_per_sec"),
            rewrites: field("aof_rewrites"),
        }
    }

    /// How much the file has grown since its last rewrite, in percent of what it was then.
    pub fn growth_pct(&self) -> u64 {
        self.current_bytes.saturating_sub(self.base_bytes) * 100 / self.base_bytes.max(1)
    }

    /// Under `redis.aof_quiet_ops_per_s` commands a second.
    pub fn is_quiet(&self, cfg: &RedisConfig) -> bool {
        self.ops_per_s < cfg.aof_quiet_ops_per_s
    }

    /// The growth the ceiling is measured by: against the base, but never a base under
    /// `min_bytes`. A Redis started empty has a base of a few bytes, so measured from it the
    /// file is "16× grown" the moment it passes `min_bytes` — which on a fresh Redis is in the
    /// middle of its first sale, the rewrite the policy is there to keep out of it (seen in
    /// `bench/latency-runs.sh`: p99 70 ms in the run it fell in).
    pub fn ceiling_growth_pct(&self, min_bytes: u64) -> u64 {
        let base = self.base_bytes.max(min_bytes).max(1);
        self.current_bytes.saturating_sub(base) * 100 / base
    }
}

/// Why a rewrite is due now, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// Grown past `aof_rewrite_growth_pct` and Redis is quiet.
    Quiet,
    /// Grown past `aof_rewrite_max_growth_pct`: rewritten whatever the load.
    Ceiling,
}

/// How long each Redis node has looked quiet to this process: since the first of an unbroken run
/// of quiet looks. Redis' load figure covers only its last two seconds or so, so one quiet look is
/// a lull — fans between two waves, a load generator between its phases — and a rewrite started in
/// it runs into the load that follows (seen in `bench/latency-runs.sh`: a rewrite asked for in a
/// few seconds' lull before the measured window). One entry per node the policy looks at (each
/// primary), so it is bounded by the cluster's size.
#[derive(Debug, Default)]
pub struct QuietWatch {
    since: Mutex<HashMap<String, Instant>>,
}

impl QuietWatch {
    /// Records a look at `node` at `now`: how long it has been quiet on every look since (zero
    /// on the first quiet look, and when it is busy now).
    pub fn look(&self, node: &str, quiet: bool, now: Instant) -> Duration {
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        if !quiet {
            since.remove(node);
            return Duration::ZERO;
        }
        let first = *since.entry(node.to_owned()).or_insert(now);
        now.saturating_duration_since(first)
    }
}

/// The policy: `None` while off (`aof_rewrite_growth_pct` 0), without an AOF, while a rewrite
/// runs, while the file is under `aof_rewrite_min_bytes`, or until it has grown enough for the
/// load Redis is under. `quiet_for` is how long the node has looked quiet ([`QuietWatch`]): the
/// quiet rewrite waits for `aof_quiet_for_ms` of it.
pub fn due(state: &AofState, cfg: &RedisConfig, quiet_for: Duration) -> Option<Rewrite> {
    if cfg.aof_rewrite_growth_pct == 0
        || !state.enabled
        || state.busy_rewriting
        || state.current_bytes < cfg.aof_rewrite_min_bytes
    {
        return None;
    }
    let growth = state.growth_pct();
    if state.ceiling_growth_pct(cfg.aof_rewrite_min_bytes) >= cfg.aof_rewrite_max_growth_pct {
        Some(Rewrite::Ceiling)
    } else if growth >= cfg.aof_rewrite_growth_pct
        && state.is_quiet(cfg)
        && quiet_for >= Duration::from_millis(cfg.aof_quiet_for_ms)
    {
        Some(Rewrite::Quiet)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quiet on every look for an hour: the quiet window is no obstacle.
    const LONG: Duration = Duration::from_secs(3600);

    fn state(base: u64, current: u64, ops: u64) -> AofState {
        AofState {
            enabled: true,
            current_bytes: current,
            base_bytes: base,
            ops_per_s: ops,
            ..AofState::default()
        }
    }

    #[test]
    fn info_text_is_read() {
        let info = "# Persistence\r\naof_enabled:1\r\naof_rewrite_in_progress:0\r\n\
                    aof_rewrite_scheduled:1\r\naof_rewrites:3\r\naof_current_size:5000\r\n\
                    aof_base_size:1000\r\n# Stats\r\ninstantaneous_ops_per_sec:42\r\n";
        let s = AofState::parse(info);
        assert_eq!(
            s,
            AofState {
                enabled: true,
                busy_rewriting: true,
                current_bytes: 5000,
                base_bytes: 1000,
                ops_per_s: 42,
                rewrites: 3,
            }
        );
        assert_eq!(s.growth_pct(), 400);
        assert_eq!(AofState::parse("aof_enabled:0\r\n"), AofState::default());
    }

    #[test]
    fn a_busy_redis_is_left_alone_until_the_ceiling() {
        let cfg = RedisConfig {
            aof_rewrite_min_bytes: 0,
            ..RedisConfig::default()
        };
        let quiet = cfg.aof_quiet_ops_per_s - 1;
        let busy = cfg.aof_quiet_ops_per_s;
        let grown = 100 + cfg.aof_rewrite_growth_pct;
        let past_ceiling = 100 + cfg.aof_rewrite_max_growth_pct;
        assert_eq!(due(&state(100, 100, quiet), &cfg, LONG), None, "not grown");
        assert_eq!(
            due(&state(100, grown, quiet), &cfg, LONG),
            Some(Rewrite::Quiet)
        );
        assert_eq!(
            due(&state(100, grown, busy), &cfg, LONG),
            None,
            "grown, but a sale is on"
        );
        assert_eq!(
            due(&state(100, past_ceiling, busy), &cfg, LONG),
            Some(Rewrite::Ceiling)
        );
        let rewriting = AofState {
            busy_rewriting: true,
            ..state(100, past_ceiling, quiet)
        };
        assert_eq!(due(&rewriting, &cfg, LONG), None, "one at a time");
        let off = RedisConfig {
            aof_rewrite_growth_pct: 0,
            ..RedisConfig::default()
        };
        assert_eq!(
            due(&state(100, past_ceiling, quiet), &off, LONG),
            None,
            "off"
        );
        let no_aof = AofState {
            enabled: false,
            ..state(100, past_ceiling, quiet)
        };
        assert_eq!(due(&no_aof, &cfg, LONG), None, "no AOF");
        let small = RedisConfig {
            aof_rewrite_min_bytes: past_ceiling + 1,
            ..cfg.clone()
        };
        assert_eq!(
            due(&state(100, past_ceiling, quiet), &small, LONG),
            None,
            "too small"
        );
    }

    #[test]
    fn a_redis_started_empty_is_not_rewritten_mid_sale_when_it_passes_the_minimum() {
        let cfg = RedisConfig::default();
        let busy = cfg.aof_quiet_ops_per_s;
        let min = cfg.aof_rewrite_min_bytes;
        // A fresh Redis' base is its empty preamble: measured from it, any file past the
        // minimum is far past the ceiling.
        let empty_base = 88;
        assert_eq!(due(&state(empty_base, min + 1, busy), &cfg, LONG), None);
        assert_eq!(due(&state(empty_base, min * 10, busy), &cfg, LONG), None);
        let ceiling = min + min * cfg.aof_rewrite_max_growth_pct / 100;
        assert_eq!(
            due(&state(empty_base, ceiling, busy), &cfg, LONG),
            Some(Rewrite::Ceiling)
        );
        // Quiet, the ordinary rule still rewrites it as soon as it passes the minimum.
        assert_eq!(
            due(&state(empty_base, min + 1, busy - 1), &cfg, LONG),
            Some(Rewrite::Quiet)
        );
        // A base above the minimum: the ceiling is 16× that base, as before.
        let base = min * 2;
        let past = base + base * cfg.aof_rewrite_max_growth_pct / 100;
        assert_eq!(due(&state(base, past - 1, busy), &cfg, LONG), None);
        assert_eq!(
            due(&state(base, past, busy), &cfg, LONG),
            Some(Rewrite::Ceiling)
        );
    }

    #[test]
    fn a_lull_is_not_quiet_until_it_has_lasted() {
        let cfg = RedisConfig {
            aof_rewrite_min_bytes: 0,
            ..RedisConfig::default()
        };
        let window = Duration::from_millis(cfg.aof_quiet_for_ms);
        assert!(
            window > Duration::ZERO,
            "the default waits for a quiet spell"
        );
        let grown = state(
            100,
            100 + cfg.aof_rewrite_growth_pct,
            cfg.aof_quiet_ops_per_s - 1,
        );
        let busy = state(
            100,
            100 + cfg.aof_rewrite_growth_pct,
            cfg.aof_quiet_ops_per_s,
        );
        let watch = QuietWatch::default();
        let t0 = Instant::now();
        let look = |s: &AofState, at: Duration| {
            let quiet_for = watch.look("a", s.is_quiet(&cfg), t0 + at);
            due(s, &cfg, quiet_for)
        };
        // The first quiet look, and every one until the window has passed: a lull.
        assert_eq!(look(&grown, Duration::ZERO), None, "one quiet look");
        assert_eq!(look(&grown, window / 2), None, "half the window");
        // A busy look starts the count again.
        assert_eq!(look(&busy, window / 2 + Duration::from_secs(1)), None);
        assert_eq!(look(&grown, window), None, "quiet again only just now");
        assert_eq!(look(&grown, window * 2 - Duration::from_millis(1)), None);
        assert_eq!(look(&grown, window * 2), Some(Rewrite::Quiet));
        // Each node has its own count.
        assert_eq!(watch.look("b", true, t0 + window * 2), Duration::ZERO);
        // 0: the first quiet look will do (the rule before the window existed).
        let at_once = RedisConfig {
            aof_quiet_for_ms: 0,
            ..cfg.clone()
        };
        assert_eq!(due(&grown, &at_once, Duration::ZERO), Some(Rewrite::Quiet));
    }
}
