//! The upstream request's header section, written once for both lanes:
//! generic over the two ways a request's fields are held (hyper's
//! `HeaderMap` on the general path, `httparse` fields on the fast lane) and
//! the two ways the result is written (a new `HeaderMap`, or bytes).
//!
//! What goes: hop-by-hop fields and those `Connection` names; every
//! identity-header family in every spelling; what a client says about its
//! own address or scheme unless a trusted proxy said it; any field that
//! would make the app serve another path than the one decided on; flowgate's
//! own cookies. What comes: `Host`, `X-Forwarded-*`, `Forwarded` (extended
//! from a trusted proxy, replaced otherwise), `X-Real-IP`, the identity.

use std::io::Write as _;
use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue, COOKIE, FORWARDED, HOST};

use crate::identity::{HeaderSet, Identity};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
pub(crate) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Identity header families of every preset flowgate knows, of its peers
/// (authentik, oauth2-proxy, Authelia) and of the auth-proxy modes of apps
/// people put behind them (Grafana's `X-WEBAUTH-USER`, the `X-Remote-User`
/// of many others): a client may send any of them, in any case and with `_`
/// for `-`, hoping the upstream believes it.
const IDENTITY_PREFIXES: [&str; 3] = ["x-authentik-", "x-auth-request-", "x-webauth-"];
const IDENTITY_NAMES: [&str; 19] = [
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-forwarded-access-token",
    "remote-user",
    "remote-groups",
    "remote-email",
    "remote-name",
    "x-remote-user",
    "x-remote-email",
    "x-remote-groups",
    "x-remote-name",
    "x-authenticated-user",
    "x-authenticated-email",
    "x-authenticated-groups",
    "x-auth-user",
    "x-user",
    "x-email",
];

/// What apps and frameworks believe about the client's address, scheme or
/// port. Passed on only from a trusted proxy.
const CLIENT_CLAIMS: [&str; 22] = [
    "x-real-ip",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-server",
    "x-forwarded-prefix",
    "x-forwarded",
    "forwarded-for",
    "x-original-forwarded-for",
    "x-scheme",
    "x-url-scheme",
    "front-end-https",
    "true-client-ip",
    "x-client-ip",
    "client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-originating-ip",
    "x-remote-ip",
];

/// Fields that tell an app to serve another path than the request line's
/// (IIS URL Rewrite, Symfony, Zend, nginx auth setups). The gate decided on
/// the request line, so these never pass, whoever sent them.
const TARGET_OVERRIDES: [&str; 7] = [
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-envoy-original-path",
    "x-http-destinationurl",
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// One field of a request as it came, in either lane's form, borrowed
/// from the request for `'h`.
pub(crate) trait Field<'h>: Copy {
    fn name(self) -> &'h str;
    fn value(self) -> &'h [u8];
}

impl<'h, 'b: 'h> Field<'h> for &'h httparse::Header<'b> {
    fn name(self) -> &'h str {
        self.name
    }
    fn value(self) -> &'h [u8] {
        self.value
    }
}

impl<'h> Field<'h> for (&'h HeaderName, &'h HeaderValue) {
    fn name(self) -> &'h str {
        self.0.as_str()
    }
    fn value(self) -> &'h [u8] {
        self.1.as_bytes()
    }
}

/// Where the rewritten fields go.
pub(crate) trait Sink<F> {
    /// A field of the client's, passed on as it came.
    fn keep(&mut self, field: &F);
    /// A field flowgate writes, its value written by `value`. Left out
    /// when `value` writes nothing.
    fn put(&mut self, name: &HeaderName, value: impl FnOnce(&mut Vec<u8>));
    /// An identity value, made once per identity and shared.
    fn put_value(&mut self, name: &HeaderName, value: &HeaderValue);
}

/// The general path's sink: a new `HeaderMap`, values shared where they can be.
impl<'h> Sink<(&'h HeaderName, &'h HeaderValue)> for http::HeaderMap {
    fn keep(&mut self, field: &(&'h HeaderName, &'h HeaderValue)) {
        self.append(field.0.clone(), field.1.clone());
    }

    fn put(&mut self, name: &HeaderName, value: impl FnOnce(&mut Vec<u8>)) {
        let mut bytes = Vec::with_capacity(64);
        value(&mut bytes);
        if bytes.is_empty() {
            return;
        }
        if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(bytes)) {
            self.append(name.clone(), value);
        }
    }

    fn put_value(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.append(name.clone(), value.clone());
    }
}

/// The fast lane's sink: `name: value\r\n` lines, appended to the head.
impl<'h, 'b> Sink<&'h httparse::Header<'b>> for Vec<u8> {
    fn keep(&mut self, field: &&'h httparse::Header<'b>) {
        line(self, field.name.as_bytes(), field.value);
    }

    fn put(&mut self, name: &HeaderName, value: impl FnOnce(&mut Vec<u8>)) {
        let start = self.len();
        self.extend_from_slice(name.as_str().as_bytes());
        self.extend_from_slice(b": ");
        let empty = self.len();
        value(self);
        if self.len() == empty {
            self.truncate(start);
        } else {
            self.extend_from_slice(b"\r\n");
        }
    }

    fn put_value(&mut self, name: &HeaderName, value: &HeaderValue) {
        line(self, name.as_str().as_bytes(), value.as_bytes());
    }
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Who is asking, for the fields flowgate writes.
#[derive(Clone, Copy)]
pub(crate) struct Outgoing<'a> {
    pub peer: IpAddr,
    /// `peer`, formatted (once per connection on the fast lane).
    pub peer_text: &'a str,
    pub trusted: bool,
    pub https: bool,
    /// The client: `peer`, or who a trusted proxy says it forwards for.
    pub client_ip: IpAddr,
    /// The client's `Host`, for `X-Forwarded-Host` and `Forwarded`.
    pub authority: &'a str,
    /// The `Host` the upstream gets.
    pub host: &'a str,
    /// flowgate's session cookie (its `_csrf` and `_memo` companions go too).
    pub cookie_name: &'a str,
    /// The signed-in user, if the request goes with one.
    pub identity: Option<&'a Identity>,
    /// The route's identity headers: written for `identity`, and (a custom
    /// set's names) stripped from the client's fields like every other
    /// identity header.
    pub identity_headers: &'a HeaderSet,
}

/// What a request's fields say about themselves, read in one pass.
#[derive(Default)]
struct Survey<'h> {
    /// `Connection` names a field other than the usual tokens.
    names_fields: bool,
    /// A `Cookie` field holds flowgate's cookie name.
    ours: bool,
    /// The first value of each forwarding field (from a trusted proxy).
    forwarded_for: Option<&'h [u8]>,
    forwarded: Option<&'h [u8]>,
    proto: bool,
    host: bool,
    real_ip: bool,
}

/// Write the upstream request's fields into `sink`; `fields` walks the
/// request's own (it is walked more than once).
pub(crate) fn rewrite<'h, F, I, S>(fields: impl Fn() -> I, out: &Outgoing<'_>, sink: &mut S)
where
    F: Field<'h>,
    I: Iterator<Item = F>,
    S: Sink<F>,
{
    let mut survey = Survey::default();
    for field in fields() {
        let name = field.name();
        if name.eq_ignore_ascii_case("connection") {
            survey.names_fields |= tokens(field.value()).any(|t| {
                !["keep-alive", "close", "upgrade"]
                    .iter()
                    .any(|k| t.eq_ignore_ascii_case(k.as_bytes()))
            });
        } else if name.eq_ignore_ascii_case("cookie") {
            survey.ours |= contains(field.value(), out.cookie_name.as_bytes());
        } else if out.trusted {
            // The first value, as `HeaderMap::get` has it.
            if name.eq_ignore_ascii_case("x-forwarded-for") {
                survey.forwarded_for.get_or_insert(field.value());
            } else if name.eq_ignore_ascii_case("forwarded") {
                survey.forwarded.get_or_insert(field.value());
            } else if name.eq_ignore_ascii_case("x-forwarded-proto") {
                survey.proto = true;
            } else if name.eq_ignore_ascii_case("x-forwarded-host") {
                survey.host = true;
            } else if name.eq_ignore_ascii_case("x-real-ip") {
                survey.real_ip = true;
            }
        }
    }

    sink.put(&HOST, |v| v.extend_from_slice(out.host.as_bytes()));
    let own_names = out.identity_headers.own_names();
    for field in fields() {
        let name = field.name();
        // A field `Connection` names may start with any letter.
        let dropped = (survey.names_fields || may_drop(name))
            && (is_hop_by_hop(name)
                || ["host", "x-forwarded-for", "forwarded"]
                    .iter()
                    .any(|n| same_name(name, n))
                || is_identity_header(name)
                || TARGET_OVERRIDES.iter().any(|n| same_name(name, n))
                || (!out.trusted && CLIENT_CLAIMS.iter().any(|n| same_name(name, n)))
                || (survey.ours && name.eq_ignore_ascii_case("cookie"))
                || (survey.names_fields && listed(fields(), name)))
            || own_names
                .iter()
                .any(|(own, _)| same_name(name, own.as_str()));
        if !dropped {
            sink.keep(&field);
        }
    }
    if survey.ours {
        sink.put(&COOKIE, |v| other_cookies(v, fields(), out.cookie_name));
    }
    sink.put(&X_FORWARDED_FOR, |v| {
        if let Some(earlier) = survey.forwarded_for.filter(|e| visible(e)) {
            v.extend_from_slice(earlier);
            v.extend_from_slice(b", ");
        }
        v.extend_from_slice(out.peer_text.as_bytes());
    });
    sink.put(&FORWARDED, |v| {
        if let Some(earlier) = survey.forwarded.filter(|e| visible(e)) {
            v.extend_from_slice(earlier);
            v.extend_from_slice(b", ");
        }
        forwarded_element(
            v,
            out.peer_text,
            out.peer.is_ipv6(),
            out.https,
            out.authority,
        );
    });
    let proto = if out.https { "https" } else { "http" };
    if !survey.proto {
        sink.put(&X_FORWARDED_PROTO, |v| {
            v.extend_from_slice(proto.as_bytes())
        });
    }
    if !survey.host {
        sink.put(&X_FORWARDED_HOST, |v| {
            v.extend_from_slice(out.authority.as_bytes())
        });
    }
    if !survey.real_ip {
        sink.put(&X_REAL_IP, |v| match out.client_ip == out.peer {
            true => v.extend_from_slice(out.peer_text.as_bytes()),
            false => {
                let _ = write!(v, "{}", out.client_ip);
            }
        });
    }
    if let Some(identity) = out.identity {
        let values = identity.values();
        for (name, field) in out.identity_headers.fields() {
            if let Some(value) = field.of(values) {
                sink.put_value(name, value);
            }
        }
    }
}

/// One `Forwarded` element (RFC 7239): `for=` the peer (an IPv6 address
/// quoted in brackets), `proto=`, and `host=` quoted, without any `"` of
/// its own.
fn forwarded_element(out: &mut Vec<u8>, peer: &str, ipv6: bool, https: bool, authority: &str) {
    if ipv6 {
        out.extend_from_slice(b"for=\"[");
        out.extend_from_slice(peer.as_bytes());
        out.extend_from_slice(b"]\"");
    } else {
        out.extend_from_slice(b"for=");
        out.extend_from_slice(peer.as_bytes());
    }
    out.extend_from_slice(if https {
        b";proto=https"
    } else {
        b";proto=http"
    });
    out.extend_from_slice(b";host=\"");
    out.extend(authority.bytes().filter(|&b| b != b'"'));
    out.push(b'"');
}

/// Every cookie but flowgate's own (the session's, and its `_csrf` and
/// `_memo` companions), joined with `; `.
fn other_cookies<'h, F: Field<'h>>(out: &mut Vec<u8>, fields: impl Iterator<Item = F>, name: &str) {
    let name = name.as_bytes();
    let start = out.len();
    for field in fields {
        if !field.name().eq_ignore_ascii_case("cookie") {
            continue;
        }
        for pair in field.value().split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            if pair.is_empty() {
                continue;
            }
            let key = pair
                .iter()
                .position(|&b| b == b'=')
                .map_or(pair, |at| pair[..at].trim_ascii());
            if matches!(key.strip_prefix(name), Some(b"" | b"_csrf" | b"_memo")) {
                continue;
            }
            if out.len() > start {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(pair);
        }
    }
}

/// Whether one of the lists above could drop a field named `name`, by its
/// first letter: most fields (`accept`, `sec-fetch-*`…) are kept without a
/// walk through every list.
fn may_drop(name: &str) -> bool {
    static FIRST: std::sync::LazyLock<[bool; 256]> = std::sync::LazyLock::new(|| {
        let mut first = [false; 256];
        let lists: [&[&str]; 5] = [
            &HOP_BY_HOP,
            &IDENTITY_NAMES,
            &IDENTITY_PREFIXES,
            &CLIENT_CLAIMS,
            &TARGET_OVERRIDES,
        ];
        for name in lists.iter().flat_map(|list| list.iter()).chain(&[
            "host",
            "x-forwarded-for",
            "forwarded",
            "cookie",
            "connection",
        ]) {
            let b = name.as_bytes()[0];
            first[b as usize] = true;
            first[b.to_ascii_uppercase() as usize] = true;
        }
        first
    });
    name.as_bytes().first().is_some_and(|&b| FIRST[b as usize])
}

/// Whether `name` stays on its connection (either way).
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|known| known.eq_ignore_ascii_case(name))
}

/// Whether a `Connection` field of `fields` names `name`.
pub(crate) fn listed<'h, F: Field<'h>>(fields: impl Iterator<Item = F>, name: &str) -> bool {
    fields
        .filter(|f| f.name().eq_ignore_ascii_case("connection"))
        .any(|f| tokens(f.value()).any(|t| t.eq_ignore_ascii_case(name.as_bytes())))
}

/// The comma-separated tokens of a field value, trimmed.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// ASCII case-insensitive, `_` equal to `-` (CGI-style servers read both
/// the same), without allocating.
fn same_name(name: &str, known: &str) -> bool {
    name.len() == known.len() && prefixed(name, known)
}

fn prefixed(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name
            .bytes()
            .zip(prefix.bytes())
            .all(|(a, b)| a.to_ascii_lowercase() == b || (a == b'_' && b == b'-'))
}

/// Whether `name` is one of the identity headers, in any spelling.
pub(crate) fn is_identity_header(name: &str) -> bool {
    IDENTITY_NAMES.iter().any(|n| same_name(name, n))
        || IDENTITY_PREFIXES.iter().any(|p| prefixed(name, p))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Visible ASCII, space and tab: what `HeaderValue::to_str` accepts.
fn visible(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) || b == b'\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"GET / HTTP/1.1\r\n\
        Host: app.test\r\n\
        Cookie: a=1; flowgate_session=sid.mac\r\n\
        Cookie: flowgate_session_csrf=t; b=2\r\n\
        X-Forwarded-User: mallory\r\n\
        X_Authentik_Groups: admins\r\n\
        Remote-User: mallory\r\n\
        X-Real-IP: 6.6.6.6\r\n\
        True-Client-IP: 6.6.6.6\r\n\
        X_Client_IP: 6.6.6.6\r\n\
        X-Original-URL: /admin\r\n\
        X-Rewrite-Url: /admin\r\n\
        X-Forwarded-Uri: /admin\r\n\
        X-Forwarded-Prefix: /evil\r\n\
        X-Forwarded-For: 10.9.9.9\r\n\
        X_Forwarded_For: 6.6.6.6\r\n\
        X-Forwarded-Proto: https\r\n\
        X-Forwarded-Host: trusted.example\r\n\
        Forwarded: for=10.9.9.9\r\n\
        Connection: keep-alive, X-Hop, Accept-Language\r\n\
        X-Hop: 1\r\n\
        Accept-Language: en\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: trailers\r\n\
        Accept: text/html\r\n\
        X-App: kept\r\n\r\n";

    fn identity() -> Identity {
        Identity {
            username: "alice".into(),
            name: "Alice".into(),
            email: "alice@example.test".into(),
            groups: vec!["staff".into(), "ops".into()],
            uid: "u1".into(),
            pk: 1,
            is_superuser: false,
            header_values: Default::default(),
        }
    }

    /// Both lanes' sinks, fed the same head: the same fields, in the same order.
    fn both(out: &Outgoing<'_>) -> Vec<(String, String)> {
        let mut storage = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut storage);
        request.parse(HEAD).unwrap();
        let mut raw = Vec::new();
        rewrite(|| request.headers.iter(), out, &mut raw);
        let text = String::from_utf8(raw).unwrap();
        let from_raw: Vec<(String, String)> = text
            .split("\r\n")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(": ").unwrap();
                (n.to_ascii_lowercase(), v.to_owned())
            })
            .collect();
        let mut map = http::HeaderMap::new();
        for h in request.headers.iter() {
            map.append(
                HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(h.value).unwrap(),
            );
        }
        let mut rewritten = http::HeaderMap::new();
        rewrite(|| map.iter(), out, &mut rewritten);
        let from_map: Vec<(String, String)> = rewritten
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
            .collect();
        // A HeaderMap groups a name's values; compare as sorted lists.
        let mut a = from_raw.clone();
        let mut b = from_map;
        a.sort();
        b.sort();
        assert_eq!(a, b, "the two lanes differ");
        from_raw
    }

    fn get<'a>(fields: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn an_untrusted_client_says_nothing_about_itself() {
        let alice = identity();
        let out = Outgoing {
            peer: "192.0.2.7".parse().unwrap(),
            peer_text: "192.0.2.7",
            trusted: false,
            https: false,
            client_ip: "192.0.2.7".parse().unwrap(),
            authority: "app.test",
            host: "127.0.0.1:3000",
            cookie_name: "flowgate_session",
            identity: Some(&alice),
            identity_headers: &HeaderSet::default(),
        };
        let fields = both(&out);
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "host",
                "accept",
                "x-app",
                "cookie",
                "x-forwarded-for",
                "forwarded",
                "x-forwarded-proto",
                "x-forwarded-host",
                "x-real-ip",
                "x-forwarded-user",
                "x-forwarded-email",
                "x-forwarded-groups",
                "x-forwarded-preferred-username",
            ]
        );
        assert_eq!(get(&fields, "host"), ["127.0.0.1:3000"]);
        assert_eq!(get(&fields, "cookie"), ["a=1; b=2"]);
        assert_eq!(get(&fields, "x-forwarded-for"), ["192.0.2.7"]);
        assert_eq!(
            get(&fields, "forwarded"),
            ["for=192.0.2.7;proto=http;host=\"app.test\""]
        );
        assert_eq!(get(&fields, "x-forwarded-proto"), ["http"]);
        assert_eq!(get(&fields, "x-forwarded-host"), ["app.test"]);
        assert_eq!(get(&fields, "x-real-ip"), ["192.0.2.7"]);
        assert_eq!(get(&fields, "x-forwarded-user"), ["alice"]);
        assert_eq!(get(&fields, "x-forwarded-groups"), ["staff,ops"]);
    }

    #[test]
    fn a_trusted_proxy_keeps_its_claims_but_not_target_overrides() {
        let out = Outgoing {
            peer: "127.0.0.1".parse().unwrap(),
            peer_text: "127.0.0.1",
            trusted: true,
            https: true,
            client_ip: "10.9.9.9".parse().unwrap(),
            authority: "app.test",
            host: "app.test",
            cookie_name: "flowgate_session",
            identity: None,
            identity_headers: &HeaderSet::default(),
        };
        let fields = both(&out);
        assert_eq!(get(&fields, "x-forwarded-for"), ["10.9.9.9, 127.0.0.1"]);
        assert_eq!(
            get(&fields, "forwarded"),
            ["for=10.9.9.9, for=127.0.0.1;proto=https;host=\"app.test\""]
        );
        assert_eq!(get(&fields, "x-forwarded-proto"), ["https"]);
        assert_eq!(get(&fields, "x-forwarded-host"), ["trusted.example"]);
        assert_eq!(get(&fields, "x-real-ip"), ["6.6.6.6"]);
        assert_eq!(get(&fields, "true-client-ip"), ["6.6.6.6"]);
        assert_eq!(get(&fields, "x-forwarded-prefix"), ["/evil"]);
        for gone in [
            "x-original-url",
            "x-rewrite-url",
            "x-forwarded-uri",
            "x-forwarded-user",
            "x_authentik_groups",
            "remote-user",
            "x-hop",
            "accept-language",
            "te",
            "keep-alive",
            "connection",
        ] {
            assert!(get(&fields, gone).is_empty(), "{gone}");
        }
    }

    #[test]
    fn identity_headers_are_recognised_in_every_spelling() {
        for name in [
            "x-forwarded-user",
            "X_Forwarded_User",
            "x-authentik-username",
            "x_authentik_groups",
            "X-Auth-Request-Email",
            "remote-user",
            "Remote_Groups",
            "X-WEBAUTH-USER",
            "x_remote_user",
            "X-Forwarded-Access-Token",
        ] {
            assert!(is_identity_header(name), "{name}");
        }
        for name in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "authorization",
            "cookie",
            "x-request-id",
        ] {
            assert!(!is_identity_header(name), "{name}");
        }
    }

    #[test]
    fn cookies_other_than_flowgates_are_kept_in_one_field() {
        let mut storage = [httparse::EMPTY_HEADER; 4];
        let mut request = httparse::Request::new(&mut storage);
        let head =
            b"GET / HTTP/1.1\r\nCookie: a=1; fg=xyz\r\nCookie: fg_csrf=t; b=2; fg_memo=m; fgx=3\r\n\r\n";
        request.parse(head).unwrap();
        let mut out = Vec::new();
        other_cookies(&mut out, request.headers.iter(), "fg");
        assert_eq!(out, b"a=1; b=2; fgx=3");
        let mut storage = [httparse::EMPTY_HEADER; 4];
        let mut request = httparse::Request::new(&mut storage);
        request
            .parse(b"GET / HTTP/1.1\r\nCookie: fg=xyz\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        other_cookies(&mut out, request.headers.iter(), "fg");
        assert!(out.is_empty());
    }
}
