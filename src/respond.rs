//! flowgate's own answers, in one place: its HTML pages (locked down), JSON
//! for API clients, redirects, and the one mapping from each refusal or
//! failure to what the client gets (a page for a browser, JSON otherwise),
//! which both lanes use.

use http::header::{
    HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION, REFERRER_POLICY,
    WWW_AUTHENTICATE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{Response, StatusCode};
use serde_json::Value;

use crate::gateway::Gateway;
use crate::identity::Identity;
use crate::pages::{MessagePage, Pages};
use crate::upstream::UpstreamError;
use crate::{empty, full, Body};

impl Gateway {
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

pub(crate) fn static_css() -> Response<Body> {
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

/// 401 naming where to sign in; `step_up` when the client has a session,
/// but not one that has been through this route's flow.
pub fn unauthorized(login: &str, executor: &str, step_up: bool) -> Response<Body> {
    let (error, detail) = match step_up {
        false => ("unauthenticated", "Sign in first: run the login flow (as JSON at executor_url, or in a browser at login_url), then retry with the session cookie."),
        true => ("step_up_required", "This application needs a stronger sign-in than your session has: run its flow (as JSON at executor_url, or in a browser at login_url) with your session cookie, then retry with the new one."),
    };
    let body = serde_json::json!({
        "error": error,
        "detail": detail,
        "login_url": login,
        "executor_url": executor,
    });
    let mut response = json_response(StatusCode::UNAUTHORIZED, &body);
    let challenge = format!("FlowgateSession realm=\"flowgate\", executor=\"{executor}\"");
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(WWW_AUTHENTICATE, value);
    }
    response
}

pub fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(full(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// Who an answer is for: a person at a browser gets a page, anything else
/// JSON (as 401 has always been).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Browser,
    Api,
}

impl Audience {
    /// From the request's `Accept`.
    pub fn of(accept: Option<&[u8]>) -> Audience {
        match accept.is_some_and(crate::gate::accepts_html) {
            true => Audience::Browser,
            false => Audience::Api,
        }
    }
}

impl Gateway {
    /// The same refusal as a page or as JSON, for `audience`.
    fn refusal(
        &self,
        audience: Audience,
        status: StatusCode,
        title: &str,
        message: &str,
        error: &str,
    ) -> Response<Body> {
        match audience {
            Audience::Browser => self.page(status, title, message, None),
            Audience::Api => json_response(
                status,
                &serde_json::json!({"error": error, "detail": message}),
            ),
        }
    }

    /// 400: a request the gate will not decide on.
    pub fn bad_request(&self, audience: Audience, why: &str) -> Response<Body> {
        self.refusal(
            audience,
            StatusCode::BAD_REQUEST,
            "Bad request",
            &format!("flowgate does not forward this address: {why}."),
            "bad_request",
        )
    }

    /// 404: no route for this host and path.
    pub fn not_found(&self, audience: Audience) -> Response<Body> {
        self.refusal(
            audience,
            StatusCode::NOT_FOUND,
            "Not found",
            "flowgate has no route for this address.",
            "not_found",
        )
    }

    /// 403: signed in, but not someone this route lets in. The page offers
    /// to sign out and come back to `target`: signing in as someone else.
    pub fn forbidden(&self, audience: Audience, user: &Identity, target: &str) -> Response<Body> {
        match audience {
            Audience::Browser => self.page(
                StatusCode::FORBIDDEN,
                "Access denied",
                &format!(
                    "You are signed in as {}, but this application is not open to you.",
                    user.username
                ),
                Some((
                    &format!(
                        "{}/sign_out?rd={}",
                        self.config.server.prefix,
                        crate::gate::encode(target)
                    ),
                    "Sign in as someone else",
                )),
            ),
            Audience::Api => json_response(
                StatusCode::FORBIDDEN,
                &serde_json::json!({"error": "forbidden", "detail": "not allowed for this user"}),
            ),
        }
    }

    /// 502 or 504 for an upstream that failed before its answer began. Its
    /// details stay in the log.
    pub fn upstream_failed(&self, audience: Audience, error: &UpstreamError) -> Response<Body> {
        match error {
            UpstreamError::Timeout => self.refusal(
                audience,
                StatusCode::GATEWAY_TIMEOUT,
                "Gateway timeout",
                "The application behind flowgate took too long to answer. Try again in a moment.",
                "upstream_timeout",
            ),
            _ => self.refusal(
                audience,
                StatusCode::BAD_GATEWAY,
                "Bad gateway",
                "The application behind flowgate did not answer. Try again in a moment.",
                "upstream_unavailable",
            ),
        }
    }

    /// 502 for an upstream whose answer flowgate cannot pass on.
    /// 503: the session store cannot say whether the request's session
    /// holds.
    pub fn store_unavailable(&self, audience: Audience) -> Response<Body> {
        self.refusal(
            audience,
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again shortly",
            "Your session cannot be checked just now. Please try again in a moment.",
            "session_store_unavailable",
        )
    }

    /// 401: the session a request was waiting on ended (signed out,
    /// revoked, expired) before the upstream answered.
    pub fn session_ended(&self, audience: Audience) -> Response<Body> {
        self.refusal(
            audience,
            StatusCode::UNAUTHORIZED,
            "Signed out",
            "Your session ended while this request was waiting. Sign in again to go on.",
            "session_ended",
        )
    }

    pub fn upstream_garbled(&self, audience: Audience) -> Response<Body> {
        self.refusal(
            audience,
            StatusCode::BAD_GATEWAY,
            "Bad gateway",
            "The application behind flowgate gave an answer flowgate cannot pass on.",
            "upstream_invalid",
        )
    }
}

/// An error and every cause under it, `outer: inner: innermost`: what a
/// log line needs to say what happened (a refused connection, a
/// certificate that did not verify), where `Display` alone says only the top.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// Logs "login temporarily unavailable" at most once per ten seconds, with
/// how many such answers went unlogged since: a flood of anonymous
/// requests answered 503 must not flood the log as well.
pub(crate) fn login_unavailable(reason: &str) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static LAST: AtomicU64 = AtomicU64::new(0);
    static UNLOGGED: AtomicU64 = AtomicU64::new(0);
    let now = crate::session::now_secs();
    let last = LAST.load(Relaxed);
    if now >= last + 10 && LAST.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
        let unlogged_since = UNLOGGED.swap(0, Relaxed);
        tracing::warn!(reason, unlogged_since, "login temporarily unavailable");
    } else {
        UNLOGGED.fetch_add(1, Relaxed);
    }
}

/// A plain-text answer (the admin listener's).
pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(crate::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug, thiserror::Error)]
    #[error("login step failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_chain_names_every_cause_once() {
        let refused =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(
            chain(&Outer(refused)),
            "login step failed: connection refused"
        );
        let flow = crate::flow::FlowError::unavailable(
            "GET https://auth.test/",
            Outer(std::io::Error::other("tls: bad certificate")),
        );
        assert_eq!(
            chain(&flow),
            "flow executor unavailable: GET https://auth.test/: login step failed: tls: bad certificate"
        );
    }
}
