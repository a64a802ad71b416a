//! The flow engine's stages as a person meets them: a real browser
//! (headless Chromium over the DevTools protocol) goes through the HTML
//! pages of the real binary, types into the forms, reads what the page
//! says, and saves a screenshot of every page it sees, in
//! `<target>/tmp/stage_pages/<test>/` (printed; `-- --nocapture` shows it
//! when the test passes). The TOTP setup page's QR code is read back from its
//! screenshot with a QR decoder. Skipped loudly without `chromium`
//! (required in CI).

mod common;

use common::browser::{Browser, Page, Screenshots};
use common::totp::{key_of_uri, step_now, totp_at, wrong_code};
use common::*;
use serde_json::{json, Value};

/// One person's visit: the page they are on and the screenshots taken of
/// every page it showed.
struct Visit {
    page: Page,
    shots: Screenshots,
}

impl Visit {
    async fn start(browser: &Browser, test: &str) -> Visit {
        Visit {
            page: browser.page().await,
            shots: Screenshots::new("stage_pages", test),
        }
    }

    /// As if in a fresh browser: no cookies from before.
    async fn fresh(&mut self, browser: &Browser) {
        self.page = browser.fresh_page().await;
    }

    async fn goto(&mut self, url: &str, name: &str) {
        self.page.goto(url).await;
        self.shot(name).await;
    }

    /// Press the form's primary button, as a person does, then look.
    async fn submit(&mut self, name: &str) {
        self.page.click("form button.primary").await;
        self.shot(name).await;
    }

    async fn shot(&mut self, name: &str) {
        self.shots.take(&mut self.page, name).await;
    }

    async fn path(&mut self) -> String {
        let path = self.page.eval("location.pathname").await;
        path.as_str().unwrap().to_owned()
    }

    async fn body_text(&mut self) -> String {
        let text = self.page.eval("document.body.innerText").await;
        text.as_str().unwrap_or_default().to_owned()
    }

    /// The HTTP status of the page shown now.
    fn status(&self) -> u64 {
        self.page
            .events
            .iter()
            .rev()
            .find(|e| {
                e["method"] == "Network.responseReceived" && e["params"]["type"] == "Document"
            })
            .and_then(|e| e["params"]["response"]["status"].as_u64())
            .expect("a document was received")
    }

    /// From `start` (a protected address) through the identification and
    /// password pages as `user`: where that leaves the browser.
    /// `after` names the screenshot of the page the password leads to.
    async fn sign_in(&mut self, gate: &Flowgate, start: &str, user: &TestUser, after: &str) {
        self.goto(&gate.url(start), "identification").await;
        assert!(
            self.path().await.starts_with("/_flowgate/flow/"),
            "sent to a login page"
        );
        self.page.fill("#uid_field", user.username).await;
        self.submit("password").await;
        self.page.fill("#password", user.password).await;
        self.submit(after).await;
    }

    /// The app's echo of the request that reached it: the page is the app.
    async fn echoed(&mut self) -> Value {
        let text = self.body_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not the app ({e}): {text}"))
    }

    /// The user the app was told about, having reached it.
    async fn app_user(&mut self) -> String {
        let echoed = self.echoed().await;
        echoed["headers"]["x-forwarded-user"]
            .as_str()
            .unwrap_or_else(|| panic!("no user: {echoed}"))
            .to_owned()
    }

    /// Nothing the pages did broke their Content-Security-Policy.
    fn assert_no_csp_violation(&self) {
        self.page.assert_no_csp_violation();
    }
}

/// The text of the error shown under the field whose input is `selector`.
async fn field_error(page: &mut Page, selector: &str) -> Value {
    page.eval(&format!(
        "document.querySelector({})?.closest('.field')?.querySelector('.field-error')?.innerText ?? null",
        json!(selector)
    ))
    .await
}

const PROFILE: &str = r#"
[stage.profile]
kind = "prompt"

[[stage.profile.field]]
key = "nickname"
type = "text"
label = "Nickname"

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

[[flow]]
slug = "profile"
stages = ["identification", "password", "profile", "login"]

[[route]]
host = "*"
path_prefix = "/profile"
upstream = "UPSTREAM"
flow = "profile"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_shows_each_error_where_it_belongs_then_moves_on() {
    if !require_program("chromium") {
        return;
    }
    let upstream = Upstream::start().await;
    let extra = PROFILE.replace("UPSTREAM", &upstream.url());
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), &extra),
        &users_file(&[&ALICE]),
    );
    let browser = Browser::start();
    let mut visit = Visit::start(&browser, "prompt").await;
    visit.sign_in(&gate, "/profile/me", &ALICE, "prompt").await;
    assert_eq!(
        visit
            .page
            .eval("!!document.querySelector('#p-nickname')")
            .await,
        json!(true),
        "the prompt page: {}",
        visit.body_text().await
    );
    assert_eq!(
        visit.page.text("label[for=p-password]").await,
        "New password"
    );

    // The browser itself refuses an empty required field; the server is
    // what counts, so this form skips the browser's check.
    visit.page.fill("#p-email", "ally@example.test").await;
    visit.page.fill("#p-password", "one secret").await;
    visit
        .page
        .fill("#p-password_repeat", "another secret")
        .await;
    assert_eq!(
        visit
            .page
            .eval("document.querySelector('form').checkValidity()")
            .await,
        json!(false),
        "the nickname is marked required"
    );
    visit
        .page
        .eval("document.querySelector('form').noValidate = true")
        .await;
    visit.submit("prompt-required").await;
    assert_eq!(
        field_error(&mut visit.page, "#p-nickname").await,
        "This field is required.",
        "{}",
        visit.body_text().await
    );
    assert_eq!(
        visit
            .page
            .eval("document.querySelector('#p-nickname').getAttribute('aria-invalid')")
            .await,
        "true"
    );
    assert_eq!(
        field_error(&mut visit.page, "#p-password").await,
        Value::Null
    );
    // What was typed is still there, but for the passwords.
    let values = visit
        .page
        .eval("['#p-email', '#p-password', '#p-password_repeat'].map(s => document.querySelector(s).value)")
        .await;
    assert_eq!(values, json!(["ally@example.test", "", ""]));
    // As in authentik, the two passwords are compared once every field
    // has passed its own check.
    assert!(
        !visit.body_text().await.contains("Passwords don't match."),
        "{}",
        visit.body_text().await
    );

    visit.page.fill("#p-nickname", "ally").await;
    visit.page.fill("#p-password", "one secret").await;
    visit
        .page
        .fill("#p-password_repeat", "another secret")
        .await;
    visit.submit("prompt-mismatch").await;
    assert_eq!(
        visit.page.text("[role=alert]").await,
        "Passwords don't match.",
        "{}",
        visit.body_text().await
    );
    assert_eq!(
        field_error(&mut visit.page, "#p-nickname").await,
        Value::Null
    );

    visit.page.fill("#p-nickname", "ally").await;
    visit.page.fill("#p-password", "one secret").await;
    visit.page.fill("#p-password_repeat", "one secret").await;
    visit.submit("app").await;
    assert_eq!(visit.path().await, "/profile/me", "back where it started");
    assert_eq!(visit.app_user().await, "alice");
    visit.assert_no_csp_violation();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consent_is_asked_once_and_remembered_in_a_fresh_browser() {
    if !require_program("chromium") {
        return;
    }
    let upstream = Upstream::start().await;
    let extra = format!(
        r#"
[stage.agree]
kind = "consent"
mode = "permanent"
header = "The wiki will see your name and email."
permissions = ["Your username", "Your email address"]

[[flow]]
slug = "wiki-consent"
title = "Open the wiki"
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
    let browser = Browser::start();
    let mut visit = Visit::start(&browser, "consent").await;
    visit.sign_in(&gate, "/wiki/page", &ALICE, "consent").await;
    assert_eq!(
        visit.path().await,
        "/_flowgate/flow/wiki-consent/",
        "asked for consent: {}",
        visit.body_text().await
    );
    assert_eq!(
        visit.page.text(".question").await,
        "The wiki will see your name and email."
    );
    assert_eq!(
        visit
            .page
            .eval("[...document.querySelectorAll('.permissions li')].map(l => l.innerText)")
            .await,
        json!(["Your username", "Your email address"])
    );
    visit.submit("app").await;
    assert_eq!(visit.path().await, "/wiki/page");
    assert_eq!(visit.app_user().await, "alice");
    visit.assert_no_csp_violation();

    // A new browser, a new session: the consent given is not asked again.
    visit.fresh(&browser).await;
    visit.sign_in(&gate, "/wiki/page", &ALICE, "app").await;
    assert_eq!(
        visit.path().await,
        "/wiki/page",
        "no consent page: {}",
        visit.body_text().await
    );
    assert_eq!(visit.app_user().await, "alice");
}

#[tokio::test(flavor = "multi_thread")]
async fn totp_setup_shows_a_qr_code_of_its_link_and_the_next_login_asks_for_a_code() {
    if !require_program("chromium") {
        return;
    }
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &basic_config(
            &upstream.url(),
            "[stage.mfa]\nnot_configured_action = \"configure\"\n",
        ),
        &users_file(&[&ALICE]),
    );
    let browser = Browser::start();
    let mut visit = Visit::start(&browser, "totp").await;
    visit
        .sign_in(&gate, "/dashboard", &ALICE, "totp-setup")
        .await;
    let qr_src = visit
        .page
        .eval("document.querySelector('img.qr')?.getAttribute('src') ?? ''")
        .await;
    assert!(
        qr_src
            .as_str()
            .unwrap()
            .starts_with("data:image/svg+xml;base64,"),
        "a QR code on the setup page: {}",
        visit.body_text().await
    );
    let uri = visit
        .page
        .eval("document.querySelector('a.setup-link').href")
        .await;
    let uri = uri.as_str().unwrap().to_owned();
    assert!(
        uri.starts_with("otpauth://totp/flowgate%3Aalice?secret="),
        "{uri}"
    );
    let qr = visit.page.screenshot_of("img.qr", 2.0).await;
    visit.shots.save(&qr, "qr");
    assert_eq!(decode_qr(&qr), uri, "the QR code holds the setup link");
    let key = key_of_uri(&uri);
    let shown_key = visit.page.text("code.secret").await;
    let secret = url::Url::parse(&uri)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "secret")
        .map(|(_, v)| v.into_owned());
    assert_eq!(
        secret.as_deref(),
        shown_key.as_str(),
        "the key to type in is the link's"
    );

    visit.page.fill("#code", &wrong_code(&key)).await;
    visit.submit("totp-wrong-code").await;
    assert_eq!(
        field_error(&mut visit.page, "#code").await,
        "Code does not match"
    );
    let step = step_now();
    visit.page.fill("#code", &totp_at(&key, step)).await;
    visit.submit("app").await;
    assert_eq!(visit.path().await, "/dashboard", "enrolled and signed in");
    assert_eq!(visit.app_user().await, "alice");
    visit.assert_no_csp_violation();

    // The next login, in a fresh browser, asks for a code from that device.
    visit.fresh(&browser).await;
    visit
        .sign_in(&gate, "/dashboard", &ALICE, "totp-validate")
        .await;
    assert_eq!(
        visit.page.text("#code-hint").await,
        "Enter the code from your authenticator app.",
        "{}",
        visit.body_text().await
    );
    visit.page.fill("#code", &wrong_code(&key)).await;
    visit.submit("validate-wrong-code").await;
    assert_eq!(
        field_error(&mut visit.page, "#code").await,
        "Invalid Token. Please ensure the time on your device is accurate and try again."
    );
    // The code that proved the setup is spent; the next step's is good.
    visit.page.fill("#code", &totp_at(&key, step + 1)).await;
    visit.submit("app").await;
    assert_eq!(visit.path().await, "/dashboard");
    assert_eq!(visit.app_user().await, "alice");
    visit.assert_no_csp_violation();
}

/// The one QR code in a PNG, decoded.
fn decode_qr(png: &[u8]) -> String {
    let image = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .expect("a PNG")
        .to_luma8();
    let mut prepared = rqrr::PreparedImage::prepare(image);
    let grids = prepared.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code in the picture");
    let (_, content) = grids[0].decode().expect("a readable QR code");
    content
}

#[tokio::test(flavor = "multi_thread")]
async fn recovery_codes_are_shown_and_each_works_once_at_the_code_page() {
    if !require_program("chromium") {
        return;
    }
    let upstream = Upstream::start().await;
    let extra = r#"
[[flow]]
slug = "recovery-setup"
title = "Recovery codes"
designation = "stage_configuration"
authentication = "require_authenticated"
stages = ["recovery-codes"]
"#;
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), extra),
        &users_file(&[&ALICE]),
    );
    let browser = Browser::start();
    let mut visit = Visit::start(&browser, "recovery_codes").await;
    // No second factor yet: the password is enough.
    visit.sign_in(&gate, "/", &ALICE, "app").await;
    assert_eq!(visit.app_user().await, "alice");

    visit
        .goto(
            &gate.url("/_flowgate/flow/recovery-setup/?next=%2Fdone"),
            "recovery-codes",
        )
        .await;
    let codes = visit
        .page
        .eval("[...document.querySelectorAll('.recovery-codes li')].map(l => l.innerText)")
        .await;
    let codes: Vec<String> = serde_json::from_value(codes).unwrap();
    assert_eq!(codes.len(), 8, "{}", visit.body_text().await);
    let mut distinct = codes.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 8, "{codes:?}");
    visit.submit("app").await;
    assert_eq!(visit.path().await, "/done");

    // Signing in again, a recovery code is asked for and works, once.
    visit.fresh(&browser).await;
    visit.sign_in(&gate, "/", &ALICE, "recovery-validate").await;
    assert_eq!(
        visit.page.text("#code-hint").await,
        "Enter one of your recovery codes.",
        "{}",
        visit.body_text().await
    );
    visit.page.fill("#code", &codes[2]).await;
    visit.submit("app").await;
    assert_eq!(visit.app_user().await, "alice");

    visit.fresh(&browser).await;
    visit.sign_in(&gate, "/", &ALICE, "recovery-validate").await;
    visit.page.fill("#code", &codes[2]).await;
    visit.submit("recovery-code-reused").await;
    assert_eq!(
        field_error(&mut visit.page, "#code").await,
        "Invalid Token. Please ensure the time on your device is accurate and try again.",
        "a recovery code is good once"
    );
    visit.page.fill("#code", &codes[5]).await;
    visit.submit("app").await;
    assert_eq!(visit.app_user().await, "alice", "another of the set works");
    visit.assert_no_csp_violation();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deny_stage_and_a_route_policy_each_show_their_refusal() {
    if !require_program("chromium") {
        return;
    }
    let upstream = Upstream::start().await;
    let extra = format!(
        r#"
[policy.admins]
kind = "group"
groups = ["admins"]

[stage.staff-only]
kind = "deny"
message = "This sign-in is for administrators only."

[[flow]]
slug = "admins-login"
stages = ["identification", "password", {{ stage = "staff-only", policies = [{{ policy = "admins", negate = true }}] }}, "login"]

[[route]]
host = "*"
path_prefix = "/console"
upstream = "{upstream}"
flow = "admins-login"

[[route]]
host = "*"
path_prefix = "/admin"
upstream = "{upstream}"
flow = "{FLOW}"
policies = ["admins"]
"#,
        upstream = upstream.url()
    );
    let gate = Flowgate::start(
        &basic_config(&upstream.url(), &extra),
        &users_file(&[&ALICE, &BOB]),
    );
    let browser = Browser::start();
    let mut visit = Visit::start(&browser, "deny").await;

    // The deny stage, bound to those outside the group.
    visit.sign_in(&gate, "/console", &BOB, "deny-stage").await;
    assert_eq!(
        visit.page.text("[role=alert]").await,
        "This sign-in is for administrators only.",
        "{}",
        visit.body_text().await
    );
    assert_eq!(
        visit.page.eval("document.forms.length").await,
        json!(0),
        "nothing to answer"
    );

    // A route's policy, for a user signed in through the default flow.
    visit.fresh(&browser).await;
    visit.sign_in(&gate, "/", &BOB, "app").await;
    assert_eq!(visit.app_user().await, "bob");
    visit.goto(&gate.url("/admin/x"), "route-forbidden").await;
    assert_eq!(visit.status(), 403);
    assert_eq!(visit.page.text("h1").await, "Access denied");
    assert!(
        visit
            .body_text()
            .await
            .contains("You are signed in as bob, but this application is not open to you."),
        "{}",
        visit.body_text().await
    );
    assert_eq!(visit.page.text("a.button").await, "Sign in as someone else");
    visit.assert_no_csp_violation();

    // Someone the policies let through sees neither.
    visit.fresh(&browser).await;
    visit.sign_in(&gate, "/console", &ALICE, "app").await;
    assert_eq!(visit.path().await, "/console");
    assert_eq!(visit.app_user().await, "alice");
    visit.fresh(&browser).await;
    visit.sign_in(&gate, "/admin/x", &ALICE, "app").await;
    assert_eq!(visit.status(), 200);
    assert_eq!(visit.path().await, "/admin/x");
    assert_eq!(visit.app_user().await, "alice");
}
