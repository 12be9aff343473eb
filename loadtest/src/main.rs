//! `loadtest` — Floodgate's load generator. It drives a running booking-api the way fans would,
//! measures it honestly (open-loop arrivals, latency from the due time, HdrHistogram), and at
//! the end checks that no unit was lost or sold twice, against the API and against Postgres.
//! `loadtest queue` holds thousands of waiting-room WebSockets open against queue-server and
//! measures memory per socket, tick delivery and admission accuracy. `loadtest sale` runs a
//! whole flash sale (line, admission, shopping, sold out) and reports it with charts.
//!
//! Exit code: 0 when every invariant holds, 1 when one is violated (or couldn't be checked; for
//! `queue`, a bar missed with `--check`), 2 on a usage or setup error.
//!
//! # Layout
//! - `cli` — the command line and its bounds.
//! - `schedule` — open-loop arrival times and the warm-up split.
//! - `http` — a bare keep-alive HTTP/1.1 connection on hyper's low-level client.
//! - `api` — booking-api's contract as loadtest uses it: setup calls, answer decoding.
//! - `load` — the open-loop scheduler and workers, the closed-loop workers, confirms/releases.
//! - `stats` — per-worker histograms and counts, merged at the end.
//! - `invariants` — the end-of-run checks, pure over sample data, plus the Postgres sums.
//! - `report` — the report, as text and JSON.
//! - `queue` — the waiting-room scenario: setup, phases, the client processes it drives.
//! - `ws_clients` — a client process of `queue`: its share of the sockets, aggregated per tick.
//! - `ws_baseline` — the minimal tokio-tungstenite broadcast server `queue` compares against.
//! - `queue_report` — the waiting room's figures from the clients' reports, its bars, its report.
//! - `sale` — `loadtest sale`: the whole flash sale, from the pre-queue to sold out.
//! - `sale_report` — the sale's figures (Kendall τ, the bucket-limited admission rate, ...) and
//!   its report as text, JSON and HTML with inline SVG charts.
//! - `seatmap` — `loadtest seatmap`: reserve p99 at half of peak with and without polling
//!   booking pages, on a seated drop.
//! - `procfs` — memory, CPU, load and listening sockets from /proc.

mod api;
mod cli;
mod http;
mod invariants;
mod load;
mod procfs;
mod queue;
mod queue_report;
mod report;
mod sale;
mod sale_report;
mod schedule;
mod seatmap;
mod stats;
mod ws_baseline;
mod ws_clients;

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser as _;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng as _;
use tokio::time::Instant;

use crate::api::{create_fans, hold_body, DropSpec, Setup};
use crate::cli::{Cli, Mode, ReserveArgs, Scenario};
use crate::http::{path_segment, Target};
use crate::invariants::{Bookkeeping, Check, ClientCounts, Verdict};
use crate::load::{follow_up, FollowUp, HoldBody, Progress, Reserve};
use crate::report::{confirm_step_totals, rate, step_means, Latencies, Phase, Report, Throughput};
use crate::schedule::Schedule;
use crate::stats::{Timeline, TIMELINE_SLACK_S};

/// How often the progress bar is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(200);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.scenario {
        Scenario::Reserve(args) => args,
        Scenario::Queue(args) => {
            if let Err(msg) = args.validate() {
                eprintln!("loadtest: {msg}");
                return ExitCode::from(2);
            }
            return block_on(current_thread(), queue::run(args));
        }
        Scenario::Sale(mut args) => {
            if let Err(msg) = args.resolve_instances().and_then(|()| args.validate()) {
                eprintln!("loadtest: {msg}");
                return ExitCode::from(2);
            }
            return block_on(runtime_with(args.threads), sale::run(args));
        }
        Scenario::Seatmap(args) => {
            if let Err(msg) = args.validate() {
                eprintln!("loadtest: {msg}");
                return ExitCode::from(2);
            }
            return block_on(runtime_with(args.threads), seatmap::run(args));
        }
        Scenario::QueueClients => {
            return block_on(current_thread(), async {
                ws_clients::run().await.map(|()| true)
            })
        }
        Scenario::WsBaseline(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.threads.clamp(1, cli::MAX_THREADS))
                .enable_all()
                .build();
            return block_on(runtime, async {
                ws_baseline::run(args).await.map(|()| true)
            });
        }
    };
    if let Err(msg) = args.validate() {
        eprintln!("loadtest: {msg}");
        return ExitCode::from(2);
    }
    block_on(runtime_with(args.threads), reserve(args))
}

/// The load generator's runtime: current-thread for 1 (see `--threads`), else multi-thread.
fn runtime_with(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs a scenario to its exit code: 0 passed, 1 failed, 2 a usage or setup error.
fn block_on(
    runtime: std::io::Result<tokio::runtime::Runtime>,
    scenario: impl std::future::Future<Output = anyhow::Result<bool>>,
) -> ExitCode {
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(scenario) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A progress bar on stderr, or a hidden one when stderr isn't a terminal or with --quiet.
pub(crate) fn bar(quiet: bool, len: u64, template: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    ProgressBar::new(len).with_style(style)
}

/// Keeps a bar's position and message current until dropped.
struct Ticker(Option<tokio::task::JoinHandle<()>>);

impl Ticker {
    fn start(bar: &ProgressBar, update: impl Fn(&ProgressBar) + Send + 'static) -> Self {
        if bar.is_hidden() {
            return Self(None);
        }
        let bar = bar.clone();
        Self(Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROGRESS_TICK);
            loop {
                tick.tick().await;
                update(&bar);
            }
        })))
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

pub(crate) fn note(quiet: bool, msg: impl std::fmt::Display) {
    if !quiet {
        eprintln!("loadtest: {msg}");
    }
}

/// `floodgate_confirm_step_seconds` summed over every target's `/metrics`; None without an ops
/// key or if any target didn't answer (a breakdown of some instances only would mislead).
async fn confirm_steps(
    args: &ReserveArgs,
    targets: &[Target],
    timeout: Duration,
) -> Option<std::collections::BTreeMap<String, (f64, f64)>> {
    let key = args.ops_key.as_deref()?;
    let mut total: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for t in targets {
        let text = match Setup::new(t.clone(), timeout).metrics(key).await {
            Ok(text) => text,
            Err(e) => {
                note(args.quiet, format_args!("no confirm breakdown: {e:#}"));
                return None;
            }
        };
        for (step, (sum, count)) in confirm_step_totals(&text) {
            let entry = total.entry(step).or_default();
            entry.0 += sum;
            entry.1 += count;
        }
    }
    Some(total)
}

/// The `reserve` scenario. `Ok(passed)`; `Err` for setup failures.
async fn reserve(args: ReserveArgs) -> anyhow::Result<bool> {
    let timeout = Duration::from_millis(args.request_timeout_ms);
    let target = Target::resolve(&args.booking_url).await?;
    let mut setup = Setup::new(target.clone(), timeout);

    let (drop_id, drop_created) = match &args.drop_id {
        Some(id) => (id.clone(), false),
        None => {
            let now_s = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let spec = DropSpec {
                name: format!("loadtest {now_s}"),
                sku: args.sku.clone(),
                stock: args.stock,
                per_fan_limit: args.per_fan_limit,
                hold_ttl_s: args.hold_ttl_s,
            };
            // validate() made sure the key is there when no drop id is.
            let key = args
                .seller_key
                .as_deref()
                .context("--seller-key is required to create a drop")?;
            (setup.create_drop(key, spec.body()).await?, true)
        }
    };
    if args.setup_only {
        println!("{drop_id}");
        return Ok(true);
    }
    note(
        args.quiet,
        format_args!("drop {drop_id}; creating {} fan sessions", args.fans),
    );

    let run_id = format!("{:08x}", rand::rng().random::<u32>());
    let fans_bar = bar(args.quiet, args.fans as u64, "fans  {bar:30} {pos}/{len}");
    let fans = Arc::new(create_fans(&target, &run_id, args.fans, timeout, &fans_bar).await?);
    fans_bar.finish_and_clear();

    let progress = Arc::new(Progress::default());
    let ctx = Arc::new(Reserve {
        target: target.clone(),
        uri: target.uri(&format!("/v1/drops/{}/holds", path_segment(&drop_id)))?,
        body: HoldBody::Same(hold_body(&args.sku, args.quantity)),
        fans: Arc::clone(&fans),
        keep_holds: args.confirm_pct > 0 || args.release_pct > 0,
        timeout,
        progress: Arc::clone(&progress),
        timeline: Timeline::new(
            std::time::Instant::now(),
            Duration::from_secs_f64(args.warmup_s + args.duration_s)
                + timeout
                + Duration::from_secs(TIMELINE_SLACK_S),
        ),
    });
    let warmup = Duration::from_secs_f64(args.warmup_s);
    let duration = Duration::from_secs_f64(args.duration_s);

    let (outcome, t0, requests, concurrency) = match args.mode {
        Mode::Open => {
            let schedule = Schedule::new(args.rate, args.warmup_s, args.duration_s);
            let load_bar = bar(
                args.quiet,
                schedule.total_requests(),
                "load  {bar:30} {pos}/{len} [{elapsed_precise}] {msg}",
            );
            let backlog = Arc::new(AtomicU64::new(0));
            let _ticker = {
                let (progress, backlog) = (Arc::clone(&progress), Arc::clone(&backlog));
                Ticker::start(&load_bar, move |b| {
                    b.set_position(progress.done());
                    b.set_message(format!(
                        "{} · dropped {} · backlog {}",
                        progress.line(),
                        progress.dropped.load(Ordering::Relaxed),
                        backlog.load(Ordering::Relaxed),
                    ));
                })
            };
            let (outcome, t0) = load::run_open(
                Arc::clone(&ctx),
                schedule,
                args.connections,
                args.max_backlog,
                backlog,
            )
            .await;
            load_bar.finish_and_clear();
            (outcome, t0, schedule.measured_requests(), args.connections)
        }
        Mode::Closed => {
            let total_ms = (warmup + duration).as_millis() as u64;
            let load_bar = bar(
                args.quiet,
                total_ms,
                "load  {bar:30} [{elapsed_precise}] {msg}",
            );
            let started = Instant::now();
            let _ticker = {
                let progress = Arc::clone(&progress);
                Ticker::start(&load_bar, move |b| {
                    b.set_position((started.elapsed().as_millis() as u64).min(total_ms));
                    b.set_message(progress.line());
                })
            };
            let (outcome, t0, requests) =
                load::run_closed(Arc::clone(&ctx), args.workers, warmup, duration).await;
            load_bar.finish_and_clear();
            (outcome, t0, requests, args.workers)
        }
    };

    let measure_start = t0 + warmup;
    let measured_s = outcome
        .last_done
        .map(|last| last.saturating_duration_since(measure_start).as_secs_f64())
        .unwrap_or(0.0)
        .max(args.duration_s);
    let tally = &outcome.stats.tally;
    let throughput = Throughput {
        total_per_s: rate(tally.answered, measured_s),
        ok_per_s: rate(tally.succeeded, measured_s),
    };

    // Confirms and releases run after the reserve phase, so they don't disturb its numbers.
    let mut client = ClientCounts {
        quantity: args.quantity,
        reserved: outcome.ledger.reserved,
        reserved_unknown: outcome.ledger.reserved_unknown,
        ..ClientCounts::default()
    };
    let (mut confirm, mut release) = (None, None);
    if ctx.keep_holds {
        if outcome.ledger.holds_without_id > 0 {
            note(
                args.quiet,
                format_args!(
                    "{} holds came back without a hold_id and are kept",
                    outcome.ledger.holds_without_id
                ),
            );
        }
        let ops: Vec<(FollowUp, load::HoldRef)> = outcome
            .ledger
            .holds
            .iter()
            .enumerate()
            .map(|(k, h)| (follow_up(k, args.confirm_pct, args.release_pct), h.clone()))
            .filter(|(f, _)| *f != FollowUp::Keep)
            .collect();
        let ops_bar = bar(
            args.quiet,
            ops.len() as u64,
            "after {bar:30} {pos}/{len} [{elapsed_precise}]",
        );
        let follow_progress = Arc::new(Progress::default());
        let _ticker = {
            let p = Arc::clone(&follow_progress);
            Ticker::start(&ops_bar, move |b| b.set_position(p.done()))
        };
        let mut targets = vec![target.clone()];
        for url in &args.also_booking_urls {
            targets.push(Target::resolve(url).await?);
        }
        let steps_before = confirm_steps(&args, &targets, timeout).await;
        let started = Instant::now();
        let concurrency = if args.mode == Mode::Open {
            args.connections
        } else {
            args.workers
        };
        let done = load::run_follow_ups(
            &targets,
            Arc::clone(&fans),
            ops,
            concurrency,
            args.follow_up_rate,
            timeout,
            follow_progress,
        )
        .await;
        let elapsed_s = started.elapsed().as_secs_f64();
        ops_bar.finish_and_clear();
        client.confirmed = done.confirmed;
        client.confirmed_unknown = done.confirmed_unknown;
        client.released = done.released;
        client.released_unknown = done.released_unknown;
        if args.confirm_pct > 0 {
            let mut phase = Phase::of(&done.confirm, done.confirm_requests, elapsed_s);
            if let (Some(before), Some(after)) =
                (steps_before, confirm_steps(&args, &targets, timeout).await)
            {
                phase.steps = step_means(&before, &after);
            }
            confirm = Some(phase);
        }
        if args.release_pct > 0 {
            release = Some(Phase::of(&done.release, done.release_requests, elapsed_s));
        }
    }

    let checks = check_invariants(&args, &mut setup, &drop_id, drop_created, client, t0).await;
    let passed = checks.iter().all(|c| c.verdict != Verdict::Fail);
    let report = Report {
        scenario: "reserve",
        mode: args.mode,
        booking_url: args.booking_url.clone(),
        drop_id,
        drop_created,
        sku: args.sku.clone(),
        quantity: args.quantity,
        fans: args.fans,
        target_rate_per_s: (args.mode == Mode::Open).then_some(args.rate),
        concurrency,
        warmup_s: args.warmup_s,
        duration_s: args.duration_s,
        measured_s,
        requests,
        throughput,
        latency: Latencies::of(&outcome.stats),
        timeline: ctx.timeline.window(measure_start.into_std()),
        reserve: outcome.stats.tally.clone(),
        confirm,
        release,
        client,
        checks,
        passed,
    };
    print!("{}", report::render_text(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report).context("serialising the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(passed)
}

/// Reads the drop's live counts and Postgres' sums and runs every check. A check that can't be
/// made (the API or Postgres unreachable, a malformed answer) is a failure: the run must not
/// pass without having looked.
async fn check_invariants(
    args: &ReserveArgs,
    setup: &mut Setup,
    drop_id: &str,
    drop_created: bool,
    client: ClientCounts,
    t0: Instant,
) -> Vec<Check> {
    let fail = |name: &str, detail: String| Check {
        name: name.into(),
        verdict: Verdict::Fail,
        detail,
    };
    let buckets = match setup.get_drop(drop_id).await {
        Ok(drop) => invariants::parse_inventory(&drop),
        Err(e) => Err(format!("{e:#}")),
    };
    // Read as soon as the counts are: anything later can't have expired before them.
    let elapsed_s = t0.elapsed().as_secs_f64();
    let buckets = match buckets {
        Ok(b) => b,
        Err(e) => return vec![fail("live counts from GET /v1/drops/{drop_id}", e)],
    };
    let mut checks = invariants::check_buckets(&buckets);
    match invariants::postgres_sold(&args.database_url, drop_id).await {
        Ok(pg) => checks.extend(invariants::check_postgres(&buckets, pg)),
        Err(e) => checks.push(fail("postgres sums", format!("{e:#}"))),
    }
    let applies = if !drop_created {
        Bookkeeping::Skip("--drop-id: others may hold or buy units of this drop".into())
    } else if let Some(why) = invariants::expiry_rules_out_bookkeeping(elapsed_s, args.hold_ttl_s) {
        Bookkeeping::Skip(why)
    } else {
        Bookkeeping::Applies
    };
    let bucket = buckets.iter().find(|b| b.name == args.sku);
    checks.extend(invariants::check_bookkeeping(
        bucket, &args.sku, client, &applies,
    ));
    checks
}
