//! How long a session lives: the idle timeout ends a quiet one and use keeps
//! it; the lifetime ends even a busy one; "stay signed in" at the user-login
//! stage (`remember_me_offset`) adds to the lifetime and lifts the idle
//! timeout, and the cookie's `Max-Age` says so; "no" gives a cookie that
//! ends with the browser.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// flowgate with `session` lines in `[session]` and `extra` appended.
fn start(upstream: &str, session: &str, extra: &str) -> Flowgate {
    let config =
        basic_config(upstream, extra).replace("[session]\n", &format!("[session]\n{session}"));
    Flowgate::start(&config, &users_file(&[&ALICE]))
}

async fn status(client: &reqwest::Client, gate: &Flowgate) -> u16 {
    api_status(client, gate.url("/private")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_idle_timeout_ends_a_quiet_session_and_use_keeps_it() {
    let upstream = Upstream::start().await;
    let gate = start(&upstream.url(), "idle_timeout = \"3s\"\n", "");
    let (client, _) = signed_in(&gate, &ALICE).await;
    // Busy for twice the timeout: still in.
    let busy = Instant::now();
    while busy.elapsed() < Duration::from_secs(6) {
        assert_eq!(status(&client, &gate).await, 200, "{:?}", busy.elapsed());
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // Quiet for longer than it: out.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(status(&client, &gate).await, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lifetime_ends_even_a_busy_session() {
    let upstream = Upstream::start().await;
    let gate = start(&upstream.url(), "lifetime = \"3s\"\n", "");
    let (client, _) = signed_in(&gate, &ALICE).await;
    let started = Instant::now();
    while status(&client, &gate).await == 200 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still in after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// Identification and password as JSON, then the user-login stage's
/// question answered with `remember`: the client, and the session
/// cookie's `Max-Age` (none: a browser-session cookie).
async fn login_remembering(gate: &Flowgate, remember: bool) -> (reqwest::Client, Option<u64>) {
    let client = client();
    let step = json_login(&client, &gate.url(""), "alice", ALICE.password, "/").await;
    assert_eq!(step["component"], "ak-stage-user-login", "{step}");
    let url = gate.url(&format!("/_flowgate/api/v3/flows/executor/{FLOW}/"));
    // The answer is required, and a boolean.
    let missing: Value = client
        .post(&url)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        missing["response_errors"]["remember_me"][0]["code"], "required",
        "{missing}"
    );
    let not_a_boolean: Value = client
        .post(&url)
        .json(&json!({"remember_me": "yes"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        not_a_boolean["response_errors"]["remember_me"][0]["code"], "invalid",
        "{not_a_boolean}"
    );
    let mut response = client
        .post(&url)
        .json(&json!({"remember_me": remember}))
        .send()
        .await
        .unwrap();
    let mut max_age = None;
    let mut minted = false;
    loop {
        for cookie in set_cookies(&response) {
            if let Some(rest) = cookie.strip_prefix("flowgate_session=") {
                if !rest.starts_with(';') {
                    minted = true;
                    max_age = cookie
                        .split(';')
                        .find_map(|part| part.trim().strip_prefix("Max-Age="))
                        .map(|v| v.parse::<u64>().unwrap());
                }
            }
        }
        if response.status() != 302 {
            break;
        }
        response = client.get(&url).send().await.unwrap();
    }
    let done: Value = response.json().await.unwrap();
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    assert!(minted, "a session cookie");
    (client, max_age)
}

#[tokio::test(flavor = "multi_thread")]
async fn staying_signed_in_adds_to_the_lifetime_and_lifts_the_idle_timeout() {
    let upstream = Upstream::start().await;
    let gate = start(
        &upstream.url(),
        "lifetime = \"1h\"\nidle_timeout = \"2s\"\n",
        "[stage.login]\nkind = \"user_login\"\nremember_me_offset = \"30d\"\n",
    );
    let (remembered, max_age) = login_remembering(&gate, true).await;
    assert_eq!(max_age, Some(3600 + 30 * 86400));
    // No (a shared device): the cookie ends with the browser.
    let (forgotten, max_age) = login_remembering(&gate, false).await;
    assert_eq!(max_age, None);
    assert_eq!(status(&remembered, &gate).await, 200);
    assert_eq!(status(&forgotten, &gate).await, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status(&remembered, &gate).await, 200, "stays signed in");
    assert_eq!(status(&forgotten, &gate).await, 401, "idled out");

    // The session listing shows the longer life.
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["sessions", "list", "--json", "--config"])
        .arg(gate.path().join("flowgate.toml"))
        .output()
        .unwrap();
    assert!(listed.status.success(), "{listed:?}");
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let session = &listed["sessions"][0];
    let life = session["expires"].as_u64().unwrap() - session["created"].as_u64().unwrap();
    assert_eq!(life, 3600 + 30 * 86400, "{listed}");
    assert_eq!(session["idle_deadline"], session["expires"], "{listed}");
}
