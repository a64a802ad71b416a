//! The Redis backend, for replicas: every flowgate pointed at one Redis
//! (`redis://` or `rediss://`, or the master a set of Redis Sentinels
//! names) shares sessions and logins in progress. Records expire by
//! Redis's own TTLs; a deletion is published on a channel every replica
//! listens to, so their caches drop it at once.
//!
//! Keys (under the prefix, `flowgate:` by default):
//! - `s:<key>`: the record as JSON, expiring when it dies;
//! - `pre`, `all`: sorted sets of pre-auth and authenticated keys by time
//!   of death (the pre-auth bound, listing);
//! - `u:<username>`: a set of that user's keys;
//! - `secret`: the cookie secret kept for configs that name none;
//! - `c:<name>`: counters (the throttle's), expiring a window after their
//!   last rise; `m:<name>`: marks (TOTP steps used), raised by a script so
//!   that two replicas cannot both accept one code;
//! - `d:<name>`: documents (MFA devices, recovery codes, consents), the
//!   bytes as given, swapped by a script that compares them first, so
//!   that two replicas cannot both use one recovery code;
//! - channel `revoked`: keys ended by any replica.
//!
//! The connection manager reconnects by itself, with backoff; while Redis
//! is down every call fails (the callers fail closed) and the revocation
//! listener retries every second. With sentinels, a failed call (or the
//! listener's connection ending, or its check every few seconds) sends the
//! next call to the sentinels first: when they name another master, the
//! calls and the listener move to it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncCommands, IntoConnectionInfo};

use super::{doc_write, now_secs, Backend, Key, Record, StoreError};

/// Where the Redis is, as `[state]` names it.
#[derive(Debug, Clone, Copy)]
pub enum RedisAt<'a> {
    /// One server: `redis_url`.
    Url(&'a str),
    /// Whichever server these sentinels name master `master`:
    /// `redis_sentinels`, `redis_master_name`.
    Sentinels { urls: &'a [String], master: &'a str },
}

pub struct RedisBackend {
    link: Arc<Link>,
    prefix: String,
    max_pre_auth: usize,
    /// Keys revoked anywhere, as heard on the channel, numbered.
    heard: Arc<Mutex<Heard>>,
    listening: std::sync::Once,
}

#[derive(Default)]
struct Heard {
    next: u64,
    keys: std::collections::VecDeque<(u64, Key)>,
}

/// How many heard revocations are kept for `revoked_since`.
const HEARD_KEPT: usize = 4096;

/// With sentinels: the least time between two lookups of the master that
/// failed calls ask for (the first failure after a failover asks at once).
const LOOKUP_EVERY: Duration = Duration::from_millis(250);

/// With sentinels: how often the revocation listener asks them whether
/// the master is still the one it listens to, calls failing or not.
const RECHECK_EVERY: Duration = Duration::from_secs(5);

/// `redis://user:secret@host:6379/0` as `redis://host:6379/0`.
fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_password(None);
            let _ = parsed.set_username("");
            parsed.to_string()
        }
        Err(_) => "redis".to_owned(),
    }
}

/// One server flowgate talks to: its client (pub/sub, the secret kept at
/// start) and the connection manager every call goes through.
struct Server {
    client: redis::Client,
    manager: ConnectionManager,
    /// `host:port`, for log lines and to tell a new master from the old.
    addr: String,
}

/// How to ask the sentinels, kept to make a client again (one of the
/// start, outside the serving runtime) as well as the serving one.
struct Sentinels {
    addrs: Vec<redis::ConnectionAddr>,
    master: String,
    /// `rediss://` sentinels: the master is spoken to over TLS too.
    tls: bool,
    certificates: Option<redis::TlsCertificates>,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

impl Sentinels {
    fn client(&self) -> redis::RedisResult<SentinelClient> {
        let mut builder = SentinelClientBuilder::new(
            self.addrs.clone(),
            &self.master,
            SentinelServerType::Master,
        )?
        .set_client_to_redis_db(self.db);
        if self.tls {
            builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            if let Some(certificates) = &self.certificates {
                builder = builder.set_client_to_redis_certificates(certificates.clone());
            }
        }
        if let Some(username) = &self.username {
            builder = builder
                .set_client_to_sentinel_username(username)
                .set_client_to_redis_username(username);
        }
        if let Some(password) = &self.password {
            builder = builder
                .set_client_to_sentinel_password(password)
                .set_client_to_redis_password(password);
        }
        builder.build()
    }
}

enum Finder {
    /// `redis_url`: one server, whose manager reconnects to it by itself.
    Direct(redis::Client),
    /// The master the sentinels name, asked again when calls fail.
    Sentinel(Sentinels),
}

/// What the last lookup through the sentinels left.
#[derive(Default)]
struct Looked {
    /// Made at the first lookup; keeps its connections to the sentinels.
    sentinel: Option<SentinelClient>,
    at: Option<Instant>,
    failure: Option<String>,
}

/// How the backend reaches its Redis, shared with the revocation listener.
struct Link {
    /// Where, for log lines and errors: no password.
    shown: String,
    finder: Finder,
    /// The server as last found.
    current: ArcSwapOption<Server>,
    /// A call failed since the last lookup: look again before the next.
    suspect: AtomicBool,
    /// One lookup (or first connection) at a time.
    looking: tokio::sync::Mutex<Looked>,
}

fn manager_config() -> redis::aio::ConnectionManagerConfig {
    // Reconnects quickly and often: a call waits at most OP_TIMEOUT
    // anyway, and Redis coming back should be noticed at once.
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
}

/// The roots of `ca_file` (PEM) for the redis crate's rustls config, in
/// place of the system's.
fn certificates(ca_file: Option<&Path>) -> Result<Option<redis::TlsCertificates>, String> {
    let Some(path) = ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

impl Link {
    fn open(at: RedisAt<'_>, ca_file: Option<&Path>) -> Result<Link, StoreError> {
        let certificates = certificates(ca_file).map_err(StoreError::unavailable)?;
        let (shown, finder) = match at {
            RedisAt::Url(url) => {
                let shown = without_password(url);
                let client = match certificates {
                    Some(certificates) => redis::Client::build_with_tls(url, certificates),
                    None => redis::Client::open(url),
                }
                .map_err(|e| StoreError::unavailable(format!("{shown}: {e}")))?;
                (shown, Finder::Direct(client))
            }
            RedisAt::Sentinels { urls, master } => {
                let listed: Vec<String> = urls.iter().map(|u| without_password(u)).collect();
                let shown = format!("redis master \"{master}\" of {}", listed.join(", "));
                let failed =
                    |e: &dyn std::fmt::Display| StoreError::unavailable(format!("{shown}: {e}"));
                let mut addrs = Vec::new();
                let mut first = None;
                for url in urls {
                    let info = match &certificates {
                        Some(certificates) if url.starts_with("rediss:") => {
                            redis::Client::build_with_tls(url.as_str(), certificates.clone())
                                .map(|client| client.get_connection_info().clone())
                        }
                        _ => url.as_str().into_connection_info(),
                    }
                    .map_err(|e| failed(&e))?;
                    addrs.push(info.addr().clone());
                    first.get_or_insert(info);
                }
                let Some(first) = first else {
                    return Err(failed(&"no sentinel named"));
                };
                let settings = first.redis_settings();
                let sentinels = Sentinels {
                    addrs,
                    master: master.to_owned(),
                    tls: matches!(first.addr(), redis::ConnectionAddr::TcpTls { .. }),
                    certificates,
                    username: settings.username().map(str::to_owned),
                    password: settings.password().map(str::to_owned),
                    db: settings.db(),
                };
                // Refused now rather than at the first request.
                sentinels.client().map_err(|e| failed(&e))?;
                (shown, Finder::Sentinel(sentinels))
            }
        };
        Ok(Link {
            shown,
            finder,
            current: ArcSwapOption::empty(),
            suspect: AtomicBool::new(false),
            looking: tokio::sync::Mutex::new(Looked::default()),
        })
    }

    fn failed(&self, error: impl std::fmt::Display) -> StoreError {
        match (&self.finder, self.current.load().as_ref()) {
            (Finder::Sentinel(_), Some(server)) => {
                StoreError::unavailable(format!("{} at {}: {error}", self.shown, server.addr))
            }
            _ => StoreError::unavailable(format!("{}: {error}", self.shown)),
        }
    }

    fn follows_sentinels(&self) -> bool {
        matches!(self.finder, Finder::Sentinel(_))
    }

    /// A call failed: with sentinels, the next asks them first.
    fn suspect(&self) {
        self.suspect.store(true, Ordering::Relaxed);
    }

    /// The server to call: the one found last, unless a call failed since.
    async fn server(&self) -> Result<Arc<Server>, StoreError> {
        if let Some(server) = self.current.load_full() {
            if !self.follows_sentinels() || !self.suspect.load(Ordering::Relaxed) {
                return Ok(server);
            }
        }
        self.find(false).await
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        Ok(self.server().await?.manager.clone())
    }

    /// Connect to the server, or with sentinels ask them which it is now
    /// (`force`: even when no call has failed) and move to it if it is
    /// another.
    async fn find(&self, force: bool) -> Result<Arc<Server>, StoreError> {
        let mut looked = self.looking.lock().await;
        let current = self.current.load_full();
        let sentinels = match &self.finder {
            Finder::Direct(client) => {
                if let Some(server) = current {
                    return Ok(server);
                }
                let manager = client
                    .get_connection_manager_with_config(manager_config())
                    .await
                    .map_err(|e| self.failed(e))?;
                let server = Arc::new(Server {
                    client: client.clone(),
                    manager,
                    addr: client.get_connection_info().addr().to_string(),
                });
                self.current.store(Some(server.clone()));
                return Ok(server);
            }
            Finder::Sentinel(sentinels) => sentinels,
        };
        let recently = looked.at.is_some_and(|at| at.elapsed() < LOOKUP_EVERY);
        match &current {
            // Looked up meanwhile, by the caller this one waited for.
            Some(server) if !force && !self.suspect.load(Ordering::Relaxed) => {
                return Ok(server.clone())
            }
            Some(server) if recently => return Ok(server.clone()),
            None if recently => {
                if let Some(failure) = &looked.failure {
                    return Err(self.failed(failure));
                }
            }
            _ => {}
        }
        looked.at = Some(Instant::now());
        self.suspect.store(false, Ordering::Relaxed);
        let found = self.ask(&mut looked, sentinels, current.as_ref()).await;
        match &found {
            Ok(_) => looked.failure = None,
            Err(error) => {
                looked.failure = Some(error.to_string());
                self.suspect();
            }
        }
        found
    }

    /// One lookup through the sentinels, and a connection manager for the
    /// master they name unless it is `current`'s.
    async fn ask(
        &self,
        looked: &mut Looked,
        sentinels: &Sentinels,
        current: Option<&Arc<Server>>,
    ) -> Result<Arc<Server>, StoreError> {
        let sentinel = match &mut looked.sentinel {
            Some(sentinel) => sentinel,
            empty => empty.insert(sentinels.client().map_err(|e| self.failed(e))?),
        };
        let client = sentinel
            .async_get_client()
            .await
            .map_err(|e| self.failed(format!("the sentinels name no master that answers: {e}")))?;
        let addr = client.get_connection_info().addr().to_string();
        if let Some(server) = current.filter(|server| server.addr == addr) {
            return Ok(server.clone());
        }
        let manager = client
            .get_connection_manager_with_config(manager_config())
            .await
            .map_err(|e| self.failed(format!("master {addr}: {e}")))?;
        match current {
            Some(old) => tracing::warn!(
                redis = %self.shown,
                from = %old.addr,
                to = %addr,
                "the Redis master moved to {addr}: following it"
            ),
            None => tracing::info!(redis = %self.shown, "the Redis master is {addr}"),
        }
        let server = Arc::new(Server {
            client,
            manager,
            addr,
        });
        self.current.store(Some(server.clone()));
        Ok(server)
    }

    /// A client for the server, found without the caller's runtime (the
    /// secret is asked for once, at start, from synchronous code).
    fn blocking_client(&self) -> Result<redis::Client, StoreError> {
        let sentinels = match &self.finder {
            Finder::Direct(client) => return Ok(client.clone()),
            Finder::Sentinel(sentinels) => sentinels,
        };
        const WITHIN: Duration = Duration::from_secs(5);
        let found = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    runtime.block_on(async {
                        let mut sentinel = sentinels.client().map_err(|e| e.to_string())?;
                        match tokio::time::timeout(WITHIN, sentinel.async_get_client()).await {
                            Ok(found) => found.map_err(|e| {
                                format!("the sentinels name no master that answers: {e}")
                            }),
                            Err(_) => {
                                Err(format!("no master from the sentinels within {WITHIN:?}"))
                            }
                        }
                    })
                })
                .join()
                .unwrap_or_else(|_| Err("the lookup of the master failed".to_owned()))
        });
        found.map_err(|e| self.failed(e))
    }
}

impl RedisBackend {
    /// One server by URL, trusting the system's roots for `rediss://`.
    pub fn new(url: &str, prefix: &str, max_pre_auth: usize) -> Result<RedisBackend, StoreError> {
        Self::open(RedisAt::Url(url), None, prefix, max_pre_auth)
    }

    /// The Redis `at` names; for TLS, the roots of `ca_file` (PEM) are
    /// trusted instead of the system's.
    pub fn open(
        at: RedisAt<'_>,
        ca_file: Option<&Path>,
        prefix: &str,
        max_pre_auth: usize,
    ) -> Result<RedisBackend, StoreError> {
        Ok(RedisBackend {
            link: Arc::new(Link::open(at, ca_file)?),
            prefix: prefix.to_owned(),
            max_pre_auth,
            heard: Arc::default(),
            listening: std::sync::Once::new(),
        })
    }

    fn failed(&self, error: impl std::fmt::Display) -> StoreError {
        self.link.failed(error)
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        self.link.connection().await
    }

    fn record_key(&self, key: &Key) -> String {
        format!("{}s:{}", self.prefix, key.as_str())
    }

    fn user_key(&self, user: &str) -> String {
        format!("{}u:{user}", self.prefix)
    }

    fn set(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Listen on the revocation channel, for as long as the process runs,
    /// reconnecting every second when Redis is away (and following the
    /// master with sentinels).
    fn listen(&self) {
        let link = self.link.clone();
        let channel = self.set("revoked");
        let heard = self.heard.clone();
        self.listening.call_once(move || {
            tokio::spawn(listen_for_revocations(link, channel, heard));
        });
    }

    async fn read(
        &self,
        con: &mut ConnectionManager,
        key: &Key,
    ) -> Result<Option<Record>, StoreError> {
        let bytes: Option<Vec<u8>> = con
            .get(self.record_key(key))
            .await
            .map_err(|e| self.failed(e))?;
        match bytes {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| self.failed(format!("a record does not decode: {e}"))),
            None => Ok(None),
        }
    }

    /// Write `record` under `key` with its indexes, in one transaction.
    async fn write(
        &self,
        con: &mut ConnectionManager,
        key: &Key,
        record: &Record,
    ) -> Result<(), StoreError> {
        let dies = record.dies();
        let name = self.record_key(key);
        let mut pipe = redis::pipe();
        pipe.atomic();
        if dies <= now_secs() {
            pipe.del(&name).ignore();
            pipe.zrem(self.set("pre"), key.as_str()).ignore();
            pipe.zrem(self.set("all"), key.as_str()).ignore();
        } else {
            let json = serde_json::to_vec(record).map_err(|e| self.failed(e))?;
            pipe.cmd("SET")
                .arg(&name)
                .arg(json)
                .arg("EXAT")
                .arg(dies)
                .ignore();
            match record.session.identity() {
                Some(identity) => {
                    let user = self.user_key(&identity.username);
                    pipe.zrem(self.set("pre"), key.as_str()).ignore();
                    pipe.zadd(self.set("all"), key.as_str(), dies).ignore();
                    pipe.sadd(&user, key.as_str()).ignore();
                    pipe.cmd("EXPIREAT").arg(&user).arg(dies).arg("NX").ignore();
                    pipe.cmd("EXPIREAT").arg(&user).arg(dies).arg("GT").ignore();
                }
                None => {
                    pipe.zrem(self.set("all"), key.as_str()).ignore();
                    pipe.zadd(self.set("pre"), key.as_str(), dies).ignore();
                }
            }
        }
        pipe.query_async::<()>(con)
            .await
            .map_err(|e| self.failed(e))
    }
}

/// The revocation listener: subscribed to `channel` on the server the
/// link names, again whenever that connection ends or (with sentinels)
/// the master moves.
async fn listen_for_revocations(link: Arc<Link>, channel: String, heard: Arc<Mutex<Heard>>) {
    use futures_util::StreamExt;
    let mut failing = false;
    // Where it listened last: a move is logged.
    let mut listened: Option<String> = None;
    loop {
        let subscribed = async {
            let server = link.server().await?;
            let mut pubsub = server
                .client
                .get_async_pubsub()
                .await
                .map_err(|e| link.failed(e))?;
            pubsub
                .subscribe(&channel)
                .await
                .map_err(|e| link.failed(e))?;
            Ok::<_, StoreError>((server, pubsub))
        };
        let mut moved = false;
        match tokio::time::timeout(OP_TIMEOUT, subscribed).await {
            Ok(Ok((server, pubsub))) => {
                if failing || listened.as_ref().is_some_and(|addr| *addr != server.addr) {
                    tracing::info!(
                        redis = %link.shown,
                        "listening for revoked sessions again, at {}",
                        server.addr
                    );
                }
                failing = false;
                listened = Some(server.addr.clone());
                let mut messages = pubsub.into_on_message();
                let mut check = tokio::time::interval(RECHECK_EVERY);
                check.tick().await;
                loop {
                    tokio::select! {
                        message = messages.next() => {
                            let Some(message) = message else {
                                break;
                            };
                            let Ok(text) = message.get_payload::<String>() else {
                                continue;
                            };
                            let Some(key) = Key::parse(&text) else {
                                continue;
                            };
                            let mut heard = heard.lock().unwrap_or_else(|p| p.into_inner());
                            heard.next += 1;
                            let at = heard.next;
                            heard.keys.push_back((at, key));
                            if heard.keys.len() > HEARD_KEPT {
                                heard.keys.pop_front();
                            }
                        }
                        _ = check.tick(), if link.follows_sentinels() => {
                            let now = tokio::time::timeout(OP_TIMEOUT, link.find(true)).await;
                            if let Ok(Ok(now)) = now {
                                if !Arc::ptr_eq(&now, &server) {
                                    moved = true;
                                    break;
                                }
                            }
                        }
                    }
                }
                // The server went away: maybe the master moved.
                link.suspect();
            }
            Ok(Err(error)) => {
                if !failing {
                    tracing::warn!(redis = %link.shown, %error, "cannot listen for revoked sessions; retrying every second");
                    failing = true;
                }
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(redis = %link.shown, "cannot listen for revoked sessions (no answer within {OP_TIMEOUT:?}); retrying every second");
                    failing = true;
                }
            }
        }
        if !moved {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The calls, unbounded; `Backend` bounds each by `OP_TIMEOUT`.
impl RedisBackend {
    async fn get_unbounded(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let mut con = self.connection().await?;
        let now = now_secs();
        Ok(self.read(&mut con, key).await?.filter(|r| r.live(now)))
    }

    async fn put_unbounded(&self, key: &Key, record: Record) -> Result<(), StoreError> {
        let mut con = self.connection().await?;
        if record.session.is_pre_auth() {
            let pre = self.set("pre");
            let known: Option<f64> = con
                .zscore(&pre, key.as_str())
                .await
                .map_err(|e| self.failed(e))?;
            if known.is_none() {
                let _: () = con
                    .zrembyscore(&pre, "-inf", now_secs())
                    .await
                    .map_err(|e| self.failed(e))?;
                let count: usize = con.zcard(&pre).await.map_err(|e| self.failed(e))?;
                if count >= self.max_pre_auth {
                    return Err(StoreError::Full(count));
                }
            }
        }
        self.write(&mut con, key, &record).await
    }

    async fn touch_unbounded(&self, key: &Key, deadline: u64) -> Result<(), StoreError> {
        let mut con = self.connection().await?;
        let Some(mut record) = self.read(&mut con, key).await? else {
            return Ok(());
        };
        if deadline <= record.deadline || !record.live(now_secs()) {
            return Ok(());
        }
        record.deadline = deadline;
        self.write(&mut con, key, &record).await
    }

    async fn delete_unbounded(&self, key: &Key) -> Result<bool, StoreError> {
        let mut con = self.connection().await?;
        let old = self.read(&mut con, key).await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.del(self.record_key(key)).ignore();
        pipe.zrem(self.set("pre"), key.as_str()).ignore();
        pipe.zrem(self.set("all"), key.as_str()).ignore();
        if let Some(identity) = old.as_ref().and_then(|r| r.session.identity()) {
            pipe.srem(self.user_key(&identity.username), key.as_str())
                .ignore();
        }
        pipe.publish(self.set("revoked"), key.as_str()).ignore();
        pipe.query_async::<()>(&mut con)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(old.is_some())
    }

    async fn list_unbounded(&self, user: Option<&str>) -> Result<Vec<(Key, Record)>, StoreError> {
        let mut con = self.connection().await?;
        let now = now_secs();
        let keys: Vec<String> = match user {
            Some(user) => con.smembers(self.user_key(user)).await,
            None => con.zrangebyscore(self.set("all"), now + 1, "+inf").await,
        }
        .map_err(|e| self.failed(e))?;
        let keys: Vec<Key> = keys.iter().filter_map(|k| Key::parse(k)).collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = keys.iter().map(|k| self.record_key(k)).collect();
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&names)
            .query_async(&mut con)
            .await
            .map_err(|e| self.failed(e))?;
        let mut listed = Vec::new();
        let mut gone = Vec::new();
        for (key, value) in keys.into_iter().zip(values) {
            let record = value.and_then(|bytes| serde_json::from_slice::<Record>(&bytes).ok());
            match record {
                Some(record) if record.live(now) && record.session.identity.is_some() => {
                    listed.push((key, record))
                }
                _ => gone.push(key),
            }
        }
        if let (Some(user), false) = (user, gone.is_empty()) {
            let gone: Vec<&str> = gone.iter().map(Key::as_str).collect();
            let _: Result<(), _> = con.srem(self.user_key(user), gone).await;
        }
        Ok(listed)
    }

    async fn purge_expired_unbounded(&self) -> Result<usize, StoreError> {
        // The records go by their TTLs; only the indexes need trimming.
        let mut con = self.connection().await?;
        let now = now_secs();
        let pre: usize = con
            .zrembyscore(self.set("pre"), "-inf", now)
            .await
            .map_err(|e| self.failed(e))?;
        let all: usize = con
            .zrembyscore(self.set("all"), "-inf", now)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(pre + all)
    }
}

/// Raise a mark (`KEYS[1]`) to `ARGV[1]` for `ARGV[2]` ms, if it stands
/// lower (or not at all); 1 when it rose.
const RAISE: &str = r"
local stands = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > stands then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Swap a document (`KEYS[1]`): if it holds `ARGV[2]` now (`ARGV[1]` 1),
/// or nothing (0), set it to `ARGV[4]` (`ARGV[3]` 1) for `ARGV[5]` ms (empty:
/// for good), or delete it (0); 1 when it did.
const SWAP: &str = r"
local stands = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if stands ~= ARGV[2] then
    return 0
  end
elseif stands then
  return 0
end
if ARGV[3] == '0' then
  redis.call('DEL', KEYS[1])
elseif ARGV[5] == '' then
  redis.call('SET', KEYS[1], ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
end
return 1
";

impl RedisBackend {
    fn doc_key(&self, name: &str) -> String {
        format!("{}d:{name}", self.prefix)
    }

    async fn doc_get_unbounded(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut con = self.connection().await?;
        con.get(self.doc_key(name))
            .await
            .map_err(|e| self.failed(e))
    }

    async fn doc_swap_unbounded(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, StoreError> {
        let mut con = self.connection().await?;
        let write = doc_write(new, ttl);
        let flag = |given: bool| if given { "1" } else { "0" };
        let swapped: i64 = redis::Script::new(SWAP)
            .key(self.doc_key(name))
            .arg(flag(expected.is_some()))
            .arg(expected.unwrap_or_default())
            .arg(flag(write.is_some()))
            .arg(write.map_or(&[][..], |(value, _)| value))
            .arg(
                write
                    .and_then(|(_, ms)| ms)
                    .map_or(String::new(), |ms| ms.to_string()),
            )
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(swapped == 1)
    }

    async fn count_unbounded(
        &self,
        name: &str,
        by: u32,
        window: Duration,
    ) -> Result<u32, StoreError> {
        let mut con = self.connection().await?;
        let key = format!("{}c:{name}", self.prefix);
        let value: u64 = if by == 0 {
            let value: Option<u64> = con.get(&key).await.map_err(|e| self.failed(e))?;
            value.unwrap_or(0)
        } else {
            let (value,): (u64,) = redis::pipe()
                .atomic()
                .incr(&key, by)
                .pexpire(&key, window.as_millis() as i64)
                .ignore()
                .query_async(&mut con)
                .await
                .map_err(|e| self.failed(e))?;
            value
        };
        Ok(value.min(u32::MAX as u64) as u32)
    }

    async fn raise_unbounded(
        &self,
        name: &str,
        value: u64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut con = self.connection().await?;
        let rose: i64 = redis::Script::new(RAISE)
            .key(format!("{}m:{name}", self.prefix))
            .arg(value)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(rose == 1)
    }
}

/// Every call to Redis gives up after this: a Redis that is down or
/// stalled makes requests fail (closed), not hang.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

impl RedisBackend {
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let answer = match tokio::time::timeout(OP_TIMEOUT, call).await {
            Ok(answer) => answer,
            Err(_) => Err(self.failed(format!("no answer within {OP_TIMEOUT:?}"))),
        };
        if let Err(StoreError::Unavailable(_)) = answer {
            self.link.suspect();
        }
        answer
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        self.bounded(self.get_unbounded(key)).await
    }

    async fn put(&self, key: &Key, record: Record) -> Result<(), StoreError> {
        self.bounded(self.put_unbounded(key, record)).await
    }

    async fn touch(&self, key: &Key, deadline: u64) -> Result<(), StoreError> {
        self.bounded(self.touch_unbounded(key, deadline)).await
    }

    async fn delete(&self, key: &Key) -> Result<bool, StoreError> {
        self.bounded(self.delete_unbounded(key)).await
    }

    async fn list(&self, user: Option<&str>) -> Result<Vec<(Key, Record)>, StoreError> {
        self.bounded(self.list_unbounded(user)).await
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        self.bounded(self.purge_expired_unbounded()).await
    }

    async fn count(&self, name: &str, by: u32, window: Duration) -> Result<u32, StoreError> {
        self.bounded(self.count_unbounded(name, by, window)).await
    }

    async fn raise(&self, name: &str, value: u64, ttl: Duration) -> Result<bool, StoreError> {
        self.bounded(self.raise_unbounded(name, value, ttl)).await
    }

    async fn doc_get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.bounded(self.doc_get_unbounded(name)).await
    }

    async fn doc_swap(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, StoreError> {
        self.bounded(self.doc_swap_unbounded(name, expected, new, ttl))
            .await
    }

    async fn revoked_since(&self, cursor: Option<u64>) -> Result<(u64, Vec<Key>), StoreError> {
        self.listen();
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        let Some(cursor) = cursor else {
            return Ok((heard.next, Vec::new()));
        };
        let keys = heard
            .keys
            .iter()
            .filter(|(at, _)| *at > cursor)
            .map(|(_, key)| key.clone())
            .collect();
        Ok((heard.next, keys))
    }

    fn kept_secret(&self, fresh: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut con = self
            .link
            .blocking_client()?
            .get_connection_with_timeout(Duration::from_secs(5))
            .map_err(|e| self.failed(e))?;
        let name = self.set("secret");
        let _: Option<String> = redis::cmd("SET")
            .arg(&name)
            .arg(fresh)
            .arg("NX")
            .query(&mut con)
            .map_err(|e| self.failed(e))?;
        let kept: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&name)
            .query(&mut con)
            .map_err(|e| self.failed(e))?;
        kept.map(Some)
            .ok_or_else(|| self.failed("the kept secret is gone"))
    }
}
