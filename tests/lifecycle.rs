//! The process as an operator runs it: graceful shutdown, reloads (SIGHUP
//! and changed files; a broken reload is refused), the admin listener's
//! health, readiness and metrics, and the JSON access log.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// An upstream that answers after `delay`.
async fn slow_upstream(delay: Duration) -> (String, tokio::task::JoinHandle<()>) {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = service_fn(move |_request| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"finished")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_the_request_in_flight_finish_then_exits() {
    let (upstream, _task) = slow_upstream(Duration::from_millis(1500)).await;
    let mut gate = Flowgate::start(&basic_config(&upstream, ""), &users_file(&[&ALICE]));
    let url = gate.url("/public/slow");
    let in_flight = tokio::spawn(async move { reqwest::Client::new().get(url).send().await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    gate.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // No new connections once shutdown began.
    let refused = reqwest::Client::new()
        .get(gate.url("/public/x"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(refused.is_err(), "a new request was served during shutdown");
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "finished");
    let status = gate
        .wait_exit(Duration::from_secs(5))
        .expect("flowgate exits after draining");
    assert!(status.success(), "{status:?}");
    assert!(
        gate.log().contains("all connections closed"),
        "{}",
        gate.log()
    );
}

/// A reload that changes a key read only at start says which, and applies
/// the rest.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_names_the_keys_that_take_a_restart() {
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), "");
    let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let changed = config.replace(
        "[session]",
        "[log]\nformat = \"json\"\nlevel = \"debug\"\n\n[session]",
    );
    assert_ne!(changed, config);
    std::fs::write(gate.path().join("flowgate.toml"), changed).unwrap();
    gate.signal("HUP");
    gate.wait_for_log("configuration reloaded", Duration::from_secs(5));
    let log = gate.log();
    for key in ["log.format", "log.level"] {
        assert!(
            log.contains(&format!("{key} changed: that takes a restart")),
            "{key}: {log}"
        );
    }
    // Judged against what runs: the same file again still differs from it
    // (named again); the file as started differs in nothing.
    let reloads = |log: &str| log.matches("configuration reloaded").count();
    let wait_reload = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while reloads(&gate.log()) < n && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(reloads(&gate.log()) >= n, "{}", gate.log());
    };
    // (The file watcher may reload on its own too: count from now.)
    std::thread::sleep(Duration::from_millis(1500));
    let before = gate.log().len();
    let n = reloads(&gate.log());
    gate.signal("HUP");
    wait_reload(n + 1);
    assert!(gate.log()[before..].contains("log.format changed: that takes a restart"));
    std::fs::write(gate.path().join("flowgate.toml"), &config).unwrap();
    let before = gate.log().len();
    let n = reloads(&gate.log());
    gate.signal("HUP");
    wait_reload(n + 1);
    std::thread::sleep(Duration::from_millis(1500));
    let after = &gate.log()[before..];
    assert!(!after.contains("takes a restart"), "{after}");
}

/// With `server.shutdown_delay`, SIGTERM first turns `/readyz` to 503 while
/// the listener keeps serving, new connections included; after the delay
/// it stops accepting and exits. A load balancer polling readiness stops
/// sending before anything is refused.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_says_not_ready_and_keeps_serving_for_the_shutdown_delay() {
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), "").replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\nshutdown_delay = \"4s\"\n",
    );
    let mut gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let admin = format!("http://{}", gate.admin.expect("admin address"));
    let client = reqwest::Client::new();
    let ready = |client: &reqwest::Client| {
        let url = format!("{admin}/readyz");
        let client = client.clone();
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(ready(&client).await.unwrap(), 200);
    let started = std::time::Instant::now();
    gate.signal("TERM");
    // Generous waits: a loaded CI machine is slow to log, not to stop.
    gate.wait_for_log("still serving for", Duration::from_secs(3));
    assert_eq!(ready(&client).await.unwrap(), 503);
    // New connections, and requests on them, are still served.
    for _ in 0..3 {
        let fresh = reqwest::Client::new();
        let response = fresh.get(gate.url("/public/x")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the checks took too long"
    );
    let status = gate
        .wait_exit(Duration::from_secs(8))
        .expect("flowgate exits after the delay and the drain");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(3900),
        "exited before the delay: {:?}",
        started.elapsed()
    );
}

/// Connections with nothing in flight do not hold a shutdown up: one that
/// never sent a byte, and keep-alive ones idle after a request on either
/// path (the fast lane's `/public/…`, the general path's stylesheet).
#[test]
fn sigterm_closes_idle_connections_at_once() {
    use std::io::{Read, Write};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(Upstream::start());
    let mut gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let silent = std::net::TcpStream::connect(gate.addr).unwrap();
    let used = |path: &str| {
        let mut stream = std::net::TcpStream::connect(gate.addr).unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut first = [0u8; 12];
        stream.read_exact(&mut first).unwrap();
        assert_eq!(&first[9..], b"200", "{path}");
        stream
    };
    let fast = used("/public/x");
    let general = used("/_flowgate/static/flowgate.css");
    let started = Instant::now();
    gate.signal("TERM");
    let status = gate
        .wait_exit(Duration::from_secs(5))
        .expect("flowgate exits");
    assert!(status.success(), "{status:?}");
    // shutdown_timeout is 10 s: these did not wait for it.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        gate.log().contains("all connections closed"),
        "{}",
        gate.log()
    );
    drop((silent, fast, general));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_changed_route_and_refuses_a_broken_config() {
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), "");
    let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let client = reqwest::Client::new();
    let status = |path: &'static str| {
        let client = client.clone();
        let url = gate.url(path);
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/open/x").await, 401, "not public yet");

    // Keep one connection open across the reload: it must survive.
    let kept = reqwest::Client::new();
    assert_eq!(
        kept.get(gate.url("/public/a"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let changed = config.replace(
        "skip_auth = [\"^/public(/|$)\"]",
        "skip_auth = [\"^/public(/|$)\", \"^/open/\"]",
    );
    std::fs::write(gate.path().join("flowgate.toml"), &changed).unwrap();
    gate.signal("HUP");
    gate.wait_for_log("configuration reloaded", Duration::from_secs(5));
    assert_eq!(status("/open/x").await, 200, "the new route rule applies");
    assert_eq!(
        kept.get(gate.url("/public/b"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // A config with an error: refused, logged with its line, the old one stays.
    let broken = changed.replace("[[route]]", "[[route]]\nupstream_typo = 1");
    std::fs::write(gate.path().join("flowgate.toml"), broken).unwrap();
    gate.signal("HUP");
    gate.wait_for_log("reload refused", Duration::from_secs(5));
    assert!(
        gate.log().contains("route[0].upstream_typo: unknown key"),
        "{}",
        gate.log()
    );
    assert_eq!(status("/open/x").await, 200, "still the last good config");
    assert_eq!(status("/private").await, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_users_file_is_picked_up_without_a_signal() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = client();
    let denied = json_login(&client, &gate.url(""), "bob", BOB.password, "/").await;
    assert_ne!(
        denied["component"], "xak-flow-redirect",
        "bob is not a user yet"
    );

    std::fs::write(gate.path().join("users.toml"), users_file(&[&ALICE, &BOB])).unwrap();
    gate.wait_for_log(
        "configuration reloaded (a watched file changed)",
        Duration::from_secs(10),
    );
    let client = common::client();
    let done = json_login(&client, &gate.url(""), "bob", BOB.password, "/").await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_survive_a_reload() {
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), "");
    let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let client = client();
    json_login(&client, &gate.url(""), "alice", ALICE.password, "/").await;
    std::fs::write(
        gate.path().join("flowgate.toml"),
        config.replace("title = \"Sign in\"", "title = \"Welcome\""),
    )
    .unwrap();
    gate.signal("HUP");
    gate.wait_for_log("configuration reloaded", Duration::from_secs(5));
    let echo: Value = get_json(&client, gate.url("/still-in")).await;
    assert_eq!(echo["headers"]["x-forwarded-user"], "alice");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_listener_reports_health_readiness_and_metrics() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let admin = format!(
        "http://{}",
        gate.admin.expect("admin listener address in the log")
    );
    let client = reqwest::Client::new();
    assert_eq!(
        client
            .get(format!("{admin}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let metrics = || {
        let client = client.clone();
        let url = format!("{admin}/metrics");
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let before = metrics().await;
    assert!(
        before.contains("flowgate_build_info{version=\""),
        "{before}"
    );
    assert!(
        !before.contains("flowgate_requests_total{route=\"*/\",code=\"200\"}"),
        "{before}"
    );

    client.get(gate.url("/public/one")).send().await.unwrap();
    let user = common::client();
    json_login(&user, &gate.url(""), "alice", ALICE.password, "/").await;
    user.get(gate.url("/two")).send().await.unwrap();
    let bad = common::client();
    json_login(&bad, &gate.url(""), "alice", "wrong", "/").await;

    let after = metrics().await;
    for line in [
        "flowgate_requests_total{route=\"*/\",code=\"200\"} 2",
        "flowgate_request_duration_seconds_count{route=\"*/\"} 2",
        "flowgate_logins_total{result=\"succeeded\"} 1",
        "flowgate_active_sessions 1",
        "flowgate_upstream_errors_total{route=\"*/\"} 0",
    ] {
        assert!(after.contains(line), "missing {line:?} in:\n{after}");
    }
    assert!(
        after.contains("flowgate_logins_total{result=\"failed\"} 1"),
        "{after}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn json_access_log_has_one_line_per_request_and_no_secrets() {
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), "[log]\nformat = \"json\"\n");
    let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let client = client();
    json_login(&client, &gate.url(""), "alice", ALICE.password, "/").await;
    client
        .get(gate.url("/report?token=s3cr3t-query"))
        .send()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let found = gate
            .log()
            .lines()
            .find(|l| l.contains("\"path\":\"/report\""))
            .map(str::to_owned);
        if let Some(line) = found {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no access log line:\n{}",
            gate.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let entry: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(entry["fields"]["status"], 200, "{entry}");
    assert_eq!(entry["fields"]["user"], "alice", "{entry}");
    assert_eq!(entry["fields"]["method"], "GET", "{entry}");
    let log = gate.log();
    assert!(
        !log.contains("s3cr3t-query"),
        "query strings are not logged"
    );
    assert!(!log.contains(ALICE.password), "passwords are not logged");
    for line in log.lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
}

/// A users file emptied (caught half-written, or cleared by mistake) is
/// refused at a reload: nobody is signed out, the users stay.
#[tokio::test(flavor = "multi_thread")]
async fn an_emptied_users_file_is_refused_and_signs_nobody_out() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let (alice, _) = signed_in(&gate, &ALICE).await;
    std::fs::write(gate.path().join("users.toml"), "").unwrap();
    gate.signal("HUP");
    gate.wait_for_log(
        "the users file has no users now (it had 1)",
        Duration::from_secs(10),
    );
    assert!(gate.log().contains("reload refused"), "{}", gate.log());
    let response = alice
        .get(gate.url("/private"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "alice is still signed in");
    let client = client();
    let done = json_login(&client, &gate.url(""), "alice", ALICE.password, "/").await;
    assert_eq!(
        done["component"], "xak-flow-redirect",
        "and can still sign in: {done}"
    );
}
