//! Command line: one subcommand per scenario, every option also readable from the environment
//! that `./dev up` writes to `.dev/env`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Upper bounds on the options, so a typo can't ask for a million sockets (the open-file limit
/// per process is 20,000) or an unbounded amount of memory.
pub const MAX_CONNECTIONS: usize = 10_000;
pub const MAX_WORKERS: usize = 10_000;
pub const MAX_FANS: usize = 1_000_000;
pub const MAX_BACKLOG: usize = 10_000_000;
pub const MAX_RATE_PER_S: f64 = 10_000_000.0;
pub const MAX_DURATION_S: f64 = 24.0 * 3600.0;
pub const MAX_QUANTITY: u32 = 1000;
pub const MAX_REQUEST_TIMEOUT_MS: u64 = 600_000;
pub const MAX_THREADS: usize = 64;

#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about = "Floodgate's load generator")]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Fans reserve GA units of one drop through booking-api, open- or closed-loop; then optional
    /// confirms and releases; then the stock invariants are checked against the API and Postgres.
    Reserve(ReserveArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Requests arrive at a fixed rate whatever the server does; latency counts from the time
    /// each request was due, so queueing in front of a slow server shows.
    Open,
    /// N workers each send the next request when the previous answer arrives.
    Closed,
}

#[derive(Debug, Clone, Args)]
pub struct ReserveArgs {
    /// booking-api's base URL.
    #[arg(long, env = "BOOKING_URL")]
    pub booking_url: String,

    /// Seller API key, used to create the drop (not needed with --drop-id).
    #[arg(long, env = "FLOODGATE_SELLER_KEY", hide_env_values = true)]
    pub seller_key: Option<String>,

    /// Postgres, for the sold-count checks at the end.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Run against this existing drop instead of creating one (skips the hold-count check:
    /// others may be holding units of it).
    #[arg(long)]
    pub drop_id: Option<String>,

    /// Create the drop, print its id on stdout and exit (for bench/reserve-baseline.sh).
    #[arg(long, conflicts_with = "drop_id")]
    pub setup_only: bool,

    /// The SKU to reserve (the created drop has exactly this one).
    #[arg(long, default_value = "LT")]
    pub sku: String,

    #[arg(long, value_enum, default_value_t = Mode::Open)]
    pub mode: Mode,

    /// Open loop: arrival rate in requests per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,

    /// Measured duration, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,

    /// Load before the measured window that is sent but not recorded.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_s: f64,

    /// Open loop: keep-alive HTTP/1.1 connections sharing the request queue.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,

    /// Closed loop: workers, each on its own connection.
    #[arg(long, default_value_t = 50)]
    pub workers: usize,

    /// Open loop: requests due but not yet sent beyond this are counted as dropped.
    #[arg(long, default_value_t = 100_000)]
    pub max_backlog: usize,

    /// Fan sessions to create; requests go to them round-robin.
    #[arg(long, default_value_t = 1000)]
    pub fans: usize,

    /// Units per hold.
    #[arg(long, default_value_t = 1)]
    pub quantity: u32,

    /// Created drop: units of the SKU.
    #[arg(long, default_value_t = 1_000_000)]
    pub stock: u64,

    /// Created drop: units per fan.
    #[arg(long, default_value_t = 1000)]
    pub per_fan_limit: u32,

    /// Created drop: hold time in seconds (1..=3600).
    #[arg(long, default_value_t = 600)]
    pub hold_ttl_s: u32,

    /// Percentage (0..=100) of successful holds to confirm after the reserve phase.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub confirm_pct: u8,

    /// Percentage (0..=100) of successful holds to release after the reserve phase.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub release_pct: u8,

    /// Runtime threads of the load generator. One keeps it off the second core the server
    /// needs on a small machine (and avoids cross-thread wake-ups); raise it when the client,
    /// not the server, is the bottleneck (the bar shows a growing backlog at low CPU).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// A request without an answer after this long counts as a timeout.
    #[arg(long, default_value_t = 10_000)]
    pub request_timeout_ms: u64,

    /// Also write the report as JSON to this path.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl ReserveArgs {
    /// Checks the bounds clap can't express; returns a message for the first one broken.
    pub fn validate(&self) -> Result<(), String> {
        let finite_in = |v: f64, lo: f64, hi: f64| v.is_finite() && v >= lo && v <= hi;
        if !finite_in(self.rate, f64::MIN_POSITIVE, MAX_RATE_PER_S) {
            return Err(format!("--rate must be in (0, {MAX_RATE_PER_S}]"));
        }
        if !finite_in(self.duration_s, f64::MIN_POSITIVE, MAX_DURATION_S) {
            return Err(format!("--duration-s must be in (0, {MAX_DURATION_S}]"));
        }
        if !finite_in(self.warmup_s, 0.0, MAX_DURATION_S) {
            return Err(format!("--warmup-s must be in [0, {MAX_DURATION_S}]"));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(format!("--connections must be in 1..={MAX_CONNECTIONS}"));
        }
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(format!("--workers must be in 1..={MAX_WORKERS}"));
        }
        if !(1..=MAX_BACKLOG).contains(&self.max_backlog) {
            return Err(format!("--max-backlog must be in 1..={MAX_BACKLOG}"));
        }
        if !(1..=MAX_FANS).contains(&self.fans) {
            return Err(format!("--fans must be in 1..={MAX_FANS}"));
        }
        if !(1..=MAX_QUANTITY).contains(&self.quantity) {
            return Err(format!("--quantity must be in 1..={MAX_QUANTITY}"));
        }
        if !(1..=3600).contains(&self.hold_ttl_s) {
            return Err("--hold-ttl-s must be in 1..=3600".into());
        }
        if self.per_fan_limit == 0 {
            return Err("--per-fan-limit must be at least 1".into());
        }
        if self.stock == 0 {
            return Err("--stock must be at least 1".into());
        }
        if u16::from(self.confirm_pct) + u16::from(self.release_pct) > 100 {
            return Err("--confirm-pct + --release-pct must not exceed 100".into());
        }
        if !(1..=MAX_REQUEST_TIMEOUT_MS).contains(&self.request_timeout_ms) {
            return Err(format!(
                "--request-timeout-ms must be in 1..={MAX_REQUEST_TIMEOUT_MS}"
            ));
        }
        if !(1..=MAX_THREADS).contains(&self.threads) {
            return Err(format!("--threads must be in 1..={MAX_THREADS}"));
        }
        if self.drop_id.is_none() && self.seller_key.is_none() {
            return Err(
                "creating a drop needs --seller-key (or FLOODGATE_SELLER_KEY); \
                        or pass --drop-id"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> ReserveArgs {
        let mut argv = vec![
            "loadtest",
            "reserve",
            "--booking-url",
            "http://127.0.0.1:8080",
            "--database-url",
            "postgres://x@127.0.0.1/db",
            "--seller-key",
            "k",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)
            .expect("valid command line")
            .scenario
        {
            Scenario::Reserve(a) => a,
        }
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let a = parse(&[]);
        assert_eq!(a.mode, Mode::Open);
        assert_eq!(a.rate, 1000.0);
        assert_eq!(a.duration_s, 10.0);
        assert_eq!(a.warmup_s, 1.0);
        assert_eq!(a.connections, 64);
        assert_eq!(a.workers, 50);
        assert_eq!(a.max_backlog, 100_000);
        assert_eq!(a.fans, 1000);
        assert_eq!(a.quantity, 1);
        assert_eq!(a.stock, 1_000_000);
        assert_eq!(a.per_fan_limit, 1000);
        assert_eq!(a.hold_ttl_s, 600);
        assert_eq!((a.confirm_pct, a.release_pct), (0, 0));
        assert_eq!(a.threads, 1);
        assert_eq!(a.validate(), Ok(()));
    }

    #[test]
    fn percentages_over_100_in_total_are_refused() {
        assert!(parse(&["--confirm-pct", "60", "--release-pct", "50"])
            .validate()
            .is_err());
        assert!(parse(&["--confirm-pct", "60", "--release-pct", "40"])
            .validate()
            .is_ok());
    }

    #[test]
    fn zero_rate_and_out_of_range_ttl_are_refused() {
        assert!(parse(&["--rate", "0"]).validate().is_err());
        assert!(parse(&["--hold-ttl-s", "3601"]).validate().is_err());
        assert!(parse(&["--connections", "0"]).validate().is_err());
    }

    #[test]
    fn closed_mode_parses() {
        assert_eq!(
            parse(&["--mode", "closed", "--workers", "8"]).mode,
            Mode::Closed
        );
    }
}
