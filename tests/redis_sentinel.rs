//! Two flowgates on the master a real Redis Sentinel names
//! (`redis_sentinels`, `redis_master_name`), with a replica beside it. The
//! master is killed (`kill -9`): while nobody is master, what needs Redis
//! answers 503; once the sentinel has promoted the replica, flowgate
//! follows it by itself: the session written before the kill holds, a new
//! login works, and a sign-out on one flowgate still reaches the other's
//! cache (its revocation listener moved to the new master too).

mod common;

use std::time::{Duration, Instant};

use common::redis::{Redis, Sentinel};
use common::*;
use serde_json::json;

const MASTER: &str = "mymaster";

/// Without a secret of its own: the one kept in Redis, found through the
/// sentinel at start.
fn gate(upstream: &str, sentinel: &Sentinel) -> Flowgate {
    let config = basic_config(
        upstream,
        &format!(
            "[state]\nstore = \"redis\"\nredis_sentinels = [\"{}\"]\nredis_master_name = \"{MASTER}\"\n",
            sentinel.url()
        ),
    )
    .replace(
        "secret = \"test-secret-test-secret-test-secret-0123456789\"\n",
        "",
    );
    Flowgate::start(&config, &users_file(&[&ALICE, &BOB]))
}

async fn status(client: &reqwest::Client, gate: &Flowgate) -> u16 {
    api_status(client, gate.url("/private")).await
}

fn executor(gate: &Flowgate) -> String {
    gate.url(&format!("/_flowgate/api/v3/flows/executor/{FLOW}/"))
}

/// A login's first step, which writes to the store: its status.
async fn login_step(gate: &Flowgate, user: &TestUser) -> u16 {
    let client = client();
    let _ = client.get(executor(gate)).send().await.unwrap();
    client
        .post(executor(gate))
        .json(&json!({"uid_field": user.username}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_failover_flowgate_follows_the_new_master_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut master) = Redis::start(dir.path()) else {
        return;
    };
    let Some(replica) = Redis::start_replica(dir.path(), &master) else {
        return;
    };
    let Some(sentinel) = Sentinel::start(dir.path(), &master, MASTER) else {
        return;
    };
    sentinel.wait_for_replica(MASTER);
    let upstream = Upstream::start().await;
    let a = gate(&upstream.url(), &sentinel);
    let b = gate(&upstream.url(), &sentinel);
    a.wait_for_log(
        "using the one kept in the state store",
        Duration::from_secs(5),
    );

    let (alice, _) = signed_in(&a, &ALICE).await;
    assert_eq!(status(&alice, &a).await, 200, "{}", a.log());
    assert_eq!(status(&alice, &b).await, 200, "{}", b.log());
    a.wait_for_log(
        &format!("the Redis master is 127.0.0.1:{}", master.port),
        Duration::from_secs(5),
    );
    // Everything written so far is on the replica too.
    let copies: i64 = ::redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut master.connection())
        .unwrap();
    assert_eq!(copies, 1);

    master.kill();
    let killed = Instant::now();
    // No master: what needs Redis answers 503, nothing crashes.
    assert_eq!(login_step(&a, &BOB).await, 503, "{}", a.log());
    assert_eq!(login_step(&b, &BOB).await, 503, "{}", b.log());
    assert_eq!(
        reqwest::get(a.url("/public/x")).await.unwrap().status(),
        200
    );

    while sentinel.master_port(MASTER) != Some(replica.port) {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the sentinel promoted no replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted = killed.elapsed();
    // flowgate finds the new master by itself, within seconds.
    while login_step(&b, &BOB).await != 302 {
        assert!(
            killed.elapsed() < promoted + Duration::from_secs(10),
            "no login through the new master:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "promoted {promoted:?} after the kill; flowgate wrote to it {:?} after the kill",
        killed.elapsed()
    );
    let moved = format!("the Redis master moved to 127.0.0.1:{}", replica.port);
    b.wait_for_log(&moved, Duration::from_secs(5));
    let (bob, _) = signed_in(&b, &BOB).await;
    assert_eq!(status(&bob, &b).await, 200);
    assert_eq!(status(&alice, &a).await, 200, "{}", a.log());
    assert_eq!(status(&alice, &b).await, 200, "{}", b.log());

    // alice's session, written before the kill, is on the new master: the
    // command line (no cache, through the sentinel) lists it beside bob's.
    assert_eq!(listed_users(&a), ["alice", "bob"]);

    // A's revocation listener is on the new master: bob, just cached by A,
    // signs out on B, and A lets go within a second (its cache would
    // believe him for 10 s).
    a.wait_for_log(
        &format!(
            "listening for revoked sessions again, at 127.0.0.1:{}",
            replica.port
        ),
        Duration::from_secs(10),
    );
    assert_eq!(status(&bob, &a).await, 200, "{}", a.log());
    sign_out(&bob, &b).await;
    let started = Instant::now();
    while status(&bob, &a).await != 401 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "A still takes bob's session after 1 s:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&alice, &a).await, 200, "alice's stays");
    for gate in [&a, &b] {
        assert!(!gate.log().contains("panicked"), "{}", gate.log());
    }
}
