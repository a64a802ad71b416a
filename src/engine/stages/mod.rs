//! The stage kinds, one file each (`engine::stage` registers them).

pub mod authenticator_static;
pub mod authenticator_totp;
pub mod authenticator_validate;
pub mod consent;
pub mod deny;
pub mod identification;
pub mod password;
pub mod prompt;
pub mod redirect;
pub mod user_login;
pub mod user_logout;

use serde_json::Value;

use crate::flow::{field_error, ErrorMap};

/// A required, non-blank string field, with DRF's messages when it is not.
pub(crate) fn required_string<'b>(body: &'b Value, field: &str) -> Result<&'b str, ErrorMap> {
    match body.get(field) {
        None | Some(Value::Null) => Err(field_error(field, "This field is required.", "required")),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(field_error(field, "This field may not be blank.", "blank"))
        }
        Some(Value::String(s)) => Ok(s.trim()),
        Some(_) => Err(field_error(field, "Not a valid string.", "invalid")),
    }
}

/// authentik's messages, kept word for word: clients match on them.
pub(crate) const FAILED_TO_AUTHENTICATE: &str = "Failed to authenticate.";
pub(crate) const THROTTLED: &str = "Too many failed attempts. Try again in a few minutes.";
