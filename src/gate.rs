//! The gate: which session a request carries, and what that means for it:
//! forward (with or without an identity), send to login, 401, or 403. Also
//! the session cookie itself: reading, minting at login (new id, old record
//! deleted), and clearing.

use std::sync::Arc;
use std::time::Duration;

use cookie::{Cookie, SameSite};
use http::header::{HeaderValue, ACCEPT, COOKIE, LOCATION, SET_COOKIE, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, Response, StatusCode};

use crate::config::RouteConfig;
use crate::router::{Context, Gateway};
use crate::session::{now_secs, Identity, Session, StoreError};
use crate::{empty, Body};

pub enum Decision {
    /// Send upstream; with the user's identity, or anonymously (skip_auth).
    Forward(Option<Arc<Identity>>),
    /// Browser navigation without a session: 302 here.
    Login(String),
    /// Anything else without a session: 401 naming where to log in.
    Unauthorized { login: String, executor: String },
    /// Signed in, but not allowed on this route.
    Forbidden(Arc<Identity>),
}

/// The session named by the request's cookie, if its signature holds and the
/// store still has it. Anything else (tampered, expired, unknown, garbage) is
/// simply no session.
pub async fn session(gateway: &Gateway, headers: &HeaderMap) -> Option<(String, Session)> {
    let name = gateway.config.session.cookie_name.as_str();
    for value in cookie_values(headers, name) {
        let Some(id) = gateway.signer.verify(value) else {
            continue;
        };
        match gateway.sessions.get(id).await {
            Ok(Some(session)) => {
                if session.identity.is_some() {
                    // Idle timeout: activity keeps an authenticated session alive.
                    let _ = gateway
                        .sessions
                        .touch(id, idle_ttl(gateway, &session))
                        .await;
                }
                return Some((id.to_owned(), session));
            }
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(%error, "session store lookup failed; treating the request as anonymous");
                return None;
            }
        }
    }
    None
}

/// The request path's check: the identity of the authenticated session the
/// cookie names, with its idle deadline refreshed. One read-locked lookup,
/// no copy of the session.
pub async fn identity(gateway: &Gateway, headers: &HeaderMap) -> Option<Arc<Identity>> {
    let name = gateway.config.session.cookie_name.as_str();
    let idle = gateway.config.session.idle_timeout;
    for value in cookie_values(headers, name) {
        let Some(id) = gateway.signer.verify(value) else {
            continue;
        };
        match gateway.sessions.identity(id, idle).await {
            Ok(Some(identity)) => return Some(identity),
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(%error, "session store lookup failed; treating the request as anonymous");
                return None;
            }
        }
    }
    None
}

/// Every value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_values<'h>(
    headers: &'h HeaderMap,
    name: &'h str,
) -> impl Iterator<Item = &'h str> + 'h {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"'))
        })
}

fn idle_ttl(gateway: &Gateway, session: &Session) -> Duration {
    let left = session.expires.saturating_sub(now_secs());
    gateway
        .config
        .session
        .idle_timeout
        .min(Duration::from_secs(left))
}

pub fn decide(
    gateway: &Gateway,
    route: &RouteConfig,
    request: &Request<hyper::body::Incoming>,
    identity: Option<Arc<Identity>>,
) -> Decision {
    if let Some(identity) = identity {
        return if allowed(route, &identity) {
            Decision::Forward(Some(identity))
        } else {
            Decision::Forbidden(identity)
        };
    }
    let path_and_query = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    if skips_auth(route, path_and_query) {
        return Decision::Forward(None);
    }
    let prefix = &gateway.config.server.prefix;
    let login = format!(
        "{prefix}/flow/{}/?next={}",
        route.flow,
        encode(path_and_query)
    );
    if is_navigation(request) {
        Decision::Login(login)
    } else {
        Decision::Unauthorized {
            login,
            executor: format!("{prefix}/api/v3/flows/executor/{}/", route.flow),
        }
    }
}

/// Whether `skip_auth` lets this `path?query` through without a session.
/// Never for a path with dot segments (`/public/../admin`, also spelled
/// `%2e%2e`, `..;`, or with `\` or `%2f` for `/`): the upstream may resolve
/// them to a path outside the open prefix the pattern meant.
pub(crate) fn skips_auth(route: &RouteConfig, path_and_query: &str) -> bool {
    !route.skip_auth.is_empty()
        && route.skip_auth.iter().any(|re| re.is_match(path_and_query))
        && without_dot_segments(path_and_query)
}

fn without_dot_segments(path_and_query: &str) -> bool {
    let path = path_and_query
        .split_once('?')
        .map_or(path_and_query, |(path, _)| path);
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    decoded.split(|&b| b == b'/' || b == b'\\').all(|segment| {
        let segment = segment.split(|&b| b == b';').next().unwrap_or(segment);
        segment != b"." && segment != b".."
    })
}

pub(crate) fn allowed(route: &RouteConfig, identity: &Identity) -> bool {
    let allow = &route.allow;
    if allow.groups.is_empty() && allow.users.is_empty() {
        return true;
    }
    allow
        .users
        .iter()
        .any(|u| u.eq_ignore_ascii_case(&identity.username))
        || allow
            .groups
            .iter()
            .any(|g| identity.groups.iter().any(|have| have == g))
}

/// A top-level page load, which can follow a redirect to a login page. XHR,
/// fetch and API clients get a 401 instead (PROTOCOL.md §7, complaints 6–9).
fn is_navigation(request: &Request<hyper::body::Incoming>) -> bool {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return false;
    }
    let headers = request.headers();
    if headers.get("x-requested-with").is_some() {
        return false;
    }
    match headers.get("sec-fetch-mode").and_then(|v| v.to_str().ok()) {
        Some(mode) => mode == "navigate",
        None => wants_html(request),
    }
}

pub fn wants_html<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

pub fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub fn to_login(location: &str) -> Response<Body> {
    redirect(StatusCode::FOUND, location)
}

/// A redirect nobody should cache.
pub(crate) fn redirect(status: StatusCode, location: &str) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(LOCATION, value);
    }
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

pub fn unauthorized(login: &str, executor: &str) -> Response<Body> {
    let body = serde_json::json!({
        "error": "unauthenticated",
        "detail": "Sign in first: run the login flow (as JSON at executor_url, or in a browser at login_url), then retry with the session cookie.",
        "login_url": login,
        "executor_url": executor,
    });
    let mut response = crate::api::json_response(StatusCode::UNAUTHORIZED, &body);
    let challenge = format!("FlowgateSession realm=\"flowgate\", executor=\"{executor}\"");
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(WWW_AUTHENTICATE, value);
    }
    response
}

/// Log a user in: a new session under a new id (never the pre-auth one), the
/// old record gone, the cookie on `response`.
pub async fn mint(
    gateway: &Gateway,
    context: &Context,
    identity: Identity,
    old_id: Option<&str>,
    response: &mut Response<Body>,
) -> Result<Session, StoreError> {
    gateway.metrics.logins_succeeded.inc();
    let lifetime = gateway.config.session.lifetime;
    let session = Session::authenticated(identity, now_secs(), lifetime);
    let id = crate::session::random_token();
    gateway
        .sessions
        .put(
            &id,
            &session,
            gateway.config.session.idle_timeout.min(lifetime),
        )
        .await?;
    if let Some(old) = old_id {
        let _ = gateway.sessions.delete(old).await;
    }
    set_cookie(gateway, context, &id, Some(lifetime), response);
    Ok(session)
}

/// Start a pre-auth session for an anonymous visitor.
pub async fn start_pre_auth(
    gateway: &Gateway,
    context: &Context,
    response_headers: &mut HeaderMap,
) -> Result<(String, Session), StoreError> {
    let ttl = gateway.config.session.pre_auth_ttl;
    let session = Session::pre_auth(now_secs(), ttl);
    let id = crate::session::random_token();
    gateway.sessions.put(&id, &session, ttl).await?;
    if let Some(value) = cookie_header(gateway, context, &id, None) {
        response_headers.append(SET_COOKIE, value);
    }
    Ok((id, session))
}

/// Save a session back (after its flows changed).
pub async fn save(gateway: &Gateway, id: &str, session: &Session) -> Result<(), StoreError> {
    let ttl = if session.identity.is_some() {
        idle_ttl(gateway, session)
    } else {
        Duration::from_secs(session.expires.saturating_sub(now_secs()))
    };
    gateway.sessions.put(id, session, ttl).await
}

pub fn set_cookie(
    gateway: &Gateway,
    context: &Context,
    id: &str,
    max_age: Option<Duration>,
    response: &mut Response<Body>,
) {
    if let Some(value) = cookie_header(gateway, context, id, max_age) {
        response.headers_mut().append(SET_COOKIE, value);
    }
}

fn cookie_header(
    gateway: &Gateway,
    context: &Context,
    id: &str,
    max_age: Option<Duration>,
) -> Option<HeaderValue> {
    let session = &gateway.config.session;
    let mut cookie = Cookie::build((session.cookie_name.clone(), gateway.signer.sign(id)))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(gateway.secure_cookies(context));
    if let Some(domain) = &session.cookie_domain {
        cookie = cookie.domain(domain.clone());
    }
    if let Some(age) = max_age {
        cookie = cookie.max_age(cookie::time::Duration::seconds(age.as_secs() as i64));
    }
    HeaderValue::from_str(&cookie.build().to_string()).ok()
}

pub fn clear_cookie(gateway: &Gateway, context: &Context, response: &mut Response<Body>) {
    let session = &gateway.config.session;
    let mut cookie = Cookie::build((session.cookie_name.clone(), ""))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(gateway.secure_cookies(context))
        .max_age(cookie::time::Duration::ZERO);
    if let Some(domain) = &session.cookie_domain {
        cookie = cookie.domain(domain.clone());
    }
    append_cookie(response, cookie);
    // The JSON API's CSRF companion goes with it.
    let csrf = Cookie::build((csrf_cookie_name(gateway), ""))
        .path("/")
        .same_site(SameSite::Lax)
        .secure(gateway.secure_cookies(context))
        .max_age(cookie::time::Duration::ZERO);
    append_cookie(response, csrf);
}

/// The JSON API's CSRF cookie: the session cookie's name + `_csrf`, readable
/// by scripts (it is their copy of the token to send back as a header).
/// `proxy::strip_cookie` keeps it from upstreams.
pub fn csrf_cookie_name(gateway: &Gateway) -> String {
    format!("{}_csrf", gateway.config.session.cookie_name)
}

pub fn set_csrf_cookie(
    gateway: &Gateway,
    context: &Context,
    token: &str,
    response: &mut Response<Body>,
) {
    let cookie = Cookie::build((csrf_cookie_name(gateway), token.to_owned()))
        .path("/")
        .same_site(SameSite::Lax)
        .secure(gateway.secure_cookies(context));
    append_cookie(response, cookie);
}

fn append_cookie(response: &mut Response<Body>, cookie: cookie::CookieBuilder<'_>) {
    if let Ok(value) = HeaderValue::from_str(&cookie.build().to_string()) {
        response.headers_mut().append(SET_COOKIE, value);
    }
}
