//! The CEL side of the policies: the environment `when` expressions compile against (the standard
//! library plus the seed's Python-style string methods), the check of the variables they name,
//! and the conversion of a call's JSON into CEL values.

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::parser::Expression;
use cel::{Context, Env, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

/// The variables a `when` expression sees.
pub(crate) const VARIABLES: [&str; 4] = ["tool", "args", "context", "scan"];

/// Identifiers CEL resolves by itself: the type names (`type(x) == string`) and the `optional`
/// namespace.
const BUILTIN_IDENTS: &[&str] = &[
    "bool",
    "bytes",
    "double",
    "dyn",
    "int",
    "list",
    "map",
    "null_type",
    "string",
    "type",
    "uint",
    "optional",
];

/// Deeper JSON than this becomes `null` (serde_json refuses deeper input anyway).
const MAX_DEPTH: usize = 128;

/// How deep a `when` may nest: in the parser's rules and in the expression tree. Evaluation
/// recurses once per level, and in a debug build a level takes some 30 KB of stack: 32 levels
/// stay well inside the 2 MB of a tokio worker. Policies rarely pass 10.
pub(crate) const MAX_NESTING: u16 = 32;

fn upper(this: &CelString<'_>) -> CelString<'static> {
    this.inner().to_uppercase().into()
}

fn lower(this: &CelString<'_>) -> CelString<'static> {
    this.inner().to_lowercase().into()
}

fn startswith(this: &CelString<'_>, prefix: &CelString<'_>) -> CelBool {
    CelBool::from(this.inner().starts_with(prefix.inner()))
}

fn endswith(this: &CelString<'_>, suffix: &CelString<'_>) -> CelBool {
    CelBool::from(this.inner().ends_with(suffix.inner()))
}

/// The standard environment plus `upper()`, `lower()`, `startswith(s)` and `endswith(s)` as
/// methods on strings (the spellings of seed 002; the standard `startsWith`/`endsWith` stay).
pub(crate) fn environment() -> Env {
    let mut env = Env::stdlib();
    // The names are new to the standard library, so the declarations cannot collide (the tests
    // of the seed's policy would fail if a new cel version made them).
    let declared = [
        cel::add_member_overload!(env, fn upper: (CelString) -> CelString),
        cel::add_member_overload!(env, fn lower: (CelString) -> CelString),
        cel::add_member_overload!(env, fn startswith: (CelString, CelString) -> CelBool),
        cel::add_member_overload!(env, fn endswith: (CelString, CelString) -> CelBool),
    ];
    debug_assert!(declared.iter().all(Result::is_ok), "{declared:?}");
    env
}

/// A compiled `when`.
pub(crate) struct When {
    pub(crate) program: Expression,
    /// Whether the expression names the `scan` variable (an explicit override of the scan
    /// defaults, see the README).
    pub(crate) mentions_scan: bool,
}

/// Why a `when` was refused: the message and, for a syntax error, the 1-based line within the
/// expression.
pub(crate) struct CompileError {
    pub(crate) message: String,
    pub(crate) line: Option<usize>,
}

pub(crate) fn compile(env: &Env, source: &str) -> Result<When, CompileError> {
    if source.trim().is_empty() {
        return Err(CompileError {
            message: "`when` is empty; leave it out for a rule that always applies".into(),
            line: None,
        });
    }
    let parsed = env.parser().max_recursion_depth(MAX_NESTING).parse(source);
    let program = parsed.map_err(|errors| {
        let first = errors.errors.first();
        let message = match first {
            Some(e) if e.msg.contains("Recursion limit") => {
                format!("`when` nests deeper than {MAX_NESTING} levels")
            }
            Some(e) => format!(
                "`when` does not compile: {} (line {}, column {} of the expression)",
                one_line(&e.msg),
                e.pos.0,
                e.pos.1
            ),
            None => format!("`when` does not compile: {}", one_line(&errors.to_string())),
        };
        CompileError {
            message,
            line: first
                .and_then(|e| usize::try_from(e.pos.0).ok())
                .filter(|l| *l > 0),
        }
    })?;
    let depth = depth_of(&program);
    if depth > MAX_NESTING as usize {
        return Err(CompileError {
            message: format!(
                "`when` nests {depth} levels deep, more than {MAX_NESTING}; split it into rules"
            ),
            line: None,
        });
    }
    let mut idents = BTreeSet::new();
    let mut bound = BTreeSet::new();
    collect_idents(&program, &mut idents, &mut bound);
    let unknown: Vec<&str> = idents
        .iter()
        .map(String::as_str)
        .filter(|i| !VARIABLES.contains(i) && !BUILTIN_IDENTS.contains(i) && !bound.contains(*i))
        .collect();
    if !unknown.is_empty() {
        return Err(CompileError {
            message: format!(
                "`when` names unknown variable{} {}; the variables are tool, args, context and scan",
                if unknown.len() == 1 { "" } else { "s" },
                unknown
                    .iter()
                    .map(|u| format!("`{u}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            line: None,
        });
    }
    let mentions_scan = idents.contains("scan");
    Ok(When {
        program,
        mentions_scan,
    })
}

/// The depth of an expression tree as evaluation recurses into it (a literal, a variable or a
/// field path like `args.a.b` is 1).
fn depth_of(e: &IdedExpr) -> usize {
    let children: Vec<&IdedExpr> = match &e.expr {
        Expr::Call(call) => call.target.iter().map(|t| &**t).chain(&call.args).collect(),
        Expr::Comprehension(c) => vec![
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ],
        Expr::List(list) => list.elements.iter().collect(),
        Expr::Map(map) => map
            .entries
            .iter()
            .flat_map(|en| entry_children(&en.expr))
            .collect(),
        Expr::Struct(s) => s
            .entries
            .iter()
            .flat_map(|en| entry_children(&en.expr))
            .collect(),
        // `args.a.b.c` is looked up in one go, without recursing.
        Expr::Select(_) if qualified_name(e) => Vec::new(),
        Expr::Select(select) => vec![&*select.operand],
        _ => Vec::new(),
    };
    1 + children.into_iter().map(depth_of).max().unwrap_or(0)
}

/// Whether an expression is a variable or fields selected on one (`args.a.b`).
fn qualified_name(e: &IdedExpr) -> bool {
    let mut at = e;
    loop {
        match &at.expr {
            Expr::Ident(_) => return true,
            Expr::Select(s) if !s.test => at = &s.operand,
            _ => return false,
        }
    }
}

fn entry_children(e: &EntryExpr) -> Vec<&IdedExpr> {
    match e {
        EntryExpr::StructField(f) => vec![&f.value],
        EntryExpr::MapEntry(m) => vec![&m.key, &m.value],
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The identifiers an expression names, and those its comprehensions bind (`x` in
/// `args.items.exists(x, x > 1)`, the accumulators).
fn collect_idents(e: &IdedExpr, idents: &mut BTreeSet<String>, bound: &mut BTreeSet<String>) {
    match &e.expr {
        Expr::Call(call) => {
            if let Some(t) = &call.target {
                collect_idents(t, idents, bound);
            }
            for a in &call.args {
                collect_idents(a, idents, bound);
            }
        }
        Expr::Comprehension(c) => {
            bound.insert(c.iter_var.clone());
            if let Some(v) = &c.iter_var2 {
                bound.insert(v.clone());
            }
            bound.insert(c.accu_var.clone());
            for sub in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                collect_idents(sub, idents, bound);
            }
        }
        Expr::Ident(name) if !name.starts_with('@') => {
            idents.insert(name.clone());
        }
        Expr::List(list) => {
            for el in &list.elements {
                collect_idents(el, idents, bound);
            }
        }
        Expr::Map(map) => {
            for entry in &map.entries {
                entry_idents(&entry.expr, idents, bound);
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                entry_idents(&entry.expr, idents, bound);
            }
        }
        Expr::Select(select) => collect_idents(&select.operand, idents, bound),
        _ => {}
    }
}

fn entry_idents(e: &EntryExpr, idents: &mut BTreeSet<String>, bound: &mut BTreeSet<String>) {
    match e {
        EntryExpr::StructField(f) => collect_idents(&f.value, idents, bound),
        EntryExpr::MapEntry(m) => {
            collect_idents(&m.key, idents, bound);
            collect_idents(&m.value, idents, bound);
        }
    }
}

/// JSON as a CEL value that borrows the JSON's strings: objects → maps, arrays → lists, integers
/// that fit an i64 → int, other numbers → double, strings, bools, null.
pub(crate) fn json_to_val(v: &serde_json::Value) -> Box<dyn Val + '_> {
    json_at(v, 0)
}

fn json_at(v: &serde_json::Value, depth: usize) -> Box<dyn Val + '_> {
    if depth > MAX_DEPTH {
        return Box::new(CelNull);
    }
    match v {
        serde_json::Value::Null => Box::new(CelNull),
        serde_json::Value::Bool(b) => Box::new(CelBool::from(*b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Box::new(CelInt::from(i)),
            None => Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN))),
        },
        serde_json::Value::String(s) => Box::new(CelString::from(s.as_str())),
        serde_json::Value::Array(items) => Box::new(CelList::from(
            items
                .iter()
                .map(|i| json_at(i, depth + 1))
                .collect::<Vec<_>>(),
        )),
        serde_json::Value::Object(map) => object(map, depth),
    }
}

fn object(map: &serde_json::Map<String, serde_json::Value>, depth: usize) -> Box<dyn Val + '_> {
    let entries: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> = map
        .iter()
        .map(|(k, v)| (CelMapKey::from(k.as_str()), json_at(v, depth + 1)))
        .collect();
    Box::new(CelMap::from(entries))
}

/// `args` and `context`: a JSON object as a map; null (left out) as an empty map; anything else
/// as it is (so `args.x` on a list is an evaluation error, not a silent miss).
pub(crate) fn top_level(v: &serde_json::Value) -> Box<dyn Val + '_> {
    match v {
        serde_json::Value::Null => Box::new(CelMap::from(HashMap::new())),
        other => json_to_val(other),
    }
}

/// The `scan` variable: `{"rules": [...], "action": "..."}`.
pub(crate) fn scan_val<'a>(rules: &'a [String], action: &'static str) -> Box<dyn Val + 'a> {
    let list: Vec<Box<dyn Val + 'a>> = rules
        .iter()
        .map(|r| Box::new(CelString::from(r.as_str())) as Box<dyn Val + 'a>)
        .collect();
    let mut entries: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = HashMap::new();
    entries.insert(CelMapKey::from("rules"), Box::new(CelList::from(list)));
    entries.insert(CelMapKey::from("action"), Box::new(CelString::from(action)));
    Box::new(CelMap::from(entries))
}

/// The variables of one call, answered to CEL by name. Besides `tool`, `args`, `context` and
/// `scan`, it answers dotted paths to scalars (`args.statement`) straight from the JSON, which
/// skips CEL's map look-ups; the maps themselves are only built when an expression needs one
/// whole (`has(args.x)`, `args.items.exists(..)`, `'k' in args`), and once per call.
pub(crate) struct CallVars<'a> {
    tool: CelString<'a>,
    args: &'a serde_json::Value,
    context: &'a serde_json::Value,
    scan_rules: &'a [String],
    scan_action: &'static str,
    args_val: OnceLock<Box<dyn Val + 'a>>,
    context_val: OnceLock<Box<dyn Val + 'a>>,
    scan_val: OnceLock<Box<dyn Val + 'a>>,
}

impl<'a> CallVars<'a> {
    pub(crate) fn new(
        tool: &'a str,
        args: &'a serde_json::Value,
        context: &'a serde_json::Value,
        scan_rules: &'a [String],
        scan_action: &'static str,
    ) -> CallVars<'a> {
        CallVars {
            tool: CelString::from(tool),
            args,
            context,
            scan_rules,
            scan_action,
            args_val: OnceLock::new(),
            context_val: OnceLock::new(),
            scan_val: OnceLock::new(),
        }
    }

    /// A scalar at a dotted path below a JSON object, as CEL would select it; None for anything
    /// else (CEL then selects field by field and reports what is missing).
    fn scalar<'b>(root: &'b serde_json::Value, path: &str) -> Option<CowVal<'b, 'b>> {
        let mut at = root;
        for key in path.split('.') {
            at = at.as_object()?.get(key)?;
        }
        match at {
            serde_json::Value::Object(_) | serde_json::Value::Array(_) => None,
            scalar => Some(CowVal::Owned(json_to_val(scalar))),
        }
    }
}

impl VariableResolver for CallVars<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let (root, rest) = match variable.split_once('.') {
            Some((root, rest)) => (root, Some(rest)),
            None => (variable, None),
        };
        match (root, rest) {
            ("tool", None) => Some(CowVal::Borrowed(&self.tool)),
            ("args", None) => Some(CowVal::Borrowed(
                self.args_val.get_or_init(|| top_level(self.args)).as_ref(),
            )),
            ("context", None) => Some(CowVal::Borrowed(
                self.context_val
                    .get_or_init(|| top_level(self.context))
                    .as_ref(),
            )),
            ("scan", None) => Some(CowVal::Borrowed(
                self.scan_val
                    .get_or_init(|| scan_val(self.scan_rules, self.scan_action))
                    .as_ref(),
            )),
            ("args", Some(path)) => CallVars::scalar(self.args, path),
            ("context", Some(path)) => CallVars::scalar(self.context, path),
            ("scan", Some("action")) => {
                Some(CowVal::Owned(Box::new(CelString::from(self.scan_action))))
            }
            _ => None,
        }
    }
}

/// The evaluation context of one call, shared by every rule evaluated for it.
pub(crate) fn call_context<'v, 'a: 'v>(env: &Arc<Env>, vars: &'v CallVars<'a>) -> Context<'v, 'v> {
    let mut ctx = Context::with_env(Arc::clone(env));
    ctx.set_variable_resolver(vars);
    ctx
}

/// What one `when` said for one call.
pub(crate) enum Outcome {
    True,
    False,
    /// It failed; described only when someone asks (`evaluation_errors`).
    Error(Failure),
}

pub(crate) enum Failure {
    NotABool(cel::objects::ValueType),
    Execution(cel::ExecutionError),
    Panic,
}

impl Failure {
    pub(crate) fn describe(&self) -> String {
        match self {
            Failure::NotABool(t) => format!("`when` gave a {t} rather than a bool"),
            Failure::Execution(e) => one_line(&e.to_string()),
            Failure::Panic => "`when` evaluation panicked".into(),
        }
    }
}

pub(crate) fn evaluate(when: &When, ctx: &Context<'_, '_>) -> Outcome {
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.resolve(&when.program)));
    match run {
        Ok(Ok(Value::Bool(true))) => Outcome::True,
        Ok(Ok(Value::Bool(false))) => Outcome::False,
        Ok(Ok(other)) => Outcome::Error(Failure::NotABool(other.type_of())),
        Ok(Err(e)) => Outcome::Error(Failure::Execution(e)),
        Err(_) => Outcome::Error(Failure::Panic),
    }
}
