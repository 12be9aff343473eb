//! Everything Floodgate says to Redis: the drop key set, the Lua scripts in `lua/` (loaded by SHA,
//! reloaded on NOSCRIPT) behind one typed wrapper each, and the few plain reads (counts, a hold,
//! the seat map). Stock only changes inside these scripts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use serde::{Deserialize, Serialize};

use crate::config::RedisConfig;
use crate::error::{Code, Error, Result};
use crate::ids::{DropId, FanId, HoldId, OrderId};
use crate::queue::SessionEnds;

mod function;
mod shards;

use function::Function;

/// How many `MOVED`/`ASK` redirections a command follows on a Redis Cluster before it fails
/// (503 `unavailable`: the caller retries). One: a `MOVED` (a slot moved, a replica promoted)
/// refreshes the client's slot map and retries once. More would be no use and a hazard: fred 10.1
/// resends a command after `ASKING` to the slot's old owner, which asks again, and once its send
/// attempts run out the pool connection's task ends and never reconnects — every later command on
/// it times out (booking-api/tests/cluster.rs moves a drop's slot to show it doesn't).
const MAX_CLUSTER_REDIRECTIONS: u32 = 1;

/// The prelude every script starts with: `now_ms()`, the one place a script reads the time.
const CLOCK: &str = include_str!("../../lua/clock.lua");

/// The shared prelude each hold script starts with after the clock (key names, hold helpers),
/// naming the script's keys (lib.lua `name_keys`).
const LIB: &str = concat!(include_str!("../../lua/lib.lua"), "\nname_keys(KEYS)\n");

/// lib.lua alone: reserve's function library names the keys of each call itself.
const LIB_FOR_FUNCTIONS: &str = include_str!("../../lua/lib.lua");

/// Every script: its name (its file in `lua/`), its source, and whether it takes `lib.lua` (the
/// hold scripts do; the waiting room's `join` and `admit` take only the clock).
const SOURCES: [(&str, &str, bool); 19] = [
    ("reserve", include_str!("../../lua/reserve.lua"), true),
    ("release", include_str!("../../lua/release.lua"), true),
    ("expire", include_str!("../../lua/expire.lua"), true),
    (
        "confirm_begin",
        include_str!("../../lua/confirm_begin.lua"),
        true,
    ),
    (
        "confirm_finish",
        include_str!("../../lua/confirm_finish.lua"),
        true,
    ),
    (
        "confirm_revert",
        include_str!("../../lua/confirm_revert.lua"),
        true,
    ),
    ("load_drop", include_str!("../../lua/load_drop.lua"), true),
    ("rebuild", include_str!("../../lua/rebuild.lua"), true),
    (
        "rebuild_fill",
        include_str!("../../lua/rebuild_fill.lua"),
        true,
    ),
    (
        "rebuild_sort",
        include_str!("../../lua/rebuild_sort.lua"),
        true,
    ),
    (
        "rebuild_keep",
        include_str!("../../lua/rebuild_keep.lua"),
        true,
    ),
    (
        "rebuild_finish",
        include_str!("../../lua/rebuild_finish.lua"),
        true,
    ),
    ("archive", include_str!("../../lua/archive.lua"), false),
    ("join", include_str!("../../lua/join.lua"), false),
    ("admit", include_str!("../../lua/admit.lua"), false),
    (
        "line_restore",
        include_str!("../../lua/line_restore.lua"),
        false,
    ),
    ("drop_state", include_str!("../../lua/drop_state.lua"), true),
    ("restock", include_str!("../../lua/restock.lua"), true),
    ("refund", include_str!("../../lua/refund.lua"), true),
];

pub use crate::keys::DropKeys;

/// One item of a hold as the scripts store it: bucket (SKU or section), quantity, seat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldItem {
    pub b: String,
    pub q: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HoldState {
    Held,
    Confirming,
    Sold,
    Released,
    Expired,
}

impl HoldState {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Held => "held",
            HoldState::Confirming => "confirming",
            HoldState::Sold => "sold",
            HoldState::Released => "released",
            HoldState::Expired => "expired",
        }
    }
}

/// A hold as Redis keeps it (lua/lib.lua documents the fields).
#[derive(Debug, Clone, Deserialize)]
pub struct HoldRecord {
    pub fan: String,
    pub st: HoldState,
    pub exp: i64,
    #[serde(default)]
    pub cexp: Option<i64>,
    #[serde(default, rename = "ref")]
    pub reference: Option<String>,
    #[serde(default)]
    pub oid: Option<String>,
    pub u: u32,
    pub c: i64,
    pub it: Vec<HoldItem>,
}

/// What a reserve decided.
#[derive(Debug, Clone)]
pub enum Reserved {
    Held {
        hold_id: HoldId,
        expires_at_ms: i64,
        now_ms: i64,
        items: Vec<HoldItem>,
    },
    Refused {
        code: Code,
        detail: serde_json::Value,
    },
}

/// The body of a reserve: SKUs with quantities, named seats, or best-available in a section.
#[derive(Debug, Clone)]
pub enum ReserveArgs<'a> {
    Items(&'a [(String, u32)]),
    Seats(&'a [(String, String)]),
    /// `scan_seats_max`: seats best-available examines at most (whole rows, front first).
    Best {
        section: &'a str,
        quantity: u32,
        scan_seats_max: usize,
    },
}

impl ReserveArgs<'_> {
    /// lua/reserve.lua's ARGV[4].
    fn kind(&self) -> &'static str {
        match self {
            ReserveArgs::Items(_) => "items",
            ReserveArgs::Seats(_) => "seats",
            ReserveArgs::Best { .. } => "best",
        }
    }
}

#[derive(Debug, Clone)]
pub enum ConfirmBegin {
    Began(HoldRecord),
    InProgress(HoldRecord),
    Sold(Option<OrderId>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Sold,
    Already,
    /// The hold's units had gone back to stock: Postgres sold what Redis released.
    Ended,
    Unknown,
}

/// What lua/refund.lua did with a refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundReturn {
    /// Its units went back to stock now; `closed`: the drop was closed (nothing sells them).
    Returned { closed: bool },
    /// Returned before, or counted by a rebuild: nothing done.
    Already,
    /// The order's hold is still live in Redis (held or confirming): its confirm finishes, or it
    /// expires, first.
    HoldNotSold,
    /// Redis doesn't have the sale the refund gives back: its counts are short of it, or the
    /// order's hold ended there unsold (nothing written; a rebuild settles it).
    OutOfStep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revert {
    Held,
    Expired,
    NotConfirming,
    Unknown,
}

/// A drop's state in Redis' meta hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropState {
    pub status: String,
    pub recovering: bool,
    /// The redis-server run the drop was loaded or rebuilt in (lua/lib.lua `server_run_id`).
    pub run_id: String,
    /// A rebuild or load at work: its token and how many slices it has done so far.
    pub rebuild: Option<(String, i64)>,
}

/// Live counts of one bucket. `held` includes confirming.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub total: i64,
    pub available: i64,
    pub held: i64,
    pub sold: i64,
}

pub(crate) struct Scripts {
    /// lua/reserve.lua as a script too: never called by the engine, but loaded, so `redis-benchmark`
    /// can measure `EVALSHA` of it against `FCALL` of `reserve_fn` (`booking-api bench-args`).
    reserve: Script,
    /// lua/reserve.lua as the engine calls it: a Redis Function (scripts/function.rs says why).
    reserve_fn: Function,
    release: Script,
    expire: Script,
    confirm_begin: Script,
    confirm_finish: Script,
    confirm_revert: Script,
    load_drop: Script,
    rebuild: Script,
    rebuild_fill: Script,
    rebuild_sort: Script,
    rebuild_keep: Script,
    rebuild_finish: Script,
    archive: Script,
    pub(crate) join: Script,
    pub(crate) admit: Script,
    pub(crate) line_restore: Script,
    drop_state: Script,
    restock: Script,
    refund: Script,
}

impl Scripts {
    /// Every script with `clock` as its time prelude; `source(name, file's text)` may hand back
    /// another body (only the model test does, to load a deliberately broken script).
    fn new(clock: &str, source: impl Fn(&str, &'static str) -> String) -> Scripts {
        let reserve = SOURCES.iter().find(|(name, _, _)| *name == "reserve");
        let reserve_fn = Function::new(
            clock,
            LIB_FOR_FUNCTIONS,
            &source("reserve", reserve.map_or("", |(_, body, _)| body)),
        );
        let mut built = SOURCES.iter().map(|(name, body, with_lib)| {
            let body = source(name, body);
            let lib = if *with_lib { LIB } else { "" };
            Script::from_lua(format!("{clock}\n{lib}\n{body}"))
        });
        // SOURCES has exactly these nineteen, in this order.
        let mut next = || built.next().expect("one script per SOURCES entry");
        Scripts {
            reserve: next(),
            reserve_fn,
            release: next(),
            expire: next(),
            confirm_begin: next(),
            confirm_finish: next(),
            confirm_revert: next(),
            load_drop: next(),
            rebuild: next(),
            rebuild_fill: next(),
            rebuild_sort: next(),
            rebuild_keep: next(),
            rebuild_finish: next(),
            archive: next(),
            join: next(),
            admit: next(),
            line_restore: next(),
            drop_state: next(),
            restock: next(),
            refund: next(),
        }
    }

    fn all(&self) -> [&Script; 19] {
        [
            &self.reserve,
            &self.release,
            &self.expire,
            &self.confirm_begin,
            &self.confirm_finish,
            &self.confirm_revert,
            &self.load_drop,
            &self.rebuild,
            &self.rebuild_fill,
            &self.rebuild_sort,
            &self.rebuild_keep,
            &self.rebuild_finish,
            &self.archive,
            &self.join,
            &self.admit,
            &self.line_restore,
            &self.drop_state,
            &self.restock,
            &self.refund,
        ]
    }
}

/// What the model test (engine/tests/model/) loads instead of the production scripts: its own
/// clock prelude (time it moves by hand) and, optionally, replaced script bodies. Only in builds
/// with the `testing` feature, which only test builds turn on.
#[cfg(feature = "testing")]
pub struct TestScripts {
    /// Lua that defines `local function now_ms()`, in place of lua/clock.lua.
    pub clock: String,
    /// (script name as in `lua/`, body without preludes) to load instead of the file.
    pub replace: Vec<(String, String)>,
}

/// The Redis side of Floodgate: a bounded connection pool and the scripts.
#[derive(Clone)]
pub struct Redis {
    pool: Pool,
    /// On a Redis Cluster, a pool per primary that a drop's commands go to (scripts/shards.rs
    /// says why); `None` on one Redis.
    shards: Option<Arc<shards::Shards>>,
    pub(crate) scripts: Arc<Scripts>,
    /// Seats per HSCAN step reading a seat map (`seats.map_scan_chunk`).
    seat_scan_chunk: usize,
    seat_read_bytes: usize,
}

pub(crate) type Reply = Vec<Value>;

/// What [`Redis::run`] calls: a script (`EVALSHA`) or reserve's function (`FCALL`).
#[derive(Clone, Copy)]
enum Callable<'a> {
    Script(&'a Script),
    Function(&'a Function),
}

impl Callable<'_> {
    async fn call(
        self,
        client: &Client,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> FredResult<Reply> {
        match self {
            Callable::Script(s) => s.evalsha_with_reload(client, keys, args).await,
            Callable::Function(f) => f.call_with_reload(client, keys, args).await,
        }
    }
}

pub(crate) fn text(v: Option<&Value>) -> String {
    v.and_then(|v| v.as_string()).unwrap_or_default()
}

pub(crate) fn int(v: Option<&Value>) -> i64 {
    v.and_then(|v| v.as_i64()).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(raw: &str) -> Result<T> {
    serde_json::from_str(raw)
        .map_err(|e| Error::internal(format!("undecodable script answer: {e}: {raw}")))
}

impl Redis {
    /// Connects a pool with every buffer and wait bounded (fred's defaults are unbounded).
    pub async fn connect(cfg: &RedisConfig) -> Result<Redis> {
        Self::connect_with(cfg, Scripts::new(CLOCK, |_, body| body.to_owned())).await
    }

    /// [`Redis::connect`] with the model test's clock and script bodies.
    #[cfg(feature = "testing")]
    pub async fn connect_with_test_scripts(cfg: &RedisConfig, test: TestScripts) -> Result<Redis> {
        let scripts = Scripts::new(&test.clock, |name, body| {
            test.replace
                .iter()
                .find(|(n, _)| n == name)
                .map_or_else(|| body.to_owned(), |(_, b)| b.clone())
        });
        Self::connect_with(cfg, scripts).await
    }

    async fn connect_with(cfg: &RedisConfig, scripts: Scripts) -> Result<Redis> {
        let config =
            Config::from_url(&cfg.url).map_err(|e| Error::invalid(format!("redis.url: {e}")))?;
        let policy = reconnect_policy(cfg);
        if config.server.is_clustered() {
            return Self::connect_cluster(config, cfg, policy, scripts).await;
        }
        // One Redis: it answers at start or the process doesn't start.
        let pool = builder(config, cfg, policy)
            .build_pool(cfg.pool_size.max(1))
            .map_err(|e| Error::invalid(format!("redis: {e}")))?;
        pool.init()
            .await
            .map_err(|e| Error::unavailable("Redis", e))?;
        for s in scripts.all() {
            s.load(pool.next()).await?;
        }
        scripts.reserve_fn.load(pool.next()).await?;
        Ok(Self::with_pools(pool, None, scripts))
    }

    /// A Redis Cluster: starts with whatever primaries answer (docs/OPERATIONS.md, "Starting
    /// during a failover"). The slot map comes from the first seed node that answers (none: the
    /// start fails, as with one Redis down); a pool per primary connects, and one that doesn't
    /// answer within `command_timeout_ms` keeps trying in the background
    /// (`redis.connect_retry_ms` doubling up to `redis.connect_retry_max_ms`) while its drops
    /// answer 503 `unavailable`. fred's cluster pool likewise connects in the background: it
    /// needs every primary the map names (scripts/shards.rs says why), so with one down it waits
    /// for the failover. Scripts and reserve's function are loaded on every primary that
    /// answered; the others load them on their first call (`NOSCRIPT`, "Function not found").
    async fn connect_cluster(
        mut config: Config,
        cfg: &RedisConfig,
        policy: ReconnectPolicy,
        scripts: Scripts,
    ) -> Result<Redis> {
        // Reconnect, rather than give up, when the first connect fails: that is what lets a
        // pool wait for a dead primary's replica (fred's `fail_fast` only governs the first).
        config.fail_fast = false;
        let routing = shards::discover(&config, cfg).await?;
        let pool = builder(config.clone(), cfg, policy.clone())
            .build_pool(cfg.pool_size.max(1))
            .map_err(|e| Error::invalid(format!("redis: {e}")))?;
        let deadline = std::time::Instant::now() + Duration::from_millis(cfg.command_timeout_ms);
        // Its connection tasks run detached; `quit` ends them.
        std::mem::drop(pool.connect_pool());
        let shards = shards::Shards::connect(config, cfg, policy, routing).await?;
        if !shards::connected_by(pool.clients(), deadline).await {
            tracing::warn!(
                "the Redis Cluster client is not connected yet (it needs every primary); it \
                 keeps trying, and the waiting room's reads, leases and /readyz wait for it"
            );
        }
        for (server, client) in shards.primaries() {
            if !client.is_connected() {
                tracing::warn!(
                    %server,
                    "Redis Cluster primary not reachable at start; its drops answer 503 until it \
                     (or its replica) answers, and it loads the scripts on its first call"
                );
                continue;
            }
            let mut loaded = scripts.reserve_fn.load(&client).await;
            for s in scripts.all() {
                if loaded.is_err() {
                    break;
                }
                loaded = s.load(&client).await;
            }
            if let Err(e) = loaded {
                tracing::warn!(
                    %server,
                    error = %e,
                    "scripts not loaded on this primary at start; it loads each on its first call"
                );
            }
        }
        Ok(Self::with_pools(pool, Some(Arc::new(shards)), scripts))
    }

    fn with_pools(pool: Pool, shards: Option<Arc<shards::Shards>>, scripts: Scripts) -> Redis {
        Redis {
            pool,
            shards,
            scripts: Arc::new(scripts),
            seat_scan_chunk: crate::config::DEFAULT_SEAT_MAP_SCAN_CHUNK,
            seat_read_bytes: crate::config::DEFAULT_SEAT_MAP_READ_BYTES,
        }
    }

    /// This client reading seat maps in HSCAN steps of `chunk` seats and GETRANGE steps of
    /// `bytes` (a new client uses `DEFAULT_SEAT_MAP_SCAN_CHUNK` and `DEFAULT_SEAT_MAP_READ_BYTES`).
    pub fn with_seat_map_steps(mut self, chunk: usize, bytes: usize) -> Redis {
        self.seat_scan_chunk = chunk.max(1);
        self.seat_read_bytes = bytes.max(1);
        self
    }

    pub async fn quit(&self) {
        if let Some(shards) = &self.shards {
            shards.quit().await;
        }
        let _ = self.pool.quit().await;
    }

    pub(crate) fn client(&self) -> &Client {
        self.pool.next()
    }

    /// A client for commands on `key`: on a Redis Cluster, of the pool of the primary serving
    /// its slot (as last read; the cluster client if none does); on one Redis, [`Redis::client`].
    pub(crate) fn at(&self, key: &str) -> Client {
        self.shards
            .as_ref()
            .and_then(|s| s.client(fred::util::redis_keyslot(key.as_bytes())))
            .unwrap_or_else(|| self.pool.next().clone())
    }

    pub(crate) async fn run(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Reply> {
        self.call(Callable::Script(script), keys, args).await
    }

    /// A script or function call on the drop's node (the first key's), reloading it there if the
    /// node has lost it.
    async fn call(
        &self,
        script: Callable<'_>,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Reply> {
        let Some(shards) = &self.shards else {
            return Ok(script.call(self.client(), keys, args).await?);
        };
        let key = keys.first().cloned().unwrap_or_default();
        let mut redirections = 0;
        loop {
            let client = self.at(&key);
            match script.call(&client, keys.clone(), args.clone()).await {
                Ok(reply) => return Ok(reply),
                Err(e) => {
                    // A failed or demoted primary, a slot moved: the map may be stale.
                    let moved = e.details().starts_with("MOVED");
                    if moved
                        || matches!(
                            e.kind(),
                            fred::error::ErrorKind::IO
                                | fred::error::ErrorKind::Timeout
                                | fred::error::ErrorKind::Canceled
                                | fred::error::ErrorKind::Cluster
                        )
                    {
                        shards.refresh().await;
                    }
                    if !moved || redirections >= MAX_CLUSTER_REDIRECTIONS {
                        return Err(e.into());
                    }
                    redirections += 1;
                }
            }
        }
    }

    /// The SHA-1 of the reserve script as loaded, and its key set, for `redis-benchmark`.
    pub fn reserve_sha(&self) -> String {
        self.scripts.reserve.sha1().to_string()
    }

    /// The name of the reserve function, for `redis-benchmark` (`FCALL`).
    pub fn reserve_function(&self) -> String {
        self.scripts.reserve_fn.name().to_owned()
    }

    pub fn bench_keys(drop: &DropId, idem: &str) -> Vec<String> {
        let mut keys = DropKeys::new(drop).all();
        keys.push(idem.to_owned());
        keys
    }

    /// Redis' identity for this run of its process; changes when Redis restarts. On a cluster,
    /// of whichever node the client reaches: a drop's own node answers
    /// [`Redis::drop_state_and_server_run`].
    pub async fn run_id(&self) -> Result<String> {
        let info: String = self
            .client()
            .info(Some(fred::types::InfoKind::Server))
            .await?;
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap_or_default()
            .trim()
            .to_owned())
    }

    /// Redis answers (readiness). On a Redis Cluster, every slot has a primary whose pool is
    /// connected, and the cluster client answers too (it needs every primary): a shard without a
    /// reachable primary — down at start, or failing over — is not ready. A slot map that names
    /// an unreachable primary is read again first, so a promoted replica is found without a
    /// drop's request.
    pub async fn ping(&self) -> Result<()> {
        if let Some(shards) = &self.shards {
            if shards.unserved().is_some() {
                shards.refresh().await;
            }
            if let Some(why) = shards.unserved() {
                return Err(Error::unavailable("Redis", why));
            }
        }
        let _: String = self.client().ping(None).await?;
        Ok(())
    }

    // ---- scripts ------------------------------------------------------------------------------

    /// Loads a new drop (lua/load_drop.lua), its inventory in slices of at most `slice` entries
    /// per script call; false (and nothing written) if the drop is already in Redis. Until the
    /// last slice the drop answers `recovering`; a load that stops halfway is finished by the
    /// watcher's rebuild.
    pub async fn load_drop(
        &self,
        drop: &DropId,
        image: &DropImage,
        slice: usize,
    ) -> Result<(bool, RebuildReport)> {
        let mut run = SlicedRun::new(self, drop, slice);
        let reply = self
            .run(
                &self.scripts.load_drop,
                DropKeys::new(drop).all(),
                vec![run.token.clone(), image.meta.to_string()],
            )
            .await?;
        run.counted(0);
        if text(reply.get(1)) != "loaded" {
            return Ok((false, run.report));
        }
        run.fill_all(image).await?;
        run.finish().await?;
        Ok((true, run.report))
    }

    /// Starts rebuilding a drop from what Postgres says it is (lua/rebuild.lua describes the
    /// steps), in script calls of at most `slice` entries each: meta, stock, layout, seats and
    /// per-fan units. The caller then feeds it the drop's holds a slice at a time
    /// ([`Rebuild::next_holds`], [`Rebuild::sort`]) and ends it ([`Rebuild::finish`]). The drop
    /// answers `recovering` until then. Any step fails with `recovering` if another rebuild of
    /// the drop began meanwhile.
    pub async fn begin_rebuild(
        &self,
        drop: &DropId,
        image: &DropImage,
        slice: usize,
    ) -> Result<Rebuild<'_>> {
        let mut run = SlicedRun::new(self, drop, slice);
        run.call(
            &self.scripts.rebuild,
            vec![run.token.clone(), image.meta.to_string()],
        )
        .await?;
        run.counted(0);
        run.fill_all(image).await?;
        Ok(Rebuild {
            run,
            holds: DropKeys::new(drop),
            cursor: Some("0".to_owned()),
            found: Vec::new(),
        })
    }

    /// Removes an archived drop's keys (lua/archive.lua); `Err(reason)` if the drop isn't ready
    /// to leave Redis (`open`, `live_holds`, `rebuilding`).
    pub async fn archive(&self, drop: &DropId) -> Result<std::result::Result<i64, String>> {
        let reply = self
            .run(&self.scripts.archive, DropKeys::every(drop), vec![])
            .await?;
        Ok(match text(reply.first()).as_str() {
            "ok" => Ok(int(reply.get(1))),
            _ => Err(text(reply.get(1))),
        })
    }

    /// Which of the drop's keys (lua/archive.lua's) Redis still has.
    pub async fn present_keys(&self, drop: &DropId) -> Result<Vec<String>> {
        let mut present = Vec::new();
        for key in DropKeys::every(drop) {
            let n: i64 = self.at(&key).exists(key.as_str()).await?;
            if n > 0 {
                present.push(key);
            }
        }
        Ok(present)
    }

    /// One HSCAN step over a drop's holds: the next cursor ("0" when the walk is done) and the
    /// hold ids it returned (about `count`; Redis may return more, or a small hash whole). The
    /// stored answers beside them (`i:` fields, lua/lib.lua) are left out: they are no holds.
    async fn hscan_fields(
        &self,
        keys: &DropKeys,
        cursor: &str,
        count: usize,
    ) -> Result<(String, Vec<String>)> {
        let (next, pairs) = self.hscan_step(keys.holds(), cursor, count).await?;
        let fields = pairs
            .iter()
            .step_by(2)
            .map(|v| text(Some(v)))
            .filter(|field| !field.starts_with(DropKeys::ANSWER_PREFIX))
            .collect();
        Ok((next, fields))
    }

    /// One `HSCAN key cursor COUNT count`: the next cursor ("0" or empty when the walk is done)
    /// and the step's field, value, field, value, ... (about `count` fields; Redis may return
    /// more, or a small hash whole).
    async fn hscan_step(
        &self,
        key: &str,
        cursor: &str,
        count: usize,
    ) -> Result<(String, Vec<Value>)> {
        let reply: Value = self
            .client()
            .custom(
                fred::types::CustomCommand::new_static(
                    "HSCAN",
                    fred::types::ClusterHash::FirstKey,
                    false,
                ),
                vec![
                    key.to_owned(),
                    cursor.to_owned(),
                    "COUNT".to_owned(),
                    count.to_string(),
                ],
            )
            .await?;
        let mut parts = reply.into_array().into_iter();
        let next = text(parts.next().as_ref());
        let pairs = parts.next().map(Value::into_array).unwrap_or_default();
        Ok((next, pairs))
    }

    // One argument per thing lua/reserve.lua's header lists: a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub async fn reserve(
        &self,
        drop: &DropId,
        fan: &FanId,
        idempotency_key: &str,
        body_sha256: &str,
        hold_id: &HoldId,
        session: Option<SessionEnds>,
        args: ReserveArgs<'_>,
    ) -> Result<(Reserved, bool)> {
        let mut keys = DropKeys::new(drop).all();
        keys.push(DropKeys::idem(drop, fan, idempotency_key));
        let mut argv = vec![fan.to_string(), hold_id.to_string(), body_sha256.to_owned()];
        argv.push(args.kind().into());
        let (shop_end, hard_end) = session.map_or((String::new(), String::new()), |s| {
            (s.shop_end_ms.to_string(), s.hard_end_ms.to_string())
        });
        argv.push(shop_end);
        argv.push(hard_end);
        match args {
            ReserveArgs::Items(items) => {
                for (sku, q) in items {
                    argv.push(sku.clone());
                    argv.push(q.to_string());
                }
            }
            ReserveArgs::Seats(seats) => {
                for (section, seat) in seats {
                    argv.push(section.clone());
                    argv.push(seat.clone());
                }
            }
            ReserveArgs::Best {
                section,
                quantity,
                scan_seats_max,
            } => {
                argv.push(section.to_owned());
                argv.push(quantity.to_string());
                argv.push(scan_seats_max.to_string());
            }
        }
        let reply = self
            .call(Callable::Function(&self.scripts.reserve_fn), keys, argv)
            .await?;
        match text(reply.first()).as_str() {
            "replay" => {
                let first: Vec<serde_json::Value> = decode(&text(reply.get(1)))?;
                let now_ms = int(reply.get(2));
                Ok((reserved_from_json(&first, now_ms)?, true))
            }
            _ => Ok((reserved_from_reply(&reply)?, false)),
        }
    }

    pub async fn release(&self, hold: &HoldId, fan: &FanId) -> Result<()> {
        let reply = self
            .run(
                &self.scripts.release,
                DropKeys::new(&hold.drop_id()).all(),
                vec![hold.to_string(), fan.to_string()],
            )
            .await?;
        match (text(reply.first()).as_str(), text(reply.get(1)).as_str()) {
            ("ok", _) => Ok(()),
            (_, code) => Err(script_error(code)),
        }
    }

    /// Raises a SKU's total (and available with it) to `total`, Postgres' total after a restock
    /// (lua/restock.lua); returns Redis' (total, available) after. Idempotent: a total Redis has
    /// reached already changes nothing.
    pub async fn restock(&self, drop: &DropId, bucket: &str, total: i64) -> Result<(i64, i64)> {
        let reply = self
            .run(
                &self.scripts.restock,
                DropKeys::new(drop).all(),
                vec![bucket.to_owned(), total.to_string()],
            )
            .await?;
        match (text(reply.first()).as_str(), text(reply.get(1)).as_str()) {
            ("ok", _) => Ok((int(reply.get(1)), int(reply.get(2)))),
            (_, "recovering") => Err(recovering_error()),
            (_, code) => Err(script_error(code)),
        }
    }

    /// Returns a recorded refund's units or seats to the drop's stock (lua/refund.lua), once per
    /// `marker` (`"<order id>|<refund id>"`); `items` as the refunds row has them.
    pub async fn refund(
        &self,
        drop: &DropId,
        marker: &str,
        hold: &str,
        fan: &str,
        items: &[HoldItem],
    ) -> Result<RefundReturn> {
        let items = serde_json::to_string(items).map_err(Error::internal)?;
        let reply = self
            .run(
                &self.scripts.refund,
                DropKeys::refund(drop),
                vec![marker.to_owned(), hold.to_owned(), fan.to_owned(), items],
            )
            .await?;
        match (text(reply.first()).as_str(), text(reply.get(1)).as_str()) {
            ("ok", "returned") => Ok(RefundReturn::Returned {
                closed: text(reply.get(2)) == "closed",
            }),
            ("ok", _) => Ok(RefundReturn::Already),
            (_, "hold_not_sold") => Ok(RefundReturn::HoldNotSold),
            (_, "out_of_step") => Ok(RefundReturn::OutOfStep),
            (_, "recovering") => Err(recovering_error()),
            (_, code) => Err(script_error(code)),
        }
    }

    /// Expires up to `limit` held holds past their deadline and purges up to `limit` ended ones
    /// (lua/expire.lua); returns (expired, 1 if more of either are due than that budget reached,
    /// else 0).
    pub async fn expire(&self, drop: &DropId, limit: u32) -> Result<(i64, i64)> {
        let reply = self
            .run(
                &self.scripts.expire,
                DropKeys::new(drop).all(),
                vec![limit.to_string()],
            )
            .await?;
        Ok((int(reply.first()), int(reply.get(1))))
    }

    pub async fn confirm_begin(
        &self,
        hold: &HoldId,
        fan: &FanId,
        reference: &str,
    ) -> Result<ConfirmBegin> {
        let reply = self
            .run(
                &self.scripts.confirm_begin,
                DropKeys::new(&hold.drop_id()).all(),
                vec![hold.to_string(), fan.to_string(), reference.to_owned()],
            )
            .await?;
        match text(reply.first()).as_str() {
            "ok" => Ok(ConfirmBegin::Began(decode(&text(reply.get(1)))?)),
            "in_progress" => Ok(ConfirmBegin::InProgress(decode(&text(reply.get(1)))?)),
            "sold" => Ok(ConfirmBegin::Sold(OrderId::parse(&text(reply.get(1))).ok())),
            _ => Err(script_error(&text(reply.get(1)))),
        }
    }

    pub async fn confirm_finish(&self, hold: &HoldId, order: OrderId) -> Result<Finish> {
        let reply = self
            .run(
                &self.scripts.confirm_finish,
                DropKeys::new(&hold.drop_id()).all(),
                vec![hold.to_string(), order.to_string()],
            )
            .await?;
        Ok(
            match (text(reply.first()).as_str(), text(reply.get(1)).as_str()) {
                ("ok", "sold") => Finish::Sold,
                ("ok", _) => Finish::Already,
                (_, "hold_ended") => Finish::Ended,
                (_, "recovering") => return Err(recovering_error()),
                _ => Finish::Unknown,
            },
        )
    }

    /// Reverts the attempt made under `reference`; a newer attempt is left alone.
    pub async fn confirm_revert(&self, hold: &HoldId, reference: &str) -> Result<Revert> {
        let reply = self
            .run(
                &self.scripts.confirm_revert,
                DropKeys::new(&hold.drop_id()).all(),
                vec![hold.to_string(), reference.to_owned()],
            )
            .await?;
        Ok(
            match (text(reply.first()).as_str(), text(reply.get(1)).as_str()) {
                ("ok", "held") => Revert::Held,
                ("ok", "expired") => Revert::Expired,
                ("ok", _) => Revert::NotConfirming,
                (_, "recovering") => return Err(recovering_error()),
                _ => Revert::Unknown,
            },
        )
    }

    // ---- reads and small writes outside stock ------------------------------------------------

    pub async fn hold(&self, hold: &HoldId) -> Result<Option<HoldRecord>> {
        let keys = DropKeys::new(&hold.drop_id());
        let raw: Option<String> = self
            .at(keys.holds())
            .hget(keys.holds(), hold.as_str())
            .await?;
        raw.map(|r| decode(&r)).transpose()
    }

    /// A fan's live (held or confirming) holds in one drop.
    pub async fn fan_live_holds(
        &self,
        drop: &DropId,
        fan: &FanId,
    ) -> Result<Vec<(HoldId, HoldRecord)>> {
        let keys = DropKeys::new(drop);
        // The fans hash's "h|<fan>" field: the hold ids, joined by "," (lua/lib.lua).
        let listed: Option<String> = self
            .at(keys.fans())
            .hget(keys.fans(), format!("h|{fan}"))
            .await?;
        let ids: Vec<&str> = listed
            .as_deref()
            .map(|l| l.split(',').collect())
            .unwrap_or_default();
        let mut out = Vec::new();
        for id in ids {
            let Ok(hold) = HoldId::parse(id) else {
                continue;
            };
            // A list may name a hold an older release ended (lua/lib.lua): live ones only.
            if let Some(rec) = self.hold(&hold).await? {
                if matches!(rec.st, HoldState::Held | HoldState::Confirming) {
                    out.push((hold, rec));
                }
            }
        }
        Ok(out)
    }

    /// The drop's status, whether it is recovering, and the Redis run it was loaded or rebuilt
    /// in; `None` if the drop isn't in Redis at all.
    pub async fn drop_state(&self, drop: &DropId) -> Result<Option<DropState>> {
        let keys = DropKeys::new(drop);
        let vals: Vec<Option<String>> = self
            .at(keys.meta())
            .hmget(
                keys.meta(),
                vec![
                    "status",
                    "recovering",
                    "run_id",
                    "rebuild_token",
                    "rebuild_slices",
                ],
            )
            .await?;
        match vals.as_slice() {
            [Some(status), recovering, run_id, token, slices] => Ok(Some(DropState {
                status: status.clone(),
                recovering: recovering.as_deref() == Some("1"),
                run_id: run_id.clone().unwrap_or_default(),
                rebuild: token.clone().map(|t| {
                    let n = slices.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0);
                    (t, n)
                }),
            })),
            _ => Ok(None),
        }
    }

    /// [`Redis::drop_state`] and, beside it, the run id of the redis-server holding the drop now
    /// (lua/drop_state.lua: one script, so both come from the node that owns the drop's slot —
    /// on a Redis Cluster, the primary of its shard). The restart watcher compares the two: a
    /// server run other than the stamped one restarted or failed over since, and may have lost
    /// the drop's last writes. (The server's `INFO` costs the script more than the read: request
    /// paths use [`Redis::drop_state`].)
    pub async fn drop_state_and_server_run(
        &self,
        drop: &DropId,
    ) -> Result<Option<(DropState, String)>> {
        let reply = self
            .run(
                &self.scripts.drop_state,
                vec![DropKeys::new(drop).meta().to_owned()],
                vec![],
            )
            .await?;
        let field = |i: usize| reply.get(i).and_then(|v| v.as_string());
        let Some(status) = field(0) else {
            return Ok(None);
        };
        let state = DropState {
            status,
            recovering: field(1).as_deref() == Some("1"),
            run_id: field(2).unwrap_or_default(),
            rebuild: field(3).map(|t| {
                let n = field(4).and_then(|s| s.parse().ok()).unwrap_or(0);
                (t, n)
            }),
        };
        Ok(Some((state, field(5).unwrap_or_default())))
    }

    /// The servers that keep an append-only file of their own: every primary of a Redis Cluster
    /// (the client connects to each, and to no replica), or the one server.
    pub fn aof_nodes(&self) -> Vec<RedisNode> {
        let client = self.client();
        if !client.is_clustered() {
            return vec![RedisNode(None)];
        }
        let mut primaries = client.active_connections();
        primaries.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
        primaries.into_iter().map(|s| RedisNode(Some(s))).collect()
    }

    /// What the AOF rewrite policy reads (engine::aof), from one node's `INFO`.
    pub async fn aof_state(&self, node: &RedisNode) -> Result<crate::aof::AofState> {
        let cmd = fred::types::CustomCommand::new_static("INFO", None, false);
        let args = vec!["persistence".to_owned(), "stats".to_owned()];
        let info: String = match &node.0 {
            Some(server) => {
                self.client()
                    .with_cluster_node(server.clone())
                    .custom(cmd, args)
                    .await?
            }
            None => self.client().custom(cmd, args).await?,
        };
        Ok(crate::aof::AofState::parse(&info))
    }

    /// Asks one node to rewrite its AOF in the background (`BGREWRITEAOF`).
    pub async fn rewrite_aof(&self, node: &RedisNode) -> Result<()> {
        let cmd = fred::types::CustomCommand::new_static("BGREWRITEAOF", None, false);
        let _: Value = match &node.0 {
            Some(server) => {
                self.client()
                    .with_cluster_node(server.clone())
                    .custom(cmd, Vec::<String>::new())
                    .await?
            }
            None => self.client().custom(cmd, Vec::<String>::new()).await?,
        };
        Ok(())
    }

    /// Removes a drop's seat map string, as a drop loaded by a release before it existed has
    /// none: tests of the map read from the seats hash instead.
    #[cfg(feature = "testing")]
    pub async fn test_forget_seat_map(&self, drop: &DropId) -> Result<()> {
        let _: i64 = self.client().del(DropKeys::new(drop).seatmap()).await?;
        Ok(())
    }

    pub async fn set_meta(&self, drop: &DropId, field: &str, value: &str) -> Result<()> {
        let _: i64 = self
            .client()
            .hset(DropKeys::new(drop).meta(), (field, value))
            .await?;
        Ok(())
    }

    /// Live counts per bucket, from one HGETALL.
    pub async fn counts(&self, drop: &DropId) -> Result<HashMap<String, Counts>> {
        let stock = DropKeys::new(drop).stock().to_owned();
        let raw: HashMap<String, i64> = self.at(&stock).hgetall(&stock).await?;
        let mut out: HashMap<String, Counts> = HashMap::new();
        for (field, v) in raw {
            let Some((kind, bucket)) = field.split_once(':') else {
                continue;
            };
            let c = out.entry(bucket.to_owned()).or_insert(Counts {
                total: 0,
                available: 0,
                held: 0,
                sold: 0,
            });
            match kind {
                "a" => c.available = v,
                "h" => c.held = v,
                "s" => c.sold = v,
                "t" => c.total = v,
                _ => {}
            }
        }
        Ok(out)
    }

    /// The drop's seat map string (lua/lib.lua `KEYS[12]`, a byte per seat in the map's
    /// order), its first `seats` bytes, in GETRANGE steps of `seats.map_read_bytes`: each step a
    /// copy, however the seats are held. `None` when the drop has no such string (loaded by a
    /// release before it existed: [`Redis::visit_seat_states`] reads the seats hash instead).
    pub async fn seat_map_string(&self, drop: &DropId, seats: usize) -> Result<Option<Vec<u8>>> {
        let key = DropKeys::new(drop).seatmap().to_owned();
        let mut out: Vec<u8> = Vec::with_capacity(seats);
        while out.len() < seats {
            let step = self.seat_read_bytes.min(seats - out.len());
            let part: Vec<u8> = self
                .client()
                .getrange(&key, out.len(), out.len() + step - 1)
                .await?;
            let short = part.len() < step;
            out.extend_from_slice(&part);
            // A string shorter than the map ends the read: seats past its end were never shown.
            if short {
                break;
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }

    /// Every seat's state (seat → `-`, `#` or the holding hold id), read in HSCAN steps of
    /// `seats.map_scan_chunk` fields: one HGETALL of a 100,000-seat map would hold Redis for tens
    /// of milliseconds, and every other drop on the node with it. Not one instant's picture (a
    /// seat may change between steps), which a seat map shown to fans doesn't need.
    /// Hands it each step's seats as the step arrives, so the caller's work is spread over
    /// the steps too.
    pub async fn visit_seat_states(
        &self,
        drop: &DropId,
        mut visit: impl FnMut(&str, &str),
    ) -> Result<()> {
        let key = DropKeys::new(drop).seats().to_owned();
        let mut cursor = "0".to_owned();
        loop {
            let (next, pairs) = self.hscan_step(&key, &cursor, self.seat_scan_chunk).await?;
            cursor = next;
            for pair in pairs.chunks_exact(2) {
                if let (Some(seat), Some(state)) = (pair[0].as_str(), pair[1].as_str()) {
                    visit(&seat, &state);
                }
            }
            if cursor == "0" || cursor.is_empty() {
                return Ok(());
            }
        }
    }

    /// Redis' clock (`TIME`) as the node holding `drop` reads it: the clock every script of the
    /// drop reads, and so the one its deadlines are compared on.
    pub async fn time_ms(&self, drop: &DropId) -> Result<i64> {
        let keys = DropKeys::new(drop);
        let cmd = fred::types::CustomCommand::new_static("TIME", keys.meta(), false);
        let (secs, micros): (i64, i64) = self
            .at(keys.meta())
            .custom(cmd, Vec::<String>::new())
            .await?;
        Ok(secs * 1_000 + micros / 1_000)
    }

    /// Confirming holds whose confirm deadline has passed by `now_ms`, which must be Redis'
    /// clock ([`Redis::time_ms`]): the deadlines were set on it.
    pub async fn overdue_confirming(
        &self,
        drop: &DropId,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<HoldId>> {
        let confirming = DropKeys::new(drop).confirming().to_owned();
        let ids: Vec<String> = self
            .at(&confirming)
            .zrangebyscore(
                &confirming,
                "-inf",
                now_ms as f64,
                false,
                Some((0, limit as i64)),
            )
            .await?;
        Ok(ids.iter().filter_map(|s| HoldId::parse(s).ok()).collect())
    }

    /// On the drop's primary (a cluster client waits for every primary: a drop on a shard that
    /// answers is made and tuned while another shard is down).
    pub async fn set_admission(&self, drop: &DropId, fields: Vec<(String, String)>) -> Result<()> {
        let key = DropKeys::admission(drop);
        let _: i64 = self.at(&key).hset(key, fields).await?;
        Ok(())
    }

    pub async fn admission(&self, drop: &DropId) -> Result<HashMap<String, String>> {
        let key = DropKeys::admission(drop);
        Ok(self.at(&key).hgetall(key).await?)
    }
}

/// One Redis server that commands carrying no key (`INFO`, `BGREWRITEAOF`) are sent to: a
/// cluster's primary, or, without a cluster, the one server (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisNode(Option<fred::types::config::Server>);

impl std::fmt::Display for RedisNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(server) => write!(f, "{}:{}", server.host, server.port),
            None => f.write_str("redis"),
        }
    }
}

/// What Postgres says a drop is, for loading it into Redis or rebuilding it there.
#[derive(Debug, Clone, Default)]
pub struct DropImage {
    /// The drop's meta fields (lua/lib.lua's `KEYS[1]`).
    pub meta: serde_json::Value,
    /// (bucket, total, sold): a SKU or a section.
    pub buckets: Vec<(String, i64, i64)>,
    /// (section, JSON `[[row, seats], ...]`, front row first).
    pub layout: Vec<(String, String)>,
    /// (seat id, sold) for every seat of the map.
    pub seats: Vec<(String, bool)>,
    /// (fan, units bought).
    pub bought: Vec<(String, i64)>,
    /// Every refund Postgres recorded, `"<order id>|<refund id>"`: counted as returned (a
    /// rebuild's sold counts no longer have their units), so their markers go in with it.
    pub refunds: Vec<String>,
}

/// What a sliced rebuild (or load) did: live holds kept and holds ended, and its script calls
/// with the most entries one of them handled, as the scripts themselves counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub kept: i64,
    pub ended: i64,
    pub calls: u64,
    pub max_entries_per_call: u64,
}

/// A rebuild in progress ([`Redis::begin_rebuild`]).
pub struct Rebuild<'a> {
    run: SlicedRun<'a>,
    holds: DropKeys,
    /// The HSCAN cursor of the walk over the holds hash; `None` once it is done.
    cursor: Option<String>,
    /// Hold ids the last HSCAN returned beyond a slice, for the next ones.
    found: Vec<String>,
}

impl Rebuild<'_> {
    /// What this rebuild did so far.
    pub fn report(&self) -> RebuildReport {
        self.run.report
    }

    /// The next slice (at most `slice`) of the drop's hold ids, from a walk of its holds hash
    /// with HSCAN (never HKEYS: one call over 300,000 fields blocks Redis); `None` once every
    /// hold was returned. The drop is frozen meanwhile (lua/lib.lua `recovering`), so the walk
    /// sees every hold; one returned twice is sorted the same twice.
    pub async fn next_holds(&mut self) -> Result<Option<Vec<String>>> {
        while self.found.is_empty() {
            let Some(cursor) = self.cursor.take() else {
                return Ok(None);
            };
            let (next, ids) = self
                .run
                .redis
                .hscan_fields(&self.holds, &cursor, self.run.slice)
                .await?;
            self.found = ids;
            self.cursor = (next != "0").then_some(next);
        }
        let rest = self.found.split_off(self.found.len().min(self.run.slice));
        Ok(Some(std::mem::replace(&mut self.found, rest)))
    }

    /// Sorts a slice of holds (lua/rebuild_sort.lua); `orders` maps those with an order in
    /// Postgres to its id.
    pub async fn sort(&mut self, ids: &[String], orders: &HashMap<String, String>) -> Result<()> {
        for ids in ids.chunks(self.run.slice) {
            let mut argv = vec![self.run.token.clone()];
            for id in ids {
                argv.push(id.clone());
                argv.push(orders.get(id).cloned().unwrap_or_default());
            }
            let reply = self
                .run
                .call(&self.run.redis.scripts.rebuild_sort, argv)
                .await?;
            self.run.counted(int(reply.get(1)));
            self.run.report.ended += int(reply.get(2));
        }
        Ok(())
    }

    /// Keeps or ends the live holds, oldest first, a slice at a time (lua/rebuild_keep.lua),
    /// then takes the drop out of `recovering` (lua/rebuild_finish.lua).
    pub async fn finish(mut self) -> Result<RebuildReport> {
        loop {
            let argv = vec![self.run.token.clone(), self.run.slice.to_string()];
            let reply = self
                .run
                .call(&self.run.redis.scripts.rebuild_keep, argv)
                .await?;
            self.run.counted(int(reply.get(1)));
            self.run.report.kept += int(reply.get(2));
            self.run.report.ended += int(reply.get(3));
            if int(reply.get(4)) == 0 {
                break;
            }
        }
        self.run.finish().await?;
        Ok(self.run.report)
    }
}

/// One rebuild or load in progress: its token, its slice and what it did so far.
struct SlicedRun<'a> {
    redis: &'a Redis,
    drop: DropId,
    keys: Vec<String>,
    token: String,
    slice: usize,
    report: RebuildReport,
}

impl<'a> SlicedRun<'a> {
    fn new(redis: &'a Redis, drop: &DropId, slice: usize) -> SlicedRun<'a> {
        SlicedRun {
            redis,
            drop: drop.clone(),
            keys: DropKeys::rebuild(drop),
            token: hex::encode(rand::random::<[u8; 16]>()),
            slice: slice.max(1),
            report: RebuildReport::default(),
        }
    }

    /// A script call of this run; `superseded` (another rebuild began since) fails it.
    async fn call(&self, script: &Script, argv: Vec<String>) -> Result<Reply> {
        self.call_with(script, self.keys.clone(), argv).await
    }

    /// [`SlicedRun::call`] with other keys of the drop.
    async fn call_with(
        &self,
        script: &Script,
        keys: Vec<String>,
        argv: Vec<String>,
    ) -> Result<Reply> {
        let reply = self.redis.run(script, keys, argv).await?;
        if text(reply.first()) == "err" {
            let why = text(reply.get(1));
            return Err(Error::msg(
                Code::Recovering,
                format!(
                    "The drop's rebuild stopped ({why}): another one took over; retry shortly."
                ),
            )
            .retry_after(Duration::from_secs(1)));
        }
        Ok(reply)
    }

    /// Counts one script call that handled `entries` entries.
    fn counted(&mut self, entries: i64) {
        self.report.calls += 1;
        self.report.max_entries_per_call = self.report.max_entries_per_call.max(entries as u64);
    }

    /// Writes `entries` (each a run of strings) into what `what` names, a slice at a time.
    async fn fill(&mut self, what: &str, entries: Vec<Vec<String>>) -> Result<()> {
        for chunk in entries.chunks(self.slice) {
            let mut argv = vec![self.token.clone(), what.to_owned()];
            argv.extend(chunk.iter().flatten().cloned());
            let reply = self.call(&self.redis.scripts.rebuild_fill, argv).await?;
            self.counted(int(reply.get(1)));
        }
        Ok(())
    }

    async fn fill_all(&mut self, image: &DropImage) -> Result<()> {
        let stock = image
            .buckets
            .iter()
            .map(|(b, total, sold)| vec![b.clone(), total.to_string(), sold.to_string()])
            .collect();
        self.fill("stock", stock).await?;
        let mut layout: Vec<Vec<String>> = image
            .layout
            .iter()
            .map(|(section, rows)| vec![section.clone(), rows.clone()])
            .collect();
        // Where each row's seat 1 is in the seat map string (lua/lib.lua `show_seat`): rows in
        // the layout's order, which is the drop's (Engine::drop_image), as the map's reader
        // lays them out.
        let mut first = 0u64;
        for (section, rows) in &image.layout {
            let rows: Vec<(String, u64)> = serde_json::from_str(rows)
                .map_err(|e| Error::internal(format!("a drop's layout as JSON: {e}")))?;
            for (row, seats) in rows {
                layout.push(vec![format!("@{section}-{row}"), first.to_string()]);
                first += seats;
            }
        }
        self.fill("layout", layout).await?;
        let seats = image
            .seats
            .iter()
            .map(|(seat, sold)| vec![seat.clone(), if *sold { "#" } else { "-" }.to_owned()])
            .collect();
        self.fill("seats", seats).await?;
        let fans = image
            .bought
            .iter()
            .map(|(fan, units)| vec![fan.clone(), units.to_string()])
            .collect();
        self.fill("fans", fans).await?;
        // The markers live in a key of their own, rebuild_fill.lua's KEYS[14] for them alone.
        let keys = DropKeys::refund(&self.drop);
        for chunk in image.refunds.chunks(self.slice) {
            let mut argv = vec![self.token.clone(), "refunds".to_owned()];
            argv.extend(chunk.iter().cloned());
            let reply = self
                .call_with(&self.redis.scripts.rebuild_fill, keys.clone(), argv)
                .await?;
            self.counted(int(reply.get(1)));
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        let argv = vec![self.token.clone()];
        self.call(&self.redis.scripts.rebuild_finish, argv).await?;
        self.counted(0);
        Ok(())
    }
}

/// A script refused to write to a drop being rebuilt (lua/lib.lua `recovering`).
fn recovering_error() -> Error {
    Error::new(Code::Recovering).retry_after(Duration::from_secs(1))
}

fn script_error(code: &str) -> Error {
    Code::from_name(code)
        .map(Error::new)
        .unwrap_or_else(|| Error::internal(format!("script answered {code}")))
}

fn reserved_from_reply(reply: &Reply) -> Result<Reserved> {
    match text(reply.first()).as_str() {
        "ok" => Ok(Reserved::Held {
            hold_id: HoldId::parse(&text(reply.get(1)))?,
            expires_at_ms: int(reply.get(2)),
            now_ms: int(reply.get(3)),
            items: decode(&text(reply.get(4)))?,
        }),
        _ => refused(&text(reply.get(1)), &text(reply.get(2))),
    }
}

fn reserved_from_json(first: &[serde_json::Value], now_ms: i64) -> Result<Reserved> {
    let s = |i: usize| {
        first
            .get(i)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    match s(0).as_str() {
        "ok" => Ok(Reserved::Held {
            hold_id: HoldId::parse(&s(1))?,
            expires_at_ms: first.get(2).and_then(|v| v.as_i64()).unwrap_or_default(),
            now_ms,
            items: decode(&s(4))?,
        }),
        _ => refused(&s(1), &s(2)),
    }
}

fn refused(code: &str, detail: &str) -> Result<Reserved> {
    let code =
        Code::from_name(code).ok_or_else(|| Error::internal(format!("reserve answered {code}")))?;
    let detail = serde_json::from_str(detail).unwrap_or(serde_json::Value::Null);
    Ok(Reserved::Refused { code, detail })
}

/// How every client reconnects: after `redis.connect_retry_ms`, doubling up to
/// `redis.connect_retry_max_ms`, for as long as it runs.
pub(crate) fn reconnect_policy(cfg: &RedisConfig) -> ReconnectPolicy {
    let ms = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    ReconnectPolicy::new_exponential(
        0,
        ms(cfg.connect_retry_ms),
        ms(cfg.connect_retry_max_ms.max(cfg.connect_retry_ms)),
        2,
    )
}

/// A fred builder for `config` with every buffer and wait bounded (fred's defaults are
/// unbounded): the cluster client and, on a cluster, each primary's pool.
fn builder(config: Config, cfg: &RedisConfig, policy: ReconnectPolicy) -> Builder {
    let mut b = Builder::from_config(config);
    b.with_performance_config(|p| {
        p.default_command_timeout = Duration::from_millis(cfg.command_timeout_ms);
        p.max_feed_count = cfg.max_feed_count;
    })
    .with_connection_config(|c| {
        c.max_command_buffer_len = cfg.max_command_buffer_len;
        c.connection_timeout = Duration::from_millis(cfg.command_timeout_ms);
        c.max_redirections = MAX_CLUSTER_REDIRECTIONS;
    })
    .set_policy(policy);
    b
}
