//! Shared test harness: a real upstream (the echo app) on a loopback port,
//! the real `flowgate` binary started with a generated config, and an HTTP
//! client that keeps cookies. Every test talks to them over real sockets.
#![allow(dead_code)]

pub mod apps;
pub mod browser;
pub mod ca;
pub mod h2;
pub mod raw;
pub mod redis;
pub mod totp;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const FLOW: &str = "default-authentication-flow";

/// The built-in echo app, serving in this test's runtime.
pub struct Upstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(flowgate::demo::echo(listener));
        Upstream { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A user for the generated users file.
pub struct TestUser {
    pub username: &'static str,
    pub password: &'static str,
    pub email: &'static str,
    pub groups: &'static [&'static str],
    pub extra: &'static str,
}

pub const ALICE: TestUser = TestUser {
    username: "alice",
    password: "correct horse battery staple",
    email: "alice@example.test",
    groups: &["admins", "staff"],
    extra: "name = \"Alice Example\"",
};

pub const BOB: TestUser = TestUser {
    username: "bob",
    password: "bob-Secret-Pw1!",
    email: "bob@example.test",
    groups: &["staff"],
    extra: "",
};

/// Precomputed hashes would go stale with parameters; hashing at start is
/// quick with the optimised argon2 of the dev profile.
pub fn users_file(users: &[&TestUser]) -> String {
    let mut text = String::new();
    for user in users {
        let hash = flowgate::directory::hash_password(user.password).unwrap();
        let groups: Vec<String> = user.groups.iter().map(|g| format!("\"{g}\"")).collect();
        text.push_str(&format!(
            "[[user]]\nusername = \"{}\"\nemail = \"{}\"\ngroups = [{}]\npassword = \"{hash}\"\n{}\n\n",
            user.username,
            user.email,
            groups.join(", "),
            user.extra
        ));
    }
    text
}

/// The config most tests use: one catch-all route to `upstream`, the default
/// flow, plus whatever `extra` TOML adds.
pub fn basic_config(upstream: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[session]
secret = "test-secret-test-secret-test-secret-0123456789"

[directory]
users_file = "users.toml"

[[flow]]
slug = "{FLOW}"
title = "Sign in"
stages = ["identification", "password", "mfa", "login"]

[[route]]
host = "*"
upstream = "{upstream}"
flow = "{FLOW}"
skip_auth = ["^/public(/|$)"]

{extra}
"#
    )
}

/// A running `flowgate serve`, killed on drop.
pub struct Flowgate {
    pub addr: SocketAddr,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`), if enabled.
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Flowgate {
    /// Write `config` and `users` into a fresh folder and start the binary.
    pub fn start(config: &str, users: &str) -> Flowgate {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("flowgate.toml"), config).unwrap();
        std::fs::write(dir.path().join("users.toml"), users).unwrap();
        Self::start_in(dir)
    }

    pub fn start_in(dir: tempfile::TempDir) -> Flowgate {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(["serve", "--config"])
            .arg(dir.path().join("flowgate.toml"))
            .env("RUST_LOG", "info,flowgate=debug")
            .env_remove("FLOWGATE_SESSION_SECRET")
            // Tests run side by side: every admin listener on its own port.
            .env("FLOWGATE_ADMIN_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start flowgate");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let admin = Arc::new(Mutex::new(None));
        let admin_sink = admin.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("admin listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    *admin_sink.lock().unwrap() = addr.parse().ok();
                } else if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                std::thread::sleep(Duration::from_millis(200));
                panic!("flowgate did not start; its log:\n{}", log.lock().unwrap());
            }
        };
        let admin = *admin.lock().unwrap();
        Flowgate {
            addr,
            admin,
            dir,
            child,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal (`"TERM"`, `"HUP"`…) to the running binary.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Wait for the process to exit; `None` if it is still running after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Wait until the log contains `needle`; panics with the log after `limit`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{needle:?} never appeared in the log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Stop the process (`kill -9` when `kill`, else SIGTERM and wait) and
    /// start it again on the same folder: its config, users and state file.
    pub fn restart(mut self, kill: bool) -> Flowgate {
        if kill {
            self.signal("KILL");
        } else {
            self.signal("TERM");
        }
        assert!(
            self.wait_exit(Duration::from_secs(20)).is_some(),
            "flowgate did not stop:\n{}",
            self.log()
        );
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        drop(self);
        Flowgate::start_in(dir)
    }
}

impl Drop for Flowgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client like a browser's: keeps cookies, follows no redirect by itself
/// (tests look at each hop).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub fn client_following() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::limited(10))
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

pub fn set_cookies(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect()
}

/// The value of `name="…"` inside the first `<input … name="{name}" … value="…">`.
pub fn input_value(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\"");
    let at = html.find(&marker)?;
    let start = html[..at].rfind('<')?;
    let end = at + html[at..].find('>')?;
    let tag = &html[start..end];
    let value = tag.split("value=\"").nth(1)?.split('"').next()?;
    Some(
        value
            .replace("&amp;", "&")
            .replace("&quot;", "\"")
            .replace("&#x2f;", "/")
            .replace("&#x27;", "'"),
    )
}

/// Where a page's form posts to.
pub fn form_action(html: &str) -> Option<String> {
    let at = html.find("<form")?;
    let tag = &html[at..at + html[at..].find('>')?];
    let action = tag.split("action=\"").nth(1)?.split('"').next()?;
    Some(action.replace("&amp;", "&").replace("&#x2f;", "/"))
}

/// GET `url` with `client` and read the answer as JSON (the echo app's
/// report of what reached it, an API answer).
pub async fn get_json(client: &reqwest::Client, url: impl reqwest::IntoUrl) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// Log in through the JSON executor API with `client`; returns the final
/// `xak-flow-redirect` body.
pub async fn json_login(
    client: &reqwest::Client,
    base: &str,
    user: &str,
    password: &str,
    next: &str,
) -> Value {
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("next", next)
        .finish();
    let url = format!(
        "{base}/_flowgate/api/v3/flows/executor/{FLOW}/?query={}",
        url::form_urlencoded::byte_serialize(query.as_bytes()).collect::<String>()
    );
    let first: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(first["component"], "ak-stage-identification", "{first}");
    let posted = client
        .post(&url)
        .json(&serde_json::json!({"uid_field": user}))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 302);
    let challenge: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(challenge["component"], "ak-stage-password", "{challenge}");
    let mut response = client
        .post(&url)
        .json(&serde_json::json!({"password": password}))
        .send()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while response.status() == 302 && Instant::now() < deadline {
        response = client.get(&url).send().await.unwrap();
    }
    response.json().await.unwrap()
}

/// One password attempt for `user` through the JSON API, in a flow of its
/// own: the error code the password stage answered (`invalid`,
/// `throttled`), or `None` when it passed.
pub async fn password_error(base: &str, user: &str, password: &str) -> Option<String> {
    let done = json_login(&client(), base, user, password, "/").await;
    match done["component"].as_str() {
        Some("ak-stage-password") => Some(
            done["response_errors"]["password"][0]["code"]
                .as_str()
                .unwrap_or_else(|| panic!("no error code: {done}"))
                .to_owned(),
        ),
        _ => None,
    }
}

/// GET `url` as an API client (`Accept: application/json`): the status.
pub async fn api_status(client: &reqwest::Client, url: impl reqwest::IntoUrl) -> u16 {
    client
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// GET `url` (an echo upstream behind flowgate) as an API client: the user
/// flowgate said it was for (`X-Forwarded-User`), if it got through.
pub async fn upstream_user(client: &reqwest::Client, url: impl reqwest::IntoUrl) -> Option<String> {
    let response = client
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    if response.status() != 200 {
        return None;
    }
    let echo: Value = response.json().await.unwrap();
    echo["headers"]["x-forwarded-user"]
        .as_str()
        .map(str::to_owned)
}

/// Log `user` in through the JSON API; returns the client (which keeps the
/// session) and the `Cookie` header value it would send, for raw requests
/// and clients that are not reqwest (websockets).
pub async fn signed_in(gate: &Flowgate, user: &TestUser) -> (reqwest::Client, String) {
    use reqwest::cookie::CookieStore;
    let jar = Arc::new(reqwest::cookie::Jar::default());
    let client = reqwest::Client::builder()
        .cookie_provider(jar.clone())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let done = json_login(&client, &gate.url(""), user.username, user.password, "/").await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    let cookie = jar
        .cookies(&gate.url("/").parse().unwrap())
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cookie.contains("flowgate_session="), "{cookie}");
    (client, cookie)
}

/// Where the shared fixtures live inside this repository.
/// The sign-out confirmation page's CSRF token, for `client`'s session.
pub async fn sign_out_csrf(client: &reqwest::Client, gate: &Flowgate) -> String {
    let confirm = client
        .get(gate.url("/_flowgate/sign_out"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    input_value(&confirm, "csrf_token").expect("a sign-out form")
}

/// Sign out as a browser does: the confirmation page, then its form.
pub async fn sign_out(client: &reqwest::Client, gate: &Flowgate) {
    let csrf = sign_out_csrf(client, gate).await;
    let out = client
        .post(gate.url("/_flowgate/sign_out"))
        .form(&[("csrf_token", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 200, "signed out");
}

/// The users `flowgate sessions list --json` shows for `gate`'s config
/// (the store read by the command line, not the server), sorted.
pub fn listed_users(gate: &Flowgate) -> Vec<String> {
    let listed = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["sessions", "list", "--json", "--config"])
        .arg(gate.path().join("flowgate.toml"))
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let mut users: Vec<String> = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["user"].as_str().map(str::to_owned))
        .collect();
    users.sort();
    users
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Skip (loudly) when an outside program is missing, unless CI demands it.
pub fn require_program(name: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("FLOWGATE_REQUIRE_ALL").is_ok_and(|v| v == "1") {
            panic!("{name} is required (FLOWGATE_REQUIRE_ALL=1) but not installed");
        }
        eprintln!("SKIPPED: {name} is not installed; install it to run this test");
    }
    found
}

/// Skip (loudly) when a Python module is missing, unless CI demands it.
pub fn require_python_module(name: &str) -> bool {
    let found = Command::new("python3")
        .args(["-c", &format!("import {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("FLOWGATE_REQUIRE_ALL").is_ok_and(|v| v == "1") {
            panic!("python3 module {name} is required (FLOWGATE_REQUIRE_ALL=1) but missing");
        }
        eprintln!("SKIPPED: python3 cannot import {name}; pip install it to run this test");
    }
    found
}

/// Keys authentik sends only in some configurations; either side may lack
/// them. `error` and `traceback` are what authentik shows superusers when a
/// flow fails: flowgate never puts internals in a response, to anyone.
pub const OPTIONAL_KEYS: [&str; 7] = [
    "flow_info.background",
    "pending_user_identifier",
    "enroll_url",
    "recovery_url",
    "passwordless_url",
    "error",
    "traceback",
];

/// Where `ours` is not shaped like `recorded`: a key one side lacks, or a
/// value of another JSON type. Objects are compared key by key, arrays by
/// their first elements.
pub fn shape_differences(path: &str, ours: &Value, recorded: &Value) -> Vec<String> {
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let mut differences = Vec::new();
    match (ours, recorded) {
        (Value::Object(a), Value::Object(b)) => {
            for key in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                let at = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => differences.extend(shape_differences(&at, x, y)),
                    _ if OPTIONAL_KEYS.contains(&at.as_str()) => {}
                    (Some(_), None) => {
                        differences.push(format!("{at}: flowgate sends it, authentik did not"))
                    }
                    (None, _) => {
                        differences.push(format!("{at}: authentik sent it, flowgate does not"))
                    }
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            if let (Some(x), Some(y)) = (a.first(), b.first()) {
                differences.extend(shape_differences(&format!("{path}[0]"), x, y));
            }
        }
        // authentik sends null for an absent captcha stage or device; so may we.
        (x, y) if kind(x) == kind(y) || x.is_null() || y.is_null() => {}
        (x, y) => differences.push(format!(
            "{path}: {} where authentik sent {}",
            kind(x),
            kind(y)
        )),
    }
    differences
}

/// One run of a flow through the JSON executor API, as a script drives
/// it: each POST that moves on (a raw 302) is followed by the GET of the
/// next challenge.
pub struct JsonFlow {
    pub client: reqwest::Client,
    pub url: String,
    /// Sent as `X-Forwarded-For` (for a gate that trusts loopback).
    pub forwarded_for: Option<String>,
    /// A signed-in client's CSRF token, sent with each POST (as authentik's
    /// clients send `X-authentik-CSRF`).
    pub csrf: Option<String>,
}

impl JsonFlow {
    pub fn new(base: &str, slug: &str, next: &str) -> JsonFlow {
        JsonFlow::with_client(client(), base, slug, next)
    }

    pub fn with_client(client: reqwest::Client, base: &str, slug: &str, next: &str) -> JsonFlow {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("next", next)
            .finish();
        JsonFlow {
            client,
            url: format!(
                "{base}/_flowgate/api/v3/flows/executor/{slug}/?query={}",
                url::form_urlencoded::byte_serialize(query.as_bytes()).collect::<String>()
            ),
            forwarded_for: None,
            csrf: None,
        }
    }

    /// For a client `signed_in` gave, with the `cookie` it gave.
    pub fn signed_in(
        client: reqwest::Client,
        cookie: &str,
        base: &str,
        slug: &str,
        next: &str,
    ) -> JsonFlow {
        let mut flow = JsonFlow::with_client(client, base, slug, next);
        flow.csrf = cookie
            .split("; ")
            .find_map(|c| c.strip_prefix("flowgate_session_csrf="))
            .map(str::to_owned);
        assert!(flow.csrf.is_some(), "no CSRF cookie in {cookie}");
        flow
    }

    fn send(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.forwarded_for {
            Some(ip) => request.header("x-forwarded-for", ip),
            None => request,
        }
    }

    /// The current challenge, past stages that pass by themselves (each
    /// a raw 302 back to the executor).
    pub async fn get(&self) -> Value {
        for _ in 0..20 {
            let response = self.send(self.client.get(&self.url)).send().await.unwrap();
            match response.status().as_u16() {
                302 => continue,
                200 => return response.json().await.unwrap(),
                other => panic!("GET {} answered {other}", self.url),
            }
        }
        panic!("GET {} kept redirecting", self.url)
    }

    /// Answer the challenge: what comes after (the same challenge with
    /// errors, the next one, or the end).
    pub async fn post(&self, body: Value) -> Value {
        let mut request = self.send(self.client.post(&self.url).json(&body));
        if let Some(csrf) = &self.csrf {
            request = request.header("x-authentik-csrf", csrf);
        }
        let response = request.send().await.unwrap();
        match response.status().as_u16() {
            302 => self.get().await,
            200 => response.json().await.unwrap(),
            other => panic!("POST {} answered {other}", self.url),
        }
    }
}

/// A client with a cookie jar of its own (a browser), which starts with
/// `cookies` (`name=value` each), and the jar.
pub fn jar_client(
    gate: &Flowgate,
    cookies: &[&str],
) -> (reqwest::Client, std::sync::Arc<reqwest::cookie::Jar>) {
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let url: reqwest::Url = gate.url("/").parse().unwrap();
    for cookie in cookies {
        jar.add_cookie_str(&format!("{cookie}; Path=/"), &url);
    }
    let client = reqwest::Client::builder()
        .cookie_provider(jar.clone())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    (client, jar)
}

/// The browser memo cookie (`name=value`) in `jar`, if there is one.
pub fn memo_cookie(gate: &Flowgate, jar: &reqwest::cookie::Jar) -> Option<String> {
    use reqwest::cookie::CookieStore;
    let header = jar.cookies(&gate.url("/").parse().unwrap())?;
    header
        .to_str()
        .unwrap()
        .split("; ")
        .find(|c| c.starts_with("flowgate_session_memo="))
        .map(str::to_owned)
}
