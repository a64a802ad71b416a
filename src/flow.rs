//! The flow executor protocol: authentik's challenge/response wire types
//! (PROTOCOL.md §2) and the `FlowExecutor` seam that the HTML login relay and
//! the JSON API both drive. The embedded engine (`engine`) implements it
//! today; a remote client (authentik, or another flowgate) plugs in later.

use std::collections::BTreeMap;
use std::net::IpAddr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::identity::Identity;

/// `response_errors`: field name (or `non_field_errors`) to messages (§1.9).
pub type ErrorMap = BTreeMap<String, Vec<ErrorDetail>>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub string: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl ErrorDetail {
    pub fn new(string: impl Into<String>, code: &str) -> Self {
        ErrorDetail {
            string: string.into(),
            code: Some(code.to_owned()),
        }
    }
}

/// Build a one-entry error map, the usual shape of a rejected response.
pub fn field_error(field: &str, message: &str, code: &str) -> ErrorMap {
    let mut map = ErrorMap::new();
    map.insert(field.to_owned(), vec![ErrorDetail::new(message, code)]);
    map
}

/// `flow_info` of the challenge envelope (§2.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowInfo {
    #[serde(default)]
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<String>,
    #[serde(default)]
    pub cancel_url: String,
    #[serde(default = "default_layout")]
    pub layout: String,
}

fn default_layout() -> String {
    "stacked".to_owned()
}

/// The "with user info" part shared by password, user-login, access-denied…
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PendingUser {
    #[serde(default)]
    pub pending_user: String,
    #[serde(default)]
    pub pending_user_avatar: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identification {
    pub user_fields: Option<Vec<String>>,
    pub password_fields: bool,
    #[serde(default)]
    pub allow_show_password: bool,
    #[serde(default = "default_designation")]
    pub flow_designation: String,
    #[serde(default)]
    pub captcha_stage: Option<Value>,
    pub primary_action: String,
    #[serde(default)]
    pub sources: Vec<Value>,
    #[serde(default)]
    pub show_source_labels: bool,
    #[serde(default)]
    pub enable_remember_me: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_user_identifier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_url: Option<String>,
}

fn default_designation() -> String {
    "authentication".to_owned()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Password {
    #[serde(flatten)]
    pub user: PendingUser,
    #[serde(default)]
    pub allow_show_password: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceChallenge {
    pub device_class: String,
    pub device_uid: String,
    #[serde(default)]
    pub challenge: Value,
    #[serde(default)]
    pub last_used: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthenticatorValidate {
    #[serde(flatten)]
    pub user: PendingUser,
    pub device_challenges: Vec<DeviceChallenge>,
    #[serde(default)]
    pub configuration_stages: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessDenied {
    #[serde(flatten)]
    pub user: PendingUser,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redirect {
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowErrorBody {
    pub request_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `ak-stage-authenticator-totp`: set up a TOTP device from `config_url`
/// (an `otpauth://` URI), answered with a `code` from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthenticatorTotp {
    #[serde(flatten)]
    pub user: PendingUser,
    pub config_url: String,
}

/// `ak-stage-authenticator-static`: recovery codes, shown once; any
/// answer goes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthenticatorStatic {
    #[serde(flatten)]
    pub user: PendingUser,
    pub codes: Vec<String>,
}

/// `ak-stage-consent`: what an application asks to be allowed, answered
/// with the `token` it carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Consent {
    #[serde(flatten)]
    pub user: PendingUser,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_text: Option<String>,
    #[serde(default)]
    pub permissions: Vec<Permission>,
    #[serde(default)]
    pub additional_permissions: Vec<Permission>,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Permission {
    pub id: String,
    #[serde(default)]
    pub name: String,
}

/// `ak-stage-prompt`: a form of operator-defined fields, answered with one
/// key per `field_key`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    pub fields: Vec<PromptField>,
}

/// One field of a prompt stage (authentik's `StagePrompt`). `kind` is the
/// prompt type: `text`, `email`, `password`, `checkbox`, `dropdown`,
/// `static`, … (authentik's `PromptTypeEnum`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptField {
    pub field_key: String,
    #[serde(default)]
    pub label: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub placeholder: String,
    #[serde(default)]
    pub initial_value: String,
    #[serde(default)]
    pub order: i64,
    #[serde(default)]
    pub sub_text: String,
    #[serde(default)]
    pub choices: Option<Vec<PromptChoice>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptChoice {
    pub label: String,
    pub value: String,
}

/// What a challenge asks for, tagged by `component`. Components flowgate
/// does not model (a remote authentik may send any of §2.3) are kept whole
/// in `Other`, so they can still be relayed as JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Component {
    Identification(Identification),
    Password(Password),
    AuthenticatorValidate(AuthenticatorValidate),
    AuthenticatorTotp(AuthenticatorTotp),
    AuthenticatorStatic(AuthenticatorStatic),
    UserLogin(PendingUser),
    Consent(Consent),
    Prompt(Prompt),
    AccessDenied(AccessDenied),
    Redirect(Redirect),
    FlowError(FlowErrorBody),
    Other {
        component: String,
        fields: Map<String, Value>,
    },
}

impl Component {
    pub fn name(&self) -> &str {
        match self {
            Component::Identification(_) => "ak-stage-identification",
            Component::Password(_) => "ak-stage-password",
            Component::AuthenticatorValidate(_) => "ak-stage-authenticator-validate",
            Component::AuthenticatorTotp(_) => "ak-stage-authenticator-totp",
            Component::AuthenticatorStatic(_) => "ak-stage-authenticator-static",
            Component::UserLogin(_) => "ak-stage-user-login",
            Component::Consent(_) => "ak-stage-consent",
            Component::Prompt(_) => "ak-stage-prompt",
            Component::AccessDenied(_) => "ak-stage-access-denied",
            Component::Redirect(_) => "xak-flow-redirect",
            Component::FlowError(_) => "ak-stage-flow-error",
            Component::Other { component, .. } => component,
        }
    }

    fn fields(&self) -> Map<String, Value> {
        let value = match self {
            Component::Identification(c) => serde_json::to_value(c),
            Component::Password(c) => serde_json::to_value(c),
            Component::AuthenticatorValidate(c) => serde_json::to_value(c),
            Component::AuthenticatorTotp(c) => serde_json::to_value(c),
            Component::AuthenticatorStatic(c) => serde_json::to_value(c),
            Component::UserLogin(c) => serde_json::to_value(c),
            Component::Consent(c) => serde_json::to_value(c),
            Component::Prompt(c) => serde_json::to_value(c),
            Component::AccessDenied(c) => serde_json::to_value(c),
            Component::Redirect(c) => serde_json::to_value(c),
            Component::FlowError(c) => serde_json::to_value(c),
            Component::Other { fields, .. } => return fields.clone(),
        };
        match value {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        }
    }

    fn from_fields(component: &str, fields: Map<String, Value>) -> Component {
        fn typed<T: serde::de::DeserializeOwned>(fields: &Map<String, Value>) -> Option<T> {
            T::deserialize(Value::Object(fields.clone())).ok()
        }
        let parsed = match component {
            "ak-stage-identification" => typed(&fields).map(Component::Identification),
            "ak-stage-password" => typed(&fields).map(Component::Password),
            "ak-stage-authenticator-validate" => {
                typed(&fields).map(Component::AuthenticatorValidate)
            }
            "ak-stage-authenticator-totp" => typed(&fields).map(Component::AuthenticatorTotp),
            "ak-stage-authenticator-static" => typed(&fields).map(Component::AuthenticatorStatic),
            "ak-stage-user-login" => typed(&fields).map(Component::UserLogin),
            "ak-stage-consent" => typed(&fields).map(Component::Consent),
            "ak-stage-prompt" => typed(&fields).map(Component::Prompt),
            "ak-stage-access-denied" => typed(&fields).map(Component::AccessDenied),
            "xak-flow-redirect" => typed(&fields).map(Component::Redirect),
            "ak-stage-flow-error" => typed(&fields).map(Component::FlowError),
            _ => None,
        };
        parsed.unwrap_or(Component::Other {
            component: component.to_owned(),
            fields,
        })
    }
}

/// One challenge: the envelope of §2.1 around a component.
#[derive(Debug, Clone, PartialEq)]
pub struct Challenge {
    pub flow_info: Option<FlowInfo>,
    pub component: Component,
    pub response_errors: Option<ErrorMap>,
}

impl Challenge {
    pub fn new(flow_info: Option<FlowInfo>, component: Component) -> Self {
        Challenge {
            flow_info,
            component,
            response_errors: None,
        }
    }

    pub fn with_errors(mut self, errors: ErrorMap) -> Self {
        self.response_errors = Some(errors);
        self
    }

    pub fn redirect(to: impl Into<String>) -> Self {
        Challenge::new(None, Component::Redirect(Redirect { to: to.into() }))
    }

    /// `ak-stage-flow-error` as a non-superuser sees it (§1.4): an id to find
    /// the log line by, never the cause.
    pub fn flow_error(request_id: impl Into<String>) -> Self {
        Challenge::new(
            None,
            Component::FlowError(FlowErrorBody {
                request_id: request_id.into(),
                error: None,
            }),
        )
    }

    pub fn access_denied(flow_info: Option<FlowInfo>, message: impl Into<String>) -> Self {
        Challenge::new(
            flow_info,
            Component::AccessDenied(AccessDenied {
                user: PendingUser {
                    pending_user: String::new(),
                    pending_user_avatar: crate::directory::DEFAULT_AVATAR.to_owned(),
                },
                error_message: Some(message.into()),
            }),
        )
    }

    pub fn to_json(&self) -> Value {
        let mut map = self.component.fields();
        map.insert(
            "component".to_owned(),
            Value::String(self.component.name().to_owned()),
        );
        if let Some(info) = &self.flow_info {
            if let Ok(info) = serde_json::to_value(info) {
                map.insert("flow_info".to_owned(), info);
            }
        }
        if let Some(errors) = &self.response_errors {
            if let Ok(errors) = serde_json::to_value(errors) {
                map.insert("response_errors".to_owned(), errors);
            }
        }
        Value::Object(map)
    }

    pub fn from_json(value: Value) -> Result<Challenge, String> {
        let Value::Object(mut map) = value else {
            return Err("challenge is not a JSON object".to_owned());
        };
        let component = match map.remove("component") {
            Some(Value::String(name)) => name,
            _ => return Err("challenge has no `component`".to_owned()),
        };
        // 2022-era servers add `type` (§2.4); dispatch is on `component` alone.
        map.remove("type");
        let flow_info = map
            .remove("flow_info")
            .and_then(|v| serde_json::from_value(v).ok());
        let response_errors = map
            .remove("response_errors")
            .and_then(|v| serde_json::from_value(v).ok());
        Ok(Challenge {
            flow_info,
            component: Component::from_fields(&component, map),
            response_errors,
        })
    }
}

impl Serialize for Challenge {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Challenge {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Challenge::from_json(Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// What one executor call produced. Short-lived (one per request), so the
/// size of the challenge variant is no concern.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Show this challenge (possibly re-rendered with `response_errors`).
    Challenge(Challenge),
    /// The stage passed and more stages follow: on the wire a raw 302 back to
    /// the executor URL (PROTOCOL.md §1.4); the client GETs the next challenge.
    Next,
    /// The flow finished: `xak-flow-redirect` to `to`. Who logged in, if
    /// anyone, is then known to `FlowExecutor::identity`.
    Done { to: String },
}

/// The executor's per-flow state, kept in the visitor's pre-auth session:
/// the embedded engine's plan, or a remote executor's cookie jar. Opaque to
/// everyone but the executor that wrote it; JSON so that any session store
/// can hold it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FlowState(pub Value);

impl FlowState {
    pub fn is_empty(&self) -> bool {
        self.0.is_null()
    }
}

/// Everything about the request that an executor may look at.
#[derive(Debug, Clone, Copy)]
pub struct FlowRequest<'a> {
    pub slug: &'a str,
    /// The `query` parameter: the login page's own query string, carrying
    /// `next` (PROTOCOL.md §1.2). Sent on every call; never stored.
    pub query: &'a str,
    /// The visitor's current authenticated identity, if any.
    pub user: Option<&'a Identity>,
    /// That identity's session was made with a second factor.
    pub second_factor: bool,
    pub client_ip: Option<IpAddr>,
    /// What this executor asked the browser to keep at an earlier login
    /// (`Login::memo`), as the gateway sealed it: only the gateway's own
    /// memos, unaltered, come back here.
    pub memo: Option<&'a Value>,
}

impl FlowRequest<'_> {
    /// `next` from inside `query`, if present.
    pub fn next(&self) -> Option<String> {
        form_urlencoded_get(self.query, "next")
    }
}

/// Look one key up in an `application/x-www-form-urlencoded` string.
pub fn form_urlencoded_get(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// What went wrong underneath (a hyper, rustls or I/O error), kept for the log.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why an executor call failed outright (as opposed to answering a
/// challenge). The cause, when there is one, is the `source`: the log line
/// prints the whole chain (`respond::chain`), the visitor sees none of it.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// No flow with that slug: 404.
    #[error("no flow named `{0}`")]
    UnknownFlow(String),
    /// The executor cannot be reached or answered nonsense (a remote down,
    /// timing out, not speaking the protocol): 503 (502 for nonsense).
    #[error("{}: {what}", if *.bad_gateway { "flow executor answered unusably" } else { "flow executor unavailable" })]
    Unavailable {
        what: String,
        /// The remote answered, but not as an executor does: 502.
        bad_gateway: bool,
        #[source]
        source: Option<Cause>,
    },
    /// Anything else: answered as `ak-stage-flow-error`, cause only in the log.
    #[error("flow executor failed: {what}")]
    Internal {
        what: String,
        #[source]
        source: Option<Cause>,
    },
}

impl FlowError {
    pub fn unavailable(what: impl Into<String>, source: impl Into<Cause>) -> FlowError {
        FlowError::Unavailable {
            what: what.into(),
            bad_gateway: false,
            source: Some(source.into()),
        }
    }

    /// The remote answered, but nothing an executor would say.
    pub fn bad_gateway(what: impl Into<String>) -> FlowError {
        FlowError::Unavailable {
            what: what.into(),
            bad_gateway: true,
            source: None,
        }
    }

    pub fn internal(what: impl Into<String>) -> FlowError {
        FlowError::Internal {
            what: what.into(),
            source: None,
        }
    }
}

/// The seam between the login front ends (HTML relay, JSON API) and whatever
/// runs flows. Implementations keep all their state in `FlowState`, so the
/// front ends decide where it lives (the pre-auth session).
#[async_trait]
pub trait FlowExecutor: Send + Sync {
    /// The executor's catalogue: the flow with this slug, if it runs one,
    /// with its title for the login page. The embedded engine answers from
    /// the config; a remote one from what it knows of the remote (it may
    /// have to ask). A gateway built on reload has a catalogue of its own.
    async fn find_flow(&self, slug: &str) -> Result<Option<FlowSummary>, FlowError>;

    /// GET: the current challenge, planning the flow if there is no plan.
    async fn challenge(
        &self,
        request: FlowRequest<'_>,
        state: &mut FlowState,
    ) -> Result<Step, FlowError>;

    /// POST: solve the current stage with `response` (a JSON object whose
    /// `component` key, if any, is ignored: §1.2).
    async fn respond(
        &self,
        request: FlowRequest<'_>,
        state: &mut FlowState,
        response: Value,
    ) -> Result<Step, FlowError>;

    /// After `Step::Done`: who logged in, or `None` when the flow logged no
    /// one in (e.g. a flow without a login stage).
    async fn login(&self, state: &FlowState) -> Result<Option<Login>, FlowError>;

    /// After `Step::Done`: the flow ended the visitor's session (a
    /// user-logout stage), as an invalidation flow does.
    async fn signed_out(&self, _state: &FlowState) -> bool {
        false
    }

    /// A session minted from `Login::executor_session` is ending here: end
    /// the executor's side too (a remote runs its invalidation flow).
    async fn sign_out(&self, _session: &FlowState, _client_ip: IpAddr) -> Result<(), FlowError> {
        Ok(())
    }

    /// Whether the remote's policies let this session's user use
    /// `application` (authentik's `check_access`).
    async fn may_use(&self, _session: &FlowState, _application: &str) -> Result<bool, FlowError> {
        Ok(true)
    }

    /// Who the executor's side of a session belongs to now, with the
    /// groups and names the executor gives them today; `None` when it no
    /// longer holds (a remote session signed out elsewhere, its user
    /// disabled). Only executors that keep sessions of their own answer.
    async fn current_user(
        &self,
        _session: &FlowState,
        _client_ip: IpAddr,
    ) -> Result<Option<Identity>, FlowError> {
        Err(FlowError::internal(
            "this executor keeps no sessions of its own",
        ))
    }
}

/// A flow in an executor's catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowSummary {
    pub slug: String,
    /// What the login page calls it.
    pub title: String,
    /// An invalidation flow: running it to the end signs the visitor out.
    pub invalidates: bool,
}

/// Who a finished flow logged in, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Login {
    pub identity: Identity,
    /// A second factor (a TOTP code) was checked on the way.
    pub second_factor: bool,
    /// What the executor keeps for the new session (a remote's cookie jar),
    /// handed back to `sign_out` and `still_signed_in`.
    pub executor_session: Option<FlowState>,
    /// The user chose to stay signed in: the session lives this much
    /// longer than `session.lifetime`, and no idle timeout ends it.
    pub remember: Option<std::time::Duration>,
    /// Asked to stay signed in, the user said no: the cookie has no
    /// `Max-Age` and ends with the browser session (the session itself
    /// keeps `session.lifetime` and the idle timeout).
    pub browser_session: bool,
    /// What the browser is to keep from now on for the executor's later
    /// flows on it (a second factor checked here, the identifier to fill
    /// in), handed back in `FlowRequest::memo`; `None` leaves what it has.
    pub memo: Option<Memo>,
}

/// A memo for the browser: sealed by the gateway into a long-lived cookie
/// of its own, which outlives sessions and sign-out.
#[derive(Debug, Clone, PartialEq)]
pub struct Memo {
    /// `Value::Null` forgets the memo (the cookie is cleared).
    pub value: Value,
    /// When the browser may drop it (unix seconds).
    pub until: u64,
}
