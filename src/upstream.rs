//! Connections to upstreams. HTTP/1.1 with keep-alive, over TCP or rustls.
//!
//! The hot path keeps one upstream connection *per downstream connection*:
//! a browser or load balancer that reuses its connection to flowgate gets
//! its requests sent on the same upstream connection each time, found in a
//! slot owned by that downstream connection, with no shared lock and no
//! pool checkout. Connections not in use by a downstream connection wait in
//! a shared idle list (one short lock to take or return one; never held
//! across an `.await`), so concurrent HTTP/2 streams and new downstream
//! connections reuse them instead of dialing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::ProxyConfig;

/// Idle connections kept per upstream in the shared list.
const MAX_IDLE_PER_UPSTREAM: usize = 256;
/// Upstream connections kept in client connections' slots, all upstreams
/// together. Beyond it they go to the shared list: ten thousand idle
/// clients must not mean ten thousand idle upstream connections.
const MAX_IN_SLOTS: usize = 1024;

/// Which upstream a connection goes to.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Target {
    pub tls: bool,
    pub authority: Authority,
}

impl Target {
    pub fn of(uri: &Uri) -> Option<Target> {
        Some(Target {
            tls: uri.scheme() == Some(&Scheme::HTTPS),
            authority: uri.authority()?.clone(),
        })
    }

    fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.tls { 443 } else { 80 })
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection within `connect_timeout`, refused, TLS failure…
    Connect(String),
    /// Connected, but no response head within `response_timeout`.
    Timeout,
    /// The connection failed while sending or receiving.
    Failed(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "connect: {e}"),
            UpstreamError::Timeout => f.write_str("no response in time"),
            UpstreamError::Failed(e) => write!(f, "{e}"),
        }
    }
}

struct Idle {
    sender: SendRequest<Incoming>,
    since: Instant,
}

/// The upstream side of flowgate: how to dial, and the shared idle list.
pub struct Upstreams {
    connect_timeout: Duration,
    response_timeout: Duration,
    idle_timeout: Duration,
    tls: Option<TlsConnector>,
    idle: Mutex<HashMap<Target, Vec<Idle>>>,
    /// Plain sockets of the HTTP/1.1 fast lane (`h1`), idle, per upstream.
    raw_idle: Mutex<HashMap<Target, Vec<(TcpStream, Instant)>>>,
    in_slots: Arc<AtomicUsize>,
}

/// Whatever keeps a client connection counted as open (its slot under
/// `server.max_connections`); an upgraded tunnel holds it while it lives.
pub type ConnHold = Arc<dyn std::any::Any + Send + Sync>;

/// The upstream connection a downstream connection keeps for itself.
#[derive(Default)]
pub struct ConnSlot {
    held: Mutex<Option<Held>>,
    pub(crate) hold: Option<ConnHold>,
    /// The client's address as a header value, formatted once per connection.
    peer: std::sync::OnceLock<http::HeaderValue>,
}

/// A connection kept in a slot, and the count of such connections it is
/// part of (so that it is uncounted where it was counted, across reloads).
struct Held {
    target: Target,
    /// `Some` until `into_sender` takes it.
    sender: Option<SendRequest<Incoming>>,
    count: Arc<AtomicUsize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstreams {
    pub fn new(config: &ProxyConfig) -> Result<Upstreams, String> {
        Ok(Upstreams {
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            idle_timeout: config.pool_idle_timeout,
            tls: Some(tls_connector(config.ca_file.as_deref())?),
            idle: Mutex::new(HashMap::new()),
            raw_idle: Mutex::new(HashMap::new()),
            in_slots: Arc::default(),
        })
    }

    /// Send `request` (origin-form URI, `Host` set) to `target`. With a
    /// `slot`, the connection is taken from and returned to it; without one
    /// (upgrades), a connection is used once and not returned.
    pub async fn send(
        &self,
        target: &Target,
        mut request: Request<Incoming>,
        slot: Option<&ConnSlot>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let reusable = slot.is_some();
        // Dialing (TCP, TLS, handshake) is boxed: its future is large and
        // rare, and would otherwise be carried and moved by every request.
        let mut sender = match slot.and_then(|s| s.take(target)) {
            Some(sender) => sender,
            None => match reusable.then(|| self.take_idle(target)).flatten() {
                Some(sender) => sender,
                None => Box::pin(self.connect(target)).await?,
            },
        };
        // A kept connection may have been closed by the upstream meanwhile;
        // hyper hands the request back if it was not written, so it can go
        // out on a fresh connection once.
        let mut retried = false;
        let response = loop {
            let sent =
                tokio::time::timeout(self.response_timeout, sender.try_send_request(request)).await;
            match sent {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(Ok(response)) => break response,
                Ok(Err(mut error)) => match error.take_message() {
                    Some(unsent) if !retried => {
                        retried = true;
                        request = unsent;
                        sender = Box::pin(self.connect(target)).await?;
                    }
                    _ => return Err(UpstreamError::Failed(crate::respond::chain(error.error()))),
                },
            }
        };
        if reusable && response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            match slot {
                Some(slot) => {
                    if let Some(spare) = slot.put(target, sender, &self.in_slots) {
                        self.put_idle(target, spare);
                    }
                }
                None => self.put_idle(target, sender),
            }
        }
        Ok(response)
    }

    fn take_idle(&self, target: &Target) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(target)?;
        while let Some(entry) = list.pop() {
            if !entry.sender.is_closed() && entry.since.elapsed() < self.idle_timeout {
                return Some(entry.sender);
            }
        }
        None
    }

    fn put_idle(&self, target: &Target, sender: SendRequest<Incoming>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(target.clone()).or_default();
        list.retain(|e| !e.sender.is_closed() && e.since.elapsed() < self.idle_timeout);
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Hand a downstream connection's kept upstream connection to the
    /// shared list when the downstream connection ends.
    pub fn release(&self, slot: &ConnSlot) {
        let held = slot.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(held) = held {
            let target = held.target.clone();
            self.put_idle(&target, held.into_sender());
        }
    }

    pub(crate) fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// An idle plain socket to `target` for the fast lane, if one is kept.
    pub(crate) fn take_raw(&self, target: &Target) -> Option<TcpStream> {
        let mut idle = self.raw_idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(target)?;
        while let Some((stream, since)) = list.pop() {
            if since.elapsed() < self.idle_timeout && !closed_while_idle(&stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Keep a fast-lane socket whose last exchange ended cleanly.
    pub(crate) fn put_raw(&self, target: &Target, stream: TcpStream) {
        if closed_while_idle(&stream) {
            return;
        }
        let mut idle = self.raw_idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = match idle.get_mut(target) {
            Some(list) => list,
            None => idle.entry(target.clone()).or_default(),
        };
        list.retain(|(_, since)| since.elapsed() < self.idle_timeout);
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push((stream, Instant::now()));
        }
    }

    /// A new plain socket to `target` (an `http://` upstream).
    pub(crate) async fn connect_raw(&self, target: &Target) -> Result<TcpStream, UpstreamError> {
        let host = target.authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let connect = TcpStream::connect((host, target.port()));
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(UpstreamError::Connect(error.to_string())),
            Err(_) => {
                return Err(UpstreamError::Connect(format!(
                    "no connection within {:?}",
                    self.connect_timeout
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Count one more socket kept by a client connection, unless
    /// `MAX_IN_SLOTS` are kept already.
    pub(crate) fn count_in_slot(&self) -> Option<InSlot> {
        if self.in_slots.fetch_add(1, Ordering::Relaxed) >= MAX_IN_SLOTS {
            self.in_slots.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InSlot(self.in_slots.clone()))
    }

    async fn connect(&self, target: &Target) -> Result<SendRequest<Incoming>, UpstreamError> {
        tokio::time::timeout(self.connect_timeout, self.dial(target))
            .await
            .map_err(|_| {
                UpstreamError::Connect(format!("no connection within {:?}", self.connect_timeout))
            })?
    }

    async fn dial(&self, target: &Target) -> Result<SendRequest<Incoming>, UpstreamError> {
        let host = target.authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let stream = TcpStream::connect((host, target.port()))
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        if target.tls {
            let connector = self
                .tls
                .as_ref()
                .ok_or_else(|| UpstreamError::Connect("TLS is not available".into()))?;
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| UpstreamError::Connect(e.to_string()))?;
            let stream = connector
                .connect(name, stream)
                .await
                .map_err(|e| UpstreamError::Connect(format!("TLS: {e}")))?;
            handshake(TokioIo::new(stream)).await
        } else {
            handshake(TokioIo::new(stream)).await
        }
    }
}

/// One socket counted against `MAX_IN_SLOTS` while this lives.
pub(crate) struct InSlot(Arc<AtomicUsize>);

impl Drop for InSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether an idle upstream socket has something to read: between
/// exchanges that can only be its close (or garbage), so it is not reused.
/// Readiness is tokio's record of the last events; only when it says
/// readable does this cost a syscall, to tell a close from a stale flag.
pub(crate) fn closed_while_idle(stream: &TcpStream) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if stream.poll_read_ready(&mut cx).is_pending() {
        return false;
    }
    let mut probe = [0u8; 1];
    !matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

async fn handshake<T>(io: T) -> Result<SendRequest<Incoming>, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| UpstreamError::Connect(crate::respond::chain(&e)))?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(error = %crate::respond::chain(&error), "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

impl ConnSlot {
    pub fn with_hold(hold: ConnHold) -> ConnSlot {
        ConnSlot {
            held: Mutex::default(),
            hold: Some(hold),
            peer: std::sync::OnceLock::new(),
        }
    }

    /// `ip` as a header value, formatted on the connection's first request.
    pub(crate) fn peer_value(&self, ip: std::net::IpAddr) -> &http::HeaderValue {
        self.peer.get_or_init(|| {
            http::HeaderValue::from_str(&ip.to_string())
                .unwrap_or(http::HeaderValue::from_static("unknown"))
        })
    }

    fn take(&self, target: &Target) -> Option<SendRequest<Incoming>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.take() {
            Some(h) if h.target == *target && h.sender.as_ref().is_some_and(|s| !s.is_closed()) => {
                Some(h.into_sender())
            }
            // Another upstream (or a dead connection): let it go.
            _ => None,
        }
    }

    /// Keep `sender`; hands it back when the slot is taken (a concurrent
    /// HTTP/2 stream got there first) or `count` is at its limit.
    fn put(
        &self,
        target: &Target,
        sender: SendRequest<Incoming>,
        count: &Arc<AtomicUsize>,
    ) -> Option<SendRequest<Incoming>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_some() || count.fetch_add(1, Ordering::Relaxed) >= MAX_IN_SLOTS {
            if held.is_none() {
                count.fetch_sub(1, Ordering::Relaxed);
            }
            return Some(sender);
        }
        *held = Some(Held {
            target: target.clone(),
            sender: Some(sender),
            count: count.clone(),
        });
        None
    }
}

impl Held {
    fn into_sender(mut self) -> SendRequest<Incoming> {
        // Drop uncounts it; the connection itself moves on.
        self.sender
            .take()
            .expect("a held connection has its sender until taken")
    }
}

/// rustls client config for `https://` upstreams: the system's roots, or
/// only the PEM roots of `ca_file`. Upstreams speak HTTP/1.1.
fn tls_connector(ca_file: Option<&std::path::Path>) -> Result<TlsConnector, String> {
    let roots = match ca_file {
        Some(path) => crate::tls::Roots::Only(path),
        None => crate::tls::Roots::System,
    };
    let config = crate::tls::client_config(roots, None, &[b"http/1.1"])?;
    Ok(TlsConnector::from(Arc::new(config)))
}
