//! `loadtest sale`'s figures and report. The figures are pure functions over what the run
//! recorded (join answers, admission tokens, ticks, samples of the drop's counts), so they are
//! tested on sample data; the report renders as text, JSON and one self-contained HTML file
//! whose charts are inline SVG drawn here (no script library, nothing fetched).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::invariants::{Check, Verdict};
use crate::queue_report::Machine;
use crate::stats::{new_histogram, Percentiles};
use crate::ws_clients::TickSeen;

/// The sale's bars (docs/BENCHMARKS.md, "The whole sale").
pub const BAR_TAU: f64 = 0.99;
pub const BAR_ADMIT_RATE_ERROR_PCT: f64 = 2.0;
pub const BAR_SOLD_OUT_P99_MS: f64 = 2_000.0;
/// Fewer fans admitted after opening than this and τ's bar isn't judged (a handful of pairs
/// says nothing about the order).
pub const MIN_TAU_FANS: u64 = 20;
/// Kendall's τ is O(n²) here: beyond this many fans an evenly spaced sample of them is used
/// (the report says how many pairs were compared).
pub const MAX_TAU_FANS: usize = 20_000;

/// Kendall's τ-b of `(x, y)` pairs (ties in either count as neither concordant nor
/// discordant). None with fewer than two pairs or when every x (or y) is the same.
pub fn kendall_tau_b(pairs: &[(i64, i64)]) -> Option<f64> {
    let step = pairs.len().div_ceil(MAX_TAU_FANS).max(1);
    let p: Vec<(i64, i64)> = pairs.iter().step_by(step).copied().collect();
    let (mut concordant, mut discordant, mut tie_x, mut tie_y) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..p.len() {
        for j in i + 1..p.len() {
            let dx = (p[i].0 - p[j].0).signum();
            let dy = (p[i].1 - p[j].1).signum();
            match (dx, dy) {
                (0, 0) => {}
                (0, _) => tie_x += 1,
                (_, 0) => tie_y += 1,
                _ if dx == dy => concordant += 1,
                _ => discordant += 1,
            }
        }
    }
    let n1 = (concordant + discordant + tie_x) as f64;
    let n2 = (concordant + discordant + tie_y) as f64;
    if n1 == 0.0 || n2 == 0.0 {
        return None;
    }
    Some((concordant - discordant) as f64 / (n1 * n2).sqrt())
}

/// `(x, admitted_ms, place)` → `(x, rank in admission order)`. Admission order is the order
/// lua/admit.lua admitted the fans in: by admission run (its Redis time), and within one run by
/// place, lowest first, as the script pops them. (Leaving a run's fans tied would make τ-b
/// read a burst of admissions as disorder.)
pub fn admission_ranks(fans: &[(i64, i64, i64)]) -> Vec<(i64, i64)> {
    let mut order: Vec<usize> = (0..fans.len()).collect();
    order.sort_by_key(|&i| (fans[i].1, fans[i].2));
    let mut out = vec![(0, 0); fans.len()];
    for (rank, i) in order.into_iter().enumerate() {
        out[i] = (fans[i].0, rank as i64);
    }
    out
}

/// One reading of the drop's live counts (`GET /v1/drops/{drop_id}`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    pub at_ms: i64,
    pub available: i64,
    pub held: i64,
    pub sold: i64,
}

/// Admissions per second where the token bucket alone limited them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AdmissionRate {
    pub set_rate_per_s: f64,
    /// Tick intervals counted, and what they add up to.
    pub intervals: u64,
    pub seconds: f64,
    pub admitted: i64,
    pub rate_per_s: f64,
    /// rate_per_s / set_rate_per_s.
    pub ratio: f64,
    /// Admissions over the whole sale (from the first tick after opening to the last).
    pub admitted_total: i64,
}

/// How one admitted fan's session ended, as the run saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Never held anything (sold out first, or the run stopped).
    NoHold,
    /// Still holding when the run stopped.
    Holding,
    Paid {
        at_ms: i64,
    },
    Released {
        at_ms: i64,
    },
    /// Left the hold to expire.
    Abandoned,
}

/// One admitted fan's session, for the admission script's stock rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSeen {
    pub admitted_ms: i64,
    pub shop_end_ms: i64,
    pub hold_ms: Option<i64>,
    pub hold_expires_ms: Option<i64>,
    pub end: SessionEnd,
}

impl SessionSeen {
    /// What lua/admit.lua counts for this session at `t` against the units available:
    /// `per_fan_limit − units held or bought` while the session is active. A fan who released
    /// stays active until the shop end (they may pick again); one who abandoned, until the
    /// hold's expiry plus the confirm grace; buying the whole limit ends it.
    pub fn demand_at(&self, t: i64, per_fan_limit: i64, confirm_grace_ms: i64) -> i64 {
        if t < self.admitted_ms {
            return 0;
        }
        let (full, holding) = (per_fan_limit, per_fan_limit - 1);
        let within_shop = if t < self.shop_end_ms { full } else { 0 };
        if self.hold_ms.is_none_or(|h| t < h) {
            return within_shop;
        }
        match self.end {
            SessionEnd::NoHold | SessionEnd::Holding => holding,
            SessionEnd::Paid { at_ms } if t >= at_ms => {
                if holding == 0 || t >= self.shop_end_ms {
                    0
                } else {
                    holding
                }
            }
            SessionEnd::Released { at_ms } if t >= at_ms => within_shop,
            SessionEnd::Abandoned => match self.hold_expires_ms {
                Some(exp) if t >= exp => {
                    if t < exp + confirm_grace_ms {
                        full
                    } else {
                        0
                    }
                }
                _ => holding,
            },
            SessionEnd::Paid { .. } | SessionEnd::Released { .. } => holding,
        }
    }
}

/// Judges the rate only over intervals between consecutive ticks (Redis' `at_ms`) where the
/// token bucket is what limits admission: the line is `open` at both ends with waiters left
/// after it, the burst is spent (`skip_ms` after the first open tick), and the stock rule can't
/// be what holds admission back — at the interval's start, the units available (the last
/// sample) cover what the active sessions count (`demand(t)`, lua/admit.lua's rule, without its
/// margin) plus a whole interval's admissions at the set rate. The sale sets max_active so it
/// never limits.
pub fn admission_rate(
    ticks: &[TickSeen],
    samples: &[Sample],
    set_rate_per_s: f64,
    skip_ms: i64,
    per_fan_limit: i64,
    demand: &dyn Fn(i64) -> i64,
) -> AdmissionRate {
    let usable: Vec<&TickSeen> = ticks
        .iter()
        .filter(|t| t.admitted_total.is_some())
        .collect();
    let mut out = AdmissionRate {
        set_rate_per_s,
        ..AdmissionRate::default()
    };
    let first_open = usable
        .iter()
        .find(|t| t.state.as_deref() == Some("open"))
        .map(|t| t.at_ms);
    if let (Some(first), Some(last)) = (usable.first(), usable.last()) {
        out.admitted_total = last.admitted_total.unwrap_or(0) - first.admitted_total.unwrap_or(0);
    }
    let Some(first_open) = first_open else {
        return out;
    };
    let mut ms = 0i64;
    for w in usable.windows(2) {
        let (a, b) = (w[0], w[1]);
        let open = |t: &TickSeen| t.state.as_deref() == Some("open");
        if !open(a) || !open(b) || a.at_ms < first_open + skip_ms {
            continue;
        }
        if b.waiting.unwrap_or(0) <= 0 {
            continue;
        }
        let before = samples.partition_point(|s| s.at_ms <= a.at_ms);
        let wanted = demand(a.at_ms)
            + per_fan_limit * (set_rate_per_s * (b.at_ms - a.at_ms) as f64 / 1000.0).ceil() as i64;
        let stock_ok = before > 0 && samples[before - 1].available >= wanted;
        if !stock_ok {
            continue;
        }
        out.intervals += 1;
        ms += b.at_ms - a.at_ms;
        out.admitted += b.admitted_total.unwrap_or(0) - a.admitted_total.unwrap_or(0);
    }
    out.seconds = ms as f64 / 1000.0;
    if out.seconds > 0.0 {
        out.rate_per_s = out.admitted as f64 / out.seconds;
        out.ratio = out.rate_per_s / set_rate_per_s;
    }
    out
}

/// Percentiles (ms) of values in microseconds; negative values count as 0.
pub fn percentiles_of_us(values_us: impl IntoIterator<Item = i64>) -> Percentiles {
    let mut h = new_histogram();
    for v in values_us {
        // Clamped into the histogram's range; its bounds are constants.
        let _ = h.record((v.max(1) as u64).min(crate::stats::HIST_MAX_US));
    }
    Percentiles::of(&h)
}

/// How the sale's order compares with the order fans joined in.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Fairness {
    /// Fans admitted after joining after opening (rejoiners left out), and τ-b between the
    /// order their join answers arrived in and the order they were admitted in (the admission
    /// time in their token, Redis' clock; in one admission run, in place order, as the script
    /// admits them: [`admission_ranks`]).
    pub after_open_fans: u64,
    pub tau_after_open: Option<f64>,
    /// τ-b between join order and place (what the line promised them).
    pub tau_join_vs_place: Option<f64>,
    /// Pre-queue fans admitted, and whether their places and admission order are exactly the
    /// revealed seed's: place == HMAC-SHA256(seed, fan) cut to 52 bits, and admitted in that
    /// order.
    pub pre_queue_fans: u64,
    pub pre_queue_place_mismatches: u64,
    pub tau_pre_queue: Option<f64>,
    /// Pre-queue fans admitted after some post-open fan (the pre-queue goes first).
    pub pre_queue_after_open_fans: u64,
}

/// How long after the last sale waiters heard `sold_out`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SoldOutNotice {
    /// The last sale: the answer to the final confirm that sold (the client's clock, on the
    /// machine Redis runs on; it comes just after the confirm-finish).
    pub last_sale_ms: Option<i64>,
    /// Sockets still waiting at the last sale, and how many of them heard it.
    pub sockets_waiting: u64,
    pub sockets_told: u64,
    pub sockets: Percentiles,
    /// HTTP-only waiters, who learn it at their next poll.
    pub http_waiting: u64,
    pub http_told: u64,
    pub http: Percentiles,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latencies {
    /// HTTP join request → answer; socket connect → first frame (handshake, auth, join).
    pub join_http: Percentiles,
    pub join_ws: Percentiles,
    /// Admission heard → hold taken (includes the think time).
    pub admitted_to_hold: Percentiles,
    pub reserve: Percentiles,
    pub confirm: Percentiles,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Shop {
    pub admitted: u64,
    pub holds: u64,
    pub paid: u64,
    pub released: u64,
    pub abandoned: u64,
    pub all_held_retries: u64,
    /// Admitted fans who never got a hold (sold out first, or their window ended).
    pub no_hold: u64,
}

/// The hostile fans and what the servers answered them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Hostile {
    pub fans: u64,
    /// Second tabs (a second join of the same fan): same place, or another one (a violation).
    pub second_tab_same_place: u64,
    pub second_tab_other_place: u64,
    /// Reserves without an admission token: refused `not_admitted`, or accepted (a violation).
    pub unadmitted_refused: u64,
    pub unadmitted_accepted: u64,
    /// Replays of a reserve with the same key and body: the same hold, or not (a violation).
    pub replay_same_hold: u64,
    pub replay_other: u64,
    /// The same key with another body: `idempotency_key_reused`, or anything else.
    pub reused_key_refused: u64,
    pub reused_key_other: u64,
    /// A fresh reserve past the per-fan limit: `limit_exceeded`, or a hold (a violation).
    pub over_limit_refused: u64,
    pub over_limit_accepted: u64,
}

/// CPU and memory of one process over the sale.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProcUsage {
    pub name: String,
    pub pid: u32,
    pub cpu_s: f64,
    /// Share of one CPU over the sale.
    pub cpu_pct: f64,
    pub rss_start_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_end_kib: u64,
}

/// Per second from opening: what the charts show.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Series {
    pub t_s: Vec<f64>,
    pub waiting: Vec<Option<f64>>,
    pub admitted_per_s: Vec<Option<f64>>,
    pub sold: Vec<Option<f64>>,
    pub held: Vec<Option<f64>>,
    pub reserve_p50_ms: Vec<Option<f64>>,
    pub reserve_p99_ms: Vec<Option<f64>>,
    pub confirm_p50_ms: Vec<Option<f64>>,
    pub confirm_p99_ms: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Joins {
    pub ws_fans: u64,
    pub http_fans: u64,
    pub pre_queue_fans: u64,
    pub joined: u64,
    pub failed: BTreeMap<String, u64>,
    /// Joins after opening per second, from the first to the last join answer after opening.
    pub after_open_per_s: f64,
    pub baseline_per_s: Option<f64>,
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Outcome {
    pub stock: u64,
    pub sold_api: i64,
    pub held_end: i64,
    pub available_end: i64,
    pub sold_pg_inventory: Option<i64>,
    pub sold_pg_items: Option<i64>,
    pub opened_at_ms: i64,
    pub open_to_sold_out_s: Option<f64>,
    /// Fans holding more than the per-fan limit in Postgres (must be 0).
    pub pg_fans_over_limit: Option<i64>,
}

/// `--line-only`: the line at scale.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LineFigures {
    /// The longest line the ticks reported, and the line at the end.
    pub waiting_peak: i64,
    pub waiting_end: i64,
    /// Redis' `used_memory` before the first join and with the line full, and per waiter.
    pub redis_used_memory_before: Option<u64>,
    pub redis_used_memory_full: Option<u64>,
    pub redis_bytes_per_waiter: Option<f64>,
    /// `GET /queue/me` (an exact position) for waiters at the head of the line and at its back.
    pub position_head: Percentiles,
    pub position_back: Percentiles,
    /// Admissions per second over the hold after the last join (the line full, nobody
    /// shopping), against the set rate.
    pub hold_from_ms: i64,
    pub hold_to_ms: i64,
    pub admitted_while_full_per_s: f64,
    pub ratio_while_full: f64,
}

/// One queue-server instance's sockets: admission run (the token's Redis time) → `admitted`
/// frame at the fan (ms; Redis and loadtest share the machine's clock).
#[derive(Debug, Clone, Serialize)]
pub struct PushDelay {
    pub queue_url: String,
    pub delay: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct SaleReport {
    pub scenario: &'static str,
    pub run_id: String,
    pub started_at: String,
    pub git_commit: String,
    pub machine: Machine,
    /// The command line's settings, as given.
    pub settings: serde_json::Value,
    pub drop_id: String,
    pub seed_sha256: Option<String>,
    /// The drop's pre-queue seed, revealed at opening.
    pub seed: Option<String>,
    pub outcome: Outcome,
    pub joins: Joins,
    pub admission: AdmissionRate,
    pub admit_baseline_per_s: Option<f64>,
    pub fairness: Fairness,
    pub sold_out: SoldOutNotice,
    pub latency: Latencies,
    /// Per queue-server instance: admission run → `admitted` frame at the fan's socket.
    pub admitted_push: Vec<PushDelay>,
    pub shop: Shop,
    /// Every error answer by `what:code` (`reserve:sold_out`, `join:rate_limited`, ...) and
    /// every request without one (`confirm:timeout`).
    pub errors: BTreeMap<String, u64>,
    pub hostile: Hostile,
    /// `--line-only` runs: the line at scale.
    pub line: Option<LineFigures>,
    pub resources: Vec<ProcUsage>,
    pub series: Series,
    pub checks: Vec<Check>,
    /// Every invariant held (bars are checks too, named `bar: …`; they fail the run only with
    /// `--check`).
    pub invariants_held: bool,
    pub bars_met: bool,
}

/// The invariants and bars, as checks. `bar: …` checks are bars; the rest invariants.
pub fn checks(r: &SaleReport, per_fan_limit: u32) -> Vec<Check> {
    let o = &r.outcome;
    let h = &r.hostile;
    let f = &r.fairness;
    let mut out = Vec::new();
    if r.line.is_none() {
        out.push(Check::new(
            "sold exactly the stock",
            o.sold_api == o.stock as i64,
            format!("sold {} of {}", o.sold_api, o.stock),
        ));
    }
    out.extend([
        Check::new(
            "available + held + sold == stock",
            o.available_end + o.held_end + o.sold_api == o.stock as i64,
            format!(
                "{} + {} + {} (stock {})",
                o.available_end, o.held_end, o.sold_api, o.stock
            ),
        ),
        Check::new(
            "postgres agrees: sum(inventory.sold) and sum(order_items) == API sold",
            o.sold_pg_inventory == Some(o.sold_api) && o.sold_pg_items == Some(o.sold_api),
            format!(
                "inventory {:?}, order_items {:?}, API {}",
                o.sold_pg_inventory, o.sold_pg_items, o.sold_api
            ),
        ),
        Check::new(
            "postgres: no fan past the per-fan limit",
            o.pg_fans_over_limit == Some(0),
            format!(
                "{:?} fans bought more than {per_fan_limit}",
                o.pg_fans_over_limit
            ),
        ),
        Check::new(
            "one place per fan (second tabs)",
            h.second_tab_other_place == 0,
            format!(
                "{} second tabs got the same place, {} another",
                h.second_tab_same_place, h.second_tab_other_place
            ),
        ),
        Check::new(
            "no hold without admission or past the limit; replays hold nothing new",
            h.unadmitted_accepted == 0
                && h.over_limit_accepted == 0
                && h.replay_other == 0
                && h.reused_key_other == 0,
            format!(
                "unadmitted {} refused / {} accepted; past the limit {} / {}; replays {} same / \
                 {} other; reused keys {} refused / {} other",
                h.unadmitted_refused,
                h.unadmitted_accepted,
                h.over_limit_refused,
                h.over_limit_accepted,
                h.replay_same_hold,
                h.replay_other,
                h.reused_key_refused,
                h.reused_key_other
            ),
        ),
    ]);
    if f.pre_queue_fans > 0 {
        out.push(Check::new(
            "pre-queue order is the revealed seed's (τ = 1.0)",
            f.pre_queue_place_mismatches == 0
                && f.tau_pre_queue.is_none_or(|t| t >= 1.0 - 1e-9)
                && f.pre_queue_after_open_fans == 0,
            format!(
                "{} pre-queue fans admitted; {} places differ from HMAC(seed, fan); τ {}; {} \
                 admitted after a post-open fan",
                f.pre_queue_fans,
                f.pre_queue_place_mismatches,
                opt(f.tau_pre_queue, 4),
                f.pre_queue_after_open_fans
            ),
        ));
    }
    out.push(bar(
        format!("bar: τ(join order, admission order) ≥ {BAR_TAU}"),
        f.tau_after_open
            .filter(|_| f.after_open_fans >= MIN_TAU_FANS)
            .map(|t| t >= BAR_TAU),
        format!(
            "τ {} over {} fans admitted after opening",
            opt(f.tau_after_open, 4),
            f.after_open_fans
        ),
    ));
    let a = &r.admission;
    out.push(bar(
        format!("bar: admissions within ±{BAR_ADMIT_RATE_ERROR_PCT} % of the set rate"),
        (a.seconds > 0.0).then(|| (a.ratio - 1.0).abs() * 100.0 <= BAR_ADMIT_RATE_ERROR_PCT),
        format!(
            "{:.2}/s against {:.2}/s ({:.4}×) over {:.1} s where the bucket limited",
            a.rate_per_s, a.set_rate_per_s, a.ratio, a.seconds
        ),
    ));
    if let Some(l) = &r.line {
        out.push(bar(
            format!(
                "bar: admission steady at the head while the line is full (±{BAR_ADMIT_RATE_ERROR_PCT} %)"
            ),
            (l.hold_to_ms > l.hold_from_ms)
                .then_some((l.ratio_while_full - 1.0).abs() * 100.0 <= BAR_ADMIT_RATE_ERROR_PCT),
            format!(
                "{:.2}/s against {:.2}/s ({:.4}×) with {} waiting",
                l.admitted_while_full_per_s, a.set_rate_per_s, l.ratio_while_full, l.waiting_end
            ),
        ));
        return out;
    }
    let s = &r.sold_out;
    out.push(bar(
        format!("bar: every waiting socket told sold_out, p99 ≤ {BAR_SOLD_OUT_P99_MS} ms"),
        (s.sockets_waiting > 0).then_some(
            s.sockets_told == s.sockets_waiting && s.sockets.p99_ms <= BAR_SOLD_OUT_P99_MS,
        ),
        format!(
            "{} of {} waiting sockets told; p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            s.sockets_told, s.sockets_waiting, s.sockets.p50_ms, s.sockets.p99_ms, s.sockets.max_ms
        ),
    ));
    out
}

/// A bar's check: None (nothing to judge) is skipped.
fn bar(name: String, met: Option<bool>, detail: String) -> Check {
    match met {
        Some(pass) => Check::new(name, pass, detail),
        None => Check::skipped(name, format!("nothing to judge: {detail}")),
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
}

/// Whether a check is a bar (as opposed to an invariant).
pub fn is_bar(c: &Check) -> bool {
    c.name.starts_with("bar: ")
}

fn pct_row(out: &mut String, label: &str, p: &Percentiles) {
    let _ = writeln!(
        out,
        "  {label:<22} {:>8} {:>9.1} {:>9.1} {:>9.1}",
        p.count, p.p50_ms, p.p99_ms, p.max_ms
    );
}

/// The text summary.
pub fn render_text(r: &SaleReport) -> String {
    let mut out = String::new();
    let o = &r.outcome;
    let _ = writeln!(
        out,
        "loadtest sale — drop {} · run {} · commit {}",
        r.drop_id, r.run_id, r.git_commit
    );
    let _ = writeln!(
        out,
        "machine: {} CPUs ({}), {} MiB; load {:.2} before, {:.2} after",
        r.machine.cpus,
        r.machine.cpu_model,
        r.machine.mem_total_kib / 1024,
        r.machine.load_before[0],
        r.machine.load_after[0]
    );
    let j = &r.joins;
    let _ = writeln!(
        out,
        "fans: {} on sockets, {} HTTP-only, {} in the pre-queue; {} joined; failed {}",
        j.ws_fans,
        j.http_fans,
        j.pre_queue_fans,
        j.joined,
        counts_line(&j.failed)
    );
    let _ = writeln!(
        out,
        "sold {} of {} (Postgres: inventory {}, order items {}); held {} available {} at the end",
        o.sold_api,
        o.stock,
        opt_i(o.sold_pg_inventory),
        opt_i(o.sold_pg_items),
        o.held_end,
        o.available_end
    );
    let _ = writeln!(
        out,
        "open to sold out: {}",
        o.open_to_sold_out_s
            .map_or("not sold out".to_owned(), |s| format!("{s:.1} s"))
    );
    let a = &r.admission;
    let _ = writeln!(
        out,
        "admission: {:.2}/s where the bucket limited ({:.1} s, {} intervals) against {:.2}/s set: \
         {:.4}×; {} admitted in all{}",
        a.rate_per_s,
        a.seconds,
        a.intervals,
        a.set_rate_per_s,
        a.ratio,
        a.admitted_total,
        r.admit_baseline_per_s
            .map(|b| format!(
                "; the admission script alone admits {b:.0}/s: the set rate is {:.4}× of it",
                a.set_rate_per_s / b
            ))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "joins after opening: {:.0}/s{}",
        j.after_open_per_s,
        match (j.baseline_per_s, j.ratio) {
            (Some(b), Some(x)) => format!(" = {x:.3}× the join script alone ({b:.0}/s)"),
            _ => String::new(),
        }
    );
    let f = &r.fairness;
    let _ = writeln!(
        out,
        "fairness: τ(join, admission) {} over {} fans after opening (τ join vs place {}); \
         pre-queue {} fans, τ vs the seed {}, {} places off the seed",
        opt(f.tau_after_open, 4),
        f.after_open_fans,
        opt(f.tau_join_vs_place, 4),
        f.pre_queue_fans,
        opt(f.tau_pre_queue, 4),
        f.pre_queue_place_mismatches
    );
    let s = &r.sold_out;
    let _ = writeln!(
        out,
        "sold_out after the last sale: sockets {} of {} told, p50 {:.0} ms p99 {:.0} ms max {:.0} \
         ms; HTTP pollers {} of {} told, p50 {:.0} ms p99 {:.0} ms",
        s.sockets_told,
        s.sockets_waiting,
        s.sockets.p50_ms,
        s.sockets.p99_ms,
        s.sockets.max_ms,
        s.http_told,
        s.http_waiting,
        s.http.p50_ms,
        s.http.p99_ms
    );
    let _ = writeln!(
        out,
        "latency (ms)              count       p50       p99       max"
    );
    let l = &r.latency;
    pct_row(&mut out, "join (HTTP)", &l.join_http);
    pct_row(&mut out, "join (socket)", &l.join_ws);
    pct_row(&mut out, "admitted → hold", &l.admitted_to_hold);
    pct_row(&mut out, "reserve", &l.reserve);
    pct_row(&mut out, "confirm", &l.confirm);
    for p in &r.admitted_push {
        pct_row(&mut out, "admission → socket", &p.delay);
        if r.admitted_push.len() > 1 {
            let _ = writeln!(out, "    on {}", p.queue_url);
        }
    }
    let sh = &r.shop;
    let _ = writeln!(
        out,
        "shop: {} admitted, {} holds: {} paid, {} released, {} abandoned; {} without a hold; \
         {} all_held retries",
        sh.admitted, sh.holds, sh.paid, sh.released, sh.abandoned, sh.no_hold, sh.all_held_retries
    );
    let _ = writeln!(out, "errors: {}", counts_line(&r.errors));
    let h = &r.hostile;
    let _ = writeln!(
        out,
        "hostile fans: {}; second tabs {} same place / {} other; unadmitted reserves {} refused \
         / {} accepted; replays {} same hold / {} other; reused keys {} refused / {} other; \
         past the limit {} refused / {} accepted",
        h.fans,
        h.second_tab_same_place,
        h.second_tab_other_place,
        h.unadmitted_refused,
        h.unadmitted_accepted,
        h.replay_same_hold,
        h.replay_other,
        h.reused_key_refused,
        h.reused_key_other,
        h.over_limit_refused,
        h.over_limit_accepted
    );
    if let Some(l) = &r.line {
        let _ = writeln!(
            out,
            "line: {} waiting at most, {} at the end; Redis used_memory {} → {} bytes: {} bytes \
             per waiter",
            l.waiting_peak,
            l.waiting_end,
            opt_u(l.redis_used_memory_before),
            opt_u(l.redis_used_memory_full),
            opt(l.redis_bytes_per_waiter, 0)
        );
        let _ = writeln!(
            out,
            "line: /queue/me at the head p50 {:.1} ms p99 {:.1} ms; at the back p50 {:.1} ms p99 \
             {:.1} ms; admitted {:.2}/s while full ({:.4}× the set rate)",
            l.position_head.p50_ms,
            l.position_head.p99_ms,
            l.position_back.p50_ms,
            l.position_back.p99_ms,
            l.admitted_while_full_per_s,
            l.ratio_while_full
        );
    }
    for p in &r.resources {
        let _ = writeln!(
            out,
            "{} (pid {}): {:.1} s CPU ({:.0} % of a CPU); RSS {} → peak {} → {} MiB",
            p.name,
            p.pid,
            p.cpu_s,
            p.cpu_pct,
            p.rss_start_kib / 1024,
            p.rss_peak_kib / 1024,
            p.rss_end_kib / 1024
        );
    }
    for c in &r.checks {
        let mark = match c.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skipped => "SKIP",
        };
        let _ = writeln!(out, "{mark}  {} — {}", c.name, c.detail);
    }
    let _ = writeln!(
        out,
        "{}",
        match (r.invariants_held, r.bars_met) {
            (true, true) => "every invariant held; every bar met",
            (true, false) => "every invariant held; a bar was missed",
            (false, _) => "AN INVARIANT WAS BROKEN",
        }
    );
    out
}

fn opt_u(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| v.to_string())
}

fn opt_i(v: Option<i64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| v.to_string())
}

fn counts_line(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Escapes text for HTML and SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Chart size in SVG user units.
const CHART_W: f64 = 720.0;
const CHART_H: f64 = 240.0;
const PAD_L: f64 = 64.0;
const PAD_R: f64 = 16.0;
const PAD_T: f64 = 28.0;
const PAD_B: f64 = 36.0;
const NICE_STEPS: [f64; 9] = [1.0, 1.2, 1.6, 2.0, 2.4, 3.2, 4.0, 6.0, 8.0];
/// Where the legends start right of the plot's left edge, and their spacing.
const LEGEND_X: f64 = 230.0;
const LEGEND_STEP: f64 = 110.0;

/// A "nice" upper bound for an axis at or above `v`: one of [`NICE_STEPS`] × 10ⁿ, so the plot
/// uses most of its width and its four gridlines fall on round numbers.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    NICE_STEPS
        .iter()
        .map(|m| m * mag)
        .find(|m| *m >= v)
        .unwrap_or(10.0 * mag)
}

/// One line chart as inline SVG: `series` are (name, colour, y per x), gaps where None.
pub fn svg_chart(
    title: &str,
    y_unit: &str,
    xs: &[f64],
    series: &[(&str, &str, &[Option<f64>])],
) -> String {
    let x_max = nice_max(xs.iter().copied().fold(0.0, f64::max));
    let y_max = nice_max(
        series
            .iter()
            .flat_map(|(_, _, ys)| ys.iter().flatten().copied())
            .fold(0.0, f64::max),
    );
    let (pw, ph) = (CHART_W - PAD_L - PAD_R, CHART_H - PAD_T - PAD_B);
    let px = |x: f64| PAD_L + x / x_max * pw;
    let py = |y: f64| PAD_T + ph - y / y_max * ph;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{t}"><title>{t}</title><text x="{PAD_L}" y="18" class="title">{t}</text>"#,
        t = esc(title)
    );
    for k in 0..=4 {
        let y = y_max * f64::from(k) / 4.0;
        let _ = write!(
            out,
            r#"<line class="grid" x1="{PAD_L}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}"/><text class="axis" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            PAD_L + pw,
            PAD_L - 6.0,
            py(y) + 4.0,
            short(y),
            yy = py(y)
        );
        let x = x_max * f64::from(k) / 4.0;
        let _ = write!(
            out,
            r#"<text class="axis" x="{:.1}" y="{:.1}" text-anchor="middle">{} s</text>"#,
            px(x),
            CHART_H - 14.0,
            short(x)
        );
    }
    let _ = write!(
        out,
        r#"<text class="axis" x="8" y="{:.1}">{}</text>"#,
        PAD_T - 10.0,
        esc(y_unit)
    );
    for (k, (name, colour, ys)) in series.iter().enumerate() {
        let mut d = String::new();
        let mut pen_up = true;
        for (x, y) in xs.iter().zip(ys.iter()) {
            match y {
                Some(y) if y.is_finite() => {
                    let _ = write!(
                        d,
                        "{}{:.1},{:.1} ",
                        if pen_up { "M" } else { "L" },
                        px(*x),
                        py(*y)
                    );
                    pen_up = false;
                }
                _ => pen_up = true,
            }
        }
        let _ = write!(
            out,
            r#"<path class="series" d="{}" stroke="{colour}" fill="none" stroke-width="1.6"><title>{}</title></path>"#,
            d.trim_end(),
            esc(name)
        );
        // Legends in a row right of the title, clear of the plot.
        let lx = PAD_L + LEGEND_X + k as f64 * LEGEND_STEP;
        let _ = write!(
            out,
            r#"<rect x="{lx:.1}" y="10" width="12" height="3" fill="{colour}"/><text class="legend" x="{:.1}" y="15">{}</text>"#,
            lx + 16.0,
            esc(name)
        );
    }
    out.push_str("</svg>");
    out
}

/// 1234 → "1234", 12345 → "12.3k", 0.5 → "0.5".
fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The whole report as one self-contained HTML page: the text summary, the checks and four
/// SVG charts; its one small script only marks rows on hover and records script errors in
/// `window.saleReportErrors` (the browser test reads it).
pub fn render_html(r: &SaleReport) -> String {
    let s = &r.series;
    let charts = [
        svg_chart(
            "Line length",
            "waiting",
            &s.t_s,
            &[("waiting", "#1f77b4", &s.waiting)],
        ),
        svg_chart(
            "Admitted per second",
            "fans/s",
            &s.t_s,
            &[("admitted/s", "#2ca02c", &s.admitted_per_s)],
        ),
        svg_chart(
            "Sold and held over time",
            "units",
            &s.t_s,
            &[("sold", "#d62728", &s.sold), ("held", "#ff7f0e", &s.held)],
        ),
        svg_chart(
            "Latency percentiles over time",
            "ms",
            &s.t_s,
            &[
                ("reserve p50", "#9467bd", &s.reserve_p50_ms),
                ("reserve p99", "#8c564b", &s.reserve_p99_ms),
                ("confirm p50", "#17becf", &s.confirm_p50_ms),
                ("confirm p99", "#e377c2", &s.confirm_p99_ms),
            ],
        ),
    ];
    let mut rows = String::new();
    for c in &r.checks {
        let (class, mark) = match c.verdict {
            Verdict::Pass => ("pass", "PASS"),
            Verdict::Fail => ("fail", "FAIL"),
            Verdict::Skipped => ("skip", "SKIP"),
        };
        let _ = write!(
            rows,
            r#"<tr class="{class}"><td>{mark}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&c.name),
            esc(&c.detail)
        );
    }
    let verdict = if r.invariants_held && r.bars_met {
        "Every invariant held; every bar met."
    } else if r.invariants_held {
        "Every invariant held; a bar was missed."
    } else {
        "An invariant was broken."
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Floodgate sale report — {drop}</title>
<script>window.saleReportErrors=[];window.addEventListener('error',function(e){{window.saleReportErrors.push(String(e.message));}});</script>
<style>
body{{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:980px;padding:0 12px;color:#222}}
h1{{font-size:20px}} .verdict{{font-weight:600}}
pre{{background:#f6f6f6;padding:12px;overflow-x:auto;font-size:12px}}
table{{border-collapse:collapse;width:100%}} td{{border-bottom:1px solid #ddd;padding:4px 6px;vertical-align:top}}
tr.pass td:first-child{{color:#2a7a2a}} tr.fail td:first-child{{color:#b00;font-weight:700}} tr.skip td:first-child{{color:#888}}
tr.hover{{background:#fff8d6}}
.charts{{display:grid;grid-template-columns:1fr;gap:16px}}
svg.chart{{width:100%;height:auto;background:#fff;border:1px solid #e4e4e4}}
svg .grid{{stroke:#eee}} svg .axis,svg .legend{{font-size:11px;fill:#555}} svg .title{{font-size:13px;font-weight:600;fill:#222}}
</style></head>
<body>
<h1>Floodgate sale report</h1>
<p>Drop <code>{drop}</code>, run <code>{run}</code>, commit <code>{commit}</code>, started {started}.</p>
<p class="verdict">{verdict}</p>
<div class="charts">{charts}</div>
<h2>Checks</h2>
<table id="checks">{rows}</table>
<h2>Summary</h2>
<pre>{text}</pre>
<script>
document.querySelectorAll('#checks tr').forEach(function(tr){{
  tr.addEventListener('mouseenter',function(){{tr.classList.add('hover');}});
  tr.addEventListener('mouseleave',function(){{tr.classList.remove('hover');}});
}});
document.body.dataset.charts=String(document.querySelectorAll('svg.chart').length);
</script>
</body></html>
"#,
        drop = esc(&r.drop_id),
        run = esc(&r.run_id),
        commit = esc(&r.git_commit),
        started = esc(&r.started_at),
        charts = charts.join("\n"),
        text = esc(&render_text(r)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kendall_tau_b_of_orders() {
        let same: Vec<(i64, i64)> = (0..50).map(|i| (i, i * 3)).collect();
        assert_eq!(kendall_tau_b(&same), Some(1.0));
        let reversed: Vec<(i64, i64)> = (0..50).map(|i| (i, -i)).collect();
        assert_eq!(kendall_tau_b(&reversed), Some(-1.0));
        // One swap among 4: 5 concordant, 1 discordant → 4/6.
        let one_swap = [(1, 1), (2, 3), (3, 2), (4, 4)];
        assert!((kendall_tau_b(&one_swap).unwrap() - 4.0 / 6.0).abs() < 1e-12);
        // Ties in y (one admission run) don't count against the order.
        let batches = [(1, 10), (2, 10), (3, 20), (4, 20)];
        let t = kendall_tau_b(&batches).unwrap();
        assert!(t > 0.8 && t < 1.0, "{t}");
        assert_eq!(kendall_tau_b(&[(1, 1)]), None);
        assert_eq!(kendall_tau_b(&[(1, 1), (1, 2)]), None);
    }

    #[test]
    fn admission_order_is_by_run_then_place() {
        // Joined in order 1..=4; admitted in one run (at 100) in place order, the last alone
        // later: no disorder, even though three share a run.
        let fans = [(1, 100, 11), (2, 100, 12), (3, 100, 13), (4, 200, 14)];
        let ranks = admission_ranks(&fans);
        assert_eq!(ranks, [(1, 0), (2, 1), (3, 2), (4, 3)]);
        assert_eq!(kendall_tau_b(&ranks), Some(1.0));
        // With the run's ties left in, τ-b would read 0.41.
        let tied: Vec<(i64, i64)> = fans.iter().map(|f| (f.0, f.1)).collect();
        assert!(kendall_tau_b(&tied).unwrap() < 0.9);
        // A fan who joined first but was admitted after a later one counts against.
        let swapped = admission_ranks(&[(1, 100, 12), (2, 100, 11), (3, 200, 13)]);
        assert!(kendall_tau_b(&swapped).unwrap() < 1.0);
    }

    fn tick(at_ms: i64, total: i64, waiting: i64, state: &str) -> TickSeen {
        TickSeen {
            at_ms,
            admitted_total: Some(total),
            sockets: 1,
            first_us: at_ms * 1000,
            last_us: at_ms * 1000,
            bytes: 100,
            waiting: Some(waiting),
            state: Some(state.into()),
        }
    }

    #[test]
    fn admission_rate_counts_only_bucket_limited_intervals() {
        let ticks = [
            tick(0, 0, 1000, "pre_queue"),
            tick(1000, 50, 950, "open"), // the burst
            tick(2000, 60, 940, "open"), // skipped: within skip_ms of the first open tick
            tick(3000, 70, 930, "open"),
            tick(4000, 80, 920, "open"),
            tick(5000, 85, 915, "all_held"),
            tick(6000, 90, 910, "open"),
            tick(7000, 100, 900, "open"), // stock too low before it
            tick(8000, 110, 0, "open"),   // nobody left waiting
        ];
        let samples = [
            Sample {
                at_ms: 0,
                available: 500,
                held: 0,
                sold: 0,
            },
            Sample {
                at_ms: 6500,
                available: 5,
                held: 400,
                sold: 95,
            },
        ];
        // 10 units wanted by active sessions, 10 more for a second at 10/s: 20 ≤ 500 but > 5.
        let demand = |_: i64| 10;
        let a = admission_rate(&ticks, &samples, 10.0, 1500, 1, &demand);
        // Counted: 2000→3000, 3000→4000 (10 + 10 in 2 s).
        assert_eq!((a.intervals, a.admitted), (2, 20));
        assert!(
            (a.rate_per_s - 10.0).abs() < 1e-9 && (a.ratio - 1.0).abs() < 1e-9,
            "{a:?}"
        );
        assert_eq!(a.admitted_total, 110);
        // Sessions wanting all the stock: nothing is bucket-limited.
        let all = |_: i64| 495;
        assert_eq!(
            admission_rate(&ticks, &samples, 10.0, 1500, 1, &all).intervals,
            0
        );
        let none = admission_rate(&ticks[..1], &samples, 10.0, 0, 1, &demand);
        assert_eq!((none.intervals, none.ratio), (0, 0.0));
    }

    #[test]
    fn sessions_count_as_the_admission_script_counts_them() {
        let s = |hold_ms, end| SessionSeen {
            admitted_ms: 1000,
            shop_end_ms: 61_000,
            hold_ms,
            hold_expires_ms: Some(11_000),
            end,
        };
        let at = |s: &SessionSeen, t| s.demand_at(t, 1, 60_000);
        let waiting = s(None, SessionEnd::NoHold);
        assert_eq!(
            (at(&waiting, 999), at(&waiting, 1000), at(&waiting, 61_000)),
            (0, 1, 0)
        );
        let paid = s(Some(2000), SessionEnd::Paid { at_ms: 3000 });
        assert_eq!(
            (at(&paid, 1500), at(&paid, 2500), at(&paid, 3000)),
            (1, 0, 0)
        );
        let released = s(Some(2000), SessionEnd::Released { at_ms: 3000 });
        assert_eq!(
            (
                at(&released, 2500),
                at(&released, 3000),
                at(&released, 61_000)
            ),
            (0, 1, 0)
        );
        let abandoned = s(Some(2000), SessionEnd::Abandoned);
        assert_eq!(
            (
                at(&abandoned, 5000),
                at(&abandoned, 11_000),
                at(&abandoned, 71_000)
            ),
            (0, 1, 0)
        );
        // A limit of 2: a paid unit leaves one to want until the shop end.
        assert_eq!(paid.demand_at(4000, 2, 60_000), 1);
    }

    #[test]
    fn charts_are_svg_with_gaps_and_escaped_names() {
        let xs = [0.0, 1.0, 2.0, 3.0];
        let ys = [Some(1.0), None, Some(3.0), Some(2.5)];
        let svg = svg_chart("A <b>", "u", &xs, &[("s&p", "#000", &ys)]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("A &lt;b&gt;") && svg.contains("s&amp;p"));
        // Two runs of the line: a move after the gap.
        let path = svg.split("d=\"").nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(path.matches('M').count(), 2, "{path}");
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 8.0);
        assert_eq!(nice_max(56.0), 60.0);
        assert_eq!(nice_max(1250.0), 1600.0);
        assert_eq!(nice_max(9.0), 10.0);
    }
}
