//! The admin listener (`[admin] listen`, default 127.0.0.1:9090): liveness,
//! readiness and Prometheus metrics, apart from the traffic port so that it
//! can stay private.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::app::App;
use crate::respond::text;
use crate::Body;

/// How many client connections the main listener has open, asked per
/// `/metrics` scrape.
pub type OpenConnections = Arc<dyn Fn() -> usize + Send + Sync>;

pub async fn serve(listener: TcpListener, app: Arc<App>, open: OpenConnections) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let app = app.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let app = app.clone();
                let open = open.clone();
                async move { Ok::<_, Infallible>(answer(&app, &*open, request).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    app: &App,
    open: &(dyn Fn() -> usize + Send + Sync),
    request: Request<Incoming>,
) -> Response<Body> {
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            // Ready: built, and the session store answers.
            let store = app.gateway().sessions.count_authenticated().await;
            match (app.is_ready(), store) {
                _ if app.is_stopping() => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: shutting down\n",
                ),
                (true, Ok(_)) => text(StatusCode::OK, "ready\n"),
                (false, _) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: starting\n"),
                (_, Err(_)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: session store unavailable\n",
                ),
            }
        }
        "/metrics" => {
            let sessions = app.gateway().sessions.count_authenticated().await.ok();
            let body = app.metrics.render(sessions, open());
            let mut response = Response::new(crate::full(body));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n",
        ),
    }
}
