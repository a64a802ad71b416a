//! Upstream apps for the long-lived exchanges: a websocket echo app, a
//! plain HTTP/1.1 app answering with any handler, and a response body fed
//! from a channel (server-sent events as the test sends them).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::Flowgate;

/// A websocket app: greets the user flowgate names, then echoes every text
/// and binary message. Keeps the headers of every handshake it accepted.
pub struct WsUpstream {
    pub addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<HeaderMap>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WsUpstream {
    // The handshake callback's error type is tungstenite's, large or not.
    #[allow(clippy::result_large_err)]
    pub async fn start() -> WsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut user = String::new();
                    let accepted = tokio_tungstenite::accept_hdr_async(
                        stream,
                        |request: &tungstenite::handshake::server::Request,
                         response: tungstenite::handshake::server::Response| {
                            user = request
                                .headers()
                                .get("x-forwarded-user")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("nobody")
                                .to_owned();
                            seen.lock().unwrap().push(request.headers().clone());
                            Ok(response)
                        },
                    )
                    .await;
                    let Ok(mut ws) = accepted else { return };
                    if ws
                        .send(Message::text(format!("hello {user}")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    while let Some(Ok(message)) = ws.next().await {
                        if (message.is_text() || message.is_binary())
                            && ws.send(message).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        WsUpstream {
            addr,
            handshakes,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn handshakes(&self) -> Vec<HeaderMap> {
        self.handshakes.lock().unwrap().clone()
    }
}

impl Drop for WsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A websocket handshake to flowgate over a plain TCP connection, as a
/// browser's would be, with `cookie` if given.
pub async fn ws_connect(
    gate: &Flowgate,
    cookie: Option<&str>,
) -> Result<WebSocketStream<TcpStream>, tungstenite::Error> {
    let mut request = format!("ws://{}/ws/chat", gate.addr)
        .into_client_request()
        .unwrap();
    if let Some(cookie) = cookie {
        request
            .headers_mut()
            .insert("cookie", cookie.parse().unwrap());
    }
    let stream = TcpStream::connect(gate.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    Ok(ws)
}

pub async fn next_message(ws: &mut WebSocketStream<TcpStream>) -> Message {
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a message within 10 s")
        .expect("the websocket is still open")
        .expect("a well-formed message")
}

/// A response body fed from a channel, one frame per message.
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// A plain HTTP/1.1 app in this test's runtime, answering with `handler`.
pub struct App {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    pub async fn start<F, Fut, B>(handler: F) -> App
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let response = handler(request);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        App { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}
