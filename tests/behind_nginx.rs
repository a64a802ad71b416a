//! flowgate behind a real nginx, as many run it: nginx in front (TLS would
//! end there), a pool of keep-alive connections from nginx to flowgate
//! shared by all clients, and the client's address in `X-Forwarded-For`.
//! Signing in, the login redirect and proxied requests all go through
//! nginx; the pooled connections stay on the fast lane after the login's
//! requests went through the general path.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// nginx in front of flowgate, on a loopback port of its own; stopped on drop.
struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(flowgate: SocketAddr) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let root = dir.path().display();
        let config = format!(
            r#"
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {root}; proxy_temp_path {root};
  fastcgi_temp_path {root}; uwsgi_temp_path {root}; scgi_temp_path {root};
  upstream flowgate {{ server {flowgate}; keepalive 8; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://flowgate;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
"#
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            .arg("-g")
            .arg("daemon off;")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx never listened on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker first (SIGKILL would leave
        // the worker running, still listening).
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Requests served on the fast lane, and connections it handed over.
async fn lane_counts(gate: &Flowgate) -> (u64, u64) {
    let admin = gate.admin.expect("admin listener");
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    (
        value("flowgate_fast_lane_requests_total "),
        value("flowgate_fast_lane_handoffs_total "),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_nginx_sign_in_and_proxy_on_pooled_connections() {
    if !require_program("nginx") {
        return;
    }
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), "").replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    );
    let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let nginx = Nginx::start(gate.addr);

    // Not signed in: the login redirect comes back through nginx.
    let anonymous = client()
        .get(nginx.url("/app"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 302);
    assert!(
        location(&anonymous).starts_with(&format!("/_flowgate/flow/{FLOW}/?next=")),
        "{}",
        location(&anonymous)
    );

    // Signing in through nginx: flowgate's own paths, the general path.
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let signed_in = reqwest::Client::builder()
        .cookie_provider(jar)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let done = json_login(
        &signed_in,
        &nginx.url(""),
        ALICE.username,
        ALICE.password,
        "/",
    )
    .await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");

    // Signed-in traffic on nginx's pooled connections: every request on
    // the fast lane, none handed over, although the same pool carried the
    // login a moment ago.
    let (served, handed) = lane_counts(&gate).await;
    for i in 0..20 {
        let response = signed_in
            .get(nginx.url(&format!("/app/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let echo: Value = response.json().await.unwrap();
        let headers = &echo["headers"];
        assert_eq!(headers["x-forwarded-user"], ALICE.username, "{echo}");
        // nginx's entry for the client, then flowgate's for nginx.
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1, 127.0.0.1", "{echo}");
        assert_eq!(headers["x-forwarded-proto"], "http", "{echo}");
        assert!(headers.get("cookie").is_none(), "{echo}");
    }
    let (served_after, handed_after) = lane_counts(&gate).await;
    assert_eq!(served_after - served, 20, "requests on the fast lane");
    assert_eq!(handed_after, handed, "connections handed over");
}
