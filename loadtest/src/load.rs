//! The load itself: the open-loop scheduler and its connection workers, the closed-loop
//! workers, and the follow-up phase of confirms and releases.
//!
//! Open loop: a dispatcher puts each request on a bounded queue when it falls due (in 1 ms
//! batches); a worker per connection takes the next one when its connection is free. A
//! request's latency runs from its due time (or its send, if that was earlier), so time spent
//! waiting in the queue counts. When the queue is full the request is counted as dropped, never
//! silently delayed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use rand::Rng as _;
use tokio::sync::{mpsc, Barrier, Mutex};
use tokio::time::Instant;

use crate::api::{confirm_body, hold_id};
use crate::http::{path_segment, Slot, Target, TransportError};
use crate::schedule::Schedule;
use crate::seatmap::SeatLayout;
use crate::stats::{Stats, Timeline};

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The open loop releases requests in batches this far apart (tokio's timer granularity).
pub const DISPATCH_TICK: Duration = Duration::from_millis(1);

/// Live counters for the progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    pub answered: AtomicU64,
    pub ok: AtomicU64,
    pub no_answer: AtomicU64,
    pub dropped: AtomicU64,
}

impl Progress {
    pub fn done(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
            + self.no_answer.load(Ordering::Relaxed)
            + self.dropped.load(Ordering::Relaxed)
    }

    /// The progress bar's message: 201s, other answers, requests without an answer.
    pub fn line(&self) -> String {
        let ok = self.ok.load(Ordering::Relaxed);
        format!(
            "201 {ok} · other {} · no answer {}",
            self.answered.load(Ordering::Relaxed).saturating_sub(ok),
            self.no_answer.load(Ordering::Relaxed),
        )
    }
}

/// Everything a reserve worker needs, built once per run.
pub struct Reserve {
    pub target: Target,
    /// `/v1/drops/{drop_id}/holds`.
    pub uri: Uri,
    /// The request body, by request number.
    pub body: HoldBody,
    /// `Bearer <fan_token>` per fan.
    pub fans: Arc<Vec<HeaderValue>>,
    /// Keep hold ids for the follow-up phase.
    pub keep_holds: bool,
    pub timeout: Duration,
    pub progress: Arc<Progress>,
    /// The measured answers by second (one for the run, shared by its workers).
    pub timeline: Timeline,
}

/// What a reserve asks for.
pub enum HoldBody {
    /// The same bytes for every request (`loadtest reserve`: GA units).
    Same(Bytes),
    /// Request `seq` names seat `seq` of the layout, one seat each (`loadtest seatmap`).
    Seats(SeatLayout),
}

impl HoldBody {
    fn for_seq(&self, seq: u64) -> Bytes {
        match self {
            Self::Same(b) => b.clone(),
            Self::Seats(layout) => layout.hold_body(seq),
        }
    }
}

/// When one request happened.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// In the measured window (not the warm-up).
    measured: bool,
    /// Where its latency starts: the due time in the open loop (or the send, if that came
    /// first), the send in the closed loop.
    from: Instant,
    /// When it was written to the connection.
    sent_at: Instant,
    /// When its answer (or failure) came in.
    done: Instant,
}

/// A hold the run made, for confirms and releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRef {
    pub hold_id: String,
    pub fan: usize,
}

/// What the server may have done because of our reserves, warm-up included: the invariant
/// checks need every hold, not only the measured ones.
#[derive(Debug, Default)]
pub struct Ledger {
    pub reserved: u64,
    pub reserved_unknown: u64,
    pub holds: Vec<HoldRef>,
    /// 201s whose body had no `hold_id` (they can't be confirmed or released).
    pub holds_without_id: u64,
}

impl Ledger {
    fn merge(&mut self, other: Ledger) {
        self.reserved += other.reserved;
        self.reserved_unknown += other.reserved_unknown;
        self.holds.extend(other.holds);
        self.holds_without_id += other.holds_without_id;
    }
}

/// One worker's (and, merged, the run's) results.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The measured window only.
    pub stats: Stats,
    pub ledger: Ledger,
    /// When the last measured answer came in.
    pub last_done: Option<Instant>,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.stats.merge(&other.stats);
        self.ledger.merge(other.ledger);
        self.last_done = self.last_done.max(other.last_done);
    }
}

/// A fresh idempotency key: a UUID v4 from the thread's RNG (no syscall per request).
fn idempotency_key() -> HeaderValue {
    let uuid = uuid::Builder::from_random_bytes(rand::rng().random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    // A hyphenated UUID is 36 ASCII characters: always a valid header value.
    HeaderValue::from_str(uuid.hyphenated().encode_lower(&mut buf))
        .expect("a UUID is a valid header value")
}

impl Reserve {
    /// The reserve request number `seq`, for fan `seq mod fans` (round robin).
    fn request(&self, seq: u64) -> (Request<Full<Bytes>>, usize) {
        let fan = (seq % self.fans.len() as u64) as usize;
        let mut req = self.target.request(
            Method::POST,
            self.uri.clone(),
            Some(&self.fans[fan]),
            Some(self.body.for_seq(seq)),
        );
        req.headers_mut().insert(IDEMPOTENCY_KEY, idempotency_key());
        (req, fan)
    }

    /// Sends reserve `seq` on `slot`; returns the answer, when it was written, and the fan.
    async fn send(
        &self,
        slot: &mut Slot,
        seq: u64,
    ) -> (Result<(StatusCode, Bytes), TransportError>, Instant, usize) {
        let (result, (sent_at, fan)) = slot
            .send(&self.target, || {
                let (req, fan) = self.request(seq);
                (req, (Instant::now(), fan))
            })
            .await;
        (result, sent_at, fan)
    }

    /// Books one reserve's result into `out`.
    fn record(
        &self,
        out: &mut Outcome,
        at: Timing,
        fan: usize,
        result: Result<(StatusCode, Bytes), TransportError>,
    ) {
        let Timing {
            measured,
            from,
            sent_at,
            done,
        } = at;
        match result {
            Ok((status, body)) => {
                let ok = status == StatusCode::CREATED;
                if ok {
                    out.ledger.reserved += 1;
                    if self.keep_holds {
                        match hold_id(&body) {
                            Some(hold_id) => out.ledger.holds.push(HoldRef { hold_id, fan }),
                            None => out.ledger.holds_without_id += 1,
                        }
                    }
                    self.progress.ok.fetch_add(1, Ordering::Relaxed);
                } else if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
                    // booking-api's 503s (recovering, unavailable) all mean "not done, retry";
                    // any other 5xx might have come after the script ran.
                    out.ledger.reserved_unknown += 1;
                }
                if measured {
                    let (latency, service) = (done - from, done - sent_at);
                    out.stats.answer(latency, service, status, &body, ok);
                    self.timeline.record(done.into_std(), latency, service);
                    out.last_done = Some(done);
                }
                self.progress.answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if e.outcome_unknown() {
                    out.ledger.reserved_unknown += 1;
                }
                if measured {
                    // Not `last_done`: the window for answers per second ends at the last answer,
                    // not at the last timeout.
                    out.stats.tally.transport(e);
                }
                self.progress.no_answer.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Opens the slot's connection ahead of the run, so the first requests don't pay for it.
async fn preconnect(target: &Target, timeout: Duration) -> Slot {
    let mut slot = Slot::new(timeout);
    slot.warm_up(target).await;
    slot
}

/// A request due at `due`; `seq` picks the fan and whether it is in the warm-up.
#[derive(Debug, Clone, Copy)]
struct Job {
    seq: u64,
    due: Instant,
}

/// The open loop: `connections` workers share a queue of at most `max_backlog` due requests.
/// Returns the merged outcome and t0 (when request 0 was due).
pub async fn run_open(
    ctx: Arc<Reserve>,
    schedule: Schedule,
    connections: usize,
    max_backlog: usize,
    backlog_gauge: Arc<AtomicU64>,
) -> (Outcome, Instant) {
    let (tx, rx) = mpsc::channel::<Job>(max_backlog);
    let rx = Arc::new(Mutex::new(rx));
    let barrier = Arc::new(Barrier::new(connections + 1));
    let warmup_requests = schedule.warmup_requests();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (ctx, rx, barrier) = (Arc::clone(&ctx), Arc::clone(&rx), Arc::clone(&barrier));
        workers.spawn(async move {
            let mut slot = preconnect(&ctx.target, ctx.timeout).await;
            barrier.wait().await;
            let mut out = Outcome::default();
            loop {
                // Hold the lock only to take one job: the first idle worker gets the next one.
                let job = rx.lock().await.recv().await;
                let Some(job) = job else { break };
                let (result, sent_at, fan) = ctx.send(&mut slot, job.seq).await;
                let at = Timing {
                    measured: job.seq >= warmup_requests,
                    // A request released ahead of its due time counts from when it was sent.
                    from: job.due.min(sent_at),
                    sent_at,
                    done: Instant::now(),
                };
                ctx.record(&mut out, at, fan, result);
            }
            out
        });
    }
    barrier.wait().await;

    let t0 = Instant::now();
    let dropped_measured =
        dispatch(schedule, t0, tx, &ctx.progress, &backlog_gauge, max_backlog).await;

    let mut merged = Outcome::default();
    while let Some(joined) = workers.join_next().await {
        // A worker only panics on a bug; the run's numbers would be wrong, so stop.
        merged.merge(joined.expect("open-loop worker panicked"));
    }
    merged.stats.tally.dropped += dropped_measured;
    backlog_gauge.store(0, Ordering::Relaxed);
    (merged, t0)
}

/// Puts every request of `schedule` on the queue, a tick at a time: each tick releases the
/// requests due before the next one, so a request goes out at most [`DISPATCH_TICK`] early (its
/// latency then counts from the actual send) and late only by the timer's jitter (its latency
/// counts from the due time). Batching costs one timer wake-up per tick instead of one per
/// request: the client's CPU is the server's loss. Returns how many measured requests were
/// dropped because the queue was full; drops the sender when done, which stops the workers.
async fn dispatch(
    schedule: Schedule,
    t0: Instant,
    tx: mpsc::Sender<Job>,
    progress: &Progress,
    backlog_gauge: &AtomicU64,
    max_backlog: usize,
) -> u64 {
    let (total, warmup_requests) = (schedule.total_requests(), schedule.warmup_requests());
    let mut dropped_measured = 0u64;
    let mut next = 0u64;
    let mut tick = tokio::time::interval_at(t0, DISPATCH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while next < total {
        tick.tick().await;
        // After a late wake-up everything due by now goes out in one burst, exactly as the
        // arrivals would have been.
        let horizon = Instant::now() + DISPATCH_TICK;
        while next < total {
            let due = t0 + schedule.offset(next);
            if due >= horizon {
                break;
            }
            match tx.try_send(Job { seq: next, due }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    dropped_measured += u64::from(next >= warmup_requests);
                    progress.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return dropped_measured,
            }
            next += 1;
        }
        backlog_gauge.store((max_backlog - tx.capacity()) as u64, Ordering::Relaxed);
    }
    dropped_measured
}

/// The closed loop: `workers` workers, each on its own connection, send back to back until
/// `warmup + duration` has passed. Returns the merged outcome, t0 and the number of measured
/// requests started.
pub async fn run_closed(
    ctx: Arc<Reserve>,
    workers: usize,
    warmup: Duration,
    duration: Duration,
) -> (Outcome, Instant, u64) {
    // Two rounds of the barrier: "every worker is connected", then "t0 is set, go".
    let barrier = Arc::new(Barrier::new(workers + 1));
    let t0_cell = Arc::new(OnceLock::<Instant>::new());
    let seq = Arc::new(AtomicU64::new(0));
    let measured_started = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (ctx, barrier, t0_cell, seq, measured_started) = (
            Arc::clone(&ctx),
            Arc::clone(&barrier),
            Arc::clone(&t0_cell),
            Arc::clone(&seq),
            Arc::clone(&measured_started),
        );
        tasks.spawn(async move {
            let mut slot = preconnect(&ctx.target, ctx.timeout).await;
            barrier.wait().await;
            barrier.wait().await;
            // Set before the second round of the barrier let anyone through.
            let t0 = *t0_cell
                .get()
                .expect("t0 is set before the start barrier opens");
            let (measure_start, end) = (t0 + warmup, t0 + warmup + duration);
            let mut out = Outcome::default();
            while Instant::now() < end {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let (result, sent_at, fan) = ctx.send(&mut slot, n).await;
                let at = Timing {
                    measured: sent_at >= measure_start,
                    from: sent_at,
                    sent_at,
                    done: Instant::now(),
                };
                measured_started.fetch_add(u64::from(at.measured), Ordering::Relaxed);
                ctx.record(&mut out, at, fan, result);
            }
            out
        });
    }
    barrier.wait().await;
    let t0 = Instant::now();
    let _ = t0_cell.set(t0);
    barrier.wait().await;
    let mut merged = Outcome::default();
    while let Some(joined) = tasks.join_next().await {
        merged.merge(joined.expect("closed-loop worker panicked"));
    }
    (merged, t0, measured_started.load(Ordering::Relaxed))
}

/// What to do with a hold after the reserve phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowUp {
    Confirm,
    Release,
    Keep,
}

/// The `k`-th successful hold's fate, spread evenly: after any `n` holds, `⌊n·confirm_pct/100⌋`
/// have been confirmed and the releases are within one of `n·release_pct/100`.
pub fn follow_up(k: usize, confirm_pct: u8, release_pct: u8) -> FollowUp {
    let (c, r) = (usize::from(confirm_pct), usize::from(release_pct));
    let confirmed_before = |n: usize| n * c / 100;
    if confirmed_before(k + 1) > confirmed_before(k) {
        return FollowUp::Confirm;
    }
    // Among the holds not confirmed, release the share r / (100 − c) of them, spread the same way.
    let rest = 100 - c; // > 0: with c = 100 every hold was confirmed above.
    let j = k - confirmed_before(k);
    if (j + 1) * r / rest > j * r / rest {
        FollowUp::Release
    } else {
        FollowUp::Keep
    }
}

/// Results of the follow-up phase.
#[derive(Debug, Default)]
pub struct FollowUpOutcome {
    pub confirm: Stats,
    pub release: Stats,
    pub confirmed: u64,
    pub confirmed_unknown: u64,
    pub released: u64,
    pub released_unknown: u64,
    pub confirm_requests: u64,
    pub release_requests: u64,
}

impl FollowUpOutcome {
    fn merge(&mut self, o: FollowUpOutcome) {
        self.confirm.merge(&o.confirm);
        self.release.merge(&o.release);
        self.confirmed += o.confirmed;
        self.confirmed_unknown += o.confirmed_unknown;
        self.released += o.released;
        self.released_unknown += o.released_unknown;
        self.confirm_requests += o.confirm_requests;
        self.release_requests += o.release_requests;
    }
}

/// Confirms and releases, interleaved in plan order, closed loop over `concurrency` connections,
/// worker `i` talking to `targets[i % targets.len()]` (one booking-api, or several sharing the
/// work). `Keep` entries are skipped. With `rate_per_s`, op `k` is due at `t0 + k / rate` (an
/// open loop over the same workers): none is sent before it is due, and its latency counts from
/// then, so waiting for a free worker behind slow answers shows.
pub async fn run_follow_ups(
    targets: &[Target],
    fans: Arc<Vec<HeaderValue>>,
    ops: Vec<(FollowUp, HoldRef)>,
    concurrency: usize,
    rate_per_s: Option<f64>,
    timeout: Duration,
    progress: Arc<Progress>,
) -> FollowUpOutcome {
    let ops = Arc::new(ops);
    let next = Arc::new(AtomicU64::new(0));
    let workers = concurrency.min(ops.len());
    // Every worker connects before t0, so the first ops' latency isn't the handshakes'.
    let barrier = Arc::new(Barrier::new(workers + 1));
    let t0_cell = Arc::new(OnceLock::<Instant>::new());
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (target, fans, ops, next, progress, barrier, t0_cell) = (
            targets[w % targets.len()].clone(),
            Arc::clone(&fans),
            Arc::clone(&ops),
            Arc::clone(&next),
            Arc::clone(&progress),
            Arc::clone(&barrier),
            Arc::clone(&t0_cell),
        );
        tasks.spawn(async move {
            let mut slot = preconnect(&target, timeout).await;
            barrier.wait().await;
            barrier.wait().await;
            // Set before the second round of the barrier let anyone through.
            let t0 = *t0_cell
                .get()
                .expect("t0 is set before the start barrier opens");
            let mut out = FollowUpOutcome::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some((kind, hold)) = ops.get(i) else {
                    break;
                };
                let confirm = match kind {
                    FollowUp::Confirm => true,
                    FollowUp::Release => false,
                    FollowUp::Keep => continue,
                };
                let path = if confirm {
                    format!("/v1/holds/{}/confirm", path_segment(&hold.hold_id))
                } else {
                    format!("/v1/holds/{}", path_segment(&hold.hold_id))
                };
                let uri = match target.uri(&path) {
                    Ok(uri) => uri,
                    Err(_) => {
                        progress.no_answer.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let due = rate_per_s.map(|r| t0 + Duration::from_secs_f64(i as f64 / r));
                if let Some(due) = due {
                    tokio::time::sleep_until(due).await;
                }
                let auth = &fans[hold.fan];
                let build = || {
                    let req = if confirm {
                        target.request(
                            Method::POST,
                            uri,
                            Some(auth),
                            Some(confirm_body(&hold.hold_id)),
                        )
                    } else {
                        target.request(Method::DELETE, uri, Some(auth), None)
                    };
                    (req, Instant::now())
                };
                let (result, sent_at) = slot.send(&target, build).await;
                let done = Instant::now();
                let from = due.map_or(sent_at, |d| d.min(sent_at));
                let (stats, succeeded, unknown, requests) = if confirm {
                    (
                        &mut out.confirm,
                        &mut out.confirmed,
                        &mut out.confirmed_unknown,
                        &mut out.confirm_requests,
                    )
                } else {
                    (
                        &mut out.release,
                        &mut out.released,
                        &mut out.released_unknown,
                        &mut out.release_requests,
                    )
                };
                *requests += 1;
                match result {
                    Ok((status, body)) => {
                        let ok = if confirm {
                            // 200: the same confirm again, answered with the same order.
                            status == StatusCode::CREATED || status == StatusCode::OK
                        } else {
                            status == StatusCode::NO_CONTENT
                        };
                        *succeeded += u64::from(ok);
                        // A 5xx confirm (payment_pending, unavailable) leaves the hold confirming:
                        // it may still be sold. A 5xx release may have happened.
                        *unknown += u64::from(status.is_server_error());
                        stats.answer(done - from, done - sent_at, status, &body, ok);
                        progress.answered.fetch_add(1, Ordering::Relaxed);
                        if ok {
                            progress.ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        *unknown += u64::from(e.outcome_unknown());
                        stats.tally.transport(e);
                        progress.no_answer.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            out
        });
    }
    barrier.wait().await;
    let _ = t0_cell.set(Instant::now());
    barrier.wait().await;
    let mut merged = FollowUpOutcome::default();
    while let Some(joined) = tasks.join_next().await {
        merged.merge(joined.expect("follow-up worker panicked"));
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follow_ups_split_by_percentage() {
        let plan: Vec<FollowUp> = (0..1000).map(|k| follow_up(k, 30, 20)).collect();
        let count = |f| plan.iter().filter(|&&p| p == f).count();
        assert_eq!(count(FollowUp::Confirm), 300);
        assert_eq!(count(FollowUp::Release), 200);
        assert_eq!(count(FollowUp::Keep), 500);
        assert!((0..100).all(|k| follow_up(k, 0, 0) == FollowUp::Keep));
        assert!((0..100).all(|k| follow_up(k, 100, 0) == FollowUp::Confirm));
        assert!((0..100).all(|k| follow_up(k, 0, 100) == FollowUp::Release));
        assert!((0..100).all(|k| follow_up(k, 37, 63) != FollowUp::Keep));
    }

    #[test]
    fn follow_ups_are_spread_evenly_for_any_count() {
        for (c, r) in [
            (30u8, 20u8),
            (10, 10),
            (1, 99),
            (50, 50),
            (7, 0),
            (0, 13),
            (99, 1),
        ] {
            let (mut confirms, mut releases) = (0usize, 0usize);
            for n in 1..=2000usize {
                match follow_up(n - 1, c, r) {
                    FollowUp::Confirm => confirms += 1,
                    FollowUp::Release => releases += 1,
                    FollowUp::Keep => {}
                }
                let exact = |pct: u8| n as f64 * f64::from(pct) / 100.0;
                assert!(
                    (confirms as f64 - exact(c)).abs() < 1.0,
                    "c={c} r={r} n={n}"
                );
                assert!(
                    (releases as f64 - exact(r)).abs() < 1.0,
                    "c={c} r={r} n={n}"
                );
            }
        }
    }

    #[test]
    fn idempotency_keys_are_uuid_v4_and_unique() {
        let a = idempotency_key();
        let b = idempotency_key();
        assert_ne!(a, b);
        let parsed = uuid::Uuid::parse_str(a.to_str().unwrap()).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
    }
}
