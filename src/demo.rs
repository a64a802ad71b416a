//! `flowgate demo`: the whole gateway on one command. A built-in echo app
//! (answers every request with the method, path and headers it received, as
//! JSON) stands behind a real flowgate with the embedded executor and one
//! user, so the login flow and the identity headers can be seen end to end.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;

pub const DEMO_FLOW: &str = "default-authentication-flow";
pub const DEMO_USER: &str = "demo";

/// Serve the echo app on `listener` until the task is dropped.
pub async fn echo(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(|request: Request<Incoming>| async move {
                Ok::<_, Infallible>(echo_response(request).await)
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn echo_response(request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().to_string();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let mut headers: BTreeMap<String, Value> = BTreeMap::new();
    for (name, value) in request.headers() {
        let value = Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned());
        match headers.get_mut(name.as_str()) {
            Some(Value::Array(values)) => values.push(value),
            Some(existing) => *existing = Value::Array(vec![existing.clone(), value]),
            None => {
                headers.insert(name.as_str().to_owned(), value);
            }
        }
    }
    // Count the body as it streams by rather than holding it.
    let mut body = request.into_body();
    let mut body_bytes = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            body_bytes += data.len() as u64;
        }
    }
    let text =
        json!({"method": method, "path": path, "headers": headers, "body_bytes": body_bytes});
    let mut response = Response::new(Full::new(Bytes::from(format!("{text:#}\n"))));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// The demo's config: one catch-all route to the echo app, the default flow.
pub fn demo_config(listen: SocketAddr, upstream: SocketAddr) -> String {
    let secret = crate::session::random_token();
    format!(
        r#"
[server]
listen = "{listen}"

[session]
# Demo only: plain HTTP on loopback, so cookies cannot be Secure.
cookie_secure = "never"
# Made for this run: demo sessions end with the demo.
secret = "{secret}"

[state]
# Demo only: everything is forgotten when the demo ends.
store = "memory"

[directory]
users_file = "users.toml"

[[flow]]
slug = "{DEMO_FLOW}"
title = "Sign in to the flowgate demo"
stages = ["identification", "password", "mfa", "login"]

[[route]]
host = "*"
upstream = "http://{upstream}"
flow = "{DEMO_FLOW}"
skip_auth = ["^/public(/|$)"]
"#
    )
}

/// Run the demo until Ctrl-C.
pub async fn run(listen: SocketAddr, password: Option<String>) -> anyhow::Result<()> {
    let echo_listener = TcpListener::bind("127.0.0.1:0").await?;
    let upstream = echo_listener.local_addr()?;
    tokio::spawn(echo(echo_listener));

    let password = password.unwrap_or_else(|| crate::session::random_token()[..16].to_owned());
    let hash = crate::directory::hash_password(&password)
        .map_err(|e| anyhow::anyhow!("hashing the demo password: {e}"))?;
    let dir = DemoDir::create()?;
    std::fs::write(
        dir.0.join("users.toml"),
        format!("[[user]]\nusername = \"{DEMO_USER}\"\nname = \"Demo User\"\nemail = \"demo@example.test\"\ngroups = [\"demo\"]\npassword = \"{hash}\"\n"),
    )?;
    let config_path = dir.0.join("flowgate.toml");
    let text = demo_config(listen, upstream);
    std::fs::write(&config_path, &text)?;
    let config = crate::config::from_str(&text, &config_path, &|_| None)
        .map_err(|e| anyhow::anyhow!("demo config:\n{e}"))?;
    let app = crate::build(config, None).map_err(|e| anyhow::anyhow!(e))?;

    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr()?;
    println!("flowgate demo is running (Ctrl-C to stop)\n");
    println!("  open      http://{local}/");
    println!("  username  {DEMO_USER}");
    println!("  password  {password}\n");
    println!("Behind it is a built-in echo app: after signing in you see the request it");
    println!("received, with the identity headers flowgate added (X-Forwarded-User, …).");
    println!("Anything under /public/ passes without signing in. Sign out at http://{local}/_flowgate/sign_out");
    println!("Scripts can log in as JSON: see the README, \"Logging in without a browser\".\n");
    tracing::info!("listening on {local} (http)");
    let front = std::sync::Arc::new(crate::listener::Listener::new(app, None));
    front
        .run(listener, crate::listener::shutdown_signal())
        .await;
    Ok(())
}

/// A private folder for the demo's generated files, removed on exit.
struct DemoDir(PathBuf);

impl DemoDir {
    fn create() -> std::io::Result<DemoDir> {
        let path = std::env::temp_dir().join(format!(
            "flowgate-demo-{}-{}",
            std::process::id(),
            &crate::session::random_token()[..8]
        ));
        std::fs::create_dir_all(&path)?;
        Ok(DemoDir(path))
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
