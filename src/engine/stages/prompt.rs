//! `prompt` (`ak-stage-prompt`): a form of the operator's fields, checked
//! on the server; the answers go into the plan context as `prompt_data`.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::config::{Options, UserField};
use crate::engine::plan::{Key, PENDING_USER_IDENTIFIER};
use crate::engine::policy::{Bindings, Mode};
use crate::engine::stage::{Cx, Kind, Outcome, Stage};
use crate::flow::{
    field_error, Component, ErrorDetail, ErrorMap, Prompt as Challenge, PromptChoice, PromptField,
};

/// The answers of every prompt stage so far, by field key.
pub const PROMPT_DATA: Key<Map<String, Value>> = Key::new("prompt_data");

const REQUIRED: &str = "This field is required.";
/// A validation policy failed without saying why.
const REFUSED: &str = "These answers are not accepted.";
/// authentik's message, word for word.
const PASSWORDS_DIFFER: &str = "Passwords don't match.";

/// The field types, as authentik names them (`PromptTypeEnum`).
pub const TYPES: &[&str] = &[
    "text",
    "text_area",
    "text_read_only",
    "text_area_read_only",
    "username",
    "email",
    "password",
    "number",
    "checkbox",
    "radio-button-group",
    "dropdown",
    "date",
    "date-time",
    "separator",
    "hidden",
    "static",
];

pub const KIND: Kind = Kind {
    name: "prompt",
    shows: &["ak-stage-prompt"],
    read: |options| {
        let mut fields: Vec<Field> = Vec::new();
        options.tables("field", |field| {
            if let Some(read) = read_field(field) {
                if fields.iter().any(|f| f.key == read.key) {
                    field.error(format!(
                        "another field already has the key \"{}\"",
                        read.key
                    ));
                } else {
                    fields.push(read);
                }
            }
        });
        if fields.is_empty() {
            options.error("a prompt stage needs at least one `[[stage.<name>.field]]`");
        }
        fields.sort_by_key(|f| f.order);
        let validation_policies = Bindings {
            mode: Mode::All,
            list: options.policies("validation_policies"),
        };
        Arc::new(Prompt {
            fields,
            validation_policies,
        })
    },
};

fn read_field(options: &mut Options<'_, '_, '_>) -> Option<Field> {
    let key = match options.string("key") {
        Some((key, place)) => {
            let ok = !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                options.error_at(&place, "field keys use letters, digits, `-` and `_`");
            }
            key
        }
        None => {
            options.error("missing `key`: the name the answer is sent under");
            return None;
        }
    };
    let kind = match options.string("type") {
        Some((kind, place)) => match TYPES.iter().find(|t| **t == kind) {
            Some(kind) => *kind,
            None => {
                options.error_at(
                    &place,
                    format!(
                        "\"{kind}\" is not a field type; use one of {}",
                        TYPES.join(", ")
                    ),
                );
                "text"
            }
        },
        None => "text",
    };
    let choices: Vec<String> = options
        .strings("choices")
        .map(|(items, _)| items.into_iter().map(|(c, _)| c).collect())
        .unwrap_or_default();
    let chooses = matches!(kind, "dropdown" | "radio-button-group");
    if chooses && choices.is_empty() {
        options.error(format!("a `{kind}` field needs `choices`"));
    }
    Some(Field {
        label: options.string("label").map(|(l, _)| l).unwrap_or_default(),
        required: options.bool(
            "required",
            !matches!(kind, "checkbox" | "static" | "hidden" | "separator"),
        ),
        placeholder: options
            .string("placeholder")
            .map(|(p, _)| p)
            .unwrap_or_default(),
        initial_value: options
            .string("initial_value")
            .map(|(v, _)| v)
            .unwrap_or_default(),
        sub_text: options
            .string("sub_text")
            .map(|(s, _)| s)
            .unwrap_or_default(),
        order: i64::try_from(options.integer("order", 0, 0)).unwrap_or(i64::MAX),
        choices: chooses.then_some(choices),
        key,
        kind,
    })
}

#[derive(Debug)]
pub struct Prompt {
    pub fields: Vec<Field>,
    /// `validation_policies`: checked on the answers (in `prompt_data`),
    /// all of them; what the failing ones say is shown on the form.
    pub validation_policies: Bindings,
}

/// `[[stage.<name>.field]]`.
#[derive(Debug)]
pub struct Field {
    /// `key`: the name the answer is sent and kept under.
    pub key: String,
    /// `type`, default `text`.
    pub kind: &'static str,
    pub label: String,
    /// `required`, default true (false for checkboxes and fixed fields).
    pub required: bool,
    pub placeholder: String,
    pub initial_value: String,
    pub sub_text: String,
    pub order: i64,
    /// `choices`, for `dropdown` and `radio-button-group`.
    pub choices: Option<Vec<String>>,
}

impl Field {
    /// Fields whose value is the operator's, whatever is sent.
    fn fixed(&self) -> bool {
        matches!(
            self.kind,
            "hidden" | "static" | "text_read_only" | "text_area_read_only" | "separator"
        )
    }

    /// The answer to this field, checked: the value to keep, or the error.
    fn check(&self, sent: Option<&Value>, cx: &Cx<'_>) -> Result<Option<Value>, &'static str> {
        if self.fixed() {
            return Ok(
                (self.kind != "separator").then(|| Value::String(self.initial_value.clone()))
            );
        }
        if self.kind == "checkbox" {
            let ticked = match sent {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(Value::String(s)) => matches!(s.as_str(), "on" | "true"),
                Some(_) => return Err("Must be a valid boolean."),
            };
            if self.required && !ticked {
                return Err(REQUIRED);
            }
            return Ok(Some(Value::Bool(ticked)));
        }
        let text = match sent {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) if self.kind == "number" => n.to_string(),
            Some(_) => return Err("Not a valid string."),
        };
        // Passwords are kept as typed; everything else without the blanks
        // around it.
        let text = if self.kind == "password" {
            text
        } else {
            text.trim().to_owned()
        };
        if text.is_empty() {
            return match self.required {
                true => Err(REQUIRED),
                false => Ok(None),
            };
        }
        match self.kind {
            "email" if !is_email(&text) => Err("Enter a valid email address."),
            "number" => match text.parse::<i64>() {
                Ok(n) => Ok(Some(Value::from(n))),
                Err(_) => Err("A valid integer is required."),
            },
            "dropdown" | "radio-button-group"
                if !self.choices.iter().flatten().any(|c| *c == text) =>
            {
                Err("Select a valid choice.")
            }
            "username"
                if cx
                    .services
                    .directory
                    .find(&text, &[UserField::Username])
                    .is_some() =>
            {
                Err("Username is already taken.")
            }
            _ => Ok(Some(Value::String(text))),
        }
    }
}

/// A plausible address: one `@`, something either side, a dot in the
/// domain, no blanks. Whether it receives mail is not for a form to say.
fn is_email(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !text.chars().any(char::is_whitespace)
}

#[async_trait]
impl Stage for Prompt {
    fn challenge(&self, _cx: &Cx<'_>) -> Component {
        Component::Prompt(Challenge {
            fields: self
                .fields
                .iter()
                .map(|f| PromptField {
                    field_key: f.key.clone(),
                    label: f.label.clone(),
                    kind: f.kind.to_owned(),
                    required: f.required,
                    placeholder: f.placeholder.clone(),
                    initial_value: f.initial_value.clone(),
                    order: f.order,
                    sub_text: f.sub_text.clone(),
                    choices: f.choices.as_ref().map(|choices| {
                        choices
                            .iter()
                            .map(|c| PromptChoice {
                                label: c.clone(),
                                value: c.clone(),
                            })
                            .collect()
                    }),
                })
                .collect(),
        })
    }

    async fn post(&self, cx: &mut Cx<'_>, body: &Value) -> Outcome {
        let mut errors = ErrorMap::new();
        let mut answers = Map::new();
        for field in &self.fields {
            match field.check(body.get(&field.key), cx) {
                Ok(Some(value)) => {
                    answers.insert(field.key.clone(), value);
                }
                Ok(None) => {}
                Err(message) => {
                    let code = if message == REQUIRED {
                        "required"
                    } else {
                        "invalid"
                    };
                    errors.extend(field_error(&field.key, message, code));
                }
            }
        }
        // Two password fields are one password typed twice.
        let passwords: Vec<&Field> = self
            .fields
            .iter()
            .filter(|f| f.kind == "password")
            .collect();
        if let [first, second] = passwords[..] {
            if errors.is_empty() && answers.get(&first.key) != answers.get(&second.key) {
                errors.extend(field_error("non_field_errors", PASSWORDS_DIFFER, "invalid"));
            }
        }
        if !errors.is_empty() {
            return Outcome::Invalid(errors);
        }
        // The policies see the context as it will be with these answers.
        let mut context = cx.plan.context.clone();
        let mut data = context.get(&PROMPT_DATA).unwrap_or_default();
        data.extend(answers);
        context.set(&PROMPT_DATA, data);
        if !self.validation_policies.is_empty() {
            let user = cx.user().map(|u| u.identity());
            let identifier = context.get(&PENDING_USER_IDENTIFIER);
            let verdict = cx
                .services
                .evaluate(
                    &self.validation_policies,
                    cx.request,
                    user.as_ref().or(cx.request.user),
                    identifier.as_deref(),
                    context.as_map(),
                )
                .await;
            if !verdict.passing {
                let mut messages = verdict.messages;
                if messages.is_empty() {
                    messages.push(REFUSED.to_owned());
                }
                let details = messages
                    .iter()
                    .map(|m| ErrorDetail::new(m, "invalid"))
                    .collect();
                return Outcome::Invalid(ErrorMap::from([(
                    "non_field_errors".to_owned(),
                    details,
                )]));
            }
        }
        cx.plan.context = context;
        Outcome::Pass
    }
}
