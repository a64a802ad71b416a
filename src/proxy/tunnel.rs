//! Upgraded connections (websockets): once the upstream answers 101, the
//! client's and the upstream's connections are joined into a byte tunnel
//! that outlives the request, closed after `proxy.tunnel_idle_timeout` of
//! silence either way, or when the session it was opened for ends.

use http::header::UPGRADE;
use http::Response;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::{keep_upgrade, strip_hop_by_hop};
use crate::upstream::ConnHold;
use crate::{empty, Body};

/// The upstream agreed to switch: answer the client 101 with the upstream's
/// headers, and join the two connections once hyper hands them over (the
/// client's only after this 101 is written).
pub(super) fn switch(
    mut response: Response<Incoming>,
    client: OnUpgrade,
    hold: Option<ConnHold>,
    idle_timeout: std::time::Duration,
    ending: Option<super::Ending>,
) -> Response<Body> {
    let upstream = hyper::upgrade::on(&mut response);
    let protocol = response.headers().get(UPGRADE).cloned();
    let (mut parts, _) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = protocol {
        keep_upgrade(&mut parts.headers, protocol);
    }
    tokio::spawn(tunnel(client, upstream, hold, idle_timeout, ending));
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
    ending: Option<super::Ending>,
) {
    let ended = async {
        match ending {
            Some(ending) => ending.await,
            None => std::future::pending().await,
        }
    };
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
        () = ended => tracing::info!("tunnel closed: its session ended"),
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
