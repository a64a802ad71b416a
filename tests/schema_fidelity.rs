//! What flowgate's executor API serves validates against authentik's own
//! OpenAPI schemas, 2026.5 (`schema.yml`) and 2026.8.3
//! (`schema-2026.8.3.yml`): every challenge against `ChallengeTypes` (by
//! its `component`, as the schema's discriminator says), and `users/me`
//! against `SessionUser`. The schemas' component sections reachable from
//! those two are in `schema-components.json` (made from the YAML files
//! with `yaml.safe_load`; the YAML is kept beside it).
//!
//! The conformance test drives every component the embedded engine can
//! show (each stage kind's `Kind::shows` and the driver's `DRIVER_SHOWS`,
//! so a new one cannot go unchecked) out of the binary, with and without
//! `response_errors`; and authentik's example responses (`responses/`)
//! are posted to the stages flowgate has, and taken.
//!
//! The validator covers what these schemas use: `$ref`, `type`,
//! `nullable`, `properties`, `required`, `items`, `enum`, `allOf`,
//! `oneOf` with a discriminator, `additionalProperties` schemas. Keys the
//! schema does not list are allowed (OpenAPI's default).

mod common;

use std::collections::BTreeSet;

use common::totp::{base32, key_of_uri, totp_now, wrong_code};
use common::*;
use flowgate::engine::stage::{StageConfig, DRIVER_SHOWS, KINDS};
use flowgate::engine::stages::prompt::TYPES as PROMPT_TYPES;
use serde_json::{json, Map, Value};

const TOTP_KEY: &[u8] = b"schema-totp-key-0123";

fn schemas() -> Value {
    let path = fixtures().join("authentik/schema-components.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

struct Validator<'s> {
    schemas: &'s Map<String, Value>,
    problems: Vec<String>,
}

impl Validator<'_> {
    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let name = reference.rsplit('/').next().unwrap();
                self.resolve(&self.schemas[name])
            }
            None => schema,
        }
    }

    fn check(&mut self, at: &str, value: &Value, schema: &Value) {
        let schema = self.resolve(schema).clone();
        if value.is_null() {
            if schema.get("nullable") != Some(&Value::Bool(true)) && schema.get("type").is_some() {
                self.problems
                    .push(format!("{at}: null, and the schema says not nullable"));
            }
            return;
        }
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for part in all {
                self.check(at, value, part);
            }
        }
        if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
            let discriminator = schema.get("discriminator");
            match discriminator {
                Some(d) => {
                    let property = d["propertyName"].as_str().unwrap();
                    let tag = value.get(property).and_then(Value::as_str).unwrap_or("");
                    match d["mapping"].get(tag) {
                        Some(reference) => {
                            let target = json!({"$ref": reference});
                            self.check(at, value, &target);
                        }
                        None => self
                            .problems
                            .push(format!("{at}: {property} {tag:?} is none of the schema's")),
                    }
                }
                None => {
                    let fits = one.iter().filter(|option| {
                        let mut trial = Validator {
                            schemas: self.schemas,
                            problems: Vec::new(),
                        };
                        trial.check(at, value, option);
                        trial.problems.is_empty()
                    });
                    if fits.count() != 1 {
                        self.problems
                            .push(format!("{at}: not exactly one of oneOf"));
                    }
                }
            }
            return;
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                self.problems
                    .push(format!("{at}: {value} not in {allowed:?}"));
            }
        }
        let kind = schema.get("type").and_then(Value::as_str);
        let fits = match kind {
            Some("object") => value.is_object(),
            Some("array") => value.is_array(),
            Some("string") => value.is_string(),
            Some("integer") => value.is_i64() || value.is_u64(),
            Some("number") => value.is_number(),
            Some("boolean") => value.is_boolean(),
            _ => true,
        };
        if !fits {
            self.problems
                .push(format!("{at}: {value} is not {}", kind.unwrap_or("?")));
            return;
        }
        if let Some(object) = value.as_object() {
            let properties = schema.get("properties").and_then(Value::as_object);
            for required in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !object.contains_key(required) {
                    self.problems
                        .push(format!("{at}.{required}: required, missing"));
                }
            }
            for (key, item) in object {
                let child = format!("{at}.{key}");
                match properties.and_then(|p| p.get(key)) {
                    Some(property) => self.check(&child, item, property),
                    None => {
                        if let Some(extra @ Value::Object(_)) = schema.get("additionalProperties") {
                            self.check(&child, item, extra);
                        }
                    }
                }
            }
        }
        if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
            for (i, item) in array.iter().enumerate() {
                self.check(&format!("{at}[{i}]"), item, items);
            }
        }
    }
}

/// Every problem of `value` against schema `name` in each version.
fn problems(all: &Value, name: &str, value: &Value) -> Vec<String> {
    let mut found = Vec::new();
    for version in ["2026.5", "2026.8.3"] {
        let schemas = all[version].as_object().unwrap();
        let mut validator = Validator {
            schemas,
            problems: Vec::new(),
        };
        validator.check(
            name,
            value,
            &json!({"$ref": format!("#/components/schemas/{name}")}),
        );
        found.extend(
            validator
                .problems
                .into_iter()
                .map(|p| format!("{version}: {p}")),
        );
    }
    found
}

/// The validator itself catches what it must: a missing required key, a
/// wrong type, an unknown component.
#[test]
fn the_validator_refuses_what_the_schema_refuses() {
    let all = schemas();
    let good = json!({"component": "xak-flow-redirect", "to": "/"});
    assert!(problems(&all, "ChallengeTypes", &good).is_empty());
    assert!(!problems(
        &all,
        "ChallengeTypes",
        &json!({"component": "xak-flow-redirect"})
    )
    .is_empty());
    assert!(!problems(
        &all,
        "ChallengeTypes",
        &json!({"component": "xak-flow-redirect", "to": 1})
    )
    .is_empty());
    assert!(!problems(
        &all,
        "ChallengeTypes",
        &json!({"component": "ak-stage-nonsense"})
    )
    .is_empty());
    // 2026.8.3 requires users and is_current; 2026.5 does not know them.
    let old_me = json!({"user": {"pk": 1, "username": "a", "name": "a", "is_active": true,
        "is_superuser": false, "groups": [], "roles": [], "avatar": "", "uid": "u",
        "settings": {}, "system_permissions": []}});
    let found = problems(&all, "SessionUser", &old_me);
    assert!(found.iter().all(|p| p.starts_with("2026.8.3")), "{found:?}");
    assert!(found.iter().any(|p| p.contains("users")), "{found:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_challenge_and_users_me_validate_against_both_schemas() {
    let all = schemas();
    let upstream = Upstream::start().await;
    let config = basic_config(
        &upstream.url(),
        "[stage.closed]\nkind = \"deny\"\nmessage = \"Closed.\"\n\n\
         [[flow]]\nslug = \"closed\"\nstages = [\"closed\"]\n",
    );
    let users = users_file(&[&ALICE, &BOB]).replace(
        "email = \"bob@example.test\"",
        &format!(
            "email = \"bob@example.test\"\ntotp = [\"{}\"]",
            base32(TOTP_KEY)
        ),
    );
    let gate = Flowgate::start(&config, &users);
    let url = |slug: &str| {
        gate.url(&format!(
            "/_flowgate/api/v3/flows/executor/{slug}/?query=next%3D%252F"
        ))
    };
    let mut served: Vec<Value> = Vec::new();
    let client = client();
    let ask = |client: &reqwest::Client, slug: &str, answer: Option<Value>| {
        let client = client.clone();
        let url = url(slug);
        async move {
            let mut response = match answer {
                Some(answer) => client.post(&url).json(&answer).send().await.unwrap(),
                None => client.get(&url).send().await.unwrap(),
            };
            while response.status() == 302 {
                response = client.get(&url).send().await.unwrap();
            }
            response.json::<Value>().await.unwrap()
        }
    };
    // Identification, password (and its error), TOTP, the end.
    served.push(ask(&client, FLOW, None).await);
    served.push(ask(&client, FLOW, Some(json!({"uid_field": "bob"}))).await);
    served.push(ask(&client, FLOW, Some(json!({"password": "wrong"}))).await);
    served.push(ask(&client, FLOW, Some(json!({"password": BOB.password}))).await);
    served.push(ask(&client, FLOW, Some(json!({"code": "000000"}))).await);
    served.push(ask(&client, FLOW, Some(json!({"code": totp_now(TOTP_KEY)}))).await);
    let me = get_json(&client, gate.url("/_flowgate/api/v3/core/users/me/")).await;
    // Denied, and a malformed answer's flow error.
    served.push(ask(&common::client(), "closed", None).await);
    let other = common::client();
    served.push(ask(&other, FLOW, None).await);
    let malformed = other
        .post(url(FLOW))
        .header("content-type", "text/plain")
        .body("nonsense")
        .send()
        .await
        .unwrap();
    served.push(malformed.json().await.unwrap());

    let components: Vec<&str> = served
        .iter()
        .filter_map(|c| c["component"].as_str())
        .collect();
    for expected in [
        "ak-stage-identification",
        "ak-stage-password",
        "ak-stage-authenticator-validate",
        "xak-flow-redirect",
        "ak-stage-access-denied",
        "ak-stage-flow-error",
    ] {
        assert!(
            components.contains(&expected),
            "{expected} not served: {components:?}"
        );
    }
    let mut found = Vec::new();
    for challenge in &served {
        found.extend(problems(&all, "ChallengeTypes", challenge));
    }
    found.extend(problems(&all, "SessionUser", &me));
    assert!(found.is_empty(), "{found:#?}");
}

// ---------------------------------------------------------------------
// Conformance: every component the embedded engine can show, driven out
// of the real binary, against both schemas; and authentik's example
// responses, posted to the stages flowgate has.
// ---------------------------------------------------------------------

/// No device of any kind: the MFA stage lets her through, the `enrol`
/// flow sets one up for her.
const CAROL: TestUser = TestUser {
    username: "carol",
    password: "carol-Secret-Pw1!",
    email: "carol@example.test",
    groups: &[],
    extra: "",
};

/// The user authentik's example responses (`responses/`) are written for,
/// with the password they send.
const AKADMIN: TestUser = TestUser {
    username: "akadmin",
    password: "akadmin-password",
    email: "akadmin@example.test",
    groups: &[],
    extra: "",
};

/// Components of authentik's that flowgate has no stage for: their
/// example responses have nothing to answer them here.
const NOT_IMPLEMENTED: [&str; 4] = [
    "ak-stage-autosubmit",
    "ak-stage-captcha",
    "ak-stage-dummy",
    "xak-flow-frame",
];

/// A stage of every kind in `KINDS`, in flows that show each of them: a
/// prompt with a field of every type flowgate has, and the prompt
/// authentik's example response answers.
fn conformance_config(upstream: &str) -> String {
    let mut fields = String::new();
    for kind in PROMPT_TYPES {
        fields.push_str(&format!(
            "[[stage.every-field.field]]\nkey = \"{}\"\ntype = \"{kind}\"\nlabel = \"A {kind}\"\n\
             placeholder = \"{kind}?\"\nsub_text = \"About {kind}\"\n",
            field_key(kind)
        ));
        match *kind {
            "dropdown" | "radio-button-group" => fields.push_str("choices = [\"a\", \"b\"]\n"),
            "hidden" | "static" | "text_read_only" | "text_area_read_only" => {
                fields.push_str("initial_value = \"fixed\"\n")
            }
            _ => {}
        }
        fields.push('\n');
    }
    let extra = format!(
        r#"
[stage.inline]
kind = "identification"
password = true

[stage.remember]
kind = "user_login"
remember_me_offset = "30d"

[stage.closed]
kind = "deny"
message = "Closed."

[stage.agree]
kind = "consent"
header = "The wiki will see your name."
permissions = ["Your username", "Your email address"]

[stage.to-url]
kind = "redirect"
to = "/elsewhere"

[stage.to-flow]
kind = "redirect"
flow = "inline"

[stage.enrol]
kind = "authenticator_validate"
not_configured_action = "configure"

[stage.every-field]
kind = "prompt"

{fields}
# The fields of authentik's example response (responses/ak-stage-prompt.json).
[stage.authentik-prompt]
kind = "prompt"

[[stage.authentik-prompt.field]]
key = "username_prompt"
type = "username"

[[stage.authentik-prompt.field]]
key = "text_prompt"

[[stage.authentik-prompt.field]]
key = "email_prompt"
type = "email"

[[stage.authentik-prompt.field]]
key = "password_prompt"
type = "password"

[[stage.authentik-prompt.field]]
key = "password2_prompt"
type = "password"

[[stage.authentik-prompt.field]]
key = "number_prompt"
type = "number"

[policy.office]
kind = "network"
cidrs = ["10.0.0.0/8"]

[policy.admins]
kind = "group"
groups = ["admins"]

[[flow]]
slug = "inline"
stages = ["inline", "mfa", "remember"]

[[flow]]
slug = "keep"
stages = ["identification", {{ stage = "password", invalid_response_action = "restart_with_context" }}, "login"]

[[flow]]
slug = "factors"
stages = ["identification", "password", "mfa", "recovery-codes", "mfa", "login"]

[[flow]]
slug = "enrol"
stages = ["identification", "password", "enrol", "login"]

[[flow]]
slug = "closed"
stages = ["closed"]

[[flow]]
slug = "office"
policies = ["office"]
denied_action = "message"
stages = ["identification"]

[[flow]]
slug = "agree"
stages = ["identification", "password", "agree"]

[[flow]]
slug = "profile"
stages = ["identification", "password", "every-field"]

[[flow]]
slug = "authentik-prompt"
stages = ["authentik-prompt"]

[[flow]]
slug = "to-url"
stages = ["identification", "to-url"]

[[flow]]
slug = "to-flow"
stages = ["identification", "to-flow"]

[[flow]]
slug = "bye"
designation = "invalidation"
stages = ["logout"]

[[route]]
host = "*"
path_prefix = "/admin"
upstream = "{upstream}"
flow = "{FLOW}"
policies = ["admins"]

[[route]]
host = "*"
path_prefix = "/inline"
upstream = "{upstream}"
flow = "inline"
"#
    );
    basic_config(upstream, &extra)
}

fn field_key(kind: &str) -> String {
    format!("f_{}", kind.replace('-', "_"))
}

/// The users of the conformance flows: bob with a TOTP device in the
/// users file.
fn conformance_users() -> String {
    users_file(&[&ALICE, &BOB, &CAROL, &AKADMIN]).replace(
        "email = \"bob@example.test\"",
        &format!(
            "email = \"bob@example.test\"\ntotp = [\"{}\"]",
            base32(TOTP_KEY)
        ),
    )
}

/// The stage kinds `config` puts in its flows (built-in names resolved),
/// with the stages those may put in the plan (`configuration_stages`).
fn kinds_used(config: &str) -> BTreeSet<&'static str> {
    let config = flowgate::config::from_str(config, "/tmp/flowgate.toml".as_ref(), &|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let stage = |name: &str| {
        config
            .stages
            .get(name)
            .cloned()
            .or_else(|| StageConfig::builtin(name))
            .unwrap_or_else(|| panic!("no stage {name}"))
    };
    let mut used = BTreeSet::new();
    for flow in &config.flows {
        for binding in &flow.stages {
            let planned = stage(&binding.stage);
            used.insert(planned.kind);
            for inserted in planned.stage.stages_named() {
                used.insert(stage(inserted).kind);
            }
        }
    }
    used
}

/// What the binary served, each with where it came from.
#[derive(Default)]
struct Served(Vec<(String, Value)>);

impl Served {
    fn keep(&mut self, what: &str, challenge: Value) -> Value {
        self.0.push((what.to_owned(), challenge.clone()));
        challenge
    }
}

fn errors_of(challenge: &Value, field: &str) -> String {
    challenge["response_errors"][field][0]["string"]
        .as_str()
        .unwrap_or_else(|| panic!("no response_errors.{field}: {challenge}"))
        .to_owned()
}

/// Identification and password for `user` in `flow`: the challenge after.
async fn past_password(served: &mut Served, flow: &JsonFlow, user: &TestUser) -> Value {
    let first = served.keep("identification", flow.get().await);
    assert_eq!(first["component"], "ak-stage-identification", "{first}");
    let password = served.keep(
        "password",
        flow.post(json!({"uid_field": user.username})).await,
    );
    assert_eq!(password["component"], "ak-stage-password", "{password}");
    flow.post(json!({"password": user.password})).await
}

#[tokio::test(flavor = "multi_thread")]
async fn every_component_the_engine_shows_validates_against_both_schemas() {
    let all = schemas();
    let upstream = Upstream::start().await;
    let config = conformance_config(&upstream.url());
    let gate = Flowgate::start(&config, &conformance_users());
    let base = gate.url("");
    let mut served = Served::default();

    // Identification without and with the password on it, and the
    // inline password refused.
    let plain = JsonFlow::new(&base, FLOW, "/");
    let shown = served.keep("identification", plain.get().await);
    assert_eq!(shown["password_fields"], false, "{shown}");
    let inline = JsonFlow::new(&base, "inline", "/");
    let shown = served.keep("identification with password", inline.get().await);
    assert_eq!(shown["password_fields"], true, "{shown}");
    let refused = served.keep(
        "identification, wrong password",
        inline
            .post(json!({"uid_field": "alice", "password": "wrong"}))
            .await,
    );
    assert_eq!(
        errors_of(&refused, "non_field_errors"),
        "Failed to authenticate."
    );
    // User login with "remember me", a malformed answer, then yes.
    let login = served.keep(
        "user login",
        inline
            .post(json!({"uid_field": "alice", "password": ALICE.password}))
            .await,
    );
    assert_eq!(login["component"], "ak-stage-user-login", "{login}");
    let bad = served.keep(
        "user login, not a boolean",
        inline.post(json!({"remember_me": "yes"})).await,
    );
    assert_eq!(errors_of(&bad, "remember_me"), "Must be a valid boolean.");
    let done = served.keep(
        "end of flow",
        inline.post(json!({"remember_me": true})).await,
    );
    assert_eq!(done, json!({"component": "xak-flow-redirect", "to": "/"}));

    // A wrong password, then one that restarts the flow keeping the name.
    let keep = JsonFlow::new(&base, "keep", "/");
    keep.get().await;
    keep.post(json!({"uid_field": "alice"})).await;
    let again = served.keep(
        "identification with pending_user_identifier",
        keep.post(json!({"password": "wrong"})).await,
    );
    assert_eq!(again["pending_user_identifier"], "alice", "{again}");
    let wrong = JsonFlow::new(&base, FLOW, "/");
    wrong.get().await;
    wrong.post(json!({"uid_field": "bob"})).await;
    let refused = served.keep(
        "password, wrong",
        wrong.post(json!({"password": "wrong"})).await,
    );
    assert_eq!(errors_of(&refused, "password"), "Invalid password");

    // Recovery codes made in the flow (once a second factor is given:
    // bob has a TOTP device), then both device classes offered.
    let factors = JsonFlow::new(&base, "factors", "/");
    let first = past_password(&mut served, &factors, &BOB).await;
    assert_eq!(
        first["component"], "ak-stage-authenticator-validate",
        "{first}"
    );
    let codes = factors.post(json!({"code": totp_now(TOTP_KEY)})).await;
    let codes = served.keep("authenticator static", codes);
    assert_eq!(
        codes["component"], "ak-stage-authenticator-static",
        "{codes}"
    );
    assert_eq!(codes["codes"].as_array().map(Vec::len), Some(8), "{codes}");
    let validate = served.keep("authenticator validate", factors.post(json!({})).await);
    let classes: Vec<&str> = validate["device_challenges"]
        .as_array()
        .unwrap_or_else(|| panic!("{validate}"))
        .iter()
        .filter_map(|d| d["device_class"].as_str())
        .collect();
    assert_eq!(classes, ["totp", "static"], "{validate}");
    let refused = served.keep(
        "authenticator validate, wrong code",
        factors.post(json!({"code": wrong_code(TOTP_KEY)})).await,
    );
    assert!(refused["response_errors"]["code"].is_array(), "{refused}");
    let recovery = codes["codes"][0].as_str().unwrap().to_owned();
    let done = served.keep(
        "end of flow after a second factor",
        factors.post(json!({"code": recovery})).await,
    );
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");

    // TOTP set up where the MFA stage finds no device.
    let enrol = JsonFlow::new(&base, "enrol", "/");
    let setup = past_password(&mut served, &enrol, &CAROL).await;
    let setup = served.keep("authenticator totp", setup);
    assert_eq!(setup["component"], "ak-stage-authenticator-totp", "{setup}");
    let key = key_of_uri(setup["config_url"].as_str().unwrap());
    let refused = served.keep(
        "authenticator totp, wrong code",
        enrol.post(json!({"code": wrong_code(&key)})).await,
    );
    assert_eq!(errors_of(&refused, "code"), "Code does not match");
    let done = enrol.post(json!({"code": totp_now(&key)})).await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");

    // Consent, a stale token, then the one shown.
    let agree = JsonFlow::new(&base, "agree", "/");
    let asked = past_password(&mut served, &agree, &ALICE).await;
    let asked = served.keep("consent", asked);
    assert_eq!(asked["component"], "ak-stage-consent", "{asked}");
    assert_eq!(asked["permissions"][1]["id"], "Your email address");
    let stale = served.keep(
        "consent, stale token",
        agree.post(json!({"token": "stale"})).await,
    );
    assert_eq!(
        errors_of(&stale, "token"),
        "Invalid consent token, re-showing prompt"
    );
    let done = agree.post(json!({"token": stale["token"].clone()})).await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");

    // A prompt with a field of every type, refused, then answered.
    let profile = JsonFlow::new(&base, "profile", "/");
    let prompt = past_password(&mut served, &profile, &ALICE).await;
    let prompt = served.keep("prompt", prompt);
    assert_eq!(prompt["component"], "ak-stage-prompt", "{prompt}");
    let types: Vec<&str> = prompt["fields"]
        .as_array()
        .unwrap_or_else(|| panic!("{prompt}"))
        .iter()
        .filter_map(|f| f["type"].as_str())
        .collect();
    assert_eq!(types, PROMPT_TYPES, "a field of every type flowgate has");
    let bad = served.keep(
        "prompt, invalid answers",
        profile
            .post(json!({
                field_key("email"): "not-an-address",
                field_key("number"): "many",
                field_key("dropdown"): "z",
            }))
            .await,
    );
    assert_eq!(
        errors_of(&bad, &field_key("email")),
        "Enter a valid email address."
    );
    assert_eq!(
        errors_of(&bad, &field_key("text")),
        "This field is required."
    );
    assert_eq!(
        errors_of(&bad, &field_key("dropdown")),
        "Select a valid choice."
    );
    let mut answers = Map::new();
    for kind in PROMPT_TYPES {
        let value = match *kind {
            "email" => json!("new@example.test"),
            "number" => json!(7),
            "checkbox" => json!(true),
            "dropdown" | "radio-button-group" => json!("b"),
            "username" => json!("newcomer"),
            "date" => json!("2026-01-31"),
            "date-time" => json!("2026-01-31T12:00"),
            _ => json!("typed"),
        };
        answers.insert(field_key(kind), value);
    }
    let done = served.keep(
        "end of a prompt flow",
        profile.post(Value::Object(answers)).await,
    );
    assert_eq!(done, json!({"component": "xak-flow-redirect", "to": "/"}));

    // Redirect stages: to a URL, to another flow; an invalidation flow.
    let to_url = JsonFlow::new(&base, "to-url", "/");
    to_url.get().await;
    let done = served.keep(
        "redirect stage to a URL",
        to_url.post(json!({"uid_field": "alice"})).await,
    );
    assert_eq!(done["to"], "/elsewhere", "{done}");
    let to_flow = JsonFlow::new(&base, "to-flow", "/after");
    to_flow.get().await;
    let done = served.keep(
        "redirect stage to a flow",
        to_flow.post(json!({"uid_field": "alice"})).await,
    );
    assert_eq!(
        done["to"], "/_flowgate/flow/inline/?next=%2Fafter",
        "{done}"
    );
    let bye = JsonFlow::new(&base, "bye", "/");
    let done = served.keep("invalidation flow", bye.get().await);
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");

    // Refusals: a deny stage, a flow's policy, a `next` not allowed, and
    // a route's policy (a 403 answered as GenericError, not a challenge).
    let denied = served.keep(
        "deny stage",
        JsonFlow::new(&base, "closed", "/").get().await,
    );
    assert_eq!(denied["error_message"], "Closed.", "{denied}");
    let denied = served.keep(
        "flow policy",
        JsonFlow::new(&base, "office", "/").get().await,
    );
    assert_eq!(
        denied["error_message"], "Flow does not apply to current user.",
        "{denied}"
    );
    let evil = JsonFlow::new(&base, FLOW, "https://evil.example/");
    let denied = past_password(&mut served, &evil, &ALICE).await;
    let denied = served.keep("next not allowed", denied);
    assert_eq!(denied["error_message"], "Invalid next URL", "{denied}");
    let (akadmin, _) = signed_in(&gate, &AKADMIN).await;
    let forbidden = akadmin
        .get(gate.url("/admin/"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let forbidden: Value = forbidden.json().await.unwrap();
    let found = problems(&all, "GenericError", &forbidden);
    assert!(found.is_empty(), "route 403 {forbidden}: {found:#?}");

    // A malformed answer: the flow error.
    let malformed = plain
        .client
        .post(&plain.url)
        .header("content-type", "text/plain")
        .body("nonsense")
        .send()
        .await
        .unwrap();
    served.keep("malformed answer", malformed.json().await.unwrap());

    // Every challenge against both schemas.
    let mut found = Vec::new();
    for (what, challenge) in &served.0 {
        for problem in problems(&all, "ChallengeTypes", challenge) {
            found.push(format!("{what}: {problem}\n  {challenge}"));
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));

    // And every component the engine can show was among them, with
    // errors too where a stage re-renders: the registry says which.
    let seen: BTreeSet<&str> = served
        .0
        .iter()
        .filter_map(|(_, c)| c["component"].as_str())
        .collect();
    let can_show: BTreeSet<&str> = KINDS
        .iter()
        .flat_map(|k| k.shows.iter().copied())
        .chain(DRIVER_SHOWS.iter().copied())
        .collect();
    assert_eq!(seen, can_show, "served vs what the registry says can be");
    let with_errors: BTreeSet<&str> = served
        .0
        .iter()
        .filter(|(_, c)| c.get("response_errors").is_some())
        .filter_map(|(_, c)| c["component"].as_str())
        .collect();
    let reanswerable: BTreeSet<&str> = KINDS
        .iter()
        .flat_map(|k| k.shows.iter().copied())
        // Any answer to the recovery codes goes on.
        .filter(|c| *c != "ak-stage-authenticator-static")
        .collect();
    assert_eq!(with_errors, reanswerable, "re-rendered with errors");
    let registered: BTreeSet<&str> = KINDS.iter().map(|k| k.name).collect();
    assert_eq!(
        kinds_used(&config),
        registered,
        "a stage of every kind in the flows above"
    );
}

fn fixture(name: &str) -> Value {
    let path = fixtures().join("authentik").join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// The answer was taken: the flow is past `stage`, with no errors.
fn moved_on(stage: &str, after: &Value) {
    assert!(
        after.get("response_errors").is_none(),
        "{stage}'s example refused: {after}"
    );
    assert_ne!(after["component"], stage, "{stage} shown again: {after}");
    assert_ne!(after["component"], "ak-stage-flow-error", "{after}");
    assert_ne!(after["component"], "ak-stage-access-denied", "{after}");
}

/// authentik's example response bodies (`responses/`), posted to the
/// matching stage of a real flow, are taken; the examples of authentik's
/// refusals (`variants/*response-errors*`, `invalid-next`) are what
/// flowgate answers to the same mistakes, word for word.
#[tokio::test(flavor = "multi_thread")]
async fn authentiks_example_responses_are_accepted_by_the_stages_flowgate_has() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&conformance_config(&upstream.url()), &conformance_users());
    let base = gate.url("");
    let mut posted: BTreeSet<String> = BTreeSet::new();
    let mut example = |component: &str| {
        posted.insert(component.to_owned());
        fixture(&format!("responses/{component}.json"))
    };
    let mut compared: BTreeSet<String> = BTreeSet::new();
    let mut variant = |name: &str| {
        compared.insert(name.to_owned());
        fixture(&format!("variants/{name}"))
    };
    let mut served = Served::default();

    // Identification with the password on it, then user login with
    // remember me: both as written.
    let inline = JsonFlow::new(&base, "inline", "/");
    inline.get().await;
    let after = inline.post(example("ak-stage-identification")).await;
    moved_on("ak-stage-identification", &after);
    assert_eq!(after["component"], "ak-stage-user-login", "{after}");
    let after = inline.post(example("ak-stage-user-login")).await;
    moved_on("ak-stage-user-login", &after);
    assert_eq!(after, json!({"component": "xak-flow-redirect", "to": "/"}));
    assert_eq!(
        api_status(&inline.client, gate.url("/inline/")).await,
        200,
        "akadmin is signed in, through this flow"
    );

    // Password, as written; and authentik's refusal of a wrong one.
    let login = JsonFlow::new(&base, FLOW, "/");
    login.get().await;
    login.post(json!({"uid_field": "akadmin"})).await;
    let refused = login.post(json!({"password": "wrong"})).await;
    let expected = variant("ak-stage-password.response-errors.json");
    assert_eq!(refused["response_errors"], expected["response_errors"]);
    assert_eq!(refused["pending_user"], expected["pending_user"]);
    let after = login.post(example("ak-stage-password")).await;
    moved_on("ak-stage-password", &after);
    assert_eq!(after["component"], "xak-flow-redirect", "{after}");

    // authentik's refusal of an inline password.
    let inline = JsonFlow::new(&base, "inline", "/");
    inline.get().await;
    let refused = inline
        .post(json!({"uid_field": "akadmin", "password": "wrong"}))
        .await;
    let expected = variant("ak-stage-identification.response-errors.json");
    assert_eq!(refused["response_errors"], expected["response_errors"]);

    // TOTP setup: the example's code is no code of a new secret's, so
    // the live one replaces it.
    let enrol = JsonFlow::new(&base, "enrol", "/");
    let setup = past_password(&mut served, &enrol, &CAROL).await;
    let key = key_of_uri(setup["config_url"].as_str().unwrap());
    let mut answer = example("ak-stage-authenticator-totp");
    answer["code"] = json!(totp_now(&key));
    let after = enrol.post(answer).await;
    moved_on("ak-stage-authenticator-totp", &after);
    assert_eq!(after["component"], "xak-flow-redirect", "{after}");

    // Second factor: likewise a live code from bob's device.
    let mfa = JsonFlow::new(&base, FLOW, "/");
    let asked = past_password(&mut served, &mfa, &BOB).await;
    assert_eq!(asked["component"], "ak-stage-authenticator-validate");
    let mut answer = example("ak-stage-authenticator-validate");
    answer["code"] = json!(totp_now(TOTP_KEY));
    let after = mfa.post(answer).await;
    moved_on("ak-stage-authenticator-validate", &after);
    assert_eq!(after["component"], "xak-flow-redirect", "{after}");

    // Consent: the example's token, as written, is a stale one here, and
    // flowgate refuses it as authentik's refusal example does; with the
    // live token in its place it is taken.
    let agree = JsonFlow::new(&base, "agree", "/");
    past_password(&mut served, &agree, &AKADMIN).await;
    let mut answer = example("ak-stage-consent");
    let refused = agree.post(answer.clone()).await;
    let expected = variant("ak-stage-consent.response-errors.json");
    assert_eq!(refused["component"], expected["component"]);
    assert_eq!(refused["response_errors"], expected["response_errors"]);
    answer["token"] = refused["token"].clone();
    let after = agree.post(answer).await;
    moved_on("ak-stage-consent", &after);
    assert_eq!(after["component"], "xak-flow-redirect", "{after}");

    // Prompt, as written, to a stage with the example's fields.
    let prompt = JsonFlow::new(&base, "authentik-prompt", "/");
    assert_eq!(prompt.get().await["component"], "ak-stage-prompt");
    let after = prompt.post(example("ak-stage-prompt")).await;
    moved_on("ak-stage-prompt", &after);
    assert_eq!(after, json!({"component": "xak-flow-redirect", "to": "/"}));

    // A redirect stage's own answer, as written, posted while it is the
    // head of the plan (the raw 302 not followed): the flow ends there.
    let to_url = JsonFlow::new(&base, "to-url", "/");
    to_url.get().await;
    let moved = to_url
        .client
        .post(&to_url.url)
        .json(&json!({"uid_field": "akadmin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(moved.status(), 302);
    let after = to_url.post(example("xak-flow-redirect")).await;
    assert_eq!(
        after,
        json!({"component": "xak-flow-redirect", "to": "/elsewhere"})
    );

    // authentik's refusal of a `next` it may not follow.
    let evil = JsonFlow::new(&base, FLOW, "https://evil.example/");
    let denied = past_password(&mut served, &evil, &AKADMIN).await;
    let expected = variant("ak-stage-access-denied.invalid-next.json");
    assert_eq!(denied["component"], expected["component"]);
    assert_eq!(denied["error_message"], expected["error_message"]);

    // Every example is accounted for: posted above, or for a component
    // flowgate has no stage for (and does not show).
    let mut examples = BTreeSet::new();
    for entry in std::fs::read_dir(fixtures().join("authentik/responses")).unwrap() {
        let path = entry.unwrap().path();
        let body: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        examples.insert(body["component"].as_str().unwrap().to_owned());
    }
    let shown: BTreeSet<&str> = KINDS.iter().flat_map(|k| k.shows.iter().copied()).collect();
    for component in NOT_IMPLEMENTED {
        assert!(
            !shown.contains(component),
            "flowgate shows {component} now: post its example response too"
        );
    }
    let accounted: BTreeSet<String> = posted
        .iter()
        .cloned()
        .chain(NOT_IMPLEMENTED.iter().map(|c| (*c).to_owned()))
        .collect();
    assert_eq!(examples, accounted, "responses/ vs what this test posts");

    // And every variant: compared above, or about what flowgate lacks.
    let not_here = [
        // Duo, SMS and WebAuthn devices, and passkeys: flowgate has none.
        "ak-stage-authenticator-validate.duo.response.json",
        "ak-stage-authenticator-validate.select-sms.response.json",
        "ak-stage-authenticator-validate.webauthn-error.json",
        "ak-stage-identification.passkey.response.json",
        // flowgate shows a failure's cause to nobody, superusers included.
        "ak-stage-flow-error.superuser.json",
        // The proxy outpost's callback, not the end of an engine flow.
        "xak-flow-redirect.oauth-callback.json",
    ];
    let variants: BTreeSet<String> = std::fs::read_dir(fixtures().join("authentik/variants"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let accounted: BTreeSet<String> = compared
        .iter()
        .cloned()
        .chain(not_here.iter().map(|n| (*n).to_owned()))
        .collect();
    assert_eq!(variants, accounted, "variants/ vs what this test compares");
}
