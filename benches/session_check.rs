//! The per-request session check, `gate::signed_in`: find the session cookie
//! among the request's cookies, check its HMAC, look the id up in the
//! store, push its idle deadline and resolve its user in the directory.
//! Every proxied request pays this before anything else.
//!
//!     cargo bench --bench session_check
//!
//! The gateway is built from a config string as `App::new` builds it; the
//! sessions are put straight into its store, signed with the same secret.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::{HeaderValue, COOKIE};
use http::HeaderMap;

use flowgate::app::Shared;
use flowgate::identity::Identity;
use flowgate::metrics::Metrics;
use flowgate::session::{
    now_secs, random_token, CookieSigner, MemoryBackend, Session, Store, StoreOptions,
};
use flowgate::Gateway;

const SECRET: &str = "a bench secret that is long enough to sign cookies with";
/// Other signed-in users in the store, so the lookup is not into a map of one.
const OTHER_SESSIONS: usize = 1000;

fn identity(name: &str) -> Identity {
    Identity {
        username: name.into(),
        name: format!("{name} Example"),
        email: format!("{name}@example.com"),
        groups: vec!["staff".into(), "admins".into()],
        uid: format!("{:064x}", name.len()),
        pk: 1,
        is_superuser: false,
        header_values: Default::default(),
    }
}

fn headers(cookie: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(cookie) = cookie {
        headers.insert(
            COOKIE,
            HeaderValue::from_str(cookie).expect("a valid header"),
        );
    }
    headers
}

fn session_check(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temp dir");
    // The session's user is resolved against the directory on every check.
    std::fs::write(
        dir.path().join("users.toml"),
        "[[user]]\nusername = \"bench\"\n",
    )
    .expect("a users file");
    let src = format!(
        "[session]\nsecret = \"{SECRET}\"\n\n[[route]]\nupstream = \"http://127.0.0.1:9\"\n"
    );
    let path = dir.path().join("flowgate.toml");
    let config = flowgate::config::from_str(&src, Path::new(&path), &|_| None)
        .unwrap_or_else(|errors| panic!("bench config rejected: {errors}"));
    let lifetime = config.session.lifetime;
    let ttl = config.session.idle_timeout;

    let store = Arc::new(Store::new(
        Arc::new(MemoryBackend::new(config.session.max_pre_auth)),
        StoreOptions::for_idle(ttl),
    ));
    let shared = Shared {
        sessions: store.clone(),
        fallback_secret: random_token().into_bytes(),
        metrics: Arc::new(Metrics::new()),
        client_starts: Arc::default(),
    };
    let gateway = Gateway::new(config, &shared).expect("the gateway builds");
    let signer = CookieSigner::new(SECRET.as_bytes());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let id = random_token();
    runtime.block_on(async {
        for i in 0..OTHER_SESSIONS {
            let other = Session::authenticated(identity(&format!("user{i}")), now_secs(), lifetime);
            store.put(&random_token(), &other, ttl).await.expect("put");
        }
        let mine = Session::authenticated(identity("bench"), now_secs(), lifetime);
        store.put(&id, &mine, ttl).await.expect("put");
    });

    let valid = signer.sign(&id);
    let mut tampered = valid.clone();
    // Flip one character of the id: the MAC no longer matches.
    let first = if tampered.starts_with('A') { "B" } else { "A" };
    tampered.replace_range(..1, first);
    let unknown = signer.sign(&random_token());
    let realistic = format!(
        "_ga=GA1.1.1234567890.1732000000; _gid=GA1.1.987654321.1732000000; theme=dark; \
         lang=en-GB; csrftoken=Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4; \
         flowgate_session_csrf={}; flowgate_session={valid}; \
         _pk_id.1.1fff=0123456789abcdef.1732000000.; consent=analytics%3Dno%26ads%3Dno",
        random_token()
    );

    let cases = [
        (
            "valid_cookie",
            headers(Some(&format!("flowgate_session={valid}"))),
            true,
        ),
        ("realistic_cookie_header", headers(Some(&realistic)), true),
        (
            "tampered_cookie",
            headers(Some(&format!("flowgate_session={tampered}"))),
            false,
        ),
        (
            "signed_unknown_id",
            headers(Some(&format!("flowgate_session={unknown}"))),
            false,
        ),
        ("no_cookie", headers(None), false),
    ];

    let mut group = c.benchmark_group("session_check");
    for (name, headers, signed_in) in &cases {
        // A bench that quietly measured the wrong branch would mislead.
        let found = runtime
            .block_on(flowgate::gate::signed_in(&gateway, headers))
            .expect("the memory store answers");
        assert_eq!(found.is_some(), *signed_in, "{name}: unexpected outcome");
        group.bench_function(*name, |b| {
            b.to_async(&runtime)
                .iter(|| flowgate::gate::signed_in(&gateway, black_box(headers)))
        });
    }
    group.finish();
    drop(dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = session_check
}
criterion_main!(benches);
