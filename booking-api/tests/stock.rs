//! Sellers add stock to a SKU of an open drop (`POST /v1/drops/{id}/skus/{sku}/stock`): Postgres'
//! total rises first, with a `restock` ledger line, then Redis'; a request id (required) makes it
//! idempotent; a rebuild keeps the added units; bad input is refused and changes nothing; and
//! restocks racing a sell-out keep `available + held + sold == total` with Postgres in step.
mod common;

use common::Harness;
use engine::ids::DropId;
use futures::future::join_all;
use serde_json::{json, Value};
use testkit::BookingClient;

async fn add_stock(h: &Harness, drop: &str, sku: &str, body: Value) -> (u16, Value) {
    h.seller_post(&format!("/v1/drops/{drop}/skus/{sku}/stock"), body)
        .await
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// Postgres' side of a bucket: (inventory.total, sum of the ledger's delta_total beyond the
/// load, restock lines).
async fn pg_totals(h: &Harness, drop: &str, bucket: &str) -> (i64, i64, i64) {
    let db = h.server.engine.db().client().await.unwrap();
    let row = db
        .query_one(
            "SELECT (SELECT total::bigint FROM inventory WHERE drop_id = $1 AND bucket = $2), \
             (SELECT coalesce(sum(delta_total), 0)::bigint FROM stock_ledger \
                WHERE drop_id = $1 AND bucket = $2), \
             (SELECT count(*) FROM stock_ledger WHERE drop_id = $1 AND bucket = $2 AND kind = 'restock')",
            &[&drop, &bucket],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// A fan reserves and pays for one TEE; the HTTP status of the reserve (201 when it bought).
async fn buy_one(h: &Harness, drop: &str, name: &str) -> u16 {
    let (_, token) = h.fan(name).await;
    let (status, v) = h
        .reserve(
            &token,
            drop,
            json!({"items": [{"sku": "TEE", "quantity": 1}]}),
        )
        .await;
    if status != 201 {
        assert_eq!(status, 409, "{v}");
        assert!(
            ["sold_out", "all_held", "insufficient_stock"].contains(&code(&v)),
            "{v}"
        );
        return status;
    }
    let hold = v["hold_id"].as_str().unwrap().to_owned();
    let (status, v) = h.confirm(&token, &hold, &format!("ok_{name}")).await;
    assert_eq!(status, 201, "{v}");
    201
}

#[tokio::test]
async fn added_stock_is_in_postgres_and_redis_once_per_request_id_and_survives_a_rebuild() {
    let h = Harness::start().await;
    let drop = h.ga_drop(2, 5, 60).await;
    assert_eq!(buy_one(&h, &drop, "first").await, 201);
    assert_eq!(buy_one(&h, &drop, "second").await, 201);
    assert_eq!(h.counts(&drop).await, (2, 0, 0, 2));
    assert_eq!(buy_one(&h, &drop, "late").await, 409);

    let body = json!({"add": 3, "request_id": "restock-1"});
    let (status, v) = add_stock(&h, &drop, "TEE", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"drop_id": drop, "sku": "TEE", "added": 3, "total": 5, "available": 3})
    );
    assert_eq!(h.counts(&drop).await, (5, 3, 0, 2));
    assert_eq!(pg_totals(&h, &drop, "TEE").await, (5, 3, 1));
    h.assert_invariants(&drop).await;

    // The same request again adds nothing and answers the SKU as it is.
    let (status, v) = add_stock(&h, &drop, "TEE", body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["added"], 0, "{v}");
    assert_eq!(v["total"], 5, "{v}");
    assert_eq!(pg_totals(&h, &drop, "TEE").await, (5, 3, 1));
    // The same id with another amount is another request under a used id.
    let (status, v) = add_stock(
        &h,
        &drop,
        "TEE",
        json!({"add": 4, "request_id": "restock-1"}),
    )
    .await;
    assert_eq!((status, code(&v)), (422, "idempotency_key_reused"), "{v}");
    // Another id adds again.
    let (status, v) = add_stock(
        &h,
        &drop,
        "TEE",
        json!({"add": 1, "request_id": "restock-2"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["total"], 6, "{v}");
    assert_eq!(pg_totals(&h, &drop, "TEE").await, (6, 4, 2));

    // The added units sell.
    assert_eq!(buy_one(&h, &drop, "third").await, 201);
    assert_eq!(h.counts(&drop).await, (6, 3, 0, 3));
    h.assert_invariants(&drop).await;

    // A rebuild takes the total from Postgres, added units included.
    let d = DropId::parse(&drop).unwrap();
    h.server.engine.recover(&d).await.unwrap();
    assert_eq!(h.counts(&drop).await, (6, 3, 0, 3));
    h.assert_invariants(&drop).await;
}

#[tokio::test]
async fn bad_restocks_are_refused_and_change_nothing() {
    let h = Harness::start().await;
    let drop = h.ga_drop(4, 5, 60).await;
    let seated = h
        .create_drop(json!({
            "name": "seated", "per_fan_limit": 2, "hold_ttl_s": 60, "admission": {"mode": "open"},
            "inventory": {"kind": "seated", "sections": [
                {"section": "A", "price_cents": 100, "rows": [{"row": "1", "seats": 4}]}]}
        }))
        .await;
    let max = engine::config::DEFAULT_MAX_UNITS_PER_SKU;
    let cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        (
            &drop,
            "TEE",
            json!({"add": 0, "request_id": "r1"}),
            422,
            "invalid_request",
        ),
        (
            &drop,
            "TEE",
            json!({"add": -3, "request_id": "r1"}),
            422,
            "invalid_request",
        ),
        (
            &drop,
            "TEE",
            json!({"add": max, "request_id": "r1"}),
            422,
            "invalid_request",
        ),
        (
            &drop,
            "TEE",
            json!({"add": 1.5, "request_id": "r1"}),
            422,
            "invalid_request",
        ),
        (
            &drop,
            "TEE",
            json!({"add": "2", "request_id": "r1"}),
            422,
            "invalid_request",
        ),
        (
            &drop,
            "TEE",
            json!({"request_id": "r1"}),
            422,
            "invalid_request",
        ),
        // Every write is idempotent: a restock without its request id is refused.
        (&drop, "TEE", json!({"add": 1}), 422, "invalid_request"),
        (
            &drop,
            "TEE",
            json!({"add": 1, "request_id": null}),
            422,
            "invalid_request",
        ),
        (
            &drop,
            "TEE",
            json!({"add": 1, "request_id": "r1", "extra": true}),
            422,
            "invalid_request",
        ),
        (
            &drop,
            "TEE",
            json!({"add": 1, "request_id": ""}),
            422,
            "invalid_request",
        ),
        (
            &drop,
            "TEE",
            json!({"add": 1, "request_id": "has space"}),
            422,
            "invalid_request",
        ),
        (
            &drop,
            "HOODIE",
            json!({"add": 1, "request_id": "r1"}),
            404,
            "unknown_sku",
        ),
        (
            &seated,
            "A",
            json!({"add": 1, "request_id": "r1"}),
            404,
            "unknown_sku",
        ),
        (
            "d_nosuchdrop",
            "TEE",
            json!({"add": 1, "request_id": "r1"}),
            404,
            "unknown_drop",
        ),
    ];
    for (d, sku, body, want_status, want_code) in cases {
        let (status, v) = add_stock(&h, d, sku, body.clone()).await;
        assert_eq!((status, code(&v)), (want_status, want_code), "{body}: {v}");
    }
    let (_, v) = add_stock(&h, &drop, "TEE", json!({"add": 1})).await;
    let message = v["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("request_id"), "names the field: {v}");
    let (status, v) = h
        .call(
            h.http
                .post(h.url(&format!("/v1/drops/{drop}/skus/TEE/stock")))
                .bearer_auth(&h.seller_key)
                .header("content-type", "application/json")
                .body("{\"add\": "),
        )
        .await;
    assert_eq!((status, code(&v)), (400, "malformed_json"), "{v}");
    // No key, an ops key, another seller's key.
    let url = h.url(&format!("/v1/drops/{drop}/skus/TEE/stock"));
    let good = json!({"add": 1, "request_id": "r1"});
    let (status, _) = h.call(h.http.post(&url).json(&good)).await;
    assert_eq!(status, 401);
    let (status, v) = h
        .call(h.http.post(&url).bearer_auth(&h.ops_key).json(&good))
        .await;
    assert_eq!((status, code(&v)), (403, "forbidden"), "{v}");
    let other = BookingClient::with_new_keys(h.server.url(), &h.server.engine, "other").await;
    let (status, v) = other
        .seller_post(&format!("/v1/drops/{drop}/skus/TEE/stock"), good.clone())
        .await;
    assert_eq!((status, code(&v)), (403, "forbidden"), "{v}");
    assert_eq!(h.counts(&drop).await, (4, 4, 0, 0));
    assert_eq!(pg_totals(&h, &drop, "TEE").await, (4, 0, 0));
    assert_eq!(pg_totals(&h, &seated, "A").await, (4, 0, 0));

    // A closed drop takes no stock.
    let (status, _) = h
        .seller_post(&format!("/v1/drops/{drop}/close"), json!({}))
        .await;
    assert_eq!(status, 200);
    let (status, v) = add_stock(&h, &drop, "TEE", good).await;
    assert_eq!((status, code(&v)), (409, "drop_closed"), "{v}");
    assert_eq!(pg_totals(&h, &drop, "TEE").await, (4, 0, 0));
    assert_eq!(h.counts(&drop).await, (4, 4, 0, 0));
}

/// A drop lost from Redis (flushed, its rebuild not yet run) when a restock arrives: Postgres
/// takes the units first, so the answer is a 503 to retry, never a 404 that says nothing was
/// added; the retry under the same id adds nothing twice, and the rebuild brings the units.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restock_of_a_drop_lost_from_redis_is_a_503_to_retry() {
    let h = Harness::start().await;
    let drop = h.ga_drop(4, 1, 60).await;
    let key = |name: &str| format!("fg:{{{drop}}}:{name}");
    common::redis_cli(&["DEL", &key("meta"), &key("stock")]).await;
    let body = json!({"add": 3, "request_id": "lost-1"});
    let (status, v) = add_stock(&h, &drop, "TEE", body.clone()).await;
    assert_eq!((status, code(&v)), (503, "recovering"), "{v}");
    assert_eq!(pg_totals(&h, &drop, "TEE").await, (7, 3, 1));
    let mut retried = (0, Value::Null);
    for _ in 0..600 {
        retried = add_stock(&h, &drop, "TEE", body.clone()).await;
        if retried.0 == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(retried.0, 200, "{}", retried.1);
    assert_eq!(retried.1["added"], 0);
    assert_eq!(retried.1["total"], 7);
    assert_eq!(pg_totals(&h, &drop, "TEE").await, (7, 3, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restocks_racing_a_sell_out_keep_the_books() {
    let h = Harness::start().await;
    let drop = h.ga_drop(20, 1, 60).await;
    // 60 fans each buy one while 10 restocks of 2 (two of them sent twice under one id) land.
    let buys = join_all((0..60).map(|i| {
        let (h, drop) = (&h, &drop);
        async move { buy_one(h, drop, &format!("racer{i}")).await }
    }));
    let restocks = join_all((0..12).map(|i| {
        let (h, drop) = (&h, &drop);
        async move {
            let id = format!("race-{}", i % 10);
            add_stock(h, drop, "TEE", json!({"add": 2, "request_id": id})).await
        }
    }));
    let (bought, restocked) = tokio::join!(buys, restocks);
    for (status, v) in &restocked {
        assert_eq!(*status, 200, "{v}");
    }
    let added: i64 = restocked
        .iter()
        .map(|(_, v)| v["added"].as_i64().unwrap())
        .sum();
    assert_eq!(added, 20, "ten distinct request ids of 2 each");
    let sold = bought.iter().filter(|s| **s == 201).count() as i64;
    let (total, available, held, sold_redis) = h.counts(&drop).await;
    assert_eq!(total, 40);
    assert_eq!(held, 0);
    assert_eq!(sold_redis, sold);
    assert_eq!(available, 40 - sold);
    assert_eq!(pg_totals(&h, &drop, "TEE").await, (40, 20, 10));
    h.assert_invariants(&drop).await;
    // Whatever the race left unsold still sells.
    for i in 0..available {
        assert_eq!(buy_one(&h, &drop, &format!("after{i}")).await, 201);
    }
    assert_eq!(h.counts(&drop).await, (40, 0, 0, 40));
    h.assert_invariants(&drop).await;
}
