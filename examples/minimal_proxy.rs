//! A yardstick, not a product: about the least an HTTP/1.1 keep-alive
//! reverse proxy can do per request on tokio, with one thread. No session,
//! no routing, no limits, no error pages; `Content-Length` responses only.
//! Each client connection reads a request head, writes it upstream with the
//! `Host` replaced and one header added, on an upstream connection of its
//! own, and copies the response back.
//!
//! BENCHMARKS.md measures it beside nginx and flowgate to show where the
//! floor is on a given machine:
//!
//! ```text
//! cargo run --release --example minimal_proxy -- 127.0.0.1:19290 127.0.0.1:19101
//! GATEWAY_URL=http://127.0.0.1:19290 benches/bench.sh compare
//! ```

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: minimal_proxy LISTEN_ADDR UPSTREAM_ADDR";
    let listen: SocketAddr = args.next().expect(usage).parse().expect(usage);
    let upstream: SocketAddr = args.next().expect(usage).parse().expect(usage);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await.expect("listen");
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            tokio::spawn(connection(client, upstream));
        }
    });
}

async fn connection(mut client: TcpStream, upstream: SocketAddr) -> Option<()> {
    let mut up: Option<TcpStream> = None;
    let mut request = vec![0u8; 16 * 1024];
    let mut response = vec![0u8; 16 * 1024];
    let mut out = Vec::with_capacity(4096);
    let host = format!("host: {upstream}\r\n");
    loop {
        let n = client.read(&mut request).await.ok().filter(|&n| n > 0)?;
        out.clear();
        {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut head = httparse::Request::new(&mut headers);
            if !head.parse(&request[..n]).ok()?.is_complete() {
                return None;
            }
            out.extend_from_slice(head.method?.as_bytes());
            out.push(b' ');
            out.extend_from_slice(head.path?.as_bytes());
            out.extend_from_slice(b" HTTP/1.1\r\n");
            out.extend_from_slice(host.as_bytes());
            for header in head.headers.iter() {
                if header.name.eq_ignore_ascii_case("host") {
                    continue;
                }
                out.extend_from_slice(header.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(header.value);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"x-forwarded-for: 127.0.0.1\r\n\r\n");
        }
        if up.is_none() {
            let stream = TcpStream::connect(upstream).await.ok()?;
            let _ = stream.set_nodelay(true);
            up = Some(stream);
        }
        let up = up.as_mut()?;
        up.write_all(&out).await.ok()?;
        let mut have = 0;
        let (head_len, length) = loop {
            let n = up
                .read(&mut response[have..])
                .await
                .ok()
                .filter(|&n| n > 0)?;
            have += n;
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut head = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(len) = head.parse(&response[..have]).ok()? else {
                continue;
            };
            out.clear();
            out.extend_from_slice(b"HTTP/1.1 ");
            out.extend_from_slice(head.code?.to_string().as_bytes());
            out.push(b' ');
            out.extend_from_slice(head.reason.unwrap_or("").as_bytes());
            out.extend_from_slice(b"\r\n");
            let mut length = 0usize;
            for header in head.headers.iter() {
                if header.name.eq_ignore_ascii_case("connection")
                    || header.name.eq_ignore_ascii_case("keep-alive")
                {
                    continue;
                }
                if header.name.eq_ignore_ascii_case("content-length") {
                    length = std::str::from_utf8(header.value).ok()?.parse().ok()?;
                }
                out.extend_from_slice(header.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(header.value);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            break (len, length);
        };
        let first = (have - head_len).min(length);
        out.extend_from_slice(&response[head_len..head_len + first]);
        client.write_all(&out).await.ok()?;
        let mut left = length - first;
        while left > 0 {
            let n = up.read(&mut response).await.ok().filter(|&n| n > 0)?;
            let n = n.min(left);
            client.write_all(&response[..n]).await.ok()?;
            left -= n;
        }
    }
}
