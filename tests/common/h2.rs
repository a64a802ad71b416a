//! One HTTP/2 request with prior knowledge (h2c, no TLS) through hyper's
//! client connection API, its `:path` exactly the target given: what
//! `http::Uri` refuses or would change is an `H2Error`, never a panic.
#![allow(dead_code)]

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::raw::HOST;

/// How long one exchange may take, from connecting to the last body byte.
pub const H2_TIMEOUT: Duration = Duration::from_secs(10);

/// A response as the h2 client received it.
#[derive(Debug)]
pub struct H2Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    pub trailers: http::HeaderMap,
}

impl H2Response {
    /// The first value of `name` (any case), if it is visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every value of `name` that is visible ASCII, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why no response came back.
#[derive(Debug)]
pub enum H2Error {
    /// `http::Uri` refused the target, or would send other bytes than those
    /// given (it drops a `#fragment`): nothing was sent.
    Target(String),
    /// The method, a header name or value, or the `:authority`, refused by
    /// `http`: nothing was sent.
    Request(String),
    Connect(std::io::Error),
    /// The HTTP/2 exchange failed: the handshake, a refused or reset
    /// stream, GOAWAY, a broken body.
    Exchange(hyper::Error),
    /// No whole response within `H2_TIMEOUT`.
    TimedOut,
}

impl fmt::Display for H2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            H2Error::Target(why) => write!(f, "target refused: {why}"),
            H2Error::Request(why) => write!(f, "request refused: {why}"),
            H2Error::Connect(e) => write!(f, "connect: {e}"),
            H2Error::Exchange(e) => write!(f, "h2 exchange: {e}"),
            H2Error::TimedOut => write!(f, "no response within {H2_TIMEOUT:?}"),
        }
    }
}

impl std::error::Error for H2Error {}

/// Send one request over a new h2c connection to `addr` and read the whole
/// response. `target` becomes `:path` byte for byte; `headers` are
/// `"Name: value"` lines (names lower-cased on the wire, as HTTP/2 wants).
/// `:authority` is [`HOST`] unless `headers` has a `":authority: …"` line;
/// a `Host` line is sent as an ordinary header. hyper drops
/// connection-specific headers (`Connection`, `Keep-Alive`, `Upgrade`,
/// `Transfer-Encoding`, a `TE` other than `trailers`) and adds a
/// `content-length` when `body` is not empty (or the method is POST, PUT…).
pub async fn h2c_send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[&str],
    body: &[u8],
) -> Result<H2Response, H2Error> {
    let request = build(method, target, headers, body)?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(H2Error::Connect)?;
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(H2Error::Exchange)?;
        // Ends by itself once `sender` is gone (or with the runtime).
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(H2Error::Exchange)?;
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.map_err(H2Error::Exchange)?;
        Ok(H2Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            trailers: collected.trailers().cloned().unwrap_or_default(),
            body: collected.to_bytes().to_vec(),
        })
    };
    tokio::time::timeout(H2_TIMEOUT, exchange)
        .await
        .map_err(|_| H2Error::TimedOut)?
}

/// `h2c_send` for tests without a runtime (on a runtime of its own; not for
/// use inside one).
pub fn h2c_send_blocking(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[&str],
    body: &[u8],
) -> Result<H2Response, H2Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(h2c_send(addr, method, target, headers, body))
}

fn build(
    method: &str,
    target: &str,
    headers: &[&str],
    body: &[u8],
) -> Result<http::Request<Full<Bytes>>, H2Error> {
    let path = http::uri::PathAndQuery::try_from(target)
        .map_err(|e| H2Error::Target(format!("{target:?}: {e}")))?;
    if path.as_str() != target {
        return Err(H2Error::Target(format!(
            "{target:?} would be sent as {:?}",
            path.as_str()
        )));
    }
    let mut authority = HOST.to_owned();
    let mut fields = Vec::new();
    for line in headers {
        let (name, value) = match line.strip_prefix(':') {
            Some(rest) => {
                let (name, value) = rest.split_once(':').unwrap_or((rest, ""));
                (format!(":{name}"), value)
            }
            None => {
                let (name, value) = line
                    .split_once(':')
                    .ok_or_else(|| H2Error::Request(format!("not a header line: {line:?}")))?;
                (name.to_owned(), value)
            }
        };
        let value = value.trim();
        if name == ":authority" {
            authority = value.to_owned();
            continue;
        }
        if name.starts_with(':') {
            return Err(H2Error::Request(format!(
                "{name}: only :authority may be given"
            )));
        }
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| H2Error::Request(format!("header name {name:?}: {e}")))?;
        let value = http::HeaderValue::from_bytes(value.as_bytes())
            .map_err(|e| H2Error::Request(format!("value of {name}: {value:?}: {e}")))?;
        fields.push((name, value));
    }
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path)
        .build()
        .map_err(|e| H2Error::Request(format!("authority {authority:?}: {e}")))?;
    let method = http::Method::from_bytes(method.as_bytes())
        .map_err(|e| H2Error::Request(format!("method {method:?}: {e}")))?;
    let mut request = http::Request::new(Full::new(Bytes::copy_from_slice(body)));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_2;
    for (name, value) in fields {
        request.headers_mut().append(name, value);
    }
    Ok(request)
}
