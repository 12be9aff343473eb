//! The waiting room's engine side (docs/ARCHITECTURE.md, Choices): the line's keys, the
//! pre-queue's commit–reveal score, typed wrappers for lua/join.lua and lua/admit.lua, and the few
//! plain reads queue-server needs (a fan's place, rank and admission deadline), and the admission
//! feed: each admission run published on the drop's sharded channel, so every instance tells its
//! own sockets (docs/ARCHITECTURE.md, "Many instances"). All Redis access of the waiting room is
//! here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::booking::Engine;
use crate::config::RedisConfig;
use crate::db::LineMarks;
use crate::drops::AdmissionMode;
use crate::error::{Code, Error, Result};
use crate::ids::{DropId, FanId};
use crate::scripts::{int, text, Redis};
use crate::tokens::{now_ms, AdmissionClaims};

/// Places after opening are `POST_OPEN_BASE + n`; pre-queue scores are below it.
pub const POST_OPEN_BASE: i64 = 1 << 52;

/// The pre-queue score of a fan: HMAC-SHA256(seed, fan id) cut to its first 52 bits. The seed
/// stays secret until opening (only its SHA-256 is published), then anyone can recompute it.
pub fn prequeue_score(seed: &str, fan: &FanId) -> i64 {
    // HMAC takes keys of any length; this can't fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(seed.as_bytes()).expect("HMAC accepts any key");
    mac.update(fan.as_str().as_bytes());
    let digest = mac.finalize().into_bytes();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 12) as i64
}

pub use crate::keys::QueueKeys;

/// The answer to a waiting-room request on a drop that has none.
pub fn not_queue() -> Error {
    Error::msg(
        Code::InvalidRequest,
        "This drop has no waiting room: fans reserve directly.",
    )
}

/// Where a fan stands, as join and `/queue/me` say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FanStatus {
    Waiting,
    PreQueue,
    Admitted,
    /// Admitted before; the shopping session is over (no second place).
    Done,
    SoldOut,
    Closed,
    /// In the line after a sell-out, the drop's waiting list on: units that come back are
    /// offered in line order.
    Waitlisted,
}

impl FanStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FanStatus::Waiting => "waiting",
            FanStatus::PreQueue => "pre_queue",
            FanStatus::Admitted => "admitted",
            FanStatus::Done => "done",
            FanStatus::SoldOut => "sold_out",
            FanStatus::Closed => "closed",
            FanStatus::Waitlisted => "waitlisted",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Joined {
    /// The fan's place: the line's score (0 when none was made: sold out / closed).
    pub place: i64,
    pub new: bool,
    pub status: FanStatus,
    pub opens_at_ms: i64,
    pub now_ms: i64,
}

/// The line as the admission script left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineState {
    Open,
    Paused,
    PreQueue,
    AllHeld,
    SoldOut,
    /// Sold out with the waiting list on: the line stays, and every admission is an offer.
    Waitlist,
    Closed,
    Recovering,
    UnknownDrop,
}

impl LineState {
    fn parse(s: &str) -> LineState {
        match s {
            "open" => LineState::Open,
            "paused" => LineState::Paused,
            "pre_queue" => LineState::PreQueue,
            "all_held" => LineState::AllHeld,
            "sold_out" => LineState::SoldOut,
            "waitlist" => LineState::Waitlist,
            "closed" => LineState::Closed,
            "recovering" => LineState::Recovering,
            _ => LineState::UnknownDrop,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LineState::Open => "open",
            LineState::Paused => "paused",
            LineState::PreQueue => "pre_queue",
            LineState::AllHeld => "all_held",
            LineState::SoldOut => "sold_out",
            LineState::Waitlist => "waitlist",
            LineState::Closed => "closed",
            LineState::Recovering => "recovering",
            LineState::UnknownDrop => "unknown_drop",
        }
    }
}

/// A shopping session's two ends, fixed at admission (lua/admit.lua) and signed into the fan's
/// admission token: reserves are accepted until `shop_end_ms`; nothing keeps the session (or its
/// `max_active` slot) past `hard_end_ms` = shop end + hold TTL + confirm grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEnds {
    pub shop_end_ms: i64,
    pub hard_end_ms: i64,
}

impl SessionEnds {
    /// The sessions hash's value, `"<shop end ms>:<hard end ms>"`.
    fn parse(v: &str) -> Option<SessionEnds> {
        let (shop, hard) = v.split_once(':')?;
        Some(SessionEnds {
            shop_end_ms: shop.parse().ok()?,
            hard_end_ms: hard.parse().ok()?,
        })
    }
}

/// One run of the admission script; what the admission feed carries to every instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tick {
    pub state: LineState,
    /// The highest place admitted so far.
    pub watermark: i64,
    /// Admissions ever, by any instance (the measured admission rate comes from its changes).
    pub admitted_total: i64,
    /// Fans still in the line.
    pub waiting: i64,
    pub active: i64,
    /// The configured rate (ops' setting).
    pub rate_per_s: f64,
    pub now_ms: i64,
    /// Waiters this call sent away (unseen for longer than the grace).
    pub left: i64,
    /// The drop's `leave_grace_s` in ms: presence must be refreshed well within it.
    pub leave_grace_ms: i64,
    /// The fans this call admitted, with their places, head of the line first.
    pub admitted: Vec<(FanId, i64)>,
    /// The sessions of the fans this call admitted (one admission run, one pair of ends).
    pub session: Option<SessionEnds>,
    /// The join counter (its high-water mark is kept in Postgres: [`crate::db::LineMarks`]).
    pub seq: i64,
    /// Units come back since the sell-out, on the waiting list (0 before); absent from the
    /// runs of a version without the waiting list.
    #[serde(default)]
    pub came_back: i64,
}

impl Tick {
    /// Whether this run's admissions are offers (the line is the waiting list).
    pub fn offers(&self) -> bool {
        self.state == LineState::Waitlist
    }
}

/// What a fan's page presents when it joins: the last place receipt it was handed and its
/// admission token, if it has them. They matter only after Redis lost the line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Proofs<'a> {
    pub receipt: Option<&'a str>,
    pub admission_token: Option<&'a str>,
}

/// What a fan brings back after Redis lost the line (lua/join.lua): the place their receipt
/// says, or the session their admission token carries, each with its issue time (ms).
#[derive(Debug, Clone, Copy, Default)]
pub struct Returning {
    pub receipt: Option<(i64, i64)>,
    pub admitted: Option<(i64, i64, SessionEnds)>,
}

/// A fan's standing from plain reads: their place, how many wait ahead, their admission deadline.
#[derive(Debug, Clone, Default)]
pub struct Standing {
    pub place: Option<i64>,
    /// 0-based rank in the line (people ahead); None when not in the line.
    pub ahead: Option<i64>,
    /// When in the active set: the admission deadline (may have passed).
    pub deadline_ms: Option<i64>,
    /// Admissions ever, read after the rank (see [`Redis::standing`]).
    pub admitted_total: i64,
    /// When admitted: the session's ends.
    pub session: Option<SessionEnds>,
    /// When the waiting list offered the fan a unit: the offer's end (may have passed).
    pub offer_end_ms: Option<i64>,
}

impl Standing {
    /// Whether the fan's admission is a waiting-list offer (a fan has one place, so one
    /// admission: an offer recorded is this one).
    pub fn offered(&self) -> bool {
        self.offer_end_ms.is_some()
    }
}

/// What [`Redis::standing`] reads: place, rank, deadline, admissions, session, offer end.
type StandingReads = (
    Option<String>,
    Option<i64>,
    Option<f64>,
    Option<i64>,
    Option<String>,
    Option<f64>,
);

fn place_of(v: Option<&Value>) -> i64 {
    text(v).parse::<f64>().map_or(0, |f| f as i64)
}

impl Redis {
    /// lua/join.lua: the fan's one place in the drop's line.
    pub async fn join(
        &self,
        drop: &DropId,
        fan: &FanId,
        prequeue_score: i64,
        returning: Returning,
    ) -> Result<Joined> {
        let k = QueueKeys::new(drop);
        // "-": none (an empty argument reads the same to the script; this one reads in a log).
        let none = || "-".to_owned();
        let mut argv = vec![fan.to_string(), prequeue_score.to_string()];
        match returning.receipt {
            Some((place, iat_ms)) => argv.extend([place.to_string(), iat_ms.to_string()]),
            None => argv.extend([none(), none()]),
        }
        match returning.admitted {
            Some((place, iat_ms, ends)) => argv.extend([
                place.to_string(),
                iat_ms.to_string(),
                ends.shop_end_ms.to_string(),
                ends.hard_end_ms.to_string(),
            ]),
            None => argv.extend([none(), none(), none(), none()]),
        }
        let reply = self.run(&self.scripts.join, k.join(), argv).await?;
        let status = match text(reply.get(2)).as_str() {
            "waiting" => FanStatus::Waiting,
            "pre_queue" => FanStatus::PreQueue,
            "admitted" => FanStatus::Admitted,
            "done" => FanStatus::Done,
            "sold_out" => FanStatus::SoldOut,
            "closed" => FanStatus::Closed,
            "waitlisted" => FanStatus::Waitlisted,
            "recovering" => return Err(crate::booking::recovering()),
            "not_queue" => return Err(not_queue()),
            _ => return Err(Error::new(Code::UnknownDrop)),
        };
        Ok(Joined {
            place: place_of(reply.first()),
            new: int(reply.get(1)) == 1,
            status,
            opens_at_ms: int(reply.get(3)),
            now_ms: int(reply.get(4)),
        })
    }

    /// lua/admit.lua: sends away at most `leave_batch` waiters unseen past the drop's grace, then
    /// admits as many fans as the bucket, `max_active`, the stock and `paused` allow, at most
    /// `admit_batch`.
    pub async fn admit(
        &self,
        drop: &DropId,
        leave_batch: usize,
        admit_batch: usize,
    ) -> Result<Tick> {
        let k = QueueKeys::new(drop);
        let reply = self
            .run(
                &self.scripts.admit,
                k.admit(),
                vec![
                    leave_batch.max(1).to_string(),
                    admit_batch.max(1).to_string(),
                ],
            )
            .await?;
        const FIXED: usize = 13;
        let mut admitted = Vec::with_capacity(reply.len().saturating_sub(FIXED) / 2);
        let mut i = FIXED;
        while i + 1 < reply.len() {
            if let Ok(fan) = FanId::parse(&text(reply.get(i))) {
                admitted.push((fan, place_of(reply.get(i + 1))));
            }
            i += 2;
        }
        Ok(Tick {
            state: LineState::parse(&text(reply.first())),
            watermark: place_of(reply.get(1)),
            admitted_total: int(reply.get(2)),
            waiting: int(reply.get(3)),
            active: int(reply.get(4)),
            rate_per_s: text(reply.get(5)).parse().unwrap_or(0.0),
            now_ms: int(reply.get(6)),
            left: int(reply.get(7)),
            leave_grace_ms: int(reply.get(8)),
            session: (!admitted.is_empty()).then(|| SessionEnds {
                shop_end_ms: int(reply.get(9)),
                hard_end_ms: int(reply.get(10)),
            }),
            seq: int(reply.get(11)),
            came_back: int(reply.get(12)),
            admitted,
        })
    }

    /// A fan's place, rank in the line, admission deadline, the admissions count, the
    /// session's ends and any waiting-list offer, as six reads pipelined on one connection, so
    /// Redis runs them in this order (not atomically).
    /// The order is what makes the answer safe while other instances admit: the deadline is read
    /// after the rank, so a fan admitted in between shows as admitted (never as neither); the
    /// count is read last, so a page counting down `ahead − (admitted now − admitted_total)`
    /// can only overstate the people ahead, never understate them.
    pub async fn standing(&self, drop: &DropId, fan: &FanId) -> Result<Standing> {
        let k = QueueKeys::new(drop);
        let p = self.client().pipeline();
        let _: () = p.hget(&k.places, fan.as_str()).await?;
        let _: () = p.zrank(&k.line, fan.as_str(), false).await?;
        let _: () = p.zscore(&k.active, fan.as_str()).await?;
        let _: () = p.hget(&k.watermark, "admitted").await?;
        let _: () = p.hget(&k.sessions, fan.as_str()).await?;
        let _: () = p.zscore(&k.offers, fan.as_str()).await?;
        let (place, rank, deadline, admitted, session, offer): StandingReads = p.all().await?;
        Ok(Standing {
            place: place.and_then(|p| p.parse::<f64>().ok()).map(|p| p as i64),
            ahead: rank,
            deadline_ms: deadline.map(|d| d as i64),
            admitted_total: admitted.unwrap_or(0),
            session: session.as_deref().and_then(SessionEnds::parse),
            offer_end_ms: offer.map(|e| e as i64),
        })
    }

    /// lua/line_restore.lua: if Redis lost the drop's line, or may have lost its tail (the
    /// drop's data is from another Redis run), sets it up again from the marks Postgres kept;
    /// true if it did. Called before lua/rebuild.lua stamps the drop with this run.
    pub async fn restore_line(
        &self,
        drop: &DropId,
        marks: LineMarks,
        seq_margin: u64,
        returning_ms: u64,
    ) -> Result<bool> {
        let reply = self
            .run(
                &self.scripts.line_restore,
                QueueKeys::new(drop).line_restore(),
                vec![
                    marks.seq.to_string(),
                    seq_margin.to_string(),
                    marks.place.to_string(),
                    marks.admitted.to_string(),
                    returning_ms.to_string(),
                ],
            )
            .await?;
        Ok(text(reply.first()) == "restored")
    }

    /// Marks waiters as seen at `now_ms`, Redis' clock (admit.lua compares it with `TIME`; the
    /// caller estimates it from its last admission run). Only fans still in the line are
    /// touched (`XX`): an admitted or departed fan is not brought back. One call per `chunk` fans.
    pub async fn touch_presence(
        &self,
        drop: &DropId,
        fans: &[FanId],
        now_ms: i64,
        chunk: usize,
    ) -> Result<()> {
        let key = QueueKeys::new(drop).seen;
        let now = now_ms as f64;
        for chunk in fans.chunks(chunk.max(1)) {
            let members: Vec<(f64, &str)> = chunk.iter().map(|f| (now, f.as_str())).collect();
            let _: i64 = self
                .client()
                .zadd(&key, Some(SetOptions::XX), None, true, false, members)
                .await?;
        }
        Ok(())
    }

    /// The active shoppers with their admission deadlines (ms), earliest first.
    pub async fn active_deadlines(&self, drop: &DropId) -> Result<Vec<(String, i64)>> {
        let v: Vec<(String, f64)> = self
            .client()
            .zrange(QueueKeys::new(drop).active, 0, -1, None, false, None, true)
            .await?;
        Ok(v.into_iter().map(|(f, d)| (f, d as i64)).collect())
    }

    /// The line's admission watermark: (the highest place admitted so far, admissions ever), as
    /// lua/admit.lua keeps them. One O(1) read, every tick of every instance that didn't run the
    /// script itself: the catch-up for an admission feed message that was lost.
    pub async fn admission_watermark(&self, drop: &DropId) -> Result<(i64, i64)> {
        let (place, admitted): (Option<String>, Option<i64>) = self
            .client()
            .hmget(QueueKeys::new(drop).watermark, vec!["place", "admitted"])
            .await?;
        let place = place
            .and_then(|p| p.parse::<f64>().ok())
            .map_or(0, |p| p as i64);
        Ok((place, admitted.unwrap_or(0)))
    }

    /// Publishes one admission run on the drop's sharded channel ([`admissions_channel`]).
    pub async fn publish_admissions(&self, drop: &DropId, tick: &Tick) -> Result<()> {
        let message = serde_json::to_string(&Pushed {
            drop: drop.clone(),
            tick: tick.clone(),
        })
        .map_err(Error::internal)?;
        let _: i64 = self
            .client()
            .spublish(admissions_channel(drop), message)
            .await?;
        Ok(())
    }

    /// Fans waiting in the line.
    pub async fn line_len(&self, drop: &DropId) -> Result<i64> {
        Ok(self.client().zcard(QueueKeys::new(drop).line).await?)
    }

    /// Puts a fan straight into the active set, bypassing the line and the admission script. For
    /// tests that sign admission tokens themselves; production admits only through lua/admit.lua.
    #[doc(hidden)]
    pub async fn test_admit(&self, drop: &DropId, fan: &FanId, window_ms: i64) -> Result<()> {
        let _: i64 = self
            .client()
            .zadd(
                QueueKeys::new(drop).active,
                None,
                None,
                false,
                false,
                ((now_ms() + window_ms) as f64, fan.as_str()),
            )
            .await?;
        Ok(())
    }
}

/// The drop's sharded pub/sub channel of admission runs. It carries the drop's hash tag, so on a
/// Redis Cluster it lives on the shard that holds the drop's keys (and fails over with it).
pub fn admissions_channel(drop: &DropId) -> String {
    crate::keys::drop_key(drop, "admissions")
}

/// One message of the admission feed: a run of lua/admit.lua by any instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pushed {
    pub drop: DropId,
    pub tick: Tick,
}

/// The admission feed: one subscriber connection per process (per primary, on a cluster),
/// subscribed to the sharded channel of every drop this instance has waiters of. fred
/// resubscribes after a reconnect; what is published meanwhile is lost, which each room's
/// per-tick catch-up (the watermark) makes good.
pub struct Feed {
    client: SubscriberClient,
}

impl Feed {
    /// A feed over `cfg`'s Redis, holding at most `capacity` messages not yet taken (past it the
    /// oldest are lost, and the catch-up finds their fans). Not connected: see [`Feed::start`].
    pub fn new(cfg: &RedisConfig, capacity: usize) -> Result<Feed> {
        let mut config =
            Config::from_url(&cfg.url).map_err(|e| Error::invalid(format!("redis.url: {e}")))?;
        // A first connect that fails is retried like a dropped connection, not given up: on a
        // Redis Cluster with a primary down (a restart during a failover) the feed connects
        // once the replica has taken over.
        config.fail_fast = false;
        let client = Builder::from_config(config)
            .with_performance_config(|p| {
                p.default_command_timeout = Duration::from_millis(cfg.command_timeout_ms);
                p.broadcast_channel_capacity = capacity.max(1);
            })
            .with_connection_config(|c| {
                c.max_command_buffer_len = cfg.max_command_buffer_len;
                c.connection_timeout = Duration::from_millis(cfg.command_timeout_ms);
            })
            .set_policy(crate::scripts::reconnect_policy(cfg))
            .build_subscriber_client()
            .map_err(|e| Error::invalid(format!("redis: {e}")))?;
        Ok(Feed { client })
    }

    /// Connects (and keeps reconnecting, resubscribing every channel after each reconnect).
    pub fn start(&self) {
        // Both run for the client's life; their handles aren't needed (dropping one detaches it,
        // and `quit` ends both).
        std::mem::drop(self.client.connect());
        std::mem::drop(self.client.manage_subscriptions());
    }

    /// The messages as they come; [`Feed::parse`] reads one.
    pub fn messages(&self) -> tokio::sync::broadcast::Receiver<fred::types::Message> {
        self.client.message_rx()
    }

    /// A feed message's admission run; None for anything else.
    pub fn parse(msg: &fred::types::Message) -> Option<Pushed> {
        let text = msg.value.as_str()?;
        serde_json::from_str(&text).ok()
    }

    pub async fn subscribe(&self, drop: &DropId) -> Result<()> {
        Ok(self.client.ssubscribe(admissions_channel(drop)).await?)
    }

    pub async fn unsubscribe(&self, drop: &DropId) -> Result<()> {
        Ok(self.client.sunsubscribe(admissions_channel(drop)).await?)
    }

    pub async fn quit(&self) {
        let _ = self.client.quit().await;
    }
}

/// The waiting room over an [`Engine`]: joins (with the pre-queue's secret seed, cached per
/// drop), admission ticks, standings and admission tokens.
pub struct Queue {
    pub engine: Arc<Engine>,
    seeds: Mutex<HashMap<DropId, String>>,
    seed_fills: crate::fill::FillGate<DropId>,
    /// Runs of lua/admit.lua by this process, every drop's, and the ticks of its rooms' loops
    /// (a test compares instances by them).
    admission_runs: AtomicU64,
    room_ticks: AtomicU64,
}

impl Queue {
    pub fn new(engine: Arc<Engine>) -> Queue {
        Queue {
            engine,
            seeds: Mutex::new(HashMap::new()),
            seed_fills: Default::default(),
            admission_runs: AtomicU64::new(0),
            room_ticks: AtomicU64::new(0),
        }
    }

    /// Counts one tick of a room's loop (queue-server's).
    pub fn count_room_tick(&self) {
        self.room_ticks.fetch_add(1, Ordering::Relaxed);
    }

    /// How many ticks this process' rooms' loops made, over all drops.
    pub fn room_ticks(&self) -> u64 {
        self.room_ticks.load(Ordering::Relaxed)
    }

    /// How many times this process ran lua/admit.lua, over all drops.
    pub fn admission_runs(&self) -> u64 {
        self.admission_runs.load(Ordering::Relaxed)
    }

    fn cached_seed(&self, drop: &DropId) -> Option<String> {
        self.seeds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(drop)
            .cloned()
    }

    async fn seed(&self, drop: &DropId) -> Result<String> {
        if let Some(s) = self.cached_seed(drop) {
            return Ok(s);
        }
        let filling = self.seed_fills.enter(drop).await;
        if let Some(s) = self.cached_seed(drop) {
            return Ok(s);
        }
        if filling.failed_while_waiting() {
            return Err(Error::unavailable(
                "Postgres",
                "a concurrent load of the seed failed",
            ));
        }
        let seed = self
            .engine
            .db
            .seed(drop)
            .await
            .inspect_err(|_| filling.failed())?
            .ok_or_else(|| Error::new(Code::UnknownDrop))?;
        let mut cache = self.seeds.lock().unwrap_or_else(|p| p.into_inner());
        // One seed per drop definition cached: the same bound. Full, it forgets one (a miss
        // costs one query), never all of them at once.
        if cache.len() >= self.engine.cfg.drops.cache_entries {
            if let Some(any) = cache.keys().next().cloned() {
                cache.remove(&any);
            }
        }
        cache.insert(drop.clone(), seed.clone());
        Ok(seed)
    }

    /// Joins the fan to a queue drop's line (idempotent). After Redis lost the line, what the
    /// fan presents brings back their place or session (lua/join.lua): a receipt that doesn't
    /// verify is refused (422 `invalid_request`); an admission token that doesn't (expired, most
    /// often: the session is over) brings nothing back and is no error.
    pub async fn join(&self, drop: &DropId, fan: &FanId, proofs: Proofs<'_>) -> Result<Joined> {
        let def = self.engine.drop_def(drop).await?;
        if def.admission.mode != AdmissionMode::Queue {
            return Err(not_queue());
        }
        let receipt = match proofs.receipt {
            Some(r) => {
                let c = self.engine.admission.verify_receipt(r, drop, fan)?;
                Some((c.place, c.iat_ms))
            }
            None => None,
        };
        let admitted = proofs
            .admission_token
            .and_then(|t| self.engine.admission.verify(t, drop, fan).ok())
            .and_then(|c| Some((c.place, c.iat * 1000, c.session()?)));
        let returning = Returning { receipt, admitted };
        let seed = self.seed(drop).await?;
        let joined = match self
            .engine
            .redis
            .join(drop, fan, prequeue_score(&seed, fan), returning)
            .await
        {
            // Postgres has the drop (drop_def above) and Redis doesn't: Redis lost it (a flush,
            // a failover to an empty replica) and booking-api's watcher is rebuilding it. The line
            // waits, as while `recovering`; "no such drop" would send every fan away for good.
            Err(e) if e.code == Code::UnknownDrop => return Err(crate::booking::recovering()),
            other => other?,
        };
        if joined.new {
            metrics::counter!(crate::metrics::QUEUE_JOINS).increment(1);
        }
        Ok(joined)
    }

    /// A place receipt for a waiter: what their page presents if Redis loses the line.
    pub fn receipt(&self, drop: &DropId, fan: &FanId, place: i64) -> String {
        self.engine.admission.issue_receipt(drop, fan, place)
    }

    /// Keeps the line's marks in Postgres (see [`LineMarks`]).
    pub async fn keep_line_marks(&self, drop: &DropId, marks: LineMarks) -> Result<()> {
        self.engine.db.keep_line_marks(drop, marks).await
    }

    /// The seed's SHA-256 (published at creation) and, once the drop has opened, the seed itself.
    pub async fn seed_reveal(&self, drop: &DropId) -> Result<(String, Option<String>, i64)> {
        let def = self.engine.drop_def(drop).await?;
        let opened = now_ms() >= def.opens_at_ms();
        let seed = if opened {
            Some(self.seed(drop).await?)
        } else {
            None
        };
        Ok((def.seed_sha256.clone(), seed, def.opens_at_ms()))
    }

    pub async fn admit(&self, drop: &DropId) -> Result<Tick> {
        let q = &self.engine.cfg.queue;
        self.admission_runs.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::QUEUE_ADMISSION_RUNS).increment(1);
        let tick = self
            .engine
            .redis
            .admit(drop, q.leave_batch, q.admit_batch_max)
            .await?;
        if !tick.admitted.is_empty() {
            metrics::counter!(crate::metrics::QUEUE_ADMISSIONS)
                .increment(tick.admitted.len() as u64);
        }
        if tick.left > 0 {
            metrics::counter!(crate::metrics::QUEUE_LEFT).increment(tick.left as u64);
        }
        Ok(tick)
    }

    /// Tells every instance (this one too) what an admission run did: see [`Feed`].
    pub async fn publish(&self, drop: &DropId, tick: &Tick) -> Result<()> {
        self.engine.redis.publish_admissions(drop, tick).await
    }

    /// Whether this process holds `drop`'s lease of `leases`' kind (taking or renewing it).
    pub async fn holds(&self, leases: &crate::lease::Leases, drop: &DropId) -> bool {
        leases.held(&self.engine.redis, drop).await
    }

    /// Lets go of `drop`'s lease of `leases`' kind, if this process holds it.
    pub async fn release(&self, leases: &crate::lease::Leases, drop: &DropId) {
        leases.release(&self.engine.redis, drop).await
    }

    /// See [`Redis::admission_watermark`].
    pub async fn watermark(&self, drop: &DropId) -> Result<(i64, i64)> {
        self.engine.redis.admission_watermark(drop).await
    }

    pub async fn touch_presence(&self, drop: &DropId, fans: &[FanId], now_ms: i64) -> Result<()> {
        let chunk = self.engine.cfg.queue.presence_chunk;
        self.engine
            .redis
            .touch_presence(drop, fans, now_ms, chunk)
            .await
    }

    pub async fn standing(&self, drop: &DropId, fan: &FanId) -> Result<Standing> {
        self.engine.redis.standing(drop, fan).await
    }

    /// A signed admission token for an admitted fan, carrying the session's ends (and expiring
    /// by its hard end at the latest).
    pub fn admission_token(
        &self,
        drop: &DropId,
        fan: &FanId,
        place: i64,
        session: Option<SessionEnds>,
    ) -> (String, AdmissionClaims) {
        self.engine.admission.issue(drop, fan, place, session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prequeue_scores_fit_52_bits_and_depend_on_seed_and_fan() {
        let alice = FanId::parse("alice").unwrap();
        let bob = FanId::parse("bob").unwrap();
        let a = prequeue_score("seed-1", &alice);
        assert!((0..POST_OPEN_BASE).contains(&a));
        assert_eq!(a, prequeue_score("seed-1", &alice));
        assert_ne!(a, prequeue_score("seed-2", &alice));
        assert_ne!(a, prequeue_score("seed-1", &bob));
    }
}
