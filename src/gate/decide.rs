//! The decision: one pure function from what a request is (its canonical
//! path, host, method, whether it is a page load) and who sends it (the
//! authenticated session, resolved against the live directory) to what
//! happens to it. Every front end builds a `Request` and calls `decide`:
//! the general path (`router`), the fast lane (`proxy::h1`), and later
//! forward auth. None of them keeps a rule of its own.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{PathRule, RouteConfig};
use crate::engine::policy::{Facts, RequestFacts};
use crate::gate::Canonical;
use crate::identity::Identity;
use crate::session::Session;

/// What the gate knows about a request when it decides.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Lower-case, without port.
    pub host: &'a str,
    pub path: &'a Canonical<'a>,
    /// A top-level page load, which can follow a redirect to a login page.
    pub navigation: bool,
    /// A CORS preflight: `OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`, sent by browsers without cookies.
    pub preflight: bool,
    pub client_ip: IpAddr,
    pub https: bool,
    /// The request's headers, for a route's policies; `None` on the fast
    /// lane, which leaves routes with policies to the general path.
    pub headers: Option<&'a http::HeaderMap>,
}

/// An authenticated session, with its user as the directory has them now.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// The session's id (what the cookie names): what a connection that
    /// outlives its request watches (`Store::ended`).
    pub id: Arc<str>,
    pub session: Arc<Session>,
    /// The live identity: groups and names as of the last directory load.
    pub identity: Arc<Identity>,
}

impl SignedIn {
    /// Whether this session has been through `flow`.
    pub fn completed(&self, flow: &str) -> bool {
        self.session.completed.iter().any(|done| done == flow)
    }
}

/// What happens to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'r> {
    /// Under the reserved prefix: one of flowgate's own endpoints.
    Reserved,
    /// No canonical form the route accepts: 400, with the reason.
    Refused(&'static str),
    /// No route for this host and path: 404.
    NoRoute,
    /// Send upstream: with the user's identity, or anonymously (`skip_auth`).
    Forward {
        route: usize,
        identity: Option<Arc<Identity>>,
    },
    /// A page load without a session: to this route's flow, then back.
    SignIn { route: usize, flow: &'r str },
    /// A page load from a session that has not been through this route's
    /// flow: through it (a step up), then back.
    StepUp {
        route: usize,
        flow: &'r str,
        identity: Arc<Identity>,
    },
    /// Anything else that needs a (stronger) session: 401 naming the flow.
    Unauthorized {
        route: usize,
        flow: &'r str,
        step_up: bool,
    },
    /// Signed in, but not someone this route lets in.
    Forbidden {
        route: usize,
        identity: Arc<Identity>,
    },
    /// The route has policies, which may read any header, and the caller
    /// gave none (the fast lane): nothing is decided yet; the general path
    /// decides, once, with the request's headers.
    NeedsHeaders { route: usize },
}

impl Verdict<'_> {
    pub fn route(&self) -> Option<usize> {
        match self {
            Verdict::Forward { route, .. }
            | Verdict::SignIn { route, .. }
            | Verdict::StepUp { route, .. }
            | Verdict::Unauthorized { route, .. }
            | Verdict::Forbidden { route, .. }
            | Verdict::NeedsHeaders { route } => Some(*route),
            Verdict::Reserved | Verdict::Refused(_) | Verdict::NoRoute => None,
        }
    }
}

/// Decide on `request` from `session`, with `routes` and the reserved
/// `prefix` of the running config.
pub fn decide<'r>(
    routes: &'r [RouteConfig],
    prefix: &str,
    request: &Request<'_>,
    session: Option<&SignedIn>,
) -> Verdict<'r> {
    let path = request.path.without_parameters();
    if is_reserved(&path, prefix) {
        return Verdict::Reserved;
    }
    let Some((index, route)) = route(routes, request.host, &path) else {
        return Verdict::NoRoute;
    };
    if request.path.escaped_slash && route.escaped_slashes == PathRule::Refuse {
        return Verdict::Refused(
            "the path has an encoded slash or a backslash (see proxy.escaped_slashes)",
        );
    }
    if request.path.parameters && route.path_parameters == PathRule::Refuse {
        return Verdict::Refused("the path has `;` parameters (see proxy.path_parameters)");
    }
    // `/admin./` is not under `/admin`, but IIS serves it as `/admin`: on
    // a host with such an upstream, a path it reads as another is refused,
    // whichever route it would take.
    let windows_host = || {
        routes
            .iter()
            .any(|r| r.case_insensitive && r.host.matches(request.host))
    };
    if request.path.windows_alias && windows_host() {
        return Verdict::Refused(
            "a path segment ends in a dot or a space, or an escape is not UTF-8: \
             a case-insensitive (Windows) upstream reads it as another name",
        );
    }
    let public = (request.preflight && route.skip_auth_preflight)
        || route.skip_auth.iter().any(|re| re.is_match(&path));
    // Signed in through the route's flow, a user still has to go through
    // its authorization flow, once per session.
    let flow = match (session, &route.authorization_flow) {
        (Some(signed), Some(authorization)) if signed.completed(&route.flow) => {
            authorization.as_str()
        }
        _ => route.flow.as_str(),
    };
    if request.headers.is_none() && !route.policies.is_empty() {
        return Verdict::NeedsHeaders { route: index };
    }
    // Decided once per request: a route's policies are not free.
    let permitted = session.map(|signed| permitted(route, signed, request, &path));
    match session {
        Some(signed) if permitted == Some(true) && signed.completed(flow) => Verdict::Forward {
            route: index,
            identity: Some(signed.identity.clone()),
        },
        _ if public => Verdict::Forward {
            route: index,
            identity: None,
        },
        Some(signed) if permitted == Some(false) => Verdict::Forbidden {
            route: index,
            identity: signed.identity.clone(),
        },
        Some(signed) if request.navigation => Verdict::StepUp {
            route: index,
            flow,
            identity: signed.identity.clone(),
        },
        Some(_) => Verdict::Unauthorized {
            route: index,
            flow,
            step_up: true,
        },
        None if request.navigation => Verdict::SignIn { route: index, flow },
        None => Verdict::Unauthorized {
            route: index,
            flow,
            step_up: false,
        },
    }
}

/// Whether `path` is the reserved prefix or under it.
pub fn is_reserved(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The route for `host` and `path`: among routes whose host and prefix
/// match, those of the most specific host pattern (an exact host, then the
/// longest `*.` suffix, then `*`), and of those the longest `path_prefix`
/// (the first of equals). A host's own routes are never shadowed by a
/// catch-all, wherever it stands in the file.
pub fn route<'r>(
    routes: &'r [RouteConfig],
    host: &str,
    path: &str,
) -> Option<(usize, &'r RouteConfig)> {
    routes
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.host.matches(host) && has_prefix(path, &r.path_prefix, r.case_insensitive)
        })
        .max_by_key(|(i, r)| {
            (
                r.host.specificity(),
                r.path_prefix.len(),
                std::cmp::Reverse(*i),
            )
        })
}

/// `prefix` as whole segments of `path` (`/app` holds `/app/x`, not
/// `/application`).
fn has_prefix(path: &str, prefix: &str, case_insensitive: bool) -> bool {
    if prefix == "/" {
        return true;
    }
    let Some(head) = path.get(..prefix.len()) else {
        return false;
    };
    let same = match case_insensitive {
        true => head.eq_ignore_ascii_case(prefix),
        false => head == prefix,
    };
    let rest = &path[prefix.len()..];
    same && (rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'))
}

/// Whether the route's `allow` lets this user in.
pub fn allowed(route: &RouteConfig, identity: &Identity) -> bool {
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

/// `allowed`, and the remote's application policy, when the route names
/// one: refused at login or at the last revalidation is refused.
fn permitted(route: &RouteConfig, signed: &SignedIn, request: &Request<'_>, path: &str) -> bool {
    allowed(route, &signed.identity)
        && route.authentik_application.as_ref().is_none_or(|app| {
            !signed
                .session
                .refused_applications
                .iter()
                .any(|refused| refused == app)
        })
        && policies_pass(route, &signed.identity, request, path)
}

/// The route's own policies, on the request as decided (its canonical
/// path) and the user as the directory has them now.
fn policies_pass(
    route: &RouteConfig,
    identity: &Identity,
    request: &Request<'_>,
    path: &str,
) -> bool {
    if route.policies.is_empty() {
        return true;
    }
    let headers: &http::HeaderMap = match request.headers {
        Some(headers) => headers,
        None => crate::engine::policy::no_headers(),
    };
    let facts = RequestFacts {
        ip: Some(request.client_ip),
        host: request.host,
        path,
        method: request.method,
        headers,
    };
    route
        .policies
        .evaluate(&Facts {
            user: Some(identity),
            identifier: None,
            request: facts,
            context: &serde_json::Map::new(),
            reputation: None,
        })
        .passing
}

/// A CORS preflight (Fetch standard): what a browser sends, without
/// cookies, before a cross-origin request that is not "simple".
pub fn is_preflight(method: &str, origin: bool, request_method: bool) -> bool {
    method == "OPTIONS" && origin && request_method
}

/// A top-level page load (PROTOCOL.md §7, complaints 6–9): GET or HEAD, not
/// marked as XHR, and `Sec-Fetch-Mode: navigate`, or without that header
/// an `Accept` that takes HTML. Fetches and API clients get a 401 instead
/// of a redirect into a page.
pub fn is_navigation(
    method: &str,
    requested_with: bool,
    fetch_mode: Option<&[u8]>,
    accept: Option<&[u8]>,
) -> bool {
    if !(method == "GET" || method == "HEAD") || requested_with {
        return false;
    }
    match fetch_mode {
        Some(mode) => mode == b"navigate",
        None => accept.is_some_and(accepts_html),
    }
}

/// Whether an `Accept` value takes HTML.
pub fn accepts_html(accept: &[u8]) -> bool {
    accept.windows(9).any(|w| w == b"text/html")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Allow, HeaderSet, HostPattern};

    fn route(prefix: &str, groups: &[&str], flow: &str, skip: &[&str]) -> RouteConfig {
        RouteConfig {
            host: HostPattern::parse("*"),
            path_prefix: prefix.into(),
            upstream: "http://127.0.0.1:9".parse().unwrap(),
            flow: flow.into(),
            skip_auth: skip.iter().map(|s| regex::Regex::new(s).unwrap()).collect(),
            allow: Allow {
                groups: groups.iter().map(|g| g.to_string()).collect(),
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
        }
    }

    fn table() -> Vec<RouteConfig> {
        vec![
            route("/", &[], "password", &[r"\.css$", "^/health$"]),
            route("/admin", &["admins"], "password", &[]),
            route("/vault", &[], "totp", &[]),
        ]
    }

    fn user(name: &str, groups: &[&str], completed: &[&str]) -> SignedIn {
        let identity = Identity::test(name, groups);
        let mut session =
            Session::authenticated(identity.clone(), 0, std::time::Duration::from_secs(60));
        session.completed = completed.iter().map(|c| c.to_string()).collect();
        SignedIn {
            id: "id".into(),
            session: Arc::new(session),
            identity: Arc::new(identity),
        }
    }

    fn decided<'r>(
        routes: &'r [RouteConfig],
        target: &str,
        navigation: bool,
        session: Option<&SignedIn>,
    ) -> Verdict<'r> {
        let path = Canonical::of(target).unwrap();
        let request = Request {
            method: if navigation { "GET" } else { "POST" },
            host: "app.test",
            path: &path,
            navigation,
            preflight: false,
            client_ip: "127.0.0.1".parse().unwrap(),
            https: false,
            headers: None,
        };
        decide(routes, "/_flowgate", &request, session)
    }

    #[test]
    fn anonymous_browsers_sign_in_and_api_clients_get_401() {
        let routes = table();
        assert_eq!(
            decided(&routes, "/x", true, None),
            Verdict::SignIn {
                route: 0,
                flow: "password"
            }
        );
        assert_eq!(
            decided(&routes, "/x", false, None),
            Verdict::Unauthorized {
                route: 0,
                flow: "password",
                step_up: false
            }
        );
    }

    #[test]
    fn skip_auth_opens_paths_not_queries() {
        let routes = table();
        let anonymous = Verdict::Forward {
            route: 0,
            identity: None,
        };
        assert_eq!(decided(&routes, "/site.css", false, None), anonymous);
        assert_eq!(decided(&routes, "/health", false, None), anonymous);
        assert_eq!(decided(&routes, "/health?x", false, None), anonymous);
        assert!(matches!(
            decided(&routes, "/api/users?x=.css", false, None),
            Verdict::Unauthorized { .. }
        ));
        // A public pattern of the root route does not reach into /admin.
        assert!(matches!(
            decided(&routes, "/admin/site.css", false, None),
            Verdict::Unauthorized { route: 1, .. }
        ));
    }

    #[test]
    fn groups_decide_on_the_canonical_path() {
        let routes = table();
        let bob = user("bob", &["staff"], &["password"]);
        let alice = user("alice", &["admins"], &["password"]);
        for target in [
            "/admin/",
            "/%61dmin/",
            "//admin/",
            "/./admin/",
            "/x/../admin/",
        ] {
            assert!(
                matches!(
                    decided(&routes, target, true, Some(&bob)),
                    Verdict::Forbidden { route: 1, .. }
                ),
                "{target}"
            );
            assert!(matches!(
                decided(&routes, target, true, Some(&alice)),
                Verdict::Forward {
                    route: 1,
                    identity: Some(_)
                }
            ));
        }
        assert!(matches!(
            decided(&routes, "/elsewhere", true, Some(&bob)),
            Verdict::Forward {
                route: 0,
                identity: Some(_)
            }
        ));
    }

    #[test]
    fn a_session_without_the_routes_flow_steps_up() {
        let routes = table();
        let bob = user("bob", &[], &["password"]);
        assert!(matches!(
            decided(&routes, "/vault/x", true, Some(&bob)),
            Verdict::StepUp {
                route: 2,
                flow: "totp",
                ..
            }
        ));
        assert_eq!(
            decided(&routes, "/vault/x", false, Some(&bob)),
            Verdict::Unauthorized {
                route: 2,
                flow: "totp",
                step_up: true
            }
        );
        let stepped = user("bob", &[], &["password", "totp"]);
        assert!(matches!(
            decided(&routes, "/vault/x", true, Some(&stepped)),
            Verdict::Forward { route: 2, .. }
        ));
    }

    #[test]
    fn reserved_paths_are_found_in_every_spelling() {
        let routes = table();
        for target in [
            "/_flowgate/flow/x/",
            "//_flowgate/sign_out",
            "/%5Fflowgate/",
            "/x/../_flowgate",
        ] {
            assert_eq!(
                decided(&routes, target, true, None),
                Verdict::Reserved,
                "{target}"
            );
        }
        assert!(matches!(
            decided(&routes, "/_flowgatex", true, None),
            Verdict::SignIn { .. }
        ));
    }

    #[test]
    fn disguised_slashes_and_parameters_are_refused_unless_the_route_keeps_them() {
        let mut routes = table();
        for target in ["/admin%2Fx", "/admin%5Cx", "/admin\\x", "/admin;x=1/"] {
            assert!(
                matches!(decided(&routes, target, true, None), Verdict::Refused(_)),
                "{target}"
            );
        }
        routes[1].escaped_slashes = PathRule::Keep;
        routes[1].path_parameters = PathRule::Keep;
        routes[0].escaped_slashes = PathRule::Keep;
        // Kept, and decided on the path without parameters: the admin route.
        assert!(matches!(
            decided(&routes, "/admin;x=1/", true, None),
            Verdict::SignIn { route: 1, .. }
        ));
        assert!(matches!(
            decided(&routes, "/admin%2Fx", true, None),
            Verdict::SignIn { route: 0, .. }
        ));
    }

    #[test]
    fn case_insensitive_routes_match_any_case() {
        let mut routes = table();
        let bob = user("bob", &[], &["password"]);
        assert!(matches!(
            decided(&routes, "/ADMIN/", true, Some(&bob)),
            Verdict::Forward { route: 0, .. }
        ));
        routes[1].case_insensitive = true;
        assert!(matches!(
            decided(&routes, "/ADMIN/", true, Some(&bob)),
            Verdict::Forbidden { route: 1, .. }
        ));
        assert!(matches!(
            decided(&routes, "/Admin", true, Some(&bob)),
            Verdict::Forbidden { route: 1, .. }
        ));
        // What IIS strips or misreads is refused on such a route.
        for alias in ["/admin./", "/ADMIN%20/x", "/admin/%C0%AF"] {
            assert!(
                matches!(
                    decided(&routes, alias, true, Some(&bob)),
                    Verdict::Refused(_)
                ),
                "{alias}"
            );
        }
    }

    #[test]
    fn a_hosts_own_routes_win_over_catch_alls_listed_before_them() {
        let mut open = route("/", &[], "password", &[]);
        open.path_prefix = "/".into();
        let mut any_long = route("/zz/deep", &[], "password", &[]);
        any_long.host = HostPattern::parse("*");
        let mut admin = route("/", &["admins"], "password", &[]);
        admin.host = HostPattern::parse("admin.test");
        let mut wildcard = route("/", &["ops"], "password", &[]);
        wildcard.host = HostPattern::parse("*.test");
        let routes = vec![open, any_long, wildcard, admin];
        let pick = |host: &str, path: &str| super::route(&routes, host, path).map(|(i, _)| i);
        assert_eq!(pick("admin.test", "/zz"), Some(3));
        assert_eq!(pick("admin.test", "/zz/deep/x"), Some(3));
        assert_eq!(pick("other.test", "/zz"), Some(2));
        assert_eq!(pick("elsewhere", "/zz/deep"), Some(1));
        assert_eq!(pick("elsewhere", "/zz"), Some(0));
    }

    #[test]
    fn preflights_pass_only_where_the_route_lets_them() {
        let mut routes = table();
        let path = Canonical::of("/api/x").unwrap();
        let preflight = Request {
            method: "OPTIONS",
            host: "app.test",
            path: &path,
            navigation: false,
            preflight: true,
            client_ip: "127.0.0.1".parse().unwrap(),
            https: false,
            headers: None,
        };
        assert!(matches!(
            decide(&routes, "/_flowgate", &preflight, None),
            Verdict::Unauthorized { .. }
        ));
        routes[0].skip_auth_preflight = true;
        assert_eq!(
            decide(&routes, "/_flowgate", &preflight, None),
            Verdict::Forward {
                route: 0,
                identity: None
            }
        );
        let plain_options = Request {
            preflight: false,
            ..preflight
        };
        assert!(matches!(
            decide(&routes, "/_flowgate", &plain_options, None),
            Verdict::Unauthorized { .. }
        ));
        assert!(is_preflight("OPTIONS", true, true));
        assert!(!is_preflight("OPTIONS", true, false));
        assert!(!is_preflight("GET", true, true));
    }

    #[test]
    fn navigation_is_a_page_load() {
        assert!(is_navigation("GET", false, Some(b"navigate"), None));
        assert!(is_navigation("HEAD", false, None, Some(b"text/html,*/*")));
        assert!(!is_navigation(
            "GET",
            false,
            Some(b"cors"),
            Some(b"text/html")
        ));
        assert!(!is_navigation("GET", true, None, Some(b"text/html")));
        assert!(!is_navigation("POST", false, Some(b"navigate"), None));
        assert!(!is_navigation(
            "GET",
            false,
            None,
            Some(b"application/json")
        ));
    }
}
