//! booking-api on a Redis Cluster (issue 14): two booking-api instances in-process share a local
//! 3-primary cluster (`devstack run --redis-cluster`, which `./dev test`'s cluster phase runs this
//! under) and one Postgres; requests alternate between them. The races of the concurrency suite
//! run again here, on drops spread over the shards, and a server left idle must not take any
//! drop of any shard for restarted, and a drop whose slot moves answers 503 while it moves and sells
//! on its new shard after.
mod common;

/// Every test runs only against a Redis Cluster: `./dev test`'s workspace phase (one Redis) skips
/// `on_cluster::`, its cluster phase runs them.
mod on_cluster {

    use std::collections::{HashMap, HashSet};
    use std::time::Duration;

    use crate::common::Harness;
    use devstack::cluster::ClusterNode;
    use engine::ids::DropId;
    use engine::metrics::CONSTRAINT_REFUSALS;
    use futures::future::join_all;
    use serde_json::{json, Value};
    use testkit::{eventually, BookingClient};

    /// Slots per shard as `redis-cli --cluster create` assigns them to three primaries.
    const SHARD_SLOTS: u16 = 5_461;
    /// Fan tokens signed by one instance verify at the other only with one secret.
    const SHARED_DEV_SECRET: &str = "cluster-test-dev-secret";

    /// Two booking-api instances on the same cluster and Postgres. `a` is a full [`Harness`]
    /// (Postgres checks, the test gateway); `b` answers with the same keys.
    struct Pair {
        a: Harness,
        b_server: booking_api::Running,
        b: BookingClient,
    }

    impl Pair {
        async fn start() -> Pair {
            let url = std::env::var("FLOODGATE_TEST_REDIS_URL").unwrap_or_default();
            assert!(
                url.starts_with("redis-cluster://"),
                "run under `devstack run --redis-cluster` (FLOODGATE_TEST_REDIS_URL is {url:?})"
            );
            let mut cfg = testkit::test_config();
            cfg.identity.dev_secret = SHARED_DEV_SECRET.into();
            let a = Harness::with_config(cfg.clone()).await;
            let b_server = booking_api::start(cfg).await.expect("booking-api b starts");
            let b = BookingClient::new(b_server.url())
                .with_keys(a.client.seller_key.clone(), a.client.ops_key.clone());
            Pair { a, b_server, b }
        }

        /// The instance request `i` goes to: even to a, odd to b.
        fn at(&self, i: usize) -> &BookingClient {
            if i.is_multiple_of(2) {
                &self.a.client
            } else {
                &self.b
            }
        }

        async fn shutdown(self) {
            self.b_server.shutdown().await;
            self.a.server.shutdown().await;
        }
    }

    /// Which of the three primaries serves a drop's slot.
    fn shard_of(drop: &str) -> u16 {
        let drop = DropId::parse(drop).expect("a drop id");
        engine::keys::drop_slot(&drop) / SHARD_SLOTS
    }

    /// `n` signed-in fans (spread over both instances): (fan id, fan token).
    async fn fans(p: &Pair, prefix: &str, n: usize) -> Vec<(String, String)> {
        join_all((0..n).map(|i| async move { p.at(i).fan(&format!("{prefix}{i}")).await })).await
    }

    fn error_code(v: &Value) -> &str {
        v["error"]["code"].as_str().unwrap_or("")
    }

    fn seats_of(v: &Value) -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["seat"].as_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_idle_server_recovers_no_drop_of_any_shard() {
        let p = Pair::start().await;
        // Drops until every shard has one (ids are random: a few dozen at most).
        let mut by_shard: HashMap<u16, String> = HashMap::new();
        for _ in 0..200 {
            if by_shard.len() == 3 {
                break;
            }
            let drop = p.a.ga_drop(10, 4, 300).await;
            by_shard.entry(shard_of(&drop)).or_insert(drop);
        }
        assert_eq!(by_shard.len(), 3, "drops on all three shards");
        // A script on every shard: each answers, through either instance.
        for (i, drop) in by_shard.values().enumerate() {
            let (_, token) = p.at(i).fan(&format!("idle-{i}")).await;
            let (status, body) = p
                .at(i)
                .reserve(
                    &token,
                    drop,
                    json!({"items": [{"sku": "TEE", "quantity": 1}]}),
                )
                .await;
            assert_eq!(status, 201, "{body}");
        }
        // Both watchers look at every drop each 200 ms: give them a couple of dozen rounds.
        tokio::time::sleep(Duration::from_secs(5)).await;
        // A recovery leaves a `rebuild` line in the drop's ledger (the metric is the process's,
        // which the other tests here share: a moved slot's drop is rightly rebuilt).
        let db = p.a.server.engine.db().client().await.unwrap();
        for drop in by_shard.values() {
            let rebuilds: i64 = db
                .query_one(
                    "SELECT count(*) FROM stock_ledger WHERE drop_id = $1 AND kind = 'rebuild'",
                    &[drop],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                rebuilds, 0,
                "drop {drop} of a healthy cluster was taken for restarted and rebuilt"
            );
        }
        for drop in by_shard.values() {
            let (status, view) = p.a.get(&format!("/v1/drops/{drop}"), None).await;
            assert_eq!(status, 200, "{view}");
            assert_eq!(p.a.counts(drop).await, (10, 9, 1, 0), "{view}");
            p.a.assert_invariants(drop).await;
        }
        p.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn five_hundred_fans_race_for_a_hundred_units_over_two_instances() {
        let p = Pair::start().await;
        let drop = p.a.ga_drop(100, 1, 10).await;
        let fans = fans(&p, "racer", 500).await;
        let answers = join_all(fans.iter().enumerate().map(|(i, (_, token))| {
            p.at(i).reserve(
                token,
                &drop,
                json!({"items": [{"sku": "TEE", "quantity": 1}]}),
            )
        }))
        .await;
        let mut held = Vec::new();
        for (i, (status, body)) in answers.iter().enumerate() {
            match status {
                201 => held.push((i, body["hold_id"].as_str().unwrap().to_owned())),
                409 => assert_eq!(error_code(body), "all_held", "{body}"),
                _ => panic!("unexpected answer {status}: {body}"),
            }
        }
        assert_eq!(held.len(), 100, "exactly the stock is held");
        let distinct: HashSet<&String> = held.iter().map(|(_, id)| id).collect();
        assert_eq!(distinct.len(), 100, "every hold is its own");
        assert_eq!(p.a.counts(&drop).await, (100, 0, 100, 0));
        p.a.assert_invariants(&drop).await;

        // 60 confirmed, 20 released, 20 left to expire; each through the other instance than its
        // reserve went to.
        let (to_confirm, rest) = held.split_at(60);
        let (to_release, to_expire) = rest.split_at(20);
        let confirms = join_all(to_confirm.iter().map(|(i, hold)| {
            let (p, token) = (&p, &fans[*i].1);
            async move { p.at(i + 1).confirm(token, hold, &format!("ok_{i}")).await }
        }));
        let releases = join_all(
            to_release
                .iter()
                .map(|(i, hold)| p.at(i + 1).release(&fans[*i].1, hold)),
        );
        let (confirmed, released) = tokio::join!(confirms, releases);
        for (status, body) in &confirmed {
            assert_eq!(*status, 201, "{body}");
        }
        assert!(released.iter().all(|s| *s == 204), "{released:?}");
        eventually("the last 20 holds expire", || async {
            p.a.counts(&drop).await.2 == 0
        })
        .await;
        assert_eq!(p.a.counts(&drop).await, (100, 40, 0, 60));
        for (i, hold) in to_expire {
            assert_eq!(p.at(*i).hold_state(&fans[*i].1, hold).await, "expired");
        }
        p.a.assert_invariants(&drop).await;
        assert_eq!(p.a.order_count(&drop, None).await, 60);
        p.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_hundred_fans_race_for_overlapping_seats_over_two_instances() {
        let p = Pair::start().await;
        let rows = json!([{"row": "1", "seats": 10}, {"row": "2", "seats": 10}, {"row": "3", "seats": 10}]);
        let drop =
            p.a.create_drop(json!({
                "name": "seated race on a cluster", "per_fan_limit": 2, "hold_ttl_s": 300,
                "admission": {"mode": "open"},
                "inventory": {"kind": "seated", "sections": [
                    {"section": "A", "price_cents": 9000, "rows": rows},
                    {"section": "B", "price_cents": 5000, "rows": rows},
                ]}
            }))
            .await;
        let refusals_before = p.a.metric(CONSTRAINT_REFUSALS).await;
        let requests = crate::common::seated_race_requests();
        let fans = fans(&p, "seat-racer", 200).await;
        let answers = join_all(
            fans.iter()
                .zip(&requests)
                .enumerate()
                .map(|(i, ((_, token), body))| p.at(i).reserve(token, &drop, body.clone())),
        )
        .await;
        let mut holds = Vec::new();
        let mut held_seats: HashMap<String, String> = HashMap::new();
        for (i, (status, body)) in answers.iter().enumerate() {
            match status {
                201 => {
                    let hold = body["hold_id"].as_str().unwrap().to_owned();
                    for seat in seats_of(body) {
                        if let Some(other) = held_seats.insert(seat.clone(), hold.clone()) {
                            panic!("seat {seat} is in two holds: {other} and {hold}");
                        }
                    }
                    holds.push((i, hold));
                }
                409 => assert!(
                    ["seat_unavailable", "all_held", "insufficient_stock"]
                        .contains(&error_code(body)),
                    "{body}"
                ),
                _ => panic!("unexpected answer {status}: {body}"),
            }
        }
        assert!(!holds.is_empty());
        let (_, available, held, _) = p.a.counts(&drop).await;
        assert_eq!(held as usize, held_seats.len());
        assert_eq!(available as usize, 60 - held_seats.len());
        p.a.assert_invariants(&drop).await;

        let confirmed = join_all(holds.iter().map(|(i, hold)| {
            let (p, token) = (&p, &fans[*i].1);
            async move { p.at(i + 1).confirm(token, hold, &format!("ok_{i}")).await }
        }))
        .await;
        let mut seat_orders: HashMap<String, String> = HashMap::new();
        for (status, order) in &confirmed {
            assert_eq!(*status, 201, "{order}");
            let order_id = order["order_id"].as_str().unwrap();
            for seat in seats_of(order) {
                if let Some(other) = seat_orders.insert(seat.clone(), order_id.to_owned()) {
                    panic!("seat {seat} is in two orders: {other} and {order_id}");
                }
            }
        }
        assert_eq!(
            seat_orders.keys().collect::<HashSet<_>>(),
            held_seats.keys().collect::<HashSet<_>>(),
            "the orders hold exactly the seats that were held"
        );
        let db = p.a.server.engine.db().client().await.unwrap();
        let twice = db
        .query(
            "SELECT seat_id, count(*) FROM order_items WHERE drop_id = $1 AND seat_id IS NOT NULL \
             GROUP BY 1 HAVING count(*) > 1",
            &[&drop],
        )
        .await
        .unwrap();
        assert!(twice.is_empty(), "a seat was sold twice in Postgres");
        assert_eq!(
            p.a.metric(CONSTRAINT_REFUSALS).await,
            refusals_before,
            "Postgres' constraints refused a sale: Redis let a double sale through"
        );
        p.a.assert_invariants(&drop).await;
        p.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn twenty_concurrent_confirms_over_two_instances_make_one_order() {
        let p = Pair::start().await;
        let drop = p.a.ga_drop(10, 4, 300).await;
        let (_, token) = p.a.fan("eager").await;
        let (status, hold) =
            p.b.reserve(
                &token,
                &drop,
                json!({"items": [{"sku": "TEE", "quantity": 2}]}),
            )
            .await;
        assert_eq!(status, 201, "{hold}");
        let hold_id = hold["hold_id"].as_str().unwrap();

        let answers = join_all((0..20).map(|i| p.at(i).confirm(&token, hold_id, "ok_once"))).await;
        let created = answers.iter().filter(|(s, _)| *s == 201).count();
        assert_eq!(
            created, 1,
            "exactly one confirm made the order: {answers:?}"
        );
        assert!(
            answers.iter().all(|(s, _)| *s == 200 || *s == 201),
            "{answers:?}"
        );
        let order_ids: HashSet<&str> = answers
            .iter()
            .map(|(_, o)| o["order_id"].as_str().unwrap())
            .collect();
        assert_eq!(order_ids.len(), 1, "every answer carries the one order");
        assert_eq!(p.a.order_count(&drop, Some(hold_id)).await, 1);
        assert_eq!(p.a.counts(&drop).await, (10, 8, 0, 2));
        p.a.assert_invariants(&drop).await;
        p.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_aof_policy_looks_at_every_primary() {
        let p = Pair::start().await;
        let redis = p.a.server.engine.redis();
        let nodes = redis.aof_nodes();
        assert_eq!(nodes.len(), 3, "one AOF per primary: {nodes:?}");
        let mut distinct = HashSet::new();
        for node in &nodes {
            assert!(distinct.insert(node.to_string()), "{node} twice");
            let state = redis.aof_state(node).await.expect("INFO of a primary");
            assert!(state.enabled, "{node} runs with an AOF: {state:?}");
            assert!(state.current_bytes > 0, "{node}: {state:?}");
        }
        p.shutdown().await;
    }

    /// `redis-cli -p PORT ARGS...` against one cluster node.
    fn redis_cli(port: u16, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The cluster's primaries, as the first node sees them.
    fn primaries() -> Vec<ClusterNode> {
        let nodes = std::env::var("REDIS_CLUSTER_NODES").expect("REDIS_CLUSTER_NODES");
        let port: u16 = nodes
            .split(',')
            .next()
            .and_then(|n| n.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .expect("a node port");
        devstack::cluster::parse_cluster_nodes(&redis_cli(port, &["CLUSTER", "NODES"]))
            .into_iter()
            .filter(|n| n.primary && !n.failed)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_drop_whose_slot_is_moving_answers_503_then_sells_on_its_new_shard() {
        let p = Pair::start().await;
        let drop = p.a.ga_drop(10, 4, 300).await;
        let (_, token) = p.a.fan("mover").await;
        let (status, body) =
            p.a.reserve(
                &token,
                &drop,
                json!({"items": [{"sku": "TEE", "quantity": 1}]}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let slot = engine::keys::drop_slot(&DropId::parse(&drop).unwrap());
        let nodes = primaries();
        let owns = |n: &&ClusterNode| n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot));
        let from = nodes.iter().find(owns).expect("an owner");
        let to = nodes.iter().find(|n| !owns(n)).expect("another primary");
        let (from_port, from_id, to_port, to_id) = (from.port, &from.id, to.port, &to.id);
        let slot_s = slot.to_string();

        // Resharding, halfway: the slot is migrating, and one of the drop's keys has moved.
        assert_eq!(
            redis_cli(
                to_port,
                &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", from_id]
            ),
            "OK"
        );
        assert_eq!(
            redis_cli(
                from_port,
                &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", to_id]
            ),
            "OK"
        );
        let stock = format!("fg:{{{drop}}}:stock");
        let to_port_s = to_port.to_string();
        assert_eq!(
            redis_cli(
                from_port,
                &["MIGRATE", "127.0.0.1", &to_port_s, &stock, "0", "5000"]
            ),
            "OK"
        );
        for i in 0..4 {
            let body = json!({"items": [{"sku": "TEE", "quantity": 1}]});
            let reply = p
                .at(i)
                .reserve_reply(&token, &drop, &testkit::new_key(), &body)
                .await;
            assert_eq!(
                reply.status, 503,
                "a reserve while the slot moves: {reply:?}"
            );
            reply.check_5xx("reserve while the slot moves", &["unavailable"]);
        }

        // The move ends: the rest of the slot's keys go, and every primary learns the new owner.
        let keys = redis_cli(from_port, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "1000"]);
        for key in keys.lines().filter(|k| !k.is_empty()) {
            assert_eq!(
                redis_cli(
                    from_port,
                    &["MIGRATE", "127.0.0.1", &to_port_s, key, "0", "5000"]
                ),
                "OK",
                "moving {key}"
            );
        }
        for node in &nodes {
            assert_eq!(
                redis_cli(node.port, &["CLUSTER", "SETSLOT", &slot_s, "NODE", to_id]),
                "OK"
            );
        }
        // Its arrival on another primary (another run id) costs it one rebuild, whenever a
        // watcher notices (503 `recovering` meanwhile, even after a reserve there succeeded):
        // wait for it, so the views below see the drop settled.
        let db = p.a.server.engine.db().client().await.unwrap();
        eventually("the moved drop is rebuilt (a ledger line)", || async {
            let n: i64 = db
                .query_one(
                    "SELECT count(*) FROM stock_ledger WHERE drop_id = $1 AND kind = 'rebuild'",
                    &[&drop],
                )
                .await
                .unwrap()
                .get(0);
            n > 0
        })
        .await;
        // Through either instance (each follows MOVED), the drop sells again on its new shard.
        for i in 0..2 {
            let (p, token, drop) = (&p, &token, &drop);
            eventually("a reserve on the moved drop succeeds", || async move {
                let body = json!({"items": [{"sku": "TEE", "quantity": 1}]});
                let reply = p
                    .at(i)
                    .reserve_reply(token, drop, &testkit::new_key(), &body)
                    .await;
                reply.check_5xx("reserve after the move", &["unavailable", "recovering"]);
                reply.status == 201
            })
            .await;
        }
        // And keeps answering: no connection of either instance's pool was left stuck by the move
        // (each request takes the pool's next connection, so a stuck one fails every few).
        let pool = testkit::test_config().redis.pool_size;
        for i in 0..4 * pool {
            let reply = p.at(i).get_reply(&format!("/v1/drops/{drop}"), None).await;
            assert_eq!(reply.status, 200, "view {i} after the move: {reply:?}");
        }
        assert_eq!(p.a.counts(&drop).await, (10, 7, 3, 0));
        p.a.assert_invariants(&drop).await;
        p.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn scripts_a_primary_lost_are_loaded_again_on_noscript() {
        let p = Pair::start().await;
        let drop = p.a.ga_drop(10, 4, 300).await;
        let slot = engine::keys::drop_slot(&DropId::parse(&drop).unwrap());
        let owner = primaries()
            .into_iter()
            .find(|n| n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .expect("the drop's primary");
        // As a restarted node or a promoted replica without them would; reserve is a function.
        assert_eq!(redis_cli(owner.port, &["SCRIPT", "FLUSH"]), "OK");
        assert_eq!(redis_cli(owner.port, &["FUNCTION", "FLUSH"]), "OK");
        for i in 0..4 {
            let (_, token) = p.at(i).fan(&format!("noscript-{i}")).await;
            let (status, body) = p
                .at(i)
                .reserve(
                    &token,
                    &drop,
                    json!({"items": [{"sku": "TEE", "quantity": 1}]}),
                )
                .await;
            assert_eq!(
                status, 201,
                "reserve {i} after SCRIPT and FUNCTION FLUSH: {body}"
            );
        }
        assert_eq!(p.a.counts(&drop).await, (10, 6, 4, 0));
        p.shutdown().await;
    }
}
