//! `mistguard approvals list|get|approve|deny`: the Admin service of a running daemon, from the
//! command line.

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
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(args))
}

async fn run(args: ApprovalsArgs) -> ExitCode {
    let mut client = match AdminClient::connect(args.addr.clone()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot reach the daemon at {}: {e}", args.addr);
            return ExitCode::from(69);
        }
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
