//! What flowgate works out about a connection and a request before it
//! decides anything: who the peer is, whether it is a trusted proxy (whose
//! forwarding headers then count), whether the client came over TLS, the
//! host it asked for, and the client's address. Both lanes use these rules.

use std::net::{IpAddr, SocketAddr};

use http::header::HOST;
use http::Request;

use crate::gateway::Gateway;

/// What the gateway knows about one connection.
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// What the gateway works out about one request before routing it.
#[derive(Debug, Clone)]
pub struct Context {
    pub peer: SocketAddr,
    /// The peer is a trusted proxy: its `X-Forwarded-*` headers count.
    pub trusted: bool,
    /// The client reached us over TLS (directly, or per a trusted proxy).
    pub https: bool,
    /// The request's host, lower-case, without port.
    pub host: String,
    /// The host as the client wrote it (with port), for `X-Forwarded-Host`.
    pub authority: String,
    /// The client's address: the peer, or the last untrusted hop that
    /// trusted proxies report in `X-Forwarded-For`.
    pub client_ip: IpAddr,
}

impl Context {
    /// The context of a request on the general path.
    pub fn of<B>(gateway: &Gateway, request: &Request<B>, connection: Connection) -> Context {
        let trusted = gateway.trusts(connection.peer.ip());
        let headers = request.headers();
        let claimed_proto = headers.get("x-forwarded-proto").map(|v| v.as_bytes());
        // The target's own authority first (absolute form, HTTP/2's
        // `:authority`: RFC 9112 §3.2.2), else `Host`.
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                headers
                    .get(HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let client_ip = match trusted {
            true => {
                let hops = headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect::<Vec<_>>();
                gateway.client_behind(connection.peer.ip(), &hops)
            }
            false => connection.peer.ip(),
        };
        Context {
            peer: connection.peer,
            trusted,
            https: https(connection.tls, trusted, claimed_proto),
            host: host_without_port(&authority),
            client_ip,
            authority,
        }
    }
}

/// Why the host a request names cannot be trusted to route it, if it
/// cannot: more than one `Host`, none on HTTP/1.1, or one that is not a
/// host with an optional port (RFC 9112 §3.2).
pub fn host_problem<B>(request: &Request<B>) -> Option<&'static str> {
    let mut hosts = request.headers().get_all(HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Some("the request has more than one Host header");
    }
    if let Some(authority) = request.uri().authority() {
        return (!valid_authority(authority.as_str())).then_some("the request names no valid host");
    }
    match first {
        Some(host) => match host.to_str() {
            Ok(host) if valid_authority(host) => None,
            _ => Some("the Host header is not a host name"),
        },
        None if request.version() == http::Version::HTTP_11 => {
            Some("the request has no Host header")
        }
        None => None,
    }
}

/// `host` or `host:port`, the port a number that fits one.
pub(crate) fn valid_authority(authority: &str) -> bool {
    let Ok(parsed) = authority.parse::<http::uri::Authority>() else {
        return false;
    };
    if authority.contains('@') || parsed.host().is_empty() {
        return false;
    }
    let after_host = &authority[parsed.host().len()..];
    match after_host.strip_prefix(':') {
        None => after_host.is_empty(),
        Some("") => true,
        Some(port) => port.len() <= 5 && port.parse::<u16>().is_ok(),
    }
}

/// Whether the client reached us over TLS: this connection is, or a trusted
/// proxy says so in the first `X-Forwarded-Proto` value it sent.
pub fn https(tls: bool, trusted: bool, claimed_proto: Option<&[u8]>) -> bool {
    tls || (trusted
        && claimed_proto.is_some_and(|proto| {
            let first = proto.split(|&b| b == b',').next().unwrap_or_default();
            first.trim_ascii().eq_ignore_ascii_case(b"https")
        }))
}

pub(crate) fn host_without_port(authority: &str) -> String {
    host_key(authority).into_owned()
}

/// `host_without_port`, borrowed when the host is already in that form.
pub(crate) fn host_key(authority: &str) -> std::borrow::Cow<'_, str> {
    let host = if authority.starts_with('[') {
        // [v6]:port
        authority
            .split_once(']')
            .map(|(h, _)| &h[1..])
            .unwrap_or(authority)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                authority
            }
        })
    };
    let host = host.trim_end_matches('.');
    match host.bytes().any(|b| b.is_ascii_uppercase()) {
        true => host.to_ascii_lowercase().into(),
        false => host.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lose_their_port_and_case() {
        assert_eq!(host_without_port("App.Example:8443"), "app.example");
        assert_eq!(host_without_port("app.example."), "app.example");
        assert_eq!(host_without_port("[::1]:8080"), "::1");
        assert_eq!(host_without_port("127.0.0.1"), "127.0.0.1");
    }

    #[test]
    fn hosts_are_checked_before_they_route_anything() {
        let request = |uri: &str, hosts: &[&str], version| {
            let mut builder = Request::builder().uri(uri).version(version);
            for host in hosts {
                builder = builder.header(HOST, *host);
            }
            builder.body(()).unwrap()
        };
        let v11 = http::Version::HTTP_11;
        assert_eq!(host_problem(&request("/", &["app.test"], v11)), None);
        assert_eq!(host_problem(&request("/", &["app.test:8443"], v11)), None);
        assert_eq!(host_problem(&request("/", &["[::1]:80"], v11)), None);
        assert_eq!(
            host_problem(&request("http://app.test/", &["other"], v11)),
            None
        );
        for bad in [
            &["a", "b"][..],
            &[],
            &["other:abc"],
            &["h:99999"],
            &["u@h"],
            &[""],
        ] {
            assert!(host_problem(&request("/", bad, v11)).is_some(), "{bad:?}");
        }
        assert_eq!(
            host_problem(&request("/", &[], http::Version::HTTP_10)),
            None
        );
    }

    #[test]
    fn only_a_trusted_proxy_says_https() {
        assert!(https(true, false, None));
        assert!(!https(false, false, Some(b"https")));
        assert!(https(false, true, Some(b"HTTPS, http")));
        assert!(!https(false, true, Some(b"http, https")));
        assert!(!https(false, true, None));
    }
}
