//! Every component flowgate's executor API emits, driven out of the real
//! binary, has the shape of authentik's own example of that component in
//! `tests/fixtures/authentik/` (same keys, same JSON types), and parses back
//! into flowgate's typed wire model. The fixtures parse too, so a remote
//! authentik's challenges are understood.

mod common;

use common::*;
use flowgate::flow::{Challenge, Component};
use serde_json::{json, Value};

const TOTP_KEY: &[u8] = b"12345678901234567890";

fn config(upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[session]
secret = "wire-shapes-secret-wire-shapes-secret-wire-shapes"

[stage.remember]
kind = "user_login"
remember_me_offset = "30d"

[stage.closed]
kind = "deny"
message = "Closed for maintenance."

[[flow]]
slug = "{FLOW}"
stages = ["identification", "password", "mfa", "remember"]

[[flow]]
slug = "closed"
stages = ["closed"]

[[route]]
upstream = "{upstream}"
"#
    )
}

fn fixture(name: &str) -> Value {
    let path = fixtures().join("authentik").join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// `ours` must be shaped like the fixture and parse as a typed component.
fn assert_shaped_like(ours: &Value, fixture_name: &str) {
    let expected = fixture(fixture_name);
    assert_eq!(ours["component"], expected["component"], "{ours}");
    let mut differences = shape_differences("", ours, &expected);
    // Optional keys added after authentik 2025.8, whose format flowgate speaks
    // (the live transcripts are 2025.8.1; the examples follow 2026.5's schema).
    differences.retain(|d| {
        !d.starts_with("flow_info.background_themed_urls:") && !d.starts_with("passkey_challenge:")
    });
    assert!(
        differences.is_empty(),
        "{fixture_name}:\n{}\nours: {ours:#}",
        differences.join("\n")
    );
    let parsed = Challenge::from_json(ours.clone()).unwrap();
    assert!(
        !matches!(parsed.component, Component::Other { .. }),
        "{ours}"
    );
    assert_eq!(parsed.to_json(), *ours, "to_json(from_json(x)) == x");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_emitted_component_has_authentiks_shape() {
    let upstream = Upstream::start().await;
    let totp_user = TestUser {
        username: "carol",
        password: "carol-Secret-Pw1!",
        email: "carol@example.test",
        groups: &[],
        // base32 of TOTP_KEY
        extra: "totp = [\"GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\"]",
    };
    let gate = Flowgate::start(&config(&upstream.url()), &users_file(&[&totp_user]));
    let client = client();
    let url = gate.url(&format!(
        "/_flowgate/api/v3/flows/executor/{FLOW}/?query=next%3D%252Fapp"
    ));
    let get = || async {
        client
            .get(&url)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let post = |body: Value| {
        let request = client.post(&url).json(&body);
        async move { request.send().await.unwrap() }
    };

    assert_shaped_like(&get().await, "challenges/ak-stage-identification.json");
    assert_eq!(post(json!({"uid_field": "carol"})).await.status(), 302);
    assert_shaped_like(&get().await, "challenges/ak-stage-password.json");

    let wrong: Value = post(json!({"password": "nope"}))
        .await
        .json()
        .await
        .unwrap();
    assert_shaped_like(&wrong, "variants/ak-stage-password.response-errors.json");

    assert_eq!(
        post(json!({"password": totp_user.password})).await.status(),
        302
    );
    let mfa = get().await;
    assert_eq!(mfa["device_challenges"][0]["device_class"], "totp", "{mfa}");
    assert_shaped_like(&mfa, "challenges/ak-stage-authenticator-validate.json");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let code = flowgate::directory::totp_code(TOTP_KEY, now / 30, 6);
    assert_eq!(post(json!({"code": code})).await.status(), 302);
    assert_shaped_like(&get().await, "challenges/ak-stage-user-login.json");

    let done = post(json!({"remember_me": true})).await;
    let done: Value = if done.status() == 302 {
        get().await
    } else {
        done.json().await.unwrap()
    };
    assert_shaped_like(&done, "challenges/xak-flow-redirect.json");
    assert_eq!(done["to"], "/app");

    let denied: Value = get_json(
        &client,
        gate.url("/_flowgate/api/v3/flows/executor/closed/"),
    )
    .await;
    assert_shaped_like(&denied, "challenges/ak-stage-access-denied.json");
    assert_eq!(denied["error_message"], "Closed for maintenance.");

    let failed: Value = client
        .get(&url)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_shaped_like(&failed, "challenges/ak-stage-flow-error.json");
}

/// The other direction: authentik's examples (current and 2022-era) parse
/// into the typed model, and what flowgate does not model is kept whole.
#[test]
fn authentiks_examples_parse() {
    for folder in ["challenges", "legacy-2022/challenges", "variants"] {
        let dir = fixtures().join("authentik").join(folder);
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.contains(".response.") {
                continue;
            }
            let value: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let challenge = Challenge::from_json(value.clone())
                .unwrap_or_else(|e| panic!("{folder}/{name}: {e}"));
            assert_eq!(
                challenge.component.name(),
                value["component"].as_str().unwrap(),
                "{folder}/{name}"
            );
            let modelled = [
                "ak-stage-identification",
                "ak-stage-password",
                "ak-stage-authenticator-validate",
                "ak-stage-authenticator-totp",
                "ak-stage-authenticator-static",
                "ak-stage-user-login",
                "ak-stage-consent",
                "ak-stage-prompt",
                "ak-stage-access-denied",
                "xak-flow-redirect",
                "ak-stage-flow-error",
            ];
            let typed = !matches!(challenge.component, Component::Other { .. });
            assert_eq!(
                typed,
                modelled.contains(&challenge.component.name()),
                "{folder}/{name}"
            );
        }
    }
}
