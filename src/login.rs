//! The login relay: `{prefix}/flow/{slug}/?next=…` renders the executor's
//! current challenge as an HTML form (no JavaScript needed), posts back to
//! itself, and drives the same `FlowExecutor` as the JSON API.
//!
//! Each page load without a flow id starts a flow of its own (`fid`), named
//! in the URL and kept in the visitor's session once answered: two tabs
//! logging in at once never share a plan, and `next` travels in each tab's
//! URL, never in a per-visitor slot that another request could overwrite.
//! Showing a challenge stores nothing (`gate::Visitor`). Also sign-out.

use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value};

use crate::context::Context;
use crate::flow::{Challenge, Component, FlowError, Step};
use crate::gate::Visitor;
use crate::gateway::Gateway;
use crate::pages::{ChallengePage, SignOutPage};
use crate::respond::html_response;
use crate::signin::{Finished, Flow};
use crate::Body;

const MAX_FORM: usize = 16 * 1024;
/// Stages that pass without showing anything are followed in-process; this
/// bounds how many in one request (the Go outpost client uses 10).
const MAX_ROUNDS: usize = 10;

/// Where this page is, and where it goes when done.
struct Target {
    slug: String,
    /// The flow's title, from the executor's catalogue.
    title: String,
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

    /// The executor's `query`: the page's own `next`, never our `fid`.
    fn executor_query(&self) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        if let Some(next) = &self.next {
            query.append_pair("next", next);
        }
        query.finish()
    }
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
    let summary = match gateway.executor.find_flow(slug).await {
        Ok(Some(summary)) => summary,
        Ok(None) => {
            return gateway.page(
                StatusCode::NOT_FOUND,
                "Not found",
                "There is no sign-in flow by that name.",
                None,
            )
        }
        Err(error) => return busy(gateway, &crate::respond::chain(&error)),
    };
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
        slug: summary.slug,
        title: summary.title,
        next,
        fid: crate::flow::form_urlencoded_get(query, "fid"),
    };
    let mut visitor = crate::gate::visitor(gateway, context, request.headers()).await;

    // Already signed in through this flow (say, another tab finished
    // first): no second login. Signed in through another flow only: this
    // one runs as a step up, and its end mints a session that has both.
    if visitor.session.identity.is_some() && visitor.session.completed.contains(&target.slug) {
        return see_other(&safe_next(gateway, &target));
    }
    // A flow that signs the visitor out runs on a GET: from a link on
    // another site, that would be a sign-out nobody asked for. Such a
    // visitor is asked first, on the sign-out page (a POST with its token).
    let get = matches!(*request.method(), Method::GET | Method::HEAD);
    if get
        && summary.invalidates
        && visitor.session.identity.is_some()
        && !crate::gate::user_initiated(request.headers())
    {
        let mut to = format!("{}/sign_out", gateway.config.server.prefix);
        if let Some(next) = &target.next {
            to.push_str("?next=");
            to.push_str(&crate::gate::encode(next));
        }
        return see_other(&to);
    }
    let response = match *request.method() {
        Method::GET | Method::HEAD => show(gateway, context, &target, &mut visitor).await,
        Method::POST => match read_form(request).await {
            Ok(form) => {
                if target.fid.is_none() {
                    target.fid = form.get("fid").and_then(Value::as_str).map(str::to_owned);
                }
                submit(gateway, context, &target, &mut visitor, form).await
            }
            Err(()) => gateway.page(
                StatusCode::BAD_REQUEST,
                "Bad request",
                "The form could not be read.",
                None,
            ),
        },
        _ => gateway.page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "This page only takes GET and POST.",
            None,
        ),
    };
    visitor.give_cookie(gateway, response)
}

/// The flow a page's `fid` names for this visitor: the one their session
/// holds, a fresh one when the visitor was given that `fid` and has not
/// answered yet (nothing is stored for a flow until then), or none (`lost`).
fn page_flow(gateway: &Gateway, visitor: &Visitor, target: &Target, fid: &str) -> Option<Flow> {
    let flow = Flow::open(
        visitor,
        format!("page:{fid}"),
        &target.slug,
        target.executor_query(),
    );
    (flow.is_stored() || visitor.owns_fid(gateway, fid)).then_some(flow)
}

/// GET: give a new page its own flow id (and go there), or show the current
/// challenge of the flow the URL names.
async fn show(
    gateway: &Gateway,
    context: &Context,
    target: &Target,
    visitor: &mut Visitor,
) -> Response<Body> {
    let Some(fid) = &target.fid else {
        let fid = visitor.new_fid(gateway);
        return see_other(&target.url(gateway, Some(&fid)));
    };
    let Some(mut flow) = page_flow(gateway, visitor, target, fid) else {
        return lost(gateway, context, target);
    };
    let step = flow.ask(gateway, context, visitor, MAX_ROUNDS).await;
    conclude(gateway, context, target, fid, visitor, flow, step, None).await
}

/// POST: check the CSRF token, hand the form to the executor as its JSON
/// response, then show errors, move on (303 to GET), or finish the login.
async fn submit(
    gateway: &Gateway,
    context: &Context,
    target: &Target,
    visitor: &mut Visitor,
    form: Map<String, Value>,
) -> Response<Body> {
    let Some(fid) = target.fid.clone() else {
        return lost(gateway, context, target);
    };
    let Some(mut flow) = page_flow(gateway, visitor, target, &fid) else {
        return lost(gateway, context, target);
    };
    let sent = form.get("csrf_token").and_then(Value::as_str).unwrap_or("");
    if !tokens_match(sent, &visitor.session.csrf) {
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
    let sent = response_body.clone();
    let mut step = flow
        .answer(
            gateway,
            context,
            visitor,
            Value::Object(response_body),
            MAX_ROUNDS,
        )
        .await;
    if let Ok(Step::Next) = step {
        // When the stages left need no input (a skipped second factor, a
        // silent login), finish now rather than after one more round trip;
        // the same for an end without a form (denied, failed).
        let peeked = flow.ask(gateway, context, visitor, MAX_ROUNDS).await;
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
        if let Err(error) = flow.save(gateway, context, visitor).await {
            return busy(gateway, &error.to_string());
        }
        return see_other(&target.url(gateway, Some(&fid)));
    }
    conclude(
        gateway,
        context,
        target,
        &fid,
        visitor,
        flow,
        step,
        Some(&sent),
    )
    .await
}

/// Turn an executor step into the page: show a challenge, follow a redirect,
/// or finish the login. An answered flow (`sent`: the form it was answered
/// with) is stored as it is now; showing a challenge stores nothing new (a
/// fresh flow is made again, the same, when it is answered), and a flow
/// stored already is stored as it is now.
#[allow(clippy::too_many_arguments)]
async fn conclude(
    gateway: &Gateway,
    context: &Context,
    target: &Target,
    fid: &str,
    visitor: &mut Visitor,
    mut flow: Flow,
    step: Result<Step, FlowError>,
    sent: Option<&Map<String, Value>>,
) -> Response<Body> {
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
        Err(error @ FlowError::Unavailable { bad_gateway, .. }) => {
            return match bad_gateway {
                true => bad_gateway_page(gateway, &error),
                false => busy(gateway, &crate::respond::chain(&error)),
            }
        }
        Err(error @ FlowError::Internal { .. }) => {
            let request_id = crate::session::random_token();
            let reason = crate::respond::chain(&error);
            tracing::error!(request_id, reason, "login flow failed");
            Step::Challenge(Challenge::flow_error(request_id))
        }
    };
    match step {
        Step::Done { to } => finish(gateway, context, target, visitor, flow, &to).await,
        Step::Next => {
            // More silent stages than MAX_ROUNDS: let the browser come back.
            if let Err(error) = flow.save(gateway, context, visitor).await {
                return busy(gateway, &error.to_string());
            }
            see_other(&target.url(gateway, Some(fid)))
        }
        Step::Challenge(mut challenge) => {
            if let Some(sent) = sent {
                keep_prompt_answers(&mut challenge, sent);
            }
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
            // A signed-in visitor's flow is kept from its first page: what
            // the page shows may be made for it (recovery codes, a secret).
            let keep = sent.is_some() || flow.is_stored() || visitor.session.identity.is_some();
            let saved = match (finished, keep) {
                (true, _) => flow.end(gateway, context, visitor).await,
                (false, true) => flow.save(gateway, context, visitor).await,
                (false, false) => Ok(()),
            };
            if let Err(error) = saved {
                return busy(gateway, &error.to_string());
            }
            let html = gateway.pages.challenge(&ChallengePage {
                flow_title: &target.title,
                challenge: &challenge,
                form_action: &target.url(gateway, Some(fid)),
                csrf_token: &visitor.session.csrf,
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

/// A prompt shown again with errors keeps what the visitor typed (not the
/// passwords, nor the operator's fixed fields): a page re-rendered on the
/// server would otherwise come back empty, where authentik's own page keeps
/// its inputs.
fn keep_prompt_answers(challenge: &mut Challenge, sent: &Map<String, Value>) {
    if challenge.response_errors.is_none() {
        return;
    }
    let Component::Prompt(prompt) = &mut challenge.component else {
        return;
    };
    for field in &mut prompt.fields {
        let typed = matches!(
            field.kind.as_str(),
            "text"
                | "text_area"
                | "username"
                | "email"
                | "number"
                | "date"
                | "date-time"
                | "ak-locale"
                | "checkbox"
                | "dropdown"
                | "radio-button-group"
        );
        if let (true, Some(Value::String(value))) = (typed, sent.get(&field.field_key)) {
            field.initial_value = value.clone();
        }
    }
}

/// The flow is done: log the user in under a new session id and go to `next`.
async fn finish(
    gateway: &Gateway,
    context: &Context,
    target: &Target,
    visitor: &mut Visitor,
    flow: Flow,
    to: &str,
) -> Response<Body> {
    let to = gateway
        .redirects
        .check(to)
        .map(str::to_owned)
        .unwrap_or_else(|| safe_next(gateway, target));
    let mut response = see_other(&to);
    match flow
        .finish(gateway, context, visitor, &mut response, "page")
        .await
    {
        Finished::SignedIn(_) | Finished::NobodyLoggedIn | Finished::SignedOut => response,
        Finished::WrongAccount { signed_in } => gateway.page(
            StatusCode::FORBIDDEN,
            "Wrong account",
            &format!("You are signed in as {signed_in}. To go on as someone else, sign out first."),
            Some((
                &format!("{}/sign_out", gateway.config.server.prefix),
                "Sign out",
            )),
        ),
        Finished::Failed(error) => busy(gateway, &crate::respond::chain(&error)),
        Finished::Unavailable(error) => busy(gateway, &error.to_string()),
    }
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

/// The sign-in service answered, but not as a flow executor does.
fn bad_gateway_page(gateway: &Gateway, error: &FlowError) -> Response<Body> {
    tracing::warn!(reason = %crate::respond::chain(error), "sign-in stopped: the flow executor's answer could not be used");
    gateway.page(
        StatusCode::BAD_GATEWAY,
        "Sign-in is not working",
        "The sign-in service gave an answer flowgate could not use. Please try again later.",
        None,
    )
}

fn see_other(location: &str) -> Response<Body> {
    crate::respond::redirect(StatusCode::SEE_OTHER, location)
}

fn tokens_match(sent: &str, expected: &str) -> bool {
    !expected.is_empty() && crate::session::tokens_equal(sent, expected)
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
    let session = crate::gate::session_checked(gateway, request.headers()).await;
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
    // The store cannot say whether the session is there: nothing is
    // "signed out" until it can (the cookie stays, for the retry).
    let not_finished = |gateway: &Gateway, action: &str| {
        gateway.page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-out not finished",
            "Your session could not be ended just now. Please try again in a moment.",
            Some((action, "Sign out")),
        )
    };
    let session = match session {
        Ok(session) => session,
        Err(_) => return not_finished(gateway, &action),
    };
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
            let mut response = match rd.as_deref().and_then(|r| gateway.redirects.check(r)) {
                Some(to) => see_other(to),
                None => signed_out(gateway),
            };
            if end_session(gateway, context, &id, &session, &mut response)
                .await
                .is_err()
            {
                return not_finished(gateway, &action);
            }
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

/// Sign a session out: the executor's side first (a remote's session ends
/// with it), then ours; the cookie cleared on `response`. Err: the store
/// could not delete it, and it may still hold: the caller must not say
/// "signed out".
pub(crate) async fn end_session(
    gateway: &Gateway,
    context: &Context,
    id: &str,
    session: &crate::session::Session,
    response: &mut Response<Body>,
) -> Result<(), crate::session::StoreError> {
    if let Some(remote) = &session.executor_session {
        if let Err(error) = gateway.executor.sign_out(remote, context.client_ip).await {
            tracing::warn!(reason = %crate::respond::chain(&error), "the remote session could not be ended; ours ends all the same");
        }
    }
    crate::gate::clear_cookie(gateway, context, response);
    if let Err(error) = gateway.sessions.delete(id).await {
        tracing::warn!(%error, "sign-out failed: the session could not be deleted from the store");
        return Err(error);
    }
    if let Some(identity) = &session.identity {
        tracing::info!(user = %identity.username, "signed out");
    }
    Ok(())
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
