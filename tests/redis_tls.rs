//! flowgate on a real Redis that speaks only TLS (`rediss://`), its
//! certificate from a CA of the test's own given in `[state]
//! redis_ca_file`: sessions survive a restart of flowgate, read back over
//! TLS. A Redis whose certificate another CA signed is refused: logins
//! answer 503 and the log says why; without a configured secret (which the
//! store would keep) flowgate does not start, and says why.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ca::Ca;
use common::redis::Redis;
use common::*;
use serde_json::json;

const SECRET: &str = "secret = \"test-secret-test-secret-test-secret-0123456789\"\n";

/// A TLS-only redis-server whose certificate (for 127.0.0.1) `ca` signed.
fn tls_redis(dir: &Path, ca: &Ca) -> Option<Redis> {
    ca.issue(&["127.0.0.1"], 1).write(dir, "redis");
    let ca_file = dir.join("redis-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    Redis::start_tls(dir, "redis", &ca_file)
}

/// A flowgate folder: the config (with or without a secret), the users,
/// and `trusted` as `redis-ca.pem` beside them, which the config names
/// by that relative path.
fn folder(upstream: &str, redis: &Redis, trusted: &Ca, secret: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut config = basic_config(
        upstream,
        &format!(
            "[state]\nstore = \"redis\"\nredis_url = \"{}\"\nredis_ca_file = \"redis-ca.pem\"\n",
            redis.url()
        ),
    );
    if !secret {
        config = config.replace(SECRET, "");
    }
    std::fs::write(dir.path().join("flowgate.toml"), config).unwrap();
    std::fs::write(dir.path().join("users.toml"), users_file(&[&ALICE, &BOB])).unwrap();
    std::fs::write(dir.path().join("redis-ca.pem"), trusted.pem()).unwrap();
    dir
}

async fn status(client: &reqwest::Client, gate: &Flowgate) -> u16 {
    api_status(client, gate.url("/private")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_kept_over_tls_survive_a_restart_of_flowgate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("flowgate test Redis CA");
    let Some(redis) = tls_redis(dir.path(), &ca) else {
        return;
    };
    assert!(redis.url().starts_with("rediss://"), "{}", redis.url());
    let upstream = Upstream::start().await;
    // No secret in the config: the one kept in Redis, over TLS.
    let gate = Flowgate::start_in(folder(&upstream.url(), &redis, &ca, false));
    gate.wait_for_log(
        "using the one kept in the state store",
        Duration::from_secs(5),
    );
    let (alice, _) = signed_in(&gate, &ALICE).await;
    assert_eq!(status(&alice, &gate).await, 200, "{}", gate.log());

    let gate = gate.restart(false);
    // Nothing cached in the new process: alice's session is read over TLS.
    assert_eq!(status(&alice, &gate).await, 200, "{}", gate.log());
    let (bob, _) = signed_in(&gate, &BOB).await;
    assert_eq!(status(&bob, &gate).await, 200);
    assert!(!gate.log().contains("panicked"), "{}", gate.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some(redis) = tls_redis(dir.path(), &Ca::new("the CA Redis's certificate is from")) else {
        return;
    };
    let upstream = Upstream::start().await;
    let other = Ca::new("a CA flowgate trusts, which signed nothing here");

    // With a secret of its own, flowgate starts; what needs Redis fails
    // closed, and the log names the certificate problem.
    let gate = Flowgate::start_in(folder(&upstream.url(), &redis, &other, true));
    let bob = client();
    let url = gate.url(&format!("/_flowgate/api/v3/flows/executor/{FLOW}/"));
    let _ = bob.get(&url).send().await.unwrap();
    let posted = bob
        .post(&url)
        .json(&json!({"uid_field": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 503, "{}", gate.log());
    gate.wait_for_log(
        "invalid peer certificate: UnknownIssuer",
        Duration::from_secs(5),
    );
    assert_eq!(
        reqwest::get(gate.url("/public/x")).await.unwrap().status(),
        200
    );
    assert!(!gate.log().contains("panicked"), "{}", gate.log());
    drop(gate);

    // Without one, it needs the store's at start: it does not start.
    let folder = folder(&upstream.url(), &redis, &other, false);
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["serve", "--config"])
        .arg(folder.path().join("flowgate.toml"))
        .env_remove("FLOWGATE_SESSION_SECRET")
        .env("FLOWGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("flowgate kept running on a Redis it cannot trust");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("state: ") && stderr.contains("invalid peer certificate: UnknownIssuer"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
