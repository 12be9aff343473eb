//! Floodgate's engine: everything booking-api and queue-server share.
//!
//! # Layout
//! - [`ids`] — newtypes that parse: drop, fan, hold, order, SKU, section and seat ids.
//! - [`error`] — the one table of error codes (HTTP status, stable name, message).
//! - [`fill`] — one cache fill per key at a time (no stampede on Postgres when a process is cold).
//! - [`config`] — layered configuration with a named default for every bound.
//! - [`drops`] — drop definitions: creation requests, bounds, reserve requests against a drop.
//! - [`keys`] — every Redis key name of a drop, in the orders the scripts take them.
//! - [`scripts`] — all Redis access: one typed wrapper per Lua script, and a few reads.
//! - [`aof`] — when Redis rewrites its AOF: once grown, and only while Redis is quiet.
//! - [`db`] — the Postgres store: migrations, keys, drops, payments, orders, recovery reads.
//! - [`writer`] — group commit of confirmed orders, a SAVEPOINT per order.
//! - [`payments`] — the payment gateway trait and the deterministic test gateway.
//! - [`queue`] — the waiting room: line keys, pre-queue scores, join and admission wrappers,
//!   and the admission feed (sharded pub/sub) that tells every instance whom a run admitted.
//! - [`lease`] — per-drop leases: one instance at a time runs a drop's shared rounds.
//! - [`tokens`] — fan identity tokens (dev / HS256 / RS256) and admission tokens (HMAC-SHA256).
//! - [`booking`] — the engine handlers call: reserve, release, confirm, the sweeper, the
//!   reconciler and recovery.
//! - [`metrics`] — metric names.
//! - [`drop_metrics`] — per-drop gauges read from Redis, appended to `/metrics`.
//! - [`ops_figures`] — the ops console's live samples: Redis' figures, each instance's reserve
//!   and confirm rates and p99s written to Redis once a second, the charts' history.
//! - [`net`] — address blocks and the client's address behind trusted proxies.

pub mod aof;
pub mod booking;
pub mod config;
pub mod db;
pub mod drop_metrics;
pub mod drops;
pub mod error;
pub mod fill;
pub mod ids;
pub mod keys;
pub mod lease;
pub mod metrics;
pub mod net;
pub mod ops_figures;
pub mod payments;
pub mod queue;
pub mod scripts;
pub mod tokens;
pub mod writer;

pub use booking::{Engine, Role};
pub use config::Config;
pub use error::{Code, Error, Result};
