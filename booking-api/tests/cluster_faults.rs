//! A Redis Cluster shard failing over in the middle of a sale (issue 14): `kill -9` of the primary
//! that owns a GA drop's slot while fans reserve and pay on it and on a drop of another shard. Its
//! replica takes over (a new run id): that drop answers `recovering` and is rebuilt from Postgres,
//! the other shard's drop never answers a 5xx, every acknowledged order stays sold, nothing is sold
//! twice, and `available + held + sold == total` on both — with the test config's command timeout
//! and confirm deadline, both shorter than the failover (the engine's client per primary keeps
//! the other shard out of the wait). The same failover under a queue drop's waiters on sockets:
//! queue-server/tests/faults.rs. Serial (`--test-threads=1`): the test runs a cluster of its own
//! (six redis-servers) and its own Postgres.
mod common;
mod fault_kit;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::Harness;
use devstack::cluster::ClusterNode;
use devstack::{free_port, Stack, StackConfig};
use engine::ids::DropId;
use fault_kit::{assert_consistent, eventually, pg_orders, shopper, DropKind, Fault, Seen};
use serde_json::json;
use testkit::{new_key, test_config_for};

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
    let base = devstack::cluster::free_base_port().expect("six free ports for a cluster");
    let cfg = StackConfig {
        name: "fault-cluster-failover".into(),
        redis_port: base,
        pg_port: free_port(),
    };
    let stack = tokio::task::spawn_blocking(move || Stack::start_cluster(cfg))
        .await
        .expect("the stack start task")
        .expect("the cluster stack starts");
    let mut f = Fault {
        redis_addr: stack.redis_addr(),
        redis_url: stack.redis_url(),
        db_url: stack.database_url(),
        stack: Arc::new(Mutex::new(stack)),
    };
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
