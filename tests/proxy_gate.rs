//! What reaches the upstream, and what anonymous or forged requests get.

mod common;

use common::*;
use serde_json::Value;

async fn logged_in(gate: &Flowgate) -> reqwest::Client {
    let client = client();
    let done = json_login(&client, &gate.url(""), "alice", ALICE.password, "/").await;
    assert_eq!(done["component"], "xak-flow-redirect");
    client
}

#[tokio::test(flavor = "multi_thread")]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let spoofs = [
        ("X-Forwarded-User", "admin"),
        ("x_forwarded_user", "admin"),
        ("X-Forwarded-Groups", "admins"),
        ("X-Forwarded-Email", "admin@example.test"),
        ("X-authentik-username", "admin"),
        ("X_AUTHENTIK_GROUPS", "admins"),
        ("X-Auth-Request-User", "admin"),
        ("Remote-User", "admin"),
        ("remote_groups", "admins"),
    ];
    let check = |echo: &Value, expect_user: Option<&str>| {
        let headers = echo["headers"].as_object().unwrap();
        for (name, _) in headers {
            let normalized = name.replace('_', "-");
            if normalized == "x-forwarded-user" {
                assert_eq!(Some(headers[name].as_str().unwrap()), expect_user, "{echo}");
            } else {
                let foreign_family = normalized.starts_with("x-authentik-")
                    || normalized.starts_with("x-auth-request-")
                    || normalized.starts_with("remote-");
                let anonymous_groups = normalized == "x-forwarded-groups" && expect_user.is_none();
                assert!(
                    !foreign_family && !anonymous_groups,
                    "spoofed {name} reached the upstream: {echo}"
                );
            }
        }
        if expect_user.is_none() {
            assert!(
                headers
                    .keys()
                    .all(|k| k.replace('_', "-") != "x-forwarded-user"),
                "{echo}"
            );
        }
    };
    // Anonymous, on a public path.
    let mut request = client().get(gate.url("/public/info"));
    for (name, value) in spoofs {
        request = request.header(name, value);
    }
    let echo: Value = request.send().await.unwrap().json().await.unwrap();
    check(&echo, None);
    // Authenticated: the real identity replaces the spoofed one.
    let alice = logged_in(&gate).await;
    let mut request = alice.get(gate.url("/private"));
    for (name, value) in spoofs {
        request = request.header(name, value);
    }
    let echo: Value = request.send().await.unwrap().json().await.unwrap();
    check(&echo, Some("alice"));
    assert_eq!(echo["headers"]["x-forwarded-groups"], "admins,staff");
}

#[tokio::test(flavor = "multi_thread")]
async fn other_cookies_pass_but_flowgates_does_not() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let (_, ours) = signed_in(&gate, &ALICE).await;
    // The app's own cookies on both sides of flowgate's, as browsers mix them.
    let sent = format!("app_pref=dark; {ours}; lang=en");
    let plain = reqwest::Client::new();
    let echo: Value = plain
        .get(gate.url("/"))
        .header("cookie", sent)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        echo["headers"]["x-forwarded-user"], "alice",
        "the session was used: {echo}"
    );
    let cookie = echo["headers"]["cookie"].as_str().unwrap_or_default();
    assert_eq!(cookie, "app_pref=dark; lang=en", "{echo}");
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_requests_get_login_redirect_or_401() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = client();
    let page = client
        .get(gate.url("/app?x=1"))
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 302);
    assert_eq!(
        location(&page),
        format!("/_flowgate/flow/{FLOW}/?next=%2Fapp%3Fx%3D1")
    );
    for request in [
        client
            .get(gate.url("/app"))
            .header("accept", "application/json"),
        client
            .get(gate.url("/app"))
            .header("accept", "text/html")
            .header("x-requested-with", "XMLHttpRequest"),
        client
            .get(gate.url("/app"))
            .header("accept", "*/*")
            .header("sec-fetch-mode", "cors"),
        client
            .post(gate.url("/app"))
            .header("accept", "text/html")
            .body("x"),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert!(response.headers().get("www-authenticate").is_some());
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["executor_url"],
            format!("/_flowgate/api/v3/flows/executor/{FLOW}/")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_expired_or_unknown_cookies_are_just_anonymous() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let alice = logged_in(&gate).await;
    let echo: Value = get_json(&alice, gate.url("/")).await;
    assert_eq!(echo["headers"]["x-forwarded-user"], "alice");
    for cookie in [
        "flowgate_session=garbage",
        "flowgate_session=",
        "flowgate_session=abc.def",
        "flowgate_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "flowgate_session=%ff%fe; other=1",
        "flowgate_session=\u{7f}",
    ] {
        let response = client().get(gate.url("/")).header("accept", "text/html").header("cookie", cookie).send().await;
        let Ok(response) = response else { continue }; // the client itself refused the header
        assert_eq!(response.status(), 302, "{cookie:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_signed_with_another_secret_is_anonymous() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let other_config = basic_config(&upstream.url(), "")
        .replace("test-secret-test-secret", "other-secret-other-secret");
    let other = Flowgate::start(&other_config, &users_file(&[&ALICE]));
    let (_, cookies) = signed_in(&other, &ALICE).await;
    // Valid where it was minted…
    let there = common::client()
        .get(other.url("/"))
        .header("cookie", &cookies)
        .send()
        .await
        .unwrap();
    assert_eq!(there.status(), 200);
    // …and nothing but anonymous where another secret signs cookies.
    let here = common::client()
        .get(gate.url("/"))
        .header("accept", "text/html")
        .header("cookie", &cookies)
        .send()
        .await
        .unwrap();
    assert_eq!(here.status(), 302);
}

#[tokio::test(flavor = "multi_thread")]
async fn skip_auth_paths_pass_anonymously() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let response = client()
        .get(gate.url("/public/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["path"], "/public/health");
    assert_eq!(
        client()
            .get(gate.url("/publicity"))
            .header("accept", "text/html")
            .send()
            .await
            .unwrap()
            .status(),
        302
    );
}

/// `skip_auth = ["^/public(/|$)"]` opens `/public/…`, not whatever an
/// upstream makes of `/public/../admin`: the gate decides on the canonical
/// path (and the upstream gets that one), and refuses disguised slashes.
/// Raw requests: HTTP clients resolve dot segments before sending. On both
/// request paths.
#[test]
fn skip_auth_does_not_open_paths_that_climb_out_of_it() {
    use std::io::{Read, Write};
    // The upstream's tasks live as long as this runtime.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(Upstream::start());
    for fast_lane in [true, false] {
        let config = basic_config(&upstream.url(), "").replace(
            "listen = \"127.0.0.1:0\"\n",
            &format!("listen = \"127.0.0.1:0\"\nfast_lane = {fast_lane}\n"),
        );
        let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
        let status = |path: &str| {
            let mut stream = std::net::TcpStream::connect(gate.addr).unwrap();
            stream
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let head =
                format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
            stream.write_all(head.as_bytes()).unwrap();
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            answer[9..12].to_owned()
        };
        assert_eq!(status("/public/health"), "200", "fast lane {fast_lane}");
        assert_eq!(status("/public/."), "200", "fast lane {fast_lane}");
        // Canonical: `/public/health`, public; the query is not the path.
        assert_eq!(
            status("/public/./health?x=/.."),
            "200",
            "fast lane {fast_lane}"
        );
        for climbing in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/%2E%2e%2fadmin",
            "/public/..%2fadmin",
            "/public/..;/admin",
            "/public/..%5cadmin",
        ] {
            let answer = status(climbing);
            assert!(
                answer == "401" || answer == "400",
                "{climbing}: {answer}, fast lane {fast_lane}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_is_a_502_page_without_internals() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let gate = Flowgate::start(
        &basic_config(&format!("http://127.0.0.1:{port}"), ""),
        &users_file(&[&ALICE]),
    );
    let response = client().get(gate.url("/public/x")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let html = response.text().await.unwrap();
    assert!(
        !html.contains("127.0.0.1") && !html.contains(&port.to_string()),
        "no internals: {html}"
    );
    // The log is read from flowgate's stderr by another thread: wait for it.
    gate.wait_for_log("upstream request failed", std::time::Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_headers_describe_the_client() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let echo: Value = client()
        .get(gate.url("/public/x"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The peer is not a trusted proxy: its claims are replaced, not passed on.
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http");
    assert_eq!(echo["headers"]["x-forwarded-host"], gate.addr.to_string());
    assert!(echo["headers"]["forwarded"]
        .as_str()
        .unwrap()
        .starts_with("for=127.0.0.1;proto=http"));
}

#[tokio::test(flavor = "multi_thread")]
async fn route_allow_list_gives_403_to_others() {
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), "").replace(
        "skip_auth = [\"^/public(/|$)\"]",
        "allow = { groups = [\"admins\"] }",
    );
    let gate = Flowgate::start(&config, &users_file(&[&ALICE, &BOB]));
    let bob = client();
    json_login(&bob, &gate.url(""), "bob", BOB.password, "/").await;
    assert_eq!(bob.get(gate.url("/")).send().await.unwrap().status(), 403);
    let alice = logged_in(&gate).await;
    assert_eq!(alice.get(gate.url("/")).send().await.unwrap().status(), 200);

    // The page offers a way out: sign out, and come back here to sign in
    // as someone else.
    let page = bob
        .get(gate.url("/reports?q=1"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 403);
    // The page escapes `/` as `&#x2f;` in attributes.
    let html = page.text().await.unwrap().replace("&#x2f;", "/");
    let link = "/_flowgate/sign_out?rd=%2Freports%3Fq%3D1";
    assert!(html.contains(link), "{html}");
    assert!(html.contains("Sign in as someone else"), "{html}");
    let confirm = bob
        .get(gate.url(link))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = input_value(&confirm, "csrf_token").expect("the sign-out form has a CSRF token");
    let action = form_action(&confirm).expect("a form");
    let signed_out = bob
        .post(gate.url(&action))
        .form(&[("csrf_token", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_out.status(), 303);
    assert_eq!(location(&signed_out), "/reports?q=1");
    let after = bob
        .get(gate.url("/reports?q=1"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 302, "signed out: on to the login page");
}

/// CORS preflights carry no cookie: a route may let them through
/// (`skip_auth_preflight`); only real preflights, and only there. On both
/// lanes.
#[tokio::test(flavor = "multi_thread")]
async fn cors_preflights_pass_where_the_route_says_so() {
    let upstream = Upstream::start().await;
    for fast_lane in [true, false] {
        let config = basic_config(&upstream.url(), "")
            .replace(
                "listen = \"127.0.0.1:0\"\n",
                &format!("listen = \"127.0.0.1:0\"\nfast_lane = {fast_lane}\n"),
            )
            .replace(
                "skip_auth = [\"^/public(/|$)\"]",
                "skip_auth = [\"^/public(/|$)\"]\n\n[[route]]\nhost = \"*\"\npath_prefix = \"/cors\"\n\
                 upstream = \"UPSTREAM\"\nskip_auth_preflight = true",
            )
            .replace("UPSTREAM", &upstream.url());
        let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
        let options = |path: &str, preflight: bool| {
            let mut request = client()
                .request(reqwest::Method::OPTIONS, gate.url(path))
                .header("origin", "https://other.example");
            if preflight {
                request = request.header("access-control-request-method", "PUT");
            }
            request.send()
        };
        let passed = options("/cors/items", true).await.unwrap();
        assert_eq!(passed.status(), 200, "fast lane {fast_lane}");
        let echo: Value = passed.json().await.unwrap();
        assert_eq!(echo["method"], "OPTIONS");
        assert!(echo["headers"].get("x-forwarded-user").is_none(), "{echo}");
        let not_a_preflight = options("/cors/items", false).await.unwrap();
        assert_eq!(not_a_preflight.status(), 401, "fast lane {fast_lane}");
        let other_route = options("/elsewhere", true).await.unwrap();
        assert_eq!(other_route.status(), 401, "fast lane {fast_lane}");
        let get = client().get(gate.url("/cors/items")).send().await.unwrap();
        assert_eq!(get.status(), 401, "fast lane {fast_lane}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_the_log() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = logged_in(&gate).await;
    client
        .get(gate.url("/?token=abc123secret"))
        .send()
        .await
        .unwrap();
    let log = gate.log();
    assert!(log.contains("login succeeded"), "{log}");
    assert!(!log.contains(ALICE.password));
    assert!(!log.contains("test-secret-test-secret"));
    assert!(
        !log.contains("abc123secret"),
        "query strings are not logged"
    );
    assert!(!log.contains("flowgate_session="));
}

/// `Secure` follows the client's real scheme: believed from
/// `X-Forwarded-Proto` only when a trusted proxy says it.
#[tokio::test(flavor = "multi_thread")]
async fn cookies_are_secure_behind_a_trusted_tls_proxy_only() {
    let upstream = Upstream::start().await;
    let executor = format!("/_flowgate/api/v3/flows/executor/{FLOW}/");
    let first_cookie = |gate: &Flowgate| {
        let url = gate.url(&executor);
        async move {
            let response = reqwest::Client::new()
                .get(url)
                .header("x-forwarded-proto", "https")
                .send()
                .await
                .unwrap();
            set_cookies(&response)
                .into_iter()
                .find(|c| c.starts_with("flowgate_session="))
                .expect("a pre-auth session cookie")
        }
    };

    let untrusted = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let cookie = first_cookie(&untrusted).await;
    assert!(!cookie.contains("Secure"), "{cookie}");

    let config = basic_config(&upstream.url(), "").replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    );
    let behind_proxy = Flowgate::start(&config, &users_file(&[&ALICE]));
    let cookie = first_cookie(&behind_proxy).await;
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );

    // The proxy's own forwarding headers are extended, not replaced.
    let echo: Value = reqwest::Client::new()
        .get(behind_proxy.url("/public/x"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["headers"]["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
}

/// The header presets: authentik's outpost names, oauth2-proxy's,
/// Authelia's, and a route's own names for apps that want theirs.
#[tokio::test(flavor = "multi_thread")]
async fn identity_header_presets_use_their_own_names() {
    let upstream = Upstream::start().await;
    for (preset, expected, absent) in [
        (
            "\"authelia\"",
            vec![
                ("remote-user", "alice"),
                ("remote-groups", "admins,staff"),
                ("remote-email", "alice@example.test"),
                ("remote-name", "Alice Example"),
            ],
            "x-forwarded-user",
        ),
        (
            "{ user = \"X-WEBAUTH-USER\", groups = \"X-App-Roles\", groups_separator = \"|\" }",
            vec![("x-webauth-user", "alice"), ("x-app-roles", "admins|staff")],
            "x-forwarded-email",
        ),
        (
            "authentik",
            vec![
                ("x-authentik-username", "alice"),
                ("x-authentik-email", "alice@example.test"),
                ("x-authentik-groups", "admins|staff"),
                ("x-authentik-name", "Alice Example"),
            ],
            "x-forwarded-user",
        ),
        (
            "oauth2-proxy",
            vec![
                ("x-auth-request-user", "alice"),
                ("x-auth-request-email", "alice@example.test"),
                ("x-auth-request-groups", "admins,staff"),
                ("x-auth-request-preferred-username", "alice"),
            ],
            "x-forwarded-user",
        ),
        (
            "default",
            vec![
                ("x-forwarded-user", "alice"),
                ("x-forwarded-email", "alice@example.test"),
                ("x-forwarded-groups", "admins,staff"),
                ("x-forwarded-preferred-username", "alice"),
            ],
            "x-authentik-username",
        ),
    ] {
        let preset = match preset.starts_with(['"', '{']) {
            true => preset.to_owned(),
            false => format!("\"{preset}\""),
        };
        let config = basic_config(&upstream.url(), "").replace(
            "skip_auth = [\"^/public(/|$)\"]",
            &format!("skip_auth = [\"^/public(/|$)\"]\nheaders = {preset}"),
        );
        let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
        let alice = logged_in(&gate).await;
        let echo: Value = get_json(&alice, gate.url("/who")).await;
        for (name, value) in expected {
            assert_eq!(echo["headers"][name], value, "{preset}: {name} in {echo}");
        }
        assert!(
            echo["headers"].get(absent).is_none(),
            "{preset}: {absent} in {echo}"
        );
        // A client's own copy of a route's custom name is stripped too,
        // signed in or not (every preset's names always are).
        if !preset.starts_with('{') {
            continue;
        }
        let spoofed: Value = alice
            .get(gate.url("/who"))
            .header("X-App-Roles", "superadmin")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            !spoofed.to_string().contains("superadmin"),
            "{preset}: {spoofed}"
        );
        let anonymous: Value = client()
            .get(gate.url("/public/who"))
            .header("X-App-Roles", "superadmin")
            .header("X-WEBAUTH-USER", "mallory")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            !anonymous.to_string().contains("superadmin"),
            "{preset}: {anonymous}"
        );
        assert!(
            !anonymous.to_string().contains("mallory"),
            "{preset}: {anonymous}"
        );
        if preset == "\"authentik\"" {
            let uid = echo["headers"]["x-authentik-uid"]
                .as_str()
                .unwrap_or_default();
            assert_eq!(uid.len(), 64, "authentik's uid is a hex SHA-256: {echo}");
        }
    }
}
