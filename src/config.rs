//! Configuration: one TOML file, overridable per key from the environment,
//! validated whole before anything starts. `load` returns either a `Config`
//! every other module can trust, or *every* problem found, each with the
//! file, line and key path it belongs to (`flowgate check` prints them).
//!
//! The reading itself lives in `config::read`; this file holds the shapes.

mod read;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;

pub use crate::identity::{HeaderPreset, HeaderSet};

pub use crate::engine::policy::{Binding, Bindings, Mode as PolicyMode, PolicyConfig};
pub use crate::engine::stage::StageConfig;
pub use read::{from_str, load};
pub(crate) use read::{read_toml, stage_defaults, Options, Reader};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (relative paths inside are relative to its folder).
    pub path: PathBuf,
    pub server: Server,
    pub session: SessionConfig,
    pub directory: DirectoryConfig,
    pub executor: ExecutorConfig,
    pub log: LogConfig,
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    /// `[state]`: where sessions and flows in progress are kept.
    pub state: StateConfig,
    /// `[executor_api]`: the embedded executor for others, if served.
    pub executor_api: Option<ExecutorApiConfig>,
    /// `[[flow]]`, in file order; slugs are unique.
    pub flows: Vec<FlowConfig>,
    /// `[stage.<name>]`, plus the built-in stage names (see `StageConfig::builtin`).
    pub stages: BTreeMap<String, StageConfig>,
    /// `[policy.<name>]`.
    pub policies: BTreeMap<String, PolicyConfig>,
    /// `[[route]]`, in file order.
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone)]
pub struct Server {
    /// `server.listen`, default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// `server.tls = { cert, key }`, or a list of them: PEM files, the
    /// certificate for each connection chosen by SNI (the first is the
    /// default). Empty means plain HTTP.
    pub tls: Vec<TlsConfig>,
    /// `server.redirect_http`: a plain-HTTP listener (`"0.0.0.0:80"`) that
    /// answers every request with a redirect to the same URL over HTTPS on
    /// `listen`. Only with `tls`.
    pub redirect_http: Option<SocketAddr>,
    /// `server.workers`: runtime worker threads, default one per core.
    pub workers: usize,
    /// `server.max_connections`, default 16384: beyond it, new connections
    /// wait in the kernel's backlog.
    pub max_connections: usize,
    /// `server.max_header_bytes`, default 32 KiB: a larger request head
    /// gets 431.
    pub max_header_bytes: usize,
    /// `server.max_headers`, default 100: more header fields get 431.
    pub max_headers: usize,
    /// `server.header_read_timeout`, default 10s: a client slower than this
    /// to send a request head is disconnected (slowloris).
    pub header_read_timeout: Duration,
    /// `server.keepalive_timeout`, default 60s: an idle keep-alive
    /// connection is closed after this long.
    pub keepalive_timeout: Duration,
    /// `server.shutdown_timeout`, default 10s: how long in-flight requests
    /// get after SIGTERM.
    pub shutdown_timeout: Duration,
    /// `server.shutdown_delay`, default 0: after SIGTERM, how long `/readyz`
    /// answers 503 while the listener still accepts and serves, so that a
    /// load balancer (a Kubernetes endpoint) stops sending new connections
    /// before they would be refused. A second signal ends the wait.
    pub shutdown_delay: Duration,
    /// `server.fast_lane`, default true: plain-HTTP/1.1 requests of the
    /// common shape are served by the hand-written lane in `h1`.
    pub fast_lane: bool,
    /// `server.trusted_proxies`: CIDRs whose `X-Forwarded-*` headers are
    /// believed. Default: none.
    pub trusted_proxies: Vec<IpNet>,
    /// `server.prefix`: the reserved path prefix, default `/_flowgate`
    /// (starts with `/`, no trailing `/`).
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[proxy]`: how flowgate talks to upstreams.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `connect_timeout`, default 5s: an upstream not accepting the TCP
    /// (and TLS) connection in time gets a 502 page.
    pub connect_timeout: Duration,
    /// `response_timeout`, default 60s: an upstream that has not begun its
    /// answer in time gets a 504 page. Streaming bodies are not limited.
    pub response_timeout: Duration,
    /// `pool_idle_timeout`, default 90s: idle upstream connections close.
    pub pool_idle_timeout: Duration,
    /// `tunnel_idle_timeout`, default 1h: a websocket (or other upgraded
    /// connection) that carries nothing either way this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// `ca_file`: PEM roots for `https://` upstreams, instead of the bundled
    /// public roots.
    pub ca_file: Option<PathBuf>,
    /// `escaped_slashes`, default `refuse`: a path with `%2F`, `%5C` or `\`
    /// gets 400; `keep` sends it upstream as it came (for apps that need
    /// them). Each route may say otherwise.
    pub escaped_slashes: PathRule,
    /// `path_parameters`, default `refuse`: a path with `;` parameters gets
    /// 400; `keep` decides on the path without them (as Tomcat routes) and
    /// sends them upstream. Each route may say otherwise.
    pub path_parameters: PathRule,
}

/// What the gate does with a path it cannot make fully canonical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRule {
    /// 400, before any routing rule sees it.
    Refuse,
    /// Forward it; the route's upstream is trusted to read it safely.
    Keep,
}

/// `[admin]`: health, readiness and metrics, on their own listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `listen`, default `127.0.0.1:9090`; `enabled = false` turns it off.
    pub listen: Option<SocketAddr>,
    /// `token_file`: the bearer token the session endpoints want
    /// (`/sessions`, `/users/{name}/sessions`); without it they are off.
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieSecure {
    /// `Secure` when the request came over TLS, or with `X-Forwarded-Proto:
    /// https` from a trusted proxy. The default.
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// `session.cookie_name`, default `flowgate_session`.
    pub cookie_name: String,
    /// `session.cookie_domain`, one or several: a request's cookie names
    /// the longest one its host is under; none (or no such one) means a
    /// host-only cookie.
    pub cookie_domains: Vec<String>,
    /// `session.cookie_secure`: `auto` (default) | `always` | `never`.
    pub cookie_secure: CookieSecure,
    /// `session.lifetime`, default 12h: absolute.
    pub lifetime: Duration,
    /// `session.idle_timeout`, default 2h.
    pub idle_timeout: Duration,
    /// The signing secret: `session.secret_file`, else env
    /// `FLOWGATE_SESSION_SECRET`, else `session.secret` (discouraged), else
    /// `None` and a random one is made at start (sessions then end with the
    /// process).
    pub secret: Option<Secret>,
    /// `session.pre_auth_ttl`, default 15m: how long a started login lives.
    pub pre_auth_ttl: Duration,
    /// `session.max_pre_auth`, default 10000: logins in progress at once.
    pub max_pre_auth: usize,
    /// `session.max_pre_auth_per_client`, default 100: logins started from
    /// one client address within `pre_auth_ttl`, so that one address cannot
    /// fill the store for everybody.
    pub max_pre_auth_per_client: usize,
    /// `session.allowed_redirect_hosts`: hosts an absolute `next` may point
    /// at, besides every route's host. Entries like `*.example.com` match
    /// subdomains.
    pub allowed_redirect_hosts: Vec<String>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Embedded,
    Redis,
}

/// `[state]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    /// `state.store`: `embedded` (default) | `memory` | `redis`.
    pub store: StoreKind,
    /// `state.path`, default `flowgate.state` beside the config file: the
    /// embedded store's database.
    pub path: PathBuf,
    /// `state.redis_url`: `redis://` or `rediss://` (with `redis`, this or
    /// `redis_sentinels`).
    pub redis_url: Option<String>,
    /// `state.redis_sentinels`: `redis://` or `rediss://` URLs of Redis
    /// Sentinels, which name the master (instead of `redis_url`).
    pub redis_sentinels: Vec<String>,
    /// `state.redis_master_name`: the master the sentinels watch (required
    /// with `redis_sentinels`).
    pub redis_master_name: Option<String>,
    /// `state.redis_ca_file`: PEM roots trusted for `rediss://`, instead of
    /// the system's.
    pub redis_ca_file: Option<PathBuf>,
    /// `state.redis_prefix`, default `flowgate:`: what every key starts with.
    pub redis_prefix: String,
}

#[derive(Debug, Clone)]
pub struct DirectoryConfig {
    /// `directory.users_file`, resolved against the config file's folder.
    pub users_file: PathBuf,
}

/// `[executor]`: who runs the login flows.
#[derive(Debug, Clone)]
pub enum ExecutorConfig {
    /// `executor.kind = "embedded"` (the default): the flows of this
    /// file, the users of `directory.users_file`.
    Embedded,
    /// `executor.kind = "remote"`: authentik, or another flowgate's
    /// `[executor_api]`, driven over its flow executor API.
    Remote(Box<RemoteConfig>),
}

impl ExecutorConfig {
    pub fn is_remote(&self) -> bool {
        matches!(self, ExecutorConfig::Remote(_))
    }
}

/// `[executor_api]`: a listener serving the embedded executor at
/// authentik's paths (`/api/v3/flows/executor/{slug}/`,
/// `/api/v3/core/users/me/`), for remote flowgates and authentik clients.
#[derive(Debug, Clone)]
pub struct ExecutorApiConfig {
    pub listen: SocketAddr,
    /// Certificates, as `server.tls`; none: plain HTTP (loopback only, please).
    pub tls: Vec<TlsConfig>,
}

/// A remote flow executor and how to reach it.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// `executor.url`: scheme and authority only (`https://auth.example.com`).
    pub url: http::Uri,
    /// `executor.api_prefix`, default `/api/v3`.
    pub api_prefix: String,
    /// `executor.ca_file`: roots trusted besides the system's.
    pub ca_file: Option<PathBuf>,
    /// `executor.client_cert` + `client_key`: a client certificate (mTLS).
    pub client_auth: Option<TlsConfig>,
    /// `executor.timeout`, default 10s: each request to the remote.
    pub timeout: Duration,
    /// `executor.outpost_token_file`: an authentik outpost's token, so that
    /// the client's address may be sent as `X-authentik-remote-ip`.
    pub outpost_token: Option<Secret>,
    /// `executor.revalidate`, default 5m: how often a session is checked
    /// against the remote's.
    pub revalidate: Duration,
    /// `executor.invalidation_flow`, default `default-invalidation-flow`:
    /// run at sign-out to end the remote session.
    pub invalidation_flow: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `log.format`: `text` (default) | `json`.
    pub format: LogFormat,
    /// `log.level`: a tracing filter, default `info`. `RUST_LOG` wins.
    pub level: String,
    /// `log.access`, default true: one line per request.
    pub access: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Designation {
    Authentication,
    Authorization,
    Invalidation,
    Enrollment,
    Recovery,
    StageConfiguration,
    Unenrollment,
}

impl Designation {
    pub fn as_str(self) -> &'static str {
        match self {
            Designation::Authentication => "authentication",
            Designation::Authorization => "authorization",
            Designation::Invalidation => "invalidation",
            Designation::Enrollment => "enrollment",
            Designation::Recovery => "recovery",
            Designation::StageConfiguration => "stage_configuration",
            Designation::Unenrollment => "unenrollment",
        }
    }

    pub fn parse(s: &str) -> Option<Designation> {
        Some(match s {
            "authentication" => Designation::Authentication,
            "authorization" => Designation::Authorization,
            "invalidation" => Designation::Invalidation,
            "enrollment" => Designation::Enrollment,
            "recovery" => Designation::Recovery,
            "stage_configuration" => Designation::StageConfiguration,
            "unenrollment" => Designation::Unenrollment,
            _ => return None,
        })
    }
}

/// `flow.authentication` (PROTOCOL.md §1.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowAuthentication {
    None,
    RequireAuthenticated,
    RequireUnauthenticated,
    RequireSuperuser,
}

/// `flow.denied_action`: what a visitor the flow's policies refuse gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeniedAction {
    /// Sent on to `next` when there is one, else told (the default).
    MessageContinue,
    /// Told, always.
    Message,
    /// Sent on to `next` (or `/`), never told.
    Continue,
}

/// A stage binding's `invalid_response_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidResponseAction {
    /// Show the stage again with the errors (the default).
    Retry,
    /// Start the flow again from its first stage, with a fresh context.
    Restart,
    /// Start the flow again from its first stage, keeping the context.
    RestartWithContext,
}

/// One entry of a flow's `stages`: a stage name, or a table binding it
/// with options.
#[derive(Debug, Clone)]
pub struct StageBinding {
    pub stage: String,
    /// `policies` (and `policy_engine_mode`): the stage runs only for
    /// visitors they pass.
    pub policies: Bindings,
    /// `evaluate_on_plan`, default false: the policies decide once, when
    /// the flow is planned.
    pub evaluate_on_plan: bool,
    /// `re_evaluate_policies`, default true: the policies decide when the
    /// stage comes up, on the context as it is then.
    pub re_evaluate_policies: bool,
    pub invalid_response_action: InvalidResponseAction,
}

impl StageBinding {
    /// A stage bound with no policies and every default.
    pub fn plain(stage: &str) -> StageBinding {
        StageBinding {
            stage: stage.to_owned(),
            policies: Bindings::default(),
            evaluate_on_plan: false,
            re_evaluate_policies: true,
            invalid_response_action: InvalidResponseAction::Retry,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FlowConfig {
    pub slug: String,
    /// `title`, default "Sign in".
    pub title: String,
    /// `designation`, default `authentication`.
    pub designation: Designation,
    /// `authentication`, default `none`.
    pub authentication: FlowAuthentication,
    /// `policies` (and `policy_engine_mode`): who may run the flow.
    pub policies: Bindings,
    /// `denied_action`, default `message_continue`.
    pub denied_action: DeniedAction,
    /// The stages in order, each a key of `Config::stages`.
    pub stages: Vec<StageBinding>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserField {
    Username,
    Email,
}

impl UserField {
    pub fn as_str(self) -> &'static str {
        match self {
            UserField::Username => "username",
            UserField::Email => "email",
        }
    }
}

/// A route's host pattern: exact (`app.example`), subdomain wildcard
/// (`*.example`, not matching `example` itself) or any (`*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Exact(String),
    Suffix(String),
}

impl HostPattern {
    pub fn parse(s: &str) -> HostPattern {
        let s = s.trim().to_ascii_lowercase();
        if s == "*" {
            HostPattern::Any
        } else if let Some(rest) = s.strip_prefix("*.") {
            HostPattern::Suffix(format!(".{rest}"))
        } else {
            HostPattern::Exact(s)
        }
    }

    /// How specific the pattern is: an exact host over any suffix, a longer
    /// suffix over a shorter one, anything over `*`.
    pub fn specificity(&self) -> usize {
        match self {
            HostPattern::Any => 0,
            HostPattern::Suffix(suffix) => 1 + suffix.len(),
            HostPattern::Exact(_) => usize::MAX,
        }
    }

    /// `host` must be lower-case and without port.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Allow {
    /// Any of these groups lets a user in. Empty with `users` empty: any
    /// authenticated user.
    pub groups: Vec<String>,
    pub users: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// `host`, default `*`.
    pub host: HostPattern,
    /// `path_prefix`, default `/`; the longest matching prefix wins.
    pub path_prefix: String,
    /// `upstream`: `http://host:port` with an optional base path.
    pub upstream: http::Uri,
    /// `flow`: the login flow's slug, default the first authentication flow.
    pub flow: String,
    /// `authorization_flow`: a flow (a consent, say) a signed-in user runs
    /// once per session before the route lets them in.
    pub authorization_flow: Option<String>,
    /// `skip_auth`: regexes over the canonical request path (never the
    /// query) that pass anonymously.
    pub skip_auth: Vec<Regex>,
    pub allow: Allow,
    /// `policies` (and `policy_engine_mode`): a signed-in user they refuse
    /// is denied (403), as one `allow` does not name is.
    pub policies: Bindings,
    /// `headers`: `default` | `authentik` | `oauth2-proxy` | `authelia`, or
    /// a table of the route's own names (`{ user = "X-WEBAUTH-USER", … }`).
    pub headers: HeaderSet,
    /// `preserve_host`, default true: send the client's `Host` upstream.
    pub preserve_host: bool,
    /// `skip_auth_preflight`, default false: CORS preflight requests
    /// (`OPTIONS` with `Origin` and `Access-Control-Request-Method`), which
    /// browsers send without cookies, pass anonymously to the upstream.
    pub skip_auth_preflight: bool,
    /// `case_insensitive`, default false: the upstream reads paths without
    /// regard to case (IIS and the like), so `path_prefix` and `skip_auth`
    /// match that way too (`/ADMIN` is `/admin`).
    pub case_insensitive: bool,
    /// `escaped_slashes`, default `proxy.escaped_slashes`.
    pub escaped_slashes: PathRule,
    /// `path_parameters`, default `proxy.path_parameters`.
    pub path_parameters: PathRule,
    /// `authentik_application` (remote executor only): the authentik
    /// application whose policy bindings decide who may use this route.
    pub authentik_application: Option<String>,
}

/// One problem in a configuration, placed as precisely as known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `env FLOWGATE_…` when an environment override is wrong).
    pub file: String,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// Key path, e.g. `route[2].upstream`; empty for whole-file problems.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: ", self.file, line)?,
            None => write!(f, "{}: ", self.file)?,
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    pub fn flow(&self, slug: &str) -> Option<&FlowConfig> {
        self.flows.iter().find(|f| f.slug == slug)
    }

    /// Resolve a path from the config file against the file's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        resolve_against(&self.path, p)
    }
}

pub(crate) fn resolve_against(config_path: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config_path
            .parent()
            .map(|d| d.join(p))
            .unwrap_or_else(|| p.to_path_buf())
    }
}

/// Names for a message: `a`, `a or b`, `a, b or c`.
pub fn alternatives(names: &[&str]) -> String {
    match names.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}
