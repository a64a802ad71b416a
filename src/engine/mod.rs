//! The embedded flow executor: flows from the config, users from the
//! `Directory`, run in-process behind the `FlowExecutor` trait. It keeps the
//! wire behaviour of authentik's executor (PROTOCOL.md §1.4–§1.7): a stage
//! that passes with more to come answers `Step::Next` (the raw 302), invalid
//! input re-renders the stage with `response_errors`, a denied stage cancels
//! the plan, and the end of the plan is `xak-flow-redirect` to `next`.
//!
//! This file is the driver: it plans a flow and runs its stages in turn.
//! What each stage kind does is in `stages/<kind>.rs` behind the `Stage`
//! trait (`stage`); what they share is the plan's typed context (`plan`).
//! The plan lives in `FlowState` (the visitor's pre-auth session), never
//! here: the engine itself holds only config and services.

pub mod memo;
pub mod mfa;
pub mod plan;
pub mod policy;
pub mod stage;
pub mod stages;
mod throttle;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{
    Bindings, Config, DeniedAction, Designation, FlowAuthentication, FlowConfig,
    InvalidResponseAction, StageBinding, UserField,
};
use crate::directory::{Directory, TotpStep, User};
use crate::flow::{
    AccessDenied, Challenge, Component, FlowError, FlowExecutor, FlowInfo, FlowRequest, FlowState,
    FlowSummary, Login, Step,
};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::redirect::RedirectPolicy;
use crate::session::{now_secs, Store};
use plan::{LoginChoice, Plan, Planned, LOGIN, PENDING_USER_IDENTIFIER, SECOND_FACTOR};
use policy::{Facts, RequestFacts};
use stage::{Cx, Outcome, StageConfig};
pub use throttle::{Attempt, Throttle};

const FLOW_DOES_NOT_APPLY: &str = "Flow does not apply to current user.";
const INVALID_NEXT: &str = "Invalid next URL";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct EngineState {
    #[serde(default)]
    plan: Option<Plan>,
    /// After `Step::Done`: who logged in.
    #[serde(default)]
    logged_in: Option<String>,
    /// After `Step::Done`: with a second factor.
    #[serde(default)]
    second_factor: bool,
    /// After `Step::Done`: the longer lifetime chosen, in seconds.
    #[serde(default)]
    remember_secs: u64,
    /// After `Step::Done`: asked to stay signed in, the user said no.
    #[serde(default)]
    declined_remember: bool,
    /// After `Step::Done`: the flow ran a user-logout stage.
    #[serde(default)]
    logged_out: bool,
    /// After `Step::Done`: what the browser is to keep from now on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    memo: Option<memo::BrowserMemo>,
}

impl EngineState {
    fn read(state: &FlowState) -> EngineState {
        serde_json::from_value(state.0.clone()).unwrap_or_default()
    }

    fn write(&self, state: &mut FlowState) {
        *state = if self.plan.is_none() && self.logged_in.is_none() && !self.logged_out {
            FlowState::default()
        } else {
            FlowState(serde_json::to_value(self).unwrap_or(Value::Null))
        };
    }
}

/// What stages may use beyond their plan: the directory, the state store
/// and the throttle in front of every credential check.
pub struct Services {
    pub directory: Arc<dyn Directory>,
    /// Where one-time marks and per-user records go.
    pub state: Arc<Store>,
    /// Failures counted in the state store: a reload or a restart forgives
    /// nobody.
    throttle: Throttle,
    metrics: Option<Arc<Metrics>>,
    /// `server.prefix`: where flowgate's own pages are.
    pub prefix: String,
}

impl Services {
    /// A credential check the throttle lets through, or `None` when it
    /// refuses it unchecked (logged, one line).
    /// Counted against `account` (the username the identifier matched,
    /// whichever of its names was typed) or, for a name matching nobody,
    /// against the identifier itself.
    pub async fn attempt(
        &self,
        identifier: &str,
        account: Option<&str>,
        request: &FlowRequest<'_>,
    ) -> Option<Attempt<'_>> {
        let attempt = self
            .throttle
            .begin(account.unwrap_or(identifier), request.client_ip)
            .await;
        if attempt.is_none() {
            crate::login::log_failed(
                crate::login::FAILED_THROTTLED,
                identifier,
                request.client_ip,
                request.slug,
            );
        }
        attempt
    }

    /// A credential check failed: log it (one line, the name as typed),
    /// count it against the throttle and in the metrics.
    pub async fn failed(
        &self,
        reason: &'static str,
        identifier: &str,
        request: &FlowRequest<'_>,
        attempt: Attempt<'_>,
    ) {
        crate::login::log_failed(reason, identifier, request.client_ip, request.slug);
        attempt.failed().await;
        policy::reputation::record(&self.state, request.client_ip, Some(identifier), false).await;
        if let Some(metrics) = &self.metrics {
            metrics.logins_failed.inc();
        }
    }

    /// Whether `code` is good for one of `user`'s TOTP devices (the users
    /// file's and the store's) now, and not used before.
    pub async fn accept_totp(&self, user: &User, code: &str) -> bool {
        if user.disabled {
            return false;
        }
        let devices = match mfa::totp_devices(&self.state, user).await {
            Ok(devices) => devices,
            Err(error) => {
                tracing::warn!(%error, "TOTP devices cannot be read: the code is refused");
                return false;
            }
        };
        let now = now_secs();
        match devices.iter().find_map(|d| d.step_for(code, now)) {
            Some(matched) => {
                self.spend_totp(&user.username, &matched.device, &matched)
                    .await
            }
            None => false,
        }
    }

    /// Mark `device`'s time step used: whether it was not before. The mark
    /// is in the state store, so no process on it takes the same code
    /// twice (RFC 6238 §5.2), across reloads and restarts too.
    pub async fn spend_totp(&self, username: &str, device: &str, step: &TotpStep) -> bool {
        let mark = format!("totp:{username}:{device}");
        // A step is good for a period either side of its own (clock skew):
        // the mark must outlive that.
        let ttl = Duration::from_secs(step.period.saturating_mul(3));
        match self.state.raise(&mark, step.step, ttl).await {
            Ok(fresh) => fresh,
            Err(error) => {
                tracing::warn!(%error, "used TOTP codes cannot be checked: the code is refused");
                false
            }
        }
    }
}

impl Services {
    /// `bindings` evaluated for this request: about `user` (signed in, or
    /// the plan's pending user) and the plan's `context`.
    pub async fn evaluate(
        &self,
        bindings: &Bindings,
        request: &FlowRequest<'_>,
        user: Option<&Identity>,
        identifier: Option<&str>,
        context: &serde_json::Map<String, Value>,
    ) -> policy::Verdict {
        if bindings.is_empty() {
            return policy::Verdict::pass();
        }
        let reputation = match bindings.uses_reputation() {
            true => Some(
                policy::reputation::Scores::fetch(
                    &self.state,
                    request.client_ip,
                    user.map(|u| u.username.as_str()).or(identifier),
                )
                .await,
            ),
            false => None,
        };
        let (host, path) = where_to(request);
        let facts = Facts {
            user,
            identifier,
            request: RequestFacts {
                ip: request.client_ip,
                host: &host,
                path: &path,
                method: "GET",
                headers: policy::no_headers(),
            },
            context,
            reputation,
        };
        bindings.evaluate(&facts)
    }
}

/// The host and path of where a flow leads (`next`): what its policies see
/// as the request's, with the client's address. A flow is not the request
/// it was started for; a route's own policies see that one.
fn where_to(request: &FlowRequest<'_>) -> (String, String) {
    let next = request.next().unwrap_or_default();
    match url::Url::parse(&next) {
        Ok(url) => (
            url.host_str().unwrap_or("").to_owned(),
            url.path().to_owned(),
        ),
        Err(_) => (
            String::new(),
            next.split(['?', '#']).next().unwrap_or("").to_owned(),
        ),
    }
}

/// Why a visitor may not run a flow.
enum Refusal {
    /// Told, with `ak-stage-access-denied`.
    Message(String),
    /// Sent on to `next` without logging in (`denied_action`).
    Continue,
}

pub struct Engine {
    flows: HashMap<String, FlowConfig>,
    stages: HashMap<String, StageConfig>,
    services: Services,
    redirects: RedirectPolicy,
    cancel_url: String,
}

impl Engine {
    /// On a store of its own, in memory.
    pub fn new(config: &Config, directory: Arc<dyn Directory>) -> Engine {
        let state = Throttle::default().store;
        Engine::with_shared(config, directory, state, None)
    }

    /// An engine that keeps its counters and marks in `state`, and counts
    /// in `metrics`: both outlive it.
    pub fn with_shared(
        config: &Config,
        directory: Arc<dyn Directory>,
        state: Arc<Store>,
        metrics: Option<Arc<Metrics>>,
    ) -> Engine {
        let mut stages: HashMap<String, StageConfig> = config
            .stages
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for flow in &config.flows {
            for binding in &flow.stages {
                let name = &binding.stage;
                if !stages.contains_key(name) {
                    if let Some(builtin) = StageConfig::builtin(name) {
                        stages.insert(name.clone(), builtin);
                    }
                }
            }
        }
        Engine {
            flows: config
                .flows
                .iter()
                .map(|f| (f.slug.clone(), f.clone()))
                .collect(),
            stages,
            services: Services {
                directory,
                throttle: Throttle::new(state.clone()),
                state,
                metrics,
                prefix: config.server.prefix.clone(),
            },
            redirects: RedirectPolicy::from_config(config),
            cancel_url: format!("{}/sign_out", config.server.prefix),
        }
    }

    fn flow(&self, slug: &str) -> Result<&FlowConfig, FlowError> {
        self.flows
            .get(slug)
            .ok_or_else(|| FlowError::UnknownFlow(slug.to_owned()))
    }

    fn flow_info(&self, flow: &FlowConfig) -> FlowInfo {
        FlowInfo {
            title: flow.title.clone(),
            background: None,
            cancel_url: self.cancel_url.clone(),
            layout: "stacked".into(),
        }
    }

    fn denied(&self, flow: &FlowConfig, plan: Option<&Plan>, message: &str) -> Step {
        let mut challenge = Challenge::access_denied(Some(self.flow_info(flow)), message);
        let identifier = plan.and_then(|p| p.context.get(&PENDING_USER_IDENTIFIER));
        if let (Component::AccessDenied(AccessDenied { user, .. }), Some(identifier)) =
            (&mut challenge.component, identifier)
        {
            *user = stage::pending_user(&identifier);
        }
        Step::Challenge(challenge)
    }

    /// Plan the flow for this visitor, or refuse: §1.7's `authentication`,
    /// then the flow's policies, then the stage bindings that decide at
    /// planning (`evaluate_on_plan`).
    async fn plan(&self, flow: &FlowConfig, request: &FlowRequest<'_>) -> Result<Plan, Refusal> {
        let allowed = match flow.authentication {
            FlowAuthentication::None => true,
            FlowAuthentication::RequireAuthenticated => request.user.is_some(),
            FlowAuthentication::RequireUnauthenticated => request.user.is_none(),
            FlowAuthentication::RequireSuperuser => request.user.is_some_and(|u| u.is_superuser),
        };
        if !allowed {
            return Err(Refusal::Message(FLOW_DOES_NOT_APPLY.to_owned()));
        }
        let empty = serde_json::Map::new();
        let verdict = self
            .services
            .evaluate(&flow.policies, request, request.user, None, &empty)
            .await;
        if !verdict.passing {
            let next = request.next().is_some();
            return Err(match (flow.denied_action, next) {
                (DeniedAction::Continue, _) | (DeniedAction::MessageContinue, true) => {
                    Refusal::Continue
                }
                _ => Refusal::Message(
                    verdict
                        .messages
                        .first()
                        .cloned()
                        .unwrap_or_else(|| FLOW_DOES_NOT_APPLY.to_owned()),
                ),
            });
        }
        let mut stages = Vec::new();
        for (index, binding) in flow.stages.iter().enumerate() {
            if binding.evaluate_on_plan {
                let verdict = self
                    .services
                    .evaluate(&binding.policies, request, request.user, None, &empty)
                    .await;
                if !verdict.passing {
                    continue;
                }
            }
            stages.push(Planned {
                stage: binding.stage.clone(),
                binding: Some(index),
            });
        }
        Ok(Plan {
            flow: flow.slug.clone(),
            stages,
            ..Plan::default()
        })
    }

    /// The current plan for this flow, planning one if there is none (or if
    /// the state holds another flow's plan, which is dropped: §1.4 step 3).
    /// `Some(step)` when the visitor may not run this flow at all.
    async fn current(
        &self,
        flow: &FlowConfig,
        request: &FlowRequest<'_>,
        state: &mut EngineState,
    ) -> Option<Step> {
        state.logged_in = None;
        state.logged_out = false;
        if state.plan.as_ref().is_some_and(|p| p.flow == flow.slug) {
            return None;
        }
        match self.plan(flow, request).await {
            Ok(plan) => {
                state.plan = Some(plan);
                None
            }
            Err(refusal) => {
                state.plan = None;
                Some(match refusal {
                    Refusal::Message(message) => self.denied(flow, None, &message),
                    Refusal::Continue => match self
                        .redirects
                        .check(&request.next().unwrap_or_else(|| "/".to_owned()))
                    {
                        Some(to) => Step::Done { to: to.to_owned() },
                        None => self.denied(flow, None, INVALID_NEXT),
                    },
                })
            }
        }
    }

    /// The flow's binding of a planned stage, if it still is one (a reload
    /// may have changed the flow under a running plan).
    fn binding<'f>(flow: &'f FlowConfig, planned: &Planned) -> Option<&'f StageBinding> {
        planned
            .binding
            .and_then(|i| flow.stages.get(i))
            .filter(|b| b.stage == planned.stage)
    }

    /// Run the head stage on a GET (`body` `None`) or a POST, then drive
    /// the plan forward after its outcome.
    async fn step(
        &self,
        flow: &FlowConfig,
        request: &FlowRequest<'_>,
        state: &mut EngineState,
        body: Option<&Value>,
    ) -> Step {
        let Some(mut plan) = state.plan.take() else {
            return Step::Challenge(Challenge::flow_error(crate::session::random_token()));
        };
        let Some(planned) = plan.stages.first().cloned() else {
            state.plan = Some(plan);
            return self.finish(flow, request, state, None).await;
        };
        // Config reading makes every name a stage; were one missing, the
        // flow must stop rather than skip it.
        let Some((stage, kind)) = self
            .stages
            .get(&planned.stage)
            .map(|s| (s.stage.clone(), s.kind))
        else {
            tracing::error!(stage = %planned.stage, flow = %flow.slug, "a planned stage is not configured");
            return Step::Challenge(Challenge::flow_error(crate::session::random_token()));
        };
        let binding = Self::binding(flow, &planned);
        if let Some(binding) = binding.filter(|b| b.re_evaluate_policies) {
            // Decided as the stage comes up, on the context as it is now;
            // a stage they refuse is left out.
            let pending = {
                let cx = Cx {
                    services: &self.services,
                    flow,
                    request,
                    plan: &mut plan,
                };
                cx.user().map(|u| u.identity())
            };
            let identifier = plan.context.get(&PENDING_USER_IDENTIFIER);
            let verdict = self
                .services
                .evaluate(
                    &binding.policies,
                    request,
                    pending.as_ref().or(request.user),
                    identifier.as_deref(),
                    plan.context.as_map(),
                )
                .await;
            if !verdict.passing {
                return self.passed(flow, request, state, plan).await;
            }
        }
        let mut cx = Cx {
            services: &self.services,
            flow,
            request,
            plan: &mut plan,
        };
        let outcome = match body {
            None => stage.get(&mut cx).await,
            Some(body) => stage.post(&mut cx, body).await,
        };
        let shown = match &outcome {
            Outcome::Show | Outcome::Invalid(_) => {
                let component = stage.challenge(&cx);
                // The registry's list is what the conformance test drives
                // out of the binary; a component missing from it would
                // never be checked against authentik's schemas.
                debug_assert!(
                    stage::kind(kind).is_some_and(|k| k.shows.contains(&component.name())),
                    "stage kind {kind} shows {}, not in its Kind::shows",
                    component.name()
                );
                Some(component)
            }
            Outcome::Pass | Outcome::Deny(_) | Outcome::Redirect(_) => None,
        };
        let info = Some(self.flow_info(flow));
        match (outcome, shown) {
            (Outcome::Show, Some(component)) => {
                state.plan = Some(plan);
                Step::Challenge(Challenge::new(info, component))
            }
            (Outcome::Invalid(errors), Some(component)) => {
                let action =
                    binding.map_or(InvalidResponseAction::Retry, |b| b.invalid_response_action);
                if action == InvalidResponseAction::Retry {
                    state.plan = Some(plan);
                    return Step::Challenge(Challenge::new(info, component).with_errors(errors));
                }
                // From the first stage again: planned anew, with the
                // context so far or without it.
                match self.plan(flow, request).await {
                    Ok(mut fresh) => {
                        if action == InvalidResponseAction::RestartWithContext {
                            fresh.context = plan.context;
                        }
                        state.plan = Some(fresh);
                        Step::Next
                    }
                    Err(_) => self.denied(flow, Some(&plan), FLOW_DOES_NOT_APPLY),
                }
            }
            (Outcome::Deny(message), _) => self.denied(flow, Some(&plan), &message),
            (Outcome::Redirect(to), _) => {
                state.plan = Some(plan);
                self.finish(flow, request, state, Some(to)).await
            }
            _ => self.passed(flow, request, state, plan).await,
        }
    }

    /// The head stage is done (or left out): on to the next, or the end.
    async fn passed(
        &self,
        flow: &FlowConfig,
        request: &FlowRequest<'_>,
        state: &mut EngineState,
        mut plan: Plan,
    ) -> Step {
        plan.stages.remove(0);
        let done = plan.stages.is_empty();
        state.plan = Some(plan);
        if done {
            self.finish(flow, request, state, None).await
        } else {
            Step::Next
        }
    }

    /// The plan is empty, or a stage ended it early (`to`): the flow is
    /// done (§1.6). `next` comes from this request's `query`; one that may
    /// not be followed denies the flow, and nobody is logged in.
    async fn finish(
        &self,
        flow: &FlowConfig,
        request: &FlowRequest<'_>,
        state: &mut EngineState,
        to: Option<String>,
    ) -> Step {
        let plan = state.plan.take().unwrap_or_default();
        let next = to
            .or_else(|| request.next())
            .unwrap_or_else(|| "/".to_owned());
        match self.redirects.check(&next) {
            Some(to) => {
                // An authorization flow run by a signed-in user ends with
                // them still signed in, and the flow done.
                let login = plan.context.get(&LOGIN).or_else(|| {
                    let user = request.user?;
                    (flow.designation == Designation::Authorization).then(|| LoginChoice {
                        user: user.username.clone(),
                        ..LoginChoice::default()
                    })
                });
                let logged_in = login.is_some();
                state.second_factor = logged_in && plan.context.get(&SECOND_FACTOR) == Some(true);
                let login = login.unwrap_or_default();
                state.remember_secs = login.remember_secs;
                state.declined_remember = login.declined_remember;
                if logged_in {
                    policy::reputation::record(
                        &self.services.state,
                        request.client_ip,
                        Some(&login.user),
                        true,
                    )
                    .await;
                    state.memo = Self::memo_after(request, &plan);
                }
                state.logged_in = logged_in.then_some(login.user);
                state.logged_out = plan.context.get(&plan::LOGOUT) == Some(true);
                Step::Done { to: to.to_owned() }
            }
            None => self.denied(flow, Some(&plan), INVALID_NEXT),
        }
    }

    /// The browser's memo after this login, if the plan changed it.
    fn memo_after(request: &FlowRequest<'_>, plan: &Plan) -> Option<memo::BrowserMemo> {
        let factor = plan.context.get(&plan::REMEMBER_SECOND_FACTOR);
        let identifier = plan.context.get(&plan::REMEMBER_IDENTIFIER);
        if factor.is_none() && identifier.is_none() {
            return None;
        }
        let now = now_secs();
        let mut memo = memo::BrowserMemo::of(request);
        if let Some(factor) = factor {
            memo.remember(factor, now);
        }
        if let Some(remember) = identifier {
            let typed = plan.context.get(&PENDING_USER_IDENTIFIER);
            memo.remember_identifier(typed.filter(|_| remember), now);
        }
        Some(memo)
    }

    async fn run(
        &self,
        request: FlowRequest<'_>,
        state: &mut FlowState,
        body: Option<&Value>,
    ) -> Result<Step, FlowError> {
        let flow = self.flow(request.slug)?;
        let mut engine_state = EngineState::read(state);
        let step = match self.current(flow, &request, &mut engine_state).await {
            Some(denied) => denied,
            None => self.step(flow, &request, &mut engine_state, body).await,
        };
        engine_state.write(state);
        Ok(step)
    }
}

#[async_trait]
impl FlowExecutor for Engine {
    async fn find_flow(&self, slug: &str) -> Result<Option<FlowSummary>, FlowError> {
        Ok(self.flows.get(slug).map(|f| FlowSummary {
            slug: f.slug.clone(),
            title: f.title.clone(),
            // By its designation, or by a user-logout stage in it.
            invalidates: f.designation == crate::config::Designation::Invalidation
                || f.stages.iter().any(|binding| {
                    self.stages
                        .get(&binding.stage)
                        .is_some_and(|s| s.kind == stages::user_logout::KIND.name)
                }),
        }))
    }

    async fn challenge(
        &self,
        request: FlowRequest<'_>,
        state: &mut FlowState,
    ) -> Result<Step, FlowError> {
        self.run(request, state, None).await
    }

    async fn respond(
        &self,
        request: FlowRequest<'_>,
        state: &mut FlowState,
        response: Value,
    ) -> Result<Step, FlowError> {
        self.run(request, state, Some(&response)).await
    }

    async fn signed_out(&self, state: &FlowState) -> bool {
        EngineState::read(state).logged_out
    }

    async fn login(&self, state: &FlowState) -> Result<Option<Login>, FlowError> {
        let state = EngineState::read(state);
        let Some(username) = state.logged_in else {
            return Ok(None);
        };
        Ok(self
            .services
            .directory
            .find(&username, &[UserField::Username])
            .filter(|u| !u.disabled)
            .map(|u| Login {
                identity: u.identity(),
                second_factor: state.second_factor,
                executor_session: None,
                remember: (state.remember_secs > 0)
                    .then(|| Duration::from_secs(state.remember_secs)),
                browser_session: state.declined_remember,
                memo: state.memo.as_ref().map(|memo| memo.sealable(now_secs())),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;
    use crate::directory::{hash_password, FileDirectory};
    use serde_json::json;
    use std::collections::BTreeMap;

    fn config(flows: Vec<FlowConfig>, stages: BTreeMap<String, StageConfig>) -> Config {
        let src = "[session]\nlifetime = \"1h\"\nidle_timeout = \"10m\"\npre_auth_ttl = \"10m\"\n\
                   max_pre_auth = 100\nallowed_redirect_hosts = [\"app.example\"]\n\n\
                   [[route]]\nupstream = \"http://127.0.0.1:1\"\n";
        let mut config = crate::config::from_str(src, "flowgate.toml".as_ref(), &|_| None).unwrap();
        config.flows = flows;
        config.stages = stages;
        config.routes = vec![];
        config
    }

    fn flow(slug: &str, stages: &[&str]) -> FlowConfig {
        FlowConfig {
            slug: slug.into(),
            title: "Sign in".into(),
            designation: Designation::Authentication,
            authentication: FlowAuthentication::None,
            policies: Bindings::default(),
            denied_action: DeniedAction::MessageContinue,
            stages: stages.iter().map(|s| StageBinding::plain(s)).collect(),
        }
    }

    fn engine(flows: Vec<FlowConfig>, stages: BTreeMap<String, StageConfig>) -> Engine {
        let hash = hash_password("pw").unwrap();
        let users = format!(
            "[[user]]\nusername = \"alice\"\nemail = \"alice@example.test\"\npassword = \"{hash}\"\n\n\
             [[user]]\nusername = \"tina\"\npassword = \"{hash}\"\ntotp = [\"GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\"]\n"
        );
        let directory = Arc::new(FileDirectory::parse(&users, "users.toml").unwrap());
        Engine::new(&config(flows, stages), directory)
    }

    fn request<'a>(slug: &'a str, query: &'a str) -> FlowRequest<'a> {
        FlowRequest {
            slug,
            query,
            user: None,
            second_factor: false,
            client_ip: None,
            memo: None,
        }
    }

    fn component(step: &Step) -> String {
        match step {
            Step::Challenge(c) => c.component.name().to_owned(),
            Step::Next => "next".into(),
            Step::Done { to } => format!("done {to}"),
        }
    }

    async fn run(
        engine: &Engine,
        slug: &str,
        query: &str,
        posts: &[Value],
    ) -> (Vec<String>, FlowState) {
        let mut state = FlowState::default();
        let mut seen = vec![component(
            &engine
                .challenge(request(slug, query), &mut state)
                .await
                .unwrap(),
        )];
        for body in posts {
            let mut step = engine
                .respond(request(slug, query), &mut state, body.clone())
                .await
                .unwrap();
            seen.push(component(&step));
            while step == Step::Next {
                step = engine
                    .challenge(request(slug, query), &mut state)
                    .await
                    .unwrap();
                seen.push(component(&step));
            }
        }
        (seen, state)
    }

    #[tokio::test]
    async fn default_flow_logs_in_and_names_the_user() {
        let engine = engine(
            vec![flow(
                "login",
                &["identification", "password", "mfa", "login"],
            )],
            BTreeMap::new(),
        );
        let (seen, state) = run(
            &engine,
            "login",
            "next=%2Fapp",
            &[json!({"uid_field": "ALICE"}), json!({"password": "pw"})],
        )
        .await;
        assert_eq!(
            seen,
            [
                "ak-stage-identification",
                "next",
                "ak-stage-password",
                "next",
                "next",
                "done /app"
            ],
            "mfa passes silently for a user without TOTP, then login on GET"
        );
        let login = engine.login(&state).await.unwrap().unwrap();
        assert_eq!(login.identity.username, "alice");
        assert!(!login.second_factor, "alice has no TOTP device");
    }

    #[tokio::test]
    async fn totp_user_must_give_a_code() {
        let engine = engine(
            vec![flow(
                "login",
                &["identification", "password", "mfa", "login"],
            )],
            BTreeMap::new(),
        );
        let (seen, mut state) = run(
            &engine,
            "login",
            "",
            &[json!({"uid_field": "tina"}), json!({"password": "pw"})],
        )
        .await;
        assert_eq!(seen.last().unwrap(), "ak-stage-authenticator-validate");
        let wrong = engine
            .respond(request("login", ""), &mut state, json!({"code": "000000x"}))
            .await
            .unwrap();
        let Step::Challenge(c) = wrong else { panic!() };
        assert!(c.response_errors.unwrap().contains_key("code"));
        let now = now_secs();
        let code = crate::directory::totp_code(b"12345678901234567890", now / 30, 6);
        let right = engine
            .respond(request("login", ""), &mut state, json!({"code": code}))
            .await
            .unwrap();
        assert_eq!(right, Step::Next);
        let done = engine
            .challenge(request("login", ""), &mut state)
            .await
            .unwrap();
        assert_eq!(done, Step::Done { to: "/".into() });
        let login = engine.login(&state).await.unwrap().unwrap();
        assert!(login.second_factor, "the code was checked");
    }

    #[tokio::test]
    async fn five_wrong_passwords_cancel_the_flow() {
        let engine = engine(
            vec![flow("login", &["identification", "password", "login"])],
            BTreeMap::new(),
        );
        let mut posts = vec![json!({"uid_field": "alice"})];
        posts.extend((0..5).map(|i| json!({"password": format!("wrong{i}")})));
        let (seen, state) = run(&engine, "login", "", &posts).await;
        assert_eq!(
            &seen[seen.len() - 2..],
            ["ak-stage-password", "ak-stage-access-denied"]
        );
        assert!(state.is_empty(), "the plan is gone");
        assert!(engine.login(&state).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn throttle_refuses_unchecked_after_too_many_failures() {
        let engine = engine(
            vec![flow("login", &["identification", "password", "login"])],
            BTreeMap::new(),
        );
        let ip = Some("192.0.2.1".parse().unwrap());
        for _ in 0..throttle::LIMIT {
            engine
                .services
                .throttle
                .begin("alice", ip)
                .await
                .unwrap()
                .failed()
                .await;
        }
        let mut state = FlowState::default();
        let req = FlowRequest {
            slug: "login",
            query: "",
            user: None,
            second_factor: false,
            client_ip: ip,
            memo: None,
        };
        engine.challenge(req, &mut state).await.unwrap();
        engine
            .respond(req, &mut state, json!({"uid_field": "alice"}))
            .await
            .unwrap();
        engine.challenge(req, &mut state).await.unwrap();
        let Step::Challenge(c) = engine
            .respond(req, &mut state, json!({"password": "pw"}))
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            c.response_errors.unwrap()["password"][0].code.as_deref(),
            Some("throttled"),
            "even the right password"
        );
        assert!(engine
            .services
            .throttle
            .begin("bob", Some("192.0.2.2".parse().unwrap()))
            .await
            .is_some());
    }

    #[tokio::test]
    async fn next_is_checked_when_the_flow_ends() {
        let engine = engine(
            vec![flow("login", &["identification", "password", "login"])],
            BTreeMap::new(),
        );
        let posts = [json!({"uid_field": "alice"}), json!({"password": "pw"})];
        let (seen, _) = run(
            &engine,
            "login",
            "next=https%3A%2F%2Fapp.example%2Fx",
            &posts,
        )
        .await;
        assert_eq!(seen.last().unwrap(), "done https://app.example/x");
        let (seen, state) = run(&engine, "login", "next=%2F%2Fevil.example", &posts).await;
        assert_eq!(seen.last().unwrap(), "ak-stage-access-denied");
        assert!(
            engine.login(&state).await.unwrap().is_none(),
            "denied: nobody logged in"
        );
    }

    #[tokio::test]
    async fn require_unauthenticated_refuses_signed_in_users() {
        let mut f = flow("anon", &["identification"]);
        f.authentication = FlowAuthentication::RequireUnauthenticated;
        let engine = engine(vec![f], BTreeMap::new());
        let identity = crate::identity::Identity::test("alice", &[]);
        let mut state = FlowState::default();
        let req = FlowRequest {
            slug: "anon",
            query: "",
            user: Some(&identity),
            second_factor: false,
            client_ip: None,
            memo: None,
        };
        let Step::Challenge(c) = engine.challenge(req, &mut state).await.unwrap() else {
            panic!()
        };
        let Component::AccessDenied(denied) = c.component else {
            panic!()
        };
        assert_eq!(denied.error_message.as_deref(), Some(FLOW_DOES_NOT_APPLY));
    }

    #[tokio::test]
    async fn inline_password_and_deny_stages() {
        let mut stages = BTreeMap::new();
        stages.insert(
            "id-pw".to_owned(),
            StageConfig {
                kind: "identification",
                line: None,
                stage: Arc::new(stages::identification::Identification {
                    user_fields: vec![UserField::Email],
                    password: true,
                    pretend_user_exists: true,
                    enable_remember_me: false,
                }),
            },
        );
        stages.insert(
            "nope".to_owned(),
            StageConfig {
                kind: "deny",
                line: None,
                stage: Arc::new(stages::deny::Deny {
                    message: "Closed.".into(),
                }),
            },
        );
        let engine = engine(
            vec![
                flow("combined", &["id-pw", "login"]),
                flow("closed", &["nope"]),
            ],
            stages,
        );
        let (seen, _) = run(
            &engine,
            "combined",
            "",
            &[json!({"uid_field": "alice@example.test", "password": "bad"})],
        )
        .await;
        assert_eq!(seen, ["ak-stage-identification", "ak-stage-identification"]);
        let (seen, state) = run(
            &engine,
            "combined",
            "",
            &[json!({"uid_field": "alice@example.test", "password": "pw"})],
        )
        .await;
        assert_eq!(seen, ["ak-stage-identification", "next", "done /"]);
        assert!(engine.login(&state).await.unwrap().is_some());
        let (seen, _) = run(&engine, "closed", "", &[]).await;
        assert_eq!(seen, ["ak-stage-access-denied"]);
        let mut state = FlowState::default();
        assert!(matches!(
            engine.challenge(request("missing", ""), &mut state).await,
            Err(FlowError::UnknownFlow(_))
        ));
    }
}
