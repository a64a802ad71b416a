//! The gate: which session a request carries, who that is now, and what
//! that means for the request. `canonical` makes the path the gate decides
//! on (and the upstream receives), `decide` is the one decision every front
//! end calls, `cookie` reads, mints and clears the session cookie.

mod canonical;
mod cookie;
mod decide;
mod visitor;

use std::sync::Arc;

use http::HeaderMap;

pub use canonical::{Canonical, Malformed};
pub use cookie::{
    clear_cookie, cookie_values, csrf_cookie_name, mint, set_cookie, set_csrf_cookie, Assurance,
};
pub use decide::{
    accepts_html, allowed, decide, is_navigation, is_preflight, is_reserved, route, Request,
    SignedIn, Verdict,
};
pub use visitor::{visitor, PreAuthError, Visitor};

use crate::flow::Login;
use crate::gateway::{Gateway, People};
use crate::session::{Session, StoreError};

/// The session named by the request's cookie, whole (for the login pages,
/// which read and write its flows), if its signature holds and the store
/// still has it. Anything else (tampered, expired, unknown, garbage) is
/// simply no session. An authenticated session whose user the directory
/// no longer has, or has disabled, is none either.
pub async fn session(gateway: &Gateway, headers: &HeaderMap) -> Option<(String, Session)> {
    lookup(gateway, headers).await.stored
}

/// `session`, telling a store that could not answer apart from no
/// session: what sign-out needs, which must not say "signed out" while the
/// store may still hold the session.
pub async fn session_checked(
    gateway: &Gateway,
    headers: &HeaderMap,
) -> Result<Option<(String, Session)>, StoreError> {
    let found = lookup(gateway, headers).await;
    match (found.stored, found.failed) {
        (Some(stored), _) => Ok(Some(stored)),
        (None, Some(error)) => Err(error),
        (None, None) => Ok(None),
    }
}

/// What the request's cookies name: the first session the store has, and
/// the first id that carried our signature but is not stored (a visitor
/// shown a challenge and not stored yet, or one whose login expired).
pub(super) struct Lookup {
    pub(super) stored: Option<(String, Session)>,
    pub(super) unstored: Option<String>,
    /// The store failed to answer for a cookie that carried our signature.
    pub(super) failed: Option<StoreError>,
}

pub(super) async fn lookup(gateway: &Gateway, headers: &HeaderMap) -> Lookup {
    let name = gateway.config.session.cookie_name.as_str();
    let mut unstored = None;
    for value in cookie_values(headers, name) {
        let Some(id) = gateway.signer.verify(value) else {
            continue;
        };
        match gateway.sessions.get(id).await {
            Ok(Some(mut session)) => {
                if let Some(identity) = &session.identity {
                    match gateway.people.current(identity) {
                        Some(live) => session.identity = Some(live),
                        None => continue,
                    }
                    // Idle timeout: activity keeps an authenticated session alive.
                    let _ = gateway
                        .sessions
                        .touch(id, cookie::idle_ttl(gateway, &session))
                        .await;
                }
                return Lookup {
                    stored: Some((id.to_owned(), session)),
                    unstored,
                    failed: None,
                };
            }
            Ok(None) => {
                unstored.get_or_insert_with(|| id.to_owned());
            }
            Err(error) => {
                // Kept as the visitor's id: a first challenge needs no
                // store and still shows; storing its answer fails (503).
                store_failed(&error);
                unstored.get_or_insert_with(|| id.to_owned());
                return Lookup {
                    stored: None,
                    unstored,
                    failed: Some(error),
                };
            }
        }
    }
    Lookup {
        stored: None,
        unstored,
        failed: None,
    }
}

/// The request path's check: the authenticated session the cookie names,
/// its idle deadline refreshed, with its user as the directory has them
/// now. One read-locked lookup, no copy of the session. An error: the
/// store could not say (the caller answers 503 where a session is needed,
/// and lets public paths through).
pub async fn signed_in(
    gateway: &Gateway,
    headers: &HeaderMap,
) -> Result<Option<SignedIn>, StoreError> {
    let name = gateway.config.session.cookie_name.as_str();
    let idle = gateway.config.session.idle_timeout;
    for value in cookie_values(headers, name) {
        let Some(id) = gateway.signer.verify(value) else {
            continue;
        };
        match gateway.sessions.authenticated(id, idle).await {
            Ok(Some(session)) => match live(gateway, &id.into(), session) {
                Some(signed) => return Ok(Some(signed)),
                None => continue,
            },
            Ok(None) => continue,
            Err(error) => {
                store_failed(&error);
                return Err(error);
            }
        }
    }
    Ok(None)
}

/// What a session-store answer means now: the session
/// with its user as the directory has them, or nobody (a user deleted or
/// disabled since they signed in). Groups and names come from the
/// directory too, so a change in the users file applies at its reload.
pub fn live(gateway: &Gateway, id: &Arc<str>, session: Arc<Session>) -> Option<SignedIn> {
    let signed = resolve(&gateway.people, id, session)?;
    if let Some(revalidation) = &gateway.revalidation {
        revalidation.touch(gateway, id, &signed);
    }
    Some(signed)
}

fn resolve(people: &People, id: &Arc<str>, session: Arc<Session>) -> Option<SignedIn> {
    let frozen = session.identity.as_ref()?;
    let identity = people.current(frozen)?;
    Some(SignedIn {
        id: id.clone(),
        session,
        identity,
    })
}

/// A step up is finished by the user who started it: when `old` is
/// already signed in as someone other than `login`, that someone. (To
/// change user, sign out first.)
pub fn someone_else<'s>(old: &'s Session, login: &Login) -> Option<&'s str> {
    old.identity
        .as_ref()
        .filter(|before| before.username != login.identity.username)
        .map(|before| before.username.as_str())
}

/// What a session minted at the end of `flow` has been through: the old
/// session's flows and second factor as well when its user stepped up,
/// only this login's when nobody was signed in.
pub fn assurance_after(old: &Session, login: &Login, flow: &str) -> Assurance {
    let same = old
        .identity
        .as_ref()
        .is_some_and(|before| before.username == login.identity.username);
    let mut completed = match same {
        true => old.completed.clone(),
        false => Vec::new(),
    };
    if !completed.iter().any(|done| done == flow) {
        completed.push(flow.to_owned());
    }
    Assurance {
        completed,
        second_factor: login.second_factor || (same && old.second_factor),
        refused_applications: Vec::new(),
    }
}

/// The applications routes name (`route.authentik_application`) whose
/// policies refuse the user of `executor_session`.
pub async fn refused_applications(
    gateway: &Gateway,
    executor_session: Option<&crate::flow::FlowState>,
) -> Vec<String> {
    let Some(remote) = executor_session else {
        return Vec::new();
    };
    let apps: Vec<String> = gateway
        .applications()
        .into_iter()
        .map(str::to_owned)
        .collect();
    refused_by(&*gateway.executor, remote, &apps).await
}

/// Which of `apps` the executor's policies refuse the user of `remote`;
/// one that cannot be asked counts as refused (and is logged).
pub async fn refused_by(
    executor: &dyn crate::flow::FlowExecutor,
    remote: &crate::flow::FlowState,
    apps: &[String],
) -> Vec<String> {
    let mut refused = Vec::new();
    for app in apps {
        match executor.may_use(remote, app).await {
            Ok(true) => {}
            Ok(false) => refused.push(app.clone()),
            Err(error) => {
                tracing::warn!(application = %app, reason = %crate::respond::chain(&error), "could not ask the remote about an application; refused until it can be asked");
                refused.push(app.clone());
            }
        }
    }
    refused
}

pub(crate) fn store_failed(error: &StoreError) {
    tracing::warn!(%error, "session store lookup failed: the session cannot be checked");
}

/// A query value, `application/x-www-form-urlencoded`.
/// Where a browser says a request comes from (`Sec-Fetch-Site`), when
/// that is another site or a sibling subdomain. Clients that are no
/// browser send nothing, and nothing is not another site.
pub fn from_another_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site" || v.as_bytes() == b"same-site")
}

/// A browser says the user asked for this page themselves: typed it,
/// followed a bookmark (`none`), or came from a page of this origin.
pub fn user_initiated(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"same-origin" || v.as_bytes() == b"none")
}

pub fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Where a browser signs in at `flow` and comes back to `target`.
pub fn login_url(prefix: &str, flow: &str, target: &str) -> String {
    format!("{prefix}/flow/{flow}/?next={}", encode(target))
}

/// Where a script runs `flow` as JSON.
pub fn executor_url(prefix: &str, flow: &str) -> String {
    format!("{prefix}/api/v3/flows/executor/{flow}/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Allow, HeaderSet, HostPattern, PathRule, RouteConfig};
    use crate::identity::Identity;

    fn session_of(username: &str, groups: &[&str]) -> Arc<Session> {
        let identity = Identity::test(username, groups);
        let mut session = Session::authenticated(identity, 0, std::time::Duration::from_secs(60));
        session.completed = vec!["f".into()];
        Arc::new(session)
    }

    /// The session was minted when alice was an admin and bob existed; the
    /// directory now says otherwise, and the decision follows it.
    #[test]
    fn sessions_are_decided_on_the_directory_as_it_is_now() {
        let directory = crate::directory::FileDirectory::parse(
            "[[user]]\nusername = \"alice\"\ngroups = []\n\n\
             [[user]]\nusername = \"carol\"\ndisabled = true\n",
            "users.toml",
        )
        .unwrap();
        let directory = People::File(Arc::new(directory));
        let routes = [RouteConfig {
            host: HostPattern::Any,
            path_prefix: "/".into(),
            upstream: "http://127.0.0.1:9".parse().unwrap(),
            flow: "f".into(),
            skip_auth: vec![],
            allow: Allow {
                groups: vec!["admins".into()],
                users: vec![],
            },
            headers: HeaderSet::default(),
            preserve_host: true,
            case_insensitive: false,
            skip_auth_preflight: false,
            escaped_slashes: PathRule::Refuse,
            path_parameters: PathRule::Refuse,
            authentik_application: None,
            policies: Default::default(),
            authorization_flow: None,
        }];
        let path = Canonical::of("/").unwrap();
        let request = Request {
            method: "GET",
            host: "app.test",
            path: &path,
            navigation: true,
            preflight: false,
            client_ip: "127.0.0.1".parse().unwrap(),
            https: false,
            headers: None,
        };
        let verdict = |session: Arc<Session>| {
            let signed = resolve(&directory, &"id".into(), session);
            match decide(&routes, "/_flowgate", &request, signed.as_ref()) {
                Verdict::Forward { .. } => "forward",
                Verdict::Forbidden { .. } => "forbidden",
                Verdict::SignIn { .. } => "sign in",
                other => panic!("{other:?}"),
            }
        };
        // Out of the group since: refused, though the session says admins.
        assert_eq!(verdict(session_of("alice", &["admins"])), "forbidden");
        // Disabled, and deleted: nobody, so a sign-in.
        assert_eq!(verdict(session_of("carol", &["admins"])), "sign in");
        assert_eq!(verdict(session_of("bob", &["admins"])), "sign in");
        let live = resolve(&directory, &"id".into(), session_of("alice", &["admins"])).unwrap();
        assert!(live.identity.groups.is_empty());
    }
}
