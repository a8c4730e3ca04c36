//! The public face of the core: a compiled ruleset that classifies whole texts and streams.

use crate::action::Action;
use crate::rules::{CompiledRuleset, LoadError};
use crate::scan::Scanner;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

/// Options a caller passes with a text.
#[derive(Clone, Debug, Default)]
pub struct ClassifyOptions {
    /// ISO 639-1 language hint (`"fr"`); `None` lets the engine detect the language.
    pub lang_hint: Option<String>,
}

/// One trigger that matched, with its span in the caller's text.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hit {
    /// `RULE-MIST-00N`, `PII` or `SECRET`.
    pub rule_id: Arc<str>,
    pub trigger_id: Arc<str>,
    /// The trigger's language code, or `neutral`.
    pub language: &'static str,
    /// Byte span in the caller's original text (for a stream: from the stream's first byte).
    pub start: u64,
    pub end: u64,
    /// The trigger's weight.
    pub score: f32,
    /// The action of the hit's rule.
    pub action: Action,
}

/// The answer for a whole text.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub action: Action,
    pub hits: Vec<Hit>,
    /// The language the engine settled on (hint or detection); `None` when undecided.
    pub language: Option<&'static str>,
    /// Every language whose triggers applied.
    pub languages_applied: Vec<&'static str>,
    /// The text with every span of a SANITIZE hit replaced by `[FILTERED]` (set when the action is
    /// SANITIZE).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sanitized_text: Option<String>,
    /// Refusal, warning with a safe alternative, help resources, uncertainty note.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Score per fired rule.
    pub rule_scores: Vec<(Arc<str>, f32)>,
}

/// The answer for one chunk of a stream.
#[derive(Clone, Debug, Serialize)]
pub struct StepResult {
    /// The verdict so far (most severe action of every rule fired up to now).
    pub action: Action,
    /// Hits reported by this step (new, or earlier hits whose rule fired in this step).
    pub hits: Vec<Hit>,
    /// Bytes of the stream (from its first byte) the client may forward now: no trigger can still
    /// complete a match that starts before this offset. Never decreases.
    pub release_offset: u64,
    /// The language once decided.
    pub language: Option<&'static str>,
    /// Message for the verdict so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A compiled ruleset, shareable across threads (`Arc<Engine>`).
pub struct Engine {
    pub(crate) rules: CompiledRuleset,
    pub(crate) scanner: Scanner,
    /// Messages already composed, by (language, distinct triggers in the order reported): a
    /// stream points to its message here instead of holding a copy (see [`Engine::message`]).
    messages: dashmap::DashMap<MessageKey, Arc<str>>,
}

/// What a message is made of: the language and the distinct triggers, in the order reported.
type MessageKey = (Option<&'static str>, Box<[u32]>);

/// Most messages the engine keeps composed; past it, a message is composed for its stream alone.
pub const MESSAGE_CACHE_ENTRIES: usize = 4096;

impl Engine {
    /// Loads and compiles the rulesets in `dir`.
    ///
    /// # Errors
    /// A [`LoadError`] naming the file, the line and the reason.
    pub fn from_dir(dir: &Path) -> Result<Engine, LoadError> {
        let rules = crate::rules::load_dir(dir)?;
        Engine::from_ruleset(rules)
    }

    /// The rulesets embedded in the binary at build time (`rulesets/`).
    pub fn bundled() -> Result<Engine, LoadError> {
        let rules = crate::rules::load_bundled()?;
        Engine::from_ruleset(rules)
    }

    pub fn from_ruleset(rules: CompiledRuleset) -> Result<Engine, LoadError> {
        Engine::from_ruleset_with(rules, &crate::scan::ScanConfig::default())
    }

    /// [`Engine::from_ruleset`] with the scanner's build choices (which change its speed, not
    /// its results).
    pub fn from_ruleset_with(
        rules: CompiledRuleset,
        config: &crate::scan::ScanConfig,
    ) -> Result<Engine, LoadError> {
        let scanner = Scanner::build_with(&rules, config)?;
        Ok(Engine {
            rules,
            scanner,
            messages: dashmap::DashMap::new(),
        })
    }

    /// The message of a verdict (see [`crate::decide::message`]), shared: streams that reported
    /// the same triggers in the same language point to one copy. The bool is true when the copy
    /// is the engine's (false once [`MESSAGE_CACHE_ENTRIES`] messages are kept: then it is the
    /// caller's own).
    pub fn message(
        &self,
        action: Action,
        triggers: &[u32],
        language: Option<&'static str>,
    ) -> Option<(Arc<str>, bool)> {
        if action == Action::Allow {
            return None;
        }
        let key = (language, Box::<[u32]>::from(triggers));
        if let Some(m) = self.messages.get(&key) {
            return Some((m.clone(), true));
        }
        let m: Arc<str> = crate::decide::message(self, action, triggers, language)?.into();
        if self.messages.len() < MESSAGE_CACHE_ENTRIES {
            self.messages.insert(key, m.clone());
            return Some((m, true));
        }
        Some((m, false))
    }

    /// The `version` from policy.toml.
    pub fn version(&self) -> &str {
        &self.rules.version
    }

    pub fn ruleset(&self) -> &CompiledRuleset {
        &self.rules
    }

    pub fn scanner(&self) -> &Scanner {
        &self.scanner
    }

    /// Classifies a whole text: the same as one stream fed the whole text and finished.
    pub fn classify(self: &Arc<Self>, text: &str, opts: &ClassifyOptions) -> Verdict {
        let mut session = StreamSession::new(self.clone(), opts);
        session.feed_last(text);
        session.finish();
        session.verdict(Some(text))
    }

    /// Opens a stream.
    pub fn session(self: &Arc<Self>, opts: &ClassifyOptions) -> StreamSession {
        StreamSession::new(self.clone(), opts)
    }
}

pub use crate::scan::StreamSession;
