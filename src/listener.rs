//! Accepting connections: TCP, optionally TLS (rustls, ALPN h2 and
//! http/1.1), each connection served by hyper's auto (HTTP/1.1 + h2)
//! builder, with a graceful stop: on shutdown, stop accepting and give
//! in-flight requests a deadline to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::router::{Connection, Gateway};

/// How long in-flight requests get once shutdown starts.
const DRAIN: Duration = Duration::from_secs(10);
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// Load a PEM certificate chain and key into a TLS acceptor (TLS 1.2+).
pub fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, String> {
    let certs = read_pem(&tls.cert, |r| {
        rustls_pemfile::certs(r).collect::<Result<Vec<_>, _>>()
    })?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", tls.cert.display()));
    }
    let key = read_pem(&tls.key, rustls_pemfile::private_key)?
        .ok_or_else(|| format!("{}: no private key found", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", tls.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_pem<T>(
    path: &Path,
    parse: impl FnOnce(&mut dyn std::io::BufRead) -> std::io::Result<T>,
) -> Result<T, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&mut std::io::BufReader::new(file)).map_err(|e| format!("{}: {e}", path.display()))
}

/// Accept and serve until `shutdown` resolves, then drain.
pub async fn run(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let sweeper = tokio::spawn(purge_sessions(gateway.clone()));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off, don't spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let gateway = gateway.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_connection(builder, watcher, stream, gateway, Connection { peer, tls: false }).await,
                        Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => serve_connection(builder, watcher, stream, gateway, Connection { peer, tls: true }).await,
                            Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        },
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    sweeper.abort();
    tracing::info!("shutting down: no new connections, waiting for in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(DRAIN) => tracing::warn!("gave up waiting for connections after {DRAIN:?}"),
    }
}

async fn serve_connection<S>(
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    stream: S,
    gateway: Arc<Gateway>,
    connection: Connection,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let gateway = gateway.clone();
        async move { Ok::<_, std::convert::Infallible>(gateway.handle(request, connection).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    if let Err(error) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(peer = %connection.peer, error = %error, "connection ended with an error");
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
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

/// Bind, log where, and serve until a shutdown signal.
pub async fn serve(gateway: Arc<Gateway>) -> Result<(), String> {
    let server = &gateway.config.server;
    let tls = server.tls.as_ref().map(tls_acceptor).transpose()?;
    let listener = TcpListener::bind(server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", server.listen))?;
    let local: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!("listening on {local} ({scheme})");
    run(gateway, listener, tls, shutdown_signal()).await;
    Ok(())
}

/// Expired sessions are invisible at once (every read checks the deadline);
/// this takes their memory back, once a minute.
async fn purge_sessions(gateway: Arc<Gateway>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match gateway.sessions.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "expired sessions removed"),
            Err(error) => tracing::warn!(%error, "could not purge expired sessions"),
        }
    }
}
