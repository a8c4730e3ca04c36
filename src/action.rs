//! The actions a verdict can carry, least to most severe.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What the caller should do with the text. Ordered by severity: the verdict is the maximum of the
/// actions of the rules that fired.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Allow,
    Flag,
    Warn,
    Sanitize,
    Restrict,
    RateLimit,
    Block,
    HardBlock,
}

impl Action {
    pub const ALL: [Action; 8] = [
        Action::Allow,
        Action::Flag,
        Action::Warn,
        Action::Sanitize,
        Action::Restrict,
        Action::RateLimit,
        Action::Block,
        Action::HardBlock,
    ];

    /// The lower-case name used in files, JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Flag => "flag",
            Action::Warn => "warn",
            Action::Sanitize => "sanitize",
            Action::Restrict => "restrict",
            Action::RateLimit => "rate_limit",
            Action::Block => "block",
            Action::HardBlock => "hard_block",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Whether text under this action must not reach the user as it is (so a stream holds it back
    /// until the rule's fate is known).
    pub fn withholds(self) -> bool {
        self >= Action::Sanitize
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
