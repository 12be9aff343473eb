//! Seat maps at scale. Every booking page polls its drop's map every 5 s: 2,000 pages on a
//! 50,000-seat drop would be 400 whole-map reads a second, each as long as the hash. A process
//! serves every request for one drop from one snapshot, read again at most every
//! `seats.map_refresh_ms` and then once however many requests wait for it (the reader walks the
//! hash in HSCAN steps, so no one command holds Redis long). A snapshot's `version` is its
//! `ETag`: a page whose map hasn't changed gets 304 and no body.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::fill::FillGate;

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
            map: SharedSeatMap(self.seat_map(drop).await?),
            server_now_ms: now_ms(),
        })
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
