//! The h2c helper of `common::h2` against the real binary: an anonymous
//! request is answered as over HTTP/1.1, a signed-in one reaches the
//! upstream with its `:path` byte for byte, and a target `http::Uri` will
//! not carry comes back as an error, not a panic.

mod common;

use common::h2::*;
use common::raw::*;

#[test]
fn an_anonymous_h2c_get_is_answered_as_the_http1_one_is() {
    let rig = Rig::start(|_| Reply::keep(ok("fine")));
    let mut http1 = rig.client();
    // An API client gets a 401, a browser navigation the login redirect.
    for (accept, status) in [(None, 401), (Some("Accept: text/html"), 302)] {
        let headers: Vec<&str> = accept.into_iter().collect();
        let h2 = h2c_send_blocking(rig.gate.addr, "GET", "/", &headers, b"").unwrap();
        http1.send(request("GET", "/", &headers));
        let one = http1.response("GET");
        assert_eq!(h2.status, status, "{:?}", h2.headers);
        assert_eq!(one.status, status, "{}", one.head);
        assert_eq!(
            h2.header("location"),
            one.header("location"),
            "{:?}",
            h2.headers
        );
        if one.header("connection") == Some("close") {
            http1 = rig.client();
        }
    }
    assert!(rig.upstream.seen().is_empty(), "{:?}", rig.upstream.seen());
}

#[test]
fn a_signed_in_h2c_get_reaches_the_upstream_with_its_path_as_sent() {
    let rig = Rig::start(|seen| Reply::keep(ok(&format!("body of {}", seen.target()))));
    let target = "/h2/raw%20path?q=a%20b&x=1";
    let cookie = rig.cookie_header();
    let response = h2c_send_blocking(rig.gate.addr, "GET", target, &[&cookie], b"").unwrap();
    assert_eq!(response.status, 200, "{:?}", response.headers);
    assert_eq!(response.text(), format!("body of {target}"));
    assert_eq!(targets(&rig.upstream.seen()), [target]);
}

#[test]
fn a_target_http_uri_refuses_or_would_change_is_an_error() {
    // A port nothing listens on: refused, should anything get that far.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for target in ["/a b", "/a<b", "/admin#x", "admin", ""] {
        match h2c_send_blocking(nowhere, "GET", target, &[], b"") {
            Err(H2Error::Target(_)) => {}
            other => panic!("{target:?}: {other:?}"),
        }
    }
    // A backslash, on the other hand, `http::Uri` takes as it is.
    assert!(matches!(
        h2c_send_blocking(nowhere, "GET", "/admin\\", &[], b""),
        Err(H2Error::Connect(_))
    ));
}
