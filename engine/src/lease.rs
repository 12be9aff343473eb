//! Per-drop leases: which instance runs a drop's shared rounds (queue-server's admission runs,
//! booking-api's sweep and reconcile) so that N instances don't run N times the scripts
//! (docs/ARCHITECTURE.md, "Many instances").
//!
//! A lease is one Redis string per drop and kind, `fg:{drop}:lease:<kind>` = the holder's
//! instance id, with a TTL (`SET NX PX` to take it, `GET` then `PEXPIRE` to renew it). No
//! script: a lease is an economy, not a lock. Every round it guards is safe from any number of
//! instances at once (each is one atomic script, or reads and settlements Postgres arbitrates),
//! so the rare overlap a plain `GET`/`PEXPIRE` renewal allows (the lease lapsed and was taken
//! between the two) costs a few doubled runs until the next renewal, never a wrong answer.
//! A holder that dies stops renewing; another instance takes the lease within one TTL and a
//! third of one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fred::prelude::*;

use crate::error::Result;
use crate::ids::DropId;
use crate::keys::drop_key;
use crate::scripts::Redis;

impl Redis {
    /// Takes or renews the lease `key` for `me` for `ttl_ms`; true if `me` holds it now.
    /// `renew`: `me` believes it holds the lease (the renewal path reads first).
    pub async fn lease(&self, key: &str, me: &str, ttl_ms: u64, renew: bool) -> Result<bool> {
        let c = self.client();
        let ttl = i64::try_from(ttl_ms.max(1)).unwrap_or(i64::MAX);
        if renew {
            let holder: Option<String> = c.get(key).await?;
            if holder.as_deref() == Some(me) {
                let _: i64 = c.pexpire(key, ttl, None).await?;
                return Ok(true);
            }
            if holder.is_some() {
                return Ok(false);
            }
        }
        let set: Option<String> = c
            .set(
                key,
                me,
                Some(Expiration::PX(ttl)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(set.is_some())
    }

    /// Lets go of the lease `key` if `me` holds it, so another instance takes it at once.
    pub async fn release_lease(&self, key: &str, me: &str) -> Result<()> {
        let c = self.client();
        let holder: Option<String> = c.get(key).await?;
        if holder.as_deref() == Some(me) {
            let _: i64 = c.del(key).await?;
        }
        Ok(())
    }
}

/// What this process knows of one drop's lease.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// Until when it is ours for sure (by this process' clock, from before the call that took
    /// or renewed it); in the past when it isn't ours.
    until: Instant,
    /// When Redis is next asked (to renew it, or to try to take it).
    next_try: Instant,
    /// When this entry was last consulted: entries of drops nobody asks about any more go.
    used: Instant,
}

/// This process' leases of one kind (`admit`, `rounds`), one per drop.
pub struct Leases {
    kind: &'static str,
    /// This process, as the leases' value: random, so a restarted process is a new holder.
    me: String,
    ttl: Duration,
    held: Mutex<HashMap<DropId, Held>>,
    /// Times [`Leases::held`] was asked, and answered yes (a test compares instances by them).
    asked: AtomicU64,
    granted: AtomicU64,
}

impl Leases {
    pub fn new(kind: &'static str, ttl_ms: u64) -> Leases {
        Leases {
            kind,
            me: hex::encode(rand::random::<[u8; 8]>()),
            ttl: Duration::from_millis(ttl_ms.max(30)),
            held: Mutex::new(HashMap::new()),
            asked: AtomicU64::new(0),
            granted: AtomicU64::new(0),
        }
    }

    /// How many times this process asked whether it holds a lease of this kind, and how many
    /// times the answer was yes: with one instance the two are equal; with N sharing the drops,
    /// the yeses over all of them stay near one instance's asks.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.asked.load(Ordering::Relaxed),
            self.granted.load(Ordering::Relaxed),
        )
    }

    /// The Redis key of `drop`'s lease of this kind.
    pub fn key(&self, drop: &DropId) -> String {
        drop_key(drop, &format!("lease:{}", self.kind))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DropId, Held>> {
        // Each entry stands alone: a panic elsewhere leaves the map usable.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this process holds `drop`'s lease, asking Redis (to renew or take it) at most
    /// every third of the TTL; between asks, the answer is what the last one said. A Redis error
    /// keeps a lease held until it surely lapsed, and retries soon.
    pub async fn held(&self, redis: &Redis, drop: &DropId) -> bool {
        let held = self.ask(redis, drop).await;
        self.asked.fetch_add(1, Ordering::Relaxed);
        if held {
            self.granted.fetch_add(1, Ordering::Relaxed);
        }
        held
    }

    async fn ask(&self, redis: &Redis, drop: &DropId) -> bool {
        let now = Instant::now();
        let known = self.lock().get(drop).copied();
        if let Some(h) = known {
            if now < h.next_try {
                self.lock().entry(drop.clone()).and_modify(|h| h.used = now);
                return now < h.until;
            }
        }
        let believed = known.is_some_and(|h| now < h.until);
        let asked = Instant::now();
        let answer = redis
            .lease(
                &self.key(drop),
                &self.me,
                self.ttl.as_millis() as u64,
                believed,
            )
            .await;
        let mut map = self.lock();
        // Entries not asked about for ten TTLs belong to drops this process left.
        map.retain(|_, h| now.duration_since(h.used) < self.ttl * 10);
        let every = self.ttl / 3;
        let h = match answer {
            // A tenth of the TTL short of it: the TTL runs from when Redis set it, a little
            // after `asked`, but clocks of two machines may drift apart by a little.
            Ok(true) => Held {
                until: asked + self.ttl - self.ttl / 10,
                next_try: now + every,
                used: now,
            },
            Ok(false) => Held {
                until: now,
                next_try: now + every,
                used: now,
            },
            Err(e) => {
                tracing::debug!(%drop, kind = self.kind, error = %e, "lease call failed");
                Held {
                    until: known.map_or(now, |h| h.until),
                    next_try: now + every / 4,
                    used: now,
                }
            }
        };
        map.insert(drop.clone(), h);
        Instant::now() < h.until
    }

    /// Lets go of every lease this process holds (at shutdown).
    pub async fn release_all(&self, redis: &Redis) {
        let drops: Vec<DropId> = self.lock().keys().cloned().collect();
        for drop in drops {
            self.release(redis, &drop).await;
        }
    }

    /// Lets go of `drop`'s lease, if this process holds it (a room that ends, a shutdown), so
    /// another instance takes it over at once instead of a TTL later.
    pub async fn release(&self, redis: &Redis, drop: &DropId) {
        let held = self
            .lock()
            .remove(drop)
            .is_some_and(|h| Instant::now() < h.until);
        if held {
            if let Err(e) = redis.release_lease(&self.key(drop), &self.me).await {
                tracing::debug!(%drop, kind = self.kind, error = %e, "lease release failed");
            }
        }
    }
}
