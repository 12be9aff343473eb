//! One cache fill per key at a time. At 10:00:00 thousands of fans reach a cold process at once;
//! without this every one of them would miss the cache and query Postgres for the same drop,
//! queueing on the pool until requests time out. With it, the first caller loads and the others
//! wait for it, then read the cache. If that load fails (Postgres down), the ones that waited for
//! it fail at once too, rather than each trying again in turn, one pool timeout after another.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
struct Gate {
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Fills of this key that failed; a waiter compares it before and after its wait.
    failures: AtomicU64,
}

pub struct FillGate<K> {
    gates: Mutex<HashMap<K, Arc<Gate>>>,
}

impl<K: Hash + Eq + Clone> Default for FillGate<K> {
    fn default() -> Self {
        FillGate {
            gates: Mutex::new(HashMap::new()),
        }
    }
}

/// Held while filling one key; dropping it lets the next caller for that key in.
pub struct Filling<'a, K: Hash + Eq + Clone> {
    owner: &'a FillGate<K>,
    key: K,
    gate: Arc<Gate>,
    failed_while_waiting: bool,
    turn: Option<OwnedMutexGuard<()>>,
}

impl<K: Hash + Eq + Clone> FillGate<K> {
    /// Waits until no other caller is filling `key`. The caller then checks the cache again
    /// (the one before it has probably filled it); if it still misses and
    /// [`Filling::failed_while_waiting`], it gives up with a retryable error; else it fills,
    /// calling [`Filling::failed`] if that fails.
    pub async fn enter(&self, key: &K) -> Filling<'_, K> {
        let gate = self
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let before = gate.failures.load(Ordering::Acquire);
        let turn = gate.turn.clone().lock_owned().await;
        Filling {
            owner: self,
            key: key.clone(),
            failed_while_waiting: gate.failures.load(Ordering::Acquire) != before,
            gate,
            turn: Some(turn),
        }
    }
}

impl<K: Hash + Eq + Clone> Filling<'_, K> {
    /// A fill of this key failed while this caller waited for its turn.
    pub fn failed_while_waiting(&self) -> bool {
        self.failed_while_waiting
    }

    /// This caller's fill failed: those waiting now give up instead of trying again.
    pub fn failed(&self) {
        self.gate.failures.fetch_add(1, Ordering::AcqRel);
    }
}

impl<K: Hash + Eq + Clone> Drop for Filling<'_, K> {
    fn drop(&mut self) {
        drop(self.turn.take());
        // The last one out removes the key's gate, so the map holds only keys being filled now
        // (the map's reference and this one: nobody else holds or waits on it).
        let mut gates = self.owner.gates.lock().unwrap_or_else(|p| p.into_inner());
        if gates
            .get(&self.key)
            .is_some_and(|g| Arc::ptr_eq(g, &self.gate) && Arc::strong_count(g) == 2)
        {
            gates.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_callers_one_fill_and_no_gates_left() {
        let gate = Arc::new(FillGate::<u32>::default());
        let cache = Arc::new(Mutex::new(None::<u32>));
        let fills = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (gate, cache, fills) = (gate.clone(), cache.clone(), fills.clone());
            tasks.push(tokio::spawn(async move {
                let _filling = gate.enter(&7).await;
                if cache.lock().unwrap().is_none() {
                    fills.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    *cache.lock().unwrap() = Some(42);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(fills.load(Ordering::SeqCst), 1);
        assert!(gate.gates.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failed_fill_fails_its_waiters_and_not_later_callers() {
        let gate = Arc::new(FillGate::<u32>::default());
        let attempts = Arc::new(AtomicUsize::new(0));
        let first = gate.enter(&1).await;
        let mut waiters = Vec::new();
        for _ in 0..20 {
            let (gate, attempts) = (gate.clone(), attempts.clone());
            waiters.push(tokio::spawn(async move {
                let filling = gate.enter(&1).await;
                if filling.failed_while_waiting() {
                    return false;
                }
                attempts.fetch_add(1, Ordering::SeqCst);
                true
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        first.failed();
        drop(first);
        for w in waiters {
            assert!(
                !w.await.unwrap(),
                "a waiter tried again after the fill failed"
            );
        }
        assert_eq!(attempts.load(Ordering::SeqCst), 0);
        // Someone arriving after the failure gets to try.
        assert!(!gate.enter(&1).await.failed_while_waiting());
        assert!(gate.gates.lock().unwrap().is_empty());
    }
}
