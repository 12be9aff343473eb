//! What a worker records: HdrHistograms of latency (microseconds, 3 significant figures) and
//! counts of answers by status and error code. Each worker owns its own and they are merged at
//! the end, so recording never contends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hyper::StatusCode;
use serde::Serialize;

use crate::api::error_code;
use crate::http::TransportError;

/// Largest latency a histogram holds; larger values are recorded as this (and show as the max).
pub const HIST_MAX_US: u64 = 3_600_000_000;
pub const HIST_SIGFIG: u8 = 3;
/// The code counted for an error answer whose body isn't `{"error":{"code":...}}`.
pub const NO_CODE: &str = "(no code)";

pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (1 ≤ low, high ≥ 2·low, sigfig ≤ 5).
    Histogram::new_with_bounds(1, HIST_MAX_US, HIST_SIGFIG)
        .expect("constant histogram bounds are valid")
}

/// Microseconds, at least 1 (the histogram's lowest value).
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Counts of one kind of request's outcomes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Tally {
    /// Requests that got an HTTP answer (any status).
    pub answered: u64,
    /// Answers that count as success (201 for reserve and confirm, 200 for a replayed confirm,
    /// 204 for release).
    pub succeeded: u64,
    pub by_status: BTreeMap<u16, u64>,
    /// Error answers by their `error.code`.
    pub by_code: BTreeMap<String, u64>,
    /// Requests without an answer, by why.
    pub transport_errors: BTreeMap<String, u64>,
    /// Open loop: due requests not sent because the client's backlog was full.
    pub dropped: u64,
}

impl Tally {
    pub fn answer(&mut self, status: StatusCode, body: &[u8], success: bool) {
        self.answered += 1;
        self.succeeded += u64::from(success);
        *self.by_status.entry(status.as_u16()).or_default() += 1;
        if status.is_client_error() || status.is_server_error() {
            let code = error_code(body);
            let code = code.as_deref().unwrap_or(NO_CODE);
            match self.by_code.get_mut(code) {
                Some(n) => *n += 1,
                None => {
                    self.by_code.insert(code.to_owned(), 1);
                }
            }
        }
    }

    pub fn transport(&mut self, e: TransportError) {
        *self
            .transport_errors
            .entry(e.as_str().to_owned())
            .or_default() += 1;
    }

    pub fn transport_total(&self) -> u64 {
        self.transport_errors.values().sum()
    }

    pub fn merge(&mut self, other: &Tally) {
        self.answered += other.answered;
        self.succeeded += other.succeeded;
        self.dropped += other.dropped;
        for (k, v) in &other.by_status {
            *self.by_status.entry(*k).or_default() += v;
        }
        for (k, v) in &other.by_code {
            *self.by_code.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.transport_errors {
            *self.transport_errors.entry(k.clone()).or_default() += v;
        }
    }
}

/// Latencies and counts of one kind of request.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Every answer: from the time the request was due (open loop) or sent (closed loop).
    pub latency: Histogram<u64>,
    /// Successful answers only, measured as `latency`.
    pub latency_ok: Histogram<u64>,
    /// Every answer, from the moment the request was written: what the server took, without
    /// the time a request waited in the client for a free connection.
    pub service: Histogram<u64>,
    pub tally: Tally,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            latency: new_histogram(),
            latency_ok: new_histogram(),
            service: new_histogram(),
            tally: Tally::default(),
        }
    }
}

impl Stats {
    pub fn answer(
        &mut self,
        latency: Duration,
        service: Duration,
        status: StatusCode,
        body: &[u8],
        success: bool,
    ) {
        let latency_us = micros(latency);
        self.latency.saturating_record(latency_us);
        if success {
            self.latency_ok.saturating_record(latency_us);
        }
        self.service.saturating_record(micros(service));
        self.tally.answer(status, body, success);
    }

    pub fn merge(&mut self, other: &Stats) {
        // Same bounds on both sides, so adding can't fail; saturate rather than panic anyway.
        let _ = self.latency.add(&other.latency);
        let _ = self.latency_ok.add(&other.latency_ok);
        let _ = self.service.add(&other.service);
        self.tally.merge(&other.tally);
    }
}

/// Seconds a [`Timeline`] holds at most: the longest run `--warmup-s` and `--duration-s` allow
/// (24 h each) and an hour for answers that trail behind. 32 bytes a second, ≈ 5.6 MB at most,
/// shared by every worker. Answers later than the timeline's span aren't placed.
pub const MAX_TIMELINE_S: u64 = 2 * 24 * 3600 + 3600;

/// Seconds a run's timeline spans beyond its warm-up, window and request timeout: connecting
/// before the start, and answers that trail behind.
pub const TIMELINE_SLACK_S: u64 = 60;

/// One second of a [`Timeline`]: every worker adds to it (relaxed atomics; a few per answer).
#[derive(Debug, Default)]
struct SecondCell {
    answers: AtomicU64,
    latency_sum_us: AtomicU64,
    latency_max_us: AtomicU64,
    service_max_us: AtomicU64,
}

/// Answers by the second they came in: what the percentiles of a whole window can't show —
/// when a tail happened, whether it was one stall or a slow stretch, and whether the client fell
/// behind (latency from the due time far above the service time). One per run, shared by every
/// worker, sized for the run's span up front, so its memory doesn't grow with the workers.
#[derive(Debug)]
pub struct Timeline {
    origin: Instant,
    /// Index: whole seconds from `origin` to the answer.
    seconds: Box<[SecondCell]>,
}

/// One second of the measured window, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Second {
    /// Whole seconds from the start of the measured window to the answers.
    pub t_s: u64,
    pub answers: u64,
    /// From the due time (open loop) or the send (closed loop), as `latency.all`.
    pub mean_ms: f64,
    pub max_ms: f64,
    /// The longest service time (from the write) among these answers.
    pub max_service_ms: f64,
}

impl Timeline {
    /// Seconds from `origin` for `span` (at most [`MAX_TIMELINE_S`]); a span of zero places
    /// nothing.
    pub fn new(origin: Instant, span: Duration) -> Self {
        let n = span.as_secs().saturating_add(1).min(MAX_TIMELINE_S);
        let n = if span.is_zero() { 0 } else { n as usize };
        Self {
            origin,
            seconds: (0..n).map(|_| SecondCell::default()).collect(),
        }
    }

    /// Places one answer that came in at `done`.
    pub fn record(&self, done: Instant, latency: Duration, service: Duration) {
        let i = done.saturating_duration_since(self.origin).as_secs();
        let Some(s) = usize::try_from(i).ok().and_then(|i| self.seconds.get(i)) else {
            return;
        };
        let latency_us = micros(latency);
        s.answers.fetch_add(1, Ordering::Relaxed);
        s.latency_sum_us.fetch_add(latency_us, Ordering::Relaxed);
        s.latency_max_us.fetch_max(latency_us, Ordering::Relaxed);
        s.service_max_us
            .fetch_max(micros(service), Ordering::Relaxed);
    }

    /// The seconds from the one holding `start` to the last with an answer, `t_s` counted from
    /// `start`'s. Seconds between without an answer are listed (answers 0): a stall shows as a
    /// gap.
    pub fn window(&self, start: Instant) -> Vec<Second> {
        let first = start.saturating_duration_since(self.origin).as_secs() as usize;
        let ms = |us: u64| us as f64 / 1000.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let last = self
            .seconds
            .iter()
            .rposition(|s| get(&s.answers) > 0)
            .map_or(0, |i| i + 1);
        self.seconds
            .iter()
            .enumerate()
            .take(last)
            .skip(first)
            .map(|(i, s)| {
                let answers = get(&s.answers);
                Second {
                    t_s: (i - first) as u64,
                    answers,
                    mean_ms: if answers == 0 {
                        0.0
                    } else {
                        ms(get(&s.latency_sum_us)) / answers as f64
                    },
                    max_ms: ms(get(&s.latency_max_us)),
                    max_service_ms: ms(get(&s.service_max_us)),
                }
            })
            .collect()
    }
}

/// A histogram summarised in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p99_9_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p99_9_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_spread() {
        let mut h = new_histogram();
        for us in 1..=10_000u64 {
            h.record(us).unwrap();
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 10_000);
        // 3 significant figures: within 0.1 %.
        assert!((p.p50_ms - 5.0).abs() <= 0.005, "{p:?}");
        assert!((p.p90_ms - 9.0).abs() <= 0.01, "{p:?}");
        assert!((p.p99_ms - 9.9).abs() <= 0.01, "{p:?}");
        assert!((p.max_ms - 10.0).abs() <= 0.01, "{p:?}");
    }

    #[test]
    fn empty_histogram_reports_zeros() {
        assert_eq!(Percentiles::of(&new_histogram()), Percentiles::default());
    }

    #[test]
    fn answers_are_counted_by_status_and_code() {
        let mut s = Stats::default();
        let ms = Duration::from_millis;
        s.answer(
            ms(2),
            ms(1),
            StatusCode::CREATED,
            br#"{"hold_id":"h"}"#,
            true,
        );
        s.answer(
            ms(3),
            ms(1),
            StatusCode::CONFLICT,
            br#"{"error":{"code":"sold_out","message":""}}"#,
            false,
        );
        s.answer(
            ms(3),
            ms(1),
            StatusCode::CONFLICT,
            br#"{"error":{"code":"sold_out","message":""}}"#,
            false,
        );
        s.answer(ms(3), ms(1), StatusCode::BAD_GATEWAY, b"upstream", false);
        s.tally.transport(TransportError::Timeout);
        assert_eq!(s.tally.answered, 4);
        assert_eq!(s.tally.succeeded, 1);
        assert_eq!(s.tally.by_status[&201], 1);
        assert_eq!(s.tally.by_status[&409], 2);
        assert_eq!(s.tally.by_code["sold_out"], 2);
        assert_eq!(s.tally.by_code[NO_CODE], 1);
        assert_eq!(s.tally.transport_total(), 1);
        assert_eq!(s.latency.len(), 4);
        assert_eq!(s.latency_ok.len(), 1);

        let mut merged = Stats::default();
        merged.merge(&s);
        merged.merge(&s);
        assert_eq!(merged.tally.by_code["sold_out"], 4);
        assert_eq!(merged.latency.len(), 8);
    }

    #[test]
    fn a_timeline_places_answers_by_second() {
        let origin = Instant::now();
        let at = |ms: u64| origin + Duration::from_millis(ms);
        let ms = Duration::from_millis;
        let t = Timeline::new(origin, Duration::from_secs(10));
        t.record(at(500), ms(2), ms(1)); // before the window: left out of it
        t.record(at(1_100), ms(2), ms(1));
        t.record(at(1_900), ms(4), ms(3));
        t.record(at(1_500), ms(90), ms(5)); // a client backlog: 90 ms from due, 5 served
        t.record(at(3_200), ms(1), ms(1)); // second 2 of the window had no answer
        let w = t.window(at(1_000));
        assert_eq!(w.len(), 3, "to the last second with an answer: {w:?}");
        assert_eq!((w[0].t_s, w[0].answers), (0, 3));
        assert!((w[0].mean_ms - 32.0).abs() < 1e-9, "{w:?}");
        assert_eq!((w[0].max_ms, w[0].max_service_ms), (90.0, 5.0));
        assert_eq!((w[1].t_s, w[1].answers, w[1].max_ms), (1, 0, 0.0));
        assert_eq!((w[2].t_s, w[2].answers), (2, 1));
    }

    #[test]
    fn a_timeline_is_bounded() {
        let origin = Instant::now();
        let t = Timeline::new(origin, Duration::from_secs(5));
        t.record(
            origin + Duration::from_secs(5),
            Duration::ZERO,
            Duration::ZERO,
        );
        t.record(
            origin + Duration::from_secs(6),
            Duration::ZERO,
            Duration::ZERO,
        );
        assert_eq!(t.window(origin).len(), 6, "seconds 0..=5 of a 5 s span");
        t.record(
            origin + Duration::from_secs(60),
            Duration::ZERO,
            Duration::ZERO,
        );
        assert_eq!(t.window(origin).len(), 6, "past the span: not placed");
        let huge = Timeline::new(origin, Duration::from_secs(u64::MAX));
        assert_eq!(huge.seconds.len() as u64, MAX_TIMELINE_S);
        assert!(Timeline::new(origin, Duration::ZERO)
            .window(origin)
            .is_empty());
    }

    #[test]
    fn huge_latencies_saturate_instead_of_failing() {
        let mut s = Stats::default();
        s.answer(
            Duration::from_secs(7200),
            Duration::ZERO,
            StatusCode::CREATED,
            b"",
            true,
        );
        assert_eq!(s.latency.len(), 1);
        assert!(Percentiles::of(&s.latency).max_ms >= 3_600_000.0 * 0.999);
    }
}
