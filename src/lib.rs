//! flowgate: an authenticating reverse-proxy gateway. A request with a valid
//! session goes to its upstream with the user's identity in headers; one
//! without runs a login flow through an authentik-compatible executor.
//!
//! The request path is laid out in `router` (read it first); the decision
//! is `gate::decide`, for every lane; the seams are
//! `flow::FlowExecutor`, `session::Store` (over a `session::Backend`) and `directory::Directory`.

mod access_log;
pub mod admin;
pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod context;
pub mod demo;
pub mod directory;
pub mod engine;
pub mod executor_api;
pub mod expression;
pub mod flow;
pub mod gate;
pub mod gateway;
pub mod identity;
pub mod listener;
pub mod login;
pub mod metrics;
pub mod pages;
pub mod proxy;
pub mod redirect;
pub mod remote;
pub mod respond;
pub mod router;
pub mod session;
pub mod signin;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};

pub use gateway::Gateway;

/// Every response body flowgate sends: an upstream's streamed body, or one of
/// its own (pages, JSON) in one piece.
pub type Body = Either<proxy::Streamed, Full<Bytes>>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Right(Full::new(bytes.into()))
}

pub(crate) fn empty() -> Body {
    Either::Right(Full::new(Bytes::new()))
}

/// Build the running gateway for a validated config read from
/// `config_path` (reloads read that file again).
pub fn build(
    config: config::Config,
    config_path: Option<std::path::PathBuf>,
) -> Result<Arc<app::App>, String> {
    app::App::new(config, config_path)
}
