//! Who is at a login page or the flow executor API. A visitor whose cookie
//! names a stored session is that session; anyone else gets a fresh id in
//! a signed cookie and a pre-auth session that lives only in this request.
//! It is stored when the flow's state first moves (an answer, or a stage
//! that passed by itself), so showing a challenge costs no memory and a
//! flood of page loads fills nothing. What a page needs to be answered
//! without stored state is derived from the id under the cookie secret:
//! the CSRF token, and the flow ids of login pages.

use std::time::Duration;

use http::header::{HeaderValue, SET_COOKIE};
use http::{HeaderMap, Response};

use crate::context::Context;
use crate::gateway::Gateway;
use crate::session::{now_secs, Session, StoreError};
use crate::Body;

/// The person signing in, with the session they hold or will hold.
pub struct Visitor {
    pub id: String,
    pub session: Session,
    /// The store has this session. A new visitor's is stored by `keep`.
    pub stored: bool,
    /// The cookie a new visitor is given with the answer (`give_cookie`).
    cookie: Option<HeaderValue>,
    /// The executor's memo on this browser (`FlowRequest::memo`).
    pub memo: Option<serde_json::Value>,
}

/// Why a visitor's login could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum PreAuthError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `session.max_pre_auth_per_client` logins from this address already.
    #[error("too many logins started from {0}")]
    Client(std::net::IpAddr),
}

/// The visitor this request comes from: the stored session its cookie
/// names, or a pre-auth session not stored yet, under the id of a signed
/// cookie we gave out earlier (its flow not answered yet, or expired) or
/// under a new id, whose cookie `give_cookie` sets.
pub async fn visitor(gateway: &Gateway, context: &Context, headers: &HeaderMap) -> Visitor {
    let found = super::lookup(gateway, headers).await;
    let memo = super::cookie::read_memo(gateway, headers);
    if let Some((id, session)) = found.stored {
        return Visitor {
            id,
            session,
            stored: true,
            cookie: None,
            memo,
        };
    }
    let (id, cookie) = match found.unstored {
        Some(id) => (id, None),
        None => {
            let id = crate::session::random_token();
            let cookie = super::cookie::cookie_header(gateway, context, &id, None);
            (id, cookie)
        }
    };
    let mut session = Session::pre_auth(now_secs(), gateway.config.session.pre_auth_ttl);
    session.csrf = gateway.signer.derive("pre-auth csrf", &id);
    Visitor {
        id,
        session,
        stored: false,
        cookie,
        memo,
    }
}

impl Visitor {
    /// The answer, with the new visitor's cookie unless a login on the way
    /// set the session cookie already (a minted session supersedes it).
    pub fn give_cookie(&self, gateway: &Gateway, mut response: Response<Body>) -> Response<Body> {
        let Some(cookie) = &self.cookie else {
            return response;
        };
        let prefix = format!("{}=", gateway.config.session.cookie_name);
        let minted = response
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .any(|v| v.as_bytes().starts_with(prefix.as_bytes()));
        if !minted {
            response.headers_mut().append(SET_COOKIE, cookie.clone());
        }
        response
    }

    /// A new login page's flow id: a nonce and its MAC under this visitor's
    /// id, so a page whose flow was never stored can still be told from a
    /// URL made up or carried over from another browser.
    pub fn new_fid(&self, gateway: &Gateway) -> String {
        let nonce = &crate::session::random_token()[..22];
        let tag = gateway
            .signer
            .derive("flow id", &format!("{}.{nonce}", self.id));
        format!("{nonce}.{tag}")
    }

    /// `fid` was made by `new_fid` for this visitor.
    pub fn owns_fid(&self, gateway: &Gateway, fid: &str) -> bool {
        let Some((nonce, tag)) = fid.split_once('.') else {
            return false;
        };
        let expected = gateway
            .signer
            .derive("flow id", &format!("{}.{nonce}", self.id));
        crate::session::tokens_equal(tag, &expected)
    }

    /// Store the session as it is now. A visitor not stored yet is counted
    /// first against `session.max_pre_auth_per_client` for their address
    /// (and the store's `max_pre_auth` in total).
    pub async fn keep(&mut self, gateway: &Gateway, context: &Context) -> Result<(), PreAuthError> {
        let config = &gateway.config.session;
        let now = now_secs();
        if !self.stored {
            let admitted = gateway.client_starts.admit(
                context.client_ip,
                config.max_pre_auth_per_client,
                config.pre_auth_ttl.as_secs(),
                now,
            );
            if !admitted {
                return Err(PreAuthError::Client(context.client_ip));
            }
        }
        let ttl = if self.session.identity.is_some() {
            super::cookie::idle_ttl(gateway, &self.session)
        } else {
            Duration::from_secs(self.session.expires.saturating_sub(now))
        };
        gateway.sessions.put(&self.id, &self.session, ttl).await?;
        self.stored = true;
        Ok(())
    }
}
