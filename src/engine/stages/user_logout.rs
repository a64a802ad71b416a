//! `user_logout`: the visitor's session ends when the flow does, as at
//! sign-out (what an invalidation flow is made of).

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::engine::plan::LOGOUT;
use crate::engine::stage::{Cx, Kind, Outcome, Stage};
use crate::flow::{AccessDenied, Component};

pub const KIND: Kind = Kind {
    name: "user_logout",
    shows: &[],
    read: |_| Arc::new(UserLogout),
};

#[derive(Debug)]
pub struct UserLogout;

#[async_trait]
impl Stage for UserLogout {
    /// Never shown: it passes on GET.
    fn challenge(&self, cx: &Cx<'_>) -> Component {
        Component::AccessDenied(AccessDenied {
            user: cx.pending_user(),
            error_message: None,
        })
    }

    async fn get(&self, cx: &mut Cx<'_>) -> Outcome {
        cx.plan.context.set(&LOGOUT, true);
        Outcome::Pass
    }

    async fn post(&self, cx: &mut Cx<'_>, _body: &Value) -> Outcome {
        self.get(cx).await
    }
}
