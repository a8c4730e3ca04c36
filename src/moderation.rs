//! Remote moderation, the core part: what the daemon sends to Mistral's moderation API, how it
//! reads the answer, and how categories become ordinary [`Hit`]s. No I/O: the HTTP client, keys,
//! retries, breaker, cache and batching are `io::moderation`; the deadline and fail modes are the
//! daemon's (`daemon::moderate`).
//!
//! The API (SPEC "Remote moderation"): `POST /v1/moderations` takes
//! `{"model", "input": [text, ...]}`, `POST /v1/chat/moderations` takes
//! `{"model", "input": [[{"role", "content"}, ...], ...]}`; both answer
//! `{"id", "model", "results": [{"categories": {name: bool}, "category_scores": {name: number}}]}`,
//! one result per input. Category names differ by model version
//! (`mistral-moderation-2411` has 9, `mistral-moderation-2603` splits `dangerous` and `criminal`
//! and adds `jailbreaking`), so both maps are read as open maps: a category this code has never
//! heard of is kept, and maps to nothing until the operator's table names it.
//!
//! Invariants:
//! - A remote hit only adds: the verdict is the most severe action of all hits, so a category
//!   (`sexual` mapped to a FLAG, say) can never lower a local hit (a RULE-MIST-005 BLOCK).
//! - A category is hit when its `category_scores` value reaches the table's threshold; the API's
//!   own booleans are kept for display only.
//! - A remote hit has no span of its own: it covers the text (or the stream window) it judged.
//!   A rule whose action needs a span (SANITIZE) is reported as FLAG instead, unless the table
//!   line names an action.
//! - Nothing here holds a key; texts pass through the request bodies only.

use crate::action::Action;
use crate::rules::CompiledRuleset;
use crate::verdict::Hit;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Where a category leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A rule of the rulesets (`RULE-MIST-001`, `PII`): the hit takes that rule's action.
    Rule(String),
    /// ACTION_FLAG, under the rule id [`FLAG_RULE`].
    Flag,
}

impl Target {
    /// The rule id of its hits.
    pub fn rule_id(&self) -> &str {
        match self {
            Target::Rule(r) => r,
            Target::Flag => FLAG_RULE,
        }
    }
}

/// The rule id of hits whose category maps to a FLAG.
pub const FLAG_RULE: &str = "MODERATION";

/// The default threshold on `category_scores`.
pub const DEFAULT_THRESHOLD: f64 = 0.5;

/// One line of the mapping table.
#[derive(Clone, Debug, PartialEq)]
pub struct CategoryRule {
    pub category: String,
    pub target: Target,
    /// The hit's action; `None`: the rule's (a FLAG for [`Target::Flag`]).
    pub action: Option<Action>,
    /// Hit when the category's score is at least this (0 to 1).
    pub threshold: f64,
}

impl CategoryRule {
    /// The rule id its hits are reported under.
    pub fn rule_id(&self) -> &str {
        self.target.rule_id()
    }
}

/// The mapping table: category → rule (or FLAG) and threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    rules: Vec<CategoryRule>,
}

/// A category of one result that reached its threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteHit {
    pub category: String,
    pub target: Target,
    pub action: Option<Action>,
    pub score: f64,
}

impl RemoteHit {
    /// `moderation.<category>`, the hit's trigger id.
    pub fn trigger_id(&self) -> String {
        format!("moderation.{}", self.category)
    }

    /// The rule id the hit is reported under.
    pub fn rule_id(&self) -> &str {
        self.target.rule_id()
    }
}

impl Default for Mapping {
    /// The defaults of issue 19: hate and violence to RULE-MIST-001, self-harm to 004,
    /// jailbreaking to 009, the dangerous and criminal categories (both model versions) and
    /// `sexual` to a FLAG, `pii` to PII; every threshold [`DEFAULT_THRESHOLD`]. `health`,
    /// `financial` and `law` (advice categories) map to nothing.
    fn default() -> Mapping {
        let rule = |c: &str, r: &str| CategoryRule {
            category: c.to_string(),
            target: Target::Rule(r.to_string()),
            action: None,
            threshold: DEFAULT_THRESHOLD,
        };
        let flag = |c: &str| CategoryRule {
            category: c.to_string(),
            target: Target::Flag,
            action: None,
            threshold: DEFAULT_THRESHOLD,
        };
        Mapping {
            rules: vec![
                rule("hate_and_discrimination", "RULE-MIST-001"),
                rule("violence_and_threats", "RULE-MIST-001"),
                rule("selfharm", "RULE-MIST-004"),
                rule("jailbreaking", "RULE-MIST-009"),
                flag("dangerous_and_criminal_content"),
                flag("dangerous"),
                flag("criminal"),
                flag("sexual"),
                rule("pii", "PII"),
            ],
        }
    }
}

impl Mapping {
    /// The line of a category, if the table names it.
    pub fn get(&self, category: &str) -> Option<&CategoryRule> {
        self.rules.iter().find(|r| r.category == category)
    }

    /// Sets (or adds) a category's line.
    ///
    /// # Errors
    /// A threshold outside 0..=1, or an empty category name.
    pub fn set(&mut self, line: CategoryRule) -> Result<(), String> {
        if line.category.is_empty() {
            return Err("a category name is empty".into());
        }
        if !(0.0..=1.0).contains(&line.threshold) {
            return Err(format!(
                "category {}: threshold {} is not between 0 and 1",
                line.category, line.threshold
            ));
        }
        match self.rules.iter_mut().find(|r| r.category == line.category) {
            Some(r) => *r = line,
            None => self.rules.push(line),
        }
        Ok(())
    }

    /// Removes a category's line (it then maps to nothing).
    pub fn remove(&mut self, category: &str) {
        self.rules.retain(|r| r.category != category);
    }

    /// Every line, in table order.
    pub fn rules(&self) -> &[CategoryRule] {
        &self.rules
    }

    /// The rule ids the table maps to that `rs` does not define (a FLAG needs none).
    pub fn unknown_rules<'a>(&'a self, rs: &CompiledRuleset) -> Vec<&'a str> {
        self.rules
            .iter()
            .filter(|l| matches!(l.target, Target::Rule(_)))
            .map(CategoryRule::rule_id)
            .filter(|id| !rs.rules.iter().any(|r| &*r.id == *id))
            .collect()
    }

    /// The categories of `result` that reach their thresholds, in table order.
    pub fn hits(&self, result: &ModerationResult) -> Vec<RemoteHit> {
        self.rules
            .iter()
            .filter_map(|r| {
                let score = *result.category_scores.get(&r.category)?;
                (score >= r.threshold).then(|| RemoteHit {
                    category: r.category.clone(),
                    target: r.target.clone(),
                    action: r.action,
                    score,
                })
            })
            .collect()
    }
}

/// The action of a remote hit on `rule_id`: `explicit` when the table names one, else the rule's
/// (FLAG for [`FLAG_RULE`] or a rule `rs` lacks); a span-less SANITIZE becomes FLAG.
fn remote_action(rs: &CompiledRuleset, rule_id: &str, explicit: Option<Action>) -> Action {
    if let Some(a) = explicit {
        return a;
    }
    let a = rs
        .rules
        .iter()
        .find(|r| &*r.id == rule_id)
        .map_or(Action::Flag, |r| r.action);
    if a == Action::Sanitize {
        Action::Flag
    } else {
        a
    }
}

/// The [`Hit`]s of remote hits on the text span `start..end`: trigger `moderation.<category>`,
/// language `neutral`, the category's score as the weight.
pub fn to_hits(remote: &[RemoteHit], rs: &CompiledRuleset, start: u64, end: u64) -> Vec<Hit> {
    remote
        .iter()
        .map(|h| Hit {
            rule_id: Arc::from(h.rule_id()),
            trigger_id: Arc::from(h.trigger_id()),
            language: "neutral",
            start,
            end,
            score: h.score as f32,
            action: remote_action(rs, h.rule_id(), h.action),
        })
        .collect()
}

/// The trigger id of a fail-closed rule's hit when the remote answer was late or failed.
pub const UNAVAILABLE_TRIGGER: &str = "moderation.unavailable";

/// The hits of fail-closed rules when no remote answer came: each rule as if hit (its action as
/// a remote hit would have it), trigger [`UNAVAILABLE_TRIGGER`].
pub fn unavailable_hits(
    fail_closed: &[String],
    mapping: &Mapping,
    rs: &CompiledRuleset,
    start: u64,
    end: u64,
) -> Vec<Hit> {
    fail_closed
        .iter()
        .map(|rule| {
            // The most severe action any line of this rule names.
            let action = mapping
                .rules()
                .iter()
                .filter(|l| l.rule_id() == rule)
                .map(|l| remote_action(rs, rule, l.action))
                .max()
                .unwrap_or(Action::Flag);
            Hit {
                rule_id: Arc::from(rule.as_str()),
                trigger_id: Arc::from(UNAVAILABLE_TRIGGER),
                language: "neutral",
                start,
                end,
                score: 1.0,
                action,
            }
        })
        .collect()
}

/// The message of remote hits for a verdict of `action`: each hit rule's message (in `language`
/// when the rule has one, else English, else its default), most severe rule first.
pub fn rule_message(
    rs: &CompiledRuleset,
    hits: &[Hit],
    action: Action,
    language: Option<&str>,
) -> Option<String> {
    if action == Action::Allow {
        return None;
    }
    let mut rules: Vec<&crate::rules::RuleInfo> = rs
        .rules
        .iter()
        .filter(|r| hits.iter().any(|h| h.rule_id == r.id))
        .collect();
    rules.sort_by_key(|r| std::cmp::Reverse(r.action));
    let mut parts: Vec<&str> = Vec::new();
    for r in rules {
        let m = language
            .and_then(|l| r.messages.get(l))
            .or_else(|| r.messages.get("en"))
            .or(r.message.as_ref());
        if let Some(m) = m {
            if !parts.contains(&m.as_str()) {
                parts.push(m);
            }
        }
    }
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// One result: the API's booleans and scores, as open maps.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct ModerationResult {
    #[serde(default)]
    pub categories: BTreeMap<String, bool>,
    pub category_scores: BTreeMap<String, f64>,
}

/// A whole answer.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct ModerationResponse {
    #[serde(default)]
    pub id: String,
    /// The model that answered (recorded: `-latest` moves).
    #[serde(default)]
    pub model: String,
    pub results: Vec<ModerationResult>,
}

/// Why an answer could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not JSON of the documented shape (the serde message, which holds no input text).
    Malformed(String),
    /// A result count other than the inputs sent.
    WrongLength { expected: usize, got: usize },
    /// A score that is not a number between 0 and 1.
    BadScore(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Malformed(e) => write!(f, "malformed moderation answer: {e}"),
            ParseError::WrongLength { expected, got } => write!(
                f,
                "moderation answer has {got} results for {expected} inputs"
            ),
            ParseError::BadScore(c) => write!(f, "moderation score of {c} is not in 0..=1"),
        }
    }
}

impl std::error::Error for ParseError {}

/// Reads a 200 answer to a request of `expected` inputs.
///
/// # Errors
/// Malformed JSON, a wrong number of results, or a score outside 0..=1.
pub fn parse_response(body: &[u8], expected: usize) -> Result<ModerationResponse, ParseError> {
    let r: ModerationResponse =
        serde_json::from_slice(body).map_err(|e| ParseError::Malformed(e.to_string()))?;
    if r.results.len() != expected {
        return Err(ParseError::WrongLength {
            expected,
            got: r.results.len(),
        });
    }
    for res in &r.results {
        if let Some((c, _)) = res
            .category_scores
            .iter()
            .find(|(_, s)| !s.is_finite() || **s < 0.0 || **s > 1.0)
        {
            return Err(ParseError::BadScore(c.clone()));
        }
    }
    Ok(r)
}

/// The body of `POST /v1/moderations` for a batch of texts.
pub fn moderations_body(model: &str, inputs: &[&str]) -> String {
    serde_json::json!({ "model": model, "input": inputs }).to_string()
}

/// One message of a conversation for `POST /v1/chat/moderations`.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// The body of `POST /v1/chat/moderations` for a batch of conversations.
pub fn chat_body(model: &str, conversations: &[&[Message<'_>]]) -> String {
    let input: Vec<Vec<serde_json::Value>> = conversations
        .iter()
        .map(|c| {
            c.iter()
                .map(|m| serde_json::json!({ "role": m.role, "content": m.content }))
                .collect()
        })
        .collect();
    serde_json::json!({ "model": model, "input": input }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2411: &str = r#"{"id":"mod-1","model":"mistral-moderation-2411","results":[
        {"categories":{"sexual":false,"hate_and_discrimination":true,"violence_and_threats":false,
          "dangerous_and_criminal_content":false,"selfharm":false,"health":false,"financial":false,
          "law":false,"pii":false},
         "category_scores":{"sexual":0.01,"hate_and_discrimination":0.91,"violence_and_threats":0.2,
          "dangerous_and_criminal_content":0.05,"selfharm":0.0,"health":0.0,"financial":0.0,
          "law":0.0,"pii":0.6}}]}"#;

    const V2603: &str = r#"{"id":"mod-2","model":"mistral-moderation-2603","results":[
        {"categories":{"dangerous":true,"criminal":false,"jailbreaking":true,"brand_new":true},
         "category_scores":{"dangerous":0.7,"criminal":0.3,"jailbreaking":0.95,"brand_new":0.99}},
        {"category_scores":{"dangerous":0.0}}]}"#;

    #[test]
    fn both_model_versions_parse_as_open_maps_and_map_to_hits() {
        let m = Mapping::default();
        let r = parse_response(V2411.as_bytes(), 1).unwrap();
        assert_eq!(r.model, "mistral-moderation-2411");
        let hits = m.hits(&r.results[0]);
        let got: Vec<(&str, &str, String)> = hits
            .iter()
            .map(|h| (h.category.as_str(), h.rule_id(), h.trigger_id()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "hate_and_discrimination",
                    "RULE-MIST-001",
                    "moderation.hate_and_discrimination".to_string()
                ),
                ("pii", "PII", "moderation.pii".to_string()),
            ]
        );
        let r = parse_response(V2603.as_bytes(), 2).unwrap();
        // An unknown category is kept, and maps to nothing until the table names it.
        assert_eq!(r.results[0].category_scores["brand_new"], 0.99);
        let hits = m.hits(&r.results[0]);
        let cats: Vec<&str> = hits.iter().map(|h| h.category.as_str()).collect();
        assert_eq!(cats, ["jailbreaking", "dangerous"]);
        assert_eq!(hits[1].target, Target::Flag);
        assert_eq!(hits[1].rule_id(), FLAG_RULE);
        // The second result had no booleans at all: fine, and nothing reaches a threshold.
        assert!(m.hits(&r.results[1]).is_empty());
    }

    #[test]
    fn the_table_can_be_changed() {
        let mut m = Mapping::default();
        m.set(CategoryRule {
            category: "brand_new".into(),
            target: Target::Rule("RULE-MIST-006".into()),
            action: None,
            threshold: 0.9,
        })
        .unwrap();
        m.set(CategoryRule {
            category: "jailbreaking".into(),
            target: Target::Rule("RULE-MIST-009".into()),
            action: None,
            threshold: 0.99,
        })
        .unwrap();
        m.remove("dangerous");
        let r = parse_response(V2603.as_bytes(), 2).unwrap();
        let hits = m.hits(&r.results[0]);
        let cats: Vec<&str> = hits.iter().map(|h| h.category.as_str()).collect();
        assert_eq!(cats, ["brand_new"]);
        assert!(m
            .set(CategoryRule {
                category: "x".into(),
                target: Target::Flag,
                action: None,
                threshold: 1.5
            })
            .is_err());
        assert!(m
            .set(CategoryRule {
                category: String::new(),
                target: Target::Flag,
                action: None,
                threshold: 0.5
            })
            .is_err());
    }

    #[test]
    fn remote_hits_take_their_rules_actions_and_never_a_span_less_sanitize() {
        let engine = crate::Engine::bundled().unwrap();
        let rs = engine.ruleset();
        let m = Mapping::default();
        let r = parse_response(V2411.as_bytes(), 1).unwrap();
        let hits = to_hits(&m.hits(&r.results[0]), rs, 0, 42);
        let got: Vec<(&str, &str, Action, u64)> = hits
            .iter()
            .map(|h| (&*h.rule_id, &*h.trigger_id, h.action, h.end))
            .collect();
        // RULE-MIST-001 blocks; PII would sanitize, which needs a span: FLAG.
        assert_eq!(
            got,
            [
                (
                    "RULE-MIST-001",
                    "moderation.hate_and_discrimination",
                    Action::Block,
                    42
                ),
                ("PII", "moderation.pii", Action::Flag, 42),
            ]
        );
        let mut m2 = Mapping::default();
        m2.set(CategoryRule {
            category: "pii".into(),
            target: Target::Rule("PII".into()),
            action: Some(Action::Warn),
            threshold: 0.5,
        })
        .unwrap();
        let hits = to_hits(&m2.hits(&r.results[0]), rs, 0, 1);
        assert_eq!(hits[1].action, Action::Warn);
        let un = unavailable_hits(
            &["RULE-MIST-004".to_string(), FLAG_RULE.to_string()],
            &m,
            rs,
            0,
            5,
        );
        let got: Vec<(&str, &str, Action)> = un
            .iter()
            .map(|h| (&*h.rule_id, &*h.trigger_id, h.action))
            .collect();
        assert_eq!(
            got,
            [
                ("RULE-MIST-004", UNAVAILABLE_TRIGGER, Action::Block),
                (FLAG_RULE, UNAVAILABLE_TRIGGER, Action::Flag)
            ]
        );
        assert!(m.unknown_rules(rs).is_empty());
        m2.set(CategoryRule {
            category: "x".into(),
            target: Target::Rule("RULE-MIST-099".into()),
            action: None,
            threshold: 0.5,
        })
        .unwrap();
        assert_eq!(m2.unknown_rules(rs), ["RULE-MIST-099"]);
    }

    #[test]
    fn bad_answers_are_refused() {
        assert!(matches!(
            parse_response(b"{not json", 1),
            Err(ParseError::Malformed(_))
        ));
        assert!(matches!(
            parse_response(br#"{"id":"x","model":"m"}"#, 1),
            Err(ParseError::Malformed(_))
        ));
        assert_eq!(
            parse_response(V2411.as_bytes(), 2),
            Err(ParseError::WrongLength {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            parse_response(br#"{"results":[{"category_scores":{"sexual":1.7}}]}"#, 1),
            Err(ParseError::BadScore("sexual".into()))
        );
        assert!(matches!(
            parse_response(br#"{"results":[{"category_scores":{"sexual":"high"}}]}"#, 1),
            Err(ParseError::Malformed(_))
        ));
    }

    #[test]
    fn request_bodies_follow_the_contract() {
        let b: serde_json::Value = serde_json::from_str(&moderations_body(
            "mistral-moderation-latest",
            &["a", "b\"c"],
        ))
        .unwrap();
        assert_eq!(
            b,
            serde_json::json!({"model": "mistral-moderation-latest", "input": ["a", "b\"c"]})
        );
        let conv = [
            Message {
                role: "user",
                content: "hi",
            },
            Message {
                role: "assistant",
                content: "hello",
            },
        ];
        let b: serde_json::Value =
            serde_json::from_str(&chat_body("m", &[&conv[..], &conv[..1]])).unwrap();
        assert_eq!(
            b,
            serde_json::json!({"model": "m", "input": [
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                [{"role": "user", "content": "hi"}]
            ]})
        );
    }
}
