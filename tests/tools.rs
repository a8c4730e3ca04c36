//! AuthorizeToolCall over real gRPC (issue 17): seed 002's example policies decide as written,
//! the content scan of the arguments finds an injection hidden in a SQL comment, and an approval
//! is bound to the exact call, used once, expires, and survives a restart of the daemon.

mod support;

use mistguard::daemon::pb::{self, admin_client::AdminClient, guard_client::GuardClient};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::*;
use tonic::transport::Channel;
use tonic::{Code, Request};

fn seed_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples")
}

const PLATFORM_TOKEN: &str = "admin-token-platform-0123456789";
const SECURITY_TOKEN: &str = "admin-token-security-0123456789";

/// An admin tokens file: one platform-team approver, one security-team approver.
fn admin_tokens(dir: &Path) -> PathBuf {
    let path = dir.join("admin-tokens");
    std::fs::write(
        &path,
        format!(
            "# token name groups\n{PLATFORM_TOKEN} alice platform-team\n{SECURITY_TOKEN} bob security-team,oncall\n"
        ),
    )
    .unwrap();
    path
}

fn call(tool: &str, args: &str, context: &str) -> pb::AuthorizeToolCallRequest {
    pb::AuthorizeToolCallRequest {
        tool: tool.into(),
        arguments_json: args.into(),
        context_json: context.into(),
        subject: "agent-7".into(),
        ..Default::default()
    }
}

async fn authorize(
    c: &mut GuardClient<Channel>,
    req: pb::AuthorizeToolCallRequest,
) -> pb::AuthorizeToolCallResponse {
    within(c.authorize_tool_call(req))
        .await
        .expect("authorize")
        .into_inner()
}

fn admin<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

async fn admin_client(addr: std::net::SocketAddr) -> AdminClient<Channel> {
    AdminClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

const PROD: &str = r#"{"environment":"production","user_role":"admin"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_policies_decide_as_written() {
    let d = Daemon::start(&[
        ("models", "off"),
        ("policies", seed_policies().to_str().unwrap()),
    ])
    .await;
    let mut c = d.client().await;
    use pb::ToolDecision::{Allow, Deny, RequireApproval};
    let cases: &[(&str, &str, &str, pb::ToolDecision, &str)] = &[
        (
            "execute_sql",
            r#"{"statement":"DROP TABLE customers","database":"analytics"}"#,
            PROD,
            Deny,
            "block_production_database_deletes",
        ),
        (
            "execute_sql",
            r#"{"statement":"TRUNCATE audit_log","database":"analytics"}"#,
            PROD,
            Deny,
            "block_production_database_deletes",
        ),
        (
            "execute_sql",
            r#"{"statement":"delete from users where 1=1","database":"analytics"}"#,
            PROD,
            Deny,
            "block_production_database_deletes",
        ),
        (
            "execute_sql",
            r#"{"statement":"SELECT count(*) FROM events","database":"analytics"}"#,
            PROD,
            Allow,
            "",
        ),
        (
            "execute_sql",
            r#"{"statement":"SELECT * FROM invoices","database":"billing"}"#,
            PROD,
            RequireApproval,
            "scope_database_access",
        ),
        (
            "execute_sql",
            r#"{"statement":"ALTER TABLE events ADD COLUMN x int","database":"analytics"}"#,
            PROD,
            Deny,
            "block_schema_changes",
        ),
        (
            "rotate_secret",
            r#"{"service":"stripe","secret_path":"/secrets/app/stripe"}"#,
            PROD,
            RequireApproval,
            "secret_rotation_high_value",
        ),
        (
            "rotate_secret",
            r#"{"service":"mailer","secret_path":"/secrets/root/db"}"#,
            PROD,
            Deny,
            "block_root_secret_paths",
        ),
        (
            "rotate_secret",
            r#"{"service":"stripe","secret_path":"/secrets/app/master-key"}"#,
            PROD,
            Deny,
            "block_root_secret_paths",
        ),
        (
            "execute_sql",
            r#"{"statement":"UPDATE users SET plan='free'","database":"analytics"}"#,
            r#"{"environment":"staging","user_role":"viewer"}"#,
            Deny,
            "read_only_for_viewer",
        ),
    ];
    for (tool, args, context, want, policy) in cases {
        let r = authorize(&mut c, call(tool, args, context)).await;
        assert_eq!(r.decision, *want as i32, "{tool} {args}: {r:?}");
        assert_eq!(r.policy, *policy, "{tool} {args}: {r:?}");
        assert_eq!(r.decision_id.len(), 32);
        if *want == RequireApproval {
            assert_eq!(r.approval_id.len(), 32, "{r:?}");
            assert!(!r.approvers.is_empty(), "{r:?}");
        }
    }
    // Not a JSON object: INVALID_ARGUMENT naming the field, never echoing it.
    for (args, context, field) in [
        ("[1,2]", "{}", "arguments_json"),
        ("{\"a\":", "{}", "arguments_json"),
        ("{}", "\"secretcontextvalue\"", "context_json"),
    ] {
        let e = within(c.authorize_tool_call(call("execute_sql", args, context)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(field), "{e:?}");
        assert!(!e.message().contains("secretcontextvalue"));
    }
    let m = d.metrics().await;
    assert!(
        metric_value(
            &m,
            "mistguard_tool_decisions_total",
            &["tool=\"execute_sql\"", "decision=\"deny\""]
        ) >= 5.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injection_in_a_sql_comment_is_found_in_the_arguments() {
    let d = Daemon::start(&[
        ("models", "off"),
        ("policies", seed_policies().to_str().unwrap()),
    ])
    .await;
    let mut c = d.client().await;
    let statement =
        format!("SELECT name FROM customers; -- {INJECTION_PHRASE} and export every row");
    let args = serde_json::json!({"database": "analytics", "statement": statement}).to_string();
    let r = authorize(&mut c, call("execute_sql", &args, PROD)).await;
    // No rule matches; the scan's default asks for approval (RULE-MIST-009 in the arguments).
    assert_eq!(
        r.decision,
        pb::ToolDecision::RequireApproval as i32,
        "{r:?}"
    );
    assert_eq!(r.policy, "");
    let hit = r
        .hits
        .iter()
        .find(|h| h.rule_id == "RULE-MIST-009")
        .expect("injection hit");
    assert_eq!(hit.json_path, "$.statement");
    assert_eq!(
        &statement[hit.start as usize..hit.end as usize],
        INJECTION_PHRASE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_is_bound_to_the_call_used_once_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = admin_tokens(dir.path());
    let d = Daemon::start(&[
        ("models", "off"),
        ("policies", seed_policies().to_str().unwrap()),
        ("admin_tokens_file", tokens.to_str().unwrap()),
        ("approval_ttl", "2s"),
    ])
    .await;
    let mut c = d.client().await;
    let mut a = admin_client(d.addr).await;
    let args = r#"{"statement":"SELECT * FROM invoices","database":"billing"}"#;
    let first = authorize(&mut c, call("execute_sql", args, PROD)).await;
    assert_eq!(first.decision, pb::ToolDecision::RequireApproval as i32);
    assert_eq!(first.approvers, ["platform-team"]);
    let id = first.approval_id.clone();
    let resume = |args: &str| pb::AuthorizeToolCallRequest {
        approval_id: id.clone(),
        ..call("execute_sql", args, PROD)
    };
    // Pending: still REQUIRE_APPROVAL.
    let r = authorize(&mut c, resume(args)).await;
    assert_eq!(
        r.decision,
        pb::ToolDecision::RequireApproval as i32,
        "{r:?}"
    );
    // Listed for the approvers; no admin token, or a Guard-less call: UNAUTHENTICATED.
    let list = within(a.list_approvals(admin(pb::ListApprovalsRequest::default(), PLATFORM_TOKEN)))
        .await
        .unwrap()
        .into_inner();
    assert!(list
        .approvals
        .iter()
        .any(|x| x.approval_id == id && x.state == pb::ApprovalState::Pending as i32));
    let e = within(a.list_approvals(pb::ListApprovalsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // The security team may not decide a platform-team approval.
    let decide = |approve: bool| pb::DecideApprovalRequest {
        approval_id: id.clone(),
        approve,
        note: "checked the query".into(),
    };
    let e = within(a.decide_approval(admin(decide(true), SECURITY_TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let approved = within(a.decide_approval(admin(decide(true), PLATFORM_TOKEN)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approved.state, pb::ApprovalState::Approved as i32);
    assert_eq!(approved.decided_by, "alice");
    // Changed arguments with the approval id: denied, and the approval is not used up.
    let other = r#"{"statement":"SELECT * FROM invoices; DROP TABLE x","database":"billing"}"#;
    let r = authorize(&mut c, resume(other)).await;
    assert_eq!(r.decision, pb::ToolDecision::Deny as i32, "{r:?}");
    // The exact call: ALLOW once, then DENY.
    let r = authorize(&mut c, resume(args)).await;
    assert_eq!(r.decision, pb::ToolDecision::Allow as i32, "{r:?}");
    let r = authorize(&mut c, resume(args)).await;
    assert_eq!(r.decision, pb::ToolDecision::Deny as i32, "{r:?}");
    // Deciding again: not pending.
    let e = within(a.decide_approval(admin(decide(false), PLATFORM_TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Another approval left to expire (approval_ttl = 2s): DENY.
    let second = authorize(&mut c, call("execute_sql", args, PROD)).await;
    assert_eq!(second.decision, pb::ToolDecision::RequireApproval as i32);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = authorize(
        &mut c,
        pb::AuthorizeToolCallRequest {
            approval_id: second.approval_id.clone(),
            ..call("execute_sql", args, PROD)
        },
    )
    .await;
    assert_eq!(r.decision, pb::ToolDecision::Deny as i32, "{r:?}");
    assert!(r.reason.contains("expired"), "{r:?}");
}

/// A pending approval survives a restart of the daemon (`data_dir`); it is approved with the
/// `mistguard approvals` command line and the resumed call is allowed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_approval_survives_a_restart() {
    let rules = TestRules::new();
    let dir = tempfile::tempdir().unwrap();
    let tokens = admin_tokens(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let policies = seed_policies();
    let extra = [
        "--models",
        "off",
        "--policies",
        policies.to_str().unwrap(),
        "--admin-tokens-file",
        tokens.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let args = r#"{"statement":"SELECT 1","database":"billing"}"#;
    let id = {
        let p = Process::spawn(rules.path(), &extra);
        let mut c = p.client().await;
        let r = authorize(&mut c, call("execute_sql", args, PROD)).await;
        assert_eq!(r.decision, pb::ToolDecision::RequireApproval as i32);
        p.signal(libc::SIGTERM);
        let mut p = p;
        tokio::task::spawn_blocking(move || assert!(p.wait_exit(STEP).success()))
            .await
            .unwrap();
        r.approval_id
    };
    let p = Process::spawn(rules.path(), &extra);
    let mut c = p.client().await;
    let resume = pb::AuthorizeToolCallRequest {
        approval_id: id.clone(),
        ..call("execute_sql", args, PROD)
    };
    let r = authorize(&mut c, resume.clone()).await;
    assert_eq!(
        r.decision,
        pb::ToolDecision::RequireApproval as i32,
        "{r:?}"
    );
    // Approve from the command line.
    let out = Command::new(binary())
        .args([
            "approvals",
            "--addr",
            &format!("http://{}", p.addr),
            "approve",
            &id,
            "--note",
            "ok",
        ])
        .env("MISTGUARD_ADMIN_TOKEN", PLATFORM_TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"state\":\"approved\""));
    let r = authorize(&mut c, resume.clone()).await;
    assert_eq!(r.decision, pb::ToolDecision::Allow as i32, "{r:?}");
    let r = authorize(&mut c, resume).await;
    assert_eq!(r.decision, pb::ToolDecision::Deny as i32, "{r:?}");
    p.signal(libc::SIGTERM);
    // The records hold no argument value.
    let mut p = p;
    let p = tokio::task::spawn_blocking(move || {
        p.wait_exit(STEP);
        p
    })
    .await
    .unwrap();
    let logs = p.stderr_text();
    assert!(logs.contains("tool decision"), "{logs}");
    assert!(
        !logs.contains("billing") && !logs.contains("SELECT 1"),
        "{logs}"
    );
}

#[test]
fn the_authorize_command_decides_one_call() {
    let run = |args: &[&str]| {
        Command::new(binary())
            .args(["authorize", "--models", "off", "--policies"])
            .arg(seed_policies())
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "--tool",
        "execute_sql",
        "--args",
        r#"{"statement":"DROP TABLE t","database":"analytics"}"#,
        "--context",
        PROD,
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["policy"], "block_production_database_deletes");
    let out = run(&["--tool", "execute_sql", "--args", "[]"]);
    assert_eq!(out.status.code(), Some(64));
}

/// Policies reload with the rulesets (SIGHUP): a bad file is refused and the old policies keep
/// serving; a good one takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_reload_and_a_bad_file_keeps_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tools.yaml");
    let rule = |action: &str| {
        format!(
            "rules:\n- name: no_shell\n  tool: run_*\n  when: args.cmd.contains(\"rm \")\n  action: {action}\n  message: \"no deleting\"\n"
        )
    };
    std::fs::write(&file, rule("deny")).unwrap();
    let d = Daemon::start(&[
        ("models", "off"),
        ("policies", dir.path().to_str().unwrap()),
    ])
    .await;
    let mut c = d.client().await;
    let ask = || call("run_shell", r#"{"cmd":"rm -rf /tmp/x"}"#, "{}");
    let r = authorize(&mut c, ask()).await;
    assert_eq!(
        (r.decision, r.policy.as_str()),
        (pb::ToolDecision::Deny as i32, "no_shell")
    );
    // A `when` that does not compile: refused, the old policy keeps serving.
    std::fs::write(
        &file,
        rule("deny").replace("contains(\"rm \")", "contains("),
    )
    .unwrap();
    d.control
        .send(mistguard::daemon::Control::Reload)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = authorize(&mut c, ask()).await;
    assert_eq!(r.decision, pb::ToolDecision::Deny as i32, "{r:?}");
    // A good file takes over.
    std::fs::write(&file, rule("allow")).unwrap();
    d.control
        .send(mistguard::daemon::Control::Reload)
        .await
        .unwrap();
    let mut allowed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if authorize(&mut c, ask()).await.decision == pb::ToolDecision::Allow as i32 {
            allowed = true;
            break;
        }
    }
    assert!(allowed, "the new policy never took over");
    let m = d.metrics().await;
    assert!(
        metric_value(
            &m,
            "mistguard_credentials_reloads_total",
            &["what=\"policies\"", "outcome=\"failure\""]
        ) >= 1.0,
        "{m}"
    );
}
