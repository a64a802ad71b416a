//! Forwarding to the upstream: rewrite the request (hop-by-hop headers out,
//! spoofable identity headers out, flowgate's cookie out, `X-Forwarded-*`
//! and the identity in), send it on a pooled connection with the body
//! streamed, and stream the answer back. An upstream that cannot be reached
//! is a 502 page; its details stay in the log.
//!
//! An HTTP/1.1 `Upgrade` (websockets) goes out on a connection of its own
//! with `Connection: upgrade` kept; when the upstream answers 101, both
//! sides are joined into a byte tunnel that outlives the request.

use http::header::{HeaderName, HeaderValue, CONNECTION, COOKIE, HOST, UPGRADE};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::config::HeaderPreset;
use crate::router::{Context, Gateway};
use crate::session::{Identity, IdentityValues};
use crate::upstream::{ConnHold, ConnSlot, UpstreamError};
use crate::{empty, Body};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
pub(crate) const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    UPGRADE,
    http::header::PROXY_AUTHORIZATION,
];

/// Identity header families of every preset flowgate knows and of its peers
/// (authentik, oauth2-proxy, Authelia): a client may send any of them, in any
/// case and with `_` for `-`, hoping the upstream believes it.
const IDENTITY_PREFIXES: [&str; 2] = ["x-authentik-", "x-auth-request-"];
const IDENTITY_NAMES: [&str; 8] = [
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "remote-user",
    "remote-groups",
    "remote-email",
    "remote-name",
];

pub async fn forward(
    gateway: &Gateway,
    index: usize,
    mut request: Request<Incoming>,
    context: &Context,
    identity: Option<&Identity>,
    slot: &ConnSlot,
) -> Response<Body> {
    let route = &gateway.config.routes[index];
    // The client's end of a tunnel-to-be; hyper keeps it in the request's
    // extensions, which `into_parts` would leave behind with the parts.
    let upgrade = requested_upgrade(&request).map(|protocol| Upgrade {
        protocol,
        client: hyper::upgrade::on(&mut request),
    });
    let (mut parts, body) = request.into_parts();
    let (Some(target), Some(uri)) = (
        gateway.targets[index].as_ref(),
        upstream_path(&route.upstream, &parts.uri),
    ) else {
        return gateway.page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "The request address could not be forwarded.",
            None,
        );
    };
    strip_hop_by_hop(&mut parts.headers);
    if let Some(upgrade) = &upgrade {
        keep_upgrade(&mut parts.headers, upgrade.protocol.clone());
    }
    strip_identity(&mut parts.headers);
    strip_cookie(&mut parts.headers, &gateway.config.session.cookie_name);
    parts.headers.reserve(10);
    set_forwarded(&mut parts.headers, context, slot);
    if let Some(identity) = identity {
        add_identity(&mut parts.headers, route.headers, identity);
    }
    let host = if route.preserve_host {
        context.authority.as_str()
    } else {
        target.authority.as_str()
    };
    if let Ok(value) = HeaderValue::from_str(host) {
        parts.headers.insert(HOST, value);
    }
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let request = Request::from_parts(parts, body);
    // A connection that may become a tunnel is nobody's to reuse.
    let slot_hold = slot.hold.clone();
    let slot = upgrade.is_none().then_some(slot);
    match gateway.upstreams.send(target, request, slot).await {
        Ok(response) if response.status() == StatusCode::SWITCHING_PROTOCOLS => match upgrade {
            Some(upgrade) => switch(
                response,
                upgrade.client,
                slot_hold,
                gateway.config.proxy.tunnel_idle_timeout,
            ),
            None => {
                gateway.route_metrics[index].upstream_errors.inc();
                tracing::warn!(upstream = %route.upstream, "upstream switched protocols unasked");
                gateway.page(
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway",
                    "The application behind flowgate gave an answer flowgate cannot pass on.",
                    None,
                )
            }
        },
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Either::Left(body))
        }
        Err(error) => {
            gateway.route_metrics[index].upstream_errors.inc();
            tracing::warn!(upstream = %route.upstream, %error, "upstream request failed");
            match error {
                UpstreamError::Timeout => gateway.page(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Gateway timeout",
                    "The application behind flowgate took too long to answer. Try again in a moment.",
                    None,
                ),
                _ => gateway.page(
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway",
                    "The application behind flowgate did not answer. Try again in a moment.",
                    None,
                ),
            }
        }
    }
}

/// A protocol switch the client asked for, and its end of the tunnel.
struct Upgrade {
    protocol: HeaderValue,
    client: OnUpgrade,
}

/// The `Upgrade` protocol of an HTTP/1.1 request that asks to switch
/// (`Connection: upgrade`, RFC 9110 §7.8). HTTP/2 has no such mechanism.
fn requested_upgrade<B>(request: &Request<B>) -> Option<HeaderValue> {
    if request.version() != http::Version::HTTP_11 {
        return None;
    }
    let asks = request
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    request.headers().get(UPGRADE).cloned()
}

/// Put back the two hop-by-hop headers an upgrade needs on the next hop.
fn keep_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

/// The upstream agreed to switch: answer the client 101 with the upstream's
/// headers, and join the two connections once hyper hands them over (the
/// client's only after this 101 is written).
fn switch(
    mut response: Response<Incoming>,
    client: OnUpgrade,
    hold: Option<ConnHold>,
    idle_timeout: std::time::Duration,
) -> Response<Body> {
    let upstream = hyper::upgrade::on(&mut response);
    let protocol = response.headers().get(UPGRADE).cloned();
    let (mut parts, _) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = protocol {
        keep_upgrade(&mut parts.headers, protocol);
    }
    tokio::spawn(tunnel(client, upstream, hold, idle_timeout));
    Response::from_parts(parts, empty())
}

/// Copy bytes both ways until each side has closed its half, or until
/// neither side has sent anything for `idle_timeout`. `_hold` keeps the
/// client connection counted (connection cap, graceful shutdown) while the
/// tunnel lives.
async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    _hold: Option<ConnHold>,
    idle_timeout: std::time::Duration,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%error, "upgrade abandoned before the tunnel opened");
            return;
        }
    };
    let activity = Activity::default();
    let mut client = Watched::new(TokioIo::new(client), &activity);
    let mut upstream = Watched::new(TokioIo::new(upstream), &activity);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
            Ok((to_upstream, to_client)) => {
                tracing::debug!(to_upstream, to_client, "tunnel closed")
            }
            Err(error) => tracing::debug!(%error, "tunnel closed with an error"),
        },
        _ = activity.idle_for(idle_timeout) => {
            tracing::debug!(?idle_timeout, "tunnel closed: idle")
        }
    }
}

/// When a tunnel last carried a byte, either way.
struct Activity {
    since: tokio::time::Instant,
    /// Milliseconds after `since`.
    last: std::sync::atomic::AtomicU64,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity {
            since: tokio::time::Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Activity {
    fn touch(&self) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.last.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `limit`. Wakes up once per `limit`
    /// at most, not per byte.
    async fn idle_for(&self, limit: std::time::Duration) {
        loop {
            let last = self.last.load(std::sync::atomic::Ordering::Relaxed);
            let due = self.since + std::time::Duration::from_millis(last) + limit;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// An upgraded connection that records its reads in an `Activity`.
struct Watched<'a, T> {
    inner: T,
    activity: &'a Activity,
}

impl<'a, T> Watched<'a, T> {
    fn new(inner: T, activity: &'a Activity) -> Watched<'a, T> {
        Watched { inner, activity }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<'_, T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<'_, T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The upstream's base path + the request's path and query, in origin form
/// (what goes on the request line of an HTTP/1.1 connection).
fn upstream_path(upstream: &Uri, request: &Uri) -> Option<Uri> {
    let base = upstream.path().trim_end_matches('/');
    let path_and_query = request.path_and_query().map_or("/", |pq| pq.as_str());
    if base.is_empty() {
        if request.scheme().is_none() && request.authority().is_none() {
            // Already origin-form: reuse it, no parsing or copying.
            return Some(request.clone());
        }
        return path_and_query.parse().ok();
    }
    let mut joined = String::with_capacity(base.len() + path_and_query.len());
    joined.push_str(base);
    joined.push_str(path_and_query);
    joined.parse().ok()
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        // `keep-alive`, `close` and `upgrade` are the usual tokens; the first
        // and last are removed below anyway, `close` names no header.
        let listed: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !["keep-alive", "close", "upgrade"]
                    .iter()
                    .any(|k| t.eq_ignore_ascii_case(k))
            })
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    // Usually there are none: one pass over the names instead of a hashed
    // removal per hop-by-hop name.
    if headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
    }
}

/// Whether `name` is one of the identity headers, compared without
/// allocating: ASCII case-insensitive, `_` equal to `-`.
pub(crate) fn is_identity_header(name: &str) -> bool {
    let name = name.as_bytes();
    let same = |a: &u8, b: &u8| a.to_ascii_lowercase() == *b || (*a == b'_' && *b == b'-');
    let equals = |known: &str| {
        name.len() == known.len() && name.iter().zip(known.as_bytes()).all(|(a, b)| same(a, b))
    };
    let starts = |prefix: &str| {
        name.len() >= prefix.len() && name.iter().zip(prefix.as_bytes()).all(|(a, b)| same(a, b))
    };
    IDENTITY_NAMES.iter().any(|n| equals(n)) || IDENTITY_PREFIXES.iter().any(|p| starts(p))
}

pub(crate) fn strip_identity(headers: &mut HeaderMap) {
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_identity_header(name.as_str()))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
}

/// Remove flowgate's own cookies (the session's, and its `_csrf` companion
/// of the JSON API) from what the upstream sees; other cookies stay.
pub(crate) fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    let ours = |key: &str| key == name || key.strip_prefix(name) == Some("_csrf");
    if !headers.get_all(COOKIE).iter().any(|v| {
        v.as_bytes()
            .windows(name.len())
            .any(|w| w == name.as_bytes())
    }) {
        return;
    }
    // The other cookies, rejoined into one buffer.
    let mut kept = String::new();
    for pair in headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
    {
        if pair.is_empty() || ours(pair.split_once('=').map_or(pair, |(k, _)| k.trim())) {
            continue;
        }
        if !kept.is_empty() {
            kept.push_str("; ");
        }
        kept.push_str(pair);
    }
    headers.remove(COOKIE);
    if !kept.is_empty() {
        if let Some(value) = owned_value(kept) {
            headers.insert(COOKIE, value);
        }
    }
}

/// `X-Forwarded-*` and `Forwarded`: extended when the peer is a trusted
/// proxy, replaced otherwise (a client's own claims are not passed on).
fn set_forwarded(headers: &mut HeaderMap, context: &Context, slot: &ConnSlot) {
    let peer_value = slot.peer_value(context.peer.ip());
    let peer = peer_value.to_str().unwrap_or("unknown");
    let proto = if context.https { "https" } else { "http" };
    let previous = |name: &HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|_| context.trusted)
    };
    let xff = match previous(&X_FORWARDED_FOR) {
        Some(previous) => owned_value(format!("{previous}, {peer}")),
        None => Some(peer_value.clone()),
    };
    let mut forwarded = Vec::with_capacity(64);
    if let Some(previous) = previous(&http::header::FORWARDED) {
        forwarded.extend_from_slice(previous.as_bytes());
        forwarded.extend_from_slice(b", ");
    }
    forwarded_element(
        &mut forwarded,
        peer,
        context.peer.is_ipv6(),
        proto,
        &context.authority,
    );
    let forwarded = HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded)).ok();
    let keep_host = context.trusted && headers.contains_key(X_FORWARDED_HOST);
    let keep_proto = context.trusted && headers.contains_key(X_FORWARDED_PROTO);
    if let Some(xff) = xff {
        headers.insert(X_FORWARDED_FOR, xff);
    }
    if let Some(forwarded) = forwarded {
        headers.insert(http::header::FORWARDED, forwarded);
    }
    if !keep_proto {
        let value = if context.https {
            HeaderValue::from_static("https")
        } else {
            HeaderValue::from_static("http")
        };
        headers.insert(X_FORWARDED_PROTO, value);
    }
    if !keep_host {
        // The client's own Host value, shared rather than copied.
        let value = headers
            .get(HOST)
            .cloned()
            .or_else(|| HeaderValue::from_str(&context.authority).ok());
        if let Some(value) = value {
            headers.insert(X_FORWARDED_HOST, value);
        }
    }
}

/// One `Forwarded` element (RFC 7239): `for=` the peer (an IPv6 address
/// quoted in brackets), `proto=`, and `host=` quoted, without any `"` of
/// its own. Both request paths write it with this.
pub(crate) fn forwarded_element(
    out: &mut Vec<u8>,
    peer: &str,
    ipv6: bool,
    proto: &str,
    authority: &str,
) {
    if ipv6 {
        out.extend_from_slice(b"for=\"[");
        out.extend_from_slice(peer.as_bytes());
        out.extend_from_slice(b"]\"");
    } else {
        out.extend_from_slice(b"for=");
        out.extend_from_slice(peer.as_bytes());
    }
    out.extend_from_slice(b";proto=");
    out.extend_from_slice(proto.as_bytes());
    out.extend_from_slice(b";host=\"");
    out.extend(authority.bytes().filter(|&b| b != b'"'));
    out.push(b'"');
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_USER: HeaderName = HeaderName::from_static("x-forwarded-user");
const X_FORWARDED_EMAIL: HeaderName = HeaderName::from_static("x-forwarded-email");
const X_FORWARDED_GROUPS: HeaderName = HeaderName::from_static("x-forwarded-groups");
const X_FORWARDED_PREFERRED_USERNAME: HeaderName =
    HeaderName::from_static("x-forwarded-preferred-username");

/// A header value that takes the string's buffer instead of copying it.
fn owned_value(text: String) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).ok()
}

/// One value of an identity, as a header value.
#[derive(Clone, Copy)]
pub(crate) enum Field {
    Username,
    Name,
    Email,
    Uid,
    GroupsComma,
    GroupsPipe,
}

impl Field {
    pub(crate) fn of(self, values: &IdentityValues) -> Option<&HeaderValue> {
        match self {
            Field::Username => values.username.as_ref(),
            Field::Name => values.name.as_ref(),
            Field::Email => values.email.as_ref(),
            Field::Uid => values.uid.as_ref(),
            Field::GroupsComma => values.groups_comma.as_ref(),
            Field::GroupsPipe => values.groups_pipe.as_ref(),
        }
    }
}

static DEFAULT_HEADERS: [(HeaderName, Field); 4] = [
    (X_FORWARDED_USER, Field::Username),
    (X_FORWARDED_EMAIL, Field::Email),
    (X_FORWARDED_GROUPS, Field::GroupsComma),
    (X_FORWARDED_PREFERRED_USERNAME, Field::Username),
];
// authentik joins groups with `|` (PROTOCOL.md §5.4).
static AUTHENTIK_HEADERS: [(HeaderName, Field); 5] = [
    (
        HeaderName::from_static("x-authentik-username"),
        Field::Username,
    ),
    (HeaderName::from_static("x-authentik-email"), Field::Email),
    (
        HeaderName::from_static("x-authentik-groups"),
        Field::GroupsPipe,
    ),
    (HeaderName::from_static("x-authentik-name"), Field::Name),
    (HeaderName::from_static("x-authentik-uid"), Field::Uid),
];
static OAUTH2_PROXY_HEADERS: [(HeaderName, Field); 4] = [
    (
        HeaderName::from_static("x-auth-request-user"),
        Field::Username,
    ),
    (
        HeaderName::from_static("x-auth-request-email"),
        Field::Email,
    ),
    (
        HeaderName::from_static("x-auth-request-groups"),
        Field::GroupsComma,
    ),
    (
        HeaderName::from_static("x-auth-request-preferred-username"),
        Field::Username,
    ),
];

/// The identity headers of a preset: each name, and the value it carries.
pub(crate) fn identity_headers(preset: HeaderPreset) -> &'static [(HeaderName, Field)] {
    match preset {
        HeaderPreset::Default => &DEFAULT_HEADERS,
        HeaderPreset::Authentik => &AUTHENTIK_HEADERS,
        HeaderPreset::OAuth2Proxy => &OAUTH2_PROXY_HEADERS,
    }
}

/// The identity, under the route's header names. Values that cannot be
/// header values (control characters) are left out rather than mangled.
fn add_identity(headers: &mut HeaderMap, preset: HeaderPreset, identity: &Identity) {
    let values = identity.values();
    for (name, field) in identity_headers(preset) {
        if let Some(value) = field.of(values) {
            // A clone shares the bytes: no allocation per request.
            headers.insert(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn only_flowgates_cookie_is_removed() {
        let mut headers = HeaderMap::new();
        headers.append(
            COOKIE,
            HeaderValue::from_static("a=1; flowgate_session=xyz; b=2"),
        );
        headers.append(
            COOKIE,
            HeaderValue::from_static("flowgate_session=again; flowgate_session_csrf=t"),
        );
        strip_cookie(&mut headers, "flowgate_session");
        assert_eq!(
            headers.get_all(COOKIE).iter().collect::<Vec<_>>(),
            vec!["a=1; b=2"]
        );
        let mut only = HeaderMap::new();
        only.insert(COOKIE, HeaderValue::from_static("flowgate_session=xyz"));
        strip_cookie(&mut only, "flowgate_session");
        assert!(only.get(COOKIE).is_none());
        let mut lookalike = HeaderMap::new();
        lookalike.insert(COOKIE, HeaderValue::from_static("my_flowgate_session=1"));
        strip_cookie(&mut lookalike, "flowgate_session");
        assert_eq!(lookalike.get(COOKIE).unwrap(), "my_flowgate_session=1");
    }

    #[test]
    fn only_http11_requests_with_connection_upgrade_ask_to_switch() {
        let request = |version, connection: Option<&'static str>, upgrade: Option<&'static str>| {
            let mut builder = Request::builder().version(version);
            if let Some(value) = connection {
                builder = builder.header(CONNECTION, value);
            }
            if let Some(value) = upgrade {
                builder = builder.header(UPGRADE, value);
            }
            builder.body(()).unwrap()
        };
        let v11 = http::Version::HTTP_11;
        let asks = request(v11, Some("keep-alive, Upgrade"), Some("websocket"));
        assert_eq!(requested_upgrade(&asks).unwrap(), "websocket");
        assert!(requested_upgrade(&request(v11, None, Some("websocket"))).is_none());
        assert!(requested_upgrade(&request(v11, Some("keep-alive"), Some("websocket"))).is_none());
        assert!(requested_upgrade(&request(v11, Some("upgrade"), None)).is_none());
        let v10 = http::Version::HTTP_10;
        assert!(requested_upgrade(&request(v10, Some("upgrade"), Some("websocket"))).is_none());
        let v2 = http::Version::HTTP_2;
        assert!(requested_upgrade(&request(v2, Some("upgrade"), Some("websocket"))).is_none());
    }

    #[test]
    fn upgrades_keep_their_two_headers_and_lose_the_other_hop_by_hop() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade, X-Hop"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("sec-websocket-key", HeaderValue::from_static("k"));
        strip_hop_by_hop(&mut headers);
        keep_upgrade(&mut headers, HeaderValue::from_static("websocket"));
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["connection", "sec-websocket-key", "upgrade"]);
        assert_eq!(headers[CONNECTION], "upgrade");
    }

    #[test]
    fn upstream_path_joins_base_path() {
        let up: Uri = "http://127.0.0.1:3000/base".parse().unwrap();
        let req: Uri = "/x/y?z=1".parse().unwrap();
        assert_eq!(
            upstream_path(&up, &req).unwrap().to_string(),
            "/base/x/y?z=1"
        );
        let up: Uri = "http://127.0.0.1:3000".parse().unwrap();
        assert_eq!(upstream_path(&up, &req).unwrap().to_string(), "/x/y?z=1");
        let absolute: Uri = "http://app.example/x?y".parse().unwrap();
        assert_eq!(upstream_path(&up, &absolute).unwrap().to_string(), "/x?y");
    }
}
