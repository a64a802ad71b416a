//! Sessions: the records behind the `flowgate_session` cookie, the
//! `SessionStore` seam that keeps them, and the signed cookie value that
//! names one.
//!
//! Every store is one `Store` (`front`): it names records by the hash of
//! their id (`Key`), answers the hot path from a process-local cache, writes
//! the sliding idle deadline back at most once per interval, and hears of
//! revocations from other processes. Behind it, a `Backend` keeps the
//! records: `memory` (tests, the demo), `embedded` (one redb file, the
//! default) or `redis` (replicas).
//!
//! A session is either *pre-auth* (an anonymous visitor part-way through one
//! or more flows) or *authenticated* (an identity). Login never upgrades a
//! record in place: it writes a new one under a new id and deletes the old,
//! so a fixated id is worth nothing.

mod embedded;
mod front;
mod memory;
mod redis;

use std::collections::HashMap;
use std::sync::Arc;
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

pub use embedded::EmbeddedBackend;
pub use front::{Listed, Store, StoreOptions};
pub use memory::MemoryBackend;
pub use redis::{RedisAt, RedisBackend};

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

/// Unix milliseconds (counters and marks expire more finely than records).
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
    /// The backing file or service failed.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// Document `0` changed under every one of `Store::update_doc`'s tries.
    #[error("document {0} kept changing: gave up after {1} tries")]
    Contended(String, usize),
}

impl StoreError {
    pub(crate) fn unavailable(what: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(what.to_string())
    }
}

/// What `doc_swap` writes: `new` and, unless it is kept for good, its
/// lifetime in milliseconds. A ttl under a millisecond writes nothing.
fn doc_write(new: Option<&[u8]>, ttl: Option<Duration>) -> Option<(&[u8], Option<u64>)> {
    let ms = ttl.map(|t| t.as_millis().min(u64::MAX as u128) as u64);
    new.filter(|_| ms != Some(0)).map(|bytes| (bytes, ms))
}

/// What a store names a session by: the SHA-256 of its id, in hex. A dump
/// of the store, or of its admin listing, yields no id, so no cookie.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key(String);

impl Key {
    pub fn of(id: &str) -> Key {
        let digest = Sha256::digest(id.as_bytes());
        let mut hex = String::with_capacity(64);
        for byte in digest {
            use std::fmt::Write as _;
            let _ = write!(hex, "{byte:02x}");
        }
        Key(hex)
    }

    /// A key as printed by `sessions list`: 64 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Key> {
        (text.len() == 64
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Key(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A session as a backend keeps it: the record and its idle deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub session: Session,
    /// Unix seconds: gone after this unless touched.
    pub deadline: u64,
}

impl Record {
    pub fn live(&self, now: u64) -> bool {
        self.deadline > now && self.session.expires > now
    }

    /// When the record dies if nothing touches it.
    pub fn dies(&self) -> u64 {
        self.deadline.min(self.session.expires)
    }
}

/// Where the records are kept, by key. Each call may be a round trip (a
/// file, a network); none holds a lock across an `.await`. Every backend
/// passes the same contract tests (`front::tests`).
#[async_trait]
pub trait Backend: Send + Sync {
    /// `memory`, `embedded` or `redis`, for log lines.
    fn kind(&self) -> &'static str;
    /// A live record.
    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError>;
    /// Insert or replace. A new pre-auth record past the bound is `Full`.
    async fn put(&self, key: &Key, record: Record) -> Result<(), StoreError>;
    /// Push a record's idle deadline out to `deadline` (never back).
    async fn touch(&self, key: &Key, deadline: u64) -> Result<(), StoreError>;
    /// Remove a record and tell every process sharing the store; whether
    /// it was there.
    async fn delete(&self, key: &Key) -> Result<bool, StoreError>;
    /// Live authenticated records, of one user or of all.
    async fn list(&self, user: Option<&str>) -> Result<Vec<(Key, Record)>, StoreError>;
    /// Drop what has died; how many went. Stores whose entries expire by
    /// themselves (Redis TTLs) have nothing to do.
    async fn purge_expired(&self) -> Result<usize, StoreError>;
    /// Keys deleted by any process since `cursor` (`None`: from now on),
    /// and the cursor to ask with next time.
    async fn revoked_since(&self, cursor: Option<u64>) -> Result<(u64, Vec<Key>), StoreError>;
    /// The cookie-signing secret the store keeps for configs that name
    /// none: the one kept already, or `fresh`, kept from now on. `None`:
    /// this backend keeps nothing past the process. Called once, at start.
    fn kept_secret(&self, fresh: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Counter `name` plus `by` (0 only reads it), alive `window` after
    /// its last rise; its value now (0 when it never was or has died).
    /// The brute-force throttle counts failures here, so every process on
    /// the store counts against the same limit.
    async fn count(&self, name: &str, by: u32, window: Duration) -> Result<u32, StoreError>;
    /// Raise mark `name` to `value`, kept for `ttl`; whether it rose (not:
    /// it stands at `value` or past it already). A TOTP time step is
    /// accepted once, by whichever process sees it first.
    async fn raise(&self, name: &str, value: u64, ttl: Duration) -> Result<bool, StoreError>;
    /// Document `name`: an opaque value (JSON bytes) kept until replaced or
    /// until its `ttl` passes; `None` when absent or expired.
    async fn doc_get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Replace document `name` with `new` (`None`: delete it) only if it
    /// holds `expected` now (`None`: absent, or expired); whether it did.
    /// A compare-and-swap: two processes consuming one recovery code
    /// cannot both succeed. `ttl` `None`: kept for good; under a
    /// millisecond: gone at once, as if deleted. Every write sets the
    /// document's ttl afresh.
    async fn doc_swap(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, StoreError>;
    /// The hot path without waiting, for backends in this process: a live
    /// authenticated session, its idle deadline pushed to `idle` from now.
    /// `None`: ask the cache.
    fn authenticated_now(&self, _key: &Key, _idle: Duration) -> Option<Option<Arc<Session>>> {
        None
    }
}

/// The backend `[state]` names.
pub fn open_backend(config: &crate::config::Config) -> Result<Arc<dyn Backend>, StoreError> {
    use crate::config::StoreKind;
    let max_pre_auth = config.session.max_pre_auth;
    let state = &config.state;
    Ok(match state.store {
        StoreKind::Memory => Arc::new(MemoryBackend::new(max_pre_auth)),
        StoreKind::Embedded => Arc::new(EmbeddedBackend::open(&state.path, max_pre_auth)?),
        StoreKind::Redis => {
            let at = match (&state.redis_url, state.redis_sentinels.is_empty()) {
                (None, false) => RedisAt::Sentinels {
                    urls: &state.redis_sentinels,
                    master: state.redis_master_name.as_deref().unwrap_or("mymaster"),
                },
                (url, _) => RedisAt::Url(url.as_deref().unwrap_or("redis://127.0.0.1:6379/0")),
            };
            Arc::new(RedisBackend::open(
                at,
                state.redis_ca_file.as_deref(),
                &state.redis_prefix,
                max_pre_auth,
            )?)
        }
    })
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

    /// `payload` sealed for one `purpose`: `<payload, base64url>.<MAC>`,
    /// readable by anyone, made or altered by nobody without the secret.
    pub fn seal(&self, purpose: &str, payload: &[u8]) -> String {
        let body = URL_SAFE_NO_PAD.encode(payload);
        let tag = self.derive(purpose, &body);
        format!("{body}.{tag}")
    }

    /// What `seal` sealed for `purpose`, if the MAC holds (compared in
    /// constant time) and the value is no longer than `limit`.
    pub fn open(&self, purpose: &str, value: &str, limit: usize) -> Option<Vec<u8>> {
        if value.len() > limit {
            return None;
        }
        let (body, tag) = value.rsplit_once('.')?;
        let mut raw = [0u8; 32];
        if tag.len() != 43 || URL_SAFE_NO_PAD.decode_slice(tag, &mut raw) != Ok(32) {
            return None;
        }
        let mut mac = self.mac();
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(body.as_bytes());
        mac.verify_slice(&raw).ok()?;
        URL_SAFE_NO_PAD.decode(body).ok()
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

    #[test]
    fn sealed_values_open_only_unaltered_and_for_their_purpose() {
        let signer = CookieSigner::new(b"a secret of reasonable length here");
        let sealed = signer.seal("browser memo", br#"{"identifier":"alice"}"#);
        assert_eq!(
            signer.open("browser memo", &sealed, 4096).as_deref(),
            Some(&br#"{"identifier":"alice"}"#[..])
        );
        assert!(signer.open("flow id", &sealed, 4096).is_none());
        assert!(
            signer.open("browser memo", &sealed, 10).is_none(),
            "too long"
        );
        let other = CookieSigner::new(b"another secret of reasonable length");
        assert!(other.open("browser memo", &sealed, 4096).is_none());
        let (body, tag) = sealed.rsplit_once('.').unwrap();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"identifier":"admin"}"#);
        assert!(signer
            .open("browser memo", &format!("{forged}.{tag}"), 4096)
            .is_none());
        assert!(signer.open("browser memo", body, 4096).is_none());
        // A session cookie is no memo, nor the other way round.
        assert!(signer.verify(&sealed).is_none());
        assert!(signer.open("", &signer.sign("abc"), 4096).is_none());
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
