//! Rate limits (governor, per process; see [`web::KeyedLimit`]): every request per client IP
//! (IPv6 by /64), checked before anything else; joins and sockets per client IP (generous: a
//! stadium shares one address); and HTTP polls per fan (a client without WebSockets should poll
//! every few seconds, not spin). Each remembers at most `limits.max_limiter_keys` keys.

use std::net::IpAddr;

use engine::ids::FanId;
use engine::{Config, Error};
use web::KeyedLimit;

pub struct Limits {
    per_ip: KeyedLimit<IpAddr>,
    join_per_ip: KeyedLimit<IpAddr>,
    poll_per_fan: KeyedLimit<FanId>,
}

impl Limits {
    pub fn new(cfg: &Config) -> Limits {
        let (q, keys) = (&cfg.queue, cfg.limits.max_limiter_keys);
        Limits {
            per_ip: KeyedLimit::new(q.per_ip_per_s, q.per_ip_burst, keys),
            join_per_ip: KeyedLimit::new(q.per_ip_join_per_s, q.per_ip_join_burst, keys),
            poll_per_fan: KeyedLimit::new(q.per_fan_poll_per_s, q.per_fan_poll_burst, keys),
        }
    }

    /// Every request but `/healthz`, before its token, ids or stores are looked at.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Error> {
        self.per_ip.check_ip(ip)
    }

    pub fn check_join(&self, ip: &IpAddr) -> Result<(), Error> {
        self.join_per_ip.check_ip(*ip)
    }

    pub fn check_poll(&self, fan: &FanId) -> Result<(), Error> {
        self.poll_per_fan.check(fan)
    }

    /// Forget idle keys; called every `limits.tidy_interval_ms` by the server.
    pub fn tidy(&self) {
        self.per_ip.tidy();
        self.join_per_ip.tidy();
        self.poll_per_fan.tidy();
    }
}
