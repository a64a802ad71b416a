//! The remote executor, end to end: flowgate B (in front of an app, flows
//! run remotely) drives flowgate A (the users and flows, over real TLS
//! under a CA made by the test) through the flow executor API, as it would
//! drive authentik. HTML and JSON logins, errors from A shown by B, A's
//! groups deciding B's `allow`, and what B answers when A is down, talks
//! nonsense or hangs.

mod common;

use std::time::Duration;

use common::ca::Ca;
use common::totp::{base32, totp_now};
use common::*;
use serde_json::{json, Value};

const TOTP_KEY: &[u8] = b"remote-totp-key-0123";

/// A with its users (alice: admins; bob: staff, with a TOTP device) over
/// TLS for `localhost`, believing B's X-Forwarded-For.
fn start_a(ca: &Ca) -> Flowgate {
    let upstream = "http://127.0.0.1:9";
    let dir = tempfile::tempdir().unwrap();
    ca.issue(&["localhost"], 1).write(dir.path(), "a");
    let invalidation = "[[flow]]\nslug = \"default-invalidation-flow\"\ntitle = \"Sign out\"\n\
                        designation = \"invalidation\"\nstages = []\n\
                        [[flow]]\nslug = \"closed\"\ntitle = \"Closed\"\nstages = [\"deny\"]\n";
    let config = basic_config(upstream, invalidation).replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\ntls = { cert = \"a.pem\", key = \"a.key\" }\n\
         trusted_proxies = [\"127.0.0.1/32\"]\n",
    ) + "\n[executor_api]\nlisten = \"127.0.0.1:0\"\ntls = { cert = \"a.pem\", key = \"a.key\" }\n";
    let users = users_file(&[&ALICE, &BOB]).replace(
        "email = \"bob@example.test\"",
        &format!(
            "email = \"bob@example.test\"\ntotp = [\"{}\"]",
            base32(TOTP_KEY)
        ),
    );
    std::fs::write(dir.path().join("flowgate.toml"), config).unwrap();
    std::fs::write(dir.path().join("users.toml"), users).unwrap();
    Flowgate::start_in(dir)
}

/// B in front of `upstream`, its flows run by the executor at `url`
/// (`/_flowgate/api/v3` of another flowgate), trusting `ca`. `/admin` is
/// for A's admins only.
fn start_b(upstream: &str, url: &str, ca: Option<&Ca>, extra: &str) -> Flowgate {
    start_b_at(upstream, url, "/_flowgate/api/v3", ca, extra)
}

fn start_b_at(
    upstream: &str,
    url: &str,
    api_prefix: &str,
    ca: Option<&Ca>,
    extra: &str,
) -> Flowgate {
    let dir = tempfile::tempdir().unwrap();
    let ca_line = match ca {
        Some(ca) => {
            std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
            "ca_file = \"ca.pem\"\n"
        }
        None => "",
    };
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[session]
secret = "b-secret-b-secret-b-secret-b-secret-0123456789"

[executor]
kind = "remote"
url = "{url}"
api_prefix = "{api_prefix}"
{ca_line}{extra}

[[route]]
path_prefix = "/admin"
upstream = "{upstream}"
allow = {{ groups = ["admins"] }}

[[route]]
path_prefix = "/closed"
upstream = "{upstream}"
flow = "closed"

[[route]]
upstream = "{upstream}"
skip_auth = ["^/public(/|$)"]
"#
    );
    std::fs::write(dir.path().join("flowgate.toml"), config).unwrap();
    Flowgate::start_in(dir)
}

/// A's `[executor_api]` listener, as its log names it.
fn executor_api_addr(a: &Flowgate) -> std::net::SocketAddr {
    let log = a.log();
    log.split("executor API serving on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no executor API address in:\n{log}"))
}

fn executor_api_url(a: &Flowgate) -> String {
    format!("https://localhost:{}", executor_api_addr(a).port())
}

fn a_url(a: &Flowgate) -> String {
    format!("https://localhost:{}", a.addr.port())
}

/// A browser asks B for `path`: sent to sign in, the page it lands on.
async fn login_page(client: &reqwest::Client, b: &Flowgate, path: &str) -> String {
    let first = client
        .get(b.url(path))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 302);
    let started = client.get(b.url(&location(&first))).send().await.unwrap();
    assert_eq!(started.status(), 303);
    let page = client.get(b.url(&location(&started))).send().await.unwrap();
    page.text().await.unwrap()
}

/// The JSON executor of B, run to the end with `answers` in order; the
/// last answer's body.
async fn json_run(client: &reqwest::Client, b: &Flowgate, answers: &[Value]) -> Vec<Value> {
    let url = b.url(&format!(
        "/_flowgate/api/v3/flows/executor/{FLOW}/?query=next%3D%252Freports"
    ));
    let mut seen = vec![get_json(client, &url).await];
    for answer in answers {
        let mut response = client.post(&url).json(answer).send().await.unwrap();
        while response.status() == 302 {
            response = client.get(&url).send().await.unwrap();
        }
        assert_eq!(response.status(), 200);
        seen.push(response.json().await.unwrap());
    }
    seen
}

/// alice signs in through B's JSON executor (run on A).
async fn alice_signs_in(client: &reqwest::Client, b: &Flowgate) {
    let seen = json_run(
        client,
        b,
        &[
            json!({"uid_field": "alice"}),
            json!({"password": ALICE.password}),
        ],
    )
    .await;
    assert_eq!(seen[2]["component"], "xak-flow-redirect", "{seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_login_through_b_runs_on_a_and_b_forwards_as_a_says() {
    let ca = Ca::new("remote test CA");
    let a = start_a(&ca);
    let upstream = Upstream::start().await;
    let b = start_b(&upstream.url(), &a_url(&a), Some(&ca), "");
    // From another address than B's own: A must see the client's.
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let seen = json_run(
        &client,
        &b,
        &[
            json!({"uid_field": "alice"}),
            json!({"password": ALICE.password}),
        ],
    )
    .await;
    assert_eq!(seen[0]["component"], "ak-stage-identification", "{seen:?}");
    assert_eq!(seen[1]["component"], "ak-stage-password", "{seen:?}");
    assert_eq!(
        seen[2],
        json!({"component": "xak-flow-redirect", "to": "/reports"})
    );
    // A's cookies stay with B: the client holds only B's.
    let echo: Value = client
        .get(b.url("/admin/x"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["headers"]["x-forwarded-user"], "alice");
    assert_eq!(echo["headers"]["x-forwarded-email"], "alice@example.test");
    assert_eq!(echo["headers"]["x-forwarded-groups"], "admins,staff");
    assert!(
        !echo["headers"]["cookie"]
            .as_str()
            .unwrap_or("")
            .contains("flowgate_session"),
        "no session cookie upstream: {echo}"
    );
    // B's users/me says what A said.
    let me = get_json(&client, b.url("/_flowgate/api/v3/core/users/me/")).await;
    assert_eq!(me["user"]["username"], "alice");
    assert_eq!(me["user"]["name"], "Alice Example");
    // A saw the client's address as B passed it on, not B's alone.
    a.wait_for_log(
        "login succeeded user=alice client=127.0.0.2",
        Duration::from_secs(5),
    );
    b.wait_for_log(
        "login succeeded user=alice client=127.0.0.2",
        Duration::from_secs(5),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_totp_user_signs_in_through_b_and_a_non_admin_is_refused_admin() {
    let ca = Ca::new("remote test CA");
    let a = start_a(&ca);
    let upstream = Upstream::start().await;
    let b = start_b(&upstream.url(), &a_url(&a), Some(&ca), "");
    let client = client();
    let seen = json_run(
        &client,
        &b,
        &[
            json!({"uid_field": "bob"}),
            json!({"password": BOB.password}),
            json!({"code": totp_now(TOTP_KEY)}),
        ],
    )
    .await;
    assert_eq!(
        seen[2]["component"], "ak-stage-authenticator-validate",
        "{seen:?}"
    );
    assert_eq!(seen[3]["component"], "xak-flow-redirect", "{seen:?}");
    let ok = client.get(b.url("/reports")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let refused = client
        .get(b.url("/admin/x"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403, "bob is not in A's admins");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_html_login_through_b_shows_a_s_errors_and_then_lets_in() {
    let ca = Ca::new("remote test CA");
    let a = start_a(&ca);
    let upstream = Upstream::start().await;
    let b = start_b(&upstream.url(), &a_url(&a), Some(&ca), "");
    let client = client();
    let form = |html: &str| {
        (
            form_action(html).expect("a form"),
            input_value(html, "csrf_token").expect("a csrf token"),
        )
    };
    let html = login_page(&client, &b, "/reports").await;
    assert!(html.contains("name=\"uid_field\""), "{html}");
    let (action, csrf) = form(&html);
    let posted = client
        .post(b.url(&action))
        .form(&[("csrf_token", csrf.as_str()), ("uid_field", "alice")])
        .send()
        .await
        .unwrap();
    // A passed stage is a 303 to the page, as with the embedded engine
    // (B keeps what the remote showed next: no second round trip).
    assert_eq!(posted.status(), 303);
    let html = client
        .get(b.url(&location(&posted)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("name=\"password\""), "{html}");
    let (action, csrf) = form(&html);
    let wrong = client
        .post(b.url(&action))
        .form(&[("csrf_token", csrf.as_str()), ("password", "not it")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 200, "the form again, with A's error");
    let html = wrong.text().await.unwrap();
    assert!(html.contains("Invalid password"), "{html}");
    // B logs the refusal as the embedded engine would, for fail2ban on B.
    b.wait_for_log(
        "login failed reason=password user=alice client=127.0.0.1 flow=default-authentication-flow",
        Duration::from_secs(5),
    );
    let (action, csrf) = form(&html);
    let done = client
        .post(b.url(&action))
        .form(&[("csrf_token", csrf.as_str()), ("password", ALICE.password)])
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 303);
    assert_eq!(location(&done), "/reports");
    assert_eq!(
        upstream_user(&client, b.url("/reports")).await.as_deref(),
        Some("alice")
    );
}

/// A is not there: 503 for pages and JSON, one line in B's log saying what
/// happened, nothing of it in the answer.
#[tokio::test(flavor = "multi_thread")]
async fn a_remote_that_is_down_is_a_503_page_and_json() {
    let upstream = Upstream::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let b = start_b(&upstream.url(), &url, None, "");
    let client = client();
    let api = client
        .get(b.url(&format!("/_flowgate/api/v3/flows/executor/{FLOW}/")))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 503);
    let body = api.text().await.unwrap();
    assert!(body.contains("temporarily unavailable"), "{body}");
    assert!(!body.contains("127.0.0.1"), "no internals: {body}");
    let started = client
        .get(b.url(&format!("/_flowgate/flow/{FLOW}/?next=%2F")))
        .send()
        .await
        .unwrap();
    let page = client.get(b.url(&location(&started))).send().await.unwrap();
    assert_eq!(page.status(), 503);
    assert!(page.text().await.unwrap().contains("Try again"));
    b.wait_for_log("login temporarily unavailable", Duration::from_secs(5));
    let log = b.log();
    assert!(
        log.contains("Connection refused") || log.contains("connection refused"),
        "the cause reaches the log: {log}"
    );
}

/// Something answers, but not as an executor: 502. Something accepts and
/// never answers: the timeout, then 503.
#[tokio::test(flavor = "multi_thread")]
async fn a_remote_answering_nonsense_is_502_and_one_hanging_is_the_timeout() {
    let upstream = Upstream::start().await;
    let nonsense = common::raw::Scripted::start(|_| {
        common::raw::Reply::keep(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 9\r\n\r\n<html>hi!"
                .to_vec(),
        )
    });
    let b = start_b(&upstream.url(), &nonsense.url(), None, "");
    let api = client()
        .get(b.url(&format!("/_flowgate/api/v3/flows/executor/{FLOW}/")))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 502);
    b.wait_for_log("answer is not JSON", Duration::from_secs(5));

    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", hanging.local_addr().unwrap().port());
    let b = start_b(&upstream.url(), &url, None, "timeout = \"1s\"\n");
    let started = std::time::Instant::now();
    let api = client()
        .get(b.url(&format!("/_flowgate/api/v3/flows/executor/{FLOW}/")))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 503);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    drop(hanging);
}

/// Active sessions on A, from its metrics.
async fn sessions_on(a: &Flowgate) -> String {
    let admin = a.admin.expect("admin listener");
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("flowgate_active_sessions "))
        .unwrap_or("")
        .to_owned()
}

/// Signing out at B ends the session at A too: B runs A's invalidation
/// flow with the session's own jar.
#[tokio::test(flavor = "multi_thread")]
async fn signing_out_at_b_ends_the_session_at_a() {
    let ca = Ca::new("remote test CA");
    let a = start_a(&ca);
    let upstream = Upstream::start().await;
    let b = start_b(&upstream.url(), &a_url(&a), Some(&ca), "");
    let client = client();
    alice_signs_in(&client, &b).await;
    assert_eq!(sessions_on(&a).await, "flowgate_active_sessions 1");
    let confirm = client
        .get(b.url("/_flowgate/sign_out"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = input_value(&confirm, "csrf_token").unwrap();
    let out = client
        .post(b.url("/_flowgate/sign_out"))
        .form(&[("csrf_token", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 200);
    assert_eq!(
        sessions_on(&a).await,
        "flowgate_active_sessions 0",
        "A's session ended with B's"
    );
    a.wait_for_log("signed out", Duration::from_secs(5));
    let after = client
        .get(b.url("/reports"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401);
}

/// A session follows the remote one: alice disabled at A (her sessions
/// there ended), B ends hers within `revalidate`, off the request path.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_signed_out_at_a_is_signed_out_at_b_within_revalidate() {
    let ca = Ca::new("remote test CA");
    let a = start_a(&ca);
    let upstream = Upstream::start().await;
    let b = start_b(
        &upstream.url(),
        &a_url(&a),
        Some(&ca),
        "revalidate = \"1s\"\n",
    );
    let client = client();
    alice_signs_in(&client, &b).await;
    let status = |client: &reqwest::Client| {
        let (client, url) = (client.clone(), b.url("/reports"));
        async move { api_status(&client, url).await }
    };
    assert_eq!(status(&client).await, 200);
    // Still signed in at A after a check: B keeps the session.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(status(&client).await, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&client).await, 200, "A still has the session");

    let users = a.path().join("users.toml");
    let text = std::fs::read_to_string(&users).unwrap().replace(
        "email = \"alice@example.test\"",
        "email = \"alice@example.test\"\ndisabled = true",
    );
    std::fs::write(&users, text).unwrap();
    a.signal("HUP");
    a.wait_for_log("sessions ended", Duration::from_secs(5));
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    let mut last = 200;
    while std::time::Instant::now() < deadline {
        last = status(&client).await;
        if last == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last, 401, "B's session ended after A's: {}", b.log());
    assert!(b
        .log()
        .contains("session ended: the remote executor's session is gone"));
}

/// A's `[executor_api]` listener: the same executor at authentik's own
/// paths (`/api/v3/…`), over TLS, as B drives authentik.
#[tokio::test(flavor = "multi_thread")]
async fn b_drives_a_through_its_executor_api_listener_at_authentik_paths() {
    let ca = Ca::new("remote test CA");
    let a = start_a(&ca);
    let api = executor_api_addr(&a);
    let upstream = Upstream::start().await;
    let url = executor_api_url(&a);
    let b = start_b_at(&upstream.url(), &url, "/api/v3", Some(&ca), "");
    let client = client();
    alice_signs_in(&client, &b).await;
    let echo: Value = client
        .get(b.url("/admin/x"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["headers"]["x-forwarded-user"], "alice");
    // authentik's own paths answer as authentik does: users/me without a
    // session is 403, anything else 404.
    let direct = reqwest::Client::builder()
        .add_root_certificate(ca.root())
        .resolve("localhost", api)
        .build()
        .unwrap();
    let me = direct
        .get(format!("{url}/api/v3/core/users/me/"))
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 403);
    let other = direct
        .get(format!("{url}/_flowgate/sign_out"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
}

/// A GET that could not connect is asked once more a moment later (it
/// never reached the remote): a remote back within that moment is not an
/// error page.
#[tokio::test(flavor = "multi_thread")]
async fn a_get_that_could_not_connect_is_asked_once_more() {
    let upstream = Upstream::start().await;
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = reserved.local_addr().unwrap().port();
    drop(reserved);
    let b = start_b(
        &upstream.url(),
        &format!("http://127.0.0.1:{port}"),
        None,
        "",
    );
    let late = std::thread::spawn(move || {
        use std::io::{Read, Write};
        std::thread::sleep(Duration::from_millis(40));
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => return,
            }
        };
        stream.set_nonblocking(false).unwrap();
        let mut head = [0u8; 4096];
        let _ = stream.read(&mut head);
        let body = r#"{"component":"ak-stage-identification","user_fields":["username"],"password_fields":false,"primary_action":"Log in","flow_designation":"authentication"}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(answer.as_bytes()).unwrap();
    });
    let answer: Value = client()
        .get(b.url(&format!("/_flowgate/api/v3/flows/executor/{FLOW}/")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    late.join().unwrap();
    assert_eq!(answer["component"], "ak-stage-identification", "{answer}");
    b.wait_for_log("asking again", Duration::from_secs(5));
}

/// authentik's own Python client (`authentik-client`, the package its
/// docs point API users to) signs in with `base` as its API root: every
/// answer goes through the client's generated models, so what would not
/// validate for its users fails here.
fn official_client_signs_in(base: &str, ca: &Ca) {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients/authentik_client_login.py");
    let output = std::process::Command::new("python3")
        .arg(script)
        .arg(fixtures().join("authentik"))
        .arg(base)
        .arg(&ca_file)
        .arg(FLOW)
        .args([ALICE.username, ALICE.password, BOB.username, BOB.password])
        .arg(base32(TOTP_KEY))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "authentik's client against {base}:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("control: "), "{stdout}");
    assert!(
        stdout.contains("users/me: alice groups=['admins', 'staff']"),
        "{stdout}"
    );
    assert!(
        stdout.contains("users/me: bob groups=['staff']"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn authentiks_own_client_signs_in_at_a_s_executor_api() {
    if !require_python_module("authentik_client") {
        return;
    }
    let ca = Ca::new("remote test CA");
    let a = start_a(&ca);
    let base = format!("{}/api/v3", executor_api_url(&a));
    let run = tokio::task::spawn_blocking(move || official_client_signs_in(&base, &ca)).await;
    if let Err(error) = run {
        panic!("{error}\nA's log:\n{}", a.log());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn authentiks_own_client_signs_in_through_b_run_on_a() {
    if !require_python_module("authentik_client") {
        return;
    }
    let ca = Ca::new("remote test CA");
    let a = start_a(&ca);
    let upstream = Upstream::start().await;
    let b = start_b(&upstream.url(), &a_url(&a), Some(&ca), "");
    let base = b.url("/_flowgate/api/v3");
    let run = tokio::task::spawn_blocking(move || official_client_signs_in(&base, &ca)).await;
    if let Err(error) = run {
        panic!("{error}\nB's log:\n{}\nA's log:\n{}", b.log(), a.log());
    }
}

/// B's JSON executor answers as authentik and A do: a passed stage is a
/// 302 back to the executor and the next challenge is the GET's, errors are
/// a 200 with the same stage; the GET after a 302 costs A nothing.
#[tokio::test(flavor = "multi_thread")]
async fn b_s_json_executor_answers_a_passed_stage_with_a_302() {
    let ca = Ca::new("remote test CA");
    let a = start_a(&ca);
    let upstream = Upstream::start().await;
    let b = start_b(&upstream.url(), &a_url(&a), Some(&ca), "");
    let client = client();
    let url = b.url(&format!(
        "/_flowgate/api/v3/flows/executor/{FLOW}/?query=next%3D%252Freports"
    ));
    let first = get_json(&client, &url).await;
    assert_eq!(first["component"], "ak-stage-identification");
    let posted = client
        .post(&url)
        .json(&json!({"uid_field": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 302, "{}", b.log());
    assert!(
        location(&posted).contains(&format!("/_flowgate/api/v3/flows/executor/{FLOW}/")),
        "{}",
        location(&posted)
    );
    let asked_of_a = || {
        a.log()
            .matches("method=\"GET\" path=\"/_flowgate/api/v3/flows/executor/")
            .count()
    };
    let before = asked_of_a();
    let password = get_json(&client, &url).await;
    assert_eq!(password["component"], "ak-stage-password", "{password}");
    assert_eq!(asked_of_a(), before, "the GET after a 302 is B's alone");
    let wrong = client
        .post(&url)
        .json(&json!({"password": "not it"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 200);
    let wrong: Value = wrong.json().await.unwrap();
    assert_eq!(wrong["component"], "ak-stage-password");
    assert!(wrong["response_errors"]["password"].is_array(), "{wrong}");
    let right = client
        .post(&url)
        .json(&json!({"password": ALICE.password}))
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 302);
    let done = get_json(&client, &url).await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    assert_eq!(done["to"], "/reports");
    assert_eq!(
        upstream_user(&client, b.url("/reports")).await.as_deref(),
        Some("alice")
    );
}

/// Groups follow the remote: alice taken out of `admins` at A loses B's
/// `/admin` within `revalidate`, still signed in; put back, she has it again.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_changed_at_a_applies_at_b_within_revalidate() {
    let ca = Ca::new("remote test CA");
    let a = start_a(&ca);
    let upstream = Upstream::start().await;
    let b = start_b(
        &upstream.url(),
        &a_url(&a),
        Some(&ca),
        "revalidate = \"1s\"\n",
    );
    let client = client();
    alice_signs_in(&client, &b).await;
    let status = |path: &'static str| api_status(&client, b.url(path));
    assert_eq!(status("/admin/x").await, 200);
    let users = a.path().join("users.toml");
    let before = std::fs::read_to_string(&users).unwrap();
    let set_users = |text: &str| {
        let temp = a.path().join("users.toml.new");
        std::fs::write(&temp, text).unwrap();
        std::fs::rename(&temp, &users).unwrap();
        a.signal("HUP");
    };
    let until = |path: &'static str, wanted: u16| {
        let status = &status;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(8);
            let mut last = 0;
            while std::time::Instant::now() < deadline {
                last = status(path).await;
                if last == wanted {
                    return last;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            last
        }
    };
    set_users(&before.replace("groups = [\"admins\", \"staff\"]", "groups = [\"staff\"]"));
    assert_eq!(until("/admin/x", 403).await, 403, "{}", b.log());
    assert_eq!(status("/reports").await, 200, "still signed in");
    set_users(&before);
    assert_eq!(until("/admin/x", 200).await, 200, "{}", b.log());
}

/// A's deny stage, and a user A has disabled, are refusals B shows as A
/// says them: the access-denied page and challenge, and nobody signed in.
#[tokio::test(flavor = "multi_thread")]
async fn a_s_deny_stage_and_a_disabled_user_are_refused_through_b() {
    let ca = Ca::new("remote test CA");
    let a = start_a(&ca);
    let upstream = Upstream::start().await;
    let b = start_b(&upstream.url(), &a_url(&a), Some(&ca), "");
    // The deny flow, as a page.
    let client = client();
    let html = login_page(&client, &b, "/closed/x").await;
    assert!(html.contains("Access denied"), "{html}");
    assert!(!html.contains("<form method=\"post\""), "{html}");
    // And as JSON.
    let denied = get_json(
        &client,
        b.url("/_flowgate/api/v3/flows/executor/closed/?query=next%3D%252Fclosed"),
    )
    .await;
    assert_eq!(denied["component"], "ak-stage-access-denied", "{denied}");

    // bob disabled at A: his password is right, and still nobody signs in.
    let users = a.path().join("users.toml");
    let text = std::fs::read_to_string(&users).unwrap().replace(
        "email = \"bob@example.test\"",
        "email = \"bob@example.test\"\ndisabled = true",
    );
    std::fs::write(&users, text).unwrap();
    a.signal("HUP");
    a.wait_for_log("configuration reloaded", Duration::from_secs(5));
    let bob = common::client();
    let seen = json_run(
        &bob,
        &b,
        &[
            json!({"uid_field": "bob"}),
            json!({"password": BOB.password}),
        ],
    )
    .await;
    let last = seen.last().unwrap();
    assert_ne!(last["component"], "xak-flow-redirect", "{seen:?}");
    let status = bob
        .get(b.url("/reports"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401, "bob is not signed in at B");
}
