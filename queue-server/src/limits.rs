//! The per-IP join limit (governor, per process; see [`engine::web::KeyedLimit`]).

use std::net::IpAddr;

/// Addresses remembered before the limiter starts over.
pub const MAX_KEYS: usize = 200_000;

pub type JoinLimit = engine::web::KeyedLimit<IpAddr>;
