//! The `mistguard.v1.Admin` service: approvals of tool calls, for the people who decide them.
//! Behind its own bearer tokens (`admin_tokens_file`), each naming an approver and its groups;
//! a Guard token does not open it, and without the file every call is UNAUTHENTICATED.

use super::approvals::{find_admin, Approver, DecideError};
use super::pb;
use super::service::Shared;
use super::tools::approval_to_pb;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tonic::{Request, Response, Status};

/// The admin tokens: (token, approver), replaced whole on reload.
pub type AdminTokens = Arc<arc_swap::ArcSwap<Vec<(Vec<u8>, Approver)>>>;

/// How far back `ListApprovals` shows decided, used and expired approvals.
pub const RECENT: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub struct AdminService {
    shared: Arc<Shared>,
    tokens: Option<AdminTokens>,
}

impl AdminService {
    pub fn new(shared: Arc<Shared>, tokens: Option<AdminTokens>) -> AdminService {
        AdminService { shared, tokens }
    }

    /// The approver whose token the call carries.
    fn approver<T>(&self, req: &Request<T>) -> Result<Approver, Status> {
        let unauthenticated = || Status::unauthenticated("an admin token is required");
        let tokens = self.tokens.as_ref().ok_or_else(|| {
            Status::unauthenticated("the Admin service is off: no admin_tokens_file is configured")
        })?;
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(unauthenticated)?;
        let (scheme, token) = header.split_once(' ').ok_or_else(unauthenticated)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(unauthenticated());
        }
        let current = tokens.load();
        find_admin(&current, token.trim().as_bytes())
            .cloned()
            .ok_or_else(unauthenticated)
    }
}

/// A list call's `limit`: 0 means 100; at most 10,000.
fn list_limit(n: u32) -> usize {
    match n {
        0 => 100,
        n => n.min(10_000) as usize,
    }
}

fn store_error(e: String) -> Status {
    tracing::error!(target: "mistguard::approvals", error = %e, "approval store failed");
    Status::unavailable("the approval store failed; retry later")
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_reviews(
        &self,
        req: Request<pb::ListReviewsRequest>,
    ) -> Result<Response<pb::ListReviewsResponse>, Status> {
        self.approver(&req)?;
        let limit = list_limit(req.get_ref().limit);
        let list = self
            .shared
            .state
            .reviews(limit, super::state::now_ms())
            .await;
        Ok(Response::new(pb::ListReviewsResponse {
            reviews: list
                .into_iter()
                .map(|e| pb::Review {
                    subject_hash: e.subject,
                    rules: e
                        .rules
                        .into_iter()
                        .map(|(rule_id, count)| pb::RuleCount { rule_id, count })
                        .collect(),
                    suspended_unix_ms: e.suspended_unix_ms,
                    until_unix_ms: e.until_unix_ms,
                    record_ids: e.record_ids,
                })
                .collect(),
        }))
    }

    async fn lift_suspension(
        &self,
        req: Request<pb::LiftSuspensionRequest>,
    ) -> Result<Response<pb::LiftSuspensionResponse>, Status> {
        let approver = self.approver(&req)?;
        let mut r = req.into_inner();
        // The stored form is lower case.
        r.subject_hash = super::ids::SubjectKey::from_hex(&r.subject_hash)
            .ok_or_else(|| {
                Status::invalid_argument("subject_hash must be the 32 hex digits ListReviews shows")
            })?
            .hex();
        let lifted = self
            .shared
            .state
            .lift(&r.subject_hash, super::state::now_ms())
            .await
            .map_err(|e| {
                tracing::error!(target: "mistguard::state", error = %e, "lift did not reach Redis");
                Status::unavailable(
                    "lifted on this replica, but shared state did not answer; retry so every replica sees it",
                )
            })?;
        if !lifted {
            return Err(Status::not_found("that subject is not suspended"));
        }
        let note: String = r.note.chars().take(256).collect();
        tracing::info!(
            target: "mistguard::escalation",
            subject_hash = %&r.subject_hash[..16],
            by = %approver.name,
            note = %note,
            "suspension lifted"
        );
        metrics::counter!("mistguard_suspensions_lifted_total").increment(1);
        Ok(Response::new(pb::LiftSuspensionResponse { lifted }))
    }

    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        self.approver(&req)?;
        let limit = list_limit(req.get_ref().limit);
        let list = self
            .shared
            .tools
            .approvals
            .list(RECENT, limit, SystemTime::now())
            .map_err(store_error)?;
        Ok(Response::new(pb::ListApprovalsResponse {
            approvals: list.iter().map(approval_to_pb).collect(),
        }))
    }

    async fn get_approval(
        &self,
        req: Request<pb::GetApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        self.approver(&req)?;
        let a = self
            .shared
            .tools
            .approvals
            .get(&req.get_ref().approval_id, SystemTime::now())
            .map_err(store_error)?
            .ok_or_else(|| Status::not_found("no such approval"))?;
        Ok(Response::new(approval_to_pb(&a)))
    }

    async fn decide_approval(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let approver = self.approver(&req)?;
        let r = req.into_inner();
        // The approver's name hashed as a subject: a subject never approves its own call.
        let own = self.shared.subjects.hash(&approver.name).short();
        let tools = &self.shared.tools;
        let result = tools.approvals.decide(
            &r.approval_id,
            r.approve,
            &approver,
            &own,
            &r.note,
            SystemTime::now(),
        );
        let a = match result {
            Ok(a) => a,
            Err(DecideError::Unknown) => return Err(Status::not_found("no such approval")),
            Err(DecideError::NotPending(state)) => {
                return Err(Status::failed_precondition(format!(
                    "the approval is not pending: {state:?}"
                )))
            }
            Err(DecideError::NotAnApprover) => {
                return Err(Status::permission_denied(
                    "the approver is in none of the approval's groups",
                ))
            }
            Err(DecideError::SelfApproval) => {
                return Err(Status::permission_denied(
                    "the subject that asked cannot decide its own approval",
                ))
            }
            Err(DecideError::Store(e)) => return Err(store_error(e)),
        };
        tools.observe_pending();
        tracing::info!(
            target: "mistguard::approvals",
            approval_id = %a.id,
            tool = %a.binding.tool,
            policy = %a.policy,
            approved = r.approve,
            approver = %approver.name,
            "approval decided"
        );
        Ok(Response::new(approval_to_pb(&a)))
    }
}
