//! flowgate's own HTML: the login relay's challenge pages (`login`), the
//! sign-out confirmation, and the message pages the router answers errors
//! with. Templates live in `src/pages/` and are compiled into the binary.
//!
//! Everything a user, an upstream or an executor can influence is escaped:
//! the templates end in `.html`, so minijinja autoescapes every `{{ … }}`,
//! and no template uses `|safe`. Links that come from the executor
//! (`enroll_url`, `recovery_url`) pass `safe_href` first. The pages are
//! served under `default-src 'none'; style-src 'self'; img-src 'self' data:;
//! form-action 'self'` (`respond::html_response`), so they hold no script, no
//! inline style and no external asset: all styling is in `flowgate.css`,
//! served at `{prefix}/static/flowgate.css`, and every form works without
//! JavaScript.

use minijinja::{Environment, HtmlEscape, UndefinedBehavior};
use serde::Serialize;

use crate::flow::{Challenge, Component, ErrorMap, Identification};

const BASE: &str = include_str!("pages/base.html");
const CHALLENGE: &str = include_str!("pages/challenge.html");
const MESSAGE: &str = include_str!("pages/message.html");
const SIGN_OUT: &str = include_str!("pages/sign_out.html");
const STYLESHEET: &str = include_str!("pages/flowgate.css");

/// The compiled templates.
#[derive(Debug)]
pub struct Pages {
    env: Environment<'static>,
}

/// One challenge, rendered as a form that posts back to the login relay.
pub struct ChallengePage<'a> {
    pub flow_title: &'a str,
    pub challenge: &'a Challenge,
    pub form_action: &'a str,
    pub csrf_token: &'a str,
    /// The `fid` the relay keeps this tab's flow under.
    pub flow_id: &'a str,
    /// The login page without `fid`: a fresh flow.
    pub restart_url: &'a str,
    pub static_prefix: &'a str,
}

/// A page with a title, a sentence and maybe a way on.
pub struct MessagePage<'a> {
    pub status: u16,
    pub title: &'a str,
    pub message: &'a str,
    pub detail: Option<&'a str>,
    /// `(href, text)`.
    pub link: Option<(&'a str, &'a str)>,
    pub static_prefix: &'a str,
}

/// "Sign out?" with the CSRF token, for a signed-in visitor.
pub struct SignOutPage<'a> {
    pub username: &'a str,
    pub form_action: &'a str,
    pub csrf_token: &'a str,
    pub static_prefix: &'a str,
}

impl Pages {
    /// Compile the embedded templates. They are part of the binary, so a
    /// parse error is a build defect (the `templates_parse` test catches it).
    pub fn new() -> Pages {
        let mut env = Environment::new();
        // A misspelt variable fails the render (and the tests) instead of
        // quietly printing nothing.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        for (name, source) in [
            ("base.html", BASE),
            ("challenge.html", CHALLENGE),
            ("message.html", MESSAGE),
            ("sign_out.html", SIGN_OUT),
        ] {
            if let Err(error) = env.add_template(name, source) {
                panic!("embedded template {name} does not parse: {error:#}");
            }
        }
        Pages { env }
    }

    pub fn challenge(&self, page: &ChallengePage<'_>) -> String {
        let view = ChallengeView::new(page);
        self.render("challenge.html", &view).unwrap_or_else(|| {
            fallback(
                view.title,
                "This sign-in step could not be shown.",
                Some((page.restart_url, "Start over")),
            )
        })
    }

    pub fn message(&self, page: &MessagePage<'_>) -> String {
        let view = MessageView {
            static_prefix: page.static_prefix,
            status: page.status,
            title: page.title,
            message: page.message,
            detail: page.detail,
            link: page.link.map(|(href, text)| Link { href, text }),
        };
        self.render("message.html", &view)
            .unwrap_or_else(|| fallback(page.title, page.message, page.link))
    }

    pub fn sign_out(&self, page: &SignOutPage<'_>) -> String {
        let view = SignOutView {
            static_prefix: page.static_prefix,
            username: page.username,
            form_action: page.form_action,
            csrf_token: page.csrf_token,
        };
        self.render("sign_out.html", &view).unwrap_or_else(|| {
            fallback(
                "Sign out",
                "This page could not be shown.",
                Some(("/", "Continue")),
            )
        })
    }

    /// The one stylesheet every page links to.
    pub fn stylesheet() -> &'static str {
        STYLESHEET
    }

    fn render<S: Serialize>(&self, name: &str, view: &S) -> Option<String> {
        let rendered = self
            .env
            .get_template(name)
            .and_then(|template| template.render(view));
        match rendered {
            Ok(html) => Some(html),
            Err(error) => {
                tracing::error!(template = name, error = %format!("{error:#}"), "page failed to render");
                None
            }
        }
    }
}

impl Default for Pages {
    fn default() -> Self {
        Pages::new()
    }
}

/// The page of last resort, when a template fails at run time: no template
/// engine, every piece escaped by hand.
fn fallback(title: &str, message: &str, link: Option<(&str, &str)>) -> String {
    let link = link
        .map(|(href, text)| {
            format!(
                "<p><a href=\"{}\">{}</a></p>",
                HtmlEscape(href),
                HtmlEscape(text)
            )
        })
        .unwrap_or_default();
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n</head>\n<body>\n<h1>{title}</h1>\n<p>{message}</p>\n{link}</body>\n</html>\n",
        title = HtmlEscape(title),
        message = HtmlEscape(message),
    )
}

/// Only plain web links go into an `href` from an executor's challenge: a
/// remote executor is trusted to run flows, not to put `javascript:` URLs
/// on our pages.
fn safe_href(url: &str) -> Option<&str> {
    let lower = url.trim_start().to_ascii_lowercase();
    let ok =
        lower.starts_with('/') || lower.starts_with("https://") || lower.starts_with("http://");
    ok.then_some(url)
}

#[derive(Serialize)]
struct Link<'a> {
    href: &'a str,
    text: &'a str,
}

#[derive(Serialize)]
struct MessageView<'a> {
    static_prefix: &'a str,
    status: u16,
    title: &'a str,
    message: &'a str,
    detail: Option<&'a str>,
    link: Option<Link<'a>>,
}

#[derive(Serialize)]
struct SignOutView<'a> {
    static_prefix: &'a str,
    username: &'a str,
    form_action: &'a str,
    csrf_token: &'a str,
}

/// Everything `challenge.html` reads, worked out here so the template only
/// lays it out. Every key is always present (the environment is strict).
#[derive(Serialize)]
struct ChallengeView<'a> {
    static_prefix: &'a str,
    title: &'a str,
    form_action: &'a str,
    csrf_token: &'a str,
    flow_id: &'a str,
    restart_url: &'a str,
    /// Which part of the template: `identification`, `password`,
    /// `authenticator_validate`, `user_login`, `consent`, `prompt`,
    /// `dummy`, `email`, `access_denied`, `flow_error` or `unsupported`.
    stage: &'static str,
    /// Whether the stage is answered with a form.
    form: bool,
    component: &'a str,
    user: Option<UserView<'a>>,
    /// `non_field_errors`, and errors of fields this page has no input for.
    alerts: Vec<&'a str>,
    /// Errors shown next to their input.
    errors: FieldErrors<'a>,
    identification: Option<IdentificationView<'a>>,
    code_hint: &'static str,
    code_numeric: bool,
    denied_message: &'a str,
    flow_error: Option<FlowErrorView<'a>>,
    consent: Option<ConsentView<'a>>,
    /// TOTP setup: the QR code (an SVG `data:` URI), the secret to type in
    /// instead, and the setup link itself.
    totp_setup: Option<TotpSetupView>,
    /// Recovery codes to write down.
    recovery_codes: Vec<&'a str>,
    prompt: Vec<PromptFieldView<'a>>,
    links: Vec<Link<'a>>,
}

/// One field of a prompt stage as the template lays it out.
#[derive(Serialize)]
struct PromptFieldView<'a> {
    key: &'a str,
    /// `input` (with `input_type`), `textarea`, `checkbox`, `select`,
    /// `radio`, `hidden`, `static`, `separator` or `alert`.
    widget: &'static str,
    input_type: &'static str,
    autocomplete: &'static str,
    label: &'a str,
    required: bool,
    read_only: bool,
    placeholder: &'a str,
    value: &'a str,
    sub_text: &'a str,
    /// `info`, `warning` or `danger`, for alerts.
    tone: &'static str,
    choices: Vec<ChoiceView<'a>>,
    errors: Vec<&'a str>,
}

#[derive(Serialize)]
struct ChoiceView<'a> {
    label: &'a str,
    value: &'a str,
    selected: bool,
}

#[derive(Serialize)]
struct ConsentView<'a> {
    header: Option<&'a str>,
    permissions: Vec<&'a str>,
    /// Asked for the first time since the user last consented.
    additional: Vec<&'a str>,
    token: &'a str,
}

#[derive(Serialize)]
struct TotpSetupView {
    qr: String,
    secret: String,
    /// The `otpauth://` URI the QR code holds, as a link for an
    /// authenticator app on the same device (a phone cannot scan its own
    /// screen); empty when the executor sent something else.
    uri: String,
}

#[derive(Serialize)]
struct UserView<'a> {
    name: &'a str,
    /// Only a `data:` image: CSP allows it, and a relative URL from a remote
    /// executor would point at flowgate, not at the executor.
    avatar: Option<&'a str>,
}

#[derive(Default, Serialize)]
struct FieldErrors<'a> {
    uid_field: Vec<&'a str>,
    password: Vec<&'a str>,
    code: Vec<&'a str>,
}

#[derive(Serialize)]
struct IdentificationView<'a> {
    uid_label: String,
    identifier: &'a str,
    password_fields: bool,
    remember_me: bool,
    primary_action: &'a str,
    /// The identifier is already filled in: start at the password.
    focus_password: bool,
}

#[derive(Serialize)]
struct FlowErrorView<'a> {
    request_id: &'a str,
    error: Option<&'a str>,
}

impl<'a> ChallengeView<'a> {
    fn new(page: &ChallengePage<'a>) -> ChallengeView<'a> {
        let challenge = page.challenge;
        let title = [
            page.flow_title,
            challenge
                .flow_info
                .as_ref()
                .map_or("", |info| info.title.as_str()),
        ]
        .into_iter()
        .find(|t| !t.trim().is_empty())
        .unwrap_or("Sign in");
        let mut view = ChallengeView {
            static_prefix: page.static_prefix,
            title,
            form_action: page.form_action,
            csrf_token: page.csrf_token,
            flow_id: page.flow_id,
            restart_url: page.restart_url,
            stage: "unsupported",
            form: false,
            component: challenge.component.name(),
            user: None,
            alerts: Vec::new(),
            errors: FieldErrors::default(),
            identification: None,
            code_hint: "",
            code_numeric: true,
            denied_message: "",
            flow_error: None,
            consent: None,
            prompt: Vec::new(),
            totp_setup: None,
            recovery_codes: Vec::new(),
            links: Vec::new(),
        };
        let mut inputs: &[&str] = &[];
        match &challenge.component {
            Component::Identification(c) => {
                view.stage = "identification";
                view.form = true;
                inputs = if c.password_fields {
                    &["uid_field", "password"]
                } else {
                    &["uid_field"]
                };
                view.identification = Some(identification(c));
                if let Some(href) = c.enroll_url.as_deref().and_then(safe_href) {
                    view.links.push(Link {
                        href,
                        text: "Sign up",
                    });
                }
                if let Some(href) = c.recovery_url.as_deref().and_then(safe_href) {
                    view.links.push(Link {
                        href,
                        text: "Forgot username or password?",
                    });
                }
            }
            Component::Password(c) => {
                view.stage = "password";
                view.form = true;
                inputs = &["password"];
                view.user = user(&c.user);
                if let Some(href) = c.recovery_url.as_deref().and_then(safe_href) {
                    view.links.push(Link {
                        href,
                        text: "Forgot password?",
                    });
                }
            }
            Component::AuthenticatorValidate(c) => {
                view.stage = "authenticator_validate";
                view.form = true;
                inputs = &["code"];
                view.user = user(&c.user);
                let has = |class: &str| c.device_challenges.iter().any(|d| d.device_class == class);
                // Recovery (static) codes are not all digits: no numeric keypad for them.
                view.code_numeric = !has("static");
                view.code_hint = match (has("totp"), has("static")) {
                    (true, true) => {
                        "Enter the code from your authenticator app, or a recovery code."
                    }
                    (true, false) => "Enter the code from your authenticator app.",
                    (false, true) => "Enter one of your recovery codes.",
                    (false, false) => "Enter your verification code.",
                };
            }
            Component::AuthenticatorTotp(c) => {
                view.stage = "authenticator_totp";
                view.form = true;
                inputs = &["code"];
                view.user = user(&c.user);
                view.code_numeric = true;
                view.totp_setup = Some(TotpSetupView {
                    qr: qr_data_uri(&c.config_url),
                    secret: url::Url::parse(&c.config_url)
                        .ok()
                        .and_then(|u| {
                            u.query_pairs()
                                .find(|(k, _)| k == "secret")
                                .map(|(_, v)| v.into_owned())
                        })
                        .unwrap_or_default(),
                    uri: Some(c.config_url.clone())
                        .filter(|u| u.starts_with("otpauth://"))
                        .unwrap_or_default(),
                });
            }
            Component::AuthenticatorStatic(c) => {
                view.stage = "authenticator_static";
                view.form = true;
                view.user = user(&c.user);
                view.recovery_codes = c.codes.iter().map(String::as_str).collect();
            }
            Component::UserLogin(u) => {
                view.stage = "user_login";
                view.form = true;
                view.user = user(u);
            }
            Component::Consent(c) => {
                view.stage = "consent";
                view.form = true;
                view.user = user(&c.user);
                let name = |p: &'a crate::flow::Permission| -> &'a str {
                    match p.name.trim().is_empty() {
                        true => &p.id,
                        false => &p.name,
                    }
                };
                view.consent = Some(ConsentView {
                    header: c.header_text.as_deref().filter(|h| !h.trim().is_empty()),
                    permissions: c.permissions.iter().map(name).collect(),
                    additional: c.additional_permissions.iter().map(name).collect(),
                    token: &c.token,
                });
            }
            Component::AccessDenied(c) => {
                view.stage = "access_denied";
                view.user = user(&c.user);
                view.denied_message = c
                    .error_message
                    .as_deref()
                    .filter(|m| !m.trim().is_empty())
                    .unwrap_or("Access denied");
            }
            Component::FlowError(c) => {
                view.stage = "flow_error";
                view.flow_error = Some(FlowErrorView {
                    request_id: &c.request_id,
                    error: c.error.as_deref().filter(|e| !e.trim().is_empty()),
                });
            }
            Component::Prompt(c) => {
                // A file upload is sent as a data URI that only a script can
                // make: such a prompt is not for a plain form.
                if let Some(fields) = prompt_fields(c) {
                    view.stage = "prompt";
                    view.form = true;
                    view.prompt = fields;
                }
            }
            Component::Other { component, .. } => match component.as_str() {
                // A stage that only asks to go on.
                "ak-stage-dummy" => {
                    view.stage = "dummy";
                    view.form = true;
                }
                // The flow goes on from the link in the message, on the
                // executor's own pages.
                "ak-stage-email" => view.stage = "email",
                _ => {}
            },
            // `xak-flow-redirect` is followed by the relay before it gets here.
            Component::Redirect(_) => {}
        }
        if let Some(errors) = &challenge.response_errors {
            view.sort_errors(errors, inputs);
        }
        view
    }

    fn sort_errors(&mut self, errors: &'a ErrorMap, inputs: &[&str]) {
        let prompt_keys: Vec<&str> = self.prompt.iter().map(|f| f.key).collect();
        let messages = |field: &str| {
            errors
                .get(field)
                .into_iter()
                .flatten()
                .map(|e| e.string.as_str())
                .filter(|s| !s.is_empty())
        };
        self.alerts.extend(messages("non_field_errors"));
        for field in errors.keys().filter(|f| *f != "non_field_errors") {
            if let Some(at) = prompt_keys.iter().position(|k| *k == field.as_str()) {
                let shown = self.prompt[at].widget;
                let slot = match shown {
                    "hidden" | "static" | "separator" | "alert" => &mut self.alerts,
                    _ => &mut self.prompt[at].errors,
                };
                slot.extend(messages(field));
                continue;
            }
            let slot = match field.as_str() {
                "uid_field" if inputs.contains(&"uid_field") => &mut self.errors.uid_field,
                "password" if inputs.contains(&"password") => &mut self.errors.password,
                "code" if inputs.contains(&"code") => &mut self.errors.code,
                _ => &mut self.alerts,
            };
            slot.extend(messages(field));
        }
    }
}

/// `text` as a QR code: an SVG image in a `data:` URI (what the page's CSP
/// allows for images).
fn qr_data_uri(text: &str) -> String {
    use base64::Engine;
    let svg = match qrcode::QrCode::new(text.as_bytes()) {
        Ok(code) => code
            .render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(200, 200)
            .build(),
        Err(_) => return String::new(),
    };
    format!(
        "data:image/svg+xml;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(svg)
    )
}

/// The fields of a prompt stage in their order, or `None` when one of them
/// cannot be sent from a plain form.
fn prompt_fields(prompt: &crate::flow::Prompt) -> Option<Vec<PromptFieldView<'_>>> {
    let mut fields: Vec<&crate::flow::PromptField> = prompt.fields.iter().collect();
    fields.sort_by_key(|f| f.order);
    fields
        .into_iter()
        .map(|f| {
            let (widget, input_type, autocomplete, read_only) = match f.kind.as_str() {
                "text" => ("input", "text", "off", false),
                "username" => ("input", "text", "username", false),
                "email" => ("input", "email", "email", false),
                "password" => ("input", "password", "new-password", false),
                "number" => ("input", "number", "off", false),
                "date" => ("input", "date", "off", false),
                "date-time" => ("input", "datetime-local", "off", false),
                "ak-locale" => ("input", "text", "language", false),
                "text_read_only" => ("input", "text", "off", true),
                "text_area" => ("textarea", "", "off", false),
                "text_area_read_only" => ("textarea", "", "off", true),
                "checkbox" => ("checkbox", "", "", false),
                "dropdown" => ("select", "", "", false),
                "radio-button-group" => ("radio", "", "", false),
                "hidden" => ("hidden", "", "", false),
                "static" => ("static", "", "", false),
                "separator" => ("separator", "", "", false),
                "alert_info" | "alert_warning" | "alert_danger" => ("alert", "", "", false),
                _ => return None,
            };
            let value = f.initial_value.as_str();
            let choices = f
                .choices
                .iter()
                .flatten()
                .map(|c| ChoiceView {
                    label: if c.label.is_empty() {
                        &c.value
                    } else {
                        &c.label
                    },
                    value: &c.value,
                    selected: c.value == value,
                })
                .collect();
            Some(PromptFieldView {
                key: &f.field_key,
                widget,
                input_type,
                autocomplete,
                label: if f.label.trim().is_empty() {
                    &f.field_key
                } else {
                    &f.label
                },
                required: f.required && !read_only,
                read_only,
                placeholder: &f.placeholder,
                value,
                sub_text: &f.sub_text,
                tone: match f.kind.as_str() {
                    "alert_warning" => "warning",
                    "alert_danger" => "danger",
                    _ => "info",
                },
                choices,
                errors: Vec::new(),
            })
        })
        .collect()
}

fn identification(c: &Identification) -> IdentificationView<'_> {
    let identifier = c.pending_user_identifier.as_deref().unwrap_or("");
    IdentificationView {
        uid_label: uid_label(c.user_fields.as_deref().unwrap_or(&[])),
        identifier,
        password_fields: c.password_fields,
        remember_me: c.enable_remember_me,
        primary_action: if c.primary_action.trim().is_empty() {
            "Continue"
        } else {
            &c.primary_action
        },
        focus_password: c.password_fields && !identifier.is_empty(),
    }
}

/// "Username", "Email", "Username or email"… from `user_fields` (§2.2).
fn uid_label(user_fields: &[String]) -> String {
    let names: Vec<&str> = [("username", "username"), ("email", "email"), ("upn", "UPN")]
        .into_iter()
        .filter(|(key, _)| user_fields.iter().any(|f| f == key))
        .map(|(_, name)| name)
        .collect();
    if names.is_empty() {
        return "Username".to_owned();
    }
    let label = names.join(" or ");
    let mut chars = label.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn user(user: &crate::flow::PendingUser) -> Option<UserView<'_>> {
    if user.pending_user.is_empty() {
        return None;
    }
    let avatar = Some(user.pending_user_avatar.as_str()).filter(|a| a.starts_with("data:image/"));
    Some(UserView {
        name: &user.pending_user,
        avatar,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{field_error, ErrorDetail};
    use serde_json::{json, Value};

    const PREFIX: &str = "/_flowgate/static";

    fn fixture(component: &str) -> Challenge {
        let path = format!(
            "{}/tests/fixtures/authentik/challenges/{component}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let value: Value = serde_json::from_str(&text).unwrap();
        Challenge::from_json(value).unwrap()
    }

    fn from_json(value: Value) -> Challenge {
        Challenge::from_json(value).unwrap()
    }

    fn render(challenge: &Challenge) -> String {
        Pages::new().challenge(&ChallengePage {
            flow_title: "Sign in to Example",
            challenge,
            form_action: "/_flowgate/flow/default/?next=%2F&fid=f1",
            csrf_token: "tok-123",
            flow_id: "f1",
            restart_url: "/_flowgate/flow/default/?next=%2F",
            static_prefix: PREFIX,
        })
    }

    fn identification_json() -> Value {
        json!({
            "component": "ak-stage-identification",
            "user_fields": ["username", "email"],
            "password_fields": false,
            "primary_action": "Log in",
        })
    }

    #[test]
    fn templates_parse() {
        let pages = Pages::new();
        for name in [
            "base.html",
            "challenge.html",
            "message.html",
            "sign_out.html",
        ] {
            assert!(pages.env.get_template(name).is_ok(), "{name}");
        }
        assert!(Pages::stylesheet().contains("prefers-color-scheme: dark"));
    }

    #[test]
    fn identification_form_carries_csrf_and_flow_id() {
        let html = render(&from_json(identification_json()));
        assert!(html.starts_with("<!doctype html>"), "{html}");
        assert!(html.contains("<form method=\"post\" action=\""), "{html}");
        assert!(
            html.contains("<input type=\"hidden\" name=\"csrf_token\" value=\"tok-123\">"),
            "{html}"
        );
        assert!(
            html.contains("<input type=\"hidden\" name=\"fid\" value=\"f1\">"),
            "{html}"
        );
        assert!(html.contains("name=\"uid_field\""), "{html}");
        assert!(html.contains("autocomplete=\"username\""), "{html}");
        assert!(html.contains(">Username or email</label>"), "{html}");
        assert!(html.contains(">Log in</button>"), "{html}");
        assert!(
            html.contains(&format!("href=\"{}/flowgate.css\"", HtmlEscape(PREFIX))),
            "{html}"
        );
        assert!(
            !html.contains("name=\"password\""),
            "no inline password field: {html}"
        );
        assert!(!html.contains("<script"), "{html}");
        assert!(
            !html.contains("style="),
            "CSP forbids inline styles: {html}"
        );
    }

    #[test]
    fn identification_with_password_and_remember_me() {
        let mut value = identification_json();
        value["user_fields"] = json!(["email"]);
        value["password_fields"] = json!(true);
        value["enable_remember_me"] = json!(true);
        value["pending_user_identifier"] = json!("alice@example.test");
        value["recovery_url"] = json!("javascript:alert(1)");
        value["enroll_url"] = json!("/if/flow/enroll/");
        let html = render(&from_json(value));
        assert!(html.contains(">Email</label>"), "{html}");
        assert!(
            html.contains("name=\"uid_field\" value=\"alice@example.test\""),
            "{html}"
        );
        assert!(html.contains("name=\"password\""), "{html}");
        assert!(
            html.contains("autocomplete=\"current-password\" required autofocus"),
            "{html}"
        );
        assert!(
            html.contains("name=\"remember_me\" value=\"true\" type=\"checkbox\""),
            "{html}"
        );
        assert!(html.contains(">Sign up</a>"), "{html}");
        assert!(!html.contains("javascript:"), "{html}");
    }

    #[test]
    fn pending_user_is_escaped() {
        let challenge = from_json(json!({
            "component": "ak-stage-password",
            "pending_user": "<script>alert(1)</script>",
            "pending_user_avatar": "/static/dist/assets/images/user_default.png",
        }));
        let html = render(&challenge);
        assert!(!html.contains("<script>alert(1)</script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;"), "{html}");
        assert!(
            !html.contains("<img"),
            "no avatar from a relative URL: {html}"
        );
        assert!(html.contains(">Not you?</a>"), "{html}");
    }

    #[test]
    fn password_error_shows_next_to_the_field() {
        let challenge = fixture("ak-stage-password").with_errors(field_error(
            "password",
            "Invalid password",
            "invalid",
        ));
        let html = render(&challenge);
        assert!(html.contains("Invalid password"), "{html}");
        assert!(
            html.contains("class=\"field-error\" id=\"password-error\">Invalid password</p>"),
            "{html}"
        );
        assert!(html.contains("aria-invalid=\"true\""), "{html}");
        assert!(html.contains("akadmin"), "{html}");
        assert!(html.contains(">Forgot password?</a>"), "{html}");
    }

    #[test]
    fn errors_without_an_input_go_to_the_alert() {
        let mut errors = field_error("non_field_errors", "Failed to authenticate.", "invalid");
        errors.insert(
            "password".into(),
            vec![ErrorDetail::new("Invalid password", "invalid")],
        );
        errors.insert(
            "captcha_token".into(),
            vec![ErrorDetail::new("Captcha <failed>", "invalid")],
        );
        let html = render(&from_json(identification_json()).with_errors(errors));
        let alert = html
            .split("role=\"alert\">")
            .nth(1)
            .and_then(|s| s.split("</div>").next())
            .unwrap_or_default();
        assert!(alert.contains("Failed to authenticate."), "{html}");
        assert!(
            alert.contains("Invalid password"),
            "no password input on this page: {html}"
        );
        assert!(alert.contains("Captcha &lt;failed&gt;"), "{html}");
    }

    #[test]
    fn authenticator_validate_asks_for_a_code() {
        let html = render(
            &fixture("ak-stage-authenticator-validate").with_errors(field_error(
                "code",
                "Invalid Token",
                "invalid",
            )),
        );
        assert!(html.contains("name=\"code\""), "{html}");
        assert!(html.contains("autocomplete=\"one-time-code\""), "{html}");
        assert!(
            html.contains("id=\"code-error\">Invalid Token</p>"),
            "{html}"
        );
        let totp_only = json!({
            "component": "ak-stage-authenticator-validate",
            "pending_user": "alice",
            "pending_user_avatar": crate::directory::DEFAULT_AVATAR,
            "device_challenges": [{"device_class": "totp", "device_uid": "1", "challenge": {}}],
        });
        let html = render(&from_json(totp_only));
        assert!(
            html.contains("inputmode=\"numeric\" pattern=\"[0-9]*\""),
            "{html}"
        );
        assert!(
            html.contains("<img class=\"avatar\" src=\"data:image"),
            "{html}"
        );
    }

    #[test]
    fn totp_setup_shows_the_qr_code_the_key_and_the_link() {
        let setup = |config_url: &str| {
            render(&from_json(json!({
                "component": "ak-stage-authenticator-totp",
                "pending_user": "alice",
                "pending_user_avatar": "",
                "config_url": config_url,
            })))
        };
        let html = setup("otpauth://totp/flowgate%3Aalice?secret=JBSWY3DPEHPK3PXP&issuer=flowgate");
        assert!(
            html.contains("<img class=\"qr\" src=\"data:image&#x2f;svg+xml;base64,"),
            "{html}"
        );
        assert!(
            html.contains("<code class=\"secret\">JBSWY3DPEHPK3PXP</code>"),
            "{html}"
        );
        assert!(
            html.contains("class=\"setup-link\" href=\"otpauth:&#x2f;&#x2f;totp&#x2f;flowgate%3Aalice?secret=JBSWY3DPEHPK3PXP&amp;issuer=flowgate\""),
            "{html}"
        );
        let other = setup("javascript:alert(1)//?secret=X");
        assert!(!other.contains("setup-link"), "{other}");
        assert!(!other.contains("javascript:"), "{other}");
    }

    #[test]
    fn user_login_offers_yes_and_no() {
        let html = render(&fixture("ak-stage-user-login"));
        assert!(html.contains("Stay signed in?"), "{html}");
        assert!(
            html.contains("name=\"remember_me\" value=\"true\""),
            "{html}"
        );
        assert!(
            html.contains("name=\"remember_me\" value=\"false\""),
            "{html}"
        );
        assert_eq!(html.matches("<form").count(), 1, "{html}");
    }

    #[test]
    fn access_denied_has_no_form() {
        let html = render(&fixture("ak-stage-access-denied"));
        assert!(!html.contains("<form"), "{html}");
        assert!(
            html.contains("Flow does not apply to current user."),
            "{html}"
        );
        assert!(html.contains(">Try again</a>"), "{html}");
        let bare = render(&Challenge::access_denied(None, ""));
        assert!(bare.contains("Access denied"), "{bare}");
        assert!(!bare.contains("<form"), "{bare}");
    }

    #[test]
    fn flow_error_shows_the_request_id() {
        let html = render(&fixture("ak-stage-flow-error"));
        assert!(html.contains("Something went wrong"), "{html}");
        assert!(
            html.contains("Request ID: 3f1c9a2e8b7d4e6fa0c5b2d1e9f8a7b6"),
            "{html}"
        );
        assert!(!html.contains("<form"), "{html}");
    }

    #[test]
    fn unknown_components_are_explained_without_a_form() {
        let html = render(&fixture("ak-stage-captcha"));
        assert!(
            html.contains("This sign-in step (ak-stage-captcha) is not supported in the browser"),
            "{html}"
        );
        assert!(!html.contains("<form"), "{html}");
    }

    #[test]
    fn a_consent_asks_with_the_token_in_the_form() {
        let html = render(&fixture("ak-stage-consent"));
        assert!(html.contains("<form"), "{html}");
        assert!(html.contains("name=\"token\""), "{html}");
    }

    #[test]
    fn every_fixture_renders() {
        let dir = format!(
            "{}/tests/fixtures/authentik/challenges",
            env!("CARGO_MANIFEST_DIR")
        );
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry
                .unwrap()
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".json")
                .to_owned();
            let html = render(&fixture(&name));
            assert!(
                html.contains("<main class=\"card\">"),
                "{name} fell back: {html}"
            );
        }
    }

    #[test]
    fn message_page_escapes_its_title() {
        let html = Pages::new().message(&MessagePage {
            status: 502,
            title: "<b>Bad</b> gateway",
            message: "The upstream did not answer.",
            detail: Some("connect: refused"),
            link: Some(("/", "Home")),
            static_prefix: PREFIX,
        });
        assert!(!html.contains("<b>Bad</b>"), "{html}");
        assert!(
            html.contains("&lt;b&gt;Bad&lt;&#x2f;b&gt; gateway"),
            "{html}"
        );
        assert!(html.contains("Error 502"), "{html}");
        assert!(html.contains("connect: refused"), "{html}");
        assert!(html.contains(">Home</a>"), "{html}");
        let ok = Pages::new().message(&MessagePage {
            status: 200,
            title: "Signed out",
            message: "You are signed out.",
            detail: None,
            link: None,
            static_prefix: PREFIX,
        });
        assert!(!ok.contains("Error 200"), "{ok}");
    }

    #[test]
    fn sign_out_page_names_the_user_and_carries_csrf() {
        let html = Pages::new().sign_out(&SignOutPage {
            username: "alice",
            form_action: "/_flowgate/sign_out",
            csrf_token: "tok-456",
            static_prefix: PREFIX,
        });
        assert!(html.contains("Signed in as alice"), "{html}");
        assert!(
            html.contains("<input type=\"hidden\" name=\"csrf_token\" value=\"tok-456\">"),
            "{html}"
        );
        assert!(html.contains("<form method=\"post\" action=\""), "{html}");
        assert!(html.contains(">Sign out</button>"), "{html}");
    }

    #[test]
    fn fallback_escapes_everything() {
        let html = fallback("<t>", "<m>", Some(("\"x", "<l>")));
        assert!(
            !html.contains("<t>") && !html.contains("<m>") && !html.contains("<l>"),
            "{html}"
        );
        assert!(html.contains("&quot;x"), "{html}");
    }
}
