//! The per-IP join limit (governor, per process). It forgets idle addresses periodically and is
//! replaced whole if it still remembers more than `max_keys`, so an address scan can't grow
//! memory without bound.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use engine::{Code, Error};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Addresses remembered before the limiter starts over.
const MAX_KEYS: usize = 200_000;

pub struct JoinLimit {
    quota: Quota,
    limiter: RwLock<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
}

impl JoinLimit {
    pub fn new(per_s: u32, burst: u32) -> JoinLimit {
        let nz = |v: u32| NonZeroU32::new(v.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(nz(per_s)).allow_burst(nz(burst));
        JoinLimit {
            quota,
            limiter: RwLock::new(Arc::new(RateLimiter::keyed(quota))),
        }
    }

    fn current(&self) -> Arc<DefaultKeyedRateLimiter<IpAddr>> {
        self.limiter
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), Error> {
        self.current().check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Error::new(Code::RateLimited).retry_after(wait.max(Duration::from_secs(1)))
        })
    }

    /// Forget idle addresses; called every few seconds by the server.
    pub fn tidy(&self) {
        let limiter = self.current();
        limiter.retain_recent();
        if limiter.len() > MAX_KEYS {
            *self.limiter.write().unwrap_or_else(|p| p.into_inner()) =
                Arc::new(RateLimiter::keyed(self.quota));
        }
    }
}
