//! The load itself: the open-loop scheduler and its connection workers, the closed-loop
//! workers, and the follow-up phase of confirms and releases.
//!
//! Open loop: one scheduler task puts each request on a bounded queue when it falls due; a
//! worker per connection takes the next one when its connection is free. A request's latency
//! runs from its due time, so time spent waiting in the queue counts. When the queue is full the
//! request is counted as dropped, never silently delayed.

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
use crate::stats::Stats;

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

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
}

/// Everything a reserve worker needs, built once per run.
pub struct Reserve {
    pub target: Target,
    /// `/v1/drops/{drop_id}/holds`.
    pub uri: Uri,
    /// The same body for every request.
    pub body: Bytes,
    /// `Bearer <fan_token>` per fan.
    pub fans: Arc<Vec<HeaderValue>>,
    /// Keep hold ids for the follow-up phase.
    pub keep_holds: bool,
    pub timeout: Duration,
    pub progress: Arc<Progress>,
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
            Some(self.body.clone()),
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

    /// Books one reserve's result into `out`. `from` is where its latency starts (due time in
    /// the open loop, send time in the closed loop).
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        out: &mut Outcome,
        measured: bool,
        from: Instant,
        sent_at: Instant,
        done: Instant,
        fan: usize,
        result: Result<(StatusCode, Bytes), TransportError>,
    ) {
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
                    out.stats
                        .answer(done - from, done - sent_at, status, &body, ok);
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
                let done = Instant::now();
                ctx.record(
                    &mut out,
                    job.seq >= warmup_requests,
                    job.due,
                    sent_at,
                    done,
                    fan,
                    result,
                );
            }
            out
        });
    }
    barrier.wait().await;

    // The dispatcher runs on a thread of its own: tokio's timer has a 1 ms granularity, which
    // would make every request late by up to a millisecond and show as latency that isn't the
    // server's; a thread's sleep overshoots by tens of microseconds.
    let t0 = std::time::Instant::now();
    let dispatcher = {
        let (progress, backlog_gauge) = (Arc::clone(&ctx.progress), Arc::clone(&backlog_gauge));
        std::thread::Builder::new()
            .name("loadtest-dispatch".into())
            .spawn(move || dispatch(schedule, t0, &tx, &progress, &backlog_gauge, max_backlog))
    };
    let dispatcher = match dispatcher {
        Ok(handle) => Some(handle),
        Err(e) => {
            // The closure (and its sender) is gone, so the workers will stop at once.
            eprintln!("loadtest: can't start the dispatcher thread: {e}");
            None
        }
    };

    let mut merged = Outcome::default();
    while let Some(joined) = workers.join_next().await {
        // A worker only panics on a bug; the run's numbers would be wrong, so stop.
        merged.merge(joined.expect("open-loop worker panicked"));
    }
    // The workers only stop once the dispatcher has dropped its sender, so this doesn't block.
    if let Some(handle) = dispatcher {
        merged.stats.tally.dropped += handle.join().expect("dispatcher thread panicked");
    }
    backlog_gauge.store(0, Ordering::Relaxed);
    (merged, Instant::from_std(t0))
}

/// Puts every request of `schedule` on the queue when it falls due (t0 + offset). Returns how
/// many measured requests were dropped because the queue was full.
fn dispatch(
    schedule: Schedule,
    t0: std::time::Instant,
    tx: &mpsc::Sender<Job>,
    progress: &Progress,
    backlog_gauge: &AtomicU64,
    max_backlog: usize,
) -> u64 {
    let (total, warmup_requests) = (schedule.total_requests(), schedule.warmup_requests());
    let mut dropped_measured = 0u64;
    let mut next = 0u64;
    while next < total {
        let due = t0 + schedule.offset(next);
        let now = std::time::Instant::now();
        if due > now {
            backlog_gauge.store((max_backlog - tx.capacity()) as u64, Ordering::Relaxed);
            std::thread::sleep(due - now);
            // After a late wake-up everything due by now goes out in one burst, exactly as the
            // arrivals would have been.
            continue;
        }
        match tx.try_send(Job {
            seq: next,
            due: Instant::from_std(due),
        }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                dropped_measured += u64::from(next >= warmup_requests);
                progress.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => break,
        }
        next += 1;
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
                let done = Instant::now();
                let measured = sent_at >= measure_start;
                measured_started.fetch_add(u64::from(measured), Ordering::Relaxed);
                ctx.record(&mut out, measured, sent_at, sent_at, done, fan, result);
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

/// The `k`-th successful hold's fate: of every 100, the first `confirm_pct` are confirmed and
/// the next `release_pct` released, so the split is exact for multiples of 100 and within one
/// hold per kind otherwise.
pub fn follow_up(k: usize, confirm_pct: u8, release_pct: u8) -> FollowUp {
    let slot = k % 100;
    let (c, r) = (usize::from(confirm_pct), usize::from(release_pct));
    if slot < c {
        FollowUp::Confirm
    } else if slot < c + r {
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

/// Confirms and releases, interleaved in plan order, closed loop over `concurrency` connections.
/// `Keep` entries are skipped.
pub async fn run_follow_ups(
    target: Target,
    fans: Arc<Vec<HeaderValue>>,
    ops: Vec<(FollowUp, HoldRef)>,
    concurrency: usize,
    timeout: Duration,
    progress: Arc<Progress>,
) -> FollowUpOutcome {
    let ops = Arc::new(ops);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(ops.len()) {
        let (target, fans, ops, next, progress) = (
            target.clone(),
            Arc::clone(&fans),
            Arc::clone(&ops),
            Arc::clone(&next),
            Arc::clone(&progress),
        );
        tasks.spawn(async move {
            let mut slot = Slot::new(timeout);
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
                        stats.answer(done - sent_at, done - sent_at, status, &body, ok);
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
