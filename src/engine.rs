//! The embedded flow executor: flows from the config, users from the
//! `Directory`, run in-process behind the `FlowExecutor` trait. It keeps the
//! wire behaviour of authentik's executor (PROTOCOL.md §1.4–§1.7): a stage
//! that passes with more to come answers `Step::Next` (the raw 302), invalid
//! input re-renders the stage with `response_errors`, a denied stage cancels
//! the plan, and the end of the plan is `xak-flow-redirect` to `next`.
//!
//! The plan lives in `FlowState` (the visitor's pre-auth session), never
//! here: the engine itself holds only config and the brute-force throttle.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{
    Config, FlowAuthentication, FlowConfig, NotConfiguredAction, StageConfig, UserField,
};
use crate::directory::{avatar_for, Directory, User, DEFAULT_AVATAR};
use crate::flow::{
    field_error, AccessDenied, AuthenticatorValidate, Challenge, Component, DeviceChallenge,
    ErrorMap, FlowError, FlowExecutor, FlowInfo, FlowRequest, FlowState, FlowSummary,
    Identification, Login, Password, PendingUser, Step,
};
use crate::login::{FAILED_PASSWORD, FAILED_TOTP};
use crate::metrics::Metrics;
use crate::redirect::RedirectPolicy;
use crate::session::{now_secs, Store};

/// authentik's messages, kept word for word: clients match on them.
const INVALID_PASSWORD: &str = "Invalid password";
const FAILED_TO_AUTHENTICATE: &str = "Failed to authenticate.";
const INVALID_TOKEN: &str =
    "Invalid Token. Please ensure the time on your device is accurate and try again.";
const FLOW_DOES_NOT_APPLY: &str = "Flow does not apply to current user.";
const INVALID_NEXT: &str = "Invalid next URL";
const THROTTLED: &str = "Too many failed attempts. Try again in a few minutes.";

/// The plan of one flow run, as kept in `FlowState`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Plan {
    flow: String,
    /// Stage names still to run; the head is the current stage.
    stages: Vec<String>,
    /// What the visitor typed at identification, shown back to them. Never
    /// the matched username: that would tell whether an account exists.
    #[serde(default)]
    identifier: Option<String>,
    /// The matched user's name, if the identifier matched one.
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password_ok: bool,
    #[serde(default)]
    failed_attempts: u32,
    /// Set by the user-login stage: this user is logged in when the plan ends.
    #[serde(default)]
    login: Option<String>,
    /// A TOTP code of the user's was checked.
    #[serde(default)]
    second_factor: bool,
    /// The user chose to stay signed in: the session lives this many
    /// seconds longer (the user-login stage's `remember_me_offset`).
    #[serde(default)]
    remember_secs: u64,
    /// Asked to stay signed in, the user said no: the cookie ends with the
    /// browser session.
    #[serde(default)]
    declined_remember: bool,
}

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
}

impl EngineState {
    fn read(state: &FlowState) -> EngineState {
        serde_json::from_value(state.0.clone()).unwrap_or_default()
    }

    fn write(&self, state: &mut FlowState) {
        *state = if self.plan.is_none() && self.logged_in.is_none() {
            FlowState::default()
        } else {
            FlowState(serde_json::to_value(self).unwrap_or(Value::Null))
        };
    }
}

/// What a stage made of a GET or a POST. Short-lived, so its size is no concern.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    Show(Challenge),
    Pass,
    Invalid(ErrorMap),
    Deny(String),
}

pub struct Engine {
    flows: HashMap<String, FlowConfig>,
    stages: HashMap<String, StageConfig>,
    directory: Arc<dyn Directory>,
    redirects: RedirectPolicy,
    /// Failures counted in the state store: a reload or a restart forgives
    /// nobody.
    throttle: Throttle,
    /// Where one-time marks go (TOTP steps used).
    state: Arc<Store>,
    metrics: Option<Arc<Metrics>>,
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
            for name in &flow.stages {
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
            directory,
            redirects: RedirectPolicy::from_config(config),
            throttle: Throttle::new(state.clone()),
            state,
            metrics,
            cancel_url: format!("{}/sign_out", config.server.prefix),
        }
    }

    /// A credential check failed: log it (one line, the name as typed),
    /// count it against the throttle and in the metrics.
    async fn failed(
        &self,
        reason: &'static str,
        identifier: &str,
        request: &FlowRequest<'_>,
        attempt: Attempt<'_>,
    ) {
        crate::login::log_failed(reason, identifier, request.client_ip, request.slug);
        attempt.failed().await;
        if let Some(metrics) = &self.metrics {
            metrics.logins_failed.inc();
        }
    }

    /// A credential check the throttle lets through, or `None` when it
    /// refuses it unchecked (logged, one line).
    /// Counted against `account` (the username the identifier matched,
    /// whichever of its names was typed) or, for a name matching nobody,
    /// against the identifier itself.
    async fn attempt(
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

    /// Whether `code` is good for one of `user`'s devices now, and not
    /// used before: its time step is marked in the state store, so no
    /// process on it takes the same code twice (RFC 6238 §5.2), across
    /// reloads and restarts too.
    async fn accept_totp(&self, user: &User, code: &str) -> bool {
        let Some(matched) = self.directory.totp_step(user, code, now_secs()) else {
            return false;
        };
        let mark = format!("totp:{}:{}", user.username, matched.device);
        // A step is good for a period either side of its own (clock skew):
        // the mark must outlive that.
        let ttl = Duration::from_secs(matched.period.saturating_mul(3));
        match self.state.raise(&mark, matched.step, ttl).await {
            Ok(fresh) => fresh,
            Err(error) => {
                tracing::warn!(%error, "used TOTP codes cannot be checked: the code is refused");
                false
            }
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
        if let (Component::AccessDenied(AccessDenied { user, .. }), Some(identifier)) = (
            &mut challenge.component,
            plan.and_then(|p| p.identifier.as_deref()),
        ) {
            *user = pending_user(identifier);
        }
        Step::Challenge(challenge)
    }

    /// Plan the flow for this visitor, or refuse (§1.7: `authentication`).
    fn plan(&self, flow: &FlowConfig, request: &FlowRequest<'_>) -> Result<Plan, &'static str> {
        let allowed = match flow.authentication {
            FlowAuthentication::None => true,
            FlowAuthentication::RequireAuthenticated => request.user.is_some(),
            FlowAuthentication::RequireUnauthenticated => request.user.is_none(),
        };
        if !allowed {
            return Err(FLOW_DOES_NOT_APPLY);
        }
        Ok(Plan {
            flow: flow.slug.clone(),
            stages: flow.stages.clone(),
            ..Plan::default()
        })
    }

    /// The current plan for this flow, planning one if there is none (or if
    /// the state holds another flow's plan, which is dropped: §1.4 step 3).
    /// `Some(step)` when the visitor may not run this flow at all.
    fn current(
        &self,
        flow: &FlowConfig,
        request: &FlowRequest<'_>,
        state: &mut EngineState,
    ) -> Option<Step> {
        state.logged_in = None;
        if state.plan.as_ref().is_some_and(|p| p.flow == flow.slug) {
            return None;
        }
        match self.plan(flow, request) {
            Ok(plan) => {
                state.plan = Some(plan);
                None
            }
            Err(message) => {
                state.plan = None;
                Some(self.denied(flow, None, message))
            }
        }
    }

    /// Drive the plan forward after the head stage's outcome.
    fn advance(
        &self,
        flow: &FlowConfig,
        request: &FlowRequest<'_>,
        state: &mut EngineState,
        outcome: Outcome,
    ) -> Step {
        let Some(plan) = state.plan.as_mut() else {
            return Step::Challenge(Challenge::flow_error(crate::session::random_token()));
        };
        match outcome {
            Outcome::Show(challenge) => Step::Challenge(challenge),
            Outcome::Invalid(errors) => match self.render(flow, plan) {
                Some(challenge) => Step::Challenge(challenge.with_errors(errors)),
                None => Step::Challenge(Challenge::flow_error(crate::session::random_token())),
            },
            Outcome::Deny(message) => {
                let plan = state.plan.take();
                self.denied(flow, plan.as_ref(), &message)
            }
            Outcome::Pass => {
                if !plan.stages.is_empty() {
                    plan.stages.remove(0);
                }
                if plan.stages.is_empty() {
                    self.finish(flow, request, state)
                } else {
                    Step::Next
                }
            }
        }
    }

    /// The plan is empty: the flow is done (§1.6). `next` comes from this
    /// request's `query`; one that may not be followed denies the flow, and
    /// nobody is logged in.
    fn finish(
        &self,
        flow: &FlowConfig,
        request: &FlowRequest<'_>,
        state: &mut EngineState,
    ) -> Step {
        let plan = state.plan.take().unwrap_or_default();
        let next = request.next().unwrap_or_else(|| "/".to_owned());
        match self.redirects.check(&next) {
            Some(to) => {
                state.second_factor = plan.login.is_some() && plan.second_factor;
                let logged_in = plan.login.is_some();
                state.remember_secs = if logged_in { plan.remember_secs } else { 0 };
                state.declined_remember = logged_in && plan.declined_remember;
                state.logged_in = plan.login;
                Step::Done { to: to.to_owned() }
            }
            None => self.denied(flow, Some(&plan), INVALID_NEXT),
        }
    }

    fn stage(&self, plan: &Plan) -> Option<&StageConfig> {
        plan.stages.first().and_then(|name| self.stages.get(name))
    }

    fn user(&self, plan: &Plan) -> Option<Arc<User>> {
        let name = plan.user.as_deref()?;
        self.directory.find(name, &[UserField::Username])
    }

    /// The challenge of the head stage (no side effects), if it shows one.
    fn render(&self, flow: &FlowConfig, plan: &Plan) -> Option<Challenge> {
        let info = Some(self.flow_info(flow));
        let who = || pending_user(plan.identifier.as_deref().unwrap_or(""));
        let component = match self.stage(plan)? {
            StageConfig::Identification {
                user_fields,
                password,
                ..
            } => Component::Identification(Identification {
                user_fields: Some(user_fields.iter().map(|f| f.as_str().to_owned()).collect()),
                password_fields: *password,
                allow_show_password: false,
                flow_designation: flow.designation.as_str().to_owned(),
                captcha_stage: None,
                primary_action: if flow.designation == crate::config::Designation::Authentication {
                    "Log in".to_owned()
                } else {
                    "Continue".to_owned()
                },
                sources: Vec::new(),
                show_source_labels: false,
                enable_remember_me: false,
                pending_user_identifier: None,
                enroll_url: None,
                recovery_url: None,
            }),
            StageConfig::Password {
                allow_show_password,
                ..
            } => Component::Password(Password {
                user: who(),
                allow_show_password: *allow_show_password,
                recovery_url: None,
            }),
            StageConfig::AuthenticatorValidate { .. } => {
                let devices = self.user(plan).map(|u| u.totp.clone()).unwrap_or_default();
                Component::AuthenticatorValidate(AuthenticatorValidate {
                    user: who(),
                    // One entry per device class (§2.2), not per device.
                    device_challenges: devices
                        .first()
                        .map(|d| DeviceChallenge {
                            device_class: "totp".into(),
                            device_uid: d.uid.clone(),
                            challenge: Value::Object(Default::default()),
                            last_used: None,
                        })
                        .into_iter()
                        .collect(),
                    configuration_stages: Vec::new(),
                })
            }
            StageConfig::UserLogin { .. } => Component::UserLogin(who()),
            StageConfig::Deny { message } => Component::AccessDenied(AccessDenied {
                user: who(),
                error_message: Some(message.clone()),
            }),
        };
        Some(Challenge::new(info, component))
    }

    /// GET on the head stage: show it, or let it pass or deny by itself.
    fn on_get(&self, flow: &FlowConfig, plan: &mut Plan) -> Outcome {
        let Some(stage) = self.stage(plan) else {
            return Outcome::Pass;
        };
        match stage {
            StageConfig::Password { .. } if plan.identifier.is_none() => {
                Outcome::Deny("No pending user.".into())
            }
            StageConfig::AuthenticatorValidate {
                not_configured_action,
            } => {
                let Some(user) = self.user(plan).filter(|_| plan.password_ok) else {
                    return Outcome::Deny(FAILED_TO_AUTHENTICATE.into());
                };
                match (user.totp.is_empty(), not_configured_action) {
                    (true, NotConfiguredAction::Skip) => Outcome::Pass,
                    (true, NotConfiguredAction::Deny) => {
                        Outcome::Deny("No authenticator configured for this account.".into())
                    }
                    (false, _) => self.render(flow, plan).map_or(Outcome::Pass, Outcome::Show),
                }
            }
            StageConfig::UserLogin { remember_me_offset } => {
                match self.user(plan).filter(|_| plan.password_ok) {
                    Some(user) if !user.disabled => {
                        if remember_me_offset.is_zero() {
                            plan.login = Some(user.username.clone());
                            Outcome::Pass
                        } else {
                            self.render(flow, plan).map_or(Outcome::Pass, Outcome::Show)
                        }
                    }
                    _ => Outcome::Deny("No Pending user to login.".into()),
                }
            }
            StageConfig::Deny { message } => Outcome::Deny(message.clone()),
            _ => self.render(flow, plan).map_or(Outcome::Pass, Outcome::Show),
        }
    }

    /// POST on the head stage.
    async fn on_post(&self, request: &FlowRequest<'_>, plan: &mut Plan, body: &Value) -> Outcome {
        let Some(stage) = self.stage(plan).cloned() else {
            return Outcome::Pass;
        };
        match stage {
            StageConfig::Identification {
                user_fields,
                password,
                pretend_user_exists,
            } => {
                let identifier = match required_string(body, "uid_field") {
                    Ok(v) => v,
                    Err(errors) => return Outcome::Invalid(errors),
                };
                let user = self.directory.find(identifier, &user_fields);
                if password {
                    let secret = body.get("password").and_then(Value::as_str).unwrap_or("");
                    let account = user.as_ref().map(|u| u.username.as_str());
                    let Some(attempt) = self.attempt(identifier, account, request).await else {
                        return Outcome::Invalid(field_error(
                            "non_field_errors",
                            THROTTLED,
                            "throttled",
                        ));
                    };
                    if !self
                        .directory
                        .verify_password(user.as_deref(), secret)
                        .await
                    {
                        self.failed(FAILED_PASSWORD, identifier, request, attempt)
                            .await;
                        return Outcome::Invalid(field_error(
                            "non_field_errors",
                            FAILED_TO_AUTHENTICATE,
                            "invalid",
                        ));
                    }
                    plan.password_ok = true;
                } else if user.is_none() && !pretend_user_exists {
                    return Outcome::Invalid(field_error(
                        "non_field_errors",
                        FAILED_TO_AUTHENTICATE,
                        "invalid",
                    ));
                }
                plan.identifier = Some(identifier.to_owned());
                plan.user = user.map(|u| u.username.clone());
                Outcome::Pass
            }
            StageConfig::Password {
                failed_attempts_before_cancel,
                ..
            } => {
                let Some(identifier) = plan.identifier.clone() else {
                    return Outcome::Deny("No pending user.".into());
                };
                let secret = match body.get("password") {
                    Some(Value::String(s)) => s.as_str(),
                    _ => {
                        return Outcome::Invalid(field_error(
                            "password",
                            "This field is required.",
                            "required",
                        ))
                    }
                };
                let Some(attempt) = self
                    .attempt(&identifier, plan.user.as_deref(), request)
                    .await
                else {
                    return Outcome::Invalid(field_error("password", THROTTLED, "throttled"));
                };
                let user = self.user(plan);
                if self
                    .directory
                    .verify_password(user.as_deref(), secret)
                    .await
                {
                    plan.password_ok = true;
                    return Outcome::Pass;
                }
                self.failed(FAILED_PASSWORD, &identifier, request, attempt)
                    .await;
                plan.failed_attempts += 1;
                if failed_attempts_before_cancel > 0
                    && plan.failed_attempts >= failed_attempts_before_cancel
                {
                    return Outcome::Deny(INVALID_PASSWORD.into());
                }
                Outcome::Invalid(field_error("password", INVALID_PASSWORD, "invalid"))
            }
            StageConfig::AuthenticatorValidate { .. } => {
                let Some(user) = self.user(plan).filter(|_| plan.password_ok) else {
                    return Outcome::Deny(FAILED_TO_AUTHENTICATE.into());
                };
                let code = match body.get("code") {
                    Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
                    // Up to 2025.12 clients sent the code as a JSON integer (§2.4).
                    Some(Value::Number(n)) => format!("{:06}", n.as_u64().unwrap_or(u64::MAX)),
                    _ => {
                        return Outcome::Invalid(field_error(
                            "non_field_errors",
                            "Empty response",
                            "invalid",
                        ))
                    }
                };
                let identifier = plan.identifier.clone().unwrap_or_default();
                let Some(attempt) = self
                    .attempt(&identifier, plan.user.as_deref(), request)
                    .await
                else {
                    return Outcome::Invalid(field_error("code", THROTTLED, "throttled"));
                };
                if self.accept_totp(&user, &code).await {
                    plan.second_factor = true;
                    Outcome::Pass
                } else {
                    self.failed(FAILED_TOTP, &identifier, request, attempt)
                        .await;
                    Outcome::Invalid(field_error("code", INVALID_TOKEN, "invalid"))
                }
            }
            StageConfig::UserLogin { remember_me_offset } => {
                let remember = match body.get("remember_me") {
                    Some(Value::Bool(remember)) => *remember,
                    None | Some(Value::Null) => {
                        return Outcome::Invalid(field_error(
                            "remember_me",
                            "This field is required.",
                            "required",
                        ))
                    }
                    Some(_) => {
                        return Outcome::Invalid(field_error(
                            "remember_me",
                            "Must be a valid boolean.",
                            "invalid",
                        ))
                    }
                };
                match self.user(plan).filter(|u| plan.password_ok && !u.disabled) {
                    Some(user) => {
                        plan.login = Some(user.username.clone());
                        plan.remember_secs = match remember {
                            true => remember_me_offset.as_secs(),
                            false => 0,
                        };
                        plan.declined_remember = !remember && !remember_me_offset.is_zero();
                        Outcome::Pass
                    }
                    None => Outcome::Deny("No Pending user to login.".into()),
                }
            }
            StageConfig::Deny { message } => Outcome::Deny(message),
        }
    }
}

fn pending_user(identifier: &str) -> PendingUser {
    PendingUser {
        pending_user: identifier.to_owned(),
        pending_user_avatar: if identifier.is_empty() {
            DEFAULT_AVATAR.to_owned()
        } else {
            avatar_for(identifier)
        },
    }
}

/// A required, non-blank string field, with DRF's messages when it is not.
fn required_string<'b>(body: &'b Value, field: &str) -> Result<&'b str, ErrorMap> {
    match body.get(field) {
        None | Some(Value::Null) => Err(field_error(field, "This field is required.", "required")),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(field_error(field, "This field may not be blank.", "blank"))
        }
        Some(Value::String(s)) => Ok(s.trim()),
        Some(_) => Err(field_error(field, "Not a valid string.", "invalid")),
    }
}

#[async_trait]
impl FlowExecutor for Engine {
    async fn find_flow(&self, slug: &str) -> Result<Option<FlowSummary>, FlowError> {
        Ok(self.flows.get(slug).map(|f| FlowSummary {
            slug: f.slug.clone(),
            title: f.title.clone(),
            invalidates: f.designation == crate::config::Designation::Invalidation,
        }))
    }

    async fn challenge(
        &self,
        request: FlowRequest<'_>,
        state: &mut FlowState,
    ) -> Result<Step, FlowError> {
        let flow = self.flow(request.slug)?;
        let mut engine_state = EngineState::read(state);
        let step = match self.current(flow, &request, &mut engine_state) {
            Some(denied) => denied,
            None => {
                let outcome = match engine_state.plan.as_mut() {
                    Some(plan) => self.on_get(flow, plan),
                    None => Outcome::Pass,
                };
                self.advance(flow, &request, &mut engine_state, outcome)
            }
        };
        engine_state.write(state);
        Ok(step)
    }

    async fn respond(
        &self,
        request: FlowRequest<'_>,
        state: &mut FlowState,
        response: Value,
    ) -> Result<Step, FlowError> {
        let flow = self.flow(request.slug)?;
        let mut engine_state = EngineState::read(state);
        let step = match self.current(flow, &request, &mut engine_state) {
            Some(denied) => denied,
            None => {
                let mut plan = engine_state.plan.take().unwrap_or_default();
                let outcome = self.on_post(&request, &mut plan, &response).await;
                engine_state.plan = Some(plan);
                self.advance(flow, &request, &mut engine_state, outcome)
            }
        };
        engine_state.write(state);
        Ok(step)
    }

    async fn login(&self, state: &FlowState) -> Result<Option<Login>, FlowError> {
        let state = EngineState::read(state);
        let Some(username) = state.logged_in else {
            return Ok(None);
        };
        Ok(self
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
            }))
    }
}

/// Slows password and code guessing: after `LIMIT` failures within `WINDOW`
/// for one identifier, or `IP_LIMIT` from one address, further attempts are
/// refused unchecked until `WINDOW` has passed since the last failure.
/// Failures are counted in the state store, so every replica on it counts
/// against the same limits and a restart forgives nobody. Checks in
/// progress count as failures until they are done (in this process), so
/// guesses sent side by side are held to the same limit as guesses sent in
/// turn.
pub struct Throttle {
    store: Arc<Store>,
    in_flight: Mutex<HashMap<String, u32>>,
}

impl Default for Throttle {
    /// On a store of its own, in memory (tests, a lone engine).
    fn default() -> Throttle {
        Throttle::new(Arc::new(Store::new(
            Arc::new(crate::session::MemoryBackend::new(0)),
            crate::session::StoreOptions::for_idle(Duration::from_secs(60)),
        )))
    }
}

/// A credential check let through by the throttle. Dropped, it is done;
/// `failed` records it as a failure first.
pub struct Attempt<'t> {
    throttle: &'t Throttle,
    keys: Vec<String>,
}

const LIMIT: u32 = 10;
const IP_LIMIT: u32 = 50;
const WINDOW: Duration = Duration::from_secs(5 * 60);

impl Throttle {
    pub fn new(store: Arc<Store>) -> Throttle {
        Throttle {
            store,
            in_flight: Mutex::default(),
        }
    }

    fn keys(identifier: &str, ip: Option<IpAddr>) -> [(Option<String>, u32); 2] {
        [
            (
                Some(format!("throttle:u:{}", identifier.trim().to_lowercase())),
                LIMIT,
            ),
            (ip.map(|ip| format!("throttle:ip:{ip}")), IP_LIMIT),
        ]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A check for `identifier` from `ip` may run: `None` when failures
    /// (and checks still running) reach a limit, or when the store cannot
    /// say (closed: logged).
    async fn begin(&self, identifier: &str, ip: Option<IpAddr>) -> Option<Attempt<'_>> {
        let keys = Self::keys(identifier, ip);
        let mut failures = [0u32; 2];
        for (slot, (key, _)) in failures.iter_mut().zip(&keys) {
            let Some(key) = key else { continue };
            match self.store.count(key, 0, WINDOW).await {
                Ok(n) => *slot = n,
                Err(error) => {
                    tracing::warn!(%error, "the throttle's counters cannot be read: the attempt is refused");
                    return None;
                }
            }
        }
        let mut in_flight = self.lock();
        let blocked = keys.iter().zip(failures).any(|((key, limit), failed)| {
            key.as_ref()
                .is_some_and(|k| failed + in_flight.get(k).copied().unwrap_or(0) >= *limit)
        });
        if blocked {
            return None;
        }
        let keys: Vec<String> = keys.into_iter().filter_map(|(key, _)| key).collect();
        for key in &keys {
            *in_flight.entry(key.clone()).or_insert(0) += 1;
        }
        Some(Attempt {
            throttle: self,
            keys,
        })
    }
}

impl Attempt<'_> {
    /// The check failed: it counts against the limits for `WINDOW`, in
    /// every process on the store.
    async fn failed(self) {
        for key in &self.keys {
            if let Err(error) = self.throttle.store.count(key, 1, WINDOW).await {
                tracing::warn!(%error, "a failed attempt could not be counted");
            }
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.throttle.lock();
        for key in &self.keys {
            if let Some(count) = in_flight.get_mut(key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    in_flight.remove(key);
                }
            }
        }
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
            stages: stages.iter().map(|s| s.to_string()).collect(),
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
            client_ip: None,
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
        for _ in 0..LIMIT {
            engine
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
            client_ip: ip,
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
            .throttle
            .begin("bob", Some("192.0.2.2".parse().unwrap()))
            .await
            .is_some());
    }

    /// Checks side by side count as they run: a burst of guesses for one
    /// name gets `LIMIT` checks, not one per request.
    #[tokio::test]
    async fn checks_in_progress_count_against_the_limit() {
        let throttle = Throttle::default();
        let ip = |i: u8| Some(IpAddr::from([192, 0, 2, i]));
        let mut running = Vec::new();
        for i in 0..LIMIT as u8 {
            running.push(
                throttle
                    .begin("alice", ip(i))
                    .await
                    .expect("under the limit"),
            );
        }
        assert!(
            throttle.begin("alice", ip(99)).await.is_none(),
            "the 11th at once"
        );
        drop(running);
        // Done without failing: room again; failures take it for good.
        for i in 0..LIMIT as u8 {
            throttle.begin("alice", ip(i)).await.unwrap().failed().await;
        }
        assert!(throttle.begin("alice", ip(99)).await.is_none());
        assert!(throttle.begin("bob", ip(99)).await.is_some());
        // Another throttle on the same store (another replica, or this
        // one restarted) counts the same failures.
        let other = Throttle::new(throttle.store.clone());
        assert!(other.begin("alice", ip(98)).await.is_none());
        assert!(
            other.begin("Alice ", ip(98)).await.is_none(),
            "names as the directory matches them"
        );
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
            client_ip: None,
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
            StageConfig::Identification {
                user_fields: vec![UserField::Email],
                password: true,
                pretend_user_exists: true,
            },
        );
        stages.insert(
            "nope".to_owned(),
            StageConfig::Deny {
                message: "Closed.".into(),
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
