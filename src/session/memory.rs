//! The in-process backend: a hash map behind a std `RwLock` (never held
//! across an await: every method is synchronous inside), the counters and
//! documents each behind a std `Mutex`, likewise. For tests and the
//! demo; everything ends with the process. Pre-auth records are bounded,
//! since anyone can create them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use super::{doc_write, now_millis, now_secs, Backend, Key, Record, Session, StoreError};

struct Entry {
    session: Arc<Session>,
    /// Unix seconds; atomic so that refreshing it needs only the read lock.
    deadline: AtomicU64,
}

impl Entry {
    fn live(&self, now: u64) -> bool {
        self.deadline.load(Ordering::Relaxed) > now && self.session.expires > now
    }

    fn record(&self) -> Record {
        Record {
            session: Session::clone(&self.session),
            deadline: self.deadline.load(Ordering::Relaxed),
        }
    }
}

pub struct MemoryBackend {
    map: RwLock<Records>,
    max_pre_auth: usize,
    /// Counters and marks: name → (value, when it dies, Unix milliseconds).
    counters: std::sync::Mutex<HashMap<String, (u64, u64)>>,
    /// Documents: name → (value, when it dies in Unix ms; `None`: never).
    docs: std::sync::Mutex<HashMap<String, Doc>>,
}

type Doc = (Vec<u8>, Option<u64>);

/// Past this many counters and marks, the dead ones are swept.
const COUNTERS_SWEPT_AT: usize = 10_000;

/// The records, and how many of them are pre-auth: kept under the same
/// lock, so that creating a pre-auth session never scans the map.
#[derive(Default)]
struct Records {
    entries: HashMap<Key, Entry>,
    pre_auth: usize,
}

impl Records {
    fn insert(&mut self, key: Key, entry: Entry) {
        let added = entry.session.is_pre_auth() as usize;
        if let Some(old) = self.entries.insert(key, entry) {
            self.pre_auth -= old.session.is_pre_auth() as usize;
        }
        self.pre_auth += added;
    }

    fn remove(&mut self, key: &Key) -> bool {
        match self.entries.remove(key) {
            Some(old) => {
                self.pre_auth -= old.session.is_pre_auth() as usize;
                true
            }
            None => false,
        }
    }

    /// Keep the records `keep` says yes to; how many went.
    fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) -> usize {
        let before = self.entries.len();
        let mut pre_auth_gone = 0;
        self.entries.retain(|_, entry| {
            let kept = keep(entry);
            pre_auth_gone += (!kept && entry.session.is_pre_auth()) as usize;
            kept
        });
        self.pre_auth -= pre_auth_gone;
        before - self.entries.len()
    }
}

impl MemoryBackend {
    pub fn new(max_pre_auth: usize) -> MemoryBackend {
        MemoryBackend {
            map: RwLock::new(Records::default()),
            max_pre_auth,
            counters: Default::default(),
            docs: Default::default(),
        }
    }

    fn docs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Doc>> {
        self.docs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counters, the dead ones swept when there are many.
    fn counters(&self, now: u64) -> std::sync::MutexGuard<'_, HashMap<String, (u64, u64)>> {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        if counters.len() >= COUNTERS_SWEPT_AT {
            counters.retain(|_, (_, dies)| *dies > now);
        }
        counters
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Records> {
        self.map
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Records> {
        self.map
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let now = now_secs();
        Ok(self
            .read()
            .entries
            .get(key)
            .filter(|e| e.live(now))
            .map(Entry::record))
    }

    async fn put(&self, key: &Key, record: Record) -> Result<(), StoreError> {
        let now = now_secs();
        let mut map = self.write();
        let new = !map.entries.contains_key(key);
        if record.session.is_pre_auth() && new && map.pre_auth >= self.max_pre_auth {
            // Full, unless some have expired: only then a scan.
            map.retain(|e| e.live(now));
            if map.pre_auth >= self.max_pre_auth {
                return Err(StoreError::Full(map.pre_auth));
            }
        }
        map.insert(
            key.clone(),
            Entry {
                session: Arc::new(record.session),
                deadline: AtomicU64::new(record.deadline),
            },
        );
        Ok(())
    }

    async fn touch(&self, key: &Key, deadline: u64) -> Result<(), StoreError> {
        if let Some(entry) = self.read().entries.get(key) {
            entry.deadline.fetch_max(deadline, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn delete(&self, key: &Key) -> Result<bool, StoreError> {
        Ok(self.write().remove(key))
    }

    async fn list(&self, user: Option<&str>) -> Result<Vec<(Key, Record)>, StoreError> {
        let now = now_secs();
        Ok(self
            .read()
            .entries
            .iter()
            .filter(|(_, e)| e.live(now))
            .filter(|(_, e)| {
                e.session
                    .identity()
                    .is_some_and(|i| user.is_none_or(|u| i.username == u))
            })
            .map(|(k, e)| (k.clone(), e.record()))
            .collect())
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        let now_ms = now_millis();
        self.docs()
            .retain(|_, (_, dies)| dies.is_none_or(|d| d > now_ms));
        let now = now_secs();
        Ok(self.write().retain(|e| e.live(now)))
    }

    async fn revoked_since(&self, _cursor: Option<u64>) -> Result<(u64, Vec<Key>), StoreError> {
        // One process: the front evicts what it deletes itself.
        Ok((0, Vec::new()))
    }

    fn kept_secret(&self, _fresh: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }

    async fn count(&self, name: &str, by: u32, window: Duration) -> Result<u32, StoreError> {
        let now = now_millis();
        let mut counters = self.counters(now);
        let alive = counters
            .get(name)
            .filter(|(_, dies)| *dies > now)
            .map(|(v, _)| *v);
        if by == 0 {
            return Ok(alive.unwrap_or(0) as u32);
        }
        let value = alive.unwrap_or(0) + by as u64;
        counters.insert(name.to_owned(), (value, now + window.as_millis() as u64));
        Ok(value.min(u32::MAX as u64) as u32)
    }

    async fn raise(&self, name: &str, value: u64, ttl: Duration) -> Result<bool, StoreError> {
        let now = now_millis();
        let mut counters = self.counters(now);
        let stands = counters
            .get(name)
            .filter(|(_, dies)| *dies > now)
            .map(|(v, _)| *v);
        if stands.is_some_and(|v| v >= value) {
            return Ok(false);
        }
        counters.insert(name.to_owned(), (value, now + ttl.as_millis() as u64));
        Ok(true)
    }

    async fn doc_get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let now = now_millis();
        Ok(self
            .docs()
            .get(name)
            .filter(|(_, dies)| dies.is_none_or(|d| d > now))
            .map(|(value, _)| value.clone()))
    }

    async fn doc_swap(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, StoreError> {
        let now = now_millis();
        let mut docs = self.docs();
        let stands = docs
            .get(name)
            .filter(|(_, dies)| dies.is_none_or(|d| d > now))
            .map(|(value, _)| value.as_slice());
        if stands != expected {
            return Ok(false);
        }
        match doc_write(new, ttl) {
            Some((value, ms)) => {
                docs.insert(
                    name.to_owned(),
                    (value.to_vec(), ms.map(|ms| now.saturating_add(ms))),
                );
            }
            None => {
                docs.remove(name);
            }
        }
        Ok(true)
    }

    fn authenticated_now(&self, key: &Key, idle: Duration) -> Option<Option<Arc<Session>>> {
        let now = now_secs();
        let map = self.read();
        let Some(entry) = map.entries.get(key).filter(|e| e.live(now)) else {
            return Some(None);
        };
        if entry.session.identity.is_none() {
            return Some(None);
        }
        let deadline = (now + idle.as_secs()).min(entry.session.expires);
        entry.deadline.fetch_max(deadline, Ordering::Relaxed);
        Some(Some(entry.session.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_purge_drops_dead_documents() {
        let memory = MemoryBackend::new(2);
        let short = Some(Duration::from_millis(50));
        assert!(memory
            .doc_swap("dies", None, Some(b"1"), short)
            .await
            .unwrap());
        assert!(memory
            .doc_swap("lives", None, Some(b"1"), None)
            .await
            .unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        memory.purge_expired().await.unwrap();
        let docs = memory.docs();
        assert_eq!(docs.keys().collect::<Vec<_>>(), ["lives"]);
    }
}
