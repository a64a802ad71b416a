//! Long-lived and large exchanges through flowgate: websockets (an HTTP/1.1
//! upgrade tunnelled byte for byte), server-sent events that arrive as they
//! are sent, and gigabyte uploads and downloads in bounded memory.

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::apps::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body::Frame;
use hyper::body::Incoming;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::{self, Message};

const GIB: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;
/// The bound on what a transfer may add to flowgate's memory.
const MAX_GROWTH_KIB: u64 = 32 * 1024;

/// Log in as alice: the client, and the `Cookie` header for websockets.
async fn alice(gate: &Flowgate) -> (reqwest::Client, String) {
    signed_in(gate, &ALICE).await
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_messages_echo_through_flowgate_with_the_users_identity() {
    let upstream = WsUpstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let (_, cookie) = alice(&gate).await;
    let mut ws = match ws_connect(&gate, Some(&format!("theme=dark; {cookie}"))).await {
        Ok(ws) => ws,
        Err(tungstenite::Error::Http(response)) => {
            panic!("the handshake got {} instead of 101", response.status())
        }
        Err(error) => panic!("the handshake failed: {error}"),
    };

    // The upstream speaks first: the tunnel carries bytes both ways, not
    // only replies to what the client sent.
    assert_eq!(next_message(&mut ws).await, Message::text("hello alice"));
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = [
        Message::text("one"),
        Message::binary(vec![0u8, 1, 2, 255]),
        Message::text("two ✓"),
        Message::binary(big),
        Message::text("three"),
    ];
    // All out before any reply is read: the tunnel is full duplex.
    for message in &sent {
        ws.send(message.clone()).await.unwrap();
    }
    for message in &sent {
        assert_eq!(&next_message(&mut ws).await, message);
    }
    for round in 0..20 {
        let message = Message::text(format!("round {round}"));
        ws.send(message.clone()).await.unwrap();
        assert_eq!(next_message(&mut ws).await, message);
    }

    let handshakes = upstream.handshakes();
    assert_eq!(handshakes.len(), 1);
    let headers = &handshakes[0];
    assert_eq!(headers["x-forwarded-user"], "alice");
    assert_eq!(headers["upgrade"], "websocket");
    assert_eq!(
        headers["cookie"], "theme=dark",
        "flowgate's cookie stays behind"
    );

    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    // Closed on both sides now, as a browser does once the server has.
    drop(ws);
    gate.wait_for_log("tunnel closed", Duration::from_secs(5));
}

/// `proxy.tunnel_idle_timeout`: a websocket that carries nothing either way
/// is closed; one that keeps talking stays open past it.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_websocket_is_closed_after_the_tunnel_idle_timeout() {
    let upstream = WsUpstream::start().await;
    let config = basic_config(&upstream.url(), "[proxy]\ntunnel_idle_timeout = \"1s\"\n");
    let gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let (_, cookie) = alice(&gate).await;
    let mut busy = ws_connect(&gate, Some(&cookie)).await.unwrap();
    assert_eq!(next_message(&mut busy).await, Message::text("hello alice"));
    let mut quiet = ws_connect(&gate, Some(&cookie)).await.unwrap();
    assert_eq!(next_message(&mut quiet).await, Message::text("hello alice"));
    // 2.4 s of a message every 300 ms: never idle for a second.
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let message = Message::text(format!("still here {i}"));
        busy.send(message.clone()).await.unwrap();
        assert_eq!(next_message(&mut busy).await, message);
    }
    // The quiet one went after a second of silence (no close frame: both
    // connections are simply closed, as for a dead peer).
    let ended = tokio::time::timeout(Duration::from_secs(5), quiet.next())
        .await
        .expect("the quiet websocket ends");
    assert!(
        !matches!(ended, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{ended:?}"
    );
    gate.wait_for_log("tunnel closed: idle", Duration::from_secs(5));
    busy.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_websocket_handshakes_are_refused_before_the_upstream() {
    let upstream = WsUpstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    for cookie in [None, Some("flowgate_session=forged.value")] {
        match ws_connect(&gate, cookie).await {
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                assert!(status == 401 || status == 302, "{cookie:?}: {status}");
            }
            Err(other) => panic!("{cookie:?}: expected an HTTP refusal, got {other}"),
            Ok(_) => panic!("{cookie:?}: an anonymous websocket was let through"),
        }
    }
    assert!(
        upstream.handshakes().is_empty(),
        "the upstream saw an anonymous handshake"
    );
}

/// An upstream that declines to switch is answered like any request; of the
/// hop-by-hop headers, only the two an upgrade needs reach it.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_the_upstream_declines_is_an_ordinary_answer() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let (client, _) = alice(&gate).await;
    let response = client
        .get(gate.url("/ws"))
        .header("connection", "keep-alive, Upgrade, X-Hop")
        .header("upgrade", "websocket")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    let headers = &echo["headers"];
    assert_eq!(headers["upgrade"], "websocket", "{echo}");
    assert_eq!(headers["connection"], "upgrade", "{echo}");
    assert_eq!(headers["x-forwarded-user"], "alice", "{echo}");
    for hop in ["x-hop", "keep-alive", "te"] {
        assert!(
            headers.get(hop).is_none(),
            "{hop} reached the upstream: {echo}"
        );
    }
}

/// A 101 to a request that asked for no switch would leave the client's
/// connection in no known state: flowgate answers 502 instead.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_switching_protocols_unasked_is_a_bad_gateway() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x-raw\r\n\r\n")
                .await;
        }
    });
    let gate = Flowgate::start(
        &basic_config(&format!("http://{addr}"), ""),
        &users_file(&[&ALICE]),
    );
    let response = reqwest::get(gate.url("/public/plain")).await.unwrap();
    assert_eq!(response.status(), 502);
    gate.wait_for_log("switched protocols unasked", Duration::from_secs(5));
    upstream.abort();
}

/// `total` bytes in chunks of one shared buffer: nothing is allocated per
/// chunk, so the upstream itself costs no memory.
struct Generated {
    chunk: Bytes,
    left: u64,
}

impl http_body::Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_reach_the_client_as_the_upstream_sends_them() {
    // The upstream sends one event, then holds the rest until the client
    // has seen it (or 5 s pass, which a buffering proxy would need).
    let release = Arc::new(Notify::new());
    let rest_sent = Arc::new(AtomicBool::new(false));
    let app = {
        let (release, rest_sent) = (release.clone(), rest_sent.clone());
        App::start(move |_| {
            let (release, rest_sent) = (release.clone(), rest_sent.clone());
            async move {
                let (tx, rx) = mpsc::channel(4);
                tokio::spawn(async move {
                    let _ = tx.send(Bytes::from_static(b"data: first\n\n")).await;
                    let _ = tokio::time::timeout(Duration::from_secs(5), release.notified()).await;
                    rest_sent.store(true, Ordering::SeqCst);
                    let _ = tx.send(Bytes::from_static(b"data: second\n\n")).await;
                    let _ = tx.send(Bytes::from_static(b"data: third\n\n")).await;
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .header("cache-control", "no-cache")
                    .body(ChannelBody(rx))
                    .unwrap()
            }
        })
        .await
    };
    let gate = Flowgate::start(&basic_config(&app.url(), ""), &users_file(&[&ALICE]));
    let (client, _) = alice(&gate).await;
    let started = Instant::now();
    let mut response = client
        .get(gate.url("/events"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");

    let mut received = Vec::new();
    while !received.ends_with(b"\n\n") {
        let chunk = response.chunk().await.unwrap().expect("the first event");
        received.extend_from_slice(&chunk);
    }
    assert_eq!(received, b"data: first\n\n");
    assert!(
        !rest_sent.load(Ordering::SeqCst),
        "the first event only arrived after the upstream sent the rest ({:?})",
        started.elapsed()
    );
    release.notify_one();
    received.clear();
    while let Some(chunk) = response.chunk().await.unwrap() {
        received.extend_from_slice(&chunk);
    }
    assert_eq!(received, b"data: second\n\ndata: third\n\n");
}

/// flowgate's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Samples a process's resident memory every few milliseconds until
/// stopped; `stop` returns the highest reading.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        RssSampler { stop, peak, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.peak.load(Ordering::Relaxed)
    }
}

fn assert_bounded(what: &str, gate: &Flowgate, before: u64, peak: u64, elapsed: Duration) {
    let after = rss_kib(gate.pid());
    eprintln!(
        "{what}: 1 GiB in {elapsed:.1?}; flowgate RSS {before} KiB before, {peak} KiB peak, {after} KiB after"
    );
    assert!(
        peak.saturating_sub(before) < MAX_GROWTH_KIB
            && after.saturating_sub(before) < MAX_GROWTH_KIB,
        "{what}: flowgate grew from {before} KiB to {peak} KiB (peak), {after} KiB (after)"
    );
}

/// A client for the long transfers: alice's session, no overall timeout.
async fn transfer_client(gate: &Flowgate) -> reqwest::Client {
    let (_, cookie) = alice(gate).await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("cookie", cookie.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1_gib_upload_streams_through_in_bounded_memory() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));
    let client = transfer_client(&gate).await;
    let upload = |total: u64| {
        let chunk = Bytes::from(vec![0x5a; CHUNK]);
        let chunks = total / CHUNK as u64;
        let body = futures_util::stream::iter(
            (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
        );
        client
            .post(gate.url("/upload"))
            .body(reqwest::Body::wrap_stream(body))
            .send()
    };
    // A small one first, so what the first request allocates for good is
    // in the baseline.
    let warm: Value = upload(16 << 20).await.unwrap().json().await.unwrap();
    assert_eq!(warm["body_bytes"], 16 << 20);
    let before = rss_kib(gate.pid());
    let sampler = RssSampler::start(gate.pid());
    let started = Instant::now();
    let echo: Value = upload(GIB).await.unwrap().json().await.unwrap();
    let elapsed = started.elapsed();
    let peak = sampler.stop();
    assert_eq!(echo["body_bytes"], GIB, "the upstream got all of it");
    assert_eq!(echo["headers"]["x-forwarded-user"], "alice");
    assert_bounded("upload", &gate, before, peak, elapsed);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1_gib_download_streams_through_in_bounded_memory() {
    let app = App::start(|request: Request<Incoming>| async move {
        let total = request
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Response::new(Generated {
            chunk: Bytes::from(vec![0xa5; CHUNK]),
            left: total,
        })
    })
    .await;
    let gate = Flowgate::start(&basic_config(&app.url(), ""), &users_file(&[&ALICE]));
    let client = transfer_client(&gate).await;
    let download = |total: u64| {
        let request = client.get(gate.url(&format!("/download?bytes={total}")));
        async move {
            let mut response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let mut received = 0u64;
            while let Some(chunk) = response.chunk().await.unwrap() {
                received += chunk.len() as u64;
            }
            received
        }
    };
    assert_eq!(download(16 << 20).await, 16 << 20);
    let before = rss_kib(gate.pid());
    let sampler = RssSampler::start(gate.pid());
    let started = Instant::now();
    let received = download(GIB).await;
    let elapsed = started.elapsed();
    let peak = sampler.stop();
    assert_eq!(received, GIB, "the client got all of it");
    assert_bounded("download", &gate, before, peak, elapsed);
}

/// On SIGTERM an open websocket keeps working and flowgate waits for it to
/// close (up to `shutdown_timeout`), then exits.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_waits_for_an_open_websocket() {
    let upstream = WsUpstream::start().await;
    let config = basic_config(&upstream.url(), "").replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\nshutdown_timeout = \"20s\"\n",
    );
    let mut gate = Flowgate::start(&config, &users_file(&[&ALICE]));
    let (_, cookie) = alice(&gate).await;
    let mut ws = ws_connect(&gate, Some(&cookie)).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("hello alice"));

    gate.signal("TERM");
    gate.wait_for_log("shutting down", Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        gate.wait_exit(Duration::from_millis(10)).is_none(),
        "exited with a websocket open"
    );
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("still here"));

    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    let status = gate
        .wait_exit(Duration::from_secs(5))
        .expect("exits once the websocket closed");
    assert!(status.success(), "{status:?}");
    assert!(
        gate.log().contains("all connections closed"),
        "{}",
        gate.log()
    );
}
