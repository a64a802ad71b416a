//! A browser's view: the HTML login relay, end to end through the real
//! binary to a real upstream.

mod common;

use common::*;
use serde_json::Value;

/// Follow a browser from a protected URL through the login pages; returns
/// the last response (the one that left the login pages).
async fn html_login(
    client: &reqwest::Client,
    gate: &Flowgate,
    start: &str,
    user: &str,
    password: &str,
) -> reqwest::Response {
    let first = client
        .get(gate.url(start))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 302, "anonymous navigation goes to login");
    let login = location(&first);
    assert!(
        login.starts_with(&format!("/_flowgate/flow/{FLOW}/?next=")),
        "{login}"
    );
    submit_login(client, gate, &login, user, password).await
}

/// From a login URL: start the flow, fill identification then password.
async fn submit_login(
    client: &reqwest::Client,
    gate: &Flowgate,
    login: &str,
    user: &str,
    password: &str,
) -> reqwest::Response {
    let started = client.get(gate.url(login)).send().await.unwrap();
    assert_eq!(started.status(), 303);
    let flow_url = location(&started);
    assert!(flow_url.contains("fid="), "{flow_url}");
    let html = client
        .get(gate.url(&flow_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("name=\"uid_field\""),
        "identification form: {html}"
    );
    let csrf = input_value(&html, "csrf_token").expect("csrf token in form");
    let action = form_action(&html).expect("form action");
    let posted = client
        .post(gate.url(&action))
        .form(&[("csrf_token", csrf.as_str()), ("uid_field", user)])
        .send()
        .await
        .unwrap();
    assert_eq!(
        posted.status(),
        303,
        "identification passes on to the next stage"
    );
    let html = client
        .get(gate.url(&location(&posted)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("name=\"password\""), "password form: {html}");
    let csrf = input_value(&html, "csrf_token").unwrap();
    let action = form_action(&html).unwrap();
    client
        .post(gate.url(&action))
        .form(&[("csrf_token", csrf.as_str()), ("password", password)])
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_login_reaches_upstream_with_identity_headers() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), ""),
        &users_file(&[&ALICE, &BOB]),
    );
    let client = client();
    let done = html_login(&client, &gate, "/dashboard?tab=2", "alice", ALICE.password).await;
    assert_eq!(done.status(), 303);
    assert_eq!(
        location(&done),
        "/dashboard?tab=2",
        "back where the user was going"
    );
    let cookie = set_cookies(&done)
        .into_iter()
        .find(|c| c.starts_with("flowgate_session="))
        .expect("session cookie");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Lax"), "{cookie}");
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP without a trusted proxy: no Secure: {cookie}"
    );

    let echo: Value = get_json(&client, gate.url("/dashboard?tab=2")).await;
    assert_eq!(echo["path"], "/dashboard?tab=2");
    assert_eq!(echo["headers"]["x-forwarded-user"], "alice");
    assert_eq!(echo["headers"]["x-forwarded-email"], "alice@example.test");
    assert_eq!(echo["headers"]["x-forwarded-groups"], "admins,staff");
    assert_eq!(echo["headers"]["x-forwarded-preferred-username"], "alice");
    assert!(
        echo["headers"].get("cookie").is_none(),
        "the upstream never sees flowgate's cookie: {echo}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn session_id_changes_at_login() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = client();
    let started = client
        .get(gate.url(&format!("/_flowgate/flow/{FLOW}/?next=%2F")))
        .send()
        .await
        .unwrap();
    let pre_auth = set_cookies(&started)
        .into_iter()
        .find(|c| c.starts_with("flowgate_session="))
        .unwrap();
    let done = submit_login(
        &client,
        &gate,
        &format!("/_flowgate/flow/{FLOW}/?next=%2F"),
        "alice",
        ALICE.password,
    )
    .await;
    let authenticated = set_cookies(&done)
        .into_iter()
        .find(|c| c.starts_with("flowgate_session="))
        .unwrap();
    let value = |c: &str| c.split(';').next().unwrap().to_owned();
    assert_ne!(
        value(&pre_auth),
        value(&authenticated),
        "a new id at login (no fixation)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_shows_error_and_sets_no_session() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = client();
    let page = html_login(&client, &gate, "/", "alice", "not the password").await;
    assert_eq!(page.status(), 200, "the form comes back");
    let html = page.text().await.unwrap();
    assert!(html.contains("Invalid password"), "{html}");
    assert!(html.contains("name=\"password\""));
    let still = client
        .get(gate.url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(still.status(), 302, "still anonymous");

    // An unknown user meets the very same page.
    let other = common::client();
    let unknown = html_login(&other, &gate, "/", "nobody-here", "whatever").await;
    assert_eq!(unknown.status(), 200);
    let unknown_html = unknown.text().await.unwrap();
    assert!(unknown_html.contains("Invalid password"), "{unknown_html}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tabs_logging_in_at_once_each_land_on_their_own_next() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = client();
    // Tab A and tab B both start before either finishes.
    let a = client
        .get(gate.url("/a?x=1"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    let b = client
        .get(gate.url("/b"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    let a_flow = location(&client.get(gate.url(&location(&a))).send().await.unwrap());
    let b_flow = location(&client.get(gate.url(&location(&b))).send().await.unwrap());
    assert_ne!(a_flow, b_flow);
    // Meanwhile the page fires API calls that must not steal the target.
    for _ in 0..3 {
        let xhr = client
            .get(gate.url("/api/data.json"))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(xhr.status(), 401);
    }
    let step = |flow_url: String, field: &'static str, value: &'static str| {
        let client = client.clone();
        let url = gate.url(&flow_url);
        let base = gate.url("");
        async move {
            let html = client.get(&url).send().await.unwrap().text().await.unwrap();
            let csrf = input_value(&html, "csrf_token").unwrap();
            let action = form_action(&html).unwrap();
            client
                .post(format!("{base}{action}"))
                .form(&[("csrf_token", csrf.as_str()), (field, value)])
                .send()
                .await
                .unwrap()
        }
    };
    let a1 = step(a_flow.clone(), "uid_field", "alice").await;
    let b1 = step(b_flow.clone(), "uid_field", "alice").await;
    let b2 = step(location(&b1), "password", ALICE.password).await;
    assert_eq!(location(&b2), "/b");
    // Tab A finishes after B: already signed in, it still goes to its own next.
    let a_page = client.get(gate.url(&location(&a1))).send().await.unwrap();
    assert_eq!(a_page.status(), 303);
    assert_eq!(location(&a_page), "/a?x=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn off_site_next_is_never_followed() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    for evil in [
        "//evil.example/x",
        "https://evil.example/",
        "/\\evil.example",
        "javascript:alert(1)",
        "https:evil.example",
    ] {
        let client = client();
        let login = format!(
            "/_flowgate/flow/{FLOW}/?next={}",
            url::form_urlencoded::byte_serialize(evil.as_bytes()).collect::<String>()
        );
        // Dropped up front: the flow's own URL no longer carries it ...
        let first = client.get(gate.url(&login)).send().await.unwrap();
        assert_eq!(first.status(), 303, "{evil}");
        assert!(
            !location(&first).contains("evil"),
            "{evil} → {}",
            location(&first)
        );
        // ... and the sign-in ends at `/`, not in a refusal after the password.
        let done = submit_login(&common::client(), &gate, &login, "alice", ALICE.password).await;
        assert_eq!(done.status(), 303, "{evil}");
        assert_eq!(location(&done), "/", "{evil}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_without_cookies_gets_an_explanation_not_a_loop() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), "")
            .replace("[session]\n", "[session]\ncookie_secure = \"always\"\n"),
        &users_file(&[&ALICE]),
    );
    // A client that drops every cookie (as browsers drop Secure cookies on http).
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::limited(10))
        .build()
        .unwrap();
    let page = client
        .get(gate.url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 400);
    let html = page.text().await.unwrap();
    assert!(html.contains("did not keep its cookie"), "{html}");
    assert!(
        html.contains("HTTPS"),
        "explains the Secure-over-HTTP case: {html}"
    );
}

/// A flow id is only good in the browser it was given to: nothing is
/// stored for a page until its form is answered, so the id itself says
/// whose it is. One made up, or carried to another browser, is a lost
/// sign-in, not a fresh flow (and its form never reaches the executor).
#[tokio::test(flavor = "multi_thread")]
async fn a_flow_id_from_another_browser_or_made_up_is_refused() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let login = format!("/_flowgate/flow/{FLOW}/?next=%2F");
    let owner = client();
    let started = owner.get(gate.url(&login)).send().await.unwrap();
    let flow_url = location(&started);
    let html = owner
        .get(gate.url(&flow_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = input_value(&html, "csrf_token").unwrap();
    let fid = input_value(&html, "fid").unwrap();

    // Another browser, with a cookie of its own, given the owner's URL.
    let other = client();
    let _ = other.get(gate.url(&login)).send().await.unwrap();
    let stolen = other.get(gate.url(&flow_url)).send().await.unwrap();
    assert_eq!(stolen.status(), 400);
    assert!(stolen.text().await.unwrap().contains("could not continue"));
    let posted = other
        .post(gate.url(&flow_url))
        .form(&[("csrf_token", csrf.as_str()), ("uid_field", "alice")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        posted.status(),
        400,
        "the owner's form from another browser"
    );

    // Made up, or tampered with, in the owner's own browser.
    let (nonce, tag) = fid.split_once('.').expect("nonce.tag");
    let flipped = format!(
        "{nonce}.{}{}",
        if tag.starts_with('A') { "B" } else { "A" },
        &tag[1..]
    );
    for fake in ["x", "abc.def", flipped.as_str(), nonce] {
        let url = format!("/_flowgate/flow/{FLOW}/?next=%2F&fid={fake}");
        let page = owner.get(gate.url(&url)).send().await.unwrap();
        assert_eq!(page.status(), 400, "fid {fake}");
    }
    // The owner's own id still works, and its answer is stored.
    let posted = owner
        .post(gate.url(&flow_url))
        .form(&[("csrf_token", csrf.as_str()), ("uid_field", "alice")])
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 303);
    let password = owner
        .get(gate.url(&location(&posted)))
        .send()
        .await
        .unwrap();
    assert!(password.text().await.unwrap().contains("name=\"password\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_out_ends_the_session() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = client();
    html_login(&client, &gate, "/", "alice", ALICE.password).await;
    assert_eq!(
        client.get(gate.url("/")).send().await.unwrap().status(),
        200
    );
    let confirm = client
        .get(gate.url("/_flowgate/sign_out"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(confirm.contains("alice"), "{confirm}");
    let csrf = input_value(&confirm, "csrf_token").unwrap();
    // Without the token nothing happens.
    let forged = client
        .post(gate.url("/_flowgate/sign_out"))
        .form(&[("csrf_token", "nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    assert_eq!(
        client.get(gate.url("/")).send().await.unwrap().status(),
        200
    );
    let out = client
        .post(gate.url("/_flowgate/sign_out"))
        .form(&[("csrf_token", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 200);
    assert!(set_cookies(&out)
        .iter()
        .any(|c| c.starts_with("flowgate_session=;") && c.contains("Max-Age=0")));
    let after = client
        .get(gate.url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 302, "signed out: back to login");
}

#[tokio::test(flavor = "multi_thread")]
async fn login_form_without_csrf_token_is_refused() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = client();
    let started = client
        .get(gate.url(&format!("/_flowgate/flow/{FLOW}/?next=%2F")))
        .send()
        .await
        .unwrap();
    let flow_url = location(&started);
    let html = client
        .get(gate.url(&flow_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let action = form_action(&html).unwrap();
    let posted = client
        .post(gate.url(&action))
        .form(&[("uid_field", "alice")])
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 403);
    let posted = client
        .post(gate.url(&action))
        .form(&[("csrf_token", "forged"), ("uid_field", "alice")])
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 403);
}

/// A visitor answering the identification stage: the login page, its form,
/// and one answer. The status of the answer: 303 once the login is stored
/// (on to the password), 503 when no more may be.
async fn answer_first(client: &reqwest::Client, gate: &Flowgate, login: &str) -> u16 {
    let started = client.get(gate.url(login)).send().await.unwrap();
    assert_eq!(started.status(), 303, "a login page is always shown");
    let page = client
        .get(gate.url(&location(&started)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        page.status(),
        200,
        "showing the first challenge costs nothing"
    );
    let html = page.text().await.unwrap();
    let csrf = input_value(&html, "csrf_token").expect("csrf token in form");
    let action = form_action(&html).expect("form action");
    client
        .post(gate.url(&action))
        .form(&[("csrf_token", csrf.as_str()), ("uid_field", "alice")])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Logins in progress are bounded: past `max_pre_auth` a visitor who
/// answers gets a "try again" page (503), not an unbounded store; those
/// already signing in carry on, and a started login expires after
/// `pre_auth_ttl`. Merely showing the form counts for nothing.
#[tokio::test(flavor = "multi_thread")]
async fn logins_in_progress_are_bounded_in_number_and_time() {
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), "").replace(
        "[session]\n",
        "[session]\nmax_pre_auth = 2\npre_auth_ttl = \"2s\"\n",
    );
    let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let login = format!("/_flowgate/flow/{FLOW}/?next=%2F");
    let (first, second, third, fourth) = (client(), client(), client(), client());
    assert_eq!(answer_first(&first, &gate, &login).await, 303);
    assert_eq!(answer_first(&second, &gate, &login).await, 303);
    let started = third.get(gate.url(&login)).send().await.unwrap();
    let page = third
        .get(gate.url(&location(&started)))
        .send()
        .await
        .unwrap();
    let html = page.text().await.unwrap();
    let refused = third
        .post(gate.url(&form_action(&html).unwrap()))
        .form(&[
            (
                "csrf_token",
                input_value(&html, "csrf_token").unwrap().as_str(),
            ),
            ("uid_field", "alice"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(
        refused.text().await.unwrap().contains("Try again"),
        "a page that says what to do"
    );
    // A visitor already signing in carries on, and finishing frees a place.
    let done = submit_login(&first, &gate, &login, "alice", ALICE.password).await;
    assert_eq!(done.status(), 303);
    assert_eq!(location(&done), "/");
    assert_eq!(answer_first(&third, &gate, &login).await, 303);
    assert_eq!(
        answer_first(&fourth, &gate, &login).await,
        503,
        "full again: second and third"
    );
    // Started logins expire: after the TTL there is room again.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(answer_first(&fourth, &gate, &login).await, 303);
}

/// A flood from one address costs nothing while it only loads the login
/// page (no stored state until a challenge is answered), and once it
/// answers it fills that address's share (`max_pre_auth_per_client`), not
/// the store: a visitor from another address signs in all the same, and
/// the log says so in a line or two, not one per refusal.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_from_one_address_does_not_stop_a_login_from_another() {
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), "").replace(
        "[session]\n",
        "[session]\nmax_pre_auth = 25\nmax_pre_auth_per_client = 20\n",
    );
    let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let login = format!("/_flowgate/flow/{FLOW}/?next=%2F");
    let from = |address: &str| {
        reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .local_address(address.parse::<std::net::IpAddr>().unwrap())
            .timeout(std::time::Duration::from_secs(20))
            .build()
            .unwrap()
    };
    // Page loads, each from a new client (no cookie): twelve times the
    // store's bound, and every one is shown its form.
    for _ in 0..300 {
        let flood = from("127.0.0.1");
        let started = flood.get(gate.url(&login)).send().await.unwrap();
        assert_eq!(started.status(), 303);
        let page = flood
            .get(gate.url(&location(&started)))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200, "page loads are never refused");
    }
    // Answers: stored, up to the address's share.
    let mut stored = 0;
    let mut refused = 0;
    for _ in 0..30 {
        match answer_first(&from("127.0.0.1"), &gate, &login).await {
            303 => stored += 1,
            503 => refused += 1,
            other => panic!("flood answered {other}"),
        }
    }
    assert_eq!((stored, refused), (20, 10));
    let other = from("127.0.0.2");
    let done = submit_login(&other, &gate, &login, "alice", ALICE.password).await;
    assert_eq!(done.status(), 303, "a login from another address");
    assert_eq!(location(&done), "/");
    let warnings = gate.log().matches("login temporarily unavailable").count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} warning lines for 10 refusals:\n{}",
        gate.log()
    );
}

/// A catch-all route also serves hosts outside `cookie_domain`: there the
/// cookie is host-only (a `Domain` the browser would drop would leave
/// nobody signed in); under the domain it names the domain.
#[tokio::test(flavor = "multi_thread")]
async fn cookies_are_host_only_on_hosts_outside_the_cookie_domain() {
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), "")
        .replace("[session]\n", "[session]\ncookie_domain = \"lab.test\"\n");
    let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let login = format!("/_flowgate/flow/{FLOW}/?next=%2F");
    let cookie_on = |host: &'static str| {
        let url = gate.url(&login);
        async move {
            let response = client().get(url).header("host", host).send().await.unwrap();
            set_cookies(&response)
                .into_iter()
                .find(|c| c.starts_with("flowgate_session="))
                .expect("a session cookie")
        }
    };
    let inside = cookie_on("app.lab.test").await;
    assert!(inside.contains("Domain=lab.test"), "{inside}");
    let outside = cookie_on("other.example").await;
    assert!(!outside.contains("Domain="), "{outside}");
    let lookalike = cookie_on("evillab.test").await;
    assert!(!lookalike.contains("Domain="), "{lookalike}");
}

/// Several parents (`cookie_domain` as a list): each host's cookie names
/// the longest domain it is under.
#[tokio::test(flavor = "multi_thread")]
async fn cookies_name_the_longest_of_several_cookie_domains() {
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), "").replace(
        "[session]\n",
        "[session]\ncookie_domain = [\"lab.test\", \".corp.lab.test\", \"home.example\"]\n",
    );
    let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let login = format!("/_flowgate/flow/{FLOW}/?next=%2F");
    let domain_on = |host: &'static str| {
        let url = gate.url(&login);
        async move {
            let response = client().get(url).header("host", host).send().await.unwrap();
            let cookie = set_cookies(&response)
                .into_iter()
                .find(|c| c.starts_with("flowgate_session="))
                .expect("a session cookie");
            cookie
                .split("; ")
                .find_map(|part| part.strip_prefix("Domain="))
                .map(str::to_owned)
        }
    };
    assert_eq!(
        domain_on("wiki.corp.lab.test").await.as_deref(),
        Some("corp.lab.test")
    );
    assert_eq!(domain_on("app.lab.test").await.as_deref(), Some("lab.test"));
    assert_eq!(
        domain_on("nas.home.example").await.as_deref(),
        Some("home.example")
    );
    assert_eq!(domain_on("elsewhere.test").await, None);
}
