//! Tool-call authorization (issue 17): before an agent's backend runs a tool the model chose,
//! it asks whether the call is allowed, denied, or needs a person's approval.
//!
//! Policies are YAML files of rules (`policies/README.md` has the format). Each rule names a
//! tool (exact or a `*`/`?` glob), an optional CEL condition `when` over the call (`tool`,
//! `args`, `context`, `scan`), and an action. [`PolicySet::load`] compiles the files' texts,
//! [`PolicySet::decide`] answers one call: a matching `deny` wins, then `require_approval`, then
//! `allow`; with no match, the content-scan defaults and then `default_decision` apply.
//!
//! The module does no I/O and reads no clock: it is given the files' contents and the call.

mod expr;
mod file;
mod glob;
#[cfg(test)]
mod tests;

use crate::action::Action;
use cel::Env;
use file::Rule;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// What a policy says about a tool call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolAction {
    Allow,
    Deny,
    RequireApproval,
}

impl ToolAction {
    /// The name used in policy files, JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolAction::Allow => "allow",
            ToolAction::Deny => "deny",
            ToolAction::RequireApproval => "require_approval",
        }
    }

    pub fn parse(s: &str) -> Option<ToolAction> {
        [
            ToolAction::Allow,
            ToolAction::Deny,
            ToolAction::RequireApproval,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }
}

impl fmt::Display for ToolAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy file that was refused: the file, the 1-based line where known, and why (one line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for PolicyError {}

/// A tool call to decide on.
#[derive(Debug, Clone, Copy)]
pub struct ToolCall<'a> {
    /// The tool the model chose.
    pub tool: &'a str,
    /// Its arguments (a JSON object; null counts as `{}`).
    pub args: &'a serde_json::Value,
    /// What the caller knows about the call: environment, user role, ... (a JSON object; null
    /// counts as `{}`).
    pub context: &'a serde_json::Value,
    /// The rule ids the content scan of the arguments hit, e.g. `["RULE-MIST-009", "SECRET"]`.
    pub scan_rules: &'a [String],
    /// The action of that scan's verdict.
    pub scan_action: Action,
}

/// The caller's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecideOptions {
    /// The decision when no rule matches and the scan defaults do not apply.
    pub default_decision: ToolAction,
    /// Who approves a call that the scan defaults send for approval (RULE-MIST-009 or SECRET
    /// hits), and a `default_decision` of require_approval. Empty means `security-team`.
    pub scan_approvers: Vec<String>,
}

impl Default for DecideOptions {
    fn default() -> Self {
        DecideOptions {
            default_decision: ToolAction::Allow,
            scan_approvers: vec!["security-team".to_string()],
        }
    }
}

/// The answer for one call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ToolVerdict {
    pub decision: ToolAction,
    /// The name of the rule that decided, or "" for a default.
    pub policy: String,
    /// Why, for the caller and the audit log: the deciding rule's message (else its
    /// description), or the default that applied.
    pub reason: String,
    /// For require_approval: the groups that may approve, in order, without repeats.
    pub approvers: Vec<String>,
    /// How many `when` expressions failed to evaluate for this call (each counts as not
    /// matching); the daemon adds them to `mistguard_policy_errors_total`.
    pub eval_errors: u32,
    /// The names of every rule that matched, in file order.
    pub matched: Vec<String>,
}

/// The stack of the thread that compiles policies (address space; only what is used is touched).
const LOAD_STACK: usize = 64 << 20;

/// The rule ids whose hits in the arguments need approval by default.
const APPROVAL_SCAN_RULES: [&str; 2] = ["RULE-MIST-009", "SECRET"];

/// Compiled policies. Cheap to clone; `Send + Sync` (the CEL programs are plain data and the
/// environment holds function pointers only), so the daemon can share it in an `Arc`.
#[derive(Clone)]
pub struct PolicySet {
    env: Arc<Env>,
    rules: Arc<[Rule]>,
    /// Rules by exact tool name, in file order.
    exact: Arc<HashMap<String, Vec<usize>>>,
    /// Rules with a glob tool, in file order.
    globs: Arc<[usize]>,
    version: String,
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field("rules", &self.rules.len())
            .field("version", &self.version)
            .finish()
    }
}

impl Default for PolicySet {
    fn default() -> Self {
        PolicySet::empty()
    }
}

impl PolicySet {
    /// Compiles policy files given as `(file name, text)` pairs. Files are taken in name order,
    /// rules within a file in their order; that is the "file order" of the precedence rules.
    /// `source` (the directory, say) prefixes the file names in errors.
    pub fn load(files: &[(String, String)], source: &str) -> Result<PolicySet, PolicyError> {
        // CEL's parser recurses deeply (in a debug build, some 170 KB of stack per level of
        // parentheses): compile on a thread with room for the nesting a `when` may have, or here
        // if no thread can be had.
        std::thread::scope(|scope| {
            let compile = std::thread::Builder::new()
                .name("mistguard-policy-load".into())
                .stack_size(LOAD_STACK)
                .spawn_scoped(scope, || PolicySet::load_here(files, source));
            match compile {
                Ok(handle) => handle.join().unwrap_or_else(|_| {
                    Err(PolicyError {
                        file: source.to_string(),
                        line: None,
                        message: "compiling the policies failed unexpectedly".into(),
                    })
                }),
                Err(_) => PolicySet::load_here(files, source),
            }
        })
    }

    fn load_here(files: &[(String, String)], source: &str) -> Result<PolicySet, PolicyError> {
        let env = expr::environment();
        let mut sorted: Vec<&(String, String)> = files.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let display = |name: &str| {
            if source.is_empty() {
                name.to_string()
            } else {
                format!("{}/{name}", source.trim_end_matches('/'))
            }
        };
        let mut rules: Vec<Rule> = Vec::new();
        let mut versions: Vec<Option<String>> = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for (name, text) in &sorted {
            let parsed = file::parse(&env, &display(name), text)?;
            versions.push(parsed.version);
            for rule in parsed.rules {
                if let Some(&first) = by_name.get(&rule.name) {
                    return Err(file::duplicate_error(&rules[first], &rule));
                }
                by_name.insert(rule.name.clone(), rules.len());
                rules.push(rule);
            }
        }
        let version = match versions.first() {
            Some(Some(v)) if versions.iter().all(|x| x.as_deref() == Some(v.as_str())) => v.clone(),
            _ => content_hash(&sorted),
        };
        Ok(PolicySet::build(env, rules, version))
    }

    /// No rules: every call gets the defaults.
    pub fn empty() -> PolicySet {
        PolicySet::build(expr::environment(), Vec::new(), content_hash(&[]))
    }

    fn build(env: Env, rules: Vec<Rule>, version: String) -> PolicySet {
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut globs = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            match r.tool.exact() {
                Some(t) => exact.entry(t.to_string()).or_default().push(i),
                None => globs.push(i),
            }
        }
        PolicySet {
            env: Arc::new(env),
            rules: rules.into(),
            exact: Arc::new(exact),
            globs: globs.into(),
            version,
        }
    }

    /// How many rules were loaded.
    pub fn rules(&self) -> usize {
        self.rules.len()
    }

    /// The names of the rules, in file order.
    pub fn rule_names(&self) -> Vec<&str> {
        self.rules.iter().map(|r| r.name.as_str()).collect()
    }

    /// The policy version an approval is bound to: the files' `version:` when every file gives
    /// the same one, else 16 hex digits of a hash of the files' names and contents in name order.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Decides one call. Never panics; a `when` that fails to evaluate does not match and is
    /// counted in `eval_errors`.
    pub fn decide(&self, call: &ToolCall<'_>, opts: &DecideOptions) -> ToolVerdict {
        self.run(call, opts, None)
    }

    /// The `when` expressions that failed to evaluate for this call: (rule name, error), for
    /// explaining `eval_errors` (e.g. `mistguard authorize`).
    pub fn evaluation_errors(&self, call: &ToolCall<'_>) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        self.run(call, &DecideOptions::default(), Some(&mut errors));
        errors
    }

    /// The rules whose tool pattern covers `tool`, in file order.
    fn candidates(&self, tool: &str) -> Vec<usize> {
        let exact: &[usize] = self.exact.get(tool).map(Vec::as_slice).unwrap_or(&[]);
        let mut out = Vec::with_capacity(exact.len() + self.globs.len());
        let mut e = exact.iter().peekable();
        for &g in self.globs.iter() {
            if !self.rules[g].tool.matches(tool) {
                continue;
            }
            while let Some(&&x) = e.peek() {
                if x < g {
                    out.push(x);
                    e.next();
                } else {
                    break;
                }
            }
            out.push(g);
        }
        out.extend(e);
        out
    }

    fn run(
        &self,
        call: &ToolCall<'_>,
        opts: &DecideOptions,
        mut errors: Option<&mut Vec<(String, String)>>,
    ) -> ToolVerdict {
        let candidates = self.candidates(call.tool);
        let mut matched: Vec<usize> = Vec::new();
        let mut eval_errors = 0u32;
        if candidates.iter().any(|&i| self.rules[i].when.is_some()) {
            let vars = expr::CallVars::new(
                call.tool,
                call.args,
                call.context,
                call.scan_rules,
                call.scan_action.as_str(),
            );
            let ctx = expr::call_context(&self.env, &vars);
            for &i in &candidates {
                let rule = &self.rules[i];
                match &rule.when {
                    None => matched.push(i),
                    Some(when) => match expr::evaluate(when, &ctx) {
                        expr::Outcome::True => matched.push(i),
                        expr::Outcome::False => {}
                        expr::Outcome::Error(e) => {
                            eval_errors = eval_errors.saturating_add(1);
                            if let Some(errors) = errors.as_deref_mut() {
                                errors.push((rule.name.clone(), e.describe()));
                            }
                        }
                    },
                }
            }
        } else {
            matched = candidates;
        }
        let names: Vec<String> = matched
            .iter()
            .map(|&i| self.rules[i].name.clone())
            .collect();
        let verdict =
            |decision, policy: &str, reason: String, approvers: Vec<String>| ToolVerdict {
                decision,
                policy: policy.to_string(),
                reason,
                approvers,
                eval_errors,
                matched: names.clone(),
            };
        let first = |action: ToolAction| {
            matched
                .iter()
                .map(|&i| &self.rules[i])
                .find(|r| r.action == action)
        };
        let scan_blocks = call.scan_action >= Action::Block;

        if let Some(r) = first(ToolAction::Deny) {
            return verdict(ToolAction::Deny, &r.name, reason_of(r), Vec::new());
        }
        if let Some(r) = first(ToolAction::RequireApproval) {
            let mut approvers: Vec<String> = Vec::new();
            for &i in &matched {
                let other = &self.rules[i];
                if other.action == ToolAction::RequireApproval {
                    for a in &other.approvers {
                        if !approvers.contains(a) {
                            approvers.push(a.clone());
                        }
                    }
                }
            }
            return verdict(
                ToolAction::RequireApproval,
                &r.name,
                reason_of(r),
                approvers,
            );
        }
        if let Some(r) = first(ToolAction::Allow) {
            if !scan_blocks {
                return verdict(ToolAction::Allow, &r.name, reason_of(r), Vec::new());
            }
            // The scan blocks: only an allow rule that looks at `scan` overrides that.
            let overriding = matched.iter().map(|&i| &self.rules[i]).find(|r| {
                r.action == ToolAction::Allow && r.when.as_ref().is_some_and(|w| w.mentions_scan)
            });
            return match overriding {
                Some(o) => verdict(ToolAction::Allow, &o.name, reason_of(o), Vec::new()),
                None => verdict(
                    ToolAction::Deny,
                    "",
                    format!(
                        "{}; the matching allow rule `{}` does not look at `scan`, so the scan default applies",
                        scan_found(call),
                        r.name
                    ),
                    Vec::new(),
                ),
            };
        }

        // No rule matched: the scan defaults, then default_decision.
        let scan_approvers = || {
            if opts.scan_approvers.is_empty() {
                vec!["security-team".to_string()]
            } else {
                let mut out: Vec<String> = Vec::new();
                for a in &opts.scan_approvers {
                    if !out.contains(a) {
                        out.push(a.clone());
                    }
                }
                out
            }
        };
        if scan_blocks {
            return verdict(ToolAction::Deny, "", scan_found(call), Vec::new());
        }
        let default_reason = format!(
            "no policy rule matched; default_decision is {}",
            opts.default_decision
        );
        if opts.default_decision == ToolAction::Deny {
            return verdict(ToolAction::Deny, "", default_reason, Vec::new());
        }
        if call
            .scan_rules
            .iter()
            .any(|r| APPROVAL_SCAN_RULES.contains(&r.as_str()))
        {
            return verdict(
                ToolAction::RequireApproval,
                "",
                format!(
                    "{}; RULE-MIST-009 and SECRET hits need approval",
                    scan_found(call)
                ),
                scan_approvers(),
            );
        }
        let approvers = if opts.default_decision == ToolAction::RequireApproval {
            scan_approvers()
        } else {
            Vec::new()
        };
        verdict(opts.default_decision, "", default_reason, approvers)
    }
}

/// A matched rule's reason: its message, else its description, else its name.
fn reason_of(r: &Rule) -> String {
    r.message
        .clone()
        .or_else(|| r.description.clone())
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| format!("matched policy rule `{}`", r.name))
}

fn scan_found(call: &ToolCall<'_>) -> String {
    let rules = if call.scan_rules.is_empty() {
        "a hit".to_string()
    } else {
        call.scan_rules.join(", ")
    };
    format!(
        "the content scan of the arguments found {rules} (action {})",
        call.scan_action
    )
}

/// 16 hex digits of a BLAKE3 hash of the files' names and contents, in name order.
fn content_hash(files: &[&(String, String)]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"mistguard-policy-v1\0");
    for (name, text) in files {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(text.len() as u64).to_le_bytes());
        h.update(text.as_bytes());
    }
    let bytes = h.finalize();
    bytes.as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A JSON value's canonical form: object keys sorted (by their UTF-8 bytes), no whitespace,
/// strings escaped as serde_json escapes them. Equal values give equal strings, so an approval can
/// be bound to the exact call.
pub fn canonical_json(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (n, k) in keys.into_iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        serde_json::Value::String(s) => write_string(s, out),
        other => out.push_str(&other.to_string()),
    }
}

fn write_string(s: &str, out: &mut String) {
    // serde_json's escaping of a string never fails.
    out.push_str(&serde_json::Value::String(s.to_string()).to_string());
}

// The daemon shares a PolicySet across threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PolicySet>();
};
