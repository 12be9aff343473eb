//! The waiting-room scenario's figures, computed from what the client processes saw (pure
//! functions over their reports), and its report: text for people, JSON for scripts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use crate::invariants::{Check, Verdict};
use crate::stats::{new_histogram, Percentiles};
use crate::ws_clients::{AdmittedSeen, ChildReport, TickSeen};

/// The waiting room's bars (docs/BENCHMARKS.md, Bars).
pub const BAR_RSS_PER_SOCKET_KIB: f64 = 10.0;
pub const GOAL_RSS_PER_SOCKET_KIB: f64 = 8.0;
pub const BAR_TICK_TO_LAST_MS: f64 = 500.0;
pub const BAR_ADMIT_RATE_ERROR_PCT: f64 = 2.0;

/// One tick, merged over every client process: what one child saw, summed (sockets) and
/// widened (first and last receive times) over all of them.
pub type MergedTick = TickSeen;

/// Every tick any socket received, in time order.
pub fn merge_ticks(reports: &[ChildReport]) -> Vec<MergedTick> {
    let mut by_at: BTreeMap<i64, MergedTick> = BTreeMap::new();
    for t in reports.iter().flat_map(|r| &r.ticks) {
        by_at
            .entry(t.at_ms)
            .and_modify(|m| {
                m.sockets += t.sockets;
                m.first_us = m.first_us.min(t.first_us);
                m.last_us = m.last_us.max(t.last_us);
                m.admitted_total = m.admitted_total.max(t.admitted_total);
                m.bytes = m.bytes.max(t.bytes);
            })
            .or_insert_with(|| t.clone());
    }
    by_at.into_values().collect()
}

/// One round of exact positions, merged over every client process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergedRound {
    pub positions: u64,
    pub first_us: i64,
    pub last_us: i64,
}

/// The children's bursts of positions, merged where they overlap or lie within `gap_us` of each
/// other (each child hears every round; the merged round spans all of them).
pub fn merge_rounds(reports: &[ChildReport], gap_us: i64) -> Vec<MergedRound> {
    let mut bursts: Vec<&crate::ws_clients::RoundSeen> =
        reports.iter().flat_map(|r| &r.rounds).collect();
    bursts.sort_by_key(|r| r.first_us);
    let mut out: Vec<MergedRound> = Vec::new();
    for b in bursts {
        match out.last_mut() {
            Some(m) if b.first_us <= m.last_us + gap_us => {
                m.positions += b.positions;
                m.last_us = m.last_us.max(b.last_us);
            }
            _ => out.push(MergedRound {
                positions: b.positions,
                first_us: b.first_us,
                last_us: b.last_us,
            }),
        }
    }
    out
}

fn record_us(h: &mut hdrhistogram::Histogram<u64>, us: i64) {
    // ≥ 1: the histogram's lowest value (a delay can't be negative on one clock; `at_ms` is
    // truncated to the millisecond, so it reads up to 1 ms long, never short).
    h.saturating_record(us.max(1) as u64);
}

/// How one phase's ticks reached the sockets.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Delivery {
    pub ticks: u64,
    /// Fewest and most sockets that received one tick.
    pub sockets_min: u64,
    pub sockets_max: u64,
    /// From the tick's `at_ms` to the LAST socket receiving it: the figure the bar is about.
    pub to_last: Percentiles,
    /// From `at_ms` to the first socket receiving it.
    pub to_first: Percentiles,
    /// Between consecutive ticks' `at_ms`: the tick loop's real cadence.
    pub interval: Percentiles,
    /// The tick frame's size.
    pub bytes: usize,
}

/// Delivery of the ticks whose `at_ms` falls in `[from_ms, to_ms)`.
pub fn delivery(ticks: &[MergedTick], from_ms: i64, to_ms: i64) -> Delivery {
    let window: Vec<&MergedTick> = ticks
        .iter()
        .filter(|t| (from_ms..to_ms).contains(&t.at_ms))
        .collect();
    let (mut to_last, mut to_first, mut interval) =
        (new_histogram(), new_histogram(), new_histogram());
    for t in &window {
        record_us(&mut to_last, t.last_us - t.at_ms * 1000);
        record_us(&mut to_first, t.first_us - t.at_ms * 1000);
    }
    for pair in window.windows(2) {
        record_us(&mut interval, (pair[1].at_ms - pair[0].at_ms) * 1000);
    }
    Delivery {
        ticks: window.len() as u64,
        sockets_min: window.iter().map(|t| t.sockets).min().unwrap_or(0),
        sockets_max: window.iter().map(|t| t.sockets).max().unwrap_or(0),
        to_last: Percentiles::of(&to_last),
        to_first: Percentiles::of(&to_first),
        interval: Percentiles::of(&interval),
        bytes: window.iter().map(|t| t.bytes).max().unwrap_or(0),
    }
}

/// The slow cadence: rounds of exact `position` messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rounds {
    pub rounds: u64,
    /// Fewest and most positions in one round: one per socket, so more than the sockets means
    /// rounds ran into each other with no silence between them.
    pub positions_min: u64,
    pub positions_max: u64,
    /// From the `at_ms` of the last tick before a round's first position to its last position.
    pub to_last: Percentiles,
    /// From the first socket getting its position to the last.
    pub spread: Percentiles,
    /// Between consecutive rounds' first positions: the cadence as it ran.
    pub interval: Percentiles,
    /// Positions received per second over the window, whatever the rounds: with rounds back to
    /// back, a round over N sockets takes N / this.
    pub positions_per_s: f64,
    /// Some round held more positions than there were sockets: rounds ran into each other with
    /// no silence between them (a round took longer than `queue.position_interval_ms`), and the
    /// per-round figures describe runs of rounds, not rounds.
    pub back_to_back: bool,
}

/// Positions per second summed over the children's per-second counts in `[from_ms, to_ms)`
/// (whole seconds: the window is cut to the seconds it covers entirely).
pub fn positions_per_s(reports: &[ChildReport], from_ms: i64, to_ms: i64) -> f64 {
    let (from_s, to_s) = (
        from_ms.div_euclid(1000) + 1,
        to_ms.div_euclid(1000), // exclusive
    );
    if to_s <= from_s {
        return 0.0;
    }
    let n: u64 = reports
        .iter()
        .flat_map(|r| &r.positions_per_s)
        .filter(|(s, _)| (from_s..to_s).contains(s))
        .map(|(_, n)| n)
        .sum();
    n as f64 / (to_s - from_s) as f64
}

/// Rounds that overlap `[from_ms, to_ms)`; `sockets` tells a round from rounds run together;
/// `positions_per_s` from [`positions_per_s`].
pub fn position_rounds(
    rounds: &[MergedRound],
    ticks: &[MergedTick],
    from_ms: i64,
    to_ms: i64,
    sockets: u64,
    positions_per_s: f64,
) -> Rounds {
    let window: Vec<&MergedRound> = rounds
        .iter()
        .filter(|r| r.first_us < to_ms * 1000 && r.last_us >= from_ms * 1000)
        .collect();
    let (mut to_last, mut spread, mut interval) =
        (new_histogram(), new_histogram(), new_histogram());
    for r in &window {
        let before = ticks.partition_point(|t| t.at_ms * 1000 <= r.first_us);
        if let Some(t) = before.checked_sub(1).map(|i| &ticks[i]) {
            record_us(&mut to_last, r.last_us - t.at_ms * 1000);
        }
        record_us(&mut spread, r.last_us - r.first_us);
    }
    for pair in window.windows(2) {
        record_us(&mut interval, pair[1].first_us - pair[0].first_us);
    }
    let positions_max = window.iter().map(|r| r.positions).max().unwrap_or(0);
    Rounds {
        rounds: window.len() as u64,
        positions_min: window.iter().map(|r| r.positions).min().unwrap_or(0),
        positions_max,
        to_last: Percentiles::of(&to_last),
        spread: Percentiles::of(&spread),
        interval: Percentiles::of(&interval),
        positions_per_s,
        back_to_back: positions_max > sockets,
    }
}

/// Admissions counted from the ticks' `admitted_total` over a window timed by their `at_ms`
/// (Redis' clock), against the set rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Admission {
    pub rate_per_s: f64,
    pub window_from_ms: i64,
    pub window_to_ms: i64,
    pub window_s: f64,
    pub admitted: i64,
    pub expected: f64,
    /// admitted / expected.
    pub ratio: f64,
    pub per_minute: f64,
}

/// From the first tick at or after `start_ms` to the last tick at most `window_s` later.
/// None when fewer than two ticks with an `admitted_total` fall in it.
pub fn admission(
    ticks: &[MergedTick],
    start_ms: i64,
    window_s: f64,
    rate_per_s: f64,
) -> Option<Admission> {
    let counted: Vec<(i64, i64)> = ticks
        .iter()
        .filter_map(|t| Some((t.at_ms, t.admitted_total?)))
        .filter(|(at, _)| *at >= start_ms)
        .collect();
    let &(from_ms, from_total) = counted.first()?;
    let end_ms = from_ms + (window_s * 1000.0) as i64;
    let &(to_ms, to_total) = counted.iter().rev().find(|(at, _)| *at <= end_ms)?;
    if to_ms <= from_ms {
        return None;
    }
    let secs = (to_ms - from_ms) as f64 / 1000.0;
    let admitted = to_total - from_total;
    let expected = rate_per_s * secs;
    Some(Admission {
        rate_per_s,
        window_from_ms: from_ms,
        window_to_ms: to_ms,
        window_s: secs,
        admitted,
        expected,
        ratio: admitted as f64 / expected,
        per_minute: admitted as f64 * 60.0 / secs,
    })
}

/// Whether fans were admitted in the order of their places.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Order {
    /// `admitted` messages received.
    pub admitted_seen: u64,
    /// Of them, attributed to the tick that admitted them.
    pub attributed: u64,
    /// Ticks that admitted at least one of them.
    pub batches: u64,
    /// Consecutive batches where some place of the earlier isn't below every place of the later.
    pub batches_out_of_order: u64,
    /// Batches whose size differs from the tick's rise in `admitted_total`.
    pub batch_size_mismatches: u64,
    /// Tokens whose place differs from the socket's `position` place.
    pub place_mismatches: u64,
    /// Tokens without a readable place.
    pub places_missing: u64,
    pub first_violation: Option<String>,
}

/// Groups admitted fans by the tick that admitted them — the first tick after the last one
/// their socket saw — and checks the batches' places increase from tick to tick (inside one
/// tick's batch they may come in any order).
pub fn admission_order(ticks: &[MergedTick], admitted: &[AdmittedSeen]) -> Order {
    let mut order = Order {
        admitted_seen: admitted.len() as u64,
        ..Order::default()
    };
    let mut batches: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for a in admitted {
        if let (Some(p), Some(s)) = (a.place, a.place_seen) {
            order.place_mismatches += u64::from(p != s);
        }
        let Some(place) = a.place else {
            order.places_missing += 1;
            continue;
        };
        let Some(after) = a.after_tick_ms else {
            continue;
        };
        let next = ticks.partition_point(|t| t.at_ms <= after);
        let Some(tick) = ticks.get(next) else {
            continue;
        };
        order.attributed += 1;
        batches.entry(tick.at_ms).or_default().push(place);
    }
    order.batches = batches.len() as u64;
    let by_at: BTreeMap<i64, usize> = ticks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.at_ms, i))
        .collect();
    for (at, places) in &batches {
        let i = by_at[at];
        let rise = i
            .checked_sub(1)
            .and_then(|p| Some(ticks[i].admitted_total? - ticks[p].admitted_total?));
        if rise.is_some_and(|r| r != places.len() as i64) {
            order.batch_size_mismatches += 1;
        }
    }
    let spans: Vec<(i64, i64, i64)> = batches
        .iter()
        .map(|(at, p)| {
            let set: BTreeSet<i64> = p.iter().copied().collect();
            let (lo, hi) = (set.first().copied(), set.last().copied());
            (*at, lo.unwrap_or(0), hi.unwrap_or(0))
        })
        .collect();
    for pair in spans.windows(2) {
        let ((at0, _, hi0), (at1, lo1, _)) = (pair[0], pair[1]);
        if hi0 >= lo1 {
            order.batches_out_of_order += 1;
            order.first_violation.get_or_insert_with(|| {
                format!("tick at {at0} admitted place {hi0}, the next (at {at1}) place {lo1}")
            });
        }
    }
    order
}

/// CPU over the steady phase: the machine's busy share, and per process the share of one CPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cpu {
    pub machine_busy_pct: f64,
    pub server_pct: f64,
    pub clients_pct: f64,
    pub redis_pct: Option<f64>,
}

/// One server's phase: sockets opened, its memory, and the steady phase's tick delivery.
#[derive(Debug, Clone, Serialize)]
pub struct ServerPhase {
    pub server: &'static str,
    pub pid: u32,
    pub sockets: usize,
    pub opened: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    pub connect_s: f64,
    pub rss_before_kib: u64,
    pub rss_open_kib: u64,
    pub rss_end_kib: u64,
    /// Sockets open (as the client processes last reported, ≤ 0.5 s before) when the "all open"
    /// RSS was read, and at the end of the steady phase: fewer than `opened` means the server
    /// closed sockets (dropped as slow clients, most likely), and the RSS figures are not per
    /// open socket any more.
    pub open_at_rss: u64,
    pub open_at_end: u64,
    /// (RSS with every socket open − before) / sockets opened.
    pub rss_per_socket_kib: f64,
    /// The same at the end of the steady phase (write buffers and queues have been used).
    pub rss_per_socket_end_kib: f64,
    pub steady_s: f64,
    pub steady: Delivery,
    pub cpu: Cpu,
    pub closed_by_server: u64,
    pub read_errors: u64,
    pub bad_frames: u64,
    pub dropped_records: u64,
    pub frames_by_type: BTreeMap<String, u64>,
}

impl ServerPhase {
    /// The larger of the two per-socket figures: the one the bar is held to.
    pub fn rss_per_socket_worst_kib(&self) -> f64 {
        self.rss_per_socket_kib.max(self.rss_per_socket_end_kib)
    }
}

/// Per-socket RSS in KiB; 0 with no socket.
pub fn per_socket_kib(before_kib: u64, after_kib: u64, sockets: u64) -> f64 {
    if sockets == 0 {
        return 0.0;
    }
    (after_kib as f64 - before_kib as f64) / sockets as f64
}

/// Sums of the child reports' counters.
pub fn sum_counters(reports: &[ChildReport]) -> (u64, u64, u64, u64, BTreeMap<String, u64>) {
    let mut frames = BTreeMap::new();
    let (mut closed, mut errors, mut bad, mut dropped) = (0, 0, 0, 0);
    for r in reports {
        closed += r.closed_by_server;
        errors += r.read_errors;
        bad += r.bad_frames;
        dropped += r.dropped_records;
        for (k, v) in &r.frames_by_type {
            *frames.entry(k.clone()).or_insert(0) += v;
        }
    }
    (closed, errors, bad, dropped, frames)
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_kib: u64,
    pub load_before: [f64; 3],
    pub load_after: [f64; 3],
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Settings {
    pub rate_per_s: f64,
    pub burst: u64,
    pub max_active: u64,
    pub stock: u64,
    pub per_fan_limit: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueReport {
    pub scenario: &'static str,
    pub booking_url: String,
    pub queue_url: String,
    pub drop_id: String,
    pub drop_created: bool,
    pub fans: usize,
    pub client_procs: usize,
    pub sockets_per_addr: usize,
    pub source_addrs: usize,
    pub settings: Settings,
    pub machine: Machine,
    pub queue: ServerPhase,
    pub baseline: Option<ServerPhase>,
    /// Exact-position rounds during the steady phase.
    pub positions: Rounds,
    /// Tick delivery while admitting (sockets leave as their fans are admitted).
    pub admitting: Delivery,
    pub admission: Option<Admission>,
    /// Admissions by the ticks' counts from resuming to the end, vs `admitted` messages seen.
    pub admissions_by_ticks: i64,
    pub order: Order,
    pub checks: Vec<Check>,
    /// Every bar met.
    pub passed: bool,
}

/// The bars, as checks.
pub fn checks(r: &QueueReport) -> Vec<Check> {
    let q = &r.queue;
    let n = q.sockets as u64;
    let mut out = vec![Check::new(
        "every socket open through the steady phase",
        q.opened == n && q.open_at_rss == n && q.open_at_end == n,
        format!(
            "{} of {} opened{}; {} open at the RSS reading, {} at the end of the steady phase{}",
            q.opened,
            q.sockets,
            if q.failures.is_empty() {
                String::new()
            } else {
                format!(" (failed: {})", counts_line(&q.failures))
            },
            q.open_at_rss,
            q.open_at_end,
            if q.open_at_end < q.opened {
                format!(
                    "; the server closed {} (see floodgate_queue_slow_clients_dropped_total)",
                    q.opened - q.open_at_end
                )
            } else {
                String::new()
            }
        ),
    )];
    let rss = q.rss_per_socket_worst_kib();
    out.push(Check::new(
        format!("RSS per socket ≤ {BAR_RSS_PER_SOCKET_KIB} KiB (goal {GOAL_RSS_PER_SOCKET_KIB})"),
        q.opened > 0 && rss <= BAR_RSS_PER_SOCKET_KIB,
        format!(
            "{rss:.2} KiB ({:.2} all open, {:.2} after the steady phase)",
            q.rss_per_socket_kib, q.rss_per_socket_end_kib
        ),
    ));
    let d = &q.steady;
    // A tick counts only if it reached every socket: a fast tick to the few sockets the server
    // kept is no figure for N.
    out.push(Check::new(
        format!("tick to the last of all sockets, p99 ≤ {BAR_TICK_TO_LAST_MS} ms"),
        d.ticks > 0 && d.sockets_min == n && d.to_last.p99_ms <= BAR_TICK_TO_LAST_MS,
        format!(
            "p99 {:.1} ms, max {:.1} ms over {} ticks to {}–{} of {} sockets",
            d.to_last.p99_ms, d.to_last.max_ms, d.ticks, d.sockets_min, d.sockets_max, n
        ),
    ));
    out.push(match &r.admission {
        Some(a) => Check::new(
            format!("admissions within ±{BAR_ADMIT_RATE_ERROR_PCT} % of the set rate"),
            ((a.ratio - 1.0) * 100.0).abs() <= BAR_ADMIT_RATE_ERROR_PCT,
            format!(
                "{} in {:.1} s = {:.1}/min vs {:.1}/min set: {:.4}×",
                a.admitted,
                a.window_s,
                a.per_minute,
                a.rate_per_s * 60.0,
                a.ratio
            ),
        ),
        None => Check::new(
            format!("admissions within ±{BAR_ADMIT_RATE_ERROR_PCT} % of the set rate"),
            false,
            "no admission window measured (too few ticks after admission resumed)",
        ),
    });
    let o = &r.order;
    out.push(if o.attributed == 0 {
        Check::skipped(
            "admission in place order",
            "no admitted fan could be attributed",
        )
    } else {
        Check::new(
            "admission in place order",
            o.batches_out_of_order == 0 && o.place_mismatches == 0,
            format!(
                "{} batches, {} out of order; {} of {} admitted fans attributed; \
                 token place ≠ position place: {}{}",
                o.batches,
                o.batches_out_of_order,
                o.attributed,
                o.admitted_seen,
                o.place_mismatches,
                o.first_violation
                    .as_deref()
                    .map(|v| format!("; first: {v}"))
                    .unwrap_or_default()
            ),
        )
    });
    out
}

fn counts_line(map: &BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "n/a".into()
    }
}

fn delivery_header(out: &mut String) {
    let _ = writeln!(
        out,
        "  {:<34} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "(ms)", "ticks", "p50", "p99", "max", "mean"
    );
}

fn delivery_row(out: &mut String, label: &str, n: u64, p: &Percentiles) {
    let _ = writeln!(
        out,
        "  {:<34} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
        label, n, p.p50_ms, p.p99_ms, p.max_ms, p.mean_ms
    );
}

fn phase_lines(out: &mut String, p: &ServerPhase) {
    let _ = writeln!(
        out,
        "\n{} (pid {}): {} of {} sockets open in {:.1} s{}; open at the RSS reading {}, \
         at the end of the steady phase {}",
        p.server,
        p.pid,
        p.opened,
        p.sockets,
        p.connect_s,
        if p.failures.is_empty() {
            String::new()
        } else {
            format!("; failed: {}", counts_line(&p.failures))
        },
        p.open_at_rss,
        p.open_at_end
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    let _ = writeln!(
        out,
        "  VmRSS       {:.1} MiB before, {:.1} MiB all open, {:.1} MiB after {:.0} s steady \
         → {:.2} KiB per socket ({:.2} after steady)",
        mib(p.rss_before_kib),
        mib(p.rss_open_kib),
        mib(p.rss_end_kib),
        p.steady_s,
        p.rss_per_socket_kib,
        p.rss_per_socket_end_kib
    );
    let _ = writeln!(
        out,
        "  CPU         machine {:.0} % busy; server {:.0} % of a CPU, clients {:.0} %{}",
        p.cpu.machine_busy_pct,
        p.cpu.server_pct,
        p.cpu.clients_pct,
        p.cpu
            .redis_pct
            .map(|r| format!(", Redis {r:.0} %"))
            .unwrap_or_default()
    );
    let d = &p.steady;
    let _ = writeln!(
        out,
        "  ticks       {} in the steady phase, {} B each, received by {}–{} sockets",
        d.ticks, d.bytes, d.sockets_min, d.sockets_max
    );
    delivery_header(out);
    delivery_row(out, "at_ms → last socket", d.ticks, &d.to_last);
    delivery_row(out, "at_ms → first socket", d.ticks, &d.to_first);
    delivery_row(out, "tick interval", d.ticks.saturating_sub(1), &d.interval);
    let _ = writeln!(
        out,
        "  frames      {}; closed by the server {}, read errors {}, bad frames {}{}",
        counts_line(&p.frames_by_type),
        p.closed_by_server,
        p.read_errors,
        p.bad_frames,
        if p.dropped_records > 0 {
            format!(", records over the bound {}", p.dropped_records)
        } else {
            String::new()
        }
    );
}

/// The human-readable report.
pub fn render_text(r: &QueueReport) -> String {
    let mut out = String::new();
    let s = &r.settings;
    let _ = writeln!(
        out,
        "loadtest queue — {} WebSockets to {}, {} client processes over {} source addresses",
        r.fans, r.queue_url, r.client_procs, r.source_addrs
    );
    let _ = writeln!(
        out,
        "  drop        {} ({}), rate {}/s, burst {}, max_active {}, stock {}, per-fan limit {}",
        r.drop_id,
        if r.drop_created {
            "created"
        } else {
            "existing"
        },
        s.rate_per_s,
        s.burst,
        s.max_active,
        s.stock,
        s.per_fan_limit
    );
    let m = &r.machine;
    let _ = writeln!(
        out,
        "  machine     {} CPUs ({}), {:.1} GiB; load {:.2} {:.2} {:.2} before, {:.2} {:.2} {:.2} after",
        m.cpus,
        m.cpu_model,
        m.mem_total_kib as f64 / 1024.0 / 1024.0,
        m.load_before[0],
        m.load_before[1],
        m.load_before[2],
        m.load_after[0],
        m.load_after[1],
        m.load_after[2]
    );
    if let Some(b) = &r.baseline {
        phase_lines(&mut out, b);
    }
    phase_lines(&mut out, &r.queue);
    if let Some(b) = &r.baseline {
        let (q, b) = (&r.queue, b);
        let _ = writeln!(
            out,
            "\nqueue-server / baseline: tick to last socket p50 {}, p99 {}; RSS per socket {}; \
             server CPU {}",
            ratio(q.steady.to_last.p50_ms, b.steady.to_last.p50_ms),
            ratio(q.steady.to_last.p99_ms, b.steady.to_last.p99_ms),
            ratio(q.rss_per_socket_worst_kib(), b.rss_per_socket_worst_kib()),
            ratio(q.cpu.server_pct, b.cpu.server_pct),
        );
    }
    let p = &r.positions;
    let _ = writeln!(
        out,
        "\nposition rounds (steady phase): {} rounds of {}–{} positions",
        p.rounds, p.positions_min, p.positions_max
    );
    delivery_header(&mut out);
    delivery_row(&mut out, "tick before → last socket", p.rounds, &p.to_last);
    delivery_row(&mut out, "first → last socket", p.rounds, &p.spread);
    delivery_row(
        &mut out,
        "round interval",
        p.rounds.saturating_sub(1),
        &p.interval,
    );
    let sockets = r.queue.open_at_end;
    let _ = if p.back_to_back {
        writeln!(
            out,
            "  throughput  {:.0} positions/s with no pause: one round over {sockets} sockets takes \
             ≈ {:.2} s, longer than the position interval; the rows above are runs of rounds",
            p.positions_per_s,
            if p.positions_per_s > 0.0 {
                sockets as f64 / p.positions_per_s
            } else {
                0.0
            },
        )
    } else {
        writeln!(
            out,
            "  throughput  {:.0} positions/s averaged over the phase; inside a round ≈ {:.0}/s \
             ({sockets} sockets over the p50 spread)",
            p.positions_per_s,
            if p.spread.p50_ms > 0.0 {
                sockets as f64 / (p.spread.p50_ms / 1000.0)
            } else {
                0.0
            },
        )
    };
    let d = &r.admitting;
    let _ = writeln!(
        out,
        "\nadmitting: ticks to {}–{} sockets (admitted fans leave)",
        d.sockets_min, d.sockets_max
    );
    delivery_header(&mut out);
    delivery_row(&mut out, "at_ms → last socket", d.ticks, &d.to_last);
    delivery_row(
        &mut out,
        "tick interval",
        d.ticks.saturating_sub(1),
        &d.interval,
    );
    match &r.admission {
        Some(a) => {
            let _ = writeln!(
                out,
                "  admission   {} admitted in {:.2} s (Redis time) = {:.1}/min; set {:.1}/min; ratio {:.4}",
                a.admitted,
                a.window_s,
                a.per_minute,
                a.rate_per_s * 60.0,
                a.ratio
            );
        }
        None => {
            let _ = writeln!(out, "  admission   no window measured");
        }
    }
    let o = &r.order;
    let _ = writeln!(
        out,
        "  order       {} admitted messages ({} admissions by the ticks' counts), {} attributed \
         to {} ticks; {} batches out of order, {} batch sizes ≠ the tick's count",
        o.admitted_seen,
        r.admissions_by_ticks,
        o.attributed,
        o.batches,
        o.batches_out_of_order,
        o.batch_size_mismatches
    );
    let _ = writeln!(out, "\nbars");
    for c in &r.checks {
        let mark = match c.verdict {
            Verdict::Pass => "ok  ",
            Verdict::Fail => "MISS",
            Verdict::Skipped => "skip",
        };
        let _ = writeln!(out, "  {mark} {}: {}", c.name, c.detail);
    }
    let _ = writeln!(
        out,
        "{}",
        if r.passed {
            "every bar met"
        } else {
            "BAR MISSED"
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws_clients::RoundSeen;

    fn tick(at_ms: i64, total: i64, sockets: u64, first_ms: i64, last_ms: i64) -> TickSeen {
        TickSeen {
            at_ms,
            admitted_total: Some(total),
            sockets,
            first_us: first_ms * 1000,
            last_us: last_ms * 1000,
            bytes: 120,
            waiting: None,
            state: None,
        }
    }

    fn report(ticks: Vec<TickSeen>) -> ChildReport {
        ChildReport {
            ticks,
            ..ChildReport::default()
        }
    }

    #[test]
    fn ticks_merge_across_children() {
        let a = report(vec![
            tick(1000, 0, 10, 1002, 1050),
            tick(1100, 5, 10, 1101, 1120),
        ]);
        let b = report(vec![tick(1000, 0, 5, 1001, 1090)]);
        let merged = merge_ticks(&[a, b]);
        assert_eq!(merged.len(), 2);
        assert_eq!(
            (merged[0].sockets, merged[0].first_us, merged[0].last_us),
            (15, 1_001_000, 1_090_000)
        );
        let d = delivery(&merged, 0, 2000);
        assert_eq!(d.ticks, 2);
        assert_eq!((d.sockets_min, d.sockets_max), (10, 15));
        assert!((d.to_last.max_ms - 90.0).abs() < 0.1, "{d:?}");
        assert!((d.to_first.p50_ms - 1.0).abs() < 0.01, "{d:?}");
        assert!((d.interval.max_ms - 100.0).abs() < 0.1, "{d:?}");
        assert_eq!(delivery(&merged, 1050, 2000).ticks, 1);
    }

    #[test]
    fn rounds_merge_across_children_and_are_timed_from_the_tick_before() {
        let burst = |positions, first_ms: i64, last_ms: i64| RoundSeen {
            positions,
            first_us: first_ms * 1000,
            last_us: last_ms * 1000,
        };
        let a = ChildReport {
            rounds: vec![burst(3, 1010, 1300), burst(3, 3010, 3200)],
            ..ChildReport::default()
        };
        let b = ChildReport {
            rounds: vec![burst(2, 1005, 1400), burst(2, 3020, 3100)],
            ..ChildReport::default()
        };
        let rounds = merge_rounds(&[a, b], 300_000);
        assert_eq!(
            rounds
                .iter()
                .map(|m| (m.positions, m.first_us, m.last_us))
                .collect::<Vec<_>>(),
            [(5, 1_005_000, 1_400_000), (5, 3_010_000, 3_200_000)]
        );
        let ticks = vec![merged(900, 0), merged(1000, 0), merged(3000, 0)];
        let r = position_rounds(&rounds, &ticks, 0, 5000, 5, 0.0);
        assert_eq!((r.rounds, r.positions_min, r.positions_max), (2, 5, 5));
        assert!(!r.back_to_back);
        assert!(position_rounds(&rounds, &ticks, 0, 5000, 4, 0.0).back_to_back);
        // Round one: from the tick at 1000 to 1400; round two: from 3000 to 3200.
        assert!((r.to_last.max_ms - 400.0).abs() < 0.5, "{r:?}");
        assert!((r.spread.max_ms - 395.0).abs() < 0.5, "{r:?}");
        assert!((r.interval.max_ms - 2005.0).abs() < 2.0, "{r:?}");
        // A round that began before the window and ends in it counts.
        assert_eq!(
            position_rounds(&rounds, &ticks, 1200, 5000, 5, 0.0).rounds,
            2
        );
        assert_eq!(
            position_rounds(&rounds, &ticks, 2000, 5000, 5, 0.0).rounds,
            1
        );
    }

    #[test]
    fn position_throughput_counts_whole_seconds() {
        let per_s = |pairs: &[(i64, u64)]| ChildReport {
            positions_per_s: pairs.to_vec(),
            ..ChildReport::default()
        };
        let a = per_s(&[(10, 100), (11, 200), (12, 300), (13, 400)]);
        let b = per_s(&[(11, 50), (12, 50)]);
        // [10.5 s, 13.0 s): whole seconds 11 and 12.
        assert!((positions_per_s(&[a, b], 10_500, 13_000) - 300.0).abs() < 1e-9);
        assert_eq!(positions_per_s(&[], 10_500, 11_000), 0.0);
    }

    fn merged(at_ms: i64, total: i64) -> MergedTick {
        MergedTick {
            at_ms,
            admitted_total: Some(total),
            sockets: 1,
            first_us: at_ms * 1000,
            last_us: at_ms * 1000,
            bytes: 1,
            waiting: None,
            state: None,
        }
    }

    #[test]
    fn admission_window_counts_by_redis_time() {
        // 50/s for 60 s, one tick per 100 ms, 5 per tick, after a burst of 50 at t=0.
        let ticks: Vec<MergedTick> = (0..=700)
            .map(|i| merged(10_000 + i * 100, 50 + 5 * i))
            .collect();
        let a = admission(&ticks, 13_000, 60.0, 50.0).expect("a window");
        assert_eq!((a.window_from_ms, a.window_to_ms), (13_000, 73_000));
        assert_eq!(a.admitted, 3000);
        assert!((a.ratio - 1.0).abs() < 1e-9);
        assert!((a.per_minute - 3000.0).abs() < 1e-9);
        // 2 % short.
        let slow: Vec<MergedTick> = (0..=700)
            .map(|i| merged(10_000 + i * 100, (4.9 * i as f64) as i64))
            .collect();
        let a = admission(&slow, 10_000, 60.0, 50.0).unwrap();
        assert!((a.ratio - 0.98).abs() < 0.001, "{a:?}");
        assert!(admission(&ticks, 1_000_000, 60.0, 50.0).is_none());
    }

    fn seen(fan: usize, place: i64, after: i64) -> AdmittedSeen {
        AdmittedSeen {
            fan,
            place: Some(place),
            place_seen: Some(place),
            after_tick_ms: Some(after),
            at_us: 0,
        }
    }

    #[test]
    fn admission_order_is_checked_between_batches_not_inside() {
        let ticks = vec![merged(100, 0), merged(200, 2), merged(300, 4)];
        // Tick 200 admitted places 11 and 10 (any order inside a batch), tick 300 12 and 13.
        let ok = [
            seen(0, 11, 100),
            seen(1, 10, 100),
            seen(2, 13, 200),
            seen(3, 12, 200),
        ];
        let o = admission_order(&ticks, &ok);
        assert_eq!(
            (
                o.attributed,
                o.batches,
                o.batches_out_of_order,
                o.batch_size_mismatches
            ),
            (4, 2, 0, 0)
        );
        let bad = [
            seen(0, 11, 100),
            seen(1, 14, 100),
            seen(2, 13, 200),
            seen(3, 12, 200),
        ];
        let o = admission_order(&ticks, &bad);
        assert_eq!(o.batches_out_of_order, 1);
        assert!(o.first_violation.is_some());
        // One admitted fan missing from tick 300's batch; one without a tick to follow.
        let short = [
            seen(0, 11, 100),
            seen(1, 10, 100),
            seen(2, 12, 200),
            seen(9, 20, 300),
        ];
        let o = admission_order(&ticks, &short);
        assert_eq!((o.batch_size_mismatches, o.attributed), (1, 3));
        let mut wrong_place = seen(0, 11, 100);
        wrong_place.place_seen = Some(99);
        assert_eq!(admission_order(&ticks, &[wrong_place]).place_mismatches, 1);
    }

    #[test]
    fn per_socket_memory() {
        assert!((per_socket_kib(10_000, 110_000, 10_000) - 10.0).abs() < 1e-9);
        assert_eq!(per_socket_kib(1, 2, 0), 0.0);
    }
}
