//! `loadtest sale`: the whole flash sale as one benchmark, the way a seller's rehearsal would run
//! it (docs/BENCHMARKS.md, "The whole sale").
//!
//! 1. **Setup.** A queue drop of `--stock` units opening `--pre-open-s` from now, with the
//!    admission settings given and `leave_grace_s` set for the run; a fan session per fan.
//!    Fans `0..ws_fans` wait on WebSockets (client processes of loadtest, [`crate::ws_clients`],
//!    authenticating with their first message), the rest over HTTP: join, then poll
//!    `/queue/me`, from connections spread over 127.0.0.x source addresses.
//! 2. **Pre-queue.** `--pre-queue-pct` of each kind join before `opens_at`.
//! 3. **Opening.** The rest join (sockets as fast as their processes connect, HTTP fans at
//!    `--join-rate-per-s`); admission runs at the set rate.
//! 4. **Shopping.** Every admission (pushed to a socket, or found by a poll) reaches the parent,
//!    which shops for the fan: after `--think-ms` a reserve with the admission token; with the
//!    hold it pays, releases it or abandons it (it expires); told `all_held` it tries again.
//!    Hostile fans (`--hostile-pct`) also open a second tab, reserve without the token, replay
//!    their reserve, reuse its key with another body, and reserve past the per-fan limit.
//! 5. **Sold out.** When the drop's counts show every unit sold, waiters get
//!    `--sold-out-grace-s` to hear it; then everything stops and the figures are made: sold ==
//!    stock in the API and Postgres, the per-fan limit in Postgres, τ of join vs admission order,
//!    the pre-queue against the revealed seed, admissions/s where the bucket limited, `sold_out`
//!    delivery after the last sale, latencies, errors, CPU and memory.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode};
use rand::Rng as _;
use sha2::Sha256;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use crate::api::{error_code, hold_id, AdmissionSettings, QueueDropSpec, Setup};
use crate::cli::SaleArgs;
use crate::http::{bearer, path_segment, split_base_url, Slot, Target, TransportError};
use crate::invariants::{self, Verdict};
use crate::procfs;
use crate::queue::{fan_tokens, redis_port, split_inits, Clients, Split};
use crate::queue_report::{merge_ticks, Machine};
use crate::sale_report::{self as report, SaleReport, Sample};
use crate::stats::{micros, new_histogram, Percentiles};
use crate::ws_clients::{self, wall_us, AdmissionLine, ChildReport};

/// The SKU of the sale's drop.
const SKU: &str = "LT";
/// How often the drop's counts (and the processes' memory) are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// How often an idle HTTP worker looks for due work.
const IDLE_POLL: Duration = Duration::from_millis(20);
/// Attempts of one request answered 429 or 503 (it asks us to come back), `retry_ms` apart.
const MAX_ATTEMPTS: u32 = 30;
/// After stopping, how long shopping fans get to finish what they started.
const SHOP_DRAIN: Duration = Duration::from_secs(30);
/// Pre-queue joins are spread over this share of the time before opening.
const PRE_QUEUE_SPREAD: f64 = 0.7;
/// Sockets of the post-open processes start this long after `opens_at`, so the first joins
/// aren't refused by a server whose clock is a hair behind ours.
const OPEN_MARGIN: Duration = Duration::from_millis(200);
/// `--line-only`: the head's exact positions are timed this many seconds of admissions past
/// the first waiter, so admission doesn't overtake the sample while it is timed.
const POSITION_HEAD_MARGIN_S: f64 = 5.0;
/// Reading Redis' INFO: how long, and how much, at most.
const REDIS_INFO_TIMEOUT: Duration = Duration::from_secs(5);
const REDIS_INFO_MAX_BYTES: usize = 64 * 1024;
/// Source addresses of the HTTP fans: 127.0.0.(HTTP_HOST_BASE + k).
const HTTP_HOST_BASE: usize = 2;

/// What a held fan does with the hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Pay,
    Release,
    Abandon,
}

/// One fan and its part in the sale, fixed before it starts.
struct Fan {
    name: String,
    auth: HeaderValue,
    socket: bool,
    pre_queue: bool,
    hostile: bool,
    then: Then,
}

/// SplitMix64: a fan's behaviour from its index and the run, reproducible from the run id.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fan `i`'s draw in 0..100 for `what` (distinct salts give independent draws).
fn draw(run_seed: u64, i: usize, what: u64) -> u8 {
    (mix(run_seed ^ mix(i as u64 ^ (what << 56))) % 100) as u8
}

/// Fans `0..ws` are socket fans; of each kind the first `pre_queue_pct` % join early.
fn plan(
    args: &SaleArgs,
    names: Vec<String>,
    tokens: &[String],
    run_seed: u64,
) -> anyhow::Result<Vec<Fan>> {
    let ws = args.ws_fans;
    let http = args.fans - ws;
    let pre_ws = ws * usize::from(args.pre_queue_pct) / 100;
    let pre_http = http * usize::from(args.pre_queue_pct) / 100;
    names
        .into_iter()
        .zip(tokens)
        .enumerate()
        .map(|(i, (name, token))| {
            let socket = i < ws;
            let pre_queue = if socket {
                i < pre_ws
            } else {
                i - ws < pre_http
            };
            let d = draw(run_seed, i, 1);
            let then = if d < args.pay_pct {
                Then::Pay
            } else if d < args.pay_pct + args.release_pct {
                Then::Release
            } else {
                Then::Abandon
            };
            Ok(Fan {
                name,
                auth: bearer(token)?,
                socket,
                pre_queue,
                hostile: draw(run_seed, i, 2) < args.hostile_pct,
                then,
            })
        })
        .collect()
}

/// What the run learns about one fan.
#[derive(Debug, Default, Clone)]
struct FanLog {
    /// HTTP fans: when the join answer came and what it said (sockets: from their reports).
    join_us: Option<i64>,
    join_place: Option<i64>,
    join_status: Option<String>,
    /// Left the line (a poll found no place) and joined again: not in τ.
    rejoined: bool,
    /// The admission token: its place, and the admission's Redis time (its shop end minus the
    /// shop window).
    admitted_ms: Option<i64>,
    token_place: Option<i64>,
    /// The session: its shop end, when the hold came and until when it lasts, how it ended.
    shop_end_ms: Option<i64>,
    hold_ms: Option<i64>,
    hold_expires_ms: Option<i64>,
    end: Option<report::SessionEnd>,
    /// HTTP fans: when a poll said `sold_out`.
    sold_out_us: Option<i64>,
    /// When the fan heard its admission (sockets: the `admitted` frame; HTTP: the poll).
    heard_admitted_us: Option<i64>,
    /// Admitted, or told the line is over: no more polls.
    done: bool,
}

/// Everything the run counts, under one lock (the parent is one thread by default; contention
/// is nil).
#[derive(Debug)]
struct Tally {
    fans: Vec<FanLog>,
    join_http: Histogram<u64>,
    admitted_to_hold: Histogram<u64>,
    reserve: Histogram<u64>,
    confirm: Histogram<u64>,
    /// Per Unix second: reserve and confirm latencies, for the chart.
    reserve_by_s: BTreeMap<i64, Histogram<u64>>,
    confirm_by_s: BTreeMap<i64, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    join_failed: BTreeMap<String, u64>,
    shop: report::Shop,
    hostile: report::Hostile,
    last_sale_us: Option<i64>,
}

impl Tally {
    fn new(fans: usize) -> Self {
        Self {
            fans: vec![FanLog::default(); fans],
            join_http: new_histogram(),
            admitted_to_hold: new_histogram(),
            reserve: new_histogram(),
            confirm: new_histogram(),
            reserve_by_s: BTreeMap::new(),
            confirm_by_s: BTreeMap::new(),
            errors: BTreeMap::new(),
            join_failed: BTreeMap::new(),
            shop: report::Shop::default(),
            hostile: report::Hostile::default(),
            last_sale_us: None,
        }
    }

    fn error(&mut self, what: &str, code: &str) {
        *self.errors.entry(format!("{what}:{code}")).or_default() += 1;
    }
}

fn record(h: &mut Histogram<u64>, us: u64) {
    // Clamped into the histogram's range, whose bounds are constants.
    let _ = h.record(us.clamp(1, crate::stats::HIST_MAX_US));
}

fn record_at(by_s: &mut BTreeMap<i64, Histogram<u64>>, at_us: i64, us: u64) {
    record(
        by_s.entry(at_us.div_euclid(1_000_000))
            .or_insert_with(new_histogram),
        us,
    );
}

/// The run's shared parts.
struct Ctx {
    args: SaleArgs,
    /// The first instance of each server: the run's own requests (drop, counts, seed).
    booking: Target,
    queue: Target,
    /// Every instance of each server: fan k shops on `bookings[k mod n]`, socket k and HTTP
    /// connection k go to `queues[k mod n]`.
    bookings: Vec<Target>,
    queues: Vec<Target>,
    drop_id: String,
    fans: Vec<Fan>,
    tally: Mutex<Tally>,
    stop: AtomicBool,
    /// HTTP fans whose work isn't over.
    http_live: AtomicU64,
    timeout: Duration,
}

impl Ctx {
    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn booking_of(&self, fan: usize) -> &Target {
        &self.bookings[fan % self.bookings.len()]
    }

    fn queue_of(&self, k: usize) -> &Target {
        &self.queues[k % self.queues.len()]
    }

    fn queue_path(&self, tail: &str) -> String {
        format!("/v1/drops/{}/queue{tail}", path_segment(&self.drop_id))
    }
}

/// One request of a fan: what it is counted as, and its parts.
struct Req<'a> {
    /// Its errors are counted as `what:code`.
    what: &'a str,
    method: Method,
    path: &'a str,
    auth: &'a HeaderValue,
    headers: &'a [(&'static str, HeaderValue)],
    body: Option<Bytes>,
}

impl<'a> Req<'a> {
    fn new(what: &'a str, method: Method, path: &'a str, auth: &'a HeaderValue) -> Self {
        Self {
            what,
            method,
            path,
            auth,
            headers: &[],
            body: None,
        }
    }

    fn headers(self, headers: &'a [(&'static str, HeaderValue)]) -> Self {
        Self { headers, ..self }
    }

    fn body(self, body: Bytes) -> Self {
        Self {
            body: Some(body),
            ..self
        }
    }
}

/// One request on `slot`, retried (bounded) while the server answers 429 or 503. The error
/// answer's code (or the transport error) is counted under `req.what`.
async fn call(
    ctx: &Ctx,
    slot: &mut Slot,
    target: &Target,
    req: Req<'_>,
) -> Result<(StatusCode, Bytes, Duration), TransportError> {
    let Req {
        what,
        method,
        path,
        auth,
        headers,
        body,
    } = req;
    let uri = target.uri(path).map_err(|_| TransportError::Connect)?;
    let mut last = Err(TransportError::Connect);
    for _ in 0..MAX_ATTEMPTS {
        let (result, sent) = slot
            .send(target, || {
                let mut req = target.request(method.clone(), uri.clone(), Some(auth), body.clone());
                for (k, v) in headers {
                    req.headers_mut().insert(*k, v.clone());
                }
                (req, Instant::now())
            })
            .await;
        let took = sent.elapsed();
        match result {
            Ok((status, bytes)) => {
                if status.is_client_error() || status.is_server_error() {
                    let code = error_code(&bytes)
                        .map(|c| c.into_owned())
                        .unwrap_or_else(|| status.as_u16().to_string());
                    ctx.tally().error(what, &code);
                }
                let again = status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::SERVICE_UNAVAILABLE;
                last = Ok((status, bytes, took));
                if !again || ctx.stop.load(Ordering::Relaxed) {
                    return last;
                }
            }
            Err(e) => {
                ctx.tally().error(what, e.as_str());
                last = Err(e);
                if e.outcome_unknown() || ctx.stop.load(Ordering::Relaxed) {
                    return last;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(ctx.args.retry_ms)).await;
    }
    last
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null)
}

/// Work an HTTP fan has due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Join,
    Poll,
}

type Due = Reverse<(i64, usize, Step)>;

/// The HTTP fans' work, by due time.
struct Agenda(Mutex<BinaryHeap<Due>>);

impl Agenda {
    fn push(&self, at_us: i64, fan: usize, step: Step) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Reverse((at_us, fan, step)));
    }

    /// The earliest work if it is due; else how long until it is (None: nothing left).
    fn next(&self, now_us: i64) -> Result<(usize, Step), Option<i64>> {
        let mut heap = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match heap.peek() {
            Some(Reverse((at, fan, step))) if *at <= now_us => {
                let (fan, step) = (*fan, *step);
                heap.pop();
                Ok((fan, step))
            }
            Some(Reverse((at, _, _))) => Err(Some(at - now_us)),
            None => Err(None),
        }
    }
}

/// One HTTP connection of the fans, from its own source address.
async fn http_worker(
    ctx: Arc<Ctx>,
    agenda: Arc<Agenda>,
    k: usize,
    admissions: mpsc::UnboundedSender<AdmissionLine>,
) {
    let host = (HTTP_HOST_BASE + k).min(ws_clients::MAX_HOSTS_PER_NET) as u8;
    let mut slot = Slot::from_source(ctx.timeout, Ipv4Addr::new(127, 0, 0, host));
    // A slot keeps one connection: this worker's fans join and poll through one instance.
    let queue = ctx.queue_of(k).clone();
    while !ctx.stop.load(Ordering::Relaxed) {
        let (fan, step) = match agenda.next(wall_us()) {
            Ok(work) => work,
            Err(wait) => {
                let wait = wait.map_or(IDLE_POLL, |us| {
                    Duration::from_micros(us.max(0) as u64).min(IDLE_POLL)
                });
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        match step {
            Step::Join => http_join(&ctx, &queue, &agenda, &mut slot, fan).await,
            Step::Poll => http_poll(&ctx, &queue, &agenda, &mut slot, fan, &admissions).await,
        }
    }
}

async fn http_join(ctx: &Ctx, queue: &Target, agenda: &Agenda, slot: &mut Slot, fan: usize) {
    let f = &ctx.fans[fan];
    let path = ctx.queue_path("");
    let answer = call(
        ctx,
        slot,
        queue,
        Req::new("join", Method::POST, &path, &f.auth),
    )
    .await;
    let now = wall_us();
    let poll_at = now + jitter(ctx.args.poll_ms, fan);
    match answer {
        Ok((status, bytes, took)) if status.is_success() => {
            let v = json(&bytes);
            let mut t = ctx.tally();
            record(&mut t.join_http, micros(took));
            let log = &mut t.fans[fan];
            log.join_us = Some(now);
            log.join_place = v["place"].as_i64();
            log.join_status = v["status"].as_str().map(str::to_owned);
            drop(t);
            if ctx.args.line_only {
                // In line: never polls (the drop's grace keeps it there).
                ctx.http_live.fetch_sub(1, Ordering::Relaxed);
            } else {
                agenda.push(poll_at, fan, Step::Poll);
            }
        }
        Ok((status, bytes, _)) => {
            let code =
                error_code(&bytes).map_or_else(|| status.as_u16().to_string(), |c| c.into_owned());
            *ctx.tally().join_failed.entry(code).or_default() += 1;
            ctx.http_live.fetch_sub(1, Ordering::Relaxed);
        }
        Err(e) => {
            *ctx.tally()
                .join_failed
                .entry(e.as_str().to_owned())
                .or_default() += 1;
            ctx.http_live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A fan's poll interval, spread ±25 % by fan so the polls don't march in step.
fn jitter(poll_ms: u64, fan: usize) -> i64 {
    let spread = mix(fan as u64) % 500; // 0..500 per mille of half the interval
    (poll_ms as i64 * 1000) * (750 + spread as i64) / 1000
}

async fn http_poll(
    ctx: &Ctx,
    queue: &Target,
    agenda: &Agenda,
    slot: &mut Slot,
    fan: usize,
    admissions: &mpsc::UnboundedSender<AdmissionLine>,
) {
    let f = &ctx.fans[fan];
    let path = ctx.queue_path("/me");
    let answer = call(
        ctx,
        slot,
        queue,
        Req::new("poll", Method::GET, &path, &f.auth),
    )
    .await;
    let now = wall_us();
    let again = now + jitter(ctx.args.poll_ms, fan);
    let Ok((status, bytes, _)) = answer else {
        agenda.push(again, fan, Step::Poll);
        return;
    };
    if status == StatusCode::NOT_FOUND {
        // Left the line (unseen for leave_grace_s): a real fan would join again, at the back.
        ctx.tally().fans[fan].rejoined = true;
        agenda.push(now, fan, Step::Join);
        return;
    }
    if !status.is_success() {
        agenda.push(again, fan, Step::Poll);
        return;
    }
    let v = json(&bytes);
    match v["status"].as_str() {
        Some("admitted") => {
            if let Some(token) = v["admission_token"].as_str() {
                ctx.tally().fans[fan].done = true;
                ctx.http_live.fetch_sub(1, Ordering::Relaxed);
                // The shopper only goes once the run has stopped: nobody left to shop then.
                let _ = admissions.send(AdmissionLine {
                    fan,
                    admission_token: token.to_owned(),
                    at_us: now,
                });
                return;
            }
            agenda.push(again, fan, Step::Poll);
        }
        Some("sold_out") | Some("closed") | Some("done") => {
            let mut t = ctx.tally();
            let log = &mut t.fans[fan];
            if v["status"] == "sold_out" {
                log.sold_out_us.get_or_insert(now);
            }
            log.done = true;
            drop(t);
            ctx.http_live.fetch_sub(1, Ordering::Relaxed);
        }
        _ => agenda.push(again, fan, Step::Poll),
    }
}

fn idempotency_key() -> HeaderValue {
    let key = format!("lt-{:032x}", rand::rng().random::<u128>());
    // Hex digits and a dash: always a valid header value.
    HeaderValue::from_str(&key).unwrap_or_else(|_| HeaderValue::from_static("lt-fallback"))
}

/// Shops for one admitted fan: think, reserve (again while `all_held`), then pay, release or
/// abandon; hostile fans try what they shouldn't on the way.
/// Books an admission: the token's place and session (its shop end, and the admission's Redis
/// time, the shop end minus the shop window). Returns (place, shop end ms).
fn book_admission(ctx: &Ctx, line: &AdmissionLine) -> (Option<i64>, Option<i64>) {
    let claims = ws_clients::token_claims(&line.admission_token);
    let claim = |k: &str| claims.as_ref().and_then(|c| c.get(k)?.as_i64());
    let (token_place, shop_end_ms) = (claim("place"), claim("shop_end_ms"));
    let mut t = ctx.tally();
    t.shop.admitted += 1;
    if let Some(log) = t.fans.get_mut(line.fan) {
        log.token_place = token_place;
        log.admitted_ms = shop_end_ms.map(|e| e - i64::from(ctx.args.shop_window_s) * 1000);
        log.shop_end_ms = shop_end_ms;
        log.heard_admitted_us = Some(line.at_us);
        log.end = Some(report::SessionEnd::NoHold);
    }
    (token_place, shop_end_ms)
}

async fn shop(ctx: Arc<Ctx>, line: AdmissionLine, shops: Arc<Semaphore>) {
    let Ok(_permit) = shops.acquire().await else {
        return;
    };
    let fan = line.fan;
    let Some(f) = ctx.fans.get(fan) else {
        return;
    };
    let (token_place, shop_end_ms) = book_admission(&ctx, &line);
    tokio::time::sleep(Duration::from_millis(ctx.args.think_ms)).await;
    // One connection per server: a slot keeps the connection it opened first.
    let mut slot = Slot::new(ctx.timeout);
    let mut queue_slot = Slot::new(ctx.timeout);
    let booking = ctx.booking_of(fan);
    let holds = format!("/v1/drops/{}/holds", path_segment(&ctx.drop_id));
    let body = crate::api::hold_body(SKU, 1);
    let Ok(token) = HeaderValue::from_str(&line.admission_token) else {
        ctx.tally().error("reserve", "bad_admission_token");
        return;
    };
    let admitted = ("x-admission-token", token);

    if f.hostile {
        // A second tab: the same place, never a second one.
        let path = ctx.queue_path("");
        if let Ok((status, bytes, _)) = call(
            &ctx,
            &mut queue_slot,
            ctx.queue_of(fan),
            Req::new("second_tab", Method::POST, &path, &f.auth),
        )
        .await
        {
            let same = status.is_success() && json(&bytes)["place"].as_i64() == token_place;
            let mut t = ctx.tally();
            if same {
                t.hostile.second_tab_same_place += 1;
            } else {
                t.hostile.second_tab_other_place += 1;
            }
        }
        // A reserve without the admission token.
        let key = ("idempotency-key", idempotency_key());
        if let Ok((status, _, _)) = call(
            &ctx,
            &mut slot,
            booking,
            Req::new("unadmitted_reserve", Method::POST, &holds, &f.auth)
                .headers(&[key])
                .body(body.clone()),
        )
        .await
        {
            let mut t = ctx.tally();
            if status == StatusCode::FORBIDDEN {
                t.hostile.unadmitted_refused += 1;
            } else if status.is_success() {
                t.hostile.unadmitted_accepted += 1;
            }
        }
    }

    // Reserve, again while everything is held, until the shop window ends.
    let (hold, key) = loop {
        if ctx.stop.load(Ordering::Relaxed) {
            ctx.tally().shop.no_hold += 1;
            return;
        }
        let key = idempotency_key();
        let headers = [admitted.clone(), ("idempotency-key", key.clone())];
        let answer = call(
            &ctx,
            &mut slot,
            booking,
            Req::new("reserve", Method::POST, &holds, &f.auth)
                .headers(&headers)
                .body(body.clone()),
        )
        .await;
        let now = wall_us();
        let Ok((status, bytes, took)) = answer else {
            ctx.tally().shop.no_hold += 1;
            return;
        };
        {
            let mut t = ctx.tally();
            record(&mut t.reserve, micros(took));
            record_at(&mut t.reserve_by_s, now, micros(took));
        }
        if status == StatusCode::CREATED {
            let Some(hold) = hold_id(&bytes) else {
                ctx.tally().error("reserve", "no_hold_id");
                return;
            };
            let mut t = ctx.tally();
            t.shop.holds += 1;
            record(&mut t.admitted_to_hold, (now - line.at_us).max(1) as u64);
            let log = &mut t.fans[fan];
            log.hold_ms = Some(now / 1000);
            log.hold_expires_ms = json(&bytes)["expires_at_ms"].as_i64();
            log.end = Some(report::SessionEnd::Holding);
            break (hold, key);
        }
        let code = error_code(&bytes);
        let past_window = shop_end_ms.is_some_and(|end| now / 1000 >= end);
        if code.as_deref() == Some("all_held") && !past_window {
            ctx.tally().shop.all_held_retries += 1;
            tokio::time::sleep(Duration::from_millis(ctx.args.retry_ms)).await;
            continue;
        }
        ctx.tally().shop.no_hold += 1;
        return;
    };

    if f.hostile {
        hostile_replays(
            &ctx, &mut slot, booking, f, &holds, &admitted, &key, &body, &hold,
        )
        .await;
    }

    let hold_path = format!("/v1/holds/{}", path_segment(&hold));
    match f.then {
        Then::Pay => {
            let path = format!("{hold_path}/confirm");
            let answer = call(
                &ctx,
                &mut slot,
                booking,
                Req::new("confirm", Method::POST, &path, &f.auth)
                    .body(crate::api::confirm_body(&hold)),
            )
            .await;
            let now = wall_us();
            if let Ok((status, _, took)) = answer {
                let mut t = ctx.tally();
                record(&mut t.confirm, micros(took));
                record_at(&mut t.confirm_by_s, now, micros(took));
                if status == StatusCode::CREATED {
                    t.shop.paid += 1;
                    t.last_sale_us = Some(t.last_sale_us.map_or(now, |l| l.max(now)));
                    t.fans[fan].end = Some(report::SessionEnd::Paid { at_ms: now / 1000 });
                }
            }
        }
        Then::Release => {
            let answer = call(
                &ctx,
                &mut slot,
                booking,
                Req::new("release", Method::DELETE, &hold_path, &f.auth),
            )
            .await;
            if matches!(answer, Ok((s, _, _)) if s.is_success()) {
                let mut t = ctx.tally();
                t.shop.released += 1;
                t.fans[fan].end = Some(report::SessionEnd::Released {
                    at_ms: wall_us() / 1000,
                });
            }
        }
        Then::Abandon => {
            let mut t = ctx.tally();
            t.shop.abandoned += 1;
            t.fans[fan].end = Some(report::SessionEnd::Abandoned);
        }
    }
}

/// A hostile fan with a hold: replays the reserve (the same hold back), reuses its key with
/// another body (`idempotency_key_reused`), and asks past the per-fan limit (`limit_exceeded`).
#[allow(clippy::too_many_arguments)]
async fn hostile_replays(
    ctx: &Ctx,
    slot: &mut Slot,
    booking: &Target,
    f: &Fan,
    holds: &str,
    admitted: &(&'static str, HeaderValue),
    key: &HeaderValue,
    body: &Bytes,
    hold: &str,
) {
    let with_key = [admitted.clone(), ("idempotency-key", key.clone())];
    if let Ok((status, bytes, _)) = call(
        ctx,
        slot,
        booking,
        Req::new("replay", Method::POST, holds, &f.auth)
            .headers(&with_key)
            .body(body.clone()),
    )
    .await
    {
        let same = status.is_success() && hold_id(&bytes).as_deref() == Some(hold);
        let mut t = ctx.tally();
        if same {
            t.hostile.replay_same_hold += 1;
        } else {
            t.hostile.replay_other += 1;
        }
    }
    // The same request with other bytes (the key binds the body's bytes).
    let other = Bytes::from(format!(" {}", String::from_utf8_lossy(body)));
    if let Ok((status, bytes, _)) = call(
        ctx,
        slot,
        booking,
        Req::new("reused_key", Method::POST, holds, &f.auth)
            .headers(&with_key)
            .body(other),
    )
    .await
    {
        let mut t = ctx.tally();
        if status == StatusCode::UNPROCESSABLE_ENTITY
            && error_code(&bytes).as_deref() == Some("idempotency_key_reused")
        {
            t.hostile.reused_key_refused += 1;
        } else {
            t.hostile.reused_key_other += 1;
        }
    }
    let fresh = [admitted.clone(), ("idempotency-key", idempotency_key())];
    let past = crate::api::hold_body(SKU, ctx.args.per_fan_limit);
    if let Ok((status, _, _)) = call(
        ctx,
        slot,
        booking,
        Req::new("over_limit", Method::POST, holds, &f.auth)
            .headers(&fresh)
            .body(past),
    )
    .await
    {
        let mut t = ctx.tally();
        if status.is_success() {
            t.hostile.over_limit_accepted += 1;
        } else {
            t.hostile.over_limit_refused += 1;
        }
    }
}

/// The join rate after opening, shared by the sockets and the HTTP fans in proportion to their
/// numbers, so both kinds arrive over the same stretch of time, interleaved.
#[derive(Debug, Clone, Copy, PartialEq)]
struct JoinRates {
    ws_per_s: f64,
    http_per_s: f64,
}

impl JoinRates {
    fn of(total_per_s: f64, ws: usize, http: usize) -> Self {
        let n = (ws + http).max(1) as f64;
        // Never 0: a kind with no fans never uses its rate.
        let share = |k: usize| (total_per_s * k as f64 / n).max(f64::MIN_POSITIVE);
        Self {
            ws_per_s: share(ws),
            http_per_s: share(http),
        }
    }
}

/// An RFC 3339 time `ms` after the epoch.
fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The pre-queue score of `fan` under `seed`: HMAC-SHA256(seed, fan) cut to its first 52 bits,
/// as docs/API.md publishes it, recomputed here from the revealed seed.
pub fn prequeue_score(seed: &str, fan: &str) -> Option<i64> {
    let mut mac = Hmac::<Sha256>::new_from_slice(seed.as_bytes()).ok()?;
    mac.update(fan.as_bytes());
    let digest = mac.finalize().into_bytes();
    let first: [u8; 8] = digest.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(first) >> 12) as i64)
}

/// The processes whose CPU and memory the report gives.
struct Watched {
    procs: Vec<(String, u32)>,
    cpu_start: Vec<f64>,
    rss_start: Vec<u64>,
    rss_peak: Mutex<Vec<u64>>,
}

impl Watched {
    fn find(args: &SaleArgs, bookings: &[Target], queues: &[Target]) -> Self {
        let mut procs: Vec<(String, u32)> = Vec::new();
        let mut add = |name: &str, pid: Option<u32>| {
            let Some(pid) = pid else { return };
            match procs.iter_mut().find(|(_, p)| *p == pid) {
                Some((n, _)) => *n = format!("{n} + {name}"),
                None => procs.push((name.to_owned(), pid)),
            }
        };
        // Several instances: one row each, named by port. (Behind HAProxy, its listener is the
        // process found: the instances' own CPU needs --instances-from-env.)
        for (server, targets) in [("booking-api", bookings), ("queue-server", queues)] {
            for t in targets {
                let name = if targets.len() > 1 {
                    format!("{server} :{}", t.addr.port())
                } else {
                    server.to_owned()
                };
                add(&name, procfs::listener_pid(t.addr.port()).ok());
            }
        }
        add(
            "redis",
            args.redis_url
                .as_deref()
                .and_then(redis_port)
                .and_then(|p| procfs::listener_pid(p).ok()),
        );
        for node in &args.redis_nodes {
            let port = node
                .trim()
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok());
            if let Some(port) = port {
                add(&format!("redis :{port}"), procfs::listener_pid(port).ok());
            }
        }
        let cpu_start = procs.iter().map(|(_, p)| procfs::cpu_s(*p)).collect();
        let rss_start: Vec<u64> = procs
            .iter()
            .map(|(_, p)| procfs::vm_rss_kib(*p).unwrap_or(0))
            .collect();
        Self {
            procs,
            cpu_start,
            rss_peak: Mutex::new(rss_start.clone()),
            rss_start,
        }
    }

    fn sample(&self) {
        let mut peak = self.rss_peak.lock().unwrap_or_else(|p| p.into_inner());
        for (k, (_, pid)) in self.procs.iter().enumerate() {
            peak[k] = peak[k].max(procfs::vm_rss_kib(*pid).unwrap_or(0));
        }
    }

    fn usage(&self, elapsed_s: f64) -> Vec<report::ProcUsage> {
        let peak = self.rss_peak.lock().unwrap_or_else(|p| p.into_inner());
        self.procs
            .iter()
            .enumerate()
            .map(|(k, (name, pid))| {
                let cpu_s = procfs::cpu_s(*pid) - self.cpu_start[k];
                let rss_end_kib = procfs::vm_rss_kib(*pid).unwrap_or(0);
                report::ProcUsage {
                    name: name.clone(),
                    pid: *pid,
                    cpu_s,
                    cpu_pct: if elapsed_s > 0.0 {
                        cpu_s / elapsed_s * 100.0
                    } else {
                        0.0
                    },
                    rss_start_kib: self.rss_start[k],
                    rss_peak_kib: peak[k].max(rss_end_kib),
                    rss_end_kib,
                }
            })
            .collect()
    }
}

/// Reads the drop's counts until it is sold out (or the run is stopped); returns the samples.
async fn sample_counts(
    ctx: Arc<Ctx>,
    watched: Arc<Watched>,
    samples: Arc<Mutex<Vec<Sample>>>,
    sold_out: Arc<tokio::sync::Notify>,
) {
    let mut setup = Setup::new(ctx.booking.clone(), ctx.timeout);
    let mut told = false;
    while !ctx.stop.load(Ordering::Relaxed) {
        if let Ok(drop) = setup.get_drop(&ctx.drop_id).await {
            if let Ok(buckets) = invariants::parse_inventory(&drop) {
                let sum = |f: fn(&invariants::Bucket) -> i64| buckets.iter().map(f).sum::<i64>();
                let s = Sample {
                    at_ms: wall_us() / 1000,
                    available: sum(|b| b.available),
                    held: sum(|b| b.held),
                    sold: sum(|b| b.sold),
                };
                samples.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                if !told && s.sold >= ctx.args.stock as i64 {
                    told = true;
                    sold_out.notify_one();
                }
            }
        }
        watched.sample();
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// Until the drop's counts show every unit sold (or `--max-duration-s`), with a bar; then the
/// waiters' grace to hear it. Whether it sold out.
async fn until_sold_out(
    ctx: &Ctx,
    clients: &[Clients],
    samples: &Mutex<Vec<Sample>>,
    sold_out: &tokio::sync::Notify,
    opened: Instant,
) -> bool {
    let args = &ctx.args;
    let bar = crate::bar(
        args.quiet,
        args.stock,
        "sale          {bar:30} {pos}/{len} sold [{elapsed_precise}] {msg}",
    );
    let deadline = opened + Duration::from_secs_f64(args.max_duration_s);
    let finished = loop {
        let last = samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .copied();
        if let Some(s) = last {
            bar.set_position(s.sold.max(0) as u64);
        }
        let opened_sockets: u64 = clients.iter().map(|c| c.counts().opened).sum();
        {
            let t = ctx.tally();
            bar.set_message(format!(
                "sockets {opened_sockets} · admitted {} · held {} · paid {}",
                t.shop.admitted,
                last.map_or(0, |s| s.held),
                t.shop.paid
            ));
        }
        tokio::select! {
            _ = sold_out.notified() => break true,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if Instant::now() >= deadline {
            break false;
        }
    };
    bar.finish_and_clear();
    let sold_out_after = opened.elapsed();
    crate::note(
        args.quiet,
        format_args!(
            "{} after {:.1} s; letting waiters hear it",
            if finished { "sold out" } else { "out of time" },
            sold_out_after.as_secs_f64()
        ),
    );
    // Waiters hear it: sockets by push; HTTP fans at their next poll.
    let grace = Duration::from_secs_f64(args.sold_out_grace_s);
    let http_grace = Duration::from_millis(args.poll_ms * 5 / 4 + 1000);
    let grace_end = Instant::now() + grace;
    let http_end = Instant::now() + grace.max(http_grace);
    tokio::time::sleep_until(grace_end).await;
    while Instant::now() < http_end && ctx.http_live.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    finished
}

/// `--line-only`: until every fan has tried to join (or `--max-duration-s`), then the line held
/// full for `--line-hold-s`, then `/queue/me` timed at its head and its back.
async fn watch_line(ctx: &Ctx, clients: &[Clients], opened: Instant) -> LineWatch {
    let args = &ctx.args;
    let deadline = opened + Duration::from_secs_f64(args.max_duration_s);
    let bar = crate::bar(
        args.quiet,
        args.fans as u64,
        "joining       {bar:30} {pos}/{len} [{elapsed_precise}] {msg}",
    );
    let full = loop {
        let sockets = clients.iter().fold((0, 0), |(o, f), c| {
            let n = c.counts();
            (o + n.opened, f + n.failed)
        });
        let http_left = ctx.http_live.load(Ordering::Relaxed);
        let http_done = (args.fans - args.ws_fans) as u64 - http_left;
        bar.set_position(sockets.0 + sockets.1 + http_done);
        bar.set_message(format!(
            "sockets {} · admitted {}",
            sockets.0,
            ctx.tally().shop.admitted
        ));
        if http_left == 0 && sockets.0 + sockets.1 >= args.ws_fans as u64 {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    bar.finish_and_clear();
    let full_at_ms = wall_us() / 1000;
    let used_memory_full = redis_used_memory(args.redis_url.as_deref()).await;
    crate::note(
        args.quiet,
        format_args!(
            "{} after {:.1} s; watching the full line for {:.0} s",
            if full {
                "everyone joined"
            } else {
                "out of time"
            },
            opened.elapsed().as_secs_f64(),
            args.line_hold_s
        ),
    );
    let hold_from_ms = wall_us() / 1000;
    tokio::time::sleep(Duration::from_secs_f64(args.line_hold_s)).await;
    let hold_to_ms = wall_us() / 1000;

    // Exact positions: the waiters with the lowest places not yet admitted, and the last ones.
    let mut waiting: Vec<(i64, usize)> = {
        let t = ctx.tally();
        (args.ws_fans..args.fans)
            .filter_map(|i| {
                let l = &t.fans[i];
                (l.admitted_ms.is_none() && l.join_status.as_deref() == Some("waiting"))
                    .then_some((l.join_place?, i))
            })
            .collect()
    };
    waiting.sort_unstable();
    // Admission moves on while the head is timed: start a few seconds of admissions further in.
    let skip = (args.admission.rate_per_s * POSITION_HEAD_MARGIN_S) as usize;
    let n = args.position_samples;
    let head: Vec<usize> = waiting.iter().skip(skip).take(n).map(|(_, i)| *i).collect();
    let back: Vec<usize> = waiting.iter().rev().take(n).map(|(_, i)| *i).collect();
    let position_head = time_positions(ctx, &head).await;
    let position_back = time_positions(ctx, &back).await;
    LineWatch {
        full,
        full_at_ms,
        used_memory_full,
        hold_from_ms,
        hold_to_ms,
        position_head,
        position_back,
    }
}

/// What `--line-only` saw while it watched.
struct LineWatch {
    full: bool,
    full_at_ms: i64,
    used_memory_full: Option<u64>,
    hold_from_ms: i64,
    hold_to_ms: i64,
    position_head: Percentiles,
    position_back: Percentiles,
}

/// `GET /queue/me` of each fan in turn on one connection: the latency of an exact position.
async fn time_positions(ctx: &Ctx, fans: &[usize]) -> Percentiles {
    let mut slot = Slot::new(ctx.timeout);
    let mut h = new_histogram();
    let path = ctx.queue_path("/me");
    for &fan in fans {
        let f = &ctx.fans[fan];
        if let Ok((status, _, took)) = call(
            ctx,
            &mut slot,
            &ctx.queue,
            Req::new("position", Method::GET, &path, &f.auth),
        )
        .await
        {
            if status.is_success() {
                record(&mut h, micros(took));
            }
        }
    }
    Percentiles::of(&h)
}

/// Redis' `used_memory` (INFO memory) at `redis://[:password@]host:port`, read with a plain
/// RESP exchange; None when there is no URL or it can't be read (the report says n/a).
async fn redis_used_memory(url: Option<&str>) -> Option<u64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url?.strip_prefix("redis://").unwrap_or(url?);
    let hostport = rest.split('/').next()?;
    let (auth, hostport) = match hostport.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, hostport),
    };
    let mut stream =
        tokio::time::timeout(REDIS_INFO_TIMEOUT, tokio::net::TcpStream::connect(hostport))
            .await
            .ok()?
            .ok()?;
    let mut ask = String::new();
    if let Some(password) = auth.and_then(|a| a.split_once(':')).map(|(_, p)| p) {
        ask.push_str(&format!(
            "*2\r\n$4\r\nAUTH\r\n${}\r\n{password}\r\n",
            password.len()
        ));
    }
    ask.push_str("*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n");
    stream.write_all(ask.as_bytes()).await.ok()?;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some(v) = text
                .lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse().ok())
            {
                return Some(v);
            }
            if got.len() > REDIS_INFO_MAX_BYTES {
                return None;
            }
        }
    };
    tokio::time::timeout(REDIS_INFO_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

/// The `sale` scenario. `Ok(passed)`: every invariant held (and with `--check`, every bar was
/// met); `Err` for setup failures.
pub async fn run(args: SaleArgs) -> anyhow::Result<bool> {
    let timeout = Duration::from_millis(args.request_timeout_ms);
    let mut bookings = Vec::new();
    for url in &args.booking_url {
        bookings.push(Target::resolve(url).await?);
    }
    let mut queues = Vec::new();
    let mut ws_bases = Vec::new();
    for url in &args.queue_url {
        queues.push(Target::resolve(url).await?);
        ws_bases.push(split_base_url(url)?);
    }
    let (booking, queue) = (bookings[0].clone(), queues[0].clone());
    let load_before = procfs::load_average();
    let started_at = rfc3339(wall_us() / 1000);
    let run_seed: u64 = rand::rng().random();
    let run_id = format!("s{:08x}", run_seed as u32);

    // The fans' sessions first: with tens of thousands they take a while, and the drop's
    // opening is timed from its creation.
    let tokens = fan_tokens(args.quiet, &booking, &run_id, args.fans, timeout).await?;
    let names: Vec<String> = (0..args.fans)
        .map(|i| crate::api::fan_name(&run_id, i))
        .collect();
    let fans = plan(&args, names, &tokens, run_seed)?;

    let opens_at_ms = wall_us() / 1000 + (args.pre_open_s * 1000.0) as i64;
    let spec = QueueDropSpec {
        name: format!("loadtest sale {run_id}"),
        sku: SKU.into(),
        stock: args.stock,
        per_fan_limit: args.per_fan_limit,
        hold_ttl_s: args.hold_ttl_s,
        opens_at: (args.pre_open_s > 0.0).then(|| rfc3339(opens_at_ms)),
        admission: AdmissionSettings {
            rate_per_s: args.admission.rate_per_s,
            burst: args.admission.burst,
            max_active: args.admission.max_active,
            paused: false,
        },
        shop_window_s: Some(args.shop_window_s),
        leave_grace_s: Some(args.leave_grace_s),
    };
    let mut setup = Setup::new(booking.clone(), timeout);
    let drop_id = setup.create_drop(&args.seller_key, spec.body()).await?;
    crate::note(
        args.quiet,
        format_args!(
            "drop {drop_id}: {} units, opening in {:.1} s; {} fans ({} on sockets)",
            args.stock, args.pre_open_s, args.fans, args.ws_fans
        ),
    );
    let watched = Arc::new(Watched::find(&args, &bookings, &queues));
    let used_memory_before = if args.line_only {
        redis_used_memory(args.redis_url.as_deref()).await
    } else {
        None
    };

    let ws_path = format!("/v1/drops/{}/queue/ws", path_segment(&drop_id));
    let ws_instances: Vec<(std::net::SocketAddr, String)> = queues
        .iter()
        .zip(&ws_bases)
        .map(|(t, (authority, base))| (t.addr, format!("ws://{authority}{base}{ws_path}")))
        .collect();
    let ws_url = ws_instances[0].1.clone();
    let pre_ws = fans.iter().take_while(|f| f.socket && f.pre_queue).count();
    let ctx = Arc::new(Ctx {
        tally: Mutex::new(Tally::new(args.fans)),
        stop: AtomicBool::new(false),
        http_live: AtomicU64::new((args.fans - args.ws_fans) as u64),
        timeout,
        booking,
        queue: queue.clone(),
        bookings,
        queues,
        drop_id: drop_id.clone(),
        fans,
        args,
    });
    let args = &ctx.args;

    // Shopping: every admission, from sockets and polls alike.
    let (admit_tx, mut admit_rx) = mpsc::unbounded_channel::<AdmissionLine>();
    let shops = Arc::new(Semaphore::new(args.shop_concurrency));
    let shopper = {
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            while let Some(line) = admit_rx.recv().await {
                if ctx.args.line_only {
                    // Nobody shops: the admission is only counted.
                    book_admission(&ctx, &line);
                    continue;
                }
                tasks.spawn(shop(Arc::clone(&ctx), line, Arc::clone(&shops)));
                while tasks.try_join_next().is_some() {}
            }
            tasks
        })
    };

    // The HTTP fans' agenda: pre-queue joins spread before opening, the rest from opening at
    // the join rate.
    let agenda = Arc::new(Agenda(Mutex::new(BinaryHeap::new())));
    let now_us = wall_us();
    let http: Vec<usize> = (args.ws_fans..args.fans).collect();
    let pre_http = http.iter().filter(|i| ctx.fans[**i].pre_queue).count();
    let spread_us = (args.pre_open_s * PRE_QUEUE_SPREAD * 1e6) as i64;
    let rates = JoinRates::of(
        args.join_rate_per_s,
        args.ws_fans - pre_ws,
        http.len() - pre_http,
    );
    let open_us = opens_at_ms * 1000 + OPEN_MARGIN.as_micros() as i64;
    for (k, &fan) in http.iter().enumerate() {
        let at = if ctx.fans[fan].pre_queue {
            now_us + spread_us * k as i64 / pre_http.max(1) as i64
        } else {
            open_us + ((k - pre_http) as f64 / rates.http_per_s * 1e6) as i64
        };
        agenda.push(at, fan, Step::Join);
    }
    let mut workers = tokio::task::JoinSet::new();
    if !http.is_empty() {
        for k in 0..args.http_connections {
            workers.spawn(http_worker(
                Arc::clone(&ctx),
                Arc::clone(&agenda),
                k,
                admit_tx.clone(),
            ));
        }
    }

    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let sold_out = Arc::new(tokio::sync::Notify::new());
    let sampler = tokio::spawn(sample_counts(
        Arc::clone(&ctx),
        Arc::clone(&watched),
        Arc::clone(&samples),
        Arc::clone(&sold_out),
    ));

    // Sockets: the pre-queue's processes now, the rest's at opening.
    let split = |range, net_base, connect_per_s| {
        split_inits(
            &args.sockets,
            &Split {
                target: queue.addr,
                url: &ws_url,
                tokens: Some(&tokens),
                range,
                net_base,
                sale: true,
                connect_per_s,
                // One instance: every socket to `target` / `url`.
                instances: if ws_instances.len() > 1 {
                    &ws_instances
                } else {
                    &[]
                },
            },
        )
    };
    let mut clients = Vec::new();
    if pre_ws > 0 {
        let inits = split((0, pre_ws), 0, None);
        clients.push(Clients::spawn(&inits, Some(admit_tx.clone())).await?);
    }
    let wait_open = Duration::from_micros((open_us - wall_us()).max(0) as u64);
    tokio::time::sleep(wait_open).await;
    let opened = Instant::now();
    if args.ws_fans > pre_ws {
        // validate() keeps client_procs ≤ 100: the two sets use at most 127.0.1–200.x.
        let base = args.sockets.client_procs.min(100) as u8;
        let inits = split((pre_ws, args.ws_fans), base, Some(rates.ws_per_s));
        clients.push(Clients::spawn(&inits, Some(admit_tx.clone())).await?);
    }
    drop(admit_tx);

    let (finished, line_watch) = if args.line_only {
        let watch = watch_line(&ctx, &clients, opened).await;
        (watch.full, Some(watch))
    } else {
        (
            until_sold_out(&ctx, &clients, &samples, &sold_out, opened).await,
            None,
        )
    };
    let elapsed_s = opened.elapsed().as_secs_f64();
    let resources = watched.usage(elapsed_s);
    let load_after = procfs::load_average();

    // Stop everything and collect.
    ctx.stop.store(true, Ordering::Relaxed);
    let mut reports: Vec<ChildReport> = Vec::new();
    for c in clients {
        reports.extend(c.stop().await?);
    }
    while workers.join_next().await.is_some() {}
    // A sampler that panicked leaves fewer samples: the charts show the gap.
    let _ = sampler.await;
    let mut shopping = shopper.await.context("the shopping task panicked")?;
    let drained = tokio::time::timeout(SHOP_DRAIN, async {
        while shopping.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        shopping.abort_all();
    }

    // The end state, from the API and Postgres.
    let mut setup = Setup::new(ctx.booking.clone(), timeout);
    let buckets = match setup.get_drop(&drop_id).await {
        Ok(d) => invariants::parse_inventory(&d).map_err(anyhow::Error::msg),
        Err(e) => Err(e),
    };
    let (pg, over_limit) =
        match invariants::postgres_sale(&args.database_url, &drop_id, Some(args.per_fan_limit))
            .await
        {
            Ok((pg, over)) => (Some(pg), over),
            Err(e) => {
                crate::note(args.quiet, format_args!("Postgres: {e:#}"));
                (None, None)
            }
        };
    let mut qsetup = Setup::new(queue, timeout);
    let seed = qsetup
        .get_json(&ctx.queue_path("/seed"), None)
        .await
        .map(|(_, v)| v)
        .unwrap_or_default();

    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    let machine = Machine {
        cpus: procfs::cpus(),
        cpu_model: procfs::cpu_model(),
        mem_total_kib: procfs::mem_total_kib(),
        load_before,
        load_after,
    };
    let mut out = figures(
        &ctx,
        &reports,
        &samples,
        buckets.ok(),
        pg,
        over_limit,
        &seed,
        opens_at_ms,
    );
    out.line = line_watch.map(|w| {
        line_figures(
            &w,
            &merge_ticks(&reports),
            used_memory_before,
            args.admission.rate_per_s,
        )
    });
    out.run_id = run_id;
    out.started_at = started_at;
    out.machine = machine;
    out.resources = resources;
    out.checks = report::checks(&out, args.per_fan_limit);
    if !finished {
        let what = if args.line_only {
            "every fan joined within --max-duration-s"
        } else {
            "sold out within --max-duration-s"
        };
        out.checks.push(invariants::Check::new(
            what,
            false,
            format!("{:.0} s", args.max_duration_s),
        ));
    }
    out.invariants_held = out
        .checks
        .iter()
        .filter(|c| !report::is_bar(c))
        .all(|c| c.verdict != Verdict::Fail);
    out.bars_met = out
        .checks
        .iter()
        .filter(|c| report::is_bar(c))
        .all(|c| c.verdict != Verdict::Fail);

    let text = report::render_text(&out);
    print!("{text}");
    if let Some(path) = &args.text {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&out).context("serialising the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.html {
        std::fs::write(path, report::render_html(&out))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(out.invariants_held && (out.bars_met || !args.check))
}

/// Per queue-server instance, how long its socket fans (the first `ws_fans`; fan k's socket is on
/// instance k mod n) waited from the admission run (the token's Redis time) to the `admitted`
/// frame: issue 14's "within 1 s on whichever instance holds their socket".
fn admitted_push(logs: &[FanLog], ws_fans: usize, queue_urls: &[String]) -> Vec<report::PushDelay> {
    let n = queue_urls.len().max(1);
    (0..n)
        .map(|i| {
            let delays = logs
                .iter()
                .enumerate()
                .take(ws_fans)
                .filter(|(fan, _)| fan % n == i)
                .filter_map(|(_, l)| Some(l.heard_admitted_us? - l.admitted_ms? * 1000));
            report::PushDelay {
                queue_url: queue_urls.get(i).cloned().unwrap_or_default(),
                delay: report::percentiles_of_us(delays),
            }
        })
        .collect()
}

/// The report's figures from what the run recorded.
#[allow(clippy::too_many_arguments)]
fn figures(
    ctx: &Ctx,
    reports: &[ChildReport],
    samples: &[Sample],
    buckets: Option<Vec<invariants::Bucket>>,
    pg: Option<invariants::PostgresSold>,
    over_limit: Option<i64>,
    seed: &serde_json::Value,
    opens_at_ms: i64,
) -> SaleReport {
    let args = &ctx.args;
    let t = ctx.tally();
    let mut logs = t.fans.clone();
    // The sockets' joins, from their processes' reports.
    let mut join_ws = new_histogram();
    let mut sold_out_ws: Vec<i64> = Vec::new();
    for r in reports {
        for j in &r.joins {
            if let Some(log) = logs.get_mut(j.fan) {
                log.join_us = Some(j.at_us);
                log.join_place = j.place;
                log.join_status = Some(match j.kind.as_str() {
                    "position" => "waiting".to_owned(),
                    other => other.to_owned(),
                });
            }
            record(&mut join_ws, j.took_us.max(1) as u64);
        }
        sold_out_ws.extend(&r.sold_out_us);
    }
    let ticks = merge_ticks(reports);

    let stock = args.stock as i64;
    let (sold_api, held_end, available_end) = buckets.as_ref().map_or((0, 0, 0), |b| {
        (
            b.iter().map(|x| x.sold).sum(),
            b.iter().map(|x| x.held).sum(),
            b.iter().map(|x| x.available).sum(),
        )
    });
    let last_sale_ms = t.last_sale_us.map(|us| us / 1000);
    let outcome = report::Outcome {
        stock: args.stock,
        sold_api,
        held_end,
        available_end,
        sold_pg_inventory: pg.map(|p| p.inventory_sold),
        sold_pg_items: pg.map(|p| p.order_items),
        opened_at_ms: opens_at_ms,
        open_to_sold_out_s: last_sale_ms
            .filter(|_| sold_api == stock)
            .map(|l| (l - opens_at_ms) as f64 / 1000.0),
        pg_fans_over_limit: over_limit,
    };

    // Joins.
    let joined: Vec<(usize, &FanLog)> = logs
        .iter()
        .enumerate()
        .filter(|(_, l)| l.join_us.is_some() && l.join_status.as_deref() != Some("error"))
        .collect();
    let after_open: Vec<i64> = joined
        .iter()
        .filter(|(_, l)| l.join_status.as_deref() != Some("pre_queue"))
        .filter_map(|(_, l)| l.join_us)
        .collect();
    let after_open_per_s = match (after_open.iter().min(), after_open.iter().max()) {
        (Some(a), Some(b)) if b > a => after_open.len() as f64 / ((b - a) as f64 / 1e6),
        _ => 0.0,
    };
    let mut failed = t.join_failed.clone();
    for r in reports {
        for (k, v) in &r.failures {
            *failed.entry(format!("socket:{k}")).or_default() += v;
        }
        // A socket whose first frame isn't a place in line (an `error`, say) didn't join.
        for j in r
            .joins
            .iter()
            .filter(|j| !matches!(j.kind.as_str(), "position" | "pre_queue"))
        {
            *failed.entry(format!("socket:{}", j.kind)).or_default() += 1;
        }
    }
    let joins = report::Joins {
        ws_fans: args.ws_fans as u64,
        http_fans: (args.fans - args.ws_fans) as u64,
        pre_queue_fans: ctx.fans.iter().filter(|f| f.pre_queue).count() as u64,
        joined: joined.len() as u64,
        failed,
        after_open_per_s,
        baseline_per_s: args.join_baseline_per_s,
        ratio: args.join_baseline_per_s.map(|b| after_open_per_s / b),
    };

    // Fairness.
    let admitted: Vec<(usize, &FanLog)> = logs
        .iter()
        .enumerate()
        .filter(|(_, l)| l.admitted_ms.is_some())
        .collect();
    let post: Vec<&(usize, &FanLog)> = admitted
        .iter()
        .filter(|(_, l)| l.join_status.as_deref() == Some("waiting") && !l.rejoined)
        .collect();
    let pairs = |f: &dyn Fn(&FanLog) -> Option<i64>| -> Vec<(i64, i64)> {
        post.iter()
            .filter_map(|(_, l)| Some((l.join_us?, f(l)?)))
            .collect()
    };
    let seed_text = seed["seed"].as_str();
    let pre: Vec<&(usize, &FanLog)> = admitted
        .iter()
        .filter(|(_, l)| l.join_status.as_deref() == Some("pre_queue") && !l.rejoined)
        .collect();
    let mut mismatches = 0u64;
    let mut by_admission: Vec<(i64, i64, i64)> = Vec::new(); // (admitted_ms, place, score)
    for (i, l) in &pre {
        let score = seed_text.and_then(|s| prequeue_score(s, &ctx.fans[*i].name));
        if score.is_none() || score != l.token_place {
            mismatches += 1;
        }
        if let (Some(at), Some(place), Some(score)) = (l.admitted_ms, l.token_place, score) {
            by_admission.push((at, place, score));
        }
    }
    by_admission.sort();
    let pre_pairs: Vec<(i64, i64)> = by_admission
        .iter()
        .enumerate()
        .map(|(rank, (_, _, score))| (*score, rank as i64))
        .collect();
    let first_post = post.iter().filter_map(|(_, l)| l.admitted_ms).min();
    let fairness = report::Fairness {
        after_open_fans: post.len() as u64,
        tau_after_open: report::kendall_tau_b(&report::admission_ranks(
            &post
                .iter()
                .filter_map(|(_, l)| Some((l.join_us?, l.admitted_ms?, l.token_place?)))
                .collect::<Vec<_>>(),
        )),
        tau_join_vs_place: report::kendall_tau_b(&pairs(&|l| l.token_place)),
        pre_queue_fans: pre.len() as u64,
        pre_queue_place_mismatches: mismatches,
        tau_pre_queue: report::kendall_tau_b(&pre_pairs),
        pre_queue_after_open_fans: pre
            .iter()
            .filter(|(_, l)| matches!((l.admitted_ms, first_post), (Some(a), Some(f)) if a > f))
            .count() as u64,
    };

    // Sold-out notices: the sockets still waiting at the last sale are those never admitted.
    let last_sale_us = t.last_sale_us;
    let admitted_fans: std::collections::HashSet<usize> = reports
        .iter()
        .flat_map(|r| r.admitted.iter().map(|a| a.fan))
        .collect();
    let in_line = |kind: &str| kind == "position" || kind == "pre_queue";
    let sockets_waiting = reports
        .iter()
        .flat_map(|r| &r.joins)
        .filter(|j| !admitted_fans.contains(&j.fan) && in_line(&j.kind))
        .count() as u64;
    let http_waiting: Vec<&FanLog> = logs[args.ws_fans..]
        .iter()
        .filter(|l| l.join_us.is_some() && l.admitted_ms.is_none())
        .collect();
    let since = |us: i64| us - last_sale_us.unwrap_or(us);
    let sold_out = report::SoldOutNotice {
        last_sale_ms: last_sale_us.map(|us| us / 1000),
        sockets_waiting,
        sockets_told: sold_out_ws.len() as u64,
        sockets: report::percentiles_of_us(sold_out_ws.iter().map(|us| since(*us))),
        http_waiting: http_waiting.len() as u64,
        http_told: http_waiting
            .iter()
            .filter(|l| l.sold_out_us.is_some())
            .count() as u64,
        http: report::percentiles_of_us(
            http_waiting.iter().filter_map(|l| l.sold_out_us).map(since),
        ),
    };

    // Admission: where the bucket limited, judged with the admission script's stock rule over
    // the sessions the run saw.
    let skip_ms = (args.admission.burst as f64 / args.admission.rate_per_s * 1000.0) as i64 + 1000;
    let sessions: Vec<report::SessionSeen> = logs
        .iter()
        .filter_map(|l| {
            Some(report::SessionSeen {
                admitted_ms: l.admitted_ms?,
                shop_end_ms: l.shop_end_ms?,
                hold_ms: l.hold_ms,
                hold_expires_ms: l.hold_expires_ms,
                end: l.end?,
            })
        })
        .collect();
    let limit = i64::from(args.per_fan_limit);
    let grace = args.confirm_grace_ms as i64;
    let demand = |t: i64| sessions.iter().map(|s| s.demand_at(t, limit, grace)).sum();
    let admission = report::admission_rate(
        &ticks,
        samples,
        args.admission.rate_per_s,
        skip_ms,
        limit,
        &demand,
    );

    let latency = report::Latencies {
        join_http: Percentiles::of(&t.join_http),
        join_ws: Percentiles::of(&join_ws),
        admitted_to_hold: Percentiles::of(&t.admitted_to_hold),
        reserve: Percentiles::of(&t.reserve),
        confirm: Percentiles::of(&t.confirm),
    };
    let admitted_push = admitted_push(&logs, args.ws_fans, &args.queue_url);
    let series = series(&ticks, samples, &t, opens_at_ms);
    let mut hostile = t.hostile.clone();
    hostile.fans = ctx.fans.iter().filter(|f| f.hostile).count() as u64;

    SaleReport {
        scenario: "sale",
        run_id: String::new(),
        started_at: String::new(),
        git_commit: git_commit(),
        machine: Machine {
            cpus: 0,
            cpu_model: String::new(),
            mem_total_kib: 0,
            load_before: [0.0; 3],
            load_after: [0.0; 3],
        },
        settings: settings_json(args),
        drop_id: ctx.drop_id.clone(),
        seed_sha256: seed["seed_sha256"].as_str().map(str::to_owned),
        seed: seed_text.map(str::to_owned),
        outcome,
        joins,
        admission,
        admit_baseline_per_s: args.admit_baseline_per_s,
        fairness,
        sold_out,
        latency,
        admitted_push,
        shop: t.shop.clone(),
        errors: t.errors.clone(),
        hostile,
        line: None,
        resources: Vec::new(),
        series,
        checks: Vec::new(),
        invariants_held: false,
        bars_met: false,
    }
}

/// `--line-only`'s figures from what it watched and the ticks the sockets saw.
fn line_figures(
    w: &LineWatch,
    ticks: &[ws_clients::TickSeen],
    used_memory_before: Option<u64>,
    rate_per_s: f64,
) -> report::LineFigures {
    let waiting_at = |ms: i64| {
        ticks
            .iter()
            .filter(|t| t.at_ms <= ms)
            .filter_map(|t| t.waiting)
            .next_back()
    };
    let waiting_full = waiting_at(w.full_at_ms).unwrap_or(0);
    let hold_s = (w.hold_to_ms - w.hold_from_ms) as f64 / 1000.0;
    let steady = crate::queue_report::admission(ticks, w.hold_from_ms, hold_s, rate_per_s);
    report::LineFigures {
        waiting_peak: ticks.iter().filter_map(|t| t.waiting).max().unwrap_or(0),
        waiting_end: waiting_at(w.hold_to_ms).unwrap_or(0),
        redis_used_memory_before: used_memory_before,
        redis_used_memory_full: w.used_memory_full,
        redis_bytes_per_waiter: match (used_memory_before, w.used_memory_full) {
            (Some(a), Some(b)) if waiting_full > 0 => {
                Some((b as f64 - a as f64) / waiting_full as f64)
            }
            _ => None,
        },
        position_head: w.position_head,
        position_back: w.position_back,
        hold_from_ms: steady.as_ref().map_or(w.hold_from_ms, |a| a.window_from_ms),
        hold_to_ms: steady.as_ref().map_or(w.hold_from_ms, |a| a.window_to_ms),
        admitted_while_full_per_s: steady
            .as_ref()
            .map_or(0.0, |a| a.admitted as f64 / a.window_s),
        ratio_while_full: steady.as_ref().map_or(0.0, |a| a.ratio),
    }
}

/// The settings as given (keys never included).
fn settings_json(a: &SaleArgs) -> serde_json::Value {
    serde_json::json!({
        "booking_url": a.booking_url, "queue_url": a.queue_url,
        "fans": a.fans, "ws_fans": a.ws_fans, "stock": a.stock,
        "per_fan_limit": a.per_fan_limit, "pre_queue_pct": a.pre_queue_pct,
        "pre_open_s": a.pre_open_s, "rate_per_s": a.admission.rate_per_s, "burst": a.admission.burst,
        "max_active": a.admission.max_active, "shop_window_s": a.shop_window_s,
        "leave_grace_s": a.leave_grace_s, "hold_ttl_s": a.hold_ttl_s, "think_ms": a.think_ms,
        "pay_pct": a.pay_pct, "release_pct": a.release_pct, "hostile_pct": a.hostile_pct,
        "join_rate_per_s": a.join_rate_per_s, "poll_ms": a.poll_ms,
        "http_connections": a.http_connections, "shop_concurrency": a.shop_concurrency,
        "client_procs": a.sockets.client_procs, "confirm_grace_ms": a.confirm_grace_ms,
        "line_only": a.line_only, "line_hold_s": a.line_hold_s,
        "position_samples": a.position_samples, "sockets_per_addr": a.sockets.sockets_per_addr,
        "max_duration_s": a.max_duration_s, "sold_out_grace_s": a.sold_out_grace_s,
    })
}

/// Per second from opening to the last record: line length and admissions from the ticks,
/// sold and held from the samples, latency percentiles from the per-second histograms.
fn series(
    ticks: &[ws_clients::TickSeen],
    samples: &[Sample],
    t: &Tally,
    opens_at_ms: i64,
) -> report::Series {
    let second = |ms: i64| (ms - opens_at_ms).div_euclid(1000);
    let end = ticks
        .iter()
        .map(|x| second(x.at_ms))
        .chain(samples.iter().map(|s| second(s.at_ms)))
        .max()
        .unwrap_or(0)
        .max(0);
    let n = (end + 1) as usize;
    let mut out = report::Series {
        t_s: (0..n).map(|s| s as f64).collect(),
        waiting: vec![None; n],
        admitted_per_s: vec![None; n],
        sold: vec![None; n],
        held: vec![None; n],
        reserve_p50_ms: vec![None; n],
        reserve_p99_ms: vec![None; n],
        confirm_p50_ms: vec![None; n],
        confirm_p99_ms: vec![None; n],
    };
    let mut admitted_at: Vec<Option<i64>> = vec![None; n];
    for x in ticks {
        let s = second(x.at_ms);
        if !(0..n as i64).contains(&s) {
            continue;
        }
        let s = s as usize;
        out.waiting[s] = x.waiting.map(|w| w as f64);
        if x.admitted_total.is_some() {
            admitted_at[s] = x.admitted_total;
        }
    }
    let mut prev: Option<i64> = None;
    for (per_s, at) in out.admitted_per_s.iter_mut().zip(&admitted_at) {
        if let Some(a) = *at {
            *per_s = prev.map(|p| (a - p) as f64);
            prev = Some(a);
        }
    }
    for x in samples {
        let s = second(x.at_ms);
        if (0..n as i64).contains(&s) {
            out.sold[s as usize] = Some(x.sold as f64);
            out.held[s as usize] = Some(x.held as f64);
        }
    }
    let fill = |by_s: &BTreeMap<i64, Histogram<u64>>,
                p50: &mut Vec<Option<f64>>,
                p99: &mut Vec<Option<f64>>| {
        for (unix_s, h) in by_s {
            let s = second(unix_s * 1000);
            if (0..n as i64).contains(&s) && !h.is_empty() {
                let p = Percentiles::of(h);
                p50[s as usize] = Some(p.p50_ms);
                p99[s as usize] = Some(p.p99_ms);
            }
        }
    };
    fill(
        &t.reserve_by_s,
        &mut out.reserve_p50_ms,
        &mut out.reserve_p99_ms,
    );
    fill(
        &t.confirm_by_s,
        &mut out.confirm_p50_ms,
        &mut out.confirm_p99_ms,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::tests::parse_sale;

    #[test]
    fn prequeue_scores_are_the_engines() {
        // engine::queue::prequeue_score's definition: HMAC-SHA256(seed, fan) → first 52 bits.
        let s = prequeue_score("seed", "alice").unwrap();
        assert!((0..1 << 52).contains(&s));
        assert_ne!(s, prequeue_score("seed", "bob").unwrap());
        assert_eq!(s, prequeue_score("seed", "alice").unwrap());
    }

    #[test]
    fn fans_are_planned_by_kind_share_and_draw() {
        let a = parse_sale(&[
            "--fans",
            "1000",
            "--ws-fans",
            "400",
            "--pre-queue-pct",
            "25",
            "--hostile-pct",
            "10",
            "--pay-pct",
            "70",
            "--release-pct",
            "20",
        ]);
        let names: Vec<String> = (0..1000).map(|i| format!("f{i}")).collect();
        let tokens: Vec<String> = (0..1000).map(|i| format!("t{i}")).collect();
        let fans = plan(&a, names, &tokens, 42).unwrap();
        assert_eq!(fans.iter().filter(|f| f.socket).count(), 400);
        assert!(fans[..100].iter().all(|f| f.socket && f.pre_queue));
        assert!(!fans[100].pre_queue);
        assert!(fans[400..550].iter().all(|f| !f.socket && f.pre_queue));
        assert!(!fans[550].pre_queue);
        let share = |p: &dyn Fn(&Fan) -> bool| fans.iter().filter(|f| p(f)).count();
        let hostile = share(&|f| f.hostile);
        assert!((50..=150).contains(&hostile), "{hostile}");
        let pay = share(&|f| f.then == Then::Pay);
        assert!((620..=780).contains(&pay), "{pay}");
        let abandon = share(&|f| f.then == Then::Abandon);
        assert!((60..=140).contains(&abandon), "{abandon}");
    }

    #[test]
    fn joins_after_opening_share_the_rate_by_kind() {
        let r = JoinRates::of(1000.0, 19_000, 31_000);
        assert!((r.ws_per_s - 380.0).abs() < 1e-9 && (r.http_per_s - 620.0).abs() < 1e-9);
        assert!(JoinRates::of(100.0, 0, 10).ws_per_s > 0.0);
    }

    #[test]
    fn agenda_gives_due_work_in_time_order() {
        let a = Agenda(Mutex::new(BinaryHeap::new()));
        a.push(30, 1, Step::Poll);
        a.push(10, 2, Step::Join);
        assert_eq!(a.next(5), Err(Some(5)));
        assert_eq!(a.next(10), Ok((2, Step::Join)));
        assert_eq!(a.next(40), Ok((1, Step::Poll)));
        assert_eq!(a.next(40), Err(None));
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_440_137_171), "2026-11-23T13:22:17.171Z");
    }
}
