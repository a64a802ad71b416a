//! What a stage is: one kind of step in a flow, in one place.
//!
//! A kind is registered in [`KINDS`] by name, with the function that reads
//! its `[stage.<name>]` options. Read, it is a [`Stage`]: the challenge it
//! shows, what a GET does (show it, or pass or deny by itself) and what a
//! POST of the visitor's answer does. Stages share what they learn through
//! the plan's typed context; the driver (`engine::Engine`) runs the plan.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::plan::{
    Plan, PASSWORD_OK, PENDING_USER, PENDING_USER_IDENTIFIER, SECOND_FACTOR, SET_UP_SECOND_FACTOR,
};
use super::stages;
use super::Services;
use crate::config::{FlowConfig, Options, UserField};
use crate::directory::{avatar_for, User, DEFAULT_AVATAR};
use crate::flow::{Component, ErrorMap, FlowRequest, PendingUser};

/// A user with second factors changes them only after giving one.
const GIVE_ONE_FIRST: &str = "To change your second factors, sign in with one of them first.";
const FACTORS_UNREADABLE: &str =
    "Your second factors cannot be changed right now. Try again in a moment.";

/// What a stage made of a GET or a POST.
pub enum Outcome {
    /// Show the stage's challenge.
    Show,
    /// Done: on to the next stage.
    Pass,
    /// Show the challenge again, with these errors.
    Invalid(ErrorMap),
    /// End the flow with `ak-stage-access-denied` and this message.
    Deny(String),
    /// End the flow here, sending the visitor to this URL.
    Redirect(String),
}

/// What a stage works with on one request.
pub struct Cx<'a> {
    pub services: &'a Services,
    pub flow: &'a FlowConfig,
    pub request: &'a FlowRequest<'a>,
    pub plan: &'a mut Plan,
}

impl Cx<'_> {
    /// The user the plan is about, if identification matched one.
    pub fn user(&self) -> Option<Arc<User>> {
        let name = self.plan.context.get(&PENDING_USER)?;
        self.services.directory.find(&name, &[UserField::Username])
    }

    /// Whom a stage that changes a user's second factors acts for: the
    /// pending user once their password was checked in this plan, else
    /// the signed-in visitor (a setup flow run after login).
    pub fn subject(&self) -> Option<Arc<User>> {
        let pending = self
            .user()
            .filter(|_| self.plan.context.get(&PASSWORD_OK) == Some(true));
        pending
            .or_else(|| {
                let signed_in = self.request.user?;
                self.services
                    .directory
                    .find(&signed_in.username, &[UserField::Username])
            })
            .filter(|u| !u.disabled)
    }

    /// The pending user as challenges show them: the name as typed, else
    /// the signed-in visitor's (a flow run after login).
    pub fn pending_user(&self) -> PendingUser {
        let typed = self.plan.context.get(&PENDING_USER_IDENTIFIER);
        let signed_in = || self.request.user.map(|u| u.username.clone());
        pending_user(&typed.or_else(signed_in).unwrap_or_default())
    }

    /// Whom a stage that changes second factors acts for (`subject`), if
    /// it may: a user with none yet sets up their first; a user with some
    /// gives one first, in this flow or at the session's own login. So a
    /// password alone never adds a second factor, nor voids one.
    pub async fn second_factor_owner(&self) -> Result<Arc<User>, String> {
        let Some(user) = self.subject() else {
            return Err("No pending user.".to_owned());
        };
        let state = &self.services.state;
        let has_some = match (
            super::mfa::totp_devices(state, &user).await,
            super::mfa::devices(state, &user.username).await,
        ) {
            (Ok(totp), Ok(stored)) => !totp.is_empty() || !stored.recovery.is_empty(),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%error, "second factors cannot be read: no change to them");
                return Err(FACTORS_UNREADABLE.to_owned());
            }
        };
        let pending = self.user().is_some_and(|p| p.username == user.username)
            && self.plan.context.get(&PASSWORD_OK) == Some(true);
        let proven = self.plan.context.get(&SECOND_FACTOR) == Some(true)
            || self.plan.context.get(&SET_UP_SECOND_FACTOR) == Some(true)
            || (!pending && self.request.second_factor);
        if has_some && !proven {
            tracing::warn!(user = %user.username, "a change of second factors refused: none given in this session");
            return Err(GIVE_ONE_FIRST.to_owned());
        }
        Ok(user)
    }
}

/// A challenge's `pending_user` fields for `identifier`.
pub fn pending_user(identifier: &str) -> PendingUser {
    PendingUser {
        pending_user: identifier.to_owned(),
        pending_user_avatar: if identifier.is_empty() {
            DEFAULT_AVATAR.to_owned()
        } else {
            avatar_for(identifier)
        },
    }
}

#[async_trait]
pub trait Stage: fmt::Debug + Send + Sync {
    /// The challenge for the plan as it stands; no side effects.
    fn challenge(&self, cx: &Cx<'_>) -> Component;

    /// A GET with this stage at the head of the plan.
    async fn get(&self, _cx: &mut Cx<'_>) -> Outcome {
        Outcome::Show
    }

    /// The visitor's answer to the challenge.
    async fn post(&self, cx: &mut Cx<'_>, body: &Value) -> Outcome;

    /// The slug of another flow this stage leads to, for the config to
    /// check that it exists.
    fn flow_named(&self) -> Option<&str> {
        None
    }

    /// Other stages this one may put in the plan, for the config to check
    /// that they exist.
    fn stages_named(&self) -> Vec<&str> {
        Vec::new()
    }

    /// The kinds the stages of `stages_named` must be of (any, if empty).
    fn kinds_named(&self) -> &'static [&'static str] {
        &[]
    }
}

/// One stage kind: its name in `kind = "…"` and the reader of its options.
pub struct Kind {
    pub name: &'static str,
    /// The components a stage of this kind shows as its own challenge
    /// (with or without `response_errors`). Kinds that only end the flow
    /// show nothing of their own: the driver answers for them with one of
    /// [`DRIVER_SHOWS`]. Kept here so that a test can drive every one out
    /// of the binary (`tests/schema_fidelity.rs`).
    pub shows: &'static [&'static str],
    /// Reads the options of a `[stage.<name>]` table of this kind (every
    /// option has a default); problems are reported through `options`.
    pub(crate) read: fn(&mut Options<'_, '_, '_>) -> Arc<dyn Stage>,
}

/// Every stage kind flowgate has.
pub const KINDS: &[Kind] = &[
    stages::identification::KIND,
    stages::password::KIND,
    stages::authenticator_validate::KIND,
    stages::user_login::KIND,
    stages::deny::KIND,
    stages::prompt::KIND,
    stages::redirect::KIND,
    stages::user_logout::KIND,
    stages::authenticator_totp::KIND,
    stages::authenticator_static::KIND,
    stages::consent::KIND,
];

/// The components the driver answers with itself, whatever the stage:
/// the end of a flow (`xak-flow-redirect`), a refusal
/// (`ak-stage-access-denied`) and a failure (`ak-stage-flow-error`).
pub const DRIVER_SHOWS: &[&str] = &[
    "xak-flow-redirect",
    "ak-stage-access-denied",
    "ak-stage-flow-error",
];

/// Stage names a flow may use without a `[stage.<name>]` table, and their
/// kind; a table of that name tunes the stage.
pub const BUILTINS: &[(&str, &str)] = &[
    ("identification", "identification"),
    ("password", "password"),
    ("mfa", "authenticator_validate"),
    ("login", "user_login"),
    ("deny", "deny"),
    ("totp-setup", "authenticator_totp"),
    ("recovery-codes", "authenticator_static"),
    ("logout", "user_logout"),
];

/// Other spellings of the built-in stage names.
pub const ALIASES: &[(&str, &str)] = &[
    ("identify", "identification"),
    ("totp", "mfa"),
    ("authenticator-validate", "mfa"),
    ("user-login", "login"),
];

pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

/// The kind names, for messages: `a, b or c`.
pub fn kind_names() -> String {
    let names: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
    crate::config::alternatives(&names)
}

/// The kind of a built-in stage name (aliases included).
pub fn builtin_kind(name: &str) -> Option<&'static str> {
    let name = ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, canonical)| canonical);
    BUILTINS
        .iter()
        .find(|(builtin, _)| *builtin == name)
        .map(|(_, kind)| *kind)
}

/// One stage definition: `[stage.<name>]` with `kind = …`, read.
#[derive(Clone)]
pub struct StageConfig {
    pub kind: &'static str,
    pub stage: Arc<dyn Stage>,
    /// Where its table starts (`None`: built in).
    pub line: Option<usize>,
}

impl fmt::Debug for StageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.stage.fmt(f)
    }
}

impl StageConfig {
    /// A built-in stage name (or alias) with every option at its default.
    pub fn builtin(name: &str) -> Option<StageConfig> {
        let kind = kind(builtin_kind(name)?)?;
        Some(StageConfig {
            kind: kind.name,
            stage: crate::config::stage_defaults(kind),
            line: None,
        })
    }
}
