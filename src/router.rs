//! The request path, top to bottom. Every request goes through `handle`:
//!
//! ```text
//! accept (listener) ─► context ─► reserved path? ─► gateway endpoint (login page, executor API, sign-out, static)
//!                                      │ no
//!                                      ▼
//!                                    route ─► gate (session → access) ─► forward (proxy) ─► respond ─► log
//!                                                  │ anonymous
//!                                                  └► skip_auth? forward anonymously : 302 to login | 401 JSON
//! ```
//!
//! Each step is one function in its own module; this file only decides the
//! order. Nothing here blocks or holds a lock across an `.await`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{
    HeaderValue, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::app::Shared;
use crate::config::{Config, CookieSecure, RouteConfig};
use crate::directory::FileDirectory;
use crate::engine::Engine;
use crate::flow::FlowExecutor;
use crate::gate::Decision;
use crate::metrics::{Metrics, RouteMetrics};
use crate::pages::{MessagePage, Pages};
use crate::redirect::RedirectPolicy;
use crate::session::{CookieSigner, Identity, SessionStore};
use crate::upstream::{ConnSlot, Target, Upstreams};
use crate::{full, Body};

/// What the gateway knows about one connection.
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// What the gateway works out about one request before routing it.
#[derive(Debug, Clone)]
pub struct Context {
    pub peer: SocketAddr,
    /// The peer is a trusted proxy: its `X-Forwarded-*` headers count.
    pub trusted: bool,
    /// The client reached us over TLS (directly, or per a trusted proxy).
    pub https: bool,
    /// The request's host, lower-case, without port.
    pub host: String,
    /// The host as the client wrote it (with port), for `X-Forwarded-Host`.
    pub authority: String,
    /// The client's address: the peer, or the last untrusted hop that
    /// trusted proxies report in `X-Forwarded-For`.
    pub client_ip: IpAddr,
}

/// The running gateway: config and everything built from it. Replaced
/// whole on reload (see `app`); requests in flight finish on the one they
/// started with.
pub struct Gateway {
    pub config: Config,
    pub(crate) executor: Arc<dyn FlowExecutor>,
    pub(crate) sessions: Arc<dyn SessionStore>,
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
        let users = config.directory.users_file.clone();
        let directory = Arc::new(FileDirectory::load(&users).map_err(|e| e.to_string())?);
        if directory.is_empty() {
            tracing::warn!(file = %users.display(), "the users file has no users: nobody can log in");
        }
        let executor: Arc<dyn FlowExecutor> = Arc::new(Engine::with_shared(
            &config,
            directory,
            shared.throttle.clone(),
            Some(shared.metrics.clone()),
        ));
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
        Ok(Gateway {
            executor,
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

    /// Serve one request. Never fails: every error has its page or JSON.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        connection: Connection,
        slot: &ConnSlot,
    ) -> Response<Body> {
        let started = Instant::now();
        let context = self.context(&request, connection);
        // Kept for the access log only when there is one.
        let logged = self
            .config
            .log
            .access
            .then(|| (request.method().clone(), request.uri().path().to_owned()));
        let (response, user, route) = self.dispatch(request, &context, slot).await;
        let elapsed = started.elapsed();
        let series = route
            .and_then(|i| self.route_metrics.get(i))
            .unwrap_or(&self.metrics.unrouted);
        series.observe(response.status().as_u16(), elapsed);
        if let Some((method, path)) = logged {
            let user = user.as_ref().map(|i| i.username.as_str());
            access_log(&context, &method, &path, &response, user, route, elapsed);
        }
        response
    }

    async fn dispatch(
        &self,
        request: Request<Incoming>,
        context: &Context,
        slot: &ConnSlot,
    ) -> (Response<Body>, Option<Arc<Identity>>, Option<usize>) {
        let prefix = self.config.server.prefix.as_str();
        let path = request.uri().path();
        if path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
        {
            // Boxed: the login pages' and executor's futures are large, and
            // the proxied path should not carry (and move) their size.
            return (Box::pin(self.reserved(request, context)).await, None, None);
        }
        let Some((index, route)) = self.route(&context.host, path) else {
            return (
                self.page(
                    StatusCode::NOT_FOUND,
                    "Not found",
                    "flowgate has no route for this address.",
                    None,
                ),
                None,
                None,
            );
        };
        let identity = crate::gate::identity(self, request.headers()).await;
        match crate::gate::decide(self, route, &request, identity) {
            Decision::Forward(identity) => (
                crate::proxy::forward(self, index, request, context, identity.as_deref(), slot)
                    .await,
                identity,
                Some(index),
            ),
            Decision::Login(location) => (crate::gate::to_login(&location), None, Some(index)),
            Decision::Unauthorized { login, executor } => (
                crate::gate::unauthorized(&login, &executor),
                None,
                Some(index),
            ),
            Decision::Forbidden(user) => {
                let response = if crate::gate::wants_html(&request) {
                    self.page(
                        StatusCode::FORBIDDEN,
                        "Access denied",
                        &format!(
                            "You are signed in as {}, but this application is not open to you.",
                            user.username
                        ),
                        None,
                    )
                } else {
                    crate::api::json_response(
                        StatusCode::FORBIDDEN,
                        &serde_json::json!({"error": "forbidden", "detail": "not allowed for this user"}),
                    )
                };
                (response, Some(user), Some(index))
            }
        }
    }

    /// Everything under the reserved prefix belongs to flowgate, on any host.
    async fn reserved(&self, request: Request<Incoming>, context: &Context) -> Response<Body> {
        let prefix = &self.config.server.prefix;
        let rest = request.uri().path()[prefix.len()..].to_owned();
        if let Some(flow_path) = rest.strip_prefix("/flow/") {
            return crate::login::page(self, request, context, flow_path).await;
        }
        if let Some(slug_path) = rest.strip_prefix("/api/v3/flows/executor/") {
            return crate::api::executor(self, request, context, slug_path).await;
        }
        match rest.as_str() {
            "/api/v3/core/users/me/" => crate::api::users_me(self, &request).await,
            "/sign_out" => crate::login::sign_out(self, request, context).await,
            "/static/flowgate.css" => static_css(),
            _ => self.page(
                StatusCode::NOT_FOUND,
                "Not found",
                "There is nothing at this address.",
                None,
            ),
        }
    }

    /// The longest `path_prefix` among routes whose host matches.
    pub fn route(&self, host: &str, path: &str) -> Option<(usize, &RouteConfig)> {
        self.config
            .routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.host.matches(host) && path_has_prefix(path, &r.path_prefix))
            .max_by_key(|(i, r)| (r.path_prefix.len(), std::cmp::Reverse(*i)))
    }

    fn context(&self, request: &Request<Incoming>, connection: Connection) -> Context {
        let trusted = self
            .config
            .server
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&connection.peer.ip()));
        let headers = request.headers();
        let forwarded_proto = trusted
            .then(|| {
                headers
                    .get("x-forwarded-proto")
                    .and_then(|v| v.to_str().ok())
            })
            .flatten()
            .map(|v| {
                v.split(',')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("https")
            });
        let authority = headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(|a| a.as_str().to_owned()))
            .unwrap_or_default();
        Context {
            peer: connection.peer,
            trusted,
            https: connection.tls || forwarded_proto.unwrap_or(false),
            host: host_without_port(&authority),
            client_ip: self.client_ip(connection.peer.ip(), trusted, headers),
            authority,
        }
    }

    /// Walk `X-Forwarded-For` from the right past trusted proxies: the first
    /// address that is not one of ours is the client.
    fn client_ip(&self, peer: IpAddr, trusted: bool, headers: &http::HeaderMap) -> IpAddr {
        if !trusted {
            return peer;
        }
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>();
        self.client_behind(peer, &hops)
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
            if !self
                .config
                .server
                .trusted_proxies
                .iter()
                .any(|net| net.contains(&ip))
            {
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

    /// One of flowgate's own HTML pages.
    pub fn page(
        &self,
        status: StatusCode,
        title: &str,
        message: &str,
        link: Option<(&str, &str)>,
    ) -> Response<Body> {
        self.page_with_detail(status, title, message, None, link)
    }

    pub fn page_with_detail(
        &self,
        status: StatusCode,
        title: &str,
        message: &str,
        detail: Option<&str>,
        link: Option<(&str, &str)>,
    ) -> Response<Body> {
        let html = self.pages.message(&MessagePage {
            status: status.as_u16(),
            title,
            message,
            detail,
            link,
            static_prefix: &self.static_prefix,
        });
        html_response(status, html)
    }
}

fn path_has_prefix(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/') || prefix.ends_with('/'))
}

pub(crate) fn host_without_port(authority: &str) -> String {
    host_key(authority).into_owned()
}

/// `host_without_port`, borrowed when the host is already in that form.
pub(crate) fn host_key(authority: &str) -> std::borrow::Cow<'_, str> {
    let host = if authority.starts_with('[') {
        // [v6]:port
        authority
            .split_once(']')
            .map(|(h, _)| &h[1..])
            .unwrap_or(authority)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                authority
            }
        })
    };
    let host = host.trim_end_matches('.');
    match host.bytes().any(|b| b.is_ascii_uppercase()) {
        true => host.to_ascii_lowercase().into(),
        false => host.into(),
    }
}

/// Pages are ours: lock them down (no framing, no scripts, no referrer).
pub(crate) fn html_response(status: StatusCode, html: String) -> Response<Body> {
    let mut response = Response::new(full(html));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    );
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

fn static_css() -> Response<Body> {
    let mut response = Response::new(full(Pages::stylesheet()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    response
}

/// One line per request. Path only: query strings can carry tokens, and
/// cookies and credentials never appear here.
fn access_log(
    context: &Context,
    method: &http::Method,
    path: &str,
    response: &Response<Body>,
    user: Option<&str>,
    route: Option<usize>,
    elapsed: Duration,
) {
    let status = response.status().as_u16();
    let line = AccessLine {
        client: context.client_ip,
        host: &context.host,
        method: method.as_str(),
        path,
        status,
        route,
        user,
    };
    line.log(elapsed);
}

/// What the access log says of one request (both lanes write it).
pub(crate) struct AccessLine<'a> {
    pub client: IpAddr,
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub route: Option<usize>,
    pub user: Option<&'a str>,
}

impl AccessLine<'_> {
    pub(crate) fn log(&self, elapsed: Duration) {
        tracing::info!(
            target: "flowgate::access",
            client = %self.client,
            host = %self.host,
            method = self.method,
            path = self.path,
            status = self.status,
            route = self.route,
            user = self.user.unwrap_or("-"),
            micros = elapsed.as_micros() as u64,
            "request"
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lose_their_port_and_case() {
        assert_eq!(host_without_port("App.Example:8443"), "app.example");
        assert_eq!(host_without_port("app.example."), "app.example");
        assert_eq!(host_without_port("[::1]:8080"), "::1");
        assert_eq!(host_without_port("127.0.0.1"), "127.0.0.1");
    }

    #[test]
    fn path_prefixes_match_whole_segments() {
        assert!(path_has_prefix("/anything", "/"));
        assert!(path_has_prefix("/app", "/app"));
        assert!(path_has_prefix("/app/x", "/app"));
        assert!(!path_has_prefix("/application", "/app"));
        assert!(path_has_prefix("/app/x", "/app/"));
    }
}
