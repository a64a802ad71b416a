//! The raw-socket HTTP/1.1 kit: a client that sends requests byte for byte
//! (the request-target exactly as written) and reads framed responses, and a
//! scripted upstream that records every request and answers with given bytes.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{basic_config, signed_in, users_file, Flowgate, ALICE};

/// The `Host` raw requests carry unless a test gives its own.
pub const HOST: &str = "edge.test";

/// A scripted upstream and a flowgate in front of it, with alice signed in.
pub struct Rig {
    pub gate: Flowgate,
    pub upstream: Scripted,
    /// `flowgate_session=…`, alone.
    pub cookie: String,
}

impl Rig {
    /// `handler` as the upstream, behind a flowgate on `basic_config`.
    pub fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Rig {
        let upstream = Scripted::start(handler);
        let config = basic_config(&upstream.url(), "");
        Rig::with(upstream, &config)
    }

    /// `upstream` behind a flowgate on `config` (which routes to it).
    pub fn with(upstream: Scripted, config: &str) -> Rig {
        let gate = Flowgate::start(config, &users_file(&[&ALICE]));
        let cookie = session_cookie(&gate);
        Rig {
            gate,
            upstream,
            cookie,
        }
    }

    /// A new raw connection to the flowgate.
    pub fn client(&self) -> Client {
        Client::connect(self.gate.addr)
    }

    /// `Cookie: flowgate_session=…`, for a request's header list.
    pub fn cookie_header(&self) -> String {
        format!("Cookie: {}", self.cookie)
    }

    /// A request carrying alice's session.
    pub fn request(&self, method: &str, path: &str, headers: &[&str]) -> String {
        let cookie = self.cookie_header();
        let mut all = vec![cookie.as_str()];
        all.extend_from_slice(headers);
        request(method, path, &all)
    }

    /// A GET carrying alice's session.
    pub fn get(&self, path: &str, headers: &[&str]) -> String {
        self.request("GET", path, headers)
    }
}

/// Log alice in through the JSON API; her session cookie, alone.
pub fn session_cookie(gate: &Flowgate) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cookies = runtime.block_on(async {
        let (_client, cookies) = signed_in(gate, &ALICE).await;
        cookies
    });
    cookies
        .split("; ")
        .find(|c| c.starts_with("flowgate_session="))
        .expect("a session cookie")
        .to_owned()
}

/// A request head (and nothing else): `Host: edge.test` unless `headers`
/// has a Host of its own.
pub fn request(method: &str, path: &str, headers: &[&str]) -> String {
    let mut text = format!("{method} {path} HTTP/1.1\r\n");
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"))
    {
        text.push_str(&format!("Host: {HOST}\r\n"));
    }
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text
}

/// A 200 with a Content-Length.
pub fn ok(body: &str) -> Vec<u8> {
    ok_with(body, &[])
}

/// A 200 with a Content-Length and `headers` (`"Name: value"`) too.
pub fn ok_with(body: &str, headers: &[&str]) -> Vec<u8> {
    let mut text = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n",
        body.len()
    );
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text.push_str(body);
    text.into_bytes()
}

/// `pieces` as a chunked body, terminated.
pub fn chunked(pieces: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in pieces {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// `len` printable bytes that do not repeat within short distances.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[(i * 7 + i / 36) % 36])
        .collect()
}

/// The request-target of each request, in order.
pub fn targets(seen: &[Seen]) -> Vec<String> {
    seen.iter().map(|s| s.target().to_owned()).collect()
}

// --- the byte reader both sides share --------------------------------------

/// A stream and what has been read from it but not consumed yet.
pub struct Wire {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

impl Wire {
    pub fn new(stream: TcpStream) -> Wire {
        Wire {
            stream,
            buf: Vec::new(),
        }
    }

    /// Read more into the buffer; `Ok(0)` when the peer closed.
    pub fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// A message head up to and including its blank line; `None` if the
    /// peer closed before sending any of it.
    pub fn read_head(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return Ok(Some(String::from_utf8_lossy(&head).into_owned()));
            }
            if self.fill()? == 0 {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        format!("closed mid-head: {:?}", String::from_utf8_lossy(&self.buf)),
                    )),
                };
            }
        }
    }

    pub fn take(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("closed with {} of {n} bytes", self.buf.len()),
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// One line without its CRLF.
    pub fn line(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            if self.fill()? == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// A chunked body: its bytes and its trailer fields.
    pub fn chunked(&mut self) -> std::io::Result<(Vec<u8>, Fields)> {
        let mut body = Vec::new();
        loop {
            let line = self.line()?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(ErrorKind::InvalidData, format!("chunk size {line:?}"))
            })?;
            if size == 0 {
                let mut trailers = Vec::new();
                loop {
                    let line = self.line()?;
                    if line.is_empty() {
                        return Ok((body, trailers));
                    }
                    trailers.extend(parse_field(&line));
                }
            }
            body.extend(self.take(size)?);
            if self.take(2)? != b"\r\n" {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    "chunk not followed by CRLF",
                ));
            }
        }
    }

    pub fn until_close(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            match self.fill() {
                Ok(0) => return Ok(std::mem::take(&mut self.buf)),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return Ok(std::mem::take(&mut self.buf))
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Header fields as (lower-case name, value), in order.
pub type Fields = Vec<(String, String)>;

/// Where `needle` first starts in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `Name: value` as (lower-case name, trimmed value).
pub fn parse_field(line: &str) -> Option<(String, String)> {
    let (name, value) = line.split_once(':')?;
    Some((name.to_ascii_lowercase(), value.trim().to_owned()))
}

/// The header fields of a message head (its first line skipped).
pub fn fields(head: &str) -> Fields {
    head.split("\r\n").skip(1).filter_map(parse_field).collect()
}

// --- the raw client ----------------------------------------------------------

/// How a response's body was delimited.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Framing {
    /// No body by definition (HEAD, 1xx, 204, 304).
    None,
    Length(usize),
    Chunked,
    /// Until the connection closed.
    Close,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub headers: Fields,
    pub body: Vec<u8>,
    pub trailers: Fields,
    pub framing: Framing,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP/1.1 client connection to flowgate: `send` writes bytes as
/// given, `response` reads one framed response. Reads time out after 5 s.
pub struct Client {
    pub wire: Wire,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to flowgate");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Client {
            wire: Wire::new(stream),
        }
    }

    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.wire
            .stream
            .write_all(bytes.as_ref())
            .expect("write to flowgate");
    }

    /// The next response on the connection (an interim 1xx counts as one),
    /// read as a client that sent `method` frames it.
    pub fn response(&mut self, method: &str) -> Response {
        let head = match self.wire.read_head() {
            Ok(Some(head)) => head,
            Ok(None) => panic!("flowgate closed the connection instead of answering"),
            Err(e) => panic!("no response head: {e}"),
        };
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {head:?}"));
        assert!(head.starts_with("HTTP/1.1 "), "{head}");
        let headers = fields(&head);
        let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        let framing = if method == "HEAD" || status < 200 || status == 204 || status == 304 {
            Framing::None
        } else if get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked
        } else if let Some(length) = get("content-length") {
            Framing::Length(length.parse().expect("a numeric Content-Length"))
        } else {
            Framing::Close
        };
        let (body, trailers) = match framing {
            Framing::None => (Vec::new(), Vec::new()),
            Framing::Length(n) => (self.wire.take(n).expect("the whole body"), Vec::new()),
            Framing::Chunked => self.wire.chunked().expect("a well-formed chunked body"),
            Framing::Close => (
                self.wire.until_close().expect("the body until close"),
                Vec::new(),
            ),
        };
        Response {
            status,
            head,
            headers,
            body,
            trailers,
            framing,
        }
    }

    /// flowgate closes the connection, sending nothing more.
    pub fn expect_closed(&mut self) {
        let rest = self.wire.until_close().expect("the connection to close");
        assert!(
            rest.is_empty(),
            "bytes after the response: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    /// Nothing more arrives for `wait`: no stray body bytes, no close.
    pub fn expect_quiet(&mut self, wait: Duration) {
        assert!(
            self.wire.buf.is_empty(),
            "stray bytes: {:?}",
            String::from_utf8_lossy(&self.wire.buf)
        );
        self.wire.stream.set_read_timeout(Some(wait)).unwrap();
        let mut byte = [0u8; 1];
        match self.wire.stream.peek(&mut byte) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Ok(0) => panic!("flowgate closed the connection"),
            other => panic!("expected silence, got {other:?}"),
        }
        self.wire
            .stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
    }
}

// --- the scripted upstream ---------------------------------------------------

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which upstream connection (0, 1, … in accept order).
    pub conn: usize,
    pub head: String,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn method(&self) -> &str {
        self.head.split(' ').next().unwrap_or("")
    }

    /// The request target, exactly as sent.
    pub fn target(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }

    /// Header names as sent, lower-cased, in order.
    pub fn names(&self) -> Vec<String> {
        fields(&self.head).into_iter().map(|(n, _)| n).collect()
    }

    pub fn all(&self, name: &str) -> Vec<String> {
        fields(&self.head)
            .into_iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v)
            .collect()
    }
}

/// What the upstream does after writing a reply.
#[derive(Debug, Clone, Copy)]
pub enum After {
    KeepAlive,
    Close,
    /// Keep the connection, but close it once idle this long.
    CloseWhenIdleFor(Duration),
    /// Write nothing (the reply is empty) and hold the connection open.
    Hang,
}

/// The upstream's answer to one request: raw bytes, written in pieces a
/// little apart (so they arrive as separate reads), then `after`.
pub struct Reply {
    pub pieces: Vec<Vec<u8>>,
    pub after: After,
}

impl Reply {
    pub fn keep(bytes: Vec<u8>) -> Reply {
        Reply::pieces(vec![bytes])
    }

    pub fn pieces(pieces: Vec<Vec<u8>>) -> Reply {
        Reply {
            pieces,
            after: After::KeepAlive,
        }
    }

    pub fn hang() -> Reply {
        Reply {
            pieces: Vec::new(),
            after: After::Hang,
        }
    }

    pub fn then(self, after: After) -> Reply {
        Reply { after, ..self }
    }
}

pub type Handler = dyn Fn(&Seen) -> Reply + Send + Sync;

/// A raw-TCP HTTP/1.1 upstream on 127.0.0.1 answering with scripted bytes.
pub struct Scripted {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stopped: Arc<AtomicBool>,
    /// Set once the listener is gone (after `start_limited`'s last accept).
    closed: Arc<AtomicBool>,
}

impl Scripted {
    pub fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Scripted {
        Scripted::start_limited(handler, usize::MAX)
    }

    /// Accept `max_connections`, then close the listening socket.
    pub fn start_limited(
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
        max_connections: usize,
    ) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stopped = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let accepted = AtomicUsize::new(0);
        {
            let (seen, stopped, closed) = (seen.clone(), stopped.clone(), closed.clone());
            std::thread::spawn(move || {
                while accepted.load(Ordering::SeqCst) < max_connections {
                    let Ok((stream, _)) = listener.accept() else {
                        break;
                    };
                    if stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    let conn = accepted.fetch_add(1, Ordering::SeqCst);
                    let (handler, seen) = (handler.clone(), seen.clone());
                    std::thread::spawn(move || serve_upstream(stream, conn, &*handler, &seen));
                }
                drop(listener);
                closed.store(true, Ordering::SeqCst);
            });
        }
        Scripted {
            addr,
            seen,
            stopped,
            closed,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Wait until the listening socket is closed.
    pub fn wait_closed(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.closed.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the upstream listener stays open"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        // Wake the accept loop so that it ends.
        self.stopped.store(true, Ordering::SeqCst);
        if !self.closed.load(Ordering::SeqCst) {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        }
    }
}

/// Pause between the pieces of one reply.
pub const PIECE_GAP: Duration = Duration::from_millis(15);

/// Serve one upstream connection: read each request, record it in `seen`,
/// write `handler`'s reply, and keep, close or hold the connection as it says.
pub fn serve_upstream(stream: TcpStream, conn: usize, handler: &Handler, seen: &Mutex<Vec<Seen>>) {
    // Threads end when flowgate closes its side, or after this at the latest.
    let patience = Duration::from_secs(20);
    stream.set_read_timeout(Some(patience)).unwrap();
    let mut wire = Wire::new(stream);
    loop {
        let Ok(Some(head)) = wire.read_head() else {
            return;
        };
        let fields = fields(&head);
        let get = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let body = if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            match wire.chunked() {
                Ok((body, _)) => body,
                Err(_) => return,
            }
        } else if let Some(length) = get("content-length") {
            match wire.take(length.parse().unwrap_or(0)) {
                Ok(body) => body,
                Err(_) => return,
            }
        } else {
            Vec::new()
        };
        let request = Seen { conn, head, body };
        seen.lock().unwrap().push(request.clone());
        let reply = handler(&request);
        for (i, piece) in reply.pieces.iter().enumerate() {
            if i > 0 {
                std::thread::sleep(PIECE_GAP);
            }
            if wire.stream.write_all(piece).is_err() {
                return;
            }
        }
        match reply.after {
            After::KeepAlive => {}
            After::Close => {
                let _ = wire.stream.shutdown(Shutdown::Both);
                return;
            }
            After::CloseWhenIdleFor(idle) => {
                wire.stream.set_read_timeout(Some(idle)).unwrap();
                let mut byte = [0u8; 1];
                let next_request =
                    !wire.buf.is_empty() || matches!(wire.stream.peek(&mut byte), Ok(n) if n > 0);
                if !next_request {
                    let _ = wire.stream.shutdown(Shutdown::Both);
                    return;
                }
                wire.stream.set_read_timeout(Some(patience)).unwrap();
            }
            After::Hang => {
                let _ = wire.until_close();
                return;
            }
        }
    }
}
