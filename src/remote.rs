//! The remote flow executor: login flows run on authentik, or on another
//! flowgate, driven through the flow executor API as authentik's own
//! outposts drive it (PROTOCOL.md §1.10). Each login has a cookie jar of
//! its own, kept in the flow's state (the visitor's session on this side),
//! never sent to the browser. Raw 302s are followed with GET, to the
//! remote's own origin only; a `xak-flow-redirect` back to the executor is
//! "ask again", any other is the end of the flow, and then
//! `core/users/me/` says who logged in.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, COOKIE, LOCATION, ORIGIN, SET_COOKIE, USER_AGENT};
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{Config, RemoteConfig};
use crate::flow::{
    Challenge, Component, FlowError, FlowExecutor, FlowRequest, FlowState, FlowSummary, Login, Step,
};
use crate::gate::SignedIn;
use crate::gateway::Gateway;
use crate::identity::Identity;
use crate::session::{now_secs, Store};

/// Requests one executor call may take, redirects included (the Go
/// outposts allow 10 rounds).
const MAX_ROUNDS: usize = 10;
/// The largest answer read from the remote; challenges are a few kB.
const MAX_ANSWER: usize = 1024 * 1024;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct RemoteExecutor {
    /// `https://auth.example.com`, no trailing slash.
    origin: String,
    /// `/api/v3`.
    api_prefix: String,
    client: HttpsClient,
    timeout: Duration,
    outpost_token: Option<HeaderValue>,
    /// The flows the routes name: the only ones run through this gateway.
    slugs: HashSet<String>,
    /// Flow titles as the remote's challenges name them.
    titles: Mutex<BTreeMap<String, String>>,
    /// Run with a session's jar to end the remote session at sign-out.
    invalidation_flow: String,
}

/// A login's state on this side: the remote's cookies, and, once the flow
/// is done, who it logged in.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RemoteState {
    #[serde(default)]
    jar: BTreeMap<String, String>,
    /// The client's address as the login presented it: the session's later
    /// requests (revalidation, sign-out) present the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    login: Option<Identity>,
    /// What the remote showed after the last answer passed its stage
    /// (`{"challenge": …}` or `{"done": to}`): answered as authentik does,
    /// with a 302 back to the executor, and given on the GET that follows
    /// without asking the remote again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<Value>,
}

impl RemoteState {
    fn read(state: &FlowState) -> RemoteState {
        serde_json::from_value(state.0.clone()).unwrap_or_default()
    }

    fn write(&self, state: &mut FlowState) {
        state.0 = serde_json::to_value(self).unwrap_or(Value::Null);
    }

    fn cookie_header(&self) -> Option<HeaderValue> {
        if self.jar.is_empty() {
            return None;
        }
        let pairs: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
        HeaderValue::from_str(&pairs.join("; ")).ok()
    }

    /// The CSRF token the remote gave (authentik's `authentik_csrf`, a
    /// flowgate's `<cookie>_csrf`): sent back once the session is
    /// authenticated, as `X-authentik-CSRF` (§1.8).
    fn csrf(&self) -> Option<&str> {
        self.jar
            .iter()
            .find(|(name, _)| name.ends_with("_csrf"))
            .map(|(_, value)| value.as_str())
    }

    fn take_cookies(&mut self, headers: &http::HeaderMap) {
        for value in headers.get_all(SET_COOKIE) {
            let Some(cookie) = value
                .to_str()
                .ok()
                .and_then(|v| cookie::Cookie::parse(v.to_owned()).ok())
            else {
                continue;
            };
            let gone = cookie.value().is_empty()
                || cookie
                    .max_age()
                    .is_some_and(|age| age.is_zero() || age.is_negative())
                || cookie
                    .expires_datetime()
                    .is_some_and(|at| at <= cookie::time::OffsetDateTime::now_utc());
            if gone {
                self.jar.remove(cookie.name());
            } else {
                self.jar
                    .insert(cookie.name().to_owned(), cookie.value().to_owned());
            }
        }
    }
}

/// One answer of the remote.
struct Answer {
    status: StatusCode,
    location: Option<String>,
    body: Bytes,
}

/// `users/me` as authentik answers it (§4); 2026.8's `is_current` and
/// `users` are not needed and not required.
#[derive(Deserialize)]
struct SessionUser {
    user: UserSelf,
}

#[derive(Deserialize)]
struct UserSelf {
    pk: u64,
    username: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    is_superuser: bool,
    #[serde(default)]
    groups: Vec<GroupRef>,
    #[serde(default)]
    uid: String,
}

#[derive(Deserialize)]
struct GroupRef {
    name: String,
}

impl RemoteExecutor {
    pub fn new(config: &Config, remote: &RemoteConfig) -> Result<RemoteExecutor, String> {
        let roots = match &remote.ca_file {
            Some(path) => crate::tls::Roots::SystemAnd(path),
            None => crate::tls::Roots::System,
        };
        // ALPN is the connector's to set (http/1.1).
        let tls = crate::tls::client_config(roots, remote.client_auth.as_ref(), &[])?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(remote.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        let origin = remote.url.to_string().trim_end_matches('/').to_owned();
        let outpost_token = match &remote.outpost_token {
            Some(token) => Some(
                HeaderValue::from_bytes(&token.0)
                    .map_err(|_| "executor.outpost_token_file: not a header value".to_owned())?,
            ),
            None => None,
        };
        // The routes' flows, and the invalidation flow API clients run to
        // sign out as they would at authentik.
        let slugs: HashSet<String> = config
            .routes
            .iter()
            .map(|r| r.flow.clone())
            .chain([remote.invalidation_flow.clone()])
            .collect();
        Ok(RemoteExecutor {
            origin,
            api_prefix: remote.api_prefix.clone(),
            client,
            timeout: remote.timeout,
            outpost_token,
            slugs,
            titles: Mutex::default(),
            invalidation_flow: remote.invalidation_flow.clone(),
        })
    }

    /// The executor URL's path and query, `query` encoded as Python's
    /// `urlencode` does it, so that the remote's raw 302s match (§1.4).
    fn executor_path(&self, slug: &str, query: &str) -> String {
        format!(
            "{}/flows/executor/{slug}/?query={}",
            self.api_prefix,
            crate::api::quote_plus(query)
        )
    }

    fn is_executor(&self, path: &str) -> bool {
        path.starts_with(&format!("{}/flows/executor/", self.api_prefix))
    }

    /// A `Location` or `to` as a path on the remote, if it is one: relative,
    /// or absolute on the remote's own origin. Anything else is not followed.
    fn on_remote(&self, target: &str) -> Option<String> {
        if target.starts_with('/') && !target.starts_with("//") {
            return Some(target.to_owned());
        }
        let rest = target.strip_prefix(&self.origin)?;
        match rest {
            "" => Some("/".to_owned()),
            rest if rest.starts_with('/') => Some(rest.to_owned()),
            _ => None,
        }
    }

    /// One request to the remote with the login's cookies, the client's
    /// address, and (authenticated) its CSRF token; the cookies it sets go
    /// into the jar.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        state: &mut RemoteState,
        client_ip: Option<IpAddr>,
    ) -> Result<Answer, FlowError> {
        let url = format!("{}{path}", self.origin);
        let what = format!("{method} {}{}", self.origin, strip_query(path));
        let mut request = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("flowgate/", env!("CARGO_PKG_VERSION")));
        if let Some(cookies) = state.cookie_header() {
            request = request.header(COOKIE, cookies);
        }
        if let Some(ip) = client_ip {
            // One address for the whole login: authentik's session binding
            // signs a session out when it changes.
            match &self.outpost_token {
                Some(token) => {
                    request = request
                        .header("x-authentik-outpost-token", token.clone())
                        .header("x-authentik-remote-ip", ip.to_string());
                }
                None => request = request.header("x-forwarded-for", ip.to_string()),
            }
        }
        let payload = match body {
            Some(body) => {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .header(ORIGIN, self.origin.as_str());
                if let Some(csrf) = state.csrf() {
                    request = request.header("x-authentik-csrf", csrf);
                }
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(payload))
            .map_err(|e| FlowError::unavailable(what.clone(), e))?;
        // A GET that could not connect is sent once more, a moment later:
        // it never reached the remote. (Connections the remote closed in
        // the pool are retried by the client itself.) Never a POST.
        let again = (method == Method::GET).then(|| {
            let mut copy = Request::new(Full::new(Bytes::new()));
            *copy.method_mut() = request.method().clone();
            *copy.uri_mut() = request.uri().clone();
            *copy.headers_mut() = request.headers().clone();
            copy
        });
        let exchange = async {
            let response = match (self.client.request(request).await, again) {
                (Ok(response), _) => response,
                (Err(error), Some(again)) if error.is_connect() => {
                    tracing::debug!(reason = %crate::respond::chain(&error), "{what}: asking again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    self.client
                        .request(again)
                        .await
                        .map_err(|e| FlowError::unavailable(what.clone(), e))?
                }
                (Err(error), _) => return Err(FlowError::unavailable(what.clone(), error)),
            };
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| match e.downcast::<http_body_util::LengthLimitError>() {
                    Ok(_) => FlowError::bad_gateway(format!(
                        "{what}: answer larger than {MAX_ANSWER} bytes"
                    )),
                    Err(e) => FlowError::Unavailable {
                        what: what.clone(),
                        bad_gateway: false,
                        source: Some(e),
                    },
                })?
                .to_bytes();
            Ok::<_, FlowError>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                FlowError::unavailable(what.clone(), format!("no answer within {:?}", self.timeout))
            })??;
        state.take_cookies(&parts.headers);
        Ok(Answer {
            status: parts.status,
            location: parts
                .headers
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body,
        })
    }

    /// Send, follow what the remote sends back until a challenge or the end
    /// (`Step::Done`; who logged in is not asked here).
    /// Drive the remote to its next challenge or its end; and whether the
    /// answer sent (if any) passed its stage (the remote redirected).
    async fn drive(
        &self,
        request: &FlowRequest<'_>,
        state: &mut RemoteState,
        answer: Option<Value>,
    ) -> Result<(Step, bool), FlowError> {
        let mut path = self.executor_path(request.slug, request.query);
        let posted = answer.is_some();
        let mut body = answer;
        let mut passed = false;
        for round in 0..MAX_ROUNDS {
            let method = match body {
                Some(_) => Method::POST,
                None => Method::GET,
            };
            let answer = self
                .send(
                    method,
                    &path,
                    body.take().as_ref(),
                    state,
                    request.client_ip,
                )
                .await?;
            let what = format!("{}{}", self.origin, strip_query(&path));
            match answer.status {
                StatusCode::MOVED_PERMANENTLY
                | StatusCode::FOUND
                | StatusCode::SEE_OTHER
                | StatusCode::TEMPORARY_REDIRECT
                | StatusCode::PERMANENT_REDIRECT => {
                    // A stage passed (after a POST, or by itself on a GET):
                    // the next challenge is a GET away.
                    passed |= posted && round == 0;
                    let location = answer.location.unwrap_or_default();
                    path = self.on_remote(&location).ok_or_else(|| {
                        FlowError::bad_gateway(format!(
                            "{what}: redirect to another origin ({location}) not followed"
                        ))
                    })?;
                }
                StatusCode::NOT_FOUND if self.is_executor(&path) => {
                    tracing::warn!(flow = %request.slug, remote = %self.origin, "the remote executor has no such flow (is the route's flow the remote's slug?)");
                    return Err(FlowError::UnknownFlow(request.slug.to_owned()));
                }
                StatusCode::OK => {
                    let value: Value = serde_json::from_slice(&answer.body).map_err(|_| {
                        FlowError::bad_gateway(format!("{what}: answer is not JSON"))
                    })?;
                    let challenge = Challenge::from_json(value)
                        .map_err(|e| FlowError::bad_gateway(format!("{what}: {e}")))?;
                    if let Some(info) = &challenge.flow_info {
                        if !info.title.is_empty() {
                            if let Ok(mut titles) = self.titles.lock() {
                                titles.insert(request.slug.to_owned(), info.title.clone());
                            }
                        }
                    }
                    match &challenge.component {
                        Component::Redirect(redirect) => {
                            match self.on_remote(&redirect.to) {
                                // Back to the executor: ask again (§1.4).
                                Some(next) if self.is_executor(&next) => path = next,
                                _ => {
                                    let to = redirect.to.clone();
                                    return Ok((Step::Done { to }, passed));
                                }
                            }
                        }
                        _ => return Ok((Step::Challenge(challenge), passed)),
                    }
                }
                status => {
                    return Err(FlowError::bad_gateway(format!(
                        "{what}: answered HTTP {status}"
                    )))
                }
            }
        }
        Err(FlowError::bad_gateway(format!(
            "{}: more than {MAX_ROUNDS} redirects in one step",
            self.origin
        )))
    }

    /// One executor call: drive it, and at the end learn who logged in.
    async fn step(
        &self,
        request: &FlowRequest<'_>,
        state: &mut FlowState,
        answer: Option<Value>,
    ) -> Result<Step, FlowError> {
        let mut remote = RemoteState::read(state);
        remote.client = remote.client.or(request.client_ip);
        let answered = answer.is_some();
        if answered {
            remote.pending = None;
        } else if let Some(pending) = &remote.pending {
            // Kept until the next answer: asking again changes nothing.
            return unstash(pending.clone());
        }
        let typed = answer
            .as_ref()
            .and_then(|a| a.get("uid_field"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let driven = self.drive(request, &mut remote, answer).await;
        let (mut step, passed) = match driven {
            Ok((step, passed)) => (Ok(step), passed),
            Err(error) => (Err(error), false),
        };
        if let (true, Ok(Step::Challenge(challenge))) = (answered, &step) {
            log_refused(request, challenge, typed.as_deref());
        }
        if let Ok(Step::Done { .. }) = step {
            match self.who(&mut remote, request.client_ip).await {
                Ok(identity) => remote.login = identity,
                Err(error) => step = Err(error),
            }
        }
        if passed {
            // As authentik answers a passed stage: "go and GET the next".
            if let Ok(next) = &step {
                remote.pending = stash(next);
                step = Ok(Step::Next);
            }
        }
        remote.write(state);
        step
    }

    /// Who the login's remote session belongs to (`core/users/me/`), or
    /// nobody: a flow that logs no one in (an invalidation flow, say) ends
    /// with users/me refused, 403, as authentik refuses anonymous callers.
    async fn who(
        &self,
        state: &mut RemoteState,
        client_ip: Option<IpAddr>,
    ) -> Result<Option<Identity>, FlowError> {
        let path = format!("{}/core/users/me/", self.api_prefix);
        let answer = self
            .send(Method::GET, &path, None, state, client_ip)
            .await?;
        let what = format!("{}{path}", self.origin);
        if matches!(
            answer.status,
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED
        ) {
            return Ok(None);
        }
        if answer.status != StatusCode::OK {
            return Err(FlowError::bad_gateway(format!(
                "{what}: answered HTTP {} after the flow ended",
                answer.status
            )));
        }
        let me: SessionUser = serde_json::from_slice(&answer.body)
            .map_err(|e| FlowError::bad_gateway(format!("{what}: {e}")))?;
        let user = me.user;
        let mut groups: Vec<String> = user.groups.into_iter().map(|g| g.name).collect();
        groups.sort();
        // What becomes identity headers must be fit for them: no empty
        // name, no control characters anywhere (a CR or LF would be
        // dropped from one header and leave the others standing).
        let unfit = |text: &str| text.chars().any(char::is_control);
        if user.username.trim().is_empty()
            || unfit(&user.username)
            || unfit(&user.name)
            || user.email.as_deref().is_some_and(unfit)
            || user.uid.chars().any(char::is_control)
            || groups.iter().any(|g| g.is_empty() || unfit(g))
        {
            return Err(FlowError::bad_gateway(format!(
                "{what}: the user's name, email, uid or a group is empty or holds control characters; not signed in"
            )));
        }
        Ok(Some(Identity {
            name: if user.name.is_empty() {
                user.username.clone()
            } else {
                user.name
            },
            username: user.username,
            email: user.email.unwrap_or_default(),
            groups,
            uid: user.uid,
            pk: user.pk,
            is_superuser: user.is_superuser,
            header_values: Default::default(),
        }))
    }
}

/// A step kept for the GET after a 302 (`RemoteState::pending`).
fn stash(step: &Step) -> Option<Value> {
    match step {
        Step::Challenge(challenge) => Some(serde_json::json!({ "challenge": challenge.to_json() })),
        Step::Done { to } => Some(serde_json::json!({ "done": to })),
        Step::Next => None,
    }
}

fn unstash(pending: Value) -> Result<Step, FlowError> {
    if let Some(to) = pending.get("done").and_then(Value::as_str) {
        return Ok(Step::Done { to: to.to_owned() });
    }
    let challenge = pending.get("challenge").cloned().unwrap_or(Value::Null);
    Challenge::from_json(challenge)
        .map(Step::Challenge)
        .map_err(|e| FlowError::internal(format!("a kept challenge does not decode: {e}")))
}

/// The remote refused a password or a code: the same `login failed` line as
/// the embedded engine's, so that fail2ban on the gateway's host sees
/// guesses made through it (the remote logs its own besides).
fn log_refused(request: &FlowRequest<'_>, challenge: &Challenge, typed: Option<&str>) {
    if challenge
        .response_errors
        .as_ref()
        .is_none_or(|e| e.is_empty())
    {
        return;
    }
    let (reason, user) = match &challenge.component {
        Component::Identification(_) => (crate::login::FAILED_PASSWORD, typed.unwrap_or("")),
        Component::Password(c) => (crate::login::FAILED_PASSWORD, c.user.pending_user.as_str()),
        Component::AuthenticatorValidate(c) => {
            (crate::login::FAILED_TOTP, c.user.pending_user.as_str())
        }
        _ => return,
    };
    crate::login::log_failed(reason, user, request.client_ip, request.slug);
}

/// Sessions minted from a remote login follow the remote session: at most
/// every `revalidate`, when a session is used, a task off the request path
/// asks the remote whether its side still holds, and ends ours when not
/// (signed out there, the user disabled, the session revoked).
pub struct Revalidation {
    every: u64,
    executor: Arc<dyn FlowExecutor>,
    sessions: Arc<Store>,
    /// When each session was last checked (or first seen), Unix seconds.
    /// Keyed by session id; lives as long as this gateway.
    checked: Mutex<HashMap<String, u64>>,
}

/// Past this many sessions tracked, those unseen for a day are forgotten.
const TRACKED: usize = 100_000;

impl Revalidation {
    pub fn new(
        every: Duration,
        executor: Arc<dyn FlowExecutor>,
        sessions: Arc<Store>,
    ) -> Revalidation {
        Revalidation {
            every: every.as_secs().max(1),
            executor,
            sessions,
            checked: Mutex::default(),
        }
    }

    /// `signed` was just used under `id`: check it if it is due. One short
    /// lock, never held across an await; the check itself is spawned.
    pub fn touch(&self, gateway: &Gateway, id: &str, signed: &SignedIn) {
        let Some(remote) = &signed.session.executor_session else {
            return;
        };
        let now = now_secs();
        {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            if checked.len() > TRACKED {
                checked.retain(|_, at| now.saturating_sub(*at) < 86_400);
            }
            match checked.get(id) {
                Some(at) if now.saturating_sub(*at) < self.every => return,
                // First seen here: it was checked at login (or at the last
                // gateway's last check, at most `every` ago).
                None => {
                    checked.insert(id.to_owned(), now);
                    return;
                }
                Some(_) => {
                    checked.insert(id.to_owned(), now);
                }
            }
        }
        let executor = self.executor.clone();
        let sessions = self.sessions.clone();
        let id = id.to_owned();
        let remote = remote.clone();
        let user = signed.identity.username.clone();
        let fallback = gateway_address(gateway);
        let applications: Vec<String> = gateway
            .applications()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let session = signed.session.clone();
        tokio::spawn(async move {
            match executor.current_user(&remote, fallback).await {
                Ok(Some(now)) if now.username == user => {
                    // Groups, names and the remote's application policies as
                    // the remote has them today.
                    let refused = crate::gate::refused_by(&*executor, &remote, &applications).await;
                    let identity = session.identity.as_deref();
                    if refused != session.refused_applications || identity != Some(&now) {
                        let changed = sessions
                            .update(&id, |s| {
                                s.refused_applications = refused;
                                s.identity = Some(Arc::new(now));
                            })
                            .await;
                        if let Err(error) = changed {
                            tracing::warn!(%error, "the session could not be updated in the store");
                        }
                    }
                }
                Ok(_) => {
                    tracing::info!(user = %user, "session ended: the remote executor's session is gone (signed out there, or the user disabled)");
                    if let Err(error) = sessions.delete(&id).await {
                        tracing::warn!(%error, "the session could not be deleted from the store");
                    }
                }
                Err(error) => tracing::warn!(
                    user = %user,
                    reason = %crate::respond::chain(&error),
                    "could not check the session with the remote executor; it stays until the next check"
                ),
            }
        });
    }
}

/// The address sent when a session recorded none (sessions from before
/// the client address was kept): flowgate's own listener's.
fn gateway_address(gateway: &Gateway) -> IpAddr {
    gateway.config.server.listen.ip()
}

/// A path without its query (which may carry `next`), for log lines.
fn strip_query(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

#[async_trait]
impl FlowExecutor for RemoteExecutor {
    async fn find_flow(&self, slug: &str) -> Result<Option<FlowSummary>, FlowError> {
        if !self.slugs.contains(slug) {
            return Ok(None);
        }
        let title = self
            .titles
            .lock()
            .ok()
            .and_then(|titles| titles.get(slug).cloned())
            .unwrap_or_else(|| "Sign in".to_owned());
        Ok(Some(FlowSummary {
            slug: slug.to_owned(),
            title,
            invalidates: slug == self.invalidation_flow,
        }))
    }

    async fn challenge(
        &self,
        request: FlowRequest<'_>,
        state: &mut FlowState,
    ) -> Result<Step, FlowError> {
        self.step(&request, state, None).await
    }

    async fn respond(
        &self,
        request: FlowRequest<'_>,
        state: &mut FlowState,
        response: Value,
    ) -> Result<Step, FlowError> {
        self.step(&request, state, Some(response)).await
    }

    async fn login(&self, state: &FlowState) -> Result<Option<Login>, FlowError> {
        let remote = RemoteState::read(state);
        Ok(remote.login.map(|identity| Login {
            identity,
            // The remote decides what its flow checks; flowgate cannot tell.
            second_factor: false,
            // The remote's own session may be remembered; this one keeps
            // `session.lifetime`.
            remember: None,
            browser_session: false,
            // The remote keeps its own cookies on its side of the flow.
            memo: None,
            executor_session: Some(FlowState(
                serde_json::to_value(RemoteState {
                    jar: remote.jar,
                    client: remote.client,
                    login: None,
                    pending: None,
                })
                .unwrap_or(Value::Null),
            )),
        }))
    }

    async fn sign_out(&self, session: &FlowState, client_ip: IpAddr) -> Result<(), FlowError> {
        let mut remote = RemoteState::read(session);
        let request = FlowRequest {
            slug: &self.invalidation_flow,
            query: "",
            user: None,
            second_factor: false,
            client_ip: Some(remote.client.unwrap_or(client_ip)),
            memo: None,
        };
        match self.drive(&request, &mut remote, None).await?.0 {
            Step::Done { .. } => Ok(()),
            Step::Challenge(challenge) => Err(FlowError::bad_gateway(format!(
                "the invalidation flow `{}` asked for {} instead of ending the session",
                self.invalidation_flow,
                challenge.component.name()
            ))),
            Step::Next => Ok(()),
        }
    }

    async fn may_use(&self, session: &FlowState, application: &str) -> Result<bool, FlowError> {
        let mut remote = RemoteState::read(session);
        let client = remote.client;
        let path = format!(
            "{}/core/applications/{application}/check_access/",
            self.api_prefix
        );
        let answer = self
            .send(Method::GET, &path, None, &mut remote, client)
            .await?;
        let what = format!("{}{path}", self.origin);
        if answer.status != StatusCode::OK {
            return Err(FlowError::bad_gateway(format!(
                "{what}: answered HTTP {}",
                answer.status
            )));
        }
        #[derive(Deserialize)]
        struct PolicyTestResult {
            passing: bool,
        }
        let result: PolicyTestResult = serde_json::from_slice(&answer.body)
            .map_err(|e| FlowError::bad_gateway(format!("{what}: {e}")))?;
        Ok(result.passing)
    }

    async fn current_user(
        &self,
        session: &FlowState,
        client_ip: IpAddr,
    ) -> Result<Option<Identity>, FlowError> {
        let mut remote = RemoteState::read(session);
        let client = remote.client.unwrap_or(client_ip);
        self.who(&mut remote, Some(client)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jar_keeps_what_the_remote_sets_and_drops_what_it_ends() {
        let mut state = RemoteState::default();
        let mut headers = http::HeaderMap::new();
        headers.append(
            SET_COOKIE,
            HeaderValue::from_static("authentik_session=abc; Path=/; HttpOnly; SameSite=Lax"),
        );
        headers.append(
            SET_COOKIE,
            HeaderValue::from_static("authentik_csrf=tok; Path=/"),
        );
        state.take_cookies(&headers);
        assert_eq!(
            state.cookie_header().unwrap(),
            "authentik_csrf=tok; authentik_session=abc"
        );
        assert_eq!(state.csrf(), Some("tok"));
        let mut ended = http::HeaderMap::new();
        ended.append(
            SET_COOKIE,
            HeaderValue::from_static("authentik_session=; Max-Age=0; Path=/"),
        );
        state.take_cookies(&ended);
        assert_eq!(state.cookie_header().unwrap(), "authentik_csrf=tok");
    }
}
