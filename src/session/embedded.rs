//! The embedded backend: one redb file (ACID, copy-on-write, crash-safe),
//! the default for `flowgate serve`. Sessions, flows in progress and the
//! generated cookie secret survive a restart and a `kill -9`.
//!
//! Tables:
//! - `sessions`: key → the record, as JSON;
//! - `expiry`: (when it dies, key): what `purge_expired` takes, in order,
//!   without reading anything that is still alive;
//! - `users`: username → keys, for listing and ending one user's sessions;
//! - `revoked`: sequence → (when, key): deletions, read by every process
//!   that has the file open (the server hears of the CLI's), kept a minute;
//! - `meta`: the pre-auth count and the kept secret;
//! - `counters`: name → (value, when it dies in Unix ms), with
//!   `counter_expiry` (when, name) for purging: throttle counters and
//!   one-time marks;
//! - `docs`: name → (when it dies in Unix ms, `None` for never; the value),
//!   with `doc_expiry` (when, name) for purging the mortal ones.
//!
//! Several processes may open the file at once (redb's multi-writer mode):
//! `flowgate sessions` works beside a running server. Every call runs on
//! tokio's blocking pool: redb reads and commits touch the disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    ConcurrencyMode, Database, MultimapTableDefinition, ReadableDatabase, ReadableTable,
    TableDefinition, WriteTransaction,
};

use super::{doc_write, now_millis, now_secs, Backend, Key, Record, StoreError};

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
const USERS: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("users");
const REVOKED: TableDefinition<u64, (u64, &str)> = TableDefinition::new("revoked");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const COUNTERS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("counters");
const COUNTER_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("counter_expiry");
const DOCS: TableDefinition<&str, (Option<u64>, &[u8])> = TableDefinition::new("docs");
const DOC_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("doc_expiry");

const PRE_AUTH: &str = "pre_auth";
const SECRET: &str = "secret";
/// How long deletions stay in `revoked`: every process polls far more often.
const REVOKED_KEPT: u64 = 60;

pub struct EmbeddedBackend {
    db: Arc<Database>,
    path: PathBuf,
    max_pre_auth: usize,
}

fn failed(path: &Path, error: impl std::fmt::Display) -> StoreError {
    StoreError::unavailable(format!("{}: {error}", path.display()))
}

impl EmbeddedBackend {
    /// Open (or create) the database at `path`, its folder included.
    pub fn open(path: &Path, max_pre_auth: usize) -> Result<EmbeddedBackend, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| failed(parent, e))?;
        }
        // Made readable by its owner only: it keeps the generated cookie
        // secret and each session's CSRF token (never a session id).
        #[cfg(unix)]
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| failed(path, e))?;
        }
        let db = Database::builder()
            .set_cache_size(32 << 20)
            .set_concurrency_mode(ConcurrencyMode::MultiWriter)
            .create(path)
            .map_err(|e| failed(path, e))?;
        let backend = EmbeddedBackend {
            db: Arc::new(db),
            path: path.to_owned(),
            max_pre_auth,
        };
        // Every table exists from the start: readers need not care.
        backend.write(|txn| {
            txn.open_table(SESSIONS)?;
            txn.open_table(EXPIRY)?;
            txn.open_multimap_table(USERS)?;
            txn.open_table(REVOKED)?;
            txn.open_table(META)?;
            txn.open_table(COUNTERS)?;
            txn.open_table(COUNTER_EXPIRY)?;
            txn.open_table(DOCS)?;
            txn.open_table(DOC_EXPIRY)?;
            Ok(())
        })?;
        Ok(backend)
    }

    /// One write transaction, committed (durably) when `work` succeeds.
    fn write<T>(
        &self,
        work: impl FnOnce(&WriteTransaction) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(|e| failed(&self.path, e))?;
        let value = work(&txn).map_err(|f| f.into_store(&self.path))?;
        txn.commit().map_err(|e| failed(&self.path, e))?;
        Ok(value)
    }

    /// One write transaction, committed (durably) when `work` says so and
    /// abandoned, costing no write to the disk, when it says not.
    fn write_if(
        &self,
        work: impl FnOnce(&WriteTransaction) -> Result<bool, Failure>,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(|e| failed(&self.path, e))?;
        if !work(&txn).map_err(|f| f.into_store(&self.path))? {
            txn.abort().map_err(|e| failed(&self.path, e))?;
            return Ok(false);
        }
        txn.commit().map_err(|e| failed(&self.path, e))?;
        Ok(true)
    }

    /// Run blocking work on the blocking pool, with its own handle.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(EmbeddedBackend) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let handle = EmbeddedBackend {
            db: self.db.clone(),
            path: self.path.clone(),
            max_pre_auth: self.max_pre_auth,
        };
        tokio::task::spawn_blocking(move || work(handle))
            .await
            .map_err(|e| failed(&self.path, e))?
    }

    fn read_record(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| failed(&self.path, e))?;
        let table = txn
            .open_table(SESSIONS)
            .map_err(|e| failed(&self.path, e))?;
        let Some(bytes) = table.get(key.as_str()).map_err(|e| failed(&self.path, e))? else {
            return Ok(None);
        };
        decode(&self.path, bytes.value()).map(Some)
    }
}

/// What can go wrong inside a transaction: redb's errors, a record that
/// does not decode, or the pre-auth bound.
enum Failure {
    Redb(redb::Error),
    Full(usize),
    Corrupt(String),
}

impl<E: Into<redb::Error>> From<E> for Failure {
    fn from(error: E) -> Failure {
        Failure::Redb(error.into())
    }
}

impl Failure {
    fn into_store(self, path: &Path) -> StoreError {
        match self {
            Failure::Redb(error) => failed(path, error),
            Failure::Full(n) => StoreError::Full(n),
            Failure::Corrupt(what) => failed(path, what),
        }
    }
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| failed(path, format!("a record does not decode: {e}")))
}

fn decode_in(bytes: &[u8]) -> Result<Record, Failure> {
    serde_json::from_slice(bytes)
        .map_err(|e| Failure::Corrupt(format!("a record does not decode: {e}")))
}

fn counter(txn: &WriteTransaction, name: &str) -> Result<u64, Failure> {
    let meta = txn.open_table(META)?;
    let value = meta.get(name)?.map(|v| {
        let mut bytes = [0u8; 8];
        let raw = v.value();
        let n = raw.len().min(8);
        bytes[..n].copy_from_slice(&raw[..n]);
        u64::from_le_bytes(bytes)
    });
    Ok(value.unwrap_or(0))
}

fn set_counter(txn: &WriteTransaction, name: &str, value: u64) -> Result<(), Failure> {
    let mut meta = txn.open_table(META)?;
    meta.insert(name, value.to_le_bytes().as_slice())?;
    Ok(())
}

/// Remove a record and its index entries; the record, if there was one.
fn remove_in(txn: &WriteTransaction, key: &str) -> Result<Option<Record>, Failure> {
    let old = {
        let mut sessions = txn.open_table(SESSIONS)?;
        let removed = sessions.remove(key)?;
        match removed {
            Some(bytes) => Some(decode_in(bytes.value())?),
            None => None,
        }
    };
    if let Some(old) = &old {
        txn.open_table(EXPIRY)?.remove((old.dies(), key))?;
        if let Some(identity) = old.session.identity() {
            txn.open_multimap_table(USERS)?
                .remove(identity.username.as_str(), key)?;
        }
        if old.session.is_pre_auth() {
            let count = counter(txn, PRE_AUTH)?;
            set_counter(txn, PRE_AUTH, count.saturating_sub(1))?;
        }
    }
    Ok(old)
}

fn insert_in(txn: &WriteTransaction, key: &str, record: &Record) -> Result<(), Failure> {
    let bytes = serde_json::to_vec(record).map_err(|e| Failure::Corrupt(e.to_string()))?;
    txn.open_table(SESSIONS)?.insert(key, bytes.as_slice())?;
    txn.open_table(EXPIRY)?.insert((record.dies(), key), ())?;
    if let Some(identity) = record.session.identity() {
        txn.open_multimap_table(USERS)?
            .insert(identity.username.as_str(), key)?;
    }
    if record.session.is_pre_auth() {
        let count = counter(txn, PRE_AUTH)?;
        set_counter(txn, PRE_AUTH, count + 1)?;
    }
    Ok(())
}

/// Set counter or mark `name` to `value` until `dies` (Unix ms).
fn set_mark_in(txn: &WriteTransaction, name: &str, value: u64, dies: u64) -> Result<(), Failure> {
    let mut counters = txn.open_table(COUNTERS)?;
    let old = counters.insert(name, (value, dies))?.map(|v| v.value().1);
    drop(counters);
    let mut expiry = txn.open_table(COUNTER_EXPIRY)?;
    if let Some(old) = old {
        expiry.remove((old, name))?;
    }
    expiry.insert((dies, name), ())?;
    Ok(())
}

/// The value of counter or mark `name` at `now` (Unix ms), if alive.
fn mark_in(txn: &WriteTransaction, name: &str, now: u64) -> Result<Option<u64>, Failure> {
    let counters = txn.open_table(COUNTERS)?;
    let found = counters.get(name)?.map(|v| v.value());
    Ok(found
        .filter(|(_, dies)| *dies > now)
        .map(|(value, _)| value))
}

/// Remove every counter and mark that has died by `now` (Unix ms).
fn purge_counters_in(txn: &WriteTransaction, now: u64) -> Result<usize, Failure> {
    let dead: Vec<(u64, String)> = {
        let expiry = txn.open_table(COUNTER_EXPIRY)?;
        let mut dead = Vec::new();
        for entry in expiry.range(..=(now, "~"))? {
            let (at, _) = entry?;
            let (when, name) = at.value();
            dead.push((when, name.to_owned()));
        }
        dead
    };
    let mut counters = txn.open_table(COUNTERS)?;
    let mut expiry = txn.open_table(COUNTER_EXPIRY)?;
    for (when, name) in &dead {
        counters.remove(name.as_str())?;
        expiry.remove((*when, name.as_str()))?;
    }
    Ok(dead.len())
}

/// Replace document `name` with `new` (value, when it dies) or remove it,
/// keeping `doc_expiry` in step.
fn set_doc_in(
    txn: &WriteTransaction,
    name: &str,
    new: Option<(&[u8], Option<u64>)>,
) -> Result<(), Failure> {
    let mut docs = txn.open_table(DOCS)?;
    let old = match new {
        Some((value, dies)) => docs.insert(name, (dies, value))?,
        None => docs.remove(name)?,
    }
    .and_then(|v| v.value().0);
    drop(docs);
    let mut expiry = txn.open_table(DOC_EXPIRY)?;
    if let Some(old) = old {
        expiry.remove((old, name))?;
    }
    if let Some((_, Some(dies))) = new {
        expiry.insert((dies, name), ())?;
    }
    Ok(())
}

/// Remove every document that has died by `now` (Unix ms).
fn purge_docs_in(txn: &WriteTransaction, now: u64) -> Result<usize, Failure> {
    let dead: Vec<(u64, String)> = {
        let expiry = txn.open_table(DOC_EXPIRY)?;
        let mut dead = Vec::new();
        for entry in expiry.range(..(now.saturating_add(1), ""))? {
            let (at, _) = entry?;
            let (when, name) = at.value();
            dead.push((when, name.to_owned()));
        }
        dead
    };
    let mut docs = txn.open_table(DOCS)?;
    let mut expiry = txn.open_table(DOC_EXPIRY)?;
    for (when, name) in &dead {
        docs.remove(name.as_str())?;
        expiry.remove((*when, name.as_str()))?;
    }
    Ok(dead.len())
}

/// Remove every record that has died by `now`, reading only those.
fn purge_in(txn: &WriteTransaction, now: u64) -> Result<usize, Failure> {
    let dead: Vec<String> = {
        let expiry = txn.open_table(EXPIRY)?;
        let mut dead = Vec::new();
        for entry in expiry.range(..=(now, "~"))? {
            let (at, _) = entry?;
            dead.push(at.value().1.to_owned());
        }
        dead
    };
    for key in &dead {
        remove_in(txn, key)?;
    }
    Ok(dead.len())
}

#[async_trait]
impl Backend for EmbeddedBackend {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let key = key.clone();
        let now = now_secs();
        self.blocking(move |db| Ok(db.read_record(&key)?.filter(|r| r.live(now))))
            .await
    }

    async fn put(&self, key: &Key, record: Record) -> Result<(), StoreError> {
        let key = key.clone();
        self.blocking(move |db| {
            let max = db.max_pre_auth as u64;
            db.write(|txn| {
                let old = remove_in(txn, key.as_str())?;
                let new_pre_auth = record.session.is_pre_auth()
                    && old.as_ref().is_none_or(|o| !o.session.is_pre_auth());
                if new_pre_auth && counter(txn, PRE_AUTH)? >= max {
                    // Full, unless some have died.
                    purge_in(txn, now_secs())?;
                    let count = counter(txn, PRE_AUTH)?;
                    if count >= max {
                        return Err(Failure::Full(count as usize));
                    }
                }
                insert_in(txn, key.as_str(), &record)
            })
        })
        .await
    }

    async fn touch(&self, key: &Key, deadline: u64) -> Result<(), StoreError> {
        let key = key.clone();
        self.blocking(move |db| {
            db.write(|txn| {
                let old = {
                    let sessions = txn.open_table(SESSIONS)?;
                    let found = sessions.get(key.as_str())?;
                    match found {
                        Some(bytes) => Some(decode_in(bytes.value())?),
                        None => None,
                    }
                };
                let Some(mut record) = old else {
                    return Ok(());
                };
                if deadline <= record.deadline || !record.live(now_secs()) {
                    return Ok(());
                }
                txn.open_table(EXPIRY)?
                    .remove((record.dies(), key.as_str()))?;
                record.deadline = deadline;
                let bytes =
                    serde_json::to_vec(&record).map_err(|e| Failure::Corrupt(e.to_string()))?;
                txn.open_table(SESSIONS)?
                    .insert(key.as_str(), bytes.as_slice())?;
                txn.open_table(EXPIRY)?
                    .insert((record.dies(), key.as_str()), ())?;
                Ok(())
            })
        })
        .await
    }

    async fn delete(&self, key: &Key) -> Result<bool, StoreError> {
        let key = key.clone();
        self.blocking(move |db| {
            db.write(|txn| {
                let existed = remove_in(txn, key.as_str())?.is_some();
                let now = now_secs();
                let mut revoked = txn.open_table(REVOKED)?;
                let next = revoked.last()?.map_or(1, |(seq, _)| seq.value() + 1);
                revoked.insert(next, (now, key.as_str()))?;
                // Forget deletions every process has long seen.
                let old: Vec<u64> = revoked
                    .iter()?
                    .map_while(|entry| match entry {
                        Ok((seq, at)) if at.value().0 + REVOKED_KEPT < now => Some(seq.value()),
                        _ => None,
                    })
                    .collect();
                for seq in old {
                    revoked.remove(seq)?;
                }
                Ok(existed)
            })
        })
        .await
    }

    async fn list(&self, user: Option<&str>) -> Result<Vec<(Key, Record)>, StoreError> {
        let user = user.map(str::to_owned);
        let now = now_secs();
        self.blocking(move |db| {
            let path = db.path.clone();
            let txn = db.db.begin_read().map_err(|e| failed(&path, e))?;
            let sessions = txn.open_table(SESSIONS).map_err(|e| failed(&path, e))?;
            let mut listed = Vec::new();
            let mut take = |key: &str, bytes: &[u8]| -> Result<(), StoreError> {
                let record = decode(&path, bytes)?;
                if record.live(now) && record.session.identity.is_some() {
                    listed.push((Key(key.to_owned()), record));
                }
                Ok(())
            };
            match &user {
                Some(user) => {
                    let users = txn
                        .open_multimap_table(USERS)
                        .map_err(|e| failed(&path, e))?;
                    for key in users.get(user.as_str()).map_err(|e| failed(&path, e))? {
                        let key = key.map_err(|e| failed(&path, e))?;
                        let key = key.value();
                        if let Some(bytes) = sessions.get(key).map_err(|e| failed(&path, e))? {
                            take(key, bytes.value())?;
                        }
                    }
                }
                None => {
                    for entry in sessions.iter().map_err(|e| failed(&path, e))? {
                        let (key, bytes) = entry.map_err(|e| failed(&path, e))?;
                        take(key.value(), bytes.value())?;
                    }
                }
            }
            Ok(listed)
        })
        .await
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        self.blocking(|db| {
            db.write(|txn| {
                purge_counters_in(txn, now_millis())?;
                purge_docs_in(txn, now_millis())?;
                purge_in(txn, now_secs())
            })
        })
        .await
    }

    async fn count(&self, name: &str, by: u32, window: Duration) -> Result<u32, StoreError> {
        let name = name.to_owned();
        self.blocking(move |db| {
            let now = now_millis();
            if by == 0 {
                let path = db.path.clone();
                let txn = db.db.begin_read().map_err(|e| failed(&path, e))?;
                let counters = txn.open_table(COUNTERS).map_err(|e| failed(&path, e))?;
                let found = counters
                    .get(name.as_str())
                    .map_err(|e| failed(&path, e))?
                    .map(|v| v.value());
                let value = found.filter(|(_, dies)| *dies > now).map_or(0, |(v, _)| v);
                return Ok(value.min(u32::MAX as u64) as u32);
            }
            db.write(|txn| {
                let value = mark_in(txn, &name, now)?.unwrap_or(0) + by as u64;
                set_mark_in(txn, &name, value, now + window.as_millis() as u64)?;
                Ok(value.min(u32::MAX as u64) as u32)
            })
        })
        .await
    }

    async fn raise(&self, name: &str, value: u64, ttl: Duration) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.blocking(move |db| {
            db.write(|txn| {
                let now = now_millis();
                if mark_in(txn, &name, now)?.is_some_and(|v| v >= value) {
                    return Ok(false);
                }
                set_mark_in(txn, &name, value, now + ttl.as_millis() as u64)?;
                Ok(true)
            })
        })
        .await
    }

    async fn doc_get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let name = name.to_owned();
        self.blocking(move |db| {
            let now = now_millis();
            let path = db.path.clone();
            let txn = db.db.begin_read().map_err(|e| failed(&path, e))?;
            let docs = txn.open_table(DOCS).map_err(|e| failed(&path, e))?;
            let found = docs.get(name.as_str()).map_err(|e| failed(&path, e))?;
            Ok(found.and_then(|v| {
                let (dies, value) = v.value();
                dies.is_none_or(|d| d > now).then(|| value.to_vec())
            }))
        })
        .await
    }

    async fn doc_swap(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, StoreError> {
        let name = name.to_owned();
        let expected = expected.map(<[u8]>::to_vec);
        let new = new.map(<[u8]>::to_vec);
        self.blocking(move |db| {
            // A swap that fails is quick: the writer that won goes on.
            db.write_if(|txn| {
                let now = now_millis();
                let stands = {
                    let docs = txn.open_table(DOCS)?;
                    let found = docs.get(name.as_str())?;
                    found.and_then(|v| {
                        let (dies, value) = v.value();
                        dies.is_none_or(|d| d > now).then(|| value.to_vec())
                    })
                };
                if stands != expected {
                    return Ok(false);
                }
                let write = doc_write(new.as_deref(), ttl)
                    .map(|(value, ms)| (value, ms.map(|ms| now.saturating_add(ms))));
                set_doc_in(txn, &name, write)?;
                Ok(true)
            })
        })
        .await
    }

    async fn revoked_since(&self, cursor: Option<u64>) -> Result<(u64, Vec<Key>), StoreError> {
        self.blocking(move |db| {
            let path = db.path.clone();
            let txn = db.db.begin_read().map_err(|e| failed(&path, e))?;
            let revoked = txn.open_table(REVOKED).map_err(|e| failed(&path, e))?;
            let Some(cursor) = cursor else {
                let last = revoked.last().map_err(|e| failed(&path, e))?;
                return Ok((last.map_or(0, |(seq, _)| seq.value()), Vec::new()));
            };
            let mut next = cursor;
            let mut keys = Vec::new();
            for entry in revoked.range(cursor + 1..).map_err(|e| failed(&path, e))? {
                let (seq, at) = entry.map_err(|e| failed(&path, e))?;
                next = seq.value();
                keys.push(Key(at.value().1.to_owned()));
            }
            Ok((next, keys))
        })
        .await
    }

    fn kept_secret(&self, fresh: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            if let Some(kept) = meta.get(SECRET)? {
                return Ok(Some(kept.value().to_vec()));
            }
            meta.insert(SECRET, fresh)?;
            Ok(Some(fresh.to_vec()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata as _;

    fn count(
        db: &EmbeddedBackend,
        table: TableDefinition<'_, impl redb::Key + 'static, impl redb::Value + 'static>,
    ) -> u64 {
        let txn = db.db.begin_read().unwrap();
        let table = txn.open_table(table).unwrap();
        table.len().unwrap()
    }

    #[tokio::test]
    async fn documents_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.state");
        let db = EmbeddedBackend::open(&path, 2).unwrap();
        let hour = Some(Duration::from_secs(3600));
        assert!(db.doc_swap("kept", None, Some(b"[1]"), None).await.unwrap());
        assert!(db.doc_swap("hour", None, Some(b"[2]"), hour).await.unwrap());
        drop(db);
        let db = EmbeddedBackend::open(&path, 2).unwrap();
        assert_eq!(
            db.doc_get("kept").await.unwrap().as_deref(),
            Some(&b"[1]"[..])
        );
        assert_eq!(
            db.doc_get("hour").await.unwrap().as_deref(),
            Some(&b"[2]"[..])
        );
        assert!(!db.doc_swap("kept", None, Some(b"[3]"), None).await.unwrap());
    }

    #[tokio::test]
    async fn the_purge_drops_dead_documents_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let db = EmbeddedBackend::open(&dir.path().join("docs.state"), 2).unwrap();
        let short = Some(Duration::from_millis(100));
        assert!(db.doc_swap("dies", None, Some(b"1"), short).await.unwrap());
        assert!(db.doc_swap("lives", None, Some(b"1"), short).await.unwrap());
        assert!(db
            .doc_swap("lives", Some(b"1"), Some(b"2"), None)
            .await
            .unwrap());
        assert!(db.doc_swap("later", None, Some(b"1"), short).await.unwrap());
        let hour = Some(Duration::from_secs(3600));
        assert!(db
            .doc_swap("later", Some(b"1"), Some(b"2"), hour)
            .await
            .unwrap());
        assert!(db.doc_swap("gone", None, Some(b"1"), short).await.unwrap());
        assert!(db.doc_swap("gone", Some(b"1"), None, None).await.unwrap());
        // One index entry per mortal document, the latest.
        assert_eq!(count(&db, DOCS), 3);
        assert_eq!(count(&db, DOC_EXPIRY), 2);
        tokio::time::sleep(Duration::from_millis(200)).await;
        db.purge_expired().await.unwrap();
        assert_eq!(count(&db, DOCS), 2);
        assert_eq!(count(&db, DOC_EXPIRY), 1);
        assert_eq!(db.doc_get("dies").await.unwrap(), None);
        assert_eq!(
            db.doc_get("lives").await.unwrap().as_deref(),
            Some(&b"2"[..])
        );
        assert_eq!(
            db.doc_get("later").await.unwrap().as_deref(),
            Some(&b"2"[..])
        );
    }
}
