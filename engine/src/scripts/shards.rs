//! On a Redis Cluster, a pool of single-node clients per primary and the slot map that routes a
//! drop's commands to its primary (docs/ARCHITECTURE.md, "Redis Cluster: a drop is a slot").
//!
//! Why not only fred's cluster client: when a primary dies, fred 10.1 reconnects a cluster client
//! as a whole, in the client's one routing task, and can't until the replica is promoted — every
//! shard's commands wait meanwhile. A single-node client per primary stalls only its own node's
//! commands: the other shards' drops keep selling through a failover.
//!
//! The same holds at start: a primary that doesn't answer (a restart during a failover) leaves
//! its pool trying in the background while the others serve (docs/OPERATIONS.md, "Starting
//! during a failover").

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::config::{Server, ServerConfig};

use crate::config::RedisConfig;
use crate::error::{Error, Result};

/// How often, at most, a failing command makes the slot map be read again (`CLUSTER SLOTS` from
/// every primary's pool at once; the first answer wins). A failover is noticed through the
/// commands of the failed shard's drops, which fail until its replica is promoted.
const SHARD_MAP_REFRESH_MIN_INTERVAL_MS: u64 = 200;

/// How often a start looks whether its pools have connected (fred tells only a connect that
/// succeeds, so a pool still trying a dead node would be waited on for good).
const CONNECT_POLL_MS: u64 = 5;

/// Redis Cluster's slot count: slots `0..CLUSTER_SLOTS`.
const CLUSTER_SLOTS: u32 = 16_384;

/// Which primary serves which slots: `(first slot, last slot, primary)`, from `CLUSTER SLOTS`.
pub(crate) type Routing = Vec<(u16, u16, Server)>;

/// The slot map and a pool per primary it names.
struct ShardMap {
    routing: Routing,
    pools: HashMap<Server, Pool>,
}

/// `CLUSTER SLOTS`' answer as a [`Routing`], sorted: each entry is
/// `[first, last, [host, port, id, ...], replicas...]`; an empty host means the node asked.
fn parse_slots(reply: Value, asked: &Server) -> Routing {
    let mut routing: Routing = reply
        .into_array()
        .into_iter()
        .filter_map(|entry| {
            let mut parts = entry.into_array().into_iter();
            let first = u16::try_from(parts.next()?.as_i64()?).ok()?;
            let last = u16::try_from(parts.next()?.as_i64()?).ok()?;
            let mut node = parts.next()?.into_array().into_iter();
            let host = node.next()?.as_string()?;
            let port = u16::try_from(node.next()?.as_i64()?).ok()?;
            let host = if host.is_empty() || host == "?" {
                asked.host.to_string()
            } else {
                host
            };
            Some((first, last, Server::new(host, port)))
        })
        .collect();
    routing.sort_by_key(|(first, _, _)| *first);
    routing
}

/// `CLUSTER SLOTS` asked through `client` (a primary's pool).
pub(crate) async fn read_slots(client: &Client, asked: &Server) -> Result<Routing> {
    let reply: Value = client
        .custom(
            fred::types::CustomCommand::new_static("CLUSTER", None, false),
            vec!["SLOTS"],
        )
        .await?;
    let routing = parse_slots(reply, asked);
    if routing.is_empty() {
        return Err(Error::unavailable(
            "Redis",
            "CLUSTER SLOTS names no primary",
        ));
    }
    Ok(routing)
}

/// The slot map from the first of `config`'s seed nodes that answers `CLUSTER SLOTS` (a
/// replica's answer will do), each asked through a client of its own; none answering fails the
/// start, as one Redis down does.
pub(crate) async fn discover(config: &Config, cfg: &RedisConfig) -> Result<Routing> {
    let mut last = None;
    for seed in config.server.hosts() {
        let mut one = config.clone();
        one.fail_fast = true;
        one.server = ServerConfig::Centralized {
            server: seed.clone(),
        };
        let client = super::builder(one, cfg, ReconnectPolicy::default())
            .build()
            .map_err(|e| Error::invalid(format!("redis: {e}")))?;
        let routing = match client.init().await {
            Ok(_) => read_slots(&client, &seed).await,
            Err(e) => Err(Error::unavailable("Redis", e)),
        };
        let _ = client.quit().await;
        match routing {
            Ok(routing) => return Ok(routing),
            Err(e) => {
                tracing::warn!(%seed, error = %e, "Redis Cluster seed node didn't answer CLUSTER SLOTS");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::unavailable("Redis", "redis.url names no cluster node")))
}

/// Whether every one of `clients` is connected by `deadline` (they connect in the background).
pub(crate) async fn connected_by(clients: &[Client], deadline: Instant) -> bool {
    loop {
        if clients.iter().all(|c| c.is_connected()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(CONNECT_POLL_MS)).await;
    }
}

pub(crate) struct Shards {
    /// The cluster's config (credentials, TLS), its server replaced per primary.
    template: Config,
    cfg: RedisConfig,
    policy: ReconnectPolicy,
    map: RwLock<Arc<ShardMap>>,
    /// When the map was last read; held while it is read (one refresh at a time).
    refreshed: tokio::sync::Mutex<Instant>,
}

impl Shards {
    /// A pool per primary of `routing` (the slot map at start), each connecting in the
    /// background: this waits at most `command_timeout_ms` for them, and a primary that hasn't
    /// answered by then (down, failing over) is tried again and again
    /// ([`super::reconnect_policy`]) while its drops' commands fail (503).
    pub(crate) async fn connect(
        template: Config,
        cfg: &RedisConfig,
        policy: ReconnectPolicy,
        routing: Routing,
    ) -> Result<Shards> {
        let shards = Shards {
            template,
            cfg: cfg.clone(),
            policy,
            map: RwLock::new(Arc::new(ShardMap {
                routing: Routing::new(),
                pools: HashMap::new(),
            })),
            refreshed: tokio::sync::Mutex::new(Instant::now()),
        };
        let pools = shards.pools_for(&routing, &HashMap::new())?;
        for pool in pools.values() {
            // The connection tasks run detached; `quit` ends them.
            std::mem::drop(pool.connect_pool());
        }
        let deadline = Instant::now() + Duration::from_millis(cfg.command_timeout_ms);
        for pool in pools.values() {
            connected_by(pool.clients(), deadline).await;
        }
        *shards.map.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(ShardMap { routing, pools });
        Ok(shards)
    }

    /// A client of the primary serving `slot`, as the map last read says; `None` if no primary
    /// serves it (the caller answers 503 and the map is read again).
    pub(crate) fn client(&self, slot: u16) -> Option<Client> {
        let map = self.current();
        let (_, _, server) = map
            .routing
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))?;
        map.pools.get(server).map(|p| p.next().clone())
    }

    /// Every primary's client, sorted by address.
    pub(crate) fn primaries(&self) -> Vec<(Server, Client)> {
        let map = self.current();
        let mut all: Vec<(Server, Client)> = map
            .pools
            .iter()
            .map(|(s, p)| (s.clone(), p.next().clone()))
            .collect();
        all.sort_by(|(a, _), (b, _)| (&a.host, a.port).cmp(&(&b.host, b.port)));
        all
    }

    /// Reads the slot map again unless it was read less than
    /// [`SHARD_MAP_REFRESH_MIN_INTERVAL_MS`] ago (or is being read); for a command that failed in
    /// a way a changed map explains (a dead or demoted primary, `MOVED`).
    pub(crate) async fn refresh(&self) {
        let Ok(mut last) = self.refreshed.try_lock() else {
            return;
        };
        if last.elapsed() < Duration::from_millis(SHARD_MAP_REFRESH_MIN_INTERVAL_MS) {
            return;
        }
        *last = Instant::now();
        let old = self.current();
        // Every primary is asked at once; the first answer wins (a dead one's waits out the
        // command timeout).
        let mut asks = tokio::task::JoinSet::new();
        for (server, pool) in &old.pools {
            let (server, client) = (server.clone(), pool.next().clone());
            asks.spawn(async move { read_slots(&client, &server).await });
        }
        let mut routing = None;
        while let Some(answer) = asks.join_next().await {
            if let Ok(Ok(r)) = answer {
                routing = Some(r);
                break;
            }
        }
        asks.abort_all();
        let Some(routing) = routing else {
            return;
        };
        if routing == old.routing {
            return;
        }
        let Ok(pools) = self.pools_for(&routing, &old.pools) else {
            return;
        };
        for (server, pool) in &old.pools {
            if !pools.contains_key(server) {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let _ = pool.quit().await;
                });
            }
        }
        for (server, pool) in &pools {
            if !old.pools.contains_key(server) {
                // Its connection tasks run detached; commands wait for them (bounded by the
                // command timeout).
                let _ = pool.connect_pool();
            }
        }
        *self.map.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(ShardMap { routing, pools });
    }

    /// Why some slot has no primary this process reaches, if one hasn't: the map leaves it
    /// unassigned, or its primary's pool has no connection (down at start, or failing over).
    pub(crate) fn unserved(&self) -> Option<String> {
        let map = self.current();
        let mut next: u32 = 0;
        for (first, last, server) in &map.routing {
            let first = u32::from(*first);
            if first > next {
                return Some(format!("slots {next}-{} have no primary", first - 1));
            }
            let reached = map
                .pools
                .get(server)
                .is_some_and(|p| p.clients().iter().any(|c| c.is_connected()));
            if !reached {
                return Some(format!(
                    "the primary of slots {first}-{last} ({server}) is not reachable"
                ));
            }
            next = next.max(u32::from(*last) + 1);
        }
        (next < CLUSTER_SLOTS)
            .then(|| format!("slots {next}-{} have no primary", CLUSTER_SLOTS - 1))
    }

    /// Every pool's every client (one that still tries a dead node stops trying).
    pub(crate) async fn quit(&self) {
        for pool in self.current().pools.values() {
            let _ = pool.quit().await;
        }
    }

    fn current(&self) -> Arc<ShardMap> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A pool for every primary of `routing`: the one in `have`, or a new one (not connected).
    fn pools_for(
        &self,
        routing: &Routing,
        have: &HashMap<Server, Pool>,
    ) -> Result<HashMap<Server, Pool>> {
        let mut pools = HashMap::new();
        for (_, _, server) in routing {
            let server = server.clone();
            if let Some(pool) = have.get(&server) {
                pools.insert(server, pool.clone());
                continue;
            }
            let mut config = self.template.clone();
            config.server = ServerConfig::Centralized {
                server: server.clone(),
            };
            let pool = super::builder(config, &self.cfg, self.policy.clone())
                .build_pool(self.cfg.pool_size.max(1))
                .map_err(|e| Error::invalid(format!("redis: {e}")))?;
            pools.insert(server, pool);
        }
        Ok(pools)
    }
}
