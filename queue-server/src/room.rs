//! One admission loop per drop that has waiters (or recent pollers) on this instance. Every tick
//! the instance holding the drop's admission lease runs the admission script (O(1) Redis calls,
//! however many wait here) and publishes the run on the drop's admission feed (sharded pub/sub);
//! every instance tells the fans a run admitted that are connected to it the moment the run
//! reaches it, and every waiter when the line's state changes. A push can be lost, so each tick
//! also catches up: a socket here whose place is at or below the admission watermark and that
//! hasn't heard `admitted` is checked against the active set and told (docs/ARCHITECTURE.md,
//! "Many instances"). Every `broadcast_interval_ms` a room sends one shared `tick` frame,
//! serialised once. On a slower cadence each waiter gets an exact `position`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::config::{ms, QueueConfig};
use engine::db::LineMarks;
use engine::ids::{DropId, FanId};
use engine::lease::Leases;
use engine::queue::{Feed, LineState, Queue, SessionEnds, Standing, Tick};
use engine::tokens::now_ms;
use engine::{Code, Error};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::Utf8Bytes;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each map entry is self-contained: a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A text frame's payload, as sockets' send queues carry it: 32 bytes a slot (a whole tungstenite
/// `Message` is several times that, and tokio's channels allocate their slots in blocks of 32 per
/// socket). Cloning one for many sockets shares the bytes.
pub type Frame = Utf8Bytes;

/// A frame for one socket.
pub fn frame(v: &Value) -> Frame {
    Utf8Bytes::from(v.to_string())
}

/// One connected socket of a fan.
struct Waiter {
    fan: FanId,
    /// The fan's place in the line when the socket joined.
    place: i64,
    tx: mpsc::Sender<Frame>,
}

#[derive(Default)]
struct Waiters {
    by_conn: HashMap<u64, Waiter>,
    by_fan: HashMap<FanId, Vec<u64>>,
    /// The fans connected here by place: the catch-up looks only at those at or below the
    /// admission watermark (a range, however many wait here).
    by_place: BTreeMap<i64, FanId>,
}

impl Waiters {
    fn remove(&mut self, conn: u64) {
        if let Some(w) = self.by_conn.remove(&conn) {
            if let Some(conns) = self.by_fan.get_mut(&w.fan) {
                conns.retain(|c| *c != conn);
                if conns.is_empty() {
                    self.by_fan.remove(&w.fan);
                    if self.by_place.get(&w.place) == Some(&w.fan) {
                        self.by_place.remove(&w.place);
                    }
                }
            }
            metrics::gauge!(engine::metrics::QUEUE_WAITERS).decrement(1.0);
        }
    }

    /// Lets go of every socket here: dropping its sender ends its socket task, which closes it.
    fn let_go_all(&mut self) {
        let conns: Vec<u64> = self.by_conn.keys().copied().collect();
        for conn in conns {
            self.remove(conn);
        }
    }

    /// Queues `msg` on every socket of `fan`; a socket whose queue is full is dropped.
    fn send_fan(&mut self, fan: &FanId, msg: &Frame) {
        let conns = self.by_fan.get(fan).cloned().unwrap_or_default();
        let mut gone = Vec::new();
        for conn in conns {
            if let Some(w) = self.by_conn.get(&conn) {
                if w.queue(msg) {
                    metrics::counter!(engine::metrics::QUEUE_MESSAGES_SENT).increment(1);
                } else {
                    gone.push(conn);
                }
            }
        }
        for conn in gone {
            self.remove(conn);
        }
    }

    /// Queues `frames` on every socket here, in one pass over them; sockets whose queue is full
    /// (or whose task ended) are dropped. Counted once per call, not once per socket: a
    /// broadcast is 19,000 sends.
    fn broadcast(&mut self, frames: &[&Frame]) {
        let mut sent = 0u64;
        let mut gone = Vec::new();
        for (conn, w) in &self.by_conn {
            for f in frames {
                if !w.queue(f) {
                    gone.push(*conn);
                    break;
                }
                sent += 1;
            }
        }
        metrics::counter!(engine::metrics::QUEUE_MESSAGES_SENT).increment(sent);
        for conn in gone {
            self.remove(conn);
        }
    }

    /// Whether every socket here has taken everything queued for it. A socket task takes a frame
    /// off its queue and writes it in the same step, so this is "written", but for the rare
    /// socket whose write blocked (it is still being written then).
    fn drained(&self) -> bool {
        self.by_conn
            .values()
            .all(|w| w.tx.capacity() == w.tx.max_capacity())
    }
}

impl Waiter {
    /// Queues one frame; false when the socket must go: its queue is full (a slow client is
    /// dropped, not buffered without end: removing its sender ends its socket task) or its
    /// task already ended.
    fn queue(&self, msg: &Frame) -> bool {
        match self.tx.try_send(msg.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!(engine::metrics::QUEUE_SLOW_CLIENTS_DROPPED).increment(1);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// What the last tick said, for new sockets and pollers.
#[derive(Debug, Clone)]
pub struct View {
    pub state: LineState,
    pub watermark: i64,
    pub admitted_total: i64,
    pub waiting: i64,
    /// Admissions per second measured over `admit_rate_window_ms` (any instance's); None until
    /// this room has a second of samples.
    pub measured_rate_per_s: Option<f64>,
    pub configured_rate_per_s: f64,
    /// The drop's `leave_grace_s` in ms.
    pub leave_grace_ms: i64,
    /// Redis' clock at the admission run, and when this process read it.
    pub redis_now_ms: i64,
    pub read_at: Instant,
    /// On the waiting list: units come back since the sell-out.
    pub came_back: i64,
}

/// Admissions a second, measured over the last `window` of ticks from the drop's count of
/// admissions ever; `None` until there is a second of samples.
struct AdmissionRate {
    window: Duration,
    samples: VecDeque<(Instant, i64)>,
}

impl AdmissionRate {
    fn new(window: Duration) -> AdmissionRate {
        AdmissionRate {
            window,
            samples: VecDeque::new(),
        }
    }

    fn observe(&mut self, now: Instant, admitted_total: i64) -> Option<f64> {
        // The count only falls when Redis lost the line and it was restored from the last mark
        // kept in Postgres, which is behind what this room saw: the samples before are of
        // another count, and a rate across the two would be negative (a frame the contract
        // doesn't allow, and an ETA that means nothing).
        if self
            .samples
            .back()
            .is_some_and(|(_, n)| admitted_total < *n)
        {
            self.samples.clear();
        }
        self.samples.push_back((now, admitted_total));
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > self.window)
        {
            self.samples.pop_front();
        }
        match (self.samples.front(), self.samples.back()) {
            (Some((t0, n0)), Some((t1, n1)))
                if t1.duration_since(*t0) >= Duration::from_secs(1) =>
            {
                Some((n1 - n0) as f64 / t1.duration_since(*t0).as_secs_f64())
            }
            _ => None,
        }
    }
}

impl View {
    /// The rate ETAs use: the measured one once there is a second of data — zero when nothing
    /// moves (all `max_active` slots taken, say), so no ETA is promised then — else, while the
    /// line is open, the configured one.
    pub fn rate_per_s(&self) -> f64 {
        match self.measured_rate_per_s {
            Some(rate) => rate,
            None if self.state == LineState::Open => self.configured_rate_per_s,
            None => 0.0,
        }
    }

    /// Redis' clock now, as this process best knows it: presence is compared with Redis `TIME`
    /// (admit.lua), so it must be written in that clock, not this machine's.
    pub fn redis_now_ms(&self) -> i64 {
        self.redis_now_ms + i64::try_from(self.read_at.elapsed().as_millis()).unwrap_or(0)
    }

    fn of(t: &Tick, measured_rate_per_s: Option<f64>) -> View {
        View {
            state: t.state,
            watermark: t.watermark,
            admitted_total: t.admitted_total,
            waiting: t.waiting,
            measured_rate_per_s,
            configured_rate_per_s: t.rate_per_s,
            leave_grace_ms: t.leave_grace_ms,
            redis_now_ms: t.now_ms,
            read_at: Instant::now(),
            came_back: t.came_back,
        }
    }

    pub fn eta_s(&self, ahead: i64) -> Option<i64> {
        let rate = self.rate_per_s();
        (rate > 0.0).then(|| ((ahead + 1) as f64 / rate).ceil() as i64)
    }

    /// The state message a new socket gets after its position, if the line isn't simply open.
    pub fn state_message(&self) -> Option<Value> {
        match self.state {
            LineState::Paused => Some(json!({"type": "paused"})),
            LineState::AllHeld => Some(json!({"type": "all_held"})),
            LineState::SoldOut => Some(json!({"type": "sold_out"})),
            // Each waiter's own `waitlisted` (with their place) follows on the position cadence.
            LineState::Waitlist => Some(json!({"type": "waitlisted", "came_back": self.came_back})),
            LineState::Closed => Some(json!({"type": "closed"})),
            _ => None,
        }
    }
}

pub struct Room {
    drop: DropId,
    waiters: Mutex<Waiters>,
    touched: Mutex<Instant>,
    view: Mutex<Option<View>>,
    /// The latest admission run another instance published (its admitted fans already told),
    /// and when it arrived: a room not holding the admission lease takes its view from it.
    pushed: Mutex<Option<(Tick, Instant)>>,
}

impl Room {
    pub fn view(&self) -> Option<View> {
        lock(&self.view).clone()
    }
}

/// Every room of this process.
pub struct Rooms {
    pub queue: Arc<Queue>,
    cfg: QueueConfig,
    rooms: Mutex<HashMap<DropId, Arc<Room>>>,
    next_conn: AtomicU64,
    shutdown: watch::Receiver<bool>,
    /// Every drop's admission runs as any instance publishes them; None when it couldn't be
    /// set up (then every room runs the script itself, as before there was a feed).
    feed: Option<Arc<Feed>>,
    /// Which drops' admission runs happen here.
    leases: Leases,
}

impl Rooms {
    /// The rooms, and the task that hands the admission feed's messages to them (it ends at
    /// shutdown).
    pub fn new(queue: Arc<Queue>, cfg: QueueConfig, shutdown: watch::Receiver<bool>) -> Arc<Rooms> {
        let feed = match Feed::new(&queue.engine.cfg().redis, cfg.feed_capacity) {
            Ok(feed) => {
                feed.start();
                Some(Arc::new(feed))
            }
            Err(e) => {
                tracing::warn!(error = %e, "no admission feed: every room runs admission itself");
                None
            }
        };
        let leases = Leases::new("admit", cfg.admission_lease_ms);
        let rooms = Arc::new(Rooms {
            queue,
            cfg,
            rooms: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            shutdown,
            feed,
            leases,
        });
        if let Some(feed) = &rooms.feed {
            tokio::spawn(rooms.clone().listen(feed.clone()));
        }
        rooms
    }

    /// Hands each admission run published on the feed to its drop's room here, if any, until
    /// shutdown.
    async fn listen(self: Arc<Self>, feed: Arc<Feed>) {
        let mut messages = feed.messages();
        let mut shutdown = self.shutdown.clone();
        loop {
            let msg = tokio::select! {
                m = messages.recv() => m,
                _ = shutdown.changed() => break,
            };
            match msg {
                Ok(msg) => {
                    let Some(pushed) = Feed::parse(&msg) else {
                        continue;
                    };
                    let room = lock(&self.rooms).get(&pushed.drop).cloned();
                    if let Some(room) = room {
                        self.on_pushed(&room, pushed.tick);
                    }
                }
                // Messages lost to a full buffer: the rooms' catch-up finds their fans.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(lost = n, "admission feed lagged");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
        feed.quit().await;
    }

    /// An admission run from the feed (any instance's, this one's too): its fans connected here
    /// hear `admitted` now; the run's view waits for the room's next tick.
    fn on_pushed(&self, room: &Room, mut tick: Tick) {
        self.tell_admitted(room, &tick);
        tick.admitted.clear();
        let mut pushed = lock(&room.pushed);
        // Runs may arrive out of order (two instances ran near a lease's hand-over): the view
        // follows Redis' clock, never back.
        if pushed.as_ref().is_none_or(|(p, _)| p.now_ms <= tick.now_ms) {
            *pushed = Some((tick, Instant::now()));
        }
    }

    /// The drop's room, started if needed, marked as in use now.
    pub fn touch(self: &Arc<Self>, drop: &DropId) -> Result<Arc<Room>, Error> {
        let mut rooms = lock(&self.rooms);
        let room = match rooms.get(drop) {
            Some(r) => r.clone(),
            None => {
                if rooms.len() >= self.cfg.max_rooms {
                    return Err(Error::msg(
                        Code::Unavailable,
                        "This instance serves too many waiting rooms; retry shortly.",
                    )
                    .retry_after(Duration::from_secs(1)));
                }
                let room = Arc::new(Room {
                    drop: drop.clone(),
                    waiters: Mutex::new(Waiters::default()),
                    touched: Mutex::new(Instant::now()),
                    view: Mutex::new(None),
                    pushed: Mutex::new(None),
                });
                rooms.insert(drop.clone(), room.clone());
                tokio::spawn(self.clone().run(room.clone()));
                room
            }
        };
        *lock(&room.touched) = Instant::now();
        Ok(room)
    }

    /// Adds a socket of the fan at `place` to the drop's room; returns its id for
    /// [`Rooms::leave`]. Under the rooms lock, so a room's loop can't decide to stop between the
    /// lookup and the insert.
    pub fn enter(
        self: &Arc<Self>,
        drop: &DropId,
        fan: &FanId,
        place: i64,
        tx: mpsc::Sender<Frame>,
    ) -> Result<u64, Error> {
        let room = self.touch(drop)?;
        let rooms = lock(&self.rooms);
        // Its loop may have ended since `touch` (the drop failed to load): nobody would serve
        // the socket there.
        if !rooms.get(drop).is_some_and(|r| Arc::ptr_eq(r, &room)) {
            return Err(Error::msg(
                Code::Unavailable,
                "The waiting room is restarting; reconnect.",
            )
            .retry_after(Duration::from_secs(1)));
        }
        // Checked under the rooms lock, which close_all holds while it lets go of every
        // socket: a socket enters before it (and is let go) or sees the flag.
        if self.shutting_down() {
            return Err(Error::msg(
                Code::Unavailable,
                "This instance is shutting down; reconnect.",
            ));
        }
        let mut w = lock(&room.waiters);
        if w.by_fan
            .get(fan)
            .is_some_and(|c| c.len() >= self.cfg.max_sockets_per_fan)
        {
            return Err(Error::msg(
                Code::RateLimited,
                "This fan has too many pages open in this line; close one.",
            )
            .retry_after(Duration::from_secs(5)));
        }
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        w.by_conn.insert(
            conn,
            Waiter {
                fan: fan.clone(),
                place,
                tx,
            },
        );
        w.by_fan.entry(fan.clone()).or_default().push(conn);
        w.by_place.insert(place, fan.clone());
        metrics::gauge!(engine::metrics::QUEUE_WAITERS).increment(1.0);
        Ok(conn)
    }

    /// Whether the server is shutting down: a socket the room lets go of then closes with 1012
    /// ("reconnect") rather than a plain close.
    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// At shutdown, after the flag is set: lets go of every socket (each writes what it has
    /// queued and closes with 1012), and [`Rooms::enter`] refuses new ones.
    pub fn close_all(&self) {
        let rooms = lock(&self.rooms);
        for room in rooms.values() {
            lock(&room.waiters).let_go_all();
        }
    }

    pub fn leave(&self, drop: &DropId, conn: u64) {
        let room = lock(&self.rooms).get(drop).cloned();
        if let Some(room) = room {
            lock(&room.waiters).remove(conn);
            *lock(&room.touched) = Instant::now();
        }
    }

    /// The last tick's view of the drop, running the admission script now if this room hasn't
    /// ticked yet (it is safe to call any time).
    pub async fn view(self: &Arc<Self>, drop: &DropId) -> Result<View, Error> {
        let room = self.touch(drop)?;
        if let Some(v) = room.view() {
            return Ok(v);
        }
        let tick = self.queue.admit(drop).await?;
        let view = View::of(&tick, None);
        // The fans this call admitted hear it from the feed wherever their sockets are (or
        // from the catch-up, if it is lost).
        if let Err(e) = self.queue.publish(drop, &tick).await {
            tracing::debug!(%drop, error = %e, "publishing an admission run failed");
        }
        Ok(view)
    }

    /// The `admitted` message for a fan, with a fresh token and the session's ends; `offer`
    /// when the waiting list offered them a unit (the session is the offer's window).
    pub fn admitted_message(
        &self,
        drop: &DropId,
        fan: &FanId,
        place: i64,
        session: Option<SessionEnds>,
        offer: bool,
    ) -> Value {
        let (token, claims) = self.queue.admission_token(drop, fan, place, session);
        json!({
            "type": "admitted",
            "offer": offer,
            "admission_token": token,
            "expires_at": claims.exp,
            "shop_ends_at_ms": claims.shop_end_ms,
            "session_ends_at_ms": claims.hard_end_ms,
            "booking_url": format!(
                "{}/drops/{drop}?admission_token={token}",
                self.cfg.booking_public_url.trim_end_matches('/')
            ),
        })
    }

    /// The exact message for a fan's standing: `admitted`, `pre_queue` or `position`; None when
    /// the fan is neither waiting nor admitted.
    pub fn standing_message(
        &self,
        drop: &DropId,
        fan: &FanId,
        standing: &Standing,
        view: &View,
        opens_at_ms: i64,
    ) -> Option<Value> {
        let now = now_ms();
        if let (Some(deadline), Some(place)) = (standing.deadline_ms, standing.place) {
            if deadline >= now {
                return Some(self.admitted_message(
                    drop,
                    fan,
                    place,
                    standing.session,
                    standing.offered(),
                ));
            }
        }
        let ahead = standing.ahead?;
        if now < opens_at_ms {
            return Some(
                json!({"type": "pre_queue", "opens_at": opens_at_ms, "waiting": view.waiting}),
            );
        }
        if view.state == LineState::Waitlist {
            // No ETA: when units come back is up to refunds and the seller.
            let mut waitlisted = json!({
                "type": "waitlisted",
                "place": standing.place,
                "ahead": ahead,
                "came_back": view.came_back,
            });
            if let Some(place) = standing.place {
                waitlisted["receipt"] = json!(self.queue.receipt(drop, fan, place));
            }
            return Some(waitlisted);
        }
        let mut position = json!({
            "type": "position",
            "place": standing.place,
            "ahead": ahead,
            "admitted_total": standing.admitted_total,
            "eta_s": view.eta_s(ahead),
            "admit_rate_per_s": round2(view.rate_per_s()),
        });
        // A fresh receipt with each position: the page keeps the last, and brings it back if
        // Redis loses the line (its issue time says the fan was still here).
        if let Some(place) = standing.place {
            position["receipt"] = json!(self.queue.receipt(drop, fan, place));
        }
        Some(position)
    }

    async fn run(self: Arc<Self>, room: Arc<Room>) {
        let drop = room.drop.clone();
        let opens_at_ms = match self.queue.engine.drop_def(&drop).await {
            Ok(def) => def.opens_at_ms(),
            Err(e) => {
                tracing::warn!(%drop, error = %e, "waiting room can't start");
                let mut rooms = lock(&self.rooms);
                if rooms.get(&drop).is_some_and(|r| Arc::ptr_eq(r, &room)) {
                    rooms.remove(&drop);
                }
                // Sockets that entered meanwhile have no loop to serve them: let them go (they
                // close, and the page reconnects into a new room). Under the rooms lock, which
                // `enter` holds while it checks that its room is still the drop's.
                lock(&room.waiters).let_go_all();
                return;
            }
        };
        let mut shutdown = self.shutdown.clone();
        let mut tick = tokio::time::interval(ms(self.cfg.tick_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let position_every = ms(self.cfg.position_interval_ms.max(self.cfg.tick_ms));
        let mut last_positions = Instant::now();
        let mut rate = AdmissionRate::new(ms(self.cfg.admit_rate_window_ms.max(1_000)));
        let mut last_state: Option<LineState> = None;
        let mut last_presence = Instant::now();
        let broadcast_every = ms(self.cfg.broadcast_interval_ms.max(self.cfg.tick_ms));
        let mut last_broadcast = Instant::now()
            .checked_sub(broadcast_every)
            .unwrap_or_else(Instant::now);
        let positions_running = Arc::new(AtomicBool::new(false));
        let presence_running = Arc::new(AtomicBool::new(false));
        // The line's marks as last kept in Postgres (by this loop), and its writer's turn.
        let kept_marks = Arc::new(Mutex::new(LineMarks::default()));
        let marks_running = Arc::new(AtomicBool::new(false));
        let marks_every = ms(self.cfg.line_marks_interval_ms);
        let mut last_marks = Instant::now()
            .checked_sub(marks_every)
            .unwrap_or_else(Instant::now);
        // The slow cadences (exact positions, presence) wait while a tick frame is on its way to
        // the sockets: they share its CPU, and a round's writes landing among the tick's delay
        // its last socket. `delivering` is when the oldest broadcast not yet written everywhere
        // went out, until every socket has taken it (or half a broadcast interval, so one stuck
        // client can't stall them). Neither waits more than a broadcast interval, whatever the
        // broadcasts do: state changes (each broadcast at once) could otherwise follow each
        // other closely enough to keep `delivering` set for good.
        let mut delivering: Option<Instant> = None;
        let slices = SliceGrants::new();
        let mut last_grant = Instant::now();
        // The admission feed (see the module doc): whether this room is subscribed to the drop's
        // channel, when it last asked to be, and whether an ask is in flight.
        let lease = ms(self.cfg.admission_lease_ms);
        let subscribed = Arc::new(AtomicBool::new(false));
        let mut last_subscribe: Option<Instant> = None;
        let subscribing = Arc::new(AtomicBool::new(false));
        // The catch-up's watermarks: the one seen last tick (this tick's is due next tick), and
        // the last one caught up to.
        let mut watermark_seen: Option<(i64, i64)> = None;
        let mut caught_up: Option<(i64, i64)> = None;
        let catch_up_running = Arc::new(AtomicBool::new(false));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            {
                let mut rooms = lock(&self.rooms);
                let idle = lock(&room.waiters).by_conn.is_empty()
                    && lock(&room.touched).elapsed() >= ms(self.cfg.room_idle_keep_ms);
                if idle {
                    rooms.remove(&drop);
                    break;
                }
            }
            self.queue.count_room_tick();
            if let Some(feed) = &self.feed {
                // Subscribed again whenever nothing came for a lease's length: a reconnect or a
                // slot's move may have lost the subscription (SSUBSCRIBE twice is harmless).
                // Beside the loop: a subscriber connection that is down makes the ask wait for
                // `redis.command_timeout_ms`, which must not hold up the ticks.
                let heard = lock(&room.pushed).as_ref().map(|(_, at)| *at);
                let quiet = heard.is_none_or(|at| at.elapsed() >= lease);
                let due = last_subscribe.is_none_or(|at| {
                    at.elapsed() >= lease && (quiet || !subscribed.load(Ordering::Acquire))
                });
                if due {
                    if let Some(busy) = Busy::claim(&subscribing) {
                        last_subscribe = Some(Instant::now());
                        let (feed, drop, subscribed) =
                            (feed.clone(), drop.clone(), subscribed.clone());
                        tokio::spawn(async move {
                            let _busy = busy;
                            match feed.subscribe(&drop).await {
                                Ok(()) => subscribed.store(true, Ordering::Release),
                                Err(e) => tracing::warn!(
                                    %drop, error = %e, "admission feed subscribe failed"
                                ),
                            }
                        });
                    }
                }
            }
            if delivering.is_some_and(|since| {
                since.elapsed() >= broadcast_every / 2 || lock(&room.waiters).drained()
            }) {
                delivering = None;
            }
            // Presence first, and whether or not this instance's admission runs succeed: other
            // instances' runs would otherwise send this one's connected fans away.
            if let Some(v) = room.view() {
                // At least three times per grace, so a connected fan never looks gone.
                let every = ms(self.cfg.presence_interval_ms)
                    .min(ms(u64::try_from(v.leave_grace_ms / 3).unwrap_or(0)))
                    .max(ms(self.cfg.tick_ms));
                let since = last_presence.elapsed();
                if since >= every && (delivering.is_none() || since >= every + broadcast_every) {
                    if let Some(busy) = Busy::claim(&presence_running) {
                        last_presence = Instant::now();
                        let fans: Vec<FanId> = lock(&room.waiters).by_fan.keys().cloned().collect();
                        let (queue, drop, now) =
                            (self.queue.clone(), drop.clone(), v.redis_now_ms());
                        tokio::spawn(async move {
                            let _busy = busy;
                            if let Err(e) = queue.touch_presence(&drop, &fans, now).await {
                                tracing::warn!(%drop, error = %e, "presence refresh failed");
                            }
                        });
                    }
                }
            }
            let started = Instant::now();
            // One instance runs the drop's admissions (its lease); the others take each run from
            // the feed. One that has heard nothing for a lease's length (the holder died and its
            // lease hasn't lapsed yet, or the feed is down) runs the script itself meanwhile: it
            // is safe from any number of instances, only dearer.
            let holder = self.feed.is_none() || self.queue.holds(&self.leases, &drop).await;
            let pushed = if holder {
                None
            } else {
                lock(&room.pushed)
                    .clone()
                    .filter(|(_, at)| at.elapsed() < lease)
            };
            let ran = pushed.is_none();
            let outcome = match pushed {
                Some((t, at)) => Ok((t, at)),
                None => self.queue.admit(&drop).await.map(|t| (t, Instant::now())),
            };
            let (t, read_at) = match outcome {
                Ok(got) => got,
                Err(e) => {
                    tracing::warn!(%drop, error = %e, "admission tick failed");
                    // Redis out of reach: the line can't move, but its sockets hear so on the
                    // usual cadence. Silence would look like a dead socket, and every page drops
                    // one after 15 s without a frame: all at once, into the outage.
                    if last_broadcast.elapsed() + ms(self.cfg.tick_ms) / 2 >= broadcast_every {
                        if let Some(v) = room.view() {
                            last_broadcast = Instant::now();
                            let stalled = tick_frame(&v, "unavailable", 0.0, v.redis_now_ms());
                            lock(&room.waiters).broadcast(&[&stalled]);
                        }
                    }
                    // The line's state goes out again with the first run that succeeds.
                    last_state = None;
                    continue;
                }
            };
            if ran {
                // Every instance hears the run, this one too (its fans here are told below
                // already; the feed then finds them gone).
                if let Err(e) = self.queue.publish(&drop, &t).await {
                    tracing::debug!(%drop, error = %e, "publishing an admission run failed");
                }
            }
            // The marks a Redis loss can't take (docs/ARCHITECTURE.md, "The line after Redis
            // loss"): kept when they moved, at most every `line_marks_interval_ms`, one write at
            // a time; a failed write is tried again next interval. By the instance that runs the
            // line.
            let marks = LineMarks {
                seq: t.seq,
                place: t.watermark,
                admitted: t.admitted_total,
            };
            if ran && marks != *lock(&kept_marks) && last_marks.elapsed() >= marks_every {
                if let Some(busy) = Busy::claim(&marks_running) {
                    last_marks = Instant::now();
                    let (queue, drop, kept) =
                        (self.queue.clone(), drop.clone(), kept_marks.clone());
                    tokio::spawn(async move {
                        let _busy = busy;
                        match queue.keep_line_marks(&drop, marks).await {
                            Ok(()) => *lock(&kept) = marks,
                            Err(e) => {
                                tracing::warn!(%drop, error = %e, "keeping the line's marks failed")
                            }
                        }
                    });
                }
            }
            let measured = rate.observe(Instant::now(), t.admitted_total);
            let mut view = View::of(&t, measured);
            // Redis' clock at the run, as of when this process had the run's answer.
            view.read_at = read_at;
            *lock(&room.view) = Some(view.clone());
            self.tell_admitted(&room, &t);
            // The catch-up, one tick behind the watermark: a run's push gets a tick to arrive
            // before its fans are looked up one by one. An instance that took the run from the
            // feed reads the watermark itself (O(1)): the push it came in may be an old one.
            let mark = if ran {
                Some((t.watermark, t.admitted_total))
            } else {
                match self.queue.watermark(&drop).await {
                    Ok(mark) => Some(mark),
                    Err(e) => {
                        tracing::debug!(%drop, error = %e, "reading the watermark failed");
                        None
                    }
                }
            };
            if let Some(mark) = mark {
                let due = watermark_seen.replace(mark);
                if let Some(due) = due.filter(|d| Some(*d) != caught_up) {
                    if let Some(busy) = Busy::claim(&catch_up_running) {
                        caught_up = Some(due);
                        let (rooms, room) = (self.clone(), room.clone());
                        tokio::spawn(async move {
                            let _busy = busy;
                            rooms.catch_up(&room, due.0).await;
                        });
                    }
                }
            }
            // Redis lost the drop (it is unknown there, though the room started from Postgres)
            // or is rebuilding it: its line may be gone. Every socket here is told `recovering`
            // and let go; the pages reconnect and rejoin with their receipts and admission
            // tokens, which bring their places and sessions back (lua/join.lua).
            let lost = |s: Option<LineState>| {
                matches!(s, Some(LineState::Recovering | LineState::UnknownDrop))
            };
            if lost(Some(view.state)) && !lost(last_state) {
                let msg = frame(&json!({
                    "type": "error",
                    "code": "recovering",
                    "message": "The line is being restored: reconnect in a few seconds; your place is kept.",
                }));
                let mut w = lock(&room.waiters);
                w.broadcast(&[&msg]);
                w.let_go_all();
            }

            let state_changed = last_state != Some(view.state);
            last_state = Some(view.state);
            let state_frame = state_changed
                .then(|| view.state_message())
                .flatten()
                .map(|v| frame(&v));
            // The shared frame on its own, slower cadence; a change of state goes out at once.
            // Half a run early counts as on time: runs come every `tick_ms`, a little under it
            // after a slow one, and waiting for the next would space frames a run too far.
            let broadcast = state_changed
                || last_broadcast.elapsed() + ms(self.cfg.tick_ms) / 2 >= broadcast_every;
            if broadcast {
                last_broadcast = Instant::now();
                let shared = tick_frame(
                    &view,
                    view.state.as_str(),
                    round2(view.rate_per_s()),
                    t.now_ms,
                );
                let mut w = lock(&room.waiters);
                match &state_frame {
                    Some(f) => w.broadcast(&[&shared, f]),
                    None => w.broadcast(&[&shared]),
                }
                if delivering.is_none() {
                    delivering = Some(last_broadcast);
                }
            }
            metrics::histogram!(engine::metrics::QUEUE_TICK_SECONDS)
                .record(started.elapsed().as_secs_f64());
            // The slow cadence runs beside the ticks (one round at a time), so a long round over
            // many waiters never delays the next tick; its slices go one per run between ticks.
            if last_positions.elapsed() >= position_every {
                if let Some(busy) = Busy::claim(&positions_running) {
                    last_positions = Instant::now();
                    last_grant = last_positions;
                    let (rooms, room, slices) = (self.clone(), room.clone(), slices.0.clone());
                    tokio::spawn(async move {
                        let _busy = busy;
                        rooms
                            .send_positions(&room, &view, opens_at_ms, &slices)
                            .await;
                    });
                }
            }
            if positions_running.load(Ordering::Acquire)
                && (delivering.is_none() || last_grant.elapsed() >= broadcast_every)
            {
                slices.grant();
                last_grant = Instant::now();
            }
        }
        // Another instance takes the drop's admissions over at once, not a lease later.
        self.queue.release(&self.leases, &drop).await;
        if let (Some(feed), true) = (&self.feed, subscribed.load(Ordering::Acquire)) {
            let still_here = lock(&self.rooms).contains_key(&drop);
            if !still_here {
                if let Err(e) = feed.unsubscribe(&drop).await {
                    tracing::debug!(%drop, error = %e, "admission feed unsubscribe failed");
                }
            }
        }
    }

    /// The catch-up (see the module doc): every fan connected here at or below `watermark`
    /// that the feed hasn't told (a lost push, or a fan who entered the room just after the run
    /// that admitted them) is looked up and, if admitted, told. At most `position_slice` fans a
    /// round, `position_concurrency` lookups at a time; normally there are none.
    async fn catch_up(&self, room: &Room, watermark: i64) {
        let fans: Vec<(i64, FanId)> = lock(&room.waiters)
            .by_place
            .range(..=watermark)
            .take(self.cfg.position_slice.max(1))
            .map(|(p, f)| (*p, f.clone()))
            .collect();
        let drop = &room.drop;
        let mut standings = futures::stream::iter(fans)
            .map(|(place, fan)| async move {
                let s = self.queue.standing(drop, &fan).await;
                (place, fan, s)
            })
            .buffer_unordered(self.cfg.position_concurrency.max(1));
        while let Some((joined_at, fan, standing)) = standings.next().await {
            let Ok(s) = standing else { continue };
            match (s.deadline_ms, s.place) {
                (Some(deadline), Some(place)) if deadline >= now_ms() => {
                    let msg =
                        frame(&self.admitted_message(drop, &fan, place, s.session, s.offered()));
                    let mut w = lock(&room.waiters);
                    if w.by_fan.contains_key(&fan) {
                        w.send_fan(&fan, &msg);
                        metrics::counter!(engine::metrics::QUEUE_CATCH_UPS).increment(1);
                        for conn in w.by_fan.get(&fan).cloned().unwrap_or_default() {
                            w.remove(conn);
                        }
                    }
                }
                // Neither waiting nor admitted now (left, sent away, or the session is over):
                // nothing to tell here; the position round says what there is.
                _ if s.ahead.is_none() => {
                    let mut w = lock(&room.waiters);
                    if w.by_place.get(&joined_at) == Some(&fan) {
                        w.by_place.remove(&joined_at);
                    }
                }
                // Still in line below the watermark (a place given back after Redis lost the
                // line): looked at again when admissions move.
                _ => {}
            }
        }
    }

    /// Tells the fans this tick admitted that are connected here; they leave the room.
    fn tell_admitted(&self, room: &Room, t: &Tick) {
        if t.admitted.is_empty() {
            return;
        }
        let mut w = lock(&room.waiters);
        for (fan, place) in &t.admitted {
            if !w.by_fan.contains_key(fan) {
                continue;
            }
            let msg = frame(&self.admitted_message(&room.drop, fan, *place, t.session, t.offers()));
            w.send_fan(fan, &msg);
            for conn in w.by_fan.get(fan).cloned().unwrap_or_default() {
                w.remove(conn);
            }
        }
    }

    /// The slow cadence: an exact standing per fan connected here (bounded concurrency).
    /// A round goes out in slices of `position_slice` fans, each waiting for the room's loop to
    /// grant it (one per admission run, between tick frames), not in one burst: a burst to every
    /// socket lands on the same CPU as the shared tick and delays it.
    async fn send_positions(&self, room: &Room, view: &View, opens_at_ms: i64, slices: &Semaphore) {
        let fans: Vec<FanId> = lock(&room.waiters).by_fan.keys().cloned().collect();
        // A grant left from the last round's end isn't for now: this round starts right behind a
        // broadcast, and its first slice waits for the next grant like the others.
        if let Ok(stale) = slices.try_acquire() {
            stale.forget();
        }
        for fans in fans.chunks(self.cfg.position_slice.max(1)) {
            // Closed: the room's loop ended.
            let Ok(grant) = slices.acquire().await else {
                return;
            };
            grant.forget();
            self.send_positions_to(room, fans, view, opens_at_ms).await;
        }
    }

    async fn send_positions_to(&self, room: &Room, fans: &[FanId], view: &View, opens_at_ms: i64) {
        let drop = &room.drop;
        let mut standings = futures::stream::iter(fans.iter().cloned())
            .map(|fan| async move {
                let s = self.queue.standing(drop, &fan).await;
                (fan, s)
            })
            .buffer_unordered(self.cfg.position_concurrency.max(1));
        while let Some((fan, standing)) = standings.next().await {
            let Ok(standing) = standing else { continue };
            let msg = match self.standing_message(drop, &fan, &standing, view, opens_at_ms) {
                Some(msg) => Some(msg),
                // Admitted before and the session is over: nothing more to wait for.
                None if standing.place.is_some() => Some(json!({"type": "done"})),
                // No place: sent away as gone (its presence went unrefreshed past the grace,
                // e.g. while Redis was unreachable). Closing the socket makes the page
                // reconnect, and its join takes a new place.
                None => None,
            };
            let ends = msg.as_ref().is_none_or(|m| {
                m["type"] != "position" && m["type"] != "pre_queue" && m["type"] != "waitlisted"
            });
            let mut w = lock(&room.waiters);
            if let Some(msg) = msg {
                w.send_fan(&fan, &frame(&msg));
            }
            if ends {
                for conn in w.by_fan.get(&fan).cloned().unwrap_or_default() {
                    w.remove(conn);
                }
            }
        }
    }
}

/// Permission for a position round's next slice, granted by the room's loop (at most one
/// outstanding); closed when the loop ends, which ends a round waiting for one.
struct SliceGrants(Arc<Semaphore>);

impl SliceGrants {
    fn new() -> SliceGrants {
        SliceGrants(Arc::new(Semaphore::new(0)))
    }

    fn grant(&self) {
        if self.0.available_permits() == 0 {
            self.0.add_permits(1);
        }
    }
}

impl Drop for SliceGrants {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A background round (presence, positions) in flight. Cleared when its task ends however it
/// ends, a panic included, so one bad round can't stop a room's cadence for good.
struct Busy(Arc<AtomicBool>);

impl Busy {
    fn claim(flag: &Arc<AtomicBool>) -> Option<Busy> {
        (!flag.swap(true, Ordering::AcqRel)).then(|| Busy(flag.clone()))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The one `tick` frame every waiter of a room shares: the line as `view` last saw it, in `state`,
/// moving at `admit_rate_per_s`, by Redis' clock at `at_ms`.
fn tick_frame(view: &View, state: &str, admit_rate_per_s: f64, at_ms: i64) -> Frame {
    frame(&json!({
        "type": "tick",
        "state": state,
        "watermark": view.watermark,
        "admitted_total": view.admitted_total,
        "waiting": view.waiting,
        "admit_rate_per_s": admit_rate_per_s,
        "configured_rate_per_s": view.configured_rate_per_s,
        "at_ms": at_ms,
    }))
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admission_rate_never_goes_negative_when_the_count_is_restored_lower() {
        let mut rate = AdmissionRate::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s * 500);
        assert_eq!(
            rate.observe(at(0), 30),
            None,
            "less than a second of samples"
        );
        rate.observe(at(1), 35);
        assert_eq!(rate.observe(at(2), 40), Some(10.0));
        // Redis lost the line; it came back from Postgres' mark at 15 admissions, behind the
        // 30 the window starts at (measured across the two: -10 a second).
        assert_eq!(rate.observe(at(3), 15), None, "a new count: no rate yet");
        rate.observe(at(4), 15);
        assert_eq!(rate.observe(at(5), 25), Some(10.0));
    }
}
