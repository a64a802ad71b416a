//! The fast lane: HTTP/1.1 on plain listeners, served by hand.
//!
//! Most of what a gateway forwards has one shape: a signed-in client asks
//! for something without a request body, and the upstream answers. For that
//! shape this module does the whole job on the client connection's own
//! task, with no per-request allocation on the way: it parses the head
//! (`httparse`), checks the session cookie, asks the gate for its verdict
//! (`gate::decide`, the same decision as the general path's, on the same
//! canonical path), writes the upstream request head into one buffer with
//! the same header rewrite (`proxy::headers`), sends it on the upstream
//! socket this connection keeps, and relays the answer (framed by
//! `Content-Length`, chunked, or by the upstream closing) as it comes. It
//! keeps no rule of its own about who may pass: it only frames bytes.
//! Buffers come from a per-thread pool and go back whenever the connection
//! waits for its next request: an idle keep-alive connection costs its
//! socket and a small task.
//!
//! Anything else is the general path's (`router`, on hyper): a request
//! with a body, an upgrade, `Expect`, HTTP/1.0 or h2c, a request the gate
//! does not forward (flowgate's own paths, sign-in, step up, 400, 403,
//! 404), an `https://` upstream, a session store that needs a round trip,
//! a head or a host hyper would refuse. The connection
//! is then handed to hyper with the bytes read so far: for that one request
//! and a close (`Prepared::Once`), or for the rest of the connection
//! (`Prepared::General`). Both lanes send the upstream the same request and
//! the client the same answers (tests/http1_edges.rs runs its cases
//! through both).

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::headers;
use crate::access_log::AccessLine;
use crate::app::App;
use crate::context::host_key;
use crate::gate::{Canonical, SignedIn, Verdict};
use crate::gateway::Gateway;
use crate::respond::Audience;
use crate::upstream::{closed_while_idle, InSlot, Target, UpstreamError};

/// Read buffers. A request head must fit in one (a longer one goes to
/// hyper, which applies `max_header_bytes`); bodies are relayed through them.
const BUF: usize = 16 * 1024;
/// Free read buffers kept per thread.
const POOL: usize = 128;
/// The read buffer for relaying a long response body.
const RELAY_BUF: usize = 64 * 1024;
/// Header fields parsed at most; a request head with more goes to hyper.
const MAX_HEADERS: usize = 128;
/// The largest response head taken from an upstream (hyper's client
/// allows as much).
const MAX_RESPONSE_HEAD: usize = 8192 + 4096 * 100;

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    static HEADS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Tells idle connections of a listener to close (graceful shutdown).
#[derive(Default)]
pub(crate) struct Closing {
    flag: AtomicBool,
    notify: Notify,
}

impl Closing {
    pub(crate) fn close(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    fn is_closing(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves once `close` was called (at once if it was already).
    pub(crate) async fn closed(&self) {
        let notified = self.notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if self.is_closing() {
            return;
        }
        notified.await
    }
}

/// The deadlines of a connection between requests, from `[server]`.
#[derive(Clone, Copy)]
pub(crate) struct Deadlines {
    pub header_read_timeout: Duration,
    pub keepalive_timeout: Duration,
}

/// Serve `stream` until it closes, or until a request needs the general
/// path: then the connection, with what was read of it, is returned for
/// hyper to serve.
pub(crate) async fn serve(
    app: &App,
    stream: TcpStream,
    peer: SocketAddr,
    closing: &Closing,
    deadlines: Deadlines,
) -> Option<Prefixed> {
    let opened = Instant::now();
    let mut lane = Lane {
        stream,
        peer: Peer::new(peer),
        input: Input::default(),
        up: None,
        timer: Box::pin(tokio::time::sleep_until(
            opened + deadlines.header_read_timeout,
        )),
        verified: Verified::default(),
        relaying: false,
    };
    // The first head is due `header_read_timeout` after the connection
    // opened; later ones that long after their first byte. `None`: idle
    // since `idle_since`, waiting for the next request.
    let mut head_due = Some(opened + deadlines.header_read_timeout);
    let mut idle_since = opened;
    // Registered once for the connection's life (not per idle wait).
    let mut closed = std::pin::pin!(closing.notify.notified());
    closed.as_mut().enable();
    // Whether the head waiting now has had its session fetched already.
    let mut fetched = false;
    loop {
        if !lane.input.is_empty() {
            let gateway = app.gateway();
            let mut out = Out::take();
            let bytes = lane.input.bytes();
            match prepare(&gateway, &lane.peer, &mut lane.verified, bytes, &mut out) {
                Prepared::Fetch(id) if !fetched => {
                    drop(out);
                    fetched = true;
                    let idle = gateway.config.session.idle_timeout;
                    match gateway.sessions.authenticated(&id, idle).await {
                        Ok(answer) => lane.verified.fetched = Some((id.into(), answer)),
                        Err(error) => {
                            crate::gate::store_failed(&error);
                            return Some(lane.hand_over(&gateway, false));
                        }
                    }
                    continue;
                }
                Prepared::Fetch(_) => {
                    tracing::debug!(peer = %lane.peer.addr, "session not cached after a read: the general path takes it");
                    return Some(lane.hand_over(&gateway, false));
                }
                Prepared::Forward(plan) => {
                    fetched = false;
                    gateway.metrics.fast_lane_requests.inc();
                    lane.input.consume(plan.head_len);
                    let done = lane.exchange(&gateway, &plan, &mut out, closing).await;
                    drop(out);
                    match done {
                        Some(at) if !closing.is_closing() => {
                            head_due = None;
                            idle_since = Instant::from_std(at);
                        }
                        _ => {
                            lane.end(&gateway);
                            return None;
                        }
                    }
                    continue;
                }
                Prepared::Partial => {
                    let limit = gateway.config.server.max_header_bytes.max(8192);
                    if lane.input.is_full() || lane.input.len() >= limit {
                        tracing::debug!(peer = %lane.peer.addr, "long request head: the general path takes it");
                        return Some(lane.hand_over(&gateway, false));
                    }
                    if head_due.is_none() {
                        head_due = Some(Instant::now() + deadlines.header_read_timeout);
                    }
                }
                Prepared::General(why) => {
                    tracing::debug!(peer = %lane.peer.addr, why, "connection goes to the general path");
                    return Some(lane.hand_over(&gateway, false));
                }
                Prepared::Once(why) => {
                    tracing::debug!(peer = %lane.peer.addr, why, "one request for the general path, then close");
                    return Some(lane.hand_over(&gateway, true));
                }
            }
        }
        let deadline = head_due.unwrap_or(idle_since + deadlines.keepalive_timeout);
        // Nothing of a request read yet (a new or an idle connection): the
        // buffer can go, and a shutdown closes the connection at once.
        let waiting = lane.input.is_empty();
        if waiting {
            lane.input.release();
            if closing.is_closing() {
                lane.end(&app.gateway());
                return None;
            }
        }
        let closed = waiting.then_some(closed.as_mut());
        if !lane.read_client(deadline, closed).await {
            lane.end(&app.gateway());
            return None;
        }
    }
}

/// One client connection of the fast lane.
struct Lane {
    stream: TcpStream,
    peer: Peer,
    /// Bytes from the client not used yet.
    input: Input,
    /// The upstream socket this connection keeps, between exchanges too.
    up: Option<Upstream>,
    /// One timer for every deadline of the connection, moved lazily.
    timer: Pin<Box<Sleep>>,
    /// The session cookie this connection's last request proved, so that
    /// the next one with the same value skips the MAC.
    verified: Verified,
    /// The exchange in progress has written (some of) its answer.
    relaying: bool,
}

/// A cookie value whose MAC held, and the gateway (its secret) it held for.
#[derive(Default)]
struct Verified {
    generation: u64,
    value: Option<Box<str>>,
    /// The session id in `value`.
    id: Option<std::sync::Arc<str>>,
    /// What the store answered when the last head's session was fetched
    /// (`Prepared::Fetch`): taken by the next prepare of that head, so a
    /// session the store does not have is no second round trip. Never
    /// kept past that one use: it is no cache.
    fetched: Option<(Box<str>, Option<std::sync::Arc<crate::session::Session>>)>,
}

impl Verified {
    /// The session id in `value`, if its MAC holds: known already, or checked now.
    fn id(&mut self, gateway: &Gateway, value: &str) -> Option<std::sync::Arc<str>> {
        let known = self.generation == gateway.generation
            && self
                .value
                .as_deref()
                .is_some_and(|v| crate::session::tokens_equal(v, value));
        if known {
            return self.id.clone();
        }
        let id: std::sync::Arc<str> = gateway.signer.verify(value)?.into();
        self.generation = gateway.generation;
        self.value = Some(value.into());
        self.id = Some(id.clone());
        Some(id)
    }
}

struct Upstream {
    target: Target,
    stream: TcpStream,
    /// Counted against the cap of sockets kept by client connections.
    counted: Option<InSlot>,
}

/// The client's address, formatted once per connection.
struct Peer {
    addr: SocketAddr,
    ip: String,
}

impl Peer {
    fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            ip: addr.ip().to_string(),
        }
    }
}

/// What `prepare` made of the bytes at hand.
enum Prepared {
    /// The head is not complete yet.
    Partial,
    /// Not the fast lane's (why): hand the connection to hyper for good.
    /// The rest of such a connection is likely of the same kind (HTTP/1.0,
    /// h2c, an upgrade, a route to an `https://` upstream…).
    General(&'static str),
    /// One request for the general path (a login page, a request body, no
    /// session…): hyper answers it with `Connection: close`, and the
    /// client's next connection starts on the fast lane again. (Behind a
    /// reverse proxy that pools its connections to flowgate, this keeps the
    /// pool from drifting onto the general path one login at a time.)
    Once(&'static str),
    /// The upstream request head is written; send it.
    Forward(Plan),
    /// The session this id names is not in the store's cache: read it
    /// (awaited, off the parse), then prepare the same head again.
    Fetch(String),
}

/// A request the fast lane serves.
struct Plan {
    /// Length of the request head (there is no body).
    head_len: usize,
    route: usize,
    head_only: bool,
    /// The client asked to close after this response.
    close: bool,
    /// May be sent again if a kept upstream socket turns out closed.
    idempotent: bool,
    /// Who a 502 or 504 would be for.
    audience: Audience,
    started: std::time::Instant,
    /// Only when the access log is on.
    log: Option<Box<LogFields>>,
    /// The session it is forwarded for, whose end ends it.
    session: Option<std::sync::Arc<str>>,
}

struct LogFields {
    client: std::net::IpAddr,
    method: String,
    path: String,
    host: String,
    user: Option<String>,
}

/// How the response body is delimited.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes; the client connection closes after it.
    Close,
}

/// A final response head, rewritten for the client in `out`.
struct Head {
    len: usize,
    status: u16,
    framing: Framing,
    /// The upstream will close its end: its socket is not kept.
    upstream_close: bool,
}

enum Parsed {
    Partial,
    Bad(&'static str),
    /// A 1xx informational head, `len` bytes long.
    Informational(usize),
    Final(Head),
}

/// Why an exchange got no (complete) response head.
enum Fail {
    /// Nothing came back: on a reused socket, the upstream may have closed
    /// it while idle, and the request can go again on a new one.
    Unanswered(String),
    Upstream(UpstreamError),
}

impl Lane {
    /// Send the prepared request upstream and relay the answer. When the
    /// client connection stays open, when the exchange ended. The session
    /// it is sent for ending first ends it: a 401 when the upstream has not
    /// answered yet, else the connection cut.
    async fn exchange(
        &mut self,
        gateway: &Gateway,
        plan: &Plan,
        out: &mut Vec<u8>,
        closing: &Closing,
    ) -> Option<std::time::Instant> {
        let Some(id) = plan.session.clone() else {
            return self.send(gateway, plan, out, closing).await;
        };
        let ending = gateway
            .sessions
            .ended(id, gateway.config.session.idle_timeout);
        self.relaying = false;
        tokio::select! {
            done = self.send(gateway, plan, out, closing) => done,
            () = ending => {
                self.up = None;
                if self.relaying {
                    tracing::info!(peer = %self.peer.addr, "streamed answer cut: its session ended");
                    return None;
                }
                tracing::info!(peer = %self.peer.addr, "request dropped while waiting: its session ended");
                let answer = gateway.session_ended(plan.audience);
                if let Some(log) = &plan.log {
                    self.log(plan, log, answer.status().as_u16(), plan.started.elapsed());
                }
                let bytes = serialize(answer, true).await;
                let _ = self.stream.write_all(&bytes).await;
                None
            }
        }
    }

    /// `exchange`, without its session's watch.
    async fn send(
        &mut self,
        gateway: &Gateway,
        plan: &Plan,
        out: &mut Vec<u8>,
        closing: &Closing,
    ) -> Option<std::time::Instant> {
        let target = gateway.targets[plan.route].as_ref()?;
        let mut from_up = Input::default();
        let mut retried = false;
        let head = loop {
            let reused = match self.socket(gateway, target).await {
                Ok(reused) => reused,
                Err(error) => return self.fail(gateway, plan, error).await,
            };
            match self
                .request(gateway, plan, out, &mut from_up, closing)
                .await
            {
                Ok(head) => break head,
                Err(Fail::Unanswered(_)) if reused && plan.idempotent && !retried => {
                    retried = true;
                    self.up = None;
                }
                Err(Fail::Unanswered(error)) => {
                    self.up = None;
                    return self.fail(gateway, plan, UpstreamError::Failed(error)).await;
                }
                Err(Fail::Upstream(error)) => {
                    self.up = None;
                    return self.fail(gateway, plan, error).await;
                }
            }
        };
        let at_head = std::time::Instant::now();
        let elapsed = at_head - plan.started;
        gateway.route_metrics[plan.route].observe(head.status, elapsed);
        if let Some(log) = &plan.log {
            self.log(plan, log, head.status, elapsed);
        }
        let (clean, at_once) = self.relay(&head, out, &mut from_up).await;
        if !clean || head.upstream_close {
            self.up = None;
        } else if let Some(up) = &mut self.up {
            if up.counted.is_none() {
                up.counted = gateway.upstreams.count_in_slot();
                if up.counted.is_none() {
                    // Enough sockets are kept by client connections: this
                    // one waits in the shared list instead.
                    if let Some(up) = self.up.take() {
                        gateway.upstreams.put_raw(&up.target, up.stream);
                    }
                }
            }
        }
        let keep = clean && !plan.close && head.framing != Framing::Close;
        // Written in one go: it ended when the head came.
        keep.then(|| match at_once {
            true => at_head,
            false => std::time::Instant::now(),
        })
    }

    /// Make sure `self.up` is a socket to `target`: the kept one, an idle
    /// one from the shared list, or a new one. Whether it was used before.
    async fn socket(&mut self, gateway: &Gateway, target: &Target) -> Result<bool, UpstreamError> {
        if let Some(up) = self.up.take() {
            if up.target == *target {
                if !closed_while_idle(&up.stream) {
                    self.up = Some(up);
                    return Ok(true);
                }
            } else {
                gateway.upstreams.put_raw(&up.target, up.stream);
            }
        }
        if let Some(stream) = gateway.upstreams.take_raw(target) {
            self.up = Some(Upstream {
                target: target.clone(),
                stream,
                counted: None,
            });
            return Ok(true);
        }
        // Boxed: dialing is rare, its future need not sit in every request's.
        let stream = Box::pin(gateway.upstreams.connect_raw(target)).await?;
        self.up = Some(Upstream {
            target: target.clone(),
            stream,
            counted: None,
        });
        Ok(false)
    }

    /// Write the request head upstream and read the response head (past
    /// any 1xx heads); `out` then holds the client's head.
    async fn request(
        &mut self,
        gateway: &Gateway,
        plan: &Plan,
        out: &mut Vec<u8>,
        from_up: &mut Input,
        closing: &Closing,
    ) -> Result<Head, Fail> {
        let Lane { up, timer, .. } = self;
        let Some(up) = up.as_mut() else {
            return Err(Fail::Unanswered("no upstream socket".into()));
        };
        if let Err(error) = up.stream.write_all(out).await {
            return Err(Fail::Unanswered(error.to_string()));
        }
        let deadline = Instant::from_std(plan.started) + gateway.upstreams.response_timeout();
        let mut answered = false;
        loop {
            if !from_up.is_empty() {
                let close = plan.close || closing.is_closing();
                out.clear();
                match parse_response(from_up.bytes(), plan.head_only, close, out) {
                    Parsed::Final(head) => {
                        from_up.consume(head.len);
                        return Ok(head);
                    }
                    Parsed::Informational(len) => {
                        // Not passed on (the general path's client drops
                        // them too): the final response follows.
                        from_up.consume(len);
                        continue;
                    }
                    Parsed::Bad(why) => {
                        return Err(Fail::Upstream(UpstreamError::Failed(why.into())))
                    }
                    Parsed::Partial if from_up.is_full() => {
                        if !from_up.grow(MAX_RESPONSE_HEAD) {
                            return Err(Fail::Upstream(UpstreamError::Failed(
                                "response head too large".into(),
                            )));
                        }
                    }
                    Parsed::Partial => {}
                }
            }
            match read_until(&mut up.stream, from_up, timer, deadline).await {
                Ok(0) if answered => {
                    return Err(Fail::Upstream(UpstreamError::Failed(
                        "connection closed inside the response head".into(),
                    )))
                }
                Ok(0) => return Err(Fail::Unanswered("connection closed".into())),
                Ok(_) => answered = true,
                Err(None) => return Err(Fail::Upstream(UpstreamError::Timeout)),
                Err(Some(error)) if answered => {
                    return Err(Fail::Upstream(UpstreamError::Failed(error.to_string())))
                }
                Err(Some(error)) => return Err(Fail::Unanswered(error.to_string())),
            }
        }
    }

    /// Write the head in `out` and the body after it to the client. Whether
    /// the body ended where its framing says, with the upstream socket
    /// fit for another exchange; and whether all of it went in one write.
    async fn relay(&mut self, head: &Head, out: &mut Vec<u8>, from_up: &mut Input) -> (bool, bool) {
        self.relaying = true;
        let Lane {
            stream: client, up, ..
        } = self;
        let Some(up) = up.as_mut() else {
            return (false, false);
        };
        let mut writes = 0;
        let mut chunks = Chunks::default();
        let mut left = match head.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut first = true;
        // A long body moves in bigger reads: fewer system calls per byte.
        if left > BUF as u64 || matches!(head.framing, Framing::Chunked | Framing::Close) {
            from_up.grow(RELAY_BUF);
            from_up.grow(RELAY_BUF);
        }
        loop {
            // Body bytes at hand: how many belong to this response, and
            // whether it is complete with them.
            let have = from_up.bytes();
            // (relayed, used, done): a chunked body's trailer section is
            // used but not relayed; its end is written here instead.
            let (take, used, done) = match head.framing {
                Framing::Empty => (0, 0, true),
                Framing::Length(_) => {
                    let take = (have.len() as u64).min(left) as usize;
                    left -= take as u64;
                    (take, take, left == 0)
                }
                Framing::Chunked => match chunks.scan(have) {
                    Ok(scan) => (scan.relay, scan.used, scan.done),
                    Err(()) => return (false, false),
                },
                Framing::Close => (have.len(), have.len(), false),
            };
            let extra = have.len() > used;
            let end: &[u8] = match done && head.framing == Framing::Chunked {
                true => b"\r\n",
                false => b"",
            };
            let sent = if first || out.len() + take + end.len() <= BUF {
                // The head and the body's first bytes in one write when small.
                if !first {
                    out.clear();
                }
                first = false;
                out.extend_from_slice(&have[..take]);
                out.extend_from_slice(end);
                client.write_all(out).await
            } else {
                match client.write_all(&have[..take]).await {
                    Ok(()) => client.write_all(end).await,
                    Err(error) => Err(error),
                }
            };
            writes += 1;
            from_up.consume(used);
            if sent.is_err() {
                return (false, false);
            }
            if done {
                // Anything the upstream sent past its response is a fault:
                // its socket is not reused.
                return (!extra, writes == 1);
            }
            from_up.clear();
            match read_some(&mut up.stream, from_up).await {
                Ok(0) => return (false, false),
                Ok(_) => {}
                Err(_) => return (false, false),
            }
        }
    }

    /// 502 or 504 page for an upstream that failed before its response
    /// head; when it was written, if the client connection stays open.
    async fn fail(
        &mut self,
        gateway: &Gateway,
        plan: &Plan,
        error: UpstreamError,
    ) -> Option<std::time::Instant> {
        let route = &gateway.config.routes[plan.route];
        let series = &gateway.route_metrics[plan.route];
        series.upstream_errors.inc();
        tracing::warn!(upstream = %route.upstream, %error, "upstream request failed");
        let answer = gateway.upstream_failed(plan.audience, &error);
        let status = answer.status().as_u16();
        let elapsed = plan.started.elapsed();
        series.observe(status, elapsed);
        if let Some(log) = &plan.log {
            self.log(plan, log, status, elapsed);
        }
        let bytes = serialize(answer, plan.close).await;
        let keep = self.stream.write_all(&bytes).await.is_ok() && !plan.close;
        keep.then(std::time::Instant::now)
    }

    fn log(&self, plan: &Plan, log: &LogFields, status: u16, elapsed: Duration) {
        AccessLine {
            client: log.client,
            host: &log.host,
            method: &log.method,
            path: &log.path,
            status,
            route: Some(plan.route),
            user: log.user.as_deref(),
        }
        .log(elapsed);
    }

    /// Wait for bytes from the client, until `deadline`, and while idle
    /// until the listener closes (`closed`). False: the connection is over
    /// (closed, failed, timed out, shutting down).
    async fn read_client(
        &mut self,
        deadline: Instant,
        mut closed: Option<Pin<&mut tokio::sync::futures::Notified<'_>>>,
    ) -> bool {
        let Lane {
            stream,
            input,
            timer,
            ..
        } = self;
        poll_fn(|cx| {
            // Readiness first: an idle connection takes a buffer only once
            // its next request is there.
            match stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => match input.poll_fill(stream, cx) {
                    Poll::Ready(Ok(n)) => return Poll::Ready(n > 0),
                    Poll::Ready(Err(_)) => return Poll::Ready(false),
                    Poll::Pending => {}
                },
                Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Pending => {}
            }
            if let Some(closed) = closed.as_mut() {
                if closed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
            }
            if expired(timer, deadline, cx) {
                return Poll::Ready(false);
            }
            Poll::Pending
        })
        .await
    }

    /// The connection is over: a clean upstream socket goes to the shared list.
    fn end(&mut self, gateway: &Gateway) {
        if let Some(up) = self.up.take() {
            gateway.upstreams.put_raw(&up.target, up.stream);
        }
    }

    fn hand_over(mut self, gateway: &Gateway, once: bool) -> Prefixed {
        gateway.metrics.fast_lane_handoffs.inc();
        self.end(gateway);
        Prefixed {
            read: std::mem::take(&mut self.input),
            inner: self.stream,
            once,
        }
    }
}

/// Read more bytes from the upstream into `input`, until `deadline`.
/// `Err(None)`: the deadline passed.
async fn read_until(
    stream: &mut TcpStream,
    input: &mut Input,
    timer: &mut Pin<Box<Sleep>>,
    deadline: Instant,
) -> Result<usize, Option<std::io::Error>> {
    poll_fn(|cx| match input.poll_fill(stream, cx) {
        Poll::Ready(read) => Poll::Ready(read.map_err(Some)),
        Poll::Pending if expired(timer, deadline, cx) => Poll::Ready(Err(None)),
        Poll::Pending => Poll::Pending,
    })
    .await
}

/// Read more body bytes (no deadline: hyper's client has none either).
async fn read_some(stream: &mut TcpStream, input: &mut Input) -> std::io::Result<usize> {
    poll_fn(|cx| input.poll_fill(stream, cx)).await
}

/// Whether `deadline` has passed. The timer is moved only when the deadline
/// comes earlier than where it is set; when it fires early (the deadline
/// moved on since), it is set again. Most requests touch it not at all.
fn expired(timer: &mut Pin<Box<Sleep>>, deadline: Instant, cx: &mut Context<'_>) -> bool {
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    loop {
        match timer.as_mut().poll(cx) {
            Poll::Pending => return false,
            Poll::Ready(()) if Instant::now() >= deadline => return true,
            Poll::Ready(()) => timer.as_mut().reset(deadline),
        }
    }
}

/// Parse a request head and, if the fast lane serves it, write the upstream
/// request head into `out`. What the request may do is the gate's
/// (`gate::decide`); this only reads bytes, and hands to the general path
/// what it does not frame itself.
fn prepare(
    gateway: &Gateway,
    peer: &Peer,
    verified: &mut Verified,
    bytes: &[u8],
    out: &mut Vec<u8>,
) -> Prepared {
    let server = &gateway.config.server;
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let limit = server.max_headers.min(MAX_HEADERS);
    let head_len = match request.parse_with_uninit_headers(bytes, &mut storage[..limit]) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Prepared::Partial,
        Err(_) => return Prepared::General("request head hyper judges"),
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version)
    else {
        return Prepared::General("not HTTP/1.1");
    };
    if head_len > server.max_header_bytes.max(8192)
        || !target.starts_with('/')
        || !target.bytes().all(uri_byte)
    {
        return Prepared::General("request target");
    }
    let trusted = gateway.trusts(peer.addr.ip());
    let headers: &[httparse::Header<'_>] = request.headers;
    let cookie_name = gateway.config.session.cookie_name.as_bytes();
    let mut host = None;
    let mut hosts = 0;
    let mut close = false;
    let mut ours = false;
    let mut accept = None;
    let mut fetch_mode = None;
    let mut requested_with = false;
    let mut origin = false;
    let mut request_method = false;
    let mut claimed_proto = None;
    for header in headers {
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host = Some(header.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            if header.value != b"0" {
                return Prepared::Once("request body");
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
        {
            return Prepared::Once("request body");
        } else if name.eq_ignore_ascii_case("upgrade") {
            return Prepared::General("upgrade");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in headers::tokens(header.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Prepared::General("upgrade");
                }
            }
        } else if name.eq_ignore_ascii_case("cookie") {
            if !header.value.iter().all(|&b| visible(b)) {
                return Prepared::General("cookie bytes");
            }
            ours |= contains(header.value, cookie_name);
        } else if name.eq_ignore_ascii_case("accept") {
            accept.get_or_insert(header.value);
        } else if name.eq_ignore_ascii_case("sec-fetch-mode") {
            fetch_mode.get_or_insert(header.value);
        } else if name.eq_ignore_ascii_case("x-requested-with") {
            requested_with = true;
        } else if name.eq_ignore_ascii_case("origin") {
            origin = true;
        } else if name.eq_ignore_ascii_case("access-control-request-method") {
            request_method = true;
        } else if name.eq_ignore_ascii_case("x-forwarded-proto") {
            claimed_proto.get_or_insert(header.value);
        }
    }
    let authority = match host {
        Some(host) if hosts == 1 && host.iter().all(|&b| visible(b)) => {
            match std::str::from_utf8(host) {
                Ok(authority) if crate::context::valid_authority(authority) => authority,
                _ => return Prepared::General("host"),
            }
        }
        _ => return Prepared::General("host"),
    };
    let Ok(path) = Canonical::of(target) else {
        return Prepared::Once("malformed path");
    };
    let signed_in = match ours {
        true => match session(gateway, verified, headers) {
            Lookup::Found(signed_in) => Some(signed_in),
            Lookup::Anonymous => None,
            Lookup::Fetch(id) => return Prepared::Fetch(id),
        },
        false => None,
    };
    let client_ip = match trusted {
        true => {
            let hops: Vec<&str> = headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
                .filter_map(|h| std::str::from_utf8(h.value).ok())
                .collect();
            gateway.client_behind(peer.addr.ip(), &hops)
        }
        false => peer.addr.ip(),
    };
    let host = host_key(authority);
    let https = crate::context::https(false, trusted, claimed_proto);
    let facts = crate::gate::Request {
        method,
        host: &host,
        path: &path,
        navigation: crate::gate::is_navigation(method, requested_with, fetch_mode, accept),
        preflight: crate::gate::is_preflight(method, origin, request_method),
        client_ip,
        https,
        headers: None,
    };
    let verdict = crate::gate::decide(
        &gateway.config.routes,
        &server.prefix,
        &facts,
        signed_in.as_ref(),
    );
    let (index, identity) = match verdict {
        Verdict::Forward { route, identity } => (route, identity),
        Verdict::Reserved => return Prepared::Once("flowgate's own path"),
        Verdict::NoRoute => return Prepared::Once("no route"),
        Verdict::Refused(_) => return Prepared::Once("path refused"),
        Verdict::Forbidden { .. } => return Prepared::Once("user not allowed"),
        // A route's policies may read any header: the general path has
        // them all, parsed.
        Verdict::NeedsHeaders { .. } => return Prepared::General("route policies"),
        Verdict::SignIn { .. } | Verdict::Unauthorized { .. } | Verdict::StepUp { .. } => {
            return Prepared::Once("no session")
        }
    };
    let route = &gateway.config.routes[index];
    let Some(upstream) = gateway.targets[index].as_ref().filter(|t| !t.tls) else {
        return Prepared::General("https upstream");
    };

    // The upstream's request head: the canonical target, the rewritten fields.
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(route.upstream.path().trim_end_matches('/').as_bytes());
    out.extend_from_slice(path.path.as_bytes());
    if let Some(query) = path.query {
        out.push(b'?');
        out.extend_from_slice(query.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let outgoing = headers::Outgoing {
        peer: peer.addr.ip(),
        peer_text: &peer.ip,
        trusted,
        https,
        client_ip,
        authority,
        host: match route.preserve_host {
            true => authority,
            false => upstream.authority.as_str(),
        },
        cookie_name: &gateway.config.session.cookie_name,
        identity: identity.as_deref(),
        identity_headers: &route.headers,
    };
    headers::rewrite(|| headers.iter(), &outgoing, out);
    out.extend_from_slice(b"\r\n");

    let log = gateway.config.log.access.then(|| {
        Box::new(LogFields {
            client: client_ip,
            method: method.to_owned(),
            path: target.split_once('?').map_or(target, |(p, _)| p).to_owned(),
            host: host.into_owned(),
            user: identity.as_ref().map(|i| i.username.clone()),
        })
    });
    Prepared::Forward(Plan {
        head_len,
        route: index,
        head_only: method == "HEAD",
        close,
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        audience: Audience::of(accept),
        started: std::time::Instant::now(),
        log,
        session: signed_in.filter(|_| identity.is_some()).map(|s| s.id),
    })
}

enum Lookup {
    Found(SignedIn),
    Anonymous,
    /// The store cannot answer this id without a round trip.
    Fetch(String),
}

/// The session the request's cookie names, as `gate::signed_in` finds it.
fn session(gateway: &Gateway, verified: &mut Verified, headers: &[httparse::Header<'_>]) -> Lookup {
    let name = gateway.config.session.cookie_name.as_str();
    let idle = gateway.config.session.idle_timeout;
    // A fetched answer is for the head it was fetched for, the one being
    // prepared again now: never kept for a later request, which would take
    // it for the store's answer long after the session ended.
    let mut fetched = verified.fetched.take();
    for header in headers {
        if !header.name.eq_ignore_ascii_case("cookie") {
            continue;
        }
        // Visible ASCII, checked in `prepare`.
        let Ok(text) = std::str::from_utf8(header.value) else {
            continue;
        };
        for pair in text.split(';') {
            let Some((key, value)) = pair.trim().split_once('=') else {
                continue;
            };
            if key.trim() != name {
                continue;
            }
            let Some(id) = verified.id(gateway, value.trim().trim_matches('"')) else {
                continue;
            };
            let answer = match gateway.sessions.authenticated_now(&id, idle) {
                Some(answer) => answer,
                None => match fetched.take() {
                    Some((fetched, answer)) if *fetched == *id => Ok(answer),
                    _ => return Lookup::Fetch(id.to_string()),
                },
            };
            match answer {
                Ok(Some(session)) => {
                    if let Some(signed_in) = crate::gate::live(gateway, &id, session) {
                        return Lookup::Found(signed_in);
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    crate::gate::store_failed(&error);
                    return Lookup::Anonymous;
                }
            }
        }
    }
    Lookup::Anonymous
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Visible ASCII, space and tab: what `HeaderValue::to_str` accepts.
fn visible(b: u8) -> bool {
    (0x20..0x7f).contains(&b) || b == b'\t'
}

/// Bytes a request target may carry as it is (RFC 3986: unreserved,
/// sub-delims, `:@/?%`); anything else is for hyper to judge.
fn uri_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// Parse a response head from the upstream; on success, write the head the
/// client gets into `out`: hop-by-hop headers out, the framing flowgate
/// relays the body with, `connection: close` when the client connection
/// ends after it.
fn parse_response(bytes: &[u8], head_only: bool, close: bool, out: &mut Vec<u8>) -> Parsed {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        bytes,
        &mut storage,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Bad("malformed response head"),
    };
    let (Some(status), Some(_)) = (response.code, response.version) else {
        return Parsed::Bad("malformed response head");
    };
    let headers: &[httparse::Header<'_>] = response.headers;
    if status == 101 {
        return Parsed::Bad("switched protocols unasked");
    }
    let informational = (100..200).contains(&status);
    if informational {
        return Parsed::Informational(len);
    }
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut upstream_close = false;
    let mut named = false;
    for header in headers {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let Some(n) = std::str::from_utf8(header.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
            else {
                return Parsed::Bad("invalid content-length");
            };
            if length.is_some_and(|seen| seen != n) {
                return Parsed::Bad("conflicting content-length");
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = headers::tokens(header.value).last();
            chunked = Some(last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in headers::tokens(header.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    upstream_close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    named = true;
                }
            }
        }
    }
    let framing = if head_only || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    out.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for header in headers {
        let name = header.name;
        if headers::is_hop_by_hop(name)
            || (named && headers::listed(headers.iter(), name))
            || (chunked.is_some() && name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        put_header(out, name.as_bytes(), header.value);
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close || framing == Framing::Close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Parsed::Final(Head {
        len,
        status,
        framing,
        upstream_close,
    })
}

fn itoa3(status: u16) -> [u8; 3] {
    let status = status.min(999);
    [
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]
}

/// Where a chunked body ends. The body is relayed as it comes (chunk
/// sizes, extensions, trailers and all); this only follows along.
#[derive(Default)]
struct Chunks {
    state: ChunkState,
    /// Bytes of chunk data still to come.
    data: u64,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of a chunk size; `true` once one was seen.
    #[default]
    Size,
    SizeDigits,
    /// After the size: extensions or whitespace, up to CR.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
}

/// What `Chunks::scan` made of some bytes.
#[derive(Debug, PartialEq, Eq)]
struct Scan {
    /// Bytes to pass on: all, up to the trailer section.
    relay: usize,
    /// Bytes that belong to this body.
    used: usize,
    /// The body ended with them (the caller writes the final CRLF).
    done: bool,
}

impl Chunks {
    /// Follow `bytes` of the body.
    fn scan(&mut self, bytes: &[u8]) -> Result<Scan, ()> {
        use ChunkState::*;
        let in_trailers = |state| matches!(state, TrailerStart | Trailer | TrailerLf | EndLf);
        let mut relay = if in_trailers(self.state) {
            Some(0)
        } else {
            None
        };
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                Size | SizeDigits => match (b as char).to_digit(16) {
                    Some(d) => {
                        self.data = self
                            .data
                            .checked_mul(16)
                            .and_then(|n| n.checked_add(d as u64))
                            .ok_or(())?;
                        self.state = SizeDigits;
                    }
                    None if self.state == SizeDigits => {
                        self.state = Extension;
                        continue;
                    }
                    None => return Err(()),
                },
                Extension => match b {
                    b'\r' => self.state = SizeLf,
                    b'\n' => return Err(()),
                    _ => {}
                },
                SizeLf => {
                    expect(b, b'\n')?;
                    if self.data == 0 {
                        self.state = TrailerStart;
                        relay = Some(i + 1);
                    } else {
                        self.state = Data;
                    }
                }
                Data => {
                    let take = (self.data).min((bytes.len() - i) as u64) as usize;
                    self.data -= take as u64;
                    i += take;
                    if self.data == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    expect(b, b'\r')?;
                    self.state = DataLf;
                }
                DataLf => {
                    expect(b, b'\n')?;
                    self.state = Size;
                }
                TrailerStart => match b {
                    b'\r' => self.state = EndLf,
                    b'\n' => return Err(()),
                    _ => self.state = Trailer,
                },
                Trailer => {
                    if b == b'\r' {
                        self.state = TrailerLf;
                    }
                }
                TrailerLf => {
                    expect(b, b'\n')?;
                    self.state = TrailerStart;
                }
                EndLf => {
                    expect(b, b'\n')?;
                    return Ok(Scan {
                        relay: relay.unwrap_or(0),
                        used: i + 1,
                        done: true,
                    });
                }
            }
            i += 1;
        }
        Ok(Scan {
            relay: relay.unwrap_or(bytes.len()),
            used: bytes.len(),
            done: false,
        })
    }
}

/// The byte a chunked body must have here.
fn expect(b: u8, want: u8) -> Result<(), ()> {
    if b == want {
        Ok(())
    } else {
        Err(())
    }
}

/// One of flowgate's own responses (an error page), as HTTP/1.1 bytes.
async fn serialize(response: http::Response<crate::Body>, close: bool) -> Vec<u8> {
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => bytes::Bytes::new(),
    };
    let mut out = Vec::with_capacity(512 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or_default()
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        put_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    put_header(
        &mut out,
        b"content-length",
        body.len().to_string().as_bytes(),
    );
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out
}

/// Bytes read from a socket and not used yet, in a pooled buffer that is
/// given back when empty (`release`) or dropped.
#[derive(Default)]
struct Input {
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
}

impl Input {
    fn bytes(&self) -> &[u8] {
        match &self.buf {
            Some(buf) => &buf[self.start..self.end],
            None => &[],
        }
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn is_full(&self) -> bool {
        self.start == 0 && self.buf.as_ref().is_some_and(|buf| self.end == buf.len())
    }

    /// Double the buffer, up to `limit` bytes; false if it is that large.
    fn grow(&mut self, limit: usize) -> bool {
        let Some(buf) = &mut self.buf else {
            return true;
        };
        if buf.len() >= limit {
            return false;
        }
        let mut bigger = vec![0; (buf.len() * 2).min(limit)].into_boxed_slice();
        bigger[..self.end - self.start].copy_from_slice(&buf[self.start..self.end]);
        self.end -= self.start;
        self.start = 0;
        // The old one goes back to the pool; the big one is dropped at the end.
        give_buffer(std::mem::replace(buf, bigger));
        true
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.clear();
        }
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Room to read into: the free end of the buffer, taken from the pool
    /// if there is none, unread bytes moved to the front if needed.
    fn space(&mut self) -> &mut [u8] {
        let buf = self.buf.get_or_insert_with(take_buffer);
        if self.end == buf.len() && self.start > 0 {
            buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut buf[self.end..]
    }

    /// Read from `stream` into the free end: how many bytes came (0: closed).
    fn poll_fill(
        &mut self,
        stream: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        let mut buf = ReadBuf::new(self.space());
        match Pin::new(stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                self.end += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Give the buffer back to the pool, if nothing is left in it.
    fn release(&mut self) {
        if self.is_empty() {
            if let Some(buf) = self.buf.take() {
                give_buffer(buf);
            }
        }
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_buffer(buf);
        }
    }
}

fn take_buffer() -> Box<[u8]> {
    BUFFERS
        .with(|pool| pool.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUF].into_boxed_slice())
}

fn give_buffer(buf: Box<[u8]>) {
    if buf.len() != BUF {
        return;
    }
    BUFFERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL {
            pool.push(buf);
        }
    });
}

/// A pooled buffer for the heads flowgate writes.
struct Out(Vec<u8>);

impl Out {
    fn take() -> Out {
        Out(HEADS
            .with(|pool| pool.borrow_mut().pop())
            .unwrap_or_else(|| Vec::with_capacity(2048)))
    }
}

impl std::ops::Deref for Out {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for Out {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for Out {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.0);
        if buf.capacity() <= 2 * BUF {
            buf.clear();
            HEADS.with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < POOL {
                    pool.push(buf);
                }
            });
        }
    }
}

/// A connection handed to hyper: the bytes the fast lane read of it come
/// first.
pub(crate) struct Prefixed {
    read: Input,
    inner: TcpStream,
    /// Serve one request, then close (see `Prepared::Once`).
    pub(crate) once: bool,
}

impl Prefixed {
    /// A connection the fast lane never saw.
    pub(crate) fn plain(inner: TcpStream) -> Prefixed {
        Prefixed {
            read: Input::default(),
            inner,
            once: false,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.read.is_empty() {
            let bytes = this.read.bytes();
            let n = bytes.len().min(buf.remaining());
            buf.put_slice(&bytes[..n]);
            this.read.consume(n);
            this.read.release();
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(body: &[u8]) -> Result<Scan, ()> {
        Chunks::default().scan(body)
    }

    #[test]
    fn chunked_bodies_end_where_they_say_and_lose_their_trailers() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nNEXT";
        let relay = body.len() - 6;
        let used = body.len() - 4;
        assert_eq!(
            scan_all(body),
            Ok(Scan {
                relay,
                used,
                done: true
            })
        );
        let trailers = b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-B: 2\r\n\r\n";
        assert_eq!(
            scan_all(trailers),
            Ok(Scan {
                relay: 11,
                used: trailers.len(),
                done: true
            })
        );
        // Byte by byte, across reads: the same bytes relayed, the same end.
        let mut chunks = Chunks::default();
        let mut relayed = Vec::new();
        let mut end = None;
        for (i, b) in trailers.iter().enumerate() {
            let scan = chunks.scan(std::slice::from_ref(b)).unwrap();
            relayed.extend_from_slice(&trailers[i..i + scan.relay]);
            if scan.done {
                end = Some(i + 1);
                break;
            }
        }
        assert_eq!(end, Some(trailers.len()));
        assert_eq!(relayed, b"3\r\nabc\r\n0\r\n");
        let partial = scan_all(b"5\r\nhel").unwrap();
        assert!(!partial.done && partial.relay == 6);
        assert_eq!(scan_all(b"zz\r\n"), Err(()));
        assert_eq!(scan_all(b"3\r\nabcX"), Err(()));
        assert_eq!(scan_all(b"ffffffffffffffffff\r\n"), Err(()));
    }

    /// Random bodies, cut at random places: scanning in pieces agrees with
    /// scanning whole, and nothing panics on garbage.
    #[test]
    fn chunk_scanning_does_not_depend_on_how_bytes_arrive() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..2000 {
            let mut body = Vec::new();
            for _ in 0..rng.gen_range(0..4) {
                let data: Vec<u8> = (0..rng.gen_range(1..40)).map(|_| rng.gen()).collect();
                body.extend_from_slice(format!("{:x}", data.len()).as_bytes());
                if rng.gen_bool(0.3) {
                    body.extend_from_slice(b";name=value");
                }
                body.extend_from_slice(b"\r\n");
                body.extend_from_slice(&data);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n");
            if rng.gen_bool(0.3) {
                body.extend_from_slice(b"X-Trailer: t\r\n");
            }
            body.extend_from_slice(b"\r\n");
            if round % 3 == 0 {
                // Garbage somewhere: any answer will do but a panic.
                let at = rng.gen_range(0..body.len());
                body[at] = rng.gen();
            }
            let whole = Chunks::default().scan(&body);
            let mut pieces = Chunks::default();
            let mut relayed = 0;
            let mut used = 0;
            let mut result = Ok(false);
            while used < body.len() {
                let end = (used + rng.gen_range(1..16)).min(body.len());
                match pieces.scan(&body[used..end]) {
                    Ok(scan) => {
                        relayed += scan.relay;
                        used += scan.used;
                        if scan.done {
                            result = Ok(true);
                            break;
                        }
                    }
                    Err(()) => {
                        result = Err(());
                        break;
                    }
                }
            }
            match whole {
                Ok(scan) if scan.done => {
                    assert_eq!(result, Ok(true), "round {round}");
                    assert_eq!((relayed, used), (scan.relay, scan.used), "round {round}");
                }
                Ok(_) => assert_eq!(result, Ok(false), "round {round}"),
                Err(()) => assert_eq!(result, Err(()), "round {round}"),
            }
        }
    }

    /// Random response heads, whole and cut short: parsed or refused,
    /// never a panic, and what is written is a head.
    #[test]
    fn response_parsing_survives_garbage() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let good = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: x, close\r\nX: y\r\nTransfer-Encoding: chunked\r\n\r\n";
        for _ in 0..5000 {
            let mut head = good.to_vec();
            for _ in 0..rng.gen_range(0..4) {
                let at = rng.gen_range(0..head.len());
                head[at] = rng.gen();
            }
            head.truncate(rng.gen_range(0..=head.len()));
            let mut out = Vec::new();
            if let Parsed::Final(parsed) = parse_response(&head, rng.gen(), rng.gen(), &mut out) {
                assert!(parsed.len <= head.len());
                assert!(out.starts_with(b"HTTP/1.1 ") && out.ends_with(b"\r\n\r\n"));
            }
        }
    }

    /// Random request heads around a signed-in one: `prepare` forwards or
    /// declines, never panics, and what it writes upstream is one clean
    /// head: no stray CR or LF (no header injection), flowgate's cookie and
    /// the client's identity claims left out.
    #[tokio::test]
    async fn prepared_upstream_heads_stay_clean_whatever_comes_in() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("users.toml"),
            "[[user]]\nusername = \"alice\"\n",
        )
        .unwrap();
        let path = dir.path().join("flowgate.toml");
        let text = "[session]\nsecret = \"unit-secret-unit-secret-unit-secret-0123\"\n\
            [directory]\nusers_file = \"users.toml\"\n\
            [[route]]\nupstream = \"http://127.0.0.1:9\"\nskip_auth = [\"^/open\"]\n";
        let config = crate::config::from_str(text, &path, &|_| None).unwrap();
        let app = crate::app::App::new(config, None).unwrap();
        let gateway = app.gateway();
        let identity = crate::identity::Identity {
            username: "alice".into(),
            name: "Alice".into(),
            email: "alice@example.test".into(),
            groups: vec!["staff".into()],
            uid: "u".into(),
            pk: 1,
            is_superuser: false,
            header_values: Default::default(),
        };
        let now = crate::session::now_secs();
        let mut session =
            crate::session::Session::authenticated(identity, now, Duration::from_secs(600));
        session.completed = vec![gateway.config.routes[0].flow.clone()];
        gateway
            .sessions
            .put("sid", &session, Duration::from_secs(600))
            .await
            .unwrap();
        // Read once, as the fast lane's first request on it does: cached.
        gateway
            .sessions
            .authenticated("sid", Duration::from_secs(600))
            .await
            .unwrap();
        let cookie = gateway.signer.sign("sid");
        let good = format!(
            "GET /app?x=1 HTTP/1.1\r\nHost: app.test\r\nCookie: a=1; flowgate_session={cookie}\r\n\
             X-Forwarded-User: mallory\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n"
        );
        let peer = Peer::new("127.0.0.1:5555".parse().unwrap());
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut forwarded = 0;
        for round in 0..5000 {
            let mut head = good.clone().into_bytes();
            if round % 5 != 0 {
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..head.len());
                    head[at] = *[b'\r', b'\n', b' ', b':', b'\0', 0x80, b'x']
                        .get(rng.gen_range(0..7))
                        .unwrap();
                }
            }
            let mut out = Vec::new();
            let mut verified = Verified::default();
            let Prepared::Forward(plan) = prepare(&gateway, &peer, &mut verified, &head, &mut out)
            else {
                continue;
            };
            forwarded += 1;
            assert!(plan.head_len <= head.len());
            let text = String::from_utf8_lossy(&out);
            assert!(text.ends_with("\r\n\r\n"), "{text}");
            for line in text.trim_end_matches("\r\n\r\n").split("\r\n") {
                assert!(!line.contains(['\r', '\n']), "stray line break: {text:?}");
                assert!(!line.is_empty(), "empty line inside the head: {text:?}");
            }
            // What the mutations left intact must still be stripped.
            let sent = String::from_utf8_lossy(&head);
            let lower = text.to_ascii_lowercase();
            if sent.contains("\r\nX-Forwarded-User: mallory\r\n") {
                assert!(!lower.contains("mallory"), "{text}");
            }
            if sent.contains("\r\nConnection: keep-alive, X-Hop\r\n") {
                assert!(!lower.contains("x-hop"), "{text}");
            }
            assert!(!lower.contains("flowgate_session"), "{text}");
        }
        // The unmutated head (every fifth) and some mutations went through.
        assert!(forwarded >= 1000, "{forwarded}");
    }

    #[test]
    fn response_heads_lose_hop_by_hop_headers_and_say_how_they_end() {
        let head = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 5\r\nX-App: 1\r\n\r\nhello";
        let mut out = Vec::new();
        let Parsed::Final(parsed) = parse_response(head, false, false, &mut out) else {
            panic!("not parsed");
        };
        assert_eq!(parsed.len, head.len() - 5);
        assert!(parsed.framing == Framing::Length(5));
        assert!(!parsed.upstream_close);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-App: 1\r\n\r\n"
        );

        let mut out = Vec::new();
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\nConnection: close\r\n\r\n";
        let Parsed::Final(parsed) = parse_response(chunked, false, true, &mut out) else {
            panic!("not parsed");
        };
        assert!(parsed.framing == Framing::Chunked && parsed.upstream_close);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );

        let mut out = Vec::new();
        let conflicting = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert!(matches!(
            parse_response(conflicting, false, false, &mut out),
            Parsed::Bad(_)
        ));
        let mut out = Vec::new();
        let unlimited = b"HTTP/1.1 200 OK\r\n\r\n";
        let Parsed::Final(parsed) = parse_response(unlimited, false, false, &mut out) else {
            panic!("not parsed");
        };
        assert!(parsed.framing == Framing::Close);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("connection: close"));
        let mut out = Vec::new();
        let head_only = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n";
        let Parsed::Final(parsed) = parse_response(head_only, true, false, &mut out) else {
            panic!("not parsed");
        };
        assert!(parsed.framing == Framing::Empty);
    }
}
