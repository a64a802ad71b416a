//! The one session store every part of flowgate talks to, whatever keeps
//! the records. It hashes ids into keys, so no backend ever sees an id; it
//! answers the hot path from memory (the backend's own, or a read-through
//! cache), so a proxied request makes no round trip; it writes the sliding
//! idle deadline back at most once per `write_back`; it evicts what
//! other processes revoke, within `poll` (`watch`); and it tells the
//! connections that outlive their request (tunnels, streams, long polls)
//! when their session has ended (`ended`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::Rng as _;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{now_secs, Backend, Key, Record, Session, StoreError};

/// How the front treats its backend.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// How long a cached session is believed without asking the backend:
    /// the most a revocation missed by `watch` (Redis unreachable, say) can
    /// go unnoticed.
    pub cache_ttl: Duration,
    /// The idle deadline is written back when it has moved this much.
    pub write_back: Duration,
    /// At most this many sessions are cached; past it, the cache starts over.
    pub cache_entries: usize,
}

impl StoreOptions {
    /// For a session idle timeout of `idle`: write back every minute, or
    /// every quarter of the timeout when that is shorter.
    pub fn for_idle(idle: Duration) -> StoreOptions {
        StoreOptions {
            cache_ttl: Duration::from_secs(10),
            write_back: (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)),
            cache_entries: 100_000,
        }
    }
}

/// One session as `flowgate sessions list` and the admin listener's
/// `GET /sessions` show it: its key (the handle to end it by; never the
/// id), whose it is, and its times (Unix seconds).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub id: String,
    pub user: String,
    pub name: String,
    pub groups: Vec<String>,
    pub created: u64,
    pub expires: u64,
    pub idle_deadline: u64,
    pub second_factor: bool,
    /// The flows this session has been through.
    pub flows: Vec<String>,
}

impl Listed {
    pub fn of(key: &Key, record: &Record) -> Listed {
        let session = &record.session;
        let identity = session.identity();
        Listed {
            id: key.as_str().to_owned(),
            user: identity.map(|i| i.username.clone()).unwrap_or_default(),
            name: identity.map(|i| i.name.clone()).unwrap_or_default(),
            groups: identity.map(|i| i.groups.clone()).unwrap_or_default(),
            created: session.created,
            expires: session.expires,
            idle_deadline: record.deadline.min(session.expires),
            second_factor: session.second_factor,
            flows: session.completed.clone(),
        }
    }
}

struct Cached {
    /// `None`: the id names no authenticated session (a login in progress,
    /// or nothing). Safe to believe for as long as the rest: a login never
    /// turns a record authenticated in place, it writes a new id.
    session: Option<Arc<Session>>,
    /// Unix seconds: when it was read from the backend.
    fetched: u64,
    /// The idle deadline as this process has pushed it.
    deadline: AtomicU64,
    /// The idle deadline as last written to the backend.
    written: AtomicU64,
}

pub struct Store {
    backend: Arc<dyn Backend>,
    options: StoreOptions,
    cache: RwLock<HashMap<Key, Arc<Cached>>>,
    /// Sessions with a connection waiting on `ended`, and the nudge that
    /// makes those connections look again.
    live: std::sync::Mutex<HashMap<Key, Live>>,
    /// `watch` has started.
    watching: std::sync::atomic::AtomicBool,
}

/// How long a request runs before it starts listening for its session's
/// end. Shorter ones (nearly all) cost a timer, not a registration; the
/// end of a session still reaches the rest well within a second.
const LIVE_AFTER: Duration = Duration::from_millis(200);

impl Store {
    pub fn new(backend: Arc<dyn Backend>, options: StoreOptions) -> Store {
        Store {
            backend,
            options,
            cache: RwLock::default(),
            live: Default::default(),
            watching: Default::default(),
        }
    }

    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    fn forget(&self, key: &Key) {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        cache.remove(key);
    }

    /// A session may have ended: forget it, and have its live connections
    /// look again.
    fn ending(&self, key: &Key) {
        self.forget(key);
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = live.get(key) {
            live.nudge.send_modify(|_| {});
        }
    }

    /// End the open connections (not the sessions) of `users`: what they
    /// were let through for may not hold any more (their groups changed).
    /// Their next request is decided afresh. How many sessions had some.
    pub fn end_live_of(&self, users: &[String]) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut ended = 0;
        for entry in live.values() {
            let user = entry.user.lock().unwrap_or_else(|p| p.into_inner());
            if user.as_ref().is_some_and(|u| users.contains(u)) {
                entry.nudge.send_replace(true);
                ended += 1;
            }
        }
        ended
    }

    /// Resolves when session `id` has ended: signed out or revoked (here,
    /// or in any process sharing the store), expired, or no longer
    /// answerable by the store (fail closed). A connection waiting on this
    /// counts as activity: it keeps the idle deadline moving, as the
    /// requests of a polling page would. Meant to be raced against a
    /// connection that outlives its request; the first `LIVE_AFTER` of it
    /// is only a timer.
    pub fn ended(
        self: &Arc<Self>,
        id: Arc<str>,
        idle: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let store = self.clone();
        async move {
            tokio::time::sleep(LIVE_AFTER).await;
            let key = Key::of(&id);
            let mut listening = Listening::new(&store, key);
            loop {
                if *listening.nudges.borrow_and_update() {
                    return;
                }
                let expires = match store.authenticated(&id, idle).await {
                    Ok(Some(session)) => {
                        listening.user_is(session.identity().map(|i| i.username.as_str()));
                        session.expires
                    }
                    Ok(None) => return,
                    Err(error) => {
                        tracing::warn!(%error, "session store unavailable: a live connection is closed");
                        return;
                    }
                };
                // Look again when the session's lifetime is over, and at
                // least once per cache period: a revocation the store could
                // not announce reaches the connection as late as a request.
                let until_expiry = (std::time::UNIX_EPOCH + Duration::from_secs(expires))
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                let next = until_expiry.min(recheck_period(&store));
                tokio::select! {
                    _ = listening.nudges.changed() => {}
                    _ = tokio::time::sleep(next) => {}
                }
            }
        }
    }

    /// The whole record, fresh from the backend (login pages read and write
    /// its flows).
    pub async fn get(&self, id: &str) -> Result<Option<Session>, StoreError> {
        Ok(self.backend.get(&Key::of(id)).await?.map(|r| r.session))
    }

    /// Insert or replace, alive for `ttl` from now unless touched.
    pub async fn put(&self, id: &str, session: &Session, ttl: Duration) -> Result<(), StoreError> {
        let key = Key::of(id);
        self.forget(&key);
        let record = Record {
            session: session.clone(),
            deadline: now_secs() + ttl.as_secs(),
        };
        self.backend.put(&key, record).await
    }

    /// Extend the life of an existing record to `ttl` from now.
    pub async fn touch(&self, id: &str, ttl: Duration) -> Result<(), StoreError> {
        let key = Key::of(id);
        let deadline = now_secs() + ttl.as_secs();
        if let Some(cached) = self.cached(&key) {
            cached.deadline.fetch_max(deadline, Ordering::Relaxed);
            cached.written.fetch_max(deadline, Ordering::Relaxed);
        }
        self.backend.touch(&key, deadline).await
    }

    /// Change a session where it is, keeping its deadline; nothing when it
    /// is gone (ended meanwhile: never brought back). Whether it was there.
    pub async fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut Session),
    ) -> Result<bool, StoreError> {
        let key = Key::of(id);
        let Some(mut record) = self.backend.get(&key).await? else {
            return Ok(false);
        };
        change(&mut record.session);
        self.forget(&key);
        self.backend.put(&key, record).await?;
        self.forget(&key);
        Ok(true)
    }

    /// End one session, in every process sharing the store.
    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.delete_key(&Key::of(id)).await.map(|_| ())
    }

    /// End one session by its key (the admin listing's handle); whether
    /// there was one.
    pub async fn delete_key(&self, key: &Key) -> Result<bool, StoreError> {
        self.forget(key);
        let deleted = self.backend.delete(key).await;
        self.ending(key);
        deleted
    }

    /// End every authenticated session of one user; how many.
    pub async fn delete_all_for_user(&self, username: &str) -> Result<usize, StoreError> {
        let mut ended = 0;
        for (key, _) in self.records_of(Some(username)).await? {
            ended += self.delete_key(&key).await? as usize;
        }
        Ok(ended)
    }

    /// Counter `name` plus `by` (0 reads it), alive `window` after its last
    /// rise (`Backend::count`).
    pub async fn count(&self, name: &str, by: u32, window: Duration) -> Result<u32, StoreError> {
        self.backend.count(name, by, window).await
    }

    /// Raise mark `name` to `value` for `ttl`; whether it rose
    /// (`Backend::raise`).
    pub async fn raise(&self, name: &str, value: u64, ttl: Duration) -> Result<bool, StoreError> {
        self.backend.raise(name, value, ttl).await
    }

    /// Document `name`, decoded. One that no longer decodes as a `T` (its
    /// shape changed) is absent, and logged.
    pub async fn doc<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let bytes = self.backend.doc_get(name).await?;
        Ok(bytes.and_then(|bytes| decode_doc(name, &bytes)))
    }

    /// Read, change and write back document `name`: a compare-and-swap,
    /// tried again from what is there now when another process wrote in
    /// between, after a random pause that grows each time; `DOC_TRIES`
    /// times at most (some seconds of losing), then `Contended`. `change`
    /// gets the value as it stands (`None`: absent, or not decodable, which
    /// it then replaces) and gives the new one (`None`: delete it) and what
    /// to answer; it runs once per try, and the winning run's answer is the
    /// one given. The value written lives for `ttl` (`None`: for good) from
    /// this write. An error may follow a write that took effect (a Redis
    /// that answered too late): callers fail closed.
    pub async fn update_doc<T, R>(
        &self,
        name: &str,
        ttl: Option<Duration>,
        mut change: impl FnMut(Option<T>) -> (Option<T>, R) + Send,
    ) -> Result<R, StoreError>
    where
        T: Serialize + DeserializeOwned,
    {
        for tries in 1..=DOC_TRIES {
            let stands = self.backend.doc_get(name).await?;
            let (new, answer) = {
                let (new, answer) = change(stands.as_deref().and_then(|b| decode_doc(name, b)));
                let new = new.map(|value| serde_json::to_vec(&value)).transpose();
                let new = new.map_err(|e| {
                    StoreError::unavailable(format!("document {name} does not encode: {e}"))
                })?;
                (new, answer)
            };
            if self
                .backend
                .doc_swap(name, stands.as_deref(), new.as_deref(), ttl)
                .await?
            {
                return Ok(answer);
            }
            if tries < DOC_TRIES {
                // Lost to another writer: wait a random while, up to twice
                // as long each time, so that two in step fall out of it and
                // one that keeps winning (a loop) is waited out.
                let most = 1u64 << tries.min(10);
                let pause = rand::thread_rng().gen_range(0..=most);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
        Err(StoreError::Contended(name.to_owned(), DOC_TRIES))
    }

    /// The records of `user`'s sessions (the name as the directory
    /// matches it: whatever its case), or of everybody's.
    async fn records_of(&self, user: Option<&str>) -> Result<Vec<(Key, Record)>, StoreError> {
        let Some(user) = user else {
            return self.backend.list(None).await;
        };
        let mut records = self.backend.list(Some(user)).await?;
        if records.is_empty() {
            records = self
                .backend
                .list(None)
                .await?
                .into_iter()
                .filter(|(_, r)| {
                    r.session
                        .identity()
                        .is_some_and(|i| i.username.eq_ignore_ascii_case(user))
                })
                .collect();
        }
        Ok(records)
    }

    /// Live authenticated sessions, of one user or of all, newest first.
    pub async fn list(&self, user: Option<&str>) -> Result<Vec<Listed>, StoreError> {
        let mut listed: Vec<Listed> = self
            .records_of(user)
            .await?
            .iter()
            .map(|(key, record)| Listed::of(key, record))
            .collect();
        listed.sort_by_key(|l| std::cmp::Reverse(l.created));
        Ok(listed)
    }

    /// Number of live authenticated sessions (for metrics).
    pub async fn count_authenticated(&self) -> Result<usize, StoreError> {
        Ok(self.backend.list(None).await?.len())
    }

    pub async fn purge_expired(&self) -> Result<usize, StoreError> {
        let now = now_secs();
        {
            let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
            let ttl = self.options.cache_ttl.as_secs();
            cache.retain(|_, c| {
                now < c.fetched + ttl
                    && c.session
                        .as_ref()
                        .is_none_or(|s| c.deadline.load(Ordering::Relaxed) > now && s.expires > now)
            });
        }
        self.backend.purge_expired().await
    }

    fn cached(&self, key: &Key) -> Option<Arc<Cached>> {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        cache.get(key).cloned()
    }

    /// The hot path: an authenticated, live session, its idle deadline
    /// pushed to `idle` from now (never past the session's own expiry).
    /// Pre-auth or missing sessions: `None`.
    pub async fn authenticated(
        &self,
        id: &str,
        idle: Duration,
    ) -> Result<Option<Arc<Session>>, StoreError> {
        if let Some(answer) = self.authenticated_now(id, idle) {
            return answer;
        }
        let key = Key::of(id);
        let record = self
            .backend
            .get(&key)
            .await?
            .filter(|r| r.session.identity.is_some());
        let now = now_secs();
        let deadline = record.as_ref().map_or(0, |r| r.deadline);
        let cached = Arc::new(Cached {
            session: record.map(|r| Arc::new(r.session)),
            fetched: now,
            deadline: AtomicU64::new(deadline),
            written: AtomicU64::new(deadline),
        });
        {
            let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= self.options.cache_entries {
                cache.clear();
            }
            cache.insert(key.clone(), cached.clone());
        }
        Ok(self.refresh(&key, &cached, idle, now))
    }

    /// `authenticated`, answered without waiting: by an in-process backend,
    /// or from the cache. `None`: the cache does not have it (or has had it
    /// too long); the request takes the path that awaits `authenticated`.
    pub fn authenticated_now(
        &self,
        id: &str,
        idle: Duration,
    ) -> Option<Result<Option<Arc<Session>>, StoreError>> {
        let key = Key::of(id);
        if let Some(answer) = self.backend.authenticated_now(&key, idle) {
            return Some(Ok(answer));
        }
        let cached = self.cached(&key)?;
        let now = now_secs();
        if now >= cached.fetched + self.options.cache_ttl.as_secs() {
            return None;
        }
        Some(Ok(self.refresh(&key, &cached, idle, now)))
    }

    /// A cached session, alive: its idle deadline pushed, and written back
    /// when it has moved by `write_back` since it was last written. Dead or
    /// none: `None`.
    fn refresh(
        &self,
        key: &Key,
        cached: &Cached,
        idle: Duration,
        now: u64,
    ) -> Option<Arc<Session>> {
        let session = cached.session.as_ref()?;
        if cached.deadline.load(Ordering::Relaxed) <= now || session.expires <= now {
            return None;
        }
        let deadline = (now + idle.as_secs()).min(session.expires);
        cached.deadline.fetch_max(deadline, Ordering::Relaxed);
        let written = cached.written.load(Ordering::Relaxed);
        if deadline >= written + self.options.write_back.as_secs()
            && cached
                .written
                .compare_exchange(written, deadline, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let backend = self.backend.clone();
                let key = key.clone();
                runtime.spawn(async move {
                    if let Err(error) = backend.touch(&key, deadline).await {
                        tracing::warn!(%error, "could not write a session's idle deadline back");
                    }
                });
            }
        }
        Some(session.clone())
    }

    /// Evict what other processes revoke, until the store is dropped. Ask
    /// every `poll`. Where the listening starts is settled before this
    /// returns: a revocation made after it is heard, however soon. Once per
    /// store; later calls do nothing.
    pub async fn watch(self: &Arc<Self>, poll: Duration) {
        if self.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let first = self.backend.revoked_since(None).await;
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let (mut cursor, mut failing) = match first {
                Ok((cursor, _)) => (Some(cursor), false),
                Err(error) => {
                    tracing::warn!(%error, "cannot hear of sessions ended elsewhere");
                    (None, true)
                }
            };
            loop {
                tokio::time::sleep(poll).await;
                let Some(store) = store.upgrade() else {
                    return;
                };
                match store.backend.revoked_since(cursor).await {
                    Ok((next, keys)) => {
                        if failing {
                            tracing::info!("session store reachable again");
                            failing = false;
                        }
                        cursor = Some(next);
                        for key in keys {
                            store.ending(&key);
                        }
                    }
                    Err(error) => {
                        if !failing {
                            tracing::warn!(%error, "cannot hear of sessions ended elsewhere");
                            failing = true;
                        }
                    }
                }
            }
        });
    }
}

/// How many times `update_doc` reads and tries to swap before giving up.
const DOC_TRIES: usize = 16;

/// A document's value, or `None` (logged) when it does not decode as a `T`.
fn decode_doc<T: DeserializeOwned>(name: &str, bytes: &[u8]) -> Option<T> {
    match serde_json::from_slice(bytes) {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::warn!(document = name, %error, "a stored document does not decode: taken as absent");
            None
        }
    }
}

/// How often a live connection looks at its session when nothing nudges it.
fn recheck_period(store: &Store) -> Duration {
    store.options.cache_ttl.max(Duration::from_secs(1))
}

/// A session with open connections: the nudge that makes them look again
/// (true: end, whatever they find), and whose the session is.
struct Live {
    nudge: tokio::sync::watch::Sender<bool>,
    user: Arc<std::sync::Mutex<Option<String>>>,
}

/// One connection's registration for its session's nudges; dropped, it is
/// gone, and the session's entry with the last one.
struct Listening {
    store: Arc<Store>,
    key: Key,
    nudges: tokio::sync::watch::Receiver<bool>,
    user: Arc<std::sync::Mutex<Option<String>>>,
}

impl Listening {
    fn new(store: &Arc<Store>, key: Key) -> Listening {
        let mut live = store.live.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = || Live {
            nudge: tokio::sync::watch::channel(false).0,
            user: Arc::default(),
        };
        let entry = live.entry(key.clone()).or_insert_with(fresh);
        // Connections told to end are going: a new one starts afresh (they
        // keep the value they were told).
        if *entry.nudge.borrow() {
            *entry = fresh();
        }
        let (nudges, user) = (entry.nudge.subscribe(), entry.user.clone());
        drop(live);
        Listening {
            store: store.clone(),
            key,
            nudges,
            user,
        }
    }

    /// The session is `user`'s (`end_live_of` finds it by that).
    fn user_is(&self, user: Option<&str>) {
        let mut known = self.user.lock().unwrap_or_else(|p| p.into_inner());
        if known.is_none() {
            *known = user.map(str::to_owned);
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let mut live = self.store.live.lock().unwrap_or_else(|p| p.into_inner());
        // This receiver is the one still counted; an entry made afresh
        // since (`Listening::new`) is another's.
        if live.get(&self.key).is_some_and(|entry| {
            Arc::ptr_eq(&entry.user, &self.user) && entry.nudge.receiver_count() <= 1
        }) {
            live.remove(&self.key);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! The contract every backend keeps, run against each of them.

    use super::*;
    use crate::identity::Identity;

    fn identity(name: &str) -> Identity {
        Identity::test(name, &[])
    }

    fn store(backend: Arc<dyn Backend>) -> Store {
        Store::new(backend, StoreOptions::for_idle(Duration::from_secs(3600)))
    }

    /// The pre-auth bound follows every way a record comes and goes:
    /// promotion at login, deletion, expiry.
    pub async fn pre_auth_records_are_bounded(backend: Arc<dyn Backend>) {
        let store = store(backend);
        let now = now_secs();
        let ttl = Duration::from_secs(60);
        let pre = || Session::pre_auth(now, ttl);
        let full = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Full(2)));
        store.put("p1", &pre(), ttl).await.unwrap();
        store.put("p2", &pre(), ttl).await.unwrap();
        assert!(full(store.put("p3", &pre(), ttl).await));
        // Replacing an existing pre-auth record is not a new one.
        store.put("p2", &pre(), ttl).await.unwrap();
        // p1 logs in: its record is no longer pre-auth.
        let alice = Session::authenticated(identity("alice"), now, ttl);
        store.put("p1", &alice, ttl).await.unwrap();
        store.put("p3", &pre(), ttl).await.unwrap();
        assert!(full(store.put("p4", &pre(), ttl).await));
        store.delete("p3").await.unwrap();
        store.put("p4", &pre(), ttl).await.unwrap();
        // Expired ones make room when the store is full.
        store.put("p2", &pre(), Duration::ZERO).await.unwrap();
        store.put("p4", &pre(), Duration::ZERO).await.unwrap();
        store.put("p6", &pre(), ttl).await.unwrap();
        store.put("p7", &pre(), ttl).await.unwrap();
        assert!(full(store.put("p8", &pre(), ttl).await));
        assert_eq!(store.delete_all_for_user("alice").await.unwrap(), 1);
        assert!(
            full(store.put("p8", &pre(), ttl).await),
            "alice was not pre-auth"
        );
    }

    pub async fn records_expire_and_end_per_user(backend: Arc<dyn Backend>) {
        let store = store(backend);
        let now = now_secs();
        let ttl = Duration::from_secs(60);
        for (id, user) in [("a1", "alice"), ("a2", "alice"), ("b1", "bob")] {
            let session = Session::authenticated(identity(user), now, ttl);
            store.put(id, &session, ttl).await.unwrap();
        }
        store
            .put("p1", &Session::pre_auth(now, ttl), ttl)
            .await
            .unwrap();
        assert_eq!(store.count_authenticated().await.unwrap(), 3);
        let listed = store.list(Some("alice")).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|l| l.user == "alice" && l.id.len() == 64));
        assert!(listed.iter().any(|l| l.id == Key::of("a1").as_str()));
        assert_eq!(
            store.list(Some("ALICE")).await.unwrap().len(),
            2,
            "any case"
        );
        assert_eq!(store.delete_all_for_user("Alice").await.unwrap(), 2);
        assert!(store.get("a1").await.unwrap().is_none());
        assert!(store.get("b1").await.unwrap().is_some());
        assert!(store.get("p1").await.unwrap().is_some());
        // A record whose own lifetime has passed is gone, whatever its TTL.
        let mut dead = Session::authenticated(identity("carol"), now, ttl);
        dead.expires = now - 1;
        store.put("c1", &dead, ttl).await.unwrap();
        assert!(store.get("c1").await.unwrap().is_none());
        let zed = Session::authenticated(identity("zed"), now, ttl);
        store.put("z", &zed, Duration::ZERO).await.unwrap();
        assert!(store.get("z").await.unwrap().is_none());
        assert!(store.authenticated("z", ttl).await.unwrap().is_none());
        // The hot path: authenticated only, and it pushes the idle deadline.
        assert!(
            store.authenticated("p1", ttl).await.unwrap().is_none(),
            "pre-auth has no identity"
        );
        let bob = Session::authenticated(identity("bob"), now, ttl);
        store.put("b2", &bob, Duration::from_secs(1)).await.unwrap();
        let found = store
            .authenticated("b2", Duration::from_secs(30))
            .await
            .unwrap();
        let name = found.and_then(|s| s.identity.as_ref().map(|i| i.username.clone()));
        assert_eq!(name.as_deref(), Some("bob"));
        store.touch("b2", Duration::from_secs(30)).await.unwrap();
        let record = store.backend.get(&Key::of("b2")).await.unwrap().unwrap();
        assert!(record.deadline >= now + 29, "idle deadline refreshed");
        // Touch never shortens.
        store.touch("b2", Duration::from_secs(2)).await.unwrap();
        let record = store.backend.get(&Key::of("b2")).await.unwrap().unwrap();
        assert!(record.deadline >= now + 29);
        // Deleted: gone from the hot path at once, cache or not.
        assert!(store
            .authenticated_now("b2", ttl)
            .is_some_and(|r| r.unwrap().is_some()));
        store.delete("b2").await.unwrap();
        assert!(store.authenticated("b2", ttl).await.unwrap().is_none());
        // The sweep takes back what reads already ignore, and only that.
        let purged = store.purge_expired().await.unwrap();
        assert!(purged == 2 || store.kind() == "redis", "c1 and z: {purged}");
        assert!(store.get("b1").await.unwrap().is_some());
        assert!(store.get("p1").await.unwrap().is_some());
    }

    /// Keys, not ids: nothing the backend lists is a session id.
    pub async fn the_backend_sees_keys_not_ids(backend: Arc<dyn Backend>) {
        let store = store(backend.clone());
        let now = now_secs();
        let ttl = Duration::from_secs(60);
        let id = crate::session::random_token();
        let session = Session::authenticated(identity("alice"), now, ttl);
        store.put(&id, &session, ttl).await.unwrap();
        let listed = backend.list(None).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, Key::of(&id));
        assert_ne!(listed[0].0.as_str(), id);
        assert!(backend.get(&Key::of(&id)).await.unwrap().is_some());
        assert!(store.delete_key(&listed[0].0).await.unwrap());
        assert!(store.get(&id).await.unwrap().is_none());
    }

    /// A live connection hears of its session's end: sign-out, a delete
    /// through another front on the same backend (another process), and
    /// expiry; and nothing else ends it.
    pub async fn live_connections_hear_their_session_end(
        one: Arc<dyn Backend>,
        other: Option<Arc<dyn Backend>>,
    ) {
        let store = Arc::new(store(one));
        store.watch(Duration::from_millis(50)).await;
        let now = now_secs();
        let ttl = Duration::from_secs(600);
        let idle = Duration::from_secs(600);
        let put = |id: &'static str, session: Session| {
            let store = store.clone();
            async move { store.put(id, &session, ttl).await.unwrap() }
        };
        put("l1", Session::authenticated(identity("alice"), now, ttl)).await;
        let ending = store.ended("l1".into(), idle);
        tokio::pin!(ending);
        // Alive: the connection stays.
        assert!(
            tokio::time::timeout(Duration::from_millis(600), ending.as_mut())
                .await
                .is_err()
        );
        // Timed from when the deletion is done: a loaded machine's commit
        // (an fsync) is not the watch's delay.
        store.delete("l1").await.unwrap();
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(1), ending)
            .await
            .expect("ended within 1 s of sign-out");
        let took = started.elapsed();
        assert!(took < Duration::from_millis(400), "{took:?}");

        // Ended by another process sharing the backend.
        if let Some(other) = other {
            put("l2", Session::authenticated(identity("bob"), now, ttl)).await;
            let ending = tokio::spawn(store.ended("l2".into(), idle));
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(!ending.is_finished());
            assert!(other.delete(&Key::of("l2")).await.unwrap());
            let started = std::time::Instant::now();
            tokio::time::timeout(Duration::from_secs(1), ending)
                .await
                .expect("ended within 1 s of a revocation elsewhere")
                .unwrap();
            assert!(started.elapsed() < Duration::from_secs(1));
        }

        // Expiry: a session with two seconds left ends on time.
        let mut short = Session::authenticated(identity("carol"), now, ttl);
        short.expires = now + 2;
        put("l3", short).await;
        let expiry = std::time::UNIX_EPOCH + Duration::from_secs(now + 2);
        store.ended("l3".into(), idle).await;
        let late = std::time::SystemTime::now()
            .duration_since(expiry)
            .expect("not before its expiry");
        assert!(late < Duration::from_secs(1), "{late:?} after expiry");
        // Every listener gone with its connection.
        assert!(store.live.lock().unwrap().is_empty());
    }

    /// Counters count and die a window after their last rise; marks rise
    /// once per value; both are the same for every front on the backend.
    pub async fn counters_and_marks_are_shared(one: Arc<dyn Backend>, other: Arc<dyn Backend>) {
        let window = Duration::from_millis(600);
        assert_eq!(one.count("t:alice", 0, window).await.unwrap(), 0);
        assert_eq!(one.count("t:alice", 1, window).await.unwrap(), 1);
        assert_eq!(other.count("t:alice", 1, window).await.unwrap(), 2);
        assert_eq!(one.count("t:alice", 0, window).await.unwrap(), 2);
        assert_eq!(other.count("t:bob", 0, window).await.unwrap(), 0);
        // Reading does not keep it alive; a rise does.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(one.count("t:alice", 1, window).await.unwrap(), 3);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(other.count("t:alice", 0, window).await.unwrap(), 3);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(other.count("t:alice", 0, window).await.unwrap(), 0);

        // Long enough that a slow commit on a loaded machine (redb's have
        // taken 800 ms) does not expire a mark before it is raised again.
        let ttl = Duration::from_millis(2000);
        assert!(one.raise("m:alice", 10, ttl).await.unwrap());
        assert!(
            !other.raise("m:alice", 10, ttl).await.unwrap(),
            "once per value"
        );
        assert!(!other.raise("m:alice", 9, ttl).await.unwrap(), "never back");
        assert!(other.raise("m:alice", 11, ttl).await.unwrap());
        assert!(one.raise("m:bob", 1, ttl).await.unwrap());
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        assert!(
            one.raise("m:alice", 5, ttl).await.unwrap(),
            "gone after its ttl"
        );
        // Dead ones are purged with the records.
        one.purge_expired().await.unwrap();
        assert_eq!(one.count("t:alice", 0, window).await.unwrap(), 0);
    }

    /// Documents swap on their exact bytes, once; are deleted or expire;
    /// and are the same for every front on the backend.
    pub async fn documents_swap_once(one: Arc<dyn Backend>, other: Arc<dyn Backend>) {
        let get = |backend: &Arc<dyn Backend>, name: &'static str| {
            let backend = backend.clone();
            async move { backend.doc_get(name).await.unwrap() }
        };
        let swap = |backend: &Arc<dyn Backend>,
                    name: &'static str,
                    expected: Option<&'static [u8]>,
                    new: Option<&'static [u8]>,
                    ttl: Option<Duration>| {
            let backend = backend.clone();
            async move { backend.doc_swap(name, expected, new, ttl).await.unwrap() }
        };
        assert_eq!(get(&one, "alice").await, None);
        assert!(swap(&one, "alice", None, Some(b"[1]"), None).await);
        assert!(
            !swap(&other, "alice", None, Some(b"[2]"), None).await,
            "once from absent"
        );
        assert_eq!(get(&other, "alice").await.as_deref(), Some(&b"[1]"[..]));
        // Anything but what it holds: refused, and the value stays.
        assert!(!swap(&other, "alice", Some(b"[9]"), Some(b"[2]"), None).await);
        assert!(
            !swap(&other, "alice", Some(b"[1] "), None, None).await,
            "bytes, not JSON"
        );
        assert_eq!(get(&one, "alice").await.as_deref(), Some(&b"[1]"[..]));
        assert!(swap(&other, "alice", Some(b"[1]"), Some(b"[2]"), None).await);
        assert!(
            !swap(&one, "alice", Some(b"[1]"), Some(b"[3]"), None).await,
            "the old value is used up"
        );
        // Deleted: absent, for everyone, and deleted once.
        assert!(swap(&one, "alice", Some(b"[2]"), None, None).await);
        assert_eq!(get(&other, "alice").await, None);
        assert!(!swap(&other, "alice", Some(b"[2]"), None, None).await);
        assert!(
            swap(&other, "alice", None, None, None).await,
            "absent, as expected"
        );
        // Empty and binary values are values, not absence.
        assert!(swap(&one, "bob", None, Some(b""), None).await);
        assert_eq!(get(&other, "bob").await, Some(Vec::new()));
        assert!(!swap(&other, "bob", None, Some(b"x"), None).await);
        assert!(swap(&other, "bob", Some(b""), Some(b"\xff\x00"), None).await);
        assert_eq!(get(&one, "bob").await.as_deref(), Some(&b"\xff\x00"[..]));

        // A ttl: gone when it passes, and absent then to a swap too. Every
        // write sets it afresh: again, or none (kept for good).
        // Margins of 0.8 s: a redb commit on a loaded machine has taken 0.8 s.
        let ttl = Some(Duration::from_secs(2));
        assert!(swap(&one, "carol", None, Some(b"1"), ttl).await);
        assert!(swap(&one, "dave", None, Some(b"1"), ttl).await);
        assert!(swap(&one, "dave", Some(b"1"), Some(b"2"), None).await);
        assert!(swap(&one, "erin", None, Some(b"1"), ttl).await);
        assert!(
            swap(&one, "zero", None, Some(b"1"), Some(Duration::ZERO)).await,
            "written, dead"
        );
        assert_eq!(get(&other, "zero").await, None);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(swap(&other, "erin", Some(b"1"), Some(b"2"), ttl).await);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(get(&other, "carol").await, None);
        assert!(!swap(&other, "carol", Some(b"1"), Some(b"2"), None).await);
        assert_eq!(get(&other, "dave").await.as_deref(), Some(&b"2"[..]));
        assert_eq!(get(&one, "erin").await.as_deref(), Some(&b"2"[..]));
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(get(&one, "erin").await, None);
        // The sweep keeps what lives.
        one.purge_expired().await.unwrap();
        assert_eq!(get(&other, "dave").await.as_deref(), Some(&b"2"[..]));
        assert_eq!(get(&other, "bob").await.as_deref(), Some(&b"\xff\x00"[..]));
        assert!(swap(&other, "carol", None, Some(b"3"), ttl).await);
    }

    /// `update_doc` through two fronts at once (two processes) loses no
    /// change and answers each once; a value that no longer decodes is
    /// absent, and replaced.
    pub async fn documents_update_without_losing_a_race(
        one: Arc<dyn Backend>,
        other: Arc<dyn Backend>,
    ) {
        let one = Arc::new(store(one));
        let two = Arc::new(store(other));
        let count = |store: Arc<Store>| {
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for _ in 0..50 {
                    let bump = |n: Option<u32>| {
                        let n = n.unwrap_or(0) + 1;
                        (Some(n), n)
                    };
                    answers.push(store.update_doc("counter", None, bump).await.unwrap());
                }
                answers
            })
        };
        let (a, b) = (count(one.clone()), count(two.clone()));
        let mut answers = [a.await.unwrap(), b.await.unwrap()].concat();
        answers.sort_unstable();
        assert_eq!(answers, (1..=100).collect::<Vec<u32>>());
        assert_eq!(two.doc::<u32>("counter").await.unwrap(), Some(100));

        // A recovery code used by two at once: by one of them.
        let codes = vec!["a".to_owned(), "b".to_owned()];
        let ttl = Some(Duration::from_secs(600));
        let set = one.update_doc("codes", ttl, |_: Option<Vec<String>>| {
            (Some(codes.clone()), ())
        });
        set.await.unwrap();
        let consume = |store: Arc<Store>| async move {
            let used = |codes: Option<Vec<String>>| {
                let mut codes = codes.unwrap_or_default();
                let had = codes.iter().any(|c| c == "a");
                codes.retain(|c| c != "a");
                (Some(codes), had)
            };
            store.update_doc("codes", ttl, used).await.unwrap()
        };
        let (x, y) = tokio::join!(consume(one.clone()), consume(two.clone()));
        assert!(x != y, "used once: {x} {y}");
        let left = one.doc::<Vec<String>>("codes").await.unwrap();
        assert_eq!(left, Some(vec!["b".to_owned()]));

        // Another shape than the one asked for: absent, then replaced.
        assert!(one
            .backend()
            .doc_swap("shape", None, Some(b"\"text\""), None)
            .await
            .unwrap());
        assert_eq!(two.doc::<u32>("shape").await.unwrap(), None);
        let was = two.update_doc("shape", None, |n: Option<u32>| (Some(7), n));
        assert_eq!(was.await.unwrap(), None);
        assert_eq!(one.doc::<u32>("shape").await.unwrap(), Some(7));
        // `None` deletes.
        let was = one.update_doc("shape", None, |n: Option<u32>| (None, n));
        assert_eq!(was.await.unwrap(), Some(7));
        assert_eq!(two.backend().doc_get("shape").await.unwrap(), None);
    }

    /// A backend on which every swap of a document loses a race: another
    /// writer changes it first.
    struct Raced(Arc<dyn Backend>);

    #[async_trait::async_trait]
    impl Backend for Raced {
        fn kind(&self) -> &'static str {
            self.0.kind()
        }
        async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
            self.0.get(key).await
        }
        async fn put(&self, key: &Key, record: Record) -> Result<(), StoreError> {
            self.0.put(key, record).await
        }
        async fn touch(&self, key: &Key, deadline: u64) -> Result<(), StoreError> {
            self.0.touch(key, deadline).await
        }
        async fn delete(&self, key: &Key) -> Result<bool, StoreError> {
            self.0.delete(key).await
        }
        async fn list(&self, user: Option<&str>) -> Result<Vec<(Key, Record)>, StoreError> {
            self.0.list(user).await
        }
        async fn purge_expired(&self) -> Result<usize, StoreError> {
            self.0.purge_expired().await
        }
        async fn revoked_since(&self, cursor: Option<u64>) -> Result<(u64, Vec<Key>), StoreError> {
            self.0.revoked_since(cursor).await
        }
        fn kept_secret(&self, fresh: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.kept_secret(fresh)
        }
        async fn count(&self, name: &str, by: u32, window: Duration) -> Result<u32, StoreError> {
            self.0.count(name, by, window).await
        }
        async fn raise(&self, name: &str, value: u64, ttl: Duration) -> Result<bool, StoreError> {
            self.0.raise(name, value, ttl).await
        }
        async fn doc_get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.doc_get(name).await
        }
        async fn doc_swap(
            &self,
            name: &str,
            expected: Option<&[u8]>,
            new: Option<&[u8]>,
            ttl: Option<Duration>,
        ) -> Result<bool, StoreError> {
            let stands = self.0.doc_get(name).await?;
            let other = stands.map_or(1, |b| b.len() + 1);
            let other = vec![b'0'; other];
            assert!(self.0.doc_swap(name, expected, Some(&other), None).await?);
            self.0.doc_swap(name, expected, new, ttl).await
        }
    }

    #[tokio::test]
    async fn update_doc_gives_up_on_a_document_that_keeps_changing() {
        let memory = Arc::new(super::super::MemoryBackend::new(2)) as Arc<dyn Backend>;
        let store = store(Arc::new(Raced(memory.clone())));
        let mut runs = 0;
        let failed = store
            .update_doc("busy", None, |n: Option<u32>| {
                runs += 1;
                (Some(n.unwrap_or(0) + 1), ())
            })
            .await;
        assert!(
            matches!(&failed, Err(StoreError::Contended(name, 16)) if name == "busy"),
            "{failed:?}"
        );
        assert_eq!(runs, 16);
        // What the other writer wrote stands.
        assert!(memory.doc_get("busy").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn memory_keeps_the_contract() {
        let memory = || Arc::new(super::super::MemoryBackend::new(2)) as Arc<dyn Backend>;
        pre_auth_records_are_bounded(memory()).await;
        records_expire_and_end_per_user(memory()).await;
        the_backend_sees_keys_not_ids(memory()).await;
        live_connections_hear_their_session_end(memory(), None).await;
        let one = memory();
        counters_and_marks_are_shared(one.clone(), one).await;
        let one = memory();
        documents_swap_once(one.clone(), one).await;
        let one = memory();
        documents_update_without_losing_a_race(one.clone(), one).await;
    }

    #[tokio::test]
    async fn embedded_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            Arc::new(super::super::EmbeddedBackend::open(&dir.path().join(name), 2).unwrap())
                as Arc<dyn Backend>
        };
        pre_auth_records_are_bounded(open("a.state")).await;
        records_expire_and_end_per_user(open("b.state")).await;
        the_backend_sees_keys_not_ids(open("c.state")).await;
        live_connections_hear_their_session_end(open("d.state"), Some(open("d.state"))).await;
        counters_and_marks_are_shared(open("e.state"), open("e.state")).await;
        documents_swap_once(open("f.state"), open("f.state")).await;
        documents_update_without_losing_a_race(open("g.state"), open("g.state")).await;
    }

    /// A `redis-server` of this test's own on a free loopback port, stopped
    /// on drop; `None` (loudly) when none is installed, unless CI demands it.
    pub struct RedisServer {
        child: std::process::Child,
        pub url: String,
        pub port: u16,
        /// Its certificates (TLS), a sentinel's config file.
        pub dir: tempfile::TempDir,
    }

    /// A certificate authority made for one test.
    fn test_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        (params.self_signed(&key).unwrap(), key)
    }

    fn free_port() -> Option<u16> {
        Some(
            std::net::TcpListener::bind("127.0.0.1:0")
                .ok()?
                .local_addr()
                .ok()?
                .port(),
        )
    }

    impl RedisServer {
        pub fn start() -> Option<RedisServer> {
            let port = free_port()?;
            let dir = tempfile::tempdir().unwrap();
            let args = ["--port".to_owned(), port.to_string()];
            Self::spawn(&args, port, format!("redis://127.0.0.1:{port}/0"), dir)
        }

        /// Speaking only TLS, with a certificate for 127.0.0.1 signed by a
        /// CA made here: its certificate is `ca_file()`.
        pub fn start_tls() -> Option<RedisServer> {
            let port = free_port()?;
            let dir = tempfile::tempdir().unwrap();
            let (ca, ca_key) = test_ca("flowgate test CA for Redis");
            let key = rcgen::KeyPair::generate().unwrap();
            let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            let path = |name: &str| dir.path().join(name).display().to_string();
            std::fs::write(path("ca.pem"), ca.pem()).unwrap();
            std::fs::write(path("redis.pem"), cert.pem()).unwrap();
            std::fs::write(path("redis.key"), key.serialize_pem()).unwrap();
            let args = [
                "--port".to_owned(),
                "0".to_owned(),
                "--tls-port".to_owned(),
                port.to_string(),
                "--tls-cert-file".to_owned(),
                path("redis.pem"),
                "--tls-key-file".to_owned(),
                path("redis.key"),
                "--tls-ca-cert-file".to_owned(),
                path("ca.pem"),
                "--tls-auth-clients".to_owned(),
                "no".to_owned(),
            ];
            Self::spawn(&args, port, format!("rediss://127.0.0.1:{port}/0"), dir)
        }

        /// A sentinel watching `master` as `mymaster`.
        pub fn start_sentinel(master: &RedisServer) -> Option<RedisServer> {
            let port = free_port()?;
            let dir = tempfile::tempdir().unwrap();
            let conf = dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {} 1\n",
                    master.port
                ),
            )
            .unwrap();
            let args = [conf.display().to_string(), "--sentinel".to_owned()];
            Self::spawn(&args, port, format!("redis://127.0.0.1:{port}"), dir)
        }

        pub fn ca_file(&self) -> std::path::PathBuf {
            self.dir.path().join("ca.pem")
        }

        fn spawn(
            args: &[String],
            port: u16,
            url: String,
            dir: tempfile::TempDir,
        ) -> Option<RedisServer> {
            let sentinel = args.iter().any(|a| a == "--sentinel");
            let mut command = std::process::Command::new("redis-server");
            command.args(args);
            if !sentinel {
                command
                    .args(["--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"]);
            }
            let child = command.stdout(std::process::Stdio::null()).spawn();
            let child = match child {
                Ok(child) => child,
                Err(_) => {
                    if std::env::var("FLOWGATE_REQUIRE_ALL").is_ok_and(|v| v == "1") {
                        panic!(
                            "redis-server is required (FLOWGATE_REQUIRE_ALL=1) but not installed"
                        );
                    }
                    eprintln!(
                        "SKIPPED: redis-server is not installed; install it to run this test"
                    );
                    return None;
                }
            };
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(RedisServer {
                child,
                url,
                port,
                dir,
            })
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The contract, the revocations heard across processes and the kept
    /// secret, on the Redis `open` opens a backend on (by key prefix).
    async fn redis_keeps_everything(open: impl Fn(&str) -> Arc<dyn Backend>) {
        pre_auth_records_are_bounded(open("a:")).await;
        records_expire_and_end_per_user(open("b:")).await;
        the_backend_sees_keys_not_ids(open("c:")).await;
        live_connections_hear_their_session_end(open("l:"), Some(open("l:"))).await;
        counters_and_marks_are_shared(open("t:"), open("t:")).await;
        documents_swap_once(open("n:"), open("n:")).await;
        documents_update_without_losing_a_race(open("o:"), open("o:")).await;
        // Two processes' fronts on one Redis: a deletion through one is
        // heard by the other, which drops its cached copy.
        let one = Arc::new(store(open("d:")));
        let two = Arc::new(store(open("d:")));
        two.watch(Duration::from_millis(50)).await;
        let now = now_secs();
        let ttl = Duration::from_secs(600);
        let session = Session::authenticated(identity("alice"), now, ttl);
        one.put("x", &session, ttl).await.unwrap();
        assert!(two.authenticated("x", ttl).await.unwrap().is_some());
        assert!(two.authenticated_now("x", ttl).unwrap().unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(300)).await;
        one.delete("x").await.unwrap();
        let mut waited = 0;
        while two.authenticated_now("x", ttl).is_some() {
            assert!(waited < 40, "still cached after 2 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += 1;
        }
        // The kept secret is one for all.
        let a = open("e:").kept_secret(b"first").unwrap();
        let b = open("e:").kept_secret(b"second").unwrap();
        assert_eq!(a, b);
    }

    #[tokio::test]
    async fn redis_keeps_the_contract() {
        let Some(redis) = RedisServer::start() else {
            return;
        };
        redis_keeps_everything(|prefix| {
            Arc::new(super::super::RedisBackend::new(&redis.url, prefix, 2).unwrap())
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn redis_over_tls_keeps_the_contract_and_checks_the_certificate() {
        use super::super::{RedisAt, RedisBackend};
        let Some(redis) = RedisServer::start_tls() else {
            return;
        };
        let ca = redis.ca_file();
        redis_keeps_everything(|prefix| {
            Arc::new(RedisBackend::open(RedisAt::Url(&redis.url), Some(&ca), prefix, 2).unwrap())
        })
        .await;
        // A CA that did not sign the server's certificate, or none (the
        // system's roots): no connection, and the error says why.
        let other = redis.dir.path().join("other-ca.pem");
        std::fs::write(&other, test_ca("some other CA").0.pem()).unwrap();
        for ca_file in [Some(other.as_path()), None] {
            let backend = RedisBackend::open(RedisAt::Url(&redis.url), ca_file, "f:", 2).unwrap();
            let refused = backend.get(&Key::of("a")).await.unwrap_err().to_string();
            assert!(
                refused.contains("invalid peer certificate") && refused.contains("UnknownIssuer"),
                "{ca_file:?}: {refused}"
            );
            let refused = backend.kept_secret(b"fresh").unwrap_err().to_string();
            assert!(refused.contains("UnknownIssuer"), "{refused}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn redis_through_a_sentinel_keeps_the_contract() {
        use super::super::{RedisAt, RedisBackend};
        let Some(master) = RedisServer::start() else {
            return;
        };
        let Some(sentinel) = RedisServer::start_sentinel(&master) else {
            return;
        };
        let sentinels = [sentinel.url.clone()];
        redis_keeps_everything(|prefix| {
            let at = RedisAt::Sentinels {
                urls: &sentinels,
                master: "mymaster",
            };
            Arc::new(RedisBackend::open(at, None, prefix, 2).unwrap())
        })
        .await;
        // A name the sentinel does not watch: refused, and said so.
        let at = RedisAt::Sentinels {
            urls: &sentinels,
            master: "othermaster",
        };
        let backend = RedisBackend::open(at, None, "g:", 2).unwrap();
        let refused = backend.get(&Key::of("a")).await.unwrap_err().to_string();
        assert!(refused.contains("othermaster"), "{refused}");
        assert!(refused.contains("no master"), "{refused}");
    }

    /// A cached session is answered without the backend, and forgotten
    /// once another process revokes it.
    #[tokio::test]
    async fn the_cache_answers_and_hears_of_revocations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.state");
        let one: Arc<dyn Backend> =
            Arc::new(super::super::EmbeddedBackend::open(&path, 10).unwrap());
        let store = Arc::new(store(one));
        let now = now_secs();
        let ttl = Duration::from_secs(600);
        let session = Session::authenticated(identity("alice"), now, ttl);
        store.put("a", &session, ttl).await.unwrap();
        assert!(
            store.authenticated_now("a", ttl).is_none(),
            "not cached yet"
        );
        assert!(store.authenticated("a", ttl).await.unwrap().is_some());
        assert!(store
            .authenticated_now("a", ttl)
            .unwrap()
            .unwrap()
            .is_some());
        // Another process (the CLI) ends it in the same file.
        let other = super::super::EmbeddedBackend::open(&path, 10).unwrap();
        store.watch(Duration::from_millis(50)).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(other.delete(&Key::of("a")).await.unwrap());
        let mut waited = 0;
        while store.authenticated_now("a", ttl).is_some() {
            assert!(waited < 40, "still cached after 2 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += 1;
        }
        assert!(store.authenticated("a", ttl).await.unwrap().is_none());
    }
}
