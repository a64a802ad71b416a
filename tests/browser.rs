//! A real browser (headless Chromium, driven over the DevTools protocol)
//! signs in through the HTML pages: it follows the redirect to the login
//! page, loads the stylesheet under the pages' Content-Security-Policy,
//! submits the forms, keeps the cookies, and lands on the app with the
//! user's identity. Skipped loudly without `chromium` (required in CI).

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Headless Chromium with a private profile; killed on drop.
struct Browser {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium printed no DevTools address");
        let port = url
            .split(':')
            .nth(2)
            .and_then(|rest| rest.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap();
        Browser {
            child,
            port,
            _profile: profile,
        }
    }

    /// The first page target's DevTools connection.
    async fn page(&self) -> Page {
        let targets: Vec<Value> = reqwest::get(format!("http://127.0.0.1:{}/json/list", self.port))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page = targets
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target");
        let url = page["webSocketDebuggerUrl"].as_str().unwrap();
        let stream = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let (socket, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("DevTools websocket");
        let mut page = Page {
            socket,
            next_id: 0,
            events: VecDeque::new(),
        };
        for domain in [
            "Page.enable",
            "Runtime.enable",
            "Log.enable",
            "Network.enable",
        ] {
            page.call(domain, json!({})).await;
        }
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools session on one page: commands and the events seen meanwhile.
struct Page {
    socket: WebSocketStream<TcpStream>,
    next_id: u64,
    events: VecDeque<Value>,
}

impl Page {
    async fn receive(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(20), self.socket.next())
                .await
                .expect("DevTools answered within 20 s")
                .expect("DevTools socket open")
                .expect("a DevTools message");
            if let Message::Text(text) = message {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::text(request.to_string()))
            .await
            .unwrap();
        loop {
            let message = self.receive().await;
            if message["id"] == id {
                assert!(message.get("error").is_none(), "{method}: {message}");
                return message["result"].clone();
            }
            self.events.push_back(message);
        }
    }

    /// Wait for the next event named `method` (earlier ones are dropped).
    async fn event(&mut self, method: &str) -> Value {
        while let Some(event) = self.events.pop_front() {
            if event["method"] == method {
                return event;
            }
        }
        loop {
            let message = self.receive().await;
            if message["method"] == method {
                return message;
            }
            self.events.push_back(message);
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Run `script` (which submits a form or navigates) and wait for the
    /// next page to load.
    async fn and_wait(&mut self, script: &str) {
        self.events.retain(|e| e["method"] != "Page.loadEventFired");
        self.eval(script).await;
        self.event("Page.loadEventFired").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_browser_signs_in_through_the_pages_and_reaches_the_app() {
    if !require_program("chromium") {
        return;
    }
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let browser = Browser::start();
    let mut page = browser.page().await;

    let start = gate.url("/dashboard?tab=2");
    page.and_wait(&format!("location.href = {}", json!(start)))
        .await;
    let path = page.eval("location.pathname").await;
    assert_eq!(
        path,
        json!(format!("/_flowgate/flow/{FLOW}/")),
        "sent to the login page"
    );
    // The stylesheet loaded under the page's CSP (no inline styles needed).
    let rules = page
        .eval("document.styleSheets.length ? document.styleSheets[0].cssRules.length : 0")
        .await;
    assert!(
        rules.as_u64().unwrap_or(0) > 0,
        "the stylesheet did not load: {rules}"
    );

    page.and_wait(
        "document.querySelector('[name=uid_field]').value = 'alice'; \
         document.querySelector('form [type=submit], form button').click()",
    )
    .await;
    let html = page.eval("document.body.innerHTML").await;
    assert!(
        html.as_str().unwrap().contains("name=\"password\""),
        "password page: {html}"
    );

    page.and_wait(&format!(
        "document.querySelector('[name=password]').value = {}; \
         document.querySelector('form [type=submit], form button').click()",
        json!(ALICE.password)
    ))
    .await;
    assert_eq!(
        page.eval("location.pathname + location.search").await,
        json!("/dashboard?tab=2"),
        "back where it started"
    );
    let text = page.eval("document.body.innerText").await;
    let echoed: Value =
        serde_json::from_str(text.as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(echoed["headers"]["x-forwarded-user"], "alice", "{echoed}");
    assert!(
        echoed["headers"]["cookie"].is_null(),
        "the app sees no flowgate cookie: {echoed}"
    );

    let cookies = page
        .call("Network.getCookies", json!({"urls": [gate.url("/")]}))
        .await;
    let session = cookies["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "flowgate_session")
        .unwrap_or_else(|| panic!("no session cookie: {cookies}"))
        .clone();
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Lax", "{session}");
    assert!(
        page.eval("document.cookie")
            .await
            .as_str()
            .unwrap()
            .is_empty(),
        "HttpOnly: invisible to scripts"
    );

    // Signing out through the page ends the session.
    page.and_wait(&format!(
        "location.href = {}",
        json!(gate.url("/_flowgate/sign_out"))
    ))
    .await;
    page.and_wait("document.querySelector('form [type=submit], form button').click()")
        .await;
    page.and_wait(&format!("location.href = {}", json!(start)))
        .await;
    let path = page.eval("location.pathname").await;
    assert_eq!(
        path,
        json!(format!("/_flowgate/flow/{FLOW}/")),
        "signed out: back to the login page"
    );

    // Nothing the pages did broke their Content-Security-Policy.
    let violations: Vec<&Value> = page
        .events
        .iter()
        .filter(|e| e["method"] == "Log.entryAdded")
        .filter(|e| {
            e["params"]["entry"]["text"]
                .as_str()
                .unwrap_or("")
                .contains("Content Security Policy")
        })
        .collect();
    assert!(violations.is_empty(), "CSP violations: {violations:?}");
}
