//! `user_login` (`ak-stage-user-login`): the pending user is logged in when
//! the plan ends; with `remember_me_offset`, they are asked whether to stay
//! signed in longer.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::directory::User;
use crate::engine::plan::{LoginChoice, LOGIN, PASSWORD_OK};
use crate::engine::stage::{Cx, Kind, Outcome, Stage};
use crate::flow::{field_error, Component};

const NO_PENDING_USER: &str = "No Pending user to login.";

pub const KIND: Kind = Kind {
    name: "user_login",
    shows: &["ak-stage-user-login"],
    read: |options| {
        Arc::new(UserLogin {
            remember_me_offset: options.duration("remember_me_offset", Duration::ZERO, true),
        })
    },
};

#[derive(Debug)]
pub struct UserLogin {
    /// `remember_me_offset`: when non-zero, the stage shows
    /// `ak-stage-user-login` and a "remember me" choice adds this much to
    /// the session lifetime. Default zero: log in silently.
    pub remember_me_offset: Duration,
}

impl UserLogin {
    /// The pending user, if their password was checked and they may log in.
    fn user(cx: &Cx<'_>) -> Option<Arc<User>> {
        cx.user()
            .filter(|u| cx.plan.context.get(&PASSWORD_OK) == Some(true) && !u.disabled)
    }
}

#[async_trait]
impl Stage for UserLogin {
    fn challenge(&self, cx: &Cx<'_>) -> Component {
        Component::UserLogin(cx.pending_user())
    }

    async fn get(&self, cx: &mut Cx<'_>) -> Outcome {
        let Some(user) = Self::user(cx) else {
            return Outcome::Deny(NO_PENDING_USER.into());
        };
        if !self.remember_me_offset.is_zero() {
            return Outcome::Show;
        }
        cx.plan.context.set(
            &LOGIN,
            LoginChoice {
                user: user.username.clone(),
                ..LoginChoice::default()
            },
        );
        Outcome::Pass
    }

    async fn post(&self, cx: &mut Cx<'_>, body: &Value) -> Outcome {
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
        let Some(user) = Self::user(cx) else {
            return Outcome::Deny(NO_PENDING_USER.into());
        };
        cx.plan.context.set(
            &LOGIN,
            LoginChoice {
                user: user.username.clone(),
                remember_secs: match remember {
                    true => self.remember_me_offset.as_secs(),
                    false => 0,
                },
                declined_remember: !remember && !self.remember_me_offset.is_zero(),
            },
        );
        Outcome::Pass
    }
}
