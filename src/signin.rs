//! The sign-in driver: one login flow run for one visitor, whichever front
//! end asks (the HTML pages in `login`, the JSON executor API in `api`). It
//! takes the flow's state from the visitor's session, asks or answers the
//! executor, stores the state when it moved, and at the end turns the
//! executor's login into a new session. The front ends read requests and
//! render answers; the rules live here once.

use http::Response;
use serde_json::Value;

use crate::context::Context;
use crate::flow::{FlowError, FlowRequest, FlowState, Step};
use crate::gate::{PreAuthError, Visitor};
use crate::gateway::Gateway;
use crate::session::{now_secs, Session, StoreError};
use crate::Body;

/// A flow in progress for a visitor: which one, under which slot of their
/// session, and its executor state as of now.
pub struct Flow {
    pub slug: String,
    /// The slot in the visitor's session: `page:{fid}` for a login page
    /// (each tab its own), `api:{slug}` for an API client.
    key: String,
    /// The executor's `query` (PROTOCOL.md §1.2), sent on every call.
    query: String,
    state: FlowState,
    /// The session holds this flow. One that does not is fresh: shown
    /// from an empty state and stored only when it moves (`save`).
    stored: bool,
}

/// How a flow that the executor says is done ended for the visitor.
pub enum Finished {
    /// A new session (a new id, its cookie set on the response).
    SignedIn(Session),
    /// The flow logged nobody in (a flow without a login stage).
    NobodyLoggedIn,
    /// An invalidation flow ended the visitor's session (its cookie cleared
    /// on the response).
    SignedOut,
    /// A step up finished as another user than the one signed in: refused.
    WrongAccount { signed_in: String },
    /// The executor could not say who logged in.
    Failed(FlowError),
    /// The new session could not be stored.
    Unavailable(StoreError),
}

impl Flow {
    /// The flow in `visitor`'s slot `key`, or a fresh one.
    pub fn open(visitor: &Visitor, key: String, slug: &str, query: String) -> Flow {
        let slot = visitor.session.flow(&key);
        Flow {
            slug: slug.to_owned(),
            stored: slot.is_some(),
            state: slot.map(|f| f.state.clone()).unwrap_or_default(),
            key,
            query,
        }
    }

    pub fn is_stored(&self) -> bool {
        self.stored
    }

    /// The request as the executor sees it, and the state it works on.
    fn parts<'r>(
        &'r mut self,
        visitor: &'r Visitor,
        context: &Context,
    ) -> (FlowRequest<'r>, &'r mut FlowState) {
        let request = FlowRequest {
            slug: &self.slug,
            query: &self.query,
            user: visitor.session.identity.as_deref(),
            second_factor: visitor.session.identity.is_some() && visitor.session.second_factor,
            client_ip: Some(context.client_ip),
            memo: visitor.memo.as_ref(),
        };
        (request, &mut self.state)
    }

    /// The current challenge, passing in-process through up to `rounds`
    /// stages that need no input (the API passes none: it answers each
    /// with a 302, as authentik does).
    pub async fn ask(
        &mut self,
        gateway: &Gateway,
        context: &Context,
        visitor: &Visitor,
        rounds: usize,
    ) -> Result<Step, FlowError> {
        let (request, state) = self.parts(visitor, context);
        let mut step = gateway.executor.challenge(request, state).await;
        for _ in 0..rounds {
            match step {
                Ok(Step::Next) => step = gateway.executor.challenge(request, state).await,
                _ => break,
            }
        }
        step
    }

    /// Hand the executor the visitor's answer to the challenge they were
    /// shown. A fresh flow's challenge was shown from a state never stored,
    /// so it is made again first (`rounds` as it was asked).
    pub async fn answer(
        &mut self,
        gateway: &Gateway,
        context: &Context,
        visitor: &Visitor,
        response: Value,
        rounds: usize,
    ) -> Result<Step, FlowError> {
        if !self.stored {
            let _ = self.ask(gateway, context, visitor, rounds).await;
        }
        let (request, state) = self.parts(visitor, context);
        gateway.executor.respond(request, state, response).await
    }

    /// Store the flow's state in the visitor's session (and the session,
    /// counted as a login started if it is new).
    pub async fn save(
        &mut self,
        gateway: &Gateway,
        context: &Context,
        visitor: &mut Visitor,
    ) -> Result<(), PreAuthError> {
        visitor
            .session
            .set_flow(&self.key, &self.slug, self.state.clone(), now_secs());
        visitor.keep(gateway, context).await?;
        self.stored = true;
        Ok(())
    }

    /// The flow is over without a login (denied, failed): its slot goes,
    /// and the next visit starts afresh. Nothing to store for a fresh one.
    pub async fn end(
        &mut self,
        gateway: &Gateway,
        context: &Context,
        visitor: &mut Visitor,
    ) -> Result<(), PreAuthError> {
        self.state = FlowState::default();
        if !self.stored {
            return Ok(());
        }
        visitor
            .session
            .set_flow(&self.key, &self.slug, FlowState::default(), now_secs());
        visitor.keep(gateway, context).await
    }

    /// After `Step::Done`: log in who the executor says logged in, under a
    /// new session id (the visitor's old one deleted), its cookie on
    /// `response`; the login logged (`via` names the front end).
    pub async fn finish(
        mut self,
        gateway: &Gateway,
        context: &Context,
        visitor: &mut Visitor,
        response: &mut Response<Body>,
        via: &'static str,
    ) -> Finished {
        let login = match gateway.executor.login(&self.state).await {
            Ok(Some(login)) => login,
            Ok(None) => {
                let invalidates = gateway.executor.signed_out(&self.state).await
                    || matches!(
                        gateway.executor.find_flow(&self.slug).await,
                        Ok(Some(summary)) if summary.invalidates
                    );
                if invalidates {
                    // An invalidation flow run to its end: the visitor's
                    // session ends, as sign-out ends it.
                    return match crate::login::end_session(
                        gateway,
                        context,
                        &visitor.id,
                        &visitor.session,
                        response,
                    )
                    .await
                    {
                        Ok(()) => Finished::SignedOut,
                        Err(error) => Finished::Unavailable(error),
                    };
                }
                let _ = self.end(gateway, context, visitor).await;
                return Finished::NobodyLoggedIn;
            }
            Err(error) => return Finished::Failed(error),
        };
        if let Some(signed_in) = crate::gate::someone_else(&visitor.session, &login) {
            let signed_in = signed_in.to_owned();
            tracing::warn!(user = %signed_in, as_user = %login.identity.username, flow = %self.slug, "step up refused: finished as another user");
            let _ = self.end(gateway, context, visitor).await;
            return Finished::WrongAccount { signed_in };
        }
        let username = login.identity.username.clone();
        let mut assurance = crate::gate::assurance_after(&visitor.session, &login, &self.slug);
        assurance.refused_applications =
            crate::gate::refused_applications(gateway, login.executor_session.as_ref()).await;
        let second_factor = assurance.second_factor;
        let minted = crate::gate::mint(
            gateway,
            context,
            login,
            assurance,
            Some(&visitor.id),
            response,
        )
        .await;
        match minted {
            Ok(session) => {
                crate::login::log_succeeded(
                    &username,
                    context.client_ip,
                    &self.slug,
                    second_factor,
                    via,
                );
                Finished::SignedIn(session)
            }
            Err(error) => Finished::Unavailable(error),
        }
    }
}
