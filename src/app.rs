//! The running process: the current `Gateway` (swapped whole on reload,
//! read lock-free by every request) and what outlives a reload: the session
//! store, the fallback signing secret, the metrics.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::gateway::{Gateway, People};
use crate::metrics::Metrics;
use crate::session::{Store, StoreOptions};

pub struct App {
    current: ArcSwap<Gateway>,
    /// The file to re-read on reload; `None` for a config built in memory.
    config_path: Option<PathBuf>,
    shared: Shared,
    pub metrics: Arc<Metrics>,
    ready: AtomicBool,
    /// SIGTERM came: `/readyz` says so, requests are still served.
    stopping: AtomicBool,
    /// The watched files as they were when the first config was read.
    startup_stamps: std::sync::Mutex<Option<Stamps>>,
    /// The config the process started with: what the listeners, the log
    /// and the workers still run on, whatever reloads came since.
    started: Config,
}

/// What every gateway of this process shares, reload after reload.
pub struct Shared {
    pub sessions: Arc<Store>,
    /// Used when the config names no secret: the one the state store keeps
    /// (made at its first start), or with the memory store one made for
    /// this process; a reload does not sign everybody out either way.
    pub fallback_secret: Vec<u8>,
    pub metrics: Arc<Metrics>,
    /// Logins started per client address.
    pub client_starts: Arc<crate::session::ClientStarts>,
}

impl App {
    /// Build everything for a validated config. `config_path` is the file
    /// reloads read again.
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Result<Arc<App>, String> {
        let startup_stamps = Stamps::stat(Stamps::paths(&config));
        let backend = crate::session::open_backend(&config).map_err(|e| format!("state: {e}"))?;
        let fresh = crate::session::random_token().into_bytes();
        // Only asked when needed: with a configured secret, a store that is
        // down at start is no reason not to start.
        let kept = match config.session.secret {
            Some(_) => None,
            None => backend
                .kept_secret(&fresh)
                .map_err(|e| format!("state: {e}"))?,
        };
        if config.session.secret.is_none() {
            match &kept {
                Some(_) => tracing::info!(
                    store = backend.kind(),
                    "no session secret configured: using the one kept in the state store"
                ),
                None => tracing::warn!("no session secret configured (session.secret_file or FLOWGATE_SESSION_SECRET): using a random one for this process (the memory store keeps sessions only as long as the process either way)"),
            }
        }
        tracing::info!(
            store = backend.kind(),
            "sessions are kept in the {} store",
            backend.kind()
        );
        let sessions = Arc::new(Store::new(
            backend,
            StoreOptions::for_idle(config.session.idle_timeout),
        ));
        let metrics = Arc::new(Metrics::new());
        let shared = Shared {
            sessions,
            fallback_secret: kept.unwrap_or(fresh),
            metrics: metrics.clone(),
            client_starts: Arc::default(),
        };
        let started = config.clone();
        let gateway = Gateway::new(config, &shared)?;
        Ok(Arc::new(App {
            started,
            current: ArcSwap::from_pointee(gateway),
            config_path,
            shared,
            metrics,
            ready: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            startup_stamps: std::sync::Mutex::new(Some(startup_stamps)),
        }))
    }

    /// The gateway serving requests now.
    #[inline]
    pub fn gateway(&self) -> Arc<Gateway> {
        self.current.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Shutting down: not ready for new traffic any more.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Read the config file (and the users file it names) again and swap
    /// the gateway. On any problem the running gateway stays and the
    /// reason is returned (and logged by the caller). On success, the users
    /// whose sessions must end (`FileDirectory::ended_in`).
    pub fn reload(&self) -> Result<Vec<String>, String> {
        let Some(path) = &self.config_path else {
            return Err("this gateway was not started from a config file".into());
        };
        let config = crate::config::load(path).map_err(|errors| {
            let count = errors.0.len();
            format!(
                "{errors}\n{count} problem{} in the configuration",
                if count == 1 { "" } else { "s" }
            )
        })?;
        let old = self.gateway();
        // Against what runs, not the last file read: a key changed back
        // needs nothing, one still changed is named at every reload.
        for change in restart_only_changes(&self.started, &config) {
            tracing::warn!(
                "{change} changed: that takes a restart; the rest of the new config applies now"
            );
        }
        let gateway = Gateway::new(config, &self.shared)?;
        // A users file caught half-written (or emptied by mistake) would
        // sign everybody out; an empty one is refused at a reload, and
        // what runs stays. (To lock everybody out, disable them.)
        if let (People::File(before), People::File(after)) = (&old.people, &gateway.people) {
            if after.is_empty() && !before.is_empty() {
                return Err(format!(
                    "{}: the users file has no users now (it had {}): not loaded; to lock everybody out, set `disabled = true` for each",
                    gateway.config.directory.users_file.display(),
                    before.len()
                ));
            }
        }
        let ended = old.people.ended_in(&gateway.people);
        let regrouped = old.people.regrouped_in(&gateway.people);
        self.current.store(Arc::new(gateway));
        // Open connections were let through on the old groups: they end,
        // and what comes next is decided on the new ones.
        if !regrouped.is_empty() {
            let closed = self.shared.sessions.end_live_of(&regrouped);
            if closed > 0 {
                tracing::info!(users = ?regrouped, sessions = closed, "open connections closed: their users' groups changed");
            }
        }
        self.metrics.reloads.inc();
        Ok(ended)
    }

    /// End every session of `users` (disabled or deleted in the users file
    /// just loaded). Until this is done their
    /// sessions already count for nothing (`gate::live`); this makes sure
    /// they stay that way if the user comes back.
    pub async fn end_sessions(&self, users: &[String]) {
        let sessions = self.gateway().sessions.clone();
        for user in users {
            match sessions.delete_all_for_user(user).await {
                Ok(0) => {}
                Ok(count) => tracing::info!(
                    user = %user,
                    count,
                    "sessions ended: the user is disabled or deleted"
                ),
                Err(error) => {
                    tracing::warn!(user = %user, %error, "could not end the user's sessions")
                }
            }
        }
    }
}

/// Settings a running process reads once, at start: the listeners, the
/// runtime, the connection limits and timeouts hyper's server was built
/// with, the shutdown timings, the log setup, the session store. The docs'
/// "Reloading" section lists the same keys.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&old.server, &new.server);
    [
        ("server.listen", a.listen != b.listen),
        ("server.workers", a.workers != b.workers),
        ("server.tls (on/off)", a.tls.is_empty() != b.tls.is_empty()),
        ("server.redirect_http", a.redirect_http != b.redirect_http),
        (
            "server.max_connections",
            a.max_connections != b.max_connections,
        ),
        (
            "server.max_header_bytes",
            a.max_header_bytes != b.max_header_bytes,
        ),
        ("server.max_headers", a.max_headers != b.max_headers),
        (
            "server.header_read_timeout",
            a.header_read_timeout != b.header_read_timeout,
        ),
        (
            "server.keepalive_timeout",
            a.keepalive_timeout != b.keepalive_timeout,
        ),
        (
            "server.shutdown_timeout",
            a.shutdown_timeout != b.shutdown_timeout,
        ),
        (
            "server.shutdown_delay",
            a.shutdown_delay != b.shutdown_delay,
        ),
        ("admin.listen", old.admin.listen != new.admin.listen),
        (
            "executor_api",
            old.executor_api
                .as_ref()
                .map(|api| (api.listen, api.tls.clone()))
                != new
                    .executor_api
                    .as_ref()
                    .map(|api| (api.listen, api.tls.clone())),
        ),
        ("log.format", old.log.format != new.log.format),
        ("log.level", old.log.level != new.log.level),
        ("state.store", old.state.store != new.state.store),
        ("state.path", old.state.path != new.state.path),
        (
            "state.redis_url",
            old.state.redis_url != new.state.redis_url,
        ),
        (
            "state.redis_prefix",
            old.state.redis_prefix != new.state.redis_prefix,
        ),
        (
            "state.redis_sentinels",
            old.state.redis_sentinels != new.state.redis_sentinels,
        ),
        (
            "state.redis_master_name",
            old.state.redis_master_name != new.state.redis_master_name,
        ),
        (
            "state.redis_ca_file",
            old.state.redis_ca_file != new.state.redis_ca_file,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

/// SIGHUP, listened for: made before the listener says it listens, so that
/// a reload asked for right after does not end the process (SIGHUP's
/// default action).
#[cfg(unix)]
pub struct Hangup(Option<tokio::signal::unix::Signal>);
#[cfg(not(unix))]
pub struct Hangup;

impl Hangup {
    pub fn listen() -> Hangup {
        #[cfg(unix)]
        return Hangup(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok());
        #[cfg(not(unix))]
        Hangup
    }
}

/// How often watched files are checked for changes.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Reload on SIGHUP, and when the config file, the users file or a TLS
/// certificate changes on disk. A reload that fails keeps what runs and
/// logs why; certificates are swapped for new connections only.
pub async fn watch(
    app: Arc<App>,
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    mut hangup: Hangup,
) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What the running config was built from: stamped at startup, before
    // anything could change unnoticed between loading and watching.
    let startup = app
        .startup_stamps
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let mut seen = match startup {
        Some(stamps) => stamps,
        None => Stamps::read(&app).await,
    };
    // The certificate and key files the running TLS settings were read from.
    let mut certificates_seen = seen.certificates();
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.0.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<Option<()>>();
        let why = tokio::select! {
            _ = signalled => "SIGHUP",
            _ = tick.tick() => "a watched file changed",
        };
        let now = Stamps::read(&app).await;
        if why != "SIGHUP" && now == seen {
            continue;
        }
        // Stamped before reading: a write landing during the reload (a key
        // just after its certificate) shows as a change on the next tick.
        let files_before = now.paths.clone();
        seen = now;
        // Read the files off the runtime: they may be slow (network disks).
        let reloaded = {
            let app = app.clone();
            tokio::task::spawn_blocking(move || app.reload())
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        };
        match reloaded {
            Ok(ended) => {
                tracing::info!("configuration reloaded ({why})");
                app.end_sessions(&ended).await;
            }
            Err(error) => {
                app.metrics.reload_failures.inc();
                tracing::error!(
                    "reload refused ({why}); the running configuration stays:\n{error}"
                );
            }
        }
        // Certificates are read again only when they (or the list of them)
        // changed: a reload for a users file is not a certificate reload.
        let certificates_now = Stamps::read(&app).await.certificates();
        if let Some(tls) = tls
            .as_ref()
            .filter(|_| certificates_now != certificates_seen)
        {
            let certificates = app.gateway().config.server.tls.clone();
            match tokio::task::spawn_blocking(move || crate::tls::server_config(&certificates))
                .await
            {
                Ok(Ok(config)) => {
                    tls.store(Arc::new(config));
                    certificates_seen = certificates_now;
                }
                Ok(Err(error)) => {
                    tracing::error!("certificates not reloaded; the running ones stay: {error}")
                }
                Err(error) => tracing::error!("certificates not reloaded: {error}"),
            }
        }
        // The new config may watch other files: start those from now.
        let now = Stamps::read(&app).await;
        if now.paths != files_before {
            seen = now;
        }
    }
}

/// Modification time and length of every file a config depends on.
#[derive(PartialEq, Eq)]
pub(crate) struct Stamps {
    paths: Vec<PathBuf>,
    stamps: Vec<Option<(std::time::SystemTime, u64)>>,
}

impl Stamps {
    /// The TLS certificate and key files' part (they come after the config
    /// and the users file).
    fn certificates(&self) -> Stamps {
        Stamps {
            paths: self.paths.get(2..).unwrap_or_default().to_vec(),
            stamps: self.stamps.get(2..).unwrap_or_default().to_vec(),
        }
    }

    fn paths(config: &Config) -> Vec<PathBuf> {
        let mut paths = vec![config.path.clone(), config.directory.users_file.clone()];
        for tls in &config.server.tls {
            paths.push(tls.cert.clone());
            paths.push(tls.key.clone());
        }
        paths
    }

    fn stat(paths: Vec<PathBuf>) -> Stamps {
        let stamps = paths
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect();
        Stamps { paths, stamps }
    }

    /// `stat` each file, off the runtime.
    async fn read(app: &App) -> Stamps {
        let paths = Stamps::paths(&app.gateway().config);
        let fallback = paths.clone();
        tokio::task::spawn_blocking(move || Stamps::stat(paths))
            .await
            .unwrap_or_else(|_| Stamps {
                paths: fallback,
                stamps: Vec::new(),
            })
    }
}
