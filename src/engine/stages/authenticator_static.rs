//! `authenticator_static` (`ak-stage-authenticator-static`): a new set of
//! recovery codes, shown once and kept (hashed) in the state store.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::engine::mfa;
use crate::engine::plan::{Key, SET_UP_SECOND_FACTOR};
use crate::engine::stage::{Cx, Kind, Outcome, Stage};
use crate::flow::{field_error, AuthenticatorStatic as Challenge, Component};

/// The codes shown, until the user goes on.
const CODES: Key<Vec<String>> = Key::new("recovery_codes_shown");

pub const KIND: Kind = Kind {
    name: "authenticator_static",
    shows: &["ak-stage-authenticator-static"],
    read: |_| Arc::new(AuthenticatorStatic),
};

#[derive(Debug)]
pub struct AuthenticatorStatic;

#[async_trait]
impl Stage for AuthenticatorStatic {
    fn challenge(&self, cx: &Cx<'_>) -> Component {
        Component::AuthenticatorStatic(Challenge {
            user: cx.pending_user(),
            codes: cx.plan.context.get(&CODES).unwrap_or_default(),
        })
    }

    async fn get(&self, cx: &mut Cx<'_>) -> Outcome {
        if let Err(refused) = cx.second_factor_owner().await {
            return Outcome::Deny(refused);
        }
        if !cx.plan.context.has(&CODES) {
            cx.plan.context.set(&CODES, mfa::new_recovery_codes());
        }
        Outcome::Show
    }

    /// Kept when the user goes on, so that codes never shown are never good.
    async fn post(&self, cx: &mut Cx<'_>, _body: &Value) -> Outcome {
        let user = match cx.second_factor_owner().await {
            Ok(user) => user,
            Err(refused) => return Outcome::Deny(refused),
        };
        let Some(codes) = cx.plan.context.get(&CODES) else {
            return Outcome::Deny("No pending user.".into());
        };
        match mfa::set_recovery_codes(&cx.services.state, &user.username, &codes).await {
            Ok(()) => {
                cx.plan.context.remove(&CODES);
                cx.plan.context.set(&SET_UP_SECOND_FACTOR, true);
                tracing::info!(user = %user.username, "recovery codes made");
                Outcome::Pass
            }
            Err(error) => {
                tracing::warn!(%error, "recovery codes could not be kept");
                Outcome::Invalid(field_error(
                    "non_field_errors",
                    "The codes could not be saved. Try again in a moment.",
                    "unavailable",
                ))
            }
        }
    }
}
