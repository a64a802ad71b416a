//! `deny`: ends the flow with `ak-stage-access-denied`.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::engine::stage::{Cx, Kind, Outcome, Stage};
use crate::flow::{AccessDenied, Component};

pub const KIND: Kind = Kind {
    name: "deny",
    shows: &[],
    read: |options| {
        Arc::new(Deny {
            message: options
                .string("message")
                .map(|(m, _)| m)
                .unwrap_or_else(|| "Access denied".to_owned()),
        })
    },
};

#[derive(Debug)]
pub struct Deny {
    /// `message`, default "Access denied".
    pub message: String,
}

#[async_trait]
impl Stage for Deny {
    fn challenge(&self, cx: &Cx<'_>) -> Component {
        Component::AccessDenied(AccessDenied {
            user: cx.pending_user(),
            error_message: Some(self.message.clone()),
        })
    }

    async fn get(&self, _cx: &mut Cx<'_>) -> Outcome {
        Outcome::Deny(self.message.clone())
    }

    async fn post(&self, _cx: &mut Cx<'_>, _body: &Value) -> Outcome {
        Outcome::Deny(self.message.clone())
    }
}
