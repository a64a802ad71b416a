//! Sessions: the records behind the `flowgate_session` cookie, the
//! `SessionStore` seam that keeps them (memory now; embedded file and Redis
//! behind the same trait later), and the signed cookie value that names one.
//!
//! A session is either *pre-auth* (an anonymous visitor part-way through one
//! or more flows) or *authenticated* (an identity). Login never upgrades a
//! record in place: it writes a new one under a new id and deletes the old,
//! so a fixated id is worth nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::flow::FlowState;
use crate::identity::Identity;

/// One flow in progress inside a pre-auth session. `key` is `page:<id>` for a
/// login page (one per browser tab) or `api:<slug>` for the JSON API (one per
/// flow, as authentik keeps it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowSlot {
    pub key: String,
    pub slug: String,
    pub state: FlowState,
    pub updated: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds after which the session is dead whatever its activity.
    pub expires: u64,
    /// Per-session CSRF token for login forms, sign-out and (once logged in)
    /// executor POSTs.
    pub csrf: String,
    /// `None`: a pre-auth session, an anonymous visitor part-way through a login.
    #[serde(default)]
    pub identity: Option<Arc<Identity>>,
    /// Flows in progress (mostly in pre-auth sessions).
    #[serde(default)]
    pub flows: Vec<FlowSlot>,
    /// Authenticated: the slugs of the flows this session has been through.
    /// A route whose flow is not among them steps the user up through it.
    #[serde(default)]
    pub completed: Vec<String>,
    /// Authenticated: one of those flows checked a second factor.
    #[serde(default)]
    pub second_factor: bool,
    /// Authenticated by a remote executor: what it needs to check and end
    /// the remote's session (its cookie jar). Never logged, never sent to
    /// the browser.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor_session: Option<crate::flow::FlowState>,
    /// The remote's applications (`route.authentik_application`) whose
    /// policies refused this user, as of login or the last revalidation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_applications: Vec<String>,
}

/// How many flows one session holds at once; the least recently used goes first.
pub const MAX_FLOWS_PER_SESSION: usize = 8;

impl Session {
    pub fn pre_auth(now: u64, ttl: Duration) -> Session {
        Session {
            created: now,
            expires: now + ttl.as_secs(),
            csrf: random_token(),
            identity: None,
            flows: Vec::new(),
            completed: Vec::new(),
            second_factor: false,
            executor_session: None,
            refused_applications: Vec::new(),
        }
    }

    pub fn authenticated(identity: Identity, now: u64, lifetime: Duration) -> Session {
        Session {
            created: now,
            expires: now + lifetime.as_secs(),
            csrf: random_token(),
            identity: Some(Arc::new(identity)),
            flows: Vec::new(),
            completed: Vec::new(),
            second_factor: false,
            executor_session: None,
            refused_applications: Vec::new(),
        }
    }

    pub fn identity(&self) -> Option<&Arc<Identity>> {
        self.identity.as_ref()
    }

    pub fn is_pre_auth(&self) -> bool {
        self.identity.is_none()
    }

    pub fn flow(&self, key: &str) -> Option<&FlowSlot> {
        self.flows.iter().find(|f| f.key == key)
    }

    /// Store a flow's state (an empty state removes it), evicting the least
    /// recently used flow past `MAX_FLOWS_PER_SESSION`.
    pub fn set_flow(&mut self, key: &str, slug: &str, state: FlowState, now: u64) {
        self.flows.retain(|f| f.key != key);
        if state.is_empty() {
            return;
        }
        self.flows.push(FlowSlot {
            key: key.to_owned(),
            slug: slug.to_owned(),
            state,
            updated: now,
        });
        if self.flows.len() > MAX_FLOWS_PER_SESSION {
            self.flows.sort_by_key(|f| f.updated);
            let excess = self.flows.len() - MAX_FLOWS_PER_SESSION;
            self.flows.drain(..excess);
        }
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether two secrets (tokens, MACs, cookie values) are the same, in time
/// that does not depend on where they differ.
pub fn tokens_equal(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    // `ct_eq` on slices of different lengths is false.
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// 32 random bytes, base64url: session ids, CSRF tokens, flow ids.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store refuses new pre-auth sessions: too many logins in progress.
    #[error("session store is full ({0} sessions)")]
    Full(usize),
    /// The backing service failed (later: Redis down).
    #[error("session store unavailable: {0}")]
    Unavailable(String),
}

/// Where sessions live. Every method is one round trip; implementations must
/// not hold a lock across an `.await`.
#[async_trait]
pub trait SessionStore: Send + Sync {
    async fn get(&self, id: &str) -> Result<Option<Session>, StoreError>;
    /// Insert or replace, alive for `ttl` from now unless touched.
    async fn put(&self, id: &str, session: &Session, ttl: Duration) -> Result<(), StoreError>;
    /// Extend the life of an existing record to `ttl` from now.
    async fn touch(&self, id: &str, ttl: Duration) -> Result<(), StoreError>;
    async fn delete(&self, id: &str) -> Result<(), StoreError>;
    /// End every authenticated session of one user; returns how many.
    async fn delete_all_for_user(&self, username: &str) -> Result<usize, StoreError>;
    /// Number of live authenticated sessions (for metrics).
    async fn count_authenticated(&self) -> Result<usize, StoreError>;
    /// The hot path: an authenticated, live session, its idle deadline
    /// pushed to `idle` from now (never past the session's own expiry).
    /// Pre-auth or missing sessions: `None`.
    async fn authenticated(
        &self,
        id: &str,
        idle: Duration,
    ) -> Result<Option<Arc<Session>>, StoreError> {
        let Some(session) = self.get(id).await? else {
            return Ok(None);
        };
        if session.identity.is_none() {
            return Ok(None);
        }
        let left = session.expires.saturating_sub(now_secs());
        self.touch(id, idle.min(Duration::from_secs(left))).await?;
        Ok(Some(Arc::new(session)))
    }
    /// `authenticated`, answered without waiting, by stores that can (the
    /// in-process one): the HTTP/1.1 fast lane asks this first. `None`:
    /// this store needs a round trip; the request takes the general path,
    /// which awaits `authenticated`.
    fn authenticated_now(
        &self,
        _id: &str,
        _idle: Duration,
    ) -> Option<Result<Option<Arc<Session>>, StoreError>> {
        None
    }
    /// Drop expired records; stores that expire by themselves (Redis TTLs)
    /// need not do anything. Returns how many went.
    async fn purge_expired(&self) -> Result<usize, StoreError> {
        Ok(0)
    }
}

struct Entry {
    session: Arc<Session>,
    /// Unix seconds; atomic so that refreshing it needs only the read lock.
    deadline: AtomicU64,
}

impl Entry {
    fn live(&self, now: u64) -> bool {
        self.deadline.load(Ordering::Relaxed) > now && self.session.expires > now
    }
}

/// In-process store: a hash map behind a std `RwLock` (never held across an
/// await: every method is synchronous inside). Pre-auth records are bounded,
/// since anyone can create them.
pub struct MemoryStore {
    map: RwLock<Records>,
    max_pre_auth: usize,
}

/// The records, and how many of them are pre-auth: kept under the same
/// lock, so that creating a pre-auth session never scans the map.
#[derive(Default)]
struct Records {
    entries: HashMap<String, Entry>,
    pre_auth: usize,
}

impl Records {
    fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    fn insert(&mut self, id: String, entry: Entry) {
        let added = is_pre_auth(&entry.session) as usize;
        if let Some(old) = self.entries.insert(id, entry) {
            self.pre_auth -= is_pre_auth(&old.session) as usize;
        }
        self.pre_auth += added;
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.entries.remove(id) {
            self.pre_auth -= is_pre_auth(&old.session) as usize;
        }
    }

    /// Keep the records `keep` says yes to; how many went.
    fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) -> usize {
        let before = self.entries.len();
        let mut pre_auth_gone = 0;
        self.entries.retain(|_, entry| {
            let kept = keep(entry);
            pre_auth_gone += (!kept && is_pre_auth(&entry.session)) as usize;
            kept
        });
        self.pre_auth -= pre_auth_gone;
        before - self.entries.len()
    }
}

impl MemoryStore {
    pub fn new(max_pre_auth: usize) -> MemoryStore {
        MemoryStore {
            map: RwLock::new(Records::default()),
            max_pre_auth,
        }
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

impl MemoryStore {
    /// A live authenticated session, its idle deadline pushed out: one
    /// read-locked lookup, no copy.
    fn lookup(&self, id: &str, idle: Duration) -> Option<Arc<Session>> {
        let now = now_secs();
        let map = self.read();
        let entry = map.get(id).filter(|e| e.live(now))?;
        entry.session.identity.as_ref()?;
        let deadline = (now + idle.as_secs()).min(entry.session.expires);
        entry.deadline.fetch_max(deadline, Ordering::Relaxed);
        Some(entry.session.clone())
    }
}

fn is_pre_auth(session: &Session) -> bool {
    session.is_pre_auth()
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn get(&self, id: &str) -> Result<Option<Session>, StoreError> {
        let now = now_secs();
        let map = self.read();
        Ok(map
            .get(id)
            .filter(|e| e.live(now))
            .map(|e| Session::clone(&e.session)))
    }

    async fn put(&self, id: &str, session: &Session, ttl: Duration) -> Result<(), StoreError> {
        let now = now_secs();
        let mut map = self.write();
        if is_pre_auth(session) && map.pre_auth >= self.max_pre_auth && map.get(id).is_none() {
            // Full, unless some have expired: only then a scan.
            map.retain(|e| e.live(now));
            if map.pre_auth >= self.max_pre_auth {
                return Err(StoreError::Full(map.pre_auth));
            }
        }
        map.insert(
            id.to_owned(),
            Entry {
                session: Arc::new(session.clone()),
                deadline: AtomicU64::new(now + ttl.as_secs()),
            },
        );
        Ok(())
    }

    async fn touch(&self, id: &str, ttl: Duration) -> Result<(), StoreError> {
        let now = now_secs();
        if let Some(entry) = self.read().get(id) {
            entry.deadline.store(now + ttl.as_secs(), Ordering::Relaxed);
        }
        Ok(())
    }

    async fn authenticated(
        &self,
        id: &str,
        idle: Duration,
    ) -> Result<Option<Arc<Session>>, StoreError> {
        Ok(self.lookup(id, idle))
    }

    fn authenticated_now(
        &self,
        id: &str,
        idle: Duration,
    ) -> Option<Result<Option<Arc<Session>>, StoreError>> {
        Some(Ok(self.lookup(id, idle)))
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.write().remove(id);
        Ok(())
    }

    async fn delete_all_for_user(&self, username: &str) -> Result<usize, StoreError> {
        let mut map = self.write();
        Ok(map.retain(|e| e.session.identity().is_none_or(|i| i.username != username)))
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        let now = now_secs();
        Ok(self.write().retain(|e| e.live(now)))
    }

    async fn count_authenticated(&self) -> Result<usize, StoreError> {
        let now = now_secs();
        Ok(self
            .read()
            .entries
            .values()
            .filter(|e| e.live(now) && e.session.identity().is_some())
            .count())
    }
}

/// Logins started per client address, in fixed windows of the pre-auth
/// lifetime: one address cannot take every pre-auth slot. In memory, per
/// process (it bounds what this process stores).
#[derive(Default)]
pub struct ClientStarts {
    map: std::sync::Mutex<HashMap<std::net::IpAddr, (u64, usize)>>,
}

impl ClientStarts {
    /// Count one start for `client`, if it has started fewer than `limit`
    /// in the `window` (seconds) that holds `now`.
    pub fn admit(&self, client: std::net::IpAddr, limit: usize, window: u64, now: u64) -> bool {
        let window = window.max(1);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= 65_536 {
            // Many addresses: forget those whose window has passed.
            map.retain(|_, (since, _)| now < *since + window);
        }
        let entry = map.entry(client).or_insert((now, 0));
        if now >= entry.0 + window {
            *entry = (now, 0);
        }
        if entry.1 >= limit {
            return false;
        }
        entry.1 += 1;
        true
    }
}

/// Signs and checks cookie values: `<id>.<mac>`, both base64url, the MAC an
/// HMAC-SHA256 of the id under a key derived from the configured secret. A
/// value that fails the check never reaches the store.
#[derive(Clone)]
pub struct CookieSigner {
    /// The MAC with the key already absorbed; cloned for each use.
    keyed: HmacSha256,
}

type HmacSha256 = Hmac<Sha256>;

impl CookieSigner {
    pub fn new(secret: &[u8]) -> CookieSigner {
        let mut hasher = Sha256::new();
        hasher.update(b"flowgate cookie signing key v1\0");
        hasher.update(secret);
        let key: [u8; 32] = hasher.finalize().into();
        CookieSigner {
            // HMAC takes keys of any length; 32 bytes cannot fail.
            keyed: <HmacSha256 as Mac>::new_from_slice(&key).expect("HMAC accepts a 32-byte key"),
        }
    }

    fn mac(&self) -> HmacSha256 {
        self.keyed.clone()
    }

    pub fn sign(&self, id: &str) -> String {
        let mut mac = self.mac();
        mac.update(id.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{id}.{tag}")
    }

    /// A value bound to `id` for one `purpose` (a pre-auth session's CSRF
    /// token, a login page's flow id): anyone can check it who holds the
    /// secret, nobody can make one without it, and nothing is stored.
    /// `purpose` ends in a NUL, which no id contains, so these MACs never
    /// equal a cookie signature.
    pub fn derive(&self, purpose: &str, id: &str) -> String {
        let mut mac = self.mac();
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(id.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// The session id inside a cookie value, if the signature holds
    /// (compared in constant time).
    pub fn verify<'v>(&self, value: &'v str) -> Option<&'v str> {
        let (id, tag) = value.rsplit_once('.')?;
        if id.is_empty() || id.len() > 64 {
            return None;
        }
        let mut raw = [0u8; 32];
        if tag.len() != 43 || URL_SAFE_NO_PAD.decode_slice(tag, &mut raw) != Ok(32) {
            return None;
        }
        let mut mac = self.mac();
        mac.update(id.as_bytes());
        mac.verify_slice(&raw).ok()?;
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(name: &str) -> Identity {
        Identity::test(name, &[])
    }

    #[test]
    fn derived_values_are_bound_to_purpose_and_id_and_are_no_signatures() {
        let signer = CookieSigner::new(b"a secret of reasonable length here");
        let other = CookieSigner::new(b"another secret of reasonable length");
        let csrf = signer.derive("pre-auth csrf", "abc");
        assert_eq!(csrf, signer.derive("pre-auth csrf", "abc"));
        assert_ne!(csrf, signer.derive("flow id", "abc"));
        assert_ne!(csrf, signer.derive("pre-auth csrf", "abd"));
        assert_ne!(csrf, other.derive("pre-auth csrf", "abc"));
        // Never a cookie signature: no derived value verifies as one.
        assert!(signer.verify(&format!("abc.{csrf}")).is_none());
        let tag = signer.sign("abc").rsplit_once('.').unwrap().1.to_owned();
        assert_ne!(tag, signer.derive("", "abc"));
    }

    #[test]
    fn signed_value_round_trips_and_tampering_fails() {
        let signer = CookieSigner::new(b"a secret of reasonable length here");
        let value = signer.sign("abc123");
        assert_eq!(signer.verify(&value), Some("abc123"));
        let tampered = value.replacen("abc123", "abc124", 1);
        assert_eq!(signer.verify(&tampered), None);
        assert_eq!(signer.verify("abc123"), None);
        assert_eq!(signer.verify("abc123."), None);
        assert_eq!(signer.verify(".xyz"), None);
        let other = CookieSigner::new(b"another secret entirely, also long");
        assert_eq!(other.verify(&value), None);
    }

    /// The pre-auth count follows every way a record comes and goes:
    /// promotion at login, deletion, expiry.
    #[tokio::test]
    async fn pre_auth_records_are_counted_through_promotion_deletion_and_expiry() {
        let store = MemoryStore::new(2);
        let now = now_secs();
        let ttl = Duration::from_secs(60);
        let pre = || Session::pre_auth(now, ttl);
        let full = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Full(2)));
        store.put("p1", &pre(), ttl).await.unwrap();
        store.put("p2", &pre(), ttl).await.unwrap();
        assert!(full(store.put("p3", &pre(), ttl).await));
        // p1 logs in: its record is no longer pre-auth.
        let alice = Session::authenticated(identity("alice"), now, ttl);
        store.put("p1", &alice, ttl).await.unwrap();
        store.put("p3", &pre(), ttl).await.unwrap();
        assert!(full(store.put("p4", &pre(), ttl).await));
        store.delete("p3").await.unwrap();
        store.put("p4", &pre(), ttl).await.unwrap();
        // Expired ones make room when the store is full (p2 and p4 expire).
        store.put("p5", &pre(), Duration::ZERO).await.unwrap_err();
        let quick = Duration::from_secs(1);
        store
            .put("p2", &Session::pre_auth(now, quick), Duration::ZERO)
            .await
            .unwrap();
        store
            .put("p4", &Session::pre_auth(now, quick), Duration::ZERO)
            .await
            .unwrap();
        store.put("p6", &pre(), ttl).await.unwrap();
        store.put("p7", &pre(), ttl).await.unwrap();
        assert!(full(store.put("p8", &pre(), ttl).await));
        assert_eq!(store.read().pre_auth, 2);
        assert_eq!(store.purge_expired().await.unwrap(), 0);
        assert_eq!(store.delete_all_for_user("alice").await.unwrap(), 1);
        assert_eq!(store.read().pre_auth, 2);
    }

    #[tokio::test]
    async fn memory_store_expires_bounds_and_deletes_per_user() {
        let store = MemoryStore::new(2);
        let now = now_secs();
        let ttl = Duration::from_secs(60);
        store
            .put("p1", &Session::pre_auth(now, ttl), ttl)
            .await
            .unwrap();
        store
            .put("p2", &Session::pre_auth(now, ttl), ttl)
            .await
            .unwrap();
        assert!(matches!(
            store.put("p3", &Session::pre_auth(now, ttl), ttl).await,
            Err(StoreError::Full(2))
        ));
        // replacing an existing pre-auth record is not a new one
        store
            .put("p2", &Session::pre_auth(now, ttl), ttl)
            .await
            .unwrap();
        // authenticated sessions are not bounded by the pre-auth limit
        store
            .put(
                "a1",
                &Session::authenticated(identity("alice"), now, ttl),
                ttl,
            )
            .await
            .unwrap();
        store
            .put(
                "a2",
                &Session::authenticated(identity("alice"), now, ttl),
                ttl,
            )
            .await
            .unwrap();
        store
            .put(
                "b1",
                &Session::authenticated(identity("bob"), now, ttl),
                ttl,
            )
            .await
            .unwrap();
        assert_eq!(store.count_authenticated().await.unwrap(), 3);
        assert_eq!(store.delete_all_for_user("alice").await.unwrap(), 2);
        assert!(store.get("a1").await.unwrap().is_none());
        assert!(store.get("b1").await.unwrap().is_some());
        // a record whose own lifetime has passed is gone, whatever its TTL
        let mut dead = Session::authenticated(identity("carol"), now, ttl);
        dead.expires = now - 1;
        store.put("c1", &dead, ttl).await.unwrap();
        assert!(store.get("c1").await.unwrap().is_none());
        store
            .put(
                "z",
                &Session::authenticated(identity("zed"), now, ttl),
                Duration::ZERO,
            )
            .await
            .unwrap();
        assert!(store.get("z").await.unwrap().is_none());
        // the hot path: authenticated only, and it pushes the idle deadline
        assert!(
            store.authenticated("p1", ttl).await.unwrap().is_none(),
            "pre-auth has no identity"
        );
        let short = Duration::from_secs(1);
        store
            .put(
                "b2",
                &Session::authenticated(identity("bob"), now, ttl),
                short,
            )
            .await
            .unwrap();
        let bob = store
            .authenticated("b2", Duration::from_secs(30))
            .await
            .unwrap();
        let name = bob.and_then(|s| s.identity.as_ref().map(|i| i.username.clone()));
        assert_eq!(name.as_deref(), Some("bob"));
        let deadline = store
            .read()
            .get("b2")
            .unwrap()
            .deadline
            .load(Ordering::Relaxed);
        assert!(deadline >= now + 29, "idle deadline refreshed");
        store.delete("b2").await.unwrap();
        // the sweep takes back what reads already ignore, and only that
        assert_eq!(store.purge_expired().await.unwrap(), 2, "c1 and z");
        assert!(store.get("b1").await.unwrap().is_some());
        assert!(store.get("p1").await.unwrap().is_some());
    }

    #[test]
    fn logins_started_per_client_are_bounded_per_window() {
        let starts = ClientStarts::default();
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        assert!((0..3).all(|_| starts.admit(a, 3, 60, 1000)));
        assert!(
            !starts.admit(a, 3, 60, 1010),
            "a fourth from a, same window"
        );
        assert!(starts.admit(b, 3, 60, 1010), "b is not held up by a");
        assert!(starts.admit(a, 3, 60, 1060), "a new window");
    }

    #[test]
    fn flows_per_session_are_bounded_oldest_first() {
        let mut s = Session::pre_auth(0, Duration::from_secs(60));
        for i in 0..(MAX_FLOWS_PER_SESSION as u64 + 3) {
            s.set_flow(
                &format!("page:{i}"),
                "f",
                FlowState(serde_json::json!({"i": i})),
                i,
            );
        }
        assert_eq!(s.flows.len(), MAX_FLOWS_PER_SESSION);
        assert!(s.flow("page:0").is_none());
        assert!(s
            .flow(&format!("page:{}", MAX_FLOWS_PER_SESSION + 2))
            .is_some());
    }
}
