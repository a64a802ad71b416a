//! Replays the live authentik 2025.8.1 recordings in
//! `tests/fixtures/authentik/transcripts/` against flowgate's embedded
//! executor: the same requests, in the same order, with flowgate's own cookie
//! jar; every answer must have the recorded status and component (and the
//! recorded `response_errors`, `error_message`, redirect target or
//! `Location`, where the recording has them).
//!
//! flowgate serves the API under `/_flowgate`, so `/api/v3/…` becomes
//! `/_flowgate/api/v3/…`. Steps that hit authentik-only pages (its admin
//! API, `/if/flow/…`, API tokens) have no flowgate counterpart; the
//! scenarios made of them are listed in `NOT_REPLAYED` with the reason.

mod common;

use std::collections::BTreeMap;

use common::*;
use reqwest::cookie::CookieStore;
use serde_json::Value;

const NOT_REPLAYED: [(&str, &str); 5] = [
    (
        "api_token_bearer",
        "authentik API tokens; flowgate has none",
    ),
    (
        "csrf_plain_api_endpoint",
        "authentik's admin API (/core/applications/)",
    ),
    (
        "csrf_wrong_header_name",
        "authentik's admin API (/core/applications/)",
    ),
    (
        "flow_helper_urls",
        "authentik's web interface URLs (/if/flow/, /flows/-/default/)",
    ),
    (
        "logout_invalidation_flow",
        "authentik invalidation flows; flowgate signs out at /_flowgate/sign_out",
    ),
];

/// Recorded answers flowgate deliberately gives differently, by (scenario, step index).
const KNOWN_DIFFERENCES: [(&str, usize, u16, &str); 1] = [(
    "unknown_flow_slug",
    1,
    404,
    "authentik's 405 for POST to an unknown slug is a Django routing artefact; flowgate answers 404 for GET and POST alike",
)];

const DENY_MESSAGE: &str = "Access to this flow is denied for fixture purposes.";
/// The recorded TOTP device's key: hex 3132…3930, i.e. "12345678901234567890".
const TOTP_KEY: &[u8] = b"12345678901234567890";

fn config(upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[session]
secret = "transcript-replay-secret-transcript-replay-secret"

[directory]
users_file = "users.toml"

[[flow]]
slug = "default-authentication-flow"
title = "Welcome to authentik!"
stages = ["identification", "password", "mfa", "login"]

[[flow]]
slug = "fixture-deny-flow"
title = "Fixture deny flow"
stages = ["fixture-deny"]

[[flow]]
slug = "fixture-combined-login"
stages = ["combined-identification", "login"]

[[flow]]
slug = "fixture-require-unauth"
authentication = "require_unauthenticated"
stages = ["identification", "password", "mfa", "login"]

[stage.fixture-deny]
kind = "deny"
message = "{DENY_MESSAGE}"

[stage.combined-identification]
kind = "identification"
password = true

[[route]]
host = "*"
upstream = "{upstream}"
"#
    )
}

fn users() -> String {
    let user = |name: &str, password: &str, extra: &str| {
        let hash = flowgate::directory::hash_password(password).unwrap();
        format!("[[user]]\nusername = \"{name}\"\nemail = \"{name}@example.test\"\npassword = \"{hash}\"\n{extra}\n\n")
    };
    [
        user(
            "akadmin",
            "akadmin-Fixture-Pw1!",
            "superuser = true\ngroups = [\"authentik Admins\"]",
        ),
        user("fixture-user", "Fixture-User-Pw1!", ""),
        // base32 of "12345678901234567890"
        user(
            "fixture-totp",
            "Fixture-Totp-Pw1!",
            "totp = [\"GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\"]",
        ),
        user(
            "fixture-disabled",
            "Fixture-Disabled-Pw1!",
            "disabled = true",
        ),
    ]
    .concat()
}

fn map_path(path: &str) -> Option<String> {
    path.starts_with("/api/v3/flows/executor/")
        .then_some(())
        .or_else(|| path.starts_with("/api/v3/core/users/me/").then_some(()))
        .map(|()| format!("/_flowgate{path}"))
}

struct Replay<'a> {
    gate: &'a Flowgate,
    jar: std::sync::Arc<reqwest::cookie::Jar>,
    client: reqwest::Client,
}

impl Replay<'_> {
    fn new(gate: &Flowgate) -> Replay<'_> {
        let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
        let client = reqwest::Client::builder()
            .cookie_provider(jar.clone())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Replay { gate, jar, client }
    }

    /// The CSRF cookie flowgate hands out at login (`flowgate_session_csrf`).
    fn csrf(&self) -> Option<String> {
        let cookies = self.jar.cookies(&self.gate.url("/").parse().unwrap())?;
        cookies
            .to_str()
            .ok()?
            .split("; ")
            .find_map(|c| c.strip_prefix("flowgate_session_csrf=").map(str::to_owned))
    }
}

fn totp_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    flowgate::directory::totp_code(TOTP_KEY, now / 30, 6)
}

#[tokio::test(flavor = "multi_thread")]
async fn recorded_authentik_exchanges_get_the_same_answers() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&config(&upstream.url()), &users());
    let dir = fixtures().join("authentik/transcripts");
    let index: BTreeMap<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("scenarios.json")).unwrap())
            .unwrap();
    let mut replayed = 0;
    let mut failures = Vec::new();
    for (name, meta) in &index {
        if let Some((_, why)) = NOT_REPLAYED.iter().find(|(n, _)| n == name) {
            eprintln!("not replayed: {name}: {why}");
            continue;
        }
        let file = meta["file"].as_str().unwrap();
        let exchanges: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        let mut replay = Replay::new(&gate);
        for (i, exchange) in exchanges.iter().enumerate() {
            let path = exchange["path"].as_str().unwrap();
            let Some(ours) = map_path(path) else {
                if path.starts_with("/flows/-/cancel/") {
                    // Cancelling throws the plan away: a fresh jar does the same.
                    replay = Replay::new(&gate);
                    continue;
                }
                panic!("{name}[{i}]: unmapped path {path}");
            };
            let method = exchange["method"].as_str().unwrap();
            let headers = &exchange["request_headers_of_interest"];
            let mut request = replay
                .client
                .request(method.parse().unwrap(), replay.gate.url(&ours));
            if let Some(accept) = headers["Accept"].as_str() {
                request = request.header("accept", accept);
            }
            if let Some(content_type) = headers["Content-Type"].as_str() {
                request = request.header("content-type", content_type);
            }
            if headers.get("X-authentik-CSRF").is_some() {
                if let Some(token) = replay.csrf() {
                    request = request.header("x-authentik-csrf", token);
                }
            }
            match &exchange["request_body"] {
                Value::Null => {}
                Value::String(raw) => request = request.body(raw.clone()),
                body => {
                    let mut body = body.clone();
                    if name == "totp_authenticator_validate"
                        && body["code"].as_str().is_some_and(|c| c != "000000")
                    {
                        // The recorded code was right for the recording's clock.
                        body["code"] = Value::String(totp_now());
                    }
                    request = request.body(body.to_string());
                }
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let location = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let text = response.text().await.unwrap();
            let expected_status = KNOWN_DIFFERENCES
                .iter()
                .find(|(n, step, _, _)| n == name && *step == i)
                .map_or(
                    exchange["status"].as_u64().unwrap() as u16,
                    |(_, _, status, _)| *status,
                );
            let what = format!(
                "{name}[{i}] {method} {path} ({})",
                exchange["step"].as_str().unwrap_or("")
            );
            if status != expected_status {
                failures.push(format!(
                    "{what}: status {status}, recorded {expected_status}; body {text}"
                ));
                continue;
            }
            if let (Some(recorded), Some(ours)) = (
                exchange["response_headers_of_interest"]["location"].as_str(),
                &location,
            ) {
                if map_path(recorded).as_deref() != Some(ours.as_str()) {
                    failures.push(format!("{what}: Location {ours}, recorded {recorded}"));
                }
            }
            let recorded = &exchange["response_body"];
            if let Some(component) = recorded.get("component") {
                let body: Value = match serde_json::from_str(&text) {
                    Ok(body) => body,
                    Err(_) => {
                        failures.push(format!("{what}: not JSON: {text}"));
                        continue;
                    }
                };
                if body["component"] != *component {
                    failures.push(format!(
                        "{what}: component {}, recorded {component}",
                        body["component"]
                    ));
                    continue;
                }
                for difference in shape_differences("", &body, recorded) {
                    failures.push(format!("{what}: shape: {difference}"));
                }
                for key in ["response_errors", "error_message"] {
                    if let Some(value) = recorded.get(key) {
                        if body.get(key) != Some(value) {
                            failures.push(format!(
                                "{what}: {key} {:?}, recorded {value}",
                                body.get(key)
                            ));
                        }
                    }
                }
                if component == "xak-flow-redirect" {
                    let to = recorded["to"].as_str().unwrap();
                    let expected = map_path(to).unwrap_or_else(|| to.to_owned());
                    if body["to"] != expected.as_str() {
                        failures.push(format!("{what}: to {}, recorded {to}", body["to"]));
                    }
                }
            }
            if ours.contains("/core/users/me/") && status == 200 {
                let body: Value = serde_json::from_str(&text).unwrap();
                let recorded_user = exchange["response_body"]["user"]["username"].as_str();
                if body["user"]["username"].as_str() != recorded_user {
                    failures.push(format!(
                        "{what}: users/me says {}, recorded {recorded_user:?}",
                        body["user"]["username"]
                    ));
                }
            }
            replayed += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of the replayed exchanges differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(replayed >= 100, "only {replayed} exchanges replayed");
    eprintln!("replayed {replayed} recorded exchanges");
}

#[test]
fn shape_comparison_notices_differences() {
    let recorded = serde_json::json!({"a": "x", "flow_info": {"title": "t", "layout": "stacked"}, "list": [{"k": 1}]});
    assert!(shape_differences("", &recorded, &recorded).is_empty());
    let ours = serde_json::json!({"a": 1, "flow_info": {"title": "t"}, "list": [{"k": 1, "extra": true}], "new": null});
    let found = shape_differences("", &ours, &recorded);
    assert_eq!(found.len(), 4, "{found:#?}");
}
