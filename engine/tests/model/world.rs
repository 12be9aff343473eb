//! The real side of the model test: one drop in the Redis that `./dev test` started, driven
//! through the engine's typed script wrappers (`engine::scripts::Redis`), with the scripts loaded
//! over a clock the test sets by hand, and read back key by key for comparison with the model.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use engine::config::RedisConfig;
use engine::ids::{DropId, FanId, HoldId, OrderId};
use engine::keys::drop_key;
use engine::queue::{QueueKeys, Returning, SessionEnds};
use engine::scripts::{
    ConfirmBegin, DropImage, DropKeys, Finish, Redis, RefundReturn, ReserveArgs, Reserved, Revert,
    TestScripts,
};
use fred::prelude::*;
use serde_json::Value;

use crate::reference::{DropSpec, Hold, Item, Model, Record, Request, ReserveOut, Store, TickOut};

/// Entries per script call of a load or rebuild here: small, so the test's drops (10 seats, a few
/// holds) take several slices, as a big drop does with the production slice.
const SLICE: usize = 3;

/// Recovery's `queue.line_seq_margin` and `queue.recovery_return_s` (in ms) in the model test: a
/// small margin keeps places readable; the return window is a few Advance steps long.
const LINE_SEQ_MARGIN: i64 = 1_000;
const RETURN_MS: i64 = 3_000;

/// A redis-server run id other than the test Redis': what a drop's meta says after Redis lost
/// its last writes (it restarted, or a replica took over; lua/line_restore.lua tells so by it).
const EARLIER_RUN: &str = "0123456789abcdef0123456789abcdef01234567";

/// The test's clock, in place of lua/clock.lua: every script's KEYS[1] is its drop's meta key, so
/// each drop gets a clock of its own (`fg:{drop}:testclock`) and cases can run side by side.
const TEST_CLOCK: &str = r#"
local function now_ms()
  local key = (string.gsub(KEYS[1], ':meta$', ':testclock'))
  return tonumber(redis.call('GET', key))
end
"#;

/// One step, with every id decided, so the model and Redis see the very same thing.
#[derive(Debug, Clone)]
pub enum Step {
    Reserve {
        fan: String,
        key: String,
        body_sha: String,
        hold: String,
        req: Request,
    },
    Release {
        hold: String,
        fan: String,
    },
    Expire {
        limit: i64,
    },
    Begin {
        hold: String,
        fan: String,
        reference: String,
    },
    /// Postgres commits the order of a confirming hold (no Redis call).
    Commit {
        hold: String,
        order: String,
    },
    Finish {
        hold: String,
        order: String,
    },
    Revert {
        hold: String,
        reference: String,
    },
    Advance {
        ms: i64,
    },
    /// A seller adds `add` units to a SKU: Postgres' total, then (unless the process died in
    /// between: `redis` false) lua/restock.lua raises Redis' to it.
    Restock {
        bucket: String,
        add: i64,
        redis: bool,
    },
    /// A seller refunds the order of `hold` (refund id `refund_id`; `part`: one unit of its
    /// first item left, else all it has left): Postgres records it, then (unless the process
    /// died in between: `redis` false) lua/refund.lua returns its units to stock.
    Refund {
        hold: String,
        refund_id: String,
        part: bool,
        redis: bool,
    },
    Close,
    /// The archiver: lua/archive.lua (Postgres marked the drop archived).
    Archive,
    /// Remembers Redis' state of the drop, for a later `Lose { rollback: true }`.
    Checkpoint,
    /// Redis loses the drop (a flush) or its writes since the checkpoint (an AOF that missed
    /// them, a failover to a lagging replica); the engine notices and marks it recovering.
    Lose {
        rollback: bool,
    },
    /// Recovery: Postgres' admission settings back into Redis, then the sliced rebuild
    /// (lua/rebuild.lua). `interrupted`: a rebuild first stops after a few slices (its process
    /// died), the scripts that would write to the drop meanwhile must refuse, and a new rebuild
    /// starts over, which must leave the drop exactly as one uninterrupted rebuild.
    Rebuild {
        interrupted: bool,
    },
    Join {
        fan: String,
        score: i64,
        /// What the fan's page presents (lua/join.lua uses it only after the line was lost).
        returning: Returning,
    },
    Admit {
        leave_batch: i64,
        /// queue-server keeps the line's marks in Postgres after this run.
        keep: bool,
    },
    Touch {
        fans: Vec<String>,
    },
    Settings {
        fields: Vec<(String, String)>,
    },
}

/// What a step answered, in one comparable shape for both sides.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Reserve(ReserveOut, bool),
    Result(Result<String, String>),
    Pair(i64, i64),
    Word(&'static str),
    Tick(TickOut),
    Join(Result<(i64, bool, String), String>),
    Nothing,
}

/// Applies a step to the model.
pub fn apply(model: &mut Model, step: &Step) -> Outcome {
    match step {
        Step::Reserve {
            fan,
            key,
            body_sha,
            hold,
            req,
        } => {
            let (out, replay) = model.reserve(fan, key, body_sha, hold, req);
            Outcome::Reserve(out, replay)
        }
        Step::Release { hold, fan } => {
            Outcome::Result(model.release(hold, fan).map(|()| "ok".to_owned()))
        }
        Step::Expire { limit } => {
            let (a, b) = model.expire(*limit);
            Outcome::Pair(a, b)
        }
        Step::Begin {
            hold,
            fan,
            reference,
        } => Outcome::Result(model.confirm_begin(hold, fan, reference)),
        Step::Commit { hold, order } => {
            model.commit(hold, order);
            Outcome::Nothing
        }
        Step::Finish { hold, order } => Outcome::Word(model.confirm_finish(hold, order)),
        Step::Revert { hold, reference } => Outcome::Word(model.confirm_revert(hold, reference)),
        Step::Advance { ms } => {
            model.now_ms += ms;
            Outcome::Nothing
        }
        Step::Restock { bucket, add, redis } => {
            let total = model.restock_record(bucket, *add);
            match redis {
                true => match model.restock(bucket, total) {
                    Ok((t, a)) => Outcome::Pair(t, a),
                    Err(e) => Outcome::Result(Err(e)),
                },
                false => Outcome::Nothing,
            }
        }
        Step::Refund {
            hold,
            refund_id,
            part,
            redis,
        } => match model.refund_record(hold, refund_id, *part) {
            Some(marker) if *redis => Outcome::Result(model.refund_return(&marker)),
            _ => Outcome::Nothing,
        },
        Step::Close => {
            model.close();
            Outcome::Nothing
        }
        Step::Archive => Outcome::Result(model.archive()),
        Step::Checkpoint | Step::Lose { .. } => Outcome::Nothing,
        // The engine's recovery leaves an archived drop alone.
        Step::Rebuild { .. } if model.record.archived => Outcome::Pair(0, 0),
        Step::Rebuild { .. } => {
            model.restore_admission();
            // Before the rebuild stamps this run: line_restore.lua tells a drop from another
            // run (its line's tail may be lost) by the run id.
            if model.spec.queue {
                model.restore_line(LINE_SEQ_MARGIN, RETURN_MS);
            }
            let (a, b) = model.rebuild();
            Outcome::Pair(a, b)
        }
        Step::Join {
            fan,
            score,
            returning,
        } => {
            let out = model.join(fan, *score, returning);
            // queue-server hands a waiter a receipt with its standing.
            if let Ok((place, _, status)) = &out {
                if status == "waiting" {
                    model.pages.entry(fan.clone()).or_default().receipt =
                        Some((*place, model.now_ms));
                }
            }
            Outcome::Join(out)
        }
        Step::Admit { leave_batch, keep } => {
            let t = model.admit(*leave_batch, admit_batch(*leave_batch));
            if *keep {
                model.keep_marks(&t);
            }
            // Each admitted fan's page gets an admission token with its place and session.
            for (fan, place) in &t.admitted {
                model.pages.entry(fan.clone()).or_default().token =
                    Some((*place, model.now_ms, t.session.0, t.session.1));
            }
            Outcome::Tick(t)
        }
        Step::Touch { fans } => {
            model.touch(fans);
            // Positions go out with fresh receipts to the waiters still in the line.
            for f in fans {
                if let Some(place) = model.store.line.get(f).copied() {
                    model.pages.entry(f.clone()).or_default().receipt = Some((place, model.now_ms));
                }
            }
            Outcome::Nothing
        }
        Step::Settings { fields } => {
            model.set_admission(fields);
            Outcome::Nothing
        }
    }
}

type Saved = Vec<(String, Vec<u8>, i64)>;

/// The drop in Redis.
pub struct World {
    pub redis: Redis,
    raw: Client,
    pub drop: DropId,
    saved: Option<(Saved, Store)>,
}

/// What the engine loads or rebuilds the drop from: the spec, and what Postgres' record sold.
fn image(spec: &DropSpec, record: &Record, recovering: &str) -> DropImage {
    let sold_seats = record.sold_seats();
    DropImage {
        meta: spec.meta_payload(&record.status, recovering),
        buckets: spec
            .buckets
            .iter()
            .map(|(b, _)| (b.clone(), record.total(spec, b), record.sold(b)))
            .collect(),
        layout: spec
            .layout_json()
            .as_object()
            .into_iter()
            .flatten()
            .map(|(section, rows)| (section.clone(), rows.to_string()))
            .collect(),
        seats: spec
            .seat_ids()
            .into_iter()
            .map(|s| {
                let sold = sold_seats.contains(&s);
                (s, sold)
            })
            .collect(),
        bought: record.bought().into_iter().collect(),
        refunds: record.refunds.keys().cloned().collect(),
    }
}

/// Sorts one slice of holds, with the record's orders for them.
async fn sort_slice(rebuild: &mut engine::scripts::Rebuild<'_>, record: &Record, ids: &[String]) {
    assert!(ids.len() <= SLICE, "a slice of {} holds", ids.len());
    let orders: HashMap<String, String> = ids
        .iter()
        .filter_map(|id| Some((id.clone(), record.orders.get(id)?.0.clone())))
        .collect();
    rebuild.sort(ids, &orders).await.expect("rebuild_sort");
}

#[track_caller]
fn within_slices(report: &engine::scripts::RebuildReport) {
    assert!(
        report.max_entries_per_call <= SLICE as u64,
        "a script call handled {} entries (slice {SLICE}): {report:?}",
        report.max_entries_per_call
    );
}

pub fn redis_url() -> String {
    std::env::var("FLOODGATE_TEST_REDIS_URL")
        .expect("run tests with ./dev test (FLOODGATE_TEST_REDIS_URL)")
}

/// The scripts over the test clock; `replace` swaps script bodies (the broken fixtures).
pub async fn connect(replace: Vec<(String, String)>) -> (Redis, Client) {
    let cfg = RedisConfig {
        url: redis_url(),
        pool_size: 4,
        ..RedisConfig::default()
    };
    let redis = Redis::connect_with_test_scripts(
        &cfg,
        TestScripts {
            clock: TEST_CLOCK.to_owned(),
            replace,
        },
    )
    .await
    .expect("connect to the test Redis");
    let raw = Builder::from_config(Config::from_url(&cfg.url).expect("a Redis URL"))
        .build()
        .expect("a Redis client");
    raw.init().await.expect("connect to the test Redis");
    (redis, raw)
}

fn err_name(e: engine::Error) -> String {
    e.code.name().to_owned()
}

impl World {
    pub async fn new(redis: Redis, raw: Client, model: &mut Model) -> World {
        let world = World {
            redis,
            raw,
            drop: DropId::generate(),
            saved: None,
        };
        world.set_clock(model.now_ms).await;
        let (loaded, report) = world
            .redis
            .load_drop(
                &world.drop,
                &image(
                    &model.spec,
                    &Record {
                        status: "open".into(),
                        ..Record::default()
                    },
                    "0",
                ),
                SLICE,
            )
            .await
            .expect("load_drop");
        within_slices(&report);
        assert_eq!(loaded, model.load_drop(), "load_drop's answer");
        world
    }

    fn clock_key(&self) -> String {
        drop_key(&self.drop, "testclock")
    }

    pub async fn set_clock(&self, ms: i64) {
        let _: () = self
            .raw
            .set(self.clock_key(), ms, None, None, false)
            .await
            .expect("SET the test clock");
    }

    /// The drop's keys, but the test clock.
    async fn keys(&self) -> Vec<String> {
        let keys: Vec<String> = self
            .raw
            .custom(
                fred::types::CustomCommand::new_static("KEYS", None, false),
                vec![drop_key(&self.drop, "*")],
            )
            .await
            .expect("KEYS");
        keys.into_iter()
            .filter(|k| *k != self.clock_key())
            .collect()
    }

    /// Runs one step; `model` is read only for what the step needs from Postgres' record.
    pub async fn run(&self, step: &Step, model: &Model) -> Outcome {
        let fan = |f: &str| FanId::parse(f).expect("a fan id");
        let hold = |h: &str| HoldId::parse(h).expect("a hold id");
        match step {
            Step::Reserve {
                fan: f,
                key,
                body_sha,
                hold: h,
                req,
            } => {
                let items: Vec<(String, u32)>;
                let seats: Vec<(String, String)>;
                let args = match req {
                    Request::Items(list) => {
                        items = list.clone();
                        ReserveArgs::Items(&items)
                    }
                    Request::Seats(list) => {
                        seats = list.clone();
                        ReserveArgs::Seats(&seats)
                    }
                    Request::Best {
                        section,
                        quantity,
                        scan_seats_max,
                    } => ReserveArgs::Best {
                        section,
                        quantity: *quantity,
                        scan_seats_max: *scan_seats_max,
                    },
                };
                // The fan's admission token carries the session's ends admission stored.
                let stored: Option<String> = self
                    .raw
                    .hget(drop_key(&self.drop, "sessions"), f.as_str())
                    .await
                    .expect("HGET sessions");
                let session = stored.and_then(|v| {
                    let (shop, hard) = v.split_once(':')?;
                    Some(SessionEnds {
                        shop_end_ms: shop.parse().ok()?,
                        hard_end_ms: hard.parse().ok()?,
                    })
                });
                match self
                    .redis
                    .reserve(&self.drop, &fan(f), key, body_sha, &hold(h), session, args)
                    .await
                {
                    Ok((
                        Reserved::Held {
                            hold_id,
                            expires_at_ms,
                            items,
                            ..
                        },
                        replay,
                    )) => Outcome::Reserve(
                        ReserveOut::Held {
                            hold: hold_id.to_string(),
                            expires_at_ms,
                            items: items
                                .into_iter()
                                .map(|i| Item {
                                    bucket: i.b,
                                    quantity: i.q as i64,
                                    seat: i.s,
                                })
                                .collect(),
                        },
                        replay,
                    ),
                    Ok((Reserved::Refused { code, detail }, replay)) => Outcome::Reserve(
                        ReserveOut::Refused {
                            code: code.name().to_owned(),
                            detail,
                        },
                        replay,
                    ),
                    Err(e) => panic!("reserve failed: {e:?}"),
                }
            }
            Step::Release { hold: h, fan: f } => Outcome::Result(
                self.redis
                    .release(&hold(h), &fan(f))
                    .await
                    .map(|()| "ok".to_owned())
                    .map_err(err_name),
            ),
            Step::Expire { limit } => {
                let (a, b) = self
                    .redis
                    .expire(&self.drop, *limit as u32)
                    .await
                    .expect("expire");
                Outcome::Pair(a, b)
            }
            Step::Begin {
                hold: h,
                fan: f,
                reference,
            } => Outcome::Result(
                match self.redis.confirm_begin(&hold(h), &fan(f), reference).await {
                    Ok(ConfirmBegin::Began(_)) => Ok("began".into()),
                    Ok(ConfirmBegin::InProgress(_)) => Ok("in_progress".into()),
                    Ok(ConfirmBegin::Sold(o)) => Ok(format!(
                        "sold:{}",
                        o.map(|o| o.to_string()).unwrap_or_default()
                    )),
                    Err(e) => Err(err_name(e)),
                },
            ),
            Step::Finish { hold: h, order } => {
                let order = OrderId::parse(order).expect("an order id");
                Outcome::Word(match self.redis.confirm_finish(&hold(h), order).await {
                    Ok(Finish::Sold) => "sold",
                    Ok(Finish::Already) => "already",
                    Ok(Finish::Ended) => "ended",
                    Ok(Finish::Unknown) => "unknown",
                    Err(e) => e.code.name(),
                })
            }
            Step::Revert { hold: h, reference } => {
                Outcome::Word(match self.redis.confirm_revert(&hold(h), reference).await {
                    Ok(Revert::Held) => "held",
                    Ok(Revert::Expired) => "expired",
                    Ok(Revert::NotConfirming) => "noop",
                    Ok(Revert::Unknown) => "unknown",
                    Err(e) => e.code.name(),
                })
            }
            Step::Commit { .. } => Outcome::Nothing,
            Step::Advance { .. } => {
                self.set_clock(model.now_ms).await;
                Outcome::Nothing
            }
            Step::Refund {
                hold: h,
                refund_id,
                redis,
                ..
            } => {
                // The model has applied the step already: its record has the refund if Postgres
                // recorded it (now or before).
                let Some((order, _, _)) = model.record.orders.get(h) else {
                    return Outcome::Nothing;
                };
                let marker = format!("{order}|{refund_id}");
                let Some((_, fan, items)) = model.record.refunds.get(&marker) else {
                    return Outcome::Nothing;
                };
                if !*redis {
                    return Outcome::Nothing;
                }
                let items: Vec<engine::scripts::HoldItem> = items
                    .iter()
                    .map(|i| engine::scripts::HoldItem {
                        b: i.bucket.clone(),
                        q: i.quantity as u32,
                        s: i.seat.clone(),
                    })
                    .collect();
                Outcome::Result(
                    match self.redis.refund(&self.drop, &marker, h, fan, &items).await {
                        Ok(RefundReturn::Returned { closed }) => Ok(format!(
                            "returned {}",
                            if closed { "closed" } else { "open" }
                        )),
                        Ok(RefundReturn::Already) => Ok("already".into()),
                        Ok(RefundReturn::HoldNotSold) => Err("hold_not_sold".into()),
                        Ok(RefundReturn::OutOfStep) => Err("out_of_step".into()),
                        Err(e) => Err(err_name(e)),
                    },
                )
            }
            Step::Close if model.record.archived => Outcome::Nothing,
            Step::Restock { bucket, redis, .. } => {
                // The model has applied the step already: its record holds Postgres' new total.
                if !*redis {
                    return Outcome::Nothing;
                }
                let total = model.record.total(&model.spec, bucket);
                match self.redis.restock(&self.drop, bucket, total).await {
                    Ok((t, a)) => Outcome::Pair(t, a),
                    Err(e) => Outcome::Result(Err(err_name(e))),
                }
            }
            Step::Close => {
                self.redis
                    .set_meta(&self.drop, "status", "closed")
                    .await
                    .expect("close");
                Outcome::Nothing
            }
            Step::Archive => Outcome::Result(
                match self.redis.archive(&self.drop).await.expect("archive") {
                    Ok(_) => Ok("archived".into()),
                    Err(why) => Err(why),
                },
            ),
            Step::Checkpoint => Outcome::Nothing,
            Step::Lose { .. } => Outcome::Nothing,
            Step::Rebuild { .. } if model.record.archived => Outcome::Pair(0, 0),
            Step::Rebuild { interrupted } => {
                let fields: Vec<(String, String)> = model
                    .record
                    .admission
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if !fields.is_empty() {
                    self.redis
                        .set_admission(&self.drop, fields)
                        .await
                        .expect("set_admission");
                }
                // Recovery sets a queue drop's line up again if it was lost or may have lost its
                // tail, from Postgres' marks, before the rebuild stamps the drop with this run.
                if model.spec.queue {
                    let (seq, place, admitted) = model.record.line_marks;
                    let marks = engine::db::LineMarks {
                        seq,
                        place,
                        admitted,
                    };
                    self.redis
                        .restore_line(&self.drop, marks, LINE_SEQ_MARGIN as u64, RETURN_MS as u64)
                        .await
                        .expect("restore_line");
                }
                let stale = match interrupted {
                    true => Some(self.interrupted_rebuild(model).await),
                    false => None,
                };
                let report = self.rebuild(&model.record, &model.spec).await;
                within_slices(&report);
                // Holds the interrupted rebuild ended were ended once, by it.
                let ended_before = stale.as_ref().map_or(0, |s| s.report().ended);
                // The interrupted rebuild's slices, coming late, change nothing (the diff after
                // this step checks it): the new rebuild superseded it.
                if let Some(mut stale) = stale {
                    let ids: Vec<String> = model.store.holds.keys().take(SLICE).cloned().collect();
                    if !ids.is_empty() {
                        let e = stale
                            .sort(&ids, &HashMap::new())
                            .await
                            .expect_err("superseded");
                        assert_eq!(e.code.name(), "recovering", "a superseded rebuild_sort");
                    }
                    let e = stale.finish().await.expect_err("superseded");
                    assert_eq!(e.code.name(), "recovering", "a superseded rebuild_keep");
                }
                Outcome::Pair(report.kept, ended_before + report.ended)
            }
            Step::Join {
                fan: f,
                score,
                returning,
            } => Outcome::Join(
                match self
                    .redis
                    .join(&self.drop, &fan(f), *score, *returning)
                    .await
                {
                    Ok(j) => Ok((j.place, j.new, j.status.as_str().to_owned())),
                    Err(e) => Err(match e.code.name() {
                        "invalid_request" => "not_queue".to_owned(),
                        other => other.to_owned(),
                    }),
                },
            ),
            Step::Admit { leave_batch, .. } => {
                let t = self
                    .redis
                    .admit(
                        &self.drop,
                        *leave_batch as usize,
                        admit_batch(*leave_batch) as usize,
                    )
                    .await
                    .expect("admit");
                Outcome::Tick(TickOut {
                    state: t.state.as_str().to_owned(),
                    watermark: t.watermark,
                    admitted_total: t.admitted_total,
                    waiting: t.waiting,
                    active: t.active,
                    left: t.left,
                    session: t.session.map_or((0, 0), |s| (s.shop_end_ms, s.hard_end_ms)),
                    seq: t.seq,
                    came_back: t.came_back,
                    admitted: t
                        .admitted
                        .into_iter()
                        .map(|(f, p)| (f.to_string(), p))
                        .collect(),
                })
            }
            Step::Touch { fans } => {
                let fans: Vec<FanId> = fans.iter().map(|f| fan(f)).collect();
                self.redis
                    .touch_presence(&self.drop, &fans, model.now_ms, 1_000)
                    .await
                    .expect("touch_presence");
                Outcome::Nothing
            }
            Step::Settings { fields } => {
                self.redis
                    .set_admission(&self.drop, fields.clone())
                    .await
                    .expect("set_admission");
                Outcome::Nothing
            }
        }
    }

    /// The sliced rebuild as the engine's recovery runs it, Postgres' orders from the record.
    async fn rebuild(&self, record: &Record, spec: &DropSpec) -> engine::scripts::RebuildReport {
        let mut rebuild = self
            .redis
            .begin_rebuild(&self.drop, &image(spec, record, "1"), SLICE)
            .await
            .expect("begin_rebuild");
        while let Some(ids) = rebuild.next_holds().await.expect("HSCAN of the holds") {
            sort_slice(&mut rebuild, record, &ids).await;
        }
        rebuild
            .finish()
            .await
            .expect("rebuild_keep, rebuild_finish")
    }

    /// A rebuild that dies after a slice of holds (its process died), handed back to show that
    /// its later slices change nothing. Until a new rebuild ends, the drop is frozen: every
    /// script that would write to it refuses, the sweeper does nothing.
    async fn interrupted_rebuild(&self, model: &Model) -> engine::scripts::Rebuild<'_> {
        let mut rebuild = self
            .redis
            .begin_rebuild(&self.drop, &image(&model.spec, &model.record, "1"), SLICE)
            .await
            .expect("begin_rebuild");
        if let Some(ids) = rebuild.next_holds().await.expect("HSCAN of the holds") {
            sort_slice(&mut rebuild, &model.record, &ids).await;
        }
        let frozen = "a script wrote to a drop in the middle of its rebuild";
        assert_eq!(
            self.redis.expire(&self.drop, 100).await.expect("expire"),
            (0, 0),
            "{frozen}"
        );
        for id in model.store.holds.keys() {
            let hold = HoldId::parse(id).expect("a hold id");
            // As the rebuild left it so far (its first slice may have ended it).
            let Some(h) = self.redis.hold(&hold).await.expect("a hold") else {
                continue;
            };
            let fan = FanId::parse(&h.fan).expect("a fan id");
            match h.st {
                engine::scripts::HoldState::Held => {
                    let e = self.redis.release(&hold, &fan).await.expect_err(frozen);
                    assert_eq!(e.code.name(), "recovering", "{frozen}: release");
                    let e = self
                        .redis
                        .confirm_begin(&hold, &fan, "pay-x")
                        .await
                        .expect_err(frozen);
                    assert_eq!(e.code.name(), "recovering", "{frozen}: confirm_begin");
                }
                engine::scripts::HoldState::Confirming => {
                    let e = self
                        .redis
                        .confirm_finish(&hold, OrderId::generate())
                        .await
                        .expect_err(frozen);
                    assert_eq!(e.code.name(), "recovering", "{frozen}: confirm_finish");
                    let reference = h.reference.clone().unwrap_or_default();
                    let e = self
                        .redis
                        .confirm_revert(&hold, &reference)
                        .await
                        .expect_err(frozen);
                    assert_eq!(e.code.name(), "recovering", "{frozen}: confirm_revert");
                }
                _ => {}
            }
        }
        rebuild
    }

    /// Checkpoint and loss act on both sides at once: the model's store goes with Redis'.
    pub async fn checkpoint(&mut self, model: &Model) {
        let mut saved = Vec::new();
        for key in self.keys().await {
            let dump: Option<Vec<u8>> = self
                .raw
                .custom(
                    fred::types::CustomCommand::new_static("DUMP", None, false),
                    vec![key.clone()],
                )
                .await
                .expect("DUMP");
            let ttl: i64 = self.raw.pttl(&key).await.expect("PTTL");
            if let Some(dump) = dump {
                saved.push((key, dump, ttl));
            }
        }
        self.saved = Some((saved, model.store.clone()));
    }

    pub async fn lose(&mut self, rollback: bool, model: &mut Model) {
        for key in self.keys().await {
            let _: i64 = self.raw.del(&key).await.expect("DEL");
        }
        model.store = Store::default();
        if rollback {
            if let Some((saved, store)) = &self.saved {
                for (key, dump, ttl) in saved {
                    let args: Vec<fred::types::Value> = vec![
                        key.clone().into(),
                        (*ttl).max(0).into(),
                        fred::types::Value::Bytes(dump.clone().into()),
                    ];
                    let _: fred::types::Value = self
                        .raw
                        .custom(
                            fred::types::CustomCommand::new_static("RESTORE", None, false),
                            args,
                        )
                        .await
                        .expect("RESTORE");
                }
                model.store = store.clone();
            }
        }
        // What the engine does when it notices: the drop answers `recovering` until rebuilt (an
        // archived drop it no longer looks after).
        if model.record.archived {
            return;
        }
        self.redis
            .set_meta(&self.drop, "recovering", "1")
            .await
            .expect("set recovering");
        model.store.meta.insert("recovering".into(), "1".into());
        // Writes are lost only by a restart or a failover: what is left of the drop was stamped
        // by another redis-server run than the one serving it now.
        if rollback && model.store.meta.contains_key("run_id") {
            self.redis
                .set_meta(&self.drop, "run_id", EARLIER_RUN)
                .await
                .expect("set run_id");
            model.store.meta.insert("run_id".into(), EARLIER_RUN.into());
        }
    }

    async fn hash(&self, key: &str) -> BTreeMap<String, String> {
        let m: HashMap<String, String> = self.raw.hgetall(key).await.expect("HGETALL");
        m.into_iter().collect()
    }

    async fn zset(&self, key: &str) -> BTreeMap<String, i64> {
        let v: Vec<(String, f64)> = self
            .raw
            .zrange(key, 0, -1, None, false, None, true)
            .await
            .expect("ZRANGE");
        v.into_iter().map(|(m, s)| (m, s as i64)).collect()
    }

    async fn list(&self, key: &str) -> Vec<String> {
        self.raw.lrange(key, 0, -1).await.expect("LRANGE")
    }

    /// Compares Redis with the model key by key; the first difference, if any.
    pub async fn diff(&self, model: &Model) -> Option<String> {
        let k = DropKeys::new(&self.drop);
        let q = QueueKeys::new(&self.drop);
        let s = &model.store;
        let parse_i64 = |m: BTreeMap<String, String>| -> BTreeMap<String, i64> {
            m.into_iter()
                .map(|(k, v)| (k, v.parse::<f64>().map_or(i64::MIN, |f| f as i64)))
                .collect()
        };
        let mut meta = self.hash(k.meta()).await;
        let next_due = meta.remove("next_due_ms");
        if let Some(next_due) = next_due.and_then(|v| v.parse::<f64>().ok()) {
            // The earliest deadline of a held hold in either index (lua/lib.lua `reclaim`).
            let listed = s.expiries.iter().filter_map(|id| s.holds.get(id));
            let earliest = s
                .deadlines
                .values()
                .copied()
                .chain(
                    listed
                        .filter(|h| h.state == "held")
                        .map(|h| h.expires_at_ms),
                )
                .min();
            if let Some(e) = earliest {
                if next_due as i64 > e {
                    return Some(format!(
                        "meta next_due_ms {next_due} is past the earliest deadline {e}: reserve would skip a due reclaim"
                    ));
                }
            }
        }
        macro_rules! same {
            ($what:expr, $real:expr, $model:expr) => {
                let (real, modelled) = ($real, $model);
                if real != modelled {
                    return Some(format!(
                        "{}:\n  redis: {:?}\n  model: {:?}",
                        $what, real, modelled
                    ));
                }
            };
        }
        same!("meta", meta, s.meta.clone());
        let stock = parse_i64(self.hash(k.stock()).await);
        same!("stock", stock.clone(), s.stock.clone());
        let buckets: BTreeSet<String> = stock
            .keys()
            .filter_map(|f| f.get(2..).map(str::to_owned))
            .collect();
        for b in buckets {
            let g = |p: &str| stock.get(&format!("{p}:{b}")).copied().unwrap_or(0);
            if g("a") + g("h") + g("s") != g("t") || g("a") < 0 || g("h") < 0 || g("s") < 0 {
                return Some(format!(
                    "the books don't balance for {b}: available {} + held {} + sold {} vs total {}",
                    g("a"),
                    g("h"),
                    g("s"),
                    g("t")
                ));
            }
        }
        same!("seats", self.hash(k.seats()).await, s.seats.clone());
        // The holds hash: hold records, and the stored answers beside them (lua/lib.lua).
        let (answers, holds): (BTreeMap<String, String>, BTreeMap<String, String>) = self
            .hash(k.holds())
            .await
            .into_iter()
            .partition(|(field, _)| field.starts_with(DropKeys::ANSWER_PREFIX));
        let holds: BTreeMap<String, Value> = holds
            .into_iter()
            .map(|(id, raw)| (id, serde_json::from_str(&raw).unwrap_or(Value::Null)))
            .collect();
        let modelled: BTreeMap<String, Value> = s
            .holds
            .iter()
            .map(|(id, h)| (id.clone(), Hold::to_json(h)))
            .collect();
        same!("holds", holds, modelled);
        let key = |name: &str| drop_key(&self.drop, name);
        same!(
            "deadlines",
            self.zset(&key("deadlines")).await,
            s.deadlines.clone()
        );
        same!(
            "confirming",
            self.zset(&key("confirming")).await,
            s.confirming.clone()
        );
        same!(
            "expiries",
            self.list(k.expiries()).await,
            s.expiries.clone()
        );
        same!("done", self.zset(&key("done")).await, s.done.clone());
        let (fans, fanholds) = split_fans(self.hash(&q.fans).await);
        same!("fans", fans, s.fans.clone());
        // The live-hold index: the fans hash's "h|<fan>" lists (lua/lib.lua), one set of
        // "<fan>|<hold id>" to the model.
        same!("fanholds", fanholds, s.fanholds.clone());
        let refunds: BTreeSet<String> = self.hash(&key("refunds")).await.into_keys().collect();
        same!("refunds", refunds, s.refunds.clone());
        let raw_layout = self.hash(&key("layout")).await;
        // The "@<section>-<row>" fields place rows in the seat map string; checked below.
        let layout: BTreeMap<String, Value> = raw_layout
            .iter()
            .filter(|(field, _)| !field.starts_with('@'))
            .map(|(sec, raw)| {
                (
                    sec.clone(),
                    serde_json::from_str(raw).unwrap_or(Value::Null),
                )
            })
            .collect();
        same!("layout", layout, s.layout.clone());
        // The seat map string (lua/lib.lua `show_seat`) shows every seat of the seats hash as
        // its state, where its row's "@" field says: the scripts keep the two together.
        let shown: Vec<u8> = self.raw.get(&key("seatmap")).await.unwrap_or_default();
        for (seat, state) in &s.seats {
            let place = seat.rsplit_once('-').and_then(|(row, n)| {
                let first: usize = raw_layout.get(&format!("@{row}"))?.parse().ok()?;
                Some(first + n.parse::<usize>().ok()?.checked_sub(1)?)
            });
            let want = match state.as_str() {
                "-" => b'f',
                "#" => b's',
                _ => b'h',
            };
            let got = place.and_then(|i| shown.get(i).copied());
            if got != Some(want) {
                return Some(format!(
                    "seat map string: seat {seat} ({state}) shows as {:?} at {place:?}, not {:?}",
                    got.map(char::from),
                    char::from(want)
                ));
            }
        }
        same!("active", self.zset(&q.active).await, s.active.clone());
        same!("sessions", self.hash(&q.sessions).await, s.sessions.clone());
        // Admission's running sum (lua/lib.lua, meta's demand_units) against a count of what the
        // fans it counts may still take, both as Redis has them.
        let shopping = self.zset(&q.shopping).await;
        let real_meta = self.hash(k.meta()).await;
        if let Some(sum) = real_meta.get("demand_units") {
            let limit = real_meta
                .get("per_fan_limit")
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(1);
            let (fans, _) = split_fans(self.hash(&q.fans).await);
            let counted: i64 = shopping
                .keys()
                .map(|f| (limit - fans.get(f).copied().unwrap_or(0)).max(0))
                .sum();
            if sum.parse::<i64>().ok() != Some(counted) {
                return Some(format!(
                    "meta demand_units {sum} is not what the fans in shopping may still take ({counted})"
                ));
            }
        } else if !shopping.is_empty() {
            return Some("shopping has fans but meta has no demand_units".to_owned());
        }
        same!("shopping", shopping, s.shopping.clone());
        same!("offers", self.zset(&q.offers).await, s.offers.clone());
        same!(
            "admission",
            self.hash(&q.admission).await,
            s.admission.clone()
        );
        same!(
            "places",
            parse_i64(self.hash(&q.places).await),
            s.places.clone()
        );
        same!("line", self.zset(&q.line).await, s.line.clone());
        let seq: Option<i64> = self.raw.get(&q.seq).await.expect("GET seq");
        same!("seq", seq.unwrap_or(0), s.seq);
        same!("seen", self.zset(&q.seen).await, s.seen.clone());
        let bucket: BTreeMap<String, f64> = self
            .hash(&q.bucket)
            .await
            .into_iter()
            .map(|(f, v)| (f, v.parse::<f64>().unwrap_or(f64::NAN)))
            .collect();
        same!("token bucket", bucket, s.bucket.clone());
        same!(
            "watermark",
            parse_i64(self.hash(&q.watermark).await),
            s.watermark.clone()
        );
        // Each idempotent reserve's first answer: the body's SHA and the answer's kind and
        // hold id or code ("<sha>\n<answer JSON>", or "<sha>\n<hold id>" in the holds hash:
        // lua/lib.lua), in the holds hash or under a key of its own, and nothing else there.
        let in_holds = model.answers_in_holds();
        let mut modelled_answers = BTreeSet::new();
        for ((fan, key), (sha, first)) in &s.idem {
            let fan = FanId::parse(fan).expect("a fan id");
            let stored: Option<String> = if in_holds {
                let field = DropKeys::answer_field(&fan, key);
                modelled_answers.insert(field.clone());
                answers.get(&field).cloned()
            } else {
                self.raw
                    .get(DropKeys::idem(&self.drop, &fan, key))
                    .await
                    .expect("GET an idempotency key")
            };
            let stored = stored.and_then(|raw| {
                let (sha, answer) = raw.split_once('\n')?;
                if !answer.starts_with('[') {
                    return Some((sha.to_owned(), Value::from("ok"), Value::from(answer)));
                }
                let answer: Value = serde_json::from_str(answer).ok()?;
                Some((sha.to_owned(), answer[0].clone(), answer[1].clone()))
            });
            let expected = match first {
                ReserveOut::Held { hold, .. } => {
                    (sha.clone(), Value::from("ok"), Value::from(hold.as_str()))
                }
                ReserveOut::Refused { code, .. } => {
                    (sha.clone(), Value::from("err"), Value::from(code.as_str()))
                }
            };
            same!(
                format!("idempotency key {key} of {fan}"),
                stored,
                Some(expected)
            );
        }
        same!(
            "stored answers in the holds hash",
            answers.into_keys().collect::<BTreeSet<_>>(),
            modelled_answers
        );
        // And nothing else: a script that wrote a key the model doesn't know of shows here.
        let mut expected: BTreeSet<String> = BTreeSet::new();
        let mut expect = |name: &str, present: bool| {
            if present {
                expected.insert(drop_key(&self.drop, name));
            }
        };
        expect("meta", !s.meta.is_empty());
        expect("stock", !s.stock.is_empty());
        expect("seats", !s.seats.is_empty());
        // Written with the seats, and dropped with them by a rebuild.
        expect("seatmap", !s.seats.is_empty());
        // The holds hash also keeps the stored answers (lua/lib.lua).
        expect(
            "holds",
            !s.holds.is_empty() || (in_holds && !s.idem.is_empty()),
        );
        expect("deadlines", !s.deadlines.is_empty());
        expect("expiries", !s.expiries.is_empty());
        expect("confirming", !s.confirming.is_empty());
        expect("done", !s.done.is_empty());
        expect("fans", !s.fans.is_empty());
        // The live-hold index is in `fans` (lua/lib.lua); nothing touches the old zset
        // (engine::keys LEGACY_FANHOLDS_KEY), and a live hold has units, so `fans` exists whenever
        // the index has anything.
        expect("fanholds", false);
        expect("layout", !s.layout.is_empty());
        expect("active", !s.active.is_empty());
        expect("sessions", !s.sessions.is_empty());
        expect("shopping", !s.shopping.is_empty());
        expect("offers", !s.offers.is_empty());
        expect("admission", !s.admission.is_empty());
        expect("places", !s.places.is_empty());
        expect("line", !s.line.is_empty());
        expect("seq", s.seq != 0);
        expect("seen", !s.seen.is_empty());
        expect("bucket", !s.bucket.is_empty());
        expect("watermark", !s.watermark.is_empty());
        expect("refunds", !s.refunds.is_empty());
        for (fan, key) in s.idem.keys().filter(|_| !in_holds) {
            let fan = FanId::parse(fan).expect("a fan id");
            expected.insert(DropKeys::idem(&self.drop, &fan, key));
        }
        let present: BTreeSet<String> = self.keys().await.into_iter().collect();
        same!("the drop's keys", present, expected);
        None
    }

    pub async fn cleanup(&self) {
        for key in self.keys().await {
            let _: i64 = self.raw.del(&key).await.unwrap_or(0);
        }
        let _: i64 = self.raw.del(self.clock_key()).await.unwrap_or(0);
    }
}

/// An admission run's cap on fans admitted (`queue.admit_batch_max`), drawn with its leave batch:
/// small enough that runs with more tokens than that are capped, sometimes.
fn admit_batch(leave_batch: i64) -> i64 {
    leave_batch * 2
}

/// The fans hash as the model keeps it: fan → units (parsed as `diff` parses counts), and the
/// live-hold index its "h|<fan>" fields carry (lua/lib.lua) as "<fan>|<hold id>" members.
fn split_fans(hash: BTreeMap<String, String>) -> (BTreeMap<String, i64>, BTreeSet<String>) {
    let mut counts = BTreeMap::new();
    let mut live = BTreeSet::new();
    for (field, value) in hash {
        match field.strip_prefix("h|") {
            Some(fan) => live.extend(value.split(',').map(|id| format!("{fan}|{id}"))),
            None => {
                let units = value.parse::<f64>().map_or(i64::MIN, |f| f as i64);
                counts.insert(field, units);
            }
        }
    }
    (counts, live)
}
