//! Seat maps at scale (`GET /v1/drops/{id}/seats`): every request of a process is served from
//! one snapshot per drop, read once per refresh however many requests wait; the map is compact
//! (a string of state characters per row); an unchanged map answers 304 to its `ETag`.

mod common;

use common::Harness;
use serde_json::{json, Value};

/// A seated drop: section A rows 1 and 2 of `per_row` seats, section B one row of 5.
async fn seated(h: &Harness, per_row: u32) -> String {
    h.create_drop(json!({
        "name": "seat map", "per_fan_limit": 4, "hold_ttl_s": 300,
        "admission": {"mode": "open"},
        "inventory": {"kind": "seated", "sections": [
            {"section": "A", "price_cents": 9000,
             "rows": [{"row": "1", "seats": per_row}, {"row": "2", "seats": per_row}]},
            {"section": "B", "price_cents": 5000, "rows": [{"row": "1", "seats": 5}]}
        ]}
    }))
    .await
}

/// (status, ETag, body) of one GET of the map, sending `If-None-Match` when given.
async fn get_map(h: &Harness, drop: &str, if_none_match: Option<&str>) -> (u16, String, String) {
    let mut req = h.http.get(h.url(&format!("/v1/drops/{drop}/seats")));
    if let Some(tag) = if_none_match {
        req = req.header("if-none-match", tag);
    }
    let r = req.send().await.expect("the server answers");
    let status = r.status().as_u16();
    let etag = r
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, etag, r.text().await.unwrap_or_default())
}

/// The state character of `seat` (`S-R-n`) in a map's body.
fn state_of(map: &Value, seat: &str) -> char {
    let mut parts = seat.split('-');
    let (section, row, n) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap().parse::<usize>().unwrap(),
    );
    let sec = map["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["section"] == section)
        .unwrap_or_else(|| panic!("no section {section} in {map}"));
    let row = sec["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["row"] == row)
        .unwrap_or_else(|| panic!("no row {row} in {map}"));
    row["states"].as_str().unwrap().chars().nth(n - 1).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_gets_of_one_map_share_one_read() {
    let mut cfg = testkit::test_config();
    // No refresh within the test: every GET after the first read is served from it.
    cfg.seats.map_refresh_ms = 600_000;
    let h = Harness::with_config(cfg).await;
    let drop = seated(&h, 20).await;
    let engine = &h.server.engine;
    let before = engine.seat_map_reads();
    let gets = (0..200).map(|_| {
        let h = h.client.clone();
        let drop = drop.clone();
        tokio::spawn(async move {
            let r = h
                .http
                .get(h.url(&format!("/v1/drops/{drop}/seats")))
                .send()
                .await
                .expect("the server answers");
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (
                status,
                body["version"].as_str().unwrap_or_default().to_owned(),
            )
        })
    });
    let mut versions = std::collections::HashSet::new();
    for g in futures::future::join_all(gets).await {
        let (status, version) = g.unwrap();
        assert_eq!(status, 200);
        versions.insert(version);
    }
    assert_eq!(versions.len(), 1, "one snapshot: {versions:?}");
    assert_eq!(
        engine.seat_map_reads() - before,
        1,
        "200 concurrent GETs cost one read of the map"
    );
    // And the next polls cost none until the refresh.
    for _ in 0..20 {
        assert_eq!(get_map(&h, &drop, None).await.0, 200);
    }
    assert_eq!(engine.seat_map_reads() - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_read_again_after_the_refresh_interval() {
    let mut cfg = testkit::test_config();
    cfg.seats.map_refresh_ms = 200;
    let h = Harness::with_config(cfg).await;
    let drop = seated(&h, 6).await;
    ok(get_map(&h, &drop, None).await);
    let (_, fan) = h.fan("picker").await;
    let (status, v) = h.reserve(&fan, &drop, json!({"seats": ["A-2-3"]})).await;
    assert_eq!(status, 201, "{v}");
    testkit::wait::eventually("the map shows the hold after a refresh", || async {
        let (status, _, body) = get_map(&h, &drop, None).await;
        let map: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        status == 200 && state_of(&map, "A-2-3") == 'h'
    })
    .await;
}

/// (ETag, body) of a 200.
fn ok((status, etag, body): (u16, String, String)) -> (String, String) {
    assert_eq!(status, 200, "{body}");
    (etag, body)
}

#[tokio::test]
async fn an_unchanged_map_answers_304_to_its_etag() {
    let h = Harness::start().await;
    let drop = seated(&h, 8).await;
    let (etag, body) = ok(get_map(&h, &drop, None).await);
    let map: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(etag, format!("\"{}\"", map["version"].as_str().unwrap()));

    // Unchanged: 304, no body, the same ETag (also in a list, or weak).
    let (status, again, body) = get_map(&h, &drop, Some(&etag)).await;
    assert_eq!(
        (status, again.as_str(), body.as_str()),
        (304, etag.as_str(), "")
    );
    let listed = format!("\"other\", W/{etag}");
    assert_eq!(get_map(&h, &drop, Some(&listed)).await.0, 304);
    assert_eq!(get_map(&h, &drop, Some("\"other\"")).await.0, 200);

    // A seat changes: the old ETag gets the new map.
    let (_, fan) = h.fan("changer").await;
    let (status, v) = h.reserve(&fan, &drop, json!({"seats": ["A-1-2"]})).await;
    assert_eq!(status, 201, "{v}");
    let (status, held_tag, body) = get_map(&h, &drop, Some(&etag)).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(held_tag, etag);
    let map: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state_of(&map, "A-1-2"), 'h');

    // Sold, then another change of state, another version.
    let hold = v["hold_id"].as_str().unwrap();
    let (status, v) = h.confirm(&fan, hold, "ok_seatmap").await;
    assert_eq!(status, 201, "{v}");
    let (sold_tag, body) = ok(get_map(&h, &drop, Some(&held_tag)).await);
    assert_ne!(sold_tag, held_tag);
    let map: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state_of(&map, "A-1-2"), 's');
    assert_eq!(state_of(&map, "A-1-1"), 'f');
}

#[tokio::test]
async fn the_map_is_a_string_of_states_per_row() {
    let h = Harness::start().await;
    let drop = seated(&h, 8).await;
    let (_, fan) = h.fan("shape").await;
    let (status, v) = h
        .reserve(&fan, &drop, json!({"seats": ["A-1-1", "B-1-5"]}))
        .await;
    assert_eq!(status, 201, "{v}");
    let (_, body) = ok(get_map(&h, &drop, None).await);
    let map: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(map["drop_id"], drop.as_str());
    assert!(map["server_now_ms"].as_i64().unwrap() > 0);
    assert_eq!(
        map["sections"],
        json!([
            {"section": "A", "rows": [
                {"row": "1", "states": "hfffffff"},
                {"row": "2", "states": "ffffffff"}]},
            {"section": "B", "rows": [{"row": "1", "states": "ffffh"}]}
        ]),
        "{map}"
    );
    assert!(map.get("seats").is_none(), "no object per seat: {map}");
}

#[tokio::test]
async fn a_map_larger_than_a_scan_step_is_read_whole() {
    let mut cfg = testkit::test_config();
    // Many GETRANGE steps for one map (and many HSCAN steps when it is read from the hash).
    cfg.seats.map_read_bytes = 7;
    cfg.seats.map_scan_chunk = 7;
    cfg.seats.map_refresh_ms = 0;
    let h = Harness::with_config(cfg).await;
    let drop = seated(&h, 400).await;
    let (_, fan) = h.fan("scanner").await;
    let (status, v) = h
        .reserve(&fan, &drop, json!({"seats": ["A-2-400", "A-1-1", "B-1-5"]}))
        .await;
    assert_eq!(status, 201, "{v}");
    let rows = |body: &str| -> Vec<String> {
        let map: Value = serde_json::from_str(body).unwrap();
        map["sections"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["rows"].as_array().unwrap())
            .map(|r| r["states"].as_str().unwrap().to_owned())
            .collect()
    };
    let expected = vec![
        format!("h{}", "f".repeat(399)),
        format!("{}h", "f".repeat(399)),
        "ffffh".to_owned(),
    ];
    let (tag, body) = ok(get_map(&h, &drop, None).await);
    assert_eq!(rows(&body), expected, "from the seat map string");
    // A drop loaded by a release before the string existed has none: its map is read from the
    // seats hash, and is the same map (the same version).
    let id = engine::ids::DropId::parse(&drop).unwrap();
    h.server
        .engine
        .redis()
        .test_forget_seat_map(&id)
        .await
        .unwrap();
    let (tag_from_hash, body) = ok(get_map(&h, &drop, None).await);
    assert_eq!(rows(&body), expected, "from the seats hash");
    assert_eq!(tag_from_hash, tag);
}

#[tokio::test]
async fn a_process_keeps_at_most_its_bound_of_maps() {
    let mut cfg = testkit::test_config();
    cfg.seats.map_refresh_ms = 600_000;
    cfg.seats.map_cache_drops = 2;
    let h = Harness::with_config(cfg).await;
    let drops = [
        seated(&h, 3).await,
        seated(&h, 3).await,
        seated(&h, 3).await,
    ];
    let engine = &h.server.engine;
    let before = engine.seat_map_reads();
    for d in &drops[..2] {
        ok(get_map(&h, d, None).await);
        ok(get_map(&h, d, None).await);
    }
    assert_eq!(
        engine.seat_map_reads() - before,
        2,
        "two maps, one read each"
    );
    // A third drop pushes out the map read longest ago (the first), which costs a read again.
    ok(get_map(&h, &drops[2], None).await);
    ok(get_map(&h, &drops[1], None).await);
    assert_eq!(engine.seat_map_reads() - before, 3);
    ok(get_map(&h, &drops[0], None).await);
    assert_eq!(engine.seat_map_reads() - before, 4);
}

#[tokio::test]
async fn best_available_examines_a_bounded_number_of_seats() {
    let mut cfg = testkit::test_config();
    // Row 1 (20 seats) and row 2 are read; row 3 is past the bound.
    cfg.seats.best_scan_seats_max = 21;
    let h = Harness::with_config(cfg).await;
    let drop = h
        .create_drop(json!({
            "name": "bounded best", "per_fan_limit": 50, "hold_ttl_s": 300,
            "admission": {"mode": "open"},
            "inventory": {"kind": "seated", "sections": [
                {"section": "A", "price_cents": 9000, "rows": [
                    {"row": "1", "seats": 20}, {"row": "2", "seats": 20}, {"row": "3", "seats": 20}]}
            ]}
        }))
        .await;
    // Rows 1 and 2 taken whole, by named seats.
    let (_, fan) = h.fan("filler").await;
    for row in 1..=2 {
        let seats: Vec<String> = (1..=20).map(|n| format!("A-{row}-{n}")).collect();
        let (status, v) = h.reserve(&fan, &drop, json!({ "seats": seats })).await;
        assert_eq!(status, 201, "{v}");
    }
    // Row 3 is all free, but past the bound: best-available doesn't look there.
    let (_, other) = h.fan("best").await;
    let (status, v) = h
        .reserve(
            &other,
            &drop,
            json!({"best_available": {"section": "A", "quantity": 2}}),
        )
        .await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_stock", "{v}");
    assert_eq!(v["error"]["detail"]["adjacent"], false, "{v}");
    // Named seats there still sell.
    let (status, v) = h
        .reserve(&other, &drop, json!({"seats": ["A-3-1", "A-3-2"]}))
        .await;
    assert_eq!(status, 201, "{v}");
    h.assert_invariants(&drop).await;
}
