//! The brute-force throttle, counted in the state store.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::session::Store;

/// Slows password and code guessing: after `LIMIT` failures within `WINDOW`
/// for one identifier, or `IP_LIMIT` from one address, further attempts are
/// refused unchecked until `WINDOW` has passed since the last failure.
/// Failures are counted in the state store, so every replica on it counts
/// against the same limits and a restart forgives nobody. Checks in
/// progress count as failures until they are done (in this process), so
/// guesses sent side by side are held to the same limit as guesses sent in
/// turn.
pub struct Throttle {
    pub(crate) store: Arc<Store>,
    in_flight: Mutex<HashMap<String, u32>>,
}

impl Default for Throttle {
    /// On a store of its own, in memory (tests, a lone engine).
    fn default() -> Throttle {
        Throttle::new(Arc::new(Store::new(
            Arc::new(crate::session::MemoryBackend::new(0)),
            crate::session::StoreOptions::for_idle(Duration::from_secs(60)),
        )))
    }
}

/// A credential check let through by the throttle. Dropped, it is done;
/// `failed` records it as a failure first.
pub struct Attempt<'t> {
    throttle: &'t Throttle,
    keys: Vec<String>,
}

pub(crate) const LIMIT: u32 = 10;
const IP_LIMIT: u32 = 50;
const WINDOW: Duration = Duration::from_secs(5 * 60);

impl Throttle {
    pub fn new(store: Arc<Store>) -> Throttle {
        Throttle {
            store,
            in_flight: Mutex::default(),
        }
    }

    fn keys(identifier: &str, ip: Option<IpAddr>) -> [(Option<String>, u32); 2] {
        [
            (
                Some(format!("throttle:u:{}", identifier.trim().to_lowercase())),
                LIMIT,
            ),
            (ip.map(|ip| format!("throttle:ip:{ip}")), IP_LIMIT),
        ]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A check for `identifier` from `ip` may run: `None` when failures
    /// (and checks still running) reach a limit, or when the store cannot
    /// say (closed: logged).
    pub(crate) async fn begin(&self, identifier: &str, ip: Option<IpAddr>) -> Option<Attempt<'_>> {
        let keys = Self::keys(identifier, ip);
        let mut failures = [0u32; 2];
        for (slot, (key, _)) in failures.iter_mut().zip(&keys) {
            let Some(key) = key else { continue };
            match self.store.count(key, 0, WINDOW).await {
                Ok(n) => *slot = n,
                Err(error) => {
                    tracing::warn!(%error, "the throttle's counters cannot be read: the attempt is refused");
                    return None;
                }
            }
        }
        let mut in_flight = self.lock();
        let blocked = keys.iter().zip(failures).any(|((key, limit), failed)| {
            key.as_ref()
                .is_some_and(|k| failed + in_flight.get(k).copied().unwrap_or(0) >= *limit)
        });
        if blocked {
            return None;
        }
        let keys: Vec<String> = keys.into_iter().filter_map(|(key, _)| key).collect();
        for key in &keys {
            *in_flight.entry(key.clone()).or_insert(0) += 1;
        }
        Some(Attempt {
            throttle: self,
            keys,
        })
    }
}

impl Attempt<'_> {
    /// The check failed: it counts against the limits for `WINDOW`, in
    /// every process on the store.
    pub(crate) async fn failed(self) {
        for key in &self.keys {
            if let Err(error) = self.throttle.store.count(key, 1, WINDOW).await {
                tracing::warn!(%error, "a failed attempt could not be counted");
            }
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.throttle.lock();
        for key in &self.keys {
            if let Some(count) = in_flight.get_mut(key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    in_flight.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks side by side count as they run: a burst of guesses for one
    /// name gets `LIMIT` checks, not one per request.
    #[tokio::test]
    async fn checks_in_progress_count_against_the_limit() {
        let throttle = Throttle::default();
        let ip = |i: u8| Some(IpAddr::from([192, 0, 2, i]));
        let mut running = Vec::new();
        for i in 0..LIMIT as u8 {
            running.push(
                throttle
                    .begin("alice", ip(i))
                    .await
                    .expect("under the limit"),
            );
        }
        assert!(
            throttle.begin("alice", ip(99)).await.is_none(),
            "the 11th at once"
        );
        drop(running);
        // Done without failing: room again; failures take it for good.
        for i in 0..LIMIT as u8 {
            throttle.begin("alice", ip(i)).await.unwrap().failed().await;
        }
        assert!(throttle.begin("alice", ip(99)).await.is_none());
        assert!(throttle.begin("bob", ip(99)).await.is_some());
        // Another throttle on the same store (another replica, or this
        // one restarted) counts the same failures.
        let other = Throttle::new(throttle.store.clone());
        assert!(other.begin("alice", ip(98)).await.is_none());
        assert!(
            other.begin("Alice ", ip(98)).await.is_none(),
            "names as the directory matches them"
        );
    }
}
