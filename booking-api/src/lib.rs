//! booking-api: Floodgate's HTTP API on hyper 1.x. Thin by design: it parses requests,
//! authenticates, rate-limits and maps [`engine::Error`] to responses in one place; the work is in
//! [`engine::Engine`].
//!
//! # Layout
//! - [`server`] — listener, connection bound, graceful shutdown, background tasks.
//! - [`routes`] — the route table and handlers.
//! - [`limits`] — governor rate limits per IP and per fan.
//! - [`ops`] — the ops console's live stream (`/v1/ops/ws`, a WebSocket authenticated by its
//!   first message).
//! - [`pages`] — the front page, the fan's booking page, the back office and the ops console (static HTML/CSS/JS compiled in).
//! - [`catalogue`] — the front page's catalogue, served from memory between Postgres reads.

pub mod catalogue;
pub mod limits;
pub mod ops;
pub mod pages;
pub mod routes;
pub mod server;

pub use server::{start, Running};
