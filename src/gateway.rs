//! The running gateway: the config and everything built from it (the
//! executor, the directory as of this load, the signer, upstream pools,
//! per-route metrics). Replaced whole on reload (see `app`); requests in
//! flight finish on the one they started with.

use std::net::IpAddr;
use std::sync::Arc;

use crate::app::Shared;
use crate::config::{Config, CookieSecure, ExecutorConfig, RouteConfig};
use crate::context::Context;
use crate::directory::FileDirectory;
use crate::engine::Engine;
use crate::flow::FlowExecutor;
use crate::identity::Identity;
use crate::metrics::{Metrics, RouteMetrics};
use crate::pages::Pages;
use crate::redirect::RedirectPolicy;
use crate::remote::RemoteExecutor;
use crate::session::{CookieSigner, Store};
use crate::upstream::{Target, Upstreams};

/// The running gateway: config and everything built from it. Replaced
/// whole on reload (see `app`); requests in flight finish on the one they
/// started with.
pub struct Gateway {
    pub config: Config,
    pub(crate) executor: Arc<dyn FlowExecutor>,
    /// Who the users are now, for sessions minted earlier (`gate::live`).
    pub(crate) people: People,
    /// A remote executor's sessions, checked against the remote's.
    pub(crate) revalidation: Option<Arc<crate::remote::Revalidation>>,
    /// Logins started per client address (shared by every gateway).
    pub(crate) client_starts: Arc<crate::session::ClientStarts>,
    pub(crate) sessions: Arc<Store>,
    pub(crate) signer: CookieSigner,
    pub(crate) pages: Pages,
    pub(crate) upstreams: Upstreams,
    /// Per route (same index as `config.routes`): where it goes, and its series.
    pub(crate) targets: Vec<Option<Target>>,
    pub(crate) route_metrics: Vec<Arc<RouteMetrics>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) redirects: RedirectPolicy,
    pub(crate) static_prefix: String,
    /// Different for every gateway built (a reload makes a new one).
    pub(crate) generation: u64,
}

impl Gateway {
    /// Build from a validated config, with what outlives reloads. Fails
    /// only on what validation cannot see (a users file that went missing
    /// since, unreadable CA roots).
    pub fn new(config: Config, shared: &Shared) -> Result<Gateway, String> {
        let (executor, people): (Arc<dyn FlowExecutor>, People) = match &config.executor {
            ExecutorConfig::Embedded => {
                let users = config.directory.users_file.clone();
                let directory = Arc::new(FileDirectory::load(&users).map_err(|e| e.to_string())?);
                if directory.is_empty() {
                    tracing::warn!(file = %users.display(), "the users file has no users: nobody can log in");
                }
                let engine = Engine::with_shared(
                    &config,
                    directory.clone(),
                    shared.sessions.clone(),
                    Some(shared.metrics.clone()),
                );
                (Arc::new(engine), People::File(directory))
            }
            ExecutorConfig::Remote(remote) => (
                Arc::new(RemoteExecutor::new(&config, remote)?),
                People::Remote,
            ),
        };
        let metrics = shared.metrics.clone();
        let sessions = shared.sessions.clone();
        let fallback_secret = shared.fallback_secret.as_slice();
        let secret = config
            .session
            .secret
            .as_ref()
            .map_or(fallback_secret, |s| s.0.as_slice());
        let targets = config
            .routes
            .iter()
            .map(|r| Target::of(&r.upstream))
            .collect();
        let route_metrics = config
            .routes
            .iter()
            .map(|r| metrics.route(&route_name(r)))
            .collect();
        let revalidation = match &config.executor {
            ExecutorConfig::Remote(remote) => Some(Arc::new(crate::remote::Revalidation::new(
                remote.revalidate,
                executor.clone(),
                shared.sessions.clone(),
            ))),
            ExecutorConfig::Embedded => None,
        };
        Ok(Gateway {
            executor,
            people,
            revalidation,
            client_starts: shared.client_starts.clone(),
            sessions,
            signer: CookieSigner::new(secret),
            pages: Pages::new(),
            upstreams: Upstreams::new(&config.proxy)?,
            targets,
            route_metrics,
            metrics,
            redirects: RedirectPolicy::from_config(&config),
            static_prefix: format!("{}/static", config.server.prefix),
            generation: {
                static GENERATIONS: std::sync::atomic::AtomicU64 =
                    std::sync::atomic::AtomicU64::new(1);
                GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
            config,
        })
    }

    /// Every `route.authentik_application`, once each.
    pub fn applications(&self) -> Vec<&str> {
        let mut apps: Vec<&str> = self
            .config
            .routes
            .iter()
            .filter_map(|r| r.authentik_application.as_deref())
            .collect();
        apps.sort_unstable();
        apps.dedup();
        apps
    }

    /// Whether `peer` is one of `server.trusted_proxies`.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.config
            .server
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&peer))
    }

    /// The client behind a trusted `peer`, from the `X-Forwarded-For`
    /// values it sent (in order): walking from the right, the first
    /// address that is not a trusted proxy.
    pub(crate) fn client_behind(&self, peer: IpAddr, forwarded_for: &[&str]) -> IpAddr {
        let mut client = peer;
        for hop in forwarded_for.iter().rev().flat_map(|v| v.rsplit(',')) {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                break;
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }

    /// Whether cookies set on this request get `Secure`.
    pub fn secure_cookies(&self, context: &Context) -> bool {
        match self.config.session.cookie_secure {
            CookieSecure::Auto => context.https,
            CookieSecure::Always => true,
            CookieSecure::Never => false,
        }
    }
}

/// Who a session's user is now.
pub enum People {
    /// The users file as of this gateway's load: groups and names as it
    /// says now; a user deleted or disabled since has no session.
    File(Arc<FileDirectory>),
    /// A remote executor's users: as the remote said at login.
    Remote,
}

impl People {
    /// `frozen` (a session's identity) as it is now, or nobody.
    pub fn current(&self, frozen: &Arc<Identity>) -> Option<Arc<Identity>> {
        match self {
            People::File(directory) => directory.current(&frozen.username),
            People::Remote => Some(frozen.clone()),
        }
    }

    /// The users whose sessions must end now that `newer` replaces this
    /// (`FileDirectory::ended_in`); none for a remote's.
    pub fn ended_in(&self, newer: &People) -> Vec<String> {
        match (self, newer) {
            (People::File(old), People::File(new)) => old.ended_in(new),
            _ => Vec::new(),
        }
    }

    /// Users whose groups `newer` changes (`FileDirectory::regrouped_in`).
    pub fn regrouped_in(&self, newer: &People) -> Vec<String> {
        match (self, newer) {
            (People::File(old), People::File(new)) => old.regrouped_in(new),
            _ => Vec::new(),
        }
    }
}

/// A route's name in metrics and logs: its host pattern and path prefix.
pub(crate) fn route_name(route: &RouteConfig) -> String {
    let host = match &route.host {
        crate::config::HostPattern::Any => "*".to_owned(),
        crate::config::HostPattern::Exact(h) => h.clone(),
        crate::config::HostPattern::Suffix(s) => format!("*{s}"),
    };
    format!("{host}{}", route.path_prefix)
}
