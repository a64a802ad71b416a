//! `password` (`ak-stage-password`): the pending user's password, with the
//! flow cancelled after `failed_attempts_before_cancel` wrong ones.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::THROTTLED;
use crate::engine::plan::{Key, PASSWORD_OK, PENDING_USER, PENDING_USER_IDENTIFIER};
use crate::engine::stage::{Cx, Kind, Outcome, Stage};
use crate::flow::{field_error, Component, Password as Challenge};
use crate::login::FAILED_PASSWORD;

/// authentik's message, word for word.
const INVALID_PASSWORD: &str = "Invalid password";

/// Wrong passwords given in this plan.
const FAILED_ATTEMPTS: Key<u32> = Key::new("password_failed_attempts");

pub const KIND: Kind = Kind {
    name: "password",
    shows: &["ak-stage-password"],
    read: |options| {
        let failed = options.integer("failed_attempts_before_cancel", 5, 1);
        Arc::new(Password {
            failed_attempts_before_cancel: u32::try_from(failed).unwrap_or(u32::MAX),
            allow_show_password: options.bool("allow_show_password", false),
        })
    },
};

#[derive(Debug)]
pub struct Password {
    /// `failed_attempts_before_cancel`, default 5.
    pub failed_attempts_before_cancel: u32,
    /// `allow_show_password`, default false.
    pub allow_show_password: bool,
}

#[async_trait]
impl Stage for Password {
    fn challenge(&self, cx: &Cx<'_>) -> Component {
        Component::Password(Challenge {
            user: cx.pending_user(),
            allow_show_password: self.allow_show_password,
            recovery_url: None,
        })
    }

    async fn get(&self, cx: &mut Cx<'_>) -> Outcome {
        match cx.plan.context.has(&PENDING_USER_IDENTIFIER) {
            true => Outcome::Show,
            false => Outcome::Deny("No pending user.".into()),
        }
    }

    async fn post(&self, cx: &mut Cx<'_>, body: &Value) -> Outcome {
        let Some(identifier) = cx.plan.context.get(&PENDING_USER_IDENTIFIER) else {
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
        let services = cx.services;
        let account = cx.plan.context.get(&PENDING_USER);
        let Some(attempt) = services
            .attempt(&identifier, account.as_deref(), cx.request)
            .await
        else {
            return Outcome::Invalid(field_error("password", THROTTLED, "throttled"));
        };
        let user = cx.user();
        if services
            .directory
            .verify_password(user.as_deref(), secret)
            .await
        {
            cx.plan.context.set(&PASSWORD_OK, true);
            return Outcome::Pass;
        }
        services
            .failed(FAILED_PASSWORD, &identifier, cx.request, attempt)
            .await;
        let failed = cx.plan.context.get(&FAILED_ATTEMPTS).unwrap_or(0) + 1;
        cx.plan.context.set(&FAILED_ATTEMPTS, failed);
        if self.failed_attempts_before_cancel > 0 && failed >= self.failed_attempts_before_cancel {
            return Outcome::Deny(INVALID_PASSWORD.into());
        }
        Outcome::Invalid(field_error("password", INVALID_PASSWORD, "invalid"))
    }
}
