//! queue-server: Floodgate's waiting room. Fans join a queue drop's line, wait on a WebSocket
//! (or poll over HTTP) and are told their position, an ETA from the measured admission rate, and,
//! when their turn comes, a signed admission token for booking-api. Thin by design: the line and
//! the admission decision live in Redis behind [`engine::queue`]; this crate wires sockets, ticks
//! and bounds.
//!
//! # Layout
//! - [`server`] — listener, connection bound, HTTP/1.1 with WebSocket upgrades, graceful shutdown.
//! - [`routes`] — the route table and the HTTP handlers (join, poll, seed reveal, health, metrics).
//! - [`ws`] — the WebSocket handshake and one task per socket with a bounded send queue.
//! - [`room`] — one admission loop per drop with waiters here: ticks, positions, admissions.
//! - [`limits`] — governor rate limit on joins per client IP.
//! - [`pages`] — the fan's queue page (`static/`), compiled in.

pub mod limits;
pub mod pages;
pub mod room;
pub mod routes;
pub mod server;
pub mod ws;

pub use server::{start, Running};
