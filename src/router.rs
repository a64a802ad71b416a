//! The request path, top to bottom. Every request of the general path
//! (hyper: HTTP/2, TLS, bodies, upgrades) goes through `handle`; the fast
//! lane (`proxy::h1`) takes the same steps for the requests it serves.
//!
//! ```text
//! accept (listener) ─► context ─► host, canonical path ─► session ─► decide ─┬─ forward (proxy) ─► respond ─► log
//!                                      │ malformed: 400                      ├─ reserved: login page, executor API, sign-out, static
//!                                                                            ├─ sign in / step up: 302 to the flow (pages) or 401 (API)
//!                                                                            └─ 400 (path the route refuses), 403, 404
//! ```
//!
//! Each step is one function in its own module; this file only decides the
//! order. Nothing here blocks or holds a lock across an `.await`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use http::header::ACCEPT;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::access_log::AccessLine;
use crate::context::{Connection, Context};
use crate::gate::{Canonical, Verdict};
use crate::gateway::Gateway;
use crate::identity::Identity;
use crate::respond::Audience;
use crate::upstream::ConnSlot;
use crate::Body;

impl Gateway {
    /// Serve one request. Never fails: every error has its page or JSON.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        connection: Connection,
        slot: &ConnSlot,
    ) -> Response<Body> {
        let started = Instant::now();
        let context = Context::of(&self, &request, connection);
        // Kept for the access log only when there is one.
        let logged = self
            .config
            .log
            .access
            .then(|| (request.method().clone(), request.uri().path().to_owned()));
        let (response, user, route) = self.dispatch(request, &context, slot).await;
        let elapsed = started.elapsed();
        let series = route
            .and_then(|i| self.route_metrics.get(i))
            .unwrap_or(&self.metrics.unrouted);
        series.observe(response.status().as_u16(), elapsed);
        if let Some((method, path)) = logged {
            AccessLine {
                client: context.client_ip,
                host: &context.host,
                method: method.as_str(),
                path: &path,
                status: response.status().as_u16(),
                route,
                user: user.as_ref().map(|i| i.username.as_str()),
            }
            .log(elapsed);
        }
        response
    }

    async fn dispatch(
        &self,
        request: Request<Incoming>,
        context: &Context,
        slot: &ConnSlot,
    ) -> (Response<Body>, Option<Arc<Identity>>, Option<usize>) {
        let headers = request.headers();
        let audience = Audience::of(headers.get(ACCEPT).map(|v| v.as_bytes()));
        if let Some(problem) = crate::context::host_problem(&request) {
            return (self.bad_request(audience, problem), None, None);
        }
        let path = match Canonical::path(request.uri().path(), request.uri().query()) {
            Ok(path) => path,
            Err(malformed) => return (self.bad_request(audience, malformed.reason()), None, None),
        };
        // A store that cannot answer leaves the request anonymous: a public
        // path still goes through, one that needs a session gets a 503
        // (below), not a sign-in its answer could not be stored for.
        let (signed_in, store_down) = match crate::gate::signed_in(self, headers).await {
            Ok(signed_in) => (signed_in, false),
            Err(_) => (None, true),
        };
        let method = request.method().as_str();
        let facts = crate::gate::Request {
            method,
            host: &context.host,
            path: &path,
            navigation: crate::gate::is_navigation(
                method,
                headers.contains_key("x-requested-with"),
                headers.get("sec-fetch-mode").map(|v| v.as_bytes()),
                headers.get(ACCEPT).map(|v| v.as_bytes()),
            ),
            preflight: crate::gate::is_preflight(
                method,
                headers.contains_key(http::header::ORIGIN),
                headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD),
            ),
            client_ip: context.client_ip,
            https: context.https,
            headers: Some(headers),
        };
        let prefix = self.config.server.prefix.as_str();
        let verdict = crate::gate::decide(&self.config.routes, prefix, &facts, signed_in.as_ref());
        let route = verdict.route();
        let response = match verdict {
            Verdict::Forward { route, identity } => {
                // The upstream gets the path decided on: a new request
                // target only when the canonical one differs.
                let target = match &path.path {
                    Cow::Owned(_) => Some(path.target().into_owned()),
                    Cow::Borrowed(_) => None,
                };
                // Watched only when forwarded as someone: a public path
                // outlives nobody's session.
                let session = signed_in
                    .as_ref()
                    .filter(|_| identity.is_some())
                    .map(|s| s.id.clone());
                let response = crate::proxy::forward(
                    self,
                    route,
                    request,
                    context,
                    target,
                    identity.as_deref(),
                    session,
                    audience,
                    slot,
                )
                .await;
                return (response, identity, Some(route));
            }
            Verdict::Reserved => {
                let rest = path.without_parameters()[prefix.len()..].to_owned();
                // Boxed: the login pages' and executor's futures are large, and
                // the proxied path should not carry (and move) their size.
                return (
                    Box::pin(self.reserved(request, context, &rest)).await,
                    None,
                    None,
                );
            }
            Verdict::Refused(why) => self.bad_request(audience, why),
            Verdict::NoRoute => self.not_found(audience),
            Verdict::SignIn { .. } | Verdict::StepUp { .. } | Verdict::Unauthorized { .. }
                if store_down =>
            {
                self.store_unavailable(audience)
            }
            Verdict::SignIn { flow, .. } | Verdict::StepUp { flow, .. } => {
                crate::respond::to_login(&crate::gate::login_url(prefix, flow, &path.target()))
            }
            Verdict::Unauthorized { flow, step_up, .. } => crate::respond::unauthorized(
                &crate::gate::login_url(prefix, flow, &path.target()),
                &crate::gate::executor_url(prefix, flow),
                step_up,
            ),
            Verdict::Forbidden { identity, .. } => {
                let response = self.forbidden(audience, &identity, &path.target());
                return (response, Some(identity), route);
            }
            Verdict::NeedsHeaders { .. } => {
                unreachable!("the general path decides with the request's headers")
            }
        };
        (response, None, route)
    }

    /// Everything under the reserved prefix belongs to flowgate, on any
    /// host; `rest` is the canonical path after the prefix.
    async fn reserved(
        &self,
        request: Request<Incoming>,
        context: &Context,
        rest: &str,
    ) -> Response<Body> {
        if let Some(flow_path) = rest.strip_prefix("/flow/") {
            return crate::login::page(self, request, context, flow_path).await;
        }
        if let Some(slug_path) = rest.strip_prefix("/api/v3/flows/executor/") {
            return crate::api::executor(self, request, context, slug_path).await;
        }
        match rest {
            "/api/v3/core/users/me/" => crate::api::users_me(self, &request).await,
            "/sign_out" => crate::login::sign_out(self, request, context).await,
            "/static/flowgate.css" => crate::respond::static_css(),
            _ => self.page(
                StatusCode::NOT_FOUND,
                "Not found",
                "There is nothing at this address.",
                None,
            ),
        }
    }
}
