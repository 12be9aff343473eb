//! Rate limits per client IP and per signed-in fan (governor, per process). Each limiter forgets
//! idle keys periodically and is replaced whole if it still holds more than `max_limiter_keys`,
//! so an address scan can't grow memory without bound.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use engine::config::LimitsConfig;
use engine::{Code, Error};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

struct Keyed<K: std::hash::Hash + Eq + Clone> {
    quota: Quota,
    max_keys: usize,
    limiter: RwLock<Arc<DefaultKeyedRateLimiter<K>>>,
}

impl<K: std::hash::Hash + Eq + Clone> Keyed<K> {
    fn new(per_s: u32, burst: u32, max_keys: usize) -> Self {
        let nz = |v: u32| NonZeroU32::new(v.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(nz(per_s)).allow_burst(nz(burst));
        Keyed {
            quota,
            max_keys,
            limiter: RwLock::new(Arc::new(RateLimiter::keyed(quota))),
        }
    }

    fn current(&self) -> Arc<DefaultKeyedRateLimiter<K>> {
        self.limiter
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn check(&self, key: &K) -> Result<(), Error> {
        self.current().check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Error::new(Code::RateLimited).retry_after(wait.max(Duration::from_secs(1)))
        })
    }

    fn tidy(&self) {
        let limiter = self.current();
        limiter.retain_recent();
        if limiter.len() > self.max_keys {
            *self.limiter.write().unwrap_or_else(|p| p.into_inner()) =
                Arc::new(RateLimiter::keyed(self.quota));
        }
    }
}

pub struct Limits {
    per_ip: Keyed<IpAddr>,
    per_fan: Keyed<String>,
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Limits {
        Limits {
            per_ip: Keyed::new(cfg.per_ip_per_s, cfg.per_ip_burst, cfg.max_limiter_keys),
            per_fan: Keyed::new(cfg.per_fan_per_s, cfg.per_fan_burst, cfg.max_limiter_keys),
        }
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Error> {
        self.per_ip.check(&ip)
    }

    pub fn check_fan(&self, fan: &str) -> Result<(), Error> {
        self.per_fan.check(&fan.to_owned())
    }

    /// Forget idle keys; called every few seconds by the server.
    pub fn tidy(&self) {
        self.per_ip.tidy();
        self.per_fan.tidy();
    }
}
