//! `consent` (`ak-stage-consent`): the user agrees before going on, every
//! time (`always`), once (`permanent`) or once per `expire_after`
//! (`expiring`). A consent given is kept in the state store for the user,
//! the flow and the stage: a route's authorization flow asks once per app.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::engine::plan::Key;
use crate::engine::stage::{Cx, Kind, Outcome, Stage};
use crate::flow::{field_error, Component, Consent as Challenge, Permission};
use crate::session::now_secs;

/// authentik's message, word for word.
const INVALID_TOKEN: &str = "Invalid consent token, re-showing prompt";

/// The token the challenge carries, echoed in the answer.
const TOKEN: Key<String> = Key::new("consent_token");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Always,
    Permanent,
    Expiring(Duration),
}

pub const KIND: Kind = Kind {
    name: "consent",
    shows: &["ak-stage-consent"],
    read: |options| {
        let mode = options.choice(
            "mode",
            &[
                ("always", "always"),
                ("permanent", "permanent"),
                ("expiring", "expiring"),
            ],
            "always",
        );
        let expire_after =
            options.duration("expire_after", Duration::from_secs(30 * 86_400), false);
        let mode = match mode {
            "permanent" => Mode::Permanent,
            "expiring" => Mode::Expiring(expire_after),
            _ => Mode::Always,
        };
        Arc::new(Consent {
            mode,
            header: options.string("header").map(|(h, _)| h),
            permissions: options
                .strings("permissions")
                .map(|(items, _)| items.into_iter().map(|(p, _)| p).collect())
                .unwrap_or_default(),
        })
    },
};

#[derive(Debug)]
pub struct Consent {
    /// `mode`: `always` (default) | `permanent` | `expiring` (with
    /// `expire_after`, default 30 days).
    pub mode: Mode,
    /// `header`: the question shown.
    pub header: Option<String>,
    /// `permissions`: what the user agrees to, one line each.
    pub permissions: Vec<String>,
}

impl Consent {
    fn record(cx: &Cx<'_>, user: &str) -> String {
        let stage = cx
            .plan
            .stages
            .first()
            .map(|p| p.stage.as_str())
            .unwrap_or("");
        format!("consent:{}:{}:{stage}", user.to_lowercase(), cx.flow.slug)
    }
}

#[async_trait]
impl Stage for Consent {
    fn challenge(&self, cx: &Cx<'_>) -> Component {
        Component::Consent(Challenge {
            user: cx.pending_user(),
            header_text: self.header.clone(),
            permissions: self
                .permissions
                .iter()
                .map(|p| Permission {
                    id: p.clone(),
                    name: p.clone(),
                })
                .collect(),
            additional_permissions: Vec::new(),
            token: cx.plan.context.get(&TOKEN).unwrap_or_default(),
        })
    }

    async fn get(&self, cx: &mut Cx<'_>) -> Outcome {
        let Some(user) = cx.subject() else {
            return Outcome::Deny("No pending user.".into());
        };
        if self.mode != Mode::Always {
            let given: Result<Option<u64>, _> = cx
                .services
                .state
                .doc(&Self::record(cx, &user.username))
                .await;
            match given {
                Ok(Some(_)) => return Outcome::Pass,
                Ok(None) => {}
                // Asked again rather than let through unasked.
                Err(error) => tracing::warn!(%error, "consents cannot be read: asking again"),
            }
        }
        cx.plan.context.set(&TOKEN, crate::session::random_token());
        Outcome::Show
    }

    async fn post(&self, cx: &mut Cx<'_>, body: &Value) -> Outcome {
        let Some(user) = cx.subject() else {
            return Outcome::Deny("No pending user.".into());
        };
        let expected = cx.plan.context.get(&TOKEN).unwrap_or_default();
        let sent = body.get("token").and_then(Value::as_str).unwrap_or("");
        if expected.is_empty() || !crate::session::tokens_equal(sent, &expected) {
            cx.plan.context.set(&TOKEN, crate::session::random_token());
            return Outcome::Invalid(field_error("token", INVALID_TOKEN, "invalid"));
        }
        let ttl = match self.mode {
            Mode::Always => None,
            Mode::Permanent => Some(None),
            Mode::Expiring(after) => Some(Some(after)),
        };
        if let Some(ttl) = ttl {
            let record = Self::record(cx, &user.username);
            let kept = cx
                .services
                .state
                .update_doc(&record, ttl, |_: Option<u64>| (Some(now_secs()), ()))
                .await;
            if let Err(error) = kept {
                // Given all the same: it is asked again next time.
                tracing::warn!(%error, "a consent could not be kept");
            }
        }
        cx.plan.context.remove(&TOKEN);
        Outcome::Pass
    }
}
