//! State that outlives the process: the embedded store (the default for
//! `flowgate serve`) keeps sessions, logins in progress and the generated
//! cookie secret in one redb file, through a restart and a `kill -9`; what
//! has expired is gone; and the file holds no session id from any cookie.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A config without a secret (the store keeps the one it makes) and with
/// the default store.
fn config(upstream: &str, extra: &str) -> String {
    basic_config(upstream, "").replace(
        "[session]\nsecret = \"test-secret-test-secret-test-secret-0123456789\"\n",
        &format!("[session]\n{extra}\n"),
    )
}

fn executor(gate: &Flowgate) -> String {
    gate.url(&format!(
        "/_flowgate/api/v3/flows/executor/{FLOW}/?query=next%3D%252F"
    ))
}

async fn user_seen_upstream(client: &reqwest::Client, gate: &Flowgate) -> Option<String> {
    upstream_user(client, gate.url("/whoami")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_and_logins_in_progress_survive_a_restart() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&config(&upstream.url(), ""), &users_file(&[&ALICE, &BOB]));
    gate.wait_for_log(
        "sessions are kept in the embedded store",
        Duration::from_secs(5),
    );
    gate.wait_for_log(
        "using the one kept in the state store",
        Duration::from_secs(5),
    );
    let (alice, _) = signed_in(&gate, &ALICE).await;
    assert_eq!(
        user_seen_upstream(&alice, &gate).await.as_deref(),
        Some("alice")
    );
    // bob is half-way: his name given, his password not yet.
    let bob = client();
    let url = executor(&gate);
    let first: Value = bob.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(first["component"], "ak-stage-identification");
    let posted = bob
        .post(&url)
        .json(&json!({"uid_field": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 302);

    let gate = gate.restart(false);
    // The same secret (kept in the file), the same records.
    assert_eq!(
        user_seen_upstream(&alice, &gate).await.as_deref(),
        Some("alice"),
        "{}",
        gate.log()
    );
    let url = executor(&gate);
    let step: Value = bob.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        step["component"], "ak-stage-password",
        "bob's login goes on: {step}"
    );
    let mut done = bob
        .post(&url)
        .json(&json!({"password": BOB.password}))
        .send()
        .await
        .unwrap();
    while done.status() == 302 {
        done = bob.get(&url).send().await.unwrap();
    }
    let done: Value = done.json().await.unwrap();
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    assert_eq!(
        user_seen_upstream(&bob, &gate).await.as_deref(),
        Some("bob")
    );
}

/// `kill -9` while logins are being written: the file opens again, and
/// every login that finished before the kill still holds.
#[tokio::test(flavor = "multi_thread")]
async fn a_kill_9_in_the_middle_of_logins_loses_no_finished_login() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let mut finished = Vec::new();
    for _ in 0..3 {
        finished.push(signed_in(&gate, &ALICE).await.0);
    }
    // Logins in flight when the process dies.
    let base = gate.url("");
    let mut flying = Vec::new();
    for _ in 0..12 {
        let base = base.clone();
        flying.push(tokio::spawn(async move {
            let client = client();
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                json_login(&client, &base, ALICE.username, ALICE.password, "/"),
            )
            .await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let gate = gate.restart(true);
    for task in flying {
        let _ = task.await;
    }
    for client in &finished {
        assert_eq!(
            user_seen_upstream(client, &gate).await.as_deref(),
            Some("alice"),
            "{}",
            gate.log()
        );
    }
    // And it goes on working: a new login is written and read back.
    let (again, _) = signed_in(&gate, &ALICE).await;
    assert_eq!(
        user_seen_upstream(&again, &gate).await.as_deref(),
        Some("alice")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_session_is_gone_after_a_restart() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &config(&upstream.url(), "lifetime = \"2s\""),
        &users_file(&[&ALICE]),
    );
    let (alice, _) = signed_in(&gate, &ALICE).await;
    assert_eq!(
        user_seen_upstream(&alice, &gate).await.as_deref(),
        Some("alice")
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let gate = gate.restart(false);
    // Taken out of the file at start, not only ignored.
    gate.wait_for_log("expired sessions removed purged=1", Duration::from_secs(5));
    assert_eq!(user_seen_upstream(&alice, &gate).await, None);
}

/// What the file holds is keyed by hashes: neither the ids inside the
/// cookies nor the signed cookie values are in it.
#[tokio::test(flavor = "multi_thread")]
async fn the_state_file_holds_no_session_id() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&config(&upstream.url(), ""), &users_file(&[&ALICE, &BOB]));
    let mut ids = Vec::new();
    for user in [&ALICE, &BOB, &ALICE] {
        let (_, cookie) = signed_in(&gate, user).await;
        let value = cookie
            .split("; ")
            .find_map(|c| c.strip_prefix("flowgate_session="))
            .expect("the session cookie")
            .to_owned();
        let id = value.rsplit_once('.').map(|(id, _)| id.to_owned()).unwrap();
        ids.push(id);
    }
    // A login in progress too.
    let pending = client();
    let _ = pending.get(executor(&gate)).send().await.unwrap();
    let _ = pending
        .post(executor(&gate))
        .json(&json!({"uid_field": "bob"}))
        .send()
        .await
        .unwrap();
    let gate = gate.restart(false);
    // It keeps the generated cookie secret: its owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(gate.path().join("flowgate.state"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let bytes = std::fs::read(gate.path().join("flowgate.state")).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("alice"), "the records are there");
    for id in &ids {
        assert!(!text.contains(id.as_str()), "a session id in the file");
    }
}

/// Failed passwords are counted in the store, per account: a restart (even
/// a `kill -9`) forgives nobody, and another name of the account is no way
/// round the limit.
#[tokio::test(flavor = "multi_thread")]
async fn the_throttle_remembers_failures_through_a_restart() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&config(&upstream.url(), ""), &users_file(&[&ALICE]));
    for _ in 0..10 {
        let error = password_error(&gate.url(""), "alice", "wrong").await;
        assert_eq!(error.as_deref(), Some("invalid"));
    }
    let gate = gate.restart(true);
    assert_eq!(
        password_error(&gate.url(""), "alice", ALICE.password)
            .await
            .as_deref(),
        Some("throttled"),
        "even the right password, after a restart"
    );
    // Counted per account: her other name is throttled with it, and a
    // name that matches nobody is counted apart.
    assert_eq!(
        password_error(&gate.url(""), ALICE.email, ALICE.password)
            .await
            .as_deref(),
        Some("throttled"),
        "the email is the same account"
    );
    assert_eq!(
        password_error(&gate.url(""), "nobody", "x")
            .await
            .as_deref(),
        Some("invalid")
    );
}
