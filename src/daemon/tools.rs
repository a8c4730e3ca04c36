//! `AuthorizeToolCall`: the policies and the content scan of the arguments decide whether a tool
//! call the model chose may run; approvals bind a REQUIRE_APPROVAL to the exact call.
//!
//! What a decision keeps and logs: the tool's name, the decision, the rule, the rules the scan
//! hit, the subject's hash, a keyed hash of the canonical arguments and context, the policy
//! version and the latency. Never an argument or context value.

use super::approvals::{ApprovalStore, Binding, Resume};
use super::convert::hit_to_pb;
use super::front::rejected;
use super::pb;
use super::service::Shared;
use crate::engine::{ClassifyOptions, Direction};
use crate::policy::{DecideOptions, PolicySet, ToolAction, ToolCall};
use std::time::{Duration, Instant, SystemTime};
use tonic::Status;

const RPC: &str = "authorize_tool_call";

/// What AuthorizeToolCall needs besides the engine: the policies (swapped whole on reload), the
/// approvals, and the settings.
pub struct Tools {
    pub policies: arc_swap::ArcSwap<PolicySet>,
    pub approvals: Box<dyn ApprovalStore>,
    pub default_decision: ToolAction,
    pub approval_ttl: Duration,
    /// Key of the call hashes (derived from the subject key).
    pub call_key: [u8; 32],
    /// Tool names seen as metric labels (bounded: past [`MAX_TOOL_LABELS`], `other`).
    labels: dashmap::DashSet<String>,
}

/// Distinct `tool` labels of `mistguard_tool_decisions_total`.
pub const MAX_TOOL_LABELS: usize = 100;

impl Tools {
    pub fn new(
        policies: PolicySet,
        approvals: Box<dyn ApprovalStore>,
        default_decision: ToolAction,
        approval_ttl: Duration,
        call_key: [u8; 32],
    ) -> Tools {
        Tools {
            policies: arc_swap::ArcSwap::from_pointee(policies),
            approvals,
            default_decision,
            approval_ttl,
            call_key,
            labels: dashmap::DashSet::new(),
        }
    }

    /// The metric label of a tool: its name while fewer than [`MAX_TOOL_LABELS`] were seen and
    /// it looks like a function name, else `other`.
    fn label(&self, tool: &str) -> String {
        let ok = !tool.is_empty()
            && tool.len() <= 64
            && tool
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if ok && (self.labels.contains(tool) || self.labels.len() < MAX_TOOL_LABELS) {
            if !self.labels.contains(tool) {
                self.labels.insert(tool.to_string());
            }
            tool.to_string()
        } else {
            "other".to_string()
        }
    }

    /// Updates `mistguard_approvals_pending`.
    pub fn observe_pending(&self) {
        if let Ok(n) = self.approvals.pending(SystemTime::now()) {
            metrics::gauge!("mistguard_approvals_pending").set(n as f64);
        }
    }
}

fn invalid(m: &str) -> Status {
    rejected(RPC, "invalid_argument", tonic::Code::InvalidArgument);
    Status::invalid_argument(m.to_string())
}

/// A JSON object from a request field (empty: `{}`); never echoes the text.
fn object(text: &str, field: &str) -> Result<serde_json::Value, Status> {
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err(invalid(&format!("{field} is not a JSON object"))),
        Err(e) => Err(invalid(&format!(
            "{field} is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))),
    }
}

impl Shared {
    pub(super) async fn authorize_tool_call(
        &self,
        req: pb::AuthorizeToolCallRequest,
        started: Instant,
    ) -> Result<pb::AuthorizeToolCallResponse, Status> {
        self.admit(RPC)?;
        let Ok(_permit) = self.inflight.try_acquire() else {
            rejected(RPC, "overloaded", tonic::Code::ResourceExhausted);
            return Err(Status::resource_exhausted(
                "mistguard is overloaded; retry later",
            ));
        };
        let bytes = req.arguments_json.len() + req.context_json.len();
        if bytes > self.limits.max_message_bytes {
            rejected(RPC, "message_too_large", tonic::Code::ResourceExhausted);
            return Err(Status::resource_exhausted(format!(
                "arguments and context are {bytes} bytes; the limit is {} bytes (max_message_bytes)",
                self.limits.max_message_bytes
            )));
        }
        if req.tool.is_empty() || req.tool.len() > 256 {
            return Err(invalid("tool must name the function (1 to 256 bytes)"));
        }
        if req.subject.len() > 1024 {
            return Err(invalid("subject is longer than 1024 bytes"));
        }
        let args = object(&req.arguments_json, "arguments_json")?;
        let context = object(&req.context_json, "context_json")?;
        let tools = &self.tools;
        let subject = (!req.subject.is_empty()).then(|| self.subjects.hash(&req.subject));
        let subject_hash = subject.map(|s| s.short()).unwrap_or_default();
        let decision_id = self.ids.next();

        // The content scan: every string value, as tool arguments.
        let engine = self.engine.load_full();
        let scan = engine.scan_arguments(
            &args,
            &ClassifyOptions {
                direction: Direction::ToolArguments,
                placeholder_key: Some(self.placeholder_key.clone()),
                ..Default::default()
            },
        );
        let scan_rules: Vec<String> = scan.rules.iter().map(|r| r.to_string()).collect();
        let policies = tools.policies.load_full();
        let call_hash = call_hash(&tools.call_key, &args, &context);
        let binding = Binding {
            tool: req.tool.clone(),
            call_hash: call_hash.clone(),
            subject_hash: subject_hash.clone(),
            policy_version: policies.version().to_string(),
        };
        let now = SystemTime::now();
        let store_error = |e: String| {
            tracing::error!(target: "mistguard::approvals", error = %e, "approval store failed");
            Status::unavailable("the approval store failed; retry later")
        };
        let (decision, policy, reason, approvers, approval_id) = if !req.approval_id.is_empty() {
            match tools
                .approvals
                .resume(&req.approval_id, &binding, now)
                .map_err(store_error)?
            {
                Resume::Allow(a) => (
                    ToolAction::Allow,
                    a.policy,
                    format!("approved by {}", a.decided_by),
                    Vec::new(),
                    a.id,
                ),
                Resume::Pending(a) => (
                    ToolAction::RequireApproval,
                    a.policy,
                    a.reason,
                    a.approvers,
                    a.id,
                ),
                Resume::Deny(why) => (
                    ToolAction::Deny,
                    String::new(),
                    why,
                    Vec::new(),
                    String::new(),
                ),
            }
        } else {
            let verdict = policies.decide(
                &ToolCall {
                    tool: &req.tool,
                    args: &args,
                    context: &context,
                    scan_rules: &scan_rules,
                    scan_action: scan.action,
                },
                &DecideOptions {
                    default_decision: tools.default_decision,
                    ..DecideOptions::default()
                },
            );
            if verdict.eval_errors > 0 {
                metrics::counter!("mistguard_policy_errors_total")
                    .increment(u64::from(verdict.eval_errors));
            }
            let mut approval_id = String::new();
            if verdict.decision == ToolAction::RequireApproval {
                let a = tools
                    .approvals
                    .create(
                        binding,
                        &verdict.policy,
                        &verdict.reason,
                        &verdict.approvers,
                        tools.approval_ttl,
                        now,
                    )
                    .map_err(store_error)?;
                approval_id = a.id;
                tools.observe_pending();
            }
            (
                verdict.decision,
                verdict.policy,
                verdict.reason,
                verdict.approvers,
                approval_id,
            )
        };
        if decision == ToolAction::Allow && !req.approval_id.is_empty() {
            tools.observe_pending();
        }
        let name = match decision {
            ToolAction::Allow => "allow",
            ToolAction::Deny => "deny",
            ToolAction::RequireApproval => "require_approval",
        };
        let label = tools.label(&req.tool);
        metrics::counter!(
            "mistguard_tool_decisions_total",
            "tool" => label.clone(),
            "decision" => name
        )
        .increment(1);
        // The decision record: metadata only.
        let level = if decision == ToolAction::Allow {
            tracing::Level::DEBUG
        } else {
            tracing::Level::INFO
        };
        let scan_list = scan_rules.join(",");
        macro_rules! record {
            ($lvl:expr) => {
                tracing::event!(
                    target: "mistguard::decision",
                    $lvl,
                    decision_id = %decision_id,
                    rpc = RPC,
                    request_id = %super::service::loggable_request_id(&req.request_id),
                    tool = %label,
                    decision = name,
                    policy = %policy,
                    scan_rules = %scan_list,
                    scan_action = scan.action.as_str(),
                    subject_hash = %subject_hash,
                    call_hash = %&call_hash[..16],
                    approval = !approval_id.is_empty(),
                    policy_version = %policies.version(),
                    micros = started.elapsed().as_micros() as u64,
                    "tool decision"
                )
            };
        }
        if level == tracing::Level::DEBUG {
            record!(tracing::Level::DEBUG)
        } else {
            record!(tracing::Level::INFO)
        }
        let hits: Vec<crate::verdict::Hit> = scan.hits.iter().map(|h| h.hit.clone()).collect();
        let rules: Vec<&str> = scan_rules.iter().map(String::as_str).collect();
        // The console's counts: a tool decision under the policy rule that made it.
        self.decision_counts.count(&[policy.as_ref()], name);
        self.persist_record(
            &super::service::Record {
                rpc: RPC,
                decision_id: &decision_id,
                direction: "tool_arguments",
                subject,
                request_id: super::service::loggable_request_id(&req.request_id),
                action: name,
                rules: &rules,
                hits: &hits,
                language: None,
                level: u32::from(!rules.is_empty()),
                reason: &policy,
                bytes: bytes as u64,
                text_hash: call_hash.clone(),
                ruleset_version: engine.version(),
                policy_version: policies.version(),
                moderation_model: "",
                started,
            },
            None,
        )
        .await?;
        Ok(pb::AuthorizeToolCallResponse {
            decision: match decision {
                ToolAction::Allow => pb::ToolDecision::Allow,
                ToolAction::Deny => pb::ToolDecision::Deny,
                ToolAction::RequireApproval => pb::ToolDecision::RequireApproval,
            } as i32,
            reason,
            policy,
            approval_id,
            approvers,
            hits: scan
                .hits
                .iter()
                .map(|h| pb::Hit {
                    json_path: h.json_path.clone(),
                    ..hit_to_pb(&h.hit)
                })
                .collect(),
            decision_id,
        })
    }
}

/// Keyed BLAKE3 of the canonical arguments and context (64 hex digits): what an approval is
/// bound to, and what records show instead of the values.
pub fn call_hash(key: &[u8; 32], args: &serde_json::Value, context: &serde_json::Value) -> String {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(crate::policy::canonical_json(args).as_bytes());
    h.update(b"\n");
    h.update(crate::policy::canonical_json(context).as_bytes());
    h.finalize().to_hex().to_string()
}

/// The protobuf form of an approval.
pub fn approval_to_pb(a: &super::approvals::Approval) -> pb::Approval {
    use super::approvals::ApprovalState as S;
    pb::Approval {
        approval_id: a.id.clone(),
        tool: a.binding.tool.clone(),
        policy: a.policy.clone(),
        reason: a.reason.clone(),
        approvers: a.approvers.clone(),
        state: match a.state {
            S::Pending => pb::ApprovalState::Pending,
            S::Approved => pb::ApprovalState::Approved,
            S::Denied => pb::ApprovalState::Denied,
            S::Consumed => pb::ApprovalState::Consumed,
            S::Expired => pb::ApprovalState::Expired,
        } as i32,
        subject_hash: a.binding.subject_hash.clone(),
        call_hash: a.binding.call_hash.clone(),
        policy_version: a.binding.policy_version.clone(),
        created_unix_ms: a.created_unix_ms,
        expires_unix_ms: a.expires_unix_ms,
        decided_by: a.decided_by.clone(),
        decided_unix_ms: a.decided_unix_ms,
        note: a.note.clone(),
    }
}
