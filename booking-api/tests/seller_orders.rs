//! A drop's orders for its seller (`GET /v1/drops/{id}/orders`, `GET /v1/drops/{id}/orders.csv`):
//! items and payment state, searchable by fan and order id, paged with a bounded `limit`; for the
//! seller who owns the drop and ops only. The CSV parses back (RFC 4180 quoting) and a cell a
//! spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, CR first) starts with `'`.
mod common;

use common::{parse_csv, Harness};
use engine::config::DEFAULT_ORDERS_PAGE_MAX;
use serde_json::{json, Value};

/// Buys `quantity` TEEs for `fan` (exactly this fan id) and returns the order id.
async fn buy(h: &Harness, drop: &str, fan: &str, quantity: u32) -> String {
    let token = h.fan_token(fan).await;
    let (status, hold) = h
        .reserve(
            &token,
            drop,
            json!({"items": [{"sku": "TEE", "quantity": quantity}]}),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    let (status, order) = h
        .confirm(&token, hold["hold_id"].as_str().unwrap(), "ok_1")
        .await;
    assert_eq!(status, 201, "{order}");
    order["order_id"].as_str().unwrap().to_owned()
}

async fn orders(h: &Harness, drop: &str, query: &str, key: Option<&str>) -> (u16, Value) {
    h.get(&format!("/v1/drops/{drop}/orders{query}"), key).await
}

fn ids(v: &Value) -> Vec<String> {
    v["orders"]
        .as_array()
        .expect("orders")
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().to_owned())
        .collect()
}

fn code(v: &Value) -> Option<&str> {
    v["error"]["code"].as_str()
}

#[tokio::test]
async fn orders_have_items_and_payment_state_and_are_searchable_and_paged() {
    let h = Harness::start().await;
    let drop = h.ga_drop(20, 4, 60).await;
    let (alice, _) = h.fan("alice").await;
    let (bob, _) = h.fan("bob").await;
    let a1 = buy(&h, &drop, &alice, 2).await;
    let b1 = buy(&h, &drop, &bob, 1).await;
    let a2 = buy(&h, &drop, &alice, 1).await;

    let (status, v) = orders(&h, &drop, "", Some(&h.seller_key)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["drop_id"], drop);
    // Newest first.
    assert_eq!(ids(&v), vec![a2.clone(), b1.clone(), a1.clone()], "{v}");
    assert!(v["next_cursor"].is_null(), "{v}");
    let first = &v["orders"][2];
    assert_eq!(first["fan"], alice.as_str());
    assert_eq!(first["total_cents"], 5000);
    assert_eq!(first["payment_state"], "captured", "{first}");
    assert_eq!(
        first["items"],
        json!([{"sku": "TEE", "quantity": 2, "price_cents": 2500}])
    );

    // Search by fan, and by order id.
    let (status, v) = orders(&h, &drop, &format!("?fan={alice}"), Some(&h.seller_key)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(ids(&v), vec![a2.clone(), a1.clone()]);
    let (status, v) = orders(&h, &drop, &format!("?order_id={b1}"), Some(&h.ops_key)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(ids(&v), vec![b1.clone()]);
    let (status, v) = orders(&h, &drop, "?fan=nobody-here", Some(&h.seller_key)).await;
    assert_eq!((status, ids(&v).len()), (200, 0), "{v}");

    // Paged: each order once, in order, and the last page says so.
    let mut seen = Vec::new();
    let mut query = "?limit=1".to_owned();
    loop {
        let (status, v) = orders(&h, &drop, &query, Some(&h.seller_key)).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(ids(&v).len(), 1, "{v}");
        seen.extend(ids(&v));
        match v["next_cursor"].as_str() {
            Some(c) => query = format!("?limit=1&cursor={c}"),
            None => break,
        }
        assert!(seen.len() < 10, "paging never ends: {seen:?}");
    }
    assert_eq!(seen, vec![a2, b1, a1]);
}

#[tokio::test]
async fn orders_are_for_the_drops_seller_and_ops_only() {
    let h = Harness::start().await;
    let drop = h.ga_drop(5, 2, 60).await;
    let (fan, token) = h.fan("orders-auth").await;
    buy(&h, &drop, &fan, 1).await;
    let other =
        testkit::BookingClient::with_new_keys(h.base.clone(), &h.server.engine, "other").await;
    for path in ["orders", "orders.csv"] {
        let p = format!("/v1/drops/{drop}/{path}");
        let (status, v) = h.get(&p, Some(&other.seller_key)).await;
        assert_eq!((status, code(&v)), (403, Some("forbidden")), "{path}: {v}");
        let (status, v) = h.get(&p, Some(&token)).await;
        assert_eq!(
            (status, code(&v)),
            (401, Some("unauthorized")),
            "{path}: {v}"
        );
        let (status, v) = h.get(&p, None).await;
        assert_eq!(
            (status, code(&v)),
            (401, Some("unauthorized")),
            "{path}: {v}"
        );
        let r = h.send(h.http.get(h.url(&p)).bearer_auth(&h.ops_key)).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        let (status, v) = h
            .get(&format!("/v1/drops/dnope/{path}"), Some(&h.seller_key))
            .await;
        assert_eq!(
            (status, code(&v)),
            (404, Some("unknown_drop")),
            "{path}: {v}"
        );
    }
}

#[tokio::test]
async fn bad_search_or_paging_is_refused() {
    let h = Harness::start().await;
    let drop = h.ga_drop(5, 2, 60).await;
    let max = DEFAULT_ORDERS_PAGE_MAX;
    for query in [
        "?limit=0".to_owned(),
        format!("?limit={}", max + 1),
        "?limit=ten".to_owned(),
        "?cursor=not-a-cursor".to_owned(),
        "?fan=%3Dcmd".to_owned(),
        "?fan=".to_owned(),
        "?order_id=123".to_owned(),
    ] {
        let (status, v) = orders(&h, &drop, &query, Some(&h.seller_key)).await;
        assert_eq!(
            (status, code(&v)),
            (422, Some("invalid_request")),
            "{query}: {v}"
        );
        if !query.starts_with("?limit") && !query.starts_with("?cursor") {
            let (status, v) = h
                .get(
                    &format!("/v1/drops/{drop}/orders.csv{query}"),
                    Some(&h.seller_key),
                )
                .await;
            assert_eq!(
                (status, code(&v)),
                (422, Some("invalid_request")),
                "csv {query}: {v}"
            );
        }
    }
    let (status, v) = orders(&h, &drop, &format!("?limit={max}"), Some(&h.seller_key)).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn the_csv_parses_back_and_never_starts_a_cell_with_a_formula() {
    let h = Harness::start().await;
    let drop = h.ga_drop(20, 4, 60).await;
    let suffix = format!("{:08x}", rand::random::<u32>());
    let fans: Vec<String> = ["-cmd", "+cmd", "@cmd", "plain"]
        .iter()
        .map(|f| format!("{f}{suffix}"))
        .collect();
    let mut orders_made = Vec::new();
    for f in &fans {
        orders_made.push(buy(&h, &drop, f, 1).await);
    }

    let resp = h
        .http
        .get(h.url(&format!("/v1/drops/{drop}/orders.csv")))
        .bearer_auth(&h.seller_key)
        .send()
        .await
        .unwrap();
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ctype.starts_with("text/csv"), "{ctype}");
    let disposition = resp.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(disposition.starts_with("attachment"), "{disposition}");
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let rows = parse_csv(&text);
    assert_eq!(
        rows[0],
        [
            "order_id",
            "created_at",
            "fan",
            "items",
            "total_cents",
            "currency",
            "payment_state"
        ]
    );
    assert_eq!(rows.len(), 1 + fans.len(), "{text}");
    for (fan, order) in fans.iter().zip(&orders_made) {
        let row = rows
            .iter()
            .find(|r| &r[0] == order)
            .unwrap_or_else(|| panic!("{order} in {text}"));
        let want = if fan.starts_with(['-', '+', '@']) {
            format!("'{fan}")
        } else {
            fan.clone()
        };
        assert_eq!(row[2], want, "{text}");
        assert_eq!(row[3], "TEE x1", "{text}");
        assert_eq!(row[4], "2500");
        assert_eq!(row[6], "captured");
    }
    for row in &rows {
        for cell in row {
            assert!(
                !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
                "a cell a spreadsheet would run: {cell:?}"
            );
        }
    }

    // The same search as the JSON.
    let fan = &fans[1];
    let enc = fan.replace('+', "%2B").replace('@', "%40");
    let resp = h
        .http
        .get(h.url(&format!("/v1/drops/{drop}/orders.csv?fan={enc}")))
        .bearer_auth(&h.seller_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rows = parse_csv(&resp.text().await.unwrap());
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1][0], orders_made[1]);
}

/// The orders listing reads a drop's newest orders in order from `orders_drop_recent`
/// (migrations/0008_orders_index.sql) instead of sorting every order of the drop, for the first
/// page and a page after a cursor alike. Sequential and bitmap scans and sorts are off in the
/// EXPLAIN's transaction: for a test database's few orders per drop, reading them all and sorting
/// costs about as little as an ordered read, and the planner picks either; a drop with many orders
/// needs the ordered read, and with sorts off the plan shows whether one exists.
#[tokio::test]
async fn the_orders_listing_reads_the_drops_orders_from_its_index() {
    let h = Harness::start().await;
    let drop = h.ga_drop(20, 4, 60).await;
    let (fan, _) = h.fan("explained").await;
    buy(&h, &drop, &fan, 1).await;
    let mut db = h.server.engine.db().client().await.unwrap();
    let tx = db.transaction().await.unwrap();
    tx.batch_execute(
        "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; \
         SET LOCAL enable_sort = off",
    )
    .await
    .unwrap();
    let explain = format!("EXPLAIN {}", engine::booking::ORDERS_PAGE_SQL);
    let cursors = [
        (None, None),
        (
            Some(time::OffsetDateTime::now_utc()),
            Some(uuid::Uuid::nil()),
        ),
    ];
    for (at, id) in cursors {
        let plan: Vec<String> = tx
            .query(
                &explain,
                &[
                    &drop,
                    &None::<String>,
                    &None::<uuid::Uuid>,
                    &at,
                    &id,
                    &(i64::from(DEFAULT_ORDERS_PAGE_MAX) + 1),
                ],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Scan Backward using orders_drop_recent"),
            "cursor {at:?}: {plan}"
        );
        assert!(
            !plan.contains("Sort Key: o.created_at"),
            "the drop's orders sorted, cursor {at:?}: {plan}"
        );
    }
    tx.rollback().await.unwrap();
}
