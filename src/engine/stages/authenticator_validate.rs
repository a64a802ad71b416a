//! `authenticator_validate` (`ak-stage-authenticator-validate`): a second
//! factor of the pending user's, once their password is known good: a
//! TOTP code (from the users file's devices or the store's), or a
//! recovery code, each good once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{FAILED_TO_AUTHENTICATE, THROTTLED};
use crate::directory::User;
use crate::engine::memo::{self, BrowserMemo, SecondFactor};
use crate::engine::mfa;
use crate::engine::plan::{
    Key, Planned, PASSWORD_OK, PENDING_USER, PENDING_USER_IDENTIFIER, REMEMBER_SECOND_FACTOR,
    SECOND_FACTOR,
};
use crate::engine::stage::{Cx, Kind, Outcome, Stage};
use crate::flow::{field_error, AuthenticatorValidate as Challenge, Component, DeviceChallenge};
use crate::login::FAILED_TOTP;
use crate::session::now_secs;

/// authentik's message, word for word.
const INVALID_TOKEN: &str =
    "Invalid Token. Please ensure the time on your device is accurate and try again.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotConfiguredAction {
    /// Users without a second factor pass the stage (authentik's `skip`).
    Skip,
    /// Users without a second factor are refused.
    Deny,
    /// Users without a second factor set one up: the stages named in
    /// `configuration_stages` run next.
    Configure,
}

/// The device classes this stage checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceClass {
    Totp,
    Static,
}

/// What the GET found the user has, for the challenge to show.
const OFFERED: Key<Vec<(DeviceClass, String)>> = Key::new("mfa_offered");
/// The user's devices as the GET found them (`memo::devices_fingerprint`).
const DEVICES: Key<String> = Key::new("mfa_devices");

pub const KIND: Kind = Kind {
    name: "authenticator_validate",
    shows: &["ak-stage-authenticator-validate"],
    read: |options| {
        let mut device_classes = vec![DeviceClass::Totp, DeviceClass::Static];
        if let Some((items, place)) = options.strings("device_classes") {
            device_classes.clear();
            for (class, at) in items {
                match class.as_str() {
                    "totp" => device_classes.push(DeviceClass::Totp),
                    "static" => device_classes.push(DeviceClass::Static),
                    other => options.error_at(
                        &at,
                        format!("\"{other}\" is not a device class flowgate checks; use \"totp\" or \"static\""),
                    ),
                }
            }
            if device_classes.is_empty() {
                options.error_at(&place, "name at least one of \"totp\", \"static\"");
            }
        }
        let not_configured_action = options.choice(
            "not_configured_action",
            &[
                ("skip", NotConfiguredAction::Skip),
                ("deny", NotConfiguredAction::Deny),
                ("configure", NotConfiguredAction::Configure),
            ],
            NotConfiguredAction::Skip,
        );
        // Without a list, `configure` sets up an authenticator app.
        let configuration_stages: Vec<String> = match options.strings("configuration_stages") {
            Some((items, place)) => {
                if items.is_empty() {
                    options.error_at(&place, "name at least one stage, e.g. \"totp-setup\"");
                }
                items.into_iter().map(|(s, _)| s).collect()
            }
            None => vec!["totp-setup".to_owned()],
        };
        let last_auth_threshold = options.duration("last_auth_threshold", Duration::ZERO, true);
        Arc::new(AuthenticatorValidate {
            device_classes,
            not_configured_action,
            configuration_stages,
            last_auth_threshold,
        })
    },
};

#[derive(Debug)]
pub struct AuthenticatorValidate {
    /// `device_classes`, default `["totp", "static"]`.
    pub device_classes: Vec<DeviceClass>,
    /// `not_configured_action`: `skip` (default) | `deny` | `configure`.
    pub not_configured_action: NotConfiguredAction,
    /// `configuration_stages`: the setup stages `configure` runs, default
    /// `["totp-setup"]`.
    pub configuration_stages: Vec<String>,
    /// `last_auth_threshold`: a second factor given at this stage on the
    /// same browser less than this long ago is not asked for again (a
    /// sealed memo cookie remembers it). Default zero: asked every time.
    pub last_auth_threshold: Duration,
}

impl AuthenticatorValidate {
    /// The pending user, if their password was checked in this plan.
    fn user(cx: &Cx<'_>) -> Option<Arc<User>> {
        cx.user()
            .filter(|_| cx.plan.context.get(&PASSWORD_OK) == Some(true))
    }

    fn checks(&self, class: DeviceClass) -> bool {
        self.device_classes.contains(&class)
    }

    /// The name this stage runs under in the plan.
    fn name(cx: &Cx<'_>) -> String {
        cx.plan
            .stages
            .first()
            .map(|p| p.stage.clone())
            .unwrap_or_default()
    }
}

#[async_trait]
impl Stage for AuthenticatorValidate {
    fn challenge(&self, cx: &Cx<'_>) -> Component {
        let offered = cx.plan.context.get(&OFFERED).unwrap_or_default();
        Component::AuthenticatorValidate(Challenge {
            user: cx.pending_user(),
            // One entry per device class (§2.2), not per device.
            device_challenges: offered
                .into_iter()
                .map(|(class, uid)| DeviceChallenge {
                    device_class: match class {
                        DeviceClass::Totp => "totp",
                        DeviceClass::Static => "static",
                    }
                    .into(),
                    device_uid: uid,
                    challenge: Value::Object(Default::default()),
                    last_used: None,
                })
                .collect(),
            configuration_stages: Vec::new(),
        })
    }

    async fn get(&self, cx: &mut Cx<'_>) -> Outcome {
        let Some(user) = Self::user(cx) else {
            return Outcome::Deny(FAILED_TO_AUTHENTICATE.into());
        };
        let state = &cx.services.state;
        let (totp, stored) = match (
            mfa::totp_devices(state, &user).await,
            mfa::devices(state, &user.username).await,
        ) {
            (Ok(totp), Ok(stored)) => (totp, stored),
            (Err(error), _) | (_, Err(error)) => {
                // Unknown is not "none": skipping would let a user with a
                // device in without it.
                tracing::warn!(%error, "second factors cannot be read: the stage is refused");
                return Outcome::Deny(FAILED_TO_AUTHENTICATE.into());
            }
        };
        let mut offered = Vec::new();
        if let Some(first) = totp.first().filter(|_| self.checks(DeviceClass::Totp)) {
            offered.push((DeviceClass::Totp, first.uid.clone()));
        }
        if !stored.recovery.is_empty() && self.checks(DeviceClass::Static) {
            offered.push((DeviceClass::Static, "recovery".to_owned()));
        }
        if !offered.is_empty() {
            let devices = memo::devices_fingerprint(&totp, !stored.recovery.is_empty());
            let threshold = self.last_auth_threshold.as_secs();
            if threshold > 0
                && BrowserMemo::of(cx.request).second_factor_within(
                    &user.username,
                    &Self::name(cx),
                    &devices,
                    threshold,
                    now_secs(),
                )
            {
                tracing::info!(user = %user.username, "a second factor given on this browser within last_auth_threshold: not asked again");
                cx.plan.context.set(&SECOND_FACTOR, true);
                return Outcome::Pass;
            }
            cx.plan.context.set(&OFFERED, offered);
            cx.plan.context.set(&DEVICES, devices);
            return Outcome::Show;
        }
        match self.not_configured_action {
            NotConfiguredAction::Skip => Outcome::Pass,
            NotConfiguredAction::Deny => {
                Outcome::Deny("No authenticator configured for this account.".into())
            }
            NotConfiguredAction::Configure => {
                // Right after this stage, in their order.
                for (i, stage) in self.configuration_stages.iter().enumerate() {
                    cx.plan.stages.insert(
                        1 + i,
                        Planned {
                            stage: stage.clone(),
                            binding: None,
                        },
                    );
                }
                Outcome::Pass
            }
        }
    }

    async fn post(&self, cx: &mut Cx<'_>, body: &Value) -> Outcome {
        let Some(user) = Self::user(cx) else {
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
        let services = cx.services;
        let identifier = cx
            .plan
            .context
            .get(&PENDING_USER_IDENTIFIER)
            .unwrap_or_default();
        let account = cx.plan.context.get(&PENDING_USER);
        let Some(attempt) = services
            .attempt(&identifier, account.as_deref(), cx.request)
            .await
        else {
            return Outcome::Invalid(field_error("code", THROTTLED, "throttled"));
        };
        let offered = cx.plan.context.get(&OFFERED).unwrap_or_default();
        let offers = |class| offered.iter().any(|(c, _)| *c == class);
        let accepted = (offers(DeviceClass::Totp) && services.accept_totp(&user, &code).await)
            || (offers(DeviceClass::Static)
                && match mfa::use_recovery_code(&services.state, &user.username, &code).await {
                    Ok(used) => {
                        if used {
                            tracing::info!(user = %user.username, "a recovery code was used");
                        }
                        used
                    }
                    Err(error) => {
                        tracing::warn!(%error, "recovery codes cannot be checked: the code is refused");
                        false
                    }
                });
        if accepted {
            cx.plan.context.set(&SECOND_FACTOR, true);
            let threshold = self.last_auth_threshold.as_secs();
            if let (true, Some(devices)) = (threshold > 0, cx.plan.context.get(&DEVICES)) {
                let now = now_secs();
                let factor = SecondFactor {
                    user: user.username.clone(),
                    stage: Self::name(cx),
                    devices,
                    at: now,
                    until: now + threshold,
                };
                cx.plan.context.set(&REMEMBER_SECOND_FACTOR, factor);
            }
            Outcome::Pass
        } else {
            services
                .failed(FAILED_TOTP, &identifier, cx.request, attempt)
                .await;
            Outcome::Invalid(field_error("code", INVALID_TOKEN, "invalid"))
        }
    }

    /// Setup stages only: `configure` runs them for a user with nothing
    /// to give.
    fn kinds_named(&self) -> &'static [&'static str] {
        &[
            super::authenticator_totp::KIND.name,
            super::authenticator_static::KIND.name,
        ]
    }

    fn stages_named(&self) -> Vec<&str> {
        self.configuration_stages
            .iter()
            .map(String::as_str)
            .collect()
    }
}
