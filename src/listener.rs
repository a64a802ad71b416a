//! Accepting connections: TCP, optionally TLS (rustls, ALPN h2 and
//! http/1.1; h2c by prior knowledge on plain listeners), each connection
//! served by hyper's auto (HTTP/1.1 + h2) builder under the limits of
//! `[server]`: a connection cap, header size and count, a deadline for each
//! request head (slowloris) and for idle keep-alive. On shutdown: stop
//! accepting, give in-flight requests `shutdown_timeout` to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::StatusCode;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

use crate::app::App;
use crate::config::Server;
use crate::context::Connection;
use crate::proxy::h1::{Closing, Deadlines, Prefixed};
use crate::upstream::{ConnHold, ConnSlot};
use crate::Body;

const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// What every connection of one listener shares.
pub struct Listener {
    app: Arc<App>,
    /// The TLS settings, swapped when certificates change; `None`: plain.
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    limits: Limits,
    connections: Arc<Semaphore>,
    max_connections: usize,
    /// Tells idle connections to close, and busy ones to close after
    /// their requests (graceful shutdown).
    closing: Closing,
    /// hyper's server settings, for connections on the general path.
    builder: auto::Builder<TokioExecutor>,
    /// The same, HTTP/1.1 without keep-alive: for a connection the fast
    /// lane hands over for one request.
    builder_once: auto::Builder<TokioExecutor>,
}

#[derive(Clone, Copy)]
struct Limits {
    header_read_timeout: Duration,
    keepalive_timeout: Duration,
    shutdown_timeout: Duration,
}

impl Listener {
    pub fn new(app: Arc<App>, tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>) -> Listener {
        let gateway = app.gateway();
        let server = &gateway.config.server;
        Listener {
            tls,
            limits: Limits {
                header_read_timeout: server.header_read_timeout,
                keepalive_timeout: server.keepalive_timeout,
                shutdown_timeout: server.shutdown_timeout,
            },
            connections: Arc::new(Semaphore::new(server.max_connections)),
            max_connections: server.max_connections,
            closing: Closing::default(),
            builder: builder(server),
            builder_once: {
                let mut once = builder(server);
                once.http1().keep_alive(false);
                once
            },
            app,
        }
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.max_connections - self.connections.available_permits()
    }

    /// Accept and serve until `shutdown` resolves, then drain.
    pub async fn run(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let sweeper = tokio::spawn(purge_sessions(self.app.clone()));
        // Sessions ended by other processes (the CLI, other replicas) leave
        // this one's cache within a quarter second.
        self.app
            .gateway()
            .sessions
            .watch(Duration::from_millis(250))
            .await;
        tokio::pin!(shutdown);
        loop {
            // At the cap, stop accepting: further clients wait in the
            // kernel's backlog instead of costing memory here.
            let permit = tokio::select! {
                permit = self.connections.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = &mut shutdown => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off, don't spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            self.app.metrics.connections_accepted.inc();
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            // This task lives as long as the connection: what it holds
            // while a fast-lane connection idles is all that connection
            // costs, so the general path's larger state is boxed.
            tokio::spawn(async move {
                match &this.tls {
                    None => {
                        let stream = match this.app.gateway().config.server.fast_lane {
                            true => {
                                let deadlines = Deadlines {
                                    header_read_timeout: this.limits.header_read_timeout,
                                    keepalive_timeout: this.limits.keepalive_timeout,
                                };
                                let lane = crate::proxy::h1::serve(
                                    &this.app,
                                    stream,
                                    peer,
                                    &this.closing,
                                    deadlines,
                                );
                                match lane.await {
                                    // Served to the end on the fast lane.
                                    None => return,
                                    Some(handed_over) => handed_over,
                                }
                            }
                            false => Prefixed::plain(stream),
                        };
                        let connection = Connection { peer, tls: false };
                        Box::pin(this.serve_http(stream, connection, permit)).await
                    }
                    Some(tls) => Box::pin(this.serve_tls(tls, stream, peer, permit)).await,
                }
            });
        }
        drop(listener);
        sweeper.abort();
        let deadline = self.limits.shutdown_timeout;
        tracing::info!(
            "shutting down: no new connections, waiting up to {deadline:?} for requests in flight"
        );
        // Idle connections close now, busy ones after their requests;
        // upgraded ones (websockets) are not hyper's any more but still
        // hold their slot until they end.
        self.closing.close();
        let drained = async {
            while self.open_connections() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            _ = drained => tracing::info!("all connections closed"),
            _ = tokio::time::sleep(deadline) => tracing::warn!(
                open = self.open_connections(),
                "gave up waiting for connections after {deadline:?}"
            ),
        }
    }

    async fn serve_tls(
        &self,
        tls: &ArcSwap<rustls::ServerConfig>,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let mut stream = stream;
        if plain_http_on_tls(&mut stream).await {
            tracing::debug!(%peer, "plain HTTP on the TLS listener: answered 400");
            return;
        }
        let acceptor = TlsAcceptor::from(tls.load_full());
        let state = Arc::new(ConnState::default());
        let stream = Watchdog::new(stream, state.clone(), self.limits);
        match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                let connection = Connection { peer, tls: true };
                self.serve_connection(&self.builder, stream, state, connection, permit)
                    .await
            }
            Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
    }

    async fn serve_http(
        &self,
        stream: Prefixed,
        connection: Connection,
        permit: OwnedSemaphorePermit,
    ) {
        let builder = match stream.once {
            true => &self.builder_once,
            false => &self.builder,
        };
        let state = Arc::new(ConnState::default());
        let stream = Watchdog::new(stream, state.clone(), self.limits);
        self.serve_connection(builder, stream, state, connection, permit)
            .await
    }

    /// One connection on the general path: hyper's HTTP/1.1 and HTTP/2,
    /// each request through `Gateway::handle`.
    async fn serve_connection<S>(
        &self,
        builder: &auto::Builder<TokioExecutor>,
        stream: S,
        state: Arc<ConnState>,
        connection: Connection,
        permit: OwnedSemaphorePermit,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Shared with tunnels this connection may turn into.
        let hold: ConnHold = Arc::new(permit);
        let app = &self.app;
        let slot = Arc::new(ConnSlot::with_hold(hold));
        let service = {
            let app = app.clone();
            let slot = slot.clone();
            service_fn(move |request| {
                let gateway = app.gateway();
                let slot = slot.clone();
                let state = state.clone();
                let guard = InFlight::start(state.clone());
                // Boxed: hyper keeps room for the service's future inside every
                // connection, idle or not; a box makes that room one pointer, so
                // thousands of idle keep-alive connections stay small.
                Box::pin(async move {
                    let response = gateway.handle(request, connection, &slot).await;
                    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        // A websocket or the like: its own idle rules from here.
                        state.upgraded.store(true, Ordering::Relaxed);
                    }
                    Ok::<_, std::convert::Infallible>(response.map(|body| Tracked {
                        body,
                        _guard: guard,
                    }))
                })
            })
        };
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let mut conn = std::pin::pin!(conn);
        let ended = tokio::select! {
            ended = conn.as_mut() => ended,
            _ = self.closing.closed() => {
                // Finish what is in flight, then close.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(error) = ended {
            tracing::debug!(peer = %connection.peer, error = %error, "connection ended with an error");
        }
        app.gateway().upstreams.release(&slot);
    }
}

fn builder(server: &Server) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The watchdog below keeps these deadlines (hyper's own header
        // timer also runs while a keep-alive connection is idle).
        .header_read_timeout(None)
        .max_headers(server.max_headers)
        // hyper answers 431 when a request head outgrows its read buffer.
        .max_buf_size(server.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(server.max_header_bytes as u32)
        .max_concurrent_streams(256);
    builder
}

/// Per connection: requests in flight (until their response body ends),
/// requests started, and whether the connection was upgraded.
#[derive(Default)]
struct ConnState {
    in_flight: AtomicUsize,
    started: AtomicU64,
    upgraded: AtomicBool,
    /// The connection's reader, parked while requests were in flight: woken
    /// when the last one ends, so that the idle deadline starts then.
    reader: AtomicWaker,
}

/// Counts one request as in flight until dropped with its response body.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn start(state: Arc<ConnState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.started.fetch_add(1, Ordering::Relaxed);
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.reader.wake();
        }
    }
}

/// A response body that keeps its request counted as in flight.
pub struct Tracked {
    body: Body,
    _guard: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    #[inline]
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's I/O with two deadlines, kept only while no request is
/// in flight: the next request head must start within `keepalive_timeout`
/// and, once its first byte came, be complete within `header_read_timeout`.
/// A missed deadline fails the read, and hyper closes the connection.
struct Watchdog<S> {
    inner: S,
    state: Arc<ConnState>,
    limits: Limits,
    deadline: Pin<Box<Sleep>>,
    /// `started` when the current idle period began.
    seen: u64,
    head_started: bool,
}

impl<S> Watchdog<S> {
    fn new(inner: S, state: Arc<ConnState>, limits: Limits) -> Watchdog<S> {
        // The first request head gets the header deadline from the start.
        let deadline = Box::pin(tokio::time::sleep(limits.header_read_timeout));
        Watchdog {
            inner,
            state,
            limits,
            deadline,
            seen: 0,
            head_started: true,
        }
    }

    fn watching(&self) -> bool {
        self.state.in_flight.load(Ordering::Acquire) == 0
            && !self.state.upgraded.load(Ordering::Relaxed)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watchdog<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && !this.head_started && this.watching() {
                    this.head_started = true;
                    let at = Instant::now() + this.limits.header_read_timeout;
                    this.deadline.as_mut().reset(at);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                if !this.watching() {
                    this.state.reader.register(cx.waker());
                    // The last request may have ended in between.
                    if !this.watching() {
                        return Poll::Pending;
                    }
                }
                let started = this.state.started.load(Ordering::Relaxed);
                if started != this.seen {
                    // A request finished since we last looked: a new idle period.
                    this.seen = started;
                    this.head_started = false;
                    let at = Instant::now() + this.limits.keepalive_timeout;
                    this.deadline.as_mut().reset(at);
                }
                match this.deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        if this.head_started {
                            "request head not received in time"
                        } else {
                            "idle keep-alive connection"
                        },
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watchdog<S> {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    #[inline]
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

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
/// A TLS connection starts with a handshake record (0x16); a plain HTTP
/// request with a method's letter. Answer the latter with a page that says
/// so (what a person who typed `http://` sees) instead of a handshake
/// error. Whether it was one; the connection is then done.
async fn plain_http_on_tls(stream: &mut TcpStream) -> bool {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(TLS_HANDSHAKE, stream.peek(&mut first)).await;
    if !matches!(peeked, Ok(Ok(1))) || !first[0].is_ascii_uppercase() {
        return false;
    }
    const BODY: &str = "This port speaks HTTPS: use an https:// address.\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    // Best effort: the client may be gone already. The request is read
    // off after the answer, so that closing does not reset the connection
    // (and lose the answer) over unread bytes.
    let _ = tokio::time::timeout(TLS_HANDSHAKE, async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    true
}

/// `server.redirect_http`: every request, whatever its method, is sent to
/// the same host and path over HTTPS on `port` (308: the method and body
/// are kept). A request without a usable host gets 400.
async fn redirect_to_https(listener: TcpListener, port: u16) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(
                move |request: http::Request<hyper::body::Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(https_redirect(&request, port))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn https_redirect<B>(request: &http::Request<B>, port: u16) -> http::Response<crate::Body> {
    if crate::context::host_problem(request).is_some() {
        return crate::respond::text(StatusCode::BAD_REQUEST, "a request needs one valid Host\n");
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let host = crate::context::host_key(&authority);
    if host.is_empty() {
        // HTTP/1.0 may send no Host: there is nowhere to send it.
        return crate::respond::text(StatusCode::BAD_REQUEST, "a request needs one valid Host\n");
    }
    let host = match host.contains(':') {
        true => format!("[{host}]"),
        false => host.into_owned(),
    };
    let port = match port {
        443 => String::new(),
        port => format!(":{port}"),
    };
    let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{host}{port}{target}");
    crate::respond::redirect(StatusCode::PERMANENT_REDIRECT, &location)
}

pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Bind the gateway's and the admin listener, log where, and serve until a
/// shutdown signal. Reloads (SIGHUP, changed files) run alongside.
pub async fn serve(app: Arc<App>) -> Result<(), String> {
    // Before anything says it listens: a SIGHUP from then on is a reload.
    let hangup = crate::app::Hangup::listen();
    let gateway = app.gateway();
    let server = &gateway.config.server;
    let tls = match server.tls.is_empty() {
        true => None,
        false => Some(Arc::new(ArcSwap::from_pointee(crate::tls::server_config(
            &server.tls,
        )?))),
    };
    let listener = TcpListener::bind(server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", server.listen))?;
    let local: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    let front = Arc::new(Listener::new(app.clone(), tls.clone()));
    if let Some(admin) = gateway.config.admin.listen {
        let admin = TcpListener::bind(admin)
            .await
            .map_err(|e| format!("cannot listen on {admin} (admin.listen): {e}"))?;
        let at = admin.local_addr().map_err(|e| e.to_string())?;
        tracing::info!("admin listening on {at} (/healthz, /readyz, /metrics)");
        let open = front.clone();
        let open_connections = Arc::new(move || open.open_connections());
        tokio::spawn(crate::admin::serve(admin, app.clone(), open_connections));
    }
    if let Some(api) = &gateway.config.executor_api {
        let acceptor = match api.tls.is_empty() {
            true => None,
            false => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                crate::tls::server_config(&api.tls)?,
            ))),
        };
        let bound = TcpListener::bind(api.listen)
            .await
            .map_err(|e| format!("cannot listen on {} (executor_api.listen): {e}", api.listen))?;
        let at = bound.local_addr().map_err(|e| e.to_string())?;
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        tracing::info!("executor API serving on {at} ({scheme}, /api/v3/flows/executor/)");
        tokio::spawn(crate::executor_api::serve(bound, app.clone(), acceptor));
    }
    if let Some(plain) = server.redirect_http {
        let plain = TcpListener::bind(plain)
            .await
            .map_err(|e| format!("cannot listen on {plain} (server.redirect_http): {e}"))?;
        let at = plain.local_addr().map_err(|e| e.to_string())?;
        tracing::info!("redirecting http on {at} to https on port {}", local.port());
        tokio::spawn(redirect_to_https(plain, local.port()));
    }
    tokio::spawn(crate::app::watch(app.clone(), tls, hangup));
    let scheme = if front.tls.is_some() { "https" } else { "http" };
    tracing::info!("listening on {local} ({scheme})");
    let delay = server.shutdown_delay;
    let stopping = app.clone();
    let shutdown = async move {
        shutdown_signal().await;
        stopping.stop();
        if !delay.is_zero() {
            tracing::info!(
                "shutting down: /readyz answers 503; still serving for {delay:?} (server.shutdown_delay) so load balancers can stop sending traffic"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {},
                _ = shutdown_signal() => tracing::info!("a second signal: not waiting any longer"),
            }
        }
    };
    front.run(listener, shutdown).await;
    Ok(())
}

/// Expired sessions are invisible at once (every read checks the deadline);
/// this takes their memory back, once a minute.
async fn purge_sessions(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match app.gateway().sessions.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "expired sessions removed"),
            Err(error) => tracing::warn!(%error, "could not purge expired sessions"),
        }
    }
}
