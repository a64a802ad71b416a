//! `[executor_api]`: the embedded flow executor served to others at
//! authentik's own paths, so that remote flowgates (`executor.kind =
//! "remote"`) and authentik's client libraries can run this flowgate's
//! flows. The handlers are the JSON API's (`api`), the very ones under the
//! main listener's prefix; only the paths differ.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::app::App;
use crate::context::{Connection, Context};
use crate::Body;

/// Serve the executor API on `listener` (over TLS when `tls` is given)
/// until the process ends. Each request uses the gateway of the moment.
pub async fn serve(listener: TcpListener, app: Arc<App>, tls: Option<TlsAcceptor>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let connection = Connection {
                peer,
                tls: tls.is_some(),
            };
            let service = service_fn(move |request| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(answer(&app, request, connection).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            match tls {
                Some(acceptor) => {
                    let Ok(Ok(stream)) = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await
                    else {
                        return;
                    };
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

async fn answer(app: &App, request: Request<Incoming>, connection: Connection) -> Response<Body> {
    let gateway = app.gateway();
    let context = Context::of(&gateway, &request, connection);
    let path = request.uri().path().to_owned();
    if let Some(slug_path) = path.strip_prefix("/api/v3/flows/executor/") {
        return crate::api::executor(&gateway, request, &context, slug_path).await;
    }
    match path.as_str() {
        "/api/v3/core/users/me/" => crate::api::users_me(&gateway, &request).await,
        _ => crate::api::json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not found."})),
    }
}
