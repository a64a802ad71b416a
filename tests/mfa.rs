//! Second factors kept in the state store: a TOTP device enrolled in the
//! login flow and used at the next login, recovery codes good once, codes
//! never good twice, and the operator's `flowgate totp` and
//! `flowgate recovery-codes` beside a running server.

mod common;

use std::process::Command;

use common::totp::{key_of_uri, step_now, totp_at};
use common::*;
use serde_json::{json, Value};

/// The default flow with its MFA stage set to enrol users who have none,
/// and a flow in which a signed-in user makes recovery codes.
fn config(upstream: &str) -> String {
    basic_config(
        upstream,
        r#"
[stage.mfa]
not_configured_action = "configure"

[[flow]]
slug = "recovery-setup"
designation = "stage_configuration"
authentication = "require_authenticated"
stages = ["recovery-codes"]
"#,
    )
}

/// Identification and password for alice: the challenge after.
async fn past_password(flow: &JsonFlow) -> Value {
    assert_eq!(flow.get().await["component"], "ak-stage-identification");
    flow.post(json!({"uid_field": "alice"})).await;
    flow.post(json!({"password": ALICE.password})).await
}

/// A client signed in as alice with a code from `key` (a jar kept, for the
/// CSRF cookie), and its cookie header.
async fn signed_in_with_code(gate: &Flowgate, key: &[u8]) -> (reqwest::Client, String) {
    use reqwest::cookie::CookieStore;
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let client = reqwest::Client::builder()
        .cookie_provider(jar.clone())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let flow = JsonFlow::with_client(client.clone(), &gate.url(""), FLOW, "/");
    assert_eq!(
        past_password(&flow).await["component"],
        "ak-stage-authenticator-validate"
    );
    let done = flow
        .post(json!({"code": totp_at(key, step_now() + 1)}))
        .await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    let cookie = jar.cookies(&gate.url("/").parse().unwrap()).unwrap();
    (client, cookie.to_str().unwrap().to_owned())
}

fn cli(gate: &Flowgate, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(args)
        .arg("--config")
        .arg(gate.path().join("flowgate.toml"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_enrolled_at_login_is_asked_for_at_the_next_and_a_code_is_good_once() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&config(&upstream.url()), &users_file(&[&ALICE]));

    // First login: no device yet, so the flow sets one up.
    let first = JsonFlow::new(&gate.url(""), FLOW, "/");
    let setup = past_password(&first).await;
    assert_eq!(setup["component"], "ak-stage-authenticator-totp", "{setup}");
    let uri = setup["config_url"].as_str().unwrap();
    assert!(
        uri.starts_with("otpauth://totp/flowgate%3Aalice?secret="),
        "{uri}"
    );
    let key = key_of_uri(uri);
    let wrong = first.post(json!({"code": "000000"})).await;
    assert_eq!(
        wrong["response_errors"]["code"][0]["string"],
        "Code does not match"
    );
    let step = step_now();
    let done = first.post(json!({"code": totp_at(&key, step)})).await;
    assert_eq!(done, json!({"component": "xak-flow-redirect", "to": "/"}));

    // The next login asks for a code from that device.
    let second = JsonFlow::new(&gate.url(""), FLOW, "/");
    let validate = past_password(&second).await;
    assert_eq!(
        validate["component"], "ak-stage-authenticator-validate",
        "{validate}"
    );
    assert_eq!(validate["device_challenges"][0]["device_class"], "totp");
    let bad = second.post(json!({"code": "123456"})).await;
    assert_eq!(bad["component"], "ak-stage-authenticator-validate");
    assert!(bad["response_errors"]["code"].is_array(), "{bad}");
    // The code that proved the setup is spent already.
    let replayed = second.post(json!({"code": totp_at(&key, step)})).await;
    assert!(replayed["response_errors"]["code"].is_array(), "{replayed}");
    // The next step's code (within the skew allowed) is good, once.
    let code = totp_at(&key, step + 1);
    let done = second.post(json!({"code": code.clone()})).await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    let third = JsonFlow::new(&gate.url(""), FLOW, "/");
    past_password(&third).await;
    let again = third.post(json!({"code": code})).await;
    assert!(
        again["response_errors"]["code"].is_array(),
        "replayed: {again}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn recovery_codes_from_a_setup_flow_and_from_the_cli_each_work_once() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&config(&upstream.url()), &users_file(&[&ALICE]));
    {
        let first = JsonFlow::new(&gate.url(""), FLOW, "/");
        let setup = past_password(&first).await;
        let key = key_of_uri(setup["config_url"].as_str().unwrap());
        first.post(json!({"code": totp_at(&key, step_now())})).await;
        // Signed in, alice makes recovery codes in the setup flow.
        let (client, cookie) = signed_in_with_code(&gate, &key).await;
        let codes_flow = JsonFlow::signed_in(client, &cookie, &gate.url(""), "recovery-setup", "/");
        let shown = codes_flow.get().await;
        assert_eq!(
            shown["component"], "ak-stage-authenticator-static",
            "{shown}"
        );
        let codes: Vec<String> = shown["codes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(codes.len(), 8);
        assert_eq!(
            codes_flow.post(json!({})).await["component"],
            "xak-flow-redirect"
        );
        let login = JsonFlow::new(&gate.url(""), FLOW, "/");
        let validate = past_password(&login).await;
        let classes: Vec<&str> = validate["device_challenges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device_class"].as_str().unwrap())
            .collect();
        assert_eq!(classes, ["totp", "static"]);
        assert_eq!(
            login.post(json!({"code": codes[0].clone()})).await["component"],
            "xak-flow-redirect"
        );
        let login = JsonFlow::new(&gate.url(""), FLOW, "/");
        past_password(&login).await;
        let reused = login.post(json!({"code": codes[0].clone()})).await;
        assert!(
            reused["response_errors"]["code"].is_array(),
            "used twice: {reused}"
        );
        assert_eq!(
            login.post(json!({"code": codes[1].clone()})).await["component"],
            "xak-flow-redirect",
            "another of the set"
        );
    }

    // The operator makes a new set: the old one stops working.
    let printed = cli(&gate, &["recovery-codes", "alice"]);
    let fresh: Vec<&str> = printed
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(fresh.len(), 8, "{printed}");
    let login = JsonFlow::new(&gate.url(""), FLOW, "/");
    past_password(&login).await;
    assert_eq!(
        login.post(json!({"code": fresh[3]})).await["component"],
        "xak-flow-redirect",
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_enrols_lists_and_removes_devices_beside_a_running_server() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let printed = cli(&gate, &["totp", "enroll", "alice", "--name", "phone"]);
    let uri = printed
        .lines()
        .find(|l| l.starts_with("otpauth://"))
        .unwrap_or_else(|| panic!("no URI: {printed}"));
    assert!(
        printed.contains('█'),
        "a QR code in the terminal: {printed}"
    );
    let key = key_of_uri(uri);
    let listed = cli(&gate, &["totp", "list", "alice"]);
    assert!(
        listed.contains("s1") && listed.contains("phone"),
        "{listed}"
    );

    let login = JsonFlow::new(&gate.url(""), FLOW, "/");
    let validate = past_password(&login).await;
    assert_eq!(
        validate["component"], "ak-stage-authenticator-validate",
        "{validate}"
    );
    assert_eq!(
        login.post(json!({"code": totp_at(&key, step_now())})).await["component"],
        "xak-flow-redirect"
    );

    cli(&gate, &["totp", "remove", "alice", "--device", "s1"]);
    let login = JsonFlow::new(&gate.url(""), FLOW, "/");
    assert_eq!(
        past_password(&login).await["component"],
        "xak-flow-redirect",
        "no device left: the default MFA stage lets her through"
    );

    // Output nobody reads (a closed pipe): nothing is enrolled, and the
    // command says so instead of panicking.
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["totp", "enroll", "alice", "--config"])
        .arg(gate.path().join("flowgate.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("nothing was enrolled"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        cli(&gate, &["totp", "list", "alice"]).contains("no TOTP device"),
        "not kept"
    );
}

/// The secret of `GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ`, RFC 6238's test key.
const FILE_KEY: &[u8] = b"12345678901234567890";

/// `name` with a TOTP device in the users file.
fn with_totp(name: &'static str) -> TestUser {
    TestUser {
        username: name,
        password: "a long test password",
        email: "",
        groups: &[],
        extra: "totp = [\"GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\"]",
    }
}

/// Identification and password of `user` in a flow on `client`.
async fn password_of(
    gate: &Flowgate,
    client: reqwest::Client,
    user: &TestUser,
) -> (JsonFlow, Value) {
    let flow = JsonFlow::with_client(client, &gate.url(""), FLOW, "/");
    assert_eq!(flow.get().await["component"], "ak-stage-identification");
    flow.post(json!({"uid_field": user.username})).await;
    let after = flow.post(json!({"password": user.password})).await;
    (flow, after)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_factor_is_not_asked_again_on_the_same_browser_within_last_auth_threshold() {
    let upstream = Upstream::start().await;
    let (tina, tom) = (with_totp("tina"), with_totp("tom"));
    let gate = Flowgate::start(
        &basic_config(
            &upstream.url(),
            "[stage.mfa]\nlast_auth_threshold = \"6s\"\n",
        ),
        &users_file(&[&tina, &tom]),
    );

    // A login with a code leaves a memo on the browser.
    let (client, jar) = jar_client(&gate, &[]);
    let (flow, validate) = password_of(&gate, client, &tina).await;
    assert_eq!(validate["component"], "ak-stage-authenticator-validate");
    let step = step_now();
    let done = flow.post(json!({"code": totp_at(FILE_KEY, step)})).await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    let memo = memo_cookie(&gate, &jar).expect("a memo cookie after the code");
    let started = std::time::Instant::now();

    // The same browser signed out (its session cookie gone, the memo
    // kept): the password alone signs tina in, with a second factor.
    let (client, jar) = jar_client(&gate, &[&memo]);
    let (_, done) = password_of(&gate, client.clone(), &tina).await;
    assert_eq!(done["component"], "xak-flow-redirect", "not asked: {done}");
    let seen: Value = client
        .get(gate.url("/whoami"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["headers"]["x-forwarded-user"], "tina", "{seen}");
    // The memo is flowgate's, like the session cookie: the app never sees it.
    assert!(seen["headers"].get("cookie").is_none(), "{seen}");
    use reqwest::cookie::CookieStore;
    let cookies = jar.cookies(&gate.url("/").parse().unwrap()).unwrap();
    assert!(cookies.to_str().unwrap().contains("flowgate_session="));

    // Another user on that browser, another browser, a memo altered by a
    // byte, and the password still wrong: asked (or refused) as ever.
    let (client, _) = jar_client(&gate, &[&memo]);
    let (_, asked) = password_of(&gate, client, &tom).await;
    assert_eq!(
        asked["component"], "ak-stage-authenticator-validate",
        "tom: {asked}"
    );
    let (client, _) = jar_client(&gate, &[]);
    let (_, asked) = password_of(&gate, client, &tina).await;
    assert_eq!(
        asked["component"], "ak-stage-authenticator-validate",
        "a fresh browser: {asked}"
    );
    let (name, value) = memo.split_once('=').unwrap();
    let mut bytes = value.as_bytes().to_vec();
    bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
    let altered = format!("{name}={}", String::from_utf8(bytes).unwrap());
    let (client, _) = jar_client(&gate, &[&altered]);
    let (_, asked) = password_of(&gate, client, &tina).await;
    assert_eq!(
        asked["component"], "ak-stage-authenticator-validate",
        "altered: {asked}"
    );
    let (client, _) = jar_client(&gate, &[&memo]);
    let flow = JsonFlow::with_client(client, &gate.url(""), FLOW, "/");
    flow.get().await;
    flow.post(json!({"uid_field": "tina"})).await;
    let wrong = flow.post(json!({"password": "not it"})).await;
    assert_eq!(wrong["component"], "ak-stage-password", "{wrong}");

    // Past the threshold the memo is worth nothing.
    let left = std::time::Duration::from_secs(7).saturating_sub(started.elapsed());
    tokio::time::sleep(left).await;
    let (client, _) = jar_client(&gate, &[&memo]);
    let (_, asked) = password_of(&gate, client, &tina).await;
    assert_eq!(
        asked["component"], "ak-stage-authenticator-validate",
        "expired: {asked}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remembered_second_factor_is_asked_again_once_the_devices_change() {
    let upstream = Upstream::start().await;
    let tina = with_totp("tina");
    let gate = Flowgate::start(
        &basic_config(
            &upstream.url(),
            "[stage.mfa]\nlast_auth_threshold = \"1h\"\n",
        ),
        &users_file(&[&tina]),
    );
    let (client, jar) = jar_client(&gate, &[]);
    let (flow, _) = password_of(&gate, client, &tina).await;
    let done = flow
        .post(json!({"code": totp_at(FILE_KEY, step_now())}))
        .await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    let memo = memo_cookie(&gate, &jar).unwrap();
    let (client, _) = jar_client(&gate, &[&memo]);
    let (_, done) = password_of(&gate, client, &tina).await;
    assert_eq!(done["component"], "xak-flow-redirect", "remembered: {done}");

    // The operator enrols another device (a lost phone replaced, say).
    cli(&gate, &["totp", "enroll", "tina"]);
    let (client, _) = jar_client(&gate, &[&memo]);
    let (_, asked) = password_of(&gate, client, &tina).await;
    assert_eq!(
        asked["component"], "ak-stage-authenticator-validate",
        "{asked}"
    );
}

/// A password alone never changes second factors: a session made without
/// one cannot set up a device or new recovery codes for a user who has a
/// second factor (and then step up with it), while a user with none sets
/// up their first, and a session made with one changes them.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_without_a_second_factor_cannot_change_an_account_s_second_factors() {
    let upstream = Upstream::start().await;
    let tina = with_totp("tina");
    let extra = format!(
        r#"
[[flow]]
slug = "password-only"
stages = ["identification", "password", "login"]

[[flow]]
slug = "default-authenticator-static-setup"
designation = "stage_configuration"
authentication = "require_authenticated"
stages = ["recovery-codes"]

[[flow]]
slug = "default-authenticator-totp-setup"
designation = "stage_configuration"
authentication = "require_authenticated"
stages = ["totp-setup"]

[[route]]
host = "*"
path_prefix = "/staff"
upstream = "{}"
flow = "password-only"
"#,
        upstream.url()
    );
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), &extra),
        &users_file(&[&tina, &ALICE]),
    );
    let password_only = |user: &TestUser| {
        let gate = &gate;
        let (username, password) = (user.username, user.password);
        async move {
            let (client, jar) = jar_client(gate, &[]);
            let flow = JsonFlow::with_client(client.clone(), &gate.url(""), "password-only", "/");
            flow.get().await;
            flow.post(json!({"uid_field": username})).await;
            let done = flow.post(json!({"password": password})).await;
            assert_eq!(done["component"], "xak-flow-redirect", "{done}");
            use reqwest::cookie::CookieStore;
            let cookie = jar.cookies(&gate.url("/").parse().unwrap()).unwrap();
            (client, cookie.to_str().unwrap().to_owned())
        }
    };

    let (client, cookie) = password_only(&tina).await;
    for slug in [
        "default-authenticator-static-setup",
        "default-authenticator-totp-setup",
    ] {
        let setup = JsonFlow::signed_in(client.clone(), &cookie, &gate.url(""), slug, "/");
        let refused = setup.get().await;
        assert_eq!(
            refused["component"], "ak-stage-access-denied",
            "{slug}: {refused}"
        );
        assert_eq!(
            refused["error_message"],
            "To change your second factors, sign in with one of them first.",
            "{slug}"
        );
    }
    // Nor can the MFA flow be passed with codes made that way: there are none.
    let (_, validate) = password_of(&gate, jar_client(&gate, &[]).0, &tina).await;
    assert_eq!(
        validate["device_challenges"],
        json!([{"device_class": "totp", "device_uid": validate["device_challenges"][0]["device_uid"], "challenge": {}, "last_used": null}]),
        "no recovery codes were made: {validate}"
    );

    // Signed in with the code, tina makes recovery codes.
    let (client, cookie) = signed_in_with_code_as(&gate, &tina).await;
    let setup = JsonFlow::signed_in(
        client,
        &cookie,
        &gate.url(""),
        "default-authenticator-static-setup",
        "/",
    );
    let codes = setup.get().await;
    assert_eq!(
        codes["component"], "ak-stage-authenticator-static",
        "{codes}"
    );
    assert_eq!(codes["pending_user"], "tina", "the signed-in user is named");

    // alice has no second factor: her first is hers to set up.
    let (client, cookie) = password_only(&ALICE).await;
    let setup = JsonFlow::signed_in(
        client,
        &cookie,
        &gate.url(""),
        "default-authenticator-static-setup",
        "/",
    );
    assert_eq!(
        setup.get().await["component"],
        "ak-stage-authenticator-static"
    );
}

/// `user` signed in through the MFA flow with a code of the users file's
/// device; the client and its cookie header.
async fn signed_in_with_code_as(gate: &Flowgate, user: &TestUser) -> (reqwest::Client, String) {
    use reqwest::cookie::CookieStore;
    let (client, jar) = jar_client(gate, &[]);
    let (flow, validate) = password_of(gate, client.clone(), user).await;
    assert_eq!(validate["component"], "ak-stage-authenticator-validate");
    let done = flow
        .post(json!({"code": totp_at(FILE_KEY, step_now())}))
        .await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    let cookie = jar.cookies(&gate.url("/").parse().unwrap()).unwrap();
    (client, cookie.to_str().unwrap().to_owned())
}
