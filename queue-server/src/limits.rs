//! Rate limits (governor, per process; see [`web::KeyedLimit`]): joins and sockets per
//! client IP (generous: a stadium shares one address), and HTTP polls per fan (a client without
//! WebSockets should poll every few seconds, not spin).

use std::net::IpAddr;

use engine::config::QueueConfig;
use engine::ids::FanId;
use engine::Error;
use web::KeyedLimit;

/// Keys (addresses or fans) each limiter remembers before it starts over.
pub const MAX_KEYS: usize = 200_000;

pub struct Limits {
    join_per_ip: KeyedLimit<IpAddr>,
    poll_per_fan: KeyedLimit<FanId>,
}

impl Limits {
    pub fn new(cfg: &QueueConfig) -> Limits {
        Limits {
            join_per_ip: KeyedLimit::new(cfg.per_ip_join_per_s, cfg.per_ip_join_burst, MAX_KEYS),
            poll_per_fan: KeyedLimit::new(cfg.per_fan_poll_per_s, cfg.per_fan_poll_burst, MAX_KEYS),
        }
    }

    pub fn check_join(&self, ip: &IpAddr) -> Result<(), Error> {
        self.join_per_ip.check(ip)
    }

    pub fn check_poll(&self, fan: &FanId) -> Result<(), Error> {
        self.poll_per_fan.check(fan)
    }

    /// Forget idle keys; called every few seconds by the server.
    pub fn tidy(&self) {
        self.join_per_ip.tidy();
        self.poll_per_fan.tidy();
    }
}
