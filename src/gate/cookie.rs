//! The session cookie: reading it (every `flowgate_session` value in the
//! request, any of which may be ours), minting one at login (new id, old
//! record deleted), pre-auth sessions for logins in progress, and clearing.

use std::time::Duration;

use cookie::{Cookie, SameSite};
use http::header::{HeaderValue, COOKIE, SET_COOKIE};
use http::{HeaderMap, Response};

use crate::context::Context;
use crate::flow::{Login, Memo};
use crate::gateway::Gateway;
use crate::session::{now_secs, Session, StoreError};
use crate::Body;

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

pub(super) fn idle_ttl(gateway: &Gateway, session: &Session) -> Duration {
    let left = session.expires.saturating_sub(now_secs());
    gateway
        .config
        .session
        .idle_timeout
        .min(Duration::from_secs(left))
}

/// What a new session has been through (`gate::assurance_after`), and what
/// the remote's policies refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assurance {
    /// Every flow's slug.
    pub completed: Vec<String>,
    pub second_factor: bool,
    /// `route.authentik_application`s the user may not use.
    pub refused_applications: Vec<String>,
}

/// Log a user in: a new session under a new id (never the pre-auth one, nor
/// the one stepped up from), the old record gone, the cookie on `response`.
pub async fn mint(
    gateway: &Gateway,
    context: &Context,
    login: Login,
    assurance: Assurance,
    old_id: Option<&str>,
    response: &mut Response<Body>,
) -> Result<Session, StoreError> {
    gateway.metrics.logins_succeeded.inc();
    let memo = login.memo.clone();
    let lifetime = gateway.config.session.lifetime + login.remember.unwrap_or_default();
    // Staying signed in means no idle timeout: the record lives as long as
    // the session.
    let ttl = match login.remember {
        Some(_) => lifetime,
        None => gateway.config.session.idle_timeout.min(lifetime),
    };
    let mut session = Session::authenticated(login.identity, now_secs(), lifetime);
    session.completed = assurance.completed;
    session.second_factor = assurance.second_factor;
    session.executor_session = login.executor_session;
    session.refused_applications = assurance.refused_applications;
    let id = crate::session::random_token();
    gateway.sessions.put(&id, &session, ttl).await?;
    if let Some(old) = old_id {
        let _ = gateway.sessions.delete(old).await;
    }
    let max_age = (!login.browser_session).then_some(lifetime);
    set_cookie(gateway, context, &id, max_age, response);
    if let Some(memo) = &memo {
        set_memo(gateway, context, memo, response);
    }
    Ok(session)
}

/// The `Domain` of our cookies on this request: of `session.cookie_domain`,
/// the longest domain the request's host is under (`a.corp.example` takes
/// `corp.example` over `example`), else none (a host-only cookie). A
/// catch-all route also serves hosts outside every domain, where a cookie
/// for one would be dropped and nobody could stay signed in.
fn cookie_domain<'g>(gateway: &'g Gateway, context: &Context) -> Option<&'g str> {
    longest_under(&gateway.config.session.cookie_domains, &context.host)
}

fn longest_under<'d>(domains: &'d [String], host: &str) -> Option<&'d str> {
    domains
        .iter()
        .filter(|domain| {
            let bare = domain.trim_start_matches('.');
            host.eq_ignore_ascii_case(bare)
                || (host.len() > bare.len()
                    && host.as_bytes()[host.len() - bare.len() - 1] == b'.'
                    && host[host.len() - bare.len()..].eq_ignore_ascii_case(bare))
        })
        .max_by_key(|domain| domain.trim_start_matches('.').len())
        .map(String::as_str)
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

pub(super) fn cookie_header(
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
    if let Some(domain) = cookie_domain(gateway, context) {
        cookie = cookie.domain(domain.to_owned());
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
    if let Some(domain) = cookie_domain(gateway, context) {
        cookie = cookie.domain(domain.to_owned());
    }
    append_cookie(response, cookie);
    // The JSON API's CSRF companion goes with it.
    let mut csrf = Cookie::build((csrf_cookie_name(gateway), ""))
        .path("/")
        .same_site(SameSite::Lax)
        .secure(gateway.secure_cookies(context))
        .max_age(cookie::time::Duration::ZERO);
    if let Some(domain) = cookie_domain(gateway, context) {
        csrf = csrf.domain(domain.to_owned());
    }
    append_cookie(response, csrf);
}

/// The JSON API's CSRF cookie: the session cookie's name + `_csrf`, readable
/// by scripts (it is their copy of the token to send back as a header).
/// `proxy::headers::rewrite` keeps it from upstreams.
pub fn csrf_cookie_name(gateway: &Gateway) -> String {
    format!("{}_csrf", gateway.config.session.cookie_name)
}

pub fn set_csrf_cookie(
    gateway: &Gateway,
    context: &Context,
    token: &str,
    response: &mut Response<Body>,
) {
    // Wherever the session cookie goes (every host of `cookie_domain`), its
    // CSRF token must be readable too.
    let mut cookie = Cookie::build((csrf_cookie_name(gateway), token.to_owned()))
        .path("/")
        .same_site(SameSite::Lax)
        .secure(gateway.secure_cookies(context));
    if let Some(domain) = cookie_domain(gateway, context) {
        cookie = cookie.domain(domain.to_owned());
    }
    append_cookie(response, cookie);
}

/// The browser memo's cookie: the session cookie's name + `_memo`.
pub fn memo_cookie_name(gateway: &Gateway) -> String {
    format!("{}_memo", gateway.config.session.cookie_name)
}

/// What a memo cookie is sealed for, and the longest one read.
const MEMO_PURPOSE: &str = "browser memo";
const MEMO_LIMIT: usize = 3072;

/// The executor's memo in the request (`FlowRequest::memo`): the first
/// `_memo` cookie that opens under our secret and holds JSON. Anything
/// else is no memo at all.
pub fn read_memo(gateway: &Gateway, headers: &HeaderMap) -> Option<serde_json::Value> {
    let name = memo_cookie_name(gateway);
    let memo = cookie_values(headers, &name).find_map(|value| {
        let raw = gateway.signer.open(MEMO_PURPOSE, value, MEMO_LIMIT)?;
        serde_json::from_slice(&raw).ok()
    });
    memo
}

/// Keep `memo` on the browser until it runs out, or forget it (a null).
/// Unlike the session cookie, sign-out leaves it.
fn set_memo(gateway: &Gateway, context: &Context, memo: &Memo, response: &mut Response<Body>) {
    let left = memo.until.saturating_sub(now_secs());
    let value = match &memo.value {
        serde_json::Value::Null => String::new(),
        value => gateway
            .signer
            .seal(MEMO_PURPOSE, value.to_string().as_bytes()),
    };
    if value.len() > MEMO_LIMIT {
        tracing::warn!(
            bytes = value.len(),
            "the browser memo is too long to keep: left as it was"
        );
        return;
    }
    let age = if value.is_empty() { 0 } else { left as i64 };
    let mut cookie = Cookie::build((memo_cookie_name(gateway), value))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(gateway.secure_cookies(context))
        .max_age(cookie::time::Duration::seconds(age));
    if let Some(domain) = cookie_domain(gateway, context) {
        cookie = cookie.domain(domain.to_owned());
    }
    append_cookie(response, cookie);
}

fn append_cookie(response: &mut Response<Body>, cookie: cookie::CookieBuilder<'_>) {
    if let Ok(value) = HeaderValue::from_str(&cookie.build().to_string()) {
        response.headers_mut().append(SET_COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::longest_under;

    #[test]
    fn the_longest_cookie_domain_the_host_is_under_wins() {
        let domains: Vec<String> = ["example.com", ".corp.example.com", "lab.test"]
            .iter()
            .map(|d| d.to_string())
            .collect();
        let pick = |host| longest_under(&domains, host);
        assert_eq!(pick("app.corp.example.com"), Some(".corp.example.com"));
        assert_eq!(pick("corp.example.com"), Some(".corp.example.com"));
        assert_eq!(pick("www.example.com"), Some("example.com"));
        assert_eq!(pick("APP.LAB.TEST"), Some("lab.test"));
        assert_eq!(pick("evilexample.com"), None, "a suffix is not a parent");
        assert_eq!(pick("xcorp.example.com"), Some("example.com"));
        assert_eq!(pick("other.org"), None);
        assert_eq!(longest_under(&[], "a.example.com"), None);
    }
}
