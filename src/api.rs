//! The JSON side: the flow executor API at
//! `{prefix}/api/v3/flows/executor/{slug}/` and `{prefix}/api/v3/core/users/me/`,
//! with authentik's wire behaviour (PROTOCOL.md §1, §4), so that scripts,
//! authentik clients and other flowgates can log in without a browser. Like
//! the HTML relay (`login`), it is a thin layer over `FlowExecutor`.

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION, VARY};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::context::Context;
use crate::flow::{Challenge, FlowError, Step};
use crate::gate::Visitor;
use crate::gateway::Gateway;
use crate::signin::{Finished, Flow};
use crate::{empty, full, Body};

/// Executor request bodies are small JSON objects.
const MAX_BODY: usize = 64 * 1024;

/// CSRF header names accepted once a session is authenticated (§1.8): the
/// authentik one, for its clients, and flowgate's own.
const CSRF_HEADERS: [&str; 2] = ["x-authentik-csrf", "x-flowgate-csrf"];

pub fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(full(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn executor_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = json_response(status, body);
    let headers = response.headers_mut();
    headers.insert(
        http::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("SAMEORIGIN"),
    );
    headers.insert(VARY, HeaderValue::from_static("Cookie"));
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// `ak-stage-flow-error`: the answer to anything that went wrong before or
/// inside a stage (§1.4). The id ties the client's report to our log line.
fn flow_error(reason: &str) -> Response<Body> {
    let request_id = crate::session::random_token();
    tracing::info!(request_id, reason, "executor answered ak-stage-flow-error");
    executor_response(StatusCode::OK, &Challenge::flow_error(request_id).to_json())
}

fn not_found() -> Response<Body> {
    json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not found."}))
}

pub async fn executor(
    gateway: &Gateway,
    request: Request<Incoming>,
    context: &Context,
    slug_path: &str,
) -> Response<Body> {
    // The trailing slash is part of the route (§1.1: no APPEND_SLASH).
    let Some(slug) = slug_path
        .strip_suffix('/')
        .filter(|s| !s.is_empty() && !s.contains('/'))
    else {
        return not_found();
    };
    let slug = slug.to_owned();
    match gateway.executor.find_flow(&slug).await {
        Ok(Some(_)) => {}
        Ok(None) => return not_found(),
        Err(error) => return unavailable(&crate::respond::chain(&error)),
    }
    let method = request.method().clone();
    if !matches!(method, Method::GET | Method::HEAD | Method::POST) {
        let mut response = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"detail": format!("Method \"{method}\" not allowed.")}),
        );
        response.headers_mut().insert(
            http::header::ALLOW,
            HeaderValue::from_static("GET, POST, HEAD, OPTIONS"),
        );
        return response;
    }
    if !accepts_json(&request) {
        return flow_error("Accept does not allow application/json");
    }
    // The executor is for this site's pages and for clients that are no
    // browser. Another site's page must not move a visitor's flow (a GET
    // can end a session through an invalidation flow).
    if crate::gate::from_another_site(request.headers()) {
        return json_response(
            StatusCode::FORBIDDEN,
            &json!({"detail": "The flow executor does not take requests from other sites."}),
        );
    }
    let full_path = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |pq| pq.as_str().to_owned(),
    );
    let query = request
        .uri()
        .query()
        .and_then(|q| crate::flow::form_urlencoded_get(q, "query"))
        .unwrap_or_default();
    let mut visitor = crate::gate::visitor(gateway, context, request.headers()).await;
    let response = run(
        gateway,
        context,
        request,
        &mut visitor,
        &slug,
        &query,
        &full_path,
    )
    .await;
    visitor.give_cookie(gateway, response)
}

/// One executor request for `visitor`: their plan for `slug`, asked or
/// answered, and the step as authentik would put it.
async fn run(
    gateway: &Gateway,
    context: &Context,
    request: Request<Incoming>,
    visitor: &mut Visitor,
    slug: &str,
    query: &str,
    full_path: &str,
) -> Response<Body> {
    let method = request.method().clone();
    let csrf_header = CSRF_HEADERS
        .iter()
        .find_map(|name| request.headers().get(*name))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let identity = visitor.session.identity.clone();
    let key = format!("api:{slug}");
    // One plan per flow for API clients, as authentik keeps it; any other
    // flow's API plan is dropped (§1.4 step 3).
    visitor
        .session
        .flows
        .retain(|f| !f.key.starts_with("api:") || f.key == key);
    let mut flow = Flow::open(visitor, key, slug, query.to_owned());

    let answered = method == Method::POST;
    let step = if answered {
        if identity.is_some() && !csrf_matches(csrf_header.as_deref(), &visitor.session.csrf) {
            return flow_error("CSRF token missing or incorrect");
        }
        if !content_type
            .split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        {
            return flow_error("body is not application/json");
        }
        let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return flow_error("body too large or unreadable"),
        };
        let value: Value = match serde_json::from_slice(&body) {
            Ok(value @ Value::Object(_)) => value,
            _ => return flow_error("body is not a JSON object"),
        };
        flow.answer(gateway, context, visitor, value, 0).await
    } else {
        flow.ask(gateway, context, visitor, 0).await
    };

    let step = match step {
        Ok(step) => step,
        Err(FlowError::UnknownFlow(_)) => return not_found(),
        Err(error @ FlowError::Unavailable { bad_gateway, .. }) => {
            return match bad_gateway {
                true => bad_gateway_answer(&error),
                false => unavailable(&crate::respond::chain(&error)),
            }
        }
        Err(error @ FlowError::Internal { .. }) => {
            return flow_error(&crate::respond::chain(&error))
        }
    };

    if let Step::Done { to } = &step {
        let mut response = executor_response(StatusCode::OK, &Challenge::redirect(to).to_json());
        return match flow
            .finish(gateway, context, visitor, &mut response, "api")
            .await
        {
            Finished::SignedIn(session) => {
                crate::gate::set_csrf_cookie(gateway, context, &session.csrf, &mut response);
                response
            }
            Finished::NobodyLoggedIn | Finished::SignedOut => response,
            Finished::WrongAccount { signed_in } => {
                let denied = Challenge::access_denied(
                    None,
                    format!(
                        "You are signed in as {signed_in}. To go on as someone else, sign out first."
                    ),
                );
                executor_response(StatusCode::OK, &denied.to_json())
            }
            Finished::Failed(error) => flow_error(&crate::respond::chain(&error)),
            Finished::Unavailable(error) => unavailable(&error.to_string()),
        };
    }
    // Stored when answered or moved on by itself (a stage that passed);
    // showing a challenge of a flow not stored yet stores nothing, but for
    // a signed-in visitor (whose session is there anyway): what such a
    // challenge shows may be made for it (new recovery codes, a secret).
    if answered || flow.is_stored() || identity.is_some() || matches!(step, Step::Next) {
        if let Err(error) = flow.save(gateway, context, visitor).await {
            return unavailable(&error.to_string());
        }
    }
    match step {
        Step::Challenge(challenge) => executor_response(StatusCode::OK, &challenge.to_json()),
        Step::Next => next_stage(full_path),
        Step::Done { .. } => unreachable_done(),
    }
}

fn unreachable_done() -> Response<Body> {
    flow_error("internal: flow finished twice")
}

/// A passed stage with more to come (§1.4): a raw 302 to the executor URL
/// itself when the request's own URL is already in canonical form, else a
/// 200 `xak-flow-redirect` to the canonical URL, as authentik does.
fn next_stage(full_path: &str) -> Response<Body> {
    let target = canonical_url(full_path);
    if target == full_path {
        let mut response = executor_response(StatusCode::FOUND, &Value::Null);
        *response.body_mut() = empty();
        response.headers_mut().remove(CONTENT_TYPE);
        if let Ok(location) = HeaderValue::from_str(&target) {
            response.headers_mut().insert(LOCATION, location);
        }
        response
    } else {
        executor_response(StatusCode::OK, &Challenge::redirect(target).to_json())
    }
}

/// Path plus the query re-encoded the way Python's `urlencode` does it
/// (`quote_plus`, nothing but `_.-~` left bare): what authentik compares the
/// request against.
pub fn canonical_url(full_path: &str) -> String {
    let (path, query) = full_path.split_once('?').unwrap_or((full_path, ""));
    let pairs: Vec<String> = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| format!("{}={}", quote_plus(&k), quote_plus(&v)))
        .collect();
    if pairs.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", pairs.join("&"))
    }
}

pub(crate) fn quote_plus(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The CSRF token for API clients that keep driving flows once logged in:
/// readable by scripts (not HttpOnly), sent back as `X-authentik-CSRF`.
fn csrf_matches(sent: Option<&str>, expected: &str) -> bool {
    sent.is_some_and(|sent| crate::session::tokens_equal(sent, expected))
}

fn unavailable(reason: &str) -> Response<Body> {
    crate::respond::login_unavailable(reason);
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"detail": "Login is temporarily unavailable. Try again shortly."}),
    )
}

/// The flow executor behind us answered nonsense: 502, the cause logged.
fn bad_gateway_answer(error: &FlowError) -> Response<Body> {
    tracing::warn!(reason = %crate::respond::chain(error), "sign-in stopped: the flow executor's answer could not be used");
    json_response(
        StatusCode::BAD_GATEWAY,
        &json!({"detail": "The sign-in service gave an answer that could not be used."}),
    )
}

/// JSON or anything-goes: the only renderer is JSON (§1.2).
fn accepts_json(request: &Request<Incoming>) -> bool {
    let Some(accept) = request
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
    else {
        return true;
    };
    accept.split(',').any(|item| {
        let media = item.split(';').next().unwrap_or("").trim();
        matches!(media, "application/json" | "*/*" | "application/*")
    })
}

/// `GET {prefix}/api/v3/core/users/me/` in authentik's `SessionUser` shape (§4).
pub async fn users_me(gateway: &Gateway, request: &Request<Incoming>) -> Response<Body> {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"detail": format!("Method \"{}\" not allowed.", request.method())}),
        );
    }
    let identity = crate::gate::session(gateway, request.headers())
        .await
        .and_then(|(_, s)| s.identity);
    let Some(identity) = identity else {
        // 403, not 401: authentik's token authenticator names no challenge (§4).
        return json_response(
            StatusCode::FORBIDDEN,
            &json!({"detail": "Authentication credentials were not provided."}),
        );
    };
    let mut groups: Vec<&String> = identity.groups.iter().collect();
    groups.sort();
    // authentik 2026.8 added `users` (every account signed in in this
    // browser session; here the one) and `is_current`, and its clients
    // require both; older clients ignore them.
    let body = json!({
        "user": {
            "pk": identity.pk,
            "username": identity.username,
            "name": identity.name,
            "is_active": true,
            "is_superuser": identity.is_superuser,
            "groups": groups.iter().map(|g| json!({"name": g, "pk": crate::directory::group_pk(g)})).collect::<Vec<_>>(),
            "roles": [],
            "email": identity.email,
            "avatar": crate::directory::avatar_for(&identity.name),
            "uid": identity.uid,
            "settings": {},
            "type": "internal",
            "system_permissions": [],
            "is_current": true,
        }
    });
    let mut body = body;
    body["users"] = json!([body["user"].clone()]);
    let mut response = json_response(StatusCode::OK, &body);
    response
        .headers_mut()
        .insert(VARY, HeaderValue::from_static("Cookie"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_url_matches_pythons_urlencode() {
        let path = "/_flowgate/api/v3/flows/executor/f/";
        // Already canonical: unchanged (→ raw 302).
        for q in ["?query=next%3D%252F", "?query=next%3D%2F", ""] {
            let url = format!("{path}{q}");
            assert_eq!(canonical_url(&url), url);
        }
        // An unescaped `/` differs (→ 200 xak-flow-redirect), as recorded.
        assert_eq!(
            canonical_url(&format!("{path}?query=next%3D/")),
            format!("{path}?query=next%3D%2F")
        );
        assert_eq!(canonical_url("/p/?query=a b~*"), "/p/?query=a+b~%2A");
    }
}
