//! Forwarding to the upstream: the request gets the path the gate decided
//! on and the header section `headers::rewrite` writes (the same rewrite
//! the fast lane, `h1`, uses), goes out on a pooled connection with its body
//! streamed, and the answer streams back. An upstream that cannot be
//! reached is a 502 (or 504) answer; its details stay in the log.
//!
//! An HTTP/1.1 `Upgrade` (websockets) goes out on a connection of its own
//! with `Connection: upgrade` kept; a 101 turns into a `tunnel`.
//!
//! A signed-in request lives no longer than its session: a long poll
//! still waiting for the upstream is answered 401, a streamed answer (SSE,
//! a download) is cut, a tunnel is closed, within a second of a sign-out,
//! a revocation (on any replica) or the session's expiry (`Store::ended`).

pub(crate) mod h1;
pub(crate) mod headers;
mod tunnel;

use http::header::{HeaderName, HeaderValue, CONNECTION, UPGRADE};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use crate::context::Context;
use crate::gateway::Gateway;
use crate::identity::Identity;
use crate::respond::Audience;
use crate::upstream::ConnSlot;
use crate::Body;

/// A future that resolves when a session has ended (`Store::ended`).
pub(crate) type Ending = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An upstream's response body on its way to the client, cut (an error,
/// so that hyper aborts the response rather than end it cleanly) when the
/// session it was sent for ends.
pub struct Streamed {
    body: Incoming,
    ending: Option<Ending>,
}

impl Streamed {
    fn new(body: Incoming, ending: Option<Ending>) -> Streamed {
        Streamed { body, ending }
    }
}

impl hyper::body::Body for Streamed {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if let Some(ending) = self.ending.as_mut() {
            if ending.as_mut().poll(cx).is_ready() {
                self.ending = None;
                tracing::info!("streamed answer cut: its session ended");
                return Poll::Ready(Some(Err("the session ended".into())));
            }
        }
        Pin::new(&mut self.body)
            .poll_frame(cx)
            .map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Send `request` to route `index`'s upstream. `target` is the canonical
/// `path?query` when it differs from the request's own. `session`: the
/// signed-in session it is sent for, whose end ends it.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    gateway: &Gateway,
    index: usize,
    mut request: Request<Incoming>,
    context: &Context,
    target: Option<String>,
    identity: Option<&Identity>,
    session: Option<Arc<str>>,
    audience: Audience,
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
    let (Some(upstream), Some(uri)) = (
        gateway.targets[index].as_ref(),
        upstream_path(&route.upstream, &parts.uri, target.as_deref()),
    ) else {
        return gateway.bad_request(audience, "the address cannot be forwarded");
    };
    let host = if route.preserve_host {
        context.authority.as_str()
    } else {
        upstream.authority.as_str()
    };
    let peer = slot.peer_value(context.peer.ip());
    let outgoing = headers::Outgoing {
        peer: context.peer.ip(),
        peer_text: peer.to_str().unwrap_or("unknown"),
        trusted: context.trusted,
        https: context.https,
        client_ip: context.client_ip,
        authority: &context.authority,
        host,
        cookie_name: &gateway.config.session.cookie_name,
        identity,
        identity_headers: &route.headers,
    };
    let mut rewritten = HeaderMap::with_capacity(parts.headers.len() + 12);
    headers::rewrite(|| parts.headers.iter(), &outgoing, &mut rewritten);
    if let Some(upgrade) = &upgrade {
        keep_upgrade(&mut rewritten, upgrade.protocol.clone());
    }
    parts.headers = rewritten;
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let request = Request::from_parts(parts, body);
    // A connection that may become a tunnel is nobody's to reuse.
    let slot_hold = slot.hold.clone();
    let slot = upgrade.is_none().then_some(slot);
    let mut ending: Option<Ending> = session.map(|id| {
        let idle = gateway.config.session.idle_timeout;
        Box::pin(gateway.sessions.ended(id, idle)) as Ending
    });
    let sent = gateway.upstreams.send(upstream, request, slot);
    let answered = match ending.as_mut() {
        None => sent.await,
        Some(ending) => tokio::select! {
            answered = sent => answered,
            () = ending.as_mut() => {
                tracing::info!(upstream = %route.upstream, "request dropped while waiting: its session ended");
                return gateway.session_ended(audience);
            }
        },
    };
    match answered {
        Ok(response) if response.status() == StatusCode::SWITCHING_PROTOCOLS => match upgrade {
            Some(upgrade) => tunnel::switch(
                response,
                upgrade.client,
                slot_hold,
                gateway.config.proxy.tunnel_idle_timeout,
                ending,
            ),
            None => {
                gateway.route_metrics[index].upstream_errors.inc();
                tracing::warn!(upstream = %route.upstream, "upstream switched protocols unasked");
                gateway.upstream_garbled(audience)
            }
        },
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Either::Left(Streamed::new(body, ending)))
        }
        Err(error) => {
            gateway.route_metrics[index].upstream_errors.inc();
            tracing::warn!(upstream = %route.upstream, %error, "upstream request failed");
            gateway.upstream_failed(audience, &error)
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
        .flat_map(|v| headers::tokens(v.as_bytes()))
        .any(|token| token.eq_ignore_ascii_case(b"upgrade"));
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

/// The upstream's base path + the request's path and query, in origin form
/// (what goes on the request line of an HTTP/1.1 connection). `target`:
/// the canonical `path?query`, when it is not the request's own.
fn upstream_path(upstream: &Uri, request: &Uri, target: Option<&str>) -> Option<Uri> {
    let base = upstream.path().trim_end_matches('/');
    let path_and_query = match target {
        Some(target) => target,
        None => request.path_and_query().map_or("/", |pq| pq.as_str()),
    };
    if base.is_empty() {
        if target.is_none() && request.scheme().is_none() && request.authority().is_none() {
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

/// A response's hop-by-hop fields, and those its `Connection` names, stay
/// behind.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| headers::tokens(v.as_bytes()))
            .filter_map(|name| HeaderName::from_bytes(name).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    // Usually there are none: one pass over the names instead of a hashed
    // removal per hop-by-hop name.
    if headers
        .keys()
        .any(|name| headers::is_hop_by_hop(name.as_str()))
    {
        for name in headers::HOP_BY_HOP {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            upstream_path(&up, &req, None).unwrap().to_string(),
            "/base/x/y?z=1"
        );
        let up: Uri = "http://127.0.0.1:3000".parse().unwrap();
        assert_eq!(
            upstream_path(&up, &req, None).unwrap().to_string(),
            "/x/y?z=1"
        );
        let absolute: Uri = "http://app.example/x?y".parse().unwrap();
        assert_eq!(
            upstream_path(&up, &absolute, None).unwrap().to_string(),
            "/x?y"
        );
        let canonical = upstream_path(&up, &req, Some("/admin/?z=1")).unwrap();
        assert_eq!(canonical.to_string(), "/admin/?z=1");
    }
}
