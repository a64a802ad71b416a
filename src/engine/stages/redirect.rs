//! `redirect` (answers `xak-flow-redirect`): the flow ends by sending the
//! visitor to a fixed URL (`to`) or to another flow's login page (`flow`),
//! on to the same `next`. Whoever logged in before the stage stays so.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::engine::stage::{Cx, Kind, Outcome, Stage};
use crate::flow::{Component, Redirect as Challenge};

pub const KIND: Kind = Kind {
    name: "redirect",
    shows: &[],
    read: |options| {
        let to = options.string("to");
        let flow = options.string("flow");
        let target = match (to, flow) {
            (Some((to, _)), None) => Target::Url(to),
            (None, Some((flow, _))) => Target::Flow(flow),
            (Some(_), Some((_, place))) => {
                options.error_at(&place, "give `to` or `flow`, not both");
                Target::Url("/".to_owned())
            }
            (None, None) => {
                options.error("missing `to` (a URL) or `flow` (another flow's slug)");
                Target::Url("/".to_owned())
            }
        };
        Arc::new(Redirect { target })
    },
};

#[derive(Debug)]
pub enum Target {
    Url(String),
    Flow(String),
}

#[derive(Debug)]
pub struct Redirect {
    pub target: Target,
}

impl Redirect {
    fn to(&self, cx: &Cx<'_>) -> String {
        match &self.target {
            Target::Url(url) => url.clone(),
            Target::Flow(slug) => {
                let next = cx.request.next().unwrap_or_else(|| "/".to_owned());
                let next: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
                format!("{}/flow/{slug}/?next={next}", cx.services.prefix)
            }
        }
    }
}

#[async_trait]
impl Stage for Redirect {
    fn challenge(&self, cx: &Cx<'_>) -> Component {
        Component::Redirect(Challenge { to: self.to(cx) })
    }

    async fn get(&self, cx: &mut Cx<'_>) -> Outcome {
        Outcome::Redirect(self.to(cx))
    }

    async fn post(&self, cx: &mut Cx<'_>, _body: &Value) -> Outcome {
        Outcome::Redirect(self.to(cx))
    }

    fn flow_named(&self) -> Option<&str> {
        match &self.target {
            Target::Flow(slug) => Some(slug),
            Target::Url(_) => None,
        }
    }
}
