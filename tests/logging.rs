//! The log people act on (docs/logging.md), through the real binary: one
//! line per login outcome (a wrong password, an unknown user, a wrong TOTP
//! code, a refusal by the brute-force throttle, a success), each with the
//! name as typed and the client address and never the password or the code,
//! read with the very fail2ban and CrowdSec patterns the docs give; names
//! that try to forge a field or a line; the same events as JSON; the
//! version at start; no colour codes when stderr is not a terminal.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::totp::{step_now, totp_at, wrong_code};
use common::*;
use regex::{Captures, Regex};
use serde_json::{json, Value};

/// The fail2ban `failregex` of docs/logging.md, word for word.
const FAILREGEX: &str = r#"^\s*(?:\S+ \S+: )?(?:\S+Z)?\s*WARN flowgate::login: login failed reason=\w+ user=(?:"(?:[^"\\]|\\.)*"|[^\s"]+) client=<HOST> flow=\S+$"#;

/// The CrowdSec grok pattern of docs/logging.md, word for word, and the one
/// pattern of its own it defines (`pattern_syntax`).
const GROK: &str = r#"^%{TIMESTAMP_ISO8601:timestamp}\s+%{WORD:level} flowgate::login: login %{WORD:outcome} (?:reason=%{WORD:reason} )?user=%{FLOWGATE_USER:user} client=%{IP:source_ip} flow=%{NOTSPACE:flow}(?: second_factor=%{WORD:second_factor} via=%{WORD:via})?$"#;
const FLOWGATE_USER: &str = r#""(?:[^"\\]|\\.)*"|[^\s"]+"#;

/// What fail2ban's `<HOST>` and grok's `%{IP}` stand for here: an address.
const IP: &str = r"[0-9A-Fa-f.:]+";

const TOTP_KEY: &[u8] = b"12345678901234567890";

/// A user with a TOTP device (the base32 of `TOTP_KEY`).
const TINA: TestUser = TestUser {
    username: "tina",
    password: "tina-Totp-Pw1!",
    email: "tina@example.test",
    groups: &["staff"],
    extra: "totp = [\"GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\"]",
};

/// Names that try to make a login line say something else: another user,
/// another client, a second line.
const FORGED_USER: &str = "bob\" user=\"admin";
const FORGED_CLIENT: &str = "mallet client=10.6.6.6 flow=x";
const FORGED_LINE: &str =
    "eve\n2030-01-01T00:00:00.000000Z  WARN flowgate::login: login failed reason=password user=admin client=10.6.6.7 flow=x";

fn docs() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/logging.md"))
        .expect("docs/logging.md")
}

#[test]
fn the_docs_give_these_very_patterns() {
    let docs = docs();
    assert!(
        docs.contains(&format!("failregex = {FAILREGEX}\n")),
        "docs/logging.md lacks the failregex {FAILREGEX}"
    );
    assert!(
        docs.contains(&format!("pattern: '{GROK}'\n")),
        "docs/logging.md lacks the grok pattern {GROK}"
    );
    assert!(
        docs.contains(&format!("FLOWGATE_USER: '{FLOWGATE_USER}'\n")),
        "docs/logging.md lacks FLOWGATE_USER {FLOWGATE_USER}"
    );
}

/// The failregex as a regex: `<HOST>` an address, named `host`.
fn fail2ban() -> Regex {
    Regex::new(&FAILREGEX.replace("<HOST>", &format!("(?P<host>{IP})"))).unwrap()
}

/// The grok pattern as a regex, with the grok names it uses.
fn grok() -> Regex {
    let names: HashMap<&str, &str> = [
        (
            "TIMESTAMP_ISO8601",
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)",
        ),
        ("WORD", r"\b\w+\b"),
        ("NOTSPACE", r"\S+"),
        ("IP", IP),
        ("FLOWGATE_USER", FLOWGATE_USER),
    ]
    .into();
    let expanded = Regex::new(r"%\{(\w+):(\w+)\}")
        .unwrap()
        .replace_all(GROK, |c: &Captures| {
            format!("(?P<{}>{})", &c[2], names[&c[1]])
        });
    Regex::new(&expanded).unwrap()
}

/// One login line as the grok pattern reads it.
#[derive(Debug, Clone, PartialEq)]
struct Login {
    level: String,
    outcome: String,
    reason: Option<String>,
    user: String,
    client: String,
    flow: String,
    second_factor: Option<String>,
    via: Option<String>,
}

fn logins(log: &str) -> Vec<Login> {
    let grok = grok();
    log.lines()
        .filter_map(|line| grok.captures(line))
        .map(|c| {
            let get = |name: &str| c.name(name).map(|m| m.as_str().to_owned());
            Login {
                level: get("level").unwrap(),
                outcome: get("outcome").unwrap(),
                reason: get("reason"),
                user: get("user").unwrap(),
                client: get("source_ip").unwrap(),
                flow: get("flow").unwrap(),
                second_factor: get("second_factor"),
                via: get("via"),
            }
        })
        .collect()
}

/// The hosts fail2ban would count a failure against, one per matching line.
fn banned_hosts(log: &str) -> Vec<String> {
    let regex = fail2ban();
    log.lines()
        .filter_map(|line| regex.captures(line))
        .map(|c| c["host"].to_owned())
        .collect()
}

/// The log without what is made of digits by itself (timestamps, request
/// durations), so that a six-digit code can be looked for in it.
fn without_times(log: &str) -> String {
    let times = Regex::new(
        r#"(?m)^\S+Z|"timestamp":"[^"]*"|micros=\d+|"micros":\d+|\d{4}-\d\d-\d\dT[\d:.]+Z"#,
    )
    .unwrap();
    times.replace_all(log, "").into_owned()
}

/// Wait until `enough` holds of the log (plus a moment, for any line that
/// should not be there to show up too); panics with the log after 10 s.
fn settle(gate: &Flowgate, what: &str, enough: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !enough(&gate.log()) {
        assert!(
            Instant::now() < deadline,
            "{what}; the log:\n{}",
            gate.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    gate.log()
}

fn flowgate_version_line(log: &str) -> usize {
    let wanted = format!("flowgate {} starting", env!("CARGO_PKG_VERSION"));
    log.lines().filter(|l| l.contains(&wanted)).count()
}

// --- TOTP, computed here (RFC 6238, HMAC-SHA1, 6 digits) --------------------

#[test]
fn the_tests_totp_matches_rfc_6238() {
    assert_eq!(totp_at(TOTP_KEY, 59 / 30), "287082");
    assert_eq!(totp_at(TOTP_KEY, 1111111109 / 30), "081804");
}

// --- Driving logins ---------------------------------------------------------

fn executor_url(gate: &Flowgate) -> String {
    gate.url(&format!(
        "/_flowgate/api/v3/flows/executor/{FLOW}/?query=next%3D%252F"
    ))
}

/// POST `body` to the executor, then follow its 302s; the last answer.
async fn post_and_follow(client: &reqwest::Client, url: &str, body: Value) -> Value {
    let mut response = client.post(url).json(&body).send().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while response.status() == 302 && Instant::now() < deadline {
        response = client.get(url).send().await.unwrap();
    }
    response.json().await.unwrap()
}

/// A login through the JSON API with a fresh client; the last answer.
async fn api_login(gate: &Flowgate, user: &str, password: &str) -> Value {
    json_login(&client(), &gate.url(""), user, password, "/").await
}

/// Password right, then `codes` one after the other, through the API.
async fn api_login_with_codes(gate: &Flowgate, user: &TestUser, codes: &[&str]) -> Vec<Value> {
    let client = client();
    let after_password =
        json_login(&client, &gate.url(""), user.username, user.password, "/").await;
    assert_eq!(
        after_password["component"], "ak-stage-authenticator-validate",
        "{after_password}"
    );
    let mut answers = Vec::new();
    for code in codes {
        answers.push(post_and_follow(&client, &executor_url(gate), json!({ "code": code })).await);
    }
    answers
}

/// A browser's login through the HTML pages; the answer to the password.
async fn page_login(gate: &Flowgate, user: &str, password: &str) -> reqwest::Response {
    let client = client();
    let first = client
        .get(gate.url("/app"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 302);
    let started = client
        .get(gate.url(&location(&first)))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 303);
    let mut response = client
        .get(gate.url(&location(&started)))
        .send()
        .await
        .unwrap();
    for (field, value) in [("uid_field", user), ("password", password)] {
        let html = response.text().await.unwrap();
        let csrf = input_value(&html, "csrf_token").expect("a form");
        let action = form_action(&html).expect("a form action");
        let posted = client
            .post(gate.url(&action))
            .form(&[("csrf_token", csrf.as_str()), (field, value)])
            .send()
            .await
            .unwrap();
        if field == "password" {
            return posted;
        }
        assert_eq!(posted.status(), 303);
        response = client
            .get(gate.url(&location(&posted)))
            .send()
            .await
            .unwrap();
    }
    unreachable!()
}

fn failed(reason: &str, user: &str) -> Login {
    Login {
        level: "WARN".into(),
        outcome: "failed".into(),
        reason: Some(reason.into()),
        user: user.into(),
        client: "127.0.0.1".into(),
        flow: FLOW.into(),
        second_factor: None,
        via: None,
    }
}

fn succeeded(user: &str, second_factor: bool, via: &str) -> Login {
    Login {
        level: "INFO".into(),
        outcome: "succeeded".into(),
        reason: None,
        user: user.into(),
        client: "127.0.0.1".into(),
        flow: FLOW.into(),
        second_factor: Some(second_factor.to_string()),
        via: Some(via.into()),
    }
}

// --- The text format --------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn every_login_outcome_is_one_text_line_that_fail2ban_and_crowdsec_read() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), ""),
        &users_file(&[&ALICE, &BOB, &TINA]),
    );
    let wrong_code = wrong_code(TOTP_KEY);

    let answer = api_login(&gate, "alice", "alice-Wrong-Pw-1").await;
    assert_eq!(answer["component"], "ak-stage-password", "{answer}");
    api_login(&gate, "mallory", "mallory-Guess-Pw-2").await;
    let answer = page_login(&gate, "bob", "bob-Wrong-Pw-3").await;
    assert_eq!(answer.status(), 200, "the password form again");
    let right_code = totp_at(TOTP_KEY, step_now());
    let answers = api_login_with_codes(&gate, &TINA, &[&wrong_code, &right_code]).await;
    assert_eq!(
        answers[0]["component"], "ak-stage-authenticator-validate",
        "{answers:?}"
    );
    assert_eq!(answers[1]["component"], "xak-flow-redirect", "{answers:?}");
    for name in [FORGED_USER, FORGED_CLIENT, FORGED_LINE] {
        api_login(&gate, name, "forger-Pw-4").await;
    }
    let answer = api_login(&gate, "alice", ALICE.password).await;
    assert_eq!(answer["component"], "xak-flow-redirect", "{answer}");
    let answer = page_login(&gate, "bob", BOB.password).await;
    assert_eq!(answer.status(), 303, "signed in");

    let log = settle(&gate, "not every login line was written", |log| {
        logins(log).len() >= 10
    });
    let expected = vec![
        failed("password", "alice"),
        failed("password", "mallory"),
        failed("password", "bob"),
        failed("totp", "tina"),
        succeeded("tina", true, "api"),
        failed("password", r#""bob\" user=\"admin""#),
        failed("password", r#""mallet client=10.6.6.6 flow=x""#),
        failed(
            "password",
            r#""eve\n2030-01-01T00:00:00.000000Z  WARN flowgate::login: login failed reason=password user=admin client=10.6.6.7 flow=x""#,
        ),
        succeeded("alice", false, "api"),
        succeeded("bob", false, "page"),
    ];
    assert_eq!(logins(&log), expected, "the login lines; the log:\n{log}");
    for line in log.lines() {
        if line.contains("login failed") || line.contains("login succeeded") {
            assert!(grok().is_match(line), "the grok pattern misses: {line}");
        }
    }

    // fail2ban: the seven failures, each against the real client.
    let hosts = banned_hosts(&log);
    assert_eq!(hosts, ["127.0.0.1"; 7], "the log:\n{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("2030-")),
        "a name started a line of its own:\n{log}"
    );

    // Nothing secret, no colours, and the version first.
    let plain = without_times(&log);
    for secret in [
        "alice-Wrong-Pw-1",
        "mallory-Guess-Pw-2",
        "bob-Wrong-Pw-3",
        "forger-Pw-4",
        ALICE.password,
        BOB.password,
        TINA.password,
        &wrong_code,
        &right_code,
    ] {
        assert!(!plain.contains(secret), "{secret:?} is in the log:\n{log}");
    }
    assert!(!log.contains("\x1b["), "colour codes on a pipe:\n{log:?}");
    assert_eq!(flowgate_version_line(&log), 1, "{log}");
    let first = log.lines().next().unwrap_or_default();
    assert!(
        first.contains(" INFO ")
            && first.ends_with(&format!("flowgate {} starting", env!("CARGO_PKG_VERSION"))),
        "the first line names the version: {first}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_throttle_refusal_is_one_line_of_its_own() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    // engine.rs: 10 failures for one name in 5 minutes, then refused unchecked.
    for i in 0..10 {
        let answer = api_login(&gate, "alice", &format!("alice-Guess-{i}")).await;
        assert_eq!(
            answer["response_errors"]["password"][0]["code"], "invalid",
            "{answer}"
        );
    }
    let answer = api_login(&gate, "alice", ALICE.password).await;
    assert_eq!(
        answer["response_errors"]["password"][0]["code"], "throttled",
        "even the right password: {answer}"
    );
    let log = settle(&gate, "no throttle line", |log| {
        logins(log)
            .iter()
            .any(|l| l.reason.as_deref() == Some("throttled"))
    });
    let seen = logins(&log);
    let mut expected = vec![failed("password", "alice"); 10];
    expected.push(failed("throttled", "alice"));
    assert_eq!(seen, expected, "the log:\n{log}");
    assert_eq!(banned_hosts(&log).len(), 11, "{log}");
    assert!(!log.contains(ALICE.password), "{log}");
    assert!(!without_times(&log).contains("alice-Guess-"), "{log}");
}

// --- The JSON format --------------------------------------------------------

/// The JSON objects of the log whose message is a login outcome.
fn json_logins(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v| {
            let message = &v["fields"]["message"];
            message == "login failed" || message == "login succeeded"
        })
        .collect()
}

fn json_failed(reason: &str, user: &str) -> Value {
    json!({
        "level": "WARN",
        "target": "flowgate::login",
        "fields": {"message": "login failed", "reason": reason, "user": user, "client": "127.0.0.1", "flow": FLOW},
    })
}

fn json_succeeded(user: &str, second_factor: bool) -> Value {
    json!({
        "level": "INFO",
        "target": "flowgate::login",
        "fields": {"message": "login succeeded", "user": user, "client": "127.0.0.1", "flow": FLOW,
                   "second_factor": second_factor, "via": "api"},
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_json_format_has_the_same_events_as_objects() {
    let upstream = Upstream::start().await;
    let config = basic_config(&upstream.url(), "[log]\nformat = \"json\"\n");
    let gate = Flowgate::start(&config, &users_file(&[&ALICE, &TINA]));
    let wrong_code = wrong_code(TOTP_KEY);

    api_login(&gate, "alice", "alice-Wrong-Pw-1").await;
    api_login(&gate, "mallory", "mallory-Guess-Pw-2").await;
    api_login(&gate, FORGED_USER, "forger-Pw-4").await;
    let right_code = totp_at(TOTP_KEY, step_now());
    api_login_with_codes(&gate, &TINA, &[&wrong_code, &right_code]).await;
    for i in 0..11 {
        api_login(&gate, "locked", &format!("locked-Guess-{i}")).await;
    }
    api_login(&gate, "alice", ALICE.password).await;

    let log = settle(&gate, "not every login line was written", |log| {
        json_logins(log).len() >= 17
    });
    let mut expected = vec![
        json_failed("password", "alice"),
        json_failed("password", "mallory"),
        json_failed("password", FORGED_USER),
        json_failed("totp", "tina"),
        json_succeeded("tina", true),
    ];
    expected.extend(std::iter::repeat_n(json_failed("password", "locked"), 10));
    expected.push(json_failed("throttled", "locked"));
    expected.push(json_succeeded("alice", false));
    let seen: Vec<Value> = json_logins(&log)
        .into_iter()
        .map(|mut v| {
            let timestamp = v.as_object_mut().unwrap().remove("timestamp");
            assert!(timestamp.is_some_and(|t| t.is_string()), "{v}");
            v
        })
        .collect();
    assert_eq!(seen, expected, "the log:\n{log}");

    for line in log.lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    let version = log
        .lines()
        .next()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_default();
    assert_eq!(
        version["fields"]["message"],
        format!("flowgate {} starting", env!("CARGO_PKG_VERSION")),
        "{log}"
    );
    assert_eq!(version["level"], "INFO", "{log}");
    let plain = without_times(&log);
    for secret in [
        "alice-Wrong-Pw-1",
        "mallory-Guess-Pw-2",
        "forger-Pw-4",
        "locked-Guess-",
        ALICE.password,
        TINA.password,
        &wrong_code,
        &right_code,
    ] {
        assert!(!plain.contains(secret), "{secret:?} is in the log:\n{log}");
    }
    assert!(!log.contains("\x1b["), "{log:?}");
}

// --- fail2ban itself --------------------------------------------------------

/// The filter file of docs/logging.md, as written there.
fn documented_filter() -> String {
    let docs = docs();
    let start = "```ini\n# /etc/fail2ban/filter.d/flowgate.conf\n";
    let at = docs
        .find(start)
        .expect("the filter file in docs/logging.md")
        + "```ini\n".len();
    let end = at + docs[at..].find("```").unwrap();
    docs[at..end].to_owned()
}

/// `fail2ban-regex` with the documented filter, over the log as a file
/// flowgate wrote and as syslog or the journal carry it.
#[tokio::test(flavor = "multi_thread")]
async fn fail2ban_regex_finds_each_failure_with_the_documented_filter() {
    if !require_program("fail2ban-regex") {
        return;
    }
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    api_login(&gate, "alice", "alice-Wrong-Pw-1").await;
    api_login(&gate, "mallory", "mallory-Guess-Pw-2").await;
    api_login(&gate, FORGED_CLIENT, "forger-Pw-4").await;
    api_login(&gate, FORGED_LINE, "forger-Pw-4").await;
    api_login(&gate, "alice", ALICE.password).await;
    let log = settle(&gate, "not every login line was written", |log| {
        logins(log).len() >= 5
    });

    let dir = tempfile::tempdir().unwrap();
    let filter = dir.path().join("flowgate.conf");
    std::fs::write(&filter, documented_filter()).unwrap();
    let as_written = dir.path().join("flowgate.log");
    std::fs::write(&as_written, &log).unwrap();
    let via_syslog = dir.path().join("syslog");
    let syslog: String = log
        .lines()
        .map(|l| format!("Jun  1 12:00:00 gateway flowgate[4242]: {l}\n"))
        .collect();
    std::fs::write(&via_syslog, syslog).unwrap();
    for file in [&as_written, &via_syslog] {
        let output = std::process::Command::new("fail2ban-regex")
            .args(["--raw", "--out", "ip"])
            .arg(file)
            .arg(&filter)
            .output()
            .expect("run fail2ban-regex");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let hosts: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            hosts,
            ["127.0.0.1"; 4],
            "{}: fail2ban-regex found {stdout:?} in:\n{log}",
            file.display()
        );
    }
}
