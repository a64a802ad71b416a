//! Assurance per route: a session records the flows it completed, and a
//! route whose flow it has not completed makes it step up. Two hosts share
//! one session cookie (`session.cookie_domain`): `a.home.test` asks for a
//! password, `b.home.test` for a password and a TOTP code. A session from A
//! alone gets 401 `step_up_required` (API) or a 302 into B's flow (browser)
//! on B, and B's upstream sees nothing of it; running B's flow with that
//! session mints a new one (the old cookie stops working) that opens both.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::{ok, Reply, Scripted, Seen};
use common::totp::{base32, step_now, totp_at, totp_now, wrong_code};
use common::*;
use reqwest::cookie::CookieStore;
use serde_json::{json, Value};

const HOST_A: &str = "a.home.test";
const HOST_B: &str = "b.home.test";
const PASSWORD_FLOW: &str = "password-only";
const TOTP_FLOW: &str = "password-and-totp";

/// The TOTP key of the one user (20 bytes, as authenticator apps get them);
/// the users file carries it in base32.
const TOTP_KEY: &[u8] = b"flowgate-step-up-key";

const TINA: TestUser = TestUser {
    username: "tina",
    password: "tina-Step-Up-Pw1!",
    email: "tina@example.test",
    groups: &["staff"],
    extra: "",
};

/// Another account, with a password only: who a step up must not turn into.
const OTTO: TestUser = TestUser {
    username: "otto",
    password: "otto-Other-Pw1!",
    email: "otto@example.test",
    groups: &["staff"],
    extra: "",
};

// --- TOTP, computed here and not with flowgate's own code -------------------

#[test]
fn the_tests_totp_matches_rfc_6238() {
    // RFC 6238 appendix B (SHA-1, seed "12345678901234567890"), last 6 of 8 digits.
    let seed = b"12345678901234567890";
    assert_eq!(totp_at(seed, 59 / 30), "287082");
    assert_eq!(totp_at(seed, 1111111109 / 30), "081804");
    assert_eq!(totp_at(seed, 1234567890 / 30), "005924");
    assert_eq!(totp_at(seed, 20000000000 / 30), "353130");
    assert_eq!(base32(seed), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
}

// --- the rig ----------------------------------------------------------------

/// A flowgate for two hosts, each route with its own recording upstream,
/// and a browser-like client whose cookie jar the test can read.
struct Rig {
    gate: Flowgate,
    upstream_a: Scripted,
    upstream_b: Scripted,
    jar: Arc<reqwest::cookie::Jar>,
    client: reqwest::Client,
}

fn answer(seen: &Seen) -> Reply {
    Reply::keep(ok(&format!("upstream saw {}", seen.target())))
}

fn config(upstream_a: &str, upstream_b: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[session]
secret = "test-secret-test-secret-test-secret-0123456789"
cookie_domain = ".home.test"

[directory]
users_file = "users.toml"

[[flow]]
slug = "{PASSWORD_FLOW}"
title = "Sign in"
stages = ["identification", "password", "login"]

[[flow]]
slug = "{TOTP_FLOW}"
title = "Sign in with a second factor"
stages = ["identification", "password", "mfa", "login"]

[[route]]
host = "{HOST_A}"
upstream = "{upstream_a}"
flow = "{PASSWORD_FLOW}"

[[route]]
host = "{HOST_B}"
upstream = "{upstream_b}"
flow = "{TOTP_FLOW}"
"#
    )
}

/// `host` (and every other test name) resolves to the gateway.
fn client_for(addr: SocketAddr, jar: Option<Arc<reqwest::cookie::Jar>>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .resolve(HOST_A, addr)
        .resolve(HOST_B, addr);
    if let Some(jar) = jar {
        builder = builder.cookie_provider(jar);
    }
    builder.build().unwrap()
}

impl Rig {
    fn start() -> Rig {
        let upstream_a = Scripted::start(answer);
        let upstream_b = Scripted::start(answer);
        let users = users_file(&[&TINA, &OTTO]).replace(
            "email = \"tina@example.test\"",
            &format!(
                "email = \"tina@example.test\"\ntotp = [\"{}\"]",
                base32(TOTP_KEY)
            ),
        );
        assert!(users.contains("totp = ["), "{users}");
        let gate = Flowgate::start(&config(&upstream_a.url(), &upstream_b.url()), &users);
        let jar = Arc::new(reqwest::cookie::Jar::default());
        let client = client_for(gate.addr, Some(jar.clone()));
        Rig {
            gate,
            upstream_a,
            upstream_b,
            jar,
            client,
        }
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.gate.addr.port())
    }

    /// The value of cookie `name` the jar would send to `host`.
    fn cookie(&self, host: &str, name: &str) -> Option<String> {
        let url = self.url(host, "/").parse().unwrap();
        let header = self.jar.cookies(&url)?;
        header
            .to_str()
            .unwrap()
            .split("; ")
            .find_map(|c| c.strip_prefix(&format!("{name}=")).map(str::to_owned))
    }

    fn session_cookie(&self, host: &str) -> String {
        self.cookie(host, "flowgate_session")
            .unwrap_or_else(|| panic!("no session cookie for {host}"))
    }

    /// A GET as an API client (JSON, no navigation).
    async fn api(&self, host: &str, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(host, path))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap()
    }

    /// A GET as a browser's page load.
    async fn browse(&self, host: &str, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(host, path))
            .header("accept", "text/html,application/xhtml+xml")
            .send()
            .await
            .unwrap()
    }

    /// Run `slug` through the JSON executor on `host`, answering each stage
    /// (`code` for the TOTP stage), with `csrf` as `X-authentik-CSRF` on
    /// every POST. Returns the last JSON answer: `xak-flow-redirect` when
    /// the flow ended, or the challenge that carried `response_errors`.
    async fn run_flow(&self, host: &str, slug: &str, code: &str, csrf: Option<&str>) -> Value {
        self.run_flow_with(&self.client, host, slug, code, csrf)
            .await
    }

    /// `run_flow` with another client (another browser, another cookie jar).
    async fn run_flow_with(
        &self,
        client: &reqwest::Client,
        host: &str,
        slug: &str,
        code: &str,
        csrf: Option<&str>,
    ) -> Value {
        self.run_flow_as(client, &TINA, host, slug, code, csrf)
            .await
    }

    /// `run_flow_with`, identifying as `user`.
    async fn run_flow_as(
        &self,
        client: &reqwest::Client,
        user: &TestUser,
        host: &str,
        slug: &str,
        code: &str,
        csrf: Option<&str>,
    ) -> Value {
        let url = self.url(
            host,
            &format!("/_flowgate/api/v3/flows/executor/{slug}/?query=next%3D%252F"),
        );
        let mut post: Option<Value> = None;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let request = match post.take() {
                Some(body) => {
                    let mut request = client.post(&url).json(&body);
                    if let Some(csrf) = csrf {
                        request = request.header("X-authentik-CSRF", csrf);
                    }
                    request
                }
                None => client.get(&url),
            };
            let response = request
                .header("accept", "application/json")
                .send()
                .await
                .unwrap();
            if response.status() == 302 {
                continue;
            }
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            if body.get("response_errors").is_some_and(|e| e != &json!({})) {
                return body;
            }
            post = Some(match body["component"].as_str().unwrap_or("") {
                "ak-stage-identification" => json!({"uid_field": user.username}),
                "ak-stage-password" => json!({"password": user.password}),
                "ak-stage-authenticator-validate" => json!({"code": code}),
                _ => return body,
            });
        }
        panic!("the flow {slug} did not end in time");
    }

    /// Sign in on A with the password-only flow, through the JSON executor.
    async fn sign_in_on_a(&self) {
        let done = self.run_flow(HOST_A, PASSWORD_FLOW, "", None).await;
        assert_eq!(done["component"], "xak-flow-redirect", "{done}");
        assert_eq!(self.api(HOST_A, "/home").await.status(), 200);
    }

    /// B refuses the session from A: 401 for the API, a 302 into B's flow
    /// for a page load; B's upstream has seen nothing.
    async fn b_wants_a_step_up(&self, context: &str) {
        let api = self.api(HOST_B, "/vault?item=7").await;
        assert_eq!(api.status(), 401, "{context}");
        let body: Value = api.json().await.unwrap();
        assert_eq!(body["error"], "step_up_required", "{context}: {body}");
        assert_eq!(
            body["executor_url"],
            format!("/_flowgate/api/v3/flows/executor/{TOTP_FLOW}/"),
            "{context}: {body}"
        );
        assert_eq!(
            body["login_url"],
            format!("/_flowgate/flow/{TOTP_FLOW}/?next=%2Fvault%3Fitem%3D7"),
            "{context}: {body}"
        );
        let page = self.browse(HOST_B, "/vault?item=7").await;
        assert_eq!(page.status(), 302, "{context}");
        assert_eq!(
            location(&page),
            format!("/_flowgate/flow/{TOTP_FLOW}/?next=%2Fvault%3Fitem%3D7"),
            "{context}"
        );
        assert!(
            self.upstream_b.seen().is_empty(),
            "{context}: B's upstream got requests from a session that had not stepped up: {:?}",
            self.upstream_b.seen()
        );
    }
}

/// What B's upstream received for `target`: its `X-Forwarded-User`.
/// Waits (briefly) for the log line of a login through `flow`, and checks
/// whether it says a second factor was used.
fn login_logged(rig: &Rig, flow: &str, second_factor: bool) {
    let wanted = format!("flow={flow} second_factor={second_factor}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let log = without_colours(&rig.gate.log());
        let found = log.lines().any(|l| {
            l.contains("login succeeded") && l.contains(&wanted) && l.contains("user=tina")
        });
        if found {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no login line with `{wanted}`:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The log as text, without the ANSI colour codes the text format has.
fn without_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn forwarded_user(upstream: &Scripted, target: &str) -> Vec<String> {
    upstream
        .seen()
        .iter()
        .filter(|s| s.target() == target)
        .flat_map(|s| s.all("x-forwarded-user"))
        .collect()
}

/// A GET to `host` with nothing but `cookie` (no jar), as an API client.
async fn status_with_only(rig: &Rig, host: &str, cookie: &str) -> (u16, Value) {
    let bare = client_for(rig.gate.addr, None);
    let response = bare
        .get(rig.url(host, "/only-this-cookie"))
        .header("accept", "application/json")
        .header("cookie", format!("flowgate_session={cookie}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

// --- the tests ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_password_session_steps_up_to_the_totp_route_through_the_json_executor() {
    let rig = Rig::start();
    rig.sign_in_on_a().await;
    let before = rig.session_cookie(HOST_A);
    assert_eq!(
        rig.cookie(HOST_B, "flowgate_session").as_deref(),
        Some(before.as_str()),
        "cookie_domain: the one session cookie goes to both hosts"
    );
    assert_eq!(
        status_with_only(&rig, HOST_A, &before).await.0,
        200,
        "the session cookie alone opens A"
    );

    rig.b_wants_a_step_up("signed in on A only").await;

    // The step up: B's flow with the session from A. Once signed in, POSTs
    // to the executor carry the CSRF token (the `flowgate_session_csrf`
    // cookie the login set).
    let csrf = rig
        .cookie(HOST_A, "flowgate_session_csrf")
        .expect("the JSON login sets the CSRF cookie");
    let done = rig
        .run_flow(HOST_B, TOTP_FLOW, &totp_now(TOTP_KEY), Some(&csrf))
        .await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");

    // The session records how it got here: both flows, and a second factor.
    login_logged(&rig, PASSWORD_FLOW, false);
    login_logged(&rig, TOTP_FLOW, true);

    let after = rig.session_cookie(HOST_B);
    assert_ne!(after, before, "the step up mints a new session id");
    assert_eq!(
        rig.cookie(HOST_A, "flowgate_session").as_deref(),
        Some(after.as_str()),
        "the new cookie is the domain cookie too"
    );

    // B opens, with the identity header; A still does.
    let b = rig.api(HOST_B, "/vault?item=7").await;
    assert_eq!(b.status(), 200);
    assert_eq!(b.text().await.unwrap(), "upstream saw /vault?item=7");
    assert_eq!(
        forwarded_user(&rig.upstream_b, "/vault?item=7"),
        ["tina"],
        "{:?}",
        rig.upstream_b.seen()
    );
    let page = rig.browse(HOST_B, "/vault?item=7").await;
    assert_eq!(page.status(), 200, "a page load too");
    let a = rig.api(HOST_A, "/home").await;
    assert_eq!(a.status(), 200, "the new session keeps the password flow");
    assert_eq!(forwarded_user(&rig.upstream_a, "/home"), ["tina", "tina"]);

    // The new cookie alone opens both; the one from before the step up
    // opens nothing (its session is gone, not merely superseded).
    assert_eq!(status_with_only(&rig, HOST_A, &after).await.0, 200);
    assert_eq!(status_with_only(&rig, HOST_B, &after).await.0, 200);
    for host in [HOST_A, HOST_B] {
        let (status, body) = status_with_only(&rig, host, &before).await;
        assert_eq!(status, 401, "the pre-step-up cookie on {host}: {body}");
        assert_eq!(body["error"], "unauthenticated", "{host}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_totp_code_leaves_the_stricter_route_closed() {
    let rig = Rig::start();
    rig.sign_in_on_a().await;
    let before = rig.session_cookie(HOST_A);
    let csrf = rig.cookie(HOST_A, "flowgate_session_csrf").unwrap();

    let refused = rig
        .run_flow(HOST_B, TOTP_FLOW, &wrong_code(TOTP_KEY), Some(&csrf))
        .await;
    assert_eq!(
        refused["component"], "ak-stage-authenticator-validate",
        "{refused}"
    );
    assert!(
        refused["response_errors"]["code"].is_array(),
        "the code is what was wrong: {refused}"
    );
    assert_eq!(
        rig.session_cookie(HOST_A),
        before,
        "no new session for a failed step up"
    );
    rig.b_wants_a_step_up("after a wrong TOTP code").await;
    assert_eq!(
        rig.api(HOST_A, "/home").await.status(),
        200,
        "a failed step up does not end the session it started from"
    );

    // Nor does skipping the stage: a POST without a code gets nowhere.
    let empty = rig.run_flow(HOST_B, TOTP_FLOW, "", Some(&csrf)).await;
    assert_ne!(empty["component"], "xak-flow-redirect", "{empty}");
    rig.b_wants_a_step_up("after an empty TOTP code").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn executor_posts_in_a_step_up_need_the_csrf_token() {
    let rig = Rig::start();
    rig.sign_in_on_a().await;
    let answer = rig
        .run_flow(HOST_B, TOTP_FLOW, &totp_now(TOTP_KEY), None)
        .await;
    assert_eq!(answer["component"], "ak-stage-flow-error", "{answer}");
    rig.b_wants_a_step_up("after a step up without the CSRF header")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_steps_up_through_the_html_pages() {
    let rig = Rig::start();
    rig.sign_in_on_a().await;
    let before = rig.session_cookie(HOST_A);

    let page = rig.browse(HOST_B, "/vault?item=7").await;
    assert_eq!(page.status(), 302);
    let started = rig.browse(HOST_B, &location(&page)).await;
    assert_eq!(started.status(), 303);
    let mut at = location(&started);
    assert!(at.contains("fid="), "{at}");

    let mut forms = Vec::new();
    let done = loop {
        assert!(forms.len() < 6, "too many forms: {forms:?}");
        let html = rig.browse(HOST_B, &at).await.text().await.unwrap();
        let csrf = input_value(&html, "csrf_token").expect("a form with a CSRF token");
        let action = form_action(&html).expect("a form action");
        let (field, value) = if html.contains("name=\"uid_field\"") {
            ("uid_field", TINA.username.to_owned())
        } else if html.contains("name=\"password\"") {
            ("password", TINA.password.to_owned())
        } else if html.contains("name=\"code\"") {
            ("code", totp_now(TOTP_KEY))
        } else {
            panic!("an unexpected page: {html}");
        };
        forms.push(field);
        let posted = rig
            .client
            .post(rig.url(HOST_B, &action))
            .form(&[("csrf_token", csrf.as_str()), (field, value.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(posted.status(), 303, "after {field}");
        let next = location(&posted);
        if !next.starts_with("/_flowgate/") {
            break next;
        }
        at = next;
    };
    assert_eq!(forms, ["uid_field", "password", "code"]);
    assert_eq!(done, "/vault?item=7", "back where the browser was going");
    let after = rig.session_cookie(HOST_B);
    assert_ne!(after, before, "the step up mints a new session id");

    let b = rig.browse(HOST_B, &done).await;
    assert_eq!(b.status(), 200);
    assert_eq!(forwarded_user(&rig.upstream_b, "/vault?item=7"), ["tina"]);
    assert_eq!(rig.browse(HOST_A, "/home").await.status(), 200);
    assert_eq!(status_with_only(&rig, HOST_B, &before).await.0, 401);
}

/// A step up is finished by the user who started it: tina's session, run
/// through A's flow as otto, is refused, and tina keeps her session as it
/// was (found by an outside review: it used to become otto's).
#[tokio::test(flavor = "multi_thread")]
async fn a_step_up_finished_as_another_user_is_refused() {
    let rig = Rig::start();
    rig.sign_in_on_a().await;
    let before = rig.session_cookie(HOST_A);
    let csrf = rig
        .cookie(HOST_A, "flowgate_session_csrf")
        .expect("the JSON login sets the CSRF cookie");
    // B's flow as otto (who has no TOTP: the mfa stage passes silently).
    let done = rig
        .run_flow_as(&rig.client, &OTTO, HOST_B, TOTP_FLOW, "", Some(&csrf))
        .await;
    assert_eq!(done["component"], "ak-stage-access-denied", "{done}");
    assert!(
        done["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("signed in as tina")),
        "{done}"
    );
    assert_eq!(rig.session_cookie(HOST_A), before, "no new session");
    rig.b_wants_a_step_up("after a step up as someone else")
        .await;
    let a = rig.api(HOST_A, "/home").await;
    assert_eq!(a.status(), 200, "tina's session still opens A");
    assert_eq!(forwarded_user(&rig.upstream_a, "/home"), ["tina", "tina"]);
}

// --- regressions: once broken, kept as tests -----------------------------------

/// A reload loads a new directory; the memory of used TOTP codes must
/// outlive it, or a code seen once is good again within its window (RFC
/// 6238 section 5.2: an OTP is accepted once). It once did not.
#[tokio::test(flavor = "multi_thread")]
async fn a_totp_code_is_good_once_even_across_a_reload() {
    let rig = Rig::start();
    rig.sign_in_on_a().await;
    let step = step_now();
    let code = totp_at(TOTP_KEY, step);
    let csrf = rig.cookie(HOST_A, "flowgate_session_csrf").unwrap();
    let done = rig.run_flow(HOST_B, TOTP_FLOW, &code, Some(&csrf)).await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");

    // Someone who saw the code tries it in a login of their own.
    let attacker = || client_for(rig.gate.addr, Some(Arc::default()));
    let again = rig
        .run_flow_with(&attacker(), HOST_B, TOTP_FLOW, &code, None)
        .await;
    assert!(
        again["response_errors"]["code"].is_array(),
        "a used code is refused: {again}"
    );

    rig.gate.signal("HUP");
    rig.gate
        .wait_for_log("configuration reloaded", Duration::from_secs(10));
    assert!(
        step_now() <= step + 1,
        "the test ran too long for the code to be in its window still"
    );
    let after_reload = rig
        .run_flow_with(&attacker(), HOST_B, TOTP_FLOW, &code, None)
        .await;
    assert!(
        after_reload["response_errors"]["code"].is_array(),
        "a reload made a used TOTP code good again: {after_reload}"
    );
}

/// The CSRF cookie goes wherever the session cookie goes
/// (`session.cookie_domain`): else a session signed in on A reaches B
/// without its `flowgate_session_csrf`, and a JSON client on B has no token
/// to put in `X-authentik-CSRF` and cannot step up there as documented (README, "Logging in without a
/// browser"). The tests above take the token from A's cookie instead.
#[tokio::test(flavor = "multi_thread")]
async fn the_csrf_cookie_reaches_every_host_the_session_cookie_reaches() {
    let rig = Rig::start();
    rig.sign_in_on_a().await;
    assert!(rig.cookie(HOST_B, "flowgate_session").is_some());
    // A client on B starts B's flow first (it may hand out the token then).
    let first = rig
        .client
        .get(rig.url(
            HOST_B,
            &format!("/_flowgate/api/v3/flows/executor/{TOTP_FLOW}/"),
        ))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let csrf = rig.cookie(HOST_B, "flowgate_session_csrf");
    assert!(
        csrf.is_some(),
        "the session cookie reaches {HOST_B}, its CSRF cookie does not"
    );
    let done = rig
        .run_flow(HOST_B, TOTP_FLOW, &totp_now(TOTP_KEY), csrf.as_deref())
        .await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
}
