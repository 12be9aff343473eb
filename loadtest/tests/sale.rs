//! `loadtest sale` as a test of the scenario itself: a short sale (a few hundred fans, some on
//! WebSockets, some HTTP-only, a pre-queue, hostile fans) against a real booking-api and
//! queue-server started in process on the Redis and Postgres that `./dev test` started. It must
//! sell exactly its stock, hold every invariant, and write its text, JSON and HTML reports; the
//! HTML report must open in headless Chromium with its charts and no script error.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{config, Servers};

const FANS: usize = 240;
const WS_FANS: usize = 120;
const STOCK: u64 = 40;
/// Generous: the sale itself takes seconds; a busy machine may take much longer.
const RUN_LIMIT: Duration = Duration::from_secs(300);

fn out_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "floodgate-sale-test-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("a report directory");
    dir
}

/// `loadtest sale` against `s`'s servers, Redis and Postgres; the test adds the rest.
fn sale(s: &Servers) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadtest"));
    cmd.args(["sale", "--quiet"])
        .args(["--booking-url", &s.booking.url()])
        .args(["--queue-url", &s.queue.url()])
        .args(["--seller-key", &s.client.seller_key])
        .args(["--database-url", &s.database_url])
        .args(["--redis-url", &s.redis_url])
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_sale_sells_exactly_its_stock_and_reports_it() {
    let mut cfg = config();
    // Admission counts a fan whose hold was abandoned as still shopping until the hold's expiry
    // plus the confirm grace, and one who released until the shop window ends: keep both short
    // so the units they gave back are sold within the test.
    cfg.holds.confirm_grace_ms = 1_000;
    let servers = Servers::start(cfg, "loadtest-sale").await;
    let dir = out_dir();
    let (json_path, html_path, text_path) = (
        dir.join("sale.json"),
        dir.join("sale.html"),
        dir.join("sale.txt"),
    );

    let run = sale(&servers)
        .args(["--fans", &FANS.to_string()])
        .args(["--ws-fans", &WS_FANS.to_string()])
        .args(["--stock", &STOCK.to_string()])
        .args(["--client-procs", "1"])
        .args(["--pre-queue-pct", "10", "--pre-open-s", "2"])
        .args(["--shop-window-s", "10"])
        .args(["--rate-per-s", "40", "--burst", "20"])
        .args(["--hold-ttl-s", "2", "--think-ms", "50"])
        .args(["--pay-pct", "85", "--release-pct", "5"])
        .args(["--hostile-pct", "20"])
        .args(["--poll-ms", "1000", "--join-rate-per-s", "200"])
        .args(["--sold-out-grace-s", "2", "--max-duration-s", "120"])
        .args(["--json", json_path.to_str().unwrap()])
        .args(["--html", html_path.to_str().unwrap()])
        .args(["--text", text_path.to_str().unwrap()])
        .output();
    let out = tokio::time::timeout(RUN_LIMIT, run)
        .await
        .expect("the sale ends")
        .expect("loadtest sale runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadtest sale failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    println!("{stdout}");

    // The text summary: on stdout and in its file.
    let text = std::fs::read_to_string(&text_path).expect("the text report");
    assert_eq!(text, stdout, "the file holds what stdout showed");
    assert!(text.contains("every invariant held"), "{text}");

    // The JSON report.
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json_path).expect("the JSON report"))
            .expect("the JSON report parses");
    let o = &report["outcome"];
    assert_eq!(o["sold_api"], STOCK, "{report:#}");
    assert_eq!(o["sold_pg_inventory"], STOCK, "{report:#}");
    assert_eq!(o["sold_pg_items"], STOCK, "{report:#}");
    assert_eq!(o["pg_fans_over_limit"], 0, "{report:#}");
    assert_eq!(report["invariants_held"], true, "{report:#}");
    for c in report["checks"].as_array().expect("checks") {
        if !c["name"].as_str().unwrap_or("").starts_with("bar: ") {
            assert_ne!(c["verdict"], "fail", "{c}");
        }
    }
    assert!(
        report["seed"].as_str().is_some_and(|s| !s.is_empty()),
        "the seed is revealed"
    );
    assert!(report["git_commit"].is_string() && report["machine"]["cpus"].as_u64() > Some(0));
    assert_eq!(report["settings"]["fans"], FANS);
    let f = &report["fairness"];
    assert!(f["pre_queue_fans"].as_u64() > Some(0), "{f}");
    assert_eq!(f["pre_queue_place_mismatches"], 0, "{f}");
    let h = &report["hostile"];
    assert!(h["fans"].as_u64() > Some(0), "{h}");
    assert!(h["unadmitted_refused"].as_u64() > Some(0), "{h}");
    assert!(h["reused_key_refused"].as_u64() > Some(0), "{h}");
    assert!(report["series"]["t_s"]
        .as_array()
        .is_some_and(|t| !t.is_empty()));

    // The HTML report: one file, four inline SVG charts, nothing fetched.
    let html = std::fs::read_to_string(&html_path).expect("the HTML report");
    assert!(html.starts_with("<!doctype html>"), "{html}");
    assert_eq!(html.matches("<svg class=\"chart\"").count(), 4);
    assert_eq!(html.matches("</svg>").count(), 4);
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));

    servers.shutdown().await;

    // It opens in headless Chromium: the charts are there and no script failed.
    let _one = testkit::ONE_BROWSER.lock().await;
    let page = testkit::open_browser("sale-report", testkit::DESKTOP).await;
    page.goto(&format!("file://{}", html_path.display())).await;
    let seen = page
        .client
        .execute(
            "return {errors: window.saleReportErrors, charts: document.body.dataset.charts, \
             drawn: document.querySelectorAll('svg.chart path.series').length};",
            vec![],
        )
        .await
        .expect("read the page");
    page.shot("loaded").await;
    assert_eq!(seen["errors"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["charts"], "4", "{seen}");
    assert!(seen["drawn"].as_u64() >= Some(5), "{seen}");
    page.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 14: a sale spread over two booking-api and two queue-server instances (one Redis, one
/// Postgres), taken from `BOOKING_INSTANCE_URLS` and `QUEUE_INSTANCE_URLS` as `./dev up
/// --instances 2` writes them (`--instances-from-env`). It sells exactly its stock, and the
/// report gives the admission → `admitted` delay for the sockets of each queue-server instance,
/// so both held sockets whose fans were admitted (fan k's socket is on instance k mod 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_spreads_over_two_instances_of_each_server() {
    let mut cfg = config();
    cfg.holds.confirm_grace_ms = 1_000;
    let servers = Servers::start(cfg.clone(), "loadtest-instances").await;
    let booking2 = booking_api::start(cfg.clone())
        .await
        .expect("a second booking-api starts");
    let mut qcfg = cfg;
    qcfg.queue.booking_public_url = servers.booking.url();
    let queue2 = queue_server::start(qcfg)
        .await
        .expect("a second queue-server starts");
    let dir = out_dir();
    let json_path = dir.join("instances.json");
    let stock = 30;

    let bookings = format!("{},{}", servers.booking.url(), booking2.url());
    let queues = format!("{}, {}", servers.queue.url(), queue2.url());
    // An instance list that is empty: --instances-from-env says so rather than guess.
    let out = sale(&servers)
        .arg("--instances-from-env")
        .env("BOOKING_INSTANCE_URLS", &bookings)
        .env("QUEUE_INSTANCE_URLS", "")
        .output()
        .await
        .expect("loadtest sale runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("QUEUE_INSTANCE_URLS"), "{stderr}");

    let run = sale(&servers)
        .arg("--instances-from-env")
        .env("BOOKING_INSTANCE_URLS", &bookings)
        .env("QUEUE_INSTANCE_URLS", &queues)
        .args(["--fans", "160", "--ws-fans", "100", "--client-procs", "2"])
        .args(["--stock", &stock.to_string()])
        .args(["--pre-queue-pct", "0", "--pre-open-s", "0"])
        .args([
            "--shop-window-s",
            "10",
            "--rate-per-s",
            "40",
            "--burst",
            "20",
        ])
        .args(["--hold-ttl-s", "2", "--think-ms", "50"])
        .args([
            "--pay-pct",
            "100",
            "--release-pct",
            "0",
            "--hostile-pct",
            "0",
        ])
        .args(["--poll-ms", "1000", "--join-rate-per-s", "200"])
        .args(["--sold-out-grace-s", "2", "--max-duration-s", "120"])
        .args(["--json", json_path.to_str().unwrap()])
        .output();
    let out = tokio::time::timeout(RUN_LIMIT, run)
        .await
        .expect("the sale ends")
        .expect("loadtest sale runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadtest sale over two instances failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json_path).expect("the JSON report"))
            .expect("the JSON report parses");
    let o = &report["outcome"];
    assert_eq!(o["sold_api"], stock, "{report:#}");
    assert_eq!(o["sold_pg_items"], stock, "{report:#}");
    assert_eq!(report["invariants_held"], true, "{report:#}");
    let push = report["admitted_push"].as_array().expect("admitted_push");
    assert_eq!(push.len(), 2, "one row per queue-server instance: {push:?}");
    for (row, url) in push.iter().zip([servers.queue.url(), queue2.url()]) {
        assert_eq!(row["queue_url"], url.as_str(), "{row}");
        assert!(row["delay"]["count"].as_u64() > Some(0), "{row}");
    }
    // Both booking-api instances are the run's.
    assert_eq!(
        report["settings"]["booking_url"].as_array().map(Vec::len),
        Some(2),
        "{report:#}"
    );

    queue2.shutdown().await;
    booking2.shutdown().await;
    servers.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--line-only`, small: every fan joins and stays (no polls, a long grace), nobody shops; the
/// report gives the line's figures and the invariants still hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_line_mode_fills_the_line_and_reports_it() {
    let servers = Servers::start(config(), "loadtest-line").await;
    let dir = out_dir();
    let json_path = dir.join("line.json");
    let run = sale(&servers)
        .arg("--line-only")
        .args(["--fans", "300", "--ws-fans", "40", "--client-procs", "1"])
        .args(["--stock", "1000000", "--leave-grace-s", "86400"])
        .args(["--pre-queue-pct", "0", "--pre-open-s", "0"])
        .args([
            "--rate-per-s",
            "10",
            "--burst",
            "5",
            "--join-rate-per-s",
            "300",
        ])
        .args(["--line-hold-s", "2", "--position-samples", "20"])
        .args(["--json", json_path.to_str().unwrap()])
        .output();
    let out = tokio::time::timeout(RUN_LIMIT, run)
        .await
        .expect("the run ends")
        .expect("loadtest sale --line-only runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadtest sale --line-only failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json_path).expect("the JSON report"))
            .expect("the JSON report parses");
    let line = &report["line"];
    assert!(line["waiting_peak"].as_i64() > Some(200), "{line}");
    assert!(line["redis_used_memory_full"].as_u64() > Some(0), "{line}");
    assert!(
        line["position_back"]["count"].as_u64() == Some(20),
        "{line}"
    );
    assert!(line["position_head"]["count"].as_u64() > Some(0), "{line}");
    assert_eq!(report["outcome"]["sold_api"], 0, "nobody shops: {report:#}");
    assert_eq!(report["invariants_held"], true, "{report:#}");
    servers.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
