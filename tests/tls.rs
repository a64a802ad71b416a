//! TLS end to end, over real sockets: the listener's certificates chosen by
//! SNI and replaced while it runs, h2 by ALPN (and h2c by prior knowledge
//! on a plain listener), TLS 1.2 and newer only, and `https://` upstreams
//! checked against `[proxy] ca_file`. Every certificate is made by the test,
//! under a CA of its own.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::ca::{replace, Ca, Leaf};
use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme, SupportedProtocolVersion};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `basic_config` listening with TLS: one `{ cert, key }` per stem, in order.
fn tls_config(upstream: &str, stems: &[&str]) -> String {
    let list: Vec<String> = stems
        .iter()
        .map(|s| format!("{{ cert = \"{s}.pem\", key = \"{s}.key\" }}"))
        .collect();
    basic_config(upstream, "").replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:0\"\ntls = [{}]\n", list.join(", ")),
    )
}

/// flowgate serving `leaves` (written as `{stem}.pem` / `{stem}.key`).
fn start_tls(upstream: &str, leaves: &[(&str, &Leaf)]) -> Flowgate {
    let dir = tempfile::tempdir().unwrap();
    for (stem, leaf) in leaves {
        leaf.write(dir.path(), stem);
    }
    let stems: Vec<&str> = leaves.iter().map(|(stem, _)| *stem).collect();
    std::fs::write(
        dir.path().join("flowgate.toml"),
        tls_config(upstream, &stems),
    )
    .unwrap();
    std::fs::write(dir.path().join("users.toml"), users_file(&[&ALICE])).unwrap();
    Flowgate::start_in(dir)
}

/// A client trusting only `ca`, reaching `a.test` and `b.test` at `gate`.
fn https_client(ca: &Ca, gate: &Flowgate) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.root())
        .resolve("a.test", gate.addr)
        .resolve("b.test", gate.addr)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
}

fn https_url(gate: &Flowgate, host: &str, path: &str) -> String {
    format!("https://{host}:{}{path}", gate.addr.port())
}

fn ring() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Takes whatever certificate the server shows (its signatures still
/// checked): to see which one it picks, even for a name none is valid for.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS connection to `addr` asking for `name` by SNI (`None`: no SNI),
/// trusting `ca` (or, with `None`, any certificate), with only `versions`.
async fn connect(
    addr: SocketAddr,
    name: Option<&str>,
    ca: Option<&Ca>,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<TlsStream, std::io::Error> {
    connect_alpn(addr, name, ca, versions, b"http/1.1").await
}

/// `connect`, offering `alpn` (`h2` for HTTP/2 over TLS).
async fn connect_alpn(
    addr: SocketAddr,
    name: Option<&str>,
    ca: Option<&Ca>,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[u8],
) -> Result<TlsStream, std::io::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(versions)
        .unwrap();
    let mut config = match ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.cert.der().clone()).unwrap();
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(ring())))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    // rustls sends no SNI for an IP address.
    let server_name = match name {
        Some(name) => ServerName::try_from(name.to_owned()).unwrap(),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
}

/// The leaf certificate the server presented on `stream`.
fn presented(stream: &TlsStream) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate")[0]
        .to_vec()
}

const BOTH: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

#[tokio::test(flavor = "multi_thread")]
async fn https_speaks_h2_by_alpn_and_http1_to_http1_only_clients() {
    let upstream = Upstream::start().await;
    let ca = Ca::new("flowgate test CA");
    let a = ca.issue(&["a.test"], 1);
    let gate = start_tls(&upstream.url(), &[("a", &a)]);

    let h2 = https_client(&ca, &gate).build().unwrap();
    let response = h2
        .get(https_url(&gate, "a.test", "/public/over-h2"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["path"], "/public/over-h2", "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https", "{echo}");

    let http1 = https_client(&ca, &gate).http1_only().build().unwrap();
    let response = http1
        .get(https_url(&gate, "a.test", "/public/over-http1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["path"], "/public/over-http1", "{echo}");
}

/// A cookie jar that also keeps every `Set-Cookie` it was given, verbatim.
#[derive(Default)]
struct Recording {
    jar: reqwest::cookie::Jar,
    seen: Mutex<Vec<String>>,
}

impl reqwest::cookie::CookieStore for Recording {
    fn set_cookies(&self, headers: &mut dyn Iterator<Item = &http::HeaderValue>, url: &url::Url) {
        let headers: Vec<http::HeaderValue> = headers.cloned().collect();
        let mut seen = self.seen.lock().unwrap();
        seen.extend(
            headers
                .iter()
                .filter_map(|h| h.to_str().ok())
                .map(str::to_owned),
        );
        self.jar.set_cookies(&mut headers.iter(), url);
    }

    fn cookies(&self, url: &url::Url) -> Option<http::HeaderValue> {
        self.jar.cookies(url)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn login_over_tls_sets_secure_cookies_that_reach_the_app() {
    let upstream = Upstream::start().await;
    let ca = Ca::new("flowgate test CA");
    let a = ca.issue(&["a.test"], 1);
    let gate = start_tls(&upstream.url(), &[("a", &a)]);
    let jar = Arc::new(Recording::default());
    let alice = https_client(&ca, &gate)
        .cookie_provider(jar.clone())
        .build()
        .unwrap();

    let done = json_login(
        &alice,
        &https_url(&gate, "a.test", ""),
        "alice",
        ALICE.password,
        "/",
    )
    .await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    let cookies = jar.seen.lock().unwrap().clone();
    let session: Vec<&String> = cookies
        .iter()
        .filter(|c| c.starts_with("flowgate_session="))
        .collect();
    assert!(!session.is_empty(), "no session cookie: {cookies:?}");
    for cookie in &cookies {
        assert!(cookie.contains("; Secure"), "over TLS, yet: {cookie}");
    }

    let echo: Value = get_json(&alice, https_url(&gate, "a.test", "/private")).await;
    assert_eq!(echo["headers"]["x-forwarded-user"], "alice", "{echo}");
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_listener_serves_h2c_by_prior_knowledge() {
    let upstream = Upstream::start().await;
    let gate = Flowgate::start(&basic_config(&upstream.url(), ""), &users_file(&[&ALICE]));

    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let response = h2c.get(gate.url("/public/h2c")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["path"], "/public/h2c", "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http", "{echo}");

    let http1 = client().get(gate.url("/public/h1")).send().await.unwrap();
    assert_eq!(http1.version(), reqwest::Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_name_gets_its_certificate_and_other_names_the_first() {
    let upstream = Upstream::start().await;
    let ca = Ca::new("flowgate test CA");
    let a = ca.issue(&["a.test"], 1);
    let b = ca.issue(&["b.test"], 2);
    let wild = ca.issue(&["*.wild.test"], 3);
    let gate = start_tls(&upstream.url(), &[("a", &a), ("b", &b), ("wild", &wild)]);

    // Verified against the CA under the name asked for.
    for (name, leaf) in [("a.test", &a), ("b.test", &b), ("x.wild.test", &wild)] {
        let stream = connect(gate.addr, Some(name), Some(&ca), BOTH)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            presented(&stream) == leaf.der,
            "{name} got another certificate"
        );
    }
    // No certificate is valid for these: the first one listed answers.
    for name in [Some("c.test"), Some("y.x.wild.test"), None] {
        let stream = connect(gate.addr, name, None, BOTH).await.unwrap();
        assert!(
            presented(&stream) == a.der,
            "{name:?} did not get the default"
        );
    }
    // Through a whole HTTP client too, on both HTTP versions.
    for client in [
        https_client(&ca, &gate).tls_info(true),
        https_client(&ca, &gate).tls_info(true).http1_only(),
    ] {
        let client = client.build().unwrap();
        for (name, leaf) in [("a.test", &a), ("b.test", &b)] {
            let response = client
                .get(https_url(&gate, name, "/public/sni"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let info = response.extensions().get::<reqwest::tls::TlsInfo>();
            let certificate = info.and_then(|i| i.peer_certificate());
            assert!(certificate == Some(&leaf.der[..]), "{name}");
        }
    }

    let log = gate.log();
    assert!(log.contains("b.pem serves b.test"), "{log}");
    assert!(log.contains("wild.pem serves *.wild.test"), "{log}");
    assert!(
        log.contains("a.pem serves a.test, and any other name"),
        "{log}"
    );
}

/// flowgate notices changed files by comparing them with how they were when
/// its watcher started, a moment after it began listening: a change before
/// that would go unseen.
async fn let_the_watcher_start() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// One HTTP/1.1 keep-alive connection over `stream`.
async fn keep_alive(stream: TlsStream) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
) -> Value {
    let request = http::Request::get(path)
        .header("host", "a.test")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

/// The certificate new connections to a.test get, once it is `expected`;
/// panics with the log if that takes longer than `limit`.
async fn wait_for_certificate(gate: &Flowgate, ca: &Ca, expected: &[u8], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let stream = connect(gate.addr, Some("a.test"), Some(ca), BOTH)
            .await
            .unwrap();
        if presented(&stream) == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served within {limit:?}; log:\n{}",
            gate.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replaced_certificate_is_served_to_new_connections_without_a_restart() {
    let upstream = Upstream::start().await;
    let ca = Ca::new("flowgate test CA");
    let old = ca.issue(&["a.test"], 1);
    let b = ca.issue(&["b.test"], 2);
    let gate = start_tls(&upstream.url(), &[("a", &old), ("b", &b)]);
    let pid = gate.pid();

    let stream = connect(gate.addr, Some("a.test"), Some(&ca), BOTH)
        .await
        .unwrap();
    assert!(presented(&stream) == old.der);
    let mut kept = keep_alive(stream).await;
    assert_eq!(
        get(&mut kept, "/public/before").await["path"],
        "/public/before"
    );

    let_the_watcher_start().await;
    let new = ca.issue(&["a.test"], 100);
    assert!(new.der != old.der && new.key_der != old.key_der);
    new.write(gate.path(), "a");
    wait_for_certificate(&gate, &ca, &new.der, Duration::from_secs(15)).await;

    assert_eq!(gate.pid(), pid);
    let started = format!("listening on {} (https)", gate.addr);
    assert_eq!(gate.log().matches(&started).count(), 1, "{}", gate.log());
    // The connection made before the change is still served.
    assert_eq!(
        get(&mut kept, "/public/after").await["path"],
        "/public/after"
    );
    // The other name is untouched.
    let stream = connect(gate.addr, Some("b.test"), Some(&ca), BOTH)
        .await
        .unwrap();
    assert!(presented(&stream) == b.der);
}

/// Plain HTTP sent to the TLS port (someone typed `http://`) gets a
/// readable 400 saying what to do, not a handshake error; TLS still works.
#[tokio::test(flavor = "multi_thread")]
async fn plain_http_on_the_tls_port_gets_a_readable_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let ca = Ca::new("flowgate test CA");
    let a = ca.issue(&["a.test"], 1);
    let gate = start_tls(&upstream.url(), &[("a", &a)]);
    let mut plain = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), plain.read_to_string(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.contains("https://"), "{answer}");
    let stream = connect(gate.addr, Some("a.test"), Some(&ca), BOTH)
        .await
        .unwrap();
    assert!(presented(&stream) == a.der);
}

/// `server.redirect_http`: a plain listener that sends every request to
/// the same URL over HTTPS (308), and refuses one without a usable host.
#[tokio::test(flavor = "multi_thread")]
async fn the_redirect_listener_sends_browsers_to_https() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let ca = Ca::new("flowgate test CA");
    let a = ca.issue(&["a.test"], 1);
    let dir = tempfile::tempdir().unwrap();
    a.write(dir.path(), "a");
    let config = tls_config(&upstream.url(), &["a"]).replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\nredirect_http = \"127.0.0.1:0\"\n",
    );
    std::fs::write(dir.path().join("flowgate.toml"), config).unwrap();
    std::fs::write(dir.path().join("users.toml"), users_file(&[&ALICE])).unwrap();
    let gate = Flowgate::start_in(dir);
    gate.wait_for_log("redirecting http on", Duration::from_secs(5));
    let log = gate.log();
    let line = log
        .lines()
        .find(|l| l.contains("redirecting http on"))
        .unwrap();
    let plain: SocketAddr = line
        .split("redirecting http on ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let ask = |head: String| async move {
        let mut stream = tokio::net::TcpStream::connect(plain).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
            .await
            .expect("answered")
            .unwrap();
        answer
    };
    let answer = ask(format!(
        "POST /x/y?q=1 HTTP/1.1\r\nHost: a.test:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        plain.port()
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    let location = format!("location: https://a.test:{}/x/y?q=1\r\n", gate.addr.port());
    assert!(answer.to_ascii_lowercase().contains(&location), "{answer}");
    let answer = ask("GET / HTTP/1.1\r\nConnection: close\r\n\r\n".into()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // HTTP/1.0 may leave Host out: nowhere to send it either.
    let answer = ask("GET / HTTP/1.0\r\n\r\n".into()).await;
    assert!(
        answer.starts_with("HTTP/1.0 400") || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
}

/// The gate over TLS, HTTP/1.1 and HTTP/2 by ALPN: the same canonical-path
/// decisions and header stripping as the plain lanes (tests/canonical_gate.rs
/// and tests/spoofed_headers.rs), spelled by an attacker.
#[tokio::test(flavor = "multi_thread")]
async fn over_tls_paths_are_decided_canonically_and_spoofed_headers_stripped() {
    let upstream = Upstream::start().await;
    let ca = Ca::new("flowgate test CA");
    let a = ca.issue(&["a.test"], 1);
    let gate = start_tls(&upstream.url(), &[("a", &a)]);
    let spoofed = [
        ("x-original-url", "/admin"),
        ("x-real-ip", "6.6.6.6"),
        ("true-client-ip", "6.6.6.6"),
        ("x-forwarded-user", "mallory"),
        ("x_forwarded_for", "6.6.6.6"),
    ];
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let stream = connect_alpn(gate.addr, Some("a.test"), Some(&ca), BOTH, alpn)
            .await
            .unwrap();
        let io = TokioIo::new(stream);
        let ask = |path: &'static str, with_spoofs: bool| {
            let mut request = http::Request::get(path).header("host", "a.test");
            if with_spoofs {
                for (name, value) in spoofed {
                    request = request.header(name, value);
                }
            }
            request.body(Empty::<Bytes>::new()).unwrap()
        };
        let mut answers = Vec::new();
        let rows: [(&str, bool); 6] = [
            ("/%70ublic/x", false),
            ("/public/./x//y", false),
            ("/public/%2e%2e/private", false),
            ("/public/..;/private", false),
            ("/public%2Fx", false),
            ("/public/spoof", true),
        ];
        if alpn == b"h2" {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            for (path, spoofs) in rows {
                let response = sender.send_request(ask(path, spoofs)).await.unwrap();
                let status = response.status().as_u16();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                answers.push((path, status, String::from_utf8_lossy(&body).into_owned()));
            }
        } else {
            // A connection per row: a 400 closes its connection.
            drop(io);
            for (path, spoofs) in rows {
                let stream = connect_alpn(gate.addr, Some("a.test"), Some(&ca), BOTH, alpn)
                    .await
                    .unwrap();
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(connection);
                let response = sender.send_request(ask(path, spoofs)).await.unwrap();
                let status = response.status().as_u16();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                answers.push((path, status, String::from_utf8_lossy(&body).into_owned()));
            }
        }
        let lane = String::from_utf8_lossy(alpn).into_owned();
        let echo = |i: usize| -> Value {
            serde_json::from_str(&answers[i].2).unwrap_or_else(|_| panic!("{lane}: {answers:?}"))
        };
        let statuses: Vec<u16> = answers.iter().map(|(_, s, _)| *s).collect();
        assert_eq!(
            statuses,
            [200, 200, 401, 400, 400, 200],
            "{lane}: {answers:?}"
        );
        assert_eq!(echo(0)["path"], "/public/x", "{lane}");
        assert_eq!(echo(1)["path"], "/public/x/y", "{lane}");
        let spoof = echo(5);
        let text = spoof.to_string();
        assert!(
            !text.contains("6.6.6.6") && !text.contains("mallory"),
            "{lane}: {text}"
        );
        assert!(
            spoof["headers"].get("x-original-url").is_none(),
            "{lane}: {text}"
        );
        assert_eq!(spoof["headers"]["x-real-ip"], "127.0.0.1", "{lane}: {text}");
        assert_eq!(spoof["path"], "/public/spoof", "{lane}");
    }
}

/// A reload for anything else (SIGHUP, the users file) does not read the
/// certificates again nor log what they serve; a changed certificate does.
#[tokio::test(flavor = "multi_thread")]
async fn certificates_are_read_again_only_when_they_change() {
    let upstream = Upstream::start().await;
    let ca = Ca::new("flowgate test CA");
    let a = ca.issue(&["a.test"], 1);
    let b = ca.issue(&["b.test"], 2);
    let gate = start_tls(&upstream.url(), &[("a", &a), ("b", &b)]);
    let_the_watcher_start().await;
    let serves = |gate: &Flowgate| gate.log().matches("b.pem serves b.test").count();
    assert_eq!(serves(&gate), 1, "{}", gate.log());
    for _ in 0..2 {
        let before = gate.log().matches("configuration reloaded").count();
        gate.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.log().matches("configuration reloaded").count() == before {
            assert!(Instant::now() < deadline, "no reload: {}", gate.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(
        serves(&gate),
        1,
        "a reload read the certificates again: {}",
        gate.log()
    );
    let new = ca.issue(&["a.test"], 100);
    new.write(gate.path(), "a");
    wait_for_certificate(&gate, &ca, &new.der, Duration::from_secs(15)).await;
    assert_eq!(serves(&gate), 2, "{}", gate.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_replacement_keeps_the_running_certificate_and_says_why() {
    let upstream = Upstream::start().await;
    let ca = Ca::new("flowgate test CA");
    let good = ca.issue(&["a.test"], 1);
    let gate = start_tls(&upstream.url(), &[("a", &good)]);
    let_the_watcher_start().await;

    replace(&gate.path().join("a.pem"), "not a certificate\n");
    gate.wait_for_log("certificates not reloaded", Duration::from_secs(15));
    let log = gate.log();
    let line = log
        .lines()
        .find(|l| l.contains("certificates not reloaded"))
        .unwrap();
    assert!(
        line.contains("a.pem: no certificate found"),
        "says which file and why: {line}"
    );
    let stream = connect(gate.addr, Some("a.test"), Some(&ca), BOTH)
        .await
        .unwrap();
    assert!(
        presented(&stream) == good.der,
        "the running certificate stays"
    );

    // A key that belongs to another certificate is refused just the same.
    let other = ca.issue(&["a.test"], 2);
    replace(&gate.path().join("a.pem"), &good.cert_pem);
    replace(&gate.path().join("a.key"), &other.key_pem);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !gate.log().contains("does not belong to the certificate") {
        assert!(Instant::now() < deadline, "{}", gate.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stream = connect(gate.addr, Some("a.test"), Some(&ca), BOTH)
        .await
        .unwrap();
    assert!(
        presented(&stream) == good.der,
        "the running certificate stays"
    );
    let response = https_client(&ca, &gate)
        .build()
        .unwrap()
        .get(https_url(&gate, "a.test", "/public/still"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// A TLS 1.1 ClientHello without the `supported_versions` extension, what
/// a client that cannot do TLS 1.2 sends (rustls clients cannot make one).
const TLS11_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x00, 0x39, // record: handshake, 57 bytes
    0x01, 0x00, 0x00, 0x35, // ClientHello, 53 bytes
    0x03, 0x02, // client_version: TLS 1.1
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31,   // random
    0x00, // no session id
    0x00, 0x02, 0xc0, 0x13, // one suite: ECDHE_RSA_WITH_AES_128_CBC_SHA
    0x01, 0x00, // null compression
    // signature_algorithms (rustls wants it before it looks at the version):
    // ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256
    0x00, 0x0a, 0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04,
];

#[tokio::test(flavor = "multi_thread")]
async fn tls_1_2_and_1_3_are_served_and_older_versions_refused() {
    let upstream = Upstream::start().await;
    let ca = Ca::new("flowgate test CA");
    let a = ca.issue(&["a.test"], 1);
    let gate = start_tls(&upstream.url(), &[("a", &a)]);

    for version in BOTH {
        let stream = connect(gate.addr, Some("a.test"), Some(&ca), &[version])
            .await
            .unwrap();
        assert_eq!(stream.get_ref().1.protocol_version(), Some(version.version));
    }
    let tls12 = https_client(&ca, &gate)
        .max_tls_version(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap();
    let response = tls12
        .get(https_url(&gate, "a.test", "/public/tls12"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // TLS 1.1: the server answers with a fatal protocol_version alert.
    let mut tcp = TcpStream::connect(gate.addr).await.unwrap();
    tcp.write_all(TLS11_CLIENT_HELLO).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .unwrap();
    assert_eq!(answer.first(), Some(&0x15), "an alert record: {answer:?}");
    assert!(
        answer.ends_with(&[2, 70]),
        "fatal protocol_version: {answer:?}"
    );

    // A real TLS 1.0/1.1 client stack, where one is installed.
    if !require_program("openssl") {
        return;
    }
    let s_client = |version: &str| {
        // Security level 0: OpenSSL 3 otherwise refuses TLS 1.0/1.1 itself,
        // before the server has a say.
        std::process::Command::new("openssl")
            .args(["s_client", "-connect", &gate.addr.to_string()])
            .args([
                "-servername",
                "a.test",
                version,
                "-cipher",
                "DEFAULT:@SECLEVEL=0",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let accepted = s_client("-tls1_2");
    let text = String::from_utf8_lossy(&accepted.stdout);
    assert!(accepted.status.success(), "{text}");
    assert!(text.contains("TLSv1.2"), "{text}");
    for version in ["-tls1", "-tls1_1"] {
        let refused = s_client(version);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&refused.stdout),
            String::from_utf8_lossy(&refused.stderr)
        );
        assert!(!refused.status.success(), "{version}: {text}");
        // An alert from the server (40: these clients offer no TLS 1.2
        // signature algorithms; 70: protocol version), not a local refusal.
        assert!(
            text.contains("SSL alert number 40") || text.contains("SSL alert number 70"),
            "{version}: refused by the server: {text}"
        );
    }
}

/// An upstream that speaks only TLS, answering with what it received.
struct TlsUpstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsUpstream {
    async fn start(leaf: &Leaf) -> TlsUpstream {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone()));
        let config = rustls::ServerConfig::builder_with_provider(ring())
            .with_protocol_versions(BOTH)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(leaf.der.clone())], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that does not trust us ends here.
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        |request: http::Request<hyper::body::Incoming>| async move {
                            let headers: serde_json::Map<String, Value> = request
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (k.to_string(), Value::from(v.to_str().unwrap_or_default()))
                                })
                                .collect();
                            let body = serde_json::json!({
                                "path": request.uri().to_string(),
                                "tls": true,
                                "headers": headers,
                            });
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(body.to_string()),
                            )))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TlsUpstream { addr, task }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// flowgate in front of `upstream`, trusting the CA in `ca_pem` for it.
fn gate_trusting(upstream: &TlsUpstream, ca_pem: &str) -> Flowgate {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
    let config = basic_config(&upstream.url(), "[proxy]\nca_file = \"ca.pem\"\n");
    std::fs::write(dir.path().join("flowgate.toml"), config).unwrap();
    std::fs::write(dir.path().join("users.toml"), users_file(&[&ALICE])).unwrap();
    Flowgate::start_in(dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn https_upstream_signed_by_ca_file_gets_the_identity() {
    let ca = Ca::new("flowgate test CA");
    let upstream = TlsUpstream::start(&ca.issue(&["localhost"], 7)).await;
    let gate = gate_trusting(&upstream, &ca.pem());

    let alice = client();
    let done = json_login(&alice, &gate.url(""), "alice", ALICE.password, "/").await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    let response = alice.get(gate.url("/private/page")).send().await.unwrap();
    assert_eq!(response.status(), 200, "{}", gate.log());
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["tls"], true, "{echo}");
    assert_eq!(echo["path"], "/private/page", "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-user"], "alice", "{echo}");
    assert_eq!(
        echo["headers"]["x-forwarded-groups"], "admins,staff",
        "{echo}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn https_upstream_not_signed_by_ca_file_is_a_502_and_the_log_says_why() {
    let ca = Ca::new("flowgate test CA");
    let upstream = TlsUpstream::start(&ca.issue(&["localhost"], 7)).await;
    let gate = gate_trusting(&upstream, &Ca::new("some other CA").pem());

    let alice = client();
    let done = json_login(&alice, &gate.url(""), "alice", ALICE.password, "/").await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    let response = alice
        .get(gate.url("/private/page"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let html = response.text().await.unwrap();
    assert!(html.contains("Bad gateway"), "{html}");
    assert!(
        !html.contains("certificate"),
        "details stay in the log: {html}"
    );
    let log = gate.log();
    let line = log
        .lines()
        .find(|l| l.contains("upstream request failed"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("invalid peer certificate") && line.contains("UnknownIssuer"),
        "{line}"
    );
}

/// Route policies over TLS, on HTTP/1.1 and HTTP/2 alike: the decision is
/// made on the canonical path and on the address the connection comes
/// from; an `X-Forwarded-For` from a peer nobody trusts changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn over_tls_route_policies_decide_on_the_canonical_path_and_the_real_address() {
    let upstream = Upstream::start().await;
    let ca = Ca::new("flowgate test CA");
    let a = ca.issue(&["a.test"], 1);
    let dir = tempfile::tempdir().unwrap();
    a.write(dir.path(), "a");
    let extra = format!(
        r#"
[policy.admins]
kind = "group"
groups = ["admins"]

[policy.office]
kind = "network"
cidrs = ["10.0.0.0/8"]

[policy.office-by-expression]
kind = "expression"
expression = "ip_in(request.ip, '10.0.0.0/8')"

[[route]]
host = "*"
path_prefix = "/admin"
upstream = "{up}"
flow = "{FLOW}"
policies = ["admins"]

[[route]]
host = "*"
path_prefix = "/office"
upstream = "{up}"
flow = "{FLOW}"
policies = ["office"]

[[route]]
host = "*"
path_prefix = "/cel-office"
upstream = "{up}"
flow = "{FLOW}"
policies = ["office-by-expression"]
"#,
        up = upstream.url()
    );
    let config = basic_config(&upstream.url(), &extra).replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\ntls = [{ cert = \"a.pem\", key = \"a.key\" }]\n",
    );
    std::fs::write(dir.path().join("flowgate.toml"), config).unwrap();
    std::fs::write(dir.path().join("users.toml"), users_file(&[&ALICE, &BOB])).unwrap();
    let gate = Flowgate::start_in(dir);
    let base = https_url(&gate, "a.test", "");

    for (lane, version) in [
        ("http/1.1", http::Version::HTTP_11),
        ("h2", http::Version::HTTP_2),
    ] {
        let build = |builder: reqwest::ClientBuilder| match version {
            http::Version::HTTP_11 => builder.http1_only(),
            _ => builder,
        };
        let bob = build(https_client(&ca, &gate).cookie_store(true))
            .build()
            .unwrap();
        let alice = build(https_client(&ca, &gate).cookie_store(true))
            .build()
            .unwrap();
        json_login(&bob, &base, "bob", BOB.password, "/").await;
        json_login(&alice, &base, "alice", ALICE.password, "/").await;
        let status = |client: &reqwest::Client, path: &str, forwarded: Option<&str>| {
            let mut request = client
                .get(format!("{base}{path}"))
                .header("accept", "application/json");
            if let Some(forwarded) = forwarded {
                request = request
                    .header("x-forwarded-for", forwarded)
                    .header("x-real-ip", forwarded)
                    .header("forwarded", format!("for={forwarded}"));
            }
            async move {
                let response = request.send().await.unwrap();
                assert_eq!(response.version(), version, "{lane}");
                response.status().as_u16()
            }
        };
        for path in [
            "/admin/x",
            "/%61dmin/x",
            "/x/../admin/x",
            "/admin/./x",
            "/ADMIN/../admin/x",
        ] {
            assert_eq!(status(&bob, path, None).await, 403, "{lane} {path}");
            assert_eq!(status(&alice, path, None).await, 200, "{lane} {path}");
        }
        assert_eq!(status(&bob, "/elsewhere", None).await, 200, "{lane}");
        // Nobody is at 10/8 here, whatever a client says of itself.
        for path in ["/office/x", "/cel-office/x"] {
            assert_eq!(status(&alice, path, None).await, 403, "{lane} {path}");
            assert_eq!(
                status(&alice, path, Some("10.1.2.3")).await,
                403,
                "{lane} {path}: a spoofed address was believed"
            );
        }
    }

    // The same policies pass for an office address that a trusted proxy
    // reports: the 403s above are the address's, not a broken policy's.
    let trusting = Flowgate::start(
        &basic_config(&upstream.url(), &extra).replace(
            "listen = \"127.0.0.1:0\"\n",
            "listen = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        ),
        &users_file(&[&ALICE]),
    );
    let alice = client();
    json_login(&alice, &trusting.url(""), "alice", ALICE.password, "/").await;
    for path in ["/office/x", "/cel-office/x"] {
        let from = |forwarded: &'static str| {
            alice
                .get(trusting.url(path))
                .header("accept", "application/json")
                .header("x-forwarded-for", forwarded)
                .send()
        };
        assert_eq!(from("10.1.2.3").await.unwrap().status(), 200, "{path}");
        assert_eq!(from("192.0.2.9").await.unwrap().status(), 403, "{path}");
    }
}
