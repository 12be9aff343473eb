//! The run's report: one struct, printed for people and written as JSON for scripts
//! (bench/reserve-baseline.sh reads `throughput.total_per_s` and `latency.all`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::Mode;
use crate::invariants::{Check, ClientCounts, Verdict};
use crate::stats::{Percentiles, Second, Stats, Tally};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub mode: Mode,
    pub booking_url: String,
    pub drop_id: String,
    /// Whether loadtest created the drop (false with --drop-id).
    pub drop_created: bool,
    pub sku: String,
    pub quantity: u32,
    pub fans: usize,
    /// Open loop only.
    pub target_rate_per_s: Option<f64>,
    /// Connections (open loop) or workers (closed loop).
    pub concurrency: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// The measured window: from the end of the warm-up to the last answer, at least
    /// `duration_s`.
    pub measured_s: f64,
    /// Requests in the measured window: due (open loop) or started (closed loop).
    pub requests: u64,
    pub throughput: Throughput,
    pub latency: Latencies,
    /// The measured window's answers second by second (the text report lists the slowest).
    pub timeline: Vec<Second>,
    pub reserve: Tally,
    pub confirm: Option<Phase>,
    pub release: Option<Phase>,
    pub client: ClientCounts,
    pub checks: Vec<Check>,
    pub passed: bool,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Throughput {
    /// Answers of any status per second.
    pub total_per_s: f64,
    /// 201s per second.
    pub ok_per_s: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latencies {
    /// All answers, from the due time (open loop) or the send (closed loop).
    pub all: Percentiles,
    /// 201s only, measured the same way.
    pub ok: Percentiles,
    /// All answers, from the moment the request was written.
    pub service: Percentiles,
}

impl Latencies {
    pub fn of(stats: &Stats) -> Self {
        Self {
            all: Percentiles::of(&stats.latency),
            ok: Percentiles::of(&stats.latency_ok),
            service: Percentiles::of(&stats.service),
        }
    }
}

/// A follow-up phase (confirms or releases), closed loop.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub requests: u64,
    pub elapsed_s: f64,
    pub per_s: f64,
    pub latency: Percentiles,
    pub tally: Tally,
    /// Confirms only, with an ops key: where a confirm's time went, per step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepMean>,
}

/// One step of the confirms of a phase, from booking-api's `floodgate_confirm_step_seconds`
/// (summed over every instance): how many times it ran and its mean time.
#[derive(Debug, Clone, Serialize)]
pub struct StepMean {
    pub step: String,
    pub count: u64,
    pub mean_ms: f64,
}

/// The steps of a confirm, in the order they run.
pub const CONFIRM_STEPS: [&str; 6] = [
    "begin",
    "payment_row",
    "authorize",
    "order_commit",
    "capture",
    "finish",
];

/// `step → (sum of seconds, count)` of `floodgate_confirm_step_seconds` in Prometheus text.
pub fn confirm_step_totals(text: &str) -> BTreeMap<String, (f64, f64)> {
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("floodgate_confirm_step_seconds_") else {
            continue;
        };
        let (is_sum, rest) = if let Some(r) = rest.strip_prefix("sum{") {
            (true, r)
        } else if let Some(r) = rest.strip_prefix("count{") {
            (false, r)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let Some(step) = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("step=\""))
            .and_then(|v| v.strip_suffix('"'))
        else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let entry = out.entry(step.to_owned()).or_default();
        if is_sum {
            entry.0 += value;
        } else {
            entry.1 += value;
        }
    }
    out
}

/// The steps' means between two readings (each summed over every instance).
pub fn step_means(
    before: &BTreeMap<String, (f64, f64)>,
    after: &BTreeMap<String, (f64, f64)>,
) -> Vec<StepMean> {
    CONFIRM_STEPS
        .iter()
        .filter_map(|&step| {
            let (s1, c1) = after.get(step).copied().unwrap_or_default();
            let (s0, c0) = before.get(step).copied().unwrap_or_default();
            let count = (c1 - c0).max(0.0);
            (count > 0.0).then(|| StepMean {
                step: step.to_owned(),
                count: count as u64,
                mean_ms: (s1 - s0) / count * 1000.0,
            })
        })
        .collect()
}

impl Phase {
    pub fn of(stats: &Stats, requests: u64, elapsed_s: f64) -> Self {
        let per_s = if elapsed_s > 0.0 {
            stats.tally.answered as f64 / elapsed_s
        } else {
            0.0
        };
        Self {
            requests,
            elapsed_s,
            per_s,
            latency: Percentiles::of(&stats.latency),
            tally: stats.tally.clone(),
            steps: Vec::new(),
        }
    }
}

/// Answers per second over a window, 0 for an empty window.
pub fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

fn latency_header(out: &mut String) {
    let _ = writeln!(
        out,
        "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "count", "mean", "p50", "p90", "p99", "p99.9", "max"
    );
}

fn latency_row(out: &mut String, label: &str, p: &Percentiles) {
    let _ = writeln!(
        out,
        "  {:<22} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
        label, p.count, p.mean_ms, p.p50_ms, p.p90_ms, p.p99_ms, p.p99_9_ms, p.max_ms
    );
}

/// How many of the slowest seconds the text report names.
const SLOWEST_SECONDS_SHOWN: usize = 3;

/// The seconds with the longest latency, e.g. to tell one stall (one bad second) from a slow
/// stretch, or a client backlog (max far above max service) from a slow server.
fn slowest_seconds(out: &mut String, timeline: &[Second]) {
    let mut worst: Vec<&Second> = timeline.iter().filter(|s| s.answers > 0).collect();
    worst.sort_by(|a, b| b.max_ms.total_cmp(&a.max_ms));
    if worst.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "  slowest seconds of the window (max / mean latency, max service time, answers):"
    );
    for s in worst.iter().take(SLOWEST_SECONDS_SHOWN) {
        let _ = writeln!(
            out,
            "    at {:>5} s   {:>9.3} / {:>9.3} ms   service {:>9.3} ms   {} answers",
            s.t_s, s.max_ms, s.mean_ms, s.max_service_ms, s.answers
        );
    }
}

fn counts_line<K: std::fmt::Display>(map: &BTreeMap<K, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn tally_lines(out: &mut String, t: &Tally) {
    let _ = writeln!(out, "  statuses    {}", counts_line(&t.by_status));
    let _ = writeln!(out, "  codes       {}", counts_line(&t.by_code));
    let _ = writeln!(
        out,
        "  no answer   {} (connection errors{})",
        t.transport_total(),
        if t.transport_errors.is_empty() {
            String::new()
        } else {
            format!(": {}", counts_line(&t.transport_errors))
        }
    );
}

fn phase_lines(out: &mut String, name: &str, p: &Phase) {
    let _ = writeln!(
        out,
        "\n{name}: {} requests in {:.2} s, {:.1} answers/s, {} succeeded",
        p.requests, p.elapsed_s, p.per_s, p.tally.succeeded
    );
    latency_header(out);
    latency_row(out, "all answers", &p.latency);
    tally_lines(out, &p.tally);
    if !p.steps.is_empty() {
        let _ = writeln!(out, "  per step (booking-api's metrics): mean ms, count");
        for s in &p.steps {
            let _ = writeln!(out, "    {:<14} {:>9.3} {:>9}", s.step, s.mean_ms, s.count);
        }
    }
}

/// The human-readable report.
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    let mode = match (r.mode, r.target_rate_per_s) {
        (Mode::Open, Some(rate)) => format!(
            "open loop at {rate} req/s over {} connections",
            r.concurrency
        ),
        (Mode::Open, None) => format!("open loop over {} connections", r.concurrency),
        (Mode::Closed, _) => format!("closed loop, {} workers", r.concurrency),
    };
    let _ = writeln!(out, "loadtest {} — {mode}", r.scenario);
    let _ = writeln!(
        out,
        "  drop        {} ({}), sku {}, quantity {}, {} fans",
        r.drop_id,
        if r.drop_created {
            "created"
        } else {
            "existing"
        },
        r.sku,
        r.quantity,
        r.fans
    );
    let _ = writeln!(
        out,
        "  window      {:.2} s measured ({} s planned, after {} s warm-up)",
        r.measured_s, r.duration_s, r.warmup_s
    );
    let t = &r.reserve;
    let _ = writeln!(
        out,
        "  requests    {} {}, {} answered, {} dropped (client backlog), {} without answer",
        r.requests,
        if r.mode == Mode::Open { "due" } else { "sent" },
        t.answered,
        t.dropped,
        t.transport_total()
    );
    let _ = writeln!(
        out,
        "  throughput  {:.1} answers/s, {:.1} successful holds/s (201)",
        r.throughput.total_per_s, r.throughput.ok_per_s
    );
    tally_lines(&mut out, t);
    if t.by_status.contains_key(&429) {
        let _ = writeln!(
            out,
            "  note        429s: booking-api's own rate limits (limits.per_ip_per_s, \
             limits.per_fan_per_s) are below this load; raise them to measure reserve, not the limiter"
        );
    }
    out.push('\n');
    latency_header(&mut out);
    let from = if r.mode == Mode::Open {
        "from due time"
    } else {
        "from send"
    };
    latency_row(&mut out, &format!("all, {from}"), &r.latency.all);
    latency_row(&mut out, &format!("201, {from}"), &r.latency.ok);
    latency_row(&mut out, "all, service time", &r.latency.service);
    slowest_seconds(&mut out, &r.timeline);
    if let Some(p) = &r.confirm {
        phase_lines(&mut out, "confirm", p);
    }
    if let Some(p) = &r.release {
        phase_lines(&mut out, "release", p);
    }
    let _ = writeln!(out, "\ninvariants");
    for c in &r.checks {
        let mark = match c.verdict {
            Verdict::Pass => "ok  ",
            Verdict::Fail => "FAIL",
            Verdict::Skipped => "skip",
        };
        let _ = writeln!(out, "  {mark} {}: {}", c.name, c.detail);
    }
    let failed = r
        .checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .count();
    if failed == 0 {
        let _ = writeln!(out, "all invariants hold");
    } else {
        let _ = writeln!(out, "INVARIANT VIOLATED: {failed} check(s) failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;
    use std::time::Duration;

    #[test]
    fn confirm_steps_are_read_from_prometheus_text_and_differenced() {
        let before = confirm_step_totals(
            "floodgate_confirm_step_seconds_sum{step=\"authorize\"} 1.5\n\
             floodgate_confirm_step_seconds_count{step=\"authorize\"} 10\n",
        );
        let after = confirm_step_totals(
            "# TYPE floodgate_confirm_step_seconds histogram\n\
             floodgate_confirm_step_seconds_bucket{step=\"authorize\",le=\"0.005\"} 12\n\
             floodgate_confirm_step_seconds_sum{step=\"authorize\"} 2.5\n\
             floodgate_confirm_step_seconds_count{step=\"authorize\"} 20\n\
             floodgate_confirm_step_seconds_sum{step=\"finish\"} 0.02\n\
             floodgate_confirm_step_seconds_count{step=\"finish\"} 10\n\
             floodgate_confirm_seconds_sum 9\n",
        );
        let means = step_means(&before, &after);
        assert_eq!(means.len(), 2);
        assert_eq!((means[0].step.as_str(), means[0].count), ("authorize", 10));
        assert!((means[0].mean_ms - 100.0).abs() < 1e-9);
        assert_eq!((means[1].step.as_str(), means[1].count), ("finish", 10));
        assert!((means[1].mean_ms - 2.0).abs() < 1e-9);
    }

    fn sample() -> Report {
        let mut stats = Stats::default();
        for ms in 1..=100u64 {
            let status = if ms <= 90 {
                StatusCode::CREATED
            } else {
                StatusCode::CONFLICT
            };
            let body: &[u8] = if ms <= 90 {
                b"{}"
            } else {
                br#"{"error":{"code":"sold_out","message":""}}"#
            };
            stats.answer(
                Duration::from_millis(ms),
                Duration::from_millis(ms) / 2,
                status,
                body,
                ms <= 90,
            );
        }
        stats.tally.dropped = 3;
        let fixed = Percentiles {
            count: 100,
            mean_ms: 50.5,
            p50_ms: 50.0,
            p90_ms: 90.0,
            p99_ms: 99.0,
            p99_9_ms: 100.0,
            max_ms: 100.0,
        };
        Report {
            scenario: "reserve",
            mode: Mode::Open,
            booking_url: "http://127.0.0.1:8080".into(),
            drop_id: "d1".into(),
            drop_created: true,
            sku: "LT".into(),
            quantity: 1,
            fans: 10,
            target_rate_per_s: Some(1000.0),
            concurrency: 64,
            warmup_s: 1.0,
            duration_s: 0.1,
            measured_s: 0.1,
            requests: 103,
            throughput: Throughput {
                total_per_s: rate(100, 0.1),
                ok_per_s: rate(90, 0.1),
            },
            // Fixed numbers (histograms report each bucket's highest equivalent value, which
            // would make the expected text depend on bucket boundaries).
            latency: Latencies {
                all: fixed,
                ok: fixed,
                service: fixed,
            },
            timeline: vec![
                Second {
                    t_s: 0,
                    answers: 60,
                    mean_ms: 30.0,
                    max_ms: 60.0,
                    max_service_ms: 30.0,
                },
                Second {
                    t_s: 1,
                    answers: 0,
                    mean_ms: 0.0,
                    max_ms: 0.0,
                    max_service_ms: 0.0,
                },
                Second {
                    t_s: 2,
                    answers: 40,
                    mean_ms: 80.5,
                    max_ms: 100.0,
                    max_service_ms: 50.0,
                },
            ],
            reserve: stats.tally.clone(),
            confirm: None,
            release: Some(Phase::of(&Stats::default(), 0, 0.0)),
            client: ClientCounts::default(),
            checks: vec![Check {
                name: "LT: available + held + sold == total".into(),
                verdict: Verdict::Pass,
                detail: "1 + 2 + 3 = 6, total 6".into(),
            }],
            passed: true,
        }
    }

    #[test]
    fn text_report_has_the_headline_numbers() {
        let text = render_text(&sample());
        assert!(
            text.starts_with("loadtest reserve — open loop at 1000 req/s over 64 connections\n"),
            "{text}"
        );
        assert!(
            text.contains("103 due, 100 answered, 3 dropped (client backlog), 0 without answer"),
            "{text}"
        );
        assert!(
            text.contains("throughput  1000.0 answers/s, 900.0 successful holds/s (201)"),
            "{text}"
        );
        assert!(text.contains("statuses    201: 90, 409: 10"), "{text}");
        assert!(text.contains("codes       sold_out: 10"), "{text}");
        let all = text
            .lines()
            .find(|l| l.contains("all, from due time"))
            .expect("latency row");
        let cols: Vec<&str> = all.split_whitespace().collect();
        // label (4 words), count, mean, p50, p90, p99, p99.9, max
        assert_eq!(
            &cols[4..],
            ["100", "50.500", "50.000", "90.000", "99.000", "100.000", "100.000"]
        );
        // The slowest second first; a second without answers is not "slow".
        let slow: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.contains("slowest seconds"))
            .skip(1)
            .take_while(|l| l.trim_start().starts_with("at "))
            .collect();
        assert_eq!(slow.len(), 2, "{text}");
        assert_eq!(
            slow[0].split_whitespace().collect::<Vec<_>>(),
            [
                "at", "2", "s", "100.000", "/", "80.500", "ms", "service", "50.000", "ms", "40",
                "answers"
            ]
        );
        assert!(slow[1].contains("at     0 s"), "{text}");
        assert!(text.contains("\nrelease: 0 requests"), "{text}");
        assert!(
            text.contains("  ok   LT: available + held + sold == total: 1 + 2 + 3 = 6, total 6"),
            "{text}"
        );
        assert!(text.ends_with("all invariants hold\n"), "{text}");
        assert!(!text.contains("429s"), "{text}");
    }

    #[test]
    fn rate_limiting_is_pointed_out() {
        let mut r = sample();
        r.reserve.by_status.insert(429, 5);
        assert!(render_text(&r).contains("note        429s: booking-api's own rate limits"));
    }

    #[test]
    fn failures_are_announced() {
        let mut r = sample();
        r.checks[0].verdict = Verdict::Fail;
        r.passed = false;
        let text = render_text(&r);
        assert!(text.contains("  FAIL LT:"), "{text}");
        assert!(
            text.ends_with("INVARIANT VIOLATED: 1 check(s) failed\n"),
            "{text}"
        );
    }

    #[test]
    fn json_report_has_the_fields_scripts_read() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["mode"], "open");
        assert_eq!(v["throughput"]["total_per_s"], 1000.0);
        assert_eq!(v["latency"]["all"]["p50_ms"], 50.0);
        assert_eq!(v["latency"]["all"]["p99_ms"], 99.0);
        assert_eq!(v["timeline"][2]["max_service_ms"], 50.0);
        assert_eq!(v["timeline"][1]["answers"], 0);
        assert_eq!(v["reserve"]["by_status"]["409"], 10);
        assert_eq!(v["reserve"]["by_code"]["sold_out"], 10);
        assert_eq!(v["checks"][0]["verdict"], "pass");
        assert_eq!(v["passed"], true);
    }
}
