//! Command line: one subcommand per scenario, every option also readable from the environment
//! that `./dev up` writes to `.dev/env`.

use std::net::SocketAddr;
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

/// `loadtest queue`'s defaults and bounds. queue-server's own defaults it mirrors (tick, buffer
/// sizes, send queue) are engine::config's `DEFAULT_QUEUE_*`; loadtest doesn't link the engine.
pub const DEFAULT_QUEUE_FANS: usize = 2_000;
pub const MAX_QUEUE_FANS: usize = 100_000;
pub const DEFAULT_QUEUE_STOCK: u64 = 1_000_000;
pub const DEFAULT_QUEUE_PER_FAN_LIMIT: u32 = 1;
pub const DEFAULT_ADMIT_RATE_PER_S: f64 = 50.0;
/// One second of admissions: a tick loop that stalls longer than burst / rate loses tokens.
pub const DEFAULT_ADMIT_BURST: u64 = 50;
pub const DEFAULT_MAX_ACTIVE: u64 = 1_000_000;
/// Client processes, each with its share of the sockets (open files per process are limited).
pub const DEFAULT_CLIENT_PROCS: usize = 4;
pub const MAX_CLIENT_PROCS: usize = 100;
/// Sockets per source address: far below the ~28,000 ephemeral ports of one address.
pub const DEFAULT_SOCKETS_PER_ADDR: usize = 1_000;
pub const MAX_SOCKETS_PER_ADDR: usize = 20_000;
/// Sockets per client process between connect and first frame at once.
pub const DEFAULT_CONNECT_CONCURRENCY: usize = 64;
pub const MAX_CONNECT_CONCURRENCY: usize = 10_000;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 30_000;
/// The clients' tungstenite read buffer (allocated per socket up front; frames are < 1 KiB).
pub const DEFAULT_CLIENT_READ_BUFFER_BYTES: usize = 4 * 1024;
/// Largest frame a client (or the baseline server) accepts.
pub const MAX_WS_MESSAGE_BYTES: usize = 64 * 1024;
pub const DEFAULT_SETTLE_S: f64 = 3.0;
/// Thirty shared frames at queue-server's default pace, three rounds of exact positions.
pub const DEFAULT_STEADY_S: f64 = 30.0;
pub const DEFAULT_ADMIT_WINDOW_S: f64 = 60.0;
pub const DEFAULT_ADMIT_SETTLE_S: f64 = 2.0;
/// queue-server's `queue.broadcast_interval_ms` default: how often every waiter gets the shared
/// `tick` frame. The baseline broadcasts at the same pace.
pub const DEFAULT_BROADCAST_INTERVAL_MS: u64 = 1_000;
/// queue-server's `queue.ws_read_buffer_bytes` / `ws_write_buffer_bytes` / `send_queue_len`.
pub const DEFAULT_SERVER_WS_BUFFER_BYTES: usize = 4 * 1024;
pub const DEFAULT_SERVER_SEND_QUEUE_LEN: usize = 16;
pub const DEFAULT_BASELINE_THREADS: usize = 2;

/// `loadtest seatmap`'s defaults and bounds (issue 11, item 7: a 50,000-seat drop, 2,000 pages
/// polling its map every 5 s as book.js does, reserves at half of peak).
pub const DEFAULT_SEAT_SECTIONS: u32 = 50;
pub const DEFAULT_SEAT_ROWS: u32 = 10;
pub const DEFAULT_SEATS_PER_ROW: u32 = 100;
/// booking-api's bounds on a seated drop (docs/API.md, `POST /v1/drops`): sections per drop
/// (`drops.max_buckets` default), seats per row, seats per drop (`drops.max_seats` default).
pub const MAX_SEAT_SECTIONS: u32 = 200;
pub const MAX_SEATS_PER_ROW: u32 = 1000;
pub const MAX_DROP_SEATS: u64 = 100_000;
pub const DEFAULT_POLL_PAGES: usize = 2_000;
pub const MAX_POLL_PAGES: usize = 1_000_000;
/// book.js polls the seat map every 5 s.
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 5_000;
pub const MIN_POLL_INTERVAL_MS: u64 = 100;
pub const MAX_POLL_INTERVAL_MS: u64 = 600_000;
/// Connections the pages share: 400 GETs/s of a few ms each need a handful.
pub const DEFAULT_POLL_CONNECTIONS: usize = 16;
pub const DEFAULT_SEATMAP_DURATION_S: f64 = 20.0;
/// Long enough for a steady figure, short enough that a 50,000-seat drop lasts at ~15,000/s.
pub const DEFAULT_PEAK_S: f64 = 2.0;
/// The open-loop runs go at this share of the peak.
pub const DEFAULT_LOAD_FRACTION: f64 = 0.5;
/// Pairs of runs (without pages, then with) at most: each is two fresh drops.
pub const MAX_ROUNDS: u32 = 20;
/// The bar: reserve p99 with the pages at most this many times the p99 without them.
pub const BAR_P99_RATIO: f64 = 1.2;

/// Instances of one server a run spreads over (`loadtest sale`'s URL lists).
pub const MAX_INSTANCES: usize = 64;

/// A comma-separated list of base URLs (`.dev/env`'s `*_INSTANCE_URLS`), blanks dropped.
pub fn instance_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `loadtest sale`'s defaults and bounds: a small rehearsal by default (the acceptance run's
/// figures are in docs/BENCHMARKS.md, "The whole sale").
pub const DEFAULT_SALE_FANS: usize = 2_000;
pub const DEFAULT_SALE_WS_FANS: usize = 1_000;
pub const DEFAULT_SALE_STOCK: u64 = 500;
/// Fans who join before `opens_at` (the pre-queue), in percent.
pub const DEFAULT_PRE_QUEUE_PCT: u8 = 20;
/// The drop opens this long after it is created: the pre-queue fans join meanwhile.
pub const DEFAULT_PRE_OPEN_S: f64 = 15.0;
/// Short holds, so abandoned ones come back within the run.
pub const DEFAULT_SALE_HOLD_TTL_S: u32 = 10;
/// Admission counts a fan who released their hold as still shopping until the shop window ends
/// (they may pick again), so units given back wait for it: a minute keeps the sale moving.
pub const DEFAULT_SHOP_WINDOW_S: u32 = 60;
/// The drop's `leave_grace_s` for the run: HTTP fans who poll every few seconds stay anyway; a
/// long grace keeps the slow pollers of a big line in it (booking-api's bounds: 15..=86400).
pub const DEFAULT_SALE_LEAVE_GRACE_S: u32 = 3_600;
pub const DEFAULT_THINK_MS: u64 = 500;
pub const DEFAULT_PAY_PCT: u8 = 80;
pub const DEFAULT_RELEASE_PCT: u8 = 10;
pub const DEFAULT_HOSTILE_PCT: u8 = 5;
/// Joins per second after opening, sockets and HTTP fans together: fans arrive over time, so
/// the order they get their answers in is an order (a burst of thousands at once has none).
pub const DEFAULT_JOIN_RATE_PER_S: f64 = 500.0;
/// How often an HTTP-only fan polls `/queue/me` (queue-server allows 2/s per fan).
pub const DEFAULT_POLL_MS: u64 = 5_000;
pub const MIN_POLL_MS: u64 = 500;
/// Connections the HTTP-only fans share, each from its own source address 127.0.0.(k+1).
pub const DEFAULT_HTTP_CONNECTIONS: usize = 32;
pub const MAX_HTTP_CONNECTIONS: usize = 250;
/// Fans shopping at once (each on its own connection while it shops).
pub const DEFAULT_SHOP_CONCURRENCY: usize = 256;
pub const MAX_SHOP_CONCURRENCY: usize = 5_000;
/// A fan told `all_held` tries again after this long, until its shop window ends.
pub const DEFAULT_RETRY_MS: u64 = 1_000;
/// `--line-only`: how long the full line is watched after the last join, and how many fans'
/// `/queue/me` are timed at its head and at its back.
pub const DEFAULT_LINE_HOLD_S: f64 = 30.0;
pub const DEFAULT_POSITION_SAMPLES: usize = 200;
pub const MAX_POSITION_SAMPLES: usize = 100_000;
/// engine::config's `DEFAULT_CONFIRM_GRACE_MS` (loadtest doesn't link the engine).
pub const DEFAULT_CONFIRM_GRACE_MS: u64 = 60_000;
pub const DEFAULT_SALE_MAX_DURATION_S: f64 = 900.0;
/// After the last sale, how long waiters get to hear `sold_out` before the sockets close.
pub const DEFAULT_SOLD_OUT_GRACE_S: f64 = 5.0;

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
    /// Seat maps at scale: on a seated drop, reserve p99 at half of peak without and with
    /// thousands of booking pages polling the seat map (If-None-Match), and their ratio.
    Seatmap(SeatmapArgs),
    /// The waiting room at scale: N WebSockets in one queue-server process, held by client
    /// processes of loadtest; RSS per socket, tick delivery to the last socket, exact-position
    /// rounds, admissions per minute against the set rate, and admission order — beside a
    /// minimal tokio-tungstenite broadcast server measured the same way in the same run.
    Queue(QueueArgs),
    /// The whole flash sale: N fans (WebSockets across client processes, and HTTP-only fans
    /// beyond them) join a queue drop, some before it opens; admitted fans reserve after a
    /// think time, then pay, release or abandon; until sold out. Reports sold == stock (API and
    /// Postgres), time to sell out, admissions/s against the set rate, Kendall τ of join vs
    /// admission order, the pre-queue order against the revealed seed, `sold_out` delivery after
    /// the last sale, latencies, errors by code, server and Redis CPU and memory; as text, JSON
    /// and one HTML file with SVG charts.
    Sale(SaleArgs),
    /// (internal) One client process of `queue`: JSON lines on stdin and stdout.
    #[command(hide = true)]
    QueueClients,
    /// (internal) The baseline server of `queue`: broadcasts a tick frame to every socket.
    #[command(hide = true)]
    WsBaseline(WsBaselineArgs),
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

    /// Confirms and releases at this many per second (an open loop over the same connections:
    /// latency counts from each one's due time) instead of back to back.
    #[arg(long)]
    pub follow_up_rate: Option<f64>,

    /// More booking-api instances (base URLs, same Redis and Postgres) that share the confirms
    /// and releases with --booking-url: the follow-up workers take the URLs in turn.
    #[arg(long = "also-booking-url")]
    pub also_booking_urls: Vec<String>,

    /// Ops API key: with it, the confirm phase is broken down by step (begin, payment row,
    /// authorize, order commit, capture, finish) from every instance's
    /// `floodgate_confirm_step_seconds`, read before and after the phase.
    #[arg(long, env = "FLOODGATE_OPS_KEY", hide_env_values = true)]
    pub ops_key: Option<String>,

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
        if let Some(r) = self.follow_up_rate {
            if !finite_in(r, f64::MIN_POSITIVE, MAX_RATE_PER_S) {
                return Err(format!("--follow-up-rate must be in (0, {MAX_RATE_PER_S}]"));
            }
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

#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    /// booking-api's base URL (drop, admission settings, fan sessions).
    #[arg(long, env = "BOOKING_URL")]
    pub booking_url: String,

    /// queue-server's base URL; sockets go to `ws://…/v1/drops/{drop_id}/queue/ws`.
    #[arg(long, env = "QUEUE_URL")]
    pub queue_url: String,

    /// Seller API key, to create the drop (not needed with --drop-id).
    #[arg(long, env = "FLOODGATE_SELLER_KEY", hide_env_values = true)]
    pub seller_key: Option<String>,

    /// Ops API key: admission is paused while sockets connect and resumed for the admission
    /// window (`PUT /v1/drops/{drop_id}/admission`).
    #[arg(long, env = "FLOODGATE_OPS_KEY", hide_env_values = true)]
    pub ops_key: String,

    /// Use this queue drop (its admission settings are overwritten with the ones below, and
    /// its line should be empty) instead of creating one.
    #[arg(long, visible_alias = "drop")]
    pub drop_id: Option<String>,

    /// WebSockets to open: one fan each.
    #[arg(long, default_value_t = DEFAULT_QUEUE_FANS)]
    pub fans: usize,

    /// Created drop: units of its one SKU (enough that stock never limits admission).
    #[arg(long, default_value_t = DEFAULT_QUEUE_STOCK)]
    pub stock: u64,

    /// Created drop: units per fan (admission keeps Σ per_fan_limit of active fans ≤ stock).
    #[arg(long, default_value_t = DEFAULT_QUEUE_PER_FAN_LIMIT)]
    pub per_fan_limit: u32,

    /// The drop's admission settings.
    #[command(flatten)]
    pub admission: AdmissionArgs,

    /// The client processes holding the sockets.
    #[command(flatten)]
    pub sockets: SocketArgs,

    /// Wait after the last socket opened before measuring.
    #[arg(long, default_value_t = DEFAULT_SETTLE_S)]
    pub settle_s: f64,

    /// The steady phase: every socket open, admission paused; tick delivery and position rounds.
    #[arg(long, default_value_t = DEFAULT_STEADY_S)]
    pub steady_s: f64,

    /// The admission window measured after admission resumes and the burst is spent.
    #[arg(long, default_value_t = DEFAULT_ADMIT_WINDOW_S)]
    pub admit_window_s: f64,

    /// Wait after resuming admission, on top of burst / rate, before the window starts.
    #[arg(long, default_value_t = DEFAULT_ADMIT_SETTLE_S)]
    pub admit_settle_s: f64,

    /// Skip the baseline (the minimal broadcast server; it costs a second round of connects).
    #[arg(long)]
    pub no_baseline: bool,

    /// Where the baseline server listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub baseline_listen: SocketAddr,

    /// How often the baseline broadcasts; set it to queue-server's `queue.broadcast_interval_ms`.
    #[arg(long, default_value_t = DEFAULT_BROADCAST_INTERVAL_MS)]
    pub broadcast_interval_ms: u64,

    /// queue-server's pid, for its memory and CPU; found from the port it listens on if not given.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Redis, only to find its process and report its CPU share (optional).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Setup requests without an answer after this long fail the run.
    #[arg(long, default_value_t = 10_000)]
    pub request_timeout_ms: u64,

    /// Exit 1 when a bar is missed (RSS per socket, tick delivery p99, admission rate, order).
    #[arg(long)]
    pub check: bool,

    /// Also write the report as JSON to this path.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl QueueArgs {
    /// Checks the bounds clap can't express; returns a message for the first one broken.
    pub fn validate(&self) -> Result<(), String> {
        let finite_in = |v: f64, lo: f64, hi: f64| v.is_finite() && v >= lo && v <= hi;
        if !(1..=MAX_QUEUE_FANS).contains(&self.fans) {
            return Err(format!("--fans must be in 1..={MAX_QUEUE_FANS}"));
        }
        self.sockets.validate(self.fans)?;
        if !(1..=MAX_REQUEST_TIMEOUT_MS).contains(&self.request_timeout_ms) {
            return Err(format!(
                "--request-timeout-ms must be in 1..={MAX_REQUEST_TIMEOUT_MS}"
            ));
        }
        self.admission.validate()?;
        if self.stock == 0 || self.per_fan_limit == 0 {
            return Err("--stock and --per-fan-limit must be at least 1".into());
        }
        for (name, v) in [
            ("--settle-s", self.settle_s),
            ("--admit-settle-s", self.admit_settle_s),
        ] {
            if !finite_in(v, 0.0, MAX_DURATION_S) {
                return Err(format!("{name} must be in [0, {MAX_DURATION_S}]"));
            }
        }
        for (name, v) in [
            ("--steady-s", self.steady_s),
            ("--admit-window-s", self.admit_window_s),
        ] {
            if !finite_in(v, 1.0, MAX_DURATION_S) {
                return Err(format!("{name} must be in [1, {MAX_DURATION_S}]"));
            }
        }
        if !(10..=60_000).contains(&self.broadcast_interval_ms) {
            return Err("--broadcast-interval-ms must be in 10..=60000".into());
        }
        if self.drop_id.is_none() && self.seller_key.is_none() {
            return Err(
                "creating a drop needs --seller-key (or FLOODGATE_SELLER_KEY); or pass --drop-id"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A queue drop's admission settings (`queue`, `sale`).
#[derive(Debug, Clone, Copy, Args)]
pub struct AdmissionArgs {
    /// Admissions per second (`admission.rate_per_s`).
    #[arg(long, default_value_t = DEFAULT_ADMIT_RATE_PER_S)]
    pub rate_per_s: f64,

    /// Token bucket size (`admission.burst`).
    #[arg(long, default_value_t = DEFAULT_ADMIT_BURST)]
    pub burst: u64,

    /// Active shoppers at most (`admission.max_active`); the default never limits.
    #[arg(long, default_value_t = DEFAULT_MAX_ACTIVE)]
    pub max_active: u64,
}

impl AdmissionArgs {
    /// booking-api's bounds on the settings (docs/API.md).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.rate_per_s.is_finite() && self.rate_per_s > 0.0 && self.rate_per_s <= 100_000.0) {
            return Err("--rate-per-s must be in (0, 100000]".into());
        }
        if !(1..=1_000_000).contains(&self.burst) {
            return Err("--burst must be in 1..=1000000".into());
        }
        if !(1..=10_000_000).contains(&self.max_active) {
            return Err("--max-active must be in 1..=10000000".into());
        }
        Ok(())
    }
}

/// The client processes that hold a scenario's WebSockets (`queue`, `sale`).
#[derive(Debug, Clone, Args)]
pub struct SocketArgs {
    /// Client processes sharing the sockets (1..=100); process k uses source addresses
    /// 127.0.k.1, 127.0.k.2, … (`queue`'s baseline 127.0.(128+k).x).
    #[arg(long, default_value_t = DEFAULT_CLIENT_PROCS)]
    pub client_procs: usize,

    /// Sockets per source address.
    #[arg(long, default_value_t = DEFAULT_SOCKETS_PER_ADDR)]
    pub sockets_per_addr: usize,

    /// Per client process: sockets between connect and their first frame at once.
    #[arg(long, default_value_t = DEFAULT_CONNECT_CONCURRENCY)]
    pub connect_concurrency: usize,

    /// A socket not open (handshake done, first frame in) after this long counts as failed.
    #[arg(long, default_value_t = DEFAULT_CONNECT_TIMEOUT_MS)]
    pub connect_timeout_ms: u64,

    /// The clients' WebSocket read buffer per socket.
    #[arg(long, default_value_t = DEFAULT_CLIENT_READ_BUFFER_BYTES)]
    pub client_read_buffer_bytes: usize,
}

impl SocketArgs {
    /// The bounds, for `sockets` sockets in all; a message for the first one broken.
    pub fn validate(&self, sockets: usize) -> Result<(), String> {
        if !(1..=MAX_CLIENT_PROCS).contains(&self.client_procs) {
            return Err(format!("--client-procs must be in 1..={MAX_CLIENT_PROCS}"));
        }
        if !(1..=MAX_SOCKETS_PER_ADDR).contains(&self.sockets_per_addr) {
            return Err(format!(
                "--sockets-per-addr must be in 1..={MAX_SOCKETS_PER_ADDR}"
            ));
        }
        let per_proc = sockets.div_ceil(self.client_procs);
        if per_proc.div_ceil(self.sockets_per_addr) > crate::ws_clients::MAX_HOSTS_PER_NET {
            return Err(format!(
                "{per_proc} sockets per client process need more than {} source addresses: \
                 raise --sockets-per-addr or --client-procs",
                crate::ws_clients::MAX_HOSTS_PER_NET
            ));
        }
        if !(1..=MAX_CONNECT_CONCURRENCY).contains(&self.connect_concurrency) {
            return Err(format!(
                "--connect-concurrency must be in 1..={MAX_CONNECT_CONCURRENCY}"
            ));
        }
        if !(1..=MAX_REQUEST_TIMEOUT_MS).contains(&self.connect_timeout_ms) {
            return Err(format!(
                "--connect-timeout-ms must be in 1..={MAX_REQUEST_TIMEOUT_MS}"
            ));
        }
        if !(256..=MAX_WS_MESSAGE_BYTES).contains(&self.client_read_buffer_bytes) {
            return Err(format!(
                "--client-read-buffer-bytes must be in 256..={MAX_WS_MESSAGE_BYTES}"
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Args)]
pub struct SaleArgs {
    /// booking-api's base URL (drop, fan sessions, reserves, confirms); several (comma-separated
    /// or the flag repeated): instances of one deployment, fan k shops on instance k mod n.
    #[arg(long, env = "BOOKING_URL", value_delimiter = ',', required = true)]
    pub booking_url: Vec<String>,

    /// queue-server's base URL (the line: sockets, HTTP joins and polls, the seed); several:
    /// socket k connects to instance k mod n (so a fan always meets the same instance), HTTP
    /// connection k joins and polls through instance k mod n.
    #[arg(long, env = "QUEUE_URL", value_delimiter = ',', required = true)]
    pub queue_url: Vec<String>,

    /// Take the instances from `BOOKING_INSTANCE_URLS` and `QUEUE_INSTANCE_URLS` (`./dev up
    /// --instances N` writes them to .dev/env) instead of --booking-url / --queue-url: past
    /// HAProxy, whose one process holds ≈ 9,900 sockets under a 20,000-file limit.
    #[arg(long)]
    pub instances_from_env: bool,

    /// Seller API key: the run creates its own drop.
    #[arg(long, env = "FLOODGATE_SELLER_KEY", hide_env_values = true)]
    pub seller_key: String,

    /// Postgres, for what was sold and the per-fan limit at the end.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Redis, only to find its process for its memory and CPU (optional).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// A Redis Cluster's nodes (`host:port`, comma-separated; `./dev up --redis-cluster` writes
    /// them to .dev/env): each node's process CPU and memory are reported, as --redis-url's.
    #[arg(long, env = "REDIS_CLUSTER_NODES", value_delimiter = ',')]
    pub redis_nodes: Vec<String>,

    /// Fans in all: the first --ws-fans on WebSockets, the rest HTTP-only (join, then poll
    /// `/queue/me`).
    #[arg(long, default_value_t = DEFAULT_SALE_FANS)]
    pub fans: usize,

    /// Fans on WebSockets (one queue-server process holds ≈ 19,000 under a 20,000-file limit).
    #[arg(long, default_value_t = DEFAULT_SALE_WS_FANS)]
    pub ws_fans: usize,

    /// Units of the drop's one SKU.
    #[arg(long, default_value_t = DEFAULT_SALE_STOCK)]
    pub stock: u64,

    /// Units per fan; each fan reserves one unit.
    #[arg(long, default_value_t = DEFAULT_QUEUE_PER_FAN_LIMIT)]
    pub per_fan_limit: u32,

    /// Percentage of fans (of sockets and of HTTP fans alike) who join before `opens_at`.
    #[arg(long, default_value_t = DEFAULT_PRE_QUEUE_PCT, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub pre_queue_pct: u8,

    /// The drop opens this long after the run creates it; the pre-queue joins meanwhile.
    #[arg(long, default_value_t = DEFAULT_PRE_OPEN_S)]
    pub pre_open_s: f64,

    /// The drop's admission settings.
    #[command(flatten)]
    pub admission: AdmissionArgs,

    /// `admission.shop_window_s`.
    #[arg(long, default_value_t = DEFAULT_SHOP_WINDOW_S)]
    pub shop_window_s: u32,

    /// `admission.leave_grace_s` for the run's drop (15..=86400).
    #[arg(long, default_value_t = DEFAULT_SALE_LEAVE_GRACE_S)]
    pub leave_grace_s: u32,

    /// The drop's hold time (1..=3600): abandoned holds come back after it.
    #[arg(long, default_value_t = DEFAULT_SALE_HOLD_TTL_S)]
    pub hold_ttl_s: u32,

    /// An admitted fan reserves this long after hearing it.
    #[arg(long, default_value_t = DEFAULT_THINK_MS)]
    pub think_ms: u64,

    /// Percentage of held fans who pay (the test gateway's `ok_…`).
    #[arg(long, default_value_t = DEFAULT_PAY_PCT, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub pay_pct: u8,

    /// Percentage who release their hold; the rest abandon it (it expires).
    #[arg(long, default_value_t = DEFAULT_RELEASE_PCT, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub release_pct: u8,

    /// Percentage of hostile fans: a second tab (a second join), a reserve without admission,
    /// and once admitted a retry reusing the idempotency key (same body, then another body)
    /// and a reserve past the per-fan limit.
    #[arg(long, default_value_t = DEFAULT_HOSTILE_PCT, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub hostile_pct: u8,

    /// Joins per second after opening, sockets and HTTP fans together (each kind at its share);
    /// the pre-queue joins as fast as it can.
    #[arg(long, default_value_t = DEFAULT_JOIN_RATE_PER_S)]
    pub join_rate_per_s: f64,

    /// How often an HTTP-only fan polls `/queue/me`.
    #[arg(long, default_value_t = DEFAULT_POLL_MS)]
    pub poll_ms: u64,

    /// Connections of the HTTP-only fans, connection k from source address 127.0.0.(k+1).
    #[arg(long, default_value_t = DEFAULT_HTTP_CONNECTIONS)]
    pub http_connections: usize,

    /// Fans shopping at once.
    #[arg(long, default_value_t = DEFAULT_SHOP_CONCURRENCY)]
    pub shop_concurrency: usize,

    /// A fan told `all_held` tries again after this long.
    #[arg(long, default_value_t = DEFAULT_RETRY_MS)]
    pub retry_ms: u64,

    /// booking-api's `holds.confirm_grace_ms`: admission counts a fan who abandoned a hold as
    /// shopping until its expiry plus this (for judging when the bucket limited admission).
    #[arg(long, default_value_t = DEFAULT_CONFIRM_GRACE_MS)]
    pub confirm_grace_ms: u64,

    /// The client processes holding the sockets (the pre-queue's and the rest's are split over
    /// them separately: the latter on 127.0.(client_procs+k).x).
    #[command(flatten)]
    pub sockets: SocketArgs,

    /// The sale fails if not sold out this long after opening.
    #[arg(long, default_value_t = DEFAULT_SALE_MAX_DURATION_S)]
    pub max_duration_s: f64,

    /// After the last sale, how long waiters get to hear `sold_out`.
    #[arg(long, default_value_t = DEFAULT_SOLD_OUT_GRACE_S)]
    pub sold_out_grace_s: f64,

    /// The line at scale instead of a sale: every fan joins (HTTP fans join once and never
    /// poll: give the drop a long --leave-grace-s), nobody shops (give it stock that never runs
    /// out); reports the join rate, Redis memory per waiter, `/queue/me` at the head and at the
    /// back of the line, and the admission rate while the line is full.
    #[arg(long)]
    pub line_only: bool,

    /// `--line-only`: how long the full line is watched after the last join.
    #[arg(long, default_value_t = DEFAULT_LINE_HOLD_S)]
    pub line_hold_s: f64,

    /// `--line-only`: fans whose `/queue/me` is timed at the head and at the back, each.
    #[arg(long, default_value_t = DEFAULT_POSITION_SAMPLES)]
    pub position_samples: usize,

    /// The join script's rate alone under redis-benchmark, measured in the same run
    /// (bench/sale.sh): the report gives the join rate as a ratio of it.
    #[arg(long)]
    pub join_baseline_per_s: Option<f64>,

    /// The admission script's rate alone under redis-benchmark (bench/sale.sh).
    #[arg(long)]
    pub admit_baseline_per_s: Option<f64>,

    /// Runtime threads of the parent (HTTP fans and shopping).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    #[arg(long, default_value_t = 10_000)]
    pub request_timeout_ms: u64,

    /// Exit 1 also when a bar is missed (τ, admission rate, `sold_out` delivery), not only on
    /// a broken invariant.
    #[arg(long)]
    pub check: bool,

    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write the report as one self-contained HTML file with SVG charts here.
    #[arg(long)]
    pub html: Option<PathBuf>,

    /// Write the text summary here too (it always goes to stdout).
    #[arg(long)]
    pub text: Option<PathBuf>,

    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl SaleArgs {
    /// With --instances-from-env: the instance lists from the environment replace the URLs.
    pub fn resolve_instances(&mut self) -> Result<(), String> {
        if !self.instances_from_env {
            return Ok(());
        }
        let list = |var: &str| -> Result<Vec<String>, String> {
            let urls = instance_urls(&std::env::var(var).unwrap_or_default());
            if urls.is_empty() {
                return Err(format!(
                    "--instances-from-env: {var} is empty or unset (./dev up --instances N \
                     writes it to .dev/env)"
                ));
            }
            Ok(urls)
        };
        self.booking_url = list("BOOKING_INSTANCE_URLS")?;
        self.queue_url = list("QUEUE_INSTANCE_URLS")?;
        Ok(())
    }

    /// Checks the bounds clap can't express; returns a message for the first one broken.
    pub fn validate(&self) -> Result<(), String> {
        if self.booking_url.is_empty() || self.queue_url.is_empty() {
            return Err("--booking-url and --queue-url need at least one URL each".into());
        }
        if self.booking_url.len() > MAX_INSTANCES || self.queue_url.len() > MAX_INSTANCES {
            return Err(format!("at most {MAX_INSTANCES} instances of each server"));
        }
        let finite_in = |v: f64, lo: f64, hi: f64| v.is_finite() && v >= lo && v <= hi;
        if !(1..=MAX_FANS).contains(&self.fans) {
            return Err(format!("--fans must be in 1..={MAX_FANS}"));
        }
        if self.ws_fans > self.fans || self.ws_fans > MAX_QUEUE_FANS {
            return Err(format!(
                "--ws-fans must be at most --fans and {MAX_QUEUE_FANS}"
            ));
        }
        self.sockets.validate(self.ws_fans)?;
        for (name, v) in [
            ("--request-timeout-ms", self.request_timeout_ms),
            ("--think-ms", self.think_ms.max(1)),
            ("--retry-ms", self.retry_ms),
        ] {
            if !(1..=MAX_REQUEST_TIMEOUT_MS).contains(&v) {
                return Err(format!("{name} must be in 1..={MAX_REQUEST_TIMEOUT_MS}"));
            }
        }
        if !(MIN_POLL_MS..=MAX_REQUEST_TIMEOUT_MS).contains(&self.poll_ms) {
            return Err(format!(
                "--poll-ms must be in {MIN_POLL_MS}..={MAX_REQUEST_TIMEOUT_MS}"
            ));
        }
        if !(1..=MAX_HTTP_CONNECTIONS).contains(&self.http_connections) {
            return Err(format!(
                "--http-connections must be in 1..={MAX_HTTP_CONNECTIONS}"
            ));
        }
        if !(1..=MAX_SHOP_CONCURRENCY).contains(&self.shop_concurrency) {
            return Err(format!(
                "--shop-concurrency must be in 1..={MAX_SHOP_CONCURRENCY}"
            ));
        }
        // booking-api's bounds on the drop (docs/API.md, POST /v1/drops).
        self.admission.validate()?;
        if !(1..=10_000_000).contains(&self.stock) {
            return Err("--stock must be in 1..=10000000".into());
        }
        if !(1..=1000).contains(&self.per_fan_limit) {
            return Err("--per-fan-limit must be in 1..=1000".into());
        }
        if !(1..=3600).contains(&self.hold_ttl_s) {
            return Err("--hold-ttl-s must be in 1..=3600".into());
        }
        if !(10..=86_400).contains(&self.shop_window_s) {
            return Err("--shop-window-s must be in 10..=86400".into());
        }
        if !(15..=86_400).contains(&self.leave_grace_s) {
            return Err("--leave-grace-s must be in 15..=86400".into());
        }
        if u16::from(self.pay_pct) + u16::from(self.release_pct) > 100 {
            return Err("--pay-pct + --release-pct must not exceed 100".into());
        }
        if self.pay_pct == 0 {
            return Err("--pay-pct must be above 0, or nothing ever sells".into());
        }
        if !finite_in(self.join_rate_per_s, f64::MIN_POSITIVE, MAX_RATE_PER_S) {
            return Err(format!(
                "--join-rate-per-s must be in (0, {MAX_RATE_PER_S}]"
            ));
        }
        for (name, v, lo) in [
            ("--pre-open-s", self.pre_open_s, 0.0),
            ("--max-duration-s", self.max_duration_s, 1.0),
            ("--sold-out-grace-s", self.sold_out_grace_s, 0.0),
        ] {
            if !finite_in(v, lo, MAX_DURATION_S) {
                return Err(format!("{name} must be in [{lo}, {MAX_DURATION_S}]"));
            }
        }
        if !finite_in(self.line_hold_s, 1.0, MAX_DURATION_S) {
            return Err(format!("--line-hold-s must be in [1, {MAX_DURATION_S}]"));
        }
        if !(1..=MAX_POSITION_SAMPLES).contains(&self.position_samples) {
            return Err(format!(
                "--position-samples must be in 1..={MAX_POSITION_SAMPLES}"
            ));
        }
        if self.pre_queue_pct > 0 && self.pre_open_s < 1.0 {
            return Err("a pre-queue (--pre-queue-pct) needs --pre-open-s of at least 1".into());
        }
        for (name, v) in [
            ("--join-baseline-per-s", self.join_baseline_per_s),
            ("--admit-baseline-per-s", self.admit_baseline_per_s),
        ] {
            if v.is_some_and(|v| !finite_in(v, f64::MIN_POSITIVE, MAX_RATE_PER_S)) {
                return Err(format!("{name} must be in (0, {MAX_RATE_PER_S}]"));
            }
        }
        if !(1..=MAX_THREADS).contains(&self.threads) {
            return Err(format!("--threads must be in 1..={MAX_THREADS}"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Args)]
pub struct SeatmapArgs {
    /// booking-api's base URL.
    #[arg(long, env = "BOOKING_URL")]
    pub booking_url: String,

    /// Seller API key: each phase creates its own seated drop.
    #[arg(long, env = "FLOODGATE_SELLER_KEY", hide_env_values = true)]
    pub seller_key: String,

    /// Created drops: sections (1..=200).
    #[arg(long, default_value_t = DEFAULT_SEAT_SECTIONS)]
    pub sections: u32,

    /// Created drops: rows per section.
    #[arg(long, default_value_t = DEFAULT_SEAT_ROWS)]
    pub rows: u32,

    /// Created drops: seats per row (1..=1000); sections × rows × seats ≤ 100,000.
    #[arg(long, default_value_t = DEFAULT_SEATS_PER_ROW)]
    pub seats_per_row: u32,

    /// Skip the peak measurement and take this as peak reserves per second.
    #[arg(long)]
    pub peak_rate: Option<f64>,

    /// Closed-loop peak measurement: measured seconds (after --warmup-s), on a drop of its own.
    #[arg(long, default_value_t = DEFAULT_PEAK_S)]
    pub peak_s: f64,

    /// Closed-loop peak measurement: workers, one connection each.
    #[arg(long, default_value_t = 50)]
    pub workers: usize,

    /// The open-loop runs go at this share of the peak (0 < f ≤ 1).
    #[arg(long, default_value_t = DEFAULT_LOAD_FRACTION)]
    pub load_fraction: f64,

    /// Each open-loop run: measured seconds, after the warm-up.
    #[arg(long, default_value_t = DEFAULT_SEATMAP_DURATION_S)]
    pub duration_s: f64,

    /// Load before each measured window that is sent but not recorded.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_s: f64,

    /// Open loop: keep-alive connections for the reserves.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,

    /// Open loop: requests due but not yet sent beyond this are counted as dropped.
    #[arg(long, default_value_t = 100_000)]
    pub max_backlog: usize,

    /// Fan sessions; reserves go to them round robin (per-fan limit 1000: fans × 1000 must
    /// cover the seats).
    #[arg(long, default_value_t = 1000)]
    pub fans: usize,

    /// Pairs of runs, alternating without and with the pages: on a shared machine one pair is a
    /// sample; the ratio reported is the median of the pairs'.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,

    /// Booking pages polling the seat map in the second run (0: no second run).
    #[arg(long, default_value_t = DEFAULT_POLL_PAGES)]
    pub pages: usize,

    /// Each page's poll interval; pages are spread evenly over it.
    #[arg(long, default_value_t = DEFAULT_POLL_INTERVAL_MS)]
    pub poll_interval_ms: u64,

    /// Connections the pages share.
    #[arg(long, default_value_t = DEFAULT_POLL_CONNECTIONS)]
    pub poll_connections: usize,

    /// Runtime threads of the load generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// A request without an answer after this long counts as a timeout.
    #[arg(long, default_value_t = 10_000)]
    pub request_timeout_ms: u64,

    /// Also write the report as JSON to this path.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// No progress notes on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl SeatmapArgs {
    /// Seats of each created drop.
    pub fn seats(&self) -> u64 {
        u64::from(self.sections) * u64::from(self.rows) * u64::from(self.seats_per_row)
    }

    /// Checks the bounds clap can't express; returns a message for the first one broken.
    pub fn validate(&self) -> Result<(), String> {
        let finite_in = |v: f64, lo: f64, hi: f64| v.is_finite() && v >= lo && v <= hi;
        if !(1..=MAX_SEAT_SECTIONS).contains(&self.sections) {
            return Err(format!("--sections must be in 1..={MAX_SEAT_SECTIONS}"));
        }
        if !(1..=MAX_SEATS_PER_ROW).contains(&self.seats_per_row) {
            return Err(format!(
                "--seats-per-row must be in 1..={MAX_SEATS_PER_ROW}"
            ));
        }
        if self.rows == 0 || self.seats() > MAX_DROP_SEATS {
            return Err(format!(
                "--rows must be at least 1 and sections × rows × seats at most {MAX_DROP_SEATS}"
            ));
        }
        if let Some(peak) = self.peak_rate {
            if !finite_in(peak, f64::MIN_POSITIVE, MAX_RATE_PER_S) {
                return Err(format!("--peak-rate must be in (0, {MAX_RATE_PER_S}]"));
            }
        }
        if !finite_in(self.load_fraction, f64::MIN_POSITIVE, 1.0) {
            return Err("--load-fraction must be in (0, 1]".into());
        }
        for (name, v) in [("--duration-s", self.duration_s), ("--peak-s", self.peak_s)] {
            if !finite_in(v, f64::MIN_POSITIVE, MAX_DURATION_S) {
                return Err(format!("{name} must be in (0, {MAX_DURATION_S}]"));
            }
        }
        if !finite_in(self.warmup_s, 0.0, MAX_DURATION_S) {
            return Err(format!("--warmup-s must be in [0, {MAX_DURATION_S}]"));
        }
        for (name, v) in [
            ("--connections", self.connections),
            ("--poll-connections", self.poll_connections),
        ] {
            if !(1..=MAX_CONNECTIONS).contains(&v) {
                return Err(format!("{name} must be in 1..={MAX_CONNECTIONS}"));
            }
        }
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(format!("--workers must be in 1..={MAX_WORKERS}"));
        }
        if !(1..=MAX_BACKLOG).contains(&self.max_backlog) {
            return Err(format!("--max-backlog must be in 1..={MAX_BACKLOG}"));
        }
        // One seat per reserve and at most 1000 per fan (booking-api's per-fan limit bound).
        if !(1..=MAX_FANS).contains(&self.fans) || (self.fans as u64) * 1000 < self.seats() {
            return Err(format!(
                "--fans must be in 1..={MAX_FANS} and fans × 1000 must cover the seats"
            ));
        }
        if !(1..=MAX_ROUNDS).contains(&self.rounds) {
            return Err(format!("--rounds must be in 1..={MAX_ROUNDS}"));
        }
        if self.pages > MAX_POLL_PAGES {
            return Err(format!("--pages must be in 0..={MAX_POLL_PAGES}"));
        }
        if !(MIN_POLL_INTERVAL_MS..=MAX_POLL_INTERVAL_MS).contains(&self.poll_interval_ms) {
            return Err(format!(
                "--poll-interval-ms must be in {MIN_POLL_INTERVAL_MS}..={MAX_POLL_INTERVAL_MS}"
            ));
        }
        if !(1..=MAX_REQUEST_TIMEOUT_MS).contains(&self.request_timeout_ms) {
            return Err(format!(
                "--request-timeout-ms must be in 1..={MAX_REQUEST_TIMEOUT_MS}"
            ));
        }
        if !(1..=MAX_THREADS).contains(&self.threads) {
            return Err(format!("--threads must be in 1..={MAX_THREADS}"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Args)]
pub struct WsBaselineArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long, default_value_t = DEFAULT_BROADCAST_INTERVAL_MS)]
    pub interval_ms: u64,
    #[arg(long, default_value_t = DEFAULT_SERVER_WS_BUFFER_BYTES)]
    pub read_buffer_bytes: usize,
    #[arg(long, default_value_t = DEFAULT_SERVER_WS_BUFFER_BYTES)]
    pub write_buffer_bytes: usize,
    /// Frames a socket may fall behind before it skips ahead.
    #[arg(long, default_value_t = DEFAULT_SERVER_SEND_QUEUE_LEN)]
    pub send_queue_len: usize,
    /// Runtime threads: queue-server's `#[tokio::main]` runs one per CPU.
    #[arg(long, default_value_t = DEFAULT_BASELINE_THREADS)]
    pub threads: usize,
}

#[cfg(test)]
pub(crate) mod tests {
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
            other => panic!("not reserve: {other:?}"),
        }
    }

    /// `loadtest queue` with the required flags and `extra`; shared with queue.rs's tests.
    pub(crate) fn parse_queue(extra: &[&str]) -> QueueArgs {
        let mut argv = vec![
            "loadtest",
            "queue",
            "--booking-url",
            "http://127.0.0.1:8080",
            "--queue-url",
            "http://127.0.0.1:8081",
            "--seller-key",
            "k",
            "--ops-key",
            "o",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)
            .expect("valid command line")
            .scenario
        {
            Scenario::Queue(a) => a,
            other => panic!("not queue: {other:?}"),
        }
    }

    #[test]
    fn queue_defaults_are_valid_and_bounded() {
        let a = parse_queue(&[]);
        assert_eq!(a.fans, DEFAULT_QUEUE_FANS);
        assert_eq!(a.admission.rate_per_s, DEFAULT_ADMIT_RATE_PER_S);
        assert_eq!(a.sockets.client_procs, DEFAULT_CLIENT_PROCS);
        assert_eq!(a.validate(), Ok(()));
        assert_eq!(parse_queue(&["--fans", "19000"]).validate(), Ok(()));
        assert!(parse_queue(&["--fans", "0"]).validate().is_err());
        assert!(parse_queue(&["--rate-per-s", "0"]).validate().is_err());
        // 19,000 sockets in one process at 10 per address would need 1,900 addresses.
        assert!(parse_queue(&[
            "--fans",
            "19000",
            "--client-procs",
            "1",
            "--sockets-per-addr",
            "10"
        ])
        .validate()
        .is_err());
        assert_eq!(
            parse_queue(&["--drop", "d1"]).drop_id.as_deref(),
            Some("d1")
        );
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

    fn parse_seatmap(extra: &[&str]) -> SeatmapArgs {
        let mut argv = vec![
            "loadtest",
            "seatmap",
            "--booking-url",
            "http://127.0.0.1:8080",
            "--seller-key",
            "k",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)
            .expect("valid command line")
            .scenario
        {
            Scenario::Seatmap(a) => a,
            other => panic!("not seatmap: {other:?}"),
        }
    }

    #[test]
    fn seatmap_defaults_are_the_benchmark_and_bounded() {
        let a = parse_seatmap(&[]);
        assert_eq!(a.seats(), 50_000);
        assert_eq!(a.pages, 2_000);
        assert_eq!(a.poll_interval_ms, 5_000);
        assert_eq!(a.load_fraction, 0.5);
        assert_eq!(a.validate(), Ok(()));
        assert!(parse_seatmap(&["--rows", "30"]).validate().is_err()); // 150,000 seats
        assert!(parse_seatmap(&["--sections", "201"]).validate().is_err());
        assert!(parse_seatmap(&["--fans", "49"]).validate().is_err());
        assert!(parse_seatmap(&["--load-fraction", "1.5"])
            .validate()
            .is_err());
        assert!(parse_seatmap(&["--poll-interval-ms", "10"])
            .validate()
            .is_err());
        assert!(parse_seatmap(&["--peak-rate", "0"]).validate().is_err());
        assert_eq!(parse_seatmap(&["--pages", "0"]).validate(), Ok(()));
        assert!(parse_seatmap(&["--rounds", "0"]).validate().is_err());
        assert_eq!(parse_seatmap(&["--rounds", "3"]).validate(), Ok(()));
    }

    pub(crate) fn parse_sale(extra: &[&str]) -> SaleArgs {
        let mut argv = vec![
            "loadtest",
            "sale",
            "--booking-url",
            "http://127.0.0.1:8080",
            "--queue-url",
            "http://127.0.0.1:8081",
            "--seller-key",
            "k",
            "--database-url",
            "postgres://x@127.0.0.1/db",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)
            .expect("valid command line")
            .scenario
        {
            Scenario::Sale(a) => a,
            other => panic!("not sale: {other:?}"),
        }
    }

    #[test]
    fn sale_urls_take_several_instances() {
        let a = parse_sale(&[
            "--booking-url",
            "http://127.0.0.1:9000,http://127.0.0.1:9001",
        ]);
        // A repeated flag adds to the list; a comma-separated one splits.
        assert_eq!(
            a.booking_url,
            [
                "http://127.0.0.1:8080",
                "http://127.0.0.1:9000",
                "http://127.0.0.1:9001"
            ]
        );
        assert_eq!(a.queue_url, ["http://127.0.0.1:8081"]);
        assert_eq!(a.validate(), Ok(()));
        let a = parse_sale(&["--redis-nodes", "127.0.0.1:7001,127.0.0.1:7002"]);
        assert_eq!(a.redis_nodes, ["127.0.0.1:7001", "127.0.0.1:7002"]);
        assert_eq!(
            instance_urls(" http://a:1, ,http://b:2 "),
            ["http://a:1", "http://b:2"]
        );
        // Without --instances-from-env the environment's lists are not read.
        let mut a = parse_sale(&[]);
        assert_eq!(a.resolve_instances(), Ok(()));
        assert_eq!(a.queue_url, ["http://127.0.0.1:8081"]);
    }

    #[test]
    fn sale_defaults_are_a_small_rehearsal_and_bounded() {
        let a = parse_sale(&[]);
        assert_eq!((a.fans, a.ws_fans, a.stock), (2_000, 1_000, 500));
        assert_eq!(a.validate(), Ok(()));
        // The acceptance run's shape.
        assert_eq!(
            parse_sale(&[
                "--fans",
                "50000",
                "--ws-fans",
                "19000",
                "--stock",
                "5000",
                "--client-procs",
                "4"
            ])
            .validate(),
            Ok(())
        );
        assert_eq!(parse_sale(&["--fans", "1000000"]).validate(), Ok(()));
        // The line at a million.
        let line = parse_sale(&[
            "--line-only",
            "--fans",
            "1000000",
            "--ws-fans",
            "2000",
            "--stock",
            "10000000",
            "--leave-grace-s",
            "86400",
        ]);
        assert!(line.line_only);
        assert_eq!(line.validate(), Ok(()));
        assert!(parse_sale(&["--position-samples", "0"]).validate().is_err());
        assert!(parse_sale(&["--ws-fans", "2001"]).validate().is_err());
        assert!(parse_sale(&["--pay-pct", "95", "--release-pct", "10"])
            .validate()
            .is_err());
        assert!(parse_sale(&["--pay-pct", "0"]).validate().is_err());
        assert!(parse_sale(&["--leave-grace-s", "5"]).validate().is_err());
        assert!(parse_sale(&["--poll-ms", "10"]).validate().is_err());
        assert!(parse_sale(&["--pre-open-s", "0"]).validate().is_err());
        assert_eq!(
            parse_sale(&["--pre-open-s", "0", "--pre-queue-pct", "0"]).validate(),
            Ok(())
        );
    }

    #[test]
    fn closed_mode_parses() {
        assert_eq!(
            parse(&["--mode", "closed", "--workers", "8"]).mode,
            Mode::Closed
        );
    }
}
