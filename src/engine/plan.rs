//! A flow run's plan: the stages still to come and the context they share.
//!
//! The context is authentik's plan context: a map that stages read and
//! write. Each entry is reached through a typed [`Key`], declared once by
//! the stage that owns it (or here, when the driver reads it too), so a
//! value has one type wherever it is used. The plan is kept as JSON in the
//! visitor's pre-auth session (`FlowState`).

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    pub flow: String,
    /// The stages still to run; the head is the current stage.
    pub stages: Vec<Planned>,
    #[serde(default)]
    pub context: Context,
}

/// A stage in the plan, and the flow's binding it came from (`None`: put
/// in by another stage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Planned {
    pub stage: String,
    #[serde(default)]
    pub binding: Option<usize>,
}

/// The plan context: typed entries over a JSON map.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Context(Map<String, Value>);

/// The name and the type of one context entry.
pub struct Key<T> {
    name: &'static str,
    kind: PhantomData<fn() -> T>,
}

impl<T> Key<T> {
    pub const fn new(name: &'static str) -> Key<T> {
        Key {
            name,
            kind: PhantomData,
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl Context {
    /// The entry, if set and of the key's type.
    pub fn get<T: DeserializeOwned>(&self, key: &Key<T>) -> Option<T> {
        T::deserialize(self.0.get(key.name)?).ok()
    }

    pub fn has<T>(&self, key: &Key<T>) -> bool {
        self.0.contains_key(key.name)
    }

    pub fn set<T: Serialize>(&mut self, key: &Key<T>, value: T) {
        if let Ok(value) = serde_json::to_value(value) {
            self.0.insert(key.name.to_owned(), value);
        }
    }

    pub fn remove<T>(&mut self, key: &Key<T>) {
        self.0.remove(key.name);
    }

    /// The whole map, for expressions and the prompt stage's answers.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }
}

/// What the visitor typed at identification, shown back to them. Never the
/// matched username: that would tell whether an account exists.
pub const PENDING_USER_IDENTIFIER: Key<String> = Key::new("pending_user_identifier");
/// The username the identifier matched, if it matched one.
pub const PENDING_USER: Key<String> = Key::new("pending_user");
/// The pending user's password was checked.
pub const PASSWORD_OK: Key<bool> = Key::new("password_ok");
/// A second factor of the pending user's was checked.
pub const SECOND_FACTOR: Key<bool> = Key::new("second_factor");
/// A stage of this plan set up a second factor (the user proved the new
/// device, or saw the new codes): later setup stages may add more.
pub const SET_UP_SECOND_FACTOR: Key<bool> = Key::new("second_factor_set_up");
/// A second factor to remember on the browser when the login finishes
/// (an authenticator-validate stage with `last_auth_threshold`).
pub const REMEMBER_SECOND_FACTOR: Key<crate::engine::memo::SecondFactor> =
    Key::new("remember_second_factor");
/// The identification stage's remember-me: keep the identifier on the
/// browser (`true`) or forget it (`false`) when the login finishes.
pub const REMEMBER_IDENTIFIER: Key<bool> = Key::new("remember_identifier");
/// Set by the user-logout stage: the visitor's session ends with the plan.
pub const LOGOUT: Key<bool> = Key::new("logout");
/// Set by the user-login stage: who is logged in when the plan ends.
pub const LOGIN: Key<LoginChoice> = Key::new("login");

/// The user-login stage's decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoginChoice {
    pub user: String,
    /// The user chose to stay signed in: the session lives this many
    /// seconds longer (the stage's `remember_me_offset`).
    #[serde(default)]
    pub remember_secs: u64,
    /// Asked to stay signed in, the user said no: the cookie ends with the
    /// browser session.
    #[serde(default)]
    pub declined_remember: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_keep_their_type_through_json() {
        const COUNT: Key<u32> = Key::new("count");
        let mut context = Context::default();
        assert_eq!(context.get(&COUNT), None);
        context.set(&COUNT, 3);
        context.set(&PENDING_USER, "alice".to_owned());
        let back: Context =
            serde_json::from_str(&serde_json::to_string(&context).unwrap()).unwrap();
        assert_eq!(back.get(&COUNT), Some(3));
        assert_eq!(back.get(&PENDING_USER).as_deref(), Some("alice"));
        // Another type under the same name reads as absent, not as junk.
        const WRONG: Key<bool> = Key::new("count");
        assert_eq!(back.get(&WRONG), None);
    }
}
