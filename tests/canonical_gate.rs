//! Every spelling of a restricted path, through the real binary over real
//! sockets: percent-escapes of unreserved characters, hex in either case,
//! dot segments (plain and escaped), doubled slashes, escaped slashes and
//! backslashes, `;` parameters, control characters, broken escapes. Each
//! one is either refused with 400 or decided as the path it stands for (the
//! route, `allow` and `skip_auth` see the canonical path), and what the
//! upstream then receives is exactly that canonical path: it never serves
//! something other than what the gate decided on.
//!
//! Every case runs three ways: HTTP/1.1 on the fast lane
//! (`server.fast_lane = true`), HTTP/1.1 on the general path
//! (`fast_lane = false`), and HTTP/2 with prior knowledge (h2c) on the plain
//! listener, which always takes the general path. The upstream is a
//! scripted one that records every request and answers with its target, so
//! each row asserts on both the status and what (if anything) reached it.
//!
//! The tables are precise: each row names what was sent and what each kind
//! of client must get, so a regression names its row.

mod common;

use common::h2::{h2c_send_blocking, H2Error};
use common::raw::*;
use common::*;

// ---------------------------------------------------------------------------
// The three ways in
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// HTTP/1.1, `fast_lane = true`.
    Fast,
    /// HTTP/1.1, `fast_lane = false`.
    General,
    /// h2c prior knowledge, to a flowgate with `fast_lane = true` (its
    /// listener must hand the h2 preface to the general path).
    H2,
}

/// Every case on each of the three lanes, as `fast_lane::case`,
/// `general_path::case` and `h2::case`.
macro_rules! on_every_lane {
    ($($case:ident),* $(,)?) => {
        mod fast_lane {
            $(#[test]
            fn $case() {
                super::$case(super::Lane::Fast)
            })*
        }
        mod general_path {
            $(#[test]
            fn $case() {
                super::$case(super::Lane::General)
            })*
        }
        mod h2 {
            $(#[test]
            fn $case() {
                super::$case(super::Lane::H2)
            })*
        }
    };
}

on_every_lane!(
    every_spelling_of_admin_is_refused_or_decided_as_admin_for_signed_in_users,
    every_spelling_of_admin_is_refused_or_sent_to_sign_in_when_anonymous,
    a_case_insensitive_route_is_matched_in_any_case,
    skip_auth_regexes_match_the_canonical_path_never_the_query,
    escaped_slashes_keep_sends_them_upstream_as_escapes,
    path_parameters_keep_decides_without_them_and_forwards_them,
    a_hosts_restricted_route_beats_a_catch_all_listed_first,
    a_prefix_with_a_trailing_slash_covers_the_bare_path,
    paths_an_iis_upstream_reads_as_another_are_refused_on_its_host,
    requests_without_exactly_one_valid_host_are_refused,
);

/// An answer, from either protocol.
#[derive(Debug)]
struct Answer {
    status: u16,
    location: Option<String>,
    body: String,
}

/// GET `target` (byte for byte) with `headers` on `lane`, on a connection
/// of its own. `None` when, over h2, `http::Uri` will not carry the target
/// (the row is skipped on that lane, with a note).
fn send(gate: &Flowgate, lane: Lane, target: &str, headers: &[&str]) -> Option<Answer> {
    match lane {
        Lane::Fast | Lane::General => {
            let mut client = Client::connect(gate.addr);
            client.send(request("GET", target, headers));
            let response = client.response("GET");
            Some(Answer {
                status: response.status,
                location: response.header("location").map(str::to_owned),
                body: response.text(),
            })
        }
        Lane::H2 => match h2c_send_blocking(gate.addr, "GET", target, headers, b"") {
            Ok(response) => Some(Answer {
                status: response.status,
                location: response.header("location").map(str::to_owned),
                body: response.text(),
            }),
            Err(H2Error::Target(why)) => {
                eprintln!("NOTE: row {target:?} skipped over h2: {why}");
                None
            }
            Err(other) => panic!("h2, row {target:?}: {other}"),
        },
    }
}

// ---------------------------------------------------------------------------
// Users, configs, the rig
// ---------------------------------------------------------------------------

/// In `admins`: `/admin` lets her in.
const ADA: TestUser = TestUser {
    username: "ada",
    password: "ada-Admin-Pw1!",
    email: "ada@example.test",
    groups: &["admins"],
    extra: "",
};

/// Signed in, but in no group `/admin` allows.
const NOEL: TestUser = TestUser {
    username: "noel",
    password: "noel-Staff-Pw1!",
    email: "noel@example.test",
    groups: &["staff"],
    extra: "",
};

const UPSTREAM: &str = "{upstream}";

/// A `[[route]]` table on `path_prefix` to the scripted upstream, with
/// `extra` keys (`allow = …`, `skip_auth = …`).
fn route(prefix: &str, extra: &str) -> String {
    format!(
        "[[route]]\nhost = \"*\"\npath_prefix = \"{prefix}\"\nupstream = \"{UPSTREAM}\"\nflow = \"{FLOW}\"\n{extra}\n\n"
    )
}

/// Route table A: `/` for any signed-in user, `/admin` for `admins` only.
fn table_a() -> String {
    route("/", "") + &route("/admin", "allow = { groups = [\"admins\"] }")
}

/// Route table B: everything under `/` public, `/admin` protected.
fn table_b() -> String {
    route("/", "skip_auth = [\"^/\"]") + &route("/admin", "allow = { groups = [\"admins\"] }")
}

/// A whole config on `lane`, with `routes`.
fn config(lane: Lane, upstream: &str, routes: &str) -> String {
    let fast = lane != Lane::General;
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
fast_lane = {fast}

[session]
secret = "test-secret-test-secret-test-secret-0123456789"

[directory]
users_file = "users.toml"

[[flow]]
slug = "{FLOW}"
title = "Sign in"
stages = ["identification", "password", "mfa", "login"]

{routes}
"#
    )
    .replace(UPSTREAM, upstream)
}

/// A flowgate on `lane` with `routes` in front of a scripted upstream that
/// answers every request with its target, ada and noel signed in.
struct Gate {
    lane: Lane,
    gate: Flowgate,
    upstream: Scripted,
    /// `Cookie: flowgate_session=…` of ada (admins).
    admin: String,
    /// `Cookie: flowgate_session=…` of noel (not admins).
    other: String,
}

impl Gate {
    fn start(lane: Lane, routes: &str) -> Gate {
        let upstream = Scripted::start(|seen| Reply::keep(ok(seen.target())));
        let gate = Flowgate::start(
            &config(lane, &upstream.url(), routes),
            &users_file(&[&ADA, &NOEL]),
        );
        let admin = cookie_of(&gate, &ADA);
        let other = cookie_of(&gate, &NOEL);
        // Signing in does not go upstream.
        assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
        Gate {
            lane,
            gate,
            upstream,
            admin,
            other,
        }
    }

    /// ada, from a browser.
    fn admin(&self) -> Who {
        Who::new("ada (admins)", &[&self.admin, "Accept: text/html"])
    }

    /// noel, from a browser.
    fn other(&self) -> Who {
        Who::new("noel (not admins)", &[&self.other, "Accept: text/html"])
    }

    /// No session, a browser's page load.
    fn browser(&self) -> Who {
        Who::new("anonymous browser", &["Accept: text/html"])
    }

    /// No session, an API client.
    fn api(&self) -> Who {
        Who::new("anonymous API client", &["Accept: application/json"])
    }

    /// Send each row as `who`; check its status, what reached the upstream
    /// because of it, and where a sign-in would come back to. Returns every
    /// target the upstream recorded for these rows.
    fn run(&self, who: &Who, rows: &[(&str, Expect)]) -> Vec<String> {
        let mut reached = Vec::new();
        let mut skipped = 0;
        for (sent, expect) in rows {
            let before = self.upstream.seen().len();
            let headers: Vec<&str> = who.headers.iter().map(String::as_str).collect();
            let Some(answer) = send(&self.gate, self.lane, sent, &headers) else {
                skipped += 1;
                continue;
            };
            // The upstream records a request before it answers it: by now
            // everything this row sent it is there.
            let seen = targets(&self.upstream.seen()[before..]);
            let row = format!(
                "{:?} lane, {}, row {sent:?}: got {} (location {:?}, body {:?}), \
                 upstream saw {seen:?}; expected {expect:?}",
                self.lane,
                who.name,
                answer.status,
                answer.location,
                answer.body.chars().take(120).collect::<String>(),
            );
            assert!(expect.statuses.contains(&answer.status), "{row}");
            match (answer.status, expect.upstream) {
                (200, Some(target)) => {
                    assert_eq!(seen, [target], "{row}");
                    assert_eq!(answer.body, target, "{row}");
                }
                (200, None) => panic!("{row}: a 200 the table has no upstream target for"),
                _ => assert!(seen.is_empty(), "{row}: reached the upstream"),
            }
            if let Some(next) = expect.next {
                assert_eq!(login_next(&answer).as_deref(), Some(next), "{row}");
            }
            reached.extend(seen);
        }
        assert!(
            skipped < rows.len(),
            "{:?} lane, {}: every row was skipped",
            self.lane,
            who.name
        );
        reached
    }
}

/// Who sends a row: a name for the failure message, and their headers.
struct Who {
    name: &'static str,
    headers: Vec<String>,
}

impl Who {
    fn new(name: &'static str, headers: &[&str]) -> Who {
        Who {
            name,
            headers: headers.iter().map(|h| h.to_string()).collect(),
        }
    }
}

/// Sign `user` in through the JSON API; `Cookie: flowgate_session=…`.
fn cookie_of(gate: &Flowgate, user: &TestUser) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cookies = runtime.block_on(async {
        let (_client, cookies) = signed_in(gate, user).await;
        cookies
    });
    let session = cookies
        .split("; ")
        .find(|c| c.starts_with("flowgate_session="))
        .expect("a session cookie");
    format!("Cookie: {session}")
}

/// What one row must get.
#[derive(Debug, Clone, Copy)]
struct Expect {
    /// The statuses allowed (one, in these tables).
    statuses: &'static [u16],
    /// What the upstream must record (and echo back) on a 200; on any
    /// other status it must record nothing.
    upstream: Option<&'static str>,
    /// Where the sign-in must come back to (the 302's `Location`, the
    /// 401's `login_url`): the canonical target decided on.
    next: Option<&'static str>,
}

/// 400: no canonical form this route accepts; nothing goes upstream.
const REFUSED: Expect = Expect {
    statuses: &[400],
    upstream: None,
    next: None,
};

/// 403: decided as `/admin`, and the user is not in `admins`.
const FORBIDDEN: Expect = Expect {
    statuses: &[403],
    upstream: None,
    next: None,
};

/// 200, and the upstream received `target`.
const fn passes(target: &'static str) -> Expect {
    Expect {
        statuses: &[200],
        upstream: Some(target),
        next: None,
    }
}

/// Decided as `/admin/secret`, for an admin: the canonical form upstream.
const SERVED: Expect = passes("/admin/secret");

/// 302 to the login page, coming back to `next`.
const fn sign_in(next: &'static str) -> Expect {
    Expect {
        statuses: &[302],
        upstream: None,
        next: Some(next),
    }
}

/// 401 naming the login page, which comes back to `next`.
const fn unauthorized(next: &'static str) -> Expect {
    Expect {
        statuses: &[401],
        upstream: None,
        next: Some(next),
    }
}

/// Where the answer's sign-in comes back to: `next` of the 302's
/// `Location`, or of the 401's `login_url`.
fn login_next(answer: &Answer) -> Option<String> {
    let login = match answer.status {
        302 => answer.location.clone()?,
        401 => {
            let body: serde_json::Value = serde_json::from_str(&answer.body).ok()?;
            body["login_url"].as_str()?.to_owned()
        }
        _ => return None,
    };
    let (page, query) = login.split_once('?')?;
    assert_eq!(page, format!("/_flowgate/flow/{FLOW}/"), "{login}");
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "next")
        .map(|(_, v)| v.into_owned())
}

/// Whether any reading of `target` lands under `/admin`: every escape
/// decoded (`%2F` too), `\` taken as `/`, `;` parameters cut, dot segments
/// resolved, empty segments merged; compared ignoring case if `any_case`.
/// An independent, deliberately suspicious reader: not flowgate's.
fn reads_as_admin(target: &str, any_case: bool) -> bool {
    let path = target.split('?').next().unwrap_or("");
    let mut decoded = Vec::new();
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], escape) {
            (b'%', Some(value)) => {
                decoded.push(value);
                i += 3;
            }
            (b, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut kept: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment.split(';').next().unwrap_or("") {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            name => kept.push(name),
        }
    }
    kept.first().is_some_and(|first| match any_case {
        true => first.eq_ignore_ascii_case("admin"),
        false => *first == "admin",
    })
}

/// `reads_as_admin` is suspicious enough to catch what the tables guard.
#[test]
fn the_suspicious_reader_sees_admin_in_every_disguise() {
    for disguised in [
        "/admin",
        "/admin/secret",
        "/%61dmin/secret",
        "//admin/secret",
        "/x/../admin/secret",
        "/x/%2e%2e/admin/secret",
        "/admin%2Fsecret",
        "/admin%5csecret",
        "/admin\\secret",
        "/admin;x=1/secret",
        "/admin/secret%00",
        "/x/..;/admin",
    ] {
        assert!(reads_as_admin(disguised, false), "{disguised}");
    }
    for elsewhere in [
        "/",
        "/ADMIN/secret",
        "/administrator",
        "/x/admin",
        "/?/admin",
    ] {
        assert!(!reads_as_admin(elsewhere, false), "{elsewhere}");
    }
    assert!(reads_as_admin("/ADMIN/secret", true));
}

// ---------------------------------------------------------------------------
// The spellings of /admin/secret
// ---------------------------------------------------------------------------

/// One spelling of `/admin/secret`, and what each kind of client gets.
struct Spelling {
    sent: &'static str,
    /// Table A, noel (signed in, not in `admins`).
    other: Expect,
    /// Table A, ada (in `admins`).
    admin: Expect,
    /// Table B (`/` public, `/admin` protected), no session, a page load.
    browser: Expect,
    /// Table B, no session, an API client.
    api: Expect,
}

const fn row(
    sent: &'static str,
    other: Expect,
    admin: Expect,
    browser: Expect,
    api: Expect,
) -> Spelling {
    Spelling {
        sent,
        other,
        admin,
        browser,
        api,
    }
}

/// Decided as `/admin/secret`: 403 for noel, served to ada as
/// `/admin/secret`, a sign-in back to `/admin/secret` when anonymous.
const fn decided(sent: &'static str) -> Spelling {
    row(
        sent,
        FORBIDDEN,
        SERVED,
        sign_in("/admin/secret"),
        unauthorized("/admin/secret"),
    )
}

/// No canonical form the route accepts: 400 for everyone.
const fn refused(sent: &'static str) -> Spelling {
    row(sent, REFUSED, REFUSED, REFUSED, REFUSED)
}

/// Which of a spelling's expectations applies to a client.
type Column = fn(&Spelling) -> Expect;

const SPELLINGS: &[Spelling] = &[
    // The plain spelling: the control row.
    decided("/admin/secret"),
    // Escapes of unreserved characters, hex in either case.
    decided("/%61dmin/secret"),
    decided("/%61%64%6D%69%6E/secret"),
    decided("/%61%64%6d%69%6e/secret"),
    decided("/admin/%73ecret"),
    // Empty and dot segments, plain and escaped.
    decided("//admin/secret"),
    decided("///admin//secret"),
    decided("/./admin/secret"),
    decided("/x/../admin/secret"),
    decided("/%2e%2e/admin/secret"),
    decided("/x/%2e%2e/admin/secret"),
    decided("/x/%2E%2E/admin/secret"),
    decided("/x/.%2e/admin/secret"),
    decided("/x/%2e./admin/secret"),
    decided("/admin/x/../secret"),
    // The reserved prefix is found on the canonical path too: this is not
    // one of flowgate's own paths.
    decided("/_flowgate/../admin/secret"),
    // Slashes in disguise: refused on a route that does not keep them.
    refused("/admin%2Fsecret"),
    refused("/admin%2fsecret"),
    refused("/admin%5Csecret"),
    refused("/admin%5csecret"),
    refused("/admin\\secret"),
    refused("/x/..%2Fadmin/secret"),
    refused("/x/..%5Cadmin/secret"),
    // `;` parameters: refused on a route that does not keep them.
    refused("/admin;x=1/secret"),
    // An escaped `;` counts as a parameter: some servers decode it first.
    refused("/admin%3Bx=1/secret"),
    refused("/admin%3bx=1/secret"),
    refused("/admin;/secret"),
    refused("/x/..;/admin/secret"),
    refused("/.;/admin/secret"),
    refused("/x/%2e%2e;/admin/secret"),
    // Control characters, raw or escaped, and broken escapes: always 400.
    refused("/admin/secret%00"),
    refused("/admin%00/secret"),
    refused("/admin/secret%0a"),
    refused("/admin/secret%0D"),
    refused("/admin%1f/secret"),
    refused("/admin/secret%7F"),
    refused("/admin/secret\0"),
    refused("/admin/secret%"),
    refused("/admin/secret%4"),
    refused("/%6/admin/secret"),
    refused("/%zzadmin/secret"),
    // IIS's `%u` escapes are broken escapes to everyone else.
    refused("/admin%u002fsecret"),
    refused("/%u0061dmin/secret"),
    // The query rides along byte for byte and is never the path.
    row(
        "/%61dmin/secret?x=/../",
        FORBIDDEN,
        passes("/admin/secret?x=/../"),
        sign_in("/admin/secret?x=/../"),
        unauthorized("/admin/secret?x=/../"),
    ),
    row(
        "/?/admin/secret",
        passes("/?/admin/secret"),
        passes("/?/admin/secret"),
        passes("/?/admin/secret"),
        passes("/?/admin/secret"),
    ),
    // Not `/admin` to a case-sensitive route (and its upstream): it passes
    // to `/` as it is, anonymously too in table B.
    row(
        "/ADMIN/secret",
        passes("/ADMIN/secret"),
        passes("/ADMIN/secret"),
        passes("/ADMIN/secret"),
        passes("/ADMIN/secret"),
    ),
];

/// Table A, signed in: noel never reaches anything under `/admin` by any
/// reading; ada gets each decided spelling served as `/admin/secret`.
fn every_spelling_of_admin_is_refused_or_decided_as_admin_for_signed_in_users(lane: Lane) {
    let gate = Gate::start(lane, &table_a());
    let rows: Vec<(&str, Expect)> = SPELLINGS.iter().map(|s| (s.sent, s.other)).collect();
    let reached = gate.run(&gate.other(), &rows);
    for target in &reached {
        assert!(
            !reads_as_admin(target, false),
            "{lane:?} lane: noel's request reached the upstream as {target:?}"
        );
    }
    let rows: Vec<(&str, Expect)> = SPELLINGS.iter().map(|s| (s.sent, s.admin)).collect();
    gate.run(&gate.admin(), &rows);
    // The same gate, the same answers, whatever the order: noel again.
    let before = gate.upstream.seen().len();
    let plain = send(&gate.gate, lane, "/admin/secret", &[&gate.other]).unwrap();
    assert_eq!(plain.status, 403, "{plain:?}");
    assert_eq!(gate.upstream.seen().len(), before);
}

/// Table B, anonymous: `/` is public, so every spelling that is not
/// decided as `/admin` would go upstream anonymously; none of them does.
fn every_spelling_of_admin_is_refused_or_sent_to_sign_in_when_anonymous(lane: Lane) {
    let gate = Gate::start(lane, &table_b());
    let columns: [(Who, Column); 2] = [(gate.browser(), |s| s.browser), (gate.api(), |s| s.api)];
    for (who, column) in columns {
        let rows: Vec<(&str, Expect)> = SPELLINGS.iter().map(|s| (s.sent, column(s))).collect();
        let reached = gate.run(&who, &rows);
        for target in &reached {
            assert!(
                !reads_as_admin(target, false),
                "{lane:?} lane, {}: reached the upstream as {target:?}",
                who.name
            );
        }
    }
    // The public side is public: the table can tell.
    let rows = [("/elsewhere", passes("/elsewhere"))];
    gate.run(&gate.api(), &rows);
}

// ---------------------------------------------------------------------------
// Route options
// ---------------------------------------------------------------------------

/// `case_insensitive = true` on `/admin`: its prefix and its `skip_auth`
/// match in any case, so `/ADMIN/…` is `/admin/…` to the gate as to its
/// upstream; what goes upstream keeps the case it came in.
fn a_case_insensitive_route_is_matched_in_any_case(lane: Lane) {
    let routes = route("/", "")
        + &route(
            "/admin",
            "allow = { groups = [\"admins\"] }\ncase_insensitive = true\n\
             skip_auth = [\"^/admin/health$\"]",
        );
    let gate = Gate::start(lane, &routes);
    let other = [
        ("/admin/secret", FORBIDDEN),
        ("/ADMIN/secret", FORBIDDEN),
        ("/Admin/secret", FORBIDDEN),
        ("/aDmIn/SECRET", FORBIDDEN),
        ("/%41dmin/secret", FORBIDDEN),
        ("/%41DMIN", FORBIDDEN),
        ("//ADMIN/secret", FORBIDDEN),
        ("/x/../ADMIN/secret", FORBIDDEN),
        ("/x/%2E%2E/Admin/secret", FORBIDDEN),
        ("/ADMIN%2Fsecret", REFUSED),
        ("/ADMIN;x=1/secret", REFUSED),
        // Still whole segments: `/ADMINISTRATOR` is not under `/admin`.
        ("/ADMINISTRATOR", passes("/ADMINISTRATOR")),
        // Public in any case, for anyone.
        ("/ADMIN/HEALTH", passes("/ADMIN/HEALTH")),
    ];
    let reached = gate.run(&gate.other(), &other);
    for target in &reached {
        let public = target.eq_ignore_ascii_case("/admin/health");
        assert!(
            public || !reads_as_admin(target, true),
            "{lane:?} lane: noel's request reached the upstream as {target:?}"
        );
    }
    let admin = [
        ("/admin/secret", passes("/admin/secret")),
        ("/ADMIN/secret", passes("/ADMIN/secret")),
        ("/Admin/secret", passes("/Admin/secret")),
        ("/%41dmin/secret", passes("/Admin/secret")),
        ("/x/../ADMIN/secret", passes("/ADMIN/secret")),
    ];
    gate.run(&gate.admin(), &admin);
    let anonymous = [
        ("/ADMIN/secret", unauthorized("/ADMIN/secret")),
        ("/Admin/Health", passes("/Admin/Health")),
        ("/admin/health", passes("/admin/health")),
        // `$` ends the pattern: nothing below it is public.
        ("/ADMIN/HEALTH/x", unauthorized("/ADMIN/HEALTH/x")),
        ("/ADMIN/HEALTH/../secret", unauthorized("/ADMIN/secret")),
    ];
    gate.run(&gate.api(), &anonymous);
}

/// `skip_auth` on `/` for static files, `/api` protected: the patterns see
/// the canonical path, never the query, and do not reach into other routes.
fn skip_auth_regexes_match_the_canonical_path_never_the_query(lane: Lane) {
    let routes = route("/", "skip_auth = ['\\.(css|js|png)$']") + &route("/api", "");
    let gate = Gate::start(lane, &routes);
    let anonymous = [
        ("/style.css", passes("/style.css")),
        ("/app.js", passes("/app.js")),
        ("/img/logo.png", passes("/img/logo.png")),
        ("/style.css?v=1", passes("/style.css?v=1")),
        // Decided on, and sent as, the canonical path.
        ("/secret%2Ecss", passes("/secret.css")),
        ("//img/./logo.png", passes("/img/logo.png")),
        // The query is not the path.
        ("/api/users?x=.css", unauthorized("/api/users?x=.css")),
        ("/secret?x=.css", unauthorized("/secret?x=.css")),
        ("/secret?.css", unauthorized("/secret?.css")),
        // The root route's patterns stop at its own paths.
        ("/api/users.css", unauthorized("/api/users.css")),
        // A pattern is matched after the dot segments are gone.
        ("/style.css/../secret", unauthorized("/secret")),
        ("/x/../api/users?.css", unauthorized("/api/users?.css")),
    ];
    gate.run(&gate.api(), &anonymous);
    let browser = [("/api/users?x=.css", sign_in("/api/users?x=.css"))];
    gate.run(&gate.browser(), &browser);
    let signed_in = [
        ("/api/users?x=.css", passes("/api/users?x=.css")),
        ("/secret", passes("/secret")),
    ];
    gate.run(&gate.other(), &signed_in);
}

/// `escaped_slashes = "keep"` on `/files`: its escapes go upstream as
/// escapes (hex in upper case), a raw `\` as it came; other routes still
/// refuse them, and keeping them opens nothing to the anonymous.
fn escaped_slashes_keep_sends_them_upstream_as_escapes(lane: Lane) {
    let routes = table_a() + &route("/files", "escaped_slashes = \"keep\"");
    let gate = Gate::start(lane, &routes);
    let other = [
        ("/files/a%2Fb", passes("/files/a%2Fb")),
        ("/files/a%2fb", passes("/files/a%2Fb")),
        ("/files/a%5cb", passes("/files/a%5Cb")),
        ("/files/a\\b", passes("/files/a\\b")),
        ("/files/./a%2Fb?x=%2f", passes("/files/a%2Fb?x=%2f")),
        // The route is found on the path as it stands: `%2F` is no slash
        // to `/files`, so `/files%2Fa` is the root route's, which refuses.
        ("/files%2Fa", REFUSED),
        ("/other/a%2Fb", REFUSED),
        ("/admin%2Fsecret", REFUSED),
        ("/admin/a%2Fb", REFUSED),
    ];
    gate.run(&gate.other(), &other);
    let anonymous = [("/files/a%2Fb", unauthorized("/files/a%2Fb"))];
    gate.run(&gate.api(), &anonymous);
}

/// `path_parameters = "keep"` on `/admin`: decided on the path without its
/// parameters (as Tomcat routes), so `/admin;jsessionid=1/secret` is
/// `/admin` (403 for noel) and reaches the upstream as sent for ada.
fn path_parameters_keep_decides_without_them_and_forwards_them(lane: Lane) {
    let routes = route("/", "")
        + &route(
            "/admin",
            "allow = { groups = [\"admins\"] }\npath_parameters = \"keep\"",
        );
    let gate = Gate::start(lane, &routes);
    let other = [
        ("/admin;jsessionid=1/secret", FORBIDDEN),
        ("/admin;jsessionid=1", FORBIDDEN),
        ("/admin/secret;x=1", FORBIDDEN),
        ("/%61dmin;x/secret", FORBIDDEN),
        ("/x/..;/admin/secret", FORBIDDEN),
        ("/.;/admin/secret", FORBIDDEN),
        // The root route still refuses parameters.
        ("/other;x=1", REFUSED),
    ];
    let reached = gate.run(&gate.other(), &other);
    assert!(reached.is_empty(), "{reached:?}");
    let admin = [
        (
            "/admin;jsessionid=1/secret",
            passes("/admin;jsessionid=1/secret"),
        ),
        ("/admin/secret;x=1", passes("/admin/secret;x=1")),
        ("/%61dmin;x/secret", passes("/admin;x/secret")),
        ("/x/..;/admin/secret", passes("/admin/secret")),
    ];
    gate.run(&gate.admin(), &admin);
    let anonymous = [(
        "/admin;jsessionid=1/secret",
        unauthorized("/admin;jsessionid=1/secret"),
    )];
    gate.run(&gate.api(), &anonymous);
}

// ---------------------------------------------------------------------------
// HTTP/1.1 only: the absolute form
// ---------------------------------------------------------------------------

/// `GET http://host/admin/secret HTTP/1.1` is one more spelling, which
/// HTTP/2's `:path` cannot carry: decided on its path, and sent upstream
/// in origin form.
#[test]
fn absolute_form_targets_are_decided_on_their_path_on_both_http1_lanes() {
    for lane in [Lane::Fast, Lane::General] {
        let gate = Gate::start(lane, &table_a());
        let other = [
            ("http://edge.test/admin/secret", FORBIDDEN),
            ("http://edge.test/%61dmin/secret", FORBIDDEN),
            ("http://edge.test//admin/secret", FORBIDDEN),
            ("http://edge.test/x/../admin/secret", FORBIDDEN),
            ("http://edge.test/admin%2Fsecret", REFUSED),
        ];
        let reached = gate.run(&gate.other(), &other);
        assert!(reached.is_empty(), "{lane:?} lane: {reached:?}");
        let admin = [
            ("http://edge.test/admin/secret", SERVED),
            ("http://edge.test/%61dmin/secret", SERVED),
            (
                "http://edge.test//admin/secret?q=1",
                passes("/admin/secret?q=1"),
            ),
        ];
        gate.run(&gate.admin(), &admin);
    }
}

// ---------------------------------------------------------------------------
// Found by an outside review: routes, prefixes, hosts
// ---------------------------------------------------------------------------

/// A `[[route]]` for host `host` only.
fn host_route(host: &str, prefix: &str, extra: &str) -> String {
    route(prefix, extra).replace("host = \"*\"", &format!("host = \"{host}\""))
}

/// A catch-all listed first must not shadow a host's own restricted route:
/// the most specific host wins, wherever it stands in the file.
fn a_hosts_restricted_route_beats_a_catch_all_listed_first(lane: Lane) {
    let routes = route("/", "") + &host_route(HOST, "/", "allow = { groups = [\"admins\"] }");
    let gate = Gate::start(lane, &routes);
    gate.run(&gate.other(), &[("/zz", FORBIDDEN), ("/", FORBIDDEN)]);
    gate.run(&gate.admin(), &[("/zz", passes("/zz"))]);
    // Another host still takes the catch-all.
    let elsewhere = Who::new(
        "noel, another host",
        &[&gate.other, "Accept: text/html", "Host: other.test"],
    );
    if lane != Lane::H2 {
        gate.run(&elsewhere, &[("/zz", passes("/zz"))]);
    }
}

/// `path_prefix = "/admin/"` protects `/admin` too: many apps serve both.
fn a_prefix_with_a_trailing_slash_covers_the_bare_path(lane: Lane) {
    let routes = route("/", "") + &route("/admin/", "allow = { groups = [\"admins\"] }");
    let gate = Gate::start(lane, &routes);
    let other = [
        ("/admin", FORBIDDEN),
        ("/admin/", FORBIDDEN),
        ("/admin/x", FORBIDDEN),
        ("/administrator", passes("/administrator")),
    ];
    gate.run(&gate.other(), &other);
    gate.run(&gate.admin(), &[("/admin", passes("/admin"))]);
}

/// IIS strips trailing dots and spaces from segments and (old versions)
/// reads overlong UTF-8: on a host with a case-insensitive route, such
/// paths are refused, whichever route they would take.
fn paths_an_iis_upstream_reads_as_another_are_refused_on_its_host(lane: Lane) {
    let routes = route("/", "case_insensitive = true")
        + &route(
            "/admin",
            "allow = { groups = [\"admins\"] }\ncase_insensitive = true",
        );
    let gate = Gate::start(lane, &routes);
    let other = [
        ("/admin./secret", REFUSED),
        ("/ADMIN../secret", REFUSED),
        ("/admin%20/secret", REFUSED),
        ("/admin%2e/secret", REFUSED),
        ("/%C0%AFadmin/secret", REFUSED),
        ("/x/%c0%ae%c0%ae/admin", REFUSED),
        ("/admin/secret.", REFUSED),
        ("/ADMIN/secret", FORBIDDEN),
        ("/a.b/c", passes("/a.b/c")),
        ("/caf%C3%A9", passes("/caf%C3%A9")),
    ];
    gate.run(&gate.other(), &other);
}

/// HTTP/1.1 names its host once, as a host with an optional port (RFC 9112
/// §3.2); anything else is refused before it can route. A target in
/// absolute form names the host itself, and that host decides.
fn requests_without_exactly_one_valid_host_are_refused(lane: Lane) {
    if lane == Lane::H2 {
        // `:authority` is one field, checked by the h2 layer.
        return;
    }
    let routes =
        route("/", "") + &host_route("admin.test", "/", "allow = { groups = [\"admins\"] }");
    let gate = Gate::start(lane, &routes);
    let cookie = &gate.other;
    let heads = [
        format!("GET /x HTTP/1.1\r\n{cookie}\r\n\r\n"),
        format!("GET /x HTTP/1.1\r\nHost: {HOST}\r\nHost: admin.test\r\n{cookie}\r\n\r\n"),
        format!("GET /x HTTP/1.1\r\nHost: {HOST}:abc\r\n{cookie}\r\n\r\n"),
        format!("GET /x HTTP/1.1\r\nHost: {HOST}:99999\r\n{cookie}\r\n\r\n"),
        format!("GET /x HTTP/1.1\r\nHost: u@{HOST}\r\n{cookie}\r\n\r\n"),
        format!("GET /x HTTP/1.1\r\nHost: \r\n{cookie}\r\n\r\n"),
    ];
    for head in &heads {
        let mut client = Client::connect(gate.gate.addr);
        client.send(head);
        let response = client.response("GET");
        assert_eq!(
            response.status,
            400,
            "{lane:?} lane: {head:?}: {}",
            response.text()
        );
    }
    assert!(
        gate.upstream.seen().is_empty(),
        "{:?}",
        gate.upstream.seen()
    );
    // Absolute form: `admin.test` decides, not the `Host` beside it.
    let mut client = Client::connect(gate.gate.addr);
    client.send(format!(
        "GET http://admin.test/x HTTP/1.1\r\nHost: {HOST}\r\n{cookie}\r\n\r\n"
    ));
    let response = client.response("GET");
    assert_eq!(response.status, 403, "{lane:?} lane: {}", response.text());
    assert!(
        gate.upstream.seen().is_empty(),
        "{:?}",
        gate.upstream.seen()
    );
}
