//! Policies: yes-or-no questions about a visitor, bound to flows, to a
//! flow's stages and to routes.
//!
//! A kind is registered in [`KINDS`] by name with the reader of its
//! `[policy.<name>]` options, as stage kinds are. [`Bindings`] is the one
//! place they are evaluated: in order, combined in `any` or `all` mode,
//! each result optionally negated. No bindings pass.
//!
//! Policies are synchronous and do no I/O: what one needs from the state
//! store (reputation scores) is fetched before, by the caller, so the
//! gate's decision stays a pure function and its time is bounded by the
//! policies' own size (expressions are size-limited and loop-free).

pub mod expression;
mod kinds;
pub mod reputation;

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::Options;
use crate::identity::Identity;

/// The request a decision is about (the expression language's view of
/// it, shared by every policy kind).
pub use crate::expression::RequestFacts;

/// No headers: what a flow's policies see (a flow is not the request it
/// was started for).
pub fn no_headers() -> &'static http::HeaderMap {
    static EMPTY: std::sync::LazyLock<http::HeaderMap> =
        std::sync::LazyLock::new(http::HeaderMap::new);
    &EMPTY
}

/// Everything a policy may look at.
pub struct Facts<'a> {
    /// The signed-in user, or the pending user of a flow once identified.
    pub user: Option<&'a Identity>,
    /// The name being tried at a login, matched or not (reputation).
    pub identifier: Option<&'a str>,
    pub request: RequestFacts<'a>,
    /// The flow's plan context (empty outside flows).
    pub context: &'a Map<String, Value>,
    /// The reputation scores of the client address and of the user (or
    /// identifier), fetched when a binding asks for them.
    pub reputation: Option<reputation::Scores>,
}

/// A policy's answer, with what it has to say about it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    pub passing: bool,
    pub messages: Vec<String>,
}

impl Verdict {
    pub fn pass() -> Verdict {
        Verdict {
            passing: true,
            messages: Vec::new(),
        }
    }

    pub fn fail(message: Option<&str>) -> Verdict {
        Verdict {
            passing: false,
            messages: message.map(str::to_owned).into_iter().collect(),
        }
    }

    pub fn of(passing: bool) -> Verdict {
        Verdict {
            passing,
            messages: Vec::new(),
        }
    }
}

pub trait Policy: fmt::Debug + Send + Sync {
    fn check(&self, facts: &Facts<'_>) -> Verdict;

    /// It reads `Facts::reputation`.
    fn uses_reputation(&self) -> bool {
        false
    }
}

/// One policy kind: its name in `kind = "…"` and the reader of its options.
pub struct Kind {
    pub name: &'static str,
    pub(crate) read: fn(&mut Options<'_, '_, '_>) -> Arc<dyn Policy>,
}

/// Every policy kind flowgate has.
pub const KINDS: &[Kind] = &[
    kinds::GROUP,
    kinds::USER,
    kinds::NETWORK,
    kinds::TIME,
    kinds::PASSWORD,
    reputation::KIND,
    expression::KIND,
];

pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

/// The kind names, for messages: `a, b or c`.
pub fn kind_names() -> String {
    let names: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
    crate::config::alternatives(&names)
}

/// A `[policy.<name>]`, read.
#[derive(Clone)]
pub struct PolicyConfig {
    pub kind: &'static str,
    pub policy: Arc<dyn Policy>,
}

impl fmt::Debug for PolicyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.policy.fmt(f)
    }
}

/// `policy_engine_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// At least one binding passes (authentik's default).
    #[default]
    Any,
    /// Every binding passes.
    All,
}

/// One policy bound somewhere: `"name"` or `{ policy = "name", negate = true }`.
#[derive(Debug, Clone)]
pub struct Binding {
    pub name: String,
    pub policy: Arc<dyn Policy>,
    /// `negate`: the result inverted (its messages kept).
    pub negate: bool,
}

/// The policies bound to one flow, stage binding or route.
#[derive(Debug, Clone, Default)]
pub struct Bindings {
    pub mode: Mode,
    pub list: Vec<Binding>,
}

impl Bindings {
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Whether evaluating these needs the reputation scores.
    pub fn uses_reputation(&self) -> bool {
        self.list.iter().any(|b| b.policy.uses_reputation())
    }

    /// Every binding evaluated in order (stopping once the answer is
    /// known), combined by `mode`. No bindings pass.
    pub fn evaluate(&self, facts: &Facts<'_>) -> Verdict {
        if self.list.is_empty() {
            return Verdict::pass();
        }
        let mut messages = Vec::new();
        for binding in &self.list {
            let verdict = binding.policy.check(facts);
            let passing = verdict.passing != binding.negate;
            messages.extend(verdict.messages);
            match (self.mode, passing) {
                (Mode::Any, true) => {
                    return Verdict {
                        passing: true,
                        messages,
                    }
                }
                (Mode::All, false) => {
                    return Verdict {
                        passing: false,
                        messages,
                    }
                }
                _ => {}
            }
        }
        Verdict {
            passing: self.mode == Mode::All,
            messages,
        }
    }
}
