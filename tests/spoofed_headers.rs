//! What a client says about its own address, scheme or port, and what it
//! says about which path it "really" asked for, through the real binary on
//! every request path: the HTTP/1.1 fast lane, the general path on hyper,
//! and h2c (always the general path). The behaviour under test is the one
//! upstream-request rewrite of `src/proxy/headers.rs`, its lists
//! `CLIENT_CLAIMS` and `TARGET_OVERRIDES`:
//!
//! * from an untrusted peer, every client claim is removed, in any case and
//!   with `_` for `-`, and flowgate writes `X-Real-IP`, `X-Forwarded-For`,
//!   `Forwarded`, `X-Forwarded-Proto` and `X-Forwarded-Host` itself;
//! * from a trusted proxy, the claims pass as sent, `X-Real-IP` is kept or
//!   else is the client behind the proxy, and `X-Forwarded-For` and
//!   `Forwarded` are extended;
//! * target overrides (`X-Original-URL` and kin) are removed from everyone:
//!   the gate decided on the request line, and the upstream serves that.
//!
//! Each request carries one spelling of every name (lower, Mixed-Case,
//! UPPER, under_score, Mixed_Under); the scripted upstream records what
//! reached it. HTTP/2 sends names lower-cased, so there the Mixed and UPPER
//! spellings arrive as the lower one (and underscores stay: `_` is a legal
//! token character, and neither httparse, hyper nor h2 refuses it).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::h2::*;
use common::raw::*;
use common::*;

/// The client's claims about its address, scheme or port (lower-case).
const CLIENT_CLAIMS: [&str; 22] = [
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-forwarded",
    "forwarded-for",
    "x-original-forwarded-for",
    "x-forwarded-port",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-server",
    "x-forwarded-prefix",
    "x-scheme",
    "x-url-scheme",
    "front-end-https",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// The two forwarding fields flowgate extends or replaces, never keeps.
const FORWARDING: [&str; 2] = ["x-forwarded-for", "forwarded"];

/// Fields asking the app to serve another path than the request line's.
const TARGET_OVERRIDES: [&str; 7] = [
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-envoy-original-path",
    "x-http-destinationurl",
];

/// What flowgate writes itself, under these exact (lower-case) names.
const WRITTEN: [&str; 5] = [
    "x-real-ip",
    "x-forwarded-for",
    "forwarded",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// The value of every spoofed address or scheme claim.
const SPOOFED_IP: &str = "6.6.6.6";
/// The value of every spoofed target override.
const SPOOFED_PATH: &str = "/admin";

/// The client a trusted proxy speaks for, in its `X-Forwarded-For`.
const BEHIND: &str = "198.51.100.9";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    Lower,
    Mixed,
    Upper,
    Under,
    MixedUnder,
}

const SPELLINGS: [Spelling; 5] = [
    Spelling::Lower,
    Spelling::Mixed,
    Spelling::Upper,
    Spelling::Under,
    Spelling::MixedUnder,
];

impl Spelling {
    /// `name` (lower-case, with `-`) in this spelling.
    fn of(self, name: &str) -> String {
        let title = |separator: &str| {
            name.split('-')
                .map(|word| {
                    let mut chars = word.chars();
                    chars.next().map_or(String::new(), |first| {
                        first.to_ascii_uppercase().to_string() + chars.as_str()
                    })
                })
                .collect::<Vec<_>>()
                .join(separator)
        };
        match self {
            Spelling::Lower => name.to_owned(),
            Spelling::Mixed => title("-"),
            Spelling::Upper => name.to_ascii_uppercase(),
            Spelling::Under => name.replace('-', "_"),
            Spelling::MixedUnder => title("_"),
        }
    }

    fn underscored(self) -> bool {
        matches!(self, Spelling::Under | Spelling::MixedUnder)
    }

    /// This spelling with `-` where it has `_`.
    fn hyphenated(self) -> Spelling {
        match self {
            Spelling::Under => Spelling::Lower,
            Spelling::MixedUnder => Spelling::Mixed,
            other => other,
        }
    }
}

/// A name as CGI-style servers read it: lower-case, `_` for `-`.
fn normal(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

/// How a request reaches flowgate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// HTTP/1.1 with `server.fast_lane = true` (the default).
    FastLane,
    /// HTTP/1.1 with `server.fast_lane = false`: hyper.
    GeneralPath,
    /// HTTP/2 with prior knowledge (with the fast lane off: h2 is always
    /// the general path).
    H2c,
}

macro_rules! on_every_path {
    ($($case:ident),* $(,)?) => {
        mod fast_lane {
            $(#[test]
            fn $case() {
                super::$case(super::Via::FastLane)
            })*
        }
        mod general_path {
            $(#[test]
            fn $case() {
                super::$case(super::Via::GeneralPath)
            })*
        }
        mod h2c {
            $(#[test]
            fn $case() {
                super::$case(super::Via::H2c)
            })*
        }
    };
}

on_every_path!(
    an_untrusted_peers_address_scheme_and_target_claims_never_reach_the_upstream,
    a_trusted_proxys_claims_pass_unchanged_but_its_target_overrides_do_not,
    a_trusted_proxy_without_x_real_ip_gets_the_client_behind_it,
    an_x_original_url_for_a_refused_route_is_served_as_the_request_line_says,
    an_untrusted_x_forwarded_for_spelled_with_underscores_never_reaches_the_upstream,
    identity_claims_of_every_family_never_reach_the_upstream_even_from_a_trusted_proxy,
);

/// A scripted upstream that answers everything, behind a flowgate on
/// `via`'s lane, trusting loopback as a proxy or not. Besides the catch-all
/// route (with `skip_auth = ["^/public(/|$)"]`), `/admin` is a route only
/// the user `root` may use: alice, signed in, is refused there.
fn rig(via: Via, trusted: bool) -> Rig {
    let upstream = Scripted::start(|_| Reply::keep(ok("seen")));
    let admin = format!(
        "[[route]]\nhost = \"*\"\npath_prefix = \"/admin\"\nupstream = \"{}\"\nflow = \"{FLOW}\"\nallow = {{ users = [\"root\"] }}\n",
        upstream.url()
    );
    let mut server = format!(
        "listen = \"127.0.0.1:0\"\nfast_lane = {}\n",
        via == Via::FastLane
    );
    if trusted {
        server.push_str("trusted_proxies = [\"127.0.0.1/32\"]\n");
    }
    let config =
        basic_config(&upstream.url(), &admin).replace("listen = \"127.0.0.1:0\"\n", &server);
    Rig::with(upstream, &config)
}

/// Send one GET for `target` (on a new connection) with `headers`, as alice
/// or anonymously; its status, and the response head for messages.
fn send(rig: &Rig, via: Via, target: &str, signed_in: bool, headers: &[String]) -> (u16, String) {
    let cookie = rig.cookie_header();
    let mut lines: Vec<&str> = Vec::new();
    if signed_in {
        lines.push(&cookie);
    }
    lines.extend(headers.iter().map(String::as_str));
    match via {
        Via::H2c => match h2c_send_blocking(rig.gate.addr, "GET", target, &lines, b"") {
            Ok(response) => (response.status, format!("{:?}", response.headers)),
            Err(e) => panic!("h2c GET {target}: {e}"),
        },
        Via::FastLane | Via::GeneralPath => {
            let mut client = rig.client();
            client.send(request("GET", target, &lines));
            let response = client.response("GET");
            (response.status, response.head)
        }
    }
}

/// Send one request that should reach the upstream; what it recorded.
fn forward(rig: &Rig, via: Via, target: &str, signed_in: bool, headers: &[String]) -> Seen {
    let before = rig.upstream.seen().len();
    let (status, head) = send(rig, via, target, signed_in, headers);
    assert_eq!(status, 200, "GET {target} via {via:?}: {head}");
    let seen = rig.upstream.seen();
    assert_eq!(seen.len(), before + 1, "GET {target} via {via:?}: {seen:?}");
    let request = seen.last().unwrap().clone();
    // The upstream serves what the request line asked for, nothing else.
    assert_eq!(request.target(), target, "{}", request.head);
    request
}

/// `names` in `spelling`, each with `value`, as header lines.
fn spelled(names: &[&str], spelling: Spelling, value: &str) -> Vec<String> {
    names
        .iter()
        .map(|name| format!("{}: {value}", spelling.of(name)))
        .collect()
}

/// Every (lower-case name, value) the upstream got.
fn recorded(request: &Seen) -> Fields {
    fields(&request.head)
}

/// No recorded header of `request` holds `needle` in its value.
fn assert_no_value_holds(request: &Seen, needle: &str, context: &str) {
    for (name, value) in recorded(request) {
        assert!(
            !value.contains(needle),
            "{context}: {name}: {value} reached the upstream:\n{}",
            request.head
        );
    }
}

/// No target override reached the upstream, in any spelling, nor any value
/// of one.
fn assert_no_target_override(request: &Seen, context: &str) {
    for name in request.names() {
        assert!(
            !TARGET_OVERRIDES.contains(&normal(&name).as_str()),
            "{context}: {name} reached the upstream:\n{}",
            request.head
        );
    }
    assert_no_value_holds(request, SPOOFED_PATH, context);
}

/// The `Forwarded` element flowgate writes for the loopback peer.
fn own_forwarded() -> String {
    format!("for=127.0.0.1;proto=http;host=\"{HOST}\"")
}

/// `flowgate_fast_lane_requests_total`: requests the fast lane served.
fn fast_lane_served(gate: &Flowgate) -> u64 {
    let mut admin = TcpStream::connect(gate.admin.expect("admin listener")).unwrap();
    admin
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    admin.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("flowgate_fast_lane_requests_total ")?
                .trim()
                .parse()
                .ok()
        })
        .expect("flowgate_fast_lane_requests_total in /metrics")
}

/// The requests of a test went the way `via` says: all of them on the fast
/// lane when it is on, none when it is off.
fn assert_lane(rig: &Rig, via: Via, forwarded: usize) {
    let served = fast_lane_served(&rig.gate);
    match via {
        Via::FastLane => assert_eq!(served, forwarded as u64, "served by the fast lane"),
        Via::GeneralPath | Via::H2c => assert_eq!(served, 0, "the fast lane is off"),
    }
}

/// Signed in on `/spoof`, anonymous on the `skip_auth` path `/public/spoof`:
/// in every spelling, every claim, forwarding field and target override
/// says `6.6.6.6` or `/admin`, and none of it reaches the upstream, which
/// gets flowgate's own forwarding fields only.
fn an_untrusted_peers_address_scheme_and_target_claims_never_reach_the_upstream(via: Via) {
    let rig = rig(via, false);
    let mut forwarded = 0;
    for signed_in in [true, false] {
        let target = match signed_in {
            true => "/spoof?q=1",
            false => "/public/spoof?q=1",
        };
        for spelling in SPELLINGS {
            let context = format!("{via:?}, signed in {signed_in}, {spelling:?}");
            let mut headers = spelled(&CLIENT_CLAIMS, spelling, SPOOFED_IP);
            // `X_Forwarded_For` has a test of its own, below.
            let forwarding = spelling.hyphenated();
            headers.extend(spelled(&["x-forwarded-for"], forwarding, SPOOFED_IP));
            let element = format!("for={SPOOFED_IP}");
            headers.extend(spelled(&["forwarded"], forwarding, &element));
            headers.extend(spelled(&TARGET_OVERRIDES, spelling, SPOOFED_PATH));
            let request = forward(&rig, via, target, signed_in, &headers);
            forwarded += 1;

            assert_no_value_holds(&request, SPOOFED_IP, &context);
            assert_no_target_override(&request, &context);
            // No claim under any name but the five flowgate writes, and
            // those once each, with flowgate's values.
            for name in request.names() {
                let normal = normal(&name);
                if CLIENT_CLAIMS.contains(&normal.as_str()) || FORWARDING.contains(&normal.as_str())
                {
                    assert!(
                        WRITTEN.contains(&name.as_str()),
                        "{context}: {name} reached the upstream:\n{}",
                        request.head
                    );
                }
            }
            assert_eq!(request.all("x-real-ip"), ["127.0.0.1"], "{context}");
            assert_eq!(request.all("x-forwarded-for"), ["127.0.0.1"], "{context}");
            assert_eq!(request.all("forwarded"), [own_forwarded()], "{context}");
            assert_eq!(request.all("x-forwarded-proto"), ["http"], "{context}");
            assert_eq!(request.all("x-forwarded-host"), [HOST], "{context}");
            // Signed in, the identity flowgate vouches for goes along.
            let user: &[&str] = if signed_in { &["alice"] } else { &[] };
            assert_eq!(request.all("x-forwarded-user"), user, "{context}");
        }
    }
    assert_lane(&rig, via, forwarded);
}

/// Behind a trusted proxy, signed in and anonymous: each claim arrives as
/// sent, in its own spelling; `X-Forwarded-For` and `Forwarded` are
/// extended; the target overrides are gone all the same. `X-Real-IP` is the
/// proxy's where it sent one under that name; where it sent only
/// `X_Real_IP` (or the like), flowgate adds its own: the client behind the
/// proxy.
fn a_trusted_proxys_claims_pass_unchanged_but_its_target_overrides_do_not(via: Via) {
    let rig = rig(via, true);
    let mut forwarded = 0;
    for signed_in in [true, false] {
        let target = match signed_in {
            true => "/spoof?q=1",
            false => "/public/spoof?q=1",
        };
        for spelling in SPELLINGS {
            let context = format!("{via:?}, signed in {signed_in}, {spelling:?}");
            let mut headers = spelled(&CLIENT_CLAIMS, spelling, SPOOFED_IP);
            headers.push(format!("X-Forwarded-For: {BEHIND}"));
            headers.push(format!("Forwarded: for={BEHIND}"));
            headers.extend(spelled(&TARGET_OVERRIDES, spelling, SPOOFED_PATH));
            let request = forward(&rig, via, target, signed_in, &headers);
            forwarded += 1;

            assert_no_target_override(&request, &context);
            // Every claim, as sent: over HTTP/1.1 the fast lane keeps the
            // name's case and hyper lower-cases it; `Seen` reads both
            // lower-cased, and `_` stays `_`.
            for claim in CLIENT_CLAIMS {
                let name = spelling.of(claim).to_ascii_lowercase();
                assert_eq!(request.all(&name), [SPOOFED_IP], "{context}: {name}");
                // Under another name than its own, flowgate does not see the
                // proxy's field and writes its own as well.
                let own = match claim {
                    "x-real-ip" => BEHIND,
                    "x-forwarded-proto" => "http",
                    "x-forwarded-host" => HOST,
                    _ => continue,
                };
                if spelling.underscored() {
                    assert_eq!(request.all(claim), [own], "{context}: {claim}");
                }
            }
            assert_eq!(
                request.all("x-forwarded-for"),
                [format!("{BEHIND}, 127.0.0.1")],
                "{context}"
            );
            assert_eq!(
                request.all("forwarded"),
                [format!("for={BEHIND}, {}", own_forwarded())],
                "{context}"
            );
            let user: &[&str] = if signed_in { &["alice"] } else { &[] };
            assert_eq!(request.all("x-forwarded-user"), user, "{context}");
        }
    }
    assert_lane(&rig, via, forwarded);
}

/// A trusted proxy that sends no `X-Real-IP` in any spelling: flowgate's is
/// the client the proxy forwards for, walking `X-Forwarded-For` from the
/// right past trusted hops; the untrusted peer's (not a proxy) is its own
/// address, whatever `X-Forwarded-For` says.
fn a_trusted_proxy_without_x_real_ip_gets_the_client_behind_it(via: Via) {
    let chain = format!("X-Forwarded-For: {BEHIND}, 127.0.0.1");
    let mut headers = vec![chain.clone()];
    headers.extend(spelled(&TARGET_OVERRIDES, Spelling::Mixed, SPOOFED_PATH));

    let trusted = rig(via, true);
    for (signed_in, target) in [(true, "/behind"), (false, "/public/behind")] {
        let context = format!("{via:?}, trusted, signed in {signed_in}");
        let request = forward(&trusted, via, target, signed_in, &headers);
        assert_eq!(request.all("x-real-ip"), [BEHIND], "{context}");
        assert_eq!(
            request.all("x-forwarded-for"),
            [format!("{BEHIND}, 127.0.0.1, 127.0.0.1")],
            "{context}"
        );
        assert_eq!(request.all("x-forwarded-proto"), ["http"], "{context}");
        assert_eq!(request.all("x-forwarded-host"), [HOST], "{context}");
        assert_no_target_override(&request, &context);
    }
    assert_lane(&trusted, via, 2);

    let untrusted = rig(via, false);
    for (signed_in, target) in [(true, "/behind"), (false, "/public/behind")] {
        let context = format!("{via:?}, untrusted, signed in {signed_in}");
        let request = forward(&untrusted, via, target, signed_in, &headers);
        assert_eq!(request.all("x-real-ip"), ["127.0.0.1"], "{context}");
        assert_eq!(request.all("x-forwarded-for"), ["127.0.0.1"], "{context}");
        assert_no_value_holds(&request, BEHIND, &context);
        assert_no_target_override(&request, &context);
    }
    assert_lane(&untrusted, via, 2);
}

/// alice may not use `/admin` (403). Asking for `/` with `X-Original-URL:
/// /admin` (and every other override, in every spelling) gets her `/`: the
/// upstream serves the request line's target, and sees no override that
/// could make it serve `/admin`. From a trusted proxy just the same.
fn an_x_original_url_for_a_refused_route_is_served_as_the_request_line_says(via: Via) {
    for trusted in [false, true] {
        let rig = rig(via, trusted);
        let (status, head) = send(&rig, via, "/admin", true, &[]);
        assert_eq!(status, 403, "{via:?}, trusted {trusted}: {head}");
        assert!(rig.upstream.seen().is_empty(), "{:?}", rig.upstream.seen());

        for spelling in SPELLINGS {
            let context = format!("{via:?}, trusted {trusted}, {spelling:?}");
            let mut headers = vec!["X-Original-URL: /admin".to_owned()];
            headers.extend(spelled(&TARGET_OVERRIDES, spelling, SPOOFED_PATH));
            let request = forward(&rig, via, "/", true, &headers);
            assert_no_target_override(&request, &context);
            assert_eq!(request.all("x-forwarded-user"), ["alice"], "{context}");
        }
        assert_lane(&rig, via, SPELLINGS.len());
    }
}

/// `X_Forwarded_For: 6.6.6.6` from an untrusted peer must not reach the
/// upstream beside flowgate's own `x-forwarded-for`: a CGI-style server
/// reads both as `HTTP_X_FORWARDED_FOR` and may believe it. (It once did:
/// the rewrite dropped this one name by exact spelling.)
fn an_untrusted_x_forwarded_for_spelled_with_underscores_never_reaches_the_upstream(via: Via) {
    let rig = rig(via, false);
    for (signed_in, target) in [(true, "/spoof"), (false, "/public/spoof")] {
        for spelling in [Spelling::Under, Spelling::MixedUnder] {
            let context = format!("{via:?}, signed in {signed_in}, {spelling:?}");
            let headers = spelled(&["x-forwarded-for"], spelling, SPOOFED_IP);
            let request = forward(&rig, via, target, signed_in, &headers);
            assert_no_value_holds(&request, SPOOFED_IP, &context);
            let names = request.names();
            let spellings: Vec<&String> = names
                .iter()
                .filter(|n| normal(n) == "x-forwarded-for")
                .collect();
            assert_eq!(
                spellings,
                ["x-forwarded-for"],
                "{context}:\n{}",
                request.head
            );
            assert_eq!(request.all("x-forwarded-for"), ["127.0.0.1"], "{context}");
        }
    }
}

/// Identity headers of every family flowgate knows (its own, authentik's,
/// oauth2-proxy's, Authelia's, Grafana's auth proxy and the usual
/// `X-Remote-User` kin), in every spelling: never passed on, trusted proxy
/// or not; a signed-in user's identity is flowgate's own.
const IDENTITY_CLAIMS: [&str; 16] = [
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-forwarded-access-token",
    "x-authentik-username",
    "x-auth-request-user",
    "remote-user",
    "remote-groups",
    "x-webauth-user",
    "x-remote-user",
    "x-remote-groups",
    "x-authenticated-user",
    "x-auth-user",
    "x-user",
    "x-email",
];

const SPOOFED_USER: &str = "mallory-the-admin";

fn identity_claims_of_every_family_never_reach_the_upstream_even_from_a_trusted_proxy(via: Via) {
    for trusted in [false, true] {
        let rig = rig(via, trusted);
        let mut forwarded = 0;
        for (signed_in, target) in [(true, "/spoof"), (false, "/public/spoof")] {
            for spelling in SPELLINGS {
                let context =
                    format!("{via:?}, trusted {trusted}, signed in {signed_in}, {spelling:?}");
                let headers = spelled(&IDENTITY_CLAIMS, spelling, SPOOFED_USER);
                let request = forward(&rig, via, target, signed_in, &headers);
                forwarded += 1;
                assert_no_value_holds(&request, SPOOFED_USER, &context);
                let user: &[&str] = if signed_in { &["alice"] } else { &[] };
                assert_eq!(request.all("x-forwarded-user"), user, "{context}");
            }
        }
        assert_lane(&rig, via, forwarded);
    }
}
