//! Rate limits per client IP (IPv6 by /64) and per signed-in fan (governor, per process; see
//! [`web::KeyedLimit`]). Each limiter remembers at most `limits.max_limiter_keys` keys, forgetting
//! the idlest first, so an address scan can't grow memory without bound nor free a limited client.

use std::net::IpAddr;

use engine::config::LimitsConfig;
use engine::Error;
use web::KeyedLimit;

pub struct Limits {
    per_ip: KeyedLimit<IpAddr>,
    per_fan: KeyedLimit<String>,
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Limits {
        Limits {
            per_ip: KeyedLimit::new(cfg.per_ip_per_s, cfg.per_ip_burst, cfg.max_limiter_keys),
            per_fan: KeyedLimit::new(cfg.per_fan_per_s, cfg.per_fan_burst, cfg.max_limiter_keys),
        }
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Error> {
        self.per_ip.check_ip(ip)
    }

    pub fn check_fan(&self, fan: &str) -> Result<(), Error> {
        self.per_fan.check(&fan.to_owned())
    }

    /// Forget idle keys; called every `limits.tidy_interval_ms` by the server.
    pub fn tidy(&self) {
        self.per_ip.tidy();
        self.per_fan.tidy();
    }
}
