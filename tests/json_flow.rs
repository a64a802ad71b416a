//! A script's view: the executor API as JSON, then the app with the cookie.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn json_flow_logs_in_and_the_cookie_opens_the_app() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = client();
    let done = json_login(&client, &gate.url(""), "alice", ALICE.password, "/reports").await;
    assert_eq!(
        done,
        json!({"component": "xak-flow-redirect", "to": "/reports"})
    );
    let echo: Value = client
        .get(gate.url("/reports"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["headers"]["x-forwarded-user"], "alice");
    let me: Value = get_json(&client, gate.url("/_flowgate/api/v3/core/users/me/")).await;
    assert_eq!(me["user"]["username"], "alice");
    assert_eq!(me["user"]["email"], "alice@example.test");
    assert_eq!(me["user"]["groups"][0]["name"], "admins");
}

#[tokio::test(flavor = "multi_thread")]
async fn users_me_without_session_is_403_as_in_authentik() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let response = client()
        .get(gate.url("/_flowgate/api/v3/core/users/me/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"detail": "Authentication credentials were not provided."})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_gives_response_errors_and_no_session() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = client();
    let url = gate.url(&format!(
        "/_flowgate/api/v3/flows/executor/{FLOW}/?query=next%3D%252F"
    ));
    client.get(&url).send().await.unwrap();
    assert_eq!(
        client
            .post(&url)
            .json(&json!({"uid_field": "alice"}))
            .send()
            .await
            .unwrap()
            .status(),
        302
    );
    client.get(&url).send().await.unwrap();
    let wrong = client
        .post(&url)
        .json(&json!({"password": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 200);
    assert!(
        set_cookies(&wrong).iter().all(|c| !c.contains("Max-Age")),
        "no session minted"
    );
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["component"], "ak-stage-password");
    assert_eq!(
        body["response_errors"],
        json!({"password": [{"string": "Invalid password", "code": "invalid"}]})
    );
    let me = client
        .get(gate.url("/_flowgate/api/v3/core/users/me/"))
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_user_gets_exactly_the_wrong_password_answer() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let attempt = |user: &'static str| {
        let url = gate.url(&format!(
            "/_flowgate/api/v3/flows/executor/{FLOW}/?query=next%3D%252F"
        ));
        async move {
            let client = client();
            client.get(&url).send().await.unwrap();
            let posted = client
                .post(&url)
                .json(&json!({"uid_field": user}))
                .send()
                .await
                .unwrap();
            assert_eq!(
                posted.status(),
                302,
                "unknown users are not revealed at identification"
            );
            let challenge: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
            let started = std::time::Instant::now();
            let answer: Value = client
                .post(&url)
                .json(&json!({"password": "wrong-password"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (challenge, answer, started.elapsed())
        }
    };
    let (known_challenge, known, known_time) = attempt("alice").await;
    let (unknown_challenge, unknown, unknown_time) = attempt("nobody").await;
    assert_eq!(known["response_errors"], unknown["response_errors"]);
    assert_eq!(known["component"], unknown["component"]);
    assert_eq!(known_challenge["component"], unknown_challenge["component"]);
    // The unknown user is checked against a dummy hash: the same work, so
    // the same order of time (loose bound: shared CI machines are noisy).
    assert!(
        unknown_time * 4 > known_time,
        "unknown {unknown_time:?} vs known {known_time:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn absolute_next_to_a_foreign_host_is_denied() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = client();
    let done = json_login(
        &client,
        &gate.url(""),
        "alice",
        ALICE.password,
        "https://evil.example/",
    )
    .await;
    assert_eq!(done["component"], "ak-stage-access-denied");
    assert_eq!(done["error_message"], "Invalid next URL");
    assert_eq!(
        client
            .get(gate.url("/_flowgate/api/v3/core/users/me/"))
            .send()
            .await
            .unwrap()
            .status(),
        403,
        "no session left behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn absolute_next_to_a_protected_host_is_allowed() {
    let upstream = Upstream::start().await;
    let extra = format!(
        "[[route]]\nhost = \"app.example.test\"\nupstream = \"{}\"\n",
        upstream.url()
    );
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), &extra),
        &users_file(&[&ALICE]),
    );
    let done = json_login(
        &client(),
        &gate.url(""),
        "alice",
        ALICE.password,
        "https://app.example.test/x?y=1",
    )
    .await;
    assert_eq!(
        done,
        json!({"component": "xak-flow-redirect", "to": "https://app.example.test/x?y=1"})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_flow_answers_access_denied() {
    let upstream = Upstream::start().await;
    let extra = "[[flow]]\nslug = \"closed\"\nstages = [\"closed-deny\"]\n\n[stage.closed-deny]\nkind = \"deny\"\nmessage = \"This door is closed.\"\n";
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), extra),
        &users_file(&[&ALICE]),
    );
    let body: Value = client()
        .get(gate.url("/_flowgate/api/v3/flows/executor/closed/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["component"], "ak-stage-access-denied");
    assert_eq!(body["error_message"], "This door is closed.");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_flow_errors_not_500s() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = client();
    let url = gate.url(&format!("/_flowgate/api/v3/flows/executor/{FLOW}/"));
    client.get(&url).send().await.unwrap();
    let form = client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("uid_field=alice")
        .send()
        .await
        .unwrap();
    let not_json = client
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let array = client
        .post(&url)
        .header("content-type", "application/json")
        .body("[1,2]")
        .send()
        .await
        .unwrap();
    let html = client
        .get(&url)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    for response in [form, not_json, array, html] {
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["component"], "ak-stage-flow-error", "{body}");
        assert!(body["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    }
    let blank: Value = client
        .post(&url)
        .json(&json!({"uid_field": ""}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(blank["response_errors"]["uid_field"][0]["code"], "blank");
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
        missing["response_errors"]["uid_field"][0]["code"],
        "required"
    );
    assert_eq!(
        client
            .get(gate.url("/_flowgate/api/v3/flows/executor/no-such-flow/"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        client
            .get(gate.url(&format!("/_flowgate/api/v3/flows/executor/{FLOW}")))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

/// Asking for the first challenge stores nothing: a flood of GETs from
/// clients without cookies leaves room for a login even when the store
/// holds two logins in progress at most, and the answer (a POST with the
/// cookie the GET gave) is what takes a place.
#[tokio::test(flavor = "multi_thread")]
async fn first_challenges_cost_no_stored_state() {
    let upstream = Upstream::start().await;
    let config =
        basic_config(&upstream.url(), "").replace("[session]\n", "[session]\nmax_pre_auth = 2\n");
    let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let url = gate.url(&format!("/_flowgate/api/v3/flows/executor/{FLOW}/"));
    for _ in 0..100 {
        let response = client().get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers().contains_key("set-cookie"),
            "the cookie its answer will need"
        );
        let challenge: Value = response.json().await.unwrap();
        assert_eq!(challenge["component"], "ak-stage-identification");
    }
    // A client that answers without asking first is answered all the same.
    let direct = client();
    let posted = direct
        .post(&url)
        .json(&json!({"uid_field": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 302, "identification passed");
    let next: Value = get_json(&direct, &url).await;
    assert_eq!(next["component"], "ak-stage-password", "{next}");
    // One place left (direct holds the other): a whole login passes
    // through it, and gives it back when it mints its session.
    let done = json_login(&client(), &gate.url(""), "alice", ALICE.password, "/").await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    let answer = |client: reqwest::Client| {
        let url = url.clone();
        async move {
            client
                .post(&url)
                .json(&json!({"uid_field": "alice"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(answer(client()).await, 302, "the second place");
    assert_eq!(answer(client()).await, 503, "the store is full now");
}

/// Guesses sent side by side are held to the same limit as guesses sent
/// in turn: 40 wrong passwords for one name at once get at most 10 checks,
/// the rest refused unchecked.
#[tokio::test(flavor = "multi_thread")]
async fn parallel_guesses_meet_the_same_throttle() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let url = gate.url(&format!("/_flowgate/api/v3/flows/executor/{FLOW}/"));
    // Every client at the password stage first, then all guesses at once.
    let mut ready = Vec::new();
    for _ in 0..40 {
        let client = client();
        let posted = client
            .post(&url)
            .json(&json!({"uid_field": "alice"}))
            .send()
            .await
            .unwrap();
        assert_eq!(posted.status(), 302);
        ready.push(client);
    }
    let guesses = ready.into_iter().map(|client| {
        let url = url.clone();
        tokio::spawn(async move {
            let answer: Value = client
                .post(&url)
                .json(&json!({"password": "wrong guess"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            answer["response_errors"]["password"][0]["code"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
    });
    let mut codes = Vec::new();
    for guess in guesses {
        codes.push(guess.await.unwrap());
    }
    let checked = codes.iter().filter(|c| *c == "invalid").count();
    let refused = codes.iter().filter(|c| *c == "throttled").count();
    assert_eq!(checked + refused, 40, "{codes:?}");
    assert!(checked <= 10, "{checked} guesses checked: {codes:?}");
    let logged = gate.log().matches("login failed reason=password").count();
    assert!(logged <= 10, "{logged} checked in the log");
}

/// `users/me` has every key of authentik's recorded answer (2025.8) with
/// the same JSON types, and what the 2026.8 schema requires besides:
/// `users`, and `is_current` on each user.
#[tokio::test(flavor = "multi_thread")]
async fn users_me_has_the_shape_of_authentik_2025_and_2026() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = client();
    json_login(&client, &gate.url(""), "alice", ALICE.password, "/").await;
    let me = get_json(&client, gate.url("/_flowgate/api/v3/core/users/me/")).await;
    let recorded: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("authentik/api/core-users-me.json")).unwrap(),
    )
    .unwrap();
    let mut user = me["user"].clone();
    // 2026.8's addition, not in the 2025.8 recording.
    user.as_object_mut().unwrap().remove("is_current");
    let differences = shape_differences("", &user, &recorded["user"]);
    assert!(differences.is_empty(), "{differences:?}");
    assert_eq!(me["user"]["is_current"], true);
    assert_eq!(me["users"].as_array().map(Vec::len), Some(1));
    assert_eq!(me["users"][0]["username"], "alice");
}
