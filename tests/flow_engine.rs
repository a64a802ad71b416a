//! Flows built from stages, bindings and policies in the config, driven
//! whole through the JSON executor API and the gate over real sockets.

mod common;

use common::*;
use serde_json::{json, Value};

/// Identification and password for `user` in `flow`: the challenge after.
async fn past_password(flow: &JsonFlow, user: &TestUser) -> Value {
    assert_eq!(flow.get().await["component"], "ak-stage-identification");
    let next = flow.post(json!({"uid_field": user.username})).await;
    assert_eq!(next["component"], "ak-stage-password", "{next}");
    flow.post(json!({"password": user.password})).await
}

fn error(challenge: &Value, field: &str) -> String {
    challenge["response_errors"][field][0]["string"]
        .as_str()
        .unwrap_or_else(|| panic!("no error for {field}: {challenge}"))
        .to_owned()
}

const PROFILE: &str = r#"
[stage.profile]
kind = "prompt"

[[stage.profile.field]]
key = "email"
type = "email"
label = "Email"

[[stage.profile.field]]
key = "password"
type = "password"
label = "New password"

[[stage.profile.field]]
key = "password_repeat"
type = "password"
label = "Repeat it"

[[stage.profile.field]]
key = "plan"
type = "dropdown"
choices = ["free", "pro"]

[[stage.profile.field]]
key = "source"
type = "hidden"
initial_value = "signup"

[[flow]]
slug = "profile"
stages = ["identification", "password", "profile", "login"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_checks_its_fields_on_the_server() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), PROFILE),
        &users_file(&[&ALICE]),
    );
    let flow = JsonFlow::new(&gate.url(""), "profile", "/");
    let prompt = past_password(&flow, &ALICE).await;
    assert_eq!(prompt["component"], "ak-stage-prompt", "{prompt}");
    let keys: Vec<&str> = prompt["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field_key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["email", "password", "password_repeat", "plan", "source"]
    );
    assert_eq!(
        prompt["fields"][3]["choices"][1],
        json!({"label": "pro", "value": "pro"})
    );

    let bad = flow
        .post(json!({"email": "not-an-address", "password": "a", "password_repeat": "a", "plan": "gold"}))
        .await;
    assert_eq!(bad["component"], "ak-stage-prompt");
    assert_eq!(error(&bad, "email"), "Enter a valid email address.");
    assert_eq!(error(&bad, "plan"), "Select a valid choice.");

    let missing = flow
        .post(json!({"email": "a@b.example", "password": "a", "password_repeat": "a"}))
        .await;
    assert_eq!(error(&missing, "plan"), "This field is required.");

    let mismatched = flow
        .post(json!({"email": "a@b.example", "password": "one", "password_repeat": "two", "plan": "pro"}))
        .await;
    assert_eq!(
        error(&mismatched, "non_field_errors"),
        "Passwords don't match."
    );

    // A hidden field sent with another value keeps the operator's.
    let done = flow
        .post(json!({"email": "a@b.example", "password": "same", "password_repeat": "same", "plan": "pro", "source": "forged"}))
        .await;
    assert_eq!(done, json!({"component": "xak-flow-redirect", "to": "/"}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_on_a_stage_binding_denies_who_it_picks_out() {
    let extra = r#"
[policy.admins]
kind = "group"
groups = ["admins"]

[[flow]]
slug = "admins-only"
stages = ["identification", "password", { stage = "deny", policies = [{ policy = "admins", negate = true }] }, "login"]
"#;
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), extra),
        &users_file(&[&ALICE, &BOB]),
    );
    let alice = JsonFlow::new(&gate.url(""), "admins-only", "/");
    assert_eq!(
        past_password(&alice, &ALICE).await,
        json!({"component": "xak-flow-redirect", "to": "/"}),
        "an admin: the deny stage is left out"
    );
    let bob = JsonFlow::new(&gate.url(""), "admins-only", "/");
    let denied = past_password(&bob, &BOB).await;
    assert_eq!(denied["component"], "ak-stage-access-denied", "{denied}");
    assert_eq!(denied["pending_user"], "bob");
    assert_eq!(
        api_status(&bob.client, gate.url("/")).await,
        401,
        "no session"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flow_bound_to_a_network_is_refused_elsewhere() {
    let extra = r#"
[policy.office]
kind = "network"
cidrs = ["10.0.0.0/8"]

[policy.here]
kind = "network"
cidrs = ["127.0.0.0/8", "::1"]

[[flow]]
slug = "office"
policies = ["office"]
denied_action = "message"
stages = ["identification", "password", "login"]

[[flow]]
slug = "here"
policies = ["office", "here"]
stages = ["identification", "password", "login"]
"#;
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), extra),
        &users_file(&[&ALICE]),
    );
    let office = JsonFlow::new(&gate.url(""), "office", "/");
    let refused = office.get().await;
    assert_eq!(refused["component"], "ak-stage-access-denied", "{refused}");
    assert_eq!(
        refused["error_message"],
        "Flow does not apply to current user."
    );
    let here = JsonFlow::new(&gate.url(""), "here", "/");
    assert_eq!(
        here.get().await["component"],
        "ak-stage-identification",
        "any of two policies (the default mode) is enough"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_from_one_address_lower_its_reputation_and_not_another_s() {
    let extra = r#"
[policy.bad-address]
kind = "reputation"
check_username = false
threshold = -3

[[flow]]
slug = "guarded"
stages = ["identification", { stage = "deny", policies = ["bad-address"] }, "password", "login"]
"#;
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), extra).replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1/32\"]",
    );
    let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let from = |ip: &str| {
        let mut flow = JsonFlow::new(&gate.url(""), "guarded", "/");
        flow.forwarded_for = Some(ip.to_owned());
        flow
    };
    let bad = from("192.0.2.7");
    bad.get().await;
    assert_eq!(
        bad.post(json!({"uid_field": "alice"})).await["component"],
        "ak-stage-password"
    );
    for i in 0..3 {
        let wrong = bad.post(json!({"password": format!("wrong {i}")})).await;
        assert_eq!(error(&wrong, "password"), "Invalid password");
    }
    let again = from("192.0.2.7");
    again.get().await;
    let denied = again.post(json!({"uid_field": "alice"})).await;
    assert_eq!(denied["component"], "ak-stage-access-denied", "{denied}");
    let other = from("192.0.2.8");
    other.get().await;
    assert_eq!(
        other.post(json!({"uid_field": "alice"})).await["component"],
        "ak-stage-password",
        "another address is unaffected"
    );
    assert_eq!(
        other.post(json!({"password": ALICE.password})).await["component"],
        "xak-flow-redirect"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_answer_can_restart_the_flow_with_or_without_its_context() {
    let extra = r#"
[[flow]]
slug = "strict"
stages = ["identification", { stage = "password", invalid_response_action = "restart" }, "login"]

[[flow]]
slug = "strict-keep"
stages = ["identification", { stage = "password", invalid_response_action = "restart_with_context" }, "login"]
"#;
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), extra),
        &users_file(&[&ALICE]),
    );
    for (slug, kept) in [("strict", None), ("strict-keep", Some("alice"))] {
        let flow = JsonFlow::new(&gate.url(""), slug, "/");
        flow.get().await;
        flow.post(json!({"uid_field": "alice"})).await;
        let restarted = flow.post(json!({"password": "wrong"})).await;
        assert_eq!(
            restarted["component"], "ak-stage-identification",
            "{slug}: {restarted}"
        );
        assert!(
            restarted.get("response_errors").is_none(),
            "{slug}: {restarted}"
        );
        assert_eq!(
            restarted["pending_user_identifier"].as_str(),
            kept,
            "{slug}: the context kept or not"
        );
    }
    // Retry, the default, shows the stage again with the error.
    let flow = JsonFlow::new(&gate.url(""), FLOW, "/");
    flow.get().await;
    flow.post(json!({"uid_field": "alice"})).await;
    let retried = flow.post(json!({"password": "wrong"})).await;
    assert_eq!(retried["component"], "ak-stage-password");
    assert_eq!(error(&retried, "password"), "Invalid password");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_s_policies_deny_a_signed_in_user_of_the_wrong_group() {
    let upstream = Upstream::start().await;
    let extra = format!(
        r#"
[policy.admins]
kind = "group"
groups = ["admins"]

[[route]]
host = "*"
path_prefix = "/admin"
upstream = "{}"
flow = "{FLOW}"
policies = ["admins"]
"#,
        upstream.url()
    );
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), &extra),
        &users_file(&[&ALICE, &BOB]),
    );
    let bob = client();
    json_login(&bob, &gate.url(""), "bob", BOB.password, "/").await;
    assert_eq!(api_status(&bob, gate.url("/elsewhere")).await, 200);
    assert_eq!(api_status(&bob, gate.url("/admin/x")).await, 403);
    // A browser gets the 403 page, not a sign-in loop.
    let page = bob
        .get(gate.url("/admin/x"))
        .header("accept", "text/html")
        .header("sec-fetch-mode", "navigate")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 403);
    // Encodings of the same path are the same path.
    assert_eq!(api_status(&bob, gate.url("/%61dmin/x")).await, 403);
    assert_eq!(api_status(&bob, gate.url("/x/../admin/x")).await, 403);
    let alice = client();
    json_login(&alice, &gate.url(""), "alice", ALICE.password, "/").await;
    assert_eq!(
        upstream_user(&alice, gate.url("/admin/x")).await.as_deref(),
        Some("alice")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_and_logout_stages_end_the_flow_their_way() {
    let extra = r#"
[stage.welcome]
kind = "redirect"
to = "/welcome"

[stage.to-main]
kind = "redirect"
flow = "default-authentication-flow"

[stage.bye]
kind = "user_logout"

[[flow]]
slug = "onboard"
stages = ["identification", "password", "login", "welcome"]

[[flow]]
slug = "old-login"
stages = ["to-main"]

[[flow]]
slug = "leave"
designation = "authentication"
stages = ["bye"]
"#;
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), extra),
        &users_file(&[&ALICE]),
    );
    let onboard = JsonFlow::new(&gate.url(""), "onboard", "/ignored");
    assert_eq!(
        past_password(&onboard, &ALICE).await,
        json!({"component": "xak-flow-redirect", "to": "/welcome"}),
        "the stage's URL, not next"
    );
    let me = get_json(
        &onboard.client,
        gate.url("/_flowgate/api/v3/core/users/me/"),
    )
    .await;
    assert_eq!(
        me["user"]["username"], "alice",
        "logged in before the redirect: still so"
    );

    let old = JsonFlow::new(&gate.url(""), "old-login", "/x");
    assert_eq!(
        old.get().await,
        json!({"component": "xak-flow-redirect", "to": "/_flowgate/flow/default-authentication-flow/?next=%2Fx"})
    );

    let leave = JsonFlow::with_client(onboard.client.clone(), &gate.url(""), "leave", "/");
    assert_eq!(leave.get().await["component"], "xak-flow-redirect");
    assert_eq!(
        api_status(
            &onboard.client,
            gate.url("/_flowgate/api/v3/core/users/me/")
        )
        .await,
        403,
        "the logout stage ended the session"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_s_authorization_flow_asks_consent_once_and_again_after_it_expires() {
    let upstream = Upstream::start().await;
    let extra = format!(
        r#"
[stage.agree]
kind = "consent"
mode = "expiring"
expire_after = "3s"
header = "The wiki will see your name and email."
permissions = ["Your username", "Your email address"]

[[flow]]
slug = "wiki-consent"
designation = "authorization"
authentication = "require_authenticated"
stages = ["agree"]

[[route]]
host = "*"
path_prefix = "/wiki"
upstream = "{}"
flow = "{FLOW}"
authorization_flow = "wiki-consent"
"#,
        upstream.url()
    );
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), &extra),
        &users_file(&[&ALICE]),
    );
    let (alice, cookie) = signed_in(&gate, &ALICE).await;
    assert_eq!(api_status(&alice, gate.url("/elsewhere")).await, 200);
    assert_eq!(
        api_status(&alice, gate.url("/wiki/page")).await,
        401,
        "signed in, but not through the route's authorization flow"
    );
    let consent = JsonFlow::signed_in(
        alice.clone(),
        &cookie,
        &gate.url(""),
        "wiki-consent",
        "/wiki/page",
    );
    let asked = consent.get().await;
    assert_eq!(asked["component"], "ak-stage-consent", "{asked}");
    assert_eq!(
        asked["header_text"],
        "The wiki will see your name and email."
    );
    assert_eq!(asked["permissions"][1]["name"], "Your email address");
    let token = asked["token"].as_str().unwrap().to_owned();
    let stale = consent.post(json!({"token": "not-the-token"})).await;
    assert_eq!(
        error(&stale, "token"),
        "Invalid consent token, re-showing prompt"
    );
    assert_ne!(
        stale["token"],
        token.as_str(),
        "a new token with the prompt shown again"
    );
    let token = stale["token"].as_str().unwrap().to_owned();
    assert_eq!(
        consent.post(json!({"token": token})).await,
        json!({"component": "xak-flow-redirect", "to": "/wiki/page"})
    );
    assert_eq!(
        upstream_user(&alice, gate.url("/wiki/page"))
            .await
            .as_deref(),
        Some("alice")
    );

    // A new session runs the flow again, but the consent is remembered.
    let (again, cookie) = signed_in(&gate, &ALICE).await;
    assert_eq!(api_status(&again, gate.url("/wiki/page")).await, 401);
    let remembered = JsonFlow::signed_in(
        again.clone(),
        &cookie,
        &gate.url(""),
        "wiki-consent",
        "/wiki/page",
    );
    assert_eq!(remembered.get().await["component"], "xak-flow-redirect");
    assert_eq!(api_status(&again, gate.url("/wiki/page")).await, 200);

    // Once it has expired, it is asked for again.
    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    let (later, cookie) = signed_in(&gate, &ALICE).await;
    let expired = JsonFlow::signed_in(later, &cookie, &gate.url(""), "wiki-consent", "/wiki/page");
    assert_eq!(expired.get().await["component"], "ak-stage-consent");
}

/// Every TOML example of docs/flows.md is a config `flowgate check` takes
/// (each after a base with one route), so the docs cannot drift from it.
#[test]
fn every_example_in_the_flows_guide_is_a_valid_config() {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/flows.md"))
        .expect("docs/flows.md");
    let mut examples = 0;
    for block in guide.split("```toml\n").skip(1) {
        let example = block.split("```").next().unwrap();
        let base = "[session]\nallowed_redirect_hosts = [\"wiki.example.com\"]\n\n\
                    [[route]]\nhost = \"*\"\nupstream = \"http://127.0.0.1:9\"\n\n";
        let src = format!("{base}{example}");
        if let Err(errors) =
            flowgate::config::from_str(&src, "/etc/flowgate/flowgate.toml".as_ref(), &|_| None)
        {
            panic!("docs/flows.md example:\n{example}\n{errors}");
        }
        examples += 1;
    }
    assert!(examples >= 5, "only {examples} examples found");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expression_policy_decides_on_group_path_and_headers() {
    let upstream = Upstream::start().await;
    let extra = format!(
        r#"
[policy.admin-area]
kind = "expression"
expression = '''
"admins" in user.groups
  || !request.path.startsWith("/ops/admin")
'''

[policy.prod-header]
kind = "expression"
expression = '!("x-env" in request.headers) || request.headers["x-env"] != "prod" || "admins" in user.groups'

[[route]]
host = "*"
path_prefix = "/ops"
upstream = "{0}"
flow = "{FLOW}"
policies = ["admin-area", "prod-header"]
policy_engine_mode = "all"
"#,
        upstream.url()
    );
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), &extra),
        &users_file(&[&ALICE, &BOB]),
    );
    let bob = client();
    json_login(&bob, &gate.url(""), "bob", BOB.password, "/").await;
    assert_eq!(
        upstream_user(&bob, gate.url("/ops/status"))
            .await
            .as_deref(),
        Some("bob")
    );
    assert_eq!(api_status(&bob, gate.url("/ops/admin")).await, 403);
    assert_eq!(api_status(&bob, gate.url("/ops/admin/users")).await, 403);
    assert_eq!(
        api_status(&bob, gate.url("/ops/%61dmin")).await,
        403,
        "the canonical path"
    );
    assert_eq!(
        api_status(&bob, gate.url("/ops/status/../admin")).await,
        403
    );
    let with_header = |client: &reqwest::Client, value: &str| {
        client
            .get(gate.url("/ops/status"))
            .header("accept", "application/json")
            .header("x-env", value)
            .send()
    };
    assert_eq!(with_header(&bob, "prod").await.unwrap().status(), 403);
    assert_eq!(with_header(&bob, "staging").await.unwrap().status(), 200);
    let alice = client();
    json_login(&alice, &gate.url(""), "alice", ALICE.password, "/").await;
    assert_eq!(
        upstream_user(&alice, gate.url("/ops/admin"))
            .await
            .as_deref(),
        Some("alice")
    );
    assert_eq!(with_header(&alice, "prod").await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remembered_identifier_is_filled_in_on_that_browser_until_unticked() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(
            &upstream.url(),
            "[stage.identification]\nenable_remember_me = true\n",
        ),
        &users_file(&[&ALICE]),
    );
    let (client, jar) = jar_client(&gate, &[]);
    let flow = JsonFlow::with_client(client, &gate.url(""), FLOW, "/");
    let first = flow.get().await;
    assert_eq!(first["enable_remember_me"], true, "{first}");
    assert!(
        first
            .get("pending_user_identifier")
            .is_none_or(Value::is_null),
        "{first}"
    );
    // Ticked, but the login fails: nothing is kept.
    flow.post(json!({"uid_field": "alice", "remember_me": true}))
        .await;
    let wrong = flow.post(json!({"password": "not it"})).await;
    assert_eq!(wrong["component"], "ak-stage-password");
    assert_eq!(memo_cookie(&gate, &jar), None, "remembered before a login");
    let done = flow.post(json!({"password": ALICE.password})).await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    let memo = memo_cookie(&gate, &jar).expect("the identifier is remembered");

    // The browser, signed out: its name is filled in, on the JSON API and
    // on the login page (the box still ticked).
    let (client, _) = jar_client(&gate, &[&memo]);
    let flow = JsonFlow::with_client(client.clone(), &gate.url(""), FLOW, "/");
    let next = flow.get().await;
    assert_eq!(next["pending_user_identifier"], "alice", "{next}");
    let page = client
        .get(gate.url(&format!("/_flowgate/flow/{FLOW}/?next=%2F")))
        .send()
        .await
        .unwrap();
    let page = match page.status().as_u16() {
        302 | 303 => {
            let to = page.headers()["location"].to_str().unwrap().to_owned();
            client.get(gate.url(&to)).send().await.unwrap()
        }
        _ => page,
    };
    let html = page.text().await.unwrap();
    assert!(html.contains("value=\"alice\""), "{html}");
    assert!(html.contains("type=\"checkbox\" checked"), "{html}");
    // A client that says nothing (authentik's own) leaves the memo.
    let (client, jar) = jar_client(&gate, &[&memo]);
    let flow = JsonFlow::with_client(client, &gate.url(""), FLOW, "/");
    flow.get().await;
    flow.post(json!({"uid_field": "alice"})).await;
    flow.post(json!({"password": ALICE.password})).await;
    assert_eq!(memo_cookie(&gate, &jar).as_deref(), Some(memo.as_str()));
    // Unticked at a login: forgotten.
    let (client, jar) = jar_client(&gate, &[&memo]);
    let flow = JsonFlow::with_client(client, &gate.url(""), FLOW, "/");
    flow.get().await;
    flow.post(json!({"uid_field": "alice", "remember_me": false}))
        .await;
    let done = flow.post(json!({"password": ALICE.password})).await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    assert_eq!(memo_cookie(&gate, &jar), None, "forgotten");
    // A memo made up by the client is no memo.
    let forged = format!(
        "flowgate_session_memo={}.{}",
        base64url(br#"{"identifier":"admin"}"#),
        "A".repeat(43)
    );
    let (client, _) = jar_client(&gate, &[&forged]);
    let flow = JsonFlow::with_client(client, &gate.url(""), FLOW, "/");
    let next = flow.get().await;
    assert!(
        next.get("pending_user_identifier")
            .is_none_or(Value::is_null),
        "{next}"
    );
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_s_validation_policies_refuse_a_weak_password_with_their_message() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(
            &upstream.url(),
            r#"
[policy.strong-password]
kind = "password"
length_min = 12
amount_digits = 1
error_message = "Use at least 12 characters, one of them a digit."

[policy.not-the-name]
kind = "expression"
expression = "!(context.prompt_data.password.contains('alice'))"
message = "Do not use your name."

[stage.new-password]
kind = "prompt"
validation_policies = ["strong-password", "not-the-name"]

[[stage.new-password.field]]
key = "password"
type = "password"

[[stage.new-password.field]]
key = "password_repeat"
type = "password"

[[flow]]
slug = "change-password"
stages = ["identification", "password", "new-password", "login"]
"#,
        ),
        &users_file(&[&ALICE]),
    );
    let flow = JsonFlow::new(&gate.url(""), "change-password", "/");
    let prompt = past_password(&flow, &ALICE).await;
    assert_eq!(prompt["component"], "ak-stage-prompt", "{prompt}");
    let weak = flow
        .post(json!({"password": "short1", "password_repeat": "short1"}))
        .await;
    assert_eq!(weak["component"], "ak-stage-prompt");
    assert_eq!(
        error(&weak, "non_field_errors"),
        "Use at least 12 characters, one of them a digit."
    );
    let named = flow
        .post(json!({"password": "alice-is-42-years", "password_repeat": "alice-is-42-years"}))
        .await;
    assert_eq!(error(&named, "non_field_errors"), "Do not use your name.");
    // Mismatched passwords are told before any policy runs.
    let differ = flow
        .post(json!({"password": "a-good-one-42", "password_repeat": "another-42-x"}))
        .await;
    assert_eq!(error(&differ, "non_field_errors"), "Passwords don't match.");
    let done = flow
        .post(json!({"password": "a-good-one-42", "password_repeat": "a-good-one-42"}))
        .await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
}

/// A flow that signs out runs on a GET, so a link on another site must not
/// run it: the login page asks first (the sign-out page, a POST with its
/// token), and the JSON executor takes no requests from other sites. A
/// link on the site itself, or an address typed in, signs out at once.
#[tokio::test(flavor = "multi_thread")]
async fn another_site_cannot_sign_a_visitor_out_through_an_invalidation_flow() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(
            &upstream.url(),
            r#"
[stage.bye]
kind = "user_logout"

[[flow]]
slug = "leave"
stages = ["bye"]

[[flow]]
slug = "default-invalidation-flow"
designation = "invalidation"
stages = ["logout"]
"#,
        ),
        &users_file(&[&ALICE]),
    );
    let me = |client: &reqwest::Client| {
        let url = gate.url("/_flowgate/api/v3/core/users/me/");
        let client = client.clone();
        async move { api_status(&client, url).await }
    };
    let alice = client();
    json_login(&alice, &gate.url(""), "alice", ALICE.password, "/").await;
    for slug in ["default-invalidation-flow", "leave"] {
        for site in ["cross-site", "same-site"] {
            let page = alice
                .get(gate.url(&format!("/_flowgate/flow/{slug}/?next=%2Fbye")))
                .header("sec-fetch-site", site)
                .header("sec-fetch-mode", "navigate")
                .send()
                .await
                .unwrap();
            assert_eq!(page.status(), 303, "{slug} {site}");
            assert_eq!(
                page.headers()["location"],
                "/_flowgate/sign_out?next=%2Fbye",
                "{slug} {site}"
            );
            let api = alice
                .get(gate.url(&format!("/_flowgate/api/v3/flows/executor/{slug}/?query=")))
                .header("accept", "application/json")
                .header("sec-fetch-site", site)
                .send()
                .await
                .unwrap();
            assert_eq!(api.status(), 403, "{slug} {site}");
            assert_eq!(me(&alice).await, 200, "{slug} {site}: still signed in");
        }
    }
    // From a page of the site itself: signed out.
    let page = alice
        .get(gate.url("/_flowgate/flow/default-invalidation-flow/?next=%2F"))
        .header("sec-fetch-site", "same-origin")
        .header("sec-fetch-mode", "navigate")
        .send()
        .await
        .unwrap();
    let mut status = page.status().as_u16();
    let mut location = page.headers().get("location").cloned();
    // The page's own flow id first, then the flow runs.
    while status == 303 {
        let to = location.unwrap().to_str().unwrap().to_owned();
        if !to.starts_with("/_flowgate/flow/") {
            break;
        }
        let next = alice
            .get(gate.url(&to))
            .header("sec-fetch-site", "same-origin")
            .send()
            .await
            .unwrap();
        status = next.status().as_u16();
        location = next.headers().get("location").cloned();
    }
    assert_eq!(me(&alice).await, 403, "signed out from the site's own link");
}

/// A route's policies are evaluated once per request, whichever lane it
/// arrives on: an expression that cannot be evaluated says so once.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_s_policies_are_decided_once_per_request() {
    let upstream = Upstream::start().await;
    let extra = format!(
        r#"
[policy.env]
kind = "expression"
expression = "request.headers['x-env'] == 'test'"

[[route]]
host = "*"
path_prefix = "/guarded"
upstream = "{}"
flow = "{FLOW}"
policies = ["env"]
"#,
        upstream.url()
    );
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), &extra),
        &users_file(&[&ALICE]),
    );
    let alice = client();
    json_login(&alice, &gate.url(""), "alice", ALICE.password, "/").await;
    let with = alice
        .get(gate.url("/guarded/x"))
        .header("accept", "application/json")
        .header("x-env", "test")
        .send()
        .await
        .unwrap();
    assert_eq!(with.status(), 200, "the policy reads the header");
    assert_eq!(api_status(&alice, gate.url("/guarded/y")).await, 403);
    gate.wait_for_log("could not be evaluated", std::time::Duration::from_secs(5));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let warnings = gate.log().matches("could not be evaluated").count();
    assert_eq!(warnings, 1, "one request, one decision:\n{}", gate.log());
}
