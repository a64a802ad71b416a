//! Headless Chromium driven over the DevTools protocol: a private profile,
//! pages (each in the default context or a fresh one, with no cookies),
//! scripts run in them, loads waited for, and PNG screenshots. Tests that
//! use it call `require_program("chromium")` first.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Headless Chromium with a private profile; killed on drop.
pub struct Browser {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                // The machine's network is closed: no calls home at all.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
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

    async fn connect(&self, url: &str) -> WebSocketStream<TcpStream> {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let (socket, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("DevTools websocket");
        socket
    }

    /// The first page target's DevTools connection.
    pub async fn page(&self) -> Page {
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
        Page::open(self.connect(url).await).await
    }

    /// A page in a new browser context: as a fresh browser, it shares no
    /// cookies with the other pages.
    pub async fn fresh_page(&self) -> Page {
        let version: Value = reqwest::get(format!("http://127.0.0.1:{}/json/version", self.port))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let url = version["webSocketDebuggerUrl"].as_str().unwrap();
        let mut browser = Page::new(self.connect(url).await);
        let context = browser.call("Target.createBrowserContext", json!({})).await;
        let target = browser
            .call(
                "Target.createTarget",
                json!({"url": "about:blank", "browserContextId": context["browserContextId"]}),
            )
            .await;
        let id = target["targetId"].as_str().unwrap();
        let url = format!("ws://127.0.0.1:{}/devtools/page/{id}", self.port);
        Page::open(self.connect(&url).await).await
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools session on one page: commands and the events seen meanwhile.
pub struct Page {
    socket: WebSocketStream<TcpStream>,
    next_id: u64,
    pub events: VecDeque<Value>,
}

impl Page {
    fn new(socket: WebSocketStream<TcpStream>) -> Page {
        Page {
            socket,
            next_id: 0,
            events: VecDeque::new(),
        }
    }

    async fn open(socket: WebSocketStream<TcpStream>) -> Page {
        let mut page = Page::new(socket);
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

    /// Nothing the pages did broke their Content-Security-Policy.
    pub fn assert_no_csp_violation(&self) {
        let violations: Vec<&Value> = self
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

    pub async fn call(&mut self, method: &str, params: Value) -> Value {
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
    pub async fn event(&mut self, method: &str) -> Value {
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

    pub async fn eval(&mut self, expression: &str) -> Value {
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
    pub async fn and_wait(&mut self, script: &str) {
        self.events.retain(|e| e["method"] != "Page.loadEventFired");
        self.eval(script).await;
        self.event("Page.loadEventFired").await;
    }

    /// Go to `url` and wait for it to load.
    pub async fn goto(&mut self, url: &str) {
        self.and_wait(&format!("location.href = {}", json!(url)))
            .await;
    }

    /// The text of the first element `selector` matches (`null` if none).
    pub async fn text(&mut self, selector: &str) -> Value {
        self.eval(&format!(
            "document.querySelector({})?.innerText ?? null",
            json!(selector)
        ))
        .await
    }

    /// Type `value` into the field `selector` matches.
    pub async fn fill(&mut self, selector: &str, value: &str) {
        let found = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({}); if (!e) return false; \
                 e.value = {}; return true; }})()",
                json!(selector),
                json!(value)
            ))
            .await;
        assert_eq!(found, json!(true), "no field {selector} on the page");
    }

    /// Click the button `selector` matches (one that submits or follows a
    /// link) and wait for the next page.
    pub async fn click(&mut self, selector: &str) {
        let found = self
            .eval(&format!("!!document.querySelector({})", json!(selector)))
            .await;
        assert_eq!(found, json!(true), "no {selector} on the page");
        self.and_wait(&format!(
            "document.querySelector({}).click()",
            json!(selector)
        ))
        .await;
    }

    /// The whole page (beyond the viewport too) as a PNG.
    pub async fn screenshot(&mut self) -> Vec<u8> {
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        png_of(&shot)
    }

    /// The element `selector` matches, alone, as a PNG at `scale` times
    /// its CSS size.
    pub async fn screenshot_of(&mut self, selector: &str, scale: f64) -> Vec<u8> {
        let rect = self
            .eval(&format!(
                "(() => {{ const r = document.querySelector({}).getBoundingClientRect(); \
                 return {{x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}}; }})()",
                json!(selector)
            ))
            .await;
        assert!(
            rect["width"].as_f64().unwrap_or(0.0) > 0.0,
            "{selector} is not shown: {rect}"
        );
        let mut clip = rect;
        clip["scale"] = json!(scale);
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "clip": clip, "captureBeyondViewport": true}),
            )
            .await;
        png_of(&shot)
    }
}

fn png_of(shot: &Value) -> Vec<u8> {
    let data = shot["data"].as_str().expect("screenshot data");
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .expect("base64 screenshot")
}

/// A folder of numbered screenshots, for a person to look through:
/// `<CARGO_TARGET_TMPDIR>/<suite>/<test>/<nn>-<name>.png`, emptied first.
pub struct Screenshots {
    pub dir: PathBuf,
    count: usize,
}

impl Screenshots {
    pub fn new(suite: &str, test: &str) -> Screenshots {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(suite)
            .join(test);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        eprintln!("screenshots of {test}: {}", dir.display());
        Screenshots { dir, count: 0 }
    }

    /// Save `page` as it is now under the next number; the file's path.
    pub async fn take(&mut self, page: &mut Page, name: &str) -> PathBuf {
        let png = page.screenshot().await;
        self.save(&png, name)
    }

    pub fn save(&mut self, png: &[u8], name: &str) -> PathBuf {
        self.count += 1;
        let path = self.dir.join(format!("{:02}-{name}.png", self.count));
        std::fs::write(&path, png).unwrap();
        path
    }
}
