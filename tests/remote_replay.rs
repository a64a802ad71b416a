//! flowgate's remote executor against authentik itself, as recorded: a
//! replay server plays back `tests/fixtures/authentik/transcripts/` (raw
//! 302s with relative `Location`s, session cookies rotated at login, the
//! TOTP stage, denials, exhausted password attempts) to a flowgate with
//! `executor.kind = "remote"`, and a client drives that flowgate's JSON API
//! with the recorded answers. flowgate must send exactly the recorded
//! requests, in order, and its client must see what authentik's saw.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::raw::{Reply, Scripted, Seen};
use common::*;
use serde_json::Value;

/// One recorded exchange.
#[derive(Clone)]
struct Step {
    method: String,
    path: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
    request_body: Value,
}

fn transcript(name: &str) -> Vec<Step> {
    let path = fixtures().join(format!("authentik/transcripts/{name}.json"));
    let steps: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    steps
        .into_iter()
        .map(|step| {
            let mut headers = Vec::new();
            if let Some(map) = step["response_headers_of_interest"].as_object() {
                for (name, value) in map {
                    match value {
                        Value::Array(values) => headers.extend(
                            values
                                .iter()
                                .filter_map(Value::as_str)
                                .map(|v| (name.clone(), v.to_owned())),
                        ),
                        Value::String(v) => headers.push((name.clone(), v.clone())),
                        _ => {}
                    }
                }
            }
            Step {
                method: step["method"].as_str().unwrap().to_owned(),
                path: step["path"].as_str().unwrap().to_owned(),
                status: step["status"].as_u64().unwrap() as u16,
                headers,
                body: step["response_body"].clone(),
                request_body: step["request_body"].clone(),
            }
        })
        .collect()
}

/// Where the replay stands.
#[derive(Default)]
struct Cursor {
    next: usize,
    /// The last GET served: asked again (a login page shown from a state
    /// never stored is asked again before its first answer), it is served
    /// again.
    last_get: Option<usize>,
    unexpected: Vec<String>,
}

fn raw_answer(step: &Step) -> Vec<u8> {
    let body = match &step.body {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut head = format!("HTTP/1.1 {} Recorded\r\n", step.status);
    for (name, value) in &step.headers {
        if name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

fn replay(steps: Vec<Step>) -> (Scripted, Arc<Mutex<Cursor>>) {
    replay_with(steps, Vec::new())
}

/// `replay`, with `side` answers served whenever their path is asked,
/// outside the recorded order.
fn replay_with(steps: Vec<Step>, side: Vec<Step>) -> (Scripted, Arc<Mutex<Cursor>>) {
    let cursor = Arc::new(Mutex::new(Cursor::default()));
    let state = cursor.clone();
    let server = Scripted::start(move |seen: &Seen| {
        let mut cursor = state.lock().unwrap();
        let (method, target) = (seen.method().to_owned(), seen.target().to_owned());
        if let Some(step) = side.iter().find(|s| s.method == method && s.path == target) {
            return Reply::keep(raw_answer(step));
        }
        let at = cursor.next;
        if let Some(step) = steps
            .get(at)
            .filter(|s| s.method == method && s.path == target)
        {
            cursor.next += 1;
            if method == "GET" {
                cursor.last_get = Some(at);
            }
            return Reply::keep(raw_answer(step));
        }
        if let Some(i) = cursor
            .last_get
            .filter(|&i| method == "GET" && steps[i].path == target)
        {
            return Reply::keep(raw_answer(&steps[i]));
        }
        let expected = steps
            .get(at)
            .map_or("nothing".to_owned(), |s| format!("{} {}", s.method, s.path));
        cursor
            .unexpected
            .push(format!("{method} {target} (expected {expected})"));
        Reply::keep(
            b"HTTP/1.1 500 Unexpected\r\ncontent-type: text/plain\r\ncontent-length: 10\r\n\r\nunexpected"
                .to_vec(),
        )
    });
    (server, cursor)
}

/// flowgate in front of an app, its flows run by the replay server.
fn gateway_for(remote: &Scripted, slug: &str) -> Flowgate {
    gateway_with(
        remote,
        &format!("[[route]]\nupstream = \"http://127.0.0.1:9\"\nflow = \"{slug}\"\n"),
    )
}

fn gateway_with(remote: &Scripted, routes: &str) -> Flowgate {
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[session]
secret = "replay-secret-replay-secret-replay-secret-0123"

[executor]
kind = "remote"
url = "{}"

{routes}
"#,
        remote.url()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("flowgate.toml"), config).unwrap();
    Flowgate::start_in(dir)
}

/// What a client is shown of an answer: its component, errors or not,
/// where a redirect goes.
fn shown(answer: &Value) -> String {
    let component = answer["component"].as_str().unwrap_or("?");
    let errors = match answer.get("response_errors") {
        Some(Value::Object(map)) if !map.is_empty() => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            format!(" errors={keys:?}")
        }
        _ => String::new(),
    };
    let to = answer["to"]
        .as_str()
        .map(|to| format!(" to={to}"))
        .unwrap_or_default();
    format!("{component}{errors}{to}")
}

/// Play `name` back: the client sends what authentik's client sent (the
/// first GET, every POST) to flowgate, which must pass them on (and follow
/// the redirects) exactly as recorded; after each, the client must be
/// shown what authentik's client was shown next.
async fn play(name: &str, slug: &str) -> (Flowgate, reqwest::Client) {
    let steps = transcript(name);
    let (remote, cursor) = replay(steps.clone());
    let gate = gateway_for(&remote, slug);
    let client = play_on(name, &steps, &gate, &cursor).await;
    drop(remote);
    (gate, client)
}

async fn play_on(
    name: &str,
    steps: &[Step],
    gate: &Flowgate,
    cursor: &Mutex<Cursor>,
) -> reqwest::Client {
    let client = client();
    let executor_path = steps[0].path.clone();
    let url = gate.url(&format!("/_flowgate{executor_path}"));
    let mut i = 0;
    while i < steps.len() {
        let step = &steps[i];
        if !step.path.starts_with("/api/v3/flows/executor/") {
            i += 1;
            continue;
        }
        let answer: Value = match step.method.as_str() {
            "GET" => client.get(&url).send().await.unwrap().json().await.unwrap(),
            _ => {
                let mut response = client
                    .post(&url)
                    .json(&step.request_body)
                    .send()
                    .await
                    .unwrap();
                // flowgate answers a passed stage as authentik does: a 302
                // to itself, to be asked again.
                while response.status() == 302 {
                    response = client.get(&url).send().await.unwrap();
                }
                response.json().await.unwrap()
            }
        };
        // What authentik's client was shown: the next 200 of the executor.
        let mut j = i;
        while j < steps.len() && !(steps[j].status == 200 && steps[j].body.is_object()) {
            j += 1;
        }
        assert!(j < steps.len(), "{name}: no answer recorded after step {i}");
        assert_eq!(
            shown(&answer),
            shown(&steps[j].body),
            "{name}: step {i} ({} {}): {answer}",
            step.method,
            step.path
        );
        i = j + 1;
        // A login ends with users/me, which flowgate asks itself.
        while i < steps.len() && !steps[i].path.starts_with("/api/v3/flows/executor/") {
            i += 1;
        }
        if shown(&steps[j].body).starts_with("xak-flow-redirect") {
            break;
        }
    }
    let cursor = cursor.lock().unwrap();
    assert!(
        cursor.unexpected.is_empty(),
        "{name}: requests the recording does not have: {:?}\n{}",
        cursor.unexpected,
        gate.log()
    );
    client
}

async fn signed_in_as(gate: &Flowgate, client: &reqwest::Client) -> Option<String> {
    let me = client
        .get(gate.url("/_flowgate/api/v3/core/users/me/"))
        .send()
        .await
        .unwrap();
    if me.status() != 200 {
        return None;
    }
    let me: Value = me.json().await.unwrap();
    me["user"]["username"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recorded_login_completes_and_the_recorded_user_is_signed_in() {
    let (gate, client) = play("login_success", FLOW).await;
    assert_eq!(
        signed_in_as(&gate, &client).await.as_deref(),
        Some("akadmin")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recorded_wrong_password_shows_the_error_then_the_login_completes() {
    let (gate, client) = play("wrong_password_then_success", FLOW).await;
    assert!(signed_in_as(&gate, &client).await.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recorded_totp_login_completes() {
    let (gate, client) = play("totp_authenticator_validate", FLOW).await;
    assert_eq!(
        signed_in_as(&gate, &client).await.as_deref(),
        Some("fixture-totp")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn recorded_failures_fail_as_recorded_and_sign_nobody_in() {
    for name in [
        "unknown_user",
        "disabled_user",
        "password_attempts_exhausted",
        "absolute_next_rejected",
    ] {
        let (gate, client) = play(name, FLOW).await;
        assert_eq!(signed_in_as(&gate, &client).await, None, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recorded_deny_flow_is_denied() {
    let steps = transcript("deny_flow");
    let slug = steps[0]
        .path
        .trim_start_matches("/api/v3/flows/executor/")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let (gate, client) = play("deny_flow", &slug).await;
    assert_eq!(signed_in_as(&gate, &client).await, None);
}

/// A 2022-era server (challenges with a top-level `type`, users/me without
/// `roles`, `type` or `system_permissions`): the same login completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_2022_server_is_driven_as_well() {
    let legacy = |name: &str| -> Value {
        let path = fixtures().join(format!("authentik/legacy-2022/challenges/{name}.json"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let executor = format!("/api/v3/flows/executor/{FLOW}/?query=next%3D%252F");
    let cookie = (
        "set-cookie".to_owned(),
        "authentik_session=legacy; Path=/; HttpOnly".to_owned(),
    );
    let json = ("content-type".to_owned(), "application/json".to_owned());
    let step = |method: &str, path: &str, status: u16, body: Value, request: Value| Step {
        method: method.to_owned(),
        path: path.to_owned(),
        status,
        headers: match status {
            302 => vec![cookie.clone(), ("location".to_owned(), path.to_owned())],
            _ => vec![cookie.clone(), json.clone()],
        },
        body,
        request_body: request,
    };
    let me = serde_json::json!({"user": {
        "pk": 1, "username": "akadmin", "name": "authentik Default Admin",
        "is_active": true, "is_superuser": true,
        "groups": [{"name": "authentik Admins", "pk": "0e1c0a7d-0000-0000-0000-000000000000"}],
        "email": "root@localhost", "avatar": "/static/dist/assets/images/user_default.png",
        "uid": "abc", "settings": {}
    }});
    let steps = vec![
        step(
            "GET",
            &executor,
            200,
            legacy("ak-stage-identification"),
            Value::Null,
        ),
        step(
            "POST",
            &executor,
            302,
            Value::Null,
            serde_json::json!({"uid_field": "akadmin"}),
        ),
        step(
            "GET",
            &executor,
            200,
            legacy("ak-stage-password"),
            Value::Null,
        ),
        step(
            "POST",
            &executor,
            302,
            Value::Null,
            serde_json::json!({"password": "pw"}),
        ),
        step(
            "GET",
            &executor,
            200,
            legacy("xak-flow-redirect"),
            Value::Null,
        ),
        step("GET", "/api/v3/core/users/me/", 200, me, Value::Null),
    ];
    let (remote, cursor) = replay(steps.clone());
    let gate = gateway_for(&remote, FLOW);
    let client = client();
    let url = gate.url(&format!("/_flowgate{executor}"));
    let first: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(first["component"], "ak-stage-identification", "{first}");
    for (answer, shown_next) in [
        (&steps[1].request_body, "ak-stage-password"),
        (&steps[3].request_body, "xak-flow-redirect"),
    ] {
        let mut response = client.post(&url).json(answer).send().await.unwrap();
        while response.status() == 302 {
            response = client.get(&url).send().await.unwrap();
        }
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["component"], shown_next, "{body}");
    }
    assert!(cursor.lock().unwrap().unexpected.is_empty());
    assert_eq!(
        signed_in_as(&gate, &client).await.as_deref(),
        Some("akadmin")
    );
    let echo_groups = client
        .get(gate.url("/_flowgate/api/v3/core/users/me/"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(echo_groups["user"]["groups"][0]["name"], "authentik Admins");
}

/// A route naming an authentik application is decided by that
/// application's policies too (`check_access`, asked at login): refused,
/// the user gets the access-denied page, not a login loop.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_with_an_authentik_application_follows_its_policy() {
    let upstream = Upstream::start().await;
    let steps = transcript("login_success");
    let check = |app: &str, passing: bool| Step {
        method: "GET".into(),
        path: format!("/api/v3/core/applications/{app}/check_access/"),
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::json!({"passing": passing, "messages": []}),
        request_body: Value::Null,
    };
    let (remote, cursor) = replay_with(
        steps.clone(),
        vec![check("wiki", true), check("billing", false)],
    );
    let routes = format!(
        "[[route]]\npath_prefix = \"/billing\"\nupstream = \"{u}\"\nauthentik_application = \"billing\"\n\n\
         [[route]]\npath_prefix = \"/wiki\"\nupstream = \"{u}\"\nauthentik_application = \"wiki\"\n\n\
         [[route]]\nupstream = \"{u}\"\n",
        u = upstream.url()
    );
    let gate = gateway_with(&remote, &routes);
    let client = play_on("login_success", &steps, &gate, &cursor).await;
    let status = |path: &'static str| {
        let client = client.clone();
        let url = gate.url(path);
        async move {
            client
                .get(url)
                .header("accept", "text/html")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("/wiki/page").await, 200);
    assert_eq!(
        status("/billing/invoices").await,
        403,
        "billing's policy refuses"
    );
    assert_eq!(status("/other").await, 200);
}

/// The executor path of the made-up exchanges below.
fn executor_path() -> String {
    format!("/api/v3/flows/executor/{FLOW}/?query=next%3D%252Freports")
}

/// One made-up exchange, as authentik answers: JSON, or a 302 to the same
/// path, each with its session cookie.
fn made_up(method: &str, path: &str, status: u16, body: Value, request: Value) -> Step {
    let cookie = (
        "set-cookie".to_owned(),
        "authentik_session=c; Path=/".to_owned(),
    );
    Step {
        method: method.to_owned(),
        path: path.to_owned(),
        status,
        headers: match status {
            302 => vec![cookie, ("location".to_owned(), path.to_owned())],
            _ => vec![
                cookie,
                ("content-type".to_owned(), "application/json".to_owned()),
            ],
        },
        body,
        request_body: request,
    }
}

fn akadmin_me() -> Value {
    serde_json::json!({"user": {"pk": 1, "username": "akadmin", "name": "Admin",
        "is_active": true, "is_superuser": false, "groups": [], "email": "", "avatar": "",
        "uid": "u", "settings": {}}})
}

/// The first login page of `gate`'s flow, its HTML.
async fn first_page(gate: &Flowgate, client: &reqwest::Client) -> String {
    let started = client
        .get(gate.url(&format!("/_flowgate/flow/{FLOW}/?next=%2Freports")))
        .send()
        .await
        .unwrap();
    let page = client
        .get(gate.url(&location(&started)))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200, "{}", gate.log());
    page.text().await.unwrap()
}

/// A consent stage from the remote is shown as a page (what is asked,
/// the remote's token kept in the form) and answered with its token.
#[tokio::test(flavor = "multi_thread")]
async fn a_remote_consent_stage_is_shown_and_answered_on_the_page() {
    let executor = executor_path();
    let step = made_up;
    let consent = serde_json::json!({
        "component": "ak-stage-consent",
        "flow_info": {"title": "Wiki", "cancel_url": "/", "layout": "stacked"},
        "pending_user": "akadmin", "pending_user_avatar": "",
        "header_text": "The wiki <b>asks</b> for:",
        "permissions": [{"id": "profile", "name": "Your profile"}],
        "additional_permissions": [{"id": "email", "name": ""}],
        "token": "consent-token-1"
    });
    let me = akadmin_me();
    let steps = vec![
        step("GET", &executor, 200, consent, Value::Null),
        step("POST", &executor, 302, Value::Null, Value::Null),
        step(
            "GET",
            &executor,
            200,
            serde_json::json!({"component": "xak-flow-redirect", "to": "/reports"}),
            Value::Null,
        ),
        step("GET", "/api/v3/core/users/me/", 200, me, Value::Null),
    ];
    let (remote, cursor) = replay(steps);
    let gate = gateway_for(&remote, FLOW);
    let client = client();
    let started = client
        .get(gate.url(&format!("/_flowgate/flow/{FLOW}/?next=%2Freports")))
        .send()
        .await
        .unwrap();
    let page = client
        .get(gate.url(&location(&started)))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("Your profile"), "{html}");
    assert!(
        html.contains("email"),
        "an unnamed permission by its id: {html}"
    );
    assert!(
        !html.contains("<b>asks</b>"),
        "the remote's text is escaped: {html}"
    );
    assert_eq!(
        input_value(&html, "token").as_deref(),
        Some("consent-token-1")
    );
    let posted = client
        .post(gate.url(&form_action(&html).unwrap()))
        .form(&[
            (
                "csrf_token",
                input_value(&html, "csrf_token").unwrap().as_str(),
            ),
            ("token", "consent-token-1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 303, "{}", gate.log());
    assert_eq!(location(&posted), "/reports");
    let seen = remote.seen();
    let post = seen
        .iter()
        .find(|s| s.method() == "POST")
        .expect("the answer reached the remote");
    let answer: Value = serde_json::from_slice(&post.body).unwrap();
    assert_eq!(answer["token"], "consent-token-1", "{answer}");
    assert!(cursor.lock().unwrap().unexpected.is_empty());
    assert_eq!(
        signed_in_as(&gate, &client).await.as_deref(),
        Some("akadmin")
    );
}

/// A prompt stage from the remote (authentik's recorded one, plus a
/// checkbox, a dropdown and a static text) is a form of its fields; the
/// remote's errors are shown next to their field, and the answer carries
/// every field by its key.
#[tokio::test(flavor = "multi_thread")]
async fn a_remote_prompt_stage_is_a_form_of_its_fields() {
    let executor = executor_path();
    let path = fixtures().join("authentik/challenges/ak-stage-prompt.json");
    let mut prompt: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let extra = serde_json::json!([
        {"field_key": "terms", "label": "I accept the <b>terms</b>", "type": "checkbox",
         "required": true, "placeholder": "", "initial_value": "", "order": 5,
         "sub_text": "", "choices": null},
        {"field_key": "team", "label": "Team", "type": "dropdown", "required": true,
         "placeholder": "", "initial_value": "ops", "order": 6, "sub_text": "Pick one",
         "choices": [{"label": "Developers", "value": "dev"}, {"label": "Operations", "value": "ops"}]},
        {"field_key": "note", "label": "", "type": "static", "required": false,
         "placeholder": "", "initial_value": "<script>alert(1)</script>Welcome", "order": -1,
         "sub_text": "", "choices": null}
    ]);
    prompt["fields"]
        .as_array_mut()
        .unwrap()
        .extend(extra.as_array().unwrap().iter().cloned());
    let mut refused = prompt.clone();
    refused["response_errors"] = serde_json::json!({
        "password2_prompt": [{"string": "Passwords don't match.", "code": "invalid"}],
        "non_field_errors": [{"string": "Please check the form.", "code": "invalid"}]
    });
    let redirect = serde_json::json!({"component": "xak-flow-redirect", "to": "/reports"});
    let steps = vec![
        made_up("GET", &executor, 200, prompt, Value::Null),
        made_up("POST", &executor, 200, refused, Value::Null),
        made_up("POST", &executor, 302, Value::Null, Value::Null),
        made_up("GET", &executor, 200, redirect, Value::Null),
        made_up(
            "GET",
            "/api/v3/core/users/me/",
            200,
            akadmin_me(),
            Value::Null,
        ),
    ];
    let (remote, cursor) = replay(steps);
    let gate = gateway_for(&remote, FLOW);
    let client = client();
    let html = first_page(&gate, &client).await;
    for expected in [
        "USERNAME_LABEL",
        "type=\"email\"",
        "type=\"number\"",
        "name=\"password2_prompt\" type=\"password\"",
        "<option value=\"ops\" selected>Operations</option>",
        "Pick one",
    ] {
        assert!(html.contains(expected), "{expected} in {html}");
    }
    assert_eq!(
        input_value(&html, "hidden_prompt").as_deref(),
        Some("something idk")
    );
    assert_eq!(
        input_value(&html, "username_prompt").as_deref(),
        Some("akuser")
    );
    assert!(
        !html.contains("supersecurepassword"),
        "passwords are not filled in: {html}"
    );
    assert!(
        !html.contains("<script>alert(1)"),
        "the remote's text is escaped: {html}"
    );
    assert!(!html.contains("<b>terms</b>"), "{html}");
    assert!(
        html.find("Welcome").unwrap() < html.find("USERNAME_LABEL").unwrap(),
        "fields in their order: {html}"
    );

    let csrf = input_value(&html, "csrf_token").unwrap();
    let fid = input_value(&html, "fid").unwrap();
    let answer = |password2: &'static str| {
        vec![
            ("csrf_token", csrf.clone()),
            ("fid", fid.clone()),
            ("username_prompt", "newuser".to_owned()),
            ("text_prompt", "hello".to_owned()),
            ("email_prompt", "new@example.test".to_owned()),
            ("password_prompt", "Pw-1-long-enough".to_owned()),
            ("password2_prompt", password2.to_owned()),
            ("number_prompt", "7".to_owned()),
            ("hidden_prompt", "something idk".to_owned()),
            ("terms", "false".to_owned()),
            ("terms", "true".to_owned()),
            ("team", "dev".to_owned()),
        ]
    };
    let action = gate.url(&form_action(&html).unwrap());
    let again = client
        .post(&action)
        .form(&answer("typo"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200, "{}", gate.log());
    let html = again.text().await.unwrap();
    assert!(html.contains("Please check the form."), "{html}");
    let error_at = html
        .find("Passwords don&#x27;t match.")
        .or(html.find("Passwords don't match."))
        .expect(&html);
    let field_at = html.find("name=\"password2_prompt\"").unwrap();
    let next_field = html[field_at..]
        .find("<div class=\"field")
        .map_or(html.len(), |i| field_at + i);
    assert!(
        field_at < error_at && error_at < next_field,
        "the error is shown with its field: {html}"
    );

    let done = client
        .post(gate.url(&form_action(&html).unwrap()))
        .form(&answer("Pw-1-long-enough"))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 303, "{}", gate.log());
    assert_eq!(location(&done), "/reports");
    let posts: Vec<Value> = remote
        .seen()
        .iter()
        .filter(|s| s.method() == "POST")
        .map(|s| serde_json::from_slice(&s.body).unwrap())
        .collect();
    assert_eq!(posts.len(), 2);
    let last = &posts[1];
    for (key, value) in [
        ("username_prompt", "newuser"),
        ("email_prompt", "new@example.test"),
        ("password2_prompt", "Pw-1-long-enough"),
        ("number_prompt", "7"),
        ("hidden_prompt", "something idk"),
        ("terms", "true"),
        ("team", "dev"),
    ] {
        assert_eq!(last[key], value, "{key} in {last}");
    }
    assert!(
        last.get("csrf_token").is_none() && last.get("fid").is_none(),
        "{last}"
    );
    assert!(cursor.lock().unwrap().unexpected.is_empty());
    assert_eq!(
        signed_in_as(&gate, &client).await.as_deref(),
        Some("akadmin")
    );
}

/// An email stage says to follow the link in the message (the flow goes on
/// at the executor); a stage no form can answer names itself and offers a
/// new start; neither is a form.
#[tokio::test(flavor = "multi_thread")]
async fn a_remote_email_stage_says_so_and_an_unknown_stage_names_itself() {
    let executor = executor_path();
    for (fixture, expected) in [
        ("ak-stage-email", "Check your email"),
        (
            "ak-stage-captcha",
            "(ak-stage-captcha) is not supported in the browser",
        ),
    ] {
        let path = fixtures().join(format!("authentik/challenges/{fixture}.json"));
        let body: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let (remote, _cursor) = replay(vec![made_up("GET", &executor, 200, body, Value::Null)]);
        let gate = gateway_for(&remote, FLOW);
        let html = first_page(&gate, &client()).await;
        assert!(html.contains(expected), "{expected} in {html}");
        assert!(!html.contains("<form"), "{html}");
        assert!(html.contains("Start over"), "{html}");
    }
}

/// A remote whose user has an empty name, or control characters where
/// identity headers would carry them, signs nobody in (502), whatever the
/// rest says.
#[tokio::test(flavor = "multi_thread")]
async fn a_remote_user_unfit_for_headers_is_not_signed_in() {
    let executor = executor_path();
    for (username, group) in [
        ("root\r\nX-Evil: 1", "admins"),
        ("", "admins"),
        ("bob", "ad\nmins"),
    ] {
        let mut me = akadmin_me();
        me["user"]["username"] = Value::from(username);
        me["user"]["groups"] = serde_json::json!([{"name": group, "pk": "g"}]);
        let redirect = serde_json::json!({"component": "xak-flow-redirect", "to": "/reports"});
        let (remote, _cursor) = replay(vec![
            made_up("GET", &executor, 200, redirect, Value::Null),
            made_up("GET", "/api/v3/core/users/me/", 200, me, Value::Null),
        ]);
        let gate = gateway_for(&remote, FLOW);
        let client = client();
        let answer = client
            .get(gate.url(&format!(
                "/_flowgate/api/v3/flows/executor/{FLOW}/?query=next%3D%252Freports"
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 502, "{username:?}: {}", gate.log());
        gate.wait_for_log(
            "holds control characters; not signed in",
            Duration::from_secs(5),
        );
        assert_eq!(signed_in_as(&gate, &client).await, None, "{username:?}");
    }
}
