//! The login relay: `{prefix}/flow/{slug}/?next=…` renders the executor's
//! current challenge as an HTML form (no JavaScript needed), posts back to
//! itself, and drives the same `FlowExecutor` as the JSON API.
//!
//! Each page load without a flow id starts a flow of its own (`fid`), kept in
//! the visitor's pre-auth session and named in the URL: two tabs logging in
//! at once never share a plan, and `next` travels in each tab's URL, never in
//! a per-visitor slot that another request could overwrite. Also sign-out.

use http::header::{HeaderValue, CONTENT_TYPE, LOCATION};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value};

use crate::context::Context;
use crate::flow::{Challenge, Component, FlowError, FlowRequest, FlowState, Step};
use crate::gateway::Gateway;
use crate::pages::{ChallengePage, SignOutPage};
use crate::respond::html_response;
use crate::session::{now_secs, Session};
use crate::{empty, Body};

const MAX_FORM: usize = 16 * 1024;
/// Stages that pass without showing anything are followed in-process; this
/// bounds how many in one request (the Go outpost client uses 10).
const MAX_ROUNDS: usize = 10;

/// Where this page is, and where it goes when done.
struct Target {
    slug: String,
    /// `next` as given (validated only when used).
    next: Option<String>,
    fid: Option<String>,
}

impl Target {
    fn url(&self, gateway: &Gateway, fid: Option<&str>) -> String {
        let mut url = format!("{}/flow/{}/", gateway.config.server.prefix, self.slug);
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        if let Some(next) = &self.next {
            query.append_pair("next", next);
        }
        if let Some(fid) = fid {
            query.append_pair("fid", fid);
        }
        let query = query.finish();
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query);
        }
        url
    }

    /// The executor's `query`: the page's query string minus our own `fid`.
    /// What the executor is asked with: this flow, this page's `next`.
    fn request<'r>(&'r self, query: &'r str, context: &Context) -> FlowRequest<'r> {
        FlowRequest {
            slug: &self.slug,
            query,
            user: None,
            client_ip: Some(context.client_ip),
        }
    }

    fn executor_query(&self) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        if let Some(next) = &self.next {
            query.append_pair("next", next);
        }
        query.finish()
    }
}

/// The executor state of the flow a page (tab) is running; fresh if none.
fn flow_state(session: &Session, key: &str) -> FlowState {
    session
        .flow(key)
        .map(|f| f.state.clone())
        .unwrap_or_default()
}

pub async fn page(
    gateway: &Gateway,
    request: Request<Incoming>,
    context: &Context,
    flow_path: &str,
) -> Response<Body> {
    let Some(slug) = flow_path
        .strip_suffix('/')
        .filter(|s| !s.is_empty() && !s.contains('/'))
    else {
        return gateway.page(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no sign-in page at this address.",
            None,
        );
    };
    if !gateway.executor.has_flow(slug) {
        return gateway.page(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no sign-in flow by that name.",
            None,
        );
    }
    let query = request.uri().query().unwrap_or("");
    // A `next` flowgate will not follow is dropped here, before any
    // password: the sign-in then ends at `/` instead of failing at the end.
    let next = crate::flow::form_urlencoded_get(query, "next").filter(|next| {
        let allowed = gateway.redirects.check(next).is_some();
        if !allowed {
            tracing::debug!("login page: next is not an allowed target; / instead");
        }
        allowed
    });
    let mut target = Target {
        slug: slug.to_owned(),
        next,
        fid: crate::flow::form_urlencoded_get(query, "fid"),
    };
    let session = crate::gate::session(gateway, request.headers()).await;

    // Already signed in through this flow (say, another tab finished
    // first): no second login. Signed in through another flow only: this
    // one runs as a step up, and its end mints a session that has both.
    if let Some((_, s)) = &session {
        if s.identity.is_some() && s.completed.contains(&target.slug) {
            return see_other(&safe_next(gateway, &target));
        }
    }
    match *request.method() {
        Method::GET | Method::HEAD => show(gateway, context, &target, session).await,
        Method::POST => {
            let form = match read_form(request).await {
                Ok(form) => form,
                Err(()) => {
                    return gateway.page(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        "The form could not be read.",
                        None,
                    )
                }
            };
            if target.fid.is_none() {
                target.fid = form.get("fid").and_then(Value::as_str).map(str::to_owned);
            }
            submit(gateway, context, &target, session, form).await
        }
        _ => gateway.page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "This page only takes GET and POST.",
            None,
        ),
    }
}

/// GET: start a flow (new `fid`, and a pre-auth session if there is none),
/// or show the current challenge of the flow the URL names.
async fn show(
    gateway: &Gateway,
    context: &Context,
    target: &Target,
    session: Option<(String, Session)>,
) -> Response<Body> {
    let Some(fid) = &target.fid else {
        let mut response = Response::new(empty());
        let (id, mut session) = match session {
            Some(found) => found,
            None => {
                match crate::gate::start_pre_auth(gateway, context, response.headers_mut()).await {
                    Ok(started) => started,
                    Err(error) => return busy(gateway, &error.to_string()),
                }
            }
        };
        let fid = crate::session::random_token();
        // `{}` rather than null: an empty plan that still marks the fid as ours.
        session.set_flow(
            &format!("page:{fid}"),
            &target.slug,
            FlowState(Value::Object(Map::new())),
            now_secs(),
        );
        if let Err(error) = crate::gate::save(gateway, &id, &session).await {
            return busy(gateway, &error.to_string());
        }
        *response.status_mut() = StatusCode::SEE_OTHER;
        if let Ok(location) = HeaderValue::from_str(&target.url(gateway, Some(&fid))) {
            response.headers_mut().insert(LOCATION, location);
        }
        response.headers_mut().insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        return response;
    };
    let Some((id, mut session)) = session.filter(|(_, s)| s.flow(&format!("page:{fid}")).is_some())
    else {
        return lost(gateway, context, target);
    };
    let key = format!("page:{fid}");
    let mut state = flow_state(&session, &key);
    let query = target.executor_query();
    let request = target.request(&query, context);
    let step = follow(gateway, request, &mut state).await;
    conclude(
        gateway,
        context,
        target,
        fid,
        &id,
        &mut session,
        state,
        step,
    )
    .await
}

/// Ask for the current challenge, passing through stages that need no input.
async fn follow(
    gateway: &Gateway,
    request: FlowRequest<'_>,
    state: &mut FlowState,
) -> Result<Step, FlowError> {
    let mut step = gateway.executor.challenge(request, state).await;
    for _ in 0..MAX_ROUNDS {
        match step {
            Ok(Step::Next) => step = gateway.executor.challenge(request, state).await,
            _ => break,
        }
    }
    step
}

/// POST: check the CSRF token, hand the form to the executor as its JSON
/// response, then show errors, move on (303 to GET), or finish the login.
async fn submit(
    gateway: &Gateway,
    context: &Context,
    target: &Target,
    session: Option<(String, Session)>,
    form: Map<String, Value>,
) -> Response<Body> {
    let Some(fid) = target.fid.clone() else {
        return lost(gateway, context, target);
    };
    let key = format!("page:{fid}");
    let Some((id, mut session)) = session.filter(|(_, s)| s.flow(&key).is_some()) else {
        return lost(gateway, context, target);
    };
    let sent = form.get("csrf_token").and_then(Value::as_str).unwrap_or("");
    if !tokens_match(sent, &session.csrf) {
        return gateway.page(
            StatusCode::FORBIDDEN,
            "Form expired",
            "This sign-in form is no longer valid. Start again.",
            Some((&target.url(gateway, None), "Start over")),
        );
    }
    let mut response_body = form;
    response_body.remove("csrf_token");
    response_body.remove("fid");
    // An unticked checkbox sends nothing, and the "No" button sends "false";
    // the stage wants a boolean either way.
    let remember = response_body
        .remove("remember_me")
        .is_some_and(|v| v.as_str().is_some_and(|s| s == "true" || s == "on"));
    response_body.insert("remember_me".into(), Value::Bool(remember));
    let mut state = flow_state(&session, &key);
    let query = target.executor_query();
    let request = target.request(&query, context);
    let mut step = gateway
        .executor
        .respond(request, &mut state, Value::Object(response_body))
        .await;
    if let Ok(Step::Next) = step {
        // When the stages left need no input (a skipped second factor, a
        // silent login), finish now rather than after one more round trip;
        // the same for an end without a form (denied, failed).
        let peeked = follow(gateway, request, &mut state).await;
        let settled = match &peeked {
            Ok(Step::Done { .. }) | Err(_) => true,
            Ok(Step::Challenge(c)) => matches!(
                c.component,
                Component::AccessDenied(_) | Component::FlowError(_)
            ),
            Ok(Step::Next) => false,
        };
        if settled {
            step = peeked;
        }
    }
    if let Ok(Step::Next) = step {
        session.set_flow(&key, &target.slug, state, now_secs());
        if let Err(error) = crate::gate::save(gateway, &id, &session).await {
            return busy(gateway, &error.to_string());
        }
        return see_other(&target.url(gateway, Some(&fid)));
    }
    conclude(
        gateway,
        context,
        target,
        &fid,
        &id,
        &mut session,
        state,
        step,
    )
    .await
}

/// Turn an executor step into the page: show a challenge, follow a redirect,
/// or finish the login.
#[allow(clippy::too_many_arguments)]
async fn conclude(
    gateway: &Gateway,
    context: &Context,
    target: &Target,
    fid: &str,
    id: &str,
    session: &mut Session,
    mut state: FlowState,
    step: Result<Step, FlowError>,
) -> Response<Body> {
    let key = format!("page:{fid}");
    let step = match step {
        Ok(step) => step,
        Err(FlowError::UnknownFlow(_)) => {
            return gateway.page(
                StatusCode::NOT_FOUND,
                "Not found",
                "There is no sign-in flow by that name.",
                None,
            )
        }
        Err(FlowError::Unavailable(reason)) => return busy(gateway, &reason),
        Err(FlowError::Internal(reason)) => {
            let request_id = crate::session::random_token();
            tracing::error!(request_id, reason, "login flow failed");
            state = FlowState::default();
            Step::Challenge(Challenge::flow_error(request_id))
        }
    };
    match step {
        Step::Done { to } => {
            return finish(gateway, context, target, id, session, &state, &to).await
        }
        Step::Next => {
            // More silent stages than MAX_ROUNDS: let the browser come back.
            session.set_flow(&key, &target.slug, state, now_secs());
            let _ = crate::gate::save(gateway, id, session).await;
            see_other(&target.url(gateway, Some(fid)))
        }
        Step::Challenge(challenge) => {
            if let Component::Redirect(redirect) = &challenge.component {
                // Only a remote executor sends these; treat `to` like `next`.
                let to = gateway
                    .redirects
                    .check(&redirect.to)
                    .unwrap_or("/")
                    .to_owned();
                return see_other(&to);
            }
            // A denied or failed flow is over; the next visit starts afresh.
            let finished = matches!(
                challenge.component,
                Component::AccessDenied(_) | Component::FlowError(_)
            );
            let slot_state = if finished {
                FlowState::default()
            } else {
                state
            };
            session.set_flow(&key, &target.slug, slot_state, now_secs());
            if let Err(error) = crate::gate::save(gateway, id, session).await {
                return busy(gateway, &error.to_string());
            }
            let title = gateway
                .executor
                .title(&target.slug)
                .unwrap_or_else(|| "Sign in".to_owned());
            let html = gateway.pages.challenge(&ChallengePage {
                flow_title: &title,
                challenge: &challenge,
                form_action: &target.url(gateway, Some(fid)),
                csrf_token: &session.csrf,
                flow_id: fid,
                restart_url: &target.url(gateway, None),
                static_prefix: &gateway.static_prefix,
            });
            let status = if finished {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::OK
            };
            html_response(status, html)
        }
    }
}

/// The flow is done: log the user in under a new session id and go to `next`.
async fn finish(
    gateway: &Gateway,
    context: &Context,
    target: &Target,
    old_id: &str,
    old: &Session,
    state: &FlowState,
    to: &str,
) -> Response<Body> {
    let to = gateway
        .redirects
        .check(to)
        .map(str::to_owned)
        .unwrap_or_else(|| safe_next(gateway, target));
    let mut response = see_other(&to);
    match gateway.executor.login(state).await {
        Ok(Some(login)) => {
            if let Some(signed_in) = crate::gate::someone_else(old, &login) {
                tracing::warn!(user = %signed_in, as_user = %login.identity.username, flow = %target.slug, "step up refused: finished as another user");
                return gateway.page(
                    StatusCode::FORBIDDEN,
                    "Wrong account",
                    &format!("You are signed in as {signed_in}. To go on as someone else, sign out first."),
                    Some((&format!("{}/sign_out", gateway.config.server.prefix), "Sign out")),
                );
            }
            let username = login.identity.username.clone();
            let assurance = crate::gate::assurance_after(old, &login, &target.slug);
            let second_factor = assurance.second_factor;
            let minted = crate::gate::mint(
                gateway,
                context,
                login.identity,
                assurance,
                Some(old_id),
                &mut response,
            );
            if let Err(error) = minted.await {
                return busy(gateway, &error.to_string());
            }
            log_succeeded(
                &username,
                context.client_ip,
                &target.slug,
                second_factor,
                "page",
            );
        }
        Ok(None) => {}
        Err(error) => return busy(gateway, &error.to_string()),
    }
    response
}

fn safe_next(gateway: &Gateway, target: &Target) -> String {
    target
        .next
        .as_deref()
        .and_then(|n| gateway.redirects.check(n))
        .unwrap_or("/")
        .to_owned()
}

/// The URL names a flow this browser's session does not hold: the login took
/// too long, or — the case that must never become a redirect loop — the
/// browser is not sending our cookie back. Say so, and offer a fresh start.
fn lost(gateway: &Gateway, context: &Context, target: &Target) -> Response<Body> {
    let restart = target.url(gateway, None);
    let secure_over_http = gateway.secure_cookies(context) && !context.https;
    let detail = if secure_over_http {
        "flowgate marks its cookie Secure, but this page came over plain HTTP, so the browser drops it. \
         Open the site over HTTPS, or (for a test setup only) set session.cookie_secure = \"never\"."
    } else {
        "If this keeps happening, your browser is not keeping cookies for this site: allow cookies for it and try again."
    };
    gateway.page_with_detail(
        StatusCode::BAD_REQUEST,
        "Sign-in could not continue",
        "This sign-in attempt has expired or your browser did not keep its cookie.",
        Some(detail),
        Some((&restart, "Start over")),
    )
}

fn busy(gateway: &Gateway, reason: &str) -> Response<Body> {
    crate::respond::login_unavailable(reason);
    gateway.page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again shortly",
        "Signing in is temporarily unavailable. Please try again in a moment.",
        None,
    )
}

fn see_other(location: &str) -> Response<Body> {
    crate::respond::redirect(StatusCode::SEE_OTHER, location)
}

fn tokens_match(sent: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    !expected.is_empty()
        && sent.len() == expected.len()
        && bool::from(sent.as_bytes().ct_eq(expected.as_bytes()))
}

/// An urlencoded form as a JSON object of strings.
async fn read_form(request: Request<Incoming>) -> Result<Map<String, Value>, ()> {
    let is_form = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(());
    }
    let body = Limited::new(request.into_body(), MAX_FORM)
        .collect()
        .await
        .map_err(|_| ())?
        .to_bytes();
    Ok(url::form_urlencoded::parse(&body)
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect())
}

/// `{prefix}/sign_out`: GET asks, POST (with the CSRF token) ends the session.
pub async fn sign_out(
    gateway: &Gateway,
    request: Request<Incoming>,
    context: &Context,
) -> Response<Body> {
    let session = crate::gate::session(gateway, request.headers()).await;
    let query = request.uri().query().unwrap_or("").to_owned();
    let rd = crate::flow::form_urlencoded_get(&query, "rd")
        .or_else(|| crate::flow::form_urlencoded_get(&query, "next"));
    let action = format!(
        "{}/sign_out{}",
        gateway.config.server.prefix,
        if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        }
    );
    let signed_out = |gateway: &Gateway| {
        gateway.page(
            StatusCode::OK,
            "Signed out",
            "You are signed out.",
            Some(("/", "Continue")),
        )
    };
    match *request.method() {
        Method::GET | Method::HEAD => match session
            .as_ref()
            .and_then(|(_, s)| s.identity.clone().map(|i| (i, s.csrf.clone())))
        {
            Some((identity, csrf)) => html_response(
                StatusCode::OK,
                gateway.pages.sign_out(&SignOutPage {
                    username: &identity.username,
                    form_action: &action,
                    csrf_token: &csrf,
                    static_prefix: &gateway.static_prefix,
                }),
            ),
            None => signed_out(gateway),
        },
        Method::POST => {
            let header_token = request
                .headers()
                .get("x-flowgate-csrf")
                .or_else(|| request.headers().get("x-authentik-csrf"))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let Some((id, session)) = session else {
                let mut response = signed_out(gateway);
                crate::gate::clear_cookie(gateway, context, &mut response);
                return response;
            };
            let sent = match header_token {
                Some(token) => token,
                None => read_form(request)
                    .await
                    .ok()
                    .and_then(|f| {
                        f.get("csrf_token")
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    })
                    .unwrap_or_default(),
            };
            if !tokens_match(&sent, &session.csrf) {
                return gateway.page(
                    StatusCode::FORBIDDEN,
                    "Form expired",
                    "The sign-out form was not valid. Open the sign-out page again.",
                    Some((&action, "Sign out")),
                );
            }
            let _ = gateway.sessions.delete(&id).await;
            if let Some(identity) = &session.identity {
                tracing::info!(user = %identity.username, "signed out");
            }
            let mut response = match rd.as_deref().and_then(|r| gateway.redirects.check(r)) {
                Some(to) => see_other(to),
                None => signed_out(gateway),
            };
            crate::gate::clear_cookie(gateway, context, &mut response);
            response
        }
        _ => gateway.page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "Use GET or POST.",
            None,
        ),
    }
}

// --- The login log lines ----------------------------------------------------
//
// One line per outcome, for people and for fail2ban/CrowdSec
// (docs/logging.md): a fixed message, then fields in a fixed order. Their
// target is `flowgate::login`, wherever they are written.

/// `login failed`'s `reason`: the password was wrong (or the user unknown).
pub(crate) const FAILED_PASSWORD: &str = "password";
/// `login failed`'s `reason`: the TOTP code was wrong.
pub(crate) const FAILED_TOTP: &str = "totp";
/// `login failed`'s `reason`: refused unchecked, too many failures (lockout).
pub(crate) const FAILED_THROTTLED: &str = "throttled";

/// A user name that the text format may print bare: ASCII letters, digits
/// and `.` `_` `-` `@` `+`. Any other is printed quoted, with `"`, `\` and
/// control characters escaped, so that no name can end its field early or
/// start a line: `user=alice`, `user="bob\" user=\"admin"`. (The JSON format
/// has the name as a JSON string either way.)
fn bare(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b'+'))
}

/// The client address as the log prints it; `-` when there is none.
struct Client(Option<std::net::IpAddr>);

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// A login attempt failed or was refused: `login failed reason=… user=…
/// client=… flow=…`, at warn. `user` is the name as typed, known or not;
/// never the password or the code.
pub(crate) fn log_failed(
    reason: &'static str,
    user: &str,
    client: Option<std::net::IpAddr>,
    flow: &str,
) {
    let client = Client(client);
    // A `&str` field is quoted and escaped by the text format (and a plain
    // string in JSON); `%` prints it as it is, for names that need no quotes.
    if bare(user) {
        tracing::warn!(target: "flowgate::login", reason = %reason, user = %user, client = %client, flow = %flow, "login failed");
    } else {
        tracing::warn!(target: "flowgate::login", reason = %reason, user, client = %client, flow = %flow, "login failed");
    }
}

/// Someone logged in: `login succeeded user=… client=… flow=…
/// second_factor=… via=…`, at info. `user` is the account's username.
pub(crate) fn log_succeeded(
    user: &str,
    client: std::net::IpAddr,
    flow: &str,
    second_factor: bool,
    via: &'static str,
) {
    if bare(user) {
        tracing::info!(target: "flowgate::login", user = %user, client = %client, flow = %flow, second_factor, via = %via, "login succeeded");
    } else {
        tracing::info!(target: "flowgate::login", user, client = %client, flow = %flow, second_factor, via = %via, "login succeeded");
    }
}

#[cfg(test)]
mod tests {
    use super::bare;

    #[test]
    fn only_plain_names_are_printed_bare() {
        for name in ["alice", "Alice.Example", "a_b-c", "alice+x@example.test"] {
            assert!(bare(name), "{name}");
        }
        for name in [
            "",
            "bob\" user=\"admin",
            "a b",
            "a=b",
            "a\\b",
            "x\ny",
            "jörg",
            "a\u{1b}[31m",
        ] {
            assert!(!bare(name), "{name:?}");
        }
    }
}
