//! The waiting room's sockets, opened by child processes of loadtest (`loadtest queue-clients`,
//! hidden): one process holds only its share, so no process runs into the open-file limit, and
//! its sockets leave from its own source addresses `127.0.<net>.<host>`, so no address runs out
//! of ephemeral ports and the server's per-address join limit sees many clients.
//!
//! Protocol with the parent, JSON lines: the parent writes one [`ClientsInit`] on stdin, then
//! `stop` (or closes stdin) when the run is over; the child writes [`ChildLine`]s on stdout:
//! `progress` every [`PROGRESS_EVERY`], `connected` once every socket has been tried, and one
//! `report` after `stop`, with what the sockets saw aggregated per tick, per position round and
//! per admission — small, whatever the number of sockets.
//!
//! A round of exact `position` messages is found by time: queue-server sends one round at a
//! time, every `queue.position_interval_ms`, one message per waiter, so a child's position
//! receive times come in bursts; a silence longer than [`ROUND_GAP`] ends one. (A round can't be
//! named by the tick before it: rounds run beside the ticks and span many of them.)
//!
//! Times are wall-clock microseconds since the epoch, taken as each frame comes out of the
//! socket: ticks carry `at_ms`, the Redis `TIME` of their admission run, and Redis runs on the
//! same machine, so `receive − at_ms` is the tick's delivery time (to the nearest millisecond
//! below: `at_ms` is truncated, so a delay can read up to 1 ms long).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// How often a child tells the parent how far it got.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// After `stop`, how long sockets get to finish before the report is written anyway.
pub const STOP_DRAIN: Duration = Duration::from_secs(5);
/// Distinct ticks a child remembers (ten a second for almost three hours), and position receive
/// times (twenty rounds to 200,000 sockets); more are counted in `dropped_records`, never kept
/// without bound.
pub const MAX_TICKS_TRACKED: usize = 100_000;
pub const MAX_POSITIONS_TRACKED: usize = 4_000_000;
/// A silence this long between two positions ends a round. Rounds start
/// `queue.position_interval_ms` (10 s) apart and take ≈ 5–7 s over 19,000 sockets; inside one,
/// slices of `queue.position_slice` go out between tick frames, so a child hears nothing while
/// a tick is delivered — ≈ 0.3–0.6 s, never more than half a broadcast interval and a run.
pub const ROUND_GAP: Duration = Duration::from_millis(1_500);
/// Host numbers of `127.0.<net>.<host>`: 1..=254.
pub const MAX_HOSTS_PER_NET: usize = 254;
/// Open files a child needs beyond its sockets (stdio, epoll, eventfd, ...).
pub const SPARE_FILES: u64 = 64;

/// What the parent asks of one child.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientsInit {
    /// Where the sockets connect.
    pub target: SocketAddr,
    /// `ws://host:port/path`, without a query.
    pub url: String,
    /// One fan token per socket, sent as the socket's first message (`{"type":"auth",…}`, never
    /// in the URL); empty: `count` sockets that send nothing (the baseline server's).
    pub tokens: Vec<String>,
    pub count: usize,
    /// The run-wide index of this child's first socket (fan), so reports name fans globally.
    pub first_fan: usize,
    /// Third octet of the source addresses: `127.0.<source_net>.<host>`.
    pub source_net: u8,
    /// Sockets per source address (hosts 1, 2, ... each take this many in turn).
    pub sockets_per_addr: usize,
    pub read_buffer_bytes: usize,
    /// Sockets between connect and first frame at once.
    pub connect_concurrency: usize,
    /// Connect + handshake + first frame must take less than this.
    pub connect_timeout_ms: u64,
    /// `loadtest sale`: also record each socket's join answer and when it heard `sold_out`, and
    /// pass every admission token to the parent at once ([`ChildLine::Admission`]), which shops
    /// for the fan.
    #[serde(default)]
    pub sale: bool,
    /// Sockets started per second at most (fans arriving over time, as `loadtest sale` paces
    /// them); None: as fast as `connect_concurrency` allows.
    #[serde(default)]
    pub connect_per_s: Option<f64>,
    /// Several queue-server instances (`(address, ws://… URL)`): fan f's socket connects to
    /// instance f mod n, so a fan always meets the same instance; empty: every socket goes to
    /// `target` / `url`.
    #[serde(default)]
    pub instances: Vec<(SocketAddr, String)>,
}

impl ClientsInit {
    pub fn source_addr(&self, socket: usize) -> Ipv4Addr {
        let host = 1 + socket / self.sockets_per_addr.max(1);
        // validate() keeps host ≤ 254.
        Ipv4Addr::new(127, 0, self.source_net, host.min(MAX_HOSTS_PER_NET) as u8)
    }

    pub fn source_addrs(&self) -> usize {
        self.count.div_ceil(self.sockets_per_addr.max(1))
    }

    /// Where socket `socket` connects: its fan's instance ([`ClientsInit::instances`]).
    pub fn endpoint(&self, socket: usize) -> (SocketAddr, &str) {
        match self.instances.len() {
            0 => (self.target, self.url.as_str()),
            n => {
                let (addr, url) = &self.instances[(self.first_fan + socket) % n];
                (*addr, url.as_str())
            }
        }
    }

    /// The auth frame socket `socket` opens with, if it has a fan token.
    fn auth_of(&self, socket: usize) -> Option<String> {
        self.tokens
            .get(socket)
            .map(|token| serde_json::json!({"type": "auth", "fan_token": token}).to_string())
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.tokens.is_empty() && self.tokens.len() != self.count {
            return Err(format!(
                "{} tokens for {} sockets",
                self.tokens.len(),
                self.count
            ));
        }
        if self.sockets_per_addr == 0 || self.connect_concurrency == 0 {
            return Err("sockets_per_addr and connect_concurrency must be at least 1".into());
        }
        if self.source_addrs() > MAX_HOSTS_PER_NET {
            return Err(format!(
                "{} sockets at {} per address need {} addresses; one child has {MAX_HOSTS_PER_NET}",
                self.count,
                self.sockets_per_addr,
                self.source_addrs()
            ));
        }
        Ok(())
    }
}

/// Running counts, sent with every progress line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Sockets that completed the handshake and got their first frame.
    pub opened: u64,
    /// Sockets that didn't (see the report's `failures`).
    pub failed: u64,
    /// Sockets open now.
    pub open: u64,
    pub frames: u64,
    pub admitted: u64,
}

/// One stdout line of a child.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChildLine {
    Progress(Counts),
    /// Every socket has been tried (opened or failed).
    Connected(Counts),
    Report(Box<ChildReport>),
    /// `sale` only: a socket's fan was admitted; the parent shops with the token.
    Admission(AdmissionLine),
}

/// One admission, passed on as it happens (`sale`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdmissionLine {
    pub fan: usize,
    pub admission_token: String,
    pub at_us: i64,
}

/// A socket's join answer (`sale`): its first frame after the auth frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinSeen {
    pub fan: usize,
    pub at_us: i64,
    /// The place a `position` answer gave; None for `pre_queue` (the place is the fan's draw).
    pub place: Option<i64>,
    /// The first frame's type (`position`, `pre_queue`, `sold_out`, `error`, ...).
    pub kind: String,
    /// From the start of the connect to this frame (TCP, handshake, auth frame, join).
    pub took_us: i64,
}

/// One tick as this child's sockets saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TickSeen {
    pub at_ms: i64,
    pub admitted_total: Option<i64>,
    /// Sockets that received it.
    pub sockets: u64,
    pub first_us: i64,
    pub last_us: i64,
    /// The frame's size.
    pub bytes: usize,
    /// Waiters in line and the line's state, as the frame says.
    #[serde(default)]
    pub waiting: Option<i64>,
    #[serde(default)]
    pub state: Option<String>,
}

/// One slow-cadence round of exact `position` messages, as one child's sockets heard it: a
/// burst of positions with no silence longer than [`ROUND_GAP`] inside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSeen {
    /// Positions received (one per socket, unless rounds ran into each other).
    pub positions: u64,
    pub first_us: i64,
    pub last_us: i64,
}

/// Splits sorted receive times into rounds at every silence longer than `gap_us`.
pub fn rounds_of(sorted_us: &[i64], gap_us: i64) -> Vec<RoundSeen> {
    let mut out: Vec<RoundSeen> = Vec::new();
    for &t in sorted_us {
        match out.last_mut() {
            Some(r) if t - r.last_us <= gap_us => {
                r.positions += 1;
                r.last_us = t;
            }
            _ => out.push(RoundSeen {
                positions: 1,
                first_us: t,
                last_us: t,
            }),
        }
    }
    out
}

/// One `admitted` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdmittedSeen {
    /// The run-wide socket (fan) index.
    pub fan: usize,
    /// The place in the admission token's claims.
    pub place: Option<i64>,
    /// The place this socket's `position` messages gave.
    pub place_seen: Option<i64>,
    /// `at_ms` of the last tick this socket received before it: the fan was admitted by the
    /// tick after that one (queue-server tells admitted fans before it broadcasts the tick).
    pub after_tick_ms: Option<i64>,
    pub at_us: i64,
}

/// What one child saw, written once after `stop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChildReport {
    pub counts: Counts,
    /// Sockets that never opened, by why (`connect`, `handshake`, `http_429`, `timeout`, ...).
    pub failures: BTreeMap<String, u64>,
    /// Open sockets the server closed (admitted fans' sockets are closed after the message).
    pub closed_by_server: u64,
    pub read_errors: u64,
    pub frames_by_type: BTreeMap<String, u64>,
    /// Frames that weren't the JSON the protocol describes.
    pub bad_frames: u64,
    pub ticks: Vec<TickSeen>,
    pub rounds: Vec<RoundSeen>,
    /// (Unix second, positions received in it), after each socket's first, in time order: the
    /// slow cadence's throughput, also when rounds run back to back with no silence. (Pairs, not
    /// a map: JSON map keys are strings, and the tagged [`ChildLine`] can't read them back as
    /// numbers.)
    pub positions_per_s: Vec<(i64, u64)>,
    pub admitted: Vec<AdmittedSeen>,
    /// Ticks or positions beyond [`MAX_TICKS_TRACKED`] / [`MAX_POSITIONS_TRACKED`], not recorded.
    pub dropped_records: u64,
    /// `sale` only: every socket's join answer (one per socket, so bounded by `count`).
    #[serde(default)]
    pub joins: Vec<JoinSeen>,
    /// `sale` only: when each socket first heard the line was sold out (a `sold_out` message or
    /// a tick whose state is `sold_out`), one per socket.
    #[serde(default)]
    pub sold_out_us: Vec<i64>,
}

/// The fields loadtest reads from a server frame; the rest are ignored.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    at_ms: Option<i64>,
    admitted_total: Option<i64>,
    place: Option<i64>,
    #[serde(borrow)]
    admission_token: Option<Cow<'a, str>>,
    waiting: Option<i64>,
    #[serde(borrow)]
    state: Option<Cow<'a, str>>,
}

/// The claims of an admission token `v1.<base64url claims>.<base64url mac>` (not verified:
/// loadtest only reads what the server put there).
pub fn token_claims(token: &str) -> Option<serde_json::Value> {
    let claims = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()
}

/// The `place` claim of an admission token.
pub fn token_place(token: &str) -> Option<i64> {
    token_claims(token)?.get("place")?.as_i64()
}

pub fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// What one socket remembers between frames.
#[derive(Debug, Default)]
struct SocketState {
    last_tick_ms: Option<i64>,
    place: Option<i64>,
    positions: u64,
    /// Its first frame (the join answer) has been booked.
    joined: bool,
    /// It has heard the line is sold out.
    sold_out: bool,
    /// When its connect began.
    started_us: i64,
}

/// The child's aggregates, shared by its sockets (one runtime thread: the lock never waits).
#[derive(Debug, Default)]
struct Agg {
    ticks: HashMap<i64, TickSeen>,
    /// Receive times of every position but each socket's first (the one on connect).
    positions_us: Vec<i64>,
    admitted: Vec<AdmittedSeen>,
    frames_by_type: BTreeMap<String, u64>,
    failures: BTreeMap<String, u64>,
    bad_frames: u64,
    dropped_records: u64,
    closed_by_server: u64,
    read_errors: u64,
    /// Every socket gets the same tick frame: parse it once.
    last_tick: Option<(String, TickSeen)>,
    /// `sale`: record joins and sold-out times, and keep admission tokens for the parent.
    sale: bool,
    joins: Vec<JoinSeen>,
    sold_out_us: Vec<i64>,
    /// Admissions not yet passed to the parent (`sale`).
    to_pass: Vec<AdmissionLine>,
}

impl Agg {
    fn count_type(&mut self, kind: &str) {
        match self.frames_by_type.get_mut(kind) {
            Some(n) => *n += 1,
            None => {
                self.frames_by_type.insert(kind.to_owned(), 1);
            }
        }
    }

    fn tick(&mut self, seen: &TickSeen, now_us: i64) {
        self.count_type("tick");
        if let Some(t) = self.ticks.get_mut(&seen.at_ms) {
            t.sockets += 1;
            t.first_us = t.first_us.min(now_us);
            t.last_us = t.last_us.max(now_us);
            return;
        }
        if self.ticks.len() >= MAX_TICKS_TRACKED {
            self.dropped_records += 1;
            return;
        }
        self.ticks.insert(
            seen.at_ms,
            TickSeen {
                sockets: 1,
                first_us: now_us,
                last_us: now_us,
                ..seen.clone()
            },
        );
    }

    fn heard_sold_out(&mut self, sock: &mut SocketState, now_us: i64) {
        if self.sale && !sock.sold_out {
            sock.sold_out = true;
            self.sold_out_us.push(now_us);
        }
    }

    fn position(&mut self, now_us: i64) {
        if self.positions_us.len() >= MAX_POSITIONS_TRACKED {
            self.dropped_records += 1;
            return;
        }
        self.positions_us.push(now_us);
    }

    /// Books one text frame of socket `fan`.
    fn frame(&mut self, fan: usize, sock: &mut SocketState, text: &str, now_us: i64) {
        if let Some((last, seen)) = &self.last_tick {
            if last == text && sock.joined {
                let seen = seen.clone();
                sock.last_tick_ms = Some(seen.at_ms);
                if seen.state.as_deref() == Some("sold_out") {
                    self.heard_sold_out(sock, now_us);
                }
                self.tick(&seen, now_us);
                return;
            }
        }
        let Ok(f) = serde_json::from_str::<Frame<'_>>(text) else {
            self.bad_frames += 1;
            return;
        };
        if !sock.joined {
            sock.joined = true;
            if self.sale {
                self.joins.push(JoinSeen {
                    fan,
                    at_us: now_us,
                    place: f.place.filter(|_| f.kind == "position"),
                    kind: f.kind.clone().into_owned(),
                    took_us: now_us - sock.started_us,
                });
            }
        }
        match f.kind.as_ref() {
            "tick" => {
                let Some(at_ms) = f.at_ms else {
                    self.bad_frames += 1;
                    return;
                };
                sock.last_tick_ms = Some(at_ms);
                let seen = TickSeen {
                    at_ms,
                    admitted_total: f.admitted_total,
                    sockets: 0,
                    first_us: now_us,
                    last_us: now_us,
                    bytes: text.len(),
                    waiting: f.waiting,
                    state: f.state.as_deref().map(str::to_owned),
                };
                if seen.state.as_deref() == Some("sold_out") {
                    self.heard_sold_out(sock, now_us);
                }
                self.tick(&seen, now_us);
                self.last_tick = Some((text.to_owned(), seen));
            }
            "sold_out" => {
                self.count_type("sold_out");
                self.heard_sold_out(sock, now_us);
            }
            "position" => {
                self.count_type("position");
                // The first position is the one every socket gets on connect, not a round.
                if sock.positions > 0 {
                    self.position(now_us);
                }
                sock.positions += 1;
                sock.place = f.place.or(sock.place);
            }
            "admitted" => {
                self.count_type("admitted");
                self.admitted.push(AdmittedSeen {
                    fan,
                    place: f.admission_token.as_deref().and_then(token_place),
                    place_seen: sock.place,
                    after_tick_ms: sock.last_tick_ms,
                    at_us: now_us,
                });
                if let (true, Some(token)) = (self.sale, f.admission_token) {
                    self.to_pass.push(AdmissionLine {
                        fan,
                        admission_token: token.into_owned(),
                        at_us: now_us,
                    });
                }
            }
            other => self.count_type(other),
        }
    }
}

struct Shared {
    init: ClientsInit,
    ws_config: WebSocketConfig,
    agg: Mutex<Agg>,
    opened: AtomicU64,
    failed: AtomicU64,
    open: AtomicU64,
    frames: AtomicU64,
    admitted: AtomicU64,
    /// Socket tasks still running.
    live: AtomicU64,
}

impl Shared {
    fn agg(&self) -> std::sync::MutexGuard<'_, Agg> {
        // A panicking socket task leaves plain counters behind: still usable.
        self.agg.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn counts(&self) -> Counts {
        Counts {
            opened: self.opened.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            open: self.open.load(Ordering::Relaxed),
            frames: self.frames.load(Ordering::Relaxed),
            admitted: self.admitted.load(Ordering::Relaxed),
        }
    }

    fn fail(&self, why: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *self.agg().failures.entry(why.to_owned()).or_default() += 1;
    }
}

/// Counts a socket task as live until dropped.
struct Live(Arc<Shared>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

fn emit(line: &ChildLine) {
    // The parent reads every line; if it is gone there is nobody left to tell.
    if let Ok(json) = serde_json::to_string(line) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{json}");
        let _ = out.flush();
    }
}

type Ws = WebSocketStream<TcpStream>;

/// Binds to the socket's source address, connects, does the WebSocket handshake, and sends the
/// auth frame (queue-server's sockets authenticate with their first message).
async fn open(shared: &Shared, socket: usize) -> Result<Ws, String> {
    let init = &shared.init;
    let tcp = TcpSocket::new_v4().map_err(|_| "socket".to_owned())?;
    let src = SocketAddrV4::new(init.source_addr(socket), 0);
    tcp.bind(src.into()).map_err(|_| "bind".to_owned())?;
    let (target, url) = init.endpoint(socket);
    let stream = tcp
        .connect(target)
        .await
        .map_err(|_| "connect".to_owned())?;
    let _ = stream.set_nodelay(true);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(shared.ws_config))
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(resp) => format!("http_{}", resp.status().as_u16()),
                _ => "handshake".to_owned(),
            })?;
    if let Some(auth) = init.auth_of(socket) {
        ws.send(Message::text(auth))
            .await
            .map_err(|_| "auth_send".to_owned())?;
    }
    Ok(ws)
}

/// One socket: open it (holding a connect permit until its first frame), then book every frame
/// until the server closes it or the run stops.
async fn socket(
    shared: Arc<Shared>,
    socket: usize,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let _live = Live(shared.clone());
    let fan = shared.init.first_fan + socket;
    let timeout = Duration::from_millis(shared.init.connect_timeout_ms);
    let started_us = wall_us();
    let first = async {
        let mut ws = open(&shared, socket).await?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => Ok((ws, t, wall_us())),
            Some(Ok(_)) => Err("first_frame_not_text".to_owned()),
            None | Some(Err(_)) => Err("closed_before_first_frame".to_owned()),
        }
    };
    let (mut ws, text, at_us) = tokio::select! {
        r = tokio::time::timeout(timeout, first) => match r {
            Ok(Ok(x)) => x,
            Ok(Err(why)) => return shared.fail(&why),
            Err(_) => return shared.fail("timeout"),
        },
        _ = stop.changed() => return,
    };
    drop(permit);
    shared.opened.fetch_add(1, Ordering::Relaxed);
    shared.open.fetch_add(1, Ordering::Relaxed);
    let mut state = SocketState {
        started_us,
        ..SocketState::default()
    };
    let book = |text: &str, at_us: i64, state: &mut SocketState| {
        shared.frames.fetch_add(1, Ordering::Relaxed);
        let mut agg = shared.agg();
        let admitted_before = agg.admitted.len();
        agg.frame(fan, state, text, at_us);
        if agg.admitted.len() > admitted_before {
            shared.admitted.fetch_add(1, Ordering::Relaxed);
        }
        for line in agg.to_pass.drain(..) {
            emit(&ChildLine::Admission(line));
        }
    };
    book(&text, at_us, &mut state);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => book(&t, wall_us(), &mut state),
                Some(Ok(Message::Close(_))) | None => {
                    shared.agg().closed_by_server += 1;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    shared.agg().read_errors += 1;
                    break;
                }
            },
        }
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
}

/// Starts every socket, at most `connect_concurrency` between connect and first frame (and at
/// most `connect_per_s` a second).
async fn connect_all(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(shared.init.connect_concurrency));
    let started = tokio::time::Instant::now();
    let pace = shared
        .init
        .connect_per_s
        .filter(|r| r.is_finite() && *r > 0.0);
    for i in 0..shared.init.count {
        if let Some(rate) = pace {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = stop.changed() => return,
            }
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        shared.live.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(socket(shared.clone(), i, permit, stop.clone()));
    }
}

async fn report_progress(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut told_connected = false;
    loop {
        tick.tick().await;
        let counts = shared.counts();
        emit(&ChildLine::Progress(counts));
        if !told_connected && counts.opened + counts.failed >= shared.init.count as u64 {
            told_connected = true;
            emit(&ChildLine::Connected(counts));
        }
    }
}

/// `loadtest queue-clients`: reads its [`ClientsInit`], opens the sockets, reports, and on
/// `stop` closes them and writes its [`ChildReport`].
pub async fn run() -> anyhow::Result<()> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await
        .context("reading the init line")?
        .context("stdin closed before the init line")?;
    let init: ClientsInit = serde_json::from_str(&first).context("parsing the init line")?;
    if let Err(msg) = init.validate() {
        bail!("{msg}");
    }
    if let Some(limit) = crate::procfs::open_files_limit() {
        if init.count as u64 + SPARE_FILES > limit {
            bail!(
                "{} sockets need {} open files, the limit is {limit}: use more client processes",
                init.count,
                init.count as u64 + SPARE_FILES
            );
        }
    }
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(init.read_buffer_bytes)
        .write_buffer_size(0)
        .max_message_size(Some(crate::cli::MAX_WS_MESSAGE_BYTES))
        .max_frame_size(Some(crate::cli::MAX_WS_MESSAGE_BYTES));
    let sale = init.sale;
    let shared = Arc::new(Shared {
        init,
        ws_config,
        agg: Mutex::new(Agg {
            sale,
            ..Agg::default()
        }),
        opened: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        open: AtomicU64::new(0),
        frames: AtomicU64::new(0),
        admitted: AtomicU64::new(0),
        live: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let connector = tokio::spawn(connect_all(shared.clone(), stop_rx));
    let progress = tokio::spawn(report_progress(shared.clone()));

    loop {
        match lines.next_line().await {
            Ok(Some(line)) if line.trim() == "stop" => break,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break,
        }
    }
    let _ = stop_tx.send(true);
    connector.abort();
    let drained = tokio::time::Instant::now() + STOP_DRAIN;
    while shared.live.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    progress.abort();

    let counts = shared.counts();
    let mut agg = std::mem::take(&mut *shared.agg());
    let mut ticks: Vec<TickSeen> = agg.ticks.drain().map(|(_, t)| t).collect();
    ticks.sort_by_key(|t| t.at_ms);
    agg.positions_us.sort_unstable();
    let rounds = rounds_of(&agg.positions_us, ROUND_GAP.as_micros() as i64);
    let mut positions_per_s: Vec<(i64, u64)> = Vec::new();
    for t in &agg.positions_us {
        let second = t.div_euclid(1_000_000);
        match positions_per_s.last_mut() {
            Some((s, n)) if *s == second => *n += 1,
            _ => positions_per_s.push((second, 1)),
        }
    }
    emit(&ChildLine::Report(Box::new(ChildReport {
        counts,
        failures: agg.failures,
        closed_by_server: agg.closed_by_server,
        read_errors: agg.read_errors,
        frames_by_type: agg.frames_by_type,
        bad_frames: agg.bad_frames,
        ticks,
        rounds,
        positions_per_s,
        admitted: agg.admitted,
        dropped_records: agg.dropped_records,
        joins: agg.joins,
        sold_out_us: agg.sold_out_us,
    })));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(count: usize, per_addr: usize) -> ClientsInit {
        ClientsInit {
            target: "127.0.0.1:1".parse().unwrap(),
            url: "ws://127.0.0.1:1/ws".into(),
            tokens: Vec::new(),
            count,
            first_fan: 0,
            source_net: 3,
            sockets_per_addr: per_addr,
            read_buffer_bytes: 4096,
            connect_concurrency: 8,
            connect_timeout_ms: 1000,
            sale: false,
            connect_per_s: None,
            instances: Vec::new(),
        }
    }

    #[test]
    fn a_fans_socket_always_meets_its_instance() {
        let mut i = init(4, 10);
        assert_eq!(i.endpoint(3), (i.target, "ws://127.0.0.1:1/ws"));
        let a = (
            "127.0.0.1:2".parse().unwrap(),
            "ws://127.0.0.1:2/ws".to_owned(),
        );
        let b = (
            "127.0.0.1:3".parse().unwrap(),
            "ws://127.0.0.1:3/ws".to_owned(),
        );
        i.instances = vec![a.clone(), b.clone()];
        i.first_fan = 7;
        // Fan 7 (socket 0) → instance 1, fan 8 → instance 0: by run-wide fan, not by child.
        assert_eq!(i.endpoint(0), (b.0, b.1.as_str()));
        assert_eq!(i.endpoint(1), (a.0, a.1.as_str()));
        assert_eq!(i.endpoint(2), i.endpoint(0));
    }

    #[test]
    fn sockets_spread_over_source_addresses() {
        let i = init(2500, 1000);
        assert_eq!(i.source_addr(0), Ipv4Addr::new(127, 0, 3, 1));
        assert_eq!(i.source_addr(999), Ipv4Addr::new(127, 0, 3, 1));
        assert_eq!(i.source_addr(1000), Ipv4Addr::new(127, 0, 3, 2));
        assert_eq!(i.source_addr(2499), Ipv4Addr::new(127, 0, 3, 3));
        assert_eq!(i.source_addrs(), 3);
        assert!(i.validate().is_ok());
        assert!(init(255 * 10, 10).validate().is_err());
    }

    #[test]
    fn sockets_authenticate_with_their_first_message() {
        let mut i = init(2, 10);
        assert_eq!(i.auth_of(1), None);
        i.tokens = vec!["a".into(), "b".into()];
        let auth: serde_json::Value = serde_json::from_str(&i.auth_of(1).unwrap()).unwrap();
        assert_eq!(auth, serde_json::json!({"type": "auth", "fan_token": "b"}));
        i.tokens.pop();
        assert!(i.validate().is_err());
    }

    #[test]
    fn token_place_reads_the_claims() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            br#"{"drop":"d","fan":"f","place":4503599627370497,"iat":1,"exp":2,"jti":"j"}"#,
        );
        assert_eq!(
            token_place(&format!("v1.{claims}.sig")),
            Some(4_503_599_627_370_497)
        );
        assert_eq!(token_place("v1.!!.sig"), None);
        assert_eq!(token_place("nonsense"), None);
    }

    #[test]
    fn child_lines_survive_the_pipe() {
        let report = ChildReport {
            counts: Counts {
                opened: 3,
                ..Counts::default()
            },
            failures: [("http_429".to_owned(), 2)].into_iter().collect(),
            ticks: vec![TickSeen {
                at_ms: 1_795_451_409_000,
                admitted_total: Some(5),
                sockets: 3,
                first_us: 1,
                last_us: 2,
                bytes: 155,
                waiting: Some(4),
                state: Some("open".into()),
            }],
            rounds: rounds_of(&[10, 20], 100),
            positions_per_s: vec![(1_795_451_408, 7), (1_795_451_409, 9)],
            admitted: vec![AdmittedSeen {
                fan: 4,
                place: Some(1 << 52),
                place_seen: None,
                after_tick_ms: Some(1_795_451_409_000),
                at_us: 3,
            }],
            ..ChildReport::default()
        };
        for line in [
            ChildLine::Progress(report.counts),
            ChildLine::Connected(report.counts),
            ChildLine::Report(Box::new(report.clone())),
        ] {
            let json = serde_json::to_string(&line).unwrap();
            assert!(!json.contains('\n'), "one line: {json}");
            let back: ChildLine = serde_json::from_str(&json).unwrap();
            match (line, back) {
                (ChildLine::Report(a), ChildLine::Report(b)) => {
                    assert_eq!(a.ticks, b.ticks);
                    assert_eq!(a.rounds, b.rounds);
                    assert_eq!(a.positions_per_s, b.positions_per_s);
                    assert_eq!(a.admitted, b.admitted);
                    assert_eq!(a.failures, b.failures);
                }
                (ChildLine::Progress(a), ChildLine::Progress(b))
                | (ChildLine::Connected(a), ChildLine::Connected(b)) => assert_eq!(a, b),
                _ => panic!("the line changed kind"),
            }
        }
    }

    #[test]
    fn rounds_split_at_silences() {
        let r = rounds_of(&[10, 20, 25, 400, 410, 1000], 100);
        assert_eq!(
            r.iter()
                .map(|r| (r.positions, r.first_us, r.last_us))
                .collect::<Vec<_>>(),
            [(3, 10, 25), (2, 400, 410), (1, 1000, 1000)]
        );
        assert!(rounds_of(&[], 100).is_empty());
    }

    #[test]
    fn a_sale_books_joins_sold_out_once_and_passes_admissions_on() {
        let mut agg = Agg {
            sale: true,
            ..Agg::default()
        };
        let (mut a, mut b, mut c) = (
            SocketState {
                started_us: 4,
                ..SocketState::default()
            },
            SocketState::default(),
            SocketState::default(),
        );
        let pos = r#"{"type":"position","place":4503599627370500,"ahead":3,"admitted_total":0}"#;
        agg.frame(0, &mut a, pos, 10);
        agg.frame(
            1,
            &mut b,
            r#"{"type":"pre_queue","opens_at":"x","waiting":2}"#,
            12,
        );
        agg.frame(2, &mut c, pos, 13);
        assert_eq!(
            agg.joins,
            vec![
                JoinSeen {
                    fan: 0,
                    at_us: 10,
                    place: Some(4_503_599_627_370_500),
                    kind: "position".into(),
                    took_us: 6,
                },
                JoinSeen {
                    fan: 1,
                    at_us: 12,
                    place: None,
                    kind: "pre_queue".into(),
                    took_us: 12,
                },
                JoinSeen {
                    fan: 2,
                    at_us: 13,
                    place: Some(4_503_599_627_370_500),
                    kind: "position".into(),
                    took_us: 13,
                },
            ]
        );
        let admitted = r#"{"type":"admitted","admission_token":"v1.e30.x"}"#;
        agg.frame(2, &mut c, admitted, 15);
        assert_eq!(
            agg.to_pass,
            vec![AdmissionLine {
                fan: 2,
                admission_token: "v1.e30.x".into(),
                at_us: 15,
            }]
        );
        // The same sold-out tick to two sockets (the second through the cached parse), then
        // the `sold_out` message: one time per socket, the first.
        let tick =
            r#"{"admitted_total":9,"at_ms":1000,"state":"sold_out","type":"tick","waiting":1}"#;
        agg.frame(0, &mut a, tick, 20);
        agg.frame(1, &mut b, tick, 21);
        agg.frame(0, &mut a, r#"{"type":"sold_out"}"#, 22);
        assert_eq!(agg.sold_out_us, vec![20, 21]);
        let t = &agg.ticks[&1000];
        assert_eq!(
            (t.waiting, t.state.as_deref(), t.sockets),
            (Some(1), Some("sold_out"), 2)
        );
    }

    #[test]
    fn frames_are_booked_per_tick_round_and_admission() {
        let mut agg = Agg::default();
        let (mut a, mut b) = (SocketState::default(), SocketState::default());
        let pos = r#"{"type":"position","place":4503599627370500,"ahead":3,"admitted_total":0}"#;
        agg.frame(0, &mut a, pos, 10);
        agg.frame(1, &mut b, pos, 11);
        let tick = r#"{"admitted_total":0,"at_ms":1000,"type":"tick","waiting":5,"watermark":0}"#;
        agg.frame(0, &mut a, tick, 1_000_100);
        agg.frame(1, &mut b, tick, 1_000_300);
        // A round of positions after that tick.
        agg.frame(0, &mut a, pos, 1_000_500);
        agg.frame(1, &mut b, pos, 1_000_900);
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"place":4503599627370500}"#);
        let admitted = format!(r#"{{"type":"admitted","admission_token":"v1.{claims}.x"}}"#);
        agg.frame(0, &mut a, &admitted, 1_100_000);
        agg.frame(1, &mut b, "not json", 1_100_001);

        let t = &agg.ticks[&1000];
        assert_eq!(
            (t.sockets, t.first_us, t.last_us, t.admitted_total),
            (2, 1_000_100, 1_000_300, Some(0))
        );
        assert_eq!(agg.positions_us, vec![1_000_500, 1_000_900]);
        assert_eq!(
            agg.admitted,
            vec![AdmittedSeen {
                fan: 0,
                place: Some(4_503_599_627_370_500),
                place_seen: Some(4_503_599_627_370_500),
                after_tick_ms: Some(1000),
                at_us: 1_100_000,
            }]
        );
        assert_eq!(agg.frames_by_type["tick"], 2);
        assert_eq!(agg.frames_by_type["position"], 4);
        assert_eq!(agg.bad_frames, 1);
    }
}
