//! `authenticator_totp` (`ak-stage-authenticator-totp`): a new TOTP device
//! for the user, kept in the state store once a code from it is right.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::directory::{base32_decode, TotpDevice};
use crate::engine::mfa;
use crate::engine::plan::{Key, SET_UP_SECOND_FACTOR};
use crate::engine::stage::{Cx, Kind, Outcome, Stage};
use crate::flow::{field_error, AuthenticatorTotp as Challenge, Component};
use crate::session::now_secs;

/// authentik's message, word for word.
const CODE_DOES_NOT_MATCH: &str = "Code does not match";

/// The secret offered to the user, until a code from it is right.
const SECRET: Key<String> = Key::new("totp_setup_secret");

pub const KIND: Kind = Kind {
    name: "authenticator_totp",
    shows: &["ak-stage-authenticator-totp"],
    read: |options| {
        Arc::new(AuthenticatorTotp {
            issuer: options
                .string("issuer")
                .map_or_else(|| "flowgate".to_owned(), |(i, _)| i),
            device_name: options
                .string("device_name")
                .map_or_else(|| "Authenticator app".to_owned(), |(n, _)| n),
        })
    },
};

#[derive(Debug)]
pub struct AuthenticatorTotp {
    /// `issuer`, default "flowgate": the name the app shows the account under.
    pub issuer: String,
    /// `device_name`: what `flowgate totp list` calls the device.
    pub device_name: String,
}

impl AuthenticatorTotp {
    fn config_url(&self, cx: &Cx<'_>) -> String {
        let user = cx.subject().map(|u| u.username.clone()).unwrap_or_default();
        let secret = cx.plan.context.get(&SECRET).unwrap_or_default();
        mfa::otpauth_uri(&self.issuer, &user, &secret)
    }
}

#[async_trait]
impl Stage for AuthenticatorTotp {
    fn challenge(&self, cx: &Cx<'_>) -> Component {
        Component::AuthenticatorTotp(Challenge {
            user: cx.pending_user(),
            config_url: self.config_url(cx),
        })
    }

    async fn get(&self, cx: &mut Cx<'_>) -> Outcome {
        if let Err(refused) = cx.second_factor_owner().await {
            return Outcome::Deny(refused);
        }
        if !cx.plan.context.has(&SECRET) {
            cx.plan.context.set(&SECRET, mfa::new_secret());
        }
        Outcome::Show
    }

    async fn post(&self, cx: &mut Cx<'_>, body: &Value) -> Outcome {
        let user = match cx.second_factor_owner().await {
            Ok(user) => user,
            Err(refused) => return Outcome::Deny(refused),
        };
        let Some(secret) = cx.plan.context.get(&SECRET) else {
            return Outcome::Deny("No pending user.".into());
        };
        let code = match body.get("code") {
            Some(Value::String(s)) => s.trim().to_owned(),
            // Up to 2025.12 clients sent the code as a JSON integer (§2.4).
            Some(Value::Number(n)) => format!("{:06}", n.as_u64().unwrap_or(u64::MAX)),
            _ => {
                return Outcome::Invalid(field_error("code", "This field is required.", "required"))
            }
        };
        let Some(bytes) = base32_decode(&secret) else {
            return Outcome::Deny("No pending user.".into());
        };
        let device = TotpDevice::new("new".into(), bytes);
        let Some(step) = device.step_for(&code, now_secs()) else {
            return Outcome::Invalid(field_error("code", CODE_DOES_NOT_MATCH, "invalid"));
        };
        let services = cx.services;
        match mfa::add_totp(&services.state, &user.username, &self.device_name, &secret).await {
            Ok(record) => {
                // The code that proved the setup is spent: it does not
                // also pass a second-factor check right after.
                services
                    .spend_totp(&user.username, &format!("s{}", record.id), &step)
                    .await;
                cx.plan.context.remove(&SECRET);
                cx.plan.context.set(&SET_UP_SECOND_FACTOR, true);
                tracing::info!(user = %user.username, device = record.id, "TOTP device enrolled");
                Outcome::Pass
            }
            Err(error) => {
                tracing::warn!(%error, "a TOTP device could not be kept");
                Outcome::Invalid(field_error(
                    "non_field_errors",
                    "The device could not be saved. Try again in a moment.",
                    "unavailable",
                ))
            }
        }
    }
}
