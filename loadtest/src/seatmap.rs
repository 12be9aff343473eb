//! `loadtest seatmap` — seat maps at scale (issue 11, item 7). On seated drops of
//! sections × rows × seats, it finds peak reserve throughput (closed loop, or `--peak-rate`),
//! then runs open-loop reserves at a share of it (half by default) twice, each on a fresh drop:
//! without pollers, and with `--pages` simulated booking pages each polling
//! `GET /v1/drops/{drop_id}/seats` every `--poll-interval-ms` with `If-None-Match`, as book.js
//! does. The figure is reserve p99 with the pages over p99 without, against [`BAR_P99_RATIO`].
//!
//! Each reserve names one seat, seat `seq` of the layout, so no two reserves of a run contend and
//! every one costs the same; a drop has as many reserves as seats (the run refuses a rate ×
//! duration that would need more). Each phase gets its own drop, so both runs start from the
//! same free 50,000-seat map.
//!
//! The pages are a schedule, not tasks: poll `n` is page `n mod pages`, due `n × interval /
//! pages` after the pollers start, so 2,000 pages every 5 s are 400 evenly spaced GETs a second
//! over one small pool of shared connections (`--poll-connections`), as 2,000 browsers behind
//! one load balancer would arrive. Each page keeps the `ETag` of its last 200.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use hyper::header::{HeaderValue, IF_NONE_MATCH};
use hyper::{Method, StatusCode, Uri};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;

use crate::api::{create_fans, Setup};
use crate::cli::{SeatmapArgs, BAR_P99_RATIO, MAX_DROP_SEATS};
use crate::http::{path_segment, Slot, Target};
use crate::invariants::{self, Check, Verdict};
use crate::load::{self, HoldBody, Progress, Reserve, DISPATCH_TICK};
use crate::report::{rate, Latencies};
use crate::schedule::Schedule;
use crate::stats::{Percentiles, Stats, Tally, Timeline};
use crate::{bar, note};

/// Price of every seat of the created drops.
const SEAT_PRICE_CENTS: u64 = 5000;
/// The created drops' per-fan limit: booking-api's upper bound, so few fans cover many seats.
const PER_FAN_LIMIT: u32 = 1000;
/// How far into a seat map answer `version` is looked for before parsing all of it.
const VERSION_SEARCH_BYTES: usize = 256;
/// Shortest measured window worth running when the seats set the duration.
const MIN_MEASURED_S: f64 = 1.0;
/// The created drops' hold time: longer than any run, so no hold expires during one.
const HOLD_TTL_S: u32 = 3600;

/// The seats of a created drop: sections `S1…`, rows `1…` front first, seats `1…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SeatLayout {
    pub sections: u32,
    pub rows: u32,
    pub seats_per_row: u32,
}

impl SeatLayout {
    pub fn seats(&self) -> u64 {
        u64::from(self.sections) * u64::from(self.rows) * u64::from(self.seats_per_row)
    }

    /// The seat id of reserve `seq` (modulo the seats): sections take turns, so consecutive
    /// reserves land in different sections; within a section front row first, seat 1 first.
    pub fn seat_id(&self, seq: u64) -> String {
        let k = seq % self.seats().max(1);
        let sections = u64::from(self.sections);
        let in_section = k / sections;
        let per_row = u64::from(self.seats_per_row);
        format!(
            "S{}-{}-{}",
            k % sections + 1,
            in_section / per_row + 1,
            in_section % per_row + 1
        )
    }

    /// The reserve body of request `seq`: `{"seats":["S1-1-1"]}`.
    pub fn hold_body(&self, seq: u64) -> Bytes {
        // Seat ids are ASCII letters, digits and hyphens: nothing to escape.
        Bytes::from(format!(r#"{{"seats":["{}"]}}"#, self.seat_id(seq)))
    }

    /// `POST /v1/drops` for an open seated drop of this layout.
    pub fn drop_body(&self, name: &str) -> serde_json::Value {
        let sections: Vec<_> = (1..=self.sections)
            .map(|s| {
                let rows: Vec<_> = (1..=self.rows)
                    .map(|r| serde_json::json!({ "row": r.to_string(), "seats": self.seats_per_row }))
                    .collect();
                serde_json::json!({ "section": format!("S{s}"), "price_cents": SEAT_PRICE_CENTS, "rows": rows })
            })
            .collect();
        serde_json::json!({
            "name": name,
            "per_fan_limit": PER_FAN_LIMIT,
            "hold_ttl_s": HOLD_TTL_S,
            "admission": { "mode": "open" },
            "inventory": { "kind": "seated", "sections": sections },
        })
    }
}

/// When each page polls: poll `n` is page `n mod pages`, due `n × interval / pages` after the
/// start, so every page polls once per interval and the polls are evenly spaced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PollSchedule {
    pub pages: usize,
    pub interval: Duration,
}

impl PollSchedule {
    pub fn page(&self, n: u64) -> usize {
        (n % self.pages.max(1) as u64) as usize
    }

    pub fn offset(&self, n: u64) -> Duration {
        Duration::from_secs_f64(n as f64 * self.interval.as_secs_f64() / self.pages.max(1) as f64)
    }

    pub fn per_s(&self) -> f64 {
        self.pages as f64 / self.interval.as_secs_f64()
    }
}

/// The `version` of a seat map answer, as its `ETag` (`"<version>"`). booking-api writes it near
/// the start, so it is looked for there first: parsing 60 KB of map per poll would be the
/// client's CPU taken from the server it measures.
fn etag_of(body: &[u8]) -> Option<HeaderValue> {
    const KEY: &[u8] = br#""version":""#;
    let head = &body[..body.len().min(VERSION_SEARCH_BYTES)];
    if let Some(at) = head.windows(KEY.len()).position(|w| w == KEY) {
        let rest = &body[at + KEY.len()..];
        if let Some(end) = rest.iter().position(|&b| b == b'"' || b == b'\\') {
            if rest[end] == b'"' {
                let mut etag = Vec::with_capacity(end + 2);
                etag.push(b'"');
                etag.extend_from_slice(&rest[..end]);
                etag.push(b'"');
                return HeaderValue::from_bytes(&etag).ok();
            }
        }
    }
    etag_parsed(body)
}

/// [`etag_of`] the slow way, for an answer laid out differently.
fn etag_parsed(body: &[u8]) -> Option<HeaderValue> {
    #[derive(Deserialize)]
    struct Map<'a> {
        #[serde(borrow)]
        version: &'a str,
    }
    let map: Map<'_> = serde_json::from_slice(body).ok()?;
    HeaderValue::from_str(&format!("\"{}\"", map.version)).ok()
}

/// What the pages saw.
#[derive(Debug, Default)]
struct PollOutcome {
    /// Every poll, from its due time; success is 200 or 304.
    stats: Stats,
    /// Body bytes of the 200s.
    bytes_200: u64,
    /// 200s whose body had no usable `version` (the page then polls without `If-None-Match`).
    no_version: u64,
    /// Polls not sent because the pool's backlog was full.
    dropped: u64,
    elapsed_s: f64,
}

/// Polls `uri` on `schedule` over `connections` shared connections until `stop` is set.
async fn run_pollers(
    target: Target,
    uri: Uri,
    schedule: PollSchedule,
    connections: usize,
    timeout: Duration,
    stop: Arc<AtomicBool>,
) -> PollOutcome {
    // A page whose last poll hasn't been sent yet isn't sent twice: at most one poll per page
    // waits. Beyond that the polls are dropped and counted.
    let (tx, rx) = mpsc::channel::<(u64, Instant)>(schedule.pages.max(1));
    let rx = Arc::new(Mutex::new(rx));
    let etags = Arc::new(std::sync::Mutex::new(vec![
        None::<HeaderValue>;
        schedule.pages
    ]));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (target, uri, rx, etags) = (
            target.clone(),
            uri.clone(),
            Arc::clone(&rx),
            Arc::clone(&etags),
        );
        workers.spawn(async move {
            let mut slot = Slot::new(timeout);
            slot.warm_up(&target).await;
            let mut out = PollOutcome::default();
            loop {
                let job = rx.lock().await.recv().await;
                let Some((n, due)) = job else { break };
                let page = schedule.page(n);
                let etag = etags.lock().unwrap_or_else(|e| e.into_inner())[page].clone();
                let (result, sent_at) = slot
                    .send(&target, || {
                        let mut req = target.request(Method::GET, uri.clone(), None, None);
                        if let Some(etag) = etag {
                            req.headers_mut().insert(IF_NONE_MATCH, etag);
                        }
                        (req, Instant::now())
                    })
                    .await;
                let done = Instant::now();
                match result {
                    Ok((status, body)) => {
                        if status == StatusCode::OK {
                            out.bytes_200 += body.len() as u64;
                            let etag = etag_of(&body);
                            out.no_version += u64::from(etag.is_none());
                            etags.lock().unwrap_or_else(|e| e.into_inner())[page] = etag;
                        }
                        let ok = status == StatusCode::OK || status == StatusCode::NOT_MODIFIED;
                        out.stats.answer(
                            done - due.min(sent_at),
                            done - sent_at,
                            status,
                            &body,
                            ok,
                        );
                    }
                    Err(e) => out.stats.tally.transport(e),
                }
            }
            out
        });
    }

    let t0 = Instant::now();
    let mut dropped = 0u64;
    let mut next = 0u64;
    let mut tick = tokio::time::interval_at(t0, DISPATCH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let horizon = Instant::now() + DISPATCH_TICK;
        loop {
            let due = t0 + schedule.offset(next);
            if due >= horizon {
                break;
            }
            if tx.try_send((next, due)).is_err() {
                dropped += 1;
            }
            next += 1;
        }
    }
    drop(tx);
    let mut merged = PollOutcome {
        dropped,
        ..PollOutcome::default()
    };
    while let Some(joined) = workers.join_next().await {
        // A worker only panics on a bug; the figures would be wrong, so stop.
        let out = joined.expect("poller panicked");
        merged.stats.merge(&out.stats);
        merged.bytes_200 += out.bytes_200;
        merged.no_version += out.no_version;
    }
    merged.elapsed_s = t0.elapsed().as_secs_f64();
    merged
}

/// The pages' figures in the report.
#[derive(Debug, Clone, Serialize)]
pub struct PollFigures {
    pub pages: usize,
    pub interval_ms: u64,
    pub target_per_s: f64,
    pub connections: usize,
    pub elapsed_s: f64,
    pub polls: u64,
    pub ok_200: u64,
    pub not_modified_304: u64,
    pub mb_received: f64,
    pub no_version: u64,
    pub dropped: u64,
    pub latency: Percentiles,
    pub tally: Tally,
}

/// One open-loop run.
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub label: String,
    pub drop_id: String,
    pub target_rate_per_s: f64,
    pub measured_s: f64,
    pub ok_per_s: f64,
    pub latency: Latencies,
    pub reserve: Tally,
    pub polls: Option<PollFigures>,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Peak {
    /// `measured` (closed loop) or `given` (`--peak-rate`).
    pub source: &'static str,
    pub reserves_per_s: f64,
    pub workers: Option<usize>,
    /// Seats of the peak run's drop.
    pub seats: Option<u64>,
    pub latency: Option<Latencies>,
    pub reserve: Option<Tally>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeatmapReport {
    pub scenario: &'static str,
    pub booking_url: String,
    pub layout: SeatLayout,
    pub seats: u64,
    pub fans: usize,
    pub peak: Peak,
    pub load_fraction: f64,
    pub rate_per_s: f64,
    pub warmup_s: f64,
    /// Measured seconds per run: `--duration-s`, or less when the seats wouldn't last.
    pub duration_s: f64,
    pub connections: usize,
    pub runs: Vec<RunFigures>,
    /// Per pair of runs: p99 (all answers, from the due time) with the pages over without.
    pub pair_p99_ratios: Vec<f64>,
    /// The median of `pair_p99_ratios`; `None` without pages.
    pub p99_ratio: Option<f64>,
    pub bar_p99_ratio: f64,
    pub meets_bar: Option<bool>,
    pub passed: bool,
}

/// What every phase shares.
struct Bench {
    args: SeatmapArgs,
    layout: SeatLayout,
    target: Target,
    setup: Setup,
    fans: Arc<Vec<HeaderValue>>,
    timeout: Duration,
    run_id: String,
}

impl Bench {
    async fn new_drop(&mut self, phase: &str, layout: SeatLayout) -> anyhow::Result<String> {
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = format!("loadtest seatmap {} {phase} {now_s}", self.run_id);
        let id = self
            .setup
            .create_drop(&self.args.seller_key, layout.drop_body(&name))
            .await?;
        note(
            self.args.quiet,
            format_args!("{phase}: drop {id} of {} seats", layout.seats()),
        );
        Ok(id)
    }

    fn reserve_ctx(&self, drop_id: &str, layout: SeatLayout) -> anyhow::Result<Arc<Reserve>> {
        Ok(Arc::new(Reserve {
            target: self.target.clone(),
            uri: self
                .target
                .uri(&format!("/v1/drops/{}/holds", path_segment(drop_id)))?,
            body: HoldBody::Seats(layout),
            fans: Arc::clone(&self.fans),
            keep_holds: false,
            timeout: self.timeout,
            progress: Arc::new(Progress::default()),
            // Its report has no timeline: nothing to place.
            timeline: Timeline::new(std::time::Instant::now(), Duration::ZERO),
        }))
    }

    /// The drop's counts: no negative, `available + held + sold == total` per section.
    async fn checks(&mut self, drop_id: &str) -> Vec<Check> {
        match self.setup.get_drop(drop_id).await {
            Ok(drop) => match invariants::parse_inventory(&drop) {
                Ok(buckets) => invariants::check_buckets(&buckets),
                Err(e) => vec![Check::new("live counts", false, e)],
            },
            Err(e) => vec![Check::new("live counts", false, format!("{e:#}"))],
        }
    }

    async fn peak(&mut self) -> anyhow::Result<Peak> {
        if let Some(given) = self.args.peak_rate {
            return Ok(Peak {
                source: "given",
                reserves_per_s: given,
                workers: None,
                seats: None,
                latency: None,
                reserve: None,
            });
        }
        let layout = self.layout;
        let drop_id = self.new_drop("peak", layout).await?;
        let ctx = self.reserve_ctx(&drop_id, layout)?;
        let warmup = Duration::from_secs_f64(self.args.warmup_s);
        let (outcome, t0, _) = load::run_closed(
            ctx,
            self.args.workers,
            warmup,
            Duration::from_secs_f64(self.args.peak_s),
        )
        .await;
        let measured_s = measured_s(outcome.last_done, t0 + warmup, self.args.peak_s);
        // Answers of any status: a closed loop fast enough to take every seat of the drop gets
        // refusals after that, which cost the server less; the report shows how many.
        let tally = &outcome.stats.tally;
        let per_s = rate(tally.answered, measured_s);
        if tally.succeeded == 0 {
            bail!("the peak run made no hold: {:?}", tally.by_code);
        }
        Ok(Peak {
            source: "measured",
            reserves_per_s: per_s,
            workers: Some(self.args.workers),
            seats: Some(layout.seats()),
            latency: Some(Latencies::of(&outcome.stats)),
            reserve: Some(outcome.stats.tally),
        })
    }

    /// One open-loop run at `rate_per_s` on a fresh drop, with the pages polling it if `pages`.
    async fn open_run(
        &mut self,
        label: &str,
        rate_per_s: f64,
        duration_s: f64,
        pages: usize,
    ) -> anyhow::Result<RunFigures> {
        let drop_id = self.new_drop(label, self.layout).await?;
        let ctx = self.reserve_ctx(&drop_id, self.layout)?;
        let stop = Arc::new(AtomicBool::new(false));
        let schedule = PollSchedule {
            pages,
            interval: Duration::from_millis(self.args.poll_interval_ms),
        };
        let pollers = if pages > 0 {
            let uri = self
                .target
                .uri(&format!("/v1/drops/{}/seats", path_segment(&drop_id)))?;
            // On a thread and runtime of their own: the pages are other browsers, and their
            // reads and parsing mustn't queue behind the reserve client's (or delay it) in one
            // cooperative runtime.
            let (target, connections, timeout, stop) = (
                self.target.clone(),
                self.args.poll_connections,
                self.timeout,
                Arc::clone(&stop),
            );
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the pollers' runtime")?;
            let thread = std::thread::Builder::new()
                .name("pollers".into())
                .spawn(move || {
                    runtime.block_on(run_pollers(
                        target,
                        uri,
                        schedule,
                        connections,
                        timeout,
                        stop,
                    ))
                })
                .context("starting the pollers' thread")?;
            let task = tokio::task::spawn_blocking(move || thread.join());
            // One interval first: every page has loaded the map (and holds its ETag) before the
            // reserves start, as pages open before a sale does.
            note(
                self.args.quiet,
                format_args!(
                    "{label}: {pages} pages polling, {:.0} GETs/s; reserves start in {} ms",
                    schedule.per_s(),
                    self.args.poll_interval_ms
                ),
            );
            tokio::time::sleep(schedule.interval).await;
            Some(task)
        } else {
            None
        };
        note(
            self.args.quiet,
            format_args!(
                "{label}: reserves at {rate_per_s:.0}/s for {:.1} s",
                self.args.warmup_s + duration_s
            ),
        );
        let load_schedule = Schedule::new(rate_per_s, self.args.warmup_s, duration_s);
        let (outcome, t0) = load::run_open(
            ctx,
            load_schedule,
            self.args.connections,
            self.args.max_backlog,
            Arc::new(AtomicU64::new(0)),
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        let polls = match pollers {
            Some(task) => {
                let p = task
                    .await
                    .context("the pollers' task failed")?
                    .map_err(|_| anyhow::anyhow!("the pollers' thread panicked"))?;
                Some(PollFigures {
                    pages,
                    interval_ms: self.args.poll_interval_ms,
                    target_per_s: schedule.per_s(),
                    connections: self.args.poll_connections,
                    elapsed_s: p.elapsed_s,
                    polls: p.stats.tally.answered + p.stats.tally.transport_total(),
                    ok_200: status_count(&p.stats.tally, 200),
                    not_modified_304: status_count(&p.stats.tally, 304),
                    mb_received: p.bytes_200 as f64 / 1e6,
                    no_version: p.no_version,
                    dropped: p.dropped,
                    latency: Percentiles::of(&p.stats.latency),
                    tally: p.stats.tally,
                })
            }
            None => None,
        };
        let measured_s = measured_s(
            outcome.last_done,
            t0 + Duration::from_secs_f64(self.args.warmup_s),
            duration_s,
        );
        let checks = self.checks(&drop_id).await;
        Ok(RunFigures {
            label: label.into(),
            drop_id,
            target_rate_per_s: rate_per_s,
            measured_s,
            ok_per_s: rate(outcome.stats.tally.succeeded, measured_s),
            latency: Latencies::of(&outcome.stats),
            reserve: outcome.stats.tally,
            polls,
            checks,
        })
    }
}

fn status_count(t: &Tally, status: u16) -> u64 {
    t.by_status.get(&status).copied().unwrap_or(0)
}

/// From the end of the warm-up to the last answer, at least the planned duration.
fn measured_s(last_done: Option<Instant>, measure_start: Instant, planned_s: f64) -> f64 {
    last_done
        .map(|last| last.saturating_duration_since(measure_start).as_secs_f64())
        .unwrap_or(0.0)
        .max(planned_s)
}

/// The measured seconds a run gets: `duration_s`, or less so that one seat per reserve, warm-up
/// included, fits in `seats` (each seat is reserved once; a second reserve of it would be a
/// cheaper refusal and flatter the figures). `None` if not even the warm-up fits.
pub fn fit_duration_s(rate_per_s: f64, warmup_s: f64, duration_s: f64, seats: u64) -> Option<f64> {
    let fit = (seats as f64 / rate_per_s - warmup_s).min(duration_s);
    (fit >= MIN_MEASURED_S.min(duration_s)).then_some(fit)
}

/// The median (the mean of the middle two for an even count); `None` for none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// p99 with over p99 without; `None` when either is missing.
pub fn p99_ratio(without_ms: f64, with_ms: f64) -> Option<f64> {
    (without_ms > 0.0 && with_ms.is_finite()).then(|| with_ms / without_ms)
}

/// The `seatmap` scenario. `Ok(passed)`: every count check held; the bar is reported, not
/// enforced (it is a benchmark on a shared machine). `Err` for setup failures.
pub async fn run(args: SeatmapArgs) -> anyhow::Result<bool> {
    let timeout = Duration::from_millis(args.request_timeout_ms);
    let target = Target::resolve(&args.booking_url).await?;
    let layout = SeatLayout {
        sections: args.sections,
        rows: args.rows,
        seats_per_row: args.seats_per_row,
    };
    let run_id = format!("{:08x}", rand::rng().random::<u32>());
    note(
        args.quiet,
        format_args!("creating {} fan sessions", args.fans),
    );
    let fans_bar = bar(args.quiet, args.fans as u64, "fans  {bar:30} {pos}/{len}");
    let fans = Arc::new(create_fans(&target, &run_id, args.fans, timeout, &fans_bar).await?);
    fans_bar.finish_and_clear();
    let mut bench = Bench {
        setup: Setup::new(target.clone(), timeout),
        target,
        layout,
        fans,
        timeout,
        run_id,
        args: args.clone(),
    };

    let peak = bench.peak().await?;
    let rate_per_s = peak.reserves_per_s * args.load_fraction;
    let duration_s = fit_duration_s(rate_per_s, args.warmup_s, args.duration_s, layout.seats())
        .with_context(|| {
            format!(
                "{rate_per_s:.0} reserves/s use up the {} seats of a drop within the {} s \
                 warm-up: raise the seats (up to {MAX_DROP_SEATS}) or pass a lower --peak-rate",
                layout.seats(),
                args.warmup_s
            )
        })?;
    if duration_s < args.duration_s {
        note(
            args.quiet,
            format_args!(
                "{rate_per_s:.0} reserves/s would run out of seats: {duration_s:.1} s measured \
                 per run instead of {}",
                args.duration_s
            ),
        );
    }
    note(
        args.quiet,
        format_args!(
            "peak {:.0}/s ({}); runs at {rate_per_s:.0}/s",
            peak.reserves_per_s, peak.source
        ),
    );

    let mut runs = Vec::new();
    let mut pair_ratios = Vec::new();
    for round in 1..=args.rounds {
        let suffix = if args.rounds > 1 {
            format!(" #{round}")
        } else {
            String::new()
        };
        let without = bench
            .open_run(&format!("without pages{suffix}"), rate_per_s, duration_s, 0)
            .await?;
        if args.pages > 0 {
            let label = format!("with {} pages{suffix}", args.pages);
            let with = bench
                .open_run(&label, rate_per_s, duration_s, args.pages)
                .await?;
            pair_ratios.extend(p99_ratio(
                without.latency.all.p99_ms,
                with.latency.all.p99_ms,
            ));
            runs.extend([without, with]);
        } else {
            runs.push(without);
        }
    }
    let p99_ratio = median(&pair_ratios);
    let passed = runs
        .iter()
        .flat_map(|r| &r.checks)
        .all(|c| c.verdict != Verdict::Fail);
    let report = SeatmapReport {
        scenario: "seatmap",
        booking_url: args.booking_url.clone(),
        layout,
        seats: layout.seats(),
        fans: args.fans,
        peak,
        load_fraction: args.load_fraction,
        rate_per_s,
        warmup_s: args.warmup_s,
        duration_s,
        connections: args.connections,
        runs,
        pair_p99_ratios: pair_ratios,
        p99_ratio,
        bar_p99_ratio: BAR_P99_RATIO,
        meets_bar: p99_ratio.map(|r| r <= BAR_P99_RATIO),
        passed,
    };
    print!("{}", render_text(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report).context("serialising the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(passed)
}

fn render_text(r: &SeatmapReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let l = &r.layout;
    let _ = writeln!(
        out,
        "seatmap: drops of {} sections × {} rows × {} seats = {} seats; {} fans; {}",
        l.sections, l.rows, l.seats_per_row, r.seats, r.fans, r.booking_url
    );
    match r.peak.workers {
        Some(w) => {
            let refused = r
                .peak
                .reserve
                .as_ref()
                .map(|t| t.answered - t.succeeded)
                .unwrap_or(0);
            let _ = writeln!(
                out,
                "peak: {:.0} reserves/s (closed loop, {w} workers, a drop of {} seats; {refused} refused{})",
                r.peak.reserves_per_s,
                r.peak.seats.unwrap_or(0),
                if refused > 0 {
                    ": seats ran out, an overestimate"
                } else {
                    ""
                }
            );
        }
        None => {
            let _ = writeln!(out, "peak: {:.0} /s (given)", r.peak.reserves_per_s);
        }
    }
    let _ = writeln!(
        out,
        "runs: open loop at {} × peak = {:.0} reserves/s, {:.1} s measured after {} s warm-up, {} connections",
        r.load_fraction, r.rate_per_s, r.duration_s, r.warmup_s, r.connections
    );
    let _ = writeln!(
        out,
        "{:<18} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  other",
        "run", "201/s", "p50 ms", "p90 ms", "p99 ms", "p99.9", "max ms", "svc p99"
    );
    for run in &r.runs {
        let a = &run.latency.all;
        let t = &run.reserve;
        let _ = writeln!(
            out,
            "{:<18} {:>8.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  non-201 {} · no answer {} · dropped {}",
            run.label,
            run.ok_per_s,
            a.p50_ms,
            a.p90_ms,
            a.p99_ms,
            a.p99_9_ms,
            a.max_ms,
            run.latency.service.p99_ms,
            t.answered - t.succeeded,
            t.transport_total(),
            t.dropped
        );
        if !t.by_code.is_empty() {
            let _ = writeln!(out, "{:<18} codes: {:?}", "", t.by_code);
        }
        if let Some(p) = &run.polls {
            let _ = writeln!(
                out,
                "{:<18} pages: {} every {} ms = {:.0} GETs/s over {} connections; {} polls in {:.1} s: \
                 200 {} · 304 {} · other {} · no answer {} · dropped {}; {:.1} MB of maps; \
                 poll latency p50 {:.2} p99 {:.2} max {:.2} ms",
                "",
                p.pages,
                p.interval_ms,
                p.target_per_s,
                p.connections,
                p.polls,
                p.elapsed_s,
                p.ok_200,
                p.not_modified_304,
                p.tally.answered - p.ok_200 - p.not_modified_304,
                p.tally.transport_total(),
                p.dropped,
                p.mb_received,
                p.latency.p50_ms,
                p.latency.p99_ms,
                p.latency.max_ms
            );
        }
    }
    match (r.p99_ratio, r.meets_bar) {
        (Some(ratio), Some(meets)) => {
            let pairs: Vec<String> = r
                .pair_p99_ratios
                .iter()
                .map(|x| format!("{x:.3}"))
                .collect();
            let _ = writeln!(
                out,
                "p99 with pages / without: {ratio:.3}{} (bar ≤ {}): {}",
                if pairs.len() > 1 {
                    format!(", the median of {}", pairs.join(", "))
                } else {
                    String::new()
                },
                r.bar_p99_ratio,
                if meets { "met" } else { "NOT met" }
            );
        }
        _ => {
            let _ = writeln!(out, "p99 ratio: n/a (no run with pages)");
        }
    }
    for run in &r.runs {
        // A line per section and count would be 100 lines a run: the failures, then a tally.
        let ok = run
            .checks
            .iter()
            .filter(|c| c.verdict == Verdict::Pass)
            .count();
        for c in run.checks.iter().filter(|c| c.verdict == Verdict::Fail) {
            let _ = writeln!(out, "check [{}] FAIL {}: {}", run.label, c.name, c.detail);
        }
        let _ = writeln!(
            out,
            "checks [{}]: {ok} of {} ok (per section: no negative count, available + held + sold == total)",
            run.label,
            run.checks.len()
        );
    }
    let _ = writeln!(out, "{}", if r.passed { "PASSED" } else { "FAILED" });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BENCH: SeatLayout = SeatLayout {
        sections: 50,
        rows: 10,
        seats_per_row: 100,
    };

    #[test]
    fn reserves_name_every_seat_once_before_wrapping() {
        assert_eq!(BENCH.seats(), 50_000);
        assert_eq!(BENCH.seat_id(0), "S1-1-1");
        assert_eq!(BENCH.seat_id(1), "S2-1-1");
        assert_eq!(BENCH.seat_id(50), "S1-1-2");
        assert_eq!(BENCH.seat_id(50 * 100), "S1-2-1");
        assert_eq!(BENCH.seat_id(49_999), "S50-10-100");
        assert_eq!(BENCH.seat_id(50_000), "S1-1-1");
        let small = SeatLayout {
            sections: 3,
            rows: 2,
            seats_per_row: 4,
        };
        let ids: std::collections::BTreeSet<_> =
            (0..small.seats()).map(|k| small.seat_id(k)).collect();
        assert_eq!(ids.len() as u64, small.seats());
        assert_eq!(&small.hold_body(4)[..], br#"{"seats":["S2-1-2"]}"#);
    }

    #[test]
    fn drop_body_is_a_seated_drop_of_the_layout() {
        let v = BENCH.drop_body("x");
        assert_eq!(v["inventory"]["kind"], "seated");
        let sections = v["inventory"]["sections"].as_array().unwrap();
        assert_eq!(sections.len(), 50);
        assert_eq!(sections[49]["section"], "S50");
        assert_eq!(sections[0]["rows"].as_array().unwrap().len(), 10);
        assert_eq!(
            sections[0]["rows"][9],
            serde_json::json!({"row": "10", "seats": 100})
        );
        assert_eq!(v["per_fan_limit"], PER_FAN_LIMIT);
    }

    #[test]
    fn every_page_polls_once_per_interval_evenly_spaced() {
        let s = PollSchedule {
            pages: 2_000,
            interval: Duration::from_secs(5),
        };
        assert_eq!(s.per_s(), 400.0);
        // The first interval: each page exactly once, 2.5 ms apart.
        let pages: std::collections::BTreeSet<_> = (0..2_000).map(|n| s.page(n)).collect();
        assert_eq!(pages.len(), 2_000);
        assert_eq!(s.offset(1), Duration::from_micros(2_500));
        // Page 7 polls again exactly one interval later.
        assert_eq!(s.page(2_007), 7);
        assert_eq!(s.offset(2_007) - s.offset(7), Duration::from_secs(5));
    }

    #[test]
    fn etag_comes_from_the_maps_version() {
        let body =
            br#"{"drop_id":"d1","version":"5d1f0c2a9b7e4410","sections":[],"server_now_ms":1}"#;
        assert_eq!(etag_of(body).unwrap(), "\"5d1f0c2a9b7e4410\"");
        assert!(etag_of(b"{}").is_none());
        let late = format!(r#"{{"sections":"{}","version":"ab12"}}"#, "f".repeat(1000));
        assert_eq!(etag_of(late.as_bytes()).unwrap(), "\"ab12\"");
        assert_eq!(p99_ratio(2.0, 2.2), Some(2.2 / 2.0));
        assert_eq!(p99_ratio(0.0, 1.0), None);
    }

    #[test]
    fn the_ratio_is_the_median_of_the_pairs() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn the_duration_shrinks_to_the_seats() {
        // 2,000/s for 1 + 20 s fits in 50,000 seats; 7,500/s gets 50,000 / 7,500 − 1 s.
        assert_eq!(fit_duration_s(2_000.0, 1.0, 20.0, 50_000), Some(20.0));
        let d = fit_duration_s(7_500.0, 1.0, 20.0, 50_000).unwrap();
        assert!((d - (50_000.0 / 7_500.0 - 1.0)).abs() < 1e-9);
        assert_eq!(fit_duration_s(50_000.0, 1.0, 20.0, 50_000), None);
    }
}
