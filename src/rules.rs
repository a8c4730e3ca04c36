//! Rulesets: TOML files loaded, validated and turned into a [`CompiledRuleset`].
//!
//! Everything that would hurt in production is refused here, with the file, the line and the
//! reason: empty phrases, regexes without a finite bound, regexes too large to compile, Unicode
//! word boundaries in DFA regexes, unknown languages, duplicate ids, policies that lower the
//! actions the safety protocol fixes. The format is documented in `rulesets/README.md`.

use crate::action::Action;
use crate::lang::{self, LangId, NEUTRAL};
use crate::normalize::{normalize_phrase, Normalizer};
use crate::validate::Validator;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use toml::Spanned;

mod bundled {
    include!(concat!(env!("OUT_DIR"), "/bundled_rulesets.rs"));
}

/// The largest longest-match a trigger may have unless its file raises it (`max_match_len`).
pub const DEFAULT_MAX_MATCH_LEN: usize = 256;
/// Ceiling a file may raise `max_match_len` to.
pub const HARD_MAX_MATCH_LEN: usize = 1024;
/// NFA size limit for one regex (counted-repetition bombs stop here).
pub const REGEX_NFA_LIMIT: usize = 256 * 1024;

/// A ruleset that failed to load: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: String,
    /// 1-based line, when the error has a place in the file.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.file, l, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for LoadError {}

/// Which form of the text a trigger is matched against (see `normalize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum View {
    /// Normalized text: folded, separators collapsed to one space, framed by spaces.
    Word,
    /// The caller's bytes.
    Raw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boundary {
    Word,
    Start,
    End,
    None,
}

#[derive(Clone, Debug)]
pub enum TriggerKind {
    /// A learned-tier head's hit (`learned::attach`): no pattern, the scanner skips it.
    Model,
    /// A leak of a protected text or a canary (`leak = "shingles"` / `"canary"` in the rule
    /// file): found by [`crate::leak::LeakTracker`], not by the scanner.
    Leak(crate::leak::LeakKind),
    /// Literal phrases, normalized (word view) or as written (raw view).
    Phrases(Vec<String>),
    /// A bounded regex compiled into the view's DFA.
    Regex { pattern: String, max_len: usize },
    /// Literal anchors in the DFA, confirmed by a regex over a window around them.
    Anchored {
        anchors: Vec<String>,
        pattern: String,
        max_len: usize,
        look_behind: usize,
    },
}

#[derive(Clone, Debug)]
pub struct TriggerInfo {
    pub id: Arc<str>,
    /// Index into [`CompiledRuleset::rules`].
    pub rule: usize,
    pub lang: LangId,
    pub weight: f32,
    pub view: View,
    pub boundary: Boundary,
    pub kind: TriggerKind,
    pub validate: Option<Validator>,
    pub message: Option<String>,
    /// What a hit of this trigger asks for: its rule's action, or a lower one the trigger sets
    /// (`action` in the rule file). The verdict is the most severe action of the hits reported.
    pub action: Action,
    /// The action of a hit in a prompt (`[0]`: input or unspecified) and in a completion
    /// (`[1]`): `input_action` / `output_action` in the rule file, else `action`. Never above
    /// `action`.
    pub actions: [Action; 2],
    /// Which directions the trigger applies to, by [`crate::verdict::Direction::index`]
    /// (`direction` in the rule file: both by default).
    pub directions: [bool; 2],
    /// What replaces a sanitized span of this trigger in a prompt (`[0]`) and a completion
    /// (`[1]`) (policy.toml `[placeholders]`).
    pub placeholders: [Placeholder; 2],
    /// A match opens a region that runs to the end of the first `until` after it (at most
    /// `until_max` bytes from the match's start, else to there): a PEM key's body and END line.
    pub region: Option<Region>,
    /// A hit is reported at once, outside its rule's score (the learned tier's FLAG hits: they
    /// neither need nor make the rule fire).
    pub standalone: bool,
    /// A hit brings its rule's message into the verdict's (false for the learned tier's FLAG
    /// hits, except self-harm's help resources: the rule messages announce the rule's action).
    pub rule_message: bool,
    pub file: Arc<str>,
    pub line: usize,
}

/// What replaces a sanitized span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placeholder {
    pub mode: PlaceholderMode,
    /// The type named by a typed or hashed placeholder (`EMAIL`, `SECRET`): the trigger's
    /// `placeholder` in its rule file, else taken from its id (see rulesets/README.md).
    pub label: Arc<str>,
}

/// How a sanitized span is replaced (policy.toml `[placeholders]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PlaceholderMode {
    /// `[FILTERED]`.
    #[default]
    Filtered,
    /// `[EMAIL]`, `[SSN]`, `[CARD]`, `[SECRET]`: the trigger's label.
    Typed,
    /// `[EMAIL:1f2e3d4c5b6a]`: the label and a keyed hash of the value (the same value gives
    /// the same hash under one key, so records and logs can be correlated without the value).
    Hash,
    /// Nothing: the span is removed (active markup).
    Remove,
}

impl PlaceholderMode {
    pub fn parse(s: &str) -> Option<PlaceholderMode> {
        match s {
            "filtered" => Some(PlaceholderMode::Filtered),
            "typed" => Some(PlaceholderMode::Typed),
            "hash" => Some(PlaceholderMode::Hash),
            "remove" => Some(PlaceholderMode::Remove),
            _ => None,
        }
    }
}

/// A trigger whose hit covers everything up to a closing marker (see [`TriggerInfo::region`]).
#[derive(Clone, Debug)]
pub struct Region {
    /// The closing marker: a regex over the caller's bytes (raw-view syntax), whose matches
    /// are at most `until_len` bytes long.
    pub until: String,
    pub until_len: u32,
    /// Most bytes from the match's start to the region's end.
    pub max: u32,
}

/// Most bytes a region may span (`until_max`).
pub const MAX_REGION: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct RuleInfo {
    /// `RULE-MIST-00N`, `PII` or `SECRET`.
    pub id: Arc<str>,
    pub name: String,
    pub action: Action,
    pub threshold: f32,
    /// Bytes of original text within which the starts of hits must lie to add up to the
    /// threshold (policy.toml `window`, else `score_window`, else [`DEFAULT_SCORE_WINDOW`]).
    pub window: u64,
    /// Default message (policy.toml).
    pub message: Option<String>,
    /// Per-language messages (the rule file's `[messages]`).
    pub messages: HashMap<String, String>,
    /// The learned tier's head for this rule acts (policy.toml `model`, default true).
    pub model: bool,
    /// The most the learned tier may ask for this rule (policy.toml `model_action`).
    pub model_action: Option<Action>,
    pub file: Arc<str>,
}

/// A validated ruleset, ready for [`crate::scan::Scanner::build`].
#[derive(Clone, Debug)]
pub struct CompiledRuleset {
    pub version: String,
    /// policy.toml `[model] mode`.
    pub model_mode: ModelMode,
    /// policy.toml `[model] flag_hits`: a window between a head's flag and act thresholds is
    /// reported as a FLAG hit (otherwise it is only evidence that adds up with the rule's
    /// triggers).
    pub model_flag_hits: bool,
    pub rules: Vec<RuleInfo>,
    pub triggers: Vec<TriggerInfo>,
    /// policy.toml `[output] image_hosts`: when set, a markdown image or link in a completion
    /// whose host is not listed is sanitized (`markup.md-image.unlisted`), not only flagged.
    pub image_hosts: Option<Vec<String>>,
    /// Where it came from (a directory, or `<bundled>`).
    pub source: String,
}

/// A rule's score window when policy.toml sets none (bytes of original text; see
/// [`crate::score`]).
pub const DEFAULT_SCORE_WINDOW: u64 = 2048;

const RULE_IDS: [&str; 14] = [
    "RULE-MIST-001",
    "RULE-MIST-002",
    "RULE-MIST-003",
    "RULE-MIST-004",
    "RULE-MIST-005",
    "RULE-MIST-006",
    "RULE-MIST-007",
    "RULE-MIST-008",
    "RULE-MIST-009",
    "RULE-MIST-010",
    "PII",
    "SECRET",
    "MARKUP",
    "LEAK",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: String,
    /// Default `window` of every rule.
    score_window: Option<Spanned<u64>>,
    #[serde(default)]
    model: Option<ModelPolicy>,
    #[serde(default)]
    rules: BTreeMap<String, Spanned<RulePolicy>>,
    #[serde(default)]
    placeholders: Option<PlaceholderPolicy>,
    #[serde(default)]
    output: Option<OutputPolicy>,
}

/// `[placeholders]`: mode by trigger family (a trigger id, a dot-prefix of ids, or a rule id),
/// per direction.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PlaceholderPolicy {
    #[serde(default)]
    input: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    output: BTreeMap<String, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputPolicy {
    image_hosts: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelPolicy {
    mode: Option<Spanned<String>>,
    flag_hits: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulePolicy {
    action: Spanned<String>,
    threshold: Option<f32>,
    window: Option<Spanned<u64>>,
    message: Option<String>,
    /// The learned tier's head for this rule acts (default true).
    model: Option<bool>,
    /// The most the learned tier alone may ask for this rule.
    model_action: Option<Spanned<String>>,
}

/// How a stream's release treats the learned tier's windows (policy.toml `[model] mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModelMode {
    /// The release waits for the windows that can still act (at most one window, 512 bytes).
    #[default]
    Hold,
    /// The release follows the rules alone; the model's verdicts arrive at most one window late.
    Trail,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    rule: Spanned<String>,
    name: String,
    #[serde(default)]
    max_match_len: Option<Spanned<usize>>,
    #[serde(default)]
    messages: BTreeMap<String, Spanned<String>>,
    #[serde(default, rename = "trigger")]
    triggers: Vec<Spanned<TriggerSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerSpec {
    id: Spanned<String>,
    lang: Spanned<String>,
    weight: Option<Spanned<f32>>,
    phrases: Option<Vec<Spanned<String>>>,
    regex: Option<Spanned<String>>,
    anchors: Option<Vec<Spanned<String>>>,
    max_len: Option<Spanned<usize>>,
    look_behind: Option<usize>,
    boundary: Option<Spanned<String>>,
    view: Option<Spanned<String>>,
    validate: Option<Spanned<String>>,
    message: Option<String>,
    /// A lower action than the rule's for this trigger's hits (`flag` for a first-person
    /// statement of despair under RULE-MIST-004, whose requests for methods block).
    action: Option<Spanned<String>>,
    /// The action in a prompt / in a completion, when lower than `action`.
    input_action: Option<Spanned<String>>,
    output_action: Option<Spanned<String>>,
    /// `input` or `output`: the only direction the trigger applies to.
    direction: Option<Spanned<String>>,
    /// The type a typed placeholder names (`EMAIL`).
    placeholder: Option<Spanned<String>>,
    /// A match runs on to the end of the first `until` after it.
    until: Option<Spanned<String>>,
    until_max: Option<Spanned<usize>>,
    /// `shingles` or `canary`: the trigger stands for the leak search's hits (no pattern).
    leak: Option<Spanned<String>>,
}

/// The rulesets embedded at build time.
pub fn load_bundled() -> Result<CompiledRuleset, LoadError> {
    let files: Vec<(String, String)> = bundled::BUNDLED
        .iter()
        .map(|(n, t)| (format!("rulesets/{n}"), t.to_string()))
        .collect();
    load_files(&files, "<bundled>")
}

/// The bundled files themselves (for `mistguard rulesets export`, tests).
pub fn bundled_files() -> &'static [(&'static str, &'static str)] {
    bundled::BUNDLED
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

struct FileCtx<'a> {
    name: Arc<str>,
    text: &'a str,
}

impl FileCtx<'_> {
    fn err<T>(
        &self,
        span: Option<std::ops::Range<usize>>,
        msg: impl Into<String>,
    ) -> Result<T, LoadError> {
        Err(LoadError {
            file: self.name.to_string(),
            line: span.map(|s| line_of(self.text, s.start)),
            message: msg.into(),
        })
    }
}

/// Loads a ruleset from (file name, contents) pairs. `policy.toml` must be among them.
pub fn load_files(files: &[(String, String)], source: &str) -> Result<CompiledRuleset, LoadError> {
    let policy_pos = files
        .iter()
        .position(|(n, _)| Path::new(n).file_name().is_some_and(|f| f == "policy.toml"))
        .ok_or_else(|| LoadError {
            file: source.to_string(),
            line: None,
            message: "no policy.toml (it sets each rule's action and threshold)".into(),
        })?;
    let (pname, ptext) = &files[policy_pos];
    let pctx = FileCtx {
        name: pname.as_str().into(),
        text: ptext,
    };
    let policy: PolicyFile = toml::from_str(ptext).map_err(|e| toml_error(&pctx, e))?;
    if policy.version.trim().is_empty() {
        return pctx.err(None, "version is empty");
    }
    let default_window = policy.score_window.clone();
    if let Some(w) = default_window.as_ref().filter(|w| *w.get_ref() == 0) {
        return pctx.err(Some(w.span()), "a score window must be at least 1 byte");
    }
    let model_mode = match policy.model.as_ref().and_then(|m| m.mode.as_ref()) {
        None => ModelMode::Hold,
        Some(m) => match m.get_ref().as_str() {
            "hold" => ModelMode::Hold,
            "trail" => ModelMode::Trail,
            other => {
                return pctx.err(
                    Some(m.span()),
                    format!("model mode `{other}` (expected hold or trail)"),
                )
            }
        },
    };
    type Policy = (Action, f32, u64, Option<String>, bool, Option<Action>);
    let mut policies: HashMap<String, Policy> = HashMap::new();
    for (id, p) in &policy.rules {
        let span = p.span();
        let p = p.get_ref();
        if !RULE_IDS.contains(&id.as_str()) {
            return pctx.err(
                Some(span),
                format!(
                    "unknown rule `{id}` (expected one of {})",
                    RULE_IDS.join(", ")
                ),
            );
        }
        let action = Action::parse(p.action.get_ref()).ok_or_else(|| LoadError {
            file: pname.clone(),
            line: Some(line_of(ptext, p.action.span().start)),
            message: format!(
                "unknown action `{}` (expected one of allow, flag, warn, sanitize, restrict, rate_limit, block, hard_block)",
                p.action.get_ref()
            ),
        })?;
        if id == "RULE-MIST-005" && action < Action::Block {
            return pctx.err(
                Some(p.action.span()),
                "RULE-MIST-005 (CSAM) cannot be lowered below block",
            );
        }
        if id == "RULE-MIST-006" && action != Action::HardBlock {
            return pctx.err(
                Some(p.action.span()),
                "RULE-MIST-006 (malware) is always hard_block",
            );
        }
        let threshold = p.threshold.unwrap_or(1.0);
        if !(threshold.is_finite() && threshold > 0.0) {
            return pctx.err(Some(span), "threshold must be a positive number");
        }
        let window = match p.window.as_ref().or(default_window.as_ref()) {
            Some(w) if *w.get_ref() == 0 => {
                return pctx.err(Some(w.span()), "a score window must be at least 1 byte");
            }
            Some(w) => *w.get_ref(),
            None => DEFAULT_SCORE_WINDOW,
        };
        let model_action = match &p.model_action {
            None => None,
            Some(a) => Some(Action::parse(a.get_ref()).ok_or_else(|| LoadError {
                file: pctx.name.to_string(),
                line: Some(line_of(pctx.text, a.span().start)),
                message: format!(
                    "unknown action `{}` (expected one of {})",
                    a.get_ref(),
                    Action::ALL.map(Action::as_str).join(", ")
                ),
            })?),
        };
        policies.insert(
            id.clone(),
            (
                action,
                threshold,
                window,
                p.message.clone(),
                p.model.unwrap_or(true),
                model_action,
            ),
        );
    }

    let mut rules: Vec<RuleInfo> = Vec::new();
    let mut triggers: Vec<TriggerInfo> = Vec::new();
    let mut ids: HashMap<String, (Arc<str>, usize)> = HashMap::new();
    for (i, (name, text)) in files.iter().enumerate() {
        if i == policy_pos {
            continue;
        }
        let ctx = FileCtx {
            name: name.as_str().into(),
            text,
        };
        let file: RuleFile = toml::from_str(text).map_err(|e| toml_error(&ctx, e))?;
        let rid = file.rule.get_ref().as_str();
        if !RULE_IDS.contains(&rid) {
            return ctx.err(
                Some(file.rule.span()),
                format!(
                    "unknown rule `{rid}` (expected one of {})",
                    RULE_IDS.join(", ")
                ),
            );
        }
        if let Some(other) = rules.iter().find(|r| &*r.id == rid) {
            return ctx.err(
                Some(file.rule.span()),
                format!("rule {rid} is already defined in {}", other.file),
            );
        }
        let Some((action, threshold, window, message, model, model_action)) =
            policies.get(rid).cloned()
        else {
            return ctx.err(
                Some(file.rule.span()),
                format!("policy.toml has no [rules.\"{rid}\"] entry (action, threshold)"),
            );
        };
        let mut messages = HashMap::new();
        for (code, m) in &file.messages {
            if lang::lang_id(code).is_none() {
                return ctx.err(
                    Some(m.span()),
                    format!(
                        "unknown language `{code}` in [messages] (supported: {})",
                        lang::supported_codes()
                    ),
                );
            }
            messages.insert(code.clone(), m.get_ref().clone());
        }
        let ceiling = match &file.max_match_len {
            Some(m) if *m.get_ref() > HARD_MAX_MATCH_LEN || *m.get_ref() == 0 => {
                return ctx.err(
                    Some(m.span()),
                    format!("max_match_len must be between 1 and {HARD_MAX_MATCH_LEN}"),
                );
            }
            Some(m) => *m.get_ref(),
            None => DEFAULT_MAX_MATCH_LEN,
        };
        let rule_idx = rules.len();
        rules.push(RuleInfo {
            id: rid.into(),
            name: file.name.clone(),
            action,
            threshold,
            window,
            message,
            messages,
            model,
            model_action,
            file: ctx.name.clone(),
        });
        for t in &file.triggers {
            let info = compile_trigger(&ctx, t, (rule_idx, &rules[rule_idx]), ceiling)?;
            if let Some((f, l)) = ids.get(&*info.id) {
                return ctx.err(
                    Some(t.get_ref().id.span()),
                    format!(
                        "duplicate trigger id `{}` (first defined at {f}:{l})",
                        info.id
                    ),
                );
            }
            ids.insert(info.id.to_string(), (ctx.name.clone(), info.line));
            triggers.push(info);
        }
    }
    if rules.is_empty() {
        return Err(LoadError {
            file: source.to_string(),
            line: None,
            message: "no rule files (mist-001.toml … secrets.toml) next to policy.toml".into(),
        });
    }
    if let Some(p) = &policy.placeholders {
        apply_placeholders(&pctx, p, &rules, &mut triggers)?;
    }
    let image_hosts = match policy.output.as_ref().and_then(|o| o.image_hosts.as_ref()) {
        None => None,
        Some(hosts) => {
            let mut out = Vec::new();
            for h in hosts {
                let host = h.get_ref().trim().to_ascii_lowercase();
                if host.is_empty()
                    || !host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':')
                {
                    return pctx.err(
                        Some(h.span()),
                        format!(
                            "image host `{}` is not a host name (like cdn.example.com)",
                            h.get_ref()
                        ),
                    );
                }
                out.push(host);
            }
            Some(out)
        }
    };
    Ok(CompiledRuleset {
        image_hosts,
        version: policy.version,
        model_mode,
        model_flag_hits: policy
            .model
            .as_ref()
            .and_then(|m| m.flag_hits)
            .unwrap_or(false),
        rules,
        triggers,
        source: source.to_string(),
    })
}

/// The label of a typed placeholder when the trigger names none: `SECRET` for secrets, `LEAK`
/// for leaks, else the second part of the id in capitals (`pii.email` → `EMAIL`), else the rule.
pub fn default_label(rule: &str, trigger: &str) -> String {
    match rule {
        "SECRET" => "SECRET".into(),
        "LEAK" => "LEAK".into(),
        _ => match trigger.split('.').nth(1) {
            Some(part) if !part.is_empty() => part
                .chars()
                .map(|c| match c {
                    'a'..='z' => c.to_ascii_uppercase(),
                    'A'..='Z' | '0'..='9' => c,
                    _ => '_',
                })
                .collect(),
            _ => rule.replace('-', "_"),
        },
    }
}

/// Applies policy.toml `[placeholders]` to the triggers: for each direction, a trigger takes the
/// mode of the longest key that is its id or a dot-prefix of it, else of its rule's id, else
/// `filtered`. A key that names no trigger and no rule is refused.
fn apply_placeholders(
    pctx: &FileCtx,
    policy: &PlaceholderPolicy,
    rules: &[RuleInfo],
    triggers: &mut [TriggerInfo],
) -> Result<(), LoadError> {
    for (dir, table) in [(0usize, &policy.input), (1, &policy.output)] {
        let mut modes = Vec::new();
        for (key, mode) in table {
            let Some(m) = PlaceholderMode::parse(mode.get_ref()) else {
                return pctx.err(
                    Some(mode.span()),
                    format!(
                        "unknown placeholder mode `{}` for `{key}` (expected filtered, typed, hash or remove)",
                        mode.get_ref()
                    ),
                );
            };
            let names_rule = RULE_IDS.contains(&key.as_str());
            let names_trigger = triggers.iter().any(|t| family_of(&t.id, key));
            // The families of the bundled rule files, which a directory may leave out.
            let bundled_family = BUNDLED_FAMILIES.contains(&key.split('.').next().unwrap_or(""));
            if !names_rule && !names_trigger && !bundled_family {
                return pctx.err(
                    Some(mode.span()),
                    format!("[placeholders] `{key}` names no trigger family and no rule"),
                );
            }
            modes.push((key.as_str(), m));
        }
        for t in triggers.iter_mut() {
            let by_family = modes
                .iter()
                .filter(|(k, _)| family_of(&t.id, k))
                .max_by_key(|(k, _)| k.len())
                .map(|m| m.1);
            let by_rule = modes
                .iter()
                .find(|(k, _)| *k == &*rules[t.rule].id)
                .map(|m| m.1);
            t.placeholders[dir].mode = by_family.or(by_rule).unwrap_or_default();
        }
    }
    Ok(())
}

/// The id prefixes of the bundled rule files' neutral families.
const BUNDLED_FAMILIES: [&str; 4] = ["pii", "secret", "markup", "leak"];

/// Whether trigger `id` is in family `key`: the id itself, or the id starts with `key.`.
fn family_of(id: &str, key: &str) -> bool {
    id == key
        || id
            .strip_prefix(key)
            .is_some_and(|rest| rest.starts_with('.'))
}

fn toml_error(ctx: &FileCtx, e: toml::de::Error) -> LoadError {
    LoadError {
        file: ctx.name.to_string(),
        line: e.span().map(|s| line_of(ctx.text, s.start)),
        message: e.message().trim().to_string(),
    }
}

fn compile_trigger(
    ctx: &FileCtx,
    t: &Spanned<TriggerSpec>,
    (rule, info): (usize, &RuleInfo),
    ceiling: usize,
) -> Result<TriggerInfo, LoadError> {
    let tspan = t.span();
    let t = t.get_ref();
    let action = match &t.action {
        None => info.action,
        Some(a) => {
            let Some(action) = Action::parse(a.get_ref()) else {
                return ctx.err(
                    Some(a.span()),
                    format!(
                        "unknown action `{}` (expected one of {})",
                        a.get_ref(),
                        Action::ALL.map(Action::as_str).join(", ")
                    ),
                );
            };
            if action > info.action {
                return ctx.err(
                    Some(a.span()),
                    format!(
                        "a trigger may lower its rule's action ({}), not raise it",
                        info.action
                    ),
                );
            }
            if action < info.action && matches!(&*info.id, "RULE-MIST-005" | "RULE-MIST-006") {
                return ctx.err(
                    Some(a.span()),
                    format!("{} cannot be lowered, not even by a trigger", info.id),
                );
            }
            action
        }
    };
    let id = t.id.get_ref().trim();
    if id.is_empty() {
        return ctx.err(Some(t.id.span()), "trigger id is empty");
    }
    let lower = |a: &Option<Spanned<String>>| -> Result<Action, LoadError> {
        let Some(a) = a else { return Ok(action) };
        match Action::parse(a.get_ref()) {
            None => ctx.err(
                Some(a.span()),
                format!(
                    "unknown action `{}` (expected one of {})",
                    a.get_ref(),
                    Action::ALL.map(Action::as_str).join(", ")
                ),
            ),
            Some(d) if d > action => ctx.err(
                Some(a.span()),
                format!("a direction's action may lower the trigger's ({action}), not raise it"),
            ),
            Some(d) if d < action && matches!(&*info.id, "RULE-MIST-005" | "RULE-MIST-006") => ctx
                .err(
                    Some(a.span()),
                    format!("{} cannot be lowered, not even by a trigger", info.id),
                ),
            Some(d) => Ok(d),
        }
    };
    let actions = [lower(&t.input_action)?, lower(&t.output_action)?];
    let directions = match t
        .direction
        .as_ref()
        .map(|d| (d.get_ref().as_str(), d.span()))
    {
        None => [true, true],
        Some(("input", _)) => [true, false],
        Some(("output", _)) => [false, true],
        Some((other, span)) => {
            return ctx.err(
                Some(span),
                format!(
                    "unknown direction `{other}` (expected input or output; leave it out for both)"
                ),
            )
        }
    };
    let label: Arc<str> = match &t.placeholder {
        Some(p) => {
            let l = p.get_ref();
            if l.is_empty()
                || l.len() > 32
                || !l
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                return ctx.err(
                    Some(p.span()),
                    "placeholder must be 1 to 32 characters of A-Z, 0-9 and _ (it is shown as [LABEL])",
                );
            }
            l.as_str().into()
        }
        None => default_label(&info.id, id).into(),
    };
    let placeholder = Placeholder {
        mode: PlaceholderMode::Filtered,
        label,
    };
    let region = match (&t.until, &t.until_max) {
        (None, None) => None,
        (None, Some(m)) => return ctx.err(Some(m.span()), "until_max without until"),
        (Some(u), m) => {
            let until_len = check_regex(ctx, u, View::Raw, 256, false)?;
            let max = match m {
                Some(m) if *m.get_ref() == 0 || *m.get_ref() > MAX_REGION => {
                    return ctx.err(
                        Some(m.span()),
                        format!("until_max must be between 1 and {MAX_REGION}"),
                    )
                }
                Some(m) => *m.get_ref(),
                None => 4096,
            };
            Some(Region {
                until: u.get_ref().clone(),
                until_len: until_len as u32,
                max: max as u32,
            })
        }
    };
    let lang_code = t.lang.get_ref().as_str();
    let lang = if lang_code == "neutral" {
        NEUTRAL
    } else {
        lang::lang_id(lang_code).ok_or_else(|| LoadError {
            file: ctx.name.to_string(),
            line: Some(line_of(ctx.text, t.lang.span().start)),
            message: format!(
                "unknown language `{lang_code}` (supported: {} neutral)",
                lang::supported_codes()
            ),
        })?
    };
    let weight = match &t.weight {
        Some(w) if !(w.get_ref().is_finite() && *w.get_ref() > 0.0) => {
            return ctx.err(Some(w.span()), "weight must be a positive number");
        }
        Some(w) => *w.get_ref(),
        None => 1.0,
    };
    let view = match t.view.as_ref().map(|v| (v.get_ref().as_str(), v.span())) {
        None if lang == NEUTRAL => View::Raw,
        None => View::Word,
        Some(("word", _)) => View::Word,
        Some(("raw", _)) => View::Raw,
        Some((other, span)) => {
            return ctx.err(
                Some(span),
                format!("unknown view `{other}` (expected word or raw)"),
            )
        }
    };
    let spaced = lang == NEUTRAL || lang::LANGS[lang as usize].spaced;
    let boundary = match t
        .boundary
        .as_ref()
        .map(|v| (v.get_ref().as_str(), v.span()))
    {
        None if spaced => Boundary::Word,
        None => Boundary::None,
        Some(("word", _)) => Boundary::Word,
        Some(("start", _)) => Boundary::Start,
        Some(("end", _)) => Boundary::End,
        Some(("none", _)) => Boundary::None,
        Some((other, span)) => {
            return ctx.err(
                Some(span),
                format!("unknown boundary `{other}` (expected word, start, end or none)"),
            )
        }
    };
    let validate = match &t.validate {
        None => None,
        Some(v) => Some(Validator::parse(v.get_ref()).ok_or_else(|| LoadError {
            file: ctx.name.to_string(),
            line: Some(line_of(ctx.text, v.span().start)),
            message: format!(
                "unknown validator `{}` (expected luhn, iban, ssn, exfil_url, aws_secret or unlisted_host)",
                v.get_ref()
            ),
        })?),
    };
    let max_len = match &t.max_len {
        Some(m) if *m.get_ref() == 0 || *m.get_ref() > ceiling => {
            return ctx.err(Some(m.span()), format!("max_len must be between 1 and {ceiling} (raise the file's max_match_len to go higher)"));
        }
        Some(m) => *m.get_ref(),
        None => ceiling,
    };
    let leak = match &t.leak {
        None => None,
        Some(l) => {
            if t.phrases.is_some() || t.regex.is_some() || t.anchors.is_some() {
                return ctx.err(
                    Some(l.span()),
                    "a leak trigger has no phrases, regex or anchors",
                );
            }
            if &*info.id != "LEAK" {
                return ctx.err(Some(l.span()), "leak triggers belong to rule LEAK");
            }
            match l.get_ref().as_str() {
                "shingles" => Some(crate::leak::LeakKind::Shingles),
                "canary" => Some(crate::leak::LeakKind::Canary),
                other => {
                    return ctx.err(
                        Some(l.span()),
                        format!("unknown leak `{other}` (expected shingles or canary)"),
                    )
                }
            }
        }
    };
    let kind = match (&t.phrases, &t.regex, &t.anchors) {
        _ if leak.is_some() => TriggerKind::Leak(leak.expect("checked")),
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return ctx.err(
                Some(tspan),
                format!("trigger `{id}` has both phrases and a regex; split it in two"),
            );
        }
        (None, None, _) => {
            return ctx.err(
                Some(tspan),
                format!("trigger `{id}` has neither phrases nor regex"),
            )
        }
        (Some(phrases), None, None) => {
            if phrases.is_empty() {
                return ctx.err(
                    Some(tspan),
                    format!("trigger `{id}` has an empty phrases list"),
                );
            }
            let mut out = Vec::with_capacity(phrases.len());
            for p in phrases {
                let raw = p.get_ref();
                let compiled = match view {
                    View::Word => normalize_phrase(raw),
                    View::Raw => raw.clone(),
                };
                if compiled.trim().is_empty() {
                    return ctx.err(Some(p.span()), format!("phrase {raw:?} is empty or only whitespace/punctuation after normalization"));
                }
                if compiled.len() > max_len {
                    return ctx.err(
                        Some(p.span()),
                        format!(
                            "phrase {raw:?} is {} bytes, over the maximum match length {max_len}",
                            compiled.len()
                        ),
                    );
                }
                out.push(compiled);
            }
            TriggerKind::Phrases(out)
        }
        (None, Some(re), anchors) => {
            let pattern = re.get_ref().clone();
            let in_dfa = anchors.is_none();
            // The longest match the regex can make, when shorter than its bound: stream tails,
            // release offsets and confirmation windows follow what a match can really span.
            let bound = max_len;
            let max_len = check_regex(ctx, re, view, bound, in_dfa)?.min(bound);
            match anchors {
                None => TriggerKind::Regex { pattern, max_len },
                Some(anchors) => {
                    if view != View::Raw {
                        return ctx.err(Some(tspan), "anchors are only supported in the raw view");
                    }
                    if anchors.is_empty() {
                        return ctx.err(Some(tspan), "anchors is empty");
                    }
                    let mut out = Vec::new();
                    for a in anchors {
                        if a.get_ref().trim().is_empty() {
                            return ctx.err(Some(a.span()), "empty anchor");
                        }
                        out.push(a.get_ref().clone());
                    }
                    let look_behind = t.look_behind.unwrap_or(0);
                    if look_behind > bound {
                        return ctx.err(Some(tspan), "look_behind is larger than max_len");
                    }
                    // A match is never longer than `max_len`, so it cannot start further back.
                    let look_behind = look_behind.min(max_len);
                    TriggerKind::Anchored {
                        anchors: out,
                        pattern,
                        max_len,
                        look_behind,
                    }
                }
            }
        }
    };
    Ok(TriggerInfo {
        id: id.into(),
        rule,
        lang,
        weight,
        view,
        boundary,
        kind,
        validate,
        message: t.message.clone(),
        action,
        actions,
        directions,
        placeholders: [placeholder.clone(), placeholder],
        region,
        standalone: leak.is_some(),
        rule_message: true,
        file: ctx.name.clone(),
        line: line_of(ctx.text, tspan.start),
    })
}

/// The regex-syntax configuration of a view.
pub fn syntax_config(view: View) -> regex_automata::util::syntax::Config {
    let c = regex_automata::util::syntax::Config::new().nest_limit(64);
    match view {
        View::Word => c,
        // Bytes with ASCII semantics: `\w`, `\d`, `(?i)` and `.` need no Unicode tables (which
        // multiply DFA states); `(?u:…)` opts back in.
        View::Raw => c.utf8(false).unicode(false),
    }
}

fn check_regex(
    ctx: &FileCtx,
    re: &Spanned<String>,
    view: View,
    max_len: usize,
    in_dfa: bool,
) -> Result<usize, LoadError> {
    let pattern = re.get_ref();
    let span = Some(re.span());
    if pattern.is_empty() {
        return ctx.err(span, "regex is empty");
    }
    let mut parser = regex_syntax::ParserBuilder::new();
    parser.nest_limit(64);
    if view == View::Raw {
        // DFA regexes of the raw view have ASCII semantics; confirmation regexes (anchors) run in
        // a meta regex and keep Unicode.
        parser.utf8(false).unicode(!in_dfa);
    }
    let hir = match parser.build().parse(pattern) {
        Ok(h) => h,
        Err(e) => {
            return ctx.err(
                span,
                format!(
                    "regex `{pattern}` does not parse: {}",
                    e.to_string().replace('\n', " ")
                ),
            )
        }
    };
    let props = hir.properties();
    let longest = match props.maximum_len() {
        None => {
            return ctx.err(
                span,
                format!("regex `{pattern}` can match without bound; give it a maximum length (use {{0,N}} instead of * or +)"),
            )
        }
        Some(n) if n > max_len => {
            return ctx.err(span, format!("regex `{pattern}` can match {n} bytes, over its maximum length {max_len}"));
        }
        Some(n) => n,
    };
    if props.minimum_len() == Some(0) {
        return ctx.err(
            span,
            format!("regex `{pattern}` can match the empty string"),
        );
    }
    let looks = props.look_set();
    if in_dfa && (looks.contains_word_unicode()) {
        return ctx.err(
            span,
            format!("regex `{pattern}` uses a Unicode word boundary, which a DFA cannot hold; write (?-u:\\b)"),
        );
    }
    let syntax = if view == View::Raw && !in_dfa {
        syntax_config(view).unicode(true)
    } else {
        syntax_config(view)
    };
    let nfa = regex_automata::nfa::thompson::Compiler::new()
        .syntax(syntax)
        .configure(
            regex_automata::nfa::thompson::Config::new()
                .nfa_size_limit(Some(REGEX_NFA_LIMIT))
                .utf8(view == View::Word),
        )
        .build(pattern);
    if let Err(e) = nfa {
        return ctx.err(
            span,
            format!(
                "regex `{pattern}` is too large to compile ({e}); counted repetitions multiply"
            ),
        );
    }
    if view == View::Word {
        // Regexes are not normalized for the author: refuse characters the text can never contain.
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\\' {
                chars.next();
                continue;
            }
            if !c.is_alphanumeric() {
                continue;
            }
            let mut s = String::new();
            let mut n = Normalizer::new();
            let mut buf = Vec::new();
            n.feed(&c.to_string(), &mut buf);
            n.finish(&mut buf);
            s.push_str(std::str::from_utf8(&buf).unwrap_or("").trim());
            if s != c.to_string() {
                return ctx.err(
                    span,
                    format!(
                        "word-view regex `{pattern}` contains {c:?}, which normalization turns into {s:?}; write the normalized form"
                    ),
                );
            }
        }
    }
    Ok(longest)
}

/// Summary counts for `mistguard check`: rule id → language code → number of patterns.
pub fn pattern_counts(rs: &CompiledRuleset) -> BTreeMap<String, BTreeMap<&'static str, usize>> {
    let mut out: BTreeMap<String, BTreeMap<&'static str, usize>> = BTreeMap::new();
    for t in &rs.triggers {
        let n = match &t.kind {
            TriggerKind::Phrases(p) => p.len(),
            TriggerKind::Regex { .. } | TriggerKind::Anchored { .. } | TriggerKind::Leak(_) => 1,
            TriggerKind::Model => continue,
        };
        *out.entry(rs.rules[t.rule].id.to_string())
            .or_default()
            .entry(lang::code(t.lang))
            .or_default() += n;
    }
    out
}

/// Ids of languages with at least one trigger.
pub fn languages(rs: &CompiledRuleset) -> Vec<&'static str> {
    let set: HashSet<LangId> = rs
        .triggers
        .iter()
        .map(|t| t.lang)
        .filter(|&l| l != NEUTRAL)
        .collect();
    let mut v: Vec<_> = set.into_iter().collect();
    v.sort();
    v.into_iter().map(lang::code).collect()
}
