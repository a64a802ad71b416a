//! A real browser (headless Chromium, driven over the DevTools protocol)
//! signs in through the HTML pages: it follows the redirect to the login
//! page, loads the stylesheet under the pages' Content-Security-Policy,
//! submits the forms, keeps the cookies, and lands on the app with the
//! user's identity. Skipped loudly without `chromium` (required in CI).

mod common;

use common::browser::Browser;
use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn a_real_browser_signs_in_through_the_pages_and_reaches_the_app() {
    if !require_program("chromium") {
        return;
    }
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let browser = Browser::start();
    let mut page = browser.page().await;

    let start = gate.url("/dashboard?tab=2");
    page.and_wait(&format!("location.href = {}", json!(start)))
        .await;
    let path = page.eval("location.pathname").await;
    assert_eq!(
        path,
        json!(format!("/_flowgate/flow/{FLOW}/")),
        "sent to the login page"
    );
    // The stylesheet loaded under the page's CSP (no inline styles needed).
    let rules = page
        .eval("document.styleSheets.length ? document.styleSheets[0].cssRules.length : 0")
        .await;
    assert!(
        rules.as_u64().unwrap_or(0) > 0,
        "the stylesheet did not load: {rules}"
    );

    page.and_wait(
        "document.querySelector('[name=uid_field]').value = 'alice'; \
         document.querySelector('form [type=submit], form button').click()",
    )
    .await;
    let html = page.eval("document.body.innerHTML").await;
    assert!(
        html.as_str().unwrap().contains("name=\"password\""),
        "password page: {html}"
    );

    page.and_wait(&format!(
        "document.querySelector('[name=password]').value = {}; \
         document.querySelector('form [type=submit], form button').click()",
        json!(ALICE.password)
    ))
    .await;
    assert_eq!(
        page.eval("location.pathname + location.search").await,
        json!("/dashboard?tab=2"),
        "back where it started"
    );
    let text = page.eval("document.body.innerText").await;
    let echoed: Value =
        serde_json::from_str(text.as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(echoed["headers"]["x-forwarded-user"], "alice", "{echoed}");
    assert!(
        echoed["headers"]["cookie"].is_null(),
        "the app sees no flowgate cookie: {echoed}"
    );

    let cookies = page
        .call("Network.getCookies", json!({"urls": [gate.url("/")]}))
        .await;
    let session = cookies["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "flowgate_session")
        .unwrap_or_else(|| panic!("no session cookie: {cookies}"))
        .clone();
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Lax", "{session}");
    assert!(
        page.eval("document.cookie")
            .await
            .as_str()
            .unwrap()
            .is_empty(),
        "HttpOnly: invisible to scripts"
    );

    // Signing out through the page ends the session.
    page.and_wait(&format!(
        "location.href = {}",
        json!(gate.url("/_flowgate/sign_out"))
    ))
    .await;
    page.and_wait("document.querySelector('form [type=submit], form button').click()")
        .await;
    page.and_wait(&format!("location.href = {}", json!(start)))
        .await;
    let path = page.eval("location.pathname").await;
    assert_eq!(
        path,
        json!(format!("/_flowgate/flow/{FLOW}/")),
        "signed out: back to the login page"
    );

    // Nothing the pages did broke their Content-Security-Policy.
    page.assert_no_csp_violation();
}
