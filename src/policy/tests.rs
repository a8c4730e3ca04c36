use super::*;
use serde_json::{json, Value};

const SEED: &str = include_str!("../../policies/examples/sre-agent.yaml");

fn seed() -> PolicySet {
    PolicySet::load(
        &[("sre-agent.yaml".into(), SEED.into())],
        "policies/examples",
    )
    .unwrap()
}

fn set(files: &[(&str, &str)]) -> PolicySet {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    match PolicySet::load(&files, "dir") {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

fn load_err(files: &[(&str, &str)]) -> PolicyError {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    match PolicySet::load(&files, "dir") {
        Ok(_) => panic!("the files were accepted"),
        Err(e) => e,
    }
}

struct Call {
    tool: &'static str,
    args: Value,
    context: Value,
    scan_rules: Vec<String>,
    scan_action: Action,
}

fn call(tool: &'static str, args: Value, context: Value) -> Call {
    Call {
        tool,
        args,
        context,
        scan_rules: Vec::new(),
        scan_action: Action::Allow,
    }
}

impl Call {
    fn scan(mut self, rules: &[&str], action: Action) -> Call {
        self.scan_rules = rules.iter().map(|r| r.to_string()).collect();
        self.scan_action = action;
        self
    }

    fn as_call(&self) -> ToolCall<'_> {
        ToolCall {
            tool: self.tool,
            args: &self.args,
            context: &self.context,
            scan_rules: &self.scan_rules,
            scan_action: self.scan_action,
        }
    }

    fn on(&self, set: &PolicySet) -> ToolVerdict {
        set.decide(&self.as_call(), &DecideOptions::default())
    }
}

fn sql(statement: &str, database: &str, env: &str, role: &str) -> Call {
    call(
        "execute_sql",
        json!({"statement": statement, "database": database}),
        json!({"environment": env, "user_role": role}),
    )
}

#[track_caller]
fn expect(v: &ToolVerdict, decision: ToolAction, policy: &str) {
    assert_eq!(
        (v.decision, v.policy.as_str()),
        (decision, policy),
        "verdict: {v:?}"
    );
}

// ---- the seed's example, case by case ----

#[test]
fn the_seed_loads_with_its_six_rules() {
    let s = seed();
    assert_eq!(s.rules(), 6);
    assert_eq!(s.rule_names()[0], "block_production_database_deletes");
    assert_eq!(s.rule_names()[5], "read_only_for_viewer");
}

#[test]
fn destructive_sql_on_production_is_denied() {
    let s = seed();
    for stmt in [
        "DROP TABLE customers",
        "TRUNCATE logs",
        "delete from users where 1=1",
    ] {
        let v = sql(stmt, "analytics", "production", "admin").on(&s);
        expect(&v, ToolAction::Deny, "block_production_database_deletes");
        assert_eq!(
            v.reason,
            "Destructive SQL is not allowed on production databases"
        );
        assert!(v.approvers.is_empty());
        assert_eq!(v.eval_errors, 0);
    }
    // The same statement on staging is not this rule's business.
    let v = sql("DROP TABLE customers", "analytics", "staging", "admin").on(&s);
    expect(&v, ToolAction::Allow, "");
    // `startswith`: DELETE in the middle of a statement is not a delete.
    let v = sql(
        "SELECT 'DELETE' FROM events",
        "analytics",
        "production",
        "admin",
    )
    .on(&s);
    expect(&v, ToolAction::Allow, "");
}

#[test]
fn a_plain_select_on_analytics_matches_nothing_and_gets_the_default() {
    let v = sql("SELECT * FROM events", "analytics", "production", "admin").on(&seed());
    expect(&v, ToolAction::Allow, "");
    assert_eq!(
        v.reason,
        "no policy rule matched; default_decision is allow"
    );
    assert!(v.matched.is_empty());
    assert_eq!(v.eval_errors, 0);
}

#[test]
fn a_database_outside_the_scope_needs_platform_approval() {
    let v = sql("SELECT * FROM invoices", "billing", "production", "admin").on(&seed());
    expect(&v, ToolAction::RequireApproval, "scope_database_access");
    assert_eq!(v.approvers, vec!["platform-team"]);
    assert_eq!(
        v.reason,
        "Database access outside analytics/sandbox needs approval"
    );
}

#[test]
fn deny_beats_require_approval() {
    // billing (approval) and DROP on production (deny): deny wins, both are listed as matched.
    let v = sql("DROP TABLE invoices", "billing", "production", "admin").on(&seed());
    expect(&v, ToolAction::Deny, "block_production_database_deletes");
    assert_eq!(
        v.matched,
        vec!["block_production_database_deletes", "scope_database_access"]
    );
}

#[test]
fn schema_changes_on_production_are_denied() {
    let v = sql(
        "alter table users add column x int",
        "sandbox",
        "production",
        "admin",
    )
    .on(&seed());
    expect(&v, ToolAction::Deny, "block_schema_changes");
}

#[test]
fn high_value_secret_rotation_needs_security_approval() {
    let s = seed();
    let v = call(
        "rotate_secret",
        json!({"service": "stripe", "secret_path": "/secrets/stripe/api"}),
        json!({}),
    )
    .on(&s);
    expect(
        &v,
        ToolAction::RequireApproval,
        "secret_rotation_high_value",
    );
    assert_eq!(v.approvers, vec!["security-team"]);
    // No message: the description is the reason.
    assert_eq!(
        v.reason,
        "High-value services need security approval to rotate"
    );
    assert_eq!(v.eval_errors, 0);

    // Without a secret_path, block_root_secret_paths cannot evaluate: counted, not matched.
    let v = call("rotate_secret", json!({"service": "stripe"}), json!({})).on(&s);
    expect(
        &v,
        ToolAction::RequireApproval,
        "secret_rotation_high_value",
    );
    assert_eq!(v.eval_errors, 1);

    let v = call(
        "rotate_secret",
        json!({"service": "billing-cron", "secret_path": "/secrets/billing"}),
        json!({}),
    )
    .on(&s);
    expect(&v, ToolAction::Allow, "");
}

#[test]
fn root_and_master_secrets_are_denied() {
    let s = seed();
    let v = call(
        "rotate_secret",
        json!({"service": "db", "secret_path": "/secrets/root/db"}),
        json!({}),
    )
    .on(&s);
    expect(&v, ToolAction::Deny, "block_root_secret_paths");
    assert_eq!(
        v.reason,
        "Root and master secrets are out of scope for agents"
    );
    let v = call(
        "rotate_secret",
        json!({"service": "db", "secret_path": "/secrets/app/master-key"}),
        json!({}),
    )
    .on(&s);
    expect(&v, ToolAction::Deny, "block_root_secret_paths");
    // stripe (approval, earlier in the file) and a master key (deny): deny wins.
    let v = call(
        "rotate_secret",
        json!({"service": "stripe", "secret_path": "/secrets/stripe/master-key"}),
        json!({}),
    )
    .on(&s);
    expect(&v, ToolAction::Deny, "block_root_secret_paths");
    assert_eq!(
        v.matched,
        vec!["secret_rotation_high_value", "block_root_secret_paths"]
    );
    assert!(v.approvers.is_empty());
}

#[test]
fn viewers_are_read_only() {
    let s = seed();
    let v = sql(
        "UPDATE users SET plan = 'free'",
        "analytics",
        "staging",
        "viewer",
    )
    .on(&s);
    expect(&v, ToolAction::Deny, "read_only_for_viewer");
    assert_eq!(v.reason, "Viewer role is read-only");
    let v = sql(
        "select count(*) from events",
        "analytics",
        "staging",
        "viewer",
    )
    .on(&s);
    expect(&v, ToolAction::Allow, "");
}

#[test]
fn a_missing_argument_is_an_evaluation_error_not_a_match() {
    let s = seed();
    let v = call(
        "execute_sql",
        json!({"database": "analytics"}),
        json!({"environment": "production", "user_role": "viewer"}),
    )
    .on(&s);
    // Three rules read args.statement on production / for a viewer: none matches, all counted.
    expect(&v, ToolAction::Allow, "");
    assert!(v.matched.is_empty());
    assert_eq!(v.eval_errors, 3);
    let errors = s.evaluation_errors(
        &call(
            "execute_sql",
            json!({"database": "analytics"}),
            json!({"environment": "production", "user_role": "viewer"}),
        )
        .as_call(),
    );
    let names: Vec<&str> = errors.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "block_production_database_deletes",
            "block_schema_changes",
            "read_only_for_viewer"
        ]
    );
    assert!(errors[0].1.contains("statement"), "{errors:?}");

    // A wrong type is an error too, and args that are not an object, and no args at all.
    let v = call(
        "execute_sql",
        json!({"statement": 42, "database": "analytics"}),
        json!({"environment": "production", "user_role": "admin"}),
    )
    .on(&s);
    assert_eq!(v.eval_errors, 2);
    let v = call(
        "execute_sql",
        json!([1, 2]),
        json!({"environment": "production"}),
    )
    .on(&s);
    assert_eq!(v.decision, ToolAction::Allow);
    assert!(v.eval_errors >= 1);
    let v = call("execute_sql", Value::Null, Value::Null).on(&s);
    assert_eq!(v.decision, ToolAction::Allow);
    assert!(v.eval_errors >= 1);
}

#[test]
fn other_tools_are_untouched_by_the_seed() {
    let v = call("read_file", json!({"path": "/etc/passwd"}), json!({})).on(&seed());
    expect(&v, ToolAction::Allow, "");
    assert_eq!(v.eval_errors, 0);
}

// ---- globs, files, precedence, defaults ----

const K8S: &str = r#"
version: "2025-06-01"
rules:
- name: k8s_deletes_need_sre
  tool: k8s_*
  when: tool.contains("delete") && args.namespace != "dev"
  action: require_approval
  approvers: [sre, platform-team]
- name: k8s_reads
  tool: "k8s_get_?ods"
  action: allow
  message: reading pods is fine
"#;

const K8S_PROD: &str = r#"
version: "2025-06-01"
rules:
- name: k8s_prod_is_frozen
  tool: "*"
  when: context.environment == "production" && tool.startswith("k8s_")
  action: deny
  message: production is frozen
- name: k8s_deletes_need_security_too
  tool: k8s_delete_*
  action: require_approval
  approvers: [security-team, sre]
"#;

#[test]
fn glob_tools_match_by_pattern() {
    let s = set(&[("k8s.yaml", K8S)]);
    let v = call(
        "k8s_delete_pod",
        json!({"namespace": "payments"}),
        json!({}),
    )
    .on(&s);
    expect(&v, ToolAction::RequireApproval, "k8s_deletes_need_sre");
    let v = call("k8s_delete_pod", json!({"namespace": "dev"}), json!({})).on(&s);
    expect(&v, ToolAction::Allow, "");
    let v = call("k8s_get_pods", json!({}), json!({})).on(&s);
    expect(&v, ToolAction::Allow, "k8s_reads");
    assert_eq!(v.reason, "reading pods is fine");
    // `?` is one character; `k8s` alone is not `k8s_*`.
    let v = call("k8s_get_nodes", json!({}), json!({})).on(&s);
    expect(&v, ToolAction::Allow, "");
    assert!(v.matched.is_empty());
    let v = call("k8s", json!({"namespace": "x"}), json!({})).on(&s);
    assert!(v.matched.is_empty());
}

#[test]
fn rules_from_every_file_count_with_deny_first_and_approvers_united() {
    // Given out of name order: files are taken in name order.
    let s = set(&[("k8s_prod.yaml", K8S_PROD), ("k8s.yaml", K8S)]);
    assert_eq!(s.rules(), 4);
    assert_eq!(s.version(), "2025-06-01");
    assert_eq!(s.rule_names()[0], "k8s_deletes_need_sre");

    let v = call(
        "k8s_delete_pod",
        json!({"namespace": "payments"}),
        json!({"environment": "staging"}),
    )
    .on(&s);
    expect(&v, ToolAction::RequireApproval, "k8s_deletes_need_sre");
    // Union in file order, without repeats.
    assert_eq!(v.approvers, vec!["sre", "platform-team", "security-team"]);
    assert_eq!(
        v.matched,
        vec!["k8s_deletes_need_sre", "k8s_deletes_need_security_too"]
    );

    // The deny of the second file beats the approval of the first, and the allow.
    let v = call(
        "k8s_delete_pod",
        json!({"namespace": "payments"}),
        json!({"environment": "production"}),
    )
    .on(&s);
    expect(&v, ToolAction::Deny, "k8s_prod_is_frozen");
    assert_eq!(v.reason, "production is frozen");
    let v = call(
        "k8s_get_pods",
        json!({}),
        json!({"environment": "production"}),
    )
    .on(&s);
    expect(&v, ToolAction::Deny, "k8s_prod_is_frozen");
    // The `*` rule reads context.environment: without it, an evaluation error, and the allow.
    let v = call("k8s_get_pods", json!({}), json!({})).on(&s);
    expect(&v, ToolAction::Allow, "k8s_reads");
    assert_eq!(v.eval_errors, 1);
}

#[test]
fn the_first_matching_deny_in_file_order_decides() {
    let s = set(&[
        (
            "b.yaml",
            "rules:\n- name: second\n  tool: t\n  action: deny\n  message: from b\n",
        ),
        (
            "a.yaml",
            "rules:\n- name: allow_t\n  tool: t\n  action: allow\n- name: first\n  tool: '*'\n  action: deny\n  message: from a\n",
        ),
    ]);
    let v = call("t", json!({}), json!({})).on(&s);
    expect(&v, ToolAction::Deny, "first");
    assert_eq!(v.matched, vec!["allow_t", "first", "second"]);
}

#[test]
fn default_decision_deny_applies_when_nothing_matches() {
    let s = seed();
    let opts = DecideOptions {
        default_decision: ToolAction::Deny,
        ..DecideOptions::default()
    };
    let c = call("unknown_tool", json!({}), json!({}));
    let v = s.decide(&c.as_call(), &opts);
    expect(&v, ToolAction::Deny, "");
    assert_eq!(v.reason, "no policy rule matched; default_decision is deny");
    // A matching allow still allows.
    let s = set(&[("k8s.yaml", K8S)]);
    let c = call("k8s_get_pods", json!({}), json!({}));
    expect(
        &s.decide(&c.as_call(), &opts),
        ToolAction::Allow,
        "k8s_reads",
    );
    // The empty set: everything gets the default.
    let v = PolicySet::empty().decide(&c.as_call(), &opts);
    expect(&v, ToolAction::Deny, "");
    let v = PolicySet::empty().decide(&c.as_call(), &DecideOptions::default());
    expect(&v, ToolAction::Allow, "");
}

// ---- the content-scan defaults ----

#[test]
fn a_blocking_scan_denies_when_no_rule_matches() {
    let s = seed();
    let c = call("send_email", json!({"body": "..."}), json!({}))
        .scan(&["RULE-MIST-002"], Action::Block);
    let v = c.on(&s);
    expect(&v, ToolAction::Deny, "");
    assert_eq!(
        v.reason,
        "the content scan of the arguments found RULE-MIST-002 (action block)"
    );
    let c = call("send_email", json!({}), json!({})).scan(&["X"], Action::HardBlock);
    expect(&c.on(&s), ToolAction::Deny, "");
    // Below block, the scan does not deny.
    let c = call("send_email", json!({}), json!({})).scan(&["X"], Action::Sanitize);
    expect(&c.on(&s), ToolAction::Allow, "");
}

#[test]
fn a_secret_or_rule_mist_009_hit_needs_approval_when_no_rule_matches() {
    let s = seed();
    for hit in ["RULE-MIST-009", "SECRET"] {
        let c = call("send_email", json!({}), json!({})).scan(&[hit], Action::Sanitize);
        let v = c.on(&s);
        expect(&v, ToolAction::RequireApproval, "");
        assert_eq!(v.approvers, vec!["security-team"]);
        assert!(v.reason.contains(hit), "{}", v.reason);
    }
    let opts = DecideOptions {
        scan_approvers: vec!["soc".into(), "dpo".into()],
        ..DecideOptions::default()
    };
    let c = call("send_email", json!({}), json!({})).scan(&["SECRET"], Action::Flag);
    assert_eq!(s.decide(&c.as_call(), &opts).approvers, vec!["soc", "dpo"]);
    // Block wins over approval.
    let c = call("send_email", json!({}), json!({})).scan(&["SECRET"], Action::Block);
    expect(&c.on(&s), ToolAction::Deny, "");
    // A default_decision of deny is not loosened to approval by the scan.
    let opts = DecideOptions {
        default_decision: ToolAction::Deny,
        ..DecideOptions::default()
    };
    assert_eq!(s.decide(&c.as_call(), &opts).decision, ToolAction::Deny);
}

#[test]
fn a_matching_rule_takes_precedence_over_the_scan_defaults() {
    let s = seed();
    // A deny rule names itself even when the scan blocks too.
    let c = sql("DROP TABLE x", "analytics", "production", "admin")
        .scan(&["RULE-MIST-002"], Action::Block);
    expect(
        &c.on(&s),
        ToolAction::Deny,
        "block_production_database_deletes",
    );
    // A require_approval rule decides over a SECRET hit (its approvers, not the scan's).
    let c = call(
        "rotate_secret",
        json!({"service": "stripe", "secret_path": "/s"}),
        json!({}),
    )
    .scan(&["SECRET"], Action::Sanitize);
    let v = c.on(&s);
    expect(
        &v,
        ToolAction::RequireApproval,
        "secret_rotation_high_value",
    );
    assert_eq!(v.approvers, vec!["security-team"]);
}

const OVERRIDE: &str = r#"
rules:
- name: vault_writes_may_carry_secrets
  description: Writing secrets to the vault is the point of the tool
  tool: vault_write
  when: "'SECRET' in scan.rules && args.path.startsWith('/vault/')"
  action: allow
- name: search_is_fine
  tool: web_search
  action: allow
- name: deny_secrets_in_chat
  tool: post_message
  when: "scan.rules.exists(r, r == 'SECRET') || scan.action == 'sanitize'"
  action: deny
  message: no secrets in chat
"#;

#[test]
fn an_allow_rule_that_looks_at_scan_overrides_the_scan_defaults() {
    let s = set(&[("override.yaml", OVERRIDE)]);
    // The vault rule reads scan.rules: it overrides both the approval and the block default.
    let c = call("vault_write", json!({"path": "/vault/db"}), json!({}))
        .scan(&["SECRET"], Action::Block);
    let v = c.on(&s);
    expect(&v, ToolAction::Allow, "vault_writes_may_carry_secrets");
    assert_eq!(
        v.reason,
        "Writing secrets to the vault is the point of the tool"
    );
    // Its condition false (another path): no rule matches, the scan default denies.
    let c =
        call("vault_write", json!({"path": "/tmp/x"}), json!({})).scan(&["SECRET"], Action::Block);
    expect(&c.on(&s), ToolAction::Deny, "");
    // An allow rule that does not look at scan does not override a blocking scan.
    let c =
        call("web_search", json!({"q": "x"}), json!({})).scan(&["RULE-MIST-002"], Action::Block);
    let v = c.on(&s);
    expect(&v, ToolAction::Deny, "");
    assert_eq!(v.matched, vec!["search_is_fine"]);
    assert!(v.reason.contains("search_is_fine"), "{}", v.reason);
    // ... but it does decide below block (an explicit allow, not the SECRET default).
    let c = call("web_search", json!({"q": "x"}), json!({})).scan(&["SECRET"], Action::Sanitize);
    expect(&c.on(&s), ToolAction::Allow, "search_is_fine");
    // A policy can be stricter than the defaults through scan too.
    let c =
        call("post_message", json!({"text": "x"}), json!({})).scan(&["EMAIL"], Action::Sanitize);
    expect(&c.on(&s), ToolAction::Deny, "deny_secrets_in_chat");
    let c = call("post_message", json!({"text": "x"}), json!({}));
    expect(&c.on(&s), ToolAction::Allow, "");
}

// ---- the CEL environment ----

#[test]
fn the_string_methods_and_json_values() {
    let s = set(&[(
        "f.yaml",
        r#"
rules:
- name: r
  tool: t
  when: |
    args.s.upper() == "ÉTÉ" && args.s.lower() == "été" &&
    args.s.startswith("é") && args.s.endswith("é") &&
    args.s.startsWith("é") && args.s.endsWith("é") &&
    args.n == 3 && args.big > 1.0e19 && args.f == 1.5 && args.b && args.z == null &&
    args.l[1] == "b" && size(args.l) == 2 && args.m.k == 1 && tool == "t" &&
    args.l.exists(x, x == "a") && type(args.n) == int && scan.action == "flag" &&
    'X' in scan.rules && has(args.m.k) && !has(args.nope) && 'n' in args &&
    context.user.role == "sre" && context.user.teams.exists(t, t == "db") &&
    args.l.exists(args, args == "b")
  action: deny
"#,
    )]);
    let c = call(
        "t",
        json!({"s": "été", "n": 3, "big": 18446744073709551615u64, "f": 1.5, "b": true,
               "z": null, "l": ["a", "b"], "m": {"k": 1}}),
        json!({"user": {"role": "sre", "teams": ["web", "db"]}}),
    )
    .scan(&["X"], Action::Flag);
    let v = c.on(&s);
    assert_eq!(v.eval_errors, 0, "{:?}", s.evaluation_errors(&c.as_call()));
    expect(&v, ToolAction::Deny, "r");
}

#[test]
fn a_when_that_is_not_a_bool_is_an_evaluation_error() {
    let s = set(&[(
        "f.yaml",
        "rules:\n- name: r\n  tool: t\n  when: args.s\n  action: deny\n",
    )]);
    let c = call("t", json!({"s": "x"}), json!({}));
    let v = c.on(&s);
    expect(&v, ToolAction::Allow, "");
    assert_eq!(v.eval_errors, 1);
    let errors = s.evaluation_errors(&c.as_call());
    assert_eq!(errors[0].0, "r");
    assert!(
        errors[0].1.contains("string rather than a bool"),
        "{errors:?}"
    );
    let v = call("t", json!({"s": true}), json!({})).on(&s);
    expect(&v, ToolAction::Deny, "r");
}

// ---- canonical JSON and the version ----

#[test]
fn canonical_json_sorts_keys_and_drops_whitespace() {
    let a: Value =
        serde_json::from_str(r#"{ "b": 1, "a": {"z": [1, 2.5, "x\"y"], "y": null}, "é": true }"#)
            .unwrap();
    assert_eq!(
        canonical_json(&a),
        r#"{"a":{"y":null,"z":[1,2.5,"x\"y"]},"b":1,"é":true}"#
    );
    let b: Value =
        serde_json::from_str(r#"{"é":true,"a":{"y":null,"z":[1,2.5,"x\"y"]},"b":1}"#).unwrap();
    assert_eq!(canonical_json(&a), canonical_json(&b));
    assert_eq!(canonical_json(&json!("line\nbreak")), r#""line\nbreak""#);
    assert_eq!(canonical_json(&json!([])), "[]");
}

#[test]
fn the_version_is_the_files_version_or_a_hash_of_their_contents() {
    let one = set(&[("k8s.yaml", K8S)]);
    assert_eq!(one.version(), "2025-06-01");
    // The seed has no version: a hash of the contents, 16 hex digits, stable.
    let v = seed().version().to_string();
    assert_eq!(v.len(), 16);
    assert!(v.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(seed().version(), v);
    // Disagreeing files: a hash, which changes with any content.
    let mixed = set(&[("k8s.yaml", K8S), ("seed.yaml", SEED)]);
    assert_eq!(mixed.version().len(), 16);
    let changed = set(&[
        ("k8s.yaml", K8S),
        ("seed.yaml", &SEED.replace("stripe", "stripe2")),
    ]);
    assert_ne!(mixed.version(), changed.version());
    let numeric = set(&[("a.yaml", "version: 3\nrules: []\n")]);
    assert_eq!(numeric.version(), "3");
    assert_eq!(PolicySet::empty().version().len(), 16);
    assert_eq!(PolicySet::empty().rules(), 0);
}

// ---- load errors ----

#[test]
fn a_when_that_does_not_compile_names_the_file_and_line() {
    let bad = "rules:\n- name: ok\n  tool: t\n  action: allow\n- name: broken\n  tool: t\n  when: args.x == (1\n  action: deny\n";
    let e = load_err(&[("a.yaml", "rules: []\n"), ("b.yaml", bad)]);
    assert_eq!(e.file, "dir/b.yaml");
    assert_eq!(e.line, Some(7), "{e}");
    assert!(e.message.contains("broken"), "{e}");
    assert!(e.message.contains("does not compile"), "{e}");
    assert!(!e.message.contains('\n'));
    assert!(
        e.to_string().starts_with("dir/b.yaml:7: rule `broken`: "),
        "{e}"
    );

    // In a block scalar, the line of the expression's error.
    let bad = "rules:\n- name: broken\n  tool: t\n  when: |\n    args.x == 1 &&\n    args.y ==\n  action: deny\n";
    let e = load_err(&[("c.yaml", bad)]);
    assert_eq!(e.line, Some(6), "{e}");

    // `when:` with no value is not "always".
    let e = load_err(&[(
        "d.yaml",
        "rules:\n- name: r\n  tool: t\n  when:\n  action: allow\n",
    )]);
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.message.contains("no value"), "{e}");
}

#[test]
fn a_when_naming_an_unknown_variable_is_refused() {
    let bad = "rules:\n- name: typo\n  tool: t\n  when: ctx.environment == 'production'\n  action: deny\n";
    let e = load_err(&[("a.yaml", bad)]);
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.message.contains("`ctx`"), "{e}");
    // Comprehension variables and type names are not unknown.
    set(&[(
        "b.yaml",
        "rules:\n- name: ok\n  tool: t\n  when: args.l.all(x, type(x) == string) && args.m.exists(k, args.m[k] == 1)\n  action: deny\n",
    )]);
}

#[test]
fn unknown_keys_and_missing_fields_are_refused_with_their_line() {
    let e = load_err(&[(
        "a.yaml",
        "rules:\n- name: r\n  tool: t\n  action: deny\n  whn: args.x\n",
    )]);
    assert_eq!(e.file, "dir/a.yaml");
    assert!(e.message.contains("unknown field `whn`"), "{e}");
    assert!(e.line.is_some_and(|l| (2..=5).contains(&l)), "{e}");

    let e = load_err(&[("a.yaml", "rules: []\npolicy: strict\n")]);
    assert!(e.message.contains("unknown field `policy`"), "{e}");
    assert!(e.line.is_some(), "{e}");

    let e = load_err(&[("a.yaml", "rules:\n- name: r\n  action: deny\n")]);
    assert!(e.message.contains("missing field `tool`"), "{e}");
    assert!(e.line.is_some(), "{e}");

    let e = load_err(&[("a.yaml", "rules:\n- name: r\n  tool: t\n  action: block\n")]);
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.message.contains("`block`"), "{e}");

    let e = load_err(&[(
        "a.yaml",
        "rules:\n- name: r\n  tool: 'k8s_[ab]'\n  action: deny\n",
    )]);
    assert_eq!(e.line, Some(3), "{e}");

    let e = load_err(&[("a.yaml", "rules:\n- name: r\n  tool: t\n  action: [deny\n")]);
    assert!(e.line.is_some(), "{e}");
    assert!(e.message.starts_with("invalid policy file"), "{e}");

    let e = load_err(&[("a.yaml", "# nothing yet\n")]);
    assert!(e.message.contains("rules"), "{e}");
    let e = load_err(&[("a.yaml", "version: '1'\n")]);
    assert!(e.message.contains("missing field `rules`"), "{e}");
}

#[test]
fn approvers_go_with_require_approval_only() {
    let e = load_err(&[(
        "a.yaml",
        "rules:\n- name: ok\n  tool: t\n  action: deny\n- name: needs_people\n  tool: t\n  action: require_approval\n",
    )]);
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.message.contains("needs `approvers`"), "{e}");

    let e = load_err(&[(
        "a.yaml",
        "rules:\n- name: r\n  tool: t\n  action: require_approval\n  approvers: []\n",
    )]);
    assert_eq!(e.line, Some(5), "{e}");

    let e = load_err(&[(
        "a.yaml",
        "rules:\n- name: r\n  tool: t\n  action: deny\n  approvers: [sre]\n",
    )]);
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.message.contains("only goes with require_approval"), "{e}");
}

#[test]
fn duplicate_names_are_refused_across_files() {
    let a = "rules:\n- name: same\n  tool: t\n  action: deny\n";
    let b = "rules:\n- name: other\n  tool: t\n  action: allow\n- name: \"same\"\n  tool: u\n  action: allow\n";
    let e = load_err(&[("b.yaml", b), ("a.yaml", a)]);
    assert_eq!(e.file, "dir/b.yaml");
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.message.contains("dir/a.yaml:2"), "{e}");

    // Within one file: the second one's line.
    let c = "rules:\n- name: same\n  tool: t\n  action: deny\n- name: same\n  tool: t\n  action: deny\n";
    let e = load_err(&[("c.yaml", c)]);
    assert_eq!(e.line, Some(5), "{e}");
}

// ---- the micro-benchmark ----

/// The seed's six conditions, over tools of their own.
const CONDITIONS: [&str; 6] = [
    r#"context.environment == "production" && (args.statement.upper().contains("DROP TABLE") || args.statement.upper().contains("TRUNCATE") || args.statement.upper().startswith("DELETE"))"#,
    "!(args.database in ['analytics', 'sandbox'])",
    r#"context.environment == "production" && (args.statement.upper().contains("ALTER TABLE") || args.statement.upper().contains("CREATE TABLE"))"#,
    r#"args.service in ["stripe", "auth-service", "vault-root"]"#,
    r#"args.secret_path.startswith("/secrets/root") || args.secret_path.contains("master-key")"#,
    r#"context.user_role == "viewer" && !args.statement.upper().startswith("SELECT")"#,
];

fn bench_policies(tool_of: impl Fn(usize) -> String) -> PolicySet {
    let mut text = String::from("rules:\n");
    for i in 0..100 {
        let cond = CONDITIONS[i % 6];
        let (action, approvers) = match i % 3 {
            0 => ("deny", ""),
            1 => ("require_approval", "  approvers: [team-a, team-b]\n"),
            _ => ("allow", ""),
        };
        text.push_str(&format!(
            "- name: rule_{i}\n  tool: \"{}\"\n  when: '{}'\n  action: {action}\n{approvers}",
            tool_of(i),
            cond.replace('\'', "''")
        ));
    }
    set(&[("bench.yaml", &text)])
}

fn bench_calls() -> Vec<Call> {
    let mut calls = Vec::new();
    let statements = [
        "SELECT * FROM events WHERE day = '2025-06-01'",
        "DROP TABLE customers",
        "delete from users where 1=1",
        "UPDATE users SET plan = 'free' WHERE id = 7",
    ];
    for i in 0..64 {
        let tool: &'static str = match i % 4 {
            0 => "execute_sql",
            1 => "rotate_secret",
            2 => "k8s_delete_pod",
            _ => ["tool_5", "tool_17", "tool_42", "tool_99"][i / 4 % 4],
        };
        let database = ["analytics", "billing", "sandbox"][i % 3];
        let service = ["stripe", "db", "auth-service"][i % 3];
        let secret_path = ["/secrets/root/x", "/secrets/app/api", "/s/master-key"][i % 3];
        let environment = ["production", "staging"][i % 2];
        let role = ["viewer", "admin"][i % 2];
        calls.push(call(
            tool,
            json!({
                "statement": statements[i % statements.len()],
                "database": database,
                "service": service,
                "secret_path": secret_path,
                "namespace": "payments",
            }),
            json!({"environment": environment, "user_role": role}),
        ));
    }
    calls
}

fn run_bench(label: &str, set: &PolicySet, n: usize) {
    let calls = bench_calls();
    let opts = DecideOptions::default();
    // Warm up.
    for c in &calls {
        std::hint::black_box(set.decide(&c.as_call(), &opts));
    }
    let mut times = Vec::with_capacity(n);
    let mut matched_total = 0usize;
    let evaluated: usize = (0..n)
        .map(|i| set.candidates(calls[i % calls.len()].tool).len())
        .sum();
    let start = std::time::Instant::now();
    for i in 0..n {
        let c = calls[i % calls.len()].as_call();
        let t = std::time::Instant::now();
        let v = set.decide(&c, &opts);
        times.push(t.elapsed());
        matched_total += v.matched.len();
        std::hint::black_box(v);
    }
    let total = start.elapsed();
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    println!(
        "policy bench [{label}]: {} rules, {n} decisions: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs, {:.0} decisions/s ({:.1} rules evaluated, {:.1} matched per call)",
        set.rules(),
        pct(0.50).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        times[times.len() - 1].as_secs_f64() * 1e6,
        n as f64 / total.as_secs_f64(),
        evaluated as f64 / n as f64,
        matched_total as f64 / n as f64,
    );
}

/// `cargo test --release --lib policy -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_decisions() {
    const N: usize = 100_000;
    // 100 rules over the seed's tools, a glob and tools of their own.
    let mixed = bench_policies(|i| match i % 10 {
        0 | 5 => "execute_sql".to_string(),
        1 => "rotate_secret".to_string(),
        2 => "k8s_*".to_string(),
        _ => format!("tool_{i}"),
    });
    run_bench("mixed tools", &mixed, N);
    // The worst case: every rule applies to every tool (`*`), so every call evaluates all 100.
    let all = bench_policies(|_| "*".to_string());
    run_bench("all rules on every call", &all, N);
    // (One test, so that the figures are not taken while another benchmark runs.)
    bench_expressions();
}

/// The cost of the parts of a decision: the per-call context, and each of the seed's conditions
/// evaluated alone.
fn bench_expressions() {
    let env = Arc::new(expr::environment());
    let args = json!({"statement": "DROP TABLE customers", "database": "billing", "service": "stripe", "secret_path": "/x", "namespace": "payments"});
    let context = json!({"environment": "production", "user_role": "viewer"});
    let rules: Vec<String> = vec![];
    let n = 100_000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let vars = expr::CallVars::new("execute_sql", &args, &context, &rules, "allow");
        let ctx = expr::call_context(&env, &vars);
        std::hint::black_box(&ctx);
    }
    println!(
        "context: {:.2} µs",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    let vars = expr::CallVars::new("execute_sql", &args, &context, &rules, "allow");
    let ctx = expr::call_context(&env, &vars);
    for src in CONDITIONS.iter().chain(
        [
            "true",
            "args.database == 'x'",
            "context.environment == 'production'",
            "args.statement.upper() == 'x'",
            "args.statement == 'x' && args.database == 'y'",
        ]
        .iter(),
    ) {
        let w = expr::compile(&env, src).ok().unwrap();
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(expr::evaluate(&w, &ctx));
        }
        println!(
            "{:.2} µs  {src}",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}

#[test]
fn deep_arguments_and_many_threads_do_no_harm() {
    let mut deep = json!("bottom");
    for _ in 0..1000 {
        deep = json!({ "a": deep });
    }
    // args.a…a (1001 times) is the string: answered from the JSON, however deep.
    // args.a…a (1000 times) is an object: selected field by field on the converted map, which
    // stops at 128 levels (null below), so the selection fails: an evaluation error.
    let to_string = ".a".repeat(1001);
    let to_object = ".a".repeat(1000);
    let s = set(&[(
        "d.yaml",
        &format!(
            "rules:\n- name: too_deep\n  tool: t\n  when: size(args{to_object}) == 1\n  action: deny\n- name: deep\n  tool: t\n  when: args{to_string} == 'bottom' && size(args.a) == 1\n  action: require_approval\n  approvers: [x]\n"
        ),
    )]);
    let c = call("t", json!({ "a": deep }), json!({}));
    let v = c.on(&s);
    expect(&v, ToolAction::RequireApproval, "deep");
    assert_eq!(v.eval_errors, 1);
    assert_eq!(s.evaluation_errors(&c.as_call())[0].0, "too_deep");

    // One PolicySet, decided on from several threads at once.
    let s = Arc::new(seed());
    std::thread::scope(|scope| {
        for t in 0..4 {
            let s = Arc::clone(&s);
            scope.spawn(move || {
                for i in 0..200 {
                    let db = if (i + t) % 2 == 0 {
                        "billing"
                    } else {
                        "analytics"
                    };
                    let v = sql("SELECT 1", db, "staging", "admin").on(&s);
                    let want = if db == "billing" {
                        ToolAction::RequireApproval
                    } else {
                        ToolAction::Allow
                    };
                    assert_eq!(v.decision, want);
                }
            });
        }
    });
}

#[test]
fn nesting_is_bounded_at_load() {
    // 20 levels of parentheses load (on the loader's own stack) and evaluate.
    let when = format!("{}args.x == 1{}", "(".repeat(20), ")".repeat(20));
    let s = set(&[(
        "n.yaml",
        &format!("rules:\n- name: nested\n  tool: t\n  when: \"{when}\"\n  action: deny\n"),
    )]);
    expect(
        &call("t", json!({"x": 1}), json!({})).on(&s),
        ToolAction::Deny,
        "nested",
    );
    // Deeper is refused, with the rule's line, rather than risking the stack.
    let when = format!("{}args.x == 1{}", "(".repeat(40), ")".repeat(40));
    let e = load_err(&[(
        "n.yaml",
        &format!("rules:\n- name: nested\n  tool: t\n  when: \"{when}\"\n  action: deny\n"),
    )]);
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.message.contains("nests"), "{e}");
    // So is a long left-leaning chain, which is as deep to evaluate.
    let when = vec!["args.x"; 60].join(" + ") + " > 0";
    let e = load_err(&[(
        "n.yaml",
        &format!("rules:\n- name: chain\n  tool: t\n  when: \"{when}\"\n  action: deny\n"),
    )]);
    assert!(e.message.contains("nests"), "{e}");
    // A long `||` of alternatives is balanced, and fine.
    let when = vec!["args.x == 'a'"; 200].join(" || ");
    set(&[(
        "n.yaml",
        &format!("rules:\n- name: alternatives\n  tool: t\n  when: \"{when}\"\n  action: deny\n"),
    )]);
}
