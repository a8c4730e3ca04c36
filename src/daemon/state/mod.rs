//! Per-subject state shared across replicas (issue 18): escalation levels, suspensions, the
//! RULE-MIST-010 rate limit, per-subject request and byte limits, and the Level-2 review queue.
//!
//! - `redis`: the Redis backend, atomic Lua scripts behind a connection manager, every call
//!   bounded by a short timeout.



use std::time::Duration;

/// The escalation parameters a backend applies (from `EscalationConfig`), in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EscalationParams {
    pub level2_hits: u32,
    pub level2_window_ms: u64,
    pub suspension_ms: u64,
    /// How long a RULE-MIST-010 hit rate-limits its subject (0: not at all).
    pub rate_limit_ms: u64,
    pub level3_subjects: u32,
    pub level3_window_ms: u64,
}

/// One decision with at least one hit, about one subject.
#[derive(Clone, Debug)]
pub struct Violation<'a> {
    /// The subject's keyed hash, 32 lower-case hex digits.
    pub subject: &'a str,
    /// The decision's id (kept with the severe decisions, so a review entry links its records).
    pub decision_id: &'a str,
    /// The decision was BLOCK or above.
    pub severe: bool,
    /// The distinct rule ids that fired.
    pub rules: &'a [&'a str],
    /// Milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// A subject's state before its text is looked at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubjectGate {
    /// Suspended until this instant (ms since the epoch), if suspended now.
    pub suspended_until_ms: Option<u64>,
    /// Rate-limited (RULE-MIST-010) until this instant, if so now.
    pub rate_limited_until_ms: Option<u64>,
    /// The subject had a hit within the level-2 window (escalation level 1).
    pub any_hit: bool,
}

/// What recording a violation changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordOutcome {
    /// The subject's level after the decision: 1, 2 (suspended), or 3 (this decision raised the
    /// level-3 alert).
    pub level: u32,
    /// This decision suspended the subject (exactly one decision does, across replicas).
    pub suspended_now: bool,
    /// This decision raised the level-3 alert (once per `level3_window`, across replicas).
    pub alert: bool,
    /// Severe decisions counted in the window after this one (0 once suspended).
    pub severe_count: u32,
}

/// One entry of the Level-2 review queue.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReviewEntry {
    /// The subject's keyed hash (32 hex digits).
    pub subject: String,
    /// The rules that put it there, with how many decisions in the window each fired in.
    pub rules: Vec<(String, u32)>,
    /// When it was suspended, and until when (ms since the epoch).
    pub suspended_unix_ms: u64,
    pub until_unix_ms: u64,
    /// The decision ids of the severe decisions that suspended it (its records).
    pub record_ids: Vec<String>,
}

/// A per-subject limit: `amount` units (requests, or input bytes) per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub amount: u64,
    pub period: Duration,
}

/// A limit's answer: `None` when within it, else how long until the request would fit.
pub type RetryAfter = Option<Duration>;
