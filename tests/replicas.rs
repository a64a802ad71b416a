//! Two flowgates sharing one real Redis (`state.store = "redis"`): a login
//! on one holds on the other, a login started on one finishes on the other,
//! a sign-out on one ends the session on the other within a second (it had
//! it cached), and closes the websocket the other holds for it; with Redis down, logins fail closed (503) and flowgate
//! recovers by itself when Redis is back, sessions written before intact.

mod common;

use std::time::{Duration, Instant};

use common::apps::{next_message, ws_connect, WsUpstream};
use common::redis::Redis;
use common::totp::{base32, totp_now};
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Without a secret of its own: both replicas take the one kept in Redis.
/// `/ws` goes to the websocket app at `ws`, if any.
fn replica(upstream: &str, ws: Option<&WsUpstream>, redis: &Redis) -> Flowgate {
    replica_with(upstream, ws, redis, &users_file(&[&ALICE, &BOB]))
}

fn replica_with(upstream: &str, ws: Option<&WsUpstream>, redis: &Redis, users: &str) -> Flowgate {
    let ws_route = ws.map_or(String::new(), |ws| {
        format!(
            "[[route]]\nhost = \"*\"\npath_prefix = \"/ws\"\nupstream = \"{}\"\nflow = \"{FLOW}\"\n\n",
            ws.url()
        )
    });
    let config = basic_config(
        upstream,
        &format!(
            "{ws_route}[state]\nstore = \"redis\"\nredis_url = \"{}\"\n",
            redis.url()
        ),
    )
    .replace(
        "secret = \"test-secret-test-secret-test-secret-0123456789\"\n",
        "",
    );
    Flowgate::start(&config, users)
}

async fn status(client: &reqwest::Client, gate: &Flowgate) -> u16 {
    api_status(client, gate.url("/private")).await
}

fn executor(gate: &Flowgate) -> String {
    gate.url(&format!("/_flowgate/api/v3/flows/executor/{FLOW}/"))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_logins_flows_and_sign_outs() {
    let dir = tempfile::tempdir().unwrap();
    let Some(redis) = Redis::start(dir.path()) else {
        return;
    };
    let upstream = Upstream::start().await;
    let ws = WsUpstream::start().await;
    let a = replica(&upstream.url(), Some(&ws), &redis);
    let b = replica(&upstream.url(), Some(&ws), &redis);
    a.wait_for_log(
        "using the one kept in the state store",
        Duration::from_secs(5),
    );

    // Signed in on A, in on B (the cookie jar follows 127.0.0.1 to both).
    let (alice, cookie) = signed_in(&a, &ALICE).await;
    assert_eq!(status(&alice, &a).await, 200);
    assert_eq!(status(&alice, &b).await, 200, "{}", b.log());
    // A holds a websocket of hers.
    let mut alices_ws = ws_connect(&a, Some(&cookie))
        .await
        .expect("a websocket on A");
    assert_eq!(
        next_message(&mut alices_ws).await,
        Message::text("hello alice")
    );

    // A login started on A finishes on B.
    let bob = client();
    let first: Value = bob
        .get(executor(&a))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["component"], "ak-stage-identification");
    let posted = bob
        .post(executor(&a))
        .json(&json!({"uid_field": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 302);
    let step: Value = bob
        .get(executor(&b))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(step["component"], "ak-stage-password", "{step}");
    let mut done = bob
        .post(executor(&b))
        .json(&json!({"password": BOB.password}))
        .send()
        .await
        .unwrap();
    while done.status() == 302 {
        done = bob.get(executor(&b)).send().await.unwrap();
    }
    let done: Value = done.json().await.unwrap();
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    assert_eq!(status(&bob, &a).await, 200);
    // The command line sees the same sessions, through Redis.
    assert_eq!(listed_users(&a), ["alice", "bob"]);

    // A dump of Redis (every key, every value) holds no session id from
    // any cookie.
    let (_, bobs_cookie) = signed_in(&b, &BOB).await;
    let ids = [session_id(&cookie), session_id(&bobs_cookie)];
    let dump = redis_dump(&redis);
    assert!(dump.contains("flowgate:"), "{dump}");
    for id in &ids {
        assert!(
            !dump.contains(id.as_str()),
            "a session id in the Redis dump"
        );
    }

    // alice signs out on B; A, which has her cached, lets go within 1 s.
    sign_out(&alice, &b).await;
    let started = Instant::now();
    let closed = async {
        while let Some(Ok(_)) = alices_ws.next().await {}
        started.elapsed()
    };
    let took = tokio::time::timeout(Duration::from_secs(1), closed)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "A's websocket still open 1 s after the sign-out on B:\n{}",
                a.log()
            )
        });
    eprintln!("sign-out on B closed A's websocket in {took:?}");
    while status(&alice, &a).await != 401 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "A still takes alice's session after 1 s:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("sign-out on B reached A in {:?}", started.elapsed());
    assert_eq!(status(&bob, &b).await, 200, "bob's stays");

    // A restart of a replica (even a kill -9) loses nothing.
    let a = a.restart(true);
    assert_eq!(status(&bob, &a).await, 200, "{}", a.log());
    assert_eq!(status(&alice, &a).await, 401, "signed out stays signed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_down_logins_fail_closed_and_all_comes_back_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut redis) = Redis::start(dir.path()) else {
        return;
    };
    let upstream = Upstream::start().await;
    let gate = replica(&upstream.url(), None, &redis);
    let (alice, _) = signed_in(&gate, &ALICE).await;
    assert_eq!(status(&alice, &gate).await, 200);
    // bob's session is written, but not yet read by the gate: not cached.
    let (bob_in, _) = signed_in(&gate, &BOB).await;

    // Under load while Redis goes away: alice's cached session keeps
    // working, bob's cannot be checked (503, not a sign-in that could not
    // be stored, never a 500).
    let load = |who: reqwest::Client, url: String| {
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeMap::<u16, u32>::new();
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                *seen.entry(api_status(&who, &url).await).or_default() += 1;
            }
            seen
        })
    };
    let csrf = sign_out_csrf(&alice, &gate).await;
    redis.kill();
    // A sign-out that cannot reach the store says so, and keeps the cookie
    // for the retry: it must not say "signed out" while Redis holds the
    // session.
    let out = alice
        .post(gate.url("/_flowgate/sign_out"))
        .form(&[("csrf_token", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 503, "{}", gate.log());
    assert!(set_cookies(&out).is_empty(), "{:?}", set_cookies(&out));
    let alice_load = load(alice.clone(), gate.url("/private"));
    let bob_load = load(bob_in.clone(), gate.url("/private"));
    let alice_seen = alice_load.await.unwrap();
    let bob_seen = bob_load.await.unwrap();
    assert_eq!(
        alice_seen.keys().collect::<Vec<_>>(),
        [&200],
        "{alice_seen:?}"
    );
    assert_eq!(bob_seen.keys().collect::<Vec<_>>(), [&503], "{bob_seen:?}");
    let unavailable = bob_in
        .get(gate.url("/private"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        unavailable.contains("session_store_unavailable") && !unavailable.contains("redis"),
        "{unavailable}"
    );

    // A new login cannot be stored: 503, as a page and as JSON.
    let bob = client();
    let url = executor(&gate);
    let _ = bob.get(&url).send().await.unwrap();
    let posted = bob
        .post(&url)
        .json(&json!({"uid_field": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 503, "{}", gate.log());
    // The login page itself stores nothing: it shows; its answer is refused.
    let browser = client();
    let started = browser
        .get(gate.url("/_flowgate/flow/default-authentication-flow/?next=%2F"))
        .send()
        .await
        .unwrap();
    let page = browser
        .get(gate.url(&location(&started)))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    let answered = browser
        .post(gate.url(&form_action(&html).unwrap()))
        .form(&[
            (
                "csrf_token",
                input_value(&html, "csrf_token").unwrap().as_str(),
            ),
            ("uid_field", "bob"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 503, "{}", gate.log());
    // Nothing crashed.
    assert_eq!(
        reqwest::get(gate.url("/public/x")).await.unwrap().status(),
        200,
        "{}",
        gate.log()
    );

    redis.restart();
    // Back by itself: alice's session (written before the kill) holds, and
    // a new login goes through.
    let started = Instant::now();
    loop {
        if status(&alice, &gate).await == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{}",
            gate.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        status(&bob_in, &gate).await,
        200,
        "bob's session, written before the kill"
    );
    // The sign-out that failed did not happen; tried again, it does.
    sign_out(&alice, &gate).await;
    assert_eq!(status(&alice, &gate).await, 401);
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let done = json_login(&client, &gate.url(""), "bob", BOB.password, "/").await;
        if done["component"] == "xak-flow-redirect" {
            break;
        }
        assert!(Instant::now() < deadline, "{done}\n{}", gate.log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(!gate.log().contains("panicked"), "{}", gate.log());
}

const CAROL_PASSWORD: &str = "carol-Secret-Pw1!";

/// Failed passwords on A and on B count against one throttle, and a TOTP
/// code used on A is refused on B.
#[tokio::test(flavor = "multi_thread")]
async fn failures_and_used_codes_count_on_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let Some(redis) = Redis::start(dir.path()) else {
        return;
    };
    const KEY: &[u8] = b"replica-totp-key-012";
    let carol = TestUser {
        username: "carol",
        password: CAROL_PASSWORD,
        email: "carol@example.test",
        groups: &[],
        extra: Box::leak(format!("totp = [\"{}\"]", base32(KEY)).into_boxed_str()),
    };
    let users = users_file(&[&ALICE, &carol]);
    let upstream = Upstream::start().await;
    let a = replica_with(&upstream.url(), None, &redis, &users);
    let b = replica_with(&upstream.url(), None, &redis, &users);
    for gate in [&a, &b].repeat(5) {
        let error = password_error(&gate.url(""), "alice", "wrong").await;
        assert_eq!(error.as_deref(), Some("invalid"));
    }
    for gate in [&a, &b] {
        assert_eq!(
            password_error(&gate.url(""), "alice", ALICE.password)
                .await
                .as_deref(),
            Some("throttled"),
            "five failures on each replica make ten"
        );
    }

    // carol's code, taken on A, is spent on B too.
    let code_answer = |gate: &Flowgate, code: String| {
        let (base, url) = (gate.url(""), executor(gate));
        async move {
            let client = client();
            let step = json_login(&client, &base, "carol", CAROL_PASSWORD, "/").await;
            assert_eq!(
                step["component"], "ak-stage-authenticator-validate",
                "{step}"
            );
            let mut response = client
                .post(&url)
                .json(&json!({"code": code}))
                .send()
                .await
                .unwrap();
            while response.status() == 302 {
                response = client.get(&url).send().await.unwrap();
            }
            response.json::<Value>().await.unwrap()
        }
    };
    let code = totp_now(KEY);
    let first = code_answer(&a, code.clone()).await;
    assert_eq!(first["component"], "xak-flow-redirect", "{first}");
    let again = code_answer(&b, code).await;
    assert_eq!(
        again["component"], "ak-stage-authenticator-validate",
        "{again}"
    );
    assert_eq!(
        again["response_errors"]["code"][0]["code"], "invalid",
        "{again}"
    );
}

/// The session id in a `Cookie` header's `flowgate_session` value.
fn session_id(cookie: &str) -> String {
    cookie
        .split("; ")
        .find_map(|c| c.strip_prefix("flowgate_session="))
        .and_then(|v| v.rsplit_once('.'))
        .map(|(id, _)| id.to_owned())
        .expect("a signed session cookie")
}

/// Every key of Redis and every value under it, as text.
fn redis_dump(redis: &Redis) -> String {
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let keys: Vec<String> = ::redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    let mut dump = String::new();
    for key in keys {
        let kind: String = ::redis::cmd("TYPE").arg(&key).query(&mut con).unwrap();
        let values: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![::redis::cmd("GET").arg(&key).query(&mut con).unwrap()],
            "set" => ::redis::cmd("SMEMBERS").arg(&key).query(&mut con).unwrap(),
            "zset" => ::redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query(&mut con)
                .unwrap(),
            other => panic!("{key}: a {other} flowgate does not write"),
        };
        dump.push_str(&key);
        for value in values {
            dump.push(' ');
            dump.push_str(&String::from_utf8_lossy(&value));
        }
        dump.push('\n');
    }
    dump
}
