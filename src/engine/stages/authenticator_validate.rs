//! `authenticator_validate` (`ak-stage-authenticator-validate`): a second
//! factor of the pending user's, once their password is known good.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::{FAILED_TO_AUTHENTICATE, THROTTLED};
use crate::directory::User;
use crate::engine::plan::{PASSWORD_OK, PENDING_USER, PENDING_USER_IDENTIFIER, SECOND_FACTOR};
use crate::engine::stage::{Cx, Kind, Outcome, Stage};
use crate::flow::{field_error, AuthenticatorValidate as Challenge, Component, DeviceChallenge};
use crate::login::FAILED_TOTP;

/// authentik's message, word for word.
const INVALID_TOKEN: &str =
    "Invalid Token. Please ensure the time on your device is accurate and try again.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotConfiguredAction {
    /// Users without a second factor pass the stage (authentik's `skip`).
    Skip,
    /// Users without a second factor are refused.
    Deny,
}

pub const KIND: Kind = Kind {
    name: "authenticator_validate",
    read: |options| {
        Arc::new(AuthenticatorValidate {
            not_configured_action: options.choice(
                "not_configured_action",
                &[
                    ("skip", NotConfiguredAction::Skip),
                    ("deny", NotConfiguredAction::Deny),
                ],
                NotConfiguredAction::Skip,
            ),
        })
    },
};

#[derive(Debug)]
pub struct AuthenticatorValidate {
    /// `not_configured_action`: `skip` (default) | `deny`.
    pub not_configured_action: NotConfiguredAction,
}

impl AuthenticatorValidate {
    /// The pending user, if their password was checked in this plan.
    fn user(cx: &Cx<'_>) -> Option<Arc<User>> {
        cx.user()
            .filter(|_| cx.plan.context.get(&PASSWORD_OK) == Some(true))
    }
}

#[async_trait]
impl Stage for AuthenticatorValidate {
    fn challenge(&self, cx: &Cx<'_>) -> Component {
        let devices = cx.user().map(|u| u.totp.clone()).unwrap_or_default();
        Component::AuthenticatorValidate(Challenge {
            user: cx.pending_user(),
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

    async fn get(&self, cx: &mut Cx<'_>) -> Outcome {
        let Some(user) = Self::user(cx) else {
            return Outcome::Deny(FAILED_TO_AUTHENTICATE.into());
        };
        match (user.totp.is_empty(), self.not_configured_action) {
            (true, NotConfiguredAction::Skip) => Outcome::Pass,
            (true, NotConfiguredAction::Deny) => {
                Outcome::Deny("No authenticator configured for this account.".into())
            }
            (false, _) => Outcome::Show,
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
        if services.accept_totp(&user, &code).await {
            cx.plan.context.set(&SECOND_FACTOR, true);
            Outcome::Pass
        } else {
            services
                .failed(FAILED_TOTP, &identifier, cx.request, attempt)
                .await;
            Outcome::Invalid(field_error("code", INVALID_TOKEN, "invalid"))
        }
    }
}
