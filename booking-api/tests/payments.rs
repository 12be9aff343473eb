//! Payments per attempt (docs/ARCHITECTURE.md, the hold lifecycle): one payments row per attempt
//! `(hold_id, reference)`, every state write keyed by its attempt, a `voiding` state retried until
//! the gateway confirms the void, and a reconciler that finds every unsettled attempt in Postgres
//! — whatever the drop, whichever process served it — without one bad hold stopping its round.
//! Each test ends with the books (`available + held + sold == total`) and Postgres' record.
mod common;

use common::Harness;
use engine::ids::{FanId, HoldId};
use engine::keys::DropKeys;
use engine::payments::PaymentState;
use engine::scripts::HoldState;
use serde_json::{json, Value};
use testkit::{eventually, test_config, test_config_for};

fn tee(quantity: u32) -> Value {
    json!({"items": [{"sku": "TEE", "quantity": quantity}]})
}

/// Confirm deadlines short enough that the reconciler takes overdue attempts within a test.
fn short_confirms() -> engine::Config {
    let mut cfg = test_config();
    cfg.holds.confirm_timeout_ms = 2_000;
    cfg.holds.confirm_safety_margin_ms = 500;
    cfg
}

/// The state Postgres has for one attempt, if it has a row for it.
async fn attempt_state(h: &Harness, hold: &str, reference: &str) -> Option<String> {
    h.server
        .engine
        .db()
        .client()
        .await
        .unwrap()
        .query_opt(
            "SELECT state FROM payment_attempts WHERE hold_id = $1 AND reference = $2",
            &[&hold, &reference],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// The hold as Redis has it, read behind the engine (a read through the API would make the
/// server look after the drop).
async fn hold_record(h: &Harness, hold: &str) -> engine::scripts::HoldRecord {
    h.server
        .engine
        .redis()
        .hold(&HoldId::parse(hold).unwrap())
        .await
        .unwrap()
        .expect("the hold is in Redis")
}

/// Replaces a hold's record in Redis with something no script or reader can decode (so every
/// call about that hold fails with a Redis error) and returns the record, to put back later.
async fn break_hold(hold: &str) -> String {
    let holds = DropKeys::new(&HoldId::parse(hold).unwrap().drop_id())
        .holds()
        .to_owned();
    let raw = common::redis_cli(&["HGET", &holds, hold]).await;
    assert!(raw.starts_with('{'), "the hold's record: {raw}");
    common::redis_cli(&["HSET", &holds, hold, "not a hold"]).await;
    raw
}

async fn mend_hold(hold: &str, raw: &str) {
    let holds = DropKeys::new(&HoldId::parse(hold).unwrap().drop_id())
        .holds()
        .to_owned();
    common::redis_cli(&["HSET", &holds, hold, raw]).await;
}

/// A fan with one hold of `units` tees in a fresh drop of ten.
async fn fan_with_hold(
    h: &Harness,
    drop: &str,
    name: &str,
    units: u32,
) -> (String, String, String) {
    let (fan, token) = h.fan(name).await;
    let (status, hold) = h.reserve(&token, drop, tee(units)).await;
    assert_eq!(status, 201, "{hold}");
    (fan, token, hold["hold_id"].as_str().unwrap().to_owned())
}

/// What confirm does before it calls the gateway — the hold `confirming` under `reference` and
/// the attempt recorded — and then nothing more (its process died).
async fn attempt_recorded_then_lost(h: &Harness, fan: &str, hold: &str, reference: &str) {
    let id = HoldId::parse(hold).unwrap();
    let fan = FanId::parse(fan).unwrap();
    let engine = &h.server.engine;
    engine
        .redis()
        .confirm_begin(&id, &fan, reference)
        .await
        .unwrap();
    assert!(engine
        .db()
        .begin_payment(&id, &fan, "test", reference, 2_500)
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_void_stays_voiding_until_the_gateway_confirms_it() {
    let h = Harness::with_config(short_confirms()).await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (fan, token, hold) = fan_with_hold(&h, &drop, "voided", 2).await;
    let gateway = h.server.engine.test_gateway().unwrap().clone();
    gateway.fail_voids(u32::MAX);
    // The gateway never heard of the attempt (lookup: unknown), so the reconciler voids it.
    attempt_recorded_then_lost(&h, &fan, &hold, "lost_1").await;

    eventually(
        "the reconciler ends the attempt and gives the hold back",
        || async { h.hold_state(&token, &hold).await == "held" },
    )
    .await;
    eventually(
        "the reconciler calls the void again while it fails",
        || async {
            gateway
                .payment(&HoldId::parse(&hold).unwrap())
                .unwrap()
                .void_calls
                >= 3
        },
    )
    .await;
    assert_eq!(
        attempt_state(&h, &hold, "lost_1").await.as_deref(),
        Some("voiding"),
        "a void the gateway hasn't confirmed is not `voided`"
    );
    assert_eq!(h.counts(&drop).await, (10, 8, 2, 0));

    gateway.fail_voids(0);
    eventually(
        "the void goes through and the attempt is voided",
        || async { attempt_state(&h, &hold, "lost_1").await.as_deref() == Some("voided") },
    )
    .await;
    let (status, order) = h.confirm(&token, &hold, "ok_after").await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    assert_eq!(h.order_count(&drop, Some(&hold)).await, 1);
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

/// Attempt A is declined and its hold reverted, but A's write of `declined` is delayed (a slow
/// connection, a stalled pool) and lands after the fan paid again with B: it must not touch B.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_write_of_an_older_attempt_leaves_the_newer_one_alone() {
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (fan, token, hold) = fan_with_hold(&h, &drop, "twice", 1).await;
    attempt_recorded_then_lost(&h, &fan, &hold, "fail_a").await;
    let id = HoldId::parse(&hold).unwrap();
    h.server
        .engine
        .redis()
        .confirm_revert(&id, "fail_a")
        .await
        .unwrap();

    let (status, order) = h.confirm(&token, &hold, "ok_b").await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(
        attempt_state(&h, &hold, "ok_b").await.as_deref(),
        Some("captured")
    );
    // A's delayed write.
    h.server
        .engine
        .db()
        .set_payment_state(&id, "fail_a", PaymentState::Pending, PaymentState::Declined)
        .await
        .unwrap();
    assert_eq!(
        attempt_state(&h, &hold, "ok_b").await.as_deref(),
        Some("captured"),
        "B's sale is still captured"
    );
    assert_eq!(
        attempt_state(&h, &hold, "fail_a").await.as_deref(),
        Some("declined")
    );
    assert_eq!(h.counts(&drop).await, (10, 9, 0, 1));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

/// A database of this test's own on the shared Postgres server, so servers that look after every
/// drop in it look after only this test's; its URL.
async fn private_database(name: &str) -> String {
    let shared = std::env::var("FLOODGATE_TEST_DATABASE_URL").unwrap();
    let db = format!("{name}_{:08x}", rand::random::<u32>());
    let (client, conn) = tokio_postgres::connect(&shared, tokio_postgres::NoTls)
        .await
        .expect("the shared Postgres");
    tokio::spawn(conn);
    client
        .simple_query(&format!("CREATE DATABASE {db}"))
        .await
        .expect("CREATE DATABASE");
    let (server, _) = shared.rsplit_once('/').expect("a database in the URL");
    format!("{server}/{db}")
}

/// Drops a database [`private_database`] made (its servers shut down first).
async fn drop_private_database(url: &str) {
    let shared = std::env::var("FLOODGATE_TEST_DATABASE_URL").unwrap();
    let (_, db) = url.rsplit_once('/').expect("a database in the URL");
    let (client, conn) = tokio_postgres::connect(&shared, tokio_postgres::NoTls)
        .await
        .expect("the shared Postgres");
    tokio::spawn(conn);
    client
        .simple_query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .expect("DROP DATABASE");
}

/// Server A sells a slow payment and stops before its confirm deadline. Server B never served
/// the drop, and it isn't among the newest drops B looks after: B's reconciler must still settle
/// the attempt, from Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reconciler_settles_attempts_of_drops_it_neither_served_nor_watches() {
    let redis = std::env::var("FLOODGATE_TEST_REDIS_URL").unwrap();
    let db = private_database("fg_reconcile").await;
    let mut cfg = test_config_for(&redis, &db);
    cfg.holds.confirm_timeout_ms = 2_000;
    cfg.holds.confirm_safety_margin_ms = 500;
    let mut only_its_own = cfg.clone();
    only_its_own.reconciler.watch_newest_drops = 0;
    let a = Harness::with_config(only_its_own).await;
    let drop = a.ga_drop(10, 4, 300).await;
    let (_, token, hold) = fan_with_hold(&a, &drop, "patient", 1).await;
    let r = a.confirm_reply(&token, &hold, "slow_1").await;
    assert_eq!(r.status, 503, "{r:?}");
    a.server.shutdown().await;

    let mut newest_only = cfg;
    newest_only.reconciler.watch_newest_drops = 1;
    newest_only.reconciler.max_drops_watched = 1;
    let b = Harness::with_config(newest_only).await;
    let newer = b.ga_drop(5, 1, 300).await;
    eventually("B's reconciler sells the hold", || async {
        hold_record(&b, &hold).await.st == HoldState::Sold
    })
    .await;
    assert_eq!(b.order_count(&drop, Some(&hold)).await, 1);
    assert_eq!(
        attempt_state(&b, &hold, "slow_1").await.as_deref(),
        Some("captured")
    );
    assert_eq!(b.counts(&drop).await, (10, 9, 0, 1));
    b.assert_invariants(&drop).await;
    b.assert_invariants(&newer).await;
    b.server.shutdown().await;
    drop_private_database(&db).await;
}

/// Two holds overdue in one drop; the first one's record can't be read (every call about it
/// fails). The second is still settled in the same rounds, and the first once it can be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_failing_hold_does_not_stop_the_reconcilers_round() {
    let h = Harness::with_config(short_confirms()).await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, t1, first) = fan_with_hold(&h, &drop, "first", 1).await;
    let (_, t2, second) = fan_with_hold(&h, &drop, "second", 1).await;
    let raw = {
        assert_eq!(h.confirm_reply(&t1, &first, "slow_1").await.status, 503);
        // Broken while its confirm deadline is still ahead, so no round settled it yet.
        break_hold(&first).await
    };
    assert_eq!(h.confirm_reply(&t2, &second, "slow_2").await.status, 503);

    eventually("the second hold is sold", || async {
        hold_record(&h, &second).await.st == HoldState::Sold
    })
    .await;
    mend_hold(&first, &raw).await;
    eventually("the first hold is sold once it can be read", || async {
        hold_record(&h, &first).await.st == HoldState::Sold
    })
    .await;
    assert_eq!(h.order_count(&drop, None).await, 2);
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

/// The payment insert stalls (here: another transaction holds the attempt's key, uncommitted)
/// until after the hold's confirm deadline. The confirm must not go on to the gateway: the
/// reconciler may already have given the hold back. (A reference the test gateway knows nothing
/// of, so a lookup says "unknown" as a real gateway's would for a call never made; an `ok_` one
/// it would take for another process's authorization.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_payment_insert_is_never_charged() {
    let h = Harness::with_config(short_confirms()).await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (fan, token, hold) = fan_with_hold(&h, &drop, "stalled", 2).await;
    let shared = std::env::var("FLOODGATE_TEST_DATABASE_URL").unwrap();
    let (mut staller, conn) = tokio_postgres::connect(&shared, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let stall = staller.transaction().await.unwrap();
    stall
        .execute(
            "INSERT INTO payment_attempts (hold_id, reference, drop_id, fan_id, gateway, amount_cents, state) \
             VALUES ($1, 'card_stalled', $2, $3, 'test', 5000, 'pending')",
            &[&hold, &drop, &fan],
        )
        .await
        .unwrap();

    let confirm = tokio::spawn({
        let (client, token, hold) = (h.client.clone(), token.clone(), hold.clone());
        async move { client.confirm_reply(&token, &hold, "card_stalled").await }
    });
    let deadline = eventually_confirming(&h, &hold).await;
    eventually("the confirm deadline passes on Redis' clock", || async {
        h.drop_view(&drop).await["server_now_ms"].as_i64().unwrap() > deadline + 500
    })
    .await;
    stall.rollback().await.unwrap();

    let r = confirm.await.unwrap();
    assert!(
        [402, 503].contains(&r.status),
        "the stalled confirm sold nothing: {r:?}"
    );
    eventually("the hold is given back", || async {
        h.hold_state(&token, &hold).await == "held"
    })
    .await;
    let charged = h
        .server
        .engine
        .test_gateway()
        .unwrap()
        .payment(&HoldId::parse(&hold).unwrap())
        .map_or(0, |p| p.authorizations);
    assert_eq!(charged, 0, "the gateway never saw the stalled attempt");
    assert_eq!(h.order_count(&drop, None).await, 0);
    assert_ne!(
        attempt_state(&h, &hold, "card_stalled").await.as_deref(),
        Some("pending"),
        "the attempt is settled"
    );
    assert_eq!(h.counts(&drop).await, (10, 8, 2, 0));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

/// Waits until the hold is `confirming`; its confirm deadline (Redis' clock).
async fn eventually_confirming(h: &Harness, hold: &str) -> i64 {
    eventually("the confirm begins", || async {
        hold_record(h, hold).await.st == HoldState::Confirming
    })
    .await;
    hold_record(h, hold).await.cexp.expect("a confirm deadline")
}

/// The order commits, then Redis fails the confirm's finish (the hold's record is unreadable
/// for a moment). The sale stands and the fan hears so; the reconciler finishes the hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_error_after_the_commit_still_sells_and_the_reconciler_finishes() {
    let h = Harness::with_config(short_confirms()).await;
    let drop = h.ga_drop(10, 4, 300).await;
    let (_, token, hold) = fan_with_hold(&h, &drop, "finished", 2).await;
    let gate = h.server.engine.test_gateway().unwrap().hold_captures();
    let arrived = gate.arrived.notified();
    let confirm = tokio::spawn({
        let (client, token, hold) = (h.client.clone(), token.clone(), hold.clone());
        async move { client.confirm(&token, &hold, "ok_1").await }
    });
    // The capture comes after the commit and before the finish.
    arrived.await;
    assert_eq!(h.order_count(&drop, Some(&hold)).await, 1);
    let raw = break_hold(&hold).await;
    gate.open();
    let (status, order) = confirm.await.unwrap();
    assert_eq!(status, 201, "the sale stands: {order}");
    assert_eq!(order["hold_id"], hold.as_str());
    mend_hold(&hold, &raw).await;
    assert_eq!(
        hold_record(&h, &hold).await.st,
        HoldState::Confirming,
        "Redis missed the finish"
    );

    eventually("the reconciler finishes the hold", || async {
        hold_record(&h, &hold).await.st == HoldState::Sold
    })
    .await;
    assert_eq!(h.order_count(&drop, Some(&hold)).await, 1);
    assert_eq!(h.counts(&drop).await, (10, 8, 0, 2));
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

// ---- a rolling deploy: the previous release beside this one --------------------------------

/// The previous release's payment statements, word for word: it knows only `payments`, one row
/// per hold.
mod previous_release {
    pub const BEGIN: &str =
        "INSERT INTO payments (hold_id, drop_id, fan_id, gateway, reference, amount_cents, state) \
         VALUES ($1, $2, $3, $4, $5, $6, 'pending') \
         ON CONFLICT (hold_id) DO UPDATE SET reference = EXCLUDED.reference, state = 'pending', \
         updated_at = now() WHERE payments.state IN ('declined', 'voided', 'pending')";
    pub const CLAIM: &str = "UPDATE payments SET state = 'authorized', updated_at = now() \
         WHERE hold_id = $1 AND state = 'pending' AND reference = $2";
    pub const VOID_PENDING: &str =
        "WITH prev AS (SELECT state, reference FROM payments WHERE hold_id = $1 FOR UPDATE) \
         UPDATE payments p SET state = CASE WHEN p.state = 'pending' AND p.reference = $2 \
         THEN 'voided' ELSE p.state END, updated_at = now() FROM prev WHERE p.hold_id = $1 \
         RETURNING CASE WHEN prev.reference = $2 THEN prev.state ELSE NULL END";
}

/// Migration 0002 adds `payment_attempts` beside `payments`; until every instance runs this
/// release, the previous one still writes `payments`. Each side sees the other's attempts, and
/// Postgres still settles each attempt once, whichever release writes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_previous_releases_payment_statements_still_work_beside_this_one() {
    use previous_release::*;
    let h = Harness::start().await;
    let drop = h.ga_drop(10, 4, 300).await;
    let drop_id = engine::ids::DropId::parse(&drop).unwrap();
    let db = h.server.engine.db();
    let old = db.client().await.unwrap();
    let fan = FanId::parse("rolling").unwrap();
    let hold = || HoldId::generate(&drop_id);
    let old_begin = |hold: HoldId, reference: &'static str| {
        let old = &old;
        let drop = drop.clone();
        async move {
            old.execute(
                BEGIN,
                &[
                    &hold.as_str(),
                    &drop,
                    &"rolling",
                    &"test",
                    &reference,
                    &100i64,
                ],
            )
            .await
            .unwrap()
        }
    };
    let old_state = |hold: HoldId| {
        let old = &old;
        async move {
            old.query_one(
                "SELECT reference, state FROM payments WHERE hold_id = $1",
                &[&hold.as_str()],
            )
            .await
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .unwrap()
        }
    };
    let state = |hold: HoldId, reference: &'static str| async move {
        db.attempt_state(&hold, reference).await.unwrap()
    };

    // Begun and committed by the previous release: this one sees each step.
    let h1 = hold();
    assert_eq!(old_begin(h1.clone(), "ok_old").await, 1);
    assert_eq!(
        state(h1.clone(), "ok_old").await,
        Some(PaymentState::Pending)
    );
    assert_eq!(
        old.execute(CLAIM, &[&h1.as_str(), &"ok_old"])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        state(h1.clone(), "ok_old").await,
        Some(PaymentState::Authorized)
    );

    // Begun by this release, voided by its reconciler: the previous release sees it ended, and
    // its commit of that attempt finds nothing to claim.
    let h2 = hold();
    assert!(db
        .begin_payment(&h2, &fan, "test", "ok_new", 100)
        .await
        .unwrap());
    assert_eq!(
        old_state(h2.clone()).await,
        ("ok_new".into(), "pending".into())
    );
    db.void_attempt(&h2, "rolling", "test", "ok_new", 100)
        .await
        .unwrap();
    assert_eq!(old_state(h2.clone()).await.1, "voided");
    assert_eq!(
        old.execute(CLAIM, &[&h2.as_str(), &"ok_new"])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        state(h2.clone(), "ok_new").await,
        Some(PaymentState::Voiding)
    );

    // An attempt this release's reconciler recorded as never begun: the previous release's
    // stalled insert of it lands afterwards and is refused (it answers 503, charging nothing).
    let h3 = hold();
    db.void_attempt(&h3, "rolling", "test", "ok_late", 100)
        .await
        .unwrap();
    assert_eq!(old_begin(h3.clone(), "ok_late").await, 0);
    assert_eq!(
        state(h3.clone(), "ok_late").await,
        Some(PaymentState::Voided)
    );

    // Committed by this release: the previous release's reconciler can't void it.
    let h4 = hold();
    assert!(db
        .begin_payment(&h4, &fan, "test", "ok_sold", 100)
        .await
        .unwrap());
    assert!(db
        .set_payment_state(
            &h4,
            "ok_sold",
            PaymentState::Pending,
            PaymentState::Authorized
        )
        .await
        .unwrap());
    let was: Option<String> = old
        .query_one(VOID_PENDING, &[&h4.as_str(), &"ok_sold"])
        .await
        .unwrap()
        .get(0);
    assert_eq!(was.as_deref(), Some("authorized"));
    assert_eq!(
        state(h4.clone(), "ok_sold").await,
        Some(PaymentState::Authorized)
    );

    // A new attempt of the previous release's on a hold whose earlier attempt ended: both
    // attempts keep their own rows.
    let h5 = hold();
    assert_eq!(old_begin(h5.clone(), "fail_first").await, 1);
    old.execute(
        "UPDATE payments SET state = 'declined' WHERE hold_id = $1",
        &[&h5.as_str()],
    )
    .await
    .unwrap();
    assert_eq!(old_begin(h5.clone(), "ok_second").await, 1);
    assert_eq!(
        state(h5.clone(), "fail_first").await,
        Some(PaymentState::Declined)
    );
    assert_eq!(
        state(h5.clone(), "ok_second").await,
        Some(PaymentState::Pending)
    );
    h.assert_invariants(&drop).await;
    h.server.shutdown().await;
}

// ---- many attempts, two reconcilers --------------------------------------------------------

/// Two booking-api instances over one database (a private one, so both look after everything in
/// it, as production instances do) and forty confirms at once: thirty slow payments and ten
/// attempts whose process died after recording them. Both reconcilers race over the same
/// attempts; Postgres lets each settle once: thirty orders, ten holds back, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_reconcilers_settle_each_attempt_once() {
    let redis = std::env::var("FLOODGATE_TEST_REDIS_URL").unwrap();
    let db = private_database("fg_two_reconcilers").await;
    let mut cfg = test_config_for(&redis, &db);
    cfg.holds.confirm_timeout_ms = 2_000;
    cfg.holds.confirm_safety_margin_ms = 500;
    let a = Harness::with_config(cfg.clone()).await;
    let b = Harness::with_config(cfg).await;
    let drop = a.ga_drop(100, 1, 300).await;
    let mut holds = Vec::new();
    for i in 0..40 {
        holds.push(fan_with_hold(&a, &drop, &format!("fan{i}"), 1).await);
    }
    let (slow, lost) = holds.split_at(30);
    // Through A (each process signs its own dev fan tokens); both reconcilers settle them.
    let confirms = slow
        .iter()
        .map(|(_, token, hold)| a.confirm_reply(token, hold, "slow_pay"));
    let lost_ones = lost.iter().map(|(fan, _, hold)| async {
        attempt_recorded_then_lost(&a, fan, hold, "lost_pay").await
    });
    let (answers, _) = tokio::join!(
        futures::future::join_all(confirms),
        futures::future::join_all(lost_ones)
    );
    for r in &answers {
        assert_eq!(r.status, 503, "{r:?}");
    }

    eventually(
        "every slow payment sold, every lost attempt's hold back",
        || async {
            let mut done = true;
            for (i, (_, _, hold)) in holds.iter().enumerate() {
                let want = if i < 30 {
                    HoldState::Sold
                } else {
                    HoldState::Held
                };
                done &= hold_record(&a, hold).await.st == want;
            }
            done
        },
    )
    .await;
    let pg = a.server.engine.db().client().await.unwrap();
    let states: Vec<(String, i64)> = pg
        .query(
            "SELECT state, count(*) FROM payment_attempts WHERE drop_id = $1 GROUP BY state ORDER BY state",
            &[&drop],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        states,
        vec![("captured".into(), 30), ("voided".into(), 10)],
        "each attempt settled once"
    );
    assert_eq!(a.order_count(&drop, None).await, 30);
    assert_eq!(a.counts(&drop).await, (100, 60, 10, 30));
    a.assert_invariants(&drop).await;
    a.server.shutdown().await;
    b.server.shutdown().await;
    drop_private_database(&db).await;
}
