//! `identification` (`ak-stage-identification`): who the visitor says they
//! are, by username or email, optionally with the password on the same form.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::{required_string, FAILED_TO_AUTHENTICATE, THROTTLED};
use crate::config::{Designation, UserField};
use crate::engine::memo::BrowserMemo;
use crate::engine::plan::{
    PASSWORD_OK, PENDING_USER, PENDING_USER_IDENTIFIER, REMEMBER_IDENTIFIER,
};
use crate::engine::stage::{Cx, Kind, Outcome, Stage};
use crate::flow::{field_error, Component, Identification as Challenge};
use crate::login::FAILED_PASSWORD;

pub const KIND: Kind = Kind {
    name: "identification",
    shows: &["ak-stage-identification"],
    read: |options| {
        let mut user_fields = Vec::new();
        match options.strings("user_fields") {
            Some((items, list_place)) => {
                for (field, place) in items {
                    match field.as_str() {
                        "username" => user_fields.push(UserField::Username),
                        "email" => user_fields.push(UserField::Email),
                        _ => options.error_at(
                            &place,
                            format!("\"{field}\" is not one of \"username\", \"email\""),
                        ),
                    }
                }
                if user_fields.is_empty() {
                    options.error_at(&list_place, "name at least one of \"username\", \"email\"");
                }
            }
            None => user_fields = vec![UserField::Username, UserField::Email],
        }
        Arc::new(Identification {
            user_fields,
            password: options.bool("password", false),
            pretend_user_exists: options.bool("pretend_user_exists", true),
            enable_remember_me: options.bool("enable_remember_me", false),
        })
    },
};

#[derive(Debug)]
pub struct Identification {
    /// `user_fields`, default `["username", "email"]`.
    pub user_fields: Vec<UserField>,
    /// `password = true`: ask for the password on the same form.
    pub password: bool,
    /// `pretend_user_exists`, default true: an unknown name goes on to the
    /// password stage, which then fails like a wrong password.
    pub pretend_user_exists: bool,
    /// `enable_remember_me`: offer to remember the identifier on this
    /// browser, filled in on the next visit (a sealed memo cookie keeps
    /// it, set when the login succeeds).
    pub enable_remember_me: bool,
}

#[async_trait]
impl Stage for Identification {
    fn challenge(&self, cx: &Cx<'_>) -> Component {
        let authentication = cx.flow.designation == Designation::Authentication;
        Component::Identification(Challenge {
            user_fields: Some(
                self.user_fields
                    .iter()
                    .map(|f| f.as_str().to_owned())
                    .collect(),
            ),
            password_fields: self.password,
            allow_show_password: false,
            flow_designation: cx.flow.designation.as_str().to_owned(),
            captcha_stage: None,
            primary_action: if authentication { "Log in" } else { "Continue" }.to_owned(),
            sources: Vec::new(),
            show_source_labels: false,
            enable_remember_me: self.enable_remember_me,
            // What was typed before, when the flow started again with its
            // context (`restart_with_context`); else what this browser was
            // asked to remember.
            pending_user_identifier: cx.plan.context.get(&PENDING_USER_IDENTIFIER).or_else(|| {
                self.enable_remember_me
                    .then(|| BrowserMemo::of(cx.request).identifier)
                    .flatten()
            }),
            enroll_url: None,
            recovery_url: None,
        })
    }

    async fn post(&self, cx: &mut Cx<'_>, body: &Value) -> Outcome {
        let identifier = match required_string(body, "uid_field") {
            Ok(v) => v,
            Err(errors) => return Outcome::Invalid(errors),
        };
        let services = cx.services;
        let user = services.directory.find(identifier, &self.user_fields);
        if self.password {
            let secret = body.get("password").and_then(Value::as_str).unwrap_or("");
            let account = user.as_ref().map(|u| u.username.as_str());
            let Some(attempt) = services.attempt(identifier, account, cx.request).await else {
                return Outcome::Invalid(field_error("non_field_errors", THROTTLED, "throttled"));
            };
            if !services
                .directory
                .verify_password(user.as_deref(), secret)
                .await
            {
                services
                    .failed(FAILED_PASSWORD, identifier, cx.request, attempt)
                    .await;
                return Outcome::Invalid(field_error(
                    "non_field_errors",
                    FAILED_TO_AUTHENTICATE,
                    "invalid",
                ));
            }
            cx.plan.context.set(&PASSWORD_OK, true);
        } else if user.is_none() && !self.pretend_user_exists {
            return Outcome::Invalid(field_error(
                "non_field_errors",
                FAILED_TO_AUTHENTICATE,
                "invalid",
            ));
        }
        let context = &mut cx.plan.context;
        context.set(&PENDING_USER_IDENTIFIER, identifier.to_owned());
        // authentik's own client remembers in the browser and sends no
        // choice: then what the browser has stays as it is.
        if let (true, Some(remember)) = (
            self.enable_remember_me,
            body.get("remember_me").and_then(Value::as_bool),
        ) {
            context.set(&REMEMBER_IDENTIFIER, remember);
        }
        match user {
            Some(user) => context.set(&PENDING_USER, user.username.clone()),
            None => context.remove(&PENDING_USER),
        }
        Outcome::Pass
    }
}
