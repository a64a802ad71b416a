//! Connections that outlive their request end with their session: an open
//! websocket, a server-sent event stream and a long poll are closed (or, not
//! answered yet, answered 401) within a second of a sign-out, a revocation
//! from the CLI or the admin listener, or the session's expiry. Both lanes:
//! a GET goes by the fast lane, a request with a body by the general path.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::apps::*;
use common::*;
use futures_util::StreamExt;
use http::Response;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "admin-token-0123456789abcdef";

/// An app with an endless event stream (`/events`, one event every 100 ms)
/// and a long poll that never answers (`/poll`).
async fn streaming_app() -> App {
    App::start(|request: http::Request<hyper::body::Incoming>| async move {
        let (tx, rx) = mpsc::channel(4);
        match request.uri().path() {
            "/poll" => {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    let _ = tx.send(Bytes::from_static(b"late")).await;
                });
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            _ => {
                tokio::spawn(async move {
                    while tx.send(Bytes::from_static(b"data: tick\n\n")).await.is_ok() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                });
            }
        }
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(ChannelBody(rx))
            .unwrap()
    })
    .await
}

/// flowgate in front of `app`, with `/ws` going to `ws` (for group
/// `staff`), an admin listener with a token, and `session` lines added to
/// `[session]`.
fn start(app: &App, ws: &WsUpstream, session: &str) -> Flowgate {
    let extra = format!(
        "[[route]]\nhost = \"*\"\npath_prefix = \"/ws\"\nupstream = \"{}\"\nflow = \"{FLOW}\"\n\
         allow = {{ groups = [\"staff\"] }}\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n",
        ws.url()
    );
    let config =
        basic_config(&app.url(), &extra).replace("[session]\n", &format!("[session]\n{session}"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(dir.path().join("flowgate.toml"), config).unwrap();
    std::fs::write(dir.path().join("users.toml"), users_file(&[&ALICE, &BOB])).unwrap();
    Flowgate::start_in(dir)
}

/// Everything alice has open at once: a websocket, an event stream on each
/// lane, a long poll on each lane.
struct Open {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    events_fast: reqwest::Response,
    events_general: reqwest::Response,
    poll_fast: tokio::task::JoinHandle<(u16, String)>,
    poll_general: tokio::task::JoinHandle<(u16, String)>,
}

async fn open_everything(gate: &Flowgate, client: &reqwest::Client, cookie: &str) -> Open {
    let mut ws = ws_connect(gate, Some(cookie)).await.expect("a websocket");
    assert_eq!(next_message(&mut ws).await, Message::text("hello alice"));
    let events_fast = client.get(gate.url("/events")).send().await.unwrap();
    assert_eq!(events_fast.status(), 200);
    // A request body takes it to the general path.
    let events_general = client
        .post(gate.url("/events"))
        .body("subscribe")
        .send()
        .await
        .unwrap();
    assert_eq!(events_general.status(), 200);
    let poll = |request: reqwest::RequestBuilder| {
        tokio::spawn(async move {
            let response = request
                .header("accept", "application/json")
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        })
    };
    let poll_fast = poll(client.get(gate.url("/poll")));
    let poll_general = poll(client.post(gate.url("/poll")).body("wait"));
    Open {
        ws,
        events_fast,
        events_general,
        poll_fast,
        poll_general,
    }
}

impl Open {
    /// Everything still open for a while: nothing ends a live session's
    /// connections.
    async fn still_open(&mut self) {
        self.ws.send_text("ping").await;
        assert_eq!(next_message(&mut self.ws).await, Message::text("ping"));
        for events in [&mut self.events_fast, &mut self.events_general] {
            let chunk = tokio::time::timeout(Duration::from_secs(2), events.chunk())
                .await
                .expect("an event within 2 s")
                .expect("the stream goes on");
            assert!(chunk.is_some());
        }
        assert!(!self.poll_fast.is_finished() && !self.poll_general.is_finished());
    }

    /// Everything ends within `limit` of now.
    async fn all_end_within(self, limit: Duration, gate: &Flowgate) {
        let started = Instant::now();
        let Open {
            mut ws,
            events_fast,
            events_general,
            poll_fast,
            poll_general,
        } = self;
        let ws_closed = async move {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(_))) | Some(Ok(Message::Binary(_))) => continue,
                    Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
                    _ => return,
                }
            }
        };
        let stream_cut = |mut events: reqwest::Response| async move {
            loop {
                match events.chunk().await {
                    Ok(Some(_)) => continue,
                    // Cut, not ended cleanly: a client must not take a
                    // severed stream for a complete one.
                    Ok(None) => panic!("the event stream ended as if complete"),
                    Err(_) => return,
                }
            }
        };
        let answered = |poll: tokio::task::JoinHandle<(u16, String)>| async move {
            let (status, body) = poll.await.unwrap();
            assert_eq!(status, 401, "{body}");
            assert!(body.contains("session_ended"), "{body}");
        };
        let all = async {
            tokio::join!(
                ws_closed,
                stream_cut(events_fast),
                stream_cut(events_general),
                answered(poll_fast),
                answered(poll_general),
            )
        };
        if tokio::time::timeout(limit, all).await.is_err() {
            panic!(
                "not everything ended within {limit:?} ({:?}):\n{}",
                started.elapsed(),
                gate.log()
            );
        }
    }
}

trait SendText {
    async fn send_text(&mut self, text: &str);
}

impl SendText for tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    async fn send_text(&mut self, text: &str) {
        use futures_util::SinkExt;
        self.send(Message::text(text)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_out_ends_every_open_connection_within_a_second() {
    let (app, ws) = (streaming_app().await, WsUpstream::start().await);
    let gate = start(&app, &ws, "");
    let (client, cookie) = signed_in(&gate, &ALICE).await;
    // Bob's connections are his: alice signing out leaves them open.
    let (bob, bob_cookie) = signed_in(&gate, &BOB).await;
    let mut bobs = ws_connect(&gate, Some(&bob_cookie)).await.unwrap();
    assert_eq!(next_message(&mut bobs).await, Message::text("hello bob"));
    let mut bob_events = bob.get(gate.url("/events")).send().await.unwrap();

    let mut open = open_everything(&gate, &client, &cookie).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    open.still_open().await;
    sign_out(&client, &gate).await;
    open.all_end_within(Duration::from_secs(1), &gate).await;
    gate.wait_for_log("tunnel closed: its session ended", Duration::from_secs(1));

    bobs.send_text("still here").await;
    assert_eq!(next_message(&mut bobs).await, Message::text("still here"));
    assert!(bob_events.chunk().await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_from_the_cli_ends_every_open_connection_within_a_second() {
    let (app, ws) = (streaming_app().await, WsUpstream::start().await);
    let gate = start(&app, &ws, "");
    let (client, cookie) = signed_in(&gate, &ALICE).await;
    let mut open = open_everything(&gate, &client, &cookie).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    open.still_open().await;
    let revoked = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["sessions", "revoke", "--user", "alice", "--config"])
        .arg(gate.path().join("flowgate.toml"))
        .output()
        .unwrap();
    assert!(revoked.status.success(), "{revoked:?}");
    open.all_end_within(Duration::from_secs(1), &gate).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_from_the_admin_listener_ends_every_open_connection() {
    let (app, ws) = (streaming_app().await, WsUpstream::start().await);
    let gate = start(&app, &ws, "");
    let (client, cookie) = signed_in(&gate, &ALICE).await;
    let mut open = open_everything(&gate, &client, &cookie).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    open.still_open().await;
    let admin = gate.admin.expect("an admin listener");
    let revoked = reqwest::Client::new()
        .delete(format!("http://{admin}/users/alice/sessions"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    open.all_end_within(Duration::from_secs(1), &gate).await;
}

/// A session's absolute lifetime ends its connections on time, though
/// they were busy all along.
#[tokio::test(flavor = "multi_thread")]
async fn an_expiring_session_ends_its_connections_on_time() {
    let (app, ws) = (streaming_app().await, WsUpstream::start().await);
    let gate = start(&app, &ws, "lifetime = \"4s\"\n");
    let (client, cookie) = signed_in(&gate, &ALICE).await;
    let signed_in_at = Instant::now();
    let mut open = open_everything(&gate, &client, &cookie).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    open.still_open().await;
    let left = Duration::from_secs(4).saturating_sub(signed_in_at.elapsed());
    // Whole seconds: the session ends at most a second early, and the
    // connections at most a second after that.
    open.all_end_within(left + Duration::from_secs(2), &gate)
        .await;
    assert!(
        signed_in_at.elapsed() > Duration::from_secs(3),
        "ended early: {:?}",
        signed_in_at.elapsed()
    );
    assert_eq!(api_status(&client, gate.url("/private")).await, 401);
}

/// An open connection was let through on the groups of its time: when the
/// users file changes a user's groups, their open connections end (their
/// session does not), and the next request is decided on the new groups.
#[tokio::test(flavor = "multi_thread")]
async fn a_users_groups_changed_at_a_reload_end_their_open_connections() {
    let (app, ws) = (streaming_app().await, WsUpstream::start().await);
    let gate = start(&app, &ws, "");
    let (alice, cookie) = signed_in(&gate, &ALICE).await;
    let (_, bob_cookie) = signed_in(&gate, &BOB).await;
    let mut alices = ws_connect(&gate, Some(&cookie))
        .await
        .expect("alice's websocket");
    assert_eq!(
        next_message(&mut alices).await,
        Message::text("hello alice")
    );
    let mut bobs = ws_connect(&gate, Some(&bob_cookie))
        .await
        .expect("bob's websocket");
    assert_eq!(next_message(&mut bobs).await, Message::text("hello bob"));
    tokio::time::sleep(Duration::from_millis(400)).await;

    // alice leaves staff; bob's groups stay.
    const ALICE_NOT_STAFF: TestUser = TestUser {
        groups: &["admins"],
        ..ALICE
    };
    common::ca::replace(
        &gate.path().join("users.toml"),
        &users_file(&[&ALICE_NOT_STAFF, &BOB]),
    );
    let closed = async { while let Some(Ok(_)) = alices.next().await {} };
    if tokio::time::timeout(Duration::from_secs(4), closed)
        .await
        .is_err()
    {
        panic!(
            "alice's websocket still open after her groups changed:\n{}",
            gate.log()
        );
    }
    gate.wait_for_log("open connections closed", Duration::from_secs(1));
    bobs.send_text("still here").await;
    assert_eq!(next_message(&mut bobs).await, Message::text("still here"));
    // Her session holds; /ws is hers no more.
    assert_eq!(api_status(&alice, gate.url("/events-once")).await, 200);
    match ws_connect(&gate, Some(&cookie)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("the new handshake: {:?}", other.map(|_| "accepted")),
    }
}
