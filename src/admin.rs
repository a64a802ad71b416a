//! The admin listener (`[admin] listen`, default 127.0.0.1:9090): liveness,
//! readiness and Prometheus metrics, apart from the traffic port so that it
//! can stay private; and, behind a bearer token (`admin.token_file`), the
//! sessions: `GET /sessions[?user=U]`, `DELETE /sessions/{id}`, `DELETE
//! /users/{name}/sessions`.

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
        path if path == "/sessions"
            || path.starts_with("/sessions/")
            || path.starts_with("/users/") =>
        {
            sessions(app, request).await
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics or /sessions\n",
        ),
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(crate::full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// The session endpoints, for the token holder only.
async fn sessions(app: &App, request: Request<Incoming>) -> Response<Body> {
    let gateway = app.gateway();
    let Some(token) = &gateway.config.admin.token else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"detail": "the session endpoints are off: set admin.token_file"}),
        );
    };
    let sent = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token);
    let expected = std::str::from_utf8(&token.0).unwrap_or("");
    if !sent.is_some_and(|sent| crate::session::tokens_equal(sent.trim(), expected)) {
        let detail = match sent {
            Some(_) => "the bearer token is not admin.token_file's",
            None => "a bearer token (admin.token_file) is required",
        };
        let mut response = json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({ "detail": detail }),
        );
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let store = &gateway.sessions;
    let failed = |error: crate::session::StoreError| {
        tracing::warn!(%error, "admin: the session store failed");
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"detail": "the session store is unavailable"}),
        )
    };
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let method = request.method().clone();
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (&method, segments.as_slice()) {
        (&http::Method::GET, ["sessions"]) => {
            let user = crate::flow::form_urlencoded_get(&query, "user");
            match store.list(user.as_deref()).await {
                Ok(listed) => json(StatusCode::OK, serde_json::json!({ "sessions": listed })),
                Err(error) => failed(error),
            }
        }
        (&http::Method::DELETE, ["sessions", id]) => {
            let Some(key) = crate::session::Key::parse(id) else {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"detail": "not a session id as GET /sessions lists them"}),
                );
            };
            match store.delete_key(&key).await {
                Ok(true) => {
                    tracing::info!(id = %key, "session revoked (admin listener)");
                    json(StatusCode::OK, serde_json::json!({"ended": 1}))
                }
                Ok(false) => json(StatusCode::NOT_FOUND, serde_json::json!({"ended": 0})),
                Err(error) => failed(error),
            }
        }
        (&http::Method::DELETE, ["users", name, "sessions"]) => {
            match store.delete_all_for_user(name).await {
                Ok(ended) => {
                    tracing::info!(user = %name, count = ended, "sessions revoked (admin listener)");
                    json(StatusCode::OK, serde_json::json!({ "ended": ended }))
                }
                Err(error) => failed(error),
            }
        }
        _ => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"detail": "GET /sessions[?user=U], DELETE /sessions/{id}, DELETE /users/{name}/sessions"}),
        ),
    }
}
