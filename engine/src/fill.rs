//! One cache fill per key at a time. At 10:00:00 thousands of fans reach a cold process at once;
//! without this every one of them would miss the cache and query Postgres for the same drop,
//! queueing on the pool until requests time out. With it, the first caller loads and the others
//! wait for it, then read the cache.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

pub struct FillGate<K> {
    gates: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
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
    gate: &'a FillGate<K>,
    key: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Hash + Eq + Clone> FillGate<K> {
    /// Waits until no other caller is filling `key`. The caller then checks the cache again
    /// (the one before it has probably filled it) and fills it only if it still misses.
    pub async fn enter(&self, key: &K) -> Filling<'_, K> {
        let gate = self
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        Filling {
            gate: self,
            key: key.clone(),
            guard: Some(gate.lock_owned().await),
        }
    }
}

impl<K: Hash + Eq + Clone> Drop for Filling<'_, K> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // The last one out removes the key's gate, so the map holds only keys being filled now.
        let mut gates = self.gate.gates.lock().unwrap_or_else(|p| p.into_inner());
        if gates
            .get(&self.key)
            .is_some_and(|g| Arc::strong_count(g) == 1)
        {
            gates.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
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
}
