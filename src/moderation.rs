//! Remote moderation, the core part (issue 19, in progress; nothing calls it yet): what the daemon
//! sends to Mistral's moderation API, how it reads the answer, and how categories become hits.
//! No I/O: the HTTP client, keys, retries, breaker, cache and batching belong to an edge.
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
//! - Nothing here holds a key; texts pass through the request bodies only.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Where a category leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A rule of the rulesets (`RULE-MIST-001`, `PII`): the hit takes that rule's action.
    Rule(String),
    /// ACTION_FLAG, under the rule id [`FLAG_RULE`].
    Flag,
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
    /// Hit when the category's score is at least this (0 to 1).
    pub threshold: f64,
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
    pub score: f64,
}

impl RemoteHit {
    /// `moderation.<category>`, the hit's trigger id.
    pub fn trigger_id(&self) -> String {
        format!("moderation.{}", self.category)
    }

    /// The rule id the hit is reported under.
    pub fn rule_id(&self) -> &str {
        match &self.target {
            Target::Rule(r) => r,
            Target::Flag => FLAG_RULE,
        }
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
            threshold: DEFAULT_THRESHOLD,
        };
        let flag = |c: &str| CategoryRule {
            category: c.to_string(),
            target: Target::Flag,
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

    /// The categories of `result` that reach their thresholds, in table order.
    pub fn hits(&self, result: &ModerationResult) -> Vec<RemoteHit> {
        self.rules
            .iter()
            .filter_map(|r| {
                let score = *result.category_scores.get(&r.category)?;
                (score >= r.threshold).then(|| RemoteHit {
                    category: r.category.clone(),
                    target: r.target.clone(),
                    score,
                })
            })
            .collect()
    }
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
            threshold: 0.9,
        })
        .unwrap();
        m.set(CategoryRule {
            category: "jailbreaking".into(),
            target: Target::Rule("RULE-MIST-009".into()),
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
                threshold: 1.5
            })
            .is_err());
        assert!(m
            .set(CategoryRule {
                category: String::new(),
                target: Target::Flag,
                threshold: 0.5
            })
            .is_err());
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
