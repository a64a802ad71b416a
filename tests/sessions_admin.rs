//! Sessions people can manage: `flowgate sessions list/revoke` on the
//! configured store beside the running server, and the admin listener's
//! `GET /sessions`, `DELETE /sessions/{id}`, `DELETE /users/{name}/sessions`
//! behind a bearer token. A revoked session stops working on the running
//! server within a second, cache or not.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TOKEN: &str = "admin-token-0123456789abcdef";

fn start(upstream: &str) -> Flowgate {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.token"), format!("{TOKEN}\n")).unwrap();
    let config = basic_config(upstream, "[admin]\ntoken_file = \"admin.token\"\n");
    std::fs::write(dir.path().join("flowgate.toml"), config).unwrap();
    std::fs::write(dir.path().join("users.toml"), users_file(&[&ALICE, &BOB])).unwrap();
    Flowgate::start_in(dir)
}

fn cli(gate: &Flowgate, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("sessions")
        .args(args)
        .arg("--config")
        .arg(gate.path().join("flowgate.toml"))
        .env_remove("FLOWGATE_SESSION_SECRET")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn status(client: &reqwest::Client, gate: &Flowgate) -> u16 {
    api_status(client, gate.url("/private")).await
}

/// Poll until `client` is refused; how long it took.
async fn refused_within(client: &reqwest::Client, gate: &Flowgate, limit: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if status(client, gate).await == 401 {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("still signed in after {limit:?}:\n{}", gate.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_lists_and_revokes_beside_the_running_server() {
    let upstream = Upstream::start().await;
    let gate = start(&upstream.url());
    let (alice1, cookie) = signed_in(&gate, &ALICE).await;
    let (alice2, _) = signed_in(&gate, &ALICE).await;
    let (bob, _) = signed_in(&gate, &BOB).await;
    for client in [&alice1, &alice2, &bob] {
        assert_eq!(status(client, &gate).await, 200);
    }
    let (ok, out, err) = cli(&gate, &["list", "--json"]);
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    let sessions = listed["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 3, "{out}");
    let id_in_cookie = cookie
        .split("; ")
        .find_map(|c| c.strip_prefix("flowgate_session="))
        .and_then(|v| v.rsplit_once('.'))
        .map(|(id, _)| id.to_owned())
        .unwrap();
    assert!(
        !out.contains(&id_in_cookie),
        "the listing holds no cookie's id"
    );
    assert!(sessions
        .iter()
        .all(|s| s["id"].as_str().unwrap().len() == 64));
    let (ok, table, _) = cli(&gate, &["list", "--user", "alice"]);
    assert!(ok);
    assert_eq!(
        table.lines().filter(|l| l.contains(" alice ")).count(),
        2,
        "{table}"
    );
    assert!(!table.contains(" bob "), "{table}");

    // Revoked from the command line: the running server stops taking them
    // (it had them cached) within a second.
    let (ok, out, err) = cli(&gate, &["revoke", "--user", "alice"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "2 sessions ended");
    let took = refused_within(&alice1, &gate, Duration::from_secs(1)).await;
    eprintln!("revocation from the CLI reached the server in {took:?}");
    refused_within(&alice2, &gate, Duration::from_secs(1)).await;
    assert_eq!(status(&bob, &gate).await, 200, "bob's stays");

    let bob_id = cli(&gate, &["list", "--json"]).1;
    let bob_id: Value = serde_json::from_str(&bob_id).unwrap();
    let bob_id = bob_id["sessions"][0]["id"].as_str().unwrap().to_owned();
    let (ok, out, _) = cli(&gate, &["revoke", "--id", &bob_id]);
    assert!(ok);
    assert_eq!(out.trim(), "1 session ended");
    refused_within(&bob, &gate, Duration::from_secs(1)).await;
    let (ok, out, err) = cli(&gate, &["revoke", "--user", "nobody"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "0 sessions ended");
    assert!(err.contains("no session of \"nobody\" is live"), "{err}");
    let (ok, _, err) = cli(&gate, &["revoke", "--id", "not-an-id"]);
    assert!(!ok);
    assert!(err.contains("64 hex digits"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_listener_lists_and_ends_sessions_with_the_token() {
    let upstream = Upstream::start().await;
    let gate = start(&upstream.url());
    let admin = format!("http://{}", gate.admin.expect("an admin listener"));
    let (alice, _) = signed_in(&gate, &ALICE).await;
    let (bob, _) = signed_in(&gate, &BOB).await;
    let http = reqwest::Client::new();
    for token in [None, Some("wrong-token-0123456789"), Some("")] {
        let mut request = http.get(format!("{admin}/sessions"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{token:?}");
    }
    // Another scheme, or the token in the query: refused too. The scheme's
    // case is not the token's.
    for (header, expected) in [
        (format!("Basic {TOKEN}"), 401),
        (format!("bearer {TOKEN}"), 200),
        (format!("BEARER {TOKEN}"), 200),
    ] {
        let response = http
            .get(format!("{admin}/sessions"))
            .header("authorization", &header)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "{header}");
    }
    let query = http
        .get(format!("{admin}/sessions?access_token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(query.status(), 401);
    let listed: Value = http
        .get(format!("{admin}/sessions?user=bob"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sessions = listed["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{listed}");
    assert_eq!(sessions[0]["user"], "bob");
    assert_eq!(sessions[0]["groups"], serde_json::json!(["staff"]));
    let id = sessions[0]["id"].as_str().unwrap();
    let ended = http
        .delete(format!("{admin}/sessions/{id}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(ended.status(), 200);
    assert_eq!(
        status(&bob, &gate).await,
        401,
        "at once: this process ended it"
    );
    let again = http
        .delete(format!("{admin}/sessions/{id}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    let ended: Value = http
        .delete(format!("{admin}/users/alice/sessions"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ended["ended"], 1);
    assert_eq!(status(&alice, &gate).await, 401);
    gate.wait_for_log("sessions revoked (admin listener)", Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_token_file_the_session_endpoints_are_off() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), "[state]\nstore = \"memory\"\n"),
        &users_file(&[&ALICE]),
    );
    let admin = format!("http://{}", gate.admin.expect("an admin listener"));
    let response = reqwest::get(format!("{admin}/sessions")).await.unwrap();
    assert_eq!(response.status(), 404);
    let body = response.text().await.unwrap();
    assert!(body.contains("admin.token_file"), "{body}");
    // The memory store lives in the server: the CLI says where to ask.
    let (ok, _, err) = cli(&gate, &["list"]);
    assert!(!ok);
    assert!(err.contains("admin listener"), "{err}");
}

/// A revocation made right after the server starts is heard (the server
/// knows where to listen from before it serves), and the fast lane keeps a
/// connection's session answers no longer than the store does: on one
/// kept-alive connection, the requests after a revocation are refused
/// within a second (an answer the lane fetched once is not reused).
#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_holds_on_a_connection_kept_alive_since_before_it() {
    let upstream = Upstream::start().await;
    let gate = start(&upstream.url());
    let (_, cookie) = signed_in(&gate, &ALICE).await;
    let addr = gate.addr;
    let get = common::raw::request("GET", "/private", &[&format!("cookie: {cookie}")]);
    let mut connection = tokio::task::spawn_blocking(move || {
        let mut connection = common::raw::Client::connect(addr);
        for _ in 0..3 {
            connection.send(&get);
            assert_eq!(connection.response("GET").status, 200);
        }
        connection
    })
    .await
    .unwrap();
    let (ok, out, err) = cli(&gate, &["revoke", "--user", "alice"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "1 session ended");
    // Heard within a quarter second; the very next request is refused.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let get = common::raw::request("GET", "/private", &[&format!("cookie: {cookie}")]);
    let status = tokio::task::spawn_blocking(move || {
        connection.send(&get);
        connection.response("GET").status
    })
    .await
    .unwrap();
    assert_eq!(status, 401, "{}", gate.log());
}
