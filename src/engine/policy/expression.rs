//! `expression`: a CEL expression over the user, the request and the
//! flow's context (`crate::expression` is the language), compiled when the
//! config is read, so that `flowgate check` reports a mistake in one with
//! its file and line.

use std::sync::Arc;

use super::{Facts, Kind, Policy, Verdict};
use crate::expression::{CompileError, Expression as Program, Input, UserFacts};

pub const KIND: Kind = Kind {
    name: "expression",
    read: |options| {
        let program = match options.source("expression") {
            Some((text, place, first_line)) => match Program::compile(&text) {
                Ok(program) => Some(program),
                Err(CompileError::Invalid {
                    line,
                    column,
                    message,
                }) => {
                    // At the line of the mistake itself.
                    let mut at = place.clone();
                    if let Some(first) = first_line {
                        at.line = Some(first + line - 1);
                    }
                    options.error_at(&at, format!("column {column}: {message}"));
                    None
                }
                Err(error) => {
                    options.error_at(&place, error.to_string());
                    None
                }
            },
            None => {
                options.error("missing `expression`, e.g. '\"admins\" in user.groups'");
                None
            }
        };
        Arc::new(Expression {
            program,
            message: options.string("message").map(|(m, _)| m),
        })
    },
};

/// Passes when the expression is true. One that fails to evaluate (a
/// missing field, a type mismatch, past its budget) fails the policy, and
/// says why in the log.
#[derive(Debug)]
pub struct Expression {
    /// `None` only in a config that did not read (the error is reported).
    pub program: Option<Program>,
    /// `message`: shown to a visitor it fails.
    pub message: Option<String>,
}

impl Policy for Expression {
    fn check(&self, facts: &Facts<'_>) -> Verdict {
        let Some(program) = &self.program else {
            return Verdict::fail(None);
        };
        let input = Input {
            user: facts.user.map(UserFacts::from),
            request: facts.request,
            context: facts.context,
        };
        match program.evaluate(&input) {
            Ok(true) => Verdict::pass(),
            Ok(false) => Verdict::fail(self.message.as_deref()),
            Err(error) => {
                tracing::warn!(%error, expression = program.source(), "an expression policy could not be evaluated: it fails");
                Verdict::fail(self.message.as_deref())
            }
        }
    }
}
