//! docs/openapi.yaml and the servers agree: every route booking-api and queue-server answer
//! (their `routes::ROUTES`) is in the spec under the server's tag, every path the spec gives a
//! server is answered by a live one (never 404 `not_found`; another method on an API path is
//! 405), and the spec's error codes are engine/src/error.rs's. Schemathesis checks the shapes
//! against a live stack (contract/schemathesis.sh); this test needs no network fuzzing.

mod common;

use std::collections::BTreeSet;

use common::Harness;
use engine::Code;
use serde_json::Value;

const SPEC: &str = include_str!("../../docs/openapi.yaml");
const METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options"];

fn spec() -> Value {
    serde_norway::from_str(SPEC).expect("docs/openapi.yaml is YAML")
}

/// `/v1/drops/{drop_id}` → `/v1/drops/{}`: the spec names parameters, the route tables don't.
fn normalize(path: &str) -> String {
    path.split('/')
        .map(|s| if s.starts_with('{') { "{}" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

/// (METHOD, normalized path) of every operation the spec tags with `server`.
fn spec_routes(spec: &Value, server: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let tags = op["tags"].as_array().cloned().unwrap_or_default();
            if tags.iter().any(|t| t == server) {
                out.insert((method.to_uppercase(), normalize(path)));
            }
        }
    }
    out
}

fn table(routes: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    routes
        .iter()
        .map(|(m, p)| (m.to_string(), normalize(p)))
        .collect()
}

#[test]
fn every_route_is_in_the_spec_and_every_spec_route_is_a_route() {
    let spec = spec();
    for (server, routes) in [
        ("booking-api", booking_api::routes::ROUTES),
        ("queue-server", queue_server::routes::ROUTES),
    ] {
        let documented = spec_routes(&spec, server);
        let served = table(routes);
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty(),
            "{server} answers routes docs/openapi.yaml doesn't describe: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "docs/openapi.yaml describes {server} routes it doesn't have: {unserved:?}"
        );
    }
}

#[test]
fn spec_error_codes_are_the_code_table() {
    let spec = spec();
    let listed: Vec<&str> = spec["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode's enum")
        .iter()
        .map(|v| v.as_str().expect("a code"))
        .collect();
    let table: Vec<&str> = Code::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(listed, table, "docs/openapi.yaml's ErrorCode vs Code::ALL");

    let frames: Value =
        serde_json::from_str(include_str!("../../docs/ws-frames.schema.json")).unwrap();
    let in_frames: Vec<&str> = frames["$defs"]["error_code"]["enum"]
        .as_array()
        .expect("error_code's enum")
        .iter()
        .map(|v| v.as_str().expect("a code"))
        .collect();
    assert_eq!(
        in_frames, table,
        "docs/ws-frames.schema.json's error_code vs Code::ALL"
    );
}

/// A path with its parameters filled with well-formed values (ids of nothing: the answer may be
/// 401 or an `unknown_*` 404, but never the router's `not_found`).
fn sample(path: &str) -> String {
    path.split('/')
        .map(|s| match s {
            "{drop_id}" => "d0123456789abcdef",
            "{hold_id}" => "d0123456789abcdef-h0123456789abcdef",
            "{order_id}" => "00000000-0000-4000-8000-000000000000",
            "{name}" => "fan.js",
            "{sku}" => "TEE",
            s if s.starts_with('{') => panic!("no sample for path parameter {s}"),
            s => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

async fn answer(h: &Harness, base: &str, method: &str, path: &str) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let r = h
        .http
        .request(method, format!("{base}{path}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spec_path_is_answered_by_its_server() {
    let h = Harness::start().await;
    let spec = spec();
    let servers = [
        ("booking-api", h.booking.url()),
        ("queue-server", h.queue.url()),
    ];
    for (server, base) in &servers {
        for (path, item) in spec["paths"].as_object().unwrap() {
            let mut methods = Vec::new();
            for (method, op) in item.as_object().unwrap() {
                let tags = op["tags"].as_array().cloned().unwrap_or_default();
                if METHODS.contains(&method.as_str()) && tags.iter().any(|t| t == server) {
                    methods.push(method.to_uppercase());
                }
            }
            if methods.is_empty() {
                continue;
            }
            let url_path = sample(path);
            for method in &methods {
                let (status, body) = answer(&h, base, method, &url_path).await;
                assert!(
                    !(status == 404 && body["error"]["code"] == "not_found") && status != 405,
                    "{server}: {method} {url_path} (docs/openapi.yaml's {path}) answered {status} {body}"
                );
            }
            // A method the spec doesn't give an API path: the path is known, so 405 (service
            // endpoints and pages answer 404, docs/API.md).
            if !path.starts_with("/v1/") {
                continue;
            }
            let other = ["PATCH", "DELETE", "PUT"]
                .into_iter()
                .find(|m| !methods.iter().any(|x| x == m))
                .unwrap();
            let r = h
                .http
                .request(
                    reqwest::Method::from_bytes(other.as_bytes()).unwrap(),
                    format!("{base}{url_path}"),
                )
                .send()
                .await
                .unwrap();
            // RFC 9110: a 405 lists the methods the path has.
            let allow: BTreeSet<String> = r
                .headers()
                .get("allow")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .split(',')
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect();
            let (status, body) = testkit::answer(r).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (405, Some("method_not_allowed")),
                "{server}: {other} {url_path} answered {body}"
            );
            let expected: BTreeSet<String> = methods.iter().cloned().collect();
            assert_eq!(allow, expected, "{server}: Allow of {other} {url_path}");
        }
        let (status, body) = answer(&h, base, "GET", "/v1/nothing-here").await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found"))
        );
    }
    h.shutdown().await;
}
