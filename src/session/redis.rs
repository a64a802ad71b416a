//! The Redis backend, for replicas: every flowgate pointed at one Redis
//! (`redis://` or `rediss://`) shares sessions and logins in progress.
//! Records expire by Redis's own TTLs; a deletion is published on a
//! channel every replica listens to, so their caches drop it at once.
//!
//! Keys (under the prefix, `flowgate:` by default):
//! - `s:<key>`: the record as JSON, expiring when it dies;
//! - `pre`, `all`: sorted sets of pre-auth and authenticated keys by time
//!   of death (the pre-auth bound, listing);
//! - `u:<username>`: a set of that user's keys;
//! - `secret`: the cookie secret kept for configs that name none;
//! - channel `revoked`: keys ended by any replica.
//!
//! The connection manager reconnects by itself, with backoff; while Redis
//! is down every call fails (the callers fail closed) and the revocation
//! listener retries every second.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use super::{now_secs, Backend, Key, Record, StoreError};

pub struct RedisBackend {
    client: redis::Client,
    /// Where, for log lines and errors: the URL without its password.
    shown: String,
    prefix: String,
    max_pre_auth: usize,
    manager: tokio::sync::OnceCell<ConnectionManager>,
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

impl RedisBackend {
    pub fn new(url: &str, prefix: &str, max_pre_auth: usize) -> Result<RedisBackend, StoreError> {
        let shown = without_password(url);
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::unavailable(format!("{shown}: {e}")))?;
        Ok(RedisBackend {
            client,
            shown,
            prefix: prefix.to_owned(),
            max_pre_auth,
            manager: tokio::sync::OnceCell::new(),
            heard: Arc::default(),
            listening: std::sync::Once::new(),
        })
    }

    fn failed(&self, error: impl std::fmt::Display) -> StoreError {
        StoreError::unavailable(format!("{}: {error}", self.shown))
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        // Reconnects quickly and often: a call waits at most OP_TIMEOUT
        // anyway, and Redis coming back should be noticed at once.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(1)))
            .set_response_timeout(Some(std::time::Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_max_delay(std::time::Duration::from_millis(500));
        self.manager
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config))
            .await
            .cloned()
            .map_err(|e| self.failed(e))
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
    /// reconnecting every second when Redis is away.
    fn listen(&self) {
        let client = self.client.clone();
        let channel = self.set("revoked");
        let heard = self.heard.clone();
        let shown = self.shown.clone();
        self.listening.call_once(move || {
            tokio::spawn(async move {
                use futures_util::StreamExt;
                let mut failing = false;
                loop {
                    match client.get_async_pubsub().await {
                        Ok(mut pubsub) => {
                            if pubsub.subscribe(&channel).await.is_ok() {
                                if failing {
                                    tracing::info!(redis = %shown, "listening for revoked sessions again");
                                    failing = false;
                                }
                                let mut messages = pubsub.on_message();
                                while let Some(message) = messages.next().await {
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
                            }
                        }
                        Err(error) => {
                            if !failing {
                                tracing::warn!(redis = %shown, %error, "cannot listen for revoked sessions; retrying every second");
                                failing = true;
                            }
                        }
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            });
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

/// Every call to Redis gives up after this: a Redis that is down or
/// stalled makes requests fail (closed), not hang.
const OP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl RedisBackend {
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(OP_TIMEOUT, call).await {
            Ok(answer) => answer,
            Err(_) => Err(self.failed(format!("no answer within {OP_TIMEOUT:?}"))),
        }
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
            .client
            .get_connection_with_timeout(std::time::Duration::from_secs(5))
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
