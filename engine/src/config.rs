//! Layered configuration: defaults in code → an optional TOML file (`FLOODGATE_CONFIG`) →
//! `FLOODGATE_*` environment variables, nested with `__` (e.g. `FLOODGATE_HTTP__LISTEN`).
//! `FLOODGATE_DATABASE_URL`, `FLOODGATE_REDIS_URL` and `FLOODGATE_DEV_IDENTITY` are accepted as
//! short forms of `database.url`, `redis.url` and `identity.dev`.
//! Every bound has a named `DEFAULT_...` beside the field it defaults; docs/OPERATIONS.md lists them.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub redis: RedisConfig,
    pub database: DatabaseConfig,
    pub limits: LimitsConfig,
    pub holds: HoldsConfig,
    pub writer: WriterConfig,
    pub gateway: GatewayConfig,
    pub reconciler: ReconcilerConfig,
    pub recovery: RecoveryConfig,
    pub identity: IdentityConfig,
    pub admission: AdmissionConfig,
    pub drops: DropsConfig,
    pub seats: SeatsConfig,
    pub queue: QueueConfig,
}

impl Config {
    /// Defaults, then the file named by `FLOODGATE_CONFIG` (if set), then the environment.
    pub fn load() -> Result<Config, Box<figment::Error>> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Ok(path) = std::env::var("FLOODGATE_CONFIG") {
            fig = fig.merge(Toml::file_exact(Path::new(&path)));
        }
        // Only variables naming a config section (or a short form) are config: the rest of the
        // FLOODGATE_* family (FLOODGATE_LOG, FLOODGATE_SELLER_KEY, FLOODGATE_TEST_*, ...) belongs
        // to other tools. Inside a known section an unknown field is still refused.
        let env = Env::prefixed("FLOODGATE_").filter_map(|key| {
            let key = key.as_str().to_ascii_lowercase();
            let key = match key.as_str() {
                "database_url" => "database.url".to_owned(),
                "redis_url" => "redis.url".to_owned(),
                "dev_identity" => "identity.dev".to_owned(),
                other => {
                    let (section, _) = other.split_once("__")?;
                    if !SECTIONS.contains(&section) {
                        return None;
                    }
                    other.replace("__", ".")
                }
            };
            Some(key.into())
        });
        fig.merge(env).extract().map_err(Box::new)
    }
}

/// The config sections, as the environment spells them (`FLOODGATE_<SECTION>__<FIELD>`).
const SECTIONS: &[&str] = &[
    "http",
    "redis",
    "database",
    "limits",
    "holds",
    "writer",
    "gateway",
    "reconciler",
    "recovery",
    "identity",
    "admission",
    "drops",
    "seats",
    "queue",
];

impl Config {
    /// Values that would break the servers at run time are refused at start.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let positive = [
            ("holds.sweep_interval_ms", self.holds.sweep_interval_ms),
            (
                "redis.aof_check_interval_ms",
                self.redis.aof_check_interval_ms,
            ),
            ("redis.connect_retry_ms", self.redis.connect_retry_ms),
            ("reconciler.interval_ms", self.reconciler.interval_ms),
            (
                "reconciler.watch_interval_ms",
                self.reconciler.watch_interval_ms,
            ),
            ("holds.confirm_timeout_ms", self.holds.confirm_timeout_ms),
            ("gateway.timeout_ms", self.gateway.timeout_ms),
            ("queue.tick_ms", self.queue.tick_ms),
            (
                "queue.position_interval_ms",
                self.queue.position_interval_ms,
            ),
            (
                "queue.presence_interval_ms",
                self.queue.presence_interval_ms,
            ),
            ("queue.ws_ping_interval_ms", self.queue.ws_ping_interval_ms),
            ("queue.ws_auth_timeout_ms", self.queue.ws_auth_timeout_ms),
            (
                "queue.line_marks_interval_ms",
                self.queue.line_marks_interval_ms,
            ),
            ("queue.admission_lease_ms", self.queue.admission_lease_ms),
            ("reconciler.round_lease_ms", self.reconciler.round_lease_ms),
            (
                "http.ops_stream_interval_ms",
                self.http.ops_stream_interval_ms,
            ),
            (
                "http.ops_stream_auth_timeout_ms",
                self.http.ops_stream_auth_timeout_ms,
            ),
            (
                "http.ops_stream_send_timeout_ms",
                self.http.ops_stream_send_timeout_ms,
            ),
            (
                "http.ops_call_figures_ttl_ms",
                self.http.ops_call_figures_ttl_ms,
            ),
        ];
        let positive_counts = [
            ("recovery.slice", self.recovery.slice),
            ("recovery.concurrent_drops", self.recovery.concurrent_drops),
            (
                "recovery.stalled_after_ms",
                self.recovery.stalled_after_ms as usize,
            ),
            ("drops.archive_batch", self.drops.archive_batch),
            ("reconciler.refund_batch", self.reconciler.refund_batch),
            ("reconciler.cancel_batch", self.reconciler.cancel_batch),
            ("drops.catalogue_max_drops", self.drops.catalogue_max_drops),
            ("drops.audit_page_max", self.drops.audit_page_max as usize),
            ("http.ops_history_len", self.http.ops_history_len),
            (
                "http.ops_stream_max_message_bytes",
                self.http.ops_stream_max_message_bytes,
            ),
            ("http.ops_max_instances", self.http.ops_max_instances),
            ("drops.orders_page_max", self.drops.orders_page_max as usize),
            ("drops.orders_csv_max_rows", self.drops.orders_csv_max_rows),
            (
                "drops.archive_interval_ms",
                self.drops.archive_interval_ms as usize,
            ),
        ];
        for (name, value) in positive_counts {
            if value == 0 {
                return Err(crate::Error::invalid(format!(
                    "config: {name} must be above 0"
                )));
            }
        }
        for (name, value) in positive {
            if value == 0 {
                return Err(crate::Error::invalid(format!(
                    "config: {name} must be above 0"
                )));
            }
        }
        if self.holds.confirm_safety_margin_ms >= self.holds.confirm_timeout_ms {
            return Err(crate::Error::invalid(
                "config: holds.confirm_safety_margin_ms must be below holds.confirm_timeout_ms",
            ));
        }
        // A confirm starts its authorization no later than the safety margin before its confirm
        // deadline, and the call lasts at most `gateway.timeout_ms`: only a timeout below the
        // margin guarantees it has ended before the reconciler may look it up and void it.
        if self.gateway.timeout_ms >= self.holds.confirm_safety_margin_ms {
            return Err(crate::Error::invalid(
                "config: gateway.timeout_ms must be below holds.confirm_safety_margin_ms \
                 (an authorization must end before the confirm deadline)",
            ));
        }
        // The drain runs inside the request's time: at or past it, a refused upload would be
        // answered 503 `unavailable` instead of its 413.
        if self.http.refused_body_drain_ms >= self.http.request_timeout_ms {
            return Err(crate::Error::invalid(
                "config: http.refused_body_drain_ms must be below http.request_timeout_ms",
            ));
        }
        if self.redis.connect_retry_ms > self.redis.connect_retry_max_ms {
            return Err(crate::Error::invalid(
                "config: redis.connect_retry_ms must not exceed redis.connect_retry_max_ms",
            ));
        }
        if self.redis.aof_rewrite_growth_pct > self.redis.aof_rewrite_max_growth_pct {
            return Err(crate::Error::invalid(
                "config: redis.aof_rewrite_growth_pct must not exceed \
                 redis.aof_rewrite_max_growth_pct",
            ));
        }
        if self.gateway.test_call_min_ms > self.gateway.test_call_max_ms {
            return Err(crate::Error::invalid(
                "config: gateway.test_call_min_ms must not exceed gateway.test_call_max_ms",
            ));
        }
        if self.queue.ws_idle_timeout_ms <= self.queue.ws_ping_interval_ms {
            return Err(crate::Error::invalid(
                "config: queue.ws_idle_timeout_ms must exceed queue.ws_ping_interval_ms",
            ));
        }
        if self.queue.ws_max_write_buffer_bytes <= self.queue.ws_write_buffer_bytes {
            return Err(crate::Error::invalid(
                "config: queue.ws_max_write_buffer_bytes must exceed queue.ws_write_buffer_bytes",
            ));
        }
        // A zero here would panic a timer, or refuse every lookup of a drop not cached yet.
        for (name, value) in [
            ("limits.tidy_interval_ms", self.limits.tidy_interval_ms),
            ("drops.lookups_per_s", u64::from(self.drops.lookups_per_s)),
            ("drops.lookup_burst", u64::from(self.drops.lookup_burst)),
            ("holds.sweep_rounds_max", self.holds.sweep_rounds_max as u64),
            ("queue.ws_send_timeout_ms", self.queue.ws_send_timeout_ms),
        ] {
            if value == 0 {
                return Err(crate::Error::invalid(format!(
                    "config: {name} must be above 0"
                )));
            }
        }
        // `seats.map_refresh_ms` may be 0: every request then reads, unless a read is already
        // under way for it (still one read for a crowd arriving together).
        for (name, value) in [
            ("seats.map_cache_drops", self.seats.map_cache_drops),
            ("seats.map_scan_chunk", self.seats.map_scan_chunk),
            ("seats.map_read_bytes", self.seats.map_read_bytes),
            ("seats.best_scan_seats_max", self.seats.best_scan_seats_max),
        ] {
            if value == 0 {
                return Err(crate::Error::invalid(format!(
                    "config: {name} must be above 0"
                )));
            }
        }
        Ok(())
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
/// A client's upload in flight when its body is refused: 1 MiB is read to its end (and dropped)
/// on a fast link in milliseconds, so the client reads the 413 rather than a reset connection.
pub const DEFAULT_REFUSED_BODY_DRAIN_BYTES: u64 = 1024 * 1024;
/// Well below `http.request_timeout_ms`: a slow upload isn't waited for long.
pub const DEFAULT_REFUSED_BODY_DRAIN_MS: u64 = 2_000;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 15_000;
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
/// 0: alone, nothing needs telling before the listener closes. Behind a load balancer set it to
/// at least the balancer's health-check `fall × inter` (`devstack up --instances` does).
pub const DEFAULT_DRAIN_UNREADY_MS: u64 = 0;
/// hyper's read buffer per connection, which bounds a request's head (line and headers).
pub const DEFAULT_MAX_READ_BUFFER_BYTES: usize = 64 * 1024;
pub const DEFAULT_CORS_MAX_AGE_S: u64 = 600;
/// 50 drops × 14 series: a few hundred series per instance, whatever the catalogue holds.
pub const DEFAULT_DROP_METRICS_MAX_DROPS: usize = 50;
/// Slow enough that the reads cost Redis nothing (a dozen O(1) reads per drop), fast enough for
/// a 15 s scrape interval.
pub const DEFAULT_DROP_METRICS_INTERVAL_MS: u64 = 5_000;
/// The ops console's streams open at once per process (booking-api's `/v1/ops/ws`): each reads a
/// dozen keys of its drop a second. Ops are a handful of people.
pub const DEFAULT_OPS_STREAM_MAX_SUBSCRIBERS: usize = 32;
/// One sample a second: what the console promises ("at most a second old").
pub const DEFAULT_OPS_STREAM_INTERVAL_MS: u64 = 1_000;
/// How long an ops socket may take to send its auth frame.
pub const DEFAULT_OPS_STREAM_AUTH_TIMEOUT_MS: u64 = 5_000;
/// How long one frame to a console may take to leave before the console counts as gone.
pub const DEFAULT_OPS_STREAM_SEND_TIMEOUT_MS: u64 = 5_000;
/// The largest frame a console may send (a key or a drop id) and the socket's read buffer.
pub const DEFAULT_OPS_STREAM_MAX_MESSAGE_BYTES: usize = 4 * 1024;
/// An instance's call figures for a drop live this long after its last write: two windows, so
/// a sample never misses an instance that answered calls in the last second.
pub const DEFAULT_OPS_CALL_FIGURES_TTL_MS: u64 = 2_000;
/// Drops one process counts reserves and confirms for in one window (more are not counted).
pub const DEFAULT_OPS_RECENT_MAX_DROPS: usize = 200;
/// Instances a sample reads call figures from, at most (the latest writers).
pub const DEFAULT_OPS_MAX_INSTANCES: usize = 64;
/// Samples kept per drop for the console's charts: 15 minutes at one a second.
pub const DEFAULT_OPS_HISTORY_LEN: usize = 900;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted; larger ones get 413 `body_too_large`.
    pub max_body_bytes: usize,
    /// A refused body of at most this many bytes is read to its end and dropped before the 413
    /// goes out: closing a connection with unread bytes makes the kernel reset it, and a client
    /// still sending would see a broken pipe instead of the answer. A larger one isn't read.
    pub refused_body_drain_bytes: u64,
    /// How long that reading may take at most (below `request_timeout_ms`); then the 413 goes
    /// out anyway.
    pub refused_body_drain_ms: u64,
    /// Open connections per process; past it new connections wait in the accept backlog.
    pub max_connections: usize,
    pub request_timeout_ms: u64,
    pub header_read_timeout_ms: u64,
    /// How long graceful shutdown waits for in-flight requests.
    pub shutdown_grace_ms: u64,
    /// On SIGTERM, how long `/readyz` answers 503 while everything else is still served, before
    /// the listener closes: a load balancer checking `/readyz` marks the instance down in that
    /// time, so no new request reaches a closed port.
    pub drain_unready_ms: u64,
    /// Origins allowed to call the API from a browser on another domain (CORS). Empty: same origin only.
    pub cors_allow_origins: Vec<String>,
    /// How long a browser may reuse a CORS preflight's answer.
    pub cors_max_age_s: u64,
    /// The most a connection's read buffer grows to: a request head larger than this is refused
    /// (431) before it costs more memory.
    pub max_read_buffer_bytes: usize,
    /// An internal listener serving `GET /metrics` without a key (for Prometheus on a private
    /// network). Unset: none; the public listener answers `/metrics` only with an ops key.
    pub metrics_listen: Option<SocketAddr>,
    /// The most drops `/metrics` reports per-drop gauges for (engine::drop_metrics): the newest
    /// live ones. Bounds the `drop` label's cardinality. 0: no per-drop gauges.
    pub drop_metrics_max_drops: usize,
    /// How often the per-drop gauges are read from Redis (one task per process; a scrape reads
    /// the last round).
    pub drop_metrics_interval_ms: u64,
    /// The ops console's live streams open at once (`GET /v1/ops/ws`); past it, 503.
    pub ops_stream_max_subscribers: usize,
    /// How often a stream sends its drop's sample, and how often each instance writes its
    /// reserve and confirm figures to Redis (engine::ops_figures).
    pub ops_stream_interval_ms: u64,
    /// How long an ops socket may take to send its auth frame before it is closed.
    pub ops_stream_auth_timeout_ms: u64,
    /// How long one frame to a console may take to leave before the socket is closed.
    pub ops_stream_send_timeout_ms: u64,
    /// The largest frame a console may send; also the socket's read buffer.
    pub ops_stream_max_message_bytes: usize,
    /// The TTL of an instance's per-drop call figures in Redis.
    pub ops_call_figures_ttl_ms: u64,
    /// Drops a process counts reserves and confirms for in one window.
    pub ops_recent_max_drops: usize,
    /// Instances whose call figures a sample combines, at most.
    pub ops_max_instances: usize,
    /// Samples kept per drop for the console's charts (one a second).
    pub ops_history_len: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("the default listen address parses"),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            refused_body_drain_bytes: DEFAULT_REFUSED_BODY_DRAIN_BYTES,
            refused_body_drain_ms: DEFAULT_REFUSED_BODY_DRAIN_MS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS,
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
            drain_unready_ms: DEFAULT_DRAIN_UNREADY_MS,
            cors_allow_origins: Vec::new(),
            cors_max_age_s: DEFAULT_CORS_MAX_AGE_S,
            max_read_buffer_bytes: DEFAULT_MAX_READ_BUFFER_BYTES,
            metrics_listen: None,
            drop_metrics_max_drops: DEFAULT_DROP_METRICS_MAX_DROPS,
            drop_metrics_interval_ms: DEFAULT_DROP_METRICS_INTERVAL_MS,
            ops_stream_max_subscribers: DEFAULT_OPS_STREAM_MAX_SUBSCRIBERS,
            ops_stream_interval_ms: DEFAULT_OPS_STREAM_INTERVAL_MS,
            ops_stream_auth_timeout_ms: DEFAULT_OPS_STREAM_AUTH_TIMEOUT_MS,
            ops_stream_send_timeout_ms: DEFAULT_OPS_STREAM_SEND_TIMEOUT_MS,
            ops_stream_max_message_bytes: DEFAULT_OPS_STREAM_MAX_MESSAGE_BYTES,
            ops_call_figures_ttl_ms: DEFAULT_OPS_CALL_FIGURES_TTL_MS,
            ops_recent_max_drops: DEFAULT_OPS_RECENT_MAX_DROPS,
            ops_max_instances: DEFAULT_OPS_MAX_INSTANCES,
            ops_history_len: DEFAULT_OPS_HISTORY_LEN,
        }
    }
}

pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_REDIS_POOL_SIZE: usize = 4;
pub const DEFAULT_REDIS_COMMAND_TIMEOUT_MS: u64 = 2_000;
pub const DEFAULT_REDIS_MAX_COMMAND_BUFFER_LEN: usize = 20_000;
pub const DEFAULT_REDIS_MAX_FEED_COUNT: u64 = 200;
/// A node that refused a connection is tried again after 50 ms, then 100, 200, … (fred's
/// exponential policy): a restart's blip costs little, a dead node little work.
pub const DEFAULT_REDIS_CONNECT_RETRY_MS: u64 = 50;
/// At most every 2 s once a node has been down a while: a promoted replica or a restarted node
/// is found within that of coming up.
pub const DEFAULT_REDIS_CONNECT_RETRY_MAX_MS: u64 = 2_000;
/// An AOF rewrite is asked for once the file has doubled since the last one (Redis' own default
/// threshold), but only while Redis is quiet (engine::aof).
pub const DEFAULT_AOF_REWRITE_GROWTH_PCT: u64 = 100;
/// Past 16× its size after the last rewrite the file is rewritten whatever the load: a restart
/// replays all of it.
pub const DEFAULT_AOF_REWRITE_MAX_GROWTH_PCT: u64 = 1_500;
/// Under this many commands a second Redis counts as quiet. A sale runs thousands (each reserve
/// is one script); an idle stack's background tasks a few dozen.
pub const DEFAULT_AOF_QUIET_OPS_PER_S: u64 = 1_000;
/// Quiet on every look for half a minute: a lull of a few seconds between two waves of fans is
/// not a quiet spell (engine::aof).
pub const DEFAULT_AOF_QUIET_FOR_MS: u64 = 30_000;
pub const DEFAULT_AOF_CHECK_INTERVAL_MS: u64 = 5_000;
/// A file smaller than this is never worth a rewrite (Redis' own `auto-aof-rewrite-min-size`).
pub const DEFAULT_AOF_REWRITE_MIN_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    pub url: String,
    /// Connections (fred pipelines each one automatically).
    pub pool_size: usize,
    /// A command without an answer by then fails (fred's default is to wait forever).
    pub command_timeout_ms: u64,
    /// Commands queued per connection while it is busy or reconnecting; past it they fail at once
    /// with backpressure instead of piling up (fred's default is unbounded).
    pub max_command_buffer_len: usize,
    pub max_feed_count: u64,
    /// The first wait before connecting again to a Redis node that didn't answer (at start, or
    /// after a connection dropped); each failed attempt doubles it, up to
    /// `connect_retry_max_ms`. On a Redis Cluster a process starts with a primary down and keeps
    /// trying it this way in the background (docs/OPERATIONS.md, "Starting during a failover").
    pub connect_retry_ms: u64,
    /// The longest wait between two attempts to connect to a node.
    pub connect_retry_max_ms: u64,
    /// booking-api asks Redis for an AOF rewrite once the file has grown this much (percent of
    /// its size after the last rewrite) and Redis is quiet; 0: never (Redis' own
    /// `auto-aof-rewrite-percentage` then decides).
    pub aof_rewrite_growth_pct: u64,
    /// Smaller than this, the file is left alone.
    pub aof_rewrite_min_bytes: u64,
    /// Grown this much, the rewrite is asked for whatever the load.
    pub aof_rewrite_max_growth_pct: u64,
    /// Commands a second under which Redis counts as quiet.
    pub aof_quiet_ops_per_s: u64,
    /// How long Redis must have been quiet on every look before a rewrite that waits for quiet
    /// is asked for; 0: the first quiet look.
    pub aof_quiet_for_ms: u64,
    /// How often the AOF's size and Redis' load are looked at.
    pub aof_check_interval_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: DEFAULT_REDIS_URL.to_owned(),
            pool_size: DEFAULT_REDIS_POOL_SIZE,
            command_timeout_ms: DEFAULT_REDIS_COMMAND_TIMEOUT_MS,
            max_command_buffer_len: DEFAULT_REDIS_MAX_COMMAND_BUFFER_LEN,
            max_feed_count: DEFAULT_REDIS_MAX_FEED_COUNT,
            connect_retry_ms: DEFAULT_REDIS_CONNECT_RETRY_MS,
            connect_retry_max_ms: DEFAULT_REDIS_CONNECT_RETRY_MAX_MS,
            aof_rewrite_growth_pct: DEFAULT_AOF_REWRITE_GROWTH_PCT,
            aof_rewrite_min_bytes: DEFAULT_AOF_REWRITE_MIN_BYTES,
            aof_rewrite_max_growth_pct: DEFAULT_AOF_REWRITE_MAX_GROWTH_PCT,
            aof_quiet_ops_per_s: DEFAULT_AOF_QUIET_OPS_PER_S,
            aof_quiet_for_ms: DEFAULT_AOF_QUIET_FOR_MS,
            aof_check_interval_ms: DEFAULT_AOF_CHECK_INTERVAL_MS,
        }
    }
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://floodgate@127.0.0.1:5432/floodgate";
pub const DEFAULT_DATABASE_POOL_SIZE: usize = 16;
pub const DEFAULT_DATABASE_TIMEOUT_MS: u64 = 3_000;
pub const DEFAULT_DATABASE_STATEMENT_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_DATABASE_KEEPALIVE_IDLE_MS: u64 = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: String,
    pub pool_size: usize,
    /// Waiting for a pooled connection and connecting are bounded by this.
    pub timeout_ms: u64,
    /// Longest a single statement may run (Postgres `statement_timeout`).
    pub statement_timeout_ms: u64,
    /// How long a Postgres connection may sit silent before TCP keepalive probes it, so a dead
    /// peer (a failover, a cut link) is noticed without a statement to time out.
    pub keepalive_idle_ms: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: DEFAULT_DATABASE_URL.to_owned(),
            pool_size: DEFAULT_DATABASE_POOL_SIZE,
            timeout_ms: DEFAULT_DATABASE_TIMEOUT_MS,
            statement_timeout_ms: DEFAULT_DATABASE_STATEMENT_TIMEOUT_MS,
            keepalive_idle_ms: DEFAULT_DATABASE_KEEPALIVE_IDLE_MS,
        }
    }
}

pub const DEFAULT_PER_IP_PER_S: u32 = 500;
pub const DEFAULT_PER_IP_BURST: u32 = 1_000;
pub const DEFAULT_PER_FAN_PER_S: u32 = 10;
pub const DEFAULT_PER_FAN_BURST: u32 = 30;
pub const DEFAULT_MAX_LIMITER_KEYS: usize = 200_000;
pub const DEFAULT_LIMITER_TIDY_INTERVAL_MS: u64 = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests per second per client IP (governor, per process). Generous: a stadium or a mobile
    /// carrier puts thousands of fans behind one address; the per-fan limit does the real work.
    pub per_ip_per_s: u32,
    pub per_ip_burst: u32,
    /// Requests per second per signed-in fan (per process).
    pub per_fan_per_s: u32,
    pub per_fan_burst: u32,
    /// Keys (client addresses, IPv6 by /64, or fans) each limiter of both servers remembers at
    /// most; past it a limiter forgets the idlest keys, never one it is holding back.
    pub max_limiter_keys: usize,
    /// How often every limiter forgets the keys whose buckets have refilled.
    pub tidy_interval_ms: u64,
    /// Load balancers / reverse proxies (addresses or blocks) whose `X-Forwarded-For` is
    /// believed for per-IP limits (both servers). Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<crate::net::Cidr>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            per_ip_per_s: DEFAULT_PER_IP_PER_S,
            per_ip_burst: DEFAULT_PER_IP_BURST,
            per_fan_per_s: DEFAULT_PER_FAN_PER_S,
            per_fan_burst: DEFAULT_PER_FAN_BURST,
            max_limiter_keys: DEFAULT_MAX_LIMITER_KEYS,
            tidy_interval_ms: DEFAULT_LIMITER_TIDY_INTERVAL_MS,
            trusted_proxies: Vec::new(),
        }
    }
}

pub const DEFAULT_CONFIRM_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_CONFIRM_GRACE_MS: u64 = 60_000;
pub const DEFAULT_CONFIRM_SAFETY_MARGIN_MS: u64 = 10_000;
pub const DEFAULT_RECLAIM_BATCH: u32 = 8;
pub const DEFAULT_SWEEP_INTERVAL_MS: u64 = 250;
pub const DEFAULT_SWEEP_BATCH: u32 = 500;
pub const DEFAULT_SWEEP_ROUNDS_MAX: usize = 20;
pub const DEFAULT_CONFIRM_WAIT_OTHER_MS: u64 = 3_000;
pub const DEFAULT_DONE_TTL_MS: u64 = 3_600_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HoldsConfig {
    /// How long a hold may stay `confirming` before the reconciler settles it.
    pub confirm_timeout_ms: u64,
    /// How long past a hold's expiry a queue drop keeps its fan admitted (time to pay).
    pub confirm_grace_ms: u64,
    /// A confirm that reaches this close to its confirm deadline stops before charging or
    /// committing and leaves the hold to the reconciler, so the two never commit and revert one
    /// hold at once. Below `confirm_timeout_ms`, above `gateway.timeout_ms`.
    pub confirm_safety_margin_ms: u64,
    /// Expired holds each reserve reclaims before it decides.
    pub reclaim_batch: u32,
    pub sweep_interval_ms: u64,
    /// Holds the sweeper expires per drop per call.
    pub sweep_batch: u32,
    /// Expire calls per drop per sweep, at most: a drop with a backlog can't hold the sweeper
    /// back from the others (the rest waits for the next sweep, or a reserve's reclaim).
    pub sweep_rounds_max: usize,
    /// How long a confirm waits for another process already confirming the same hold with the
    /// same payment, before answering 503 `payment_pending`.
    pub confirm_wait_other_ms: u64,
    /// How long an ended hold stays readable (`GET /v1/holds/{id}`) before it is purged.
    pub done_ttl_ms: u64,
}

impl Default for HoldsConfig {
    fn default() -> Self {
        HoldsConfig {
            confirm_timeout_ms: DEFAULT_CONFIRM_TIMEOUT_MS,
            confirm_grace_ms: DEFAULT_CONFIRM_GRACE_MS,
            confirm_safety_margin_ms: DEFAULT_CONFIRM_SAFETY_MARGIN_MS,
            reclaim_batch: DEFAULT_RECLAIM_BATCH,
            sweep_interval_ms: DEFAULT_SWEEP_INTERVAL_MS,
            sweep_batch: DEFAULT_SWEEP_BATCH,
            sweep_rounds_max: DEFAULT_SWEEP_ROUNDS_MAX,
            confirm_wait_other_ms: DEFAULT_CONFIRM_WAIT_OTHER_MS,
            done_ttl_ms: DEFAULT_DONE_TTL_MS,
        }
    }
}

pub const DEFAULT_WRITER_MAX_BATCH: usize = 64;
pub const DEFAULT_WRITER_QUEUE_LEN: usize = 4_096;
pub const DEFAULT_WRITER_MAX_RETRIES: u32 = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriterConfig {
    /// Orders committed per Postgres transaction at most.
    pub max_batch: usize,
    /// Orders waiting for the writer; past it confirms answer 503 `unavailable`.
    pub queue_len: usize,
    /// Times a batch Postgres aborted as a deadlock or serialization failure (another instance's
    /// batch) is run again before its confirms answer 503 and the reconciler takes over.
    pub max_retries: u32,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            max_batch: DEFAULT_WRITER_MAX_BATCH,
            queue_len: DEFAULT_WRITER_QUEUE_LEN,
            max_retries: DEFAULT_WRITER_MAX_RETRIES,
        }
    }
}

pub const DEFAULT_GATEWAY_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_TEST_GATEWAY_SLOW_MS: u64 = 100;
pub const DEFAULT_TEST_GATEWAY_CALL_MIN_MS: u64 = 0;
pub const DEFAULT_TEST_GATEWAY_CALL_MAX_MS: u64 = 0;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// How long a gateway call may take before the payment counts as pending. Below
    /// `holds.confirm_safety_margin_ms`, so an authorization ends before its confirm deadline.
    pub timeout_ms: u64,
    /// How long the test gateway sits on a `slow_` authorization (longer than `timeout_ms` makes
    /// it time out; the test gateway clips `timeout_ms` to this, so tests stay fast).
    pub test_slow_ms: u64,
    /// How long each authorize, capture and void of the test gateway takes, drawn evenly
    /// between these two (real gateways take 200–500 ms; 0 and 0 answer at once). Benchmarks
    /// set them; a confirm must not hold anything shared while it waits on the gateway.
    pub test_call_min_ms: u64,
    pub test_call_max_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            timeout_ms: DEFAULT_GATEWAY_TIMEOUT_MS,
            test_slow_ms: DEFAULT_TEST_GATEWAY_SLOW_MS,
            test_call_min_ms: DEFAULT_TEST_GATEWAY_CALL_MIN_MS,
            test_call_max_ms: DEFAULT_TEST_GATEWAY_CALL_MAX_MS,
        }
    }
}

pub const DEFAULT_RECONCILE_INTERVAL_MS: u64 = 1_000;
pub const DEFAULT_RECONCILE_BATCH: usize = 100;
pub const DEFAULT_WATCH_INTERVAL_MS: u64 = 500;
pub const DEFAULT_MAX_DROPS_WATCHED: usize = 10_000;
/// Every process looks after the newest live drops too, not only those it served: a restarted
/// booking-api must still reconcile and recover the drops its predecessor sold.
pub const DEFAULT_WATCH_NEWEST_DROPS: usize = DEFAULT_MAX_DROPS_WATCHED;
pub const DEFAULT_WATCHED_REFRESH_MS: u64 = 5_000;
pub const DEFAULT_SERVED_KEEP_MS: u64 = 3_600_000;
/// On the reserve path: a busy drop's "served lately" mark is refreshed at most this often.
pub const DEFAULT_SERVED_REFRESH_MS: u64 = 10_000;
pub const DEFAULT_RECOVER_ROUNDS_MAX: usize = 3;
/// A drop's sweep and reconcile rounds run on one booking-api instance at a time, under a lease
/// renewed each round: 3 s outlasts the rounds' intervals (250 ms, 1 s) several times over, and a
/// dead holder's drops wait at most about 4 s for another instance to take them.
pub const DEFAULT_ROUND_LEASE_MS: u64 = 3_000;
/// A round's refunds each cost a gateway call and a script: 100 a second per process is far
/// above any seller's refund rate, and bounds a round after a long gateway outage.
pub const DEFAULT_REFUND_BATCH: usize = 100;
/// A refund request finishes its steps within a gateway timeout or two; 10 s later it was left.
pub const DEFAULT_REFUND_RESUME_AFTER_MS: u64 = 10_000;
/// A cancelled drop's orders refunded per round (each a gateway call and a script): like
/// `refund_batch`, it bounds a round, and 100 a second refunds a 100 000-order drop in under 20 min.
pub const DEFAULT_CANCEL_BATCH: usize = 100;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcilerConfig {
    pub interval_ms: u64,
    /// Confirming holds settled per drop per round.
    pub batch: usize,
    /// How often Redis is checked for a restart (`run_id`) or lost drops.
    pub watch_interval_ms: u64,
    /// Drops the sweeper, reconciler and watcher look after per process: up to this many of the
    /// newest live drops in Postgres (see `watch_newest_drops`), plus up to this many drops the
    /// process served in the last hour.
    pub max_drops_watched: usize,
    /// How many of the newest live drops in Postgres each process looks after besides those it
    /// served (capped by `max_drops_watched`). 0: only the drops it served itself, as test
    /// servers sharing one Postgres run, so one test's server never touches another's drops.
    pub watch_newest_drops: usize,
    /// How often the list of the newest live drops is read from Postgres.
    pub watched_refresh_ms: u64,
    /// How long a drop this process served stays looked after without further traffic.
    pub served_keep_ms: u64,
    /// How often a busy drop's "served lately" mark is refreshed, at most.
    pub served_refresh_ms: u64,
    /// Rebuilds of one drop in a row while sales keep landing in Postgres during them; past
    /// it the drop stays `recovering` and the watcher comes back to it.
    pub recover_rounds_max: usize,
    /// How long an instance's per-drop lease on the sweep and reconcile rounds lasts unrenewed
    /// (docs/ARCHITECTURE.md, "Many instances"): other instances skip the drop's rounds meanwhile.
    pub round_lease_ms: u64,
    /// Refunds the resume round takes up per round (unfinished: the gateway or Redis failed, or
    /// the process stopped, between a refund's steps).
    pub refund_batch: usize,
    /// How long a refund must have been left unfinished before the resume round takes it up,
    /// so it doesn't race the request still working on it.
    pub refund_resume_after_ms: u64,
    /// Orders of a cancelled drop the cancel job refunds per round (engine/src/booking/cancel.rs).
    pub cancel_batch: usize,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        ReconcilerConfig {
            interval_ms: DEFAULT_RECONCILE_INTERVAL_MS,
            batch: DEFAULT_RECONCILE_BATCH,
            watch_interval_ms: DEFAULT_WATCH_INTERVAL_MS,
            max_drops_watched: DEFAULT_MAX_DROPS_WATCHED,
            watch_newest_drops: DEFAULT_WATCH_NEWEST_DROPS,
            watched_refresh_ms: DEFAULT_WATCHED_REFRESH_MS,
            served_keep_ms: DEFAULT_SERVED_KEEP_MS,
            served_refresh_ms: DEFAULT_SERVED_REFRESH_MS,
            recover_rounds_max: DEFAULT_RECOVER_ROUNDS_MAX,
            round_lease_ms: DEFAULT_ROUND_LEASE_MS,
            refund_batch: DEFAULT_REFUND_BATCH,
            refund_resume_after_ms: DEFAULT_REFUND_RESUME_AFTER_MS,
            cancel_batch: DEFAULT_CANCEL_BATCH,
        }
    }
}

/// A slice of 500 holds is a few milliseconds of one Redis core: other drops never notice.
pub const DEFAULT_RECOVERY_SLICE: usize = 500;
pub const DEFAULT_RECOVERY_CONCURRENT_DROPS: usize = 4;
/// A slice takes milliseconds: a rebuild that has done none for 10 s lost its process.
pub const DEFAULT_RECOVERY_STALLED_AFTER_MS: u64 = 10_000;

/// Recovery (rebuilding drops from Postgres) and loading new drops: both run in slices.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecoveryConfig {
    /// Entries (holds, seats, buckets, fans) one script call of a rebuild or of loading a new
    /// drop handles at most, so no call holds Redis for long however big the drop.
    pub slice: usize,
    /// Drops one process rebuilds at a time (after a restart every drop needs one; a huge drop
    /// must not keep the small ones waiting).
    pub concurrent_drops: usize,
    /// Another instance's rebuild (or load) of a drop is left alone while its slice count moves;
    /// one that did no slice for this long (its process died) is taken over.
    pub stalled_after_ms: u64,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            slice: DEFAULT_RECOVERY_SLICE,
            concurrent_drops: DEFAULT_RECOVERY_CONCURRENT_DROPS,
            stalled_after_ms: DEFAULT_RECOVERY_STALLED_AFTER_MS,
        }
    }
}

pub const DEFAULT_DEV_TOKEN_TTL_S: u64 = 86_400;
pub const DEFAULT_FAN_TOKEN_CACHE_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// The development identity provider: `POST /v1/fans/session` signs a token for any name.
    pub dev: bool,
    /// HS256 secret for dev tokens; generated at start when empty (never hard-coded).
    pub dev_secret: String,
    pub dev_token_ttl_s: u64,
    /// Production: fan tokens from an external identity provider, HS256 with this secret…
    pub jwt_hs256_secret: String,
    /// …or RS256 with this PEM public key.
    pub jwt_rs256_public_key_pem: String,
    /// Required `iss` / `aud`, when set.
    pub jwt_issuer: String,
    pub jwt_audience: String,
    /// Verified tokens remembered (RS256 costs about a reserve's CPU budget to verify).
    pub cache_entries: usize,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            dev: false,
            dev_secret: String::new(),
            dev_token_ttl_s: DEFAULT_DEV_TOKEN_TTL_S,
            jwt_hs256_secret: String::new(),
            jwt_rs256_public_key_pem: String::new(),
            jwt_issuer: String::new(),
            jwt_audience: String::new(),
            cache_entries: DEFAULT_FAN_TOKEN_CACHE_ENTRIES,
        }
    }
}

pub const DEFAULT_ADMISSION_TOKEN_TTL_S: u64 = 600;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// HMAC secrets for admission tokens: the first signs, all verify (two during a rotation).
    /// Generated at start when empty — then only this process can verify, fine for one dev box.
    pub secrets: Vec<String>,
    pub token_ttl_s: u64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            secrets: Vec::new(),
            token_ttl_s: DEFAULT_ADMISSION_TOKEN_TTL_S,
        }
    }
}

pub const DEFAULT_MAX_BUCKETS: usize = 200;
pub const DEFAULT_MAX_SEATS: usize = 100_000;
pub const DEFAULT_MAX_UNITS_PER_SKU: u32 = 10_000_000;
pub const DEFAULT_MAX_ITEMS_PER_HOLD: usize = 50;
pub const DEFAULT_MAX_DROPS_LISTED: i64 = 500;
pub const DEFAULT_DROP_CACHE_ENTRIES: usize = 10_000;
/// A day after closing: sellers look at a drop's live page for a while after the sale.
pub const DEFAULT_ARCHIVE_AFTER_S: u64 = 86_400;
pub const DEFAULT_ARCHIVE_INTERVAL_MS: u64 = 60_000;
pub const DEFAULT_ARCHIVE_BATCH: usize = 20;
/// Drop ids are random, so nobody asks for one before it exists: remembering an unknown one for
/// 2 s costs a real drop nothing and spares Postgres every repeat of a made-up one.
pub const DEFAULT_UNKNOWN_DROP_TTL_MS: u64 = 2_000;
pub const DEFAULT_UNKNOWN_DROP_CACHE_ENTRIES: usize = 10_000;
/// A process reads a drop's definition from Postgres once (it is cached for good), so only a
/// cold start over many live drops or a flood of made-up ids comes near this.
pub const DEFAULT_DROP_LOOKUPS_PER_S: u32 = 100;
pub const DEFAULT_DROP_LOOKUP_BURST: u32 = 500;
pub const DEFAULT_FAN_HOLDS_MAX_DROPS: usize = 100;
/// The front page's catalogue lists at most this many drops on sale and as many coming soon: a
/// page a fan reads at a glance, and one bounded query.
pub const DEFAULT_CATALOGUE_MAX_DROPS: usize = 50;
/// On a sale's day thousands of fans open `/` at once: each process reads the catalogue from
/// Postgres at most once per this interval and serves every request between from memory.
pub const DEFAULT_CATALOGUE_REFRESH_MS: u64 = 5_000;
/// "Coming soon": opening within this many days.
pub const DEFAULT_CATALOGUE_SOON_DAYS: u32 = 14;
/// Entries of a drop's audit log per page (`GET /v1/drops/{id}/audit`), at most and by default.
pub const DEFAULT_AUDIT_PAGE_MAX: u32 = 100;
/// Orders per page of `GET /v1/drops/{id}/orders` (the seller's back office), at most and by
/// default: a screenful, two bounded queries.
pub const DEFAULT_ORDERS_PAGE_MAX: u32 = 100;
/// Rows of `GET /v1/drops/{id}/orders.csv`, at most: the file is built in memory (about 150 bytes
/// a row, so ~7.5 MB at the bound); a search matching more is refused, not cut short.
pub const DEFAULT_ORDERS_CSV_MAX_ROWS: usize = 50_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DropsConfig {
    /// SKUs or sections per drop.
    pub max_buckets: usize,
    pub max_seats: usize,
    pub max_units_per_sku: u32,
    /// Lines (SKUs or seats) in one reserve request.
    pub max_items_per_hold: usize,
    pub max_drops_listed: i64,
    /// Drop definitions cached per process.
    pub cache_entries: usize,
    /// How long a drop id Postgres doesn't know is answered 404 `unknown_drop` without asking
    /// again (per process; a drop created meanwhile by this process is known at once).
    pub unknown_ttl_ms: u64,
    /// Unknown drop ids remembered per process, at most (the oldest go first).
    pub unknown_cache_entries: usize,
    /// Postgres reads of drops this process hasn't cached (known or unknown) per second, and
    /// their burst: past it such a request answers 503 `unavailable`, so a flood of made-up ids
    /// costs Postgres a bounded number of queries a second however many addresses send it.
    pub lookups_per_s: u32,
    pub lookup_burst: u32,
    /// Drops `GET /v1/fans/me/holds` looks in when it names none (the newest this process
    /// looks after): one Redis read each.
    pub fan_holds_max_drops: usize,
    /// Drops the public catalogue (`GET /v1/catalogue`, the front page) lists on sale, and
    /// again coming soon, at most.
    pub catalogue_max_drops: usize,
    /// How long each process serves the catalogue from memory before reading Postgres again.
    pub catalogue_refresh_ms: u64,
    /// A drop opening within this many days is "coming soon"; later ones aren't listed yet.
    pub catalogue_soon_days: u32,
    /// Entries per page of `GET /v1/drops/{id}/audit`, at most (and when `limit` is not sent).
    pub audit_page_max: u32,
    /// Orders per page of `GET /v1/drops/{id}/orders`, at most (and when `limit` is not sent).
    pub orders_page_max: u32,
    /// Rows of `GET /v1/drops/{id}/orders.csv`, at most; a search matching more is refused.
    pub orders_csv_max_rows: usize,
    /// A closed drop with no live hold and no unsettled payment is archived this long after it
    /// closed: its Redis keys are removed, and Postgres serves it from then on.
    pub archive_after_s: u64,
    /// How often each booking-api looks for drops to archive, and how many it archives a round.
    pub archive_interval_ms: u64,
    pub archive_batch: usize,
}

impl Default for DropsConfig {
    fn default() -> Self {
        DropsConfig {
            max_buckets: DEFAULT_MAX_BUCKETS,
            max_seats: DEFAULT_MAX_SEATS,
            max_units_per_sku: DEFAULT_MAX_UNITS_PER_SKU,
            max_items_per_hold: DEFAULT_MAX_ITEMS_PER_HOLD,
            max_drops_listed: DEFAULT_MAX_DROPS_LISTED,
            cache_entries: DEFAULT_DROP_CACHE_ENTRIES,
            unknown_ttl_ms: DEFAULT_UNKNOWN_DROP_TTL_MS,
            unknown_cache_entries: DEFAULT_UNKNOWN_DROP_CACHE_ENTRIES,
            lookups_per_s: DEFAULT_DROP_LOOKUPS_PER_S,
            lookup_burst: DEFAULT_DROP_LOOKUP_BURST,
            fan_holds_max_drops: DEFAULT_FAN_HOLDS_MAX_DROPS,
            catalogue_max_drops: DEFAULT_CATALOGUE_MAX_DROPS,
            catalogue_refresh_ms: DEFAULT_CATALOGUE_REFRESH_MS,
            catalogue_soon_days: DEFAULT_CATALOGUE_SOON_DAYS,
            audit_page_max: DEFAULT_AUDIT_PAGE_MAX,
            orders_page_max: DEFAULT_ORDERS_PAGE_MAX,
            orders_csv_max_rows: DEFAULT_ORDERS_CSV_MAX_ROWS,
            archive_after_s: DEFAULT_ARCHIVE_AFTER_S,
            archive_interval_ms: DEFAULT_ARCHIVE_INTERVAL_MS,
            archive_batch: DEFAULT_ARCHIVE_BATCH,
        }
    }
}

/// Every booking page polls its seat map every 5 s: a snapshot a quarter of a second old is as
/// good as a fresh one to a fan, and turns thousands of pages' polls into four reads a second.
pub const DEFAULT_SEAT_MAP_REFRESH_MS: u64 = 250;
/// Seat maps a process keeps; past it the one read longest ago is forgotten (a miss costs one
/// read). A 100,000-seat map takes about 100 KiB.
pub const DEFAULT_SEAT_MAP_CACHE_DROPS: usize = 256;
/// Fields per HSCAN step when a seat map is read from the seats hash (a drop loaded before the
/// seat map string existed): a few hundred microseconds of Redis each, where one HGETALL of a
/// 100,000-seat map holds it for tens of milliseconds.
pub const DEFAULT_SEAT_MAP_SCAN_CHUNK: usize = 1_000;
/// Bytes (seats) per GETRANGE step when a seat map is read from its string: a copy of 64 KiB is
/// tens of microseconds of Redis, so a 50,000-seat map is one call.
pub const DEFAULT_SEAT_MAP_READ_BYTES: usize = 65_536;
/// Seats best-available looks at per reserve, at most (whole rows, front first; the first row
/// always): bounds the reserve script's work whatever the section's size.
pub const DEFAULT_BEST_SCAN_SEATS_MAX: usize = 4_000;

/// Seat maps (`GET /v1/drops/{id}/seats`) and best-available.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeatsConfig {
    /// A process serves one drop's seat map from one snapshot for this long; then the next
    /// request reads it again, once however many callers wait (0: only callers arriving while a
    /// read is under way share it).
    pub map_refresh_ms: u64,
    /// Drops whose snapshot a process keeps.
    pub map_cache_drops: usize,
    /// Seats per HSCAN step reading a snapshot from the seats hash (drops loaded before the seat
    /// map string existed).
    pub map_scan_chunk: usize,
    /// Bytes (seats) per GETRANGE step reading a snapshot from the seat map string.
    pub map_read_bytes: usize,
    /// Seats one best-available reserve examines at most; a section whose free block lies past
    /// them answers `insufficient_stock` with `adjacent: false`.
    pub best_scan_seats_max: usize,
}

impl Default for SeatsConfig {
    fn default() -> Self {
        SeatsConfig {
            map_refresh_ms: DEFAULT_SEAT_MAP_REFRESH_MS,
            map_cache_drops: DEFAULT_SEAT_MAP_CACHE_DROPS,
            map_scan_chunk: DEFAULT_SEAT_MAP_SCAN_CHUNK,
            map_read_bytes: DEFAULT_SEAT_MAP_READ_BYTES,
            best_scan_seats_max: DEFAULT_BEST_SCAN_SEATS_MAX,
        }
    }
}

pub const DEFAULT_QUEUE_LISTEN: &str = "127.0.0.1:8081";
pub const DEFAULT_QUEUE_MAX_CONNECTIONS: usize = 19_000;
pub const DEFAULT_QUEUE_TICK_MS: u64 = 100;
pub const DEFAULT_QUEUE_BROADCAST_INTERVAL_MS: u64 = 1_000;
/// Exact positions correct what the ticks can't know (fans leaving the line ahead); every 10 s is
/// plenty for that and costs 19,000 waiters × 4 Redis reads per round.
pub const DEFAULT_QUEUE_POSITION_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_QUEUE_SEND_QUEUE_LEN: usize = 16;
pub const DEFAULT_QUEUE_PER_IP_JOIN_PER_S: u32 = 500;
pub const DEFAULT_QUEUE_PER_IP_JOIN_BURST: u32 = 2_000;
/// Every request (pages, polls, socket upgrades, joins) per address: above the joins' limit, as
/// a fan's page makes a few requests besides its join.
pub const DEFAULT_QUEUE_PER_IP_PER_S: u32 = 1_000;
pub const DEFAULT_QUEUE_PER_IP_BURST: u32 = 4_000;
/// Waiting-room requests are small: 16 KiB of head is plenty and bounds 19,000 connections.
pub const DEFAULT_QUEUE_MAX_READ_BUFFER_BYTES: usize = 16 * 1024;
pub const DEFAULT_WS_READ_BUFFER_BYTES: usize = 4 * 1024;
pub const DEFAULT_WS_WRITE_BUFFER_BYTES: usize = 4 * 1024;
pub const DEFAULT_WS_MAX_WRITE_BUFFER_BYTES: usize = 64 * 1024;
pub const DEFAULT_WS_MAX_MESSAGE_BYTES: usize = 4 * 1024;
pub const DEFAULT_BOOKING_PUBLIC_URL: &str = "http://127.0.0.1:8080";
/// queue-server as browsers reach it, by default (its own default listen address).
pub const DEFAULT_QUEUE_PUBLIC_URL: &str = "http://127.0.0.1:8081";
pub const DEFAULT_ADMIT_RATE_WINDOW_MS: u64 = 10_000;
pub const DEFAULT_ROOM_IDLE_KEEP_MS: u64 = 30_000;
pub const DEFAULT_MAX_ROOMS: usize = 10_000;
pub const DEFAULT_QUEUE_MAX_SOCKETS_PER_FAN: usize = 8;
pub const DEFAULT_POSITION_CONCURRENCY: usize = 64;
pub const DEFAULT_POSITION_SLICE: usize = 512;
pub const DEFAULT_PRESENCE_INTERVAL_MS: u64 = 5_000;
pub const DEFAULT_WS_PING_INTERVAL_MS: u64 = 20_000;
pub const DEFAULT_WS_IDLE_TIMEOUT_MS: u64 = 60_000;
/// A page sends its auth frame the moment its socket opens: 10 s covers a slow phone link many
/// times over, and bounds what a socket that never authenticates costs (a connection slot).
pub const DEFAULT_WS_AUTH_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_RECOVERY_RETURN_S: u64 = 30;
pub const DEFAULT_LINE_SEQ_MARGIN: u64 = 1_000_000;
pub const DEFAULT_LINE_MARKS_INTERVAL_MS: u64 = 1_000;
pub const DEFAULT_LEAVE_BATCH: usize = 1_000;
/// 10,000 a run: the highest rate a drop takes (100,000 a second) at the default 100 ms tick,
/// and an admission message of ≈ 0.6 MB on the drop's channel, far below Redis' pub/sub output
/// limits.
pub const DEFAULT_ADMIT_BATCH_MAX: usize = 10_000;
/// A write that blocks this long means the client stopped reading.
pub const DEFAULT_WS_SEND_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_WS_CLOSE_WAIT_MS: u64 = 2_000;
pub const DEFAULT_PRESENCE_CHUNK: usize = 1_000;
/// A drop's admission runs happen on one queue-server instance at a time, under a lease renewed
/// every third of it: 2 s is twenty ticks, and a dead holder's line stands still at most about
/// that long (other instances run the script themselves once they have heard nothing for a
/// lease's length).
pub const DEFAULT_ADMISSION_LEASE_MS: u64 = 2_000;
/// Admission feed messages held for the rooms before the oldest are lost (and their fans are
/// found by the catch-up instead): 10 ticks of 100 drops.
pub const DEFAULT_FEED_CAPACITY: usize = 1_024;
pub const DEFAULT_QUEUE_PER_FAN_POLL_PER_S: u32 = 2;
pub const DEFAULT_QUEUE_PER_FAN_POLL_BURST: u32 = 10;

/// queue-server: the waiting room's sockets, ticks and bounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    pub listen: SocketAddr,
    /// Open connections (WebSockets and HTTP) per process; past it new ones wait in the backlog.
    pub max_connections: usize,
    /// How often each drop with waiters here runs the admission script (admitted fans are told
    /// at once, and so is a change of the line's state: paused, all held, sold out).
    pub tick_ms: u64,
    /// How often the shared `tick` frame (watermark, admissions, rate) goes to every waiter. Once
    /// a second keeps a page's countdown smooth for people while costing 10× less than a frame
    /// per admission run: at 19,000 waiters a frame every 100 ms is 190,000 frames a second.
    pub broadcast_interval_ms: u64,
    /// How often each waiter gets an exact `position` (one ZRANK per waiter: the slow cadence).
    pub position_interval_ms: u64,
    /// Messages queued per socket; a client that lets it fill is dropped, not buffered.
    pub send_queue_len: usize,
    /// Joins per second per client IP (governor, per process). Generous: stadiums and mobile
    /// carriers put thousands of fans behind one address; one place per fan does the real work.
    pub per_ip_join_per_s: u32,
    pub per_ip_join_burst: u32,
    /// Requests per second per client IP on every route but `/healthz`, checked before anything
    /// else (a token, a drop id, Redis, Postgres): a refusal costs one limiter check.
    pub per_ip_per_s: u32,
    pub per_ip_burst: u32,
    /// As `http.max_read_buffer_bytes`, for queue-server's connections.
    pub max_read_buffer_bytes: usize,
    /// As `http.metrics_listen`, for queue-server.
    pub metrics_listen: Option<SocketAddr>,
    /// tungstenite's buffers: the read buffer is allocated up front, so it is what an idle
    /// connection costs (the default 128 KiB would be ~135 KiB per waiter).
    pub ws_read_buffer_bytes: usize,
    pub ws_write_buffer_bytes: usize,
    /// Must exceed `ws_write_buffer_bytes` (tungstenite panics otherwise).
    pub ws_max_write_buffer_bytes: usize,
    /// Largest message (and frame) a client may send.
    pub ws_max_message_bytes: usize,
    /// Where fans book: admitted fans are sent to `{booking_public_url}/drops/{drop_id}?admission_token=...`.
    pub booking_public_url: String,
    /// queue-server as browsers reach it: booking-api's front page links a queue drop to its
    /// queue page, `{public_url}/drops/{drop_id}`.
    pub public_url: String,
    /// The admission rate behind ETAs is measured over this window.
    pub admit_rate_window_ms: u64,
    /// A drop's admission loop keeps running this long after its last waiter or poll here.
    pub room_idle_keep_ms: u64,
    /// Drops with an admission loop in this process, at most.
    pub max_rooms: usize,
    /// Open sockets per fan per drop in this process: tabs and devices, not one fan token
    /// holding every connection slot. Past it a socket gets `rate_limited` and closes.
    pub max_sockets_per_fan: usize,
    /// Position lookups in flight per drop on the slow cadence.
    pub position_concurrency: usize,
    /// A position round goes out in slices of this many fans, one slice per admission run,
    /// only once the last `tick` frame has reached every socket (the two share the CPU). So a
    /// round over N waiters here takes about N / position_slice runs, less those spent
    /// delivering ticks: 19,000 at 512 and 100 ms ≈ 5–7 s. Neither a slice nor the presence
    /// refresh waits more than a broadcast interval for a quiet moment.
    pub position_slice: usize,
    /// How often the fans with a socket here are marked as seen (so they keep their place). The
    /// room refreshes at least three times per drop's `leave_grace_s` whatever this says.
    pub presence_interval_ms: u64,
    /// Waiters past their grace sent away per admission run, at most.
    pub leave_batch: usize,
    /// Fans admitted per admission run, at most: bounds the run's answer and the admission
    /// message every instance receives, however many tokens a paused line saved up.
    pub admit_batch_max: usize,
    /// Waiters marked present per Redis call (`ZADD XX` of this many members).
    pub presence_chunk: usize,
    /// The server pings every socket this often; a socket that sends nothing (not even the pong
    /// browsers answer with) for `ws_idle_timeout_ms` is closed. Without it a phone that vanished
    /// mid-line would keep its place until TCP gave up, a quarter of an hour later.
    pub ws_ping_interval_ms: u64,
    pub ws_idle_timeout_ms: u64,
    /// A write to a socket (a frame, a ping, a close) that blocks this long drops the socket:
    /// its client stopped reading.
    pub ws_send_timeout_ms: u64,
    /// How long a close handshake may take (a refused auth, a restart's 1012) before the
    /// connection is dropped.
    pub ws_close_wait_ms: u64,
    /// A socket must authenticate with its first message (`{"type":"auth","fan_token":…}`)
    /// within this long, or it is closed: the fan token never travels in a URL, and a socket
    /// that says nothing holds no connection slot for longer than this.
    pub ws_auth_timeout_ms: u64,
    /// After Redis lost a line, how long admission waits while fans come back with their place
    /// receipts and admission tokens (docs/ARCHITECTURE.md, "The line after Redis loss"), so the
    /// order they are admitted in is the line's, not their reconnect speed's.
    pub recovery_return_s: u64,
    /// After Redis lost a line, the join counter restarts this far above its kept mark: more
    /// than the joins any line takes between two marks (`line_marks_interval_ms`), so a fan who
    /// joins after the loss gets a place behind every one handed out before it.
    pub line_seq_margin: u64,
    /// How often an instance running a line keeps its marks (join counter, admitted watermark)
    /// in Postgres, when they moved.
    pub line_marks_interval_ms: u64,
    /// `GET /queue/me` polls per second per fan (governor, per process), and the burst.
    pub per_fan_poll_per_s: u32,
    pub per_fan_poll_burst: u32,
    pub request_timeout_ms: u64,
    pub header_read_timeout_ms: u64,
    /// How long graceful shutdown waits for sockets to take their close frame.
    pub shutdown_grace_ms: u64,
    /// On SIGTERM, how long `/readyz` answers 503 while sockets and requests are still served,
    /// before the sockets are told 1012 and the listener closes: a load balancer checking
    /// `/readyz` marks the instance down first, so reconnecting fans land on another one.
    pub drain_unready_ms: u64,
    /// How long an instance's per-drop lease on admission runs lasts unrenewed (docs/
    /// ARCHITECTURE.md, "Many instances"); the other instances take each run's outcome from the
    /// admission feed meanwhile.
    pub admission_lease_ms: u64,
    /// Admission feed messages buffered for this process' rooms; past it the oldest are lost.
    pub feed_capacity: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            listen: DEFAULT_QUEUE_LISTEN
                .parse()
                .expect("the default queue listen address parses"),
            max_connections: DEFAULT_QUEUE_MAX_CONNECTIONS,
            tick_ms: DEFAULT_QUEUE_TICK_MS,
            broadcast_interval_ms: DEFAULT_QUEUE_BROADCAST_INTERVAL_MS,
            position_interval_ms: DEFAULT_QUEUE_POSITION_INTERVAL_MS,
            send_queue_len: DEFAULT_QUEUE_SEND_QUEUE_LEN,
            per_ip_join_per_s: DEFAULT_QUEUE_PER_IP_JOIN_PER_S,
            per_ip_join_burst: DEFAULT_QUEUE_PER_IP_JOIN_BURST,
            per_ip_per_s: DEFAULT_QUEUE_PER_IP_PER_S,
            per_ip_burst: DEFAULT_QUEUE_PER_IP_BURST,
            max_read_buffer_bytes: DEFAULT_QUEUE_MAX_READ_BUFFER_BYTES,
            metrics_listen: None,
            ws_read_buffer_bytes: DEFAULT_WS_READ_BUFFER_BYTES,
            ws_write_buffer_bytes: DEFAULT_WS_WRITE_BUFFER_BYTES,
            ws_max_write_buffer_bytes: DEFAULT_WS_MAX_WRITE_BUFFER_BYTES,
            ws_max_message_bytes: DEFAULT_WS_MAX_MESSAGE_BYTES,
            booking_public_url: DEFAULT_BOOKING_PUBLIC_URL.to_owned(),
            public_url: DEFAULT_QUEUE_PUBLIC_URL.to_owned(),
            admit_rate_window_ms: DEFAULT_ADMIT_RATE_WINDOW_MS,
            room_idle_keep_ms: DEFAULT_ROOM_IDLE_KEEP_MS,
            max_rooms: DEFAULT_MAX_ROOMS,
            max_sockets_per_fan: DEFAULT_QUEUE_MAX_SOCKETS_PER_FAN,
            position_concurrency: DEFAULT_POSITION_CONCURRENCY,
            position_slice: DEFAULT_POSITION_SLICE,
            presence_interval_ms: DEFAULT_PRESENCE_INTERVAL_MS,
            leave_batch: DEFAULT_LEAVE_BATCH,
            admit_batch_max: DEFAULT_ADMIT_BATCH_MAX,
            presence_chunk: DEFAULT_PRESENCE_CHUNK,
            ws_ping_interval_ms: DEFAULT_WS_PING_INTERVAL_MS,
            ws_idle_timeout_ms: DEFAULT_WS_IDLE_TIMEOUT_MS,
            ws_send_timeout_ms: DEFAULT_WS_SEND_TIMEOUT_MS,
            ws_close_wait_ms: DEFAULT_WS_CLOSE_WAIT_MS,
            ws_auth_timeout_ms: DEFAULT_WS_AUTH_TIMEOUT_MS,
            recovery_return_s: DEFAULT_RECOVERY_RETURN_S,
            line_seq_margin: DEFAULT_LINE_SEQ_MARGIN,
            line_marks_interval_ms: DEFAULT_LINE_MARKS_INTERVAL_MS,
            per_fan_poll_per_s: DEFAULT_QUEUE_PER_FAN_POLL_PER_S,
            per_fan_poll_burst: DEFAULT_QUEUE_PER_FAN_POLL_BURST,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS,
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
            drain_unready_ms: DEFAULT_DRAIN_UNREADY_MS,
            admission_lease_ms: DEFAULT_ADMISSION_LEASE_MS,
            feed_capacity: DEFAULT_FEED_CAPACITY,
        }
    }
}

pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(toml: &str) -> Result<Config, Box<figment::Error>> {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(toml))
            .extract()
            .map_err(Box::new)
    }

    #[test]
    fn trusted_proxies_parse_as_blocks_and_bad_ones_are_refused() {
        let cfg =
            from_toml("[limits]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.5\"]").unwrap();
        let ips: Vec<String> = cfg
            .limits
            .trusted_proxies
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(ips, ["10.0.0.0/8", "192.168.1.5/32"]);
        assert!(from_toml("[limits]\ntrusted_proxies = [\"10.0.0.0/99\"]").is_err());
        assert!(Config::default().limits.trusted_proxies.is_empty());
    }

    #[track_caller]
    fn refused(cfg: &Config, says: &str) {
        let err = cfg.validate().expect_err(says);
        assert_eq!(err.code, crate::error::Code::InvalidRequest);
        assert!(err.message.contains(says), "`{err}` should say `{says}`");
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn a_refused_body_is_drained_within_the_request_time() {
        let mut cfg = Config::default();
        cfg.http.refused_body_drain_ms = cfg.http.request_timeout_ms;
        refused(
            &cfg,
            "http.refused_body_drain_ms must be below http.request_timeout_ms",
        );
    }

    #[test]
    fn intervals_and_timeouts_must_be_above_zero() {
        type SetToZero = fn(&mut Config);
        let zeroes: [(&str, SetToZero); 10] = [
            ("holds.sweep_interval_ms", |c| c.holds.sweep_interval_ms = 0),
            ("reconciler.interval_ms", |c| c.reconciler.interval_ms = 0),
            ("reconciler.watch_interval_ms", |c| {
                c.reconciler.watch_interval_ms = 0
            }),
            ("holds.confirm_timeout_ms", |c| {
                c.holds.confirm_timeout_ms = 0;
                c.holds.confirm_safety_margin_ms = 0;
            }),
            ("gateway.timeout_ms", |c| c.gateway.timeout_ms = 0),
            ("queue.tick_ms", |c| c.queue.tick_ms = 0),
            ("queue.position_interval_ms", |c| {
                c.queue.position_interval_ms = 0
            }),
            ("queue.presence_interval_ms", |c| {
                c.queue.presence_interval_ms = 0
            }),
            ("queue.ws_ping_interval_ms", |c| {
                c.queue.ws_ping_interval_ms = 0
            }),
            ("queue.ws_auth_timeout_ms", |c| {
                c.queue.ws_auth_timeout_ms = 0
            }),
        ];
        for (name, zero) in zeroes {
            let mut cfg = Config::default();
            zero(&mut cfg);
            refused(&cfg, &format!("{name} must be above 0"));
        }
    }

    #[test]
    fn recovery_and_archive_bounds_must_be_above_zero() {
        let mut cfg = Config::default();
        cfg.recovery.slice = 0;
        refused(&cfg, "recovery.slice must be above 0");
        let mut cfg = Config::default();
        cfg.recovery.concurrent_drops = 0;
        refused(&cfg, "recovery.concurrent_drops must be above 0");
        let mut cfg = Config::default();
        cfg.recovery.stalled_after_ms = 0;
        refused(&cfg, "recovery.stalled_after_ms must be above 0");
        let mut cfg = Config::default();
        cfg.drops.archive_batch = 0;
        refused(&cfg, "drops.archive_batch must be above 0");
        let mut cfg = Config::default();
        cfg.drops.archive_interval_ms = 0;
        refused(&cfg, "drops.archive_interval_ms must be above 0");
    }

    #[test]
    fn bounds_that_depend_on_each_other_are_checked() {
        let mut cfg = Config::default();
        cfg.holds.confirm_timeout_ms = 1_000;
        cfg.holds.confirm_safety_margin_ms = 999;
        cfg.gateway.timeout_ms = 998;
        cfg.validate().unwrap();
        cfg.holds.confirm_safety_margin_ms = 1_000;
        refused(&cfg, "holds.confirm_safety_margin_ms must be below");

        let mut cfg = Config::default();
        cfg.holds.confirm_safety_margin_ms = 5_000;
        cfg.gateway.timeout_ms = 4_999;
        cfg.validate().unwrap();
        cfg.gateway.timeout_ms = 5_000;
        refused(
            &cfg,
            "gateway.timeout_ms must be below holds.confirm_safety_margin_ms",
        );

        let mut cfg = Config::default();
        cfg.queue.ws_ping_interval_ms = 1_000;
        cfg.queue.ws_idle_timeout_ms = 1_001;
        cfg.validate().unwrap();
        cfg.queue.ws_idle_timeout_ms = 1_000;
        refused(&cfg, "queue.ws_idle_timeout_ms must exceed");

        let mut cfg = Config::default();
        cfg.queue.ws_write_buffer_bytes = 4096;
        cfg.queue.ws_max_write_buffer_bytes = 4097;
        cfg.validate().unwrap();
        cfg.queue.ws_max_write_buffer_bytes = 4096;
        refused(&cfg, "queue.ws_max_write_buffer_bytes must exceed");

        let mut cfg = Config::default();
        cfg.gateway.test_call_min_ms = 200;
        cfg.gateway.test_call_max_ms = 200;
        cfg.validate().unwrap();
        cfg.gateway.test_call_max_ms = 199;
        refused(&cfg, "gateway.test_call_min_ms must not exceed");
    }

    #[test]
    fn limiter_and_lookup_rates_must_be_above_zero() {
        type SetToZero = fn(&mut Config);
        let zeroes: [(&str, SetToZero); 5] = [
            ("limits.tidy_interval_ms", |c| c.limits.tidy_interval_ms = 0),
            ("drops.lookups_per_s", |c| c.drops.lookups_per_s = 0),
            ("drops.lookup_burst", |c| c.drops.lookup_burst = 0),
            ("holds.sweep_rounds_max", |c| c.holds.sweep_rounds_max = 0),
            ("queue.ws_send_timeout_ms", |c| {
                c.queue.ws_send_timeout_ms = 0
            }),
        ];
        for (name, zero) in zeroes {
            let mut cfg = Config::default();
            zero(&mut cfg);
            refused(&cfg, &format!("{name} must be above 0"));
        }
    }

    #[test]
    fn a_metrics_listener_is_off_unless_set() {
        assert!(Config::default().http.metrics_listen.is_none());
        let cfg = from_toml("[http]\nmetrics_listen = \"127.0.0.1:9090\"").unwrap();
        assert_eq!(
            cfg.http.metrics_listen,
            Some("127.0.0.1:9090".parse().unwrap())
        );
    }

    #[test]
    fn unknown_sections_and_fields_are_refused() {
        let cfg = from_toml("[holds]\nsweep_batch = 7\n[queue]\ntick_ms = 50").unwrap();
        assert_eq!(cfg.holds.sweep_batch, 7);
        assert_eq!(cfg.queue.tick_ms, 50);
        assert_eq!(cfg.holds.sweep_interval_ms, DEFAULT_SWEEP_INTERVAL_MS);
        assert!(from_toml("[holds]\nsweep_btach = 7").is_err());
        assert!(from_toml("[hold]\nsweep_batch = 7").is_err());
        assert!(from_toml("[holds]\nsweep_batch = -1").is_err());
    }

    #[test]
    fn every_section_is_known_to_the_environment() {
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let mut fields: Vec<&str> = defaults
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        let mut sections = SECTIONS.to_vec();
        sections.sort_unstable();
        assert_eq!(fields, sections);
    }
}
