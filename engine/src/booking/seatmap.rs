//! Seat maps at scale. Every booking page polls its drop's map every 5 s: 2,000 pages on a
//! 50,000-seat drop would be 400 whole-map reads a second, each as long as the hash. A process
//! serves every request for one drop from one snapshot, read again at most every
//! `seats.map_refresh_ms` and then once however many requests wait for it. Redis keeps the map
//! as the pages see it, a string with a byte per seat that every script writing a seat also
//! writes (lua/lib.lua `show_seat`), so a read is a few `GETRANGE`s (one for 64 KiB of seats); a
//! drop loaded before that string existed is read from the seats hash in `HSCAN` steps, each
//! step's seats placed as it arrives. The snapshot is serialised once, and a request only
//! appends the server's clock. A snapshot's `version` is its `ETag`: a page whose map hasn't
//! changed gets 304 and no body.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::*;
use crate::fill::FillGate;

/// A seated drop's seat map as one request answers it (`GET /v1/drops/{id}/seats`): the
/// process's shared snapshot and the server's clock.
#[derive(Debug, Clone)]
pub struct SeatsView {
    map: Arc<SeatMap>,
    pub server_now_ms: i64,
}

impl SeatsView {
    /// Changes whenever a seat's state does (the same map has the same version in every
    /// process of one release); also the `ETag`.
    pub fn version(&self) -> &str {
        &self.map.version
    }

    /// The answer's JSON: the snapshot's, serialised once, and this request's clock.
    pub fn json(&self) -> String {
        let mut body = String::with_capacity(self.map.json_head.len() + 40);
        body.push_str(&self.map.json_head);
        body.push_str(&format!(",\"server_now_ms\":{}}}", self.server_now_ms));
        body
    }
}

/// One snapshot of a drop's seat map, compact: per row one string with a character per seat,
/// seat 1 first (`f` free, `h` held, `s` sold); seat `n` of row `R` in section `S` is the seat
/// id `S-R-n`. A 50,000-seat map is about 50 KB instead of 4 MB of one object per seat.
#[derive(Debug)]
struct SeatMap {
    version: String,
    /// `{"drop_id":…,"version":…,"sections":[…]` — the answer without its closing brace, so a
    /// request adds its `server_now_ms` without serialising the map again.
    json_head: String,
}

#[derive(Serialize)]
struct MapJson<'a> {
    drop_id: &'a DropId,
    version: &'a str,
    sections: Vec<SectionJson<'a>>,
}

#[derive(Serialize)]
struct SectionJson<'a> {
    section: &'a str,
    /// Front first.
    rows: Vec<RowJson<'a>>,
}

#[derive(Serialize)]
struct RowJson<'a> {
    row: &'a str,
    states: &'a str,
}

/// A seat's state on the wire from its value in Redis (`-`, `#`, a hold id).
fn seat_char(state: &str) -> u8 {
    match state {
        "-" => b'f',
        "#" => b's',
        _ => b'h',
    }
}

/// A drop's seats laid out as its map shows them: section by section, rows front first, one
/// byte per seat. Where a seat goes is found from its id (`S-R-n`) through a table of rows, so
/// placing one costs a lookup and building the table costs one entry per row, not per seat.
struct SeatLayout<'a> {
    def: &'a DropDef,
    /// Section → row label → (position of its seat 1, seats).
    rows: HashMap<&'a str, HashMap<&'a str, (usize, u32)>>,
    states: Vec<u8>,
}

impl<'a> SeatLayout<'a> {
    /// Every seat in `state` until told otherwise.
    fn new(def: &'a DropDef, state: u8) -> SeatLayout<'a> {
        let mut rows: HashMap<&str, HashMap<&str, (usize, u32)>> = HashMap::new();
        let mut next = 0usize;
        for b in &def.buckets {
            let section = rows.entry(b.id.as_str()).or_default();
            for (row, seats) in &b.rows {
                section.insert(row.as_str(), (next, *seats));
                next += *seats as usize;
            }
        }
        SeatLayout {
            def,
            rows,
            states: vec![state; next],
        }
    }

    /// Sets one seat's state; an id the drop doesn't have is ignored (the hash holds only the
    /// drop's own seats, which its creation wrote).
    fn set(&mut self, seat: &str, state: u8) {
        let mut parts = seat.split('-');
        let (Some(section), Some(row), Some(number), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let Some(&(first, seats)) = self.rows.get(section).and_then(|r| r.get(row)) else {
            return;
        };
        match number.parse::<u32>() {
            Ok(n) if (1..=seats).contains(&n) => self.states[first + n as usize - 1] = state,
            _ => {}
        }
    }

    /// The seats as lua/lib.lua's seat map string shows them, in the same order: a byte the
    /// scripts never wrote (a gap SETRANGE padded) shows as held.
    fn show(&mut self, shown: &[u8]) {
        for (state, &byte) in self.states.iter_mut().zip(shown) {
            *state = match byte {
                b'f' | b'h' | b's' => byte,
                _ => b'h',
            };
        }
    }

    /// The map, versioned and serialised.
    fn into_map(self, drop: &DropId) -> Result<SeatMap> {
        // Sections, rows and their lengths are fixed by the drop, so the states alone tell two
        // maps of one drop apart.
        let version = crate::tokens::sha256_hex(&self.states)[..16].to_owned();
        let mut next = 0usize;
        let mut row_states = |seats: u32| {
            let states = self
                .states
                .get(next..next + seats as usize)
                .unwrap_or_default();
            next += seats as usize;
            // Every byte is one of seat_char's ASCII letters.
            std::str::from_utf8(states).unwrap_or_default()
        };
        let sections = self
            .def
            .buckets
            .iter()
            .map(|b| SectionJson {
                section: &b.id,
                rows: b
                    .rows
                    .iter()
                    .map(|(row, seats)| RowJson {
                        row,
                        states: row_states(*seats),
                    })
                    .collect(),
            })
            .collect();
        let json = serde_json::to_string(&MapJson {
            drop_id: drop,
            version: &version,
            sections,
        })
        .map_err(|e| Error::internal(format!("serialising a seat map: {e}")))?;
        let json_head = json
            .strip_suffix('}')
            .ok_or_else(|| Error::internal("a seat map serialised without its closing brace"))?
            .to_owned();
        Ok(SeatMap { version, json_head })
    }
}

/// One snapshot: the map, and when its read started (what it can be older than).
struct Snapshot {
    map: Arc<SeatMap>,
    read_from: Instant,
}

/// The process's seat map snapshots, at most `seats.map_cache_drops` of them.
#[derive(Default)]
pub(super) struct SeatMaps {
    snapshots: Mutex<HashMap<DropId, Snapshot>>,
    fills: FillGate<DropId>,
    /// Whole-map reads (tests count them).
    reads: AtomicU64,
}

impl SeatMaps {
    /// The drop's snapshot if `usable` says it may serve.
    fn get(&self, drop: &DropId, usable: impl Fn(&Snapshot) -> bool) -> Option<Arc<SeatMap>> {
        lock(&self.snapshots)
            .get(drop)
            .filter(|s| usable(s))
            .map(|s| s.map.clone())
    }

    fn keep(&self, drop: &DropId, snapshot: Snapshot, max_drops: usize) {
        let mut all = lock(&self.snapshots);
        // Full, it forgets the snapshot read longest ago (one read to get it back), never all.
        if all.len() >= max_drops && !all.contains_key(drop) {
            let oldest = all
                .iter()
                .min_by_key(|(_, s)| s.read_from)
                .map(|(d, _)| d.clone());
            if let Some(oldest) = oldest {
                all.remove(&oldest);
            }
        }
        all.insert(drop.clone(), snapshot);
    }

    #[cfg(feature = "testing")]
    pub(super) fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
}

impl Engine {
    /// A seated drop's seat map (`GET /v1/drops/{id}/seats`), from this process's snapshot: at
    /// most `seats.map_refresh_ms` old, or read now, once for every request waiting for it.
    pub async fn seats_view(&self, drop: &DropId) -> Result<SeatsView> {
        Ok(SeatsView {
            map: self.seat_map(drop).await?,
            server_now_ms: now_ms(),
        })
    }

    /// Reads a drop's seat map whole (Redis, or Postgres once archived); requests get it
    /// through the process's snapshot ([`Engine::seats_view`]).
    async fn read_seat_map(&self, drop: &DropId) -> Result<SeatMap> {
        let def = self.drop_def(drop).await?;
        if def.kind != Kind::Seated {
            return Err(Error::invalid("this drop has no seats"));
        }
        let layout = match self.live_status(drop).await? {
            Some(_) => {
                // A seat the scripts haven't shown shows as held: it can't be reserved either.
                let mut layout = SeatLayout::new(&def, b'h');
                match self
                    .redis
                    .seat_map_string(drop, layout.states.len())
                    .await?
                {
                    Some(shown) => layout.show(&shown),
                    None => {
                        self.redis
                            .visit_seat_states(drop, |seat, state| {
                                layout.set(seat, seat_char(state))
                            })
                            .await?
                    }
                }
                layout
            }
            // Archived: Postgres' sold seats, the rest free (nothing is held any more).
            None => {
                let mut layout = SeatLayout::new(&def, b'f');
                for seat in self.db.sold_seats(drop).await? {
                    layout.set(&seat, b's');
                }
                layout
            }
        };
        layout.into_map(drop)
    }

    async fn seat_map(&self, drop: &DropId) -> Result<Arc<SeatMap>> {
        let maps = &self.seat_maps;
        let refresh = Duration::from_millis(self.cfg.seats.map_refresh_ms);
        if let Some(map) = maps.get(drop, |s| s.read_from.elapsed() < refresh) {
            return Ok(map);
        }
        let asked = Instant::now();
        let filling = maps.fills.enter(drop).await;
        // A read that started after this request arrived shows everything done before it,
        // whatever the refresh interval (so 0 still shares one read among a crowd).
        if let Some(map) = maps.get(drop, |s| {
            s.read_from >= asked || s.read_from.elapsed() < refresh
        }) {
            return Ok(map);
        }
        if filling.failed_while_waiting() {
            return Err(Error::unavailable(
                "Redis",
                "a concurrent read of the seat map failed",
            ));
        }
        let read_from = Instant::now();
        maps.reads.fetch_add(1, Ordering::Relaxed);
        let map = match self.read_seat_map(drop).await {
            Ok(map) => Arc::new(map),
            Err(e) => {
                // Only a store failing is shared with the waiters; an unknown drop or one in
                // recovery is cheap for each of them to find out again.
                if matches!(e.code, Code::Unavailable | Code::Internal) {
                    filling.failed();
                }
                return Err(e);
            }
        };
        maps.keep(
            drop,
            Snapshot {
                map: map.clone(),
                read_from,
            },
            self.cfg.seats.map_cache_drops,
        );
        Ok(map)
    }
}
