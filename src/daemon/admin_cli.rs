//! `mistguard approvals list|get|approve|deny` and `mistguard reviews list|lift`: the Admin
//! service of a running daemon, from the command line.

use super::pb::{self, admin_client::AdminClient};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct ApprovalsArgs {
    /// The daemon's gRPC address.
    #[arg(long, env = "MISTGUARD_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// An admin token (a line of the daemon's admin_tokens_file); better given in the
    /// environment than on the command line.
    #[arg(long, env = "MISTGUARD_ADMIN_TOKEN", hide_env_values = true)]
    pub token: String,
    #[command(subcommand)]
    pub command: ApprovalsCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum ApprovalsCommand {
    /// Pending approvals (oldest first), then those decided in the last hour, as JSON lines.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One approval, as JSON.
    Get { approval_id: String },
    /// Approve a pending approval (the call may then run once).
    Approve {
        approval_id: String,
        /// Why (kept with the approval).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Deny a pending approval.
    Deny {
        approval_id: String,
        #[arg(long, default_value = "")]
        note: String,
    },
}

/// `mistguard reviews`: the Level-2 review queue of a running daemon.
#[derive(clap::Args, Debug)]
pub struct ReviewsArgs {
    /// The daemon's gRPC address.
    #[arg(long, env = "MISTGUARD_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// An admin token (a line of the daemon's admin_tokens_file); better given in the
    /// environment than on the command line.
    #[arg(long, env = "MISTGUARD_ADMIN_TOKEN", hide_env_values = true)]
    pub token: String,
    #[command(subcommand)]
    pub command: ReviewsCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum ReviewsCommand {
    /// Subjects suspended now (escalation level 2), oldest first, as JSON lines: the subject's
    /// hash, the rules and counts that put it there, and the decision ids to look up with
    /// `mistguard records query`.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Lift a subject's suspension (exit 1 when it is not suspended).
    Lift {
        /// The subject's hash as `reviews list` shows it (32 hex digits).
        subject_hash: String,
        /// Why (logged with your name).
        #[arg(long, default_value = "")]
        note: String,
    },
}

/// A review entry as JSON.
pub fn review_json(r: &pb::Review) -> serde_json::Value {
    serde_json::json!({
        "subject_hash": r.subject_hash,
        "rules": r.rules.iter().map(|c| serde_json::json!({"rule": c.rule_id, "count": c.count})).collect::<Vec<_>>(),
        "suspended_unix_ms": r.suspended_unix_ms,
        "until_unix_ms": r.until_unix_ms,
        "record_ids": r.record_ids,
    })
}

/// Runs `mistguard reviews`; exit codes as for `approvals`.
pub fn reviews_main(args: ReviewsArgs) -> ExitCode {
    block_on(run_reviews(args))
}

async fn run_reviews(args: ReviewsArgs) -> ExitCode {
    let mut client = match connect(&args.addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let auth = format!("Bearer {}", args.token);
    let result = match args.command {
        ReviewsCommand::List { limit } => match authed(pb::ListReviewsRequest { limit }, &auth) {
            Ok(r) => client.list_reviews(r).await.map(|list| {
                for e in &list.get_ref().reviews {
                    println!("{}", review_json(e));
                }
            }),
            Err(c) => return c,
        },
        ReviewsCommand::Lift { subject_hash, note } => {
            match authed(pb::LiftSuspensionRequest { subject_hash, note }, &auth) {
                Ok(r) => client.lift_suspension(r).await.map(|r| {
                    println!("{}", serde_json::json!({"lifted": r.get_ref().lifted}));
                }),
                Err(c) => return c,
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(s) => {
            eprintln!("error: {:?}: {}", s.code(), s.message());
            ExitCode::from(1)
        }
    }
}

async fn connect(addr: &str) -> Result<AdminClient<tonic::transport::Channel>, ExitCode> {
    AdminClient::connect(addr.to_string()).await.map_err(|e| {
        eprintln!("error: cannot reach the daemon at {addr}: {e}");
        ExitCode::from(69)
    })
}

fn block_on(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// An approval as JSON (the state by name).
pub fn approval_json(a: &pb::Approval) -> serde_json::Value {
    let state = pb::ApprovalState::try_from(a.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("APPROVAL_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| a.state.to_string());
    serde_json::json!({
        "approval_id": a.approval_id,
        "tool": a.tool,
        "policy": a.policy,
        "reason": a.reason,
        "approvers": a.approvers,
        "state": state,
        "subject_hash": a.subject_hash,
        "call_hash": a.call_hash,
        "policy_version": a.policy_version,
        "created_unix_ms": a.created_unix_ms,
        "expires_unix_ms": a.expires_unix_ms,
        "decided_by": a.decided_by,
        "decided_unix_ms": a.decided_unix_ms,
        "note": a.note,
    })
}

/// Runs the command; exit 0, 1 for an error from the daemon (printed in one line), 69 when the
/// daemon cannot be reached.
pub fn main(args: ApprovalsArgs) -> ExitCode {
    block_on(run(args))
}

async fn run(args: ApprovalsArgs) -> ExitCode {
    let mut client = match connect(&args.addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let auth = format!("Bearer {}", args.token);
    let request = |msg| authed(msg, &auth);
    let fail = |s: tonic::Status| {
        eprintln!("error: {:?}: {}", s.code(), s.message());
        ExitCode::from(1)
    };
    match args.command {
        ApprovalsCommand::List { limit } => {
            let r = match authed(pb::ListApprovalsRequest { limit }, &auth) {
                Ok(r) => r,
                Err(c) => return c,
            };
            match client.list_approvals(r).await {
                Ok(list) => {
                    for a in &list.get_ref().approvals {
                        println!("{}", approval_json(a));
                    }
                    ExitCode::SUCCESS
                }
                Err(s) => fail(s),
            }
        }
        ApprovalsCommand::Get { approval_id } => {
            let r = match authed(pb::GetApprovalRequest { approval_id }, &auth) {
                Ok(r) => r,
                Err(c) => return c,
            };
            match client.get_approval(r).await {
                Ok(a) => {
                    println!("{}", approval_json(a.get_ref()));
                    ExitCode::SUCCESS
                }
                Err(s) => fail(s),
            }
        }
        ApprovalsCommand::Approve { approval_id, note } => {
            decide(
                &mut client,
                request(pb::DecideApprovalRequest {
                    approval_id,
                    approve: true,
                    note,
                }),
            )
            .await
        }
        ApprovalsCommand::Deny { approval_id, note } => {
            decide(
                &mut client,
                request(pb::DecideApprovalRequest {
                    approval_id,
                    approve: false,
                    note,
                }),
            )
            .await
        }
    }
}

/// `msg` with the bearer token.
fn authed<T>(msg: T, auth: &str) -> Result<tonic::Request<T>, ExitCode> {
    let mut r = tonic::Request::new(msg);
    match auth.parse() {
        Ok(v) => {
            r.metadata_mut().insert("authorization", v);
            Ok(r)
        }
        Err(_) => {
            eprintln!("error: the admin token is not a valid header value");
            Err(ExitCode::from(64))
        }
    }
}

async fn decide(
    client: &mut AdminClient<tonic::transport::Channel>,
    r: Result<tonic::Request<pb::DecideApprovalRequest>, ExitCode>,
) -> ExitCode {
    let r = match r {
        Ok(r) => r,
        Err(c) => return c,
    };
    match client.decide_approval(r).await {
        Ok(a) => {
            println!("{}", approval_json(a.get_ref()));
            ExitCode::SUCCESS
        }
        Err(s) => {
            eprintln!("error: {:?}: {}", s.code(), s.message());
            ExitCode::from(1)
        }
    }
}
