//! What flowgate's executor API serves validates against authentik's own
//! OpenAPI schemas, 2026.5 (`schema.yml`) and 2026.8.3
//! (`schema-2026.8.3.yml`): every challenge against `ChallengeTypes` (by
//! its `component`, as the schema's discriminator says), and `users/me`
//! against `SessionUser`. The schemas' component sections reachable from
//! those two are in `schema-components.json` (made from the YAML files
//! with `yaml.safe_load`; the YAML is kept beside it).
//!
//! The validator covers what these schemas use: `$ref`, `type`,
//! `nullable`, `properties`, `required`, `items`, `enum`, `allOf`,
//! `oneOf` with a discriminator, `additionalProperties` schemas. Keys the
//! schema does not list are allowed (OpenAPI's default).

mod common;

use common::totp::{base32, totp_now};
use common::*;
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
