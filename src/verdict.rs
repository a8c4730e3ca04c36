//! What the core answers: the hits, the verdict of a whole text and the step of a stream, and
//! the options a caller passes with a text.
//!
//! These types sit at the bottom of the core: every step of a request's path may use them, and
//! they use nothing of the core but [`Action`].

use crate::action::Action;
use serde::Serialize;
use std::sync::Arc;

/// Options a caller passes with a text.
#[derive(Clone, Debug, Default)]
pub struct ClassifyOptions {
    /// ISO 639-1 language hint (`"fr"`); `None` lets the engine detect the language.
    pub lang_hint: Option<String>,
    /// Which way the text travels: some triggers apply to completions only (active markup,
    /// exfiltration links), and a trigger may ask less of a prompt than of a completion (an
    /// e-mail address: FLAG in a prompt, SANITIZE in a completion).
    pub direction: Direction,
    /// Leaks to look for: protected texts and canaries (see [`crate::leak`]).
    pub leak: Option<LeakOptions>,
    /// Key of hashed placeholders (`[EMAIL:1f2e3d4c5b6a]`); `None`: the engine's own (random
    /// per engine).
    pub placeholder_key: Option<crate::leak::LeakKey>,
}

/// What a text is searched for as a leak.
#[derive(Clone)]
pub struct LeakOptions {
    pub key: crate::leak::LeakKey,
    /// The protected texts' shingle hashes.
    pub protected: Vec<Arc<crate::leak::Protected>>,
    /// Canary tokens issued under `key`.
    pub canaries: bool,
}

impl std::fmt::Debug for LeakOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeakOptions")
            .field("protected", &self.protected.len())
            .field("canaries", &self.canaries)
            .finish()
    }
}

/// Which way a text travels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Not said: treated as a prompt.
    #[default]
    Unspecified,
    /// A prompt on its way to the model.
    Input,
    /// A completion on its way to the user.
    Output,
    /// The string values of a tool call's arguments: triggers apply as to a prompt.
    ToolArguments,
}

impl Direction {
    /// 0 for a prompt (input, unspecified, tool arguments), 1 for a completion: the index of a
    /// trigger's per-direction settings.
    pub fn index(self) -> usize {
        usize::from(self == Direction::Output)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Unspecified => "unspecified",
            Direction::Input => "input",
            Direction::Output => "output",
            Direction::ToolArguments => "tool_arguments",
        }
    }
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
    /// The text this step releases (from the previous `release_offset` to this one) with every
    /// sanitized span replaced by its placeholder; set when the stream was asked to compose it
    /// (`StreamSession::compose_released_text`). A placeholder is released whole as soon as its
    /// span starts before `release_offset`, so the text after it resumes where the span ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released_text: Option<String>,
}
