//! docs/ops/ and the servers agree: every metric the alert rules (docs/ops/alerts.yml) and the
//! Grafana dashboard (docs/ops/grafana-dashboard.json) name is one the servers export (a name in
//! engine/src/metrics.rs, histograms with their `_bucket`/`_sum`/`_count` series), the five alerts
//! the ops console promises are there with a `for:` and a summary, the dashboard has a panel for
//! each per-drop figure, and the scrape config knows how `/metrics` is protected. So a renamed
//! metric fails here instead of silently emptying a panel or an alert.

use std::collections::BTreeSet;

use engine::drop_metrics::EXPORTED;
use serde_json::Value;

const METRICS_RS: &str = include_str!("../src/metrics.rs");
const ALERTS: &str = include_str!("../../docs/ops/alerts.yml");
const PROMETHEUS: &str = include_str!("../../docs/ops/prometheus.yml");
const DASHBOARD: &str = include_str!("../../docs/ops/grafana-dashboard.json");

/// Every metric name engine/src/metrics.rs defines (the string literals `"floodgate_…"`).
fn exported() -> BTreeSet<String> {
    METRICS_RS
        .split('"')
        .filter(|s| {
            s.starts_with("floodgate_")
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

/// The `floodgate_…` metric names a PromQL expression mentions.
fn named(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("floodgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

fn is_exported(name: &str, exported: &BTreeSet<String>) -> bool {
    exported.contains(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|s| name.strip_suffix(s).is_some_and(|b| exported.contains(b)))
}

#[test]
fn the_per_drop_metrics_are_in_metrics_rs() {
    let exported = exported();
    for (name, _, _) in EXPORTED {
        assert!(
            exported.contains(name),
            "{name} is not in engine/src/metrics.rs"
        );
    }
}

#[test]
fn alerts_name_only_exported_metrics_and_have_for_and_a_summary() {
    let exported = exported();
    let doc: Value = serde_norway::from_str(ALERTS).expect("docs/ops/alerts.yml is YAML");
    let mut alerts = BTreeSet::new();
    for group in doc["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("an alert name").to_owned();
            let expr = rule["expr"].as_str().expect("an expr");
            assert!(rule["for"].is_string(), "{name}: no `for:`");
            assert!(
                rule["annotations"]["summary"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name}: no summary"
            );
            let metrics = named(expr);
            assert!(!metrics.is_empty(), "{name}: names no floodgate metric");
            for m in metrics {
                assert!(is_exported(&m, &exported), "{name}: {m} is not exported");
            }
            alerts.insert(name);
        }
    }
    // The ops console's five: line growing while paused, constraint refusals, confirm backlog,
    // recovering drops, 5xx rate.
    for want in [
        "FloodgateLineGrowingWhilePaused",
        "FloodgateConstraintRefusals",
        "FloodgateConfirmBacklog",
        "FloodgateDropRecovering",
        "FloodgateServerErrors",
    ] {
        assert!(alerts.contains(want), "no alert {want}: {alerts:?}");
    }
}

#[test]
fn the_dashboard_names_only_exported_metrics_and_shows_every_figure() {
    let exported = exported();
    let doc: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut shown = BTreeSet::new();
    for panel in doc["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("a title");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("an expr");
            for m in named(expr) {
                assert!(is_exported(&m, &exported), "{title}: {m} is not exported");
                shown.insert(m);
            }
        }
    }
    let var = doc["templating"]["list"][0]["query"]
        .as_str()
        .expect("the drop variable");
    for m in named(var) {
        assert!(
            is_exported(&m, &exported),
            "the drop variable: {m} is not exported"
        );
    }
    // Every per-drop figure has a panel (the drop count is the exporter's own health).
    for (name, _, _) in EXPORTED {
        if name == engine::metrics::DROP_METRICS_DROPS {
            continue;
        }
        assert!(shown.contains(name), "no panel shows {name}");
    }
    for name in [
        "floodgate_reserve_seconds_bucket",
        "floodgate_confirm_seconds_bucket",
        engine::metrics::HTTP_REQUESTS,
        engine::metrics::CONSTRAINT_REFUSALS,
    ] {
        assert!(shown.contains(name), "no panel shows {name}");
    }
}

#[test]
fn the_scrape_config_reads_the_rules_and_scrapes_both_ways() {
    let doc: Value = serde_norway::from_str(PROMETHEUS).expect("docs/ops/prometheus.yml is YAML");
    let rules = doc["rule_files"].as_array().expect("rule_files");
    assert!(rules.iter().any(|r| r == "alerts.yml"), "{rules:?}");
    let jobs = doc["scrape_configs"].as_array().expect("scrape_configs");
    // The internal listener needs no key; the public one an ops key from a file, never inline.
    assert!(jobs.iter().any(|j| j["authorization"].is_null()));
    let public = jobs
        .iter()
        .find(|j| !j["authorization"].is_null())
        .expect("a job with the ops key");
    assert_eq!(public["authorization"]["type"], "Bearer");
    assert!(public["authorization"]["credentials_file"].is_string());
    assert!(public["authorization"]["credentials"].is_null());
    for j in jobs {
        assert_eq!(j["metrics_path"], "/metrics");
    }
}

/// Where promtool is installed (Debian: `apt-get install prometheus`), the rules check and their
/// unit tests (docs/ops/alerts_test.yml: each alert fires on its case, and not before its `for:`)
/// pass. Elsewhere this says so and checks nothing more: the tests above still run.
#[test]
fn promtool_checks_and_tests_the_rules_where_installed() {
    let ops = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ops");
    let run = |args: &[&str]| {
        std::process::Command::new("promtool")
            .args(args)
            .current_dir(&ops)
            .output()
    };
    let Ok(out) = run(&["check", "rules", "alerts.yml"]) else {
        eprintln!("promtool not installed: docs/ops/alerts_test.yml not run");
        return;
    };
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["test", "rules", "alerts_test.yml"]).expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
