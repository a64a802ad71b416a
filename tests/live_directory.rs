//! Sessions are resolved against the users file as of the last reload: a
//! user disabled, deleted, or moved out of a group since they signed in gets
//! the new verdict on their very next request, and a group added applies as
//! soon; the identity headers the upstream gets follow too. Checked on the
//! fast lane (plain HTTP/1.1) and on the general path (h2c), over
//! connections opened before the reload.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const ALICE_ADMIN: TestUser = TestUser {
    username: "alice",
    password: "alice-Live-Dir-Pw1!",
    email: "alice@example.test",
    groups: &["admins"],
    extra: "",
};
const ALICE_DISABLED: TestUser = TestUser {
    extra: "disabled = true",
    ..ALICE_ADMIN
};
const BOB_ADMIN: TestUser = TestUser {
    username: "bob",
    password: "bob-Live-Dir-Pw1!",
    email: "bob@example.test",
    groups: &["admins"],
    extra: "",
};
const BOB_STAFF: TestUser = TestUser {
    groups: &["staff"],
    ..BOB_ADMIN
};
const CAROL: TestUser = TestUser {
    username: "carol",
    password: "carol-Live-Dir-Pw1!",
    email: "carol@example.test",
    groups: &[],
    extra: "",
};
const DAVE: TestUser = TestUser {
    username: "dave",
    password: "dave-Live-Dir-Pw1!",
    email: "dave@example.test",
    groups: &["staff"],
    extra: "",
};
const DAVE_ADMIN: TestUser = TestUser {
    groups: &["staff", "admins"],
    ..DAVE
};

/// `/` for any signed-in user, `/admin` for the admins group.
fn config(upstream: &str) -> String {
    basic_config(
        upstream,
        &format!(
            r#"
[[route]]
host = "*"
path_prefix = "/admin"
upstream = "{upstream}"
flow = "{FLOW}"
allow = {{ groups = ["admins"] }}
"#
        ),
    )
}

/// Both ways into the gate: HTTP/1.1 (the fast lane for signed-in GETs)
/// and h2c (the general path). Each keeps its connections alive, so the
/// requests after a reload go over connections opened before it.
struct Lanes {
    h1: reqwest::Client,
    h2: reqwest::Client,
}

impl Lanes {
    fn new() -> Lanes {
        let builder = || {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(20))
        };
        Lanes {
            h1: builder().http1_only().build().unwrap(),
            h2: builder().http2_prior_knowledge().build().unwrap(),
        }
    }

    fn all(&self) -> [(&'static str, &reqwest::Client); 2] {
        [("HTTP/1.1", &self.h1), ("h2c", &self.h2)]
    }
}

/// One signed-in user: their name and the `Cookie` header their session is.
struct Signed {
    name: &'static str,
    cookie: String,
}

/// What a request got: status, and the JSON body (the echo app's report of
/// what reached it, or flowgate's 401), if it was JSON.
struct Got {
    status: u16,
    location: String,
    body: Value,
}

async fn get(
    client: &reqwest::Client,
    gate: &Flowgate,
    who: &Signed,
    path: &str,
    accept: &str,
) -> Got {
    let response = client
        .get(gate.url(path))
        .header("cookie", &who.cookie)
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let location = location(&response);
    let body = response.json().await.unwrap_or(Value::Null);
    Got {
        status,
        location,
        body,
    }
}

/// An API client's GET.
async fn api(client: &reqwest::Client, gate: &Flowgate, who: &Signed, path: &str) -> Got {
    get(client, gate, who, path, "application/json").await
}

async fn sign_in(gate: &Flowgate, user: &TestUser) -> Signed {
    let (_client, cookie) = signed_in(gate, user).await;
    Signed {
        name: user.username,
        cookie,
    }
}

/// `flowgate_config_reloads_total{result="applied"}` from the admin listener.
async fn reloads(gate: &Flowgate) -> u64 {
    let admin = gate.admin.expect("the admin listener's address in the log");
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("flowgate_config_reloads_total{result=\"applied\"} "))
        .unwrap_or_else(|| panic!("no reload counter in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Replace the users file (whole, by rename: the file watcher never reads
/// half of it), send SIGHUP, and wait until a reload has been applied.
async fn rewrite_users(gate: &Flowgate, users: &[&TestUser]) {
    let before = reloads(gate).await;
    let staged = gate.path().join("users.toml.new");
    std::fs::write(&staged, users_file(users)).unwrap();
    std::fs::rename(&staged, gate.path().join("users.toml")).unwrap();
    gate.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(gate).await <= before {
        assert!(
            Instant::now() < deadline,
            "no reload applied within 10 s; the log:\n{}",
            gate.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn header<'b>(got: &'b Got, name: &str) -> &'b Value {
    &got.body["headers"][name]
}

#[tokio::test(flavor = "multi_thread")]
async fn directory_changes_apply_to_sessions_on_their_next_request() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &config(&upstream.url()),
        &users_file(&[&ALICE_ADMIN, &BOB_ADMIN, &CAROL, &DAVE]),
    );
    let lanes = Lanes::new();
    let alice = sign_in(&gate, &ALICE_ADMIN).await;
    let bob = sign_in(&gate, &BOB_ADMIN).await;
    let carol = sign_in(&gate, &CAROL).await;
    let dave = sign_in(&gate, &DAVE).await;

    // Before: everyone in on `/`, the admins on `/admin`.
    for (lane, client) in lanes.all() {
        for who in [&alice, &bob, &carol, &dave] {
            let got = api(client, &gate, who, "/").await;
            assert_eq!(got.status, 200, "{lane}: {} on /: {}", who.name, got.body);
            assert_eq!(header(&got, "x-forwarded-user"), who.name, "{lane}");
        }
        for who in [&alice, &bob] {
            let got = api(client, &gate, who, "/admin/panel").await;
            assert_eq!(got.status, 200, "{lane}: {} on /admin", who.name);
            assert_eq!(header(&got, "x-forwarded-groups"), "admins", "{lane}");
        }
        for who in [&carol, &dave] {
            let got = api(client, &gate, who, "/admin/panel").await;
            assert_eq!(got.status, 403, "{lane}: {} on /admin", who.name);
        }
        let got = api(client, &gate, &dave, "/").await;
        assert_eq!(header(&got, "x-forwarded-groups"), "staff", "{lane}");
    }

    // alice disabled, bob out of admins (into staff), carol deleted, dave
    // into admins.
    rewrite_users(&gate, &[&ALICE_DISABLED, &BOB_STAFF, &DAVE_ADMIN]).await;

    // Each one's very next request, on the fast lane first.
    let h1 = &lanes.h1;
    let got = api(h1, &gate, &alice, "/").await;
    assert_eq!(got.status, 401, "disabled alice: {}", got.body);
    assert_eq!(got.body["error"], "unauthenticated", "{}", got.body);
    let got = api(h1, &gate, &bob, "/admin/panel").await;
    assert_eq!(got.status, 403, "bob left admins: {}", got.body);
    let got = api(h1, &gate, &carol, "/").await;
    assert_eq!(got.status, 401, "deleted carol: {}", got.body);
    assert_eq!(got.body["error"], "unauthenticated", "{}", got.body);
    let got = api(h1, &gate, &dave, "/admin/panel").await;
    assert_eq!(got.status, 200, "dave joined admins: {}", got.body);

    for (lane, client) in lanes.all() {
        for who in [&alice, &carol] {
            let got = api(client, &gate, who, "/").await;
            assert_eq!(got.status, 401, "{lane}: {} on /: {}", who.name, got.body);
            let got = api(client, &gate, who, "/admin/panel").await;
            assert_eq!(got.status, 401, "{lane}: {} on /admin", who.name);
            let page = get(client, &gate, who, "/", "text/html").await;
            assert_eq!(page.status, 302, "{lane}: {}'s page load", who.name);
            assert_eq!(
                page.location,
                format!("/_flowgate/flow/{FLOW}/?next=%2F"),
                "{lane}"
            );
        }
        assert!(
            upstream_saw_nobody_as(&gate, client, &[&alice, &carol]).await,
            "{lane}"
        );

        let got = api(client, &gate, &bob, "/").await;
        assert_eq!(got.status, 200, "{lane}: bob on /: {}", got.body);
        assert_eq!(header(&got, "x-forwarded-user"), "bob", "{lane}");
        assert_eq!(
            header(&got, "x-forwarded-groups"),
            "staff",
            "{lane}: the upstream gets bob's groups as they are now"
        );
        let got = api(client, &gate, &bob, "/admin/panel").await;
        assert_eq!(got.status, 403, "{lane}: bob on /admin");

        let got = api(client, &gate, &dave, "/admin/panel").await;
        assert_eq!(got.status, 200, "{lane}: dave on /admin: {}", got.body);
        assert_eq!(header(&got, "x-forwarded-user"), "dave", "{lane}");
        assert_eq!(
            header(&got, "x-forwarded-groups"),
            "staff,admins",
            "{lane}: the upstream gets dave's groups as they are now"
        );
    }

    // The disabled and the deleted cannot sign in again either.
    for (name, password) in [("alice", ALICE_ADMIN.password), ("carol", CAROL.password)] {
        let denied = json_login(&client(), &gate.url(""), name, password, "/").await;
        assert_ne!(denied["component"], "xak-flow-redirect", "{name}: {denied}");
    }
}

/// Whether a public path (which passes anonymously) shows no identity for
/// these users' cookies: their sessions are nobody's now.
async fn upstream_saw_nobody_as(
    gate: &Flowgate,
    client: &reqwest::Client,
    users: &[&Signed],
) -> bool {
    for who in users {
        let got = api(client, gate, who, "/public/who").await;
        if got.status != 200 || !header(&got, "x-forwarded-user").is_null() {
            eprintln!("{} on /public/who: {} {}", who.name, got.status, got.body);
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_taken_out_of_the_file_is_out_on_any_route_and_a_group_change_is_reversible() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&config(&upstream.url()), &users_file(&[&BOB_ADMIN, &CAROL]));
    let lanes = Lanes::new();
    let bob = sign_in(&gate, &BOB_ADMIN).await;
    let carol = sign_in(&gate, &CAROL).await;

    rewrite_users(&gate, &[&BOB_STAFF, &CAROL]).await;
    let got = api(&lanes.h1, &gate, &bob, "/admin/x").await;
    assert_eq!(got.status, 403, "{}", got.body);
    // Back into admins: the same session is let in again at once.
    rewrite_users(&gate, &[&BOB_ADMIN, &CAROL]).await;
    for (lane, client) in lanes.all() {
        let got = api(client, &gate, &bob, "/admin/x").await;
        assert_eq!(got.status, 200, "{lane}: {}", got.body);
        assert_eq!(header(&got, "x-forwarded-groups"), "admins", "{lane}");
        let got = api(client, &gate, &carol, "/").await;
        assert_eq!(got.status, 200, "{lane}: carol untouched: {}", got.body);
    }
}

// --- a regression: once broken, kept as a test ---------------------------------

/// A session whose user a reload disabled or deleted is ended, not only
/// ignored while that lasts: re-enable the user, or create a new account
/// under the same name, and the old sessions stay closed (an account
/// disabled to lock out whoever stole its session must not let them back
/// in when it is re-enabled). Once, they opened again.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_ended_by_a_reload_stays_ended_when_the_user_comes_back() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(
        &config(&upstream.url()),
        &users_file(&[&ALICE_ADMIN, &CAROL]),
    );
    let lanes = Lanes::new();
    let alice = sign_in(&gate, &ALICE_ADMIN).await;
    let carol = sign_in(&gate, &CAROL).await;
    rewrite_users(&gate, &[&ALICE_DISABLED]).await;
    for who in [&alice, &carol] {
        assert_eq!(
            api(&lanes.h1, &gate, who, "/").await.status,
            401,
            "{}",
            who.name
        );
    }

    // alice enabled again; a new account named carol, with its own password.
    const NEW_CAROL: TestUser = TestUser {
        password: "another-Carol-Pw2!",
        email: "carol.two@example.test",
        ..CAROL
    };
    rewrite_users(&gate, &[&ALICE_ADMIN, &NEW_CAROL]).await;
    let new_carol = sign_in(&gate, &NEW_CAROL).await;
    assert_eq!(api(&lanes.h1, &gate, &new_carol, "/").await.status, 200);
    for (lane, client) in lanes.all() {
        for who in [&alice, &carol] {
            let got = api(client, &gate, who, "/").await;
            assert_eq!(
                got.status,
                401,
                "{lane}: {}'s session from before the reload that ended it \
                 opens again (as {}): {}",
                who.name,
                header(&got, "x-forwarded-email"),
                got.body
            );
        }
    }
}
