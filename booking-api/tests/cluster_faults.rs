//! A Redis Cluster shard failing over in the middle of a sale (issue 14): `kill -9` of the primary
//! that owns a GA drop's slot while fans reserve and pay on it and on a drop of another shard. Its
//! replica takes over (a new run id): that drop answers `recovering` and is rebuilt from Postgres,
//! the other shard's drop never answers a 5xx, every acknowledged order stays sold, nothing is sold
//! twice, and `available + held + sold == total` on both — with the test config's command timeout
//! and confirm deadline, both shorter than the failover (the engine's client per primary keeps
//! the other shard out of the wait). The same failover under a queue drop's waiters on sockets:
//! queue-server/tests/faults.rs. Serial (`--test-threads=1`): the test runs a cluster of its own
//! (six redis-servers) and its own Postgres.
//!
//! And a restart during a failover: a booking-api and a queue-server started while a shard has
//! no primary at all start anyway, sell the other shards' drops, and sell the shard's drops once
//! its replica has taken over (`fault_cluster_start_with_a_primary_down_...`).
mod common;
mod fault_kit;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::Harness;
use devstack::cluster::ClusterNode;
use engine::ids::DropId;
use fault_kit::{assert_consistent, eventually, pg_orders, shopper, DropKind, Fault, Seen};
use serde_json::json;
use testkit::{new_key, test_config_for, BookingClient, Reply};

/// Units of each drop: more than the sale sells before the end, so both still sell then.
const UNITS: u32 = 10_000;

/// The primary serving `slot`, as a running node sees the cluster now.
fn owner(nodes: &[ClusterNode], slot: u16) -> Option<&ClusterNode> {
    nodes
        .iter()
        .filter(|n| n.primary && !n.failed)
        .find(|n| n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
}

fn slot_of(drop: &str) -> u16 {
    engine::keys::drop_slot(&DropId::parse(drop).expect("a drop id"))
}

async fn rebuilds(h: &Harness, drop: &str) -> i64 {
    let db = h.server.engine.db().client().await.unwrap();
    db.query_one(
        "SELECT count(*) FROM stock_ledger WHERE drop_id = $1 AND kind = 'rebuild'",
        &[&drop],
    )
    .await
    .unwrap()
    .get(0)
}

/// With the test config's command timeout and confirm deadline (the defaults' kind: shorter
/// than a failover): the other shard's drop never waits on the failed one (engine
/// scripts/shards.rs: a Redis client per primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_cluster_primary_killed_mid_sale_fails_over_one_shard() {
    let mut f = Fault::start_cluster("fault-cluster-failover").await;
    let cfg = test_config_for(&f.redis_url, &f.db_url);
    let h = Harness::with_config(cfg).await;
    let api = h.client.clone();

    // Two GA drops on different shards: `hit` on the primary about to be killed.
    let nodes = f
        .with(|s| s.cluster_topology())
        .await
        .expect("the topology");
    let hit = h.ga_drop(UNITS, 4, 600).await;
    let hit_port = owner(&nodes, slot_of(&hit)).expect("an owner").port;
    let mut spared = None;
    for _ in 0..100 {
        let drop = h.ga_drop(UNITS, 4, 600).await;
        if owner(&nodes, slot_of(&drop)).expect("an owner").port != hit_port {
            spared = Some(drop);
            break;
        }
    }
    let spared = spared.expect("a drop on another shard");

    let stop = Arc::new(AtomicBool::new(false));
    let confirmed: HashMap<String, Arc<AtomicUsize>> = [&hit, &spared]
        .iter()
        .map(|d| ((*d).clone(), Arc::new(AtomicUsize::new(0))))
        .collect();
    let seen: HashMap<String, Arc<Mutex<Seen>>> = [&hit, &spared]
        .iter()
        .map(|d| ((*d).clone(), Arc::new(Mutex::new(Seen::default()))))
        .collect();
    let shoppers: Vec<_> = (0..40)
        .map(|i| {
            let drop = if i % 2 == 0 { &hit } else { &spared };
            tokio::spawn(shopper(
                api.clone(),
                drop.clone(),
                DropKind::Ga,
                stop.clone(),
                confirmed[drop].clone(),
                seen[drop].clone(),
            ))
        })
        .collect();
    let count = |drop: &str| confirmed[drop].load(Ordering::SeqCst);

    eventually("30 confirms on each drop before the kill", || async {
        count(&hit) >= 30 && count(&spared) >= 30
    })
    .await;
    f.with(move |s| s.kill_cluster_node(hit_port))
        .await
        .expect("the primary is killed");
    let (hit_before, spared_before) = (count(&hit), count(&spared));
    // redis-cli (the consistency checks) asks a node that is still up.
    let alive = nodes
        .iter()
        .find(|n| n.port != hit_port)
        .expect("another node");
    f.redis_addr = std::net::SocketAddr::from(([127, 0, 0, 1], alive.port));

    // Its replica takes over the slot.
    let hit_slot = slot_of(&hit);
    eventually("a replica serves the killed primary's slots", || async {
        let nodes = f.with(|s| s.cluster_topology()).await;
        nodes
            .ok()
            .and_then(|n| owner(&n, hit_slot).map(|o| o.port))
            .is_some_and(|port| port != hit_port)
    })
    .await;
    // The sale goes on on both drops, through the rebuild of the one that failed over.
    eventually(
        "30 more confirms on each drop after the failover",
        || async { count(&hit) >= hit_before + 30 && count(&spared) >= spared_before + 30 },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for s in shoppers {
        s.await.expect("a shopper panicked");
    }

    // The failed-over drop was rebuilt from Postgres; the other shard's drop was left alone and
    // never answered a 5xx.
    eventually(
        "the failed-over drop was rebuilt (a ledger line)",
        || async { rebuilds(&h, &hit).await > 0 },
    )
    .await;
    assert_eq!(
        rebuilds(&h, &spared).await,
        0,
        "the spared drop was rebuilt"
    );
    let hit_seen = std::mem::take(&mut *seen[&hit].lock().unwrap());
    let spared_seen = std::mem::take(&mut *seen[&spared].lock().unwrap());
    eprintln!(
        "failover: killed drop {} reserves, {} confirms, 5xx {:?}; spared drop {} reserves, {} \
         confirms, 5xx {:?}",
        hit_seen.reserves,
        hit_seen.confirms,
        hit_seen.errors,
        spared_seen.reserves,
        spared_seen.confirms,
        spared_seen.errors
    );
    assert!(
        hit_seen.errors.keys().any(|k| k.ends_with(" recovering")),
        "the failed-over drop never answered `recovering`: {:?}",
        hit_seen.errors
    );
    assert!(
        spared_seen.errors.is_empty(),
        "a drop on another shard answered 5xx: {:?}",
        spared_seen.errors
    );

    // Every order answered 200/201 is in Postgres and its hold reads `sold` with that order.
    for (drop, seen) in [(&hit, &hit_seen), (&spared, &spared_seen)] {
        // A confirm whose last step the failover cut off is settled by the reconciler.
        eventually("no hold is confirming", || async {
            fault_kit::confirming(&h, drop).await == Some(0)
        })
        .await;
        let orders = pg_orders(&h, drop).await;
        let mut answered = 0;
        for (_, token, hold, c) in &seen.holds {
            let Some(c) = c.as_ref().filter(|c| c.status == 200 || c.status == 201) else {
                continue;
            };
            answered += 1;
            let order = c.str("order_id");
            assert_eq!(orders.get(hold), Some(&order), "{drop}: hold {hold}");
            let r = api
                .get_reply(&format!("/v1/holds/{hold}"), Some(token))
                .await;
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.body["state"], "sold", "hold {hold}: {r:?}");
        }
        assert!(answered >= 60, "{drop}: only {answered} confirms answered");
        assert_consistent(&f, &h, drop).await;
    }

    // The killed node comes back as a replica of the promoted one; the cluster is whole again.
    f.with(move |s| s.start_cluster_node(hit_port))
        .await
        .expect("the killed node rejoins");
    let nodes = f
        .with(|s| s.cluster_topology())
        .await
        .expect("the topology");
    let back = nodes.iter().find(|n| n.port == hit_port).expect("the node");
    assert!(!back.primary && !back.failed, "{back:?}");
    let token = api.fan_token("after-rejoin").await;
    for drop in [&hit, &spared] {
        let body = json!({"items": [{"sku": "TEE", "quantity": 1}]});
        let r = api.reserve_reply(&token, drop, &new_key(), &body).await;
        assert_eq!(r.status, 201, "{drop} after the node rejoined: {r:?}");
    }

    h.server.shutdown().await;
    f.stop().await;
}

/// How long a server's start may take before the test gives up on it: generous (the machine is
/// shared); a start that waits for the dead primary would wait for good, or fail.
const START_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// A new fan buys one tee of `drop`: reserve, then pay. The hold id, or the first answer that
/// wasn't a success.
async fn buy(api: &BookingClient, drop: &str) -> Result<String, Reply> {
    let token = api
        .fan_token(&format!("buyer-{}", uuid::Uuid::new_v4()))
        .await;
    let body = json!({"items": [{"sku": "TEE", "quantity": 1}]});
    let r = api.reserve_reply(&token, drop, &new_key(), &body).await;
    if r.status != 201 {
        return Err(r);
    }
    let hold = r.str("hold_id");
    let reference = format!("ok_{}", uuid::Uuid::new_v4());
    let c = api.confirm_reply(&token, &hold, &reference).await;
    if c.status != 200 && c.status != 201 {
        return Err(c);
    }
    Ok(hold)
}

/// A refusal a buyer retries while a shard fails over: a 503 (`unavailable`, `recovering`,
/// `payment_pending`), or a hold its rebuild ended before the payment (refused cleanly).
fn worth_retrying(r: &Reply) -> bool {
    r.status == 503 || matches!(r.code(), "unknown_hold" | "hold_expired")
}

/// `GET path` of a server's own (not the API client's: /readyz and /healthz need no key).
async fn status_of(base: &str, path: &str) -> u16 {
    reqwest::get(format!("{base}{path}"))
        .await
        .expect("the server answers")
        .status()
        .as_u16()
}

/// A restart during a failover (docs/OPERATIONS.md, "Starting during a failover"): a shard has
/// no primary — its replica stopped first, then its primary killed, so nothing takes over until
/// the replica is back — and a booking-api and a queue-server start meanwhile. Both start and
/// keep running; booking-api sells the other shard's drop and answers the dead shard's 503
/// `unavailable` with `Retry-After`; `/readyz` says not ready on both. Once the replica is back
/// and promoted, the dead shard's drop is rebuilt and sells, both are ready, and the books of
/// both drops balance. (Before: fred's cluster pool, and the engine's pool per primary, failed
/// their first connect on the dead primary and the start returned an error.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_cluster_start_with_a_primary_down_serves_the_other_shards() {
    let mut f = Fault::start_cluster("fault-cluster-start").await;
    let cfg = test_config_for(&f.redis_url, &f.db_url);

    // A first booking-api makes two drops on different shards and sells a few of each; a live
    // hold on each must survive too.
    let first = Harness::with_config(cfg.clone()).await;
    let nodes = f
        .with(|s| s.cluster_topology())
        .await
        .expect("the topology");
    let hit = first.ga_drop(UNITS, 4, 600).await;
    let hit_owner = owner(&nodes, slot_of(&hit)).expect("an owner").clone();
    let mut spared = None;
    for _ in 0..100 {
        let drop = first.ga_drop(UNITS, 4, 600).await;
        if owner(&nodes, slot_of(&drop)).expect("an owner").port != hit_owner.port {
            spared = Some(drop);
            break;
        }
    }
    let spared = spared.expect("a drop on another shard");
    let spared_port = owner(&nodes, slot_of(&spared)).expect("an owner").port;
    for drop in [&hit, &spared] {
        for _ in 0..3 {
            buy(&first, drop).await.expect("a sale before the fault");
        }
        let token = first.fan_token("left-holding").await;
        let body = json!({"items": [{"sku": "TEE", "quantity": 2}]});
        let r = first.reserve_reply(&token, drop, &new_key(), &body).await;
        assert_eq!(r.status, 201, "{r:?}");
    }
    first.server.shutdown().await;

    // The shard loses its replica, then its primary: no failover can start.
    let replica_port = nodes
        .iter()
        .find(|n| n.replica_of.as_deref() == Some(hit_owner.id.as_str()))
        .expect("the hit primary's replica")
        .port;
    let hit_port = hit_owner.port;
    f.with(move |s| s.kill_cluster_node(replica_port))
        .await
        .expect("the replica is killed");
    f.with(move |s| s.kill_cluster_node(hit_port))
        .await
        .expect("the primary is killed");
    // redis-cli (the consistency checks) asks a node that is up.
    f.redis_addr = std::net::SocketAddr::from(([127, 0, 0, 1], spared_port));

    // Both servers start while the shard has no primary.
    let server = tokio::time::timeout(START_DEADLINE, booking_api::start(cfg.clone()))
        .await
        .expect("booking-api's start ends")
        .unwrap_or_else(|e| panic!("booking-api starts with a primary down: {e:?}"));
    let client = BookingClient::with_new_keys(server.url(), &server.engine, "restarted").await;
    let h = Harness { server, client };
    let queue = tokio::time::timeout(START_DEADLINE, queue_server::start(cfg.clone()))
        .await
        .expect("queue-server's start ends")
        .unwrap_or_else(|e| panic!("queue-server starts with a primary down: {e:?}"));

    // The other shard's drop sells at once; the dead shard's answers 503 with Retry-After.
    for _ in 0..3 {
        buy(&h, &spared)
            .await
            .unwrap_or_else(|r| panic!("the spared drop, its primary up: {r:?}"));
    }
    let token = h.fan_token("on-the-dead-shard").await;
    let body = json!({"items": [{"sku": "TEE", "quantity": 1}]});
    let r = h.reserve_reply(&token, &hit, &new_key(), &body).await;
    assert_eq!((r.status, r.code()), (503, "unavailable"), "{r:?}");
    assert!(r.retry_after.is_some(), "no Retry-After: {r:?}");
    for base in [h.server.url(), queue.url()] {
        assert_eq!(status_of(&base, "/healthz").await, 200, "{base}");
        assert_eq!(
            status_of(&base, "/readyz").await,
            503,
            "{base} ready with a shard down"
        );
    }

    // The replica comes back and takes over the shard (devstack waits for it).
    f.with(move |s| s.start_cluster_node(replica_port))
        .await
        .expect("the replica rejoins and is promoted");
    eventually("the failed-over drop sells", || async {
        match buy(&h, &hit).await {
            Ok(_) => true,
            Err(r) if worth_retrying(&r) => false,
            Err(r) => panic!("the failed-over drop: {r:?}"),
        }
    })
    .await;
    eventually(
        "the failed-over drop was rebuilt (a ledger line)",
        || async { rebuilds(&h, &hit).await > 0 },
    )
    .await;
    for base in [h.server.url(), queue.url()] {
        eventually("ready once every slot has a primary", || async {
            status_of(&base, "/readyz").await == 200
        })
        .await;
    }
    // The killed primary rejoins as a replica; both drops still sell.
    f.with(move |s| s.start_cluster_node(hit_port))
        .await
        .expect("the killed primary rejoins");
    buy(&h, &spared)
        .await
        .unwrap_or_else(|r| panic!("the spared drop with the cluster whole: {r:?}"));
    eventually(
        "the failed-over drop sells with the cluster whole",
        || async {
            match buy(&h, &hit).await {
                Ok(_) => true,
                Err(r) if worth_retrying(&r) => false,
                Err(r) => panic!("the failed-over drop: {r:?}"),
            }
        },
    )
    .await;
    assert_eq!(
        rebuilds(&h, &spared).await,
        0,
        "the spared drop was rebuilt"
    );
    for drop in [&hit, &spared] {
        eventually("no hold is confirming", || async {
            fault_kit::confirming(&h, drop).await == Some(0)
        })
        .await;
        assert_consistent(&f, &h, drop).await;
    }

    queue.shutdown().await;
    h.server.shutdown().await;
    f.stop().await;
}
