//! Open-loop arrival times: request `i` is due at `t0 + i / rate`, whatever happened to the
//! requests before it. Latency is measured from that due time, not from when the request was
//! actually written, so a server that stalls can't make the client wait politely and hide the
//! queue it built (coordinated omission).

use std::time::Duration;

/// A fixed-rate schedule with a warm-up prefix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    rate_per_s: f64,
    warmup_s: f64,
    duration_s: f64,
}

impl Schedule {
    pub fn new(rate_per_s: f64, warmup_s: f64, duration_s: f64) -> Self {
        debug_assert!(rate_per_s > 0.0 && warmup_s >= 0.0 && duration_s > 0.0);
        Self {
            rate_per_s,
            warmup_s,
            duration_s,
        }
    }

    /// When request `i` is due, relative to t0.
    pub fn offset(&self, i: u64) -> Duration {
        Duration::from_secs_f64(i as f64 / self.rate_per_s)
    }

    /// The number of requests due strictly before `seconds`: those `i` with `i / rate < seconds`.
    fn count_before(&self, seconds: f64) -> u64 {
        // The epsilon keeps float noise (0.3 * 10 = 3.0000000000000004) from adding a request.
        (seconds * self.rate_per_s - 1e-9).ceil().max(0.0) as u64
    }

    /// Requests due in the warm-up; they are sent but not recorded. Request `i` is a warm-up
    /// request iff `i < warmup_requests()`.
    pub fn warmup_requests(&self) -> u64 {
        self.count_before(self.warmup_s)
    }

    /// Every request of the run, warm-up included.
    pub fn total_requests(&self) -> u64 {
        self.count_before(self.warmup_s + self.duration_s)
    }

    /// Requests in the measured window.
    pub fn measured_requests(&self) -> u64 {
        self.total_requests() - self.warmup_requests()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_spaced_one_over_rate() {
        let s = Schedule::new(1000.0, 1.0, 10.0);
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), Duration::from_millis(1));
        assert_eq!(s.offset(2500), Duration::from_millis(2500));
    }

    #[test]
    fn counts_cover_warmup_and_duration() {
        let s = Schedule::new(1000.0, 1.0, 10.0);
        assert_eq!(s.warmup_requests(), 1000);
        assert_eq!(s.total_requests(), 11_000);
        assert_eq!(s.measured_requests(), 10_000);
        // The first measured request is due exactly when the window starts.
        assert_eq!(s.offset(s.warmup_requests()), Duration::from_secs(1));
    }

    #[test]
    fn fractional_rates_round_up_to_requests_due_inside_the_window() {
        // 3 req/s for 1 s: due at 0, 1/3, 2/3 — three requests.
        let s = Schedule::new(3.0, 0.0, 1.0);
        assert_eq!(s.total_requests(), 3);
        // 2.5 req/s for 1 s: due at 0, 0.4, 0.8 — three requests, the next (1.2 s) is outside.
        let s = Schedule::new(2.5, 0.0, 1.0);
        assert_eq!(s.total_requests(), 3);
        assert!(s.offset(2) < Duration::from_secs(1));
        assert!(s.offset(3) >= Duration::from_secs(1));
    }

    #[test]
    fn float_noise_does_not_add_a_request() {
        let s = Schedule::new(10.0, 0.3, 0.7);
        assert_eq!(s.warmup_requests(), 3);
        assert_eq!(s.total_requests(), 10);
    }

    #[test]
    fn no_warmup_means_everything_is_measured() {
        let s = Schedule::new(500.0, 0.0, 2.0);
        assert_eq!(s.warmup_requests(), 0);
        assert_eq!(s.measured_requests(), 1000);
    }
}
